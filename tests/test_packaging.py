"""The wheel a user installs carries the shipped recipes."""

import shutil
import subprocess
import sys
import venv

from conftest import ROOT


def test_wheel_installs_with_every_shipped_recipe(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / item, src / item)
    for item in ("quantkit", "recipes"):
        shutil.copytree(ROOT / item, src / item, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(dist)!r})"],
                   cwd=src, check=True, capture_output=True)
    wheel = next(dist.glob("quantkit-*.whl"))
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    subprocess.run([env / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                   check=True, capture_output=True)
    # run from elsewhere, so that nothing of the checkout is importable
    listed = subprocess.run([env / "bin" / "quantkit", "recipes"], cwd=tmp_path, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    shipped = sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))
    assert [line.split()[0] for line in listed] == shipped and len(shipped) >= 6


def test_readme_and_methodology_name_the_results_schema_eval_writes():
    import re

    from quantkit.evaluate import SCHEMA

    readme = (ROOT / "README.md").read_text()
    assert re.findall(r"\[schema\s+(\d+)\]\(docs/methodology\.md#resultsjson\)", readme) == [str(SCHEMA)]
    methodology = (ROOT / "docs" / "methodology.md").read_text()
    assert re.search(r"## results\.json\s+Schema (\d+) ", methodology).group(1) == str(SCHEMA)
