import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# Texts of different lengths and scripts for the decoding tests (a short prompt, English, Chinese).
TEXTS = ["Hi.", "The birch canoe slid on the smooth planks.",
         "今天下午我们在会议室讨论新的计划，请把这份文件交给前台的工作人员。"]


@pytest.fixture(scope="session", autouse=True)
def _quantkit_cache(tmp_path_factory):
    """Synthetic weights and converted Whisper checkpoints go to a per-run cache, so every run
    exercises the writing and conversion code, not only a warm cache."""
    os.environ.setdefault("QUANTKIT_CACHE", str(tmp_path_factory.mktemp("quantkit-cache")))
    yield


@pytest.fixture(autouse=True)
def _inductor_config():
    """torchao sets Inductor options globally when it quantizes (force_fuse_int_mm_with_mul,
    coordinate-descent tuning); they would change the cache keys of later tests' compilations
    in this process, so a test's result would depend on the order tests run in."""
    import torch._inductor.config

    saved = torch._inductor.config.save_config()
    yield
    torch._inductor.config.load_config(saved)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


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
