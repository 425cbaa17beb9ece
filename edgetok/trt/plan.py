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
    from ..runtime.artifacts import load_onnx

    m = load_onnx(onnx_path)
    nodes = {n.op_type for n in m.graph.node if n.domain == DOMAIN}
    bodies = {f.name for f in m.functions if f.domain == DOMAIN}
    return nodes, bodies


# the newest default-domain opset each TensorRT major version's ONNX parser reads, where known
# (TensorRT 8.5/8.6, JetPack 5: opset 17); newer parsers read every opset edgetok writes (17..23)
MAX_PARSER_OPSET = {8: 17}


def check_opset(art: Artifacts, config) -> None:
    """The graph's opset is the manifest's, and one the config's TensorRT can parse."""
    from ..runtime.artifacts import load_onnx

    graph = load_onnx(art.onnx)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    if art.manifest is not None and opset != art.manifest.opset:
        raise TargetMismatchError(f"{art.onnx} has opset {opset} but its manifest says {art.manifest.opset}; "
                                  "re-export it")
    if config.runtime == "tensorrt" and config.tensorrt is not None:
        limit = MAX_PARSER_OPSET.get(vtuple(config.tensorrt.min)[0])
        if limit is not None and opset is not None and opset > limit:
            raise TargetMismatchError(f"{art.onnx} has opset {opset}; TensorRT {config.tensorrt.min} (config "
                                      f"{config.name!r}) parses opset <= {limit}; re-export with --config {config.name}")


def _form(nodes: set[str], bodies: set[str], export_target: Optional[str]) -> str:
    """What the graph is, read off it: trt (a node without a body), portable/trt-override, or inlined."""
    if nodes - bodies:
        return "trt"
    if nodes:
        return export_target if export_target in ("portable", "trt-override", "trt") else "portable"
    return "inlined"


def _check_precision(art: Artifacts, config) -> str:
    """The export's graph precision, refused where the config builds another: int8 engines come
    from a Q/DQ export only (TensorRT reads the scales from its Q/DQ nodes), and a float16 or Q/DQ
    graph is not built as something else."""
    from ..export.precision import graph_precision

    graph = art.manifest.precision.get("precision", "fp32") if art.manifest else graph_precision(art.onnx)
    want = config.precision
    if want == "int8" and graph != "int8":
        raise TargetMismatchError(
            f"config {config.name!r} builds int8, but {art.onnx} is a {graph} export; export it with "
            "`edgetok export ... --precision int8 --calibration DIR` (TensorRT reads the int8 scales from its "
            "Q/DQ nodes; without them it would use placeholder scales)")
    if graph == "int8" and want != "int8":
        raise TargetMismatchError(
            f"{art.onnx} is an int8 (Q/DQ) export but config {config.name!r} builds {want}; build it with a config "
            f"whose precision is int8 (a copy of {config.name}.yaml with precision: int8) or export it again in {want}")
    if graph == "fp16" and want == "fp32":
        raise TargetMismatchError(
            f"{art.onnx} is an fp16 export but config {config.name!r} builds fp32; export it again without "
            "--precision fp16, or build it with an fp16 config")
    return graph


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
    graph_precision: str = "fp32"  # the export's (edgetok export --precision): int8 is a Q/DQ graph

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
        check_opset(art, config)
        _check_adaptive(art, config, nodes)
        graph_precision = _check_precision(art, config)
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
                   dla_core, graph_precision)

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
        if p == "int8":  # a Q/DQ graph (checked by create): its scales are in the graph
            note = "int8 from the export's Q/DQ nodes (edgetok export --precision int8: calibrated scales)"
            return None, (["--stronglyTyped"] if strongly_typed(trt_version) else ["--int8", "--fp16"]), [note]
        if strongly_typed(trt_version):
            if p == "fp32":
                return None, ["--stronglyTyped"], []
            notes = ["best under a strongly typed TensorRT means fp16 (no int8 without Q/DQ)"] if p == "best" else []
            return "float16", ["--stronglyTyped"], notes + ["model cast to float16 (TensorRT >= 11 has no fp16 flag)"]
        if p == "fp32":
            return None, [], []
        if p == "fp16":
            return None, ["--fp16"], []
        return None, ["--best"], ["best lets TensorRT pick int8 per layer with placeholder scales: fine for latency, "
                                  "not for accuracy (export --precision int8 for calibrated scales)"]

    def typed_precision(self) -> tuple[Optional[str], list[str]]:
        """(dtype to cast the ONNX to or None, notes) for a strongly typed builder (TensorRT-RTX)."""
        p = self.config.precision
        if p == "int8":  # a Q/DQ graph (checked by create)
            return None, ["int8 from the export's Q/DQ nodes (edgetok export --precision int8: calibrated scales)"]
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
