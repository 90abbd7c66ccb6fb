"""int8 quantization of a component's Linear layers, one backend per method.

- ``int8-weight-only``: torchao ``Int8WeightOnlyConfig`` (per-channel int8 weights, fp matmul).
- ``int8-dynamic``: torchao ``Int8DynamicActivationInt8WeightConfig`` (int8 x int8 matmul).
- ``int8-dynamic-fbgemm``: torch's ``quantize_dynamic`` (fbgemm/onednn packed weights; CPU only).
- ``bnb-int8``: bitsandbytes ``Linear8bitLt`` (LLM.int8 with outlier threshold 6).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _linear_filter(module: nn.Module, _fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _torchao(module: nn.Module, method: str) -> None:
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, quantize_)

    config = (Int8WeightOnlyConfig() if method == "int8-weight-only"
              else Int8DynamicActivationInt8WeightConfig())
    quantize_(module, config, filter_fn=_linear_filter)


def _fbgemm(module: nn.Module, device: torch.device) -> None:
    if device.type != "cpu":
        raise RuntimeError("torch quantize_dynamic kernels run on CPU only")
    torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)


def _bnb(module: nn.Module, device: torch.device) -> None:
    import bitsandbytes as bnb

    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(child.weight.data.float(), requires_grad=False,
                                         has_fp16_weights=False)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, q.to(device))  # bitsandbytes quantizes on the move to a device
        else:
            _bnb(child, device)


def quantize_module(module: nn.Module, method: str, device: torch.device) -> None:
    """Quantize every nn.Linear below ``module`` (its children are replaced or re-weighted)."""
    if method == "none":
        return
    if method in ("int8-weight-only", "int8-dynamic"):
        _torchao(module, method)
    elif method == "int8-dynamic-fbgemm":
        _fbgemm(module, device)
    elif method == "bnb-int8":
        _bnb(module, device)
    else:
        raise ValueError(f"unknown quantization method {method!r}")


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a Linear whose weight is stored in int8, by any of the backends above."""
    import bitsandbytes as bnb

    if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
        return True
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.dtype == torch.int8
    if isinstance(module, nn.Linear):
        inner = _inner_tensors(module.weight)
        return any(t.dtype == torch.int8 for t in inner)
    return False


def _inner_tensors(t) -> list[torch.Tensor]:
    """The plain tensors that hold a (possibly subclassed or quantized) tensor's data."""
    if isinstance(t, (tuple, list)):
        return [x for item in t for x in _inner_tensors(item)]
    if not isinstance(t, torch.Tensor):
        return []
    if t.is_quantized:
        # int8 values plus their per-channel or per-tensor quantization parameters
        extra = []
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra = [t.q_per_channel_scales(), t.q_per_channel_zero_points()]
        return [t.int_repr(), *extra]
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _inner_tensors(getattr(t, n))]
    return [t]


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers as stored (int8 data and scales for quantized layers)."""
    tensors = [t for v in module.state_dict(keep_vars=True).values() for t in _inner_tensors(v)]
    # ids are unique only while the tensors live: `tensors` keeps temporaries (int_repr) alive
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())
