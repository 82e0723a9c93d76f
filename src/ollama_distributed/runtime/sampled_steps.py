"""Sampling on the last stage (RayExecutor.step_sampled, worker.py `_sample`): what the driver sends with a step
and what it does with the answer.

The shard keeps a copy of each sequence's Sampler (model/sampling.py; sent once, again whenever the driver's copy
changes, and pickled with its generator and grammar state), so a step carries per row only None (no token wanted)
or (the Sampler when the shard does not hold this one yet, the recent tokens its penalties see). The answer
carries the tokens, the generator state after each non-greedy draw, and logprobs where asked; the driver copies
them into its own samplers, so a replay after a failure re-sends samplers that are where the engine saw them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def sample_entries(installed: dict[int, int], seq_ids: Sequence[int], samplers: Sequence[Any],
                   histories: Sequence[Sequence[int] | None], then: Sequence[Sequence[int]] | None = None,
                   more: int = 0) -> list[Any]:
    """A step's sampling entries (module docstring). `installed` (seq id -> id() of the Sampler its shard holds)
    is updated. A step sent ahead (runtime/lookahead.py): each history goes on with then[i], and then with `more`
    tokens the shard appends itself (a step fed back with its own last samples, worker.py)."""
    entries: list[Any] = []
    for i, (sid, s) in enumerate(zip(seq_ids, samplers)):
        if s is None:
            entries.append(None)
            continue
        hist, extra = histories[i] or (), list(then[i]) if then is not None else []
        n = len(hist) + len(extra) + more
        window = s.window if s.window > 0 else n
        keep = window - more  # what of hist + extra the penalties' window holds
        recent = (list(hist[-keep:]) + extra)[-keep:] if n and keep > 0 and getattr(s, "_penalise", True) else []
        fresh = installed.get(sid) != id(s)
        entries.append((s if fresh else None, recent))
        installed[sid] = id(s)
    return entries


def apply_sampled(payload: dict[str, Any], rows: dict[int, int], samplers: Sequence[Any],
                  out: list[int | None]) -> None:
    """Copy a sampled step's answer (worker.py `_sample`; its row rows[i] is the caller's row i) into `out` and the
    caller's samplers: generator states, logprobs, grammar advances."""
    states, logprobs = payload["states"], payload.get("logprobs", {})
    for i, j in rows.items():
        s, tok = samplers[i], payload["tokens"][j]
        out[i] = tok
        if j in states:
            s.generator.set_state(torch.from_numpy(states[j]))
        if j in logprobs:
            s.last_logprobs = logprobs[j]
        if s is not None and tok is not None and getattr(s, "constraint", None) is not None:
            s.constraint.advance(tok)  # the driver's copy follows the shard's (what a replay re-sends)
