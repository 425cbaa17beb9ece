"""What a path handed to edgetok points at: an export directory, an ONNX file or
an engine, with the manifests that travel with them.

An export directory holds ``model.onnx`` + ``manifest.json`` (written by
``edgetok export``) and, once built, ``engine.plan`` + ``engine.json`` (written
by ``edgetok build``). A bare ONNX file is described by its graph alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from ..errors import EdgetokError

if TYPE_CHECKING:
    from .manifest import Manifest

ONNX_NAME = "model.onnx"
EXPORT_MANIFEST = "manifest.json"
ENGINE_NAME = "engine.plan"
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


class ArtifactError(EdgetokError, ValueError):
    """A path is not an export directory, an ONNX file or an engine."""


@dataclass
class TensorSpec:
    """One model input/output: ``shape`` entries are ints or a symbolic name ("batch")."""

    name: str
    shape: list
    dtype: str = "float32"

    @property
    def batch_dynamic(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)

    def with_batch(self, batch: int) -> tuple[int, ...]:
        dims = [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(self.shape)]
        if not all(isinstance(d, int) for d in dims):
            raise ArtifactError(f"{self.name}: shape {self.shape} has symbolic dimensions besides the batch")
        return tuple(dims)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class Artifacts:
    """The files behind one path and what they say about the model."""

    root: Path
    onnx: Optional[Path] = None
    engine: Optional[Path] = None
    manifest: Optional["Manifest"] = None  # the export manifest (runtime/manifest.py), None for a bare file
    engine_manifest: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.model if self.manifest else str((self.onnx or self.engine or self.root).stem)

    def inputs(self) -> list[TensorSpec]:
        if self.manifest:
            return [TensorSpec(t.name, list(t.shape), t.dtype) for t in self.manifest.inputs]
        if self.engine_manifest.get("inputs"):
            return [_spec(d) for d in self.engine_manifest["inputs"]]
        if self.onnx is not None:
            return onnx_io(self.onnx)[0]
        raise ArtifactError(f"{self.root}: no manifest and no ONNX file say what the model's input is")

    def outputs(self) -> list[TensorSpec]:
        if self.manifest:
            return [TensorSpec(t.name, list(t.shape), t.dtype) for t in self.manifest.outputs]
        if self.onnx is not None:
            return onnx_io(self.onnx)[1]
        if self.engine_manifest.get("outputs"):
            return [_spec(d) for d in self.engine_manifest["outputs"]]
        raise ArtifactError(f"{self.root}: no manifest and no ONNX file say what the model's outputs are")


def _spec(d: dict) -> TensorSpec:
    return TensorSpec(d["name"], list(d["shape"]), str(d.get("dtype", "float32")))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-create it") from None


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str]) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        # mkstemp makes the file private: give it the mode a plain write would (the user's umask)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj, sort_keys: bool = True) -> Path:
    """``obj`` as indented JSON at ``path``, atomically (values JSON cannot hold are written as str)."""
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32", 2: "uint8", 3: "int8", 9: "bool"}


def load_onnx(path, load_external_data: bool = False):
    """onnx.load with a one-line error for a file that is not (or no longer) an ONNX model."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # protobuf decode errors share no base class with OSError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ArtifactError(f"{path} is not a readable ONNX model ({first}); re-export it") from None


def onnx_io(path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers excluded) and outputs of an ONNX file, without loading weights."""
    model = load_onnx(path)
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return TensorSpec(v.name, dims, _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)))

    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def resolve(path: Union[str, os.PathLike]) -> Artifacts:
    """Artifacts for an export directory, an ONNX file or an engine file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass an export directory, a .onnx file or an engine")
    if p.is_dir():
        onnx_path = p / ONNX_NAME if (p / ONNX_NAME).exists() else None
        engine = p / ENGINE_NAME if (p / ENGINE_NAME).exists() else None
        if onnx_path is None and engine is None:
            raise ArtifactError(f"{p} has neither {ONNX_NAME} nor {ENGINE_NAME}; run `edgetok export` into it first")
        art = Artifacts(p, onnx_path, engine)
        meta_dir = p
    elif p.suffix == ".onnx":
        art, meta_dir = Artifacts(p.parent, onnx=p), p.parent
        sibling_engine = p.parent / ENGINE_NAME
        if sibling_engine.exists():
            art.engine = sibling_engine
    elif p.suffix in ENGINE_SUFFIXES:
        art, meta_dir = Artifacts(p.parent, engine=p), p.parent
        if (p.parent / ONNX_NAME).exists():
            art.onnx = p.parent / ONNX_NAME
    else:
        raise ArtifactError(
            f"{p}: unknown file type {p.suffix!r}; pass an export directory, a .onnx file or an engine "
            f"({', '.join(ENGINE_SUFFIXES)})"
        )
    if (meta_dir / EXPORT_MANIFEST).exists():
        from .manifest import Manifest

        art.manifest = Manifest.read(meta_dir / EXPORT_MANIFEST)
        if art.onnx is not None and art.onnx.name == ONNX_NAME:
            art.manifest.check_file(art.onnx)
    if art.engine is not None:
        em = engine_manifest_path(art.engine)
        if em.exists():
            art.engine_manifest = read_json(em)
    return art


def engine_manifest_path(engine: Path) -> Path:
    """engine.plan -> engine.json (any other engine name: same stem, .json)."""
    return engine.with_suffix(".json")
