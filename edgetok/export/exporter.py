"""torch -> ONNX: one ``edgetok`` node per reduction step, checked and written atomically.

``export_model(model, "out/vit-tome")`` traces the (reduced) model with the
dynamo exporter, maps each ``torch.ops.edgetok.*`` call to its ``edgetok``
node (edgetok/ops/onnx.py), appends the function bodies, rewrites the graph
for the target (targets.py), runs the ONNX checker (full check with shape
inference) and an ONNX Runtime CPU parity check against the torch model, and
writes ``model.onnx`` + ``manifest.json`` (manifest.py) into the output
directory: everything goes to a temporary directory beside it first and is
renamed into place at the end, so a failure leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import EdgetokError
from .._version import __version__
from .output import staged

if TYPE_CHECKING:
    from ..runtime.manifest import Manifest
from .opset import EXPORTER_MIN_OPSET, downgrade
from .precision import apply_precision, export_precision
from .targets import DOMAIN, TARGETS, apply_target

INPUT_NAME = "pixel_values"
DEFAULT_OPSET = 18
TOLERANCE = 1e-4
MAX_BATCH = 4096  # upper bound of the dynamic batch axis given to torch.export


class ExportError(EdgetokError, RuntimeError):
    """The model could not be exported, or the export failed a check."""


@dataclass
class ExportResult:
    output_dir: Path
    onnx_path: Path
    manifest_path: Path
    manifest: "Manifest"  # edgetok.runtime.manifest.Manifest

    @property
    def parity(self) -> Optional[dict]:
        return self.manifest.parity


class _ShapeHint(nn.Module):
    """Wraps an adaptive reducer during export: tells torch.export that the
    data-dependent token count is between 1 and the count it got, which is what
    downstream attention/reshape code needs to trace (torch._check hints)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, size, ctx):
        n = x.shape[1]
        out, out_size = self.inner(x, size, ctx)
        m = out.shape[1]
        torch._check(m >= 1)
        torch._check(m <= n)
        return out, out_size


@contextlib.contextmanager
def _export_mode(model: nn.Module):
    """Hints on adaptive reducers, and SDPA's math backend while tracing: with the
    CPU flash kernel, torch.export records a view of the attention output that the
    decomposed graph cannot honour ("Cannot view a tensor ...")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    swapped = []
    for module in model.modules():
        red = getattr(module, "token_reducer", None)
        if red is not None and getattr(red, "adaptive", False):
            swapped.append((module, red))
            module.token_reducer = _ShapeHint(red)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for module, red in swapped:
            module.token_reducer = red


def _output_names(out) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, dict):  # also transformers' ModelOutput
        return [k for k, v in out.items() if v is not None]
    leaves = torch.utils._pytree.tree_leaves(out)
    return [f"output_{i}" for i in range(len(leaves))]


def _first_line(e: BaseException) -> str:
    """The line of a (long, multi-section) exporter error that says what failed."""
    import re

    text = str(e).split("Exception summary", 1)[-1]
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    line = re.sub(r"^<class '[\w.]+'>: ", "", lines[0]) if lines else type(e).__name__
    return line[:300]


def trace(module: nn.Module, args: tuple, input_names: Sequence[str], opset: int = DEFAULT_OPSET,
          output_names: Optional[Sequence[str]] = None, dynamic_shapes=None):
    """torch.onnx (dynamo) export of ``module(*args)`` with edgetok nodes and their bodies:
    the one tracing call every export form goes through."""
    from ..ops.onnx import add_functions, custom_translation_table

    import warnings

    try:
        # the exporter prints its progress to stdout even with verbose=False
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # inputs sharing the batch Dim: the exporter says so, and names the axis "batch" all the same
            warnings.filterwarnings("ignore", message="# The axis name")
            # constant folding evaluates masks with onnx's reference ops (log 0 = -inf is intended)
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"onnx\.reference")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=max(opset, EXPORTER_MIN_OPSET),  # below 18: converted by edgetok (opset.py)
                input_names=list(input_names),
                output_names=list(output_names) if output_names else None,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=custom_translation_table(),
                verbose=False,
            )
    except EdgetokError:
        raise
    except Exception as e:  # torch.export raises many types; the first line says what failed
        raise ExportError(f"the ONNX exporter cannot handle this model: {_first_line(e)}") from e
    from .._version import __version__

    proto = downgrade(add_functions(program.model_proto), opset)
    proto.producer_name, proto.producer_version = "edgetok", __version__
    return proto


def batch_dim():
    """The dynamic batch axis given to torch.export (named "batch" in the ONNX)."""
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def check(path: Path) -> None:
    """onnx.checker full check (with shape inference) of the file at ``path``."""
    check_proto(str(path))


def check_proto(model) -> None:
    """onnx.checker full check (with shape inference) of a ModelProto or a file path."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported model fails the ONNX checker: {str(e).splitlines()[0]}") from None


