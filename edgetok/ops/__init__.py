"""torch.library custom ops, one per reduction step (see library.py); spec.py says what
each is as data, without importing torch."""

__all__ = ["token_merge", "token_drop", "threshold_merge", "diff_drop"]


def __getattr__(name):
    if name in __all__:
        from . import library

        return getattr(library, name)
    raise AttributeError(name)
