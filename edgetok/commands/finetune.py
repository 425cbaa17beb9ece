"""``edgetok finetune``: train a reduced classifier's head (or head + backbone) on labelled images, on CPU.

The recipe (the same for every variant, so comparisons are fair): AdamW,
linear warm-up for the first 10% of the steps then cosine decay to zero, one
learning rate for the head (``head_lr``: CLCA's carriers + CLA head, or a plain
model's classifier) and one for the rest (``lr``, used with ``train="all"``),
label smoothing 0.1, random crop (4-pixel zero padding) and horizontal flip.
Every batch and augmentation is drawn from ``seed`` and the step number, so a
run resumed from its checkpoint continues exactly as if uninterrupted.
Checkpoints (model, optimizer, step, losses, config) are written atomically:
to a temporary file in the same folder, flushed, then renamed over the old one.

Data: an ``.npz`` with ``images`` (uint8 [N,H,W,3] RGB, or float [N,3,H,W]
already normalised) and ``labels`` (integers 0..classes-1), e.g.
../shared/data/cifar10-vit/cifar10_train5000.npz; ``--subset even|odd`` takes
every other image (two disjoint, class-balanced halves when the file is sorted
by class).

    edgetok finetune cifar10_train5000.npz --model-config model.json --weights vit.pt \\
        --method clca --param base=drop --param keep_rate=0.25 --param layers=[1,3] \\
        --train all --steps 150 --subset even --eval-subset odd --checkpoint out/clca.pt
"""
from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import click
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgetokError, InputShapeError
from ..runtime.artifacts import write_atomic
from ..validate.timing import Stopwatch

CHECKPOINT_FORMAT = "edgetok-finetune/1"


