"""Client helper over ``tritonclient``: images in, outputs out.

Works against ``edgetok serve`` and against a Triton server running the model
repository ``edgetok triton`` writes (both describe the same tensors).

    from edgetok.serve.client import Client
    with Client("127.0.0.1:8000", "vit", preprocess="out/vit") as c:   # the export dir: its preprocessing
        out = c.infer(photos)                                          # {output name: numpy array}

Preprocessing (resize, scale, normalise from the export manifest) runs here, on
the client, because the served model takes model-ready float32 NCHW tensors.
Batches larger than the model's max_batch_size are sent in chunks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EdgetokError, MissingDependencyError

PROTOCOLS = ("http", "grpc")


class ClientError(EdgetokError, RuntimeError):
    """The server refused a request or is not reachable."""


def _module(protocol: str):
    if protocol not in PROTOCOLS:
        raise ClientError(f"unknown protocol {protocol!r}; choose http or grpc")
    try:
        if protocol == "http":
            import tritonclient.http as m
        else:
            import tritonclient.grpc as m
    except ImportError:
        raise MissingDependencyError(f"the client needs tritonclient: pip install 'tritonclient[{protocol}]'") from None
    return m


class Client:
    """One model on one Triton server. ``infer(images)`` -> {output name: numpy array}."""

    def __init__(self, url: str, model: str, protocol: str = "http", preprocess=None,
                 timeout_s: float = 60.0, headers: Optional[dict] = None):
        self._tc = _module(protocol)
        self.url, self.model, self.protocol, self.headers = url, model, protocol, headers
        if protocol == "http":
            self._client = self._tc.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            self._client = self._tc.InferenceServerClient(url)
        self.timeout_s = timeout_s
        meta, cfg = self._call(self._client.get_model_metadata, model), self._call(self._client.get_model_config, model)
        if protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            meta, cfg = MessageToDict(meta, preserving_proto_field_name=True), MessageToDict(cfg, preserving_proto_field_name=True)
            cfg = cfg.get("config", cfg)
        self.inputs, self.outputs = meta["inputs"], meta["outputs"]
        if len(self.inputs) != 1:
            raise ClientError(f"{model} has {len(self.inputs)} inputs; this helper sends one image tensor")
        self.max_batch_size = int(cfg.get("max_batch_size", 0))
        self.preprocess = _preprocessor(preprocess, self.inputs[0]["shape"])

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, headers=self.headers, **kw)
        except self._tc.InferenceServerException as e:
            raise ClientError(f"{self.url} ({self.model}): {e.message()}") from None
        except OSError as e:
            raise ClientError(f"cannot reach Triton at {self.url}: {e}; is `edgetok serve` running?") from None

    def ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(headers=self.headers)
                        and self._client.is_model_ready(self.model, headers=self.headers))
        except Exception:
            return False

    def prepare(self, images) -> np.ndarray:
        if self.preprocess is not None:
            return self.preprocess(images)
        x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        return np.ascontiguousarray(x, dtype=np.float32)

    def infer_prepared(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Send a model-ready batch (split to max_batch_size), return the outputs concatenated."""
        step = self.max_batch_size or len(x)
        parts = [self._send(x[i:i + step]) for i in range(0, max(len(x), 1), max(step, 1))]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]

    def infer(self, images) -> dict[str, np.ndarray]:
        return self.infer_prepared(self.prepare(images))

    def __call__(self, images) -> np.ndarray:
        """The first output only (logits for a classifier)."""
        return self.infer(images)[self.outputs[0]["name"]]

    def _send(self, x: np.ndarray) -> dict[str, np.ndarray]:
        spec = self.inputs[0]
        inp = self._tc.InferInput(spec["name"], list(x.shape), spec["datatype"])
        inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=_numpy_type(spec["datatype"])))
        outs = [self._tc.InferRequestedOutput(o["name"]) for o in self.outputs]
        kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self._call(self._client.infer, self.model, [inp], outputs=outs, **kw)
        return {o["name"]: result.as_numpy(o["name"]) for o in self.outputs}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_) -> None:
        self.close()


_TYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
          "UINT8": np.uint8, "INT8": np.int8, "BOOL": np.bool_}


def _numpy_type(datatype: str):
    if datatype not in _TYPES:
        raise ClientError(f"input datatype {datatype} is not supported by this helper")
    return _TYPES[datatype]


def _preprocessor(preprocess, input_dims):
    """None, a Preprocessor, or an export directory / manifest.json whose preprocessing to use."""
    from ..runtime.preprocess import Preprocessor

    if preprocess is None or isinstance(preprocess, Preprocessor):
        return preprocess
    if isinstance(preprocess, (str, Path)):
        from ..runtime.manifest import NAME, Manifest

        p = Path(preprocess)
        p = p / NAME if p.is_dir() else p
        if not p.exists():
            raise ClientError(f"{p} does not exist; pass the export directory the server serves")
        shape = ["batch", *[int(d) for d in list(input_dims)[-3:]]]
        return Preprocessor.from_manifest(Manifest.read(p), shape)
    raise ClientError(f"preprocess must be None, a Preprocessor or an export directory, not {type(preprocess).__name__}")

