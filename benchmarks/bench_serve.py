"""Load test of `edgetok serve`: N concurrent clients x M requests against a real Triton
server (PyTriton) on loopback, for vit_tiny / vit_small, unreduced and ToMe-reduced.

Reports throughput, p50/p99 request latency, the batch sizes Triton formed
(counted in the model instances), and checks that every request got exactly its
own answer: none lost, none mixed up (each response is nearest to the reference
output of its own input, computed afterwards with a local Session, and within
1e-4 of it). Bounded in count (--requests per client) and time (--time-limit per
configuration). Writes JSON to benchmarks/results/serve.json and the figures to
docs/serving.md (between the bench_serve markers).

    .venv/bin/python benchmarks/bench_serve.py                       # the real run (quiet machine)
    .venv/bin/python benchmarks/bench_serve.py --smoke               # tiny models, a few requests
"""
from __future__ import annotations

import argparse
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
import timm
import torch

import edgetok
import edgetok.runtime as rt
from edgetok.export import export_model
from edgetok.runtime.artifacts import write_atomic, write_json
from edgetok.serve.server import ServeConfig, Server
from edgetok.validate.timing import Stopwatch, machine_facts, summary

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"vit_tiny_patch16_224": 8, "vit_small_patch16_224": 8}  # ToMe r per model
BEGIN, END = "<!-- bench_serve:begin -->", "<!-- bench_serve:end -->"


def free_port_block(n: int = 3) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block on loopback")


def make_export(name: str, r: int, smoke: bool, out: Path) -> Path:
    kw = dict(img_size=32, patch_size=8, depth=2) if smoke else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    if r:
        model = edgetok.apply(model, "tome", r=r)
    export_model(model, out, model_name=f"{name}{'_tome' if r else ''}", check_parity=False)
    return out


def load_test(path: Path, clients: int, requests: int, images: int, max_batch: int, instances: int,
              time_limit: float, log_file: Path) -> dict:
    import tritonclient.http as http

    cfg = ServeConfig(port=free_port_block(), max_batch=max_batch, instances=instances, log_file=str(log_file))
    server = Server(path, cfg)
    shape = server.input.with_batch(images)
    out_name = server.outputs[0].name
    results: dict = {}
    latencies: list = []
    errors: list = []
    with server:
        warm = http.InferenceServerClient(server.urls["http"])
        for _ in range(2):  # first requests pay connection and session set-up: not part of the figures
            inp = http.InferInput(server.input.name, list(shape), "FP32")
            inp.set_data_from_numpy(np.zeros(shape, np.float32))
            warm.infer(server.name, [inp])
        warm.close()
        server.batch_sizes.clear()  # count only the load
        load = Stopwatch()

        def client(k: int):
            c = http.InferenceServerClient(server.urls["http"], connection_timeout=60, network_timeout=60)
            for j in range(requests):
                if load.ms > time_limit * 1e3:
                    break
                x = np.random.default_rng(k * 100_003 + j).standard_normal(shape).astype(np.float32)
                inp = http.InferInput(server.input.name, list(shape), "FP32")
                inp.set_data_from_numpy(x)
                request = Stopwatch()
                try:
                    y = c.infer(server.name, [inp]).as_numpy(out_name)
                except Exception as e:  # counted as lost
                    errors.append(f"{k}/{j}: {e}")
                    continue
                latencies.append(request.ms)
                results[(k, j)] = y
            c.close()

        run = Stopwatch()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = run.ms / 1e3
        batches = dict(sorted(server.batch_sizes.items()))
    # every request got its own answer: reference outputs from a local Session, same inputs
    sess = rt.load(path, backend="ort-cpu", preprocess=False)
    keys = sorted(results)
    xs = [np.random.default_rng(k * 100_003 + j).standard_normal(shape).astype(np.float32) for k, j in keys]
    refs = [sess.run_prepared(x)[out_name] for x in xs]
    got = np.stack([results[k] for k in keys]) if keys else np.zeros((0,))
    ref = np.stack(refs) if refs else np.zeros((0,))
    max_err = float(np.abs(got - ref).max()) if keys else float("nan")
    flat_g, flat_r = got.reshape(len(keys), -1), ref.reshape(len(keys), -1)
    nearest = [int(np.argmin(np.abs(flat_r - g).max(axis=1))) for g in flat_g]
    mixed = sum(i != n for i, n in enumerate(nearest))
    sent = clients * requests
    lat = summary(latencies) if latencies else {}
    return {
        "clients": clients, "requests_per_client": requests, "images_per_request": images, "max_batch": max_batch,
        "instances": instances, "backend": server.sessions[0].backend, "sent_planned": sent,
        "answered": len(keys), "lost": len(errors), "not_sent_time_limit": sent - len(keys) - len(errors),
        "mixed_up": mixed, "max_abs_err": max_err, "wall_s": wall,
        "throughput_img_s": len(keys) * images / wall if wall else 0.0,
        "latency_ms": {k: lat[f"{k}_ms"] for k in ("p50", "p99", "mean") if f"{k}_ms" in lat},
        "batch_sizes": batches, "errors": errors[:5],
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [BEGIN, "", f"Measured by `benchmarks/bench_serve.py{' --smoke' if report['smoke'] else ''}` on "
             f"{m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}, Python {m.get('python')}; "
             f"loopback HTTP, {report['runs'][0]['clients'] if report['runs'] else '?'} concurrent clients.", "",
             "| model | clients x requests | backend | img/s | p50 ms | p99 ms | batches Triton formed (size: count) "
             "| answered / lost / mixed up | max abs err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lat = r["latency_ms"]
        batches = ", ".join(f"{b}: {n}" for b, n in r["batch_sizes"].items())
        lines.append(f"| {r['model']} | {r['clients']} x {r['requests_per_client']} | {r['backend']} "
                     f"| {r['throughput_img_s']:.1f} | {lat.get('p50', float('nan')):.1f} | "
                     f"{lat.get('p99', float('nan')):.1f} | {batches} | {r['answered']} / {r['lost']} / "
                     f"{r['mixed_up']} | {r['max_abs_err']:.1e} |")
    if report["smoke"]:
        lines += ["", "Smoke run (tiny 32x32 models, busy shared machine): checks the harness, not a speed figure."]
    return "\n".join(lines + ["", END])


def write_doc(doc: Path, block: str) -> None:
    text = doc.read_text() if doc.exists() else "# Serving\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_atomic(doc, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per configuration")
    ap.add_argument("--smoke", action="store_true", help="tiny models, 3 clients x 4 requests")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "serving.md"))
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.requests, args.time_limit = min(args.clients, 3), min(args.requests, 4), 60.0
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for r in (0, 2 if args.smoke else MODELS.get(name, 8)):
                label = f"{name}" + (f" tome r={r}" if r else "")
                path = make_export(name, r, args.smoke, Path(tmp) / f"{name}_{r}")
                res = load_test(path, args.clients, args.requests, args.images, args.max_batch, args.instances,
                                args.time_limit, Path(tmp) / f"{name}_{r}.triton.log")
                res["model"] = label
                runs.append(res)
                print(f"{label}: {res['throughput_img_s']:.1f} img/s p50 {res['latency_ms'].get('p50', 0):.1f} ms "
                      f"p99 {res['latency_ms'].get('p99', 0):.1f} ms batches {res['batch_sizes']} "
                      f"answered {res['answered']} lost {res['lost']} mixed {res['mixed_up']}", flush=True)
    report = {"machine": machine_facts(), "smoke": args.smoke, "runs": runs}
    write_json(args.out, report)
    write_doc(Path(args.doc), markdown(report))
    print(f"wrote {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
