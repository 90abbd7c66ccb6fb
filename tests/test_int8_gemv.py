"""The AVX512-VNNI int8 kernel: exact against int32 arithmetic, and the same results as the
portable int8 path wherever the decode step uses it (fused Linears included)."""

import pytest
import torch
from torch import nn

from quantkit import int8_gemv
from quantkit.linears import PlainInt8Linear, RowsLinear, SharedInput, plain_int8_twin
from quantkit.quantize import quantize_module

pytestmark = pytest.mark.skipif(not int8_gemv.cpu_supported(), reason="this CPU has no AVX512-VNNI")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert int8_gemv.library() is not None  # a supported CPU must build it: no silent fallback
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the kernels split their work between threads
    yield
    torch.set_num_threads(threads)


def unsigned(x: torch.Tensor) -> torch.Tensor:
    """int8 values as the kernel takes them: plus 128, uint8."""
    return (x.to(torch.int16) + 128).to(torch.uint8)


@pytest.mark.parametrize("n,k,m", [(96, 64, 1), (626, 768, 1), (130, 128, 7), (64, 192, 8), (36, 132, 13), (40, 128, 160)])
def test_kernel_is_exact(n, k, m):
    torch.manual_seed(n)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    x[0, :] = -128  # extremes: the unsigned shift must not overflow
    w[0, :] = -128
    panels, comp = int8_gemv.pack(w)
    assert panels.shape == (-(-n // 16), k // 4, 16, 4)
    y = int8_gemv.int8_gemv(unsigned(x), panels, comp)
    assert y.dtype == torch.int32 and y.shape == (m, panels.shape[0] * 16)
    assert torch.equal(y[:, :n], x.int() @ w.int().t())
    assert not y[:, n:].any()  # padding rows


def test_kernel_inside_a_compiled_graph():
    torch.manual_seed(0)
    panels, comp = int8_gemv.pack(torch.randint(-128, 128, (64, 128), dtype=torch.int8))
    x = unsigned(torch.randint(-128, 128, (1, 128), dtype=torch.int8))

    def f(x):
        return int8_gemv.int8_gemv(x, panels, comp).float() * 0.5

    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def _dynamic_int8(*shapes):
    torch.manual_seed(1)
    model = nn.Sequential(*(nn.Linear(k, n, bias=False) for n, k in shapes))
    quantize_module(model, "int8-dynamic", torch.device("cpu"))
    return model


def test_kernel_twin_equals_the_portable_twin():
    model = _dynamic_int8((96, 128))
    kernel, portable = plain_int8_twin(model[0]), plain_int8_twin(model[0], use_kernel=False)
    assert kernel.packed and not portable.packed
    with torch.no_grad():
        for shape in [(1, 1, 128), (1, 9, 128)]:
            x = torch.randn(shape) * 3
            assert torch.equal(kernel(x), portable(x))
            assert torch.equal(kernel(x), model[0](x))  # and torchao's own linear


@pytest.mark.parametrize("rows", [False, True])
def test_linears_on_one_input_run_fused(rows):
    """int8 Linears run as one int8 kernel call, also where fp32 ones would run on the rows kernel."""
    model = _dynamic_int8((64, 128), (32, 128), (130, 128))
    fused = SharedInput(list(model), torch.device("cpu"), rows=rows)
    assert isinstance(fused.fused, PlainInt8Linear) and len(fused.twins) == 0
    with torch.no_grad():
        x = torch.randn(1, 1, 128)
        outs = fused(x)
        assert [o.shape[-1] for o in outs] == [64, 32, 130]
        for out, lin in zip(outs, model):
            assert torch.equal(out, lin(x))


@pytest.mark.parametrize("n,k,m", [(626, 768, 1), (2504, 768, 8), (130, 128, 7), (40, 64, 19)])
def test_fp32_rows_kernel_is_the_product(n, k, m):
    """The code heads' kernel: x @ w.t() in fp32, summed in its own order (so equal to rounding)."""
    torch.manual_seed(n)
    w, x = torch.randn(n, k) / k**0.5, torch.randn(m, k)
    panels = int8_gemv.pack_float(w)
    assert panels.shape == (-(-n // 16), k, 16)
    y = int8_gemv.linear_rows(x, panels)
    assert y.dtype == torch.float32 and y.shape == (m, panels.shape[0] * 16)
    torch.testing.assert_close(y[:, :n], (x.double() @ w.double().t()).float(), rtol=1e-5, atol=1e-5)
    assert not y[:, n:].any()  # padding rows


def test_fp32_linears_on_one_input_run_as_one_rows_kernel():
    torch.manual_seed(2)
    heads = [nn.Linear(128, 50, bias=False) for _ in range(4)]
    fused = SharedInput(heads, torch.device("cpu"), rows=True)
    assert isinstance(fused.fused, RowsLinear)
    assert not isinstance(SharedInput(heads, torch.device("cpu")).fused, RowsLinear)  # asked for only
    with torch.no_grad():
        for shape in [(1, 128), (8, 128), (2, 3, 128)]:
            x = torch.randn(shape)
            outs = fused(x)
            for out, lin in zip(outs, heads):
                torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)


def test_text_head_folds_onto_the_rows_kernel_at_its_first_call():
    from torch.nn.utils.parametrizations import weight_norm

    from quantkit.static_cache import FoldedHead

    torch.manual_seed(3)
    head = weight_norm(nn.Linear(64, 300, bias=False))  # ChatTTS's text head, small
    folded = FoldedHead(head, rows=True)
    assert folded.packed is None  # nothing held before a call needs it
    with torch.no_grad():
        x = torch.randn(4, 64)
        torch.testing.assert_close(folded(x), head(x), rtol=1e-5, atol=1e-5)
    assert isinstance(folded.packed, RowsLinear) and folded.weight is None


def test_static_cache_path_keeps_packed_weights_in_one_huge_page_mapping(tiny_dir):
    from quantkit.apply import apply_recipe
    from quantkit.models import load_chat
    from quantkit.recipes import get_recipe

    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe("int8-dynamic-compiled"))
    packed = [m for m in chat.gpt.generate.model.modules() if isinstance(m, PlainInt8Linear) and m.packed]
    assert len(packed) == 4 * chat.gpt.gpt.config.num_hidden_layers  # qkv, o, gate+up, down
    ptrs = [m.panels.data_ptr() for m in packed]
    assert ptrs == sorted(ptrs)  # laid out in the order a step reads them, end to end
    assert ptrs[-1] - ptrs[0] < sum(m.panels.nbytes + 64 for m in packed)
    assert all(m.panels.storage_offset() == 0 for m in packed)  # each its own storage: see DecoderLayer
    heads = chat.gpt.generate.model.heads_code.fused  # the code heads on the fp32 rows kernel, read last
    assert isinstance(heads, RowsLinear) and heads.panels.data_ptr() > ptrs[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,heads,n,d", [(1, 12, 37, 64), (8, 12, 77, 64), (3, 4, 5, 16), (2, 2, 300, 128), (2, 3, 19, 32)])
def test_attention_kernel_is_attend_one(dtype, rows, heads, n, d):
    """The attention kernel computes what the step's Inductor-compiled attend_one does, over a
    cache's first n slots (a view of a longer cache), each row's left padding left out."""
    from quantkit.static_cache import attend_one

    torch.manual_seed(n)
    q = torch.randn(rows, heads, 1, d)
    k, v = (torch.randn(rows, heads, n + 9, d).to(dtype)[:, :, :n] for _ in range(2))
    pad = torch.randint(0, min(n, 6), (rows,))
    valid = torch.arange(n)[None] >= pad[:, None]
    out = int8_gemv.attend_one(q, k, v, pad)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out, attend_one(q, k.float(), v.float(), valid), rtol=1e-5, atol=1e-6)
    k[0, :, :pad[0]] = float("nan")  # a row's padding is never read
    assert torch.equal(int8_gemv.attend_one(q, k, v, pad), out)


def test_attention_kernel_in_a_compiled_graph_of_any_length():
    """Compiled with the slots as a symbolic size, as the step is: one graph for every length."""
    torch.manual_seed(0)
    cache = torch.randn(2, 4, 64, 16).to(torch.bfloat16)
    q, pad = torch.randn(2, 4, 1, 16), torch.tensor([0, 3])

    def f(q, keys):
        return int8_gemv.attend_one(q * 2, cache[:, :, :keys.shape[0]], cache[:, :, :keys.shape[0]], pad) + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for n in (9, 23, 40):
        keys = torch.arange(n)
        torch._dynamo.maybe_mark_dynamic(keys, 0)
        with torch._dynamo.config.patch(error_on_recompile=n > 9):
            torch.testing.assert_close(compiled(q, keys), f(q, keys), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 5, 32, 64])
def test_row_sort_is_torch_sort(rows):
    """Top-p's sort with the rows shared between threads: torch.sort's values and indices, the
    order of tied values included."""
    torch.manual_seed(rows)
    special = torch.randn(rows, 626)
    special[:, :3] = torch.tensor([float("-inf"), float("inf"), -1e-42])  # -inf, inf, a subnormal
    signed_zeros = torch.randn(rows, 626)
    signed_zeros[:, 5], signed_zeros[-1, 9] = 0.0, -0.0  # equal to aten's comparison: aten's order
    mixed = torch.randn(rows, 21178)  # the text vocabulary; some rows with ties, some without
    mixed[::2, 7] = mixed[::2, 8]
    nan = torch.randn(rows, 626)
    nan[0, 3] = float("nan")
    for x in (torch.randn(rows, 626), torch.randint(-20, 20, (rows, 626)).float(), torch.randn(rows, 900)[:, ::3],
              special, signed_zeros, mixed, nan):
        values, indices = int8_gemv.sort_rows(x)
        expected = torch.sort(x)
        assert torch.equal(indices, expected.indices)
        torch.testing.assert_close(values, expected.values, rtol=0, atol=0, equal_nan=True)


def test_the_kernel_builds_and_loads_without_a_notice_about_cuda():
    """torch's extension builder, imported for the build, logs that a machine without CUDA has no
    CUDA runtime: nothing a CPU kernel needs, so a user of a CPU recipe is not shown it."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from quantkit import int8_gemv; print(int8_gemv.library())"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(".so"), proc.stderr
    assert "CUDA" not in proc.stderr, proc.stderr


# Two threads load the built library at once (Chats loaded in threads); the library's load is made
# slow, so that both would be inside it together where nothing keeps them apart.
LOAD_TWICE = """
import sys, time, torch
from concurrent.futures import ThreadPoolExecutor
from quantkit import int8_gemv
load = torch.ops.load_library
def slow(path):
    time.sleep(0.5)
    load(path)
torch.ops.load_library = slow
with ThreadPoolExecutor(2) as pool:
    print(list(pool.map(int8_gemv.load_library, [sys.argv[1]] * 2)))
"""


def test_two_threads_loading_the_kernel_at_once_register_it_once():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LOAD_TWICE, int8_gemv.library()], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[True,", "True]"]


BUILD = "from quantkit import int8_gemv; print(int8_gemv.library())"


def test_a_build_killed_midway_leaves_the_next_one_free_to_build(tmp_path):
    """torch's builder marks a build in progress with a file that a killed build (SIGKILL, the
    out-of-memory killer, a closed terminal) leaves behind: every later build waited on it forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "QUANTKIT_CACHE": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("kernels/*/lock")):
        assert first.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # the compiler with it
    first.wait()
    assert list(tmp_path.glob("kernels/*/lock"))  # what the killed build left
    proc = subprocess.run([sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(".so"), proc.stderr[-2000:]
