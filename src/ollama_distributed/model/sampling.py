"""Token sampling with Ollama's options, in llama.cpp's order.

Ollama's llama.cpp runner builds llama.cpp's default sampler chain (common/sampling.cpp, `common_sampler_init`):
  penalties -> top_k -> typical_p -> top_p -> min_p -> temperature -> draw
with the semantics of llama.cpp src/llama-sampling.cpp (facts reproduced, not code):
  - penalties (`llama_sampler_penalties_apply`): for each token seen c > 0 times in the last `repeat_last_n`
    tokens: logit /= repeat_penalty if logit > 0 else logit *= repeat_penalty; then
    logit -= c * frequency_penalty + presence_penalty.
  - top_k: keep the k largest logits (k <= 0: keep all).
  - typical_p (Meister et al. 2022, "Locally Typical Sampling"): softmax; H = -sum p log p; order tokens by
    |-log p - H| ascending; keep the shortest prefix of that order whose probability mass exceeds typical_p
    (at least one token). typical_p >= 1 disables.
  - top_p: softmax; in descending order keep the shortest prefix whose mass reaches top_p (>= 1 disables).
  - min_p: keep tokens with p >= min_p * p_max (<= 0 disables).
  - temperature: divide logits by t; t <= 0 is greedy (argmax of the penalised logits).
The filters after top_k compute softmax over the *untempered* logits of the remaining candidates, as llama.cpp
does (temperature comes last in its chain).

Each sequence owns a `Sampler` with its own `torch.Generator`, so a seeded request draws the same tokens whatever
else shares its batch.

Two optional per-sequence extras travel with the sampler, so they run wherever sampling runs (also a remote last
pipeline stage): a `TokenConstraint` (a grammar: which tokens this step allows, then `advance` by the drawn one),
applied first, as llama.cpp puts its grammar sampler before the chain; and `top_logprobs`, which records the drawn
token's log-probability and the N most likely tokens, from the log-softmax of the *raw* logits (before the
grammar, penalties and temperature; what llama.cpp's server and Ollama's runner report), in `last_logprobs`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch


class TokenConstraint(Protocol):
    """Per-sequence decoding constraint consulted by the sampler at every step (e.g. service/grammar)."""

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: the tokens this step allows (never all False)."""

    def advance(self, token: int) -> None:
        """The sampler drew `token`: move to the next state."""


