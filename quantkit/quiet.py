"""Dependencies' notices that a user can do nothing about, silenced where quantkit triggers them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quieted(logger: logging.Logger) -> Iterator[None]:
    """``logger`` passes only errors inside the block. A filter of the block's own, not the
    logger's level: blocks in two threads at once leave the logger as they found it."""
    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logger.addFilter(errors_only)
    try:
        yield
    finally:
        logger.removeFilter(errors_only)


def import_cpp_extension() -> None:
    """Import torch's C++ extension builder (Inductor's CPU compiles and the int8 kernel's build
    use it) without its notice, on machines without CUDA, that there is no CUDA runtime: true,
    and nothing a CPU build needs."""
    with quieted(logging.getLogger("torch.utils.cpp_extension")):
        import torch.utils.cpp_extension  # noqa: F401


# transformers' bars over a model's tensors as it loads or saves them (hub downloads keep theirs)
LOAD_BARS = ("Loading weights", "Writing model shards")


def hide_load_bars() -> None:
    """Hide transformers' per-tensor bars: over in an instant, they only interleave with quantkit's
    own output. Process-wide (a tqdm hook), so for the command line and eval's workers only."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        return factory(*args, **({**kwargs, "disable": True} if kwargs.get("desc") in LOAD_BARS else kwargs))

    hf_logging.set_tqdm_hook(hook)