class DataError(EdgetokError, ValueError):
    """The labelled images cannot be used for fine-tuning (missing labels, bad values)."""


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning budget: give every compared variant the same one."""

    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-4  # backbone (train="all")
    head_lr: float = 1e-3  # CLCA's new parameters, or the classifier
    train: str = "all"  # "head" or "all"
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of the steps
    label_smoothing: float = 0.1
    augment: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.train not in ("head", "all"):
            raise EdgetokError(f"train={self.train!r}: use 'head' (the classifier / CLCA parts) or 'all'")
        if self.steps < 1 or self.batch_size < 1:
            raise EdgetokError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if self.lr < 0 or self.head_lr <= 0:
            raise EdgetokError(f"learning rates must be positive (lr={self.lr}, head_lr={self.head_lr})")


# -- data ------------------------------------------------------------------------------------------
def load_npz(path, mean=None, std=None, subset: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N,3,H,W] (float, normalised with ``mean``/``std`` when they are uint8) and labels [N]."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no labelled image file at {str(path)!r}")
    with np.load(path, allow_pickle=False) as d:
        if "images" not in d:
            raise DataError(f"{path.name} has no 'images' array (it has: {', '.join(d.files) or 'nothing'})")
        if "labels" not in d:
            raise DataError(f"{path.name} has no 'labels' array: fine-tuning needs one integer label per image "
                            f"(it has: {', '.join(d.files)})")
        images, labels = d["images"], d["labels"]
    if images.ndim != 4:
        raise InputShapeError(f"images must be [N,H,W,3] uint8 or [N,3,H,W] float, got shape {list(images.shape)}")
    if images.dtype == np.uint8:
        if images.shape[-1] != 3:
            raise InputShapeError(f"uint8 images must be [N,H,W,3] (RGB last), got shape {list(images.shape)}")
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        if mean is not None:
            x = x - torch.tensor(mean, dtype=torch.float32)[:, None, None]
        if std is not None:
            x = x / torch.tensor(std, dtype=torch.float32)[:, None, None]
    else:
        x = torch.from_numpy(images.astype("float32"))
    if labels.ndim != 1 or labels.shape[0] != x.shape[0] or labels.dtype.kind not in "iu":
        raise DataError(f"labels must be {x.shape[0]} integers (one per image), got {labels.dtype} "
                        f"{list(labels.shape)}")
    y = torch.from_numpy(labels.astype("int64"))
    return subset_of(x, y, subset)


def subset_of(x: torch.Tensor, y: torch.Tensor, subset: str):
    """``all``, ``even`` (images 0, 2, 4, ...) or ``odd`` (1, 3, 5, ...)."""
    if subset == "all":
        return x, y
    if subset not in ("even", "odd"):
        raise DataError(f"subset={subset!r}: use all, even or odd")
    start = 0 if subset == "even" else 1
    return x[start::2], y[start::2]


def check_data(model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor]) -> int:
    """Raise for images the model cannot take or labels it cannot output; -> number of classes."""
    if y is None:
        raise DataError("no labels: fine-tuning needs one integer label per image")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InputShapeError(f"images must be a float tensor [N,C,H,W], got "
                              f"{type(x).__name__}{list(x.shape) if isinstance(x, torch.Tensor) else ''}")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise DataError(f"labels must be {x.shape[0]} integers, got {y.dtype} {list(y.shape)}")
    try:
        from ..patch import adapter_for

        adapter = adapter_for(model)
        expected = adapter.info(model).input_shape
        if tuple(x.shape[1:]) != tuple(expected):
            raise InputShapeError(f"images are {list(x.shape[1:])} but the model takes {list(expected)} "
                                  "(channels, height, width); resize the images or build the model for that size")
    except EdgetokError as e:
        if isinstance(e, InputShapeError):
            raise
    was = model.training
    with torch.no_grad():
        classes = model.eval()(x[:1]).shape[-1]
    model.train(was)
    bad = y[(y < 0) | (y >= classes)]
    if bad.numel():
        raise DataError(f"label {int(bad[0])} is outside the model's {classes} classes (0..{classes - 1})")
    return classes


# -- training --------------------------------------------------------------------------------------
_GRADIENTS = False


def register_gradients() -> None:
    """Backward formulas for edgetok::token_drop and edgetok::token_merge (the ops have
    none: they are for inference and export). The backward re-runs the op's own torch
    reference (edgetok.reduce.drop.top_k_drop / edgetok.reduce.tome.bipartite_merge) on
    the saved inputs and takes its vector-Jacobian product, so no logic is written twice:
    gradients reach the kept / merged tokens (and the scores through EViT's fused token);
    the selection itself is piecewise constant. Registered once per process; inference
    and export are unaffected."""
    global _GRADIENTS
    if _GRADIENTS:
        return
    from ..reduce.drop import top_k_drop
    from ..reduce.tome import bipartite_merge

    def drop_setup(ctx, inputs, output):
        x, score, keep, protect, fuse = inputs
        ctx.save_for_backward(x, score)
        ctx.args = (keep, protect, bool(fuse))

    def drop_backward(ctx, grad_out, _grad_idx):
        x, score = ctx.saved_tensors
        with torch.enable_grad():
            xd, sd = x.detach().requires_grad_(), score.detach().requires_grad_()
            out, _ = top_k_drop(xd, sd, *ctx.args)
            gx, gs = torch.autograd.grad(out, (xd, sd), grad_out, allow_unused=True)
        return gx, gs, None, None, None

    def merge_setup(ctx, inputs, output):
        x, metric, size, r, protect = inputs
        ctx.save_for_backward(x, metric, size)
        ctx.args = (r, protect)

    def merge_backward(ctx, grad_out, grad_size):
        x, metric, size = ctx.saved_tensors
        with torch.enable_grad():
            xd, szd = x.detach().requires_grad_(), size.detach().requires_grad_()
            out, out_size = bipartite_merge(xd, metric.detach(), szd, *ctx.args)
            gx, gsz = torch.autograd.grad((out, out_size), (xd, szd), (grad_out, grad_size), allow_unused=True)
        return gx, None, gsz, None, None

    torch.library.register_autograd("edgetok::token_drop", drop_backward, setup_context=drop_setup)
    torch.library.register_autograd("edgetok::token_merge", merge_backward, setup_context=merge_setup)
    _GRADIENTS = True


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    from ..patch.clca import head_parameters as _head

    return _head(model)


def lr_factor(step: int, recipe: Recipe) -> float:
    warm = max(1, int(round(recipe.warmup * recipe.steps)))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, recipe.steps - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def batch_for(step: int, n: int, recipe: Recipe) -> torch.Tensor:
    """Indices of the batch of ``step``: epochs of a seeded permutation, the last partial batch dropped."""
    bs = min(recipe.batch_size, n)
    per_epoch = max(1, n // bs)
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed * 1_000_003 + epoch))
    return perm[j * bs:(j + 1) * bs]


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image and random horizontal flip, per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    flip = (torch.rand(b, generator=gen) < 0.5).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return torch.where(torch.tensor(flip)[:, None, None, None], out.flip(-1), out)


def save_atomic(obj, path) -> Path:
    """torch.save ``obj`` to ``path`` atomically (a reader sees the old or the new file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_atomic(path, buf.getvalue())


def _optimizer(model: nn.Module, recipe: Recipe):
    head = head_parameters(model)
    head_ids = {id(p) for p in head}
    rest = [p for p in model.parameters() if id(p) not in head_ids]
    for p in head:
        p.requires_grad_(True)
    for p in rest:
        p.requires_grad_(recipe.train == "all")
    groups = [{"params": head, "lr": recipe.head_lr, "base_lr": recipe.head_lr}]
    if recipe.train == "all" and rest:
        groups.append({"params": rest, "lr": recipe.lr, "base_lr": recipe.lr})
    return torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)


def _resume(path: Optional[Path], model: nn.Module, opt, recipe: Recipe):
    """(step, loss history, resumed-from step) of the checkpoint at ``path``, loaded into
    ``model`` and ``opt``; (0, [], None) where there is none yet."""
    if path is None or not path.exists():
        return 0, [], None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise EdgetokError(f"{path} is not an edgetok fine-tuning checkpoint; remove it or pass --no-resume")
    if state["recipe"] != asdict(recipe):
        diff = sorted(k for k in asdict(recipe) if state["recipe"].get(k) != asdict(recipe)[k])
        raise EdgetokError(f"{path} was written with another recipe ({', '.join(diff)} differ); "
                           "use the same options, another --checkpoint, or --no-resume")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["history"]), int(state["step"])


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe = Recipe(),
             checkpoint=None, every: int = 50, resume: bool = True, meta: Optional[dict] = None,
             progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Train ``model`` in place on images ``x`` [N,C,H,W] and labels ``y`` [N] for ``recipe.steps``.

    ``checkpoint``: file written every ``every`` steps and at the end (atomically);
    with ``resume`` an existing one (same recipe) is loaded and training continues
    from its step. ``meta`` is stored in the checkpoint (e.g. how the model was
    built). ``progress(info)`` is called after each step with step, steps, loss,
    lr and seconds. Returns {"steps", "history": [[step, loss], ...], "seconds", "resumed_from"}.
    """
    check_data(model, x, y)
    register_gradients()
    opt = _optimizer(model, recipe)
    path = Path(checkpoint) if checkpoint is not None else None
    start, history, resumed = _resume(path, model, opt, recipe) if resume else (0, [], None)

    def save(step: int) -> None:
        if path is not None:
            save_atomic({"format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "recipe": asdict(recipe), "history": history,
                         "meta": meta or {}}, path)

    clock = Stopwatch()
    model.train()
    for step in range(start, recipe.steps):
        gen = torch.Generator().manual_seed(recipe.seed * 7_919 + step)
        idx = batch_for(step, x.shape[0], recipe)
        xb, yb = x[idx], y[idx]
        if recipe.augment:
            xb = augment(xb, gen)
        factor = lr_factor(step, recipe)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss = F.cross_entropy(model(xb), yb, label_smoothing=recipe.label_smoothing)
        if not torch.isfinite(loss.detach()):
            raise EdgetokError(f"the loss became {float(loss)} at step {step}; lower the learning rates")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append([step + 1, loss.item()])
        if path is not None and ((step + 1) % every == 0 or step + 1 == recipe.steps):
            save(step + 1)
        if progress is not None:
            progress({"step": step + 1, "steps": recipe.steps, "loss": history[-1][1],
                      "lr": opt.param_groups[0]["lr"], "seconds": clock.ms / 1e3})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": recipe.steps, "history": history, "seconds": clock.ms / 1e3, "resumed_from": resumed}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``x``, ``y``."""
    was = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


