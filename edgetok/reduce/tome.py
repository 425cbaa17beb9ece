"""ToMe: bipartite soft matching token merging.

Paper: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023
(arXiv:2210.09461); reference code facebookresearch/ToMe.

Implemented: bipartite soft matching on the attention keys averaged over heads
(the paper's metric), merging of the r most similar A->B pairs between a
block's attention and its MLP, size-weighted averaging with size tracking, and
proportional attention (log(size) added to the attention logits, applied by the
adapters). Tokens are split alternately: A = even positions, B = odd positions.

Departures from the reference code, all deliberate:
- ``protect_first`` generalises the class-token flag to the first K tokens
  (class + register tokens): protected A rows and protected B columns get
  score -inf, and protected tokens come out first, unchanged. K=1 is the
  paper's class-token case and gives the same outputs.
- Output order is fixed as [protected, unmerged A in original order, B in
  original order]; the reference keeps unmerged A in score order when there is
  no class token. ViT blocks are permutation-equivariant, so this changes no
  class-token output.
- Ties break towards the lower index (stable sort), which is what ONNX TopK
  does, so every backend picks the same tokens.
- A schedule asking for more merges than there are mergeable A tokens is an
  error instead of being clamped silently; ``clamp=True`` asks for the
  reference code's rule (r = min(r, what can merge) at each layer), which is
  how the paper's "ViT-B r=16" runs, and the plan records the counts used.
- The metric is normalised with a small epsilon (the reference divides by the
  norm directly), so an all-zero key does not produce NaN.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ScheduleError
from .base import Reducer
from .registry import Plan, register_method
from .schedule import resolve_counts

EPS = 1e-6


def split_counts(n: int, protect_first: int) -> tuple[int, int, int, int]:
    """Sizes of the bipartite sets: (A count, B count, protected A, protected B)."""
    return (n + 1) // 2, n // 2, (protect_first + 1) // 2, protect_first // 2


def max_merges(n: int, protect_first: int) -> int:
    """The most tokens one bipartite step can remove from ``n`` tokens."""
    na, nb, pa, pb = split_counts(n, protect_first)
    return 0 if nb - pb <= 0 else na - pa


def check_merge(n: int, r: int, protect_first: int, where: str = "") -> None:
    limit = max_merges(n, protect_first)
    if r < 0 or r > limit:
        raise ScheduleError(
            f"{where}cannot merge r={r} tokens out of {n} (with {protect_first} protected "
            f"tokens at most {limit} can merge in one step); lower r, or pass clamp=True to merge what each "
            "layer can (the ToMe reference code's rule; `edgetok export` does so unless --strict)"
        )


def similarity(metric: torch.Tensor, protect_first: int) -> torch.Tensor:
    """Cosine similarity of every A token to every B token, protected pairs at -inf."""
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(EPS)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    _, _, pa, pb = split_counts(metric.shape[1], protect_first)
    if pa or pb:
        na, nb = scores.shape[1:]
        rows = torch.arange(na, device=scores.device)[:, None] < pa
        cols = torch.arange(nb, device=scores.device)[None, :] < pb
        scores = scores.masked_fill(rows | cols, float("-inf"))
    return scores


def bipartite_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    r: int,
    protect_first: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of ``x`` [B,N,C] by bipartite soft matching.

    ``metric`` [B,N,Ck] decides the matching, ``size`` [B,N,1] is the number of
    patches each token stands for. Returns (x [B,N-r,C], size [B,N-r,1]);
    r=0 returns the inputs unchanged (no reordering).
    """
    n, c = x.shape[1], x.shape[2]
    check_merge(n, r, protect_first)
    if r == 0:
        return x, size
    _, _, pa, pb = split_counts(n, protect_first)
    node_max, node_idx = similarity(metric, protect_first).max(dim=-1)
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    src = order[:, :r]
    unm = order[:, r:].sort(dim=-1).values[:, pa:]  # protected A are the smallest indices
    dst = node_idx.gather(1, src)

    a_x, b_x = x[:, ::2], x[:, 1::2]
    a_s, b_s = size[:, ::2], size[:, 1::2]
    src_c = src[..., None].expand(-1, -1, c)
    dst_c = dst[..., None].expand(-1, -1, c)
    b_sum = (b_x * b_s).scatter_add(1, dst_c, (a_x * a_s).gather(1, src_c))
    b_size = b_s.scatter_add(1, dst[..., None], a_s.gather(1, src[..., None]))
    unm_x = a_x.gather(1, unm[..., None].expand(-1, -1, c))
    unm_s = a_s.gather(1, unm[..., None])
    k = protect_first
    out = torch.cat([x[:, :k], unm_x, (b_sum / b_size)[:, pb:]], dim=1)
    out_size = torch.cat([size[:, :k], unm_s, b_size[:, pb:]], dim=1)
    return out, out_size


