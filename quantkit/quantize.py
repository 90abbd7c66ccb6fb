"""Quantization methods, as torchao's ``quantize_(model, config)`` registers its handlers: a
method is one ``Method`` entry in ``METHODS`` (how to quantize a component's Linears, and how an
exported variant restores them), so adding one touches this module alone; the recipe schema's
list of methods comes from here.

- ``int8-weight-only``: torchao ``Int8WeightOnlyConfig`` (per-channel int8 weights, fp matmul).
- ``int8-dynamic``: torchao ``Int8DynamicActivationInt8WeightConfig`` (int8 x int8 matmul).
- ``int8-dynamic-fbgemm``: torch's ``quantize_dynamic`` (fbgemm/onednn packed weights; CPU only).
- ``bnb-int8``: bitsandbytes ``Linear8bitLt`` (LLM.int8 with outlier threshold 6).
- ``fp8-weight-only``: torchao ``Float8WeightOnlyConfig`` (per-row float8 e4m3 weights, matmul in
  the activations' dtype).

torch is imported inside the handlers: listing recipes needs none of it. torchao's configs are told
not to set Inductor's options process-wide; quantkit.inductor sets them per compile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable[["nn.Module", "torch.device"], None]
    # an exported variant's GPT skeleton, rebuilt so the stored state loads into it (None: the
    # stored tensors are assigned to a meta skeleton as they are)
    prepare_skeleton: Callable[["nn.Module"], None] | None = None
    # why variants of this method cannot be exported (None: they can)
    not_exportable: str | None = None
    # (device, compiled step) -> why it cannot run there (None: it can); asked before any loading
    unavailable: Callable[["torch.device", bool], str | None] | None = None


METHODS: dict[str, Method] = {}


def register(name: str, **options) -> Callable:
    """Decorator: the function quantizes every nn.Linear below a module for method ``name``."""
    def wrap(fn: Callable) -> Callable:
        METHODS[name] = Method(name, fn, **options)
        return fn
    return wrap


def _linear_filter(module, _fqn: str) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear)


@register("int8-weight-only")
def _torchao_weight_only(module, device) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=_linear_filter)


def _eager_int8_dynamic_on_cuda(device, compiled: bool) -> str | None:
    # Measured once (docs/performance.md). The likely cause, read in torchao 0.18's source: its eager
    # Linear hands cuBLAS one activation row, which the int8 product refuses, and the fallback
    # converts the whole weight to fp32 on every call
    if device.type == "cuda" and not compiled:
        return ("torchao's eager int8 dynamic Linear is impractically slow on CUDA (an eval ran over "
                "4 minutes without finishing); use int8-dynamic-compiled")
    return None


@register("int8-dynamic", unavailable=_eager_int8_dynamic_on_cuda)
def _torchao_dynamic(module, device) -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(module, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), filter_fn=_linear_filter)


@register("fp8-weight-only")
def _torchao_fp8_weight_only(module, device) -> None:
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    quantize_(module, Float8WeightOnlyConfig(set_inductor_config=False), filter_fn=_linear_filter)


def _fbgemm_skeleton(model) -> None:
    """fbgemm's packed int8 Linears have their own state-dict layout: build that module type for
    real (zeroed placeholders) to load the stored state into."""
    import torch
    from torch import nn

    model.to_empty(device="cpu")
    for t in model.parameters():
        t.data.zero_()  # placeholders only: load_state_dict overwrites them next
    torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def _cpu_only(device, compiled: bool) -> str | None:
    return None if device.type == "cpu" else "torch quantize_dynamic kernels run on CPU only"


@register("int8-dynamic-fbgemm", prepare_skeleton=_fbgemm_skeleton, unavailable=_cpu_only)
def _fbgemm(module, device) -> None:
    import torch
    from torch import nn

    torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)


# bitsandbytes' Int8Params cannot be loaded back into a module through load_state_dict on CPU
# (it refuses to copy int8 into a parameter that may require grad)
@register("bnb-int8", not_exportable="bitsandbytes int8 variants cannot be exported yet; "
                                     "export int8-dynamic or int8-dynamic-fbgemm instead")
def _bnb(module, device) -> None:
    import bitsandbytes as bnb
    from torch import nn

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


def unavailable(method: str, device: torch.device, compiled: bool) -> str | None:
    """Why ``method`` cannot run on ``device`` (with the compiled static-cache step or not), or None."""
    check = METHODS[method].unavailable if method in METHODS else None
    return check(device, compiled) if check else None


def quantize_module(module: nn.Module, method: str, device: torch.device) -> None:
    """Quantize every nn.Linear below ``module`` (its children are replaced or re-weighted)."""
    if method == "none":
        return
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}")
    METHODS[method].quantize(module, device)


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a Linear whose weight is stored in 8 bits (int8 or float8), by any of the backends above."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
        return True
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.dtype == torch.int8
    if isinstance(module, nn.Linear):
        inner = _inner_tensors(module.weight)
        return any(t.dtype in (torch.int8, torch.float8_e4m3fn) for t in inner)
    return False


def _inner_tensors(t) -> list:
    """The plain tensors that hold a (possibly subclassed or quantized) tensor's data."""
    import torch
    from torch import nn
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
