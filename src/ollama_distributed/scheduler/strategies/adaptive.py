"""Adaptive choice among strategies: predicted cost, corrected by what was measured, with exploration.

Each strategy s has a predicted cost c_s (seconds per token under the objective) from the cost model. The
runtime reports measured costs m; the learner keeps, per strategy (and model / workload class), the log
ratios x = ln(m / c_pred). With a Normal prior N(0, σ0²) on the strategy's mean log ratio μ_s and Normal
noise σ² on each observation, the posterior after n observations is Normal with
  var_n = 1 / (1/σ0² + n/σ²),   mean_n = var_n · Σx / σ²                      (conjugate Normal-Normal)
and the corrected cost is c_s · exp(mean_n). The choice minimises
  thompson: ln c_s + a sample of μ_s from the posterior (Thompson 1933; Russo et al. 2018 tutorial);
  ucb:      ln c_s + mean_n − c · sqrt(var_n) · sqrt(2 ln(N + 1))   (a lower confidence bound on cost, the
            minimising form of UCB1, Auer et al. 2002; N = observations over all strategies);
  greedy:   ln c_s + mean_n.
Randomness comes from a caller-seeded random.Random, never from a clock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class AdaptiveConfig:
    """exploration: "thompson" | "ucb" | "greedy". prior_sigma: σ0, how far off the cost model may be a
    priori (0.5 ≈ within a factor 1.6). noise_sigma: σ, spread of one measurement's log ratio.
    ucb_c: width of the UCB bonus. seed: for Thompson sampling (None = nondeterministic)."""

    exploration: str = "thompson"
    prior_sigma: float = 0.5
    noise_sigma: float = 0.2
    ucb_c: float = 1.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.exploration not in ("thompson", "ucb", "greedy"):
            raise ValueError(f"exploration must be thompson, ucb or greedy, got {self.exploration!r}")
        if self.prior_sigma <= 0 or self.noise_sigma <= 0 or self.ucb_c < 0:
            raise ValueError("prior_sigma and noise_sigma must be > 0 and ucb_c >= 0")


@dataclass(frozen=True)
class ArmEvidence:
    """What has been measured for one strategy: n log-ratio observations summing to `log_ratio_sum`."""

    n: int = 0
    log_ratio_sum: float = 0.0


@dataclass(frozen=True)
class Decision:
    """The chosen strategy, every candidate's score, and a sentence saying why."""

    choice: str
    predicted: Mapping[str, float]
    corrected: Mapping[str, float]
    scores: Mapping[str, float]
    reason: str
    explored: bool = field(default=False)


class AdaptiveStrategy:
    """Chooses among candidate strategies' plans; stateless apart from its random generator."""

    name = "adaptive"

    def __init__(self, config: AdaptiveConfig | None = None) -> None:
        self.config = config or AdaptiveConfig()
        self._rng = random.Random(self.config.seed)

    def posterior(self, ev: ArmEvidence) -> tuple[float, float]:
        s0, s = self.config.prior_sigma, self.config.noise_sigma
        var = 1.0 / (1.0 / s0 ** 2 + ev.n / s ** 2)
        return var * ev.log_ratio_sum / s ** 2, var

    def choose(self, predicted: Mapping[str, float], evidence: Mapping[str, ArmEvidence]) -> Decision:
        """predicted: strategy -> predicted cost (> 0); evidence: strategy -> measurements so far."""
        if not predicted:
            raise ValueError("no candidate strategies to choose from")
        total = sum(evidence.get(s, ArmEvidence()).n for s in predicted)
        scores, corrected = {}, {}
        for s in sorted(predicted):
            c = predicted[s]
            if c <= 0 or math.isnan(c):
                raise ValueError(f"predicted cost of {s} must be > 0, got {c}")
            mean, var = self.posterior(evidence.get(s, ArmEvidence()))
            corrected[s] = c * math.exp(mean)
            if self.config.exploration == "thompson":
                score = math.log(c) + self._rng.gauss(mean, math.sqrt(var))
            elif self.config.exploration == "ucb":
                score = math.log(c) + mean - self.config.ucb_c * math.sqrt(var) * math.sqrt(2 * math.log(total + 1))
            else:
                score = math.log(c) + mean
            scores[s] = score
        choice = min(scores, key=lambda s: (scores[s], s))
        exploit = min(corrected, key=lambda s: (corrected[s], s))
        ev = evidence.get(choice, ArmEvidence())
        parts = [f"{self.config.exploration}: chose {choice} (predicted {predicted[choice] * 1e3:.3f} ms, "
                 f"corrected {corrected[choice] * 1e3:.3f} ms from {ev.n} measurement(s))"]
        if choice != exploit:
            parts.append(f"exploring: {exploit} has the lowest corrected cost ({corrected[exploit] * 1e3:.3f} ms)")
        others = [f"{s} {corrected[s] * 1e3:.3f} ms" for s in sorted(corrected, key=lambda s: corrected[s])
                  if s != choice]
        if others:
            parts.append("others corrected: " + ", ".join(others))
        return Decision(choice, dict(predicted), corrected, scores, "; ".join(parts), choice != exploit)
