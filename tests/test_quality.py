"""Naturalness (DNSMOS) and speaker similarity (GE2E) on real speech, the score command, and
report.html in a real browser (headless Chromium through its WebDriver)."""

import json
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import add_white_noise, assert_one_line_error, browser, run_cli, run_cli_here, speak

from quantkit.audio import read_wav
from quantkit.quality import dnsmos, similarity, speaker_embedding
from quantkit.texts import load_texts


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    """Four Harvard sentences in three flite voices (installed by `make test`)."""
    out = tmp_path_factory.mktemp("voices")
    _, texts = load_texts("en")
    chosen = dict(list(texts.items())[:4])
    for voice in ("slt", "rms", "awb"):
        speak(chosen, out, voice, prefix=f"{voice}-")
    return out, chosen


def _wavs(folder: Path, voice: str) -> list[Path]:
    return sorted(folder.glob(f"{voice}-*.wav"))


def test_dnsmos_rates_clean_speech_above_noisy(voices):
    folder, _ = voices
    clean, noisy = [], []
    for path in _wavs(folder, "slt"):
        audio, rate = read_wav(path)
        clean.append(dnsmos(audio, rate))
        noisy.append(dnsmos(add_white_noise(audio, 0.0), rate))
    ovrl_clean, ovrl_noisy = np.mean([m.ovrl for m in clean]), np.mean([m.ovrl for m in noisy])
    assert ovrl_clean - ovrl_noisy > 0.6, (ovrl_clean, ovrl_noisy)  # measured: 2.70 against 1.44
    assert np.mean([m.bak for m in clean]) > np.mean([m.bak for m in noisy]) + 0.5
    assert all(1.0 <= v <= 5.0 for m in clean + noisy for v in m.to_dict().values())


def test_same_voice_is_more_similar_than_another(voices):
    folder, _ = voices
    emb = {v: [speaker_embedding(*read_wav(p)) for p in _wavs(folder, v)] for v in ("slt", "rms", "awb")}
    same = [similarity(a, b) for i, a in enumerate(emb["slt"]) for b in emb["slt"][i + 1:]]
    other = [similarity(a, b) for a in emb["slt"] for v in ("rms", "awb") for b in emb[v]]
    assert np.mean(same) - np.mean(other) > 0.15, (np.mean(same), np.mean(other))  # measured: 0.89 against 0.58-0.65
    assert similarity(emb["slt"][0], emb["slt"][0]) == pytest.approx(1.0)


def test_score_json_and_table(voices, tmp_path):
    folder, texts = voices
    refs = tmp_path / "refs.tsv"
    wavs = _wavs(folder, "slt")[:2]
    refs.write_text("".join(f"{p.stem}\t{texts[p.stem.split('-', 1)[1]]}\n" for p in wavs))
    proc = run_cli("score", *map(str, wavs), "--references", str(refs), "--speaker-reference",
                   str(_wavs(folder, "slt")[3]), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "pkg_resources" not in proc.stderr, proc.stderr  # resemblyzer's webrtcvad, imported quietly
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(w) for w in wavs]
    for r in rows:
        assert set(r) == {"file", "dnsmos", "speaker_similarity", "error_rate"}
        assert set(r["dnsmos"]) == {"sig", "bak", "ovrl", "p808"}
        assert r["speaker_similarity"] > 0.7 and 0.0 <= r["error_rate"] < 0.5
    proc = run_cli("score", str(wavs[0]))
    assert proc.returncode == 0, proc.stderr
    assert "OVRL" in proc.stdout and "—" in proc.stdout.splitlines()[1]  # no references, no speaker


