"""Deployment configs (export_configs/*.yaml): one YAML per target device.

``load_config("jetson-orin-nano")`` or ``load_config("path/to/x.yaml")`` returns
an :class:`ExportConfig`, a pydantic model: an unknown key, a wrong type or a bad
value raises :class:`ConfigError` naming the file, the key and what is allowed.
The exporter reads target/opset/batch/precision; the TensorRT builders read
precision, the batch profile, workspace, the version range, the SM arch(s) and
DLA cores.

YAML keys::

    description: one line                          (required)
    runtime: onnxruntime | tensorrt | tensorrt-rtx | openvino (required)
    device: cpu | cuda | jetson | rtx              (required)
    target: portable | trt | trt-override | inlined (required; see edgetok.export.targets)
    opset: 17..23                                  (required)
    precision: fp32 | fp16 | int8 | best           (required)
    batch: {min: 1, opt: 1, max: 8}                (required; min <= opt <= max)
    workspace_mib: 1024                            (TensorRT builder workspace)
    tensorrt: {min: "10.3", max: "10.3"}           (inclusive version range of the runtime's TensorRT,
                                                    or of TensorRT-RTX for runtime tensorrt-rtx)
    cuda: "12.6"
    jetpack: "6"
    sm: 87                                         (compute capability x10 of the one GPU it runs on)
    compute_capabilities: [86, 89, 120]            (tensorrt-rtx: the GPU generations one engine covers)
    dla_cores: 0                                   (DLA engines on the SoC)
    plugin_api: IPluginV3 | none                   (the edgetok plugins the TensorRT version can load)
    adaptive: true | false                         (whether data-dependent token counts, dymu and dtd,
                                                    can be deployed there; default true)
    notes: free text
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import EdgetokError

TARGET_NAMES = ("portable", "trt", "trt-override", "inlined")  # edgetok.export.targets.TARGETS
RUNTIMES = ("onnxruntime", "tensorrt", "tensorrt-rtx", "openvino")
DEVICES = ("cpu", "cuda", "jetson", "rtx")
PRECISIONS = ("fp32", "fp16", "int8", "best")
PLUGIN_APIS = ("IPluginV3", "none")
OPSETS = tuple(range(17, 24))
# ComputeCapability values TensorRT-RTX 1.7 can build for (tensorrt_rtx_bindings.ComputeCapability)
RTX_COMPUTE_CAPABILITIES = (75, 80, 86, 89, 120, 121)
VERSION_RE = r"\d+(\.\d+)*"


class ConfigError(EdgetokError, ValueError):
    """An export config is missing, unreadable or does not follow the schema."""


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".") if p.isdigit())


def _version(v: Any) -> str:
    v = str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if not isinstance(v, str) or not re.fullmatch(VERSION_RE, v):
        raise ValueError('a version string such as "10.3"')
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BatchProfile(_Strict):
    """TensorRT optimisation profile for the dynamic batch axis."""

    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min <= self.opt <= self.max:
            raise ValueError("min <= opt <= max")
        return self


class VersionRange(_Strict):
    """Inclusive version range; ``max`` None means no upper bound."""

    min: str
    max: Optional[str] = None

    def __init__(self, min: Any = None, max: Any = None, **kw):  # VersionRange("10.7", "10.14") reads well
        super().__init__(min=min, max=max, **kw)

    @field_validator("min", "max", mode="before")
    @classmethod
    def _v(cls, v):
        return None if v is None else _version(v)

    @model_validator(mode="after")
    def _ordered(self):
        if self.max is not None and _vtuple(self.max) < _vtuple(self.min):
            raise ValueError("min <= max")
        return self

    def contains(self, version: str) -> bool:
        # compare only as many components as the bound gives: "10.3" contains 10.3.0.26
        v = _vtuple(version)
        lo = _vtuple(self.min)
        if v[: len(lo)] < lo:
            return False
        if self.max is not None:
            hi = _vtuple(self.max)
            if v[: len(hi)] > hi:
                return False
        return True

    def __str__(self) -> str:
        return f">={self.min}" + (f",<={self.max}" if self.max else "")


# what each key allows, in words (the error message quotes it)
ALLOWED = {
    "description": "a string",
    "runtime": ", ".join(RUNTIMES),
    "device": ", ".join(DEVICES),
    "target": ", ".join(TARGET_NAMES),
    "opset": ", ".join(map(str, OPSETS)),
    "precision": ", ".join(PRECISIONS),
    "batch": "a mapping {min, opt, max} of integers >= 1 with min <= opt <= max",
    "workspace_mib": "an integer >= 1",
    "tensorrt": 'a mapping {min: "10.3", max: "10.6"} of version strings (max optional) with min <= max',
    "cuda": 'a version string such as "12.6"',
    "jetpack": 'a version string such as "6"',
    "sm": "an integer >= 50 and <= 200",
    "compute_capabilities": "a list of " + ", ".join(map(str, RTX_COMPUTE_CAPABILITIES)),
    "dla_cores": "an integer >= 0 and <= 8",
    "plugin_api": ", ".join(PLUGIN_APIS),
    "adaptive": "true or false",
    "notes": "a string",
}


class ExportConfig(_Strict):
    name: str
    description: str
    runtime: Literal[RUNTIMES]
    device: Literal[DEVICES]
    target: Literal[TARGET_NAMES]
    opset: Literal[OPSETS]
    precision: Literal[PRECISIONS]
    batch: BatchProfile
    workspace_mib: int = Field(1024, ge=1)
    tensorrt: Optional[VersionRange] = None
    cuda: Optional[str] = None
    jetpack: Optional[str] = None
    sm: Optional[int] = Field(None, ge=50, le=200)
    compute_capabilities: Optional[tuple[Literal[RTX_COMPUTE_CAPABILITIES], ...]] = None
    dla_cores: int = Field(0, ge=0, le=8)
    plugin_api: Optional[Literal[PLUGIN_APIS]] = None
    adaptive: bool = True
    notes: str = ""
    path: Optional[str] = Field(None, exclude=True)

    @field_validator("cuda", "jetpack", mode="before")
    @classmethod
    def _v(cls, v):
        return None if v is None else _version(v)

    @field_validator("batch", "tensorrt", mode="before")
    @classmethod
    def _mapping(cls, v):
        return v if v is None or isinstance(v, (dict, BaseModel)) else _raise(ValueError("a mapping"))

    @field_validator("compute_capabilities", mode="before")
    @classmethod
    def _list(cls, v):
        return tuple(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _runtime_keys(self):
        if self.tensorrt is not None and not self.runtime.startswith("tensorrt"):
            raise ValueError("key 'tensorrt' is only allowed with runtime: tensorrt or tensorrt-rtx")
        if self.runtime.startswith("tensorrt") and self.tensorrt is None:
            raise ValueError(f"missing key 'tensorrt' (the {self.runtime} version range) "
                              f"for runtime: {self.runtime}")
        if self.compute_capabilities is not None and self.runtime != "tensorrt-rtx":
            raise ValueError("key 'compute_capabilities' is only allowed with runtime: tensorrt-rtx "
                              "(TensorRT engines run on the one GPU arch 'sm' names)")
        if self.runtime == "tensorrt-rtx" and self.target == "trt":
            raise ValueError("runtime tensorrt-rtx cannot load the edgetok plugins (docs/deploy.md), "
                              "so target 'trt' (bodies stripped) cannot build there; use target: portable or inlined")
        if self.runtime == "openvino" and (self.target == "trt" or self.device != "cpu"):
            raise ValueError("runtime openvino runs standard ops on the CPU (edgetok/runtime/openvino.py): use "
                              "device: cpu and target: inlined or portable (target 'trt' has no bodies to run)")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json") | {"path": self.path}


def _raise(e):
    raise e


def config_dirs() -> list[Path]:
    """Where config names are looked up: $EDGETOK_CONFIG_DIR, ./export_configs, the repository's."""
    dirs = []
    if os.environ.get("EDGETOK_CONFIG_DIR"):
        dirs.append(Path(os.environ["EDGETOK_CONFIG_DIR"]))
    dirs += [Path.cwd() / "export_configs", Path(__file__).resolve().parents[1] / "export_configs"]
    seen, out = set(), []
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def list_configs() -> dict[str, Path]:
    """Config name -> file, over every config directory (earlier directories win)."""
    found: dict[str, Path] = {}
    for d in config_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                found.setdefault(p.stem, p)
    return found


