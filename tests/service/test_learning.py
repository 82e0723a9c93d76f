"""The learning loop on a real engine: a real model generates, TimedHandle measures it, the LearningLoop feeds the
partition manager and the calibration, and the calibrated cost model's prediction of the running plan converges
to what was measured. Also: failures, autotune and re-plan proposals as events and metrics."""

from __future__ import annotations

import statistics

import pytest

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.tokenizer import Tokenizer
from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.engine import GenerationRequest, InferenceEngine
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.scheduler import ClusterSpec, ModelProfile, NodeSpec, PlanConfig, Workload, plan
from ollama_distributed.scheduler.calibration import StepTimings, Trial
from ollama_distributed.scheduler.planner import plan_candidates
from ollama_distributed.service.learning import LearningConfig, LearningLoop

from tests.scheduler.helpers import cluster, node


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    eng = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=512), Tokenizer.from_gguf(tiny_gguf), max_batch=4,
                          max_queue=16, name="learning-test")
    yield eng
    eng.close()


def test_calibration_converges_on_a_real_engine(engine, tiny_gguf) -> None:
    cfg = read_config(tiny_gguf)
    profile = ModelProfile.from_config(cfg, dtype="f32", name="tiny")
    # declared far from the truth: a node that streams 200 GB/s and computes 10 TFLOP/s
    declared = ClusterSpec((NodeSpec("this-host", 8 * 10**9, 200e9, 10e12),))
    wl = Workload(prompt_tokens=16, output_tokens=24, context_tokens=64)
    running = plan(profile, declared, wl, PlanConfig(strategy="single"))
    loop = LearningLoop()
    loop.attach("tiny", running, profile, declared, wl)
    tok = Tokenizer.from_gguf(tiny_gguf)
    prompt = tok.encode("the quick brown fox jumps over the lazy dog again and again")
    n = 15
    for i in range(n):
        h = loop.track("tiny", engine.submit(GenerationRequest(prompt_ids=prompt, options=GenerationOptions(
            temperature=0.0, num_predict=24))), batch_fn=lambda: engine.stats()["running"])
        chunks = list(h)
        assert chunks[-1].done and chunks[-1].eval_count == 24
    hist = loop.history()["calibration"]
    assert len(hist) == n
    measured = [e["measured_ms"] for e in hist]
    err = [abs(e["predicted_before_ms"] - e["measured_ms"]) / e["measured_ms"] for e in hist]
    assert err[0] > 0.9  # the declared node is wildly optimistic
    final_pred = hist[-1]["predicted_after_ms"]
    recent = statistics.median(measured[-5:])
    assert abs(final_pred - recent) / recent < 0.25, (final_pred, measured)
    # predictions moved toward the measurement: the recent errors (one request each, so noisy on a shared CPU)
    # are far below the first
    assert statistics.median(err[-5:]) < 0.25 < err[0], err
    # the partition manager saw every request with its measured latency
    st = loop.manager.stats("single")
    assert st["executions"] == n and st["successes"] == n and st["ema_latency_ms"] > 0
    # and the metrics moved with the traffic
    text = loop.metrics.render().decode()
    assert 'ollama_distributed_time_to_first_token_seconds_count{model="tiny"} 15.0' in text
    assert f'ollama_distributed_tokens_generated_total{{model="tiny"}} {24.0 * n}' in text
    ev = loop.events.recent(kind="plan")
    assert ev and ev[0].data["plan_id"] == running.plan_id


