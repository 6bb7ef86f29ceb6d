"""Erasure methods, one module each, behind the interface in `base.py`."""

from sculpt.methods.base import ErasureMethod, MethodConfig, available_methods, get_method, register
from sculpt.methods import sculpting  # noqa: F401  (registers "sculpting")

__all__ = ["ErasureMethod", "MethodConfig", "available_methods", "get_method", "register"]
