"""Tensor parallelism: every layer split across a group by KV groups (with their query heads) and FFN columns.

Megatron-LM (Shoeybi et al. 2019): q/k/v and gate/up are column-parallel, o and down row-parallel, so each
shard computes its heads / columns and one all-reduce after attention and one after the MLP sum the partial
outputs. Shards may be uneven: a shard holds a_i KV groups and f_i FFN columns (each ≥ 1), so the group
size p can be anything from 2 to n_kv_heads.

Per layer the time is max_i a_i·τa_i + max_i f_i·τf_i + 2·AR(p) (cost.py). The split is the exact integer
optimum of T_a + T_f subject to each node's memory (weights of its slices for every layer of the stage, its
KV cache, embedding / output head):
  * T_a runs over the candidate values k·τa_i in increasing order; for each, node i may take up to
    floor(T_a/τa_i) KV groups;
  * the smallest feasible T_f is found by bisection; feasibility is a DP over nodes choosing a_i to maximise
    Σ_i min(floor(T_f/τf_i), FFN columns that still fit in node i's memory) (more KV groups on a node leave
    less memory for FFN columns) and checking it reaches ffn_size;
  * the search stops once T_a + (T_f without memory limits) cannot beat the best found.
Groups: every subset of 2..max_tp nodes when the usable nodes number at most PlanConfig.exact_node_limit;
otherwise the fastest and the largest-memory nodes of each size (the plan says so).

Quantisation blocks: the row-parallel weights (ffn_down, attn_output) are cut by input columns, and a shard reads
only its own blocks when the cuts fall on the tensor type's block grid (32 inputs for legacy GGUF types, 256 for
K-quants). So the split runs on a grid (`Grid`): FFN columns in multiples of profile.ffn_step, KV groups in
multiples of profile.kv_step; shares stay uneven at that granularity. Where no split on the grid fits (fewer grid
units than nodes, or memory), it falls back to single KV groups and columns and the plan says so: the loader then
keeps the off-grid slices dense (float32), which this profile does not count.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

from ..config import PlanConfig
from ..cost import CostModel
from ..plan import PartitionPlan
from .base import Worker, build_stages, finish, infeasible

EPS = 1e-9


@dataclass(frozen=True)
class Grid:
    """KV groups and FFN columns per split unit (1, 1 = any cut)."""

    kv: int = 1
    ffn: int = 1


def grids(cm: CostModel) -> list[Grid]:
    """The profile's quantisation-block grid first, then the unit grid as the fallback (when they differ)."""
    aligned = Grid(cm.profile.kv_step, cm.profile.ffn_step)
    return [aligned] if aligned == Grid() else [aligned, Grid()]


def grid_note(grid: Grid, cm: CostModel) -> str:
    """What the plan's reason says about the grid it was split on."""
    if grid == Grid(cm.profile.kv_step, cm.profile.ffn_step):
        if grid == Grid():
            return ""
        return f"; splits on quantisation blocks ({grid.kv} KV group(s), {grid.ffn} FFN columns per unit)"
    return ("; no split on the quantisation-block grid fits, so some row-parallel slices are off it (loaded "
            "dense)")


@dataclass(frozen=True)
class GroupSplit:
    """KV groups and FFN columns per node (in `nodes` order) and the resulting per-phase times."""

    nodes: tuple[str, ...]
    kv: tuple[int, ...]
    ffn: tuple[int, ...]
    t_attn: float
    t_ffn: float

    def ranges(self) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
        out, ka, fa = [], 0, 0
        for a, f in zip(self.kv, self.ffn):
            out.append(((ka, ka + a), (fa, fa + f)))
            ka += a
            fa += f
        return tuple(out)


def _floor(x: float) -> int:
    return math.floor(x + EPS)


