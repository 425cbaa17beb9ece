"""Streaming video encoding that computes only the patch tokens that changed
(encoder.py), its static-shape ONNX step and ORT runner (export.py), video
decoding (video.py) and the stream-vs-full report (report.py)."""
from .encoder import (StepOutput, StreamCore, StreamingEncoder, StreamState, default_budget, encode_full,
                      stream_normalization)

__all__ = ["StreamingEncoder", "StreamCore", "StreamState", "StepOutput", "default_budget", "encode_full",
           "stream_normalization"]
