"""Fitting the runtime's fixed per-step overhead from measured decode times (pure; used by calibration.py).

A measured decode step of b sequences through a plan with k stages is modelled as

    m = a · C + o_step + k · o_stage + b · o_seq

where C is the compute + network time the cost model predicts on the *declared* cluster (no overhead), a a
global slowdown of that prediction, and o_step / o_stage / o_seq the StepOverhead (scheduler/cluster.py). Least
squares over a window of reports with every unknown >= 0 (non-negative least squares, solved exactly by trying
every set of active bounds: at most four unknowns, fifteen small systems).

What the reports can tell apart is decided from the data, not assumed: the fixed part is separable from a only
when C varies between reports (different batch sizes, contexts or plans); o_stage only when reports come from
plans with different stage counts, o_seq only from different batch sizes. Columns the data do not identify
(constant, or making the Gram matrix of the normalised columns near singular) keep their prior value — the
runtime's measured default — so one plan at one batch size changes nothing here and its whole deviation goes to
the node factors, exactly as without this term. A fit the model cannot explain (rms residual over 15 % of the
mean measured time) is rejected. Known limit: a is one scale for all nodes, so when one node is much slower than
declared and the reports give only totals, part of its slowness can be read as overhead (it still gets the
largest factor; per-node columns would separate it, at the price of many more reports).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

from .cluster import StepOverhead

# the predicted compute must vary by at least this fraction of its largest value for a to be told from the fixed
# part (a few % from context lengths alone is within measurement noise)
MIN_COMPUTE_SPREAD = 0.1
# a correlation-matrix determinant below this means the regressors are (nearly) collinear: not identified
# (0.01: any one regressor explains at most ~99 % of another's variance)
_MIN_DET = 1e-2


@dataclass(frozen=True)
class OverheadPoint:
    """One report: predicted compute + network seconds on the declared cluster, stages, measured seconds, and
    the sequences decoded together."""

    compute_s: float
    stages: int
    measured_s: float
    batch: int = 1


@dataclass(frozen=True)
class OverheadFit:
    """Result of `fit_overhead`. scale: the fitted a (1.0 when not fitted). fitted: the terms the data
    identified ("step", "stage", "seq"); empty when the prior was kept. rms_s: root-mean-square residual."""

    overhead: StepOverhead
    scale: float
    fitted: tuple[str, ...]
    rms_s: float


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-300:
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] for i in range(n)]


def _corr_det(cols: list[list[float]]) -> float:
    """Determinant of the regressors' correlation matrix (centred, unit-length columns: 1 uncorrelated, 0
    collinear); the intercept absorbs the means, so this is what decides whether the fit is determined."""
    centred = []
    for col in cols:
        mean = sum(col) / len(col)
        centred.append([x - mean for x in col])
    return _gram_det(centred)


def _gram_det(cols: list[list[float]]) -> float:
    """Determinant of the Gram matrix of the columns scaled to unit length (1: orthogonal, 0: collinear)."""
    norm = [math.sqrt(sum(x * x for x in c)) for c in cols]
    if any(n == 0 for n in norm):
        return 0.0
    unit = [[x / n for x in c] for c, n in zip(cols, norm)]
    g = [[sum(x * y for x, y in zip(u, v)) for v in unit] for u in unit]
    # determinant by elimination
    det, k = 1.0, len(g)
    g = [row[:] for row in g]
    for c in range(k):
        p = max(range(c, k), key=lambda r: abs(g[r][c]))
        if abs(g[p][c]) < 1e-300:
            return 0.0
        if p != c:
            g[c], g[p] = g[p], g[c]
            det = -det
        det *= g[c][c]
        for r in range(c + 1, k):
            f = g[r][c] / g[c][c]
            g[r] = [x - f * y for x, y in zip(g[r], g[c])]
    return abs(det)


def _nnls(cols: list[list[float]], y: list[float]) -> tuple[list[float], float]:
    """min ||Σ x_j cols_j − y|| with x >= 0, by trying every set of free columns (few columns)."""
    best: tuple[list[float], float] = ([0.0] * len(cols), sum(v * v for v in y))
    for r in range(1, len(cols) + 1):
        for free in itertools.combinations(range(len(cols)), r):
            sub = [cols[j] for j in free]
            ata = [[sum(p * q for p, q in zip(u, v)) for v in sub] for u in sub]
            aty = [sum(p * q for p, q in zip(u, y)) for u in sub]
            sol = _solve(ata, aty)
            if sol is None or any(v < 0 for v in sol):
                continue
            x = [0.0] * len(cols)
            for j, v in zip(free, sol):
                x[j] = v
            rss = sum((sum(x[j] * cols[j][i] for j in range(len(cols))) - y[i]) ** 2 for i in range(len(y)))
            if rss < best[1] - 1e-30:
                best = (x, rss)
    return best


def fit_overhead(points: Sequence[OverheadPoint], prior: StepOverhead, min_points: int = 4,
                 max_rel_rms: float = 0.15, min_scale: float = 0.5) -> OverheadFit:
    """Least-squares StepOverhead (and scale a) from `points`; unidentified parts keep `prior` (module doc).

    A fit whose rms residual exceeds `max_rel_rms` × the mean measured time is rejected (the prior is kept): the
    data do not follow the model — noise, or nodes slow to different degrees, which one scale a cannot describe
    (tests/scheduler/test_overhead.py: a node 50× slower than declared gives 15–20 %, while the real runtime's
    measurements fit within 3–13 %, bench/overhead_bench.py). a >= `min_scale`: the roofline is an upper bound
    on speed, so measured compute is not much faster than predicted; without the bound an unlucky design could
    explain everything as overhead (a = 0)."""
    pts = list(points)
    if len(pts) < min_points:
        return OverheadFit(prior, 1.0, (), 0.0)
    c = [p.compute_s for p in pts]
    m = [p.measured_s for p in pts]
    base = [c, [1.0] * len(pts)]
    optional = {"stage": [float(p.stages) for p in pts], "seq": [float(p.batch) for p in pts]}
    # a term is fitted when its column varies and keeps the design well conditioned; else its prior is used
    terms = [t for t, col in optional.items() if len(set(col)) >= 2]
    while terms and _corr_det([c] + [optional[t] for t in terms]) < _MIN_DET:
        terms.pop()  # drop seq first, then stage: a per-stage term matters more to planning
    if max(c) - min(c) < MIN_COMPUTE_SPREAD * max(c):
        # compute hardly varied (one plan, similar batches and contexts): a and the fixed part are not separable
        # against measurement noise
        return OverheadFit(prior, 1.0, (), 0.0)
    fixed = {"stage": prior.stage_s, "seq": prior.seq_s}
    y = [mi - min_scale * ci for mi, ci in zip(m, c)]  # a = min_scale + a', a' >= 0
    for t, col in optional.items():
        if t not in terms:
            y = [yi - fixed[t] * xi for yi, xi in zip(y, col)]
    x, rss = _nnls(base + [optional[t] for t in terms], y)
    rms = math.sqrt(rss / len(pts))
    if rms > max_rel_rms * sum(m) / len(m):
        return OverheadFit(prior, 1.0, (), rms)
    got = dict(zip(terms, x[2:]))
    over = StepOverhead(x[1], got.get("stage", prior.stage_s), got.get("seq", prior.seq_s))
    return OverheadFit(over, min_scale + x[0], ("step", *terms), rms)