def minmax_time(total: int, taus: Sequence[float], caps: Sequence[int] | None = None) -> float | None:
    """Smallest T with Σ_i min(cap_i, floor(T/τ_i)) ≥ total and every share ≥ 1 (None if caps make it impossible).

    T is some k·τ_i. Without caps T lies in [max(T0, max τ), T0 + max τ] for the continuous optimum
    T0 = total / Σ 1/τ_i; bisection on that bracket stops when no candidate lies strictly between an
    infeasible lower end and the (snapped) upper end — exact, in about log2(p) steps."""
    caps = list(caps) if caps is not None else [total] * len(taus)
    if any(c < 1 for c in caps) or sum(caps) < total or len(taus) > total:
        return None

    def count(T: float) -> int:
        tot = 0
        for c, t in zip(caps, taus):
            k = _floor(T / t)
            if k < 1:
                return -1
            tot += c if k > c else k
        return tot

    def achieved(T: float) -> float:
        return max(min(c, _floor(T / t)) * t for c, t in zip(caps, taus))

    tmax = max(taus)
    t0 = total / sum(1.0 / t for t in taus)
    lo = max(t0, tmax) * (1 - 1e-12)
    hi = max(t0 + tmax, tmax)
    if count(hi) < total:
        hi = max(c * t for c, t in zip(caps, taus))
    if count(lo) >= total:
        return achieved(lo)
    hi = achieved(hi)
    while max((math.ceil(hi / t - EPS) - 1) * t for t in taus) > lo * (1 + 1e-12):
        mid = (lo + hi) / 2
        if count(mid) >= total:
            hi = achieved(mid)
        else:
            lo = mid
    return hi


