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

Two kinds of session work: an encoder whose output is tokens (the drop then
runs here, in torch), or an exported DTD step (``edgetok export --method dtd``,
edgetok/export/dtd.py), whose graph does the drop itself and takes the previous
frame's tokens as a second input; its manifest's ``stream`` entry names that
input and the outputs, and its threshold is the one in the graph. The step
runs on the ONNX Runtime backends.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..errors import EdgetokError
from ..patch.stream import StepOutput
from .backends import ort_session
from .session import Session

# the exported streaming encoder's graphs (edgetok/export/stream.py): inputs, outputs, and
# which output feeds which state input on the next frame
INPUTS = ["frame", "ref", "k_cache", "v_cache", "token_cache", "refresh"]
OUTPUTS = ["tokens", "changed_tokens", "idx", "valid", "changed", "ref_out", "k_cache_out", "v_cache_out"]
STATE = {"ref": "ref_out", "k_cache": "k_cache_out", "v_cache": "v_cache_out", "token_cache": "tokens"}


@dataclass
class FrameTokens:
    index: int
    tokens: np.ndarray  # [kept, C] tokens of this frame that changed
    positions: np.ndarray  # [kept] token positions (int64)
    kept: int
    total: int


class StreamSession:
    def __init__(self, session: Session, threshold: Optional[float] = None, protect_first: Optional[int] = None,
                 token_output: Optional[str] = None):
        self.session = session
        self.dtd_step = _dtd_step(session, threshold, protect_first)
        if self.dtd_step:
            threshold, protect_first = self.dtd_step["threshold"], self.dtd_step["protect_first"]
            token_output = token_output or self.dtd_step["state_output"]
        self.threshold = 0.1 if threshold is None else float(threshold)
        self.protect_first = 1 if protect_first is None else int(protect_first)
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
        out = self._run_step(frame) if self.dtd_step else self.session.run(frame)
        tokens = out[self.token_output]
        if tokens.ndim != 3 or tokens.shape[0] != 1:
            raise EdgetokError(
                f"output {self.token_output!r} has shape {list(tokens.shape)}; StreamSession needs tokens [1, N, C] "
                "(export the encoder's token output, e.g. forward_features) and one frame at a time"
            )
        if self.prev is not None and self.prev.shape != tokens.shape:
            raise EdgetokError(f"frame tokens changed shape {list(self.prev.shape)} -> {list(tokens.shape)}; reset()")
        n = tokens.shape[1]
        if self.dtd_step:  # the graph dropped (on the first frame against zeros, which keeps all)
            c = int(out[self.dtd_step["count"]][0])
            kept_x, idx = out[self.dtd_step["tokens"]][0, :c], out[self.dtd_step["idx"]][0, :c]
        elif self.prev is None:
            kept_x, idx = tokens[0], np.arange(n, dtype=np.int64)
        else:
            import torch

            from ..reduce.dtd import diff_drop

            x, i, count = diff_drop(torch.from_numpy(tokens), torch.from_numpy(self.prev), self.threshold,
                                    self.protect_first)
            c = int(count[0])
            kept_x, idx = x[0, :c].numpy(), i[0, :c].numpy()
        self.prev = tokens
        self.kept_per_frame.append(len(idx))
        return FrameTokens(len(self.kept_per_frame) - 1, kept_x, idx, len(idx), n)

    def _run_step(self, frame) -> dict:
        x = self.session.prepare(frame)
        state = self.dtd_step["state_input"]
        prev = self.prev if self.prev is not None else np.zeros((x.shape[0], *state["shape"][1:]), np.float32)
        return self.session.runner.infer(x, **{state["name"]: prev})

    def run(self, frames: Iterable) -> Iterator[FrameTokens]:
        for frame in frames:
            yield self.step(frame)


