"""What the cluster will be asked to do: the request shape the plan is tuned for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """prompt_tokens: tokens prefilled per request. output_tokens: tokens generated per request.
    context_tokens: KV-cache slots reserved per sequence (0 = prompt + output). concurrency: sequences
    decoded together in one batch (continuous batching runs them in one step)."""

    prompt_tokens: int = 512
    output_tokens: int = 256
    context_tokens: int = 0
    concurrency: int = 1

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1 or self.concurrency < 1:
            raise ValueError(f"prompt_tokens, output_tokens and concurrency must be >= 1, got "
                             f"{self.prompt_tokens}, {self.output_tokens}, {self.concurrency}")
        if self.context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, got {self.context_tokens}")
        if self.context_tokens == 0:
            object.__setattr__(self, "context_tokens", self.prompt_tokens + self.output_tokens)
        if self.context_tokens < self.prompt_tokens + 1:
            raise ValueError(f"context_tokens ({self.context_tokens}) must exceed prompt_tokens ({self.prompt_tokens})")

    @property
    def mean_decode_context(self) -> float:
        """Average tokens attended to while decoding: the prompt plus half of the output."""
        return self.prompt_tokens + self.output_tokens / 2.0

    def workload_class(self) -> str:
        """Coarse bucket for learning statistics: prompt length, output length and concurrency by powers of 4,
        so that similar requests share what was measured."""
        def bucket(x: int) -> int:
            b = 1
            while b * 4 <= x:
                b *= 4
            return b
        return f"p{bucket(self.prompt_tokens)}-o{bucket(self.output_tokens)}-c{bucket(self.concurrency)}"

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "context_tokens": self.context_tokens, "concurrency": self.concurrency}
