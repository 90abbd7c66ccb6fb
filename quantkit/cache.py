"""quantkit's cache folder: synthetic weights, converted Whisper checkpoints, built kernels,
the ISA checks' answers and the record of trusted compiled code."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QUANTKIT_CACHE``, else ``~/.cache/quantkit``."""
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))
