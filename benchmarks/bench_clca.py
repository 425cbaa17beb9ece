"""CLCA on the real CIFAR-10 ViT: top-1 of drop alone, drop + fine-tuning and drop + CLCA at low keep rates.

Data and model: ../shared/data/cifar10-vit (a timm ViT, 32x32 input, patch 4, 65 tokens,
width 192, depth 6, about 67% top-1 on the CIFAR-10 test split) and its 5,000 labelled
images, split into two disjoint, class-balanced halves: even indices to fine-tune on,
odd indices to evaluate on (250 images per class each).

Reduction: top-k drop by class attention (edgetok "drop", EViT's score, no fused token)
at blocks 1 and 3 with one keep rate at both (0.5, 0.25, 0.1: 65 -> 33 -> 17,
65 -> 17 -> 5, 65 -> 8 -> 2 tokens). Every fine-tuned variant gets the same budget
(edgetok.commands.finetune.Recipe: steps, batch size, learning rates, data, seed):
"drop + FT" fine-tunes the reduced model with its own classifier; "drop + CLCA"
fine-tunes the CLCA model (carriers + CLA head new, the same backbone); with
--kept-classifier also CLCA with keep_classifier=True (the model's classifier kept,
the CLA head added from zero). "unreduced + FT" is the same budget on the unreduced
model (what fine-tuning alone gives). ToMe + CLCA at one setting (r=[0,31,0,15,0,0],
the token counts of drop at keep 0.5) shows composition, with ToMe alone and ToMe + FT.

Speed: every variant with its own graph is exported (edgetok.export.exporter.export_model,
portable target, ORT parity checked against torch) and timed in ONNX Runtime CPU,
interleaved with the unreduced export in every round, at batch 1 and 32 (medians);
FLOPs ratios are the ideal beside them (CLCA's exact count: edgetok.patch.clca.flops).

    python benchmarks/bench_clca.py                  # full run (about an hour on 2 cores)
    python benchmarks/bench_clca.py --tiny --output /tmp/clca_tiny.json   # smoke run

Fine-tuning checkpoints, exports and per-variant results go to --workdir (outside the
repository by default), so an interrupted run resumes where it stopped. Not a test: the numbers depend on the machine; the JSON
records its facts.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-vit"
LAYERS = [1, 3]
KEEP_RATES = (0.5, 0.25, 0.1)
TOME_R = [0, 31, 0, 15, 0, 0]  # what a layer can merge with the CLCA carrier beside the tokens (64 -> 33, 32 -> 17)
GOAL_KEEP = 0.25


def load(data_dir: Path):
    from edgetok.commands.finetune import load_model, load_npz

    model, norm = load_model(None, str(data_dir / "model.json"), str(data_dir / "vit_cifar10_192d6.pt"))
    images = data_dir / "cifar10_train5000.npz"
    xt, yt = load_npz(images, norm["mean"], norm["std"], "even")
    xe, ye = load_npz(images, norm["mean"], norm["std"], "odd")
    return model, (xt, yt), (xe, ye)


def variants(tiny: bool, kept_classifier: bool, keep_rates=KEEP_RATES, tome: bool = True):
    """label -> (method, params, fine-tuned, keep rate or None)."""
    out = {"unreduced": ("none", {}, False, None), "unreduced + FT": ("none", {}, True, None)}
    for kr in ((GOAL_KEEP,) if tiny else keep_rates):
        drop = {"keep_rate": kr, "layers": LAYERS}
        out[f"drop {kr}"] = ("drop", drop, False, kr)
        out[f"drop {kr} + FT"] = ("drop", drop, True, kr)
        out[f"drop {kr} + CLCA"] = ("clca", {"base": "drop", **drop}, True, kr)
        if kept_classifier:
            out[f"drop {kr} + CLCA (kept classifier)"] = ("clca", {"base": "drop", **drop, "keep_classifier": True},
                                                          True, kr)
    if not tiny and tome:
        out["tome r=[0,31,0,15,0,0]"] = ("tome", {"r": TOME_R}, False, None)
        out["tome r=[0,31,0,15,0,0] + FT"] = ("tome", {"r": TOME_R}, True, None)
        out["tome r=[0,31,0,15,0,0] + CLCA"] = ("clca", {"base": "tome", "r": TOME_R}, True, None)
    return out


def build(model, method: str, params: dict, seed: int):
    import torch

    import edgetok

    torch.manual_seed(seed)
    return copy.deepcopy(model) if method == "none" else edgetok.apply(model, method, **params)


def flops_ratio(model, reduced, method: str) -> tuple[float, list[int]]:
    import edgetok
    from edgetok.patch.clca import flops as clca_flops

    base = edgetok.flops(model)
    report = clca_flops(reduced) if method == "clca" else edgetok.flops(reduced)
    return base.total / report.total, report.tokens


def time_exports(graphs: dict, batches, repeats: dict, warmup: int, threads: int) -> dict:
    """label -> {batch: median ms}, every label timed in turn with "unreduced" in each round."""
    import numpy as np

    from edgetok.runtime.backends import ort_session
    from edgetok.validate.timing import interleaved, median

    sessions = {label: ort_session(path, threads=threads, interleaved=True) for label, path in graphs.items()}
    out = {label: {} for label in graphs}
    for b in batches:
        feed = {"pixel_values": np.random.default_rng(0).standard_normal((b, 3, 32, 32), dtype=np.float32)}
        times = interleaved({label: (lambda s=s, feed=feed: s.run(None, feed)) for label, s in sessions.items()},
                            repeats=repeats[b], warmup=warmup)
        for label, ts in times.items():
            out[label][str(b)] = median(ts)
        print(f"timed batch {b}: " + ", ".join(f"{k} {median(v):.2f} ms" for k, v in times.items()), flush=True)
    return out


def render(result: dict) -> str:
    """The markdown table of a result (docs/clca.md)."""
    rows = result["rows"]
    base = rows["unreduced"]["top1"]
    lines = ["| variant | top-1 | loss vs unreduced | FLOPs ratio | ORT speed bs1 | ORT speed bs32 | tokens per block |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        speed = r.get("ort_speed_ratio", {})
        sp = [f"{speed[b]:.2f}x" if b in speed else "-" for b in ("1", "32")]
        if r.get("timed_graph") not in (None, label):
            sp = [f"{v} (=)" if v != "-" else v for v in sp]
        loss = "-" if label == "unreduced" else f"{100 * (base - r['top1']):+.1f} pt"
        lines.append(f"| {label} | {100 * r['top1']:.1f}% | {loss} | {r['flops_ratio']:.2f}x | {sp[0]} | {sp[1]} | "
                     f"{' '.join(map(str, r['tokens']))} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA), help="folder with model.json, the weights and the .npz")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--train", choices=["head", "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kept-classifier", action=argparse.BooleanOptionalAction, default=True,
                   help="also CLCA with keep_classifier=True")
    p.add_argument("--keep-rates", type=float, nargs="+", default=list(KEEP_RATES),
                   help=f"drop keep rates to compare (the goal is judged at {GOAL_KEEP})")
    p.add_argument("--tome", action=argparse.BooleanOptionalAction, default=True, help="also the ToMe variants")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    p.add_argument("--repeats", type=int, default=30, help="interleaved rounds at batch 1 (a third at larger batches)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ORT intra-op threads")
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: 32 + 32 images, 2 steps, keep 0.25, exports of the unreduced and CLCA models, batch 1")
    p.add_argument("--workdir", default=None,
                   help="checkpoints, exports, per-variant results (default: $TMPDIR/edgetok-<output name>-work)")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/clca.json)")
    p.add_argument("--render", action="store_true", help="print the markdown table of --output and exit")
    a = p.parse_args(argv)
    if a.render:
        print(render(json.loads(Path(a.output or Path(__file__).parent / "results" / "clca.json").read_text())))
        return

    import torch

    from edgetok.commands.finetune import Recipe, evaluate, finetune, line_progress
    from edgetok.export.exporter import export_model
    from edgetok.runtime.backends import share_ort_threads
    from edgetok.runtime.artifacts import write_json
    from edgetok.validate.timing import Stopwatch, machine_facts

    out = Path(a.output or Path(__file__).parent / "results" / "clca.json")
    work = Path(a.workdir or Path(tempfile.gettempdir()) / f"edgetok-{out.stem}{'-tiny' if a.tiny else ''}-work")
    work.mkdir(parents=True, exist_ok=True)
    model, (xt, yt), (xe, ye) = load(Path(a.data))
    steps, batches, repeats = a.steps, a.batches, a.repeats
    if a.tiny:
        xt, yt, xe, ye = xt[:32], yt[:32], xe[:32], ye[:32]
        steps, batches, repeats = 2, [1], 3
    recipe = Recipe(steps=steps, batch_size=min(a.batch_size, xt.shape[0]), lr=a.lr, head_lr=a.head_lr,
                    train=a.train, seed=a.seed)
    done_path = work / "rows.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    if done.get("_recipe") != asdict(recipe) or done.get("_tiny") != a.tiny:
        done = {"_recipe": asdict(recipe), "_tiny": a.tiny}

    rows, graphs = {}, {}
    for label, (method, params, tuned, kr) in variants(a.tiny, a.kept_classifier and not a.tiny, a.keep_rates, a.tome).items():
        print(f"== {label}", flush=True)
        reduced = build(model, method, params, a.seed)
        slug = "".join(c if c.isalnum() else "_" for c in label)
        row, res = done.get(label), None
        if tuned and row is None:
            res = finetune(reduced, xt, yt, recipe, checkpoint=work / f"{slug}.pt", every=25,
                           meta={"variant": label, "method": method, "params": params}, progress=line_progress())
        elif tuned:  # finished earlier: the final checkpoint holds the weights
            reduced.load_state_dict(torch.load(work / f"{slug}.pt", weights_only=False)["model"])
        if row is None:
            clock = Stopwatch()
            top1 = evaluate(reduced, xe, ye)
            ratio, tokens = flops_ratio(model, reduced, method)
            row = {"method": method, "params": params, "fine_tuned": tuned, "keep_rate": kr, "top1": top1,
                   "flops_ratio": ratio, "tokens": tokens, "eval_seconds": clock.ms / 1e3,
                   "train_seconds": None if res is None else res["seconds"],
                   "final_loss": None if res is None else res["history"][-1][1]}
            done[label] = row
            write_json(done_path, done, sort_keys=False)
        print(f"   top-1 {row['top1']:.4f}  FLOPs ratio {row['flops_ratio']:.2f}x  tokens {row['tokens']}", flush=True)
        rows[label] = dict(row)
        # one graph per architecture: a fine-tuned variant has its untuned twin's cost (the CLCA graphs are
        # exported with their trained weights, so the parity check runs on real parameters)
        if method == "none" and label != "unreduced":
            continue
        if (method != "clca" and tuned) or (a.tiny and method not in ("none", "clca")):
            continue
        res = export_model(reduced.eval(), work / f"onnx-{slug}", parity_batches=[1, 4] if not a.tiny else [1],
                           model_name=label)
        graphs[label] = str(res.onnx_path)
        rows[label]["ort_parity_max_abs_err"] = max(res.parity["max_abs_err"].values())

    share_ort_threads(a.threads)
    timed = time_exports(graphs, batches, {b: (repeats if b == 1 else max(3, repeats // 3)) for b in batches},
                         a.warmup, a.threads)
    for label, row in rows.items():
        twin = label if label in timed else label.replace(" + FT", "")
        if row["method"] == "none":
            twin = "unreduced"
        if twin in timed:
            row["ort_ms"] = timed[twin]
            row["ort_speed_ratio"] = {b: timed["unreduced"][b] / ms for b, ms in timed[twin].items()}
            row["timed_graph"] = twin

    base = rows["unreduced"]["top1"]
    for row in rows.values():
        row["loss_vs_unreduced"] = base - row["top1"]
    goal = None
    ft, clca = rows.get(f"drop {GOAL_KEEP} + FT"), rows.get(f"drop {GOAL_KEEP} + CLCA")
    if ft and clca:
        best = max((r for k, r in rows.items() if k.startswith(f"drop {GOAL_KEEP} + CLCA")), key=lambda r: r["top1"])
        goal = {"keep_rate": GOAL_KEEP, "drop_ft_loss": ft["loss_vs_unreduced"],
                "clca_loss": clca["loss_vs_unreduced"], "best_clca_loss": best["loss_vs_unreduced"],
                "target_loss": 0.5 * ft["loss_vs_unreduced"],
                "met": clca["loss_vs_unreduced"] <= 0.5 * ft["loss_vs_unreduced"],
                "met_by_any_clca_variant": best["loss_vs_unreduced"] <= 0.5 * ft["loss_vs_unreduced"]}
    result = {
        "benchmark": "CLCA vs drop and drop + fine-tuning on the CIFAR-10 ViT (top-1 on the held-out half; "
                     "FLOPs; ONNX Runtime CPU speed vs the unreduced export)",
        "model": "timm VisionTransformer 32x32/4, 192 wide, depth 6 (../shared/data/cifar10-vit)",
        "data": {"fine_tune": f"{xt.shape[0]} images (even indices)", "evaluate": f"{xe.shape[0]} images (odd indices)",
                 "note": "all 5,000 images come from the CIFAR-10 train split the model was trained on"},
        "reduction_layers": LAYERS, "recipe": asdict(recipe), "tiny": a.tiny,
        "machine": machine_facts() | {"ort_threads": a.threads},
        "timing": {"batches": batches, "repeats_batch1": repeats, "warmup": a.warmup, "statistic": "median",
                   "order": "interleaved with the unreduced export in every round"},
        "rows": rows, "goal": goal,
    }
    write_json(out, result, sort_keys=False)
    print(f"wrote {out}")
    if goal:
        print(f"goal at keep {GOAL_KEEP}: CLCA loss {goal['clca_loss']:.4f} vs target {goal['target_loss']:.4f} "
              f"(drop + FT loss {goal['drop_ft_loss']:.4f}): {'met' if goal['met'] else 'not met'}")


if __name__ == "__main__":
    main()
