"""sculpt: make text-to-image diffusion models forget concepts, measurably."""

from sculpt.quiet import install_filters as _install_filters

__version__ = "0.1.0"
_install_filters()
