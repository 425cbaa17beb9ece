"""Imports every built-in method module so their @register_method runs."""
from . import drop, dtd, dymu, tome  # noqa: F401
