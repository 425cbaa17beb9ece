"""Many streams, one step: N video streams advanced together, all their changed
tokens packed into one sequence for the blocks' linear layers, and a bound on
drift that refreshes the tokens whose cached state drifted.

Packing (what ``MultiStreamEncoder`` adds to edgetok.patch.stream's
StreamingEncoder, whose batch of streams pads every stream to the batch's
largest count and runs every token of every stream when one stream refreshes):
each stream's tokens to compute (its changed ones plus the class/register
tokens) are concatenated into one sequence [1, T, C] (T = the sum of the
streams' counts; a stream that refreshes runs instead, with the others that
refresh, through the plain blocks, so its 100 % of tokens do not widen the
other streams' attention layout), so the QKV, projection
and MLP matmuls of every block read the weights once for all streams and run
exactly T rows. Attention stays per stream: the queries are scattered into a
[N, width, ...] layout (width = the largest count; padding rows are discarded)
and attend over their own stream's K/V cache, in which the fresh keys/values
of the packed tokens have been written first. Per stream: its own refresh
(first frame, every ``refresh_every`` frames, its changed share over
``max_changed_share``, a drift audit), its own caches (rows of one batched
cache) and its own reference. A stream's result is the same as what
StreamingEncoder gives that stream alone (same tokens computed; outputs equal to
float rounding), which tests/test_multistream.py checks.

Bound on drift (``DriftBound``), after the per-token error accumulators of
Dutson, Li and Gupta, "Eventful Transformers", ICCV 2023: each patch token's
accumulated change since it was last computed is its change against its
reference (``compare="reference"``); the threshold rule leaves every token
under the threshold stale, however many there are. The drift rule adds, per
stream, a budget ``E`` on the stale error left behind, the mean over patches of
the accumulated change of the tokens not computed: when a frame would leave
more, the most-drifted tokens are computed too, largest first, until the rest is
within ``E``. ``E`` is set from measurement: every ``audit_every`` frames a
stream is refreshed (staggered over the streams) and, before its cache is
replaced, the drift it had is measured: the cosine of the pooled patch feature
between the fresh full encoding and what the step would have returned (its
cached tokens, the ones the rule computes taken from the full encoding). The
pooled loss ``1 - cos`` grows with the square of a small error, so the audit
fits ``1 - cos = a * E_audit**2`` (``a``: the largest measurement, decaying by
``decay`` per audit) and the budget is ``E = sqrt(safety * (1 - min_cos) / a)``;
until the first audit ``E = start * threshold``. The departure from
Eventful Transformers: one gate at the input (not before every layer) and a
stream-level budget on the accumulated error instead of a per-token threshold
alone; the audit keeps the budget tied to the measured pooled cosine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import EdgetokError, ScheduleError
from .stream import StreamCore, StreamState


@dataclass
class Packing:
    """Which tokens of which stream run this step, flattened stream-major (ascending positions)."""

    stream: Tensor  # [T] int64 stream of each packed token
    pos: Tensor  # [T] int64 its token position
    slot: Tensor  # [T] int64 stream * width + rank: its row in the per-stream attention layout
    counts: Tensor  # [B] int64 tokens per stream
    width: int  # the largest count


def pack(select: Tensor) -> Packing:
    """``select`` [B, N] bool (tokens to compute per stream) -> the packed layout."""
    stream, pos = select.nonzero(as_tuple=True)
    counts = select.sum(1)
    width = max(int(counts.max()), 1)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(stream.numel(), device=select.device) - start[stream]
    return Packing(stream, pos, stream * width + rank, counts, width)


def flat_index(stream: Tensor, pos: Tensor, tokens: int) -> Tensor:
    return stream * tokens + pos


@dataclass
class MultiStepOutput:
    tokens: Tensor  # [B,N,C] full token map of every stream (after the last block, before the final norm)
    computed_tokens: Tensor  # [T,C] the computed tokens, packed stream-major
    stream: Tensor  # [T] int64 their stream
    idx: Tensor  # [T] int64 their positions
    counts: Tensor  # [B] tokens computed per stream (prefix included)
    changed: Tensor  # [B] patch tokens over the threshold
    refreshed: Tensor  # [B] bool

    def of(self, b: int) -> tuple[Tensor, Tensor]:
        """Stream ``b``'s computed tokens [M,C] and their positions [M]."""
        m = self.stream == b
        return self.computed_tokens[m], self.idx[m]