@dataclass(frozen=True)
class TokenLogprob:
    """One drawn token's log-probability and the `top` (token id, log-probability) pairs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """log-softmax of a raw (vocab,) logits row: the logprob of `token` and the top_n most likely tokens."""
    logp = torch.log_softmax(logits.detach().to(torch.float32).reshape(-1), dim=0)
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        vals, ids = torch.topk(logp, min(top_n, logp.numel()))
        top = tuple(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(int(token), float(logp[token]), top)

from .options import GenerationOptions


class Sampler:
    """Samples one sequence's next tokens.

    options: the request's options; num_ctx: the effective context (for repeat_last_n = -1).
    constraint: a grammar the drawn tokens must follow (None: free). top_logprobs: None records nothing; N >= 0
    records each drawn token's logprob and its N most likely alternatives in `last_logprobs`.
    """

    def __init__(self, options: GenerationOptions, num_ctx: int | None = None,
                 constraint: TokenConstraint | None = None, top_logprobs: int | None = None) -> None:
        self.options = options
        self.constraint = constraint
        self.top_logprobs = top_logprobs
        self.last_logprobs: TokenLogprob | None = None
        self.window = options.penalty_window(num_ctx if num_ctx is not None else options.num_ctx)
        # seed < 0 means random (Ollama's default -1); 63 random bits keep manual_seed's range happy.
        self.seed = options.seed if options.seed >= 0 else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed & 0xFFFF_FFFF_FFFF_FFFF)
        o = options
        self._penalise = self.window != 0 and (
            o.repeat_penalty != 1.0 or o.presence_penalty != 0.0 or o.frequency_penalty != 0.0
        )

    # ---- the chain ------------------------------------------------------------------------------------------------
    # In numpy, on the CPU. Sampling runs between two model steps, right after a forward has streamed the weights
    # through the caches, where every torch call costs 10-20 us: measured on one 49k row (SmolLM2's vocabulary),
    # cold, Ollama's default chain (penalties, top_k 40, top_p 0.9, temperature 0.8) took 279 us in torch ops,
    # 204-261 us here with top_k by argpartition, 183-195 us with its pre-filter (_top_k_ids; warm 101 -> 62 us);
    # a greedy draw with repeat_penalty 1.1 125 -> 54 us. A GPU row is copied to the host first (one row, ~200 KB).

    def apply_penalties(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """Penalised copy of a (vocab,) logits row given the tokens so far (prompt + generated)."""
        if not self._penalise or not history:
            return logits
        return torch.from_numpy(self._penalised(_host_row(logits), history))

    def _penalised(self, row: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """apply_penalties on a float32 row: a copy, `row` left as it was."""
        out = row.copy()
        ids, vals = self._penalty(out, history)
        out[ids] = vals
        return out

    def _penalty(self, row: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The ids the penalties change and their new values. Float32 throughout: numpy keeps a Python float
        operand's result in float32 (NEP 50), as torch does."""
        recent = np.asarray(history[-self.window :], dtype=np.int64)
        recent = recent[(recent >= 0) & (recent < row.shape[-1])]
        ids, counts = np.unique(recent, return_counts=True)
        o = self.options
        vals = row[ids]
        if o.repeat_penalty != 1.0:
            vals = np.where(vals <= 0, vals * o.repeat_penalty, vals / o.repeat_penalty)
        return ids, vals - counts.astype(vals.dtype) * o.frequency_penalty - o.presence_penalty

    def candidates(self, logits: torch.Tensor, history: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """The final candidate set and its sampling distribution.

        Returns (token_ids, probs), both 1-D, token_ids in descending order of penalised logit (the lower id first
        on ties); probs sums to 1. For greedy options this is the single argmax token with probability 1.
        """
        ids, probs = self._candidates(_host_row(logits), history)
        return torch.from_numpy(ids), torch.from_numpy(probs)

    def _candidates(self, x: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return self._chain(self._penalised(x, history) if self._penalise and history else x)

    def _chain(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """top_k ... temperature on a penalised row (module docstring)."""
        o = self.options
        if o.is_greedy:  # the first largest on ties, a NaN as the largest: torch.argmax's choice (argmax_rows)
            return np.array([x.argmax()], dtype=np.int64), np.ones(1, dtype=np.float32)
        vocab = x.shape[0]
        # top_k (also sorts, by logit descending and the lower id first on ties; the later filters rely on it)
        if 0 < o.top_k < vocab:
            ids = _top_k_ids(x, o.top_k)
        else:
            ids = np.argsort(-x, kind="stable")
        vals = x[ids]
        # Candidates at -inf (e.g. masked tokens) can never be drawn; drop them early, keep at least one.
        finite = np.isfinite(vals)
        if not finite.all():
            n_finite = max(int(finite.sum()), 1)
            vals, ids = vals[:n_finite], ids[:n_finite]
        if o.typical_p < 1.0 and vals.size > 1:
            keep = _typical_keep(vals, o.typical_p)
            vals, ids = vals[keep], ids[keep]
        if o.top_p < 1.0 and vals.size > 1:
            cum = np.cumsum(_softmax(vals))
            # first index whose cumulative mass reaches top_p, inclusive
            n = min(max(int(np.searchsorted(cum, np.float32(o.top_p))) + 1, 1), vals.size)
            vals, ids = vals[:n], ids[:n]
        if o.min_p > 0.0 and vals.size > 1:
            p = _softmax(vals)
            mask = p >= o.min_p * p[0]
            mask[0] = True
            vals, ids = vals[mask], ids[mask]
        return ids.astype(np.int64), _softmax(vals / o.temperature)

    @property
    def plain(self) -> bool:
        """Greedy, unpenalised, unconstrained and without logprobs: a batched argmax serves it."""
        return (self.options.is_greedy and not self._penalise and self.constraint is None
                and self.top_logprobs is None)

    def sample(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """Draw the next token id from a (vocab,) logits row (masked by the constraint, which then advances)."""
        raw = logits
        if self.constraint is not None:
            row = logits.detach().to(torch.float32).reshape(-1)
            allowed = self.constraint.allowed_mask(row.shape[0])
            if row.device.type == "cpu":
                # numpy: torch's masked_fill of one 49k row costs ~9 ms on a busy 2-core CPU, np.where ~50 µs
                logits = torch.from_numpy(np.where(allowed.numpy(), row.numpy(), np.float32(-np.inf)))
            else:
                logits = row.masked_fill(~allowed.to(row.device), float("-inf"))
        tok = self._draw(logits, history)
        if self.constraint is not None:
            self.constraint.advance(tok)
        if self.top_logprobs is not None:
            self.last_logprobs = token_logprob(raw, tok, self.top_logprobs)
        return tok

    def _draw(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        return self._draw_row(_host_row(logits), history)

    def _draw_row(self, row: np.ndarray, history: Sequence[int]) -> int:
        ids, probs = self._candidates(row, history)
        if ids.size == 1:
            return int(ids[0])
        # Inverse-CDF draw from the sequence's own generator (one uniform per token: reproducible per seed).
        u = torch.rand(1, generator=self.generator, dtype=torch.float64).item()
        cum = np.cumsum(probs, dtype=np.float64)
        j = int(np.searchsorted(cum, u * cum[-1], side="right"))
        return int(ids[min(j, ids.size - 1)])


def _host_row(logits: torch.Tensor) -> np.ndarray:
    """A logits row as a float32 numpy array: the tensor's own memory when it is a CPU float32 one."""
    x = logits.detach().reshape(-1)
    if x.device.type != "cpu" or x.dtype != torch.float32:
        x = x.to("cpu", torch.float32)
    return x.numpy()


_TOP_K_GROUPS = 384  # groups of the top_k pre-filter: a multiple of 16 floats, ~128 elements each in a 49k vocabulary


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """The ids of a row's k largest logits, by logit descending and then id ascending (the order of a stable sort
    of the whole row: a value tied with the k-th goes in by the lower id), in ~35 µs for a 49k row where
    argpartition takes 60-90 µs on this machine's cores.

    Pre-filter: split the row into G strided groups (group j holds j, j+G, j+2G, ...) and take each group's maximum
    (one vectorised pass); let t be the k-th largest of those G maxima. The k groups whose maxima are >= t each hold
    an element >= t, so at least k elements are >= t and the k-th largest value of the row is >= t: every element
    of the top k, ties included, is among those >= t (typically a few dozen to a few hundred). They are then
    ordered exactly. A row with a NaN (nothing to compare it by) or with too few groups for k takes the full
    stable sort instead."""
    vocab = x.shape[0]
    groups = _TOP_K_GROUPS
    rows = vocab // groups
    if rows >= 2 and groups >= 2 * k:
        m = x[: rows * groups].reshape(rows, groups).max(axis=0)
        if rows * groups < vocab:
            m = np.append(m, x[rows * groups :].max())
        if not np.isnan(m).any():
            t = np.partition(m, m.size - k)[m.size - k]
            ids = np.flatnonzero(x >= t)
            return ids[np.lexsort((ids, -x[ids]))][:k]
    return np.argsort(-x, kind="stable")[:k]


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _typical_keep(vals: np.ndarray, typical_p: float) -> np.ndarray:
    """Positions (ascending, so descending logit order is kept) of the locally typical set of sorted logits."""
    v = vals.astype(np.float64)
    logp = v - v.max()
    logp -= np.log(np.exp(logp).sum())
    p = np.exp(logp)
    entropy = -(p * logp).sum()
    order = np.argsort(np.abs(-logp - entropy), kind="stable")
    over = np.nonzero(np.cumsum(p[order]) > typical_p)[0]
    n = int(over[0]) + 1 if over.size else order.size
    return np.sort(order[: max(n, 1)])


def sample_batch(logits: torch.Tensor, samplers: Sequence[Sampler], histories: Sequence[Sequence[int]]) -> list[int]:
    """Next token for each of n sequences: logits (n, vocab), row i sampled by samplers[i] with histories[i].

    Plain greedy rows (no penalties, constraint or logprobs) are served by one batched argmax; the rest go row by
    row through their own sampler (each has its own generator, so results do not depend on the batch's make-up).
    """
    n = logits.shape[0]
    if n != len(samplers) or n != len(histories):
        raise ValueError(f"sample_batch: {n} logits rows, {len(samplers)} samplers, {len(histories)} histories")
    out: list[int] = [0] * n
    plain_greedy = [i for i, s in enumerate(samplers) if s.plain]
    if plain_greedy:
        rows = logits if len(plain_greedy) == n else logits[plain_greedy]
        for i, t in zip(plain_greedy, argmax_rows(rows)):
            out[i] = t
    if len(plain_greedy) == n:
        return out
    done = set(plain_greedy)
    for i, s in enumerate(samplers):
        if i not in done:
            out[i] = s.sample(logits[i], histories[i])
    return out


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Index of each row's largest value (the first one on ties; a NaN counts as the largest, as in torch).

    numpy's argmax on a float32 CPU tensor's memory: torch.argmax of one 49k-vocab row takes ~64 µs on a 2-core
    CPU (its reduction setup, not the 200 KB it reads), numpy's ~4 µs; same results. This runs once per decode
    step, on the engine thread, between two model steps.
    """
    x = logits.detach()
    if x.dtype == torch.float32 and x.device.type == "cpu":
        return x.numpy().argmax(-1).tolist()
    return torch.argmax(x, dim=-1).tolist()