def ort_parity(path: Path, batches: Sequence[int], feeds_for: Callable[[int, torch.Generator], dict],
               reference: Callable[[dict], list], tolerance: float = TOLERANCE, seed: int = 0) -> dict:
    """Max abs difference between ONNX Runtime CPU and torch per batch size: ``feeds_for(b, gen)``
    makes the named inputs, ``reference(feeds)`` the torch outputs as numpy arrays."""
    from ..runtime.backends import ort_session

    session = ort_session(path)
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for b in batches:
        feeds = feeds_for(b, gen)
        with torch.no_grad():
            ref = reference(feeds)
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        if [r.shape for r in ref] != [g.shape for g in got]:
            raise ExportError(f"ONNX Runtime output shapes {[g.shape for g in got]} differ from torch's "
                              f"{[r.shape for r in ref]} at batch {b}")
        err = max(float(np.abs(r.astype(np.float64) - g).max()) if r.size else 0.0 for r, g in zip(ref, got))
        errors[str(b)] = err
        if not err <= tolerance:
            raise ExportError(f"ONNX Runtime differs from torch by {err:.3g} at batch {b} "
                              f"(tolerance {tolerance:g})")
        _refuse_constant(ref, b)
    return {"batches": list(batches), "max_abs_err": errors, "tolerance": tolerance}


def _refuse_constant(outputs: list, batch: int) -> None:
    """Outputs that do not depend on the input (a zero-initialised head) match anything: no proof."""
    floats = [o for o in outputs if o.size and np.issubdtype(o.dtype, np.floating)]
    if floats and all(float(np.ptp(o)) == 0.0 for o in floats):
        raise ExportError(f"every output of the model is constant over random inputs (batch {batch}), so ONNX "
                          "Runtime matching it proves nothing; give the model real weights (--weights) or "
                          "export a model whose outputs depend on the image")


