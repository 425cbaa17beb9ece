"""Token reduction methods, pure torch, one module per paper."""
from .registry import Plan, get_method, methods, register_method
from .schedule import Linear

__all__ = ["Plan", "Linear", "get_method", "methods", "register_method"]
