import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_one_line_error, browser, run_cli, run_cli_here
from quantkit.metrics import bootstrap_delta, fidelity
from quantkit.models import load_chat
from quantkit.report import pareto_front
from quantkit.synth import synthesize, teacher_forced

BROKEN = Path(__file__).parent / "data" / "recipes" / "fp16-fbgemm.toml"
RECIPE_KEYS = {"name", "status", "error", "load_s", "apply_s", "first_call_s", "warm_s_median",
               "warm_s_p90", "steps", "ms_per_step", "rtf", "peak_mem_bytes", "weight_bytes",
               "bandwidth_gbs", "read_bandwidth_gbs", "bandwidth_fraction", "error_rate", "fidelity"}


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("eval")
    mine = out / "audio" / "int8-dynamic"  # the user's, named like a recipe: eval never wrote it
    mine.mkdir(parents=True)
    (mine / "a.wav").write_bytes(b"RIFF")
    proc = run_cli("eval", "--model", "synthetic-tiny", "--recipes", f"bf16,{BROKEN}", "--limit", "2",
                   "--max-new-tokens", "16", "--runs", "2", "--long-steps", "40", "--batch-sizes", "1,2",
                   "--out", str(out))
    # one recipe failed: exit 1, results still written, the last line names it and why
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 recipes failed: fp16-fbgemm (") and "component gpt" in last
    lines = proc.stderr.splitlines()  # progress as plain lines; only the failure is a warning
    assert "[1/3] fp32" in lines and any(ln.startswith("[2/3] bf16: ok in ") for ln in lines), proc.stderr
    assert any(ln.startswith("WARNING quantkit.evaluate: [3/3] fp16-fbgemm: failed in ") for ln in lines), proc.stderr
    assert "Loading weights" not in proc.stderr, proc.stderr  # transformers' per-tensor bar, in each worker
    return out


def test_eval_writes_schema_valid_results(eval_dir):
    doc = json.loads((eval_dir / "results.json").read_text())
    assert doc["schema"] == 4 and doc["synthetic_weights"] is True and doc["model"] == "synthetic-tiny"
    assert doc["complete"] is True
    assert {"torch", "torchao", "chattts", "transformers", "cpu", "gpu", "threads"} <= set(doc["environment"])
    assert doc["command"].startswith("python -m quantkit eval")
    names = [r["name"] for r in doc["recipes"]]
    assert names == ["fp32", "bf16", "fp16-fbgemm"]  # the reference is added, and first
    fp32, bf16 = doc["recipes"][0], doc["recipes"][1]
    for r in (fp32, bf16):
        assert r["status"] == "ok" and RECIPE_KEYS <= set(r)
        assert r["steps"] == 16 and r["warm_s_p90"] >= r["warm_s_median"] > 0
        assert r["bandwidth_gbs"] > 0 and r["peak_mem_bytes"] > r["weight_bytes"] > 0
        runs = r["bandwidth_runs"]  # each warm call against the read bandwidth around it
        assert len(runs) == 2 and all(run["read_gbs"] > 0 for run in runs)
        fractions = [run["achieved_gbs"] / run["read_gbs"] for run in runs]
        assert r["bandwidth_fraction"] == pytest.approx(statistics.median(fractions))
        assert min(run["achieved_gbs"] for run in runs) <= r["bandwidth_gbs"] <= max(
            run["achieved_gbs"] for run in runs)
        assert r["error_rate"]["metric"] == "wer" and 0 <= r["error_rate"]["mean"] <= 1
    assert fp32["fidelity"]["token_agreement"] == 1.0 and fp32["fidelity"]["kl"] == 0.0
    assert fp32["error_rate"]["delta_vs_fp32"] == 0.0
    assert bf16["fidelity"]["kl"] > 0
    for r in (fp32, bf16):  # what users get, through Chat.infer
        shapes = r["call_shapes"]
        assert shapes["long"]["steps"] == 40 and shapes["long"]["s"] > 0
        assert [b["batch"] for b in shapes["batches"]] == [1, 2]
        for b in shapes["batches"]:  # the median of --runs calls; ChatTTS's loop: steps not timed apart
            assert len(b["runs_s"]) == 2 and b["s"] == statistics.median(b["runs_s"]) and min(b["runs_s"]) > 0
            assert b["audio_s_per_s"] == pytest.approx(b["batch"] * b["steps"] * 512 / 24000 / b["s"])
            assert b["row_steps_per_s"] is None
        assert shapes["refine"]["texts"] == 4 and shapes["refine"]["s"] > 0
        assert 0 < shapes["stream"]["first_chunk_s"] and shapes["stream"]["ratio"] == pytest.approx(
            shapes["stream"]["first_chunk_s"] / shapes["stream"]["whole_s"])
    assert doc["recommendation"]["name"] in ("fp32", "bf16")
    assert "fidelity" in doc["recommendation"]["reason"]


def test_a_failing_recipe_is_recorded_and_the_rest_remain(eval_dir):
    doc = json.loads((eval_dir / "results.json").read_text())
    broken = doc["recipes"][2]
    assert broken["status"] == "failed"
    assert "component gpt" in broken["error"] and "Half" in broken["error"]
    assert all(r["status"] == "ok" for r in doc["recipes"][:2])


def test_eval_outputs_report_plot_csv_and_audio(eval_dir):
    report = (eval_dir / "report.md").read_text()
    assert "Synthetic weights" in report and "## Recommendation" in report
    assert "python -m quantkit eval" in report and "fp16-fbgemm" in report
    for plot in ("pareto.png", "throughput.png"):
        png = (eval_dir / plot).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "## What users get: Chat.infer" in report and "batch 2 audio s/s" in report
    assert "each size the median of 2 calls" in report
    rows = (eval_dir / "utterances.csv").read_text().splitlines()
    assert rows[0].startswith("recipe,id,steps,wav,text,transcript,error") and len(rows) == 1 + 2 * 2
    assert len(list((eval_dir / "audio" / "bf16").glob("*.wav"))) == 2
    assert sorted(p.name for p in (eval_dir / "audio").iterdir()) == ["bf16", "fp32", "int8-dynamic"]
    assert (eval_dir / "audio" / "int8-dynamic" / "a.wav").read_bytes() == b"RIFF"  # not eval's: kept
    assert not (eval_dir / ".quantkit-work").exists()


def test_report_rebuild_is_identical(eval_dir):
    before = (eval_dir / "report.md").read_text()
    (eval_dir / "report.md").unlink()
    proc = run_cli("report", str(eval_dir))
    assert proc.returncode == 0, proc.stderr
    assert (eval_dir / "report.md").read_text() == before


def test_report_shows_decode_step_scaling_where_timed(eval_dir, tmp_path):
    """A compiled recipe's batches carry their decode steps' rate: the report adds its table; a
    schema-2 file (no such rate) still reports, without it."""
    doc = json.loads((eval_dir / "results.json").read_text())
    for rate, batch in zip((100.0, 180.0), doc["recipes"][1]["call_shapes"]["batches"]):
        batch["row_steps_per_s"] = rate
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert run_cli_here("report", str(tmp_path)).returncode == 0
    report = (tmp_path / "report.md").read_text()
    assert "| bf16 | 100 | 180 | 1.80x |" in report and "| fp32 | —" not in report
    doc["schema"] = 2
    for r in doc["recipes"][:2]:  # the third failed: no call shapes
        for batch in r["call_shapes"]["batches"]:
            batch.pop("row_steps_per_s")
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert run_cli_here("report", str(tmp_path)).returncode == 0
    assert "steps/s" not in (tmp_path / "report.md").read_text()


def test_report_html_shows_what_users_get_in_a_real_browser(eval_dir, tmp_path):
    """report.html carries report.md's call-shapes tables, sortable, and the throughput plot."""
    out = tmp_path / "eval"
    shutil.copytree(eval_dir, out)
    doc = json.loads((out / "results.json").read_text())
    for rate, batch in zip((100.0, 180.0), doc["recipes"][1]["call_shapes"]["batches"]):
        batch["row_steps_per_s"] = rate  # as a compiled recipe's batches carry them
    (out / "results.json").write_text(json.dumps(doc))
    assert run_cli_here("report", str(out)).returncode == 0
    driver = browser()
    try:
        driver.get((out / "report.html").as_uri())
        cells = lambda table: [[td.text for td in tr.find_elements("tag name", "td")]  # noqa: E731
                               for tr in driver.find_elements("xpath", f"//table[@id='{table}']/tbody/tr")]
        header = [th.text for th in driver.find_elements("xpath", "//table[@id='call-shapes']//th")]
        assert header[:4] == ["recipe", "long s", "long vs stock", "batch 1 audio s/s"]
        rows = {row[0]: row for row in cells("call-shapes")}
        assert set(rows) == {"fp32", "bf16"}  # the failed recipe has none
        for r in doc["recipes"][:2]:
            batch2 = r["call_shapes"]["batches"][1]["audio_s_per_s"]
            assert rows[r["name"]][header.index("batch 2 audio s/s")] == f"{batch2:.3g}"
            assert rows[r["name"]][header.index("long vs stock")] == "—"  # no stock in this eval
        assert cells("decode-steps") == [["bf16", "100", "180", "1.80x"]]  # fp32 ran ChatTTS's loop
        long_s = driver.find_element("xpath", "//table[@id='call-shapes']//th[2]")
        long_s.click()
        names = [row[0] for row in cells("call-shapes")]
        seconds = {r["name"]: r["call_shapes"]["long"]["s"] for r in doc["recipes"][:2]}
        assert names == sorted(seconds, key=seconds.get)
        long_s.click()
        assert [row[0] for row in cells("call-shapes")] == names[::-1]
        plot = driver.find_element("xpath", "//img[@alt='throughput versus batch size']")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 100
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()


def test_report_on_a_missing_or_broken_results_file(tmp_path):
    assert_one_line_error(run_cli_here("report", str(tmp_path)), "does not exist")
    (tmp_path / "results.json").write_text("{not json")
    assert_one_line_error(run_cli_here("report", str(tmp_path)), "not valid JSON")


@pytest.mark.parametrize("args, fragment", [
    (["--recipes", "fp32,int9"], "unknown recipe 'int9'"),
    (["--recipes", ""], "names no recipe"),
    (["--recipes", " , "], "names no recipe"),
    (["--recipes", "bf16,stock,bf16"], "recipe 'bf16' is listed twice"),
    (["--recipes", f"stock,{ROOT / 'recipes' / 'bf16.toml'},bf16"], "are both named 'bf16'"),
    (["--recipes", f"stock,{ROOT / 'tests' / 'data' / 'recipes' / 'other' / 'fp32.toml'}"],
     "the name of the reference"),
    (["--texts", "klingon"], "unknown text set"),
    (["--texts", str(ROOT / "tests")], "unknown text set"),
    (["--asr-model", "no-such-model"], "unknown Whisper model 'no-such-model'"),
    (["--asr-model", "/nonexistent/whisper.pt"], "does not exist"),
    (["--texts", "zh", "--asr-model", "tiny.en"], "English-only"),
    (["--max-error-increase", "-0.01"], "-0.01 is outside 0..1"),
    (["--max-error-increase", "nan"], "nan is outside 0..1"),
    (["--min-similarity", "2"], "2 is outside -1..1"),
    (["--max-mos-drop", "-1"], "-1 is outside 0..4"),
    (["--max-mos-drop", "a lot"], "'a lot' is not a number"),
])
def test_eval_rejects_bad_input_before_running(tmp_path, args, fragment):
    # --timeout 1: had any recipe started, its process would be killed and the run exit 1, not 2
    proc = run_cli_here("eval", "--model", "synthetic-tiny", "--recipes", "stock", "--timeout", "1",
                   *args, "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out").exists()


def test_eval_rejects_unreadable_text_set(tmp_path):
    tsv = tmp_path / "texts.tsv"
    tsv.write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line_error(run_cli_here("eval", "--model", "synthetic-tiny", "--texts", str(tsv),
                                  "--out", str(tmp_path / "out")), "cannot read text file")


@pytest.mark.parametrize("line, fragment", [("u2\t \n", "texts.tsv:2: the text of 'u2' is empty"),
                                           ("u2\t?!\n", "reference 'u2' is empty after normalisation")])
def test_eval_rejects_a_text_with_nothing_to_say_before_running(tmp_path, line, fragment):
    tsv = tmp_path / "texts.tsv"
    tsv.write_text("u1\tHello there.\n" + line)
    proc = run_cli_here("eval", "--model", "synthetic-tiny", "--recipes", "stock", "--timeout", "1",
                        "--texts", str(tsv), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out").exists()


def test_fidelity_of_a_damaged_variant_is_worse(tiny_dir):
    ref = load_chat("synthetic-tiny")
    text = "Glue the sheet to the dark blue background."
    tokens = synthesize(ref, text, seed=1, steps=24).tokens
    a = teacher_forced(ref, text, tokens, seed=1)
    same = fidelity(a.logprobs, teacher_forced(ref, text, tokens, seed=1).logprobs, a.logmel, a.logmel)
    assert same.token_agreement == 1.0 and same.kl == 0.0
    damaged = load_chat("synthetic-tiny")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in list(damaged.gpt.gpt.parameters()) + list(damaged.embed.head_code.parameters()):
            p.add_(torch.randn_like(p) * p.std() * 0.5)
    b = teacher_forced(damaged, text, tokens, seed=1)
    worse = fidelity(a.logprobs, b.logprobs, a.logmel, b.logmel)
    assert worse.token_agreement < 0.9 and worse.kl > 1e-3 and worse.mel_distance > 1e-3


def test_bootstrap_interval_brackets_the_delta():
    delta, (lo, hi) = bootstrap_delta([0.2, 0.3, 0.1, 0.4], [0.1, 0.1, 0.1, 0.1])
    assert delta == pytest.approx(0.15) and lo <= delta <= hi and lo >= 0.0


def test_pareto_front():
    pts = [(10, 0.5, "a"), (20, 0.1, "b"), (15, 0.6, "c"), (30, 0.1, "d"), (5, 0.9, "e")]
    assert [p[2] for p in pareto_front(pts)] == ["e", "a", "b"]
