"""Decode ahead of the engine: the next decode steps go to the shards as soon as this one's tokens are back,
before the engine has streamed them.

Why: with the step loops (step_loop.py) a token's critical path was the shards' forward, then the driver's whole
turn (wake on the reply, unpickle, the engine's bookkeeping, detokenising, handing the chunk to the HTTP thread,
building and pickling the next step) while every shard sat idle. Measured on the bundled SmolLM2 (one shard, 2
cores): the shard's process used 12.4 ms of CPU per token, the token took 13.5 ms of wall time; the difference is
that turn. Sending the next step first overlaps it with the shards' next forward. vLLM does the same
("async scheduling": the scheduler plans step n+1 before step n's sampled tokens reach it), and so does every
pipelined decoder that keeps its device busy while the host post-processes.

Two steps go ahead. The first is fed by the driver with the tokens just back; the second is sent before those of
the first are known, and is fed on the shards: the output rank (the last stage's first shard, which samples) keeps
what it sampled and sends it straight to stage 0's ranks (runtime/collectives.py `send_feed`: shared memory on one
host, gloo across), before its reply to the driver. So a token travels from the last stage to the first in one
message, without the driver's wake-up and turn in between (measured on SmolLM2, two stages on one 2-core machine:
0.35 ms from the last stage's sample to the first stage's next input, against 0.45-0.54 ms relayed by the driver,
bench/hot_path_bench.py; ~0.3-0.5 ms a token). Tensor parallelism alone keeps only the first, relayed by the driver
(`lookahead_depth` says why); `OLLAMA_DISTRIBUTED_LOOKAHEAD=1` does so for every plan.

What is sent ahead is exactly what the engine would send next when nothing changes: every row of the step just
finished was a sequence that sampled a token, so its next feed is that token (runtime/engine.py: a sequence's
pending tokens are its history past what was fed). When the engine then asks for a step, each row whose feed and
sampler match the step sent ahead takes its result (a *hit*); other rows run in a normal step. A sequence the
engine ends in between is freed (the free follows the step on the same ordered channel, so the shard frees after
it). A row sent ahead that the engine then feeds differently without freeing it (no engine path does this today;
kept correct rather than assumed) is rewound: its shards drop the one cached position (KVCache.rewind) and its
sampler is sent again, since the shard's copy drew once more.

The driver applies a step's sampler states, grammar advances and logprobs only when the engine takes the result,
so after a failure the samplers a replay re-sends are the ones the engine saw, as without the look-ahead.
"""

from __future__ import annotations

import pickle
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .sampled_steps import sample_entries


@dataclass
class Lookahead:
    """A decode step sent before the engine asked for it.

    seq_ids[j] was fed fed[j] with the Sampler whose id() is sampler_ids[j]; `freed`: sequences the engine freed
    since (their results are void); `out`: the output shard's payload (worker.py `_sample`) once collected."""

    seq_ids: list[int]
    fed: list[int | None]  # None: fed back the previous step's sample, not known until that one answers
    sampler_ids: list[int]
    freed: set[int] = field(default_factory=set)
    out: dict[str, Any] | None = None

    def hits(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]], samplers: Sequence[Any]) -> dict[int, int]:
        """Rows of the engine's step (row -> row of this step) whose result this step already holds: the same
        sequence, fed the same single token, sampled by the same Sampler, not freed since."""
        mine = {sid: j for j, sid in enumerate(self.seq_ids)}
        out = {}
        for row, (sid, feed, s) in enumerate(zip(seq_ids, tokens, samplers)):
            j = mine.get(sid)
            if (j is not None and sid not in self.freed and s is not None and id(s) == self.sampler_ids[j]
                    and len(feed) == 1 and feed[0] == self.fed[j]):
                out[row] = j
        return out

    def fed_by(self, prev: "Lookahead") -> None:
        """This step was sent before `prev` answered, fed with what `prev` samples (on the shards: worker.py
        `_fed_tokens`): its feeds, now known."""
        assert prev.out is not None
        tok = dict(zip(prev.seq_ids, prev.out["tokens"]))
        self.fed = [tok[sid] for sid in self.seq_ids]

    def stale(self, taken: Sequence[int]) -> list[int]:
        """Sequences this step advanced that the engine neither took (spec rows `taken`) nor freed: to rewind."""
        kept = set(taken)
        return [sid for j, sid in enumerate(self.seq_ids) if j not in kept and sid not in self.freed]


def next_feeds(samplers: Sequence[Any], sampled: Sequence[int | None], lengths: Sequence[int],
               max_seq_len: int) -> list[int] | None:
    """The tokens to send ahead (row i is fed sampled[i]), or None when the next step is not a plain decode of
    this batch: a row that sampled nothing (a prompt chunk mid-way, or no sampler) or whose cache is full."""
    if not sampled or any(s is None for s in samplers) or any(t is None for t in sampled):
        return None
    if any(n + 1 > max_seq_len for n in lengths):
        return None
    return [int(t) for t in sampled]  # type: ignore[arg-type]


def lookahead_depth(setting: str, stage_widths: Sequence[int]) -> int:
    """Steps to keep ahead for a plan whose stages have these numbers of shards, as OLLAMA_DISTRIBUTED_LOOKAHEAD
    says: "0" (off), "1" (the next step; the driver relays its tokens to stage 0), "2" (also the one after it, fed
    on the shards), or "auto": 2, except 1 for a single stage of several shards (tensor parallel alone).

    Why not 2 there: the driver's turn (collect, stream, send the step after next) then falls while every shard of
    the plan computes in lockstep, and on a machine whose cores the shards fill, the core it takes stalls all of
    them at the next sum. Measured on SmolLM2, 2-way tensor parallel on one 2-core machine, through the API: 0.90x
    the 1-thread server fed on the shards vs 0.92x relayed (0.81 vs 0.88, 0.82 vs 0.94 in other runs), while a
    2-stage pipeline, whose stages take turns and leave a core to the driver, went 0.89x -> 0.92x
    (bench/hot_path_bench.py; bench/README.md)."""
    value = setting.strip().lower()
    if value == "auto":
        return 1 if len(stage_widths) == 1 and stage_widths[0] > 1 else 2
    if value not in ("0", "1", "2"):
        raise ValueError(f"OLLAMA_DISTRIBUTED_LOOKAHEAD must be auto, 0, 1 or 2, got {setting!r}")
    return int(value)


