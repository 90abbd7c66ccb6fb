"""The Linears a decode step calls: plain-tensor twins of the model's own Linears (sharing
their weights) that compile to faster code than the originals at one token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit import int8_gemv


class PlainInt8Linear(nn.Module):
    """A torchao int8 Linear (``Int8Tensor`` weight) computed on its plain int8 data and scales.

    Same arithmetic as torchao's Int8Tensor linear for per-row weights (with torch < 2.12,
    whose CPU path is s8s8 ``_int_mm``): per-row symmetric int8 activations, int8 x int8 -> int32,
    times the activation scale, times the weight scale; weight-only: matmul on the int8 weight
    cast to the activation dtype, times the scale. Inside a compiled step a tensor subclass per
    weight costs guard checks and unwrapping on every call (a fifth of the step for the 140 GPT
    Linears); plain buffers cost nothing. The buffers are views of torchao's tensors.

    It also sidesteps a wrong result: compiling torchao's own linear, Inductor hands ``_int_mm``
    the (1, K) activation with strides (0, 1), and torch 2.11's CPU ``_int_mm`` then returns
    zeros. The tests compare the two paths.
    (Weight-only at one token sums in another order than torchao's mm: equal to rounding.)

    Dynamic int8 on a CPU with AVX512-VNNI runs on quantkit's kernel (``int8_gemv``) over a
    packed copy of the weight: the same int32 products, streamed about twice as fast."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dynamic: bool, use_kernel: bool = True):
        super().__init__()
        self.register_buffer("scale", scale.flatten(), persistent=False)
        self.dynamic = dynamic
        self.packed = use_kernel and dynamic and _vnni_usable(qdata)
        if self.packed:
            # A copy of the int8 weight in the VNNI kernel's order (the model keeps its own).
            panels, comp = int8_gemv.pack(qdata)
            self.register_buffer("panels", panels, persistent=False)
            self.register_buffer("comp", comp, persistent=False)
        else:
            self.register_buffer("qdata_t", qdata.t(), persistent=False)

    @classmethod
    def of(cls, weight: torch.Tensor, use_kernel: bool = True) -> "PlainInt8Linear":
        """The twin of one torchao Int8Tensor weight (its buffers are views of torchao's)."""
        return cls(weight.qdata, weight.scale, weight.act_quant_kwargs is not None, use_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        if self.dynamic:
            xq, x_scale = quantize_rows(x2, unsigned=self.packed)
            if self.packed:
                acc = int8_gemv.int8_gemv(xq, self.panels, self.comp)[:, :self.scale.shape[0]]
            else:
                acc = int_mm(xq, self.qdata_t)
            y = (acc.float() * x_scale).to(x.dtype)  # x_scale: (rows, 1) fp32
            y = y * self.scale
        elif x2.shape[0] == 1:
            # A decode step's GEMV written as a multiply-and-sum that Inductor fuses with the
            # int8 -> float conversion (gpt-fast's int8 weight-only recipe): compiled, mm on
            # `qdata.to(float)` writes the whole float weight out first.
            y = (self.qdata_t.t() * x2).sum(-1, keepdim=True).t() * self.scale.to(x.dtype)
        else:
            y = torch.mm(x2, self.qdata_t.to(x.dtype))
            y = y * self.scale.to(y.dtype)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class PlainFloat8Linear(nn.Module):
    """A torchao float8 weight-only Linear (``Float8Tensor`` weight, per-row scales) computed on its
    plain float8 data and scales, for the reason PlainInt8Linear exists: a tensor subclass cannot
    enter the layers' nested compile region. torchao's arithmetic: the weight dequantized in fp32
    and rounded to the activations' dtype, then the product; at one token as a multiply-and-sum
    (fp32 accumulation) that Inductor fuses with the conversion, so a step streams float8 bytes."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qdata", qdata, persistent=False)
        self.register_buffer("scale", scale.reshape(-1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.qdata.float() * self.scale).to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = (w.float() * x2.float()).sum(-1).to(x.dtype)[None] if x2.shape[0] == 1 else x2 @ w.t()
        return y.reshape(*x.shape[:-1], -1)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm``, whose CUDA kernel wants more than 16 rows: on CUDA 16 zero rows are
    added whatever the count (padding only short inputs would make the compiled prompt pass, whose
    length is symbolic, guard on it and compile again for prompts of more than 16 tokens)."""
    if a.is_cuda:
        return torch._int_mm(F.pad(a, (0, 0, 0, 16)), b)[:a.shape[0]]
    return torch._int_mm(a, b)


def quantize_rows(x: torch.Tensor, unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 -> (int8 values, fp32 scales (rows, 1)): torchao's
    ``choose_qparams_affine`` and ``quantize_affine`` for this one case, op for op (so the
    results are equal), without their generic block handling, which costs more than the
    arithmetic in an eager prompt pass (80 Linears). ``unsigned``: the values plus 128 as uint8,
    the VNNI kernel's input."""
    # max(-min(amin, 0), max(amax, 0)) in torchao: the same value as max |x|
    scale = (x.abs().amax(-1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    scale = scale.to(torch.float32)
    q = torch.clamp(torch.round(x * (1.0 / scale)), -128, 127)
    # Offset in float, then converted: Inductor vectorizes float -> uint8, not int8 -> int16 -> uint8
    return (q + 128).to(torch.uint8) if unsigned else q.to(torch.int8), scale


class RowsLinear(nn.Module):
    """fp32 Linears without bias read by a few rows on a VNNI CPU, as one packed copy of their
    weights: ``int8_gemv.linear_rows`` reads each weight once for all the rows."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out = weight.shape[0]
        self.register_buffer("panels", int8_gemv.pack_float(weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_gemv.linear_rows(x.reshape(-1, x.shape[-1]), self.panels)[:, :self.out].view(*x.shape[:-1], -1)


class SharedInput(nn.Module):
    """Linears that read the same input (q, k, v; gate, up; the code heads) -> their outputs.

    Where every twin is a kernel-packed int8 Linear, they run as one: one activation
    quantization and one kernel call streaming all their weights, instead of one each (each call
    costs a few microseconds of dispatch and thread start, 140 of them per step). ``rows``: fp32
    twins run as one RowsLinear (the code heads of a step on the int8 kernel's library)."""

    def __init__(self, linears: list[nn.Module], device: torch.device, rows: bool = False):
        super().__init__()
        self.sizes = [lin.weight.shape[0] for lin in linears]
        views = [plain_int8_twin(lin, use_kernel=False) for lin in linears]
        self.fused = None
        if (len(views) > 1 and all(isinstance(v, PlainInt8Linear) and v.dynamic for v in views)
                and _vnni_usable(views[0].qdata_t.t())):  # one input: same K and device for all
            self.fused = PlainInt8Linear(torch.cat([v.qdata_t.t() for v in views]),
                                         torch.cat([v.scale for v in views]), dynamic=True)
        self.twins = nn.ModuleList([] if self.fused else [decode_twin(lin, device) for lin in linears])
        if rows and _rows_fusable(list(self.twins)):
            self.fused = RowsLinear(torch.cat([t.weight for t in self.twins]))
        # The heads get fp32 hidden states, and ChatTTS feeds them the GPT's in their own dtype
        weight = linears[0].weight
        self.dtype = weight.dtype if weight.is_floating_point() else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused is not None:
            return list(self.fused(x).split(self.sizes, -1))
        x = x if self.dtype is None else x.to(self.dtype)
        return [twin(x) for twin in self.twins]


def rows_usable(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """An fp32 Linear without bias on a CPU where the kernel library runs: RowsLinear takes it."""
    return bias is None and weight.dtype == torch.float32 and _vnni_usable(weight)


def _rows_fusable(twins: list[nn.Module]) -> bool:
    return bool(twins) and all(isinstance(t, GemvLinear) and rows_usable(t.weight, t.bias) for t in twins)


def _vnni_usable(qdata: torch.Tensor) -> bool:
    return (qdata.device.type == "cpu" and qdata.shape[-1] % int8_gemv.GROUP == 0
            and int8_gemv.library() is not None)


class GemvLinear(nn.Module):
    """A float Linear (sharing the weight) whose one-token product, a decode step's GEMV, is
    written as a multiply-and-sum over the row-major weight: Inductor makes it one fused pass
    that streams the weight faster than MKL's GEMV (docs/performance.md). Several tokens
    (prefill) still go through F.linear."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        y = (self.weight.float() * x.reshape(1, -1).float()).sum(-1)  # fp32 accumulation, as BLAS
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def decode_twin(lin: nn.Module, device: torch.device) -> nn.Module:
    """What the static-cache path calls for one of the model's Linears: a plain-tensor twin of a
    torchao int8 or float8 Linear (a tensor subclass cannot enter the layers' nested compile region), a
    GemvLinear for a plain float Linear on CPU, otherwise the module."""
    import torch.nn.utils.parametrize as P

    twin = plain_int8_twin(lin)
    if twin is not lin:
        return twin
    if _float8_weight_only(lin):
        return PlainFloat8Linear(lin.weight.qdata, lin.weight.scale)
    if (device.type == "cpu" and type(lin) is nn.Linear and not P.is_parametrized(lin)
            and lin.weight.is_floating_point() and lin.weight.is_contiguous()):
        return GemvLinear(lin)
    return lin


def _float8_weight_only(lin: nn.Module) -> bool:
    """A torchao float8 weight-only Linear with per-row scales and no bias (fp8-weight-only)."""
    from torchao.quantization import Float8Tensor

    w = getattr(lin, "weight", None)
    return (isinstance(w, Float8Tensor) and w.act_quant_kwargs is None and getattr(lin, "bias", None) is None
            and list(w.block_size) == [1, w.shape[-1]])


def plain_int8_twin(lin: nn.Module, use_kernel: bool = True) -> nn.Module:
    """A PlainInt8Linear for a torchao per-row int8 Linear this twin reproduces exactly; any
    other module is returned as it is."""
    from torchao.quantization import Int8Tensor
    from torchao.utils import torch_version_at_least

    w = getattr(lin, "weight", None)
    if not isinstance(w, Int8Tensor) or getattr(lin, "bias", None) is not None:
        return lin
    act = w.act_quant_kwargs
    per_row = list(w.block_size) == [1, w.shape[-1]]
    plain_act = act is None or (type(act.granularity).__name__ == "PerRow"
                                and act.mapping_type.name == "SYMMETRIC" and not act.reduce_range
                                and w.act_quant_scale is None)
    # torch >= 2.12: torchao switches CPU matmuls to u8s8 with a compensation term.
    if not per_row or not plain_act or w.act_pre_scale is not None or torch_version_at_least("2.12.0.dev"):
        return lin
    return PlainInt8Linear.of(w, use_kernel)
