"""quantkit: precision and quantization experiments for ChatTTS."""

__version__ = "0.1.0"


def load_variant(path, device: str = "cpu"):
    """A ready ChatTTS ``Chat`` from a directory written by ``python -m quantkit export``."""
    from quantkit.export import load_variant as _load

    return _load(path, device=device)
