"""What each edgetok op is, as data (no torch): its ONNX op type, whether a TensorRT
plugin exists for it (plugins/trt/plugins.cpp), and whether its output token count
depends on the data. The semantics are written once in docs/ops.md."""

# ONNX op type of each torch.ops.edgetok op
OP_TYPES = {"token_merge": "TokenMerge", "token_drop": "TokenDrop", "threshold_merge": "ThresholdMerge",
            "diff_drop": "DiffDrop"}
# op types with an IPluginV3 in plugins/trt/plugins.cpp; the others always run from their standard-op body
PLUGIN_OPS = frozenset({"TokenMerge", "TokenDrop", "ThresholdMerge"})
# op types whose output token count depends on the data (padded output + count)
ADAPTIVE_OPS = frozenset({"ThresholdMerge", "DiffDrop"})
