#!/usr/bin/env bash
# Two Ray nodes in two network namespaces (see bench/netns_two_nodes.py). Needs root and iproute2.
# Touches only what it creates: namespaces od-bench-a/b, their veth pair, and the Ray processes it starts (killed
# by pid at the end — never `ray stop`, which would stop every Ray on the machine).
set -u
A=od-bench-a; B=od-bench-b; PORT=6399; TMPA=/tmp/odns-a; TMPB=/tmp/odns-b
cleanup() {
  for d in "$TMPA" "$TMPB"; do
    for pid in $(pgrep -f -- "$d" || true); do kill -9 "$pid" 2>/dev/null; done
  done
  ip netns del "$A" 2>/dev/null; ip netns del "$B" 2>/dev/null
  rm -rf "$TMPA" "$TMPB"
}
trap cleanup EXIT
ip netns add "$A" && ip netns add "$B" || exit 1
ip link add od-veth-a type veth peer name od-veth-b
ip link set od-veth-a netns "$A"; ip link set od-veth-b netns "$B"
ip -n "$A" addr add 10.77.0.1/24 dev od-veth-a; ip -n "$B" addr add 10.77.0.2/24 dev od-veth-b
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set od-veth-a up; ip -n "$B" link set od-veth-b up
SHAPE="netem delay 1ms rate 1gbit"
if ! ip netns exec "$A" tc qdisc add dev od-veth-a root netem delay 1ms rate 1gbit 2>/dev/null; then
  SHAPE="tbf rate 1gbit (no sch_netem in this kernel: no added delay)"
  ip netns exec "$A" tc qdisc add dev od-veth-a root tbf rate 1gbit burst 128kb latency 50ms
  ip netns exec "$B" tc qdisc add dev od-veth-b root tbf rate 1gbit burst 128kb latency 50ms
else
  ip netns exec "$B" tc qdisc add dev od-veth-b root netem delay 1ms rate 1gbit
fi
echo "link shaping: $SHAPE"
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0   # token from ~/.ray/auth_token (shared file system here)
[ -f ~/.ray/auth_token ] || ray get-auth-token --generate >/dev/null
mkdir -p "$TMPA" "$TMPB"
RAY_TMPDIR=$TMPA ip netns exec "$A" ray start --head --node-ip-address 10.77.0.1 --port $PORT --num-cpus 1 \
  --resources '{"od_memory_mib": 2048}' --labels ollama-distributed.io/node=hostA --include-dashboard false \
  --temp-dir "$TMPA" --disable-usage-stats >/dev/null || exit 1
# FETCH=1: host B cannot see the model (an empty tmpfs over the bundled model's directory in its own mount
# namespace), so its shard fetches its slice from host A over the shaped link (runtime/weight_fetch.py).
START_B="ray start --address 10.77.0.1:$PORT --node-ip-address 10.77.0.2 --num-cpus 1 \
  --resources '{\"od_memory_mib\": 2048}' --labels ollama-distributed.io/node=hostB --disable-usage-stats"
if [ "${FETCH:-0}" = 1 ]; then
  MODEL_DIR=$(python -c 'from ollama_distributed.model.bundled import bundled_model_path as p; print(p("smollm2:135m").parent)')
  RAY_TMPDIR=$TMPB OLLAMA_DISTRIBUTED_SLICE_CACHE=$TMPB/slices ip netns exec "$B" unshare --mount --propagation private \
    sh -c "mount -t tmpfs tmpfs '$MODEL_DIR' && $START_B" >/dev/null || exit 1
else
  RAY_TMPDIR=$TMPB ip netns exec "$B" sh -c "$START_B" >/dev/null || exit 1
fi
RAY_TMPDIR=$TMPA ip netns exec "$A" python "$(dirname "$0")/netns_two_nodes.py" 10.77.0.1:$PORT "${1:-24}"
