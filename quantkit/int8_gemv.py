"""Kernels for decode steps on x86 CPUs with AVX512-VNNI: an int8 x int8 -> int32 product,
attention of one new token over the KV cache, top-p's sort of a batch's rows, and an fp32
product for a few rows (the code and text heads).

A decode step multiplies one activation row by every weight: it is bound by how fast the
weights stream from memory. torch 2.11 has no CPU kernel that streams int8 weights at memory
speed for one row: ``_int_mm`` (s8s8) moves 10-15 GB/s here, oneDNN's ``qlinear_pointwise``
19 GB/s for one large matrix and 11 GB/s over a step's 80 smaller ones (call overhead), an
Inductor-fused multiply-and-sum 13 GB/s (the int8 -> float conversion, three instructions per
16 weights, is the limit), while a plain sum reads 25-30 GB/s at the same moment. VNNI's
``vpdpbusd`` multiplies 64 unsigned by 64 signed bytes and accumulates in int32 in one
instruction; with the weights stored in the order the loop reads them it streams them as fast
as a sum does (``tests/test_int8_gemv.py``; figures in docs/performance.md). A batch's rows share
each weight load, so a batched step still streams its weights once. torchao moves its CPU
``_int_mm`` to this u8s8 form with torch >= 2.12.

The activation is int8 made unsigned by adding 128; ``comp`` (128 x each weight row's sum)
takes that back, so the result equals the s8s8 product exactly.

The other kernels serve the steps whose weights run on the int8 kernel: Inductor's fused
attention runs its softmax on one thread, aten sorts 32 rows on one with a comparison sort,
and MKL's sgemm reads the heads' fp32 weights at a third of memory speed for a few rows, which
a batch's rows make slow (docs/performance.md).

The kernels are compiled on first use with torch's C++ extension builder (the compiler Inductor
already needs) and registered as the operators ``quantkit::int8_gemv``, ``quantkit::attend_one``,
``quantkit::sort_rows`` and ``quantkit::linear_rows`` that compiled steps, and ahead-of-time
compiled ones, call by name; an exported variant carries the built library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sysconfig
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from quantkit.atomic import held
from quantkit.quiet import import_cpp_extension

log = logging.getLogger(__name__)

PANEL = 16  # outputs per packed panel: one int32 lane each
GROUP = 4  # bytes of K per lane and instruction

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <vector>
#include <torch/library.h>

constexpr int64_t kPanel = 16, kGroup = 4, kMaxRows = 8;
// Far enough ahead that memory's latency is hidden while a batch's rows keep the core busy. The
// weights are prefetched non-temporal: read once a step, they need not evict the KV cache.
constexpr int64_t kPrefetch = 4096;
constexpr int64_t kAhead = 16;  // cache rows

// NT panels (panel p stored [K / 4][16][4] at w + p * 16 * K) against MR activation rows. Each
// weight load serves every row: a row's 4 bytes are broadcast to the panel's 16 outputs, so an
// accumulator ends holding 16 finished sums. The NT panels are NT memory streams.
template <int MR, int NT>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void tile(const uint8_t* x, int64_t k_len, const int8_t* w, const int64_t* panel,
                 const int32_t* comp, int32_t* y, int64_t ldy) {
  __m512i acc[MR][NT];
  const int8_t* wp[NT];
  for (int t = 0; t < NT; t++) {
    wp[t] = w + panel[t] * kPanel * k_len;
    for (int m = 0; m < MR; m++) acc[m][t] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < k_len; k += kGroup) {
    __m512i wv[NT];
    for (int t = 0; t < NT; t++) {
      wv[t] = _mm512_loadu_si512(wp[t] + k * kPanel);
      _mm_prefetch(reinterpret_cast<const char*>(wp[t] + k * kPanel + kPrefetch), _MM_HINT_NTA);
    }
    for (int m = 0; m < MR; m++) {
      int32_t xg;
      std::memcpy(&xg, x + m * k_len + k, sizeof xg);
      const __m512i xv = _mm512_set1_epi32(xg);
      for (int t = 0; t < NT; t++) acc[m][t] = _mm512_dpbusd_epi32(acc[m][t], xv, wv[t]);
    }
  }
  for (int t = 0; t < NT; t++) {
    const __m512i c = _mm512_loadu_si512(comp + panel[t] * kPanel);
    for (int m = 0; m < MR; m++)
      _mm512_storeu_si512(y + m * ldy + panel[t] * kPanel, _mm512_sub_epi32(acc[m][t], c));
  }
}

// The full tile's sums are stored non-temporal: each thread writes half of every row, and the
// next kernel reads whole rows faster from memory than from the other core's cache. y is
// at::empty's (64-byte aligned), in rows of 64-byte panels; by_panels fences.
__attribute__((target("avx512f"))) static inline void store_nt(int32_t* y, __m512i v) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(y), v);
}

// The full tile, written out: GCC 12 gives _mm512_dpbusd_epi32 only zmm0-15 for its accumulator
// and copies each one in and out every iteration (34 moves per 16 products, a third slower);
// the instruction as inline asm on named registers has none.
#define QK_DPBUSD(acc, x, w) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))
template <>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void tile<8, 2>(const uint8_t* x, int64_t k_len, const int8_t* w, const int64_t* panel,
                const int32_t* comp, int32_t* y, int64_t ldy) {
  const int8_t* w0 = w + panel[0] * kPanel * k_len;
  const int8_t* w1 = w + panel[1] * kPanel * k_len;
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
          a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00, a60 = a00, a61 = a00, a70 = a00, a71 = a00;
  for (int64_t k = 0; k < k_len; k += kGroup) {
    const __m512i v0 = _mm512_loadu_si512(w0 + k * kPanel), v1 = _mm512_loadu_si512(w1 + k * kPanel);
    _mm_prefetch(reinterpret_cast<const char*>(w0 + k * kPanel + kPrefetch), _MM_HINT_NTA);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + k * kPanel + kPrefetch), _MM_HINT_NTA);
#define QK_ROW(m)                                          \
    {                                                      \
      int32_t xg;                                          \
      std::memcpy(&xg, x + m * k_len + k, sizeof xg);      \
      const __m512i xv = _mm512_set1_epi32(xg);            \
      QK_DPBUSD(a##m##0, xv, v0);                          \
      QK_DPBUSD(a##m##1, xv, v1);                          \
    }
    QK_ROW(0) QK_ROW(1) QK_ROW(2) QK_ROW(3) QK_ROW(4) QK_ROW(5) QK_ROW(6) QK_ROW(7)
#undef QK_ROW
  }
  const __m512i c0 = _mm512_loadu_si512(comp + panel[0] * kPanel), c1 = _mm512_loadu_si512(comp + panel[1] * kPanel);
#define QK_STORE(m)                                                                          \
  store_nt(y + m * ldy + panel[0] * kPanel, _mm512_sub_epi32(a##m##0, c0));             \
  store_nt(y + m * ldy + panel[1] * kPanel, _mm512_sub_epi32(a##m##1, c1));
  QK_STORE(0) QK_STORE(1) QK_STORE(2) QK_STORE(3) QK_STORE(4) QK_STORE(5) QK_STORE(6) QK_STORE(7)
#undef QK_STORE
}

// Rows in tiles of kMaxRows, then the rest in one smaller tile.
template <int NT, int MR = kMaxRows>
static void rows(const uint8_t* x, int64_t m_rows, int64_t k_len, const int8_t* w, const int64_t* panel,
                 const int32_t* comp, int32_t* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + MR <= m_rows; m += MR) tile<MR, NT>(x + m * k_len, k_len, w, panel, comp, y + m * ldy, ldy);
  if constexpr (MR > 1)
    if (m < m_rows) rows<NT, MR - 1>(x + m * k_len, m_rows - m, k_len, w, panel, comp, y + m * ldy, ldy);
}

// Panels [0, count) shared between the threads; each thread runs its share two far-apart panels
// at a time, run(std::integral_constant<int, 2>, panel pair), since one core reads two streams
// faster than one, and an odd panel last, run(std::integral_constant<int, 1>, panel).
template <typename Run>
static void by_panels(int64_t count, const Run& run) {
  at::parallel_for(0, count, 4, [&](int64_t p0, int64_t p1) {
    const int64_t half = (p1 - p0) / 2;
    for (int64_t i = 0; i < half; i++) {
      const int64_t panel[2] = {p0 + i, p0 + half + i};
      run(std::integral_constant<int, 2>{}, panel);
    }
    if ((p1 - p0) % 2) {
      const int64_t panel[1] = {p1 - 1};
      run(std::integral_constant<int, 1>{}, panel);
    }
    _mm_sfence();  // non-temporal stores are weakly ordered: visible before the thread's share ends
  });
}

// x (M, K) uint8, w (N / 16, K / 4, 16, 4) int8, comp (N,) int32 -> (M, N) int32
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& comp) {
  TORCH_CHECK(x.dtype() == at::kByte && x.dim() == 2 && x.is_contiguous(), "x: contiguous (M, K) uint8");
  TORCH_CHECK(w.dtype() == at::kChar && w.dim() == 4 && w.is_contiguous() && w.size(2) == kPanel
              && w.size(3) == kGroup && w.size(1) * kGroup == x.size(1), "w: packed (N/16, K/4, 16, 4) int8");
  TORCH_CHECK(comp.dtype() == at::kInt && comp.numel() == w.size(0) * kPanel, "comp: (N,) int32");
  const int64_t m_rows = x.size(0), k_len = x.size(1), n = comp.numel();
  auto y = at::empty({m_rows, n}, x.options().dtype(at::kInt));
  const uint8_t* xp = x.data_ptr<uint8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const int32_t* cp = comp.data_ptr<int32_t>();
  int32_t* yp = y.data_ptr<int32_t>();
  by_panels(w.size(0), [&](auto nt, const int64_t* panel) {
    rows<decltype(nt)::value>(xp, m_rows, k_len, wp, panel, cp, yp, n);
  });
  return y;
}

// fp32 panels (panel p stored [K][16] at w + p * 16 * K) against MR rows, as tile<> does in int8:
// each weight load serves every row, an accumulator ends holding 16 finished sums.
template <int MR, int NT>
__attribute__((target("avx512f")))
static void ftile(const float* x, int64_t k_len, const float* w, const int64_t* panel, float* y, int64_t ldy) {
  __m512 acc[MR][NT];
  const float* wp[NT];
  for (int t = 0; t < NT; t++) {
    wp[t] = w + panel[t] * kPanel * k_len;
    for (int m = 0; m < MR; m++) acc[m][t] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < k_len; k++) {
    __m512 wv[NT];
    for (int t = 0; t < NT; t++) {
      wv[t] = _mm512_loadu_ps(wp[t] + k * kPanel);
      _mm_prefetch(reinterpret_cast<const char*>(wp[t] + k * kPanel) + kPrefetch, _MM_HINT_NTA);
    }
    for (int m = 0; m < MR; m++) {
      const __m512 xv = _mm512_set1_ps(x[m * k_len + k]);
      for (int t = 0; t < NT; t++) acc[m][t] = _mm512_fmadd_ps(xv, wv[t], acc[m][t]);
    }
  }
  for (int t = 0; t < NT; t++)
    for (int m = 0; m < MR; m++) _mm512_storeu_ps(y + m * ldy + panel[t] * kPanel, acc[m][t]);
}

template <int NT, int MR = kMaxRows>
static void frows(const float* x, int64_t m_rows, int64_t k_len, const float* w, const int64_t* panel,
                  float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + MR <= m_rows; m += MR) ftile<MR, NT>(x + m * k_len, k_len, w, panel, y + m * ldy, ldy);
  if constexpr (MR > 1)
    if (m < m_rows) frows<NT, MR - 1>(x + m * k_len, m_rows - m, k_len, w, panel, y + m * ldy, ldy);
}

// x (M, K) fp32, w (N / 16, K, 16) fp32 -> (M, N) fp32
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous (M, K) fp32");
  TORCH_CHECK(w.dtype() == at::kFloat && w.dim() == 3 && w.is_contiguous() && w.size(2) == kPanel
              && w.size(1) == x.size(1), "w: packed (N/16, K, 16) fp32");
  const int64_t m_rows = x.size(0), k_len = x.size(1), n = w.size(0) * kPanel;
  auto y = at::empty({m_rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  by_panels(w.size(0), [&](auto nt, const int64_t* panel) {
    frows<decltype(nt)::value>(xp, m_rows, k_len, wp, panel, yp, n);
  });
  return y;
}

// exp of 16 floats <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial; about 1 ulp)
__attribute__((target("avx512f")))
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 16 cache values at p as fp32: bf16 is the top half of an fp32, so a shift converts it exactly.
template <typename T>
__attribute__((target("avx512f,avx512bw")))
static inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// One head: q (D,) against the cached keys and values of slots [from, n) (rows `stride` apart)
// -> o (D,); s: n floats of scratch. Two passes over the cache: scores, then the weighted sum.
template <typename T, int C>  // C = D / 16 vectors a row
__attribute__((target("avx512f,avx512bw")))
static void attend_head(const float* q, const T* k, const T* v, int64_t stride, int64_t from,
                        int64_t n, float scale, float* s, float* o) {
  __m512 qv[C], acc[C];
  for (int c = 0; c < C; c++) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
  float top = -INFINITY;
  constexpr int64_t kRowBytes = C * 16 * sizeof(T);
  for (int64_t j = from; j < n; j++) {
    const T* kj = k + j * stride;
    // Many short streams (a head's slots): fetch the keys ahead, and the values for the next pass
    for (int64_t b = 0; b < kRowBytes; b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(kj + kAhead * stride) + b, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + j * stride) + b, _MM_HINT_T0);
    }
    __m512 d = _mm512_mul_ps(qv[0], load16(kj));
    for (int c = 1; c < C; c++) d = _mm512_fmadd_ps(qv[c], load16(kj + 16 * c), d);
    s[j] = _mm512_reduce_add_ps(d);
    top = s[j] > top ? s[j] : top;
  }
  int64_t j = from;
  __m512 total = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(top)));
    _mm512_storeu_ps(s + j, e);
    total = _mm512_add_ps(total, e);
  }
  float sum = _mm512_reduce_add_ps(total);
  if (j < n) {
    const __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum += _mm512_mask_reduce_add_ps(m, e);
  }
  for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
  for (int64_t i = from; i < n; i++) {
    const T* vi = v + i * stride;
    const __m512 e = _mm512_set1_ps(s[i]);
    for (int c = 0; c < C; c++) acc[c] = _mm512_fmadd_ps(e, load16(vi + 16 * c), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(from < n ? 1.0f / sum : 0.0f);  // a row of padding alone: zeros
  for (int c = 0; c < C; c++) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[c], inv));
}

template <typename T>
static void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pad,
                       at::Tensor& o) {
  const int64_t b_rows = q.size(0), heads = q.size(1), d = q.size(3), n = k.size(2);
  const float scale = 1.0f / std::sqrt((float)d);
  const int64_t* pp = pad.data_ptr<int64_t>();
  const T* kb = reinterpret_cast<const T*>(k.data_ptr());
  const T* vb = reinterpret_cast<const T*>(v.data_ptr());
  const float* qb = q.data_ptr<float>();
  float* ob = o.data_ptr<float>();
  at::parallel_for(0, b_rows * heads, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> s(n > 0 ? n : 1);
    for (int64_t h = h0; h < h1; h++) {
      const int64_t b = h / heads, i = h % heads;
      const T* kp = kb + b * k.stride(0) + i * k.stride(1);
      const T* vp = vb + b * v.stride(0) + i * v.stride(1);
      const int64_t from = pp[b] < n ? (pp[b] > 0 ? pp[b] : 0) : n;
      if (d == 64) attend_head<T, 4>(qb + h * d, kp, vp, k.stride(2), from, n, scale, s.data(), ob + h * d);
      else if (d == 32) attend_head<T, 2>(qb + h * d, kp, vp, k.stride(2), from, n, scale, s.data(), ob + h * d);
      else if (d == 128) attend_head<T, 8>(qb + h * d, kp, vp, k.stride(2), from, n, scale, s.data(), ob + h * d);
      else attend_head<T, 1>(qb + h * d, kp, vp, k.stride(2), from, n, scale, s.data(), ob + h * d);
    }
  });
}

// q (B, H, 1, D) fp32 against the first n slots of k, v (B, H, >= n, D), fp32 or bf16, row b's
// first pad[b] slots left out -> (B, H, 1, D) fp32: attention of one new token, softmax in fp32.
at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pad) {
  TORCH_CHECK(q.dtype() == at::kFloat && k.dtype() == v.dtype()
              && (k.dtype() == at::kFloat || k.dtype() == at::kBFloat16), "q fp32; k, v both fp32 or bf16");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides()
              && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && k.stride(3) == 1,
              "q (B, H, 1, D), k and v (B, H, n, D) alike, unit stride in D");
  TORCH_CHECK(q.size(3) == 16 || q.size(3) == 32 || q.size(3) == 64 || q.size(3) == 128, "head size 16, 32, 64 or 128");
  TORCH_CHECK(pad.dtype() == at::kLong && pad.numel() == q.size(0) && pad.is_contiguous(), "pad: (B,) int64");
  const auto qc = q.contiguous();
  auto o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (k.dtype() == at::kFloat) attend_all<float>(qc, k, v, pad, o);
  else attend_all<at::BFloat16>(qc, k, v, pad, o);
  return o;
}

// One row's ascending sort by LSD radix over the floats' bits (flipped so that unsigned order is
// float order) -> false, nothing to trust, where the row holds a NaN or two equal values: the
// order of equal values is what aten's unstable sort makes it, so those rows go to aten.
static bool radix_row(const float* x, int64_t n, float* values, int64_t* indices,
                      std::vector<uint32_t>& keys, std::vector<int32_t>& order) {
  keys.resize(2 * n);
  order.resize(2 * n);
  uint32_t *k0 = keys.data(), *k1 = k0 + n;
  int32_t *i0 = order.data(), *i1 = i0 + n;
  int64_t count[4][256] = {};
  for (int64_t i = 0; i < n; i++) {
    if (std::isnan(x[i])) return false;
    uint32_t u;
    std::memcpy(&u, x + i, sizeof u);
    u ^= static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u;
    k0[i] = u;
    i0[i] = static_cast<int32_t>(i);
    for (int d = 0; d < 4; d++) count[d][(u >> (8 * d)) & 255]++;
  }
  for (int d = 0; d < 4; d++) {
    if (count[d][(k0[0] >> (8 * d)) & 255] == n) continue;  // one bucket: the order stands
    int64_t at[256], sum = 0;
    for (int b = 0; b < 256; b++) at[b] = sum, sum += count[d][b];
    for (int64_t i = 0; i < n; i++) {
      const int64_t j = at[(k0[i] >> (8 * d)) & 255]++;
      k1[j] = k0[i];
      i1[j] = i0[i];
    }
    std::swap(k0, k1);
    std::swap(i0, i1);
  }
  for (int64_t j = 0; j < n; j++) {
    values[j] = x[i0[j]];
    indices[j] = i0[j];
    if (j > 0 && values[j] == values[j - 1]) return false;  // -0.0 and 0.0 too
  }
  return true;
}

// Rows longer than this (a text vocabulary's 21178 logits) hold equal values more often than not
constexpr int64_t kRadixMax = 4096;

// torch.sort(x) (ascending, last dim) of a 2-D fp32 x, its rows shared between the threads (aten
// sorts a (32, 626) tensor on one thread) and each sorted by radix where that gives aten's result.
std::tuple<at::Tensor, at::Tensor> sort_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.dtype() == at::kFloat, "x: (rows, n) fp32");
  const auto x = x_in.contiguous();
  const int64_t n = x.size(1);
  TORCH_CHECK(n < (int64_t{1} << 31), "x: rows of fewer than 2^31 values");
  auto values = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto indices = at::empty(x.sizes(), x.options().dtype(at::kLong));
  const bool radix = n > 0 && n <= kRadixMax;
  at::parallel_for(0, x.size(0), 1, [&](int64_t r0, int64_t r1) {
    std::vector<uint32_t> keys;
    std::vector<int32_t> order;
    for (int64_t r = r0; r < r1; r++) {
      if (radix && radix_row(x.data_ptr<float>() + r * n, n, values.data_ptr<float>() + r * n,
                             indices.data_ptr<int64_t>() + r * n, keys, order))
        continue;
      auto [v, i] = at::sort(x.slice(0, r, r + 1), -1, false);
      values.slice(0, r, r + 1).copy_(v);
      indices.slice(0, r, r + 1).copy_(i);
    }
  });
  return {values, indices};
}

TORCH_LIBRARY(quantkit, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor comp) -> Tensor");
  m.def("attend_one(Tensor q, Tensor k, Tensor v, Tensor pad) -> Tensor");
  m.def("sort_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("linear_rows(Tensor x, Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("attend_one", &attend_one);
  m.impl("sort_rows", &sort_rows);
  m.impl("linear_rows", &linear_rows);
}
"""


