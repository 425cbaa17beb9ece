"""The speed matrix behind ``edgetok bench`` and benchmarks/bench_matrix.py: model x variant
x batch x backend, every variant timed against the unreduced model in the same interleaved
run (timing.interleaved), next to its FLOPs ratio (the ideal), with optional fidelity on
real photos; and its plots."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import EdgetokError, MissingDependencyError
from ..patch import adapter_for
from ..patch.api import flops
from .timing import interleaved, summary


MATRIX_BACKENDS = ("torch-cpu", "ort-cpu", "torch-cuda", "ort-cuda", "openvino", "openvino-bf16")


def backends_here() -> list[str]:
    import onnxruntime as ort
    import torch

    from ..runtime.openvino import openvino_missing

    found = ["torch-cpu", "ort-cpu"] + ([] if openvino_missing() else ["openvino"])
    if torch.cuda.is_available():
        found.append("torch-cuda")
        if "CUDAExecutionProvider" in ort.get_available_providers():
            found.append("ort-cuda")
    return found


def timed_fns(models: dict, x, backend: str) -> dict:
    """name -> zero-argument callable running that model on x on ``backend``."""
    import numpy as np

    if backend not in MATRIX_BACKENDS:
        raise EdgetokError(f"unknown bench backend {backend!r}; choose from {', '.join(MATRIX_BACKENDS)}")

    if backend.startswith("torch"):
        dev = "cuda" if backend == "torch-cuda" else "cpu"
        xd = x.to(dev)
        return {k: (lambda m=m.to(dev): m(xd)) for k, m in models.items()}
    from ..export.exporter import export_onnx
    from ..runtime.backends import ort_session

    if backend.startswith("openvino"):
        return _openvino_fns(models, x, backend)
    providers = ["CUDAExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
    fns, feed = {}, x.numpy().astype(np.float32)
    for name, m in models.items():
        proto = export_onnx(m, adapter_for(m).info(m).input_shape)
        sess = ort_session(proto, providers, interleaved=True)
        inp = sess.get_inputs()[0].name
        fns[name] = lambda s=sess, i=inp: s.run(None, {i: feed})
    return fns


def _openvino_fns(models: dict, x, backend: str) -> dict:
    """Each model exported (edgetok nodes with bodies), inlined and compiled by OpenVINO at the
    precision the backend name says (openvino: float32, openvino-bf16: bfloat16; runtime/openvino.py)."""
    import numpy as np

    from ..export.exporter import export_onnx
    from ..runtime.backends import get_backend
    from ..runtime.openvino import compile_openvino

    impl = get_backend(backend)
    reason = impl.unavailable()
    if reason:
        raise MissingDependencyError(f"backend {backend}: {reason}")
    fns, feed = {}, x.numpy().astype(np.float32)
    for name, m in models.items():
        compiled = compile_openvino(export_onnx(m, adapter_for(m).info(m).input_shape), impl.precision)
        request, inp = compiled.create_infer_request(), compiled.inputs[0].get_any_name()
        fns[name] = lambda r=request, i=inp: r.infer({i: feed})
    return fns


def run_matrix(models: dict, variants: list, batches, backends, make_variant: Callable, repeats: int = 10,
               fidelity_images: int = 0, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """One row per (model, batch, backend, variant incl. baseline). ``models``: name -> (module, weights
    note); ``make_variant(base, spec, backend, batch) -> (model, info or None)``."""
    rows = []
    for model_name, (base, weights_note) in models.items():
        info = adapter_for(base).info(base)
        data = _fidelity_set(info, fidelity_images)
        for batch in batches:
            x = torch.randn(batch, *info.input_shape)
            for backend in backends:
                if progress:
                    progress(f"{model_name} batch {batch} {backend}")
                built, notes = {"baseline": base}, {}
                for spec in variants:
                    built[spec], note = make_variant(base, spec, backend, batch)
                    if note:
                        notes[spec] = note
                for row in _measure(built, x, backend, repeats, data):
                    row |= {"model": model_name, "weights": weights_note, "backend": backend, "batch": batch}
                    if row["variant"] in notes:
                        row["auto"] = notes[row["variant"]]
                    rows.append(row)
    return rows


def _fidelity_set(info, images: int):
    if not images:
        return None
    from .fidelity import labelled_set

    return labelled_set(size=info.image_size[0], per_class=max(2, images // 8), classes=8)


def _measure(built: dict, x, backend: str, repeats: int, data) -> list[dict]:
    """Time every model of ``built`` (baseline included) in one interleaved run on ``backend``."""
    fns = timed_fns(built, x, backend)
    with torch.inference_mode():
        times = interleaved(fns, repeats=repeats, warmup=2, device="cuda" if backend == "torch-cuda" else "cpu")
        reports = {k: flops(m, inputs=x[:1]) for k, m in built.items()}
    base_ms = summary(times["baseline"])["p50_ms"]
    rows = []
    for name, m in built.items():
        lat, rep = summary(times[name]), reports[name]
        fr = rep.ratio_to(reports["baseline"])
        row = {"variant": name, "tokens": rep.tokens, "mean_tokens": sum(rep.tokens[:-1]) / (len(rep.tokens) - 1),
               "gflops": rep.total / 1e9, "flops_ratio": fr, "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"],
               "throughput_per_s": x.shape[0] * 1e3 / lat["p50_ms"], "speed_ratio": base_ms / lat["p50_ms"],
               "share_of_ideal": base_ms / lat["p50_ms"] / fr}
        if data is not None and name != "baseline":
            from .fidelity import fidelity

            row["fidelity"] = fidelity(built["baseline"], m, data).to_dict()
        rows.append(row)
    return rows


# -- plots -------------------------------------------------------------------------------------
def plot_matrix(rows: list[dict], out_dir) -> list[Path]:
    """latency vs mean kept tokens, speed-up vs FLOPs ideal, fidelity vs speed-up."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise MissingDependencyError("plots need matplotlib: pip install 'edgetok[plot]'") from None
    out_dir = Path(out_dir)
    paths = [_plot_latency(rows, out_dir / "latency_vs_tokens.png"), _plot_speedup(rows, out_dir / "speedup_vs_flops.png")]
    fid = [r for r in rows if r["variant"] != "baseline" and "fidelity" in r]
    if fid:
        paths.append(_plot_fidelity(fid, out_dir / "fidelity_vs_speed.png"))
    return paths


