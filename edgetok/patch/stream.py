"""Streaming ViT encoder that computes only the patch tokens that changed.

Papers: Yao et al., "TimeChat-Online: 80% Visual Tokens are Naturally
Redundant in Streaming Videos", 2025 (arXiv:2504.17343) -- the differential
token drop (DTD) change rule; Dutson, Li and Gupta, "Eventful Transformers:
Leveraging Temporal Redundancy in Vision Transformers", ICCV 2023 -- computing
only the tokens that changed and reusing the rest from their last computation.

Implemented, per frame:
- change of every patch token against its reference: DTD's pixel rule (mean
  absolute pixel difference of the patch) or its feature rule (``1 - cos`` of
  the embedded token), compared with the token's value when it was last
  computed (Eventful Transformers' reference, the default) or with the
  previous frame (DTD's rule, ``compare="previous"``);
- a refresh policy: a full frame first, every ``refresh_every`` frames, and
  for a stream whose changed share of patch tokens exceeds ``max_changed_share``;
- the transformer runs on the changed tokens plus the class/register tokens
  only. In every block their queries attend over the keys/values of all
  tokens: their own fresh ones, and the cached ones (from the frame each
  unchanged token was last computed) for the others;
- the full token map (unchanged tokens from the token cache) and the computed
  tokens with their positions are returned.
Two selection forms share one code path: the torch form computes exactly the
changed tokens (batch max count, padded with a validity mask); the static form
takes the top-changed tokens up to a fixed ``budget`` through
``edgetok::token_drop`` and masks the slots whose change is below the
threshold, so the step exports to ONNX with static shapes (see export.py).

Departures: DTD drops tokens after the encoder (edgetok.reduce.dtd); here
the encoder itself skips them. Eventful Transformers gates tokens again before
every attention and MLP, keeps per-layer error accumulators and updates the
attention matrix with query/key deltas; here the token set is chosen once,
at the input, and kept through all blocks, unchanged tokens' outputs are not
refreshed when the keys of changed tokens move (their context drift is bounded
by the refresh policy), and attention of the computed queries runs fused
(scaled_dot_product_attention) over all N cached-or-fresh keys. No training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import EdgetokError, ScheduleError
from ..reduce.dtd import pixel_change, token_change

MODES = ("pixel", "feature")
COMPARES = ("reference", "previous")


@dataclass
class StreamState:
    """What the encoder remembers between frames (all tensors, so the step exports)."""

    ref: Tensor  # pixel mode: frame [B,C,H,W]; feature mode: embedded tokens [B,N,C]
    k: Tensor  # [L,B,H,N,D] keys of every token from its last computation
    v: Tensor  # [L,B,H,N,D]
    tokens: Tensor  # [B,N,C] last-block output of every token


@dataclass
class StepOutput:
    tokens: Tensor  # [B,N,C] full token map (after the last block, before the final norm)
    changed_tokens: Tensor  # [B,M,C] the computed tokens (slots with valid=False are padding)
    idx: Tensor  # [B,M] int64 token positions of the computed slots, ascending
    valid: Tensor  # [B,M] bool
    changed: Tensor  # [B] int64 patch tokens over the threshold (before any budget cap)

    def computed(self) -> Tensor:
        """[B] tokens actually computed (prefix included)."""
        return self.valid.sum(1)


def _adapter(model):
    from . import adapter_for

    if hasattr(model, "edgetok_plan"):
        raise EdgetokError("the streaming encoder needs the original model, not one reduced by edgetok.apply")
    return adapter_for(model)


class Normalize(nn.Module):
    """(frame - mean) / std per channel, or the frame as it is when no mean/std is given.
    Inside the encoder so that the pixel change is measured on the frames as they come
    ([0, 1] pixels) while the model sees the input it was trained on."""

    def __init__(self, mean=None, std=None, channels: int = 3):
        super().__init__()
        if (mean is None) != (std is None):
            raise ScheduleError("give both mean and std to normalise frames, or neither")
        self.active = mean is not None
        if self.active:
            mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
            if mean.numel() != channels or std.numel() != channels or bool((std <= 0).any()):
                raise ScheduleError(f"mean and std need {channels} values each, std > 0; got {mean.tolist()}, "
                                    f"{std.tolist()}")
            self.register_buffer("mean", mean.reshape(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", std.reshape(1, -1, 1, 1), persistent=False)

    def forward(self, frame: Tensor) -> Tensor:
        return (frame - self.mean.to(frame.dtype)) / self.std.to(frame.dtype) if self.active else frame


class StreamCore(nn.Module):
    """The pure per-frame computation (no policy, no Python state): change scores, then
    the selected tokens through every block against the K/V cache."""

    def __init__(self, model: nn.Module, threshold: float, mode: str = "pixel", compare: str = "reference",
                 mean=None, std=None):
        super().__init__()
        if mode not in MODES:
            raise ScheduleError(f"stream mode must be one of {MODES}, not {mode!r}")
        if compare not in COMPARES:
            raise ScheduleError(f"stream compare must be one of {COMPARES}, not {compare!r}")
        if threshold < 0:
            raise ScheduleError(f"stream threshold={threshold} must be >= 0 (0 computes every token)")
        self.adapter = _adapter(model)
        self.model = model
        self.info = self.adapter.info(model)
        self.threshold, self.mode, self.compare = float(threshold), mode, compare
        self.normalize = Normalize(mean, std, self.info.in_chans)

    @property
    def num_patches(self) -> int:
        return self.info.tokens - self.info.num_prefix

    def embed(self, frame: Tensor) -> Tensor:
        return self.adapter.embed(self.model, self.normalize(frame))

    def change(self, frame: Tensor, x: Tensor, ref: Tensor) -> Tensor:
        """[B, patches] change of each patch token against its reference."""
        if self.mode == "pixel":
            return pixel_change(frame, ref, self.info.patch_size)
        p = self.info.num_prefix
        return token_change(x[:, p:], ref[:, p:])

    def initial_state(self, frame: Tensor) -> StreamState:
        """Zero caches shaped for ``frame`` (a refresh overwrites all of them)."""
        i, b = self.info, frame.shape[0]
        z = frame.new_zeros
        ref = z(frame.shape) if self.mode == "pixel" else z(b, i.tokens, i.dim)
        kv = (i.depth, b, i.heads, i.tokens, i.head_dim)
        return StreamState(ref, z(kv), z(kv), z(b, i.tokens, i.dim))

    def forward(self, frame, x, change, refresh, state: StreamState, keep: int, inplace: bool = False):
        """Compute the top-``keep`` changed tokens (refresh[b]: all of stream b's tokens).
        Returns (StepOutput, new StreamState). ``inplace``: write the new K/V into
        ``state.k``/``state.v`` (the caller owns them) instead of building new caches; a
        few-token frame is bound by reading the weights, and the two cache copies per
        layer were a fifth of its time (ViT-S/14, 2 CPU threads)."""
        p, big = self.info.num_prefix, torch.finfo(x.dtype).max
        changed = (change >= self.threshold).sum(1)
        score = torch.cat([change.new_full((change.shape[0], p), big), change], 1)
        score = torch.where(refresh[:, None], big, score)
        sel, idx = torch.ops.edgetok.token_drop(x, score, keep, p, 0)
        valid = score.gather(1, idx) >= self.threshold

        b, m, c = sel.shape
        h = sel
        ks, vs = [], []
        for layer, block in enumerate(self.adapter.blocks(self.model)):
            q, k, v = self.adapter.qkv(block, h)
            gi = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            vm = valid[:, None, :, None]
            kc, vc = state.k[layer], state.v[layer]
            # masked slots keep their cached K/V, so every token is a key exactly once
            k_new, v_new = torch.where(vm, k, kc.gather(2, gi)), torch.where(vm, v, vc.gather(2, gi))
            if inplace:
                k_all, v_all = kc.scatter_(2, gi, k_new), vc.scatter_(2, gi, v_new)
            else:
                k_all, v_all = kc.scatter(2, gi, k_new), vc.scatter(2, gi, v_new)
            o = F.scaled_dot_product_attention(q, k_all, v_all, scale=self.adapter.scale(block))
            h = h + self.adapter.attn_delta(block, o.transpose(1, 2).reshape(b, m, -1))
            h = h + self.adapter.mlp_delta(block, h)
            ks.append(k_all)
            vs.append(v_all)

        tokens = _put(state.tokens, idx, valid, h)
        if self.compare == "previous":
            ref = frame if self.mode == "pixel" else x
        elif self.mode == "feature":
            ref = _put(state.ref, idx, valid, sel)
        else:
            ref = self._put_patches(state.ref, frame, idx, valid)
        out = StepOutput(tokens, h * valid[..., None], idx, valid, changed)
        if inplace:
            return out, StreamState(ref, state.k, state.v, tokens)
        return out, StreamState(ref, torch.stack(ks), torch.stack(vs), tokens)

    def refresh(self, frame, x, change):
        """Every stream in full: the plain blocks (no selection, no cache merge), keeping each
        layer's K/V. Gives what ``forward`` gives with refresh set for every stream, at the
        cost of plain full encoding. Returns (StepOutput, new StreamState)."""
        h, ks, vs = x, [], []
        b, n, _ = x.shape
        for block in self.adapter.blocks(self.model):
            q, k, v = self.adapter.qkv(block, h)
            o = F.scaled_dot_product_attention(q, k, v, scale=self.adapter.scale(block))
            h = h + self.adapter.attn_delta(block, o.transpose(1, 2).reshape(b, n, -1))
            h = h + self.adapter.mlp_delta(block, h)
            ks.append(k)
            vs.append(v)
        idx = torch.arange(n, device=x.device).expand(b, n)
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
        out = StepOutput(h, h, idx, valid, (change >= self.threshold).sum(1))
        ref = frame if self.mode == "pixel" else x
        return out, StreamState(ref, torch.stack(ks), torch.stack(vs), h)

    def _put_patches(self, ref: Tensor, frame: Tensor, idx: Tensor, valid: Tensor) -> Tensor:
        """Reference pixels <- frame pixels on the patches computed this frame."""
        i = self.info
        gh, gw = i.grid
        ps, b = i.patch_size, frame.shape[0]
        hit = torch.zeros(b, i.tokens, dtype=frame.dtype, device=frame.device).scatter(1, idx, valid.to(frame.dtype))
        mask = hit[:, i.num_prefix:].reshape(b, 1, gh, 1, gw, 1).expand(b, 1, gh, ps, gw, ps)
        return torch.where(mask.reshape(b, 1, gh * ps, gw * ps) > 0, frame, ref)


def _put(cache: Tensor, idx: Tensor, valid: Tensor, new: Tensor) -> Tensor:
    """cache [B,N,C] with the valid rows of ``new`` [B,M,C] written at ``idx``."""
    gi = idx[..., None].expand(-1, -1, cache.shape[-1])
    return cache.scatter(1, gi, torch.where(valid[..., None], new, cache.gather(1, gi)))


def default_budget(num_patches: int, max_changed_share: float) -> int:
    """Patch-token budget that exactly covers every frame the share bound does not refresh."""
    return max(1, min(num_patches, math.floor(max_changed_share * num_patches + 1e-9)))


class StreamingEncoder(nn.Module):
    """Stateful streaming encoder: ``forward(frames [B,C,H,W]) -> StepOutput``, one call
    per frame of B parallel streams.

    ``mean``/``std``: the model's input normalisation, applied inside the encoder, so
    frames come in as [0, 1] pixels (None: frames are already model-ready).
    ``threshold``: change at or above which a patch token is recomputed (pixel mode:
    mean absolute difference on the frames' scale, [0, 1] pixels with ``mean``/``std``;
    feature mode: ``1 - cos``);
    0 computes every token. ``refresh_every``: full frame every K frames (0: only the
    first). ``max_changed_share``: a stream whose changed share of patch tokens exceeds
    it is computed in full. ``budget``: None computes exactly the changed tokens
    (dynamic count); an int (patch tokens) gives the static form the exported step has:
    at most ``budget`` top-changed patch tokens, always ``budget + prefix`` slots.
    """

    def __init__(self, model: nn.Module, threshold: float = 0.03, mode: str = "pixel", compare: str = "reference",
                 refresh_every: int = 0, max_changed_share: float = 0.5, budget: Optional[int] = None,
                 mean=None, std=None):
        super().__init__()
        self.core = StreamCore(model, threshold, mode, compare, mean, std)
        if refresh_every < 0:
            raise ScheduleError(f"refresh_every={refresh_every} must be >= 0 (0: refresh only on the first frame)")
        if not 0.0 <= max_changed_share <= 1.0:
            raise ScheduleError(f"max_changed_share={max_changed_share} must be in [0, 1]")
        n = self.core.num_patches
        if budget is not None and not 1 <= budget <= n:
            raise ScheduleError(f"budget={budget} must be between 1 and the {n} patch tokens")
        self.refresh_every, self.max_changed_share, self.budget = refresh_every, max_changed_share, budget
        self.reset()

    def reset(self) -> None:
        self.state: Optional[StreamState] = None
        self.frame_index = 0
        self.refreshed: Optional[Tensor] = None  # [B] bool, streams refreshed on the last frame

    @property
    def info(self):
        return self.core.info

    def refresh_due(self) -> bool:
        """Whether the policy asks for a full frame of every stream now (first or periodic)."""
        k = self.refresh_every
        return self.state is None or (k > 0 and self.frame_index % k == 0)

    @torch.no_grad()
    def forward(self, frames: Tensor) -> StepOutput:
        core = self.core
        x = core.embed(frames)
        if self.state is not None and self.state.tokens.shape[0] != frames.shape[0]:
            raise EdgetokError(f"batch changed from {self.state.tokens.shape[0]} to {frames.shape[0]} streams; reset()")
        state = self.state if self.state is not None else core.initial_state(frames)
        change = core.change(frames, x, state.ref)
        over = (change >= core.threshold).sum(1) > self.max_changed_share * core.num_patches
        refresh = over | self.refresh_due()
        p = core.info.num_prefix
        if self.budget is not None:
            keep = core.info.tokens if bool(refresh.any()) else self.budget + p
        else:  # exactly the changed tokens: the batch's largest count
            counts = torch.where(refresh, core.num_patches, (change >= core.threshold).sum(1))
            keep = int(counts.max()) + p
        if bool(refresh.all()):
            out, self.state = core.refresh(frames, x, change)
        else:
            out, self.state = core(frames, x, change, refresh, state, keep, inplace=True)  # the caches are ours
        self.refreshed = refresh
        self.frame_index += 1
        return out


def stream_normalization(model: nn.Module) -> dict:
    """{"mean": ..., "std": ...} the model expects (timm / Hugging Face / torchvision
    configs), or {} when unknown: keyword arguments for StreamingEncoder and encode_full."""
    from .data_config import data_config

    pre = data_config(model, None, _adapter(model).info(model).image_size)
    return {"mean": pre["mean"], "std": pre["std"]} if pre and pre.get("mean") and pre.get("std") else {}


def encode_full(model: nn.Module, frames: Tensor, mean=None, std=None) -> Tensor:
    """Every token of every frame through every block: the reference the stream is compared with
    (``mean``/``std`` as in StreamingEncoder)."""
    from .base import run_blocks

    adapter = _adapter(model)
    frames = Normalize(mean, std, frames.shape[1]).to(frames.device)(frames)
    with torch.no_grad():
        return run_blocks(adapter, model, adapter.embed(model, frames))[0]
