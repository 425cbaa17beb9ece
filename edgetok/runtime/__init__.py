"""Python runtime API: one Session interface over ONNX Runtime (CPU/CUDA),
TensorRT engines and torch, with the export's preprocessing, plus the
streaming-video session (differential token drop).

    import edgetok.runtime as rt
    sess = rt.load("out/vit")                # best backend: TensorRT > ORT CUDA > ORT CPU
    logits = sess(images)                    # numpy or torch in, numpy out
"""
from .artifacts import ArtifactError, Artifacts, TensorSpec, resolve
from .backends import BACKENDS, BackendError, get_backend, pick_backend
from .preprocess import Preprocessor
from .session import Session, load
from .stream import FrameTokens, StreamSession

__all__ = [
    "load", "Session", "StreamSession", "FrameTokens", "Preprocessor", "BACKENDS", "get_backend", "pick_backend",
    "resolve", "Artifacts", "TensorSpec", "ArtifactError", "BackendError",
]
