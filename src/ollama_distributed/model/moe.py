"""Mixture-of-experts FFN (Qwen3-MoE) and the expert-parallel slice of it a shard holds.

Math (Shazeer et al. 2017, "Outrageously Large Neural Networks"; as transformers' Qwen3MoeSparseMoeBlock and
llama.cpp's qwen3moe.cpp compute it): for a token x (after ffn_norm),
    p = softmax(W_router x)                       (float32, over all n_expert experts)
    S = top-k(p) (k = n_expert_used), w_e = p_e / Σ_{e' ∈ S} p_e'   (norm_topk_prob; else w_e = p_e)
    y = Σ_{e ∈ S} w_e · down_e(silu(gate_e x) ⊙ up_e x)
Only the k chosen experts' matrices are read for a token (decode reads k of n_expert experts per layer).
A shared expert (qwen2moe, transformers' Qwen2MoeSparseMoeBlock) adds sigmoid(g·x) · down_s(silu(gate_s x) ⊙ up_s x)
for every token; one shard of a stage holds it whole (`holds_shared_expert`), so it joins the all-reduce once.

Parallelism (vLLM's expert parallelism inside the tensor-parallel group): every shard holds the whole router and
routes every token itself (the residual stream is bit-identical on every rank, so every rank picks the same
experts); a shard holds experts [e0, e1) (ShardSpec.experts) and, of each, FFN columns [f0, f1) (ShardSpec.ffn,
Megatron column/row split of every expert alike). y is a sum over experts and, within an expert, over FFN
columns, so each shard's partial sum joins the all-reduce the layer already does for its row-parallel output.

The GGUF stores each matrix of the experts as one 3-D tensor (`ffn_gate_exps` (n_expert, ffn, hidden) in numpy
order); `expert_views` presents expert e's slice as an ordinary 2-D tensor, so the loader reads (and keeps in its
file type) only the experts and rows a shard owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .linear import linear, weight_tensors

EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def expert_tensor_name(name: str, expert: int) -> str:
    """The name under which `expert_views` registers expert `expert`'s 2-D slice of stacked tensor `name`."""
    return f"{name}[{expert}]"


def expert_views(tensors: dict[str, Any], name: str, experts: tuple[int, int]) -> None:
    """Add to `tensors` (name → gguf ReaderTensor) one 2-D tensor per expert in `experts` of the 3-D tensor `name`:
    the same memory-mapped bytes (`data[e]`, rows of whole blocks), shape without the expert dimension. Absent
    `name` is left for the reader to report as missing."""
    t = tensors.get(name)
    if t is None:
        return
    shape = np.array(t.shape[:2], dtype=np.uint64)  # GGUF order: (inputs, outputs)
    n_elements = int(shape[0] * shape[1])
    n_bytes = int(t.n_bytes) // int(t.shape[2])
    for e in range(*experts):
        tensors[expert_tensor_name(name, e)] = t._replace(name=expert_tensor_name(name, e), shape=shape,
                                                          n_elements=n_elements, n_bytes=n_bytes, data=t.data[e])


def load_moe_layer(tensors: dict[str, Any], read_matrix: Callable[..., Any], read_router: Callable[[str], torch.Tensor],
                   block: str, layer: str, hidden: int, ffn: int, experts: tuple[int, int],
                   cols: tuple[int, int]) -> dict[str, Any]:
    """The MoE weights of one layer a shard owns, under canonical names: `{layer}router` (n_expert, hidden) float32,
    and per expert e in `experts` `{layer}experts.{e}.gate|up` (rows `cols` of (ffn, hidden)) and `.down` (columns
    `cols` of (hidden, ffn)), read by `read_matrix(name, shape, rows=, cols=)` in the shard's weight form from the
    experts' views added to `tensors` (the reader's name → tensor table)."""
    for name in EXPERT_TENSORS:
        expert_views(tensors, f"{block}{name}.weight", experts)
    out: dict[str, Any] = {layer + "router": read_router(block + "ffn_gate_inp.weight")}
    for e in range(*experts):
        gate, up, down = (expert_tensor_name(f"{block}{n}.weight", e) for n in EXPERT_TENSORS)
        out[f"{layer}experts.{e}.gate"] = read_matrix(gate, (ffn, hidden), rows=cols)
        out[f"{layer}experts.{e}.up"] = read_matrix(up, (ffn, hidden), rows=cols)
        out[f"{layer}experts.{e}.down"] = read_matrix(down, (hidden, ffn), cols=cols)
    return out


def holds_shared_expert(cfg: Any, spec: Any) -> bool:
    """Whether shard `spec` computes the layers' shared expert: the one whose experts and FFN columns both start at
    0 and which holds some expert (a stage's expert ranges are contiguous, so exactly one shard of it)."""
    e0, e1 = spec.expert_range(cfg)
    return bool(cfg.shared_expert_ffn) and spec.ffn[0] == 0 and e0 == 0 < e1