class PackedCore(nn.Module):
    """The packed step on top of StreamCore: ``forward(frame, x, state, stream, pos, slot, pad)``
    with ``pad`` a tensor whose length is the attention width (its values are not read), so
    the step exports with the token count and width as dynamic axes."""

    def __init__(self, core: StreamCore):
        super().__init__()
        self.core = core

    def forward(self, frame, x, state: StreamState, stream, pos, slot, pad, inplace: bool = False):
        """Returns (full token map [B,N,C], computed tokens [T,C], new StreamState)."""
        core = self.core
        b, n, c = x.shape
        flat = flat_index(stream, pos, n)
        h, ks, vs = x.reshape(b * n, c).index_select(0, flat)[None], [], []
        for layer, block in enumerate(core.adapter.blocks(core.model)):
            h, k_all, v_all = self._block(block, h, state.k[layer], state.v[layer], stream, pos, slot,
                                          pad.shape[0], inplace)
            ks.append(k_all)
            vs.append(v_all)
        rows = h[0]  # a new token map (not written in place: callers keep the maps they were given)
        tokens = state.tokens.reshape(b * n, c).index_copy(0, flat, rows).view(b, n, c)
        ref = self._ref(frame, x, state.ref, flat)
        if inplace:
            return tokens, rows, StreamState(ref, state.k, state.v, tokens)
        return tokens, rows, StreamState(ref, torch.stack(ks), torch.stack(vs), tokens)

    def _block(self, block, h, kc, vc, stream, pos, slot, width: int, inplace: bool):
        """One block on the packed tokens: fresh K/V written into each stream's cache, the
        queries attend per stream over it."""
        ad = self.core.adapter
        b, heads, n, d = kc.shape
        q, k, v = ad.qkv(block, h)  # [1, H, T, D]
        rows = ((stream[:, None] * heads + torch.arange(heads, device=h.device)) * n + pos[:, None]).reshape(-1)
        k_rows, v_rows = k[0].transpose(0, 1).reshape(-1, d), v[0].transpose(0, 1).reshape(-1, d)
        if inplace:
            k_all = kc.view(-1, d).index_copy_(0, rows, k_rows).view(b, heads, n, d)
            v_all = vc.view(-1, d).index_copy_(0, rows, v_rows).view(b, heads, n, d)
        else:
            k_all = kc.reshape(-1, d).index_copy(0, rows, k_rows).view(b, heads, n, d)
            v_all = vc.reshape(-1, d).index_copy(0, rows, v_rows).view(b, heads, n, d)
        q_rows = q[0].transpose(0, 1)  # [T, H, D]
        q_pad = q_rows.new_zeros(b * width, heads, d).index_copy(0, slot, q_rows)
        q_pad = q_pad.view(b, width, heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q_pad, k_all, v_all, scale=ad.scale(block))
        o = o.transpose(1, 2).reshape(b * width, heads * d).index_select(0, slot)[None]
        h = h + ad.attn_delta(block, o)
        return h + ad.mlp_delta(block, h), k_all, v_all

    def _ref(self, frame, x, ref, flat):
        """The new reference: the computed tokens' pixels / features (or the whole frame for
        ``compare="previous"``)."""
        core = self.core
        if core.compare == "previous":
            return frame if core.mode == "pixel" else x
        b, n, c = x.shape
        if core.mode == "feature":
            return ref.reshape(b * n, c).index_copy(0, flat, x.reshape(b * n, c).index_select(0, flat)).view(b, n, c)
        i = core.info
        gh, gw = i.grid
        ps = i.patch_size
        hit = torch.zeros(b * n, dtype=frame.dtype, device=frame.device).index_fill(0, flat, 1.0).view(b, n)
        mask = hit[:, i.num_prefix:].reshape(b, 1, gh, 1, gw, 1).expand(b, 1, gh, ps, gw, ps)
        return torch.where(mask.reshape(b, 1, gh * ps, gw * ps) > 0, frame, ref)