def cpu_supported() -> bool:
    """Linux x86 with AVX512-VNNI (the kernel's instructions)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx512f", "avx512bw", "avx512_vnni"} <= set(flags.split(":", 1)[1].split())


_loaded: str | None = None  # the library registered in this process
_load_lock = threading.Lock()  # Chats loaded in threads at once build and register it once


@lru_cache(maxsize=None)
def library() -> str | None:
    """Build (first use; cached by source hash) and load the kernel -> the shared library's path,
    or None where this CPU lacks VNNI or no compiler works (callers then use their own path)."""
    if not cpu_supported():
        return None
    with _load_lock:
        return _loaded if _loaded is not None else _build()


def _build() -> str | None:
    import_cpp_extension()
    from torch.utils.cpp_extension import load_inline

    from quantkit.cache import cache_dir

    # torch's build script names its install and Python's headers: another environment rebuilds
    where = (_SOURCE, torch.__version__, str(Path(torch.__file__).parent), sysconfig.get_paths()["include"])
    digest = hashlib.sha256("\0".join(where).encode()).hexdigest()[:12]
    build = cache_dir() / "kernels" / f"int8_gemv-{digest}"
    try:
        build.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path(), held(build / "quantkit.lock") as locked:
            if locked:  # torch's own lock is a file that a killed build leaves: later builds waited forever
                (build / "lock").unlink(missing_ok=True)
            path = load_inline(f"quantkit_int8_gemv_{digest}", cpp_sources=_SOURCE, build_directory=str(build),
                               extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                               is_python_module=False)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja...: fall back, say why
        log.warning("int8 VNNI kernel not built (%s: %s); int8 steps use the portable path",
                    type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return None
    return _registered(path)


def load_library(path: str | Path) -> bool:
    """Load a built kernel library (an exported variant's copy) without building anything."""
    if not cpu_supported():
        return False
    with _load_lock:
        if _loaded is None:
            torch.ops.load_library(str(path))
            _registered(str(path))
    return True


def _registered(path: str) -> str:
    """Note the loaded library and give its operators their shape functions, for tracing."""
    global _loaded
    torch.library.register_fake("quantkit::int8_gemv")(_fake_int8_gemv)
    torch.library.register_fake("quantkit::attend_one")(_fake_attend_one)
    torch.library.register_fake("quantkit::sort_rows")(_fake_sort_rows)
    torch.library.register_fake("quantkit::linear_rows")(_fake_linear_rows)
    _loaded = path
    return path


def _fake_int8_gemv(x: torch.Tensor, w: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], comp.shape[0]), dtype=torch.int32)


