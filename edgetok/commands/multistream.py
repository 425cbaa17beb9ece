"""``edgetok stream VIDEO VIDEO ...``: several videos advanced together through one packed
step (edgetok.patch.multistream), each frame's batch against full encoding of the same
frames as one batch; per stream: tokens computed, refreshes, drift (and the drift bound,
``--min-cos``)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click


def run_streams(paths: list, model, model_name: str, norm: dict, o: dict) -> None:
    """``o``: the stream command's options (threshold, mode, compare, refresh_every, max_share,
    budget, backend, min_cos, audit_every, max_frames, stride, threads, json_out, quiet)."""
    import torch

    from edgetok.patch.multistream import DriftBound, MultiStreamEncoder
    from edgetok.validate import multistream as ms

    min_cos = o["min_cos"] = 0.95 if o["min_cos"] is None else o["min_cos"]
    drift = DriftBound(min_cos=min_cos, audit_every=o["audit_every"]) if min_cos > 0 else None
    if drift is not None and o["compare"] != "reference":
        raise click.UsageError("the drift bound (--min-cos) needs --compare reference; or give --min-cos 0")
    enc = MultiStreamEncoder(model, len(paths), o["threshold"], o["mode"], o["compare"], o["refresh_every"],
                             o["max_share"], o["budget"], drift, **norm)
    info = enc.info
    step_fn, full_fn, session = _encoders(o["backend"], enc, model, norm, len(paths), o["threads"])
    names = [p.name for p in paths]

    def show(r):
        if not o["quiet"]:
            cells = "  ".join(f"{c:4d}{'R' if f else ' '} {cos:.3f}" for c, f, cos in
                              zip(r.counts, r.refreshed, r.pooled_cos))
            click.echo(f"frame {r.index:4d}  step {r.stream_ms:8.2f} ms  full {r.full_ms:8.2f} ms  {cells}")

    with torch.inference_mode():
        recs = ms.compare_streams(ms.stream_frames(paths, info.image_size, o["max_frames"], o["stride"]), step_fn,
                                  full_fn, info.num_prefix, show)
    if not recs:
        raise click.ClickException("the videos have no decodable frames in common")
    s = ms.summarize_streams(recs, info.tokens, names)
    click.echo(f"{len(paths)} streams, {model_name} {info.image_size[0]}x{info.image_size[1]}, {o['backend']}: "
               f"{s['steps']} frames each, computed {s['computed_share']:.1%} of tokens; per stream "
               f"{s['stream_ms_per_stream']:.2f} ms vs {s['full_ms_per_stream']:.2f} ms full "
               f"({s['speedup']:.2f}x){f', drift bound {min_cos}' if drift else ''}")
    for p in s["per_stream"]:
        click.echo(f"  {p['stream']}: computed {p['computed_share']:.1%}, {p['refreshes']} refreshes, pooled cosine "
                   f"mean {p['pooled_cos_mean']:.4f}, worst {p['pooled_cos_worst']:.4f} (frame {p['worst_frame']})")
    if o["json_out"]:
        _write_json(o, paths, model_name, info, s, recs, session.policy)


def _encoders(backend: str, enc, model, norm: dict, streams: int, threads):
    """(packed step, full batch encoder) as functions of the frames [N,C,H,W], and the session
    whose policy decides (the torch encoder, or the ORT runner)."""
    from edgetok.validate import multistream as ms
    from edgetok.validate import stream as rp

    if backend == "torch":
        return ms.torch_multistream(enc), rp.torch_full(model, **norm), enc
    from edgetok.export.multistream import export_full_batch, export_multistream
    from edgetok.runtime.multistream import OrtMultiStreamEncoder

    tmp = tempfile.mkdtemp(prefix="edgetok-multistream-")
    click.echo(f"exporting the packed step and the full encoder to {tmp}", err=True)
    runner = OrtMultiStreamEncoder(export_multistream(enc, tmp), threads=threads)
    full = export_full_batch(model, Path(tmp) / "full.onnx", streams, mean=norm.get("mean"), std=norm.get("std"))
    return ms.ort_multistream(runner), rp.ort_full(full, threads=threads), runner


def _write_json(o: dict, paths, model_name, info, summary, recs, policy) -> None:
    from edgetok.runtime.artifacts import write_json
    from edgetok.validate import multistream as ms
    from edgetok.validate.timing import machine_facts

    settings = {k: o[k] for k in ("threshold", "mode", "compare", "refresh_every", "max_share", "budget", "min_cos",
                                  "audit_every", "stride", "backend")}
    doc = {"videos": [str(p) for p in paths], "model": model_name, "image_size": list(info.image_size),
           "settings": settings, "machine": machine_facts(), "summary": summary,
           "audits": [list(a) for a in policy.audits], "frames": ms.records_json(recs)}
    write_json(o["json_out"], doc, sort_keys=False)
