"""sculpt: make text-to-image diffusion models forget concepts, measurably."""

__version__ = "0.1.0"