def _fake_attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _fake_sort_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=torch.long)


def _fake_linear_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0] * w.shape[2]))


@contextmanager
def _ninja_on_path():
    """PATH with the ninja package's binary, for the build only: torch's builder runs `ninja`
    from PATH, where the pip package's binary is not unless the environment is activated."""
    saved = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + saved
        except ImportError:
            pass
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def pack(qdata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight (N, K), K a multiple of 4 -> (panels (ceil(N/16), K/4, 16, 4), comp (N'))
    with N padded to a multiple of 16 by zero rows (their outputs are sliced off by the caller)."""
    n, k = qdata.shape
    pad = -n % PANEL
    w = torch.cat([qdata, qdata.new_zeros(pad, k)]) if pad else qdata
    panels = w.reshape(-1, PANEL, k // GROUP, GROUP).transpose(1, 2).contiguous()
    comp = w.sum(1, dtype=torch.int32) * 128
    return panels, comp


def int8_gemv(xu: torch.Tensor, panels: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """int8 activations plus 128 as uint8 (M, K) (``quantize_rows(x, unsigned=True)``) times
    packed int8 weights (``pack``) -> (M, N') int32, exact: the product of the int8 values."""
    return torch.ops.quantkit.int8_gemv(xu.contiguous(), panels, comp)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """quantkit.static_cache.attend_one as one kernel: fp32 ``q`` (B, H, 1, D) over the slots of
    fp32 or bf16 ``k``, ``v`` (B, H, n, D) from each row's ``pad`` on -> (B, H, 1, D) fp32. Each
    (row, head) is one task over both cores, where Inductor's fused code runs the softmax on one."""
    return torch.ops.quantkit.attend_one(q, k, v, pad)


def sort_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(x)`` (ascending, along the last dim) of a 2-D fp32 ``x``: top-p's sort of a
    batch's rows of logits, which aten runs on one thread with a comparison sort. The rows are
    shared between the threads and sorted by radix, except rows with equal values or NaNs (whose
    order aten's unstable sort decides) and rows of more than 4096 values, which mostly hold
    equal values: aten sorts those."""
    return torch.ops.quantkit.sort_rows(x)


def pack_float(weight: torch.Tensor) -> torch.Tensor:
    """fp32 weight (N, K) -> panels (ceil(N/16), K, 16), N padded by zero rows as ``pack`` does."""
    n, k = weight.shape
    w = torch.cat([weight, weight.new_zeros(-n % PANEL, k)]).float()
    return w.reshape(-1, PANEL, k).transpose(1, 2).contiguous()


def linear_rows(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """fp32 rows (M, K) times packed fp32 weights (``pack_float``) -> (M, N') fp32: each weight
    is read once for all the rows, where MKL's sgemm at a few rows reads at a third of the speed."""
    return torch.ops.quantkit.linear_rows(x.contiguous(), panels)
