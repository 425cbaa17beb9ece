"""The packed many-stream step (edgetok.patch.multistream) in ONNX Runtime.

Three graphs written by edgetok.export.multistream.export_multistream: ``change``
(frame, ref -> accumulated change of every patch token per stream), ``step``
(the packed step: the token count T and the attention width are dynamic axes,
so every frame runs exactly the tokens it computes) and ``refresh`` (the
streams that refresh this frame, a dynamic batch, through the plain blocks).
Between them the runner
applies the torch encoder's StreamPolicy to the change map, so both pick the same
tokens, refresh the same streams and audit the same drift.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import EdgetokError
from ..patch.multistream import DriftBound, MultiStepOutput, StreamPolicy, pack
from .backends import ort_session

STEP_INPUTS = ["frame", "ref", "k_cache", "v_cache", "token_cache", "stream", "pos", "slot", "pad"]
STEP_OUTPUTS = ["tokens", "computed", "ref_out", "k_cache_out", "v_cache_out"]
STEP_STATE = {"ref": "ref_out", "k_cache": "k_cache_out", "v_cache": "v_cache_out", "token_cache": "tokens"}
CHANGE_INPUTS, CHANGE_OUTPUTS = ["frame", "ref"], ["change"]
REFRESH_OUTPUTS = ["tokens", "ref_out", "k_cache_out", "v_cache_out"]  # the refreshed streams' rows
KIND = "edgetok-multistream"


class OrtMultiStreamEncoder:
    """``step(frames [N,C,H,W] numpy) -> MultiStepOutput`` (torch tensors from the ORT outputs),
    the same tokens as the torch MultiStreamEncoder the graphs were exported from."""

    def __init__(self, path, providers: Optional[list] = None, threads: Optional[int] = None,
                 interleaved: bool = True):
        root = Path(path)
        mf = root / "multistream.json"
        if not mf.is_file():
            raise EdgetokError(f"{root} has no multistream.json; write it with "
                               "edgetok.export.multistream.export_multistream")
        self.manifest = m = json.loads(mf.read_text())
        if m.get("kind") != KIND:
            raise EdgetokError(f"{mf} is not a many-stream export (kind {m.get('kind')!r}); re-export it")
        prov = providers or ["CPUExecutionProvider"]
        self.sessions = {n: ort_session(root / f, prov, threads, interleaved) for n, f in m["graphs"].items()}
        self.reset()

    def reset(self) -> None:
        m = self.manifest
        p = m["policy"]
        drift = DriftBound(**p["drift"]) if p["drift"] else None
        self.policy = StreamPolicy(m["streams"], m["num_patches"], m["num_prefix"], p["threshold"],
                                   p["refresh_every"], p["max_changed_share"], p["budget"], drift, p["phases"])
        self.state = {n: np.zeros(s, np.float32) for n, s in m["state_shapes"].items()}

    def step(self, frames) -> MultiStepOutput:
        m = self.manifest
        frame = np.ascontiguousarray(frames, dtype=np.float32)
        if list(frame.shape) != m["input_shape"]:
            raise EdgetokError(f"frames of shape {list(frame.shape)}, the export takes {m['input_shape']} "
                               "(one frame per stream); resize, or re-export for this many streams")
        change = self.sessions["change"].run(CHANGE_OUTPUTS, {"frame": frame, "ref": self.state["ref"]})[0]
        plan = self.policy.plan(torch.from_numpy(change))
        before = torch.from_numpy(self.state["token_cache"]) if bool(plan.audit.any()) else None
        refresh = plan.refresh.numpy()
        if refresh.all():
            self.state = self._refresh(frame)
        else:  # the others' tokens packed; then the refreshed streams' rows through the plain blocks
            k = pack(plan.select & ~plan.refresh[:, None])
            feeds = {"frame": frame, **self.state, "stream": k.stream.numpy(), "pos": k.pos.numpy(),
                     "slot": k.slot.numpy(), "pad": np.zeros(k.width, np.float32)}
            out = dict(zip(STEP_OUTPUTS, self.sessions["step"].run(STEP_OUTPUTS, feeds)))
            self.state = {n: out[o] for n, o in STEP_STATE.items()}
            if refresh.any():
                self._put_rows(np.flatnonzero(refresh), self._refresh(frame[refresh]))
        tokens = torch.from_numpy(self.state["token_cache"])
        self.policy.observe(plan, before, tokens)
        stream, pos = plan.select.nonzero(as_tuple=True)
        return MultiStepOutput(tokens, tokens[stream, pos], stream, pos, plan.select.sum(1), plan.changed,
                               plan.refresh)

    def _refresh(self, frames: np.ndarray) -> dict:
        out = self.sessions["refresh"].run(REFRESH_OUTPUTS, {"frame": np.ascontiguousarray(frames)})
        return dict(zip(("token_cache", "ref", "k_cache", "v_cache"), out))

    def _put_rows(self, rows: np.ndarray, fresh: dict) -> None:
        self.state["k_cache"][:, rows] = fresh["k_cache"]
        self.state["v_cache"][:, rows] = fresh["v_cache"]
        self.state["token_cache"][rows] = fresh["token_cache"]
        if self.manifest["compare"] == "reference":
            self.state["ref"][rows] = fresh["ref"]
