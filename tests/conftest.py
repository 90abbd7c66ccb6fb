import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# xdist's workers share the cores: each gets its share of OpenMP threads, set before torch loads
# (its pool is sized once). Two teams of all the cores each stall each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import numpy as np  # noqa: E402 (after the thread count)
import pytest  # noqa: E402


# The longest files first: xdist hands each worker whole files in collection order
# (--no-loadscope-reorder, pyproject.toml), so the files that start last are short ones.
SLOWEST_FIRST = ("test_compile.py", "test_safety.py", "test_export.py", "test_call_shapes.py", "test_foundation.py",
                 "test_int8_gemv.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


# Texts of different lengths and scripts for the decoding tests (a short prompt, English, Chinese).
TEXTS = ["Hi.", "The birch canoe slid on the smooth planks.",
         "今天下午我们在会议室讨论新的计划，请把这份文件交给前台的工作人员。"]


@pytest.fixture(scope="session", autouse=True)
def _quantkit_cache(tmp_path_factory):
    """Synthetic weights and converted Whisper checkpoints go to a per-run cache, so every run
    exercises the writing and conversion code, not only a warm cache; Inductor's cache too, so
    that no test finds kernels an earlier run built."""
    os.environ.setdefault("QUANTKIT_CACHE", str(tmp_path_factory.mktemp("quantkit-cache")))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor-cache")))
    yield


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def run_cli_here(*args: str) -> subprocess.CompletedProcess:
    """The command line in this process (for inputs refused before any slow work: no import
    cost); the same exit code and output as ``run_cli``, and an uncaught exception fails the test
    as a traceback would."""
    import contextlib
    import io

    from quantkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="session")
def tiny_dir():
    from quantkit.models import synthetic_dir

    return synthetic_dir("synthetic-tiny")


@pytest.fixture
def tiny_chat(tiny_dir):
    from quantkit.models import load_chat

    return load_chat("synthetic-tiny", "cpu")


def add_white_noise(audio: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """``audio`` plus white noise at ``snr_db`` dB signal-to-noise."""
    power = np.mean(audio ** 2)
    noise = np.random.default_rng(seed).normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), audio.shape)
    return (audio + noise).astype(np.float32)


def speak(texts: dict[str, str], folder: Path, voice: str | None = None, prefix: str = "") -> None:
    """flite (installed by `make test`) speaks each text into folder/PREFIXID.wav."""
    if shutil.which("flite") is None:
        pytest.fail("flite is not installed: run `make system-deps` (Debian package flite)")
    for uid, text in texts.items():
        subprocess.run(["flite", *(["-voice", voice] if voice else []), "-t", text,
                        "-o", str(folder / f"{prefix}{uid}.wav")], check=True)


def write_compile_cache(cache: Path, step: bytes, prefill: bytes) -> dict:
    """A --compile-cache folder for fp32-compiled on synthetic-tiny holding these two 'compiled
    functions', listed with their hashes -> its compiled.json."""
    from quantkit.export import sha256
    from quantkit.recipes import get_recipe
    from quantkit.run import COMPILED_INFO, cache_key

    cache.mkdir()
    (cache / "decode_step.aot").write_bytes(step)
    (cache / "prefill.aot").write_bytes(prefill)
    info = {"kind": "aot", "file": "decode_step.aot", "prefill": "prefill.aot", "sampling": {},
            "files": {f: sha256(cache / f) for f in ("decode_step.aot", "prefill.aot")},
            "for": cache_key(get_recipe("fp32-compiled"), "synthetic-tiny")}
    (cache / COMPILED_INFO).write_text(json.dumps(info))
    return info


def browser():
    """Headless Chromium through its WebDriver (installed by `make system-deps`), browser log on."""
    selenium = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver_path or not binary:
        pytest.fail("Chromium and its driver are not installed: run `make system-deps` "
                    "(Debian packages chromium, chromium-driver)")
    opts = Options()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
                 "--allow-file-access-from-files"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return selenium.Chrome(service=Service(driver_path), options=opts)


@contextmanager
def recording(chat):
    """Every GenerationOutputs the chat's generate yields (tokens, cloned), while in the block."""
    seen, inner = [], chat.gpt.generate

    def generate(*args, **kwargs):
        for out in inner(*args, **kwargs):
            seen.append([ids.clone() for ids in out.ids])
            yield out

    chat.gpt.generate = generate
    try:
        yield seen
    finally:
        chat.gpt.generate = inner
