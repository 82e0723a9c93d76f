"""Small model profiles and clusters for scheduler tests, and brute-force reference searches."""

from __future__ import annotations

import itertools
from typing import Iterator

from ollama_distributed.scheduler import ClusterSpec, LinkSpec, ModelProfile, NodeSpec
from ollama_distributed.scheduler.cost import CostModel

GB = 10**9


def tiny_profile(layers: int = 8, kv: int = 4, group: int = 2, ffn: int = 8, hidden: int = 64, vocab: int = 256,
                 tied: bool = False) -> ModelProfile:
    return ModelProfile("tiny", layers, hidden, kv * group, kv, 16, ffn, vocab, context_length=4096,
                        tie_embeddings=tied, weight_bytes=2.0, kv_bytes=2.0, act_bytes=2.0)


def node(name: str, mem: float, bw: float = 100e9, flops: float = 10e12) -> NodeSpec:
    return NodeSpec(name, int(mem), bw, flops)


def cluster(*nodes: NodeSpec, latency: float = 2e-4, bandwidth: float = 125e6,
            overrides: dict[tuple[str, str], LinkSpec] | None = None) -> ClusterSpec:
    return ClusterSpec(tuple(nodes), LinkSpec(latency, bandwidth), overrides or {})


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write total as an ordered sum of `parts` positive integers."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0,) + cuts + (total,)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def fits(cm: CostModel, node: str, n_layers: int, a: int, f: int, emb: bool, out: bool) -> bool:
    need = n_layers * (a * cm.attn_unit_mem + f * cm.ffn_unit_mem + cm.norm_mem) + cm.extras_mem(emb, out)
    return need <= cm.capacity[node]


def brute_pipeline(cm: CostModel) -> float | None:
    """Minimum objective over every ordered node subset and every layer composition (full-width stages)."""
    L = cm.profile.n_layers
    A, F = cm.profile.n_kv_heads, cm.profile.ffn_size
    names = cm.cluster.names
    best = None
    for k in range(1, min(len(names), L) + 1):
        for order in itertools.permutations(names, k):
            hops = [cm.hop(order[i], order[i + 1]) for i in range(k - 1)]
            ret = cm.return_hop(order[-1], order[0]) if k > 1 else 0.0
            for comp in compositions(L, k):
                if not all(fits(cm, n, l, A, F, i == 0, i == k - 1) for i, (n, l) in enumerate(zip(order, comp))):
                    continue
                times = [l * cm.t_layer(n) for n, l in zip(order, comp)]
                times[-1] += cm.t_head(order[-1])
                if cm.objective == "latency":
                    v = sum(times) + sum(hops) + ret
                else:
                    v = max(t + h for t, h in zip(times, hops + [ret]))
                if best is None or v < best:
                    best = v
    return best


def brute_tensor(cm: CostModel, max_tp: int = 8) -> float | None:
    """Minimum latency over every node group (size ≥ 2), output-head node, KV-group split and FFN split."""
    L = cm.profile.n_layers
    A, F = cm.profile.n_kv_heads, cm.profile.ffn_size
    names = cm.cluster.names
    best = None
    for p in range(2, min(len(names), A, max_tp) + 1):
        for group in itertools.combinations(names, p):
            ar = 2 * cm.allreduce(group, cm.hidden_bytes)
            for head in group:
                order = (head,) + tuple(n for n in group if n != head)
                for a in compositions(A, p):
                    ta = max(x * cm.rates[n].tau_attn for x, n in zip(a, order))
                    for f in compositions(F, p):
                        if not all(fits(cm, n, L, x, y, True, i == 0)
                                   for i, (n, x, y) in enumerate(zip(order, a, f))):
                            continue
                        tf = max(y * cm.rates[n].tau_ffn for y, n in zip(f, order))
                        v = L * (ta + tf + ar) + cm.t_head(head)
                        if best is None or v < best:
                            best = v
    return best
