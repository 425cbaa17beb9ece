"""Cast an ONNX model's float32 compute to float16/bfloat16 for strongly typed
TensorRT (TensorRT 11 and TensorRT-RTX have no fp16 builder flag: the types in the
ONNX decide the precision).

The transform is edgetok.export.precision.to_fp16, the same one ``edgetok export
--precision fp16`` writes: float32 inputs and outputs (a Cast after each float input
and before each float output, so callers and manifests do not change), float16
inside, and every edgetok node kept in float32 (its inputs cast up, its outputs cast
down, its function body untouched), so the reduction ops' cosine scores, -inf masks,
TopK keys and size sums never round to float16. A graph that is already fp16 (an
``--precision fp16`` export) is returned as it is; a Q/DQ (int8) graph is refused:
its precision is in its Q/DQ nodes.
"""
from __future__ import annotations

from ..errors import EdgetokError
from ..export.precision import DTYPES, PrecisionError, fp32_gemm, graph_precision, to_fp16

__all__ = ["DTYPES", "cast_model", "fp32_gemm"]

def cast_model(model, dtype: str = "float16", reduction_fp32: bool = True):
    """A copy of ``model`` (onnx.ModelProto) computing in ``dtype`` with float32 I/O; the edgetok
    ops in float32 unless ``reduction_fp32`` is False (GPUs without float32 GEMM: see fp32_gemm)."""
    import onnx

    if dtype not in DTYPES:
        raise EdgetokError(f"cannot cast an ONNX model to {dtype!r}; choose one of {', '.join(DTYPES)}")
    done = graph_precision(model)
    if done == {"float16": "fp16", "bfloat16": "bf16"}[dtype]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return m
    if done != "fp32":
        raise PrecisionError(f"the model is already {done} (edgetok export --precision {done}); build it with a "
                             f"config whose precision is {done}, or export fp32 to cast it to {dtype}")
    return to_fp16(model, (), dtype, reduction_fp32)[0]
