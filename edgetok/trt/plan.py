"""A TensorRT build plan: what one engine build needs, derived from an export
and a deployment config, and the trtexec command line that performs it.

The same plan drives the TensorRT Python API build (builder.py), the trtexec
command and the device build script (script.py), so the three never disagree.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import EdgetokError
from ..ops.spec import ADAPTIVE_OPS, PLUGIN_OPS
from ..runtime.artifacts import Artifacts, sha256_file

DOMAIN = "edgetok"
BUILD_FORMAT = 1  # bump when the meaning of a build key changes


class TargetMismatchError(EdgetokError, ValueError):
    """The config, the export and the machine do not fit together."""


def vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".") if p.isdigit())


def strongly_typed(trt_version: str) -> bool:
    """TensorRT 11 builds strongly typed networks only: precision comes from the ONNX types."""
    return vtuple(trt_version)[:1] >= (11,)


def plugin_flag(trt_version: str) -> str:
    """trtexec's flag to load a plugin library: --plugins before 8.6, --dynamicPlugins since."""
    return "--dynamicPlugins" if vtuple(trt_version)[:2] >= (8, 6) else "--plugins"


def sm_name(sm: int) -> str:
    return f"sm_{sm}"


def edgetok_ops(onnx_path: Path) -> tuple[set[str], set[str]]:
    """(op types of edgetok nodes in the graph, op types that have a local function body)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    nodes = {n.op_type for n in m.graph.node if n.domain == DOMAIN}
    bodies = {f.name for f in m.functions if f.domain == DOMAIN}
    return nodes, bodies




def _form(nodes: set[str], bodies: set[str], export_target: Optional[str]) -> str:
    """What the graph is, read off it: trt (a node without a body), portable/trt-override, or inlined."""
    if nodes - bodies:
        return "trt"
    if nodes:
        return export_target if export_target in ("portable", "trt-override", "trt") else "portable"
    return "inlined"


def _check_adaptive(art: Artifacts, config, nodes: set[str]) -> None:
    method = art.manifest.method if art.manifest else None
    adaptive = nodes & ADAPTIVE_OPS or (art.manifest and art.manifest.adaptive)
    if adaptive and not config.adaptive:
        raise TargetMismatchError(
            f"{art.onnx} reduces to a data-dependent token count ({method or ', '.join(sorted(nodes & ADAPTIVE_OPS))}), "
            f"which config {config.name!r} cannot build ({config.description}); use a fixed-count method "
            "(tome, drop) for this device"
        )


@dataclass
class BuildPlan:
    """One engine build: the ONNX, its input, the config's profile and precision."""

    onnx: Path
    onnx_sha256: str
    config: object  # edgetok.config.ExportConfig
    inputs: list  # TensorSpec per graph input; a symbolic axis 0 is the batch
    outputs: list
    needs_plugin: bool
    export_target: Optional[str]
    dla_core: Optional[int] = None  # run on this DLA core (GPU fallback for unsupported layers)

    # -- construction -----------------------------------------------------
    @classmethod
    def create(cls, art: Artifacts, config, dla_core: Optional[int] = None) -> "BuildPlan":
        if art.onnx is None:
            raise EdgetokError(f"{art.root}: no ONNX model to build from; run `edgetok export` first")
        if not config.runtime.startswith("tensorrt"):
            raise TargetMismatchError(
                f"config {config.name!r} is for {config.runtime}, not TensorRT; pick a TensorRT config "
                "(rtx, jetson-orin-nano, jetson-agx-orin, h100, a100, l4, t4, ...)"
            )
        inputs = art.inputs()
        for spec in inputs:
            if not spec.shape or not all(isinstance(d, int) for d in spec.shape[1:]):
                raise TargetMismatchError(
                    f"{art.onnx}: input {spec.name} has shape {spec.shape}; engines need fixed sizes besides the "
                    "batch axis: export the model for the image (or sequence) size you deploy"
                )
        nodes, bodies = edgetok_ops(art.onnx)
        _check_adaptive(art, config, nodes)
        export_target = art.manifest.target if art.manifest else None
        form = _form(nodes, bodies, export_target)
        if config.runtime == "tensorrt-rtx":
            if nodes - bodies:
                raise TargetMismatchError(
                    f"{art.onnx} has edgetok nodes without a body ({', '.join(sorted(nodes - bodies))}): TensorRT-RTX "
                    f"cannot load the edgetok plugins (docs/deploy.md); re-export with `edgetok export ... "
                    f"--config {config.name}`"
                )
        elif form != config.target and form != "inlined":
            raise TargetMismatchError(
                f"{art.onnx} is a {form!r} export but config {config.name!r} wants target {config.target!r} "
                f"(its TensorRT {config.tensorrt} would {'inline the function bodies instead of using the plugin' if config.target == 'trt' else 'need the function bodies or the plugin'}); "
                f"re-export with `edgetok export ... --config {config.name}`"
            )
        for spec in inputs:
            if not spec.batch_dynamic and not (config.batch.min <= spec.shape[0] <= config.batch.max):
                raise TargetMismatchError(
                    f"{art.onnx} has a fixed batch of {spec.shape[0]}, outside config {config.name!r}'s batch "
                    f"profile {config.batch.min}..{config.batch.max}; export with a dynamic batch"
                )
        if dla_core is not None:
            if not config.dla_cores:
                raise TargetMismatchError(
                    f"config {config.name!r} has no DLA cores ({config.description}); drop --dla-core"
                )
            if not 0 <= dla_core < config.dla_cores:
                raise TargetMismatchError(f"--dla-core {dla_core}: config {config.name!r} has DLA cores 0..{config.dla_cores - 1}")
            if config.precision == "fp32":
                raise TargetMismatchError("DLA runs fp16 or int8 only; use a config with precision fp16 for --dla-core")
        needs_plugin = config.runtime == "tensorrt" and (
            bool(nodes - bodies) or (bool(nodes & PLUGIN_OPS) and config.target == "trt-override"))
        return cls(art.onnx, sha256_file(art.onnx), config, inputs, art.outputs(), needs_plugin, export_target,
                   dla_core)

    # -- shapes -----------------------------------------------------------
    @property
    def batch_dynamic(self) -> bool:
        return any(i.batch_dynamic for i in self.inputs)

    def profile(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """input name -> min/opt/max shape (all equal to the fixed shape when its batch is static)."""
        b = self.config.batch
        out = {}
        for spec in self.inputs:
            if spec.batch_dynamic:
                out[spec.name] = {k: spec.with_batch(getattr(b, k)) for k in ("min", "opt", "max")}
            else:
                out[spec.name] = {k: tuple(spec.shape) for k in ("min", "opt", "max")}
        return out

    # -- precision --------------------------------------------------------
    def precision_for(self, trt_version: str) -> tuple[Optional[str], list[str], list[str]]:
        """(dtype to cast the ONNX to or None, trtexec precision flags, notes) for that TensorRT."""
        p = self.config.precision
        if strongly_typed(trt_version):
            if p == "int8":
                raise TargetMismatchError(
                    f"config {self.config.name!r} asks for int8 but TensorRT {trt_version} is strongly typed: "
                    "int8 needs a Q/DQ-quantized ONNX (e.g. NVIDIA ModelOpt); use precision fp16 or quantize first"
                )
            if p == "fp32":
                return None, ["--stronglyTyped"], []
            notes = ["best under a strongly typed TensorRT means fp16 (no int8 without Q/DQ)"] if p == "best" else []
            return "float16", ["--stronglyTyped"], notes + ["model cast to float16 (TensorRT >= 11 has no fp16 flag)"]
        if p == "fp32":
            return None, [], []
        if p == "fp16":
            return None, ["--fp16"], []
        note = "int8 without a calibration cache uses placeholder scales: fine for latency, not for accuracy"
        return None, ["--int8"] if p == "int8" else ["--best"], [note]

    def typed_precision(self) -> tuple[Optional[str], list[str]]:
        """(dtype to cast the ONNX to or None, notes) for a strongly typed builder (TensorRT-RTX)."""
        p = self.config.precision
        if p == "int8":
            raise TargetMismatchError(
                f"config {self.config.name!r} asks for int8 but {self.config.runtime} builds strongly typed "
                "networks: int8 needs a Q/DQ-quantized ONNX; use precision fp16 or fp32"
            )
        if p == "fp32":
            return None, []
        notes = ["best under a strongly typed builder means fp16"] if p == "best" else []
        return "float16", notes + ["model cast to float16 (strongly typed: the ONNX types carry the precision)"]

    # -- identity ---------------------------------------------------------
    def config_hash(self) -> str:
        d = self.config.to_dict()
        for k in ("path", "notes", "description", "name"):  # do not change what is built
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def build_key(self, trt_version: str, gpu: Optional[dict], plugin_sha256: Optional[str]) -> str:
        """Hash of everything an engine depends on: rebuild exactly when this changes."""
        payload = {
            "format": BUILD_FORMAT,
            "onnx_sha256": self.onnx_sha256,
            "config": self.config_hash(),
            "tensorrt": trt_version,
            "gpu": gpu,
            "plugin_sha256": plugin_sha256 if self.needs_plugin else None,
            "dla_core": self.dla_core,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # -- the equivalent trtexec command ----------------------------------
    def trtexec_command(
        self,
        trt_version: str,
        engine: str,
        onnx: Optional[str] = None,
        plugin_library: Optional[str] = None,
        timing_cache: Optional[str] = None,
    ) -> list[str]:
        """argv of trtexec building this plan's engine with that TensorRT version."""
        _, flags, _ = self.precision_for(trt_version)
        args = ["trtexec", f"--onnx={onnx or self.onnx}", f"--saveEngine={engine}"]
        if self.batch_dynamic:
            profile = self.profile()
            for key, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
                args.append(f"{flag}=" + ",".join(f"{name}:{'x'.join(map(str, p[key]))}" for name, p in profile.items()))
        args += flags
        args.append(f"--memPoolSize=workspace:{self.config.workspace_mib}M")
        if timing_cache:
            args.append(f"--timingCacheFile={timing_cache}")
        if self.needs_plugin:
            if not plugin_library:
                raise EdgetokError("this model needs the edgetok plugin library; pass its path")
            args.append(f"{plugin_flag(trt_version)}={plugin_library}")
        if self.dla_core is not None:
            if strongly_typed(trt_version):
                raise TargetMismatchError(f"TensorRT {trt_version} has no DLA support; drop --dla-core")
            args += [f"--useDLACore={self.dla_core}", "--allowGPUFallback"]
        # build only; `edgetok validate` measures
        args.append("--skipInference" if vtuple(trt_version)[:2] >= (8, 6) else "--buildOnly")
        return args