def load_shared_expert(read_matrix: Callable[..., Any], read_vector: Callable[..., torch.Tensor], block: str,
                       layer: str, hidden: int, ffn: int) -> dict[str, Any]:
    """The shared expert of one layer, whole: `{layer}shared.gate|up|down` and its gate vector `{layer}shared.gate_inp`
    (hidden,) float32 (GGUF `ffn_gate_inp_shexp`)."""
    return {
        layer + "shared.gate": read_matrix(block + "ffn_gate_shexp.weight", (ffn, hidden)),
        layer + "shared.up": read_matrix(block + "ffn_up_shexp.weight", (ffn, hidden)),
        layer + "shared.down": read_matrix(block + "ffn_down_shexp.weight", (hidden, ffn)),
        layer + "shared.gate_inp": read_vector(block + "ffn_gate_inp_shexp.weight", hidden, dtype=torch.float32),
    }


@dataclass
class MoEFFN:
    """One layer's mixture-of-experts FFN as a shard holds it (see the module docstring).

    router: (n_expert, hidden) float32, whole on every shard. first: global id of local expert 0.
    wgu[i]: local expert i's gate rows then up rows, (2 * ffn_local, hidden); wdown[i]: (hidden, ffn_local).
    shared: the shared expert's (gate/up weight, down weight, gate vector (hidden,) float32) on the one shard that
    computes it, else None.
    """

    router: torch.Tensor
    first: int
    wgu: list[Any]
    wdown: list[Any]
    top_k: int
    norm_topk_prob: bool
    ffn_local: int
    shared: tuple[Any, Any, torch.Tensor] | None = None

    @classmethod
    def build(cls, weights: dict[str, Any], layer: str, experts: tuple[int, int], top_k: int, norm_topk_prob: bool,
              ffn_local: int, fuse: Callable[[list[Any]], Any]) -> "MoEFFN":
        """From canonical weights (popped, as ModelShard consumes them); `fuse` is the shard's row-concatenating
        packer (ModelShard._fused), so experts keep the shard's weight form (file types, int4 or dense)."""
        wgu, wdown = [], []
        for e in range(*experts):
            n = f"{layer}experts.{e}."
            wgu.append(fuse([weights.pop(n + "gate"), weights.pop(n + "up")]))
            wdown.append(fuse([weights.pop(n + "down")]))
        router = weights.pop(layer + "router").float()
        shared = None
        if layer + "shared.gate" in weights:
            s = layer + "shared."
            shared = (fuse([weights.pop(s + "gate"), weights.pop(s + "up")]), fuse([weights.pop(s + "down")]),
                      weights.pop(s + "gate_inp").float())
        return cls(router, experts[0], wgu, wdown, top_k, norm_topk_prob, ffn_local, shared)

    @property
    def n_local(self) -> int:
        return len(self.wgu)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (N, k) float32, expert ids (N, k) int64) of the top-k experts of each row of x (N, hidden)."""
        probs = torch.softmax(F.linear(x.float(), self.router), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """This shard's part of the layer's FFN output for x (N, hidden): the sum over the tokens' chosen experts
        that it holds (zeros where it holds none); the caller all-reduces it."""
        weights, ids = self.route(x)
        local = ids - self.first
        out = torch.zeros_like(x) if self.shared is None else self._shared(x)
        if self.n_local == 0:
            return out
        if x.shape[0] == 1:  # one token (a decode step of one sequence): its k experts, no gathers or scatters
            for slot, e in enumerate(local[0].tolist()):
                if 0 <= e < self.n_local:
                    out += self._expert(x, e) * weights[0, slot].to(x.dtype)
            return out
        held = (local >= 0) & (local < self.n_local)
        # Only experts some token chose run (the rest are never read); each on just the tokens routed to it.
        for e in sorted(set(local[held].tolist())):
            rows, slot = torch.where(local == e)
            y = self._expert(x[rows], e) * weights[rows, slot, None].to(x.dtype)
            out.index_add_(0, rows, y)
        return out

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Local expert e on the rows of x: down(silu(gate x) ⊙ up x)."""
        gate, up = linear(x, self.wgu[e]).split(self.ffn_local, dim=-1)
        return linear(F.silu(gate) * up, self.wdown[e])

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert's output for every row of x, scaled by its sigmoid gate."""
        wgu, wdown, g = self.shared  # type: ignore[misc]
        gate, up = linear(x, wgu).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, wdown) * torch.sigmoid(F.linear(x.float(), g[None])).to(x.dtype)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors holding this FFN's bytes (ModelShard.weight_bytes)."""
        extra = [] if self.shared is None else [*weight_tensors(self.shared[0]), *weight_tensors(self.shared[1]),
                                                self.shared[2]]
        return [self.router, *(t for w in self.wgu + self.wdown for t in weight_tensors(w)), *extra]