def _plot_latency(rows: list[dict], path: Path) -> Path:
    """One panel per model: latency relative to unreduced against mean kept tokens, per backend and batch."""
    import matplotlib.pyplot as plt

    from .figures import save_figure

    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = dict(zip(dict.fromkeys(r["backend"] for r in rows), ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    styles = dict(zip(sorted({r["batch"] for r in rows}), ("o-", "s--", "^:", "d-.", "v-")))
    base = {(r["model"], r["backend"], r["batch"]): r for r in rows if r["variant"] == "baseline"}
    cols = min(3, len(models))
    nrow = -(-len(models) // cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4 * cols, 3.2 * nrow), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for (m, backend, batch), b in sorted(base.items()):
            if m == model:
                pts = sorted((r["mean_tokens"], r["p50_ms"] / b["p50_ms"]) for r in rows
                             if (r["model"], r["backend"], r["batch"]) == (m, backend, batch))
                ax.plot(*zip(*pts), styles[batch], color=colours[backend], ms=4, lw=1, label=f"{backend} bs{batch}")
        ideal = sorted({(r["mean_tokens"], 1 / r["flops_ratio"]) for r in rows if r["model"] == model})
        ax.plot(*zip(*ideal), "k.", ms=3, label="FLOPs ideal")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("mean tokens per block", fontsize=8)
        ax.set_ylabel("latency / unreduced", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_speedup(rows: list[dict], path: Path) -> Path:
    """One panel per backend: measured speed-up against the FLOPs ideal, colour = batch, marker = model."""
    import matplotlib.pyplot as plt

    from .figures import save_figure

    red = [r for r in rows if r["variant"] != "baseline"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    markers = dict(zip(models, "osD^vP*X"))
    batch_colours = dict(zip(batches, ("tab:purple", "tab:green", "tab:brown", "tab:cyan", "tab:pink")))
    fig, axes = plt.subplots(1, len(backends), figsize=(4.5 * len(backends), 4.2), squeeze=False)
    top = max([r["flops_ratio"] for r in red] + [r["speed_ratio"] for r in red] + [1.0]) * 1.05
    for ax, backend in zip(axes.flat, backends):
        for r in (r for r in red if r["backend"] == backend):
            ax.scatter(r["flops_ratio"], r["speed_ratio"], marker=markers[r["model"]], color=batch_colours[r["batch"]],
                       s=22, alpha=0.85)
        ax.plot([0.9, top], [0.9, top], "k--", lw=0.8)
        ax.axhline(1.0, color="r", lw=0.6)
        ax.set_xlim(0.9, top)
        ax.set_ylim(0.5, top)
        ax.set_title(backend, fontsize=9)
        ax.set_xlabel("FLOPs ratio (ideal speed-up)", fontsize=8)
        ax.set_ylabel("measured speed-up", fontsize=8)
    handles = [plt.Line2D([], [], marker=markers[m], ls="", color="grey", label=m) for m in models]
    handles += [plt.Line2D([], [], marker="o", ls="", color=batch_colours[b], label=f"batch {b}") for b in batches]
    handles += [plt.Line2D([], [], ls="--", color="k", label="ideal"), plt.Line2D([], [], color="r", label="unreduced")]
    axes.flat[0].legend(handles=handles, fontsize=6, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_fidelity(rows: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    from .figures import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        cos = r["fidelity"]["pooled_cosine_mean"]
        ax.scatter(r["speed_ratio"], cos, s=18)
        ax.annotate(f"{r['model']} {r['variant']} bs{r['batch']}", (r["speed_ratio"], cos), fontsize=5)
    ax.set_xlabel("measured speed-up")
    ax.set_ylabel("pooled-feature cosine to unreduced")
    return save_figure(fig, path)