def split_group(cm: CostModel, nodes: Sequence[str], n_layers: int, has_embedding: bool,
                has_output: bool, grid: Grid = Grid()) -> GroupSplit | None:
    """Exact min of T_a + T_f for `nodes` (nodes[0] holds the output head when has_output) under memory, with
    shares in whole units of `grid` (the search below runs in grid units; the result is in KV groups / columns)."""
    p = cm.profile
    Ls = n_layers
    A, F = p.n_kv_heads // grid.kv, p.ffn_units // grid.ffn  # units of the grid (the profile checks they divide)
    k = len(nodes)
    if k > A or k > F:
        return None
    ta = [cm.rates[n].tau_attn * grid.kv for n in nodes]
    tf = [cm.rates[n].tau_ffn * grid.ffn for n in nodes]
    attn_unit_mem, ffn_unit_mem = cm.attn_unit_mem * grid.kv, cm.ffn_unit_mem * grid.ffn
    free = []
    for i, n in enumerate(nodes):
        extras = cm.extras_mem(has_embedding, has_output and i == 0)
        # node 0's FFN units start at 0 and are never empty (every node takes one), so it holds the shared expert
        free.append(cm.capacity[n] - extras - Ls * (cm.norm_mem + (cm.shared_mem if i == 0 else 0.0)))

    def fmax(i: int, a: int) -> int:
        room = free[i] - Ls * a * attn_unit_mem
        return -1 if room < 0 else min(F, _floor(room / (Ls * ffn_unit_mem)))

    # most KV groups node i can hold while keeping room for one FFN column
    amem = [min(A, _floor((free[i] - Ls * ffn_unit_mem) / (Ls * attn_unit_mem))) for i in range(k)]
    if any(x < 1 for x in amem):
        return None  # a node cannot hold one KV group and one column of every layer
    tf0 = minmax_time(F, tf)
    assert tf0 is not None

    def feasible(amax: list[int], T_f: float) -> tuple[list[int], list[int]] | None:
        fcap = [min(F, _floor(T_f / t)) for t in tf]
        if any(c < 1 for c in fcap):
            return None
        gains = []  # gains[i][a - 1]: FFN columns node i can take when it holds a KV groups
        for i in range(k):
            row = []
            for a in range(1, amax[i] + 1):
                g = min(fcap[i], fmax(i, a))
                if g < 1:
                    break  # fmax only falls as a grows
                row.append(g)
            if not row:
                return None
            gains.append(row)
        if sum(len(r) for r in gains) < A:
            return None
        # dp over nodes: val[s] = max Σ g with Σ a = s over the nodes so far; choice[i][s] = a of node i
        NEG = -1
        val = [0] + [NEG] * A
        choice: list[list[int]] = []
        for i in range(k):
            row = gains[i]
            nval = [NEG] * (A + 1)
            nch = [0] * (A + 1)
            left = k - 1 - i
            for s0 in range(A + 1):
                v0 = val[s0]
                if v0 < 0:
                    continue
                for a in range(1, min(len(row), A - s0 - left) + 1):
                    v = v0 + row[a - 1]
                    if v > nval[s0 + a]:
                        nval[s0 + a] = v
                        nch[s0 + a] = a
            val = nval
            choice.append(nch)
        if val[A] < F:
            return None
        picks = [0] * k
        s_ = A
        for i in range(k - 1, -1, -1):
            picks[i] = choice[i][s_]
            s_ -= picks[i]
        got = (val[A], tuple(picks))
        a_sh = list(got[1])
        f_sh = [gains[i][a_sh[i] - 1] for i in range(k)]
        extra = sum(f_sh) - F
        for i in sorted(range(k), key=lambda i: -f_sh[i] * tf[i]):  # trim the slowest finishers first
            cut = min(extra, f_sh[i] - 1)
            f_sh[i] -= cut
            extra -= cut
        return a_sh, f_sh

    def t_ffn(sol: tuple[list[int], list[int]]) -> float:
        return max(f * t for f, t in zip(sol[1], tf))

    def below(x: float) -> float:
        """The largest candidate T_f value (some k·τf_i) strictly below x."""
        return max((math.ceil(x / t - EPS) - 1) * t for t in tf)

    def min_tf(amax: list[int], lo: float, hi: float) -> tuple[list[int], list[int]] | None:
        """Smallest-T_f solution for these KV-group limits, T_f known to lie in [lo, hi]. Bisection whose
        upper end snaps to achieved values (k·τf_i); it stops when no candidate lies strictly between an
        infeasible lower end and the upper end, so the answer is exact, not within a tolerance."""
        sol = feasible(amax, lo)
        if sol is not None:
            return sol
        sol = feasible(amax, hi)
        if sol is None:
            return None
        hi = t_ffn(sol)
        while below(hi) > lo * (1 + 1e-12):
            mid = (lo + hi) / 2
            got = feasible(amax, mid)
            if got is not None:
                sol, hi = got, t_ffn(got)
            else:
                lo = mid
        return sol

    # T_f can only fall as T_a grows (more freedom to place KV groups); its floor is T_f with the most freedom
    top = min_tf(amem, tf0, max(F * t for t in tf))
    if top is None or sum(amem) < A:
        return None
    tf_floor = t_ffn(top)
    cands = sorted({j * t for t in ta for j in range(1, A + 1)})
    best: GroupSplit | None = None
    cur: tuple[list[int], list[int]] | None = None  # best FFN solution for the current KV-group limits
    prev_amax: list[int] | None = None
    for T_a in cands:
        if best is not None and T_a + tf_floor >= best.t_attn + best.t_ffn - 1e-15:
            break
        amax = [min(amem[i], _floor(T_a / ta[i])) for i in range(k)]
        if any(x < 1 for x in amax) or sum(amax) < A or amax == prev_amax:
            continue  # same limits as a smaller T_a: no better
        prev_amax = amax
        if cur is None:
            cur = min_tf(amax, tf_floor, max(F * t for t in tf))
            if cur is None:
                continue
        else:
            # limits only grew, so the previous solution still fits; look for a strictly smaller T_f
            nxt = below(t_ffn(cur))
            if nxt < tf_floor * (1 - 1e-12):
                continue
            if feasible(amax, nxt) is None:
                continue  # T_f cannot fall: this larger T_a only costs more
            cur = min_tf(amax, tf_floor, nxt)
            assert cur is not None
        a_sh, f_sh = cur
        g = GroupSplit(tuple(nodes), tuple(a_sh), tuple(f_sh), max(a * t for a, t in zip(a_sh, ta)), t_ffn(cur))
        if best is None or g.t_attn + g.t_ffn < best.t_attn + best.t_ffn:
            best = g
    if best is None:
        return None
    return GroupSplit(best.nodes, tuple(a * grid.kv for a in best.kv), tuple(f * grid.ffn for f in best.ffn),
                      best.t_attn, best.t_ffn)


