"""The dashboard draws expert placement: the scheduler's real tensor (expert-parallel) plan of Qwen3-235B-A22B on
three nodes — which cannot run on this CI machine — served in the server's status shape by observability.install
on a minimal app (as test_dashboard.test_dashboard_draws_tensor_parallel_slices does for heads), rendered in
headless Chromium: each shard row shows its experts as a bar over all 128, matching the plan."""

from __future__ import annotations

import pytest

from .dashboard_browser import dashboard_page, plan_status_server, require_browser, screenshot

pytestmark = pytest.mark.slow


def test_dashboard_draws_expert_placement() -> None:
    require_browser()
    from ollama_distributed.scheduler import ClusterSpec, LinkSpec, NodeSpec, PlanConfig, Workload, plan
    from ollama_distributed.scheduler.profile import preset_profile

    gb = 10**9
    spec = ClusterSpec((NodeSpec("big", 64 * gb, 400e9, 20e12), NodeSpec("mid", 48 * gb, 300e9, 20e12),
                        NodeSpec("small", 32 * gb, 200e9, 10e12)), LinkSpec(1e-4, 1.25e9))
    ep = plan(preset_profile("qwen3-235b-a22b", "auto"), spec, Workload(prompt_tokens=256, output_tokens=128),
              PlanConfig(strategy="tensor"))
    shards = ep.stages[0].shards
    assert len(shards) == 3 and all(sh.experts is not None for sh in shards)
    with plan_status_server(spec, "qwen3-235b-a22b", ep) as url, dashboard_page(url) as page:
        drawn = page.eval_on_selector_all(
            ".shard-row td.experts",
            "els => els.map(e => [e.closest('tr').dataset.node, e.dataset.experts, "
            "e.querySelector('span span').style.left, e.querySelector('span span').style.width])")
        # (the bar: left at the first expert held, as wide as the share of the 128; the browser writes "0%")
        want = [[sh.node, f"{sh.experts[0]}-{sh.experts[1]}", round(100 * sh.experts[0] / 128, 1),
                 round(100 * (sh.experts[1] - sh.experts[0]) / 128, 1)] for sh in shards]
        assert [[n, e, float(left.rstrip("%")), float(width.rstrip("%"))] for n, e, left, width in drawn] == want
        header = page.eval_on_selector_all("table.shards th", "els => els.map(e => e.innerText)")
        assert "experts" in header
        screenshot(page, "dashboard-expert-placement.png")
