"""manifest.json: what an exported model is, as one typed object (pydantic) with one
writer (``Manifest.write``, used by edgetok/export/exporter.py) and one reader
(``Manifest.read``, used by runtime.resolve for every tool that loads an export).

The field names are a contract (``MANIFEST_VERSION`` changes when one does). A
manifest missing a field, with a field of the wrong type or of another version is an
error naming the field and the fix (re-export), never a silent default. ``check_file``
compares model.onnx with the recorded sha256, so a swapped or edited model is caught
before it runs.

Fields:

- ``manifest_version`` int, this schema's version.
- ``model`` str, the name the model was created from (timm/HF/torchvision name,
  ``module:pkg.mod:factory``, or the class name for a Python object).
- ``family`` str, the edgetok adapter family (``timm-vit``, ...) or export family
  (``hf-detr``, ``hf-t5-encoder``, ``dit``), or null.
- ``method`` str, the reduction method (``tome``, ``drop``, ...; ``none`` when unreduced).
- ``params`` dict, the method's resolved parameters; per-layer values (r, threshold)
  are lists with one entry per block, i.e. the schedule.
- ``adaptive`` bool, true when token counts depend on the input (dymu, dtd): ``tokens``
  and ``flops`` are then upper bounds.
- ``opset`` int, the default-domain ONNX opset written in the graph; ``edgetok_opset``
  int, the version of the ``edgetok`` domain (null when no edgetok node is left).
- ``target`` str, one of edgetok.export.TARGETS (portable, trt, trt-override, inlined).
- ``edgetok_ops`` list of {``name``, ``op_type``, ``attributes``} for each edgetok node
  in graph order; ``function_bodies`` list of op types whose body is in the file;
  ``plugin_ops`` list of op types a TensorRT build runs as edgetok plugins (the plugin
  library must be loaded): those without a body (target trt), or every op with a plugin
  (target trt-override, which TensorRT >= 10.15 resolves to the plugin). DiffDrop has no
  plugin and keeps its body in every target.
- ``input`` {``name``, ``shape``, ``dtype``}: shape is a list whose dynamic batch axis
  is the string ``"batch"`` (an int when exported with a fixed batch); dtype a numpy
  dtype name (``float32``). ``inputs`` lists every graph input (``input`` is the first;
  a T5 encoder's input_ids + attention_mask, a streaming step's previous tokens);
  ``outputs`` every output, same conventions.
- ``tokens`` list of int: tokens entering each block, then after the last.
- ``flops`` {``total``, ``baseline``, ``ratio``, ``layers``}: FLOPs at batch 1
  (multiply-add = 2), of the reduced and the unreduced model, and baseline/total (the
  ideal speed-up); ``layers`` as edgetok.flops reports them.
- ``preprocessing`` the model's own image preprocessing (runtime/preprocess.py says
  what each field means) or null when the export is not an image model or it is unknown.
- ``schedule`` how the per-layer values in ``params`` were chosen: null for an
  unreduced model; {``source``: ``"given"``} when they were given; for ``--schedule
  auto`` the tuner's record (edgetok/tune/).
- ``stream`` null, or for a streaming step whose graph has a second, state input
  (``--method dtd``: edgetok/export/dtd.py) {``kind`` ("dtd"), ``threshold``,
  ``protect_first``, ``state_input``, ``state_output``, ``first_state`` ("zeros"),
  ``tokens``/``idx``/``count`` (output names)}. ``input`` is then the pixel input only.
- ``batch_profile`` {``min``, ``opt``, ``max``} from the export config, or null;
  ``config`` str, the export config name, or null.
- ``parity`` {``batches``, ``max_abs_err``, ``tolerance``, ``checked_on``, ...}: the
  ONNX Runtime CPU check against the torch model, or null when it was skipped (an fp16/int8
  export: the check of its float32 graph, before the conversion).
- ``precision`` {``precision`` (fp32 | fp16 | int8), what was done (``kept_fp32``, ``scheme``,
  ``quantized_ops``, ``calibration``, ...), ``parity`` against the float32 graph, ``note``}.
- ``seed`` int, the seed of the model's random initial weights (edgetok.patch.models.create_model:
  a reduced export and its baseline made with the same seed are the same network), or null when
  the weights came from a checkpoint or from the caller's own model.
- ``sha256`` str, of model.onnx; ``versions`` {torch, onnx, onnxruntime, onnxscript, edgetok}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import EdgetokError
from .preprocess import PreprocessSpec

MANIFEST_VERSION = 2
NAME = "manifest.json"
TARGETS = ("portable", "trt", "trt-override", "inlined")


class ManifestError(EdgetokError, ValueError):
    """A manifest is missing, malformed, of another version, or does not match its model."""


class TensorField(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[Union[int, str, None]]
    dtype: str = "float32"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    manifest_version: Literal[MANIFEST_VERSION]
    model: str
    family: Optional[str]
    method: str
    params: dict[str, Any]
    adaptive: bool
    opset: int
    edgetok_opset: Optional[int]
    target: Literal[TARGETS]
    edgetok_ops: list[dict[str, Any]]
    function_bodies: list[str]
    plugin_ops: list[str]
    input: TensorField
    inputs: list[TensorField]
    outputs: list[TensorField]
    tokens: Optional[list[int]]
    flops: Optional[dict[str, Any]]
    preprocessing: Optional[PreprocessSpec]
    schedule: Optional[dict[str, Any]]
    stream: Optional[dict[str, Any]]
    batch_profile: Optional[dict[str, int]]
    config: Optional[str]
    parity: Optional[dict[str, Any]]
    precision: dict[str, Any]  # fp32 | fp16 | int8 and what was done (edgetok/export/precision.py)
    seed: Optional[int]
    sha256: str
    versions: dict[str, str]

    # -- the one writer and the one reader -------------------------------------------
    def dumps(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    def write(self, directory: Path) -> Path:
        from .artifacts import write_atomic

        return write_atomic(Path(directory) / NAME, self.dumps())

    @classmethod
    def read(cls, path) -> "Manifest":
        """The manifest in an export directory (or at ``path``), validated."""
        p = Path(path)
        p = p / NAME if p.is_dir() else p
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise ManifestError(f"cannot read {p} ({e.strerror}); re-export the model with `edgetok export`") from None
        except json.JSONDecodeError as e:
            raise ManifestError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}); re-export the model") from None
        return cls.parse(data, str(p))

    @classmethod
    def parse(cls, data: Any, where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: a manifest is a JSON object, got {type(data).__name__}; re-export the model")
        version = data.get("manifest_version")
        if version != MANIFEST_VERSION:
            raise ManifestError(f"{where} is manifest version {version}, this edgetok reads version "
                                f"{MANIFEST_VERSION}; re-export the model with this edgetok")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "?"
            problem = "is missing" if err["type"] == "missing" else (
                "is not a field of the manifest" if err["type"] == "extra_forbidden" else f"is invalid ({err['msg']})")
            raise ManifestError(f"{where}: field {field!r} {problem}; re-export the model with `edgetok export`") from None

    def check_file(self, onnx_path: Path) -> None:
        """model.onnx must be the file this manifest describes (its sha256)."""
        from .artifacts import sha256_file

        got = sha256_file(onnx_path)
        if got != self.sha256:
            raise ManifestError(f"{onnx_path} is not the model its manifest describes (sha256 {got[:12]} != "
                                f"{self.sha256[:12]}); re-export it, or put back the model.onnx that was exported")
