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

    def apply_penalties(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """Penalised copy of a (vocab,) logits row given the tokens so far (prompt + generated)."""
        if not self._penalise or not history:
            return logits
        if logits.dtype == torch.float32 and logits.device.type == "cpu":
            return torch.from_numpy(self._penalised(logits.numpy(), history))
        return self._penalised_torch(logits, history)

    def _penalised_torch(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """apply_penalties in torch ops (rows on a GPU, or not float32)."""
        recent = torch.as_tensor(list(history[-self.window :]), dtype=torch.long)
        recent = recent[(recent >= 0) & (recent < logits.shape[-1])]
        if recent.numel() == 0:
            return logits
        ids, counts = torch.unique(recent, return_counts=True)
        out = logits.clone()
        o = self.options
        vals = out[ids]
        if o.repeat_penalty != 1.0:
            vals = torch.where(vals <= 0, vals * o.repeat_penalty, vals / o.repeat_penalty)
        vals = vals - counts.to(vals.dtype) * o.frequency_penalty - o.presence_penalty
        out[ids] = vals
        return out

    def _penalised(self, row: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """apply_penalties on a float32 row in numpy: the same float32 operations in the same order as the torch
        path (so the same bits: numpy keeps a Python float operand's result in float32, NEP 50), without torch's
        cost per call: measured on one 49k row (SmolLM2's vocabulary) after a forward had cooled the caches, the
        torch chain (as_tensor, masks, unique, clone, gather, where, scatter) and argmax took 125 us."""
        recent = np.asarray(history[-self.window :], dtype=np.int64)
        recent = recent[(recent >= 0) & (recent < row.shape[-1])]
        if recent.size == 0:
            return row
        ids, counts = np.unique(recent, return_counts=True)
        out = row.copy()
        o = self.options
        vals = out[ids]
        if o.repeat_penalty != 1.0:
            vals = np.where(vals <= 0, vals * o.repeat_penalty, vals / o.repeat_penalty)
        vals = vals - counts.astype(vals.dtype) * o.frequency_penalty - o.presence_penalty
        out[ids] = vals
        return out

    def candidates(self, logits: torch.Tensor, history: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """The final candidate set and its sampling distribution.

        Returns (token_ids, probs), both 1-D, token_ids in descending order of penalised logit; probs sums to 1.
        For greedy options this is the single argmax token with probability 1.
        """
        x = self.apply_penalties(logits.detach().to(torch.float32).reshape(-1), history)
        o = self.options
        if o.is_greedy:
            top = torch.argmax(x).reshape(1)
            return top, torch.ones(1)
        vocab = x.shape[0]
        # top_k (also sorts; the later filters rely on descending order).
        if 0 < o.top_k < vocab:
            vals, ids = torch.topk(x, o.top_k)
        else:
            vals, ids = torch.sort(x, descending=True)
        # Candidates at -inf (e.g. masked tokens) can never be drawn; drop them early, keep at least one.
        finite = torch.isfinite(vals)
        if not bool(finite.all()):
            n_finite = max(int(finite.sum()), 1)
            vals, ids = vals[:n_finite], ids[:n_finite]
        if o.typical_p < 1.0 and vals.numel() > 1:
            keep = _typical_keep(vals, o.typical_p)
            vals, ids = vals[keep], ids[keep]
        if o.top_p < 1.0 and vals.numel() > 1:
            p = torch.softmax(vals, dim=0)
            cum = torch.cumsum(p, dim=0)
            # first index whose cumulative mass reaches top_p, inclusive
            n = int(torch.searchsorted(cum, torch.tensor([o.top_p], dtype=cum.dtype)).item()) + 1
            n = min(max(n, 1), vals.numel())
            vals, ids = vals[:n], ids[:n]
        if o.min_p > 0.0 and vals.numel() > 1:
            p = torch.softmax(vals, dim=0)
            mask = p >= o.min_p * p[0]
            mask[0] = True
            vals, ids = vals[mask], ids[mask]
        probs = torch.softmax(vals / o.temperature, dim=0)
        return ids, probs

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
        if self.options.is_greedy and logits.device.type == "cpu":  # numpy's argmax: see argmax_rows
            row = logits.detach().reshape(-1)
            x = row.numpy() if row.dtype == torch.float32 else row.to(torch.float32).numpy()
            if self._penalise and history:
                x = self._penalised(x, history)
            return int(x.argmax())
        ids, probs = self.candidates(logits, history)
        if ids.numel() == 1:
            return int(ids[0])
        # Inverse-CDF draw from the sequence's own generator (one uniform per token: reproducible per seed).
        u = torch.rand(1, generator=self.generator, dtype=torch.float64)
        cum = torch.cumsum(probs.to(torch.float64), dim=0)
        j = int(torch.searchsorted(cum, u * cum[-1], right=True).item())
        return int(ids[min(j, ids.numel() - 1)])


def _typical_keep(vals: torch.Tensor, typical_p: float) -> torch.Tensor:
    """Positions (ascending, so descending logit order is kept) of the locally typical set of sorted logits."""
    logp = torch.log_softmax(vals.to(torch.float64), dim=0)
    p = logp.exp()
    entropy = -(p * logp).sum()
    shifted = (-logp - entropy).abs()
    order = torch.argsort(shifted, stable=True)
    cum = torch.cumsum(p[order], dim=0)
    over = torch.nonzero(cum > typical_p)
    n = int(over[0].item()) + 1 if over.numel() else order.numel()
    return torch.sort(order[: max(n, 1)]).values


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
