"""torch -> ONNX with one ``edgetok`` node per reduction step (see exporter.py).

``export_model(model, output_dir, target="portable")`` writes model.onnx and
manifest.json; ``TARGETS`` lists the targets (targets.py).
"""
from .targets import DOMAIN, TARGETS, apply_target


def __getattr__(name):
    # exporter imports torch.onnx machinery: load it only when used
    if name in ("export_model", "ExportResult", "export_onnx"):
        from . import exporter

        return getattr(exporter, name)
    if name == "export_dtd_step":
        from .dtd import export_dtd_step

        return export_dtd_step
    raise AttributeError(name)


__all__ = ["DOMAIN", "TARGETS", "apply_target", "export_model", "ExportResult", "export_onnx",
           "export_dtd_step"]
