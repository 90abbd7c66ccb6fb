"""Compiled decoding for ChatTTS's GPT: a static KV cache and one compiled decode step.

ChatTTS's own loop grows its KV cache and attention mask every step, so every step has new
shapes and torch.compile recompiles constantly. Here, as in gpt-fast's generate.py, the cache
has a fixed capacity and the decode step (code embeddings -> transformer -> code heads ->
repetition penalty, temperature, top-p, top-k, EOS mask -> next tokens) always sees the same
shapes but for the number of filled cache slots, which it takes as one symbolic size, so it
compiles once. The prompt pass (prefill) is compiled apart, its length one symbolic size too.

Sampling happens inside the compiled step: ``torch.multinomial`` draws one sample as the argmax
of probabilities over Exp(1) noise, so the step takes the noise ChatTTS's seeded call would
draw (``draw``) and the same seed picks the same tokens as ChatTTS's loop (the equivalence tests
rely on it). A step then costs the host no tensor operations but reading whether EOS came.

This module is the one place that replaces ChatTTS internals: ``GPT.generate``, for batch-1
code generation. Text refinement, streaming and batches fall back to ChatTTS's loop.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from quantkit import hugepages, int8_gemv
from quantkit.atomic import write_bytes
from quantkit.precision import float_dtype
from quantkit.recipes import CompileSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """ChatTTS's logits pipeline, reduced to constants (one compiled step per distinct value)."""
    penalty: float | None  # CustomRepetitionPenaltyLogitsProcessorRepeat
    past_window: int
    top_p: float | None  # TopPLogitsWarper
    top_p_keep: int
    top_k: int | None  # TopKLogitsWarper (already max(top_k, min_tokens_to_keep))
    eos: int


def sampling_from(processors, eos: int) -> Sampling | None:
    """Read ChatTTS's processor objects; None if one is of a kind this path does not know."""
    from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

    from ChatTTS.model.processors import CustomRepetitionPenaltyLogitsProcessorRepeat as Rep

    penalty, window, top_p, keep, top_k = None, 16, None, 1, None
    for i, p in enumerate(processors):
        if isinstance(p, Rep) and i == 0:
            penalty, window = float(p.penalty), int(p.past_window)
        elif isinstance(p, TopPLogitsWarper) and top_k is None:
            top_p, keep = float(p.top_p), int(p.min_tokens_to_keep)
        elif isinstance(p, TopKLogitsWarper):
            top_k = int(p.top_k)
        else:
            return None
    return Sampling(penalty, window, top_p, keep, top_k, int(eos))


