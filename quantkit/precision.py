"""fp16 / bf16 casting of one ChatTTS component, keeping its inputs and outputs in fp32.

ChatTTS hands fp32 tensors between components (hidden states, mel spectrograms), so a
half-precision component casts its floating inputs on the way in and its output back on
the way out. Hooks do that without replacing modules that ChatTTS holds bound methods of.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (its compute precision)."""
    return next(p for p in module.parameters() if p.is_floating_point()).dtype


def cast_module(module: nn.Module, dtype_name: str) -> None:
    """Cast ``module``'s weights to ``dtype_name`` with fp32 at its boundary."""
    dtype = DTYPES[dtype_name]
    if dtype == torch.float32:
        return
    module.to(dtype)
    module.register_forward_pre_hook(
        lambda _m, args, kwargs: (tuple(_cast(a, dtype) for a in args),
                                  {k: _cast(v, dtype) for k, v in kwargs.items()}),
        with_kwargs=True)
    module.register_forward_hook(lambda _m, _args, out: _cast(out, torch.float32))
