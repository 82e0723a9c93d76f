"""Cost model: predicted time of a decode step and of a prefill, and memory of a shard.

Compute (roofline, Williams, Waterman & Patterson 2009, "Roofline: an insightful visual performance model"):
a kernel that moves `q` bytes and does `w` FLOPs on a node with bandwidth β and compute π takes
max(q/β, w/π). One layer is two such phases separated by the tensor-parallel all-reduces — attention (q, k,
v, o projections + attention over the cache) and MLP (gate, up, down) — so

  t_layer = max_i(a_i · τa_i) + max_i(f_i · τf_i) + 2 · AR(p)                            (decode, per step)
  τa_n = max((Wa + b·Ka) / β_n, b·Fa / π_n)   per KV group:  Wa its weight bytes, Ka the bytes of its cache
                                             row read per sequence (2·d·c elements), Fa its FLOPs per token
  τf_n = max(Wf / β_n, b·Ff / π_n)            per FFN column
where shard i holds a_i KV groups and f_i FFN columns (f_i whole experts of a mixture-of-experts layer: Wf is then
an expert's bytes times the share of experts a step of b tokens reads, Ff its FLOPs times k/n; profile.py), b is
the batch (concurrent sequences) and c the mean
decode context. Weights are read once per step for the whole batch; cache reads and FLOPs scale with b.
Both phases are linear in the units held, so a node's layer time is linear in its layer count — the property
the pipeline search relies on. The last stage adds the output head on its first shard:
  t_head = max(Wh / β, b·2·V·H / π).   (Embedding lookup moves b·H elements: negligible, memory only.)

Network (alpha-beta, Hockney 1994): a hop of m bytes over a link costs α + m/β_link. Between stages the
residual stream of the batch, b·H·act_bytes, moves; the sampled token ids (4 bytes each) go back from the last
stage to the first. A ring all-reduce of m bytes over p nodes is a reduce-scatter plus an all-gather,
2(p−1) steps of m/p bytes each (Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters
of workstations"; Thakur, Rabenseifner & Gropp 2005 for MPICH's ring):
  AR(p) = 2(p−1) · (α + m / (p · β))   with α, β of the slowest link among the group's pairs (conservative).
Megatron-style TP needs two all-reduces per layer (after o-projection and after down-projection).

Decode step of a plan with stages 1..k (stage time T_i, hop out of stage i h_i, return hop after the last):
  S = Σ T_i + Σ_{i<k} h_i + [k>1]·h_return          (one token of one batch through the whole pipeline)
  B = max_i (T_i + h_out_i)                           (bottleneck; h_out of the last = return hop)
latency objective: decode_ms = S, tokens/s = b / S. throughput objective (k batches in flight, the steady
state of GPipe, Huang et al. 2019): tokens/s = b / B, decode_ms = k·B (each batch waits for the others).
Since S ≤ k·B always, k·B is the per-token interval. Known simplification: each stage's KV cache is sized for
one batch (`concurrency` sequences × context); keeping k batches in flight needs k times that, so size the
workload's concurrency for what the runtime will really hold. Prefill of the batch's prompts (P tokens each) uses the
same phases with b·P tokens and causal attention FLOPs 4·d·P(P+1)/2 per query head per sequence, no pipelining.

Fixed overhead (the cluster's StepOverhead, scheduler/cluster.py): the runtime spends time per step that no
roofline term sees — Python dispatch, one Ray call and its result, each stage's task dispatch and receive/send
bookkeeping, each sequence's sampling and streaming. On a small model this dominates (bench/overhead_bench.py:
milliseconds per step against a fraction of a millisecond of predicted compute for the tests' tiny model). With
o_step, o_stage and o_seq:
  T_i ← T_i + o_stage        (every stage; so B and the pipeline search see it too)
  S   ← S + o_step + b·o_seq (the driver's share, once per step);   prefill likewise;
  throughput: the predicted interval is max(B, o_step + b·o_seq), the objective stays B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .cluster import ClusterSpec, LinkSpec, StepOverhead
from .plan import PartitionPlan, Prediction, StageSpec
from .profile import ModelProfile
from .workload import Workload

TOKEN_ID_BYTES = 4


@dataclass(frozen=True)
class NodeRates:
    """Per-node unit times (seconds) for the current profile and workload."""

    tau_attn: float      # decode, one KV group of one layer
    tau_ffn: float       # decode, one FFN column of one layer
    t_head: float        # decode, output head
    pre_attn: float      # prefill, one KV group of one layer
    pre_ffn: float
    pre_head: float

    @property
    def t_layer_unit(self) -> float:  # pragma: no cover - convenience
        return self.tau_attn + self.tau_ffn


class CostModel:
    """Everything the strategies evaluate, for one (profile, cluster, workload, objective)."""

    def __init__(self, profile: ModelProfile, cluster: ClusterSpec, workload: Workload, objective: str = "latency",
                 memory_headroom: float = 0.0) -> None:
        if objective not in ("latency", "throughput"):
            raise ValueError(f"objective must be latency or throughput, got {objective!r}")
        if workload.context_tokens > profile.context_length:
            raise ValueError(f"workload context {workload.context_tokens} exceeds the model's "
                             f"{profile.context_length} tokens")
        self.profile, self.cluster, self.workload, self.objective = profile, cluster, workload, objective
        p, b = profile, workload.concurrency
        c = workload.mean_decode_context
        P = workload.prompt_tokens
        self.batch = b
        # memory per unit per layer, including its share of the KV cache for context × concurrency
        # (a sliding-window layer caches only its window: profile.kv_context)
        self.kv_unit_mem = p.kv_unit_bytes_per_token * p.kv_context(workload.context_tokens) * b
        self.attn_unit_mem = p.attn_unit_bytes + self.kv_unit_mem
        self.ffn_unit_mem = p.ffn_unit_bytes
        # per layer: what every shard holds (norms, router) and the shared expert, which one shard of a stage holds
        self.norm_mem = p.layer_norm_bytes - p.shared_expert_bytes
        self.shared_mem = p.shared_expert_bytes
        self.layer_mem = (p.n_kv_heads * self.attn_unit_mem + p.ffn_units * self.ffn_unit_mem + self.norm_mem
                          + self.shared_mem)
        self.capacity = {n.name: int(n.memory_bytes * (1.0 - memory_headroom)) for n in cluster.nodes}
        attn_w = p.attn_unit_bytes + b * p.kv_unit_bytes_per_token * p.kv_context(c)
        attn_f = b * p.attn_unit_flops(p.kv_context(c))
        # an MoE FFN: memory holds every expert, a step reads only the routed ones and computes k of n per token
        ffn_f = b * p.ffn_compute_fraction * p.ffn_unit_flops
        ffn_w, pre_ffn_w = p.ffn_unit_bytes * p.ffn_read_fraction(b), p.ffn_unit_bytes * p.ffn_read_fraction(b * P)
        # prefill: KV rows written once (b·P tokens), causal attention over the prompt
        pre_attn_w = p.attn_unit_bytes + b * P * p.kv_unit_bytes_per_token
        pre_attn_f = b * (P * 2.0 * p.attn_unit_params + 4.0 * p.group_size * p.head_dim * P * (P + 1) / 2.0)
        pre_ffn_f = b * P * p.ffn_compute_fraction * p.ffn_unit_flops
        head_f = b * p.head_flops
        self.rates: dict[str, NodeRates] = {}
        by_hw: dict[tuple[float, float], NodeRates] = {}  # identical machines share their rates
        for n in cluster.nodes:
            bw, fl = n.memory_bandwidth, n.flops
            known = by_hw.get((bw, fl))
            if known is not None:
                self.rates[n.name] = known
                continue
            self.rates[n.name] = by_hw[(bw, fl)] = NodeRates(
                tau_attn=max(attn_w / bw, attn_f / fl), tau_ffn=max(ffn_w / bw, ffn_f / fl),
                t_head=max(p.head_bytes / bw, head_f / fl),
                pre_attn=max(pre_attn_w / bw, pre_attn_f / fl), pre_ffn=max(pre_ffn_w / bw, pre_ffn_f / fl),
                pre_head=max(p.head_bytes / bw, head_f / fl))
        self._extras = {(e, o): (p.embedding_bytes if e else 0.0) + (p.head_extra_bytes(e) if o else 0.0)
                        for e in (False, True) for o in (False, True)}
        self.hidden_bytes = p.hidden_bytes_per_token * b
        self.prefill_hidden_bytes = p.hidden_bytes_per_token * b * P
        self.return_bytes = TOKEN_ID_BYTES * b
        self.overhead: StepOverhead = cluster.overhead

    # --- per-node quantities ---------------------------------------------------------------------------
    def t_layer(self, node: str) -> float:
        """Decode time of one full-width layer on `node`."""
        r = self.rates[node]
        return self.profile.n_kv_heads * r.tau_attn + self.profile.ffn_units * r.tau_ffn

    def t_head(self, node: str) -> float:
        return self.rates[node].t_head

    def extras_mem(self, has_embedding: bool, has_output: bool) -> float:
        return self._extras[(bool(has_embedding), bool(has_output))]

    def shard_memory(self, n_layers: int, kv_units: int, ffn_units: int, has_embedding: bool, has_output: bool,
                     shared_expert: bool = False) -> int:
        """Weights of the shard's slices of n_layers layers + its KV cache + embedding / output head (+ the layers'
        shared expert on the one shard of a stage that holds it: `holds_shared_expert`)."""
        per_layer = (kv_units * self.attn_unit_mem + ffn_units * self.ffn_unit_mem + self.norm_mem
                     + (self.shared_mem if shared_expert else 0.0))
        # floor, so that a shard the float check accepted never reads as over capacity
        return int(n_layers * per_layer + self.extras_mem(has_embedding, has_output))

    def holds_shared_expert(self, experts: tuple[int, int]) -> bool:
        """Whether the shard with FFN units `experts` of a stage holds its layers' shared expert: the one whose
        experts start at 0 and which holds some (as the engine decides, model/moe.py holds_shared_expert; a stage's
        ranges are contiguous from 0, so exactly one shard)."""
        return self.shared_mem > 0 and experts[0] == 0 < experts[1]

    def layers_fit(self, node: str, has_embedding: bool, has_output: bool) -> int:
        """Full-width layers `node` can hold with the given roles (capped at the model's layer count)."""
        free = self.capacity[node] - self.extras_mem(has_embedding, has_output)
        if free < 0:
            return -1  # cannot even take the role
        return min(self.profile.n_layers, int(free // self.layer_mem))

    # --- network -----------------------------------------------------------------------------------------
    def link(self, a: str, b: str) -> LinkSpec:
        return self.cluster.link(a, b)

    def hop(self, a: str, b: str, prefill: bool = False) -> float:
        if a == b:
            return 0.0
        return self.link(a, b).transfer_time(self.prefill_hidden_bytes if prefill else self.hidden_bytes)

    def return_hop(self, last: str, first: str) -> float:
        return 0.0 if last == first else self.link(last, first).transfer_time(self.return_bytes)

    def allreduce(self, nodes: Sequence[str], nbytes: float) -> float:
        """Ring all-reduce of nbytes over `nodes` (formula in the module docstring); 0 for one node."""
        p = len(nodes)
        if p <= 1:
            return 0.0
        links = [self.link(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:]]
        lat = max(l.latency for l in links)
        bw = min(l.bandwidth for l in links)
        return 2 * (p - 1) * (lat + nbytes / (p * bw))

    # --- stages and plans ----------------------------------------------------------------------------------
    def stage_times(self, stage: StageSpec, last: bool) -> tuple[float, float]:
        """(decode, prefill) time of a stage, including the output head when it is the last stage."""
        nodes = [sh.node for sh in stage.shards]
        n_layers = stage.layers[1] - stage.layers[0]
        dec_a = max((sh.kv_heads[1] - sh.kv_heads[0]) * self.rates[sh.node].tau_attn for sh in stage.shards)
        dec_f = max(sh.ffn_units * self.rates[sh.node].tau_ffn for sh in stage.shards)
        pre_a = max((sh.kv_heads[1] - sh.kv_heads[0]) * self.rates[sh.node].pre_attn for sh in stage.shards)
        pre_f = max(sh.ffn_units * self.rates[sh.node].pre_ffn for sh in stage.shards)
        dec = n_layers * (dec_a + dec_f + 2 * self.allreduce(nodes, self.hidden_bytes))
        pre = n_layers * (pre_a + pre_f + 2 * self.allreduce(nodes, self.prefill_hidden_bytes))
        if last:
            dec += self.rates[nodes[0]].t_head
            pre += self.rates[nodes[0]].pre_head
        return dec, pre

    def evaluate(self, stages: Sequence[StageSpec]) -> tuple[Prediction, float]:
        """Prediction of a layout and its objective cost in seconds (S for latency, B for throughput)."""
        k = len(stages)
        reps = [st.shards[0].node for st in stages]
        o = self.overhead
        dec, pre = zip(*(self.stage_times(st, i == k - 1) for i, st in enumerate(stages)))
        dec = tuple(d + o.stage_s for d in dec)
        hops = [self.hop(reps[i], reps[i + 1]) for i in range(k - 1)]
        ret = self.return_hop(reps[-1], reps[0]) if k > 1 else 0.0
        driver = o.step_s + self.batch * o.seq_s
        s = sum(dec) + sum(hops) + ret + driver
        bottleneck = max(d + h for d, h in zip(dec, hops + [ret]))
        prefill = (sum(pre) + sum(self.hop(reps[i], reps[i + 1], prefill=True) for i in range(k - 1))
                   + o.total(k, self.batch))
        b = self.batch
        if self.objective == "latency":
            return Prediction(s * 1e3, prefill * 1e3, b / s), s
        # The driver's share bounds the pipeline's rate too, but it is the same for every layout: it is left out
        # of the objective (it would only turn real differences between layouts into ties).
        paced = max(bottleneck, driver)
        return Prediction(k * paced * 1e3, prefill * 1e3, b / paced), bottleneck

    def cost(self, plan: PartitionPlan) -> float:
        return self.evaluate(plan.stages)[1]

    def check_memory(self, stages: Sequence[StageSpec]) -> list[str]:
        """Names of nodes whose shard exceeds their capacity (empty when the layout fits)."""
        return [sh.node for st in stages for sh in st.shards if sh.memory_bytes > self.capacity[sh.node]]