def parity(path: Path, model: Callable, input_shape: Sequence[int], batches: Sequence[int],
           tolerance: float = TOLERANCE, seed: int = 0) -> dict:
    """ORT vs torch for an image model (or the function exported for it) with the one input
    ``pixel_values``: every output compared, the features included."""
    def reference(feeds):
        out = model(feeds[INPUT_NAME])
        return [t.numpy() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    return ort_parity(path, batches, lambda b, gen: {INPUT_NAME: torch.randn(b, *input_shape, generator=gen)},
                      reference, tolerance, seed)


def _edgetok_nodes(proto) -> list[dict]:
    import onnx

    return [
        {"name": n.name, "op_type": n.op_type,
         "attributes": {a.name: _attr(onnx.helper.get_attribute_value(a)) for a in n.attribute}}
        for n in proto.graph.node if n.domain == DOMAIN
    ]


def _attr(v):
    return v.decode() if isinstance(v, bytes) else v


def _value_spec(vi) -> dict:
    import onnx

    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
    return {"name": vi.name, "shape": dims, "dtype": dtype}


def graph_fields(proto, onnx_path: Path, target: str) -> dict:
    """The manifest fields read off the written graph (edgetok/runtime/manifest.py)."""
    from ..ops.spec import PLUGIN_OPS
    from ..runtime.artifacts import sha256_file

    nodes = _edgetok_nodes(proto)
    bodies = {f.name for f in proto.functions if f.domain == DOMAIN}
    with_plugin = {n["op_type"] for n in nodes} & PLUGIN_OPS
    return {
        "plugin_ops": sorted(with_plugin if target == "trt-override" else with_plugin - bodies),
        "edgetok_opset": 1 if nodes else None,
        "edgetok_ops": nodes,
        "function_bodies": sorted(f.name for f in proto.functions if f.domain == DOMAIN),
        "input": _value_spec(proto.graph.input[0]),
        "inputs": [_value_spec(i) for i in proto.graph.input],
        "outputs": [_value_spec(o) for o in proto.graph.output],
        "sha256": sha256_file(onnx_path),
    }


def write_checked(proto, tmp: Path, target: str, opset: int, parity_fn: Optional[Callable[[Path], dict]],
                  step: Callable[[str], None], parity_what: str = "ONNX Runtime CPU parity"):
    """Rewrite the full-form ``proto`` for ``target``, save it as ``tmp``/model.onnx and
    check it (ONNX checker; ``parity_fn(path) -> dict`` in ONNX Runtime, on the full
    form for ``trt``, whose stripped bodies ORT cannot run). -> (proto, path, parity)."""
    import onnx

    onnx_path = tmp / "model.onnx"
    parity_result = None
    if target == "trt":  # bodies stripped: ONNX Runtime cannot run it, so check the full form first
        full = tmp / "full.onnx"
        onnx.save(proto, str(full))
        step("ONNX checker (full form)")
        check(full)
        if parity_fn is not None:
            step(f"{parity_what} (full form)")
            parity_result = parity_fn(full) | {"checked_on": "portable"}
        full.unlink()
    proto = apply_target(proto, target)
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise ExportError(f"the written graph has opset {written}, not the {opset} asked for; "
                          "this is an edgetok defect: please report it")
    onnx.save(proto, str(onnx_path))
    step("ONNX checker (full check with shape inference)")
    check(onnx_path)
    if parity_fn is not None and target != "trt":
        step(parity_what)
        parity_result = parity_fn(onnx_path) | {"checked_on": target}
    return proto, onnx_path, parity_result


def refuse_adaptive(config, method: str) -> None:
    """A data-dependent token count (dymu, dtd) cannot deploy on a config that says so."""
    if config is not None and not config.adaptive:
        raise ExportError(f"method {method} gives a data-dependent token count, which config {config.name!r} cannot "
                          f"build ({config.description}); use a fixed-count method (tome, drop) for this device")


def resolve_target(target: Optional[str], opset: Optional[int], config) -> tuple[str, int]:
    """The target and opset asked for, else the config's, else portable / 18."""
    target = target or (config.target if config is not None else "portable")
    opset = opset or (config.opset if config is not None else DEFAULT_OPSET)
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; targets: {', '.join(TARGETS)}")
    return target, opset


def in_precision(proto, precision: str, calibration, config, job: "ExportJob", tmp: Path,
                 check_fn: Optional[Callable[[Path], dict]], what: str, step: Callable[[str], None]):
    """The full-form float32 ``proto`` written in ``precision`` -> (proto, manifest record, parity).
    fp16/int8: the float32 graph is checked against torch first (the parity a lower precision cannot
    give at 1e-4), then converted; its own parity against the float32 graph is in the record."""
    import onnx

    if precision == "fp32":
        return proto, {"precision": "fp32", "io_dtype": "float32", "compute_dtype": "float32"}, None
    parity_result = None
    if check_fn is not None:
        fp32 = tmp / "fp32.onnx"
        onnx.save(proto, str(fp32))
        step(f"{what} (float32, before the {precision} conversion)")
        parity_result = check_fn(fp32) | {"checked_on": "float32 full form"}
        fp32.unlink()
    step(f"converting to {precision}" + (f" (calibrating on {calibration})" if precision == "int8" else ""))
    proto, record = apply_precision(proto, precision, calibration, target=config,
                                    preprocessing=job.fields.get("preprocessing"))
    return proto, record, parity_result


# -- one pipeline for every kind of export -------------------------------------------------
@dataclass
class ExportJob:
    """What one export traces, checks and records; built per kind (image model, a family
    of edgetok/export/families.py, the DTD streaming step), run by ``run_export``."""

    fn: Callable  # positional named inputs -> outputs (a tensor, tuple or dict)
    example: dict  # input name -> example tensor (batch 2, or the fixed batch)
    outputs: list  # output names
    dynamic_batch: bool
    parity: Optional[Callable[[Path, list], dict]]  # (path, batches) -> parity record; None skips it
    batches: list  # batch sizes of the parity check
    parity_what: str  # what the parity check compares, for the progress line
    fields: dict  # the manifest fields the kind knows (model, family, method, params, ...)
    modules: nn.Module  # the model (export mode hints its adaptive reducers)


class _Traced(nn.Module):
    """Positional named inputs -> ``fn(*inputs)``: one calling convention for torch.export."""

    def __init__(self, fn: Callable, model: nn.Module):
        super().__init__()
        self.model = model  # its parameters become the graph's initializers (model.*)
        object.__setattr__(self, "_fn", fn)  # fn may be the model itself: not registered twice

    def forward(self, *inputs):
        return self._fn(*inputs)


def run_export(job: ExportJob, output_dir, target: str, opset: int, config=None,
               progress: Optional[Callable[[str], None]] = None, seed: Optional[int] = None,
               force: bool = False, precision: Optional[str] = None, calibration=None) -> ExportResult:
    """Trace, rewrite for ``target``, check (ONNX checker, ONNX Runtime parity) and write
    model.onnx + manifest.json into ``output_dir``, atomically. ``seed``: of the model's random
    initial weights, recorded in the manifest (None: a checkpoint's or the caller's weights).
    ``force``: write into a non-empty directory that holds no edgetok export (its files stay).
    ``precision`` (fp32, fp16, int8; default: the config's, see export_precision) with
    ``calibration`` images for int8 (edgetok/export/precision.py)."""
    from ..runtime.manifest import MANIFEST_VERSION, Manifest

    step = progress or (lambda _msg: None)
    output_dir = Path(output_dir)
    precision, note = export_precision(precision, config, calibration)
    names = list(job.example)
    dynamic = {"inputs": tuple({0: batch_dim()} for _ in names)} if job.dynamic_batch else None
    with staged(output_dir, force) as tmp:
        step(f"tracing with torch.export (opset {opset})")
        with _export_mode(job.modules):
            proto = trace(_Traced(job.fn, job.modules).eval(), tuple(job.example.values()), names, opset,
                          job.outputs, dynamic)
        check_fn = None if job.parity is None else (lambda path: job.parity(path, job.batches))
        what = f"{job.parity_what}, batch {job.batches}"
        proto, record, parity_result = in_precision(proto, precision, calibration, config, job, tmp, check_fn,
                                                    what, step)
        record = record | ({"note": note} if note else {})
        proto, onnx_path, checked = write_checked(proto, tmp, target, opset, check_fn if precision == "fp32" else None,
                                                  step, what)
        manifest = Manifest(manifest_version=MANIFEST_VERSION, opset=opset, target=target,
                            batch_profile=batch_profile(config), config=None if config is None else config.name,
                            parity=checked or parity_result, precision=record, seed=seed, versions=versions(),
                            **job.fields, **graph_fields(proto, onnx_path, target))
        manifest.write(tmp)
        step(f"writing {output_dir}")
    return ExportResult(output_dir, output_dir / "model.onnx", output_dir / "manifest.json", manifest)


def versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "edgetok": __version__}