def test_score_bad_input(voices, tmp_path):
    folder, _ = voices
    wav = str(_wavs(folder, "slt")[0])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    assert_one_line_error(run_cli_here("score", str(bad)), "cannot read audio")
    assert_one_line_error(run_cli_here("score", wav, "--speaker-reference", str(bad)), "cannot read audio")
    assert_one_line_error(run_cli_here("score", wav, "--references", str(tmp_path / "none.tsv")), "cannot read text file")
    other = tmp_path / "other.tsv"
    other.write_text("someone-else\tHello.\n")
    assert_one_line_error(run_cli_here("score", wav, "--references", str(other)), "no reference for")
    tsv = tmp_path / "broken.tsv"
    tsv.write_text("no tab here\n")
    assert_one_line_error(run_cli_here("score", wav, "--references", str(tsv)), "expected 'id<TAB>text'")
    tsv.write_text(f"{Path(wav).stem}\t?!\n")  # nothing left once normalised: refused before Whisper loads
    for command in ("score", "transcribe"):
        assert_one_line_error(run_cli_here(command, wav, "--references", str(tsv)), "empty after normalisation")


# ---------------------------------------------------------------- report.html in a browser

@pytest.fixture(scope="module")
def evaluated(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-html")
    proc = run_cli("eval", "--model", "synthetic-tiny", "--recipes", "bf16", "--limit", "2",
                   "--max-new-tokens", "16", "--runs", "1", "--skip-call-shapes", "--min-similarity", "0.999",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_eval_reports_naturalness_and_similarity(evaluated):
    doc = json.loads((evaluated / "results.json").read_text())
    fp32, bf16 = doc["recipes"]
    assert fp32["speaker_similarity"]["mean"] == pytest.approx(1.0)
    assert fp32["dnsmos"]["ovrl"]["delta_vs_fp32"] == 0.0
    assert 0 < bf16["speaker_similarity"]["mean"] <= 1.0 and 1 <= bf16["dnsmos"]["ovrl"]["mean"] <= 5
    assert fp32["error_rate"]["uncapped_mean"] >= fp32["error_rate"]["mean"]
    reason = doc["recommendation"]["reason"]
    assert "speaker similarity to fp32 at least 0.999" in reason
    if bf16["speaker_similarity"]["mean"] < 0.999:  # the budget names what it rejected
        assert "rejected: bf16 (similarity" in reason and doc["recommendation"]["name"] == "fp32"
    header = (evaluated / "utterances.csv").read_text().splitlines()[0]
    assert "dnsmos_ovrl" in header and "speaker_similarity" in header and "error_uncapped" in header
    report = (evaluated / "report.md").read_text()
    assert "## Naturalness and speaker similarity" in report and "uncapped" in report


def test_report_html_in_a_real_browser(evaluated, tmp_path):
    page = evaluated / "report.html"
    html = page.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # no network
    driver = browser()
    try:
        driver.get(page.as_uri())
        driver.save_screenshot(str(tmp_path / "report.png"))
        shot = (tmp_path / "report.png").read_bytes()
        assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
        # every player's source exists and has a duration once its metadata is in
        durations = driver.execute_async_script("""
            var done = arguments[arguments.length - 1];
            var audios = Array.from(document.querySelectorAll("audio"));
            Promise.all(audios.map(function (a) { return new Promise(function (ok) {
                if (a.readyState >= 1) return ok([a.getAttribute("src"), a.duration]);
                a.addEventListener("loadedmetadata", function () { ok([a.getAttribute("src"), a.duration]); });
                a.addEventListener("error", function () { ok([a.getAttribute("src"), -1]); });
                a.load(); }); })).then(done);""")
        assert len(durations) == 2 * 2  # fp32 and bf16, two utterances each
        for src, seconds in durations:
            assert (evaluated / src).is_file() and not Path(src).is_absolute()
            with wave.open(str(evaluated / src)) as w:
                assert seconds == pytest.approx(w.getnframes() / w.getframerate(), abs=0.05) and seconds > 0
        # the tables sort by a column: click "GPT ms/step" twice and the order reverses
        header = driver.find_element("xpath", "//table[@id='recipes']//th[2]")
        names = lambda: [td.text for td in driver.find_elements("xpath", "//table[@id='recipes']/tbody/tr/td[1]")]  # noqa: E731
        header.click()
        first = names()
        header.click()
        assert names() == first[::-1] and sorted(first) == ["bf16", "fp32"]
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()