class Lookaheads:
    """The steps a RayExecutor sent ahead, in order, and what settles them (module docstring).

    post(msg, tokens, ahead) sends a step-channel message whose reply `collect_next()` (which fills ahead.out)
    brings back in order; `lengths` (seq id -> positions the shards will hold once every message sent ran) and
    `installed` (seq id -> id() of the Sampler its shard holds) are the executor's. depth: steps kept ahead: 2
    (the second fed on the shards with what the first samples: the output rank keeps its samples and sends them
    to stage 0's other ranks, runtime/collectives.py) or 1 (the driver relays each step's tokens to stage 0)."""

    def __init__(self, post: Callable[[bytes, int | None, Lookahead | None], None], collect_next: Callable[[], Any],
                 lengths: dict[int, int], installed: dict[int, int], max_seq_len: int, depth: int = 1) -> None:
        self._post, self._collect_next = post, collect_next
        self._lengths, self._installed = lengths, installed
        self.max_seq_len, self.depth = max_seq_len, depth
        self._q: deque[Lookahead] = deque()
        self.taken = 0  # rows whose result came from a step sent ahead
        self.rewound = 0  # rows sent ahead that the engine fed otherwise (rewound on the shards)

    def freed(self, seq_id: int) -> None:
        for ahead in self._q:
            ahead.freed.add(seq_id)

    def take(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]],
             samplers: Sequence[Any]) -> tuple[Lookahead | None, dict[int, int]]:
        """The oldest step sent ahead (None if none), settled against the engine's step, and the rows it covers
        ({row: its row}). Rows it advanced that the engine fed otherwise are rewound; so is every step sent after
        it when the engine's batch is not its continuation, else the next one learns its feeds (this one's
        samples)."""
        if not self._q:
            return None, {}
        ahead = self._q.popleft()
        while ahead.out is None:
            self._collect_next()
        hits = ahead.hits(seq_ids, tokens, samplers)
        rewind = ahead.stale(list(hits.values()))
        if self._q:
            if rewind or len(hits) < len(seq_ids):
                rewind += self._forget()
            else:
                self._q[0].fed_by(ahead)
        self._rewind(rewind)
        self.taken += len(hits)
        return ahead, hits

    def drop(self) -> None:
        """Rewind everything sent ahead (the engine asked for something else)."""
        self._rewind(self._forget())

    def send(self, seq_ids: list[int], samplers: Sequence[Any], histories: Sequence[Sequence[int] | None],
             sampled: list[int | None], micro_batches: int) -> None:
        """After a step that sampled `sampled`: send the decode step feeding every row its token, if that is the
        engine's next step when nothing changes (`next_feeds`) and it is not in flight already; with depth 2, also
        the step after it, fed on the shard with what that one samples."""
        lengths = [self._lengths.get(s, 0) for s in seq_ids]
        feeds = next_feeds(samplers, sampled, lengths, self.max_seq_len)
        if feeds is None:
            return
        then = [[t] for t in feeds]
        if not self._q:  # (else the step feeding `sampled` is the one `take` kept)
            self._send(Lookahead(list(seq_ids), list(feeds), [id(s) for s in samplers]), feeds, micro_batches,
                       sample_entries(self._installed, seq_ids, samplers, histories, then=then))
        if len(self._q) < self.depth and max(lengths) + 2 <= self.max_seq_len:
            self._send(Lookahead(list(seq_ids), [None] * len(seq_ids), [id(s) for s in samplers]), None,
                       micro_batches, sample_entries(self._installed, seq_ids, samplers, histories, then=then, more=1))

    def _send(self, ahead: Lookahead, feeds: list[int] | None, micro_batches: int, entries: list[Any]) -> None:
        n = len(ahead.seq_ids)  # feeds None: each row is fed what it sampled last, on the shard (worker.py)
        msg = pickle.dumps(("step", ahead.seq_ids, [1] * n, feeds, "logits", micro_batches, entries),
                           protocol=pickle.HIGHEST_PROTOCOL)
        for sid in ahead.seq_ids:  # what the shards will hold once they ran it (the cache-full check counts it)
            self._lengths[sid] = self._lengths.get(sid, 0) + 1
        self._q.append(ahead)
        self._post(msg, n, ahead)

    def _forget(self) -> list[int]:
        """Forget every step sent ahead; the sequences they advanced, once per step."""
        out = []
        while self._q:
            ahead = self._q.popleft()
            out += [sid for sid in ahead.seq_ids if sid not in ahead.freed]
        return out

    def _rewind(self, seq_ids: list[int]) -> None:
        """Drop on the shards the positions that steps sent ahead cached for these sequences (one per occurrence);
        their samplers are sent again, since the shards' copies drew more."""
        if not seq_ids:
            return
        counts: dict[int, int] = {}
        for sid in seq_ids:
            counts[sid] = counts.get(sid, 0) + 1
        for sid, n in counts.items():
            self._lengths[sid] -= n
            self._installed.pop(sid, None)
        self.rewound += len(seq_ids)
        self._post(pickle.dumps(("rewind", counts)), None, None)