def _dtd_step(session, threshold, protect_first) -> Optional[dict]:
    """The manifest's ``stream`` entry when ``session`` runs an exported DTD step, else None."""
    manifest = getattr(session, "manifest", None)
    step = manifest.stream if manifest is not None else None
    if not step:
        return None
    if step.get("kind") != "dtd":
        raise EdgetokError(f"this export is a {step.get('kind')!r} streaming step; StreamSession runs DTD steps")
    for name, given in (("threshold", threshold), ("protect_first", protect_first)):
        if given is not None and float(given) != float(step[name]):
            raise EdgetokError(f"this export drops with {name}={step[name]} inside its graph, not {given}; "
                               f"leave {name} unset or re-export with the value you want")
    return step


class OrtStreamingEncoder:
    """Runs an exported streaming step in ONNX Runtime with the torch encoder's policy.
    ``step(frame [B,C,H,W] numpy) -> StepOutput`` (numpy arrays in torch tensors' places)."""

    def __init__(self, path, providers: Optional[list] = None, threads: Optional[int] = None,
                 interleaved: bool = True):
        root = Path(path)
        mf = root / "stream.json"
        if not mf.is_file():
            raise EdgetokError(f"{root} has no stream.json; write it with edgetok.export.stream.export_stream")
        self.manifest = json.loads(mf.read_text())
        # the delta and full graphs take turns (every refresh), so by default their idle threads do not spin
        prov = providers or ["CPUExecutionProvider"]
        g = self.manifest["graphs"]
        missing = [n for n in ("change", "delta", "full") if n not in g]
        if missing:
            raise EdgetokError(f"{root} is a stream export of an older edgetok (no {', '.join(missing)} graph); "
                               "re-export it with edgetok.export.stream.export_stream")
        self.sessions = {n: ort_session(root / f, prov, threads, interleaved) for n, f in g.items()}
        self.reset()

    def reset(self) -> None:
        self.state: Optional[dict] = None
        self.frame_index = 0
        self.refreshed: Optional[np.ndarray] = None

    def _run(self, graph: str, frame, refresh) -> dict:
        sess = self.sessions[graph]
        feeds = {"frame": frame, "refresh": refresh, **self.state}
        return dict(zip(OUTPUTS, sess.run(OUTPUTS, {i.name: feeds[i.name] for i in sess.get_inputs()})))

    def step(self, frame) -> StepOutput:
        m = self.manifest
        frame = np.ascontiguousarray(frame, dtype=np.float32)
        if list(frame.shape) != m["input_shape"]:
            raise EdgetokError(f"frame shape {list(frame.shape)} != exported {m['input_shape']}; resize or re-export")
        b = frame.shape[0]
        k = m["refresh_every"]
        if self.state is None:
            self.state = {n: np.zeros(s, np.float32) for n, s in m["state_shapes"].items()}
            refresh = np.ones(b, bool)
        elif k > 0 and self.frame_index % k == 0:
            refresh = np.ones(b, bool)
        else:  # the share bound refreshes the streams over it
            changed = self.sessions["change"].run(None, {"frame": frame, "ref": self.state["ref"]})[0]
            refresh = changed > m["max_changed_share"] * m["num_patches"]
        graph = "full" if refresh.all() else "mixed" if refresh.any() else "delta"
        out = self._run(graph, frame, refresh)
        self.state = {n: out[o] for n, o in STATE.items()}
        self.refreshed = refresh
        self.frame_index += 1
        return StepOutput(*(out[n] for n in OUTPUTS[:5]))


class EncoderSession:
    """The exported stream as a Session-like token source for edgetok.runtime.StreamSession:
    ``output_names == ["tokens"]`` and ``run(frame) -> {"tokens": [1,N,C]}`` (the full map,
    unchanged tokens from the cache), so StreamSession's DTD then hands on only the tokens
    that changed while the encoder skips computing the unchanged ones."""

    output_names = ["tokens"]

    def __init__(self, stream: OrtStreamingEncoder):
        self.stream = stream

    def run(self, frame) -> dict:
        x = frame.detach().cpu().numpy() if hasattr(frame, "detach") else np.asarray(frame)
        if x.ndim == 3:
            x = x[None]
        return {"tokens": self.stream.step(x).tokens}

    def reset(self) -> None:
        self.stream.reset()