def line_progress(stream=None, every: Optional[int] = None) -> Callable[[dict], None]:
    """A plain progress line (for logs and non-terminals): about ten lines per run."""
    stream = stream or sys.stderr

    def show(info: dict) -> None:
        k = every or max(1, info["steps"] // 10)
        if info["step"] % k == 0 or info["step"] == info["steps"]:
            print(f"step {info['step']}/{info['steps']}  loss {info['loss']:.4f}  lr {info['lr']:.2e}  "
                  f"{info['seconds']:.0f}s", file=stream, flush=True)

    return show


# -- model loading (the CLI) -------------------------------------------------------------------------
def load_model(model_name: Optional[str], model_config: Optional[str], weights: Optional[str]) -> tuple[nn.Module, dict]:
    """A timm VisionTransformer from a model.json (``architecture`` + ``normalize``, the format of
    ../shared/data/cifar10-vit) or a timm name (random weights), with a torch state dict."""
    import timm

    norm = {}
    if model_config:
        cfg = json.loads(Path(model_config).read_text())
        arch = {k: v for k, v in cfg.get("architecture", {}).items() if k not in ("cls", "tokens", "params")}
        model = timm.models.vision_transformer.VisionTransformer(**arch)
        norm = cfg.get("normalize", {})
    elif model_name:
        model = timm.create_model(model_name, pretrained=False)
    else:
        raise click.UsageError("give --model-config FILE (architecture + normalize) or --model NAME")
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return model.eval(), norm


def _key_values(pairs) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--param")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


@click.command("finetune")
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--model-config", type=click.Path(exists=True, dir_okay=False),
              help="JSON with the timm VisionTransformer arguments ('architecture') and 'normalize' mean/std.")
