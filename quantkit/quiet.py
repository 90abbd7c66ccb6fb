"""Dependencies' notices that a user can do nothing about, silenced where quantkit triggers them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quieted(logger: logging.Logger) -> Iterator[None]:
    """``logger`` passes only errors inside the block, then its own level again."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def import_cpp_extension() -> None:
    """Import torch's C++ extension builder (Inductor's CPU compiles and the int8 kernel's build
    use it) without its notice, on machines without CUDA, that there is no CUDA runtime: true,
    and nothing a CPU build needs."""
    with quieted(logging.getLogger("torch.utils.cpp_extension")):
        import torch.utils.cpp_extension  # noqa: F401
