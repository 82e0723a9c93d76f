"""Exact searches for pipeline layouts over "workers" (nodes, or tensor-parallel groups for hybrid).

A stage of l layers on worker w costs l·t_w (+ t_head_w when it is the last stage): linear in l (see cost.py).
Stage i also pays its hop to stage i+1; the last pays the return hop of the token ids to the first stage.

Latency (minimise S = Σ l_i t_i + t_head_last + Σ hops), links uniform — `latency_uniform`:
  With linear stage costs and fixed roles, the best layer split for a chosen node set is greedy: give each node
  one layer, then fill the fastest nodes to capacity (an LP with one equality and box bounds has an optimal
  vertex with at most one fractional variable). So in an optimal plan, ordered by t, the nodes are: full
  nodes, at most one partially filled node, then only role nodes (first/last stage) holding one layer. Plain
  one-layer nodes slower than the partial one are never needed: moving their layer to it saves a hop.
  A dynamic program over node classes (identical nodes grouped; classes sorted by t) with state
  (layers placed, first-role placed, last-role placed, past-the-partial) enumerates exactly these shapes.
  Identical nodes are taken in binary-split batches (bounded knapsack), so the work is
  O(classes · log(class size) · layers). Branch and bound stops once no state can beat the best complete
  plan even if every remaining layer ran at the next class's speed.
Latency, links differ per pair — `latency_exact`: for every node subset and (first, last) pair, a Held-Karp
  DP gives the cheapest hop path, and the greedy fill above gives the layers: O(2^n · n^3), used up to
  PlanConfig.exact_node_limit nodes.
Throughput (minimise the bottleneck B = max_i (stage_i + hop_out_i)) — `bottleneck`: for a given B each
  worker can hold at most floor((B − its fixed cost)/t) layers, independently of the others when hops are
  uniform; B is feasible when those capacities (with one first and one last node) cover every layer.
  Bisection on B over identical-worker classes (O(classes) per test); the layout built at the upper end has
  bottleneck ≤ B. Before it, workers that cannot hold one layer within a known feasible bottleneck (L workers
  with one layer each) are dropped, which leaves about L of them when nodes far outnumber layers. The
  tie-break among layouts with the same bottleneck (fastest nodes filled first) is not optimised further.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from .base import Worker

INF = float("inf")
Assignment = list[tuple[Worker, int]]


def _order(first: Worker, last: Worker | None, middle: list[tuple[Worker, int]], lf: int, lg: int) -> Assignment:
    out: Assignment = [(first, lf)] + [m for m in middle if m[1] > 0]
    if last is not None:
        out.append((last, lg))
    return out


def single_stage(workers: Sequence[Worker], L: int) -> tuple[float, Assignment] | None:
    """Best worker holding the whole model alone."""
    best = None
    for w in workers:
        if w.caps[3] >= L:
            c = L * w.t_layer + w.t_head
            if best is None or c < best[0]:
                best = (c, [(w, L)])
    return best


# ------------------------------------------------------------------------------------------ latency, uniform
def latency_uniform(workers: Sequence[Worker], L: int, hop: float, ret: float) -> tuple[float, Assignment] | None:
    """Minimal S over every layout of ≥ 1 stages when every stage hop costs `hop` and the return `ret`."""
    best = single_stage(workers, L)
    classes: dict[tuple[float, float, tuple[int, ...]], list[Worker]] = {}
    for w in workers:
        if max(w.caps[:3]) >= 1:
            classes.setdefault((w.t_layer, w.t_head, w.caps[:3]), []).append(w)
    order = sorted(classes, key=lambda k: (k[0], k[1]))
    ub = best[0] if best else INF
    # suffix minimum of t_head: a state without a last stage must still pay at least this
    th_rest = [INF] * (len(order) + 1)
    for i in range(len(order) - 1, -1, -1):
        th_rest[i] = min(th_rest[i + 1], order[i][1])
    # state key: (j, rf, rg, phase) -> (v, chain); v counts `hop` once per node; chain = (prev, (ci, role, l))
    states: dict[tuple[int, int, int, int], tuple[float, object]] = {(0, 0, 0, 0): (0.0, None)}
    best_chain = None
    const = ret - hop  # k nodes pay k·hop in v; the plan pays (k-1)·hop + ret

    State = tuple[int, int, int, int]

    def put(d: dict[State, tuple[float, object]], key: State, v: float, chain: object) -> None:
        old = d.get(key)
        if old is None or v < old[0]:
            d[key] = (v, chain)

    for ci, ck in enumerate(order):
        t, th, (cp, cf, cg) = ck
        m = len(classes[ck])
        # bound: every remaining layer costs at least t from here on
        states = {k: s for k, s in states.items()
                  if s[0] + (L - k[0]) * t + (0.0 if k[2] else th_rest[ci]) + const < ub}
        if not states:
            break
        # bulk plain full nodes (all but 3 of the class), binary split: 0/1 items of 1, 2, 4, ... nodes
        bulk = max(0, m - 3) if cp >= 1 else 0
        size = 1
        while bulk > 0:
            k = min(size, bulk)
            bulk -= k
            size *= 2
            nxt = dict(states)
            for (j, rf, rg, ph), (v, ch) in states.items():
                if ph == 0 and j + k * cp <= L:
                    put(nxt, (j + k * cp, rf, rg, 0), v + k * (cp * t + hop), (ch, (ci, "plain", cp, k)))
            states = nxt
        for _ in range(min(m, 3)):
            nxt = dict(states)
            for (j, rf, rg, ph), (v, ch) in states.items():
                if ph == 0:
                    if cp >= 1 and j + cp <= L:
                        put(nxt, (j + cp, rf, rg, 0), v + cp * t + hop, (ch, (ci, "plain", cp, 1)))
                    if not rf and cf >= 1 and j + cf <= L:
                        put(nxt, (j + cf, 1, rg, 0), v + cf * t + hop, (ch, (ci, "first", cf, 1)))
                    if not rg and cg >= 1 and j + cg <= L:
                        put(nxt, (j + cg, rf, 1, 0), v + cg * t + th + hop, (ch, (ci, "last", cg, 1)))
                    # the partially filled node: leaves room for 0-2 one-layer role nodes after it
                    for l in (L - j, L - j - 1, L - j - 2):
                        if l < 1:
                            continue
                        if l <= cp:
                            put(nxt, (j + l, rf, rg, 1), v + l * t + hop, (ch, (ci, "plain", l, 1)))
                        if not rf and l <= cf:
                            put(nxt, (j + l, 1, rg, 1), v + l * t + hop, (ch, (ci, "first", l, 1)))
                        if not rg and l <= cg:
                            put(nxt, (j + l, rf, 1, 1), v + l * t + th + hop, (ch, (ci, "last", l, 1)))
                # one-layer role nodes slower than the partial one (or than every full node)
                if j < L:
                    if not rf and cf >= 1:
                        put(nxt, (j + 1, 1, rg, 1), v + t + hop, (ch, (ci, "first", 1, 1)))
                    if not rg and cg >= 1:
                        put(nxt, (j + 1, rf, 1, 1), v + t + th + hop, (ch, (ci, "last", 1, 1)))
            states = nxt
        for ph in (0, 1):
            s = states.get((L, 1, 1, ph))
            if s is not None and s[0] + const < ub:
                ub = s[0] + const
                best_chain = s[1]
    if best_chain is None:
        return best
    # rebuild: walk the chain, take concrete workers from each class
    picks: list[tuple[int, str, int, int]] = []
    link: object = best_chain
    while link is not None:
        assert isinstance(link, tuple)
        link, item = link
        picks.append(item)
    pool = {ci: list(classes[ck]) for ci, ck in enumerate(order)}
    first = last = None
    lf = lg = 0
    middle: list[tuple[Worker, int]] = []
    for ci, role, l, count in reversed(picks):
        for _ in range(count):
            w = pool[ci].pop()
            if role == "first":
                first, lf = w, l
            elif role == "last":
                last, lg = w, l
            else:
                middle.append((w, l))
    assert first is not None and last is not None
    return ub, _order(first, last, sorted(middle, key=lambda x: x[0].t_layer), lf, lg)


# ------------------------------------------------------------------------------------------ latency, exact
def greedy_fill(members: Sequence[int], ws: Sequence[Worker], f: int, g: int,
                L: int) -> tuple[float, dict[int, int]] | None:
    """Layers per member (f first stage, g last) minimising Σ l·t: one each, then fastest first to capacity."""
    caps = {}
    for i in members:
        c = ws[i].caps[1] if i == f else ws[i].caps[2] if i == g else ws[i].caps[0]
        if c < 1:
            return None
        caps[i] = c
    rem = L - len(members)
    if rem < 0:
        return None
    layers = {i: 1 for i in members}
    for i in sorted(members, key=lambda i: ws[i].t_layer):
        add = min(caps[i] - 1, rem)
        layers[i] += add
        rem -= add
        if rem == 0:
            break
    if rem:
        return None
    return sum(layers[i] * ws[i].t_layer for i in members) + ws[g].t_head, layers


def latency_exact(ws: Sequence[Worker], L: int, hop: Callable[[Worker, Worker], float],
                  ret: Callable[[Worker, Worker], float]) -> tuple[float, Assignment] | None:
    """Exact minimal S with pair-dependent hops: Held-Karp over (subset, first, last) + greedy fill."""
    n = len(ws)
    best = single_stage(ws, L)
    H = [[hop(a, b) for b in ws] for a in ws]
    full = 1 << n
    for f in range(n):
        if ws[f].caps[1] < 1:
            continue
        # dp[mask][last] = cheapest hop path from f through mask ending at last; parent for the order
        dp = [[INF] * n for _ in range(full)]
        par: list[list[int]] = [[-1] * n for _ in range(full)]
        dp[1 << f][f] = 0.0
        for mask in range(full):
            if not (mask >> f) & 1:
                continue
            row = dp[mask]
            for last in range(n):
                c = row[last]
                if c == INF:
                    continue
                for nx in range(n):
                    if (mask >> nx) & 1:
                        continue
                    nm = mask | (1 << nx)
                    nc = c + H[last][nx]
                    if nc < dp[nm][nx]:
                        dp[nm][nx] = nc
                        par[nm][nx] = last
        for mask in range(full):
            if not (mask >> f) & 1:
                continue
            members = [i for i in range(n) if (mask >> i) & 1]
            if len(members) < 2 or len(members) > L:
                continue
            for g in members:
                if g == f or dp[mask][g] == INF:
                    continue
                filled = greedy_fill(members, ws, f, g, L)
                if filled is None:
                    continue
                total = filled[0] + dp[mask][g] + ret(ws[g], ws[f])
                if best is None or total < best[0]:
                    path = [g]
                    m, cur = mask, g
                    while par[m][cur] != -1:
                        prev = par[m][cur]
                        m ^= 1 << cur
                        cur = prev
                        path.append(cur)
                    path.reverse()
                    best = (total, [(ws[i], filled[1][i]) for i in path])
    return best


# ------------------------------------------------------------------------------------------ bottleneck
def bottleneck(ws: Sequence[Worker], L: int, hop_out: Sequence[float], ret_out: Sequence[float],
               rel_tol: float = 1e-12) -> tuple[float, Assignment] | None:
    """Minimal max_i(stage_i + hop_out_i): single stage, or bisection on B for ≥ 2 stages.

    hop_out[i]: what worker i pays to send to the next stage; ret_out[i]: its return hop when last."""
    single = single_stage(ws, L)
    ws, hop_out, ret_out = _prune_for_bottleneck(ws, L, hop_out, ret_out)
    n = len(ws)
    # identical workers form one class with a count: the feasibility test is then O(classes)
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, w in enumerate(ws):
        groups.setdefault((w.t_layer, w.t_head, w.caps[:3], hop_out[i], ret_out[i]), []).append(i)
    members = list(groups.values())
    cnt = [len(m) for m in members]
    t = [ws[m[0]].t_layer for m in members]
    cp = [ws[m[0]].caps[0] for m in members]
    cf = [ws[m[0]].caps[1] for m in members]
    cg = [ws[m[0]].caps[2] for m in members]
    xh = [hop_out[m[0]] for m in members]
    xg = [ws[m[0]].t_head + ret_out[m[0]] for m in members]
    floor = math.floor

    def caps_at(B: float) -> tuple[list[int], list[int], list[int]]:
        x = [floor((B - h) / ti + 1e-9) for h, ti in zip(xh, t)]
        y = [floor((B - e) / ti + 1e-9) for e, ti in zip(xg, t)]
        a = [max(0, min(c, v)) for c, v in zip(cp, x)]
        af = [max(0, min(c, v)) for c, v in zip(cf, x)]
        ag = [max(0, min(c, v)) for c, v in zip(cg, y)]
        return a, af, ag

    def top2(vals: list[int], base: list[int]) -> list[tuple[int, int, int]]:
        """Best two (delta, class, member slot) for a role; a class of ≥ 2 may fill both."""
        b1 = b2 = None
        for c, v in enumerate(vals):
            if v >= 1:
                d = (v - base[c], c, 0)
                if b1 is None or d > b1:
                    b1, b2 = d, (b1 if cnt[c] == 1 else (d[0], c, 1))
                elif b2 is None or d > b2:
                    b2 = d
        return [d for d in (b1, b2) if d is not None]

    def pick(B: float) -> tuple[tuple[int, int], tuple[int, int], list[int], list[int], list[int]] | None:
        a, af, ag = caps_at(B)
        base = sum(c * v for c, v in zip(cnt, a))
        if base + max(cf) + max(cg) < L:
            return None
        bestp = None
        for df, f, fs in top2(af, a):
            for dg, g, gs in top2(ag, a):
                if (f, fs) != (g, gs) and (f != g or cnt[f] >= 2) and (bestp is None or df + dg > bestp[0]):
                    bestp = (df + dg, f, g)
        if bestp is None or base + bestp[0] < L:
            return None
        f, g = bestp[1], bestp[2]
        return (f, members[f][0]), (g, members[g][1] if g == f else members[g][0]), a, af, ag

    if n >= 2 and L >= 2:
        hi = max(L * w.t_layer + w.t_head + hop_out[i] + ret_out[i] for i, w in enumerate(ws))
        if pick(hi) is not None:
            lo = 0.0
            if single is not None:
                hi = min(hi, single[0]) if pick(single[0]) is not None else hi
            for _ in range(200):
                if hi - lo <= rel_tol * hi:
                    break
                mid = (lo + hi) / 2
                if pick(mid) is not None:
                    hi = mid
                else:
                    lo = mid
            (fc, f), (gc, g), a, af, ag = pick(hi)  # type: ignore[misc]
            caps = [0] * n
            for c, ms in enumerate(members):
                for i in ms:
                    caps[i] = a[c]
            caps[f], caps[g] = af[fc], ag[gc]
            layers = [0] * n
            layers[f] = layers[g] = 1
            rem = L - 2
            for i in sorted(range(n), key=lambda i: ws[i].t_layer):
                add = min(caps[i] - layers[i], rem)
                if add > 0:
                    layers[i] += add
                    rem -= add
            assert rem == 0
            middle = [(ws[i], layers[i]) for i in range(n) if i not in (f, g) and layers[i] > 0]
            plan = _order(ws[f], ws[g], middle, layers[f], layers[g])
            index = {id(w): i for i, w in enumerate(ws)}
            hops = [hop_out[index[id(w)]] for w, _ in plan[:-1]] + [ret_out[g]]
            value = max(l * w.t_layer + h + (w.t_head if idx == len(plan) - 1 else 0.0)
                        for idx, ((w, l), h) in enumerate(zip(plan, hops)))
            if single is None or value < single[0]:
                return value, plan
    return single


def _prune_for_bottleneck(ws: Sequence[Worker], L: int, hop_out: Sequence[float], ret_out: Sequence[float]
                          ) -> tuple[list[Worker], list[float], list[float]]:
    """Drop workers that cannot hold even one layer within a known feasible bottleneck.

    Upper bound: L distinct workers holding one layer each (the fastest last-stage candidate, the fastest
    first-stage one, then the L - 2 fastest others). A worker whose one-layer time in every role exceeds it
    holds nothing in an optimal layout. With many more nodes than layers this keeps about L of them."""
    n = len(ws)
    if n <= L or L < 2:
        return list(ws), list(hop_out), list(ret_out)
    one = [w.t_layer + hop_out[i] for i, w in enumerate(ws)]
    last_t = [w.t_layer + w.t_head + ret_out[i] for i, w in enumerate(ws)]
    gs = [i for i in range(n) if ws[i].caps[2] >= 1]
    if not gs:
        return list(ws), list(hop_out), list(ret_out)
    g = min(gs, key=lambda i: last_t[i])
    fs = [i for i in range(n) if i != g and ws[i].caps[1] >= 1]
    if not fs:
        return list(ws), list(hop_out), list(ret_out)
    f = min(fs, key=lambda i: one[i])
    rest = sorted(one[i] for i in range(n) if i not in (f, g) and ws[i].caps[0] >= 1)
    if len(rest) < L - 2:
        return list(ws), list(hop_out), list(ret_out)
    ub = max([last_t[g], one[f]] + rest[:L - 2])
    keep = [i for i in range(n) if one[i] <= ub * (1 + 1e-9) or last_t[i] <= ub * (1 + 1e-9)]
    return [ws[i] for i in keep], [hop_out[i] for i in keep], [ret_out[i] for i in keep]
