"""StreamSession: a frame stream through a token-producing model with
differential token drop (DTD, TimeChat-Online, arXiv:2504.17343; the rule is
edgetok.reduce.dtd.diff_drop).

Each frame runs through the session (an encoder whose output is tokens
[B,N,C]); tokens whose change ``1 - cos`` against the previous frame's tokens
is below ``threshold`` are dropped, the first frame keeps all. The session keeps
the previous frame's tokens (all of them, as in the paper: comparison is with
the previous frame, not with the last kept token) and reports tokens kept per
frame. As in the paper the encoder still runs on every frame; the saving is in
what follows it (the tokens handed on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np

from ..errors import EdgetokError
from .session import Session


@dataclass
class FrameTokens:
    index: int
    tokens: np.ndarray  # [kept, C] tokens of this frame that changed
    positions: np.ndarray  # [kept] token positions (int64)
    kept: int
    total: int


class StreamSession:
    def __init__(self, session: Session, threshold: float = 0.1, protect_first: int = 1,
                 token_output: Optional[str] = None):
        self.session, self.threshold, self.protect_first = session, float(threshold), int(protect_first)
        self.token_output = token_output or session.output_names[0]
        if self.token_output not in session.output_names:
            raise EdgetokError(f"no output {self.token_output!r}; outputs: {', '.join(session.output_names)}")
        self.prev: Optional[np.ndarray] = None
        self.kept_per_frame: list[int] = []

    def reset(self) -> None:
        """Forget the previous frame (and the session's own caches, for a streaming encoder)."""
        self.prev, self.kept_per_frame = None, []
        if callable(getattr(self.session, "reset", None)):
            self.session.reset()

    def step(self, frame) -> FrameTokens:
        """One frame (an image, or a batch of 1) -> the tokens that changed since the previous frame."""
        import torch

        from ..reduce.dtd import diff_drop

        tokens = self.session.run(frame)[self.token_output]
        if tokens.ndim != 3 or tokens.shape[0] != 1:
            raise EdgetokError(
                f"output {self.token_output!r} has shape {list(tokens.shape)}; StreamSession needs tokens [1, N, C] "
                "(export the encoder's token output, e.g. forward_features) and one frame at a time"
            )
        if self.prev is not None and self.prev.shape != tokens.shape:
            raise EdgetokError(f"frame tokens changed shape {list(self.prev.shape)} -> {list(tokens.shape)}; reset()")
        n = tokens.shape[1]
        if self.prev is None:
            kept_x, idx = tokens[0], np.arange(n, dtype=np.int64)
        else:
            x, i, count = diff_drop(torch.from_numpy(tokens), torch.from_numpy(self.prev), self.threshold,
                                    self.protect_first)
            c = int(count[0])
            kept_x, idx = x[0, :c].numpy(), i[0, :c].numpy()
        self.prev = tokens
        self.kept_per_frame.append(len(idx))
        return FrameTokens(len(self.kept_per_frame) - 1, kept_x, idx, len(idx), n)

    def run(self, frames: Iterable) -> Iterator[FrameTokens]:
        for frame in frames:
            yield self.step(frame)
