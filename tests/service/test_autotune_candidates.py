"""Autotune's candidate plans carry load costs and prefer the nodes holding the weights, as every other plan
(service/autotune.py `candidates`, scheduler/load_cost.py)."""

from __future__ import annotations

from ollama_distributed.scheduler import Workload
from ollama_distributed.scheduler.load_cost import FileLayout, Holding, TensorExtent, WeightSources
from ollama_distributed.service.autotune import candidates
from tests.scheduler.helpers import GB, cluster, node, tiny_profile

LAYOUT = FileLayout(size=1000, data_offset=150, chunk_bytes=100, tensors=(
    TensorExtent("token_embd.weight", 150, 150), TensorExtent("blk.0.attn_q.weight", 300, 200),
    TensorExtent("blk.1.attn_q.weight", 500, 200), TensorExtent("output_norm.weight", 700, 50),
    TensorExtent("output.weight", 750, 250)))


def test_candidates_carry_load_costs_and_prefer_holders() -> None:
    prof = tiny_profile(layers=2)
    spec = cluster(node("a", 1 * GB), node("b", 1 * GB), node("c", 1 * GB))
    inputs = (prof, spec, Workload())
    blind = candidates(inputs, 3)
    assert len(blind) > 1 and all(p.load == () for p in blind)
    sources = WeightSources("c", {"c": Holding(has_file=True)}, LAYOUT, links={n: spec.default_link for n in "abc"})
    told = candidates(inputs, 3, sources)
    assert len(told) > 1
    for p in told:
        assert [l.node for l in p.load] == [sh.node for st in p.stages for sh in st.shards], p.load
        assert all((l.holds, l.fetch_bytes) == ("file", 0) for l in p.load if l.node == "c")
        assert all(l.holds == "none" and l.fetch_bytes > 0 for l in p.load if l.node != "c")
    single = [p for p in told if len(p.nodes) == 1]
    assert not single or single[0].nodes == ["c"], [p.nodes for p in told]  # one node: the holder
