"""Names and places on disk that every layer shares: file-name slugs and the cache folder."""

from __future__ import annotations

import os
import re
from pathlib import Path


def slug(name: str) -> str:
    """A file-name-safe form of a concept name: "Tropical Fish!" -> "tropical-fish"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "concept"


def default_cache_dir() -> Path:
    """$SCULPT_CACHE, else ~/.cache/sculpt: generated training data, evaluation pictures, metrics."""
    return Path(os.environ.get("SCULPT_CACHE", Path.home() / ".cache" / "sculpt"))