def merge_sources(metric: torch.Tensor, r: int, protect_first: int = 1) -> torch.Tensor:
    """For visualisation: output slot of every input token after one merge step [B,N]."""
    b, n = metric.shape[:2]
    ids = torch.arange(n, dtype=metric.dtype, device=metric.device).expand(b, n)[..., None]
    # Track each input position through the merge by merging a one-hot of positions.
    onehot = torch.nn.functional.one_hot(torch.arange(n, device=metric.device), n).to(metric.dtype)
    merged, _ = bipartite_merge(onehot.expand(b, n, n), metric, torch.ones_like(ids), r, protect_first)
    return (merged > 0).float().argmax(dim=1)


class TokenMerge(Reducer):
    """One ToMe step: merge ``r`` tokens (edgetok::token_merge)."""

    def __init__(self, r: int, protect_first: int):
        super().__init__()
        self.r, self.protect_first = int(r), int(protect_first)

    def extra_repr(self) -> str:
        return f"r={self.r}, protect_first={self.protect_first}"

    def tokens_after(self, n: int, where: str = "") -> int:
        check_merge(n, self.r, self.protect_first, where)
        return n - self.r

    def reduction_flops(self, n: int, dim: int) -> int:
        na, nb = (n + 1) // 2, n // 2
        return 2 * na * nb * dim + 3 * n * dim if self.r else 0

    def forward(self, x, size, ctx):
        if self.r == 0:
            return x, size
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        return torch.ops.edgetok.token_merge(x, ctx.metric, size, self.r, self.protect_first)


@register_method("tome", "ToMe bipartite token merging: r tokens merged per layer, proportional attention")
def build_tome(depth: int, tokens: int, protect: int, r=8, prop_attn: bool = True, protect_first=None,
               clamp: bool = False) -> Plan:
    p = protect if protect_first is None else int(protect_first)
    rs = resolve_counts(r, depth, "r")
    reducers, n, clamped = [], tokens, []
    for i, ri in enumerate(rs):
        if clamp and ri > max_merges(n, p):
            clamped.append({"layer": i, "r": ri, "merged": max_merges(n, p), "tokens_in": n})
            ri = rs[i] = max_merges(n, p)
        step = TokenMerge(ri, p)
        n = step.tokens_after(n, f"layer {i}: ")
        reducers.append(step if ri else None)
    plan = Plan("tome", {"r": rs, "prop_attn": prop_attn, "protect_first": p}, reducers, prop_attn=prop_attn)
    if clamped:  # what clamp=True changed, for the CLI's note (clamp_note)
        plan.summary["clamped"] = {"layers": clamped, "tokens_left": n}
    return plan


def clamp_note(plan) -> Optional[str]:
    """One line naming the layers where clamp=True merged fewer tokens than r asked and the tokens
    left after the last layer (what `edgetok export` prints; `--strict` makes it an error), or None."""
    info = (plan.summary if plan is not None else {}).get("clamped")
    if not info:
        return None
    layers = ", ".join(f"layer {c['layer']} merged {c['merged']} of r={c['r']} ({c['tokens_in']} tokens in)"
                       for c in info["layers"])
    return (f"r clamped to what each layer can merge (the ToMe reference code's rule): {layers}; "
            f"{info['tokens_left']} tokens remain after the last layer (--strict makes this an error)")