def _resolve_path(path_or_name: Union[str, os.PathLike]) -> Path:
    p = Path(path_or_name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"export config {str(p)!r} does not exist")
        return p
    known = list_configs()
    if str(path_or_name) not in known:
        raise ConfigError(
            f"unknown export config {str(path_or_name)!r}; known configs: {', '.join(sorted(known)) or 'none'} "
            "(or pass a path to a .yaml file)"
        )
    return known[str(path_or_name)]


def _message(path: str, data: dict, error: dict) -> str:
    """One line for pydantic's first error: the file, the key, the bad value and what is allowed."""
    loc = error["loc"]
    key = str(loc[0]) if loc else ""
    if error["type"] == "extra_forbidden":
        allowed_keys = ", ".join(k for k in ExportConfig.model_fields if k not in ("name", "path"))
        return f"{path}: unknown key {key!r}; allowed keys: {allowed_keys}"
    if error["type"] == "missing":
        required = ", ".join(k for k, f in ExportConfig.model_fields.items() if f.is_required() and k != "name")
        return f"{path}: missing required key {key!r}; required keys: {required}"
    if not key:
        return f"{path}: {error['msg'].removeprefix('Value error, ')}"
    return f"{path}: key {key!r} has bad value {data.get(key)!r}; allowed: {ALLOWED.get(key, error['msg'])}"


def parse_config(data: Any, name: str, path: str = "<config>") -> ExportConfig:
    """Validate a config mapping (as read from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an export config must be a YAML mapping of keys, got {type(data).__name__}")
    if "name" in data or "path" in data:
        raise ConfigError(f"{path}: key {'name' if 'name' in data else 'path'!r} is not a YAML key "
                          "(a config's name is its file name)")
    try:
        return ExportConfig(name=name, path=path, **data)
    except ValidationError as e:
        raise ConfigError(_message(path, data, e.errors()[0])) from None


def load_config(path_or_name: Union[str, os.PathLike]) -> ExportConfig:
    """Load and validate one export config by file path or by name (``"t4"``)."""
    import yaml

    path = _resolve_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    return parse_config(data, path.stem, str(path))
