"""quantkit: precision and quantization experiments for ChatTTS."""

__version__ = "0.1.0"
