"""ChatTTS's GPT over a KV cache of fixed capacity (gpt-fast's model.py, on ChatTTS's modules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from quantkit import hugepages, int8_gemv
from quantkit.linears import GemvLinear, PlainInt8Linear, RowsLinear, SharedInput, decode_twin, rows_usable
from quantkit.precision import float_dtype


MAX_CAPACITY = 8192  # slots a cache may grow to (prompt and generated tokens)


class StaticCacheGPT(nn.Module):
    """gpt-fast style forward over ChatTTS's Llama modules with a fixed-capacity KV cache.

    It calls the model's own (possibly cast or quantized) Linear, norm and rotary modules, so
    every recipe's weights are what runs; only the cache and masking are ours. The cache holds
    ``rows`` sequences of ``capacity`` slots; ``reserve`` re-allocates it for another batch bucket
    or a longer call (doubling the capacity), each shape compiled once.
    """

    def __init__(self, llama: nn.Module, emb_code: nn.ModuleList, head_code: nn.ModuleList,
                 emb_text: nn.Module, head_text: nn.Module, device: torch.device, capacity: int,
                 cache_dtype: torch.dtype | None = None):
        super().__init__()
        self.llama = llama
        cfg = llama.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.dtype = float_dtype(llama)
        self.device = torch.device(device)
        self.rows, self.capacity, self.base = 0, 0, capacity
        self.emb_code, self.emb_text = emb_code, emb_text
        self.code_vocab = emb_code[0].num_embeddings  # audio tokens, EOS included
        self.layers = nn.ModuleList(DecoderLayer(layer, self.heads, self.kv_heads, self.head_dim, self.device)
                                    for layer in llama.layers)
        # Where the int8 kernel's library runs the weights, its attention, sort and fp32 head
        # kernels run too (float recipes keep Inductor's code and torch's, and build nothing)
        self.kernels = any(isinstance(m, PlainInt8Linear) and m.packed for m in self.layers.modules())
        self.heads_code = SharedInput(list(head_code), self.device, rows=self.kernels)
        self.head_text = FoldedHead(head_text, rows=self.kernels)
        self.full_keys = False
        self._held: list[torch.Tensor] | None = None  # _cpu_caches
        self.reserve(1, capacity, dtype=cache_dtype or self.dtype)  # bf16 halves a long call's reads
        if self.device.type == "cpu":
            self._rehouse_weights()
        attention = self.kernels and self.kv_heads == self.heads and self.head_dim in (16, 32, 64, 128)
        for layer in self.layers:
            layer.attention_kernel = attention

    @property
    def cache_dtype(self) -> torch.dtype:
        # Read from the cache, not kept as an attribute: Dynamo's saved guards replace a module's
        # unguarded attributes, and a dtype object with them, wherever it appears (torch 2.11).
        return self.layers[0].k_cache.dtype

    def reserve(self, rows: int, length: int, fresh: bool = False, dtype: torch.dtype | None = None) -> None:
        """A cache of ``rows`` rows and at least ``length`` slots: the same one if it fits (its
        contents kept), else a new one of twice the capacity until it fits (the filled slots
        copied where the rows stay the same). ``fresh`` (a call's start): the recipe's capacity
        again where that fits, so a call's prompt pass always runs on the cache it was
        compiled for, and a long call's growth on the caches compiled for it. ``dtype``: the
        cache's (default: the current one's)."""
        capacity = self.base if fresh else max(self.capacity, 1)
        while capacity < length:
            capacity *= 2
        if rows == self.rows and capacity == self.capacity:
            return
        dtype = dtype or self.cache_dtype
        if capacity > MAX_CAPACITY:
            raise ValueError(f"{length} slots exceed the largest KV cache ({MAX_CAPACITY})")
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        count = 2 * len(self.layers)
        if self.device.type == "cpu":
            caches = self._cpu_caches(shape, dtype, count)
        else:
            caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(count)]
        keep = self.capacity if rows == self.rows and not fresh else 0
        for i, layer in enumerate(self.layers):
            layer.set_cache(caches[2 * i], caches[2 * i + 1], keep)
        self.register_buffer("slots", torch.arange(capacity, device=self.device), persistent=False)
        self.rows, self.capacity = rows, capacity

    def _cpu_caches(self, shape: tuple[int, ...], dtype: torch.dtype, count: int) -> list[torch.Tensor]:
        """``count`` caches of ``shape``: the first rows of the caches last allocated where those
        are as large (calls alternating between batch sizes would otherwise pay for fresh pages
        each time), else new ones on huge pages (every step reads the filled part, as the
        weights). A step reads only the slots its call filled: earlier calls' contents do no harm."""
        held = self._held
        if held is not None and held[0].dtype == dtype and held[0].shape[1:] == shape[1:] and held[0].shape[0] >= shape[0]:
            return [t[:shape[0]] for t in held]
        self._held = [c.zero_() for c in hugepages.empty_each([(shape, dtype)] * count)]
        return self._held

    def set_full_keys(self, full: bool) -> None:
        """Whether a decode step attends to every cache slot under a mask (CUDA graphs: one
        shape for every length) rather than to the filled slots alone."""
        self.full_keys = full
        for layer in self.layers:
            layer.full_keys = full

    def _rehouse_weights(self) -> None:
        """The weights a step streams into one huge-page mapping, in the order it reads them (see
        quantkit.hugepages): the kernels' packed copies (int8, and the code heads' fp32), and the
        reduced-precision float weights of GemvLinears (the model's own parameters, moved: eager
        calls read the same memory). fp32 weights stay where ChatTTS's loader mapped them from the
        weights file: a copy would keep both resident, for little speed (docs/performance.md)."""
        modules = [m for m in (*self.layers.modules(), *self.heads_code.modules())
                   if (isinstance(m, GemvLinear) and m.weight.dtype != torch.float32)
                   or (isinstance(m, PlainInt8Linear) and m.packed) or isinstance(m, RowsLinear)]
        if not modules:
            return
        tensors = [m.weight.data if isinstance(m, GemvLinear) else m.panels for m in modules]
        for m, t in zip(modules, hugepages.rehouse(tensors)):
            if not isinstance(m, GemvLinear):
                m.panels = t
            else:
                m.weight.data = t

    def forward(self, x: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                pad: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H) embeddings into cache ``slots`` (T,) at rotary ``positions`` (B, T),
        attending to the cache slots ``keys`` (a prefix ``slots[:n]``, n > slots.max(); or every
        slot, masked), of which each row's first ``pad`` (B,) are its left padding -> final hidden
        states (B, T, H), fp32.

        Attention reads only those n slots, not the whole capacity: a full fp32 cache weighs as
        much as the int8 weights. The compiled step takes n as a symbolic size (one graph for every
        length), the rest of its shapes are static."""
        x = x.to(self.dtype)
        cos, sin = self.llama.rotary_emb(x, positions)
        slots = slots.clone()  # the decode step's slot is a view of keys: a layer's inputs may not alias
        for layer in self.layers:
            x = layer(x, cos, sin, slots, keys, pad)
        return self.llama.norm(x).float()


class FoldedHead(nn.Module):
    """ChatTTS's weight-norm text head with its weight computed once (the value its
    ``P.cached()`` forward computes each call), not on every step; at its first call, which is
    eager (the prompt pass's first token), so that a call without text refinement never holds
    it. ``rows``: an fp32 head without bias runs on the fp32 rows kernel (RowsLinear)."""

    def __init__(self, head: nn.Module, rows: bool = False):
        super().__init__()
        self.head, self.rows, self.weight, self.bias, self.packed = head, rows, None, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fold()
        if self.packed is not None:
            return self.packed(x)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    @torch.no_grad()
    def fold(self) -> None:
        """Compute the weight now, if not yet (before a step that calls the head is traced). The
        step then reads only plain tensors: a parametrized module cannot be saved compiled."""
        if self.weight is not None or self.packed is not None:
            return
        weight, bias = self.head.weight.detach(), self.head.bias
        if self.rows and rows_usable(weight, bias):
            self.packed = RowsLinear(weight)
        else:
            self.weight, self.bias = weight.clone(), None if bias is None else bias.detach()


class DecoderLayer(nn.Module):
    """One of ChatTTS's Llama decoder layers over its own cache tensors: the layer's norms and
    activation, this path's Linears (the model's own or twins sharing their weights that compile
    to faster code: decode_twin; Linears reading the same input run as one where their twins can
    be fused: SharedInput).

    A nested compile region: torch.compile traces and compiles one layer and calls that code for
    every layer, instead of 20 copies. Dynamo reuses it only where every input matches in shape,
    strides and storage offset and no two inputs share a storage (hugepages.empty_each)."""

    def __init__(self, layer: nn.Module, heads: int, kv_heads: int, head_dim: int, device: torch.device):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.act_fn = layer.mlp.act_fn
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.full_keys = False  # StaticCacheGPT.set_full_keys
        self.attention_kernel = False  # int8_gemv.attend_one for one new token (StaticCacheGPT)
        self.register_buffer("k_cache", None, persistent=False)  # set_cache
        self.register_buffer("v_cache", None, persistent=False)
        attn, mlp = layer.self_attn, layer.mlp
        self.proj = nn.ModuleDict({"qkv": SharedInput([attn.q_proj, attn.k_proj, attn.v_proj], device),
                                   "o": decode_twin(attn.o_proj, device),
                                   "gate_up": SharedInput([mlp.gate_proj, mlp.up_proj], device),
                                   "down": decode_twin(mlp.down_proj, device)})

    def set_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, keep: int) -> None:
        """New cache tensors, holding the first ``keep`` slots of the old ones."""
        if keep:
            k_cache[:, :, :keep].copy_(self.k_cache[:, :, :keep])
            v_cache[:, :, :keep].copy_(self.v_cache[:, :, :keep])
        self.register_buffer("k_cache", k_cache, persistent=False)
        self.register_buffer("v_cache", v_cache, persistent=False)

    @torch.compiler.nested_compile_region
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                keys: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, t, p = x.shape[0], x.shape[1], self.proj
        h = self.input_layernorm(x)
        q, k, v = p.qkv(h)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        self.k_cache.index_copy_(2, slots, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, slots, v.to(self.v_cache.dtype))
        n = keys.shape[0]
        k, v = self.k_cache[:, :, :n], self.v_cache[:, :, :n]
        valid = keys[None, :] >= pad[:, None]  # (B, n): a row's padding is never attended
        masked = t > 1 or self.full_keys  # one new token attends to every filled slot
        if not masked and self.attention_kernel and k.dtype in (torch.float32, torch.bfloat16):
            o = int8_gemv.attend_one(q.float(), k, v, pad).to(q.dtype)
        elif not masked and self.kv_heads == self.heads and x.device.type == "cpu":
            o = attend_one(q, k, v, valid)
        else:
            seen = keys[None, :] <= slots[:, None]  # (T, n) causal
            # a padding query sees itself at least (it has no other key; its output is unused)
            mask = (valid[:, None, :] & seen[None]) | (keys[None, :] == slots[:, None])[None]
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None],
                                               enable_gqa=self.kv_heads != self.heads)
        x = x + p.o(o.transpose(1, 2).reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        gate, up = p.gate_up(h)
        return x + p.down(self.act_fn(gate) * up)  # LlamaMLP


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Attention of one query per head (1, H, 1, D) over n cached keys and values (1, H, n, D),
    in fp32, as multiply-and-sums. Why not SDPA: on CPU its flash kernel runs two MKL GEMVs and
    allocates its buffers per head, which costs more than reading the keys; written out, Inductor
    fuses it into the step's own kernels. The softmax's division comes after the sum over
    values: written as ``softmax(s) @ v``, Inductor divides inside that sum, once per key and
    value element. Figures: docs/performance.md."""
    scores = (q.float() * k.float()).sum(-1, keepdim=True) * q.shape[-1] ** -0.5  # (B, H, n, 1)
    scores = scores.masked_fill(~valid[:, None, :, None], -float("inf"))  # valid: (B, n)
    e = torch.exp(scores - scores.amax(2, keepdim=True))
    return ((e * v.float()).sum(2, keepdim=True) / e.sum(2, keepdim=True)).to(q.dtype)