@dataclass
class DriftBound:
    """Refresh tokens whose cached state drifted, so the pooled feature stays above
    ``min_cos`` against full encoding (see the module docstring). ``audit_every``: frames
    between a stream's measured refreshes; ``start``: stale-error budget before the first
    audit, as a share of the threshold; ``safety``: share of the allowed loss ``1 - min_cos``
    the budget aims at; ``decay``: how fast the measured sensitivity is forgotten per audit."""

    min_cos: float = 0.95
    audit_every: int = 16
    start: float = 0.25
    safety: float = 0.25
    decay: float = 0.7

    def __post_init__(self):
        if not 0.0 < self.min_cos < 1.0:
            raise ScheduleError(f"min_cos={self.min_cos} must be in (0, 1), e.g. 0.95")
        if self.audit_every < 2:
            raise ScheduleError(f"audit_every={self.audit_every} must be >= 2 frames")
        for name in ("start", "safety", "decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ScheduleError(f"DriftBound {name}={getattr(self, name)} must be in (0, 1]")


WARMUP_AUDITS = (1, 2, 4, 8)


@dataclass
class Plan:
    """One step's decisions: tokens to compute per stream and which streams refresh."""

    select: Tensor  # [B, N] bool, prefix included
    refresh: Tensor  # [B] bool
    changed: Tensor  # [B] int64 patch tokens over the threshold
    audit: Tensor  # [B] bool: refreshed to measure drift (the rule's own selection in ``would``)
    would: Tensor  # [B, N] bool: what the rule alone selects (for the audit's measurement)
    stale: Tensor  # [B] the rule's stale error left behind (mean accumulated change of the rest)


@dataclass
class StreamPolicy:
    """The per-stream decisions, shared by the torch MultiStreamEncoder and the ONNX Runtime
    runner (edgetok.runtime.multistream), so both compute the same tokens."""

    streams: int
    num_patches: int
    num_prefix: int
    threshold: float
    refresh_every: int = 0
    max_changed_share: float = 0.5
    budget: Optional[int] = None
    drift: Optional[DriftBound] = None
    phases: Optional[list] = None  # per stream: audit frame offset (default: staggered)
    frame_index: int = 0
    sensitivity: list = field(default_factory=list)  # per stream: a in 1 - cos = a * stale**2, measured
    audits: list = field(default_factory=list)  # (frame, stream, measured cos, stale error)

    def __post_init__(self):
        _check_policy(self)
        self.sensitivity = [0.0] * self.streams
        if self.drift is not None:
            a = self.drift.audit_every
            if self.phases is None:
                self.phases = [b * a // self.streams for b in range(self.streams)]
            last = WARMUP_AUDITS[-1]  # then from each stream's phase, every audit_every frames
            self.next_audit = [last + 1 + (p - last - 1) % a for p in self.phases]
            self.interval = [a] * self.streams
        self.last_refresh = [0] * self.streams

    def stale_budget(self, b: int) -> float:
        """Stale error stream ``b`` may leave behind (the threshold rule alone: no budget)."""
        d = self.drift
        if d is None:
            return float("inf")
        if self.sensitivity[b] <= 0:
            return d.start * self.threshold
        return math.sqrt(d.safety * (1.0 - d.min_cos) / self.sensitivity[b])

    def plan(self, change: Tensor) -> Plan:
        """``change`` [B, patches] (accumulated change of each patch token) -> Plan."""
        b, p = change.shape
        if b != self.streams:
            raise EdgetokError(f"got {b} frames for a session of {self.streams} streams; give one frame per stream")
        over = change >= self.threshold
        changed = over.sum(1)
        k = self.refresh_every
        due = self.frame_index == 0 or (k > 0 and self.frame_index % k == 0)
        refresh = (changed > self.max_changed_share * p) | due
        pick = torch.stack([self._pick(change[i], over[i], i) for i in range(b)])
        audit = torch.zeros(b, dtype=torch.bool)
        if self.drift is not None:
            audit = torch.tensor([self._audit_due(i) for i in range(b)]) & ~refresh
        stale = (change * ~pick).sum(1) / p
        prefix = torch.ones(b, self.num_prefix, dtype=torch.bool)
        would = torch.cat([prefix, pick], 1)
        select = would | (refresh | audit)[:, None]
        return Plan(select, refresh | audit, changed, audit, would, stale)

    def _audit_due(self, b: int) -> bool:
        """Stream ``b`` is audited on frames 1, 2, 4 and 8 (the first measurements, before the
        stale-error budget is known), then from its phase every ``interval[b]`` frames."""
        return self.frame_index in WARMUP_AUDITS or self.frame_index == self.next_audit[b]

    def _pick(self, change: Tensor, over: Tensor, b: int) -> Tensor:
        """Stream ``b``'s patch tokens to compute: those over the threshold, then the most drifted
        until the stale error left is within the budget; at most ``budget`` (top change)."""
        pick = over.clone()
        limit = self.stale_budget(b) * change.numel()
        rest = torch.where(pick, 0.0, change)
        if float(rest.sum()) > limit:
            order = rest.argsort(descending=True, stable=True)
            left = rest.sum() - torch.cumsum(rest[order], 0)  # stale error after taking the first i+1
            take = int((left > limit).sum()) + 1
            pick[order[:take]] = True
        if self.budget is not None and int(pick.sum()) > self.budget:
            top = torch.where(pick, change, -1.0).argsort(descending=True, stable=True)[:self.budget]
            pick = torch.zeros_like(pick)
            pick[top] = True
        return pick

    def observe(self, plan: Plan, before: Optional[Tensor], after: Tensor) -> None:
        """After the step: measure the audited streams' drift (``before``/``after``: every
        stream's token map [B,N,C] before and after the step; None before when nothing is audited)."""
        self.frame_index += 1
        audited_before = list(self.last_refresh)
        for b in plan.refresh.nonzero().flatten().tolist():
            self.last_refresh[b] = self.frame_index - 1
        if self.drift is None:
            return
        if before is None:
            return self._advance()
        p, d = self.num_prefix, self.drift
        for b in plan.audit.nonzero().flatten().tolist():
            mix = torch.where(plan.would[b][:, None], after[b], before[b])
            cos = float(F.cosine_similarity(mix[p:].mean(0).double(), after[b, p:].mean(0).double(), dim=0))
            stale = float(plan.stale[b])
            measured = max(1.0 - cos, 0.0) / stale ** 2 if stale > 1e-9 else 0.0
            self.sensitivity[b] = max(d.decay * self.sensitivity[b], measured)
            self._reschedule(b, 1.0 - cos, audited_before[b])
            self.audits.append((self.frame_index - 1, b, cos, stale))
        self._advance()

    def _reschedule(self, b: int, loss: float, refreshed_at: int) -> None:
        """Interval to stream ``b``'s next audit: the drift grows about linearly from a refresh, the
        pooled loss with its square, so with ``loss`` measured ``k`` frames after the stream's last
        refresh the loss reaches ``safety * (1 - min_cos)`` ``k * sqrt(safety * (1 - min_cos) /
        loss)`` frames after a refresh: the next audit comes then (2 to ``audit_every`` frames on)."""
        d, f = self.drift, self.frame_index - 1
        room = d.safety * (1.0 - d.min_cos)
        k = max(f - refreshed_at, 1)
        self.interval[b] = d.audit_every if loss <= 0 else min(max(int(k * math.sqrt(room / loss)), 2), d.audit_every)
        if f == WARMUP_AUDITS[-1]:
            self.next_audit[b] = min(self.next_audit[b], f + self.interval[b])

    def _advance(self) -> None:
        """Streams whose audit frame has passed (audited, or refreshed for another reason) get the next."""
        f = self.frame_index - 1
        for b in range(self.streams):
            if self.next_audit[b] <= f:
                self.next_audit[b] = f + self.interval[b]


def _check_policy(pol: StreamPolicy) -> None:
    if pol.streams < 1:
        raise ScheduleError(f"streams={pol.streams} must be >= 1")
    if pol.refresh_every < 0:
        raise ScheduleError(f"refresh_every={pol.refresh_every} must be >= 0 (0: refresh only on the first frame)")
    if not 0.0 <= pol.max_changed_share <= 1.0:
        raise ScheduleError(f"max_changed_share={pol.max_changed_share} must be in [0, 1]")
    if pol.budget is not None and not 1 <= pol.budget <= pol.num_patches:
        raise ScheduleError(f"budget={pol.budget} must be between 1 and the {pol.num_patches} patch tokens")
    if pol.phases is not None and len(pol.phases) != pol.streams:
        raise ScheduleError(f"give one audit phase per stream ({pol.streams}), not {len(pol.phases)}")


class MultiStreamEncoder(nn.Module):
    """N streams, one packed step per frame: ``step(frames [N,C,H,W]) -> MultiStepOutput``
    (frame b belongs to stream b). Arguments as StreamingEncoder's (per stream), plus
    ``streams`` and ``drift`` (a DriftBound, or None for the threshold rule alone; it needs
    ``compare="reference"``)."""

    def __init__(self, model: nn.Module, streams: int, threshold: float = 0.03, mode: str = "pixel",
                 compare: str = "reference", refresh_every: int = 0, max_changed_share: float = 0.5,
                 budget: Optional[int] = None, drift: Optional[DriftBound] = None, mean=None, std=None,
                 phases: Optional[list] = None):
        super().__init__()
        self.core = StreamCore(model, threshold, mode, compare, mean, std)
        if drift is not None and compare != "reference":
            raise ScheduleError("the drift bound accumulates change since a token was last computed: "
                                "use compare='reference'")
        self.packed = PackedCore(self.core)
        self.settings = dict(streams=streams, num_patches=self.core.num_patches, num_prefix=self.info.num_prefix,
                             threshold=self.core.threshold, refresh_every=refresh_every,
                             max_changed_share=max_changed_share, budget=budget, drift=drift, phases=phases)
        self.reset()

    def reset(self) -> None:
        self.policy = StreamPolicy(**self.settings)
        self.state: Optional[StreamState] = None

    @property
    def info(self):
        return self.core.info

    @torch.no_grad()
    def forward(self, frames: Tensor) -> MultiStepOutput:
        core = self.core
        x = core.embed(frames)
        state = self.state if self.state is not None else core.initial_state(frames)
        change = core.change(frames, x, state.ref)
        plan = self.policy.plan(change)
        before = state.tokens if bool(plan.audit.any()) else None  # token maps are never written in place
        if bool(plan.refresh.all()):
            _, self.state = core.refresh(frames, x, change)
        else:  # the refreshed streams through the plain blocks, the others' tokens packed
            k = pack(plan.select & ~plan.refresh[:, None])
            pad = frames.new_empty(k.width)
            _, _, self.state = self.packed(frames, x, state, k.stream, k.pos, k.slot, pad, inplace=True)
            if bool(plan.refresh.any()):
                r = plan.refresh.nonzero().flatten()
                _, fresh = core.refresh(frames[r], x[r], change[r])
                put_rows(self.state, r, fresh, core.compare == "reference")
        tokens = self.state.tokens
        self.policy.observe(plan, before, tokens)
        stream, pos = plan.select.nonzero(as_tuple=True)
        return MultiStepOutput(tokens, tokens[stream, pos], stream, pos, plan.select.sum(1), plan.changed,
                               plan.refresh)


def put_rows(state: StreamState, rows: Tensor, fresh: StreamState, ref: bool = True) -> None:
    """Streams ``rows`` of ``state`` (caches [L,B,...], maps [B,...]) <- ``fresh`` (those streams
    refreshed), in place; ``ref=False`` leaves the reference (``compare="previous"``: already the frame)."""
    state.k[:, rows] = fresh.k
    state.v[:, rows] = fresh.v
    state.tokens[rows] = fresh.tokens
    if ref:
        state.ref[rows] = fresh.ref

