"""Errors edgetok raises on bad input. Each message names the problem and the fix."""


class EdgetokError(Exception):
    """Base class of every error edgetok raises on purpose."""


class UnsupportedModelError(EdgetokError, TypeError):
    """The model is not one of the families an adapter knows."""


class ScheduleError(EdgetokError, ValueError):
    """A reduction schedule asks for something the token counts cannot give."""


class UnknownMethodError(EdgetokError, KeyError):
    """No reduction method is registered under that name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class InputShapeError(EdgetokError, ValueError):
    """The input tensor does not have the shape the model expects."""


class MissingDependencyError(EdgetokError, ImportError):
    """An optional dependency (TensorRT, matplotlib, ...) is needed for this path."""
