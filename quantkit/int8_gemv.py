"""An int8 x int8 -> int32 product for decode steps on x86 CPUs with AVX512-VNNI.

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

The kernel is compiled on first use with torch's C++ extension builder (the compiler Inductor
already needs) and registered as the operator ``quantkit::int8_gemv`` that compiled steps, and
ahead-of-time compiled ones, call by name; an exported variant carries the built library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PANEL = 16  # outputs per packed panel: one int32 lane each
GROUP = 4  # bytes of K per lane and instruction

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <immintrin.h>
#include <torch/library.h>

constexpr int64_t kPanel = 16, kGroup = 4, kMaxRows = 8;
// Far enough ahead that memory's latency is hidden while a batch's rows keep the core busy.
constexpr int64_t kPrefetch = 4096;

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
      _mm_prefetch(reinterpret_cast<const char*>(wp[t] + k * kPanel + kPrefetch), _MM_HINT_T0);
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

// Rows in tiles of kMaxRows, then the rest in one smaller tile.
template <int NT, int MR = kMaxRows>
static void rows(const uint8_t* x, int64_t m_rows, int64_t k_len, const int8_t* w, const int64_t* panel,
                 const int32_t* comp, int32_t* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + MR <= m_rows; m += MR) tile<MR, NT>(x + m * k_len, k_len, w, panel, comp, y + m * ldy, ldy);
  if constexpr (MR > 1)
    if (m < m_rows) rows<NT, MR - 1>(x + m * k_len, m_rows - m, k_len, w, panel, comp, y + m * ldy, ldy);
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
  at::parallel_for(0, w.size(0), 4, [&](int64_t p0, int64_t p1) {
    const int64_t half = (p1 - p0) / 2;  // two far-apart panels at once: one core reads two streams faster than one
    for (int64_t i = 0; i < half; i++) {
      const int64_t panel[2] = {p0 + i, p0 + half + i};
      rows<2>(xp, m_rows, k_len, wp, panel, cp, yp, n);
    }
    if ((p1 - p0) % 2) {
      const int64_t panel[1] = {p1 - 1};
      rows<1>(xp, m_rows, k_len, wp, panel, cp, yp, n);
    }
  });
  return y;
}

TORCH_LIBRARY(quantkit, m) { m.def("int8_gemv(Tensor x, Tensor w, Tensor comp) -> Tensor"); }
TORCH_LIBRARY_IMPL(quantkit, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
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


@lru_cache(maxsize=None)
def library() -> str | None:
    """Build (first use; cached by source hash) and load the kernel -> the shared library's path,
    or None where this CPU lacks VNNI or no compiler works (callers then use their own path)."""
    if not cpu_supported():
        return None
    if _loaded is not None:
        return _loaded
    from torch.utils.cpp_extension import load_inline

    from quantkit.cache import cache_dir

    digest = hashlib.sha256((_SOURCE + torch.__version__).encode()).hexdigest()[:12]
    build = cache_dir() / "kernels" / f"int8_gemv-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        with _ninja_on_path():
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
    if _loaded is None:
        torch.ops.load_library(str(path))
        _registered(str(path))
    return True


def _registered(path: str) -> str:
    """Note the loaded library and give the operator its shape function, for tracing."""
    global _loaded
    torch.library.register_fake("quantkit::int8_gemv")(_fake_int8_gemv)
    _loaded = path
    return path


def _fake_int8_gemv(x: torch.Tensor, w: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], comp.shape[0]), dtype=torch.int32)


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