def batch_profile(config) -> Optional[dict]:
    return None if config is None else {"min": config.batch.min, "opt": config.batch.opt, "max": config.batch.max}


def reduction_fields(model: nn.Module) -> dict:
    """method, params, adaptive and schedule of a model reduced by edgetok.apply (or not)."""
    plan = getattr(model, "edgetok_plan", None)
    return {"method": plan.method if plan is not None else "none", "params": plan.params if plan is not None else {},
            "adaptive": bool(plan and plan.adaptive),
            "schedule": {"source": "given"} if plan is not None else None}


# -- image models (any edgetok adapter) ----------------------------------------------------------
def image_job(model: nn.Module, input_shape: Optional[Sequence[int]], batch: Optional[int],
              parity_batches: Optional[Sequence[int]], tolerance: float, check_parity: bool,
              model_name: Optional[str], preprocessing: Optional[dict], schedule: Optional[dict]) -> ExportJob:
    from ..patch import adapter_for
    from ..patch.api import flops as _flops_of
    from ..patch.data_config import data_config as _pre
    from ..reduce import flops as _flops

    model = model.eval()
    try:
        info = adapter_for(model).info(model)
    except EdgetokError:
        if input_shape is None:
            raise
        info = None
    shape = tuple(input_shape) if input_shape is not None else info.input_shape
    example = torch.randn(batch or 2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = _output_names(model(example))
    fn = model
    if info is not None and len(outputs) == 1:  # a classifier: its features are an output too, so parity
        fn, outputs = _with_features(model, info), outputs + ["features"]  # compares them (a head may be 0)
    report = _flops_of(model, shape) if info is not None else None
    baseline = _flops.count(info, [None] * info.depth) if info is not None else None
    fields = reduction_fields(model) | {
        "model": model_name or type(model).__name__.removeprefix("Reduced"),
        "family": info.family if info is not None else None,
        "tokens": report.tokens if report is not None else None,
        "flops": None if report is None else {"total": report.total, "baseline": baseline.total,
                                              "ratio": baseline.total / report.total,
                                              "layers": report.to_dict()["layers"]},
        "preprocessing": preprocessing if preprocessing is not None else _pre(model, model_name, shape[-2:]),
        "stream": None,
    }
    if schedule is not None:
        fields["schedule"] = schedule
    batches = list(parity_batches or ([batch] if batch else [1, 4]))
    return ExportJob(fn, {INPUT_NAME: example}, outputs, batch is None,
                     (lambda path, bs: parity(path, fn, shape, bs, tolerance)) if check_parity else None,
                     batches, "ONNX Runtime CPU parity", fields, model)


def _with_features(model: nn.Module, info) -> Callable:
    """x -> (the model's output, the tokens its last block hands on): features next to the logits.
    A reduced model runs its own forward's steps (embed, blocks, finish); a plain one its library
    forward, with the last block's output taken by a hook."""
    from ..patch import adapter_for
    from ..patch.base import run_blocks

    adapter = adapter_for(model)
    if getattr(model, "edgetok_plan", None) is not None:
        def run(x):
            tokens, size = run_blocks(adapter, model, adapter.embed(model, x))
            return adapter.finish(model, tokens, size), tokens

        return run
    last = adapter.blocks(model)[-1]

    def run_plain(x):
        captured = []
        hook = last.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            out = model(x)
        finally:
            hook.remove()
        return out, captured[-1]

    return run_plain


def export_model(model: nn.Module, output_dir, *, target: Optional[str] = None, opset: Optional[int] = None,
                 batch: Optional[int] = None, parity_batches: Optional[Sequence[int]] = None,
                 tolerance: float = TOLERANCE, model_name: Optional[str] = None,
                 input_shape: Optional[Sequence[int]] = None, preprocessing: Optional[dict] = None, config=None,
                 check_parity: bool = True, schedule: Optional[dict] = None,
                 progress: Optional[Callable[[str], None]] = None, seed: Optional[int] = None,
                 force: bool = False, precision: Optional[str] = None, calibration=None) -> ExportResult:
    """Export ``model`` (reduced by edgetok.apply, or plain) to ``output_dir``/model.onnx
    with manifest.json, for ``target`` (see edgetok.export.TARGETS).

    ``target`` and ``opset`` default to the config's, else "portable" and 18.
    ``batch`` None gives a dynamic batch axis (named "batch"); an int fixes it.
    ``parity_batches`` (default 1 and 4, or ``batch``) are the batch sizes of the
    ONNX Runtime check. ``config`` is an ExportConfig whose target, opset and
    batch profile are used. ``input_shape`` (C, H, W) is needed only for models
    no edgetok adapter knows. ``schedule`` is the manifest's record of how the
    schedule was chosen (default: {"source": "given"} for a reduced model).
    ``precision`` fp32 | fp16 | int8 (default: the config's, else fp32) with ``calibration``
    images for int8 (a folder or an .npz; edgetok/export/precision.py).
    """
    target, opset = resolve_target(target, opset, config)
    plan = getattr(model, "edgetok_plan", None)
    if plan is not None and plan.adaptive:
        refuse_adaptive(config, plan.method)
    job = image_job(model, input_shape, batch, parity_batches, tolerance, check_parity, model_name, preprocessing,
                    schedule)
    return run_export(job, output_dir, target, opset, config, progress, seed, force, precision, calibration)


def export_onnx(model: nn.Module, input_shape: Sequence[int], opset: int = DEFAULT_OPSET,
                batch: Optional[int] = None):
    """The full-form ONNX model (edgetok nodes + their bodies) of ``model`` for images
    of ``input_shape`` (C, H, W): dynamic batch axis, or a fixed ``batch``, not written."""
    job = image_job(model, input_shape, batch, None, TOLERANCE, False, None, None, None)
    dynamic = None if batch is not None else {"inputs": ({0: batch_dim()},)}
    with _export_mode(model):
        return trace(_Traced(job.fn, model).eval(), tuple(job.example.values()), [INPUT_NAME], opset, job.outputs,
                     dynamic)


# -- models that are not image ViTs (edgetok/export/families.py) ------------------------------
def family_job(model: nn.Module, family, size, batch: Optional[int], parity_batches: Optional[Sequence[int]],
               tolerance: float, check_parity: bool, model_name: Optional[str]) -> ExportJob:
    model = family.prepare(model.eval()).eval()
    example = family.inputs(model, batch or 2, size, torch.Generator().manual_seed(0))
    names = list(example)

    def run(*inputs):
        return tuple(family.run(model, dict(zip(names, inputs))).values())

    def check(path, batches):
        return ort_parity(path, batches, lambda b, gen: family.inputs(model, b, size, gen),
                          lambda feeds: [t.numpy() for t in run(*feeds.values())], tolerance)

    outputs = [o if o not in names else f"{o}_out" for o in family.outputs(model, example)]  # SSA names
    fields = reduction_fields(model) | {
        "model": model_name or type(model).__name__.removeprefix("Reduced"), "family": family.family,
        "adaptive": False, "tokens": None, "flops": None, "preprocessing": None, "stream": None}
    return ExportJob(run, example, outputs, batch is None, check if check_parity else None,
                     list(parity_batches or ([batch] if batch else [1, 2])), "ONNX Runtime CPU parity", fields, model)


def export_family(model: nn.Module, output_dir, family=None, *, input_size: Optional[Sequence[int]] = None,
                  target: Optional[str] = None, opset: Optional[int] = None, batch: Optional[int] = None,
                  parity_batches: Optional[Sequence[int]] = None, tolerance: float = TOLERANCE,
                  model_name: Optional[str] = None, config=None, check_parity: bool = True,
                  progress: Optional[Callable[[str], None]] = None, seed: Optional[int] = None,
                  force: bool = False, precision: Optional[str] = None, calibration=None) -> ExportResult:
    """``export_model`` for a family edgetok/export/families.py describes (DETR, T5
    encoder, DiT; reduced by Focus-DETR / MrT5 / FlexDiT or plain): the family's named
    inputs, traced at ``input_size`` (default the family's), dynamic batch unless
    ``batch``; no token/FLOPs accounting (these families have no edgetok adapter)."""
    from .families import family_for, size_for

    family = family or family_for(model)
    if family is None:
        raise ExportError(f"edgetok has no export description for {type(model).__name__}")
    target, opset = resolve_target(target, opset, config)
    job = family_job(model, family, size_for(family, input_size), batch, parity_batches, tolerance, check_parity,
                     model_name)
    return run_export(job, output_dir, target, opset, config, progress, seed, force, precision, calibration)
