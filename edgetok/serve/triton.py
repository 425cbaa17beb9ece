"""Write an NVIDIA Triton Inference Server model repository for an export.

REPO/<name>/config.pbtxt + REPO/<name>/1/model.onnx (onnxruntime backend) or
model.plan (tensorrt backend). Inputs and outputs come from the manifests; the
batch dimension becomes max_batch_size with dynamic batching. A TensorRT model
that uses the edgetok plugins needs the plugin library loaded into the server
process: it is copied to REPO/plugins/ and REPO/README.md gives the
LD_PRELOAD / --backend-config=tensorrt,plugins= command line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import EdgetokError
from ..runtime.artifacts import TensorSpec, resolve, write_atomic

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "bfloat16": "TYPE_BF16"}
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


def _tensor(spec: TensorSpec, batched: bool) -> str:
    dims = spec.shape[1:] if batched else spec.shape
    dims = [d if isinstance(d, int) else -1 for d in dims]
    if spec.dtype not in TRITON_TYPES:
        raise EdgetokError(f"{spec.name}: dtype {spec.dtype} has no Triton type")
    return f'  {{\n    name: "{spec.name}"\n    data_type: {TRITON_TYPES[spec.dtype]}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'


def write_repository(path, output, backend: str = "onnxruntime", name: Optional[str] = None,
                     max_batch_size: Optional[int] = None, instances: int = 1, plugin_lib=None) -> Path:
    """Write the model repository; returns the model's config.pbtxt path."""
    if backend not in PLATFORMS:
        raise EdgetokError(f"unknown Triton backend {backend!r}; choose {' or '.join(PLATFORMS)}")
    art = resolve(path)
    platform, filename = PLATFORMS[backend]
    name = name or art.name.replace("/", "_")
    src = _model_file(art, path, backend)
    needs_plugin = backend == "tensorrt" and bool(art.engine_manifest.get("plugin") or
                                                   art.engine_manifest.get("needs_plugin"))
    repo = Path(output)
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    write_atomic(model_dir / "1" / filename, src.read_bytes())
    config = write_atomic(model_dir / "config.pbtxt", _config_text(art, name, platform, backend, max_batch_size,
                                                                   instances))
    readme = [f"# Triton model repository for {name}", "", f"Backend: {backend} (`{platform}`), written by edgetok.", ""]
    readme += _plugin_lines(repo, plugin_lib) if needs_plugin else ["```", "tritonserver --model-repository=$PWD", "```"]
    write_atomic(repo / "README.md", "\n".join(readme) + "\n")
    return config


def _model_file(art, path, backend: str) -> Path:
    src = art.onnx if backend == "onnxruntime" else art.engine
    if src is None:
        raise EdgetokError(
            f"{path} has no {'ONNX model' if backend == 'onnxruntime' else 'TensorRT engine'} for the {backend} backend"
            + ("; build one with `edgetok build` on the serving GPU" if backend == "tensorrt" else "")
        )
    if backend == "onnxruntime":
        from ..trt.plan import edgetok_ops

        nodes, bodies = edgetok_ops(art.onnx)
        if nodes - bodies:
            raise EdgetokError(
                f"{art.onnx} has edgetok nodes without function bodies ({', '.join(sorted(nodes - bodies))}), which "
                "ONNX Runtime cannot run; re-export with --target portable or use --backend tensorrt"
            )
    return src


def _config_text(art, name: str, platform: str, backend: str, max_batch_size: Optional[int], instances: int) -> str:
    inputs, outputs = art.inputs(), art.outputs()
    batched = all(s.batch_dynamic for s in inputs)
    if batched and max_batch_size is None:
        prof = (art.engine_manifest.get("inputs") or [{}])[0].get("profile")
        max_batch_size = prof["max"][0] if prof else 8
    mbs = max_batch_size if batched else 0
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_AUTO"
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {mbs}",
             "input [\n" + ",\n".join(_tensor(s, batched) for s in inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor(s, batched) for s in outputs) + "\n]",
             f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]"]
    if mbs:
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 100\n}")
    return "\n".join(lines) + "\n"


def _plugin_lines(repo: Path, plugin_lib) -> list[str]:
    """Copy the edgetok plugin library into the repository; the README lines that load it."""
    from ..runtime.env import plugin_library

    lib = plugin_library(plugin_lib)
    write_atomic(repo / "plugins" / lib.name, lib.read_bytes())
    return ["The engine uses the edgetok TensorRT plugins; load them into the server:", "", "```",
            f"LD_PRELOAD=$PWD/plugins/{lib.name} tritonserver --model-repository=$PWD",
            f"# or: tritonserver --model-repository=$PWD --backend-config=tensorrt,plugins=$PWD/plugins/{lib.name}",
            "```"]
