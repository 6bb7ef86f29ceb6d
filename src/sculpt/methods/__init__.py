"""Erasure methods, one module each, behind the interface in `base.py`."""

from sculpt.methods.base import ErasureMethod, MethodConfig, available_methods, get_method, register
from sculpt.methods import sculpting  # noqa: F401  (registers "sculpting")
from sculpt.methods import esd  # noqa: F401  (registers "esd-x", "esd-u")
from sculpt.methods import uce  # noqa: F401  (registers "uce")
from sculpt.methods import ablation  # noqa: F401  (registers "ac")
from sculpt.methods import salun  # noqa: F401  (registers "salun")
from sculpt.methods import fmn  # noqa: F401  (registers "fmn")
from sculpt.methods import mace  # noqa: F401  (registers "mace")
from sculpt.methods import speed  # noqa: F401  (registers "speed")
from sculpt.methods import fia  # noqa: F401  (registers "fia")

__all__ = ["ErasureMethod", "MethodConfig", "available_methods", "get_method", "register"]
