"""Deployment configs (export_configs/*.yaml): one YAML per target device.

``load_config("jetson-orin-nano")`` or ``load_config("path/to/x.yaml")`` returns
an :class:`ExportConfig`. The exporter reads target/opset/batch; the TensorRT
builder reads precision, the batch profile, workspace, the TensorRT version
range, the SM arch and DLA cores. Every key is validated against ``SCHEMA``: an
unknown key or a bad value raises :class:`ConfigError` naming the file, the
key and what is allowed.

YAML keys (all listed in ``SCHEMA``)::

    description: one line                          (required)
    runtime: onnxruntime | tensorrt                (required)
    device: cpu | cuda | jetson                    (required)
    target: portable | trt | trt-override | inlined (required; see edgetok.export.targets)
    opset: 17..23                                  (required)
    precision: fp32 | fp16 | int8 | best           (required)
    batch: {min: 1, opt: 1, max: 8}                (required; min <= opt <= max)
    workspace_mib: 1024                            (TensorRT builder workspace)
    tensorrt: {min: "10.3", max: "10.3"}           (inclusive range, max may be omitted; tensorrt runtime only)
    cuda: "12.6"
    jetpack: "6"
    sm: 87                                         (compute capability x10)
    dla_cores: 0                                   (DLA engines on the SoC)
    plugin_api: IPluginV3 | IPluginV2DynamicExt    (what the TensorRT version offers)
    notes: free text
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .errors import EdgetokError
from .export.targets import TARGETS


class ConfigError(EdgetokError, ValueError):
    """An export config is missing, unreadable or does not follow the schema."""


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimisation profile for the dynamic batch axis."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class VersionRange:
    """Inclusive TensorRT version range; ``max`` None means no upper bound."""

    min: str
    max: Optional[str] = None

    def contains(self, version: str) -> bool:
        v = _vtuple(version)
        # compare only as many components as the bound gives: "10.3" contains 10.3.0.26
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


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".") if p.isdigit())


@dataclass(frozen=True)
class ExportConfig:
    name: str
    description: str
    runtime: str
    device: str
    target: str
    opset: int
    precision: str
    batch: BatchProfile
    workspace_mib: int = 1024
    tensorrt: Optional[VersionRange] = None
    cuda: Optional[str] = None
    jetpack: Optional[str] = None
    sm: Optional[int] = None
    dla_cores: int = 0
    plugin_api: Optional[str] = None
    notes: str = ""
    path: Optional[str] = field(default=None, compare=False)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["tensorrt"] = None if self.tensorrt is None else {"min": self.tensorrt.min, "max": self.tensorrt.max}
        return d


RUNTIMES = ("onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda", "jetson")
PRECISIONS = ("fp32", "fp16", "int8", "best")
PLUGIN_APIS = ("IPluginV3", "IPluginV2DynamicExt")
OPSETS = tuple(range(17, 24))
VERSION_RE = r"\d+(\.\d+)*"


# key -> (required, checker(value) -> converted value, description of allowed values)
def _choice(options):
    def check(v):
        if v not in options:
            raise ValueError
        return v

    return check, ", ".join(map(str, options))


def _int(lo, hi=None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise ValueError
        return v

    return check, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")


def _str():
    def check(v):
        if not isinstance(v, str):
            raise ValueError
        return v

    return check, "a string"


def _version():
    import re

    def check(v):
        v = str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if not isinstance(v, str) or not re.fullmatch(VERSION_RE, v):
            raise ValueError
        return v

    return check, 'a version string such as "10.3"'


SCHEMA: dict[str, tuple[bool, tuple[Callable, str]]] = {
    "description": (True, _str()),
    "runtime": (True, _choice(RUNTIMES)),
    "device": (True, _choice(DEVICES)),
    "target": (True, _choice(tuple(TARGETS))),
    "opset": (True, _choice(OPSETS)),
    "precision": (True, _choice(PRECISIONS)),
    "batch": (True, (None, "a mapping {min, opt, max} of integers >= 1 with min <= opt <= max")),
    "workspace_mib": (False, _int(1)),
    "tensorrt": (False, (None, 'a mapping {min: "10.3", max: "10.6"} of version strings (max optional)')),
    "cuda": (False, _version()),
    "jetpack": (False, _version()),
    "sm": (False, _int(50, 200)),
    "dla_cores": (False, _int(0, 8)),
    "plugin_api": (False, _choice(PLUGIN_APIS)),
    "notes": (False, _str()),
}


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


def _fail(path, key, value, allowed) -> ConfigError:
    return ConfigError(f"{path}: key {key!r} has bad value {value!r}; allowed: {allowed}")


def _batch(path, value) -> BatchProfile:
    allowed = SCHEMA["batch"][1][1]
    if not isinstance(value, dict) or set(value) != {"min", "opt", "max"}:
        raise _fail(path, "batch", value, allowed)
    vals = [value[k] for k in ("min", "opt", "max")]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals) or not vals[0] <= vals[1] <= vals[2]:
        raise _fail(path, "batch", value, allowed)
    return BatchProfile(*vals)


def _trt_range(path, value) -> VersionRange:
    allowed = SCHEMA["tensorrt"][1][1]
    check = _version()[0]
    if not isinstance(value, dict) or "min" not in value or set(value) - {"min", "max"}:
        raise _fail(path, "tensorrt", value, allowed)
    try:
        lo = check(value["min"])
        hi = None if value.get("max") is None else check(value["max"])
    except ValueError:
        raise _fail(path, "tensorrt", value, allowed) from None
    if hi is not None and _vtuple(hi) < _vtuple(lo):
        raise _fail(path, "tensorrt", value, allowed + " with min <= max")
    return VersionRange(lo, hi)


def parse_config(data: Any, name: str, path: str = "<config>") -> ExportConfig:
    """Validate a config mapping (as read from YAML) against ``SCHEMA``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an export config must be a YAML mapping of keys, got {type(data).__name__}")
    unknown = [k for k in data if k not in SCHEMA]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(SCHEMA)}")
    missing = [k for k, (req, _) in SCHEMA.items() if req and k not in data]
    if missing:
        raise ConfigError(f"{path}: missing required key {missing[0]!r}; required keys: "
                          + ", ".join(k for k, (req, _) in SCHEMA.items() if req))
    values: dict[str, Any] = {}
    for key, value in data.items():
        check, allowed = SCHEMA[key][1]
        if key == "batch":
            values[key] = _batch(path, value)
        elif key == "tensorrt":
            values[key] = None if value is None else _trt_range(path, value)
        else:
            try:
                values[key] = check(value)
            except ValueError:
                raise _fail(path, key, value, allowed) from None
    if values.get("tensorrt") is not None and values["runtime"] != "tensorrt":
        raise ConfigError(f"{path}: key 'tensorrt' is only allowed with runtime: tensorrt")
    if values["runtime"] == "tensorrt" and values.get("tensorrt") is None:
        raise ConfigError(f"{path}: missing key 'tensorrt' (the TensorRT version range) for runtime: tensorrt")
    return ExportConfig(name=name, path=path, **values)


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
