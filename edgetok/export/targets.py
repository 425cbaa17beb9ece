"""Export targets: what happens to the ``edgetok`` function bodies after export.

Every export first produces the full form (one ``edgetok`` node per reduction
step plus one model-local FunctionProto per op type); a target then rewrites
it for the runtime that will load it. Why these four (docs/deploy.md, "Which
form each TensorRT version needs"): TensorRT <= 10.6 always inlines a local function and ignores a plugin,
10.7-10.14 prefers a registered plugin, 10.15+ takes the plugin when the node
carries ``plugin_namespace``.

- ``portable``: bodies kept; runs in ONNX Runtime and anything without the plugin.
- ``trt``: bodies stripped from the ops that have a plugin, so TensorRT <= 10.6
  (JetPack 6 ships 10.3) must use the edgetok plugin; an op without a plugin
  (DiffDrop) keeps its body, which TensorRT inlines (the manifest's
  ``plugin_ops`` and ``function_bodies`` say which is which).
- ``trt-override``: bodies kept; TensorRT >= 10.15 still picks the plugin.
- ``inlined``: every edgetok node replaced by its body, a plain standard-op graph
  (no custom domain, no functions) for runtimes that handle neither, and the
  no-plugin fallback for TensorRT (TensorRT 8.5 on JetPack 5). Constants are
  folded afterwards (onnxscript's optimizer): with static token counts the
  bodies' shape arithmetic becomes constants (ToMe on ViT-Ti: 297 -> 199 nodes).
"""
from __future__ import annotations

from typing import Callable

DOMAIN = "edgetok"

TARGETS: dict[str, str] = {
    "portable": "edgetok nodes with function bodies (ONNX Runtime, any runtime)",
    "trt": "edgetok nodes without bodies: TensorRT must use the plugin (TRT <= 10.6, JetPack 5/6)",
    "trt-override": "edgetok nodes with bodies; TensorRT >= 10.15 picks the plugin by plugin_namespace",
    "inlined": "standard ops only: every edgetok node replaced by its body",
}


def _keep(model):
    return model


def _strip_bodies(model):
    from ..ops.spec import PLUGIN_OPS

    funcs = [f for f in model.functions if f.domain != DOMAIN or f.name not in PLUGIN_OPS]
    del model.functions[:]
    model.functions.extend(funcs)
    return model


def _inline(model):
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(model)
    # the edgetok domain is no longer used by any node: drop its opset import
    imports = [o for o in inlined.opset_import if o.domain != DOMAIN]
    del inlined.opset_import[:]
    inlined.opset_import.extend(imports)
    return _fold(inlined)


def _fold(model):
    """Constant folding and dead-node removal (onnxscript's optimizer), keeping the opset."""
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


_REWRITES: dict[str, Callable] = {
    "portable": _keep,
    "trt": _strip_bodies,
    "trt-override": _keep,
    "inlined": _inline,
}


def apply_target(model, target: str):
    """The ModelProto rewritten for ``target`` (may modify ``model`` in place)."""
    from ..errors import EdgetokError

    if target not in _REWRITES:
        raise EdgetokError(f"unknown export target {target!r}; targets: {', '.join(TARGETS)}")
    return _REWRITES[target](model)