@click.option("--model", "model_name", metavar="NAME", help="timm model name (random weights unless --weights).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="torch state dict to load.")
@click.option("--method", default="none", show_default=True,
              help="Reduction before fine-tuning: none, drop, tome, clca (--param base=drop ...), any method.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Method parameter, repeatable (keep_rate=0.25, layers=[1,3], base=drop).")
@click.option("--train", type=click.Choice(["head", "all"]), default="all", show_default=True,
              help="Train the head only (classifier, or CLCA's carriers + head) or everything.")
@click.option("--steps", default=150, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=1e-4, show_default=True, help="Backbone learning rate (--train all).")
@click.option("--head-lr", default=1e-3, show_default=True, help="Head learning rate.")
@click.option("--seed", default=0, show_default=True)
@click.option("--subset", type=click.Choice(["all", "even", "odd"]), default="all", show_default=True,
              help="Images to train on (even/odd: disjoint halves).")
@click.option("--eval-subset", type=click.Choice(["even", "odd", "all"]), help="Images to report top-1 on.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint file (written atomically).")
@click.option("--every", default=50, show_default=True, help="Checkpoint every N steps (and at the end).")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from --checkpoint if it exists.")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Write the result (losses, top-1) as JSON.")
def finetune_cmd(data, model_config, model_name, weights, method, params, train, steps, batch_size, lr, head_lr,
                 seed, subset, eval_subset, checkpoint, every, resume, json_out):
    """Fine-tune a (reduced) ViT classifier on labelled images (.npz: images + labels), on CPU."""
    import edgetok

    model, norm = load_model(model_name, model_config, weights)
    x, y = load_npz(data, norm.get("mean"), norm.get("std"), subset)
    method_params = _key_values(params)
    torch.manual_seed(seed)
    if method != "none":
        model = edgetok.apply(model, method, **method_params)
    elif method_params:
        raise click.BadParameter("--param needs a --method", param_hint="--param")
    recipe = Recipe(steps=steps, batch_size=batch_size, lr=lr, head_lr=head_lr, train=train, seed=seed)
    meta = {"method": method, "params": method_params, "data": str(data), "subset": subset}
    click.echo(f"fine-tuning {type(model).__name__} ({method}) on {x.shape[0]} images, {steps} steps, train={train}",
               err=True)
    result = finetune(model, x, y, recipe, checkpoint, every, resume, meta, line_progress())
    out = {"method": method, "params": method_params, "recipe": asdict(recipe), "seconds": result["seconds"],
           "final_loss": result["history"][-1][1] if result["history"] else None, "resumed_from": result["resumed_from"]}
    if eval_subset:
        xe, ye = load_npz(data, norm.get("mean"), norm.get("std"), eval_subset)
        out["top1"] = evaluate(model, xe, ye)
        out["eval_subset"] = eval_subset
        click.echo(f"top-1 on the {eval_subset} images: {out['top1']:.4f}", err=True)
    if checkpoint:
        out["checkpoint"] = str(checkpoint)
    if json_out:
        save_json = Path(json_out)
        save_json.parent.mkdir(parents=True, exist_ok=True)
        save_json.write_text(json.dumps(out | {"history": result["history"]}, indent=1))
    click.echo(json.dumps(out))