def group_worker(cm: CostModel, split: GroupSplit, key: str) -> Worker:
    """A TP group as a pipeline worker (hybrid): fixed shares, capacity = the tightest member's."""
    allreduce = 2 * cm.allreduce(split.nodes, cm.hidden_bytes)
    per_node = [a * cm.attn_unit_mem + f * cm.ffn_unit_mem + cm.norm_mem
                + (cm.shared_mem if cm.holds_shared_expert(ffn) else 0.0)
                for a, f, (_, ffn) in zip(split.kv, split.ffn, split.ranges())]

    def cap(first: bool, last: bool) -> int:
        c = cm.profile.n_layers
        for i, n in enumerate(split.nodes):
            room = cm.capacity[n] - cm.extras_mem(first, last and i == 0)
            if room < 0:
                return -1
            c = min(c, int(room // per_node[i]))
        return c

    return Worker(key, split.nodes, split.t_attn + split.t_ffn + allreduce, cm.t_head(split.nodes[0]),
                  (cap(False, False), cap(True, False), cap(False, True), cap(True, True)), split.ranges())


def candidate_groups(cm: CostModel, names: Sequence[str], config: PlanConfig) -> tuple[list[tuple[str, ...]], bool]:
    """Node groups to try (each ≥ 2 nodes) and whether that list is every subset."""
    pmax = min(config.max_tp, cm.profile.n_kv_heads, len(names))
    if len(names) <= config.exact_node_limit:
        return [g for p in range(2, pmax + 1) for g in itertools.combinations(names, p)], True
    by_speed = sorted(names, key=cm.t_layer)
    by_mem = sorted(names, key=lambda n: -cm.capacity[n])
    groups = []
    for p in range(2, pmax + 1):
        for order in (by_speed, by_mem):
            g = tuple(order[:p])
            if g not in groups:
                groups.append(g)
    return groups, False


class TensorStrategy:
    """One stage; every layer split across a group of nodes."""

    name = "tensor"

    def plan(self, cm: CostModel, config: PlanConfig) -> PartitionPlan:
        L = cm.profile.n_layers
        names = cm.cluster.names
        if min(config.max_tp, cm.profile.n_kv_heads) < 2 or len(names) < 2:
            raise infeasible(cm, self.name, f"tensor parallelism needs ≥ 2 nodes and ≥ 2 KV heads (cluster has "
                                            f"{len(names)} node(s), model {cm.profile.n_kv_heads} KV heads, max_tp "
                                            f"{config.max_tp})")
        groups, exhaustive = candidate_groups(cm, names, config)
        for grid in grids(cm):
            split = self._best_split(cm, groups, grid)
            if split is not None:
                break
        else:
            raise infeasible(cm, self.name, f"no group of 2..{min(config.max_tp, len(names))} nodes holds its "
                                            f"slices of all {L} layers")
        w = Worker("+".join(split.nodes), split.nodes, 0.0, 0.0, (L, L, L, L), split.ranges())
        stages = build_stages(cm, [(w, L)])
        how = "every node group searched" if exhaustive else "fastest / largest groups of each size searched"
        reason = (f"{len(split.nodes)}-way tensor parallel on {', '.join(split.nodes)}: KV groups {list(split.kv)}, "
                  f"{'experts' if cm.profile.is_moe else 'FFN columns'} {list(split.ffn)}; {how}{grid_note(grid, cm)}; objective {cm.objective}")
        return finish(cm, stages, reason)

    @staticmethod
    def _best_split(cm: CostModel, groups: Sequence[tuple[str, ...]], grid: Grid) -> GroupSplit | None:
        """The fastest split over `groups` (each with every choice of output-head node) on `grid`."""
        L = cm.profile.n_layers
        A, F = cm.profile.n_kv_heads // grid.kv, cm.profile.ffn_units // grid.ffn
        # lower bound per (group, head node): the split without memory limits. Visiting candidates in bound
        # order and stopping once the bound reaches the best found keeps the search exact but short.
        cands = []
        for group in groups:
            ar = 2 * cm.allreduce(group, cm.hidden_bytes)
            ta = minmax_time(A, [cm.rates[n].tau_attn * grid.kv for n in group])
            tf = minmax_time(F, [cm.rates[n].tau_ffn * grid.ffn for n in group])
            if ta is None or tf is None:
                continue
            for head in group:  # which node holds the output head (shard 0)
                cands.append((L * (ta + tf + ar) + cm.t_head(head), head, group, ar))
        cands.sort(key=lambda c: c[0])
        best = None
        solved: dict[tuple[object, ...], GroupSplit | None] = {}  # identical machines, identical split
        for bound, head, group, ar in cands:
            if best is not None and bound >= best[0]:
                break
            order = (head,) + tuple(n for n in group if n != head)
            sig = tuple((cm.rates[n], cm.capacity[n]) for n in order)
            if sig not in solved:
                solved[sig] = split_group(cm, order, L, has_embedding=True, has_output=True, grid=grid)
            split = solved[sig]
            if split is None:
                continue
            split = GroupSplit(order, split.kv, split.ffn, split.t_attn, split.t_ffn)
            cost = L * (split.t_attn + split.t_ffn + ar) + cm.t_head(head)
            if best is None or cost < best[0] - 1e-15:
                best = (cost, split)
        return None if best is None else best[1]
