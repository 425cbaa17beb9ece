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
from ..runtime.artifacts import Artifacts, TensorSpec, sha256_file

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


@dataclass
class BuildPlan:
    """One engine build: the ONNX, its input, the config's profile and precision."""

    onnx: Path
    onnx_sha256: str
    config: object  # edgetok.config.ExportConfig
    input: TensorSpec
    outputs: list
    needs_plugin: bool
    export_target: Optional[str]
    dla_core: Optional[int] = None  # run on this DLA core (GPU fallback for unsupported layers)

    # -- construction -----------------------------------------------------
    @classmethod
    def create(cls, art: Artifacts, config, dla_core: Optional[int] = None) -> "BuildPlan":
        if art.onnx is None:
            raise EdgetokError(f"{art.root}: no ONNX model to build from; run `edgetok export` first")
        if config.runtime != "tensorrt":
            raise TargetMismatchError(
                f"config {config.name!r} is for {config.runtime}, not TensorRT; pick a TensorRT config "
                "(jetson-orin-nano, jetson-agx-orin, h100, a100, l4, t4, ...)"
            )
        inputs = art.inputs()
        if len(inputs) != 1:
            raise EdgetokError(f"{art.onnx}: expected one image input, found {[i.name for i in inputs]}")
        spec = inputs[0]
        if len(spec.shape) != 4 or not all(isinstance(d, int) for d in spec.shape[1:]):
            raise TargetMismatchError(
                f"{art.onnx}: input {spec.name} has shape {spec.shape}; engines need [batch, C, H, W] with a fixed "
                "image size: export the model for the image size you deploy"
            )
        nodes, bodies = edgetok_ops(art.onnx)
        export_target = art.manifest.get("target")
        if nodes - bodies:
            form = "trt"
        elif nodes:
            form = export_target if export_target in ("portable", "trt-override") else "portable"
        else:
            form = "inlined"
        if form != config.target and form != "inlined":
            raise TargetMismatchError(
                f"{art.onnx} is a {form!r} export but config {config.name!r} wants target {config.target!r} "
                f"(its TensorRT {config.tensorrt} would {'inline the function bodies instead of using the plugin' if config.target == 'trt' else 'need the function bodies or the plugin'}); "
                f"re-export with `edgetok export ... --config {config.name}`"
            )
        if not spec.batch_dynamic:
            batch = spec.shape[0]
            if not (config.batch.min <= batch <= config.batch.max):
                raise TargetMismatchError(
                    f"{art.onnx} has a fixed batch of {batch}, outside config {config.name!r}'s batch profile "
                    f"{config.batch.min}..{config.batch.max}; export with a dynamic batch"
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
        needs_plugin = bool(nodes - bodies) or (bool(nodes) and config.target == "trt-override")
        return cls(art.onnx, sha256_file(art.onnx), config, spec, art.outputs(), needs_plugin, export_target, dla_core)

    # -- shapes -----------------------------------------------------------
    def profile(self) -> dict[str, tuple[int, ...]]:
        """min/opt/max input shapes (all equal to the fixed batch when the input's batch is static)."""
        b = self.config.batch
        if not self.input.batch_dynamic:
            fixed = tuple(self.input.shape)
            return {"min": fixed, "opt": fixed, "max": fixed}
        return {k: self.input.with_batch(getattr(b, k)) for k in ("min", "opt", "max")}

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
        if self.input.batch_dynamic:
            for key, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
                dims = "x".join(map(str, self.profile()[key]))
                args.append(f"{flag}={self.input.name}:{dims}")
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