def process_logits(logits: torch.Tensor, window: torch.Tensor, temperature: torch.Tensor,
                   mask_eos: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Probabilities exactly as ChatTTS computes them: /T, repetition penalty over the last
    `past_window` generated tokens (window holds -1 where there are none yet), top-p, top-k,
    EOS masked before min_new_token, softmax."""
    logits = logits / temperature
    vocab = logits.size(1)
    if s.penalty is not None:
        freq = F.one_hot(window.clamp_min(0), vocab) * (window >= 0).unsqueeze(-1)
        alpha = torch.pow(s.penalty, freq.sum(1))
        logits = torch.where(logits < 0, logits * alpha, logits / alpha)
    if s.top_p is not None:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - s.top_p)
        remove[..., -s.top_p_keep:] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, vocab))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    eos_col = torch.where(mask_eos, torch.full_like(logits[:, s.eos], -float("inf")), logits[:, s.eos])
    logits = torch.cat([logits[:, : s.eos], eos_col[:, None], logits[:, s.eos + 1:]], 1)
    return F.softmax(logits, dim=-1)


class StaticCacheGPT(nn.Module):
    """gpt-fast style forward over ChatTTS's Llama modules with a fixed-capacity KV cache.

    It calls the model's own (possibly cast or quantized) Linear, norm and rotary modules, so
    every recipe's weights are what runs; only the cache and masking are ours.
    """

    def __init__(self, chat, capacity: int):
        super().__init__()
        self.llama = chat.gpt.gpt
        cfg = self.llama.config
        self.capacity = capacity
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = float_dtype(self.llama)
        self.dtype = dtype
        device = torch.device(chat.device_gpt)
        shape = (2 * cfg.num_hidden_layers, 1, self.kv_heads, capacity, self.head_dim)
        if device.type == "cpu":  # every step reads the filled part: huge pages, as the weights
            cache = hugepages.empty(shape, dtype).zero_()
        else:
            cache = torch.zeros(shape, dtype=dtype, device=device)
        for i in range(cfg.num_hidden_layers):
            self.register_buffer(f"k{i}", cache[2 * i], persistent=False)
            self.register_buffer(f"v{i}", cache[2 * i + 1], persistent=False)
        self.register_buffer("slots", torch.arange(capacity, device=device), persistent=False)
        self.emb_code = chat.embed.emb_code
        # The Linears this path calls: the model's own or twins sharing their weights that
        # compile to faster code (decode_twin); Linears reading the same input run as one where
        # their twins can be fused (SharedInput).
        self.heads_code = SharedInput(list(chat.embed.head_code), device)
        self.proj = nn.ModuleList(
            nn.ModuleDict({"qkv": SharedInput([layer.self_attn.q_proj, layer.self_attn.k_proj,
                                               layer.self_attn.v_proj], device),
                           "o": decode_twin(layer.self_attn.o_proj, device),
                           "gate_up": SharedInput([layer.mlp.gate_proj, layer.mlp.up_proj], device),
                           "down": decode_twin(layer.mlp.down_proj, device)})
            for layer in self.llama.layers)
        if device.type == "cpu":
            self._rehouse_weights()

    def _rehouse_weights(self) -> None:
        """The weights a step streams into one huge-page buffer, in the order it reads them (see
        quantkit.hugepages): the int8 kernel's packed copies, and the reduced-precision float
        weights of GemvLinears (the model's own parameters, moved: eager calls read the same
        memory). fp32 weights stay where ChatTTS's loader mapped them from the weights file: a
        copy would keep both resident, 727 MB more peak memory for 2% speed."""
        modules = [m for m in (*self.proj.modules(), *self.heads_code.modules())
                   if (isinstance(m, GemvLinear) and m.weight.dtype != torch.float32)
                   or (isinstance(m, PlainInt8Linear) and m.packed)]
        if not modules:
            return
        tensors = [m.blocks if isinstance(m, PlainInt8Linear) else m.weight.data for m in modules]
        for m, t in zip(modules, hugepages.rehouse(tensors)):
            if isinstance(m, PlainInt8Linear):
                m.blocks = t
            else:
                m.weight.data = t

    def forward(self, x: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x: (1, T, H) embeddings at positions pos (T,), attending to the cache slots ``keys``
        (a prefix ``slots[:n]``, n >= pos.max() + 1) -> final hidden states (1, T, H), fp32.

        Attention reads only those n slots, not the whole capacity: at capacity 1024 the full
        cache is 126 MB of fp32 per step, as much as the int8 weights. The compiled step takes n
        as a symbolic size (one graph for every length), the rest of its shapes are static."""
        x = x.to(self.dtype)
        t, n = x.shape[1], keys.shape[0]
        cos, sin = self.llama.rotary_emb(x, pos[None])
        # One new token attends to every filled slot: no mask needed.
        mask = None if t == 1 else (keys[None, :] <= pos[:, None])[None, None]  # (1, 1, T, n)
        for i, (layer, p) in enumerate(zip(self.llama.layers, self.proj)):
            h = layer.input_layernorm(x)
            q, k, v = p.qkv(h)
            q = q.view(1, t, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(1, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(1, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
            if t == 1 and self.kv_heads == self.heads and x.device.type == "cpu":
                o = attend_one(q, k_cache[:, :, :n], v_cache[:, :, :n])
            else:
                o = F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=mask,
                                                   enable_gqa=self.kv_heads != self.heads)
            x = x + p.o(o.transpose(1, 2).reshape(1, t, -1))
            h = layer.post_attention_layernorm(x)
            gate, up = p.gate_up(h)
            x = x + p.down(layer.mlp.act_fn(gate) * up)  # LlamaMLP
        return self.llama.norm(x).float()


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query per head (1, H, 1, D) over n cached keys and values (1, H, n, D),
    in fp32, as multiply-and-sums. Why not SDPA: on CPU its flash kernel runs two MKL GEMVs and
    allocates its buffers per head, about 60 us a layer at 50 keys, more than reading the keys;
    written out, Inductor fuses it into the step's own kernels (0.8 ms less of an 11.5 ms
    int8-dynamic-compiled step, in one process against SDPA). The softmax's division comes
    after the sum over values: written as ``softmax(s) @ v``, Inductor divides inside that sum,
    once per key and value element (5% of a 9 ms int8 step, measured in one process)."""
    scores = (q.float() * k.float()).sum(-1, keepdim=True) * q.shape[-1] ** -0.5  # (1, H, n, 1)
    e = torch.exp(scores - scores.amax(2, keepdim=True))
    return ((e * v.float()).sum(2, keepdim=True) / e.sum(2, keepdim=True)).to(q.dtype)


class PlainInt8Linear(nn.Module):
    """A torchao int8 Linear (``Int8Tensor`` weight) computed on its plain int8 data and scales.

    Same arithmetic as torchao's Int8Tensor linear for per-row weights (with torch < 2.12,
    whose CPU path is s8s8 ``_int_mm``): per-row symmetric int8 activations, int8 x int8 -> int32,
    times the activation scale, times the weight scale; weight-only: matmul on the int8 weight
    cast to the activation dtype, times the scale. Inside a compiled step a tensor subclass per
    weight costs guard checks and unwrapping on every call (about 4 ms of an 18 ms step for the
    140 GPT Linears); plain buffers cost nothing. The buffers are views of torchao's tensors.

    It also sidesteps a wrong result: compiling torchao's own linear, Inductor hands ``_int_mm``
    the (1, K) activation with strides (0, 1), and torch 2.11's CPU ``_int_mm`` then returns
    zeros (tokens agreed with eager int8 5% of the time). The tests compare the two paths.
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
            blocks, comp = int8_gemv.pack(qdata)
            self.register_buffer("blocks", blocks, persistent=False)
            self.register_buffer("comp", comp, persistent=False)
        else:
            self.register_buffer("qdata_t", qdata.t(), persistent=False)

    @classmethod
    def of(cls, weight, use_kernel: bool = True) -> "PlainInt8Linear":
        """The twin of one torchao Int8Tensor weight (its buffers are views of torchao's)."""
        return cls(weight.qdata, weight.scale, weight.act_quant_kwargs is not None, use_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        if self.dynamic:
            xq, x_scale = quantize_rows(x2)
            if self.packed:
                acc = int8_gemv.int8_gemv(xq, self.blocks, self.comp)[:, :self.scale.shape[0]]
            else:
                acc = torch._int_mm(xq, self.qdata_t)
            y = (acc.float() * x_scale).to(x.dtype)  # x_scale: (rows, 1) fp32
            y = y * self.scale
        elif x2.shape[0] == 1:
            # A decode step's GEMV written as a multiply-and-sum that Inductor fuses with the
            # int8 -> float conversion (gpt-fast's int8 weight-only recipe): compiled, mm on
            # `qdata.to(float)` writes the whole float weight out first (about 1 GB/s here).
            y = (self.qdata_t.t() * x2).sum(-1, keepdim=True).t() * self.scale.to(x.dtype)
        else:
            y = torch.mm(x2, self.qdata_t.to(x.dtype))
            y = y * self.scale.to(y.dtype)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 -> (int8 values, fp32 scales (rows, 1)): torchao's
    ``choose_qparams_affine`` and ``quantize_affine`` for this one case, op for op (so the
    results are equal), without their generic block handling, which costs more than the
    arithmetic in an eager prompt pass (80 Linears)."""
    # max(-min(amin, 0), max(amax, 0)) in torchao: the same value as max |x|
    scale = (x.abs().amax(-1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    scale = scale.to(torch.float32)
    return torch.clamp(torch.round(x * (1.0 / scale)), -128, 127).to(torch.int8), scale


class SharedInput(nn.Module):
    """Linears that read the same input (q, k, v; gate, up; the code heads) -> their outputs.

    Where every twin is a kernel-packed int8 Linear, they run as one: one activation
    quantization and one kernel call streaming all their weights, instead of one each (each call
    costs a few microseconds of dispatch and thread start, 140 of them per step)."""

    def __init__(self, linears: list[nn.Module], device: torch.device):
        super().__init__()
        self.sizes = [lin.weight.shape[0] for lin in linears]
        views = [plain_int8_twin(lin, use_kernel=False) for lin in linears]
        self.fused = None
        if (len(views) > 1 and all(isinstance(v, PlainInt8Linear) and v.dynamic for v in views)
                and _vnni_usable(views[0].qdata_t.t())):  # one input: same K and device for all
            self.fused = PlainInt8Linear(torch.cat([v.qdata_t.t() for v in views]),
                                         torch.cat([v.scale for v in views]), dynamic=True)
        self.twins = nn.ModuleList([] if self.fused else [decode_twin(lin, device) for lin in linears])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused is not None:
            return list(self.fused(x).split(self.sizes, -1))
        return [twin(x) for twin in self.twins]


def _vnni_usable(qdata: torch.Tensor) -> bool:
    return (qdata.device.type == "cpu" and qdata.shape[-1] % int8_gemv.LANES == 0
            and int8_gemv.library() is not None)


class GemvLinear(nn.Module):
    """A float Linear (sharing the weight) whose one-token product, a decode step's GEMV, is
    written as a multiply-and-sum over the row-major weight: Inductor makes it one fused pass
    that streams the weight at 27 GB/s here, against 17 for MKL's fp32 GEMV (bf16: 24 against
    13). Several tokens (prefill) still go through F.linear."""

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
    torchao int8 Linear, a GemvLinear for a plain float Linear on CPU, otherwise the module."""
    import torch.nn.utils.parametrize as P

    twin = plain_int8_twin(lin)
    if twin is not lin and (device.type == "cpu" or not twin.dynamic):
        # (CUDA's _int_mm wants more than 16 rows; torchao's own path pads for it.)
        return twin
    if (device.type == "cpu" and type(lin) is nn.Linear and not P.is_parametrized(lin)
            and lin.weight.is_floating_point() and lin.weight.is_contiguous()):
        return GemvLinear(lin)
    return lin


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


def decode_step(model: StaticCacheGPT, ids: torch.Tensor, keys: torch.Tensor, window: torch.Tensor,
                temperature: torch.Tensor, mask_eos: torch.Tensor, noise: torch.Tensor):
    """One step: the last tokens ids (1, num_vq), fed at position ``keys[-1]`` and attending to
    the cache slots ``keys`` (``slots[:pos + 1]``) -> (hidden (1, H), next tokens (1, num_vq),
    the penalty window with ids appended, whether a next token is EOS).

    A free function of the model (not a bound method) so that it can be compiled ahead of time
    and saved; the sampling constants come from ``model.sampling``."""
    window = torch.cat([window[:, 1:], ids.view(-1, 1)], 1)
    emb = torch.stack([emb(ids[:, i]) for i, emb in enumerate(model.emb_code)], 2).sum(2)
    hidden = model(emb[:, None].float(), keys[-1:], keys)[:, -1]
    probs = process_logits(code_logits(model, hidden), window, temperature, mask_eos, model.sampling)
    nxt = draw(probs, noise)
    return hidden, nxt, window, nxt.eq(model.sampling.eos).any()


def draw(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``torch.multinomial(probs, 1)`` (num_vq, vocab) given the Exp(1) ``noise`` it would draw
    -> (1, num_vq). Its one-sample path is exactly ``argmax(probs / noise)`` (the exponential form
    of the Gumbel-max trick); what is left out are its checks that probs are finite, non-negative
    and not all zero, which softmax guarantees: a dozen small host operations, 0.2 ms a step on
    2 cores (code and data evicted by the step's weight stream)."""
    return (probs / noise).argmax(-1).view(1, -1)


def prefill(model: StaticCacheGPT, emb: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """The prompt's embeddings (1, L, H) into cache slots ``prompt`` (``slots[:L]``) -> the last
    hidden state (1, H). A free function, as decode_step, to be compiled ahead of time."""
    return model(emb, prompt, prompt)[:, -1]


def code_logits(model: StaticCacheGPT, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden (1, H) -> the four code heads' logits (num_vq, vocab), fp32."""
    return torch.stack(model.heads_code(hidden), 1).float()[0]


def compile_decode_step(settings: CompileSettings) -> Callable:
    return torch.compile(decode_step, fullgraph=True, dynamic=False, **compile_kwargs(settings))


def compile_prefill(settings: CompileSettings) -> Callable:
    """The prompt pass, compiled: eagerly, its ~30 small operations per layer around the int8
    products cost 55 ms of a 40-token prompt, compiled 38 (int8-dynamic, full-size synthetic, one
    process). Never as CUDA graphs: one graph would be recorded per prompt length."""
    return torch.compile(prefill, fullgraph=True, dynamic=False, **compile_kwargs(settings, cuda_graphs=False))


class CompiledGenerate:
    """Drop-in for ``GPT.generate`` (same arguments, same GenerationOutputs)."""

    def __init__(self, chat, settings: CompileSettings, compile_step: bool = True):
        self.chat = chat
        self.gpt = chat.gpt
        self.fallback = chat.gpt.generate
        self.settings = settings
        self.model = StaticCacheGPT(chat, settings.cache_capacity)
        # Just-in-time compiled functions, and the ahead-of-time ones used first where they
        # exist (loaded from a variant, or compiled at first use on CPU).
        self.step = compile_decode_step(settings) if compile_step else decode_step
        self.prefill = compile_prefill(settings) if compile_step else prefill
        self.precompiled: dict[Sampling, Callable] = {}
        self.precompiled_prefill: Callable | None = None
        # On CPU, compiled ahead of time at first use: the functions that `apply --compile-cache`
        # and export save are then the ones that ran (as fast as through Dynamo: +3% and -1.4% in
        # two in-process comparisons here). CUDA keeps just-in-time compilation: CUDA graphs are
        # untested ahead of time here.
        self.ahead = compile_step and self.model.slots.device.type == "cpu"
        self._interned: dict[Sampling, Sampling] = {}
        # (decode steps, seconds) of the last call (None where it ran ChatTTS's loop): the steps
        # alone, without the prompt pass and ChatTTS's work around the loop, for the evaluator.
        self.last_steps: tuple[int, float] | None = None

    def _use_sampling(self, s: Sampling) -> None:
        # One Sampling object per value: the compiled step guards on model.sampling.
        self.model.sampling = self._interned.setdefault(s, s)

    def _step_fn(self, s: Sampling):
        self._use_sampling(s)
        if s not in self.precompiled and self.ahead:
            self.precompiled[s] = _or_just_in_time(lambda: self.precompile_step(s), self.step)
        return self.precompiled.get(s, self.step)

    def precompile_step(self, s: Sampling) -> "Precompiled":
        """The decode step for sampling ``s`` compiled ahead of time (raises where that fails)."""
        return Precompiled(_aot(compile_decode_step, self.settings, self.example_inputs(s)), self.step)

    def precompile_prefill(self) -> "Precompiled":
        """The prompt pass compiled ahead of time (raises where that fails)."""
        return Precompiled(_aot(compile_prefill, self.settings, self.example_prompt()), self.prefill)

    def _prefill(self, emb: torch.Tensor) -> torch.Tensor:
        """The prompt (1, L, H) through the cache -> last hidden state (1, H)."""
        if not emb.is_inference():  # as ChatTTS's embeddings are: the saved prompt pass guards on it
            with torch.inference_mode():
                emb = emb.clone()
        prompt = self.model.slots[:emb.shape[1]]
        torch._dynamo.maybe_mark_dynamic(prompt, 0)  # one graph for every prompt length
        torch._dynamo.maybe_mark_dynamic(emb, 1)
        if self.precompiled_prefill is None and self.ahead:
            self.precompiled_prefill = _or_just_in_time(self.precompile_prefill, self.prefill)
        return (self.precompiled_prefill or self.prefill)(self.model, emb, prompt)

    def example_inputs(self, s: Sampling) -> tuple:
        num_vq = len(self.model.emb_code)
        device = self.model.slots.device
        self._use_sampling(s)
        keys = self.model.slots[:2]
        torch._dynamo.mark_dynamic(keys, 0)
        return (self.model, torch.zeros(1, num_vq, dtype=torch.long, device=device), keys,
                torch.full((num_vq, s.past_window), -1, dtype=torch.long, device=device),
                torch.ones(num_vq, 1, device=device), torch.tensor(False, device=device),
                torch.ones(num_vq, self.chat.config.gpt.num_audio_tokens, device=device))

    def example_prompt(self) -> tuple:
        """Arguments for compiling the prompt pass ahead of time (any length from 2)."""
        with torch.inference_mode():
            emb = torch.zeros(1, 2, self.model.llama.config.hidden_size, device=self.model.slots.device)
        prompt = self.model.slots[:2]
        torch._dynamo.mark_dynamic(emb, 1)
        torch._dynamo.mark_dynamic(prompt, 0)
        return self.model, emb, prompt

    def default_sampling(self) -> Sampling:
        """What ChatTTS's default InferCodeParams give (the harness uses them)."""
        from ChatTTS.model import gen_logits

        p = self.chat.InferCodeParams()
        num_code = self.chat.config.gpt.num_audio_tokens - 1
        warpers, processors = gen_logits(num_code=num_code, top_P=p.top_P, top_K=p.top_K,
                                         repetition_penalty=p.repetition_penalty)
        return sampling_from((*processors, *warpers), num_code)

    def __call__(self, emb, inputs_ids, temperature, eos_token, attention_mask=None, max_new_token=2048,
                 min_new_token=0, logits_processors=(), infer_text=False, return_attn=False,
                 return_hidden=False, stream=False, show_tqdm=True, ensure_non_empty=True,
                 stream_batch=24, manual_seed=None, context=None):
        self.last_steps = None
        s = sampling_from(logits_processors, int(eos_token))
        length = inputs_ids.shape[1]
        if (infer_text or stream or return_attn or inputs_ids.shape[0] != 1 or s is None
                or length + max_new_token > self.settings.cache_capacity
                or (attention_mask is not None and not bool(attention_mask.all()))):
            log.info("compiled decoding does not cover this call; using ChatTTS's loop")
            kwargs = dict(attention_mask=attention_mask, max_new_token=max_new_token,
                          min_new_token=min_new_token, logits_processors=logits_processors,
                          infer_text=infer_text, return_attn=return_attn, return_hidden=return_hidden,
                          stream=stream, show_tqdm=show_tqdm, ensure_non_empty=ensure_non_empty,
                          stream_batch=stream_batch, manual_seed=manual_seed)
            if context is not None:
                kwargs["context"] = context
            yield from self.fallback(emb, inputs_ids, temperature, eos_token, **kwargs)
            return
        yield self._generate(emb, inputs_ids, temperature, s, max_new_token, min_new_token,
                             return_hidden, manual_seed, context)

    @torch.no_grad()
    def _generate(self, emb, inputs_ids, temperature, s: Sampling, max_new_token, min_new_token,
                  return_hidden, manual_seed, context):
        from ChatTTS.model.gpt import GPT

        device = emb.device
        num_vq = inputs_ids.shape[2]
        length = inputs_ids.shape[1]
        step = self._step_fn(s)
        temp = temperature.to(device).float().view(-1, 1)  # (num_vq, 1): batch 1
        window = torch.full((num_vq, s.past_window), -1, dtype=torch.long, device=device)
        mask_eos = (torch.tensor(False, device=device), torch.tensor(True, device=device))
        noise = _ExpNoise(self.gpt.generator, manual_seed)

        hidden = self._prefill(emb)
        probs = process_logits(code_logits(self.model, hidden), window, temp, mask_eos[min_new_token > 0], s)
        nxt = draw(probs, noise(probs))
        eos = nxt.eq(s.eos).any()
        tokens, hiddens, n_out, advanced = [], [], 0, 0
        start = time.perf_counter()
        for i in range(max_new_token):
            tokens.append(nxt)
            if return_hidden:
                hiddens.append(hidden)
            if bool(eos) or (context is not None and context.get()):
                break
            n_out += 1
            if i + 1 == max_new_token:
                break
            hidden, nxt, window, eos = self._advance(step, nxt, length + i, window, temp,
                                                     mask_eos[i + 1 < min_new_token], noise(probs))
            advanced += 1
        if advanced:
            if device.type == "cuda":  # the last step's EOS flag may be unread
                torch.cuda.synchronize(device)
            self.last_steps = (advanced, time.perf_counter() - start)
        ids = torch.cat([inputs_ids[0], torch.cat(tokens).to(inputs_ids.dtype)])[None]
        hid = [torch.cat(hiddens)[:n_out]] if return_hidden else []
        return GPT.GenerationOutputs(ids=[ids[0].narrow(0, length, n_out)], attentions=[], hiddens=hid)

    def _advance(self, step, ids: torch.Tensor, pos: int, window, temp, mask_eos, noise):
        """Run the decode step for tokens ``ids`` (1, num_vq) at position ``pos``."""
        keys = self.model.slots[:pos + 1]
        torch._dynamo.maybe_mark_dynamic(keys, 0)  # one graph for every length
        out = step(self.model, ids, keys, window, temp, mask_eos, noise)
        if self.settings.mode == "reduce-overhead":  # CUDA graphs reuse their output buffers
            out = tuple(t.clone() for t in out)
        return out

    @torch.no_grad()
    def forced_hidden(self, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """Hidden states this path computes over a given code sequence (teacher forcing): the
        prompt embeddings ``emb`` (1, L, H), then ``tokens`` (n, num_vq) one step at a time
        through the (compiled) step -> (n, H) fp32, row i being what predicts token i. None
        when the sequence does not fit the cache."""
        length, n = emb.shape[1], tokens.shape[0]
        if length + n > self.settings.cache_capacity:
            return None
        s = self.default_sampling()
        step = self._step_fn(s)
        num_vq, device = tokens.shape[1], emb.device
        window = torch.full((num_vq, s.past_window), -1, dtype=torch.long, device=device)
        temp, no_mask = torch.ones(num_vq, 1, device=device), torch.tensor(False, device=device)
        noise = torch.ones(num_vq, self.chat.config.gpt.num_audio_tokens, device=device)
        hiddens = [self._prefill(emb)]
        for i in range(n - 1):
            hiddens.append(self._advance(step, tokens[i:i + 1], length + i, window, temp, no_mask, noise)[0])
        return torch.cat(hiddens).float()


def _or_just_in_time(precompile: Callable[[], "Precompiled"], fallback: Callable) -> Callable:
    """``precompile()``, or ``fallback`` where ahead-of-time compilation fails."""
    try:
        return precompile()
    except Exception as exc:  # noqa: BLE001 - an experimental API (Inductor freezing is refused)
        log.warning("ahead-of-time compilation failed (%s: %s); compiling just in time",
                    type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        return fallback


class Precompiled:
    """An ahead-of-time compiled function, and what runs instead where a call fails its guards
    (where a just-in-time one would recompile): a one-token prompt, for one, against the saved
    prompt pass traced for two or more. The guards are checked here, as the function would check
    them itself, but a failure costs no exception and no explanation of which guard failed."""

    def __init__(self, fn: Callable, fallback: Callable):
        self.fn, self.fallback = fn, fallback
        fn.disable_guard_check()

    def __call__(self, *args):
        if self.fn.guard_check(*args):
            return self.fn(*args)
        log.debug("these inputs fail the precompiled function's guards; running it just in time")
        return self.fallback(*args)

    def save(self, path: str | Path) -> None:
        self.fn.save_compiled_function(str(path))


class _ExpNoise:
    """The Exp(1) noise ``torch.multinomial`` draws for one sample from probabilities of this
    shape: from the global generator each step, or, seeded, from ChatTTS's generator re-seeded
    each step as its loop does, which draws the same noise every step: drawn once."""

    def __init__(self, generator: torch.Generator, seed: int | None):
        self.generator, self.seed, self.fixed = generator, seed, None

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        if self.seed is None:
            return torch.empty_like(probs).exponential_(1)
        if self.fixed is None:
            self.fixed = torch.empty_like(probs).exponential_(1, generator=self.generator.manual_seed(self.seed))
        return self.fixed


def compile_kwargs(settings: CompileSettings, cuda_graphs: bool = True) -> dict:
    """torch.compile's Inductor options: the recipe's mode (less CUDA graphs if not
    ``cuda_graphs``) and freezing, and no size asserts.

    Inductor's generated code asserts every input's sizes and strides in Python on each call
    (about 0.8 us each, 336 inputs in the int8 step: 0.3 ms); Dynamo's guards have checked the
    same before the graph runs."""
    from torch._inductor import list_mode_options

    mode = {k: v for k, v in list_mode_options(settings.mode).items() if cuda_graphs or k != "triton.cudagraphs"}
    return {"options": {**mode, "freezing": settings.freezing, "size_asserts": False}}


def enable_compiled_decoding(chat, settings: CompileSettings, compile_step: bool = True) -> CompiledGenerate:
    """Route ChatTTS's code generation through the static-cache path (compiled unless told not)."""
    if compile_step:
        skip_vec_isa_probe()
    gen = CompiledGenerate(chat, settings, compile_step=compile_step)
    chat.gpt.generate = gen
    return gen


# ---------------------------------------------------------------- compile artifacts

PRECOMPILED_STEP, PRECOMPILED_PREFILL, INDUCTOR_CACHE = "decode_step.aot", "prefill.aot", "compile_cache.bin"
KERNELS = "inductor"  # the saved functions' C++ kernels, built


def save_compiled(gen: CompiledGenerate, folder: str | Path) -> dict:
    """What this process compiled for ``gen``, into ``folder``: the decode step (ChatTTS's default
    sampling) and the prompt pass compiled ahead of time, or, where that fails (Inductor freezing
    in torch 2.11), Inductor's cache artifacts, which spare code generation but not tracing
    -> a description for load_compiled (file names relative to ``folder``)."""
    folder = Path(folder)
    try:
        sampling = save_precompiled(gen, folder / PRECOMPILED_STEP, folder / PRECOMPILED_PREFILL)
        _build_kernels(folder)
        return {"kind": "aot", "file": PRECOMPILED_STEP, "prefill": PRECOMPILED_PREFILL, "sampling": sampling,
                "kernels": KERNELS}
    except Exception as exc:  # noqa: BLE001 - an experimental API: any failure means "not here"
        log.warning("ahead-of-time compilation unavailable for this recipe (%s: %s); saving "
                    "Inductor cache artifacts instead", type(exc).__name__, str(exc)[:120])
        for name in (PRECOMPILED_STEP, PRECOMPILED_PREFILL):
            (folder / name).unlink(missing_ok=True)
    save_compile_cache(folder)
    return {"kind": "inductor-cache", "file": INDUCTOR_CACHE}


def _build_kernels(folder: Path) -> None:
    """Build the saved functions' C++ kernels into ``folder/KERNELS`` by loading them once with
    that as Inductor's cache: a saved function carries its kernels' sources, which a fresh
    process would otherwise compile on load (19 for int8-dynamic, about 9 s to build on 2 cores).

    This process compiled the same sources (so the same library names): the folder is seeded
    with the libraries it has loaded, and the load builds only what is missing. The load writes
    the source of every kernel it needs beside its library; seeds left without one are other
    functions' kernels, and go."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, temporary_cache_dir

    kernels = folder / KERNELS
    seeded = _copy_libraries(Path(cache_dir()), kernels)
    with temporary_cache_dir(str(kernels)):
        for name in (PRECOMPILED_STEP, PRECOMPILED_PREFILL):
            _load_aot(folder / name)
    for lib in seeded:
        if not lib.with_suffix(".cpp").exists():
            lib.unlink()
    for lock in [*kernels.rglob("*.lock"), kernels / "locks"]:
        shutil.rmtree(lock) if lock.is_dir() else lock.unlink(missing_ok=True)
    for sub in kernels.iterdir() if kernels.is_dir() else ():
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()


def _copy_libraries(src: Path, dst: Path) -> list[Path]:
    """Copy the C++ kernel libraries (``x.so`` with its source ``x.cpp`` beside it) under ``src``
    that this process has loaded (Linux: its memory map; elsewhere none) to the same places
    under ``dst`` -> the copies."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    src, copies = src.resolve(), []
    loaded = {Path(fields[5]) for fields in (line.split(None, 5) for line in maps.splitlines())
              if len(fields) == 6 and fields[5].endswith(".so")}
    for lib in sorted(p for p in loaded if p.is_relative_to(src) and p.with_suffix(".cpp").is_file()):
        target = dst / lib.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, target)
        copies.append(target)
    return copies


def load_compiled(gen: CompiledGenerate, folder: str | Path, info: dict) -> None:
    """Use what save_compiled wrote (``info``, its description) for the next calls."""
    folder = Path(folder)
    if info["kind"] == "aot":
        if info.get("kernels") and (folder / info["kernels"]).is_dir():
            # Inductor finds a built kernel by its source's hash: copied into this process's
            # cache, loading compiles none (where this machine's compiler flags differ, the
            # hashes do too, and it compiles them as usual).
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            shutil.copytree(folder / info["kernels"], cache_dir(), dirs_exist_ok=True)
        load_precompiled(gen, folder / info["file"], folder / info["prefill"], info["sampling"])
    else:
        load_compile_cache(folder)


def save_compile_cache(directory: str | Path) -> Path | None:
    """Write what Inductor compiled in this process (torch.compiler.save_cache_artifacts)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, _info = saved
    path = Path(directory) / INDUCTOR_CACHE
    write_bytes(path, data)
    return path


def save_precompiled(gen: CompiledGenerate, step_path: str | Path, prefill_path: str | Path) -> dict:
    """Save the decode step (for ChatTTS's default sampling) and the prompt pass compiled ahead
    of time (compiling them if this process has not): a fresh process then skips tracing and code
    generation entirely. -> the sampling constants the step bakes in. Raises where ahead-of-time
    compilation fails."""
    s = gen.default_sampling()
    step = gen.precompiled.get(s)
    if not isinstance(step, Precompiled):
        step = gen.precompiled[s] = gen.precompile_step(s)
    first = gen.precompiled_prefill
    if not isinstance(first, Precompiled):
        first = gen.precompiled_prefill = gen.precompile_prefill()
    step.save(step_path)
    first.save(prefill_path)
    return asdict(s)


def _aot(compile_fn: Callable, settings: CompileSettings, example: tuple):
    # Scoped: left on, the setting changes what later just-in-time compilations cache.
    with torch._dynamo.config.patch(enable_aot_compile=True), torch.no_grad():
        return compile_fn(settings).aot_compile((example, {}))


def load_precompiled(gen: CompiledGenerate, step_path: str | Path, prefill_path: str | Path,
                     sampling: dict) -> None:
    """Use a saved ahead-of-time step for calls whose sampling constants are the saved ones
    (others compile as usual: the loaded function does not check them itself), and the saved
    prompt pass."""
    gen.precompiled[Sampling(**sampling)] = Precompiled(_load_aot(step_path), gen.step)
    gen.precompiled_prefill = Precompiled(_load_aot(prefill_path), gen.prefill)


def _load_aot(path: str | Path) -> Callable:
    with torch._dynamo.config.patch(enable_aot_compile=True), open(path, "rb") as fh:
        return torch.compiler.load_compiled_function(fh)


def skip_vec_isa_probe() -> None:
    """Inductor's first CPU compile (or load) probes each vector ISA by building and importing a
    test library in a fresh Python: about 10 s here. The CPU flags already tell the answer."""
    import torch._inductor.config

    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        torch._inductor.config.cpp.vec_isa_ok = True


def load_compile_cache(directory: str | Path) -> bool:
    """Hot-load saved artifacts so the first compile finds its kernels; False if none saved."""
    path = Path(directory) / INDUCTOR_CACHE
    if not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True