def test_failures_autotune_and_drift_become_events() -> None:
    profile = ModelProfile("m16", 16, 512, 8, 4, 64, 1536, 8000, context_length=4096)
    mem = profile.total_weight_bytes * 0.6
    declared = cluster(node("a", mem, 20e9, 1e12), node("b", mem, 60e9, 3e12), node("c", mem, 20e9, 1e12))
    wl = Workload(prompt_tokens=64, output_tokens=1, context_tokens=65)
    cfg = PlanConfig(strategy="pipeline")
    running = plan(profile, declared, wl, cfg)
    loop = LearningLoop(config=LearningConfig(drift_every=5, drift_min_samples=5, plan=cfg))
    loop.attach("m", running, profile, declared, wl)
    base = running.predicted.decode_ms_per_token
    # node b got 15× slower: every stage on b measures 15× its prediction
    for i in range(10):
        stage = []
        for st, pred in zip(running.stages, _stage_preds(profile, declared, wl, running)):
            stage.append(pred * (15.0 if st.shards[0].node == "b" else 1.0))
        loop.report("m", StepTimings(sum(stage) + (base - sum(_stage_preds(profile, declared, wl, running))),
                                     tuple(stage), context_tokens=64), now=float(i))
    prop = loop.pending_replan("m")
    assert prop is not None and prop.current_plan_id == running.plan_id
    ev = loop.events.recent(kind="replan_proposed")
    assert len(ev) == 1 and ev[0].data["plan_id"] == prop.plan.plan_id and "drift" in ev[0].message
    loop.replan_applied("m", prop.plan)
    assert loop.running_plan("m").plan_id == prop.plan.plan_id and loop.pending_replan("m") is None
    loop.report("m", None, success=False, error="shard on b died")
    loop.record_recovery("m", "replayed 2 sequences onto a new executor", node="b")
    assert loop.manager.stats("pipeline")["failures"] == 1
    kinds = [e.kind for e in loop.events.recent()]
    assert kinds == ["plan", "replan_proposed", "replan", "plan", "failure", "recovery"]
    text = loop.metrics.render().decode()
    assert 'ollama_distributed_replans_total{model="m",outcome="proposed"} 1.0' in text
    assert 'ollama_distributed_replans_total{model="m",outcome="applied"} 1.0' in text
    assert 'ollama_distributed_generation_failures_total{model="m"} 1.0' in text
    assert 'ollama_distributed_recoveries_total{model="m"} 1.0' in text
    assert 'ollama_distributed_events_total{kind="failure"} 1.0' in text
    # autotune: the loop keeps the measured-fastest candidate and says why
    _, results = plan_candidates(profile, declared, wl, PlanConfig())
    plans = [p for p in results.values() if not isinstance(p, Exception)]
    trials = [Trial(p, p.predicted.decode_ms_per_token, (9.0, 5.0 + i, 5.0 + i)) for i, p in enumerate(plans)]
    decision = loop.autotune("m", trials)
    assert decision.plan.plan_id == plans[0].plan_id
    auto = loop.history()["autotune"]
    assert auto[-1]["plan_id"] == decision.plan.plan_id and "autotune" in auto[-1]["reason"]
    assert loop.events.recent(kind="autotune")[-1].data["plan_id"] == decision.plan.plan_id


def _stage_preds(profile, spec, wl, p):
    from ollama_distributed.scheduler.cost import CostModel

    cm = CostModel(profile, spec, Workload(prompt_tokens=64, output_tokens=1, context_tokens=65), "latency")
    k = len(p.stages)
    return [cm.stage_times(st, i == k - 1)[0] * 1e3 for i, st in enumerate(p.stages)]


def test_a_selected_plan_gets_its_measured_cost_in_the_selection_history() -> None:
    profile = ModelProfile("m16", 16, 512, 8, 4, 64, 1536, 8000, context_length=4096)
    spec = cluster(node("a", profile.total_weight_bytes * 0.6), node("b", profile.total_weight_bytes * 0.6))
    wl = Workload(prompt_tokens=64, output_tokens=1, context_tokens=65)
    loop = LearningLoop()
    sel = loop.manager.select(profile, spec, wl, now=0.0)
    loop.attach("m", sel.plan, profile, spec, wl, decision_id=sel.decision_id, reason=sel.reason)
    loop.report("m", StepTimings(sel.predicted_ms * 2, context_tokens=64), now=1.0)
    entry = loop.history()["selections"][-1]
    assert entry["id"] == sel.decision_id and entry["measured_ms"] == pytest.approx(sel.predicted_ms * 2)
    assert entry["success"] is True
    loop.report("m", StepTimings(sel.predicted_ms * 2, context_tokens=64), now=2.0)  # later reports: plain records
    assert loop.manager.stats(sel.strategy)["executions"] == 2
    assert sel.reason in loop.events.recent(kind="plan")[-1].message


def test_per_stage_times_reach_calibration_only_for_the_running_layout() -> None:
    """A request's final chunk plus the executor's measured per-stage decode times become one report whose
    stage_ms the calibrator attributes per node; times measured on another layout are dropped, the total kept."""
    from ollama_distributed.runtime.requests import GenerationChunk

    profile = ModelProfile("m16", 16, 512, 8, 4, 64, 1536, 8000, context_length=4096)
    mem = profile.total_weight_bytes * 0.6
    declared = cluster(node("a", mem, 20e9, 1e12), node("b", mem, 20e9, 1e12))
    wl = Workload(prompt_tokens=64, output_tokens=16, context_tokens=80)
    running = plan(profile, declared, wl, PlanConfig(strategy="pipeline"))
    assert len(running.stages) == 2
    loop = LearningLoop()
    loop.attach("m", running, profile, declared, wl)
    final = GenerationChunk("", [], done=True, done_reason="length", prompt_eval_count=64,
                            prompt_eval_duration_ns=50_000_000, eval_count=17, eval_duration_ns=16 * 9_000_000)
    loop.report_chunk("m", final, 1.0, stage_ms=(3.0, 5.0))
    loop.report_chunk("m", final, 1.0, stage_ms=(1.0, 2.0, 3.0))  # three stages: not this plan's
    reports = loop.history()["calibration"]
    assert [r["stage_ms"] for r in reports[-2:]] == [[3.0, 5.0], None]
    assert all(r["measured_ms"] == pytest.approx(9.0) for r in reports[-2:])
