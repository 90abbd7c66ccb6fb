"""Nothing lost, nothing executed: outputs, exports, evals and variants under hostile and clumsy
input. Everything happens inside each test's temporary folder."""

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error, run_cli, run_cli_here, write_compile_cache
from quantkit.export import sha256

ROOT_USER = os.geteuid() == 0
QUICK = ("--skip-asr", "--skip-call-shapes", "--skip-quality")  # an eval of the parts a test is about
needs_root = pytest.mark.skipif(not ROOT_USER, reason="making a device node needs root")


def apply_tiny(*args: str) -> subprocess.CompletedProcess:
    return run_cli("apply", "fp32", "--model", "synthetic-tiny", "--steps", "4", *args)


# ---------------------------------------------------------------- writing files

@needs_root
def test_out_wav_onto_a_device_node_writes_through_it(tiny_dir, tmp_path):
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    proc = apply_tiny("--out-wav", str(null))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(null.stat().st_mode)  # still the device, not replaced by a file


@needs_root
def test_a_full_disk_is_one_line(tiny_dir, tmp_path):
    full = tmp_path / "full"  # /dev/full's numbers: every write fails with ENOSPC
    os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    assert_one_line_error(apply_tiny("--out-wav", str(full)), "no space left on device")
    assert stat.S_ISCHR(full.stat().st_mode)


@pytest.mark.parametrize("args, limit", [
    (["export", "fp32", "--model", "synthetic-tiny", "--out", "{tmp}/v"], 1 << 20),  # the variant
    (["apply", "fp32", "--model", "synthetic-tiny", "--steps", "4"], 1 << 20),  # a fresh cache's assets
    (["eval", "--model", "synthetic-tiny", "--recipes", "bf16", "--skip-asr", "--out", "{tmp}/e"], 0),
])
def test_a_full_disk_is_one_line_for_export_eval_and_the_cache(tiny_dir, tmp_path, args, limit):
    # RLIMIT_FSIZE makes writes past the limit fail (EFBIG), as a full disk would, for this process
    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "QUANTKIT_CACHE": str(tmp_path / "cache")} if args[0] == "apply" else None
    proc = subprocess.run([sys.executable, "-m", "quantkit", *(a.format(tmp=tmp_path) for a in args)],
                          capture_output=True, text=True, cwd=ROOT, preexec_fn=cap, timeout=600, env=env)
    assert_one_line_error(proc, "no space left on device")
    assert not (tmp_path / "v").exists()
    leftovers = list(tmp_path.rglob(".*"))
    assert leftovers == [], leftovers  # no temporaries left


@pytest.mark.parametrize("target, fragment", [
    ("dir", "is a directory"),
    ("file/x.wav", "is not a directory"),
])
def test_out_wav_that_cannot_be_written_is_refused_before_loading(tmp_path, target, fragment):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("mine")
    proc = run_cli_here("apply", "fp32", "--model", "no-such-model-so-loading-would-fail",
                   "--out-wav", str(tmp_path / target))
    assert_one_line_error(proc, fragment)
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders")
def test_out_wav_into_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert_one_line_error(run_cli_here("apply", "fp32", "--out-wav", str(ro / "x.wav")), "not writable")


# ---------------------------------------------------------------- export

def test_force_never_deletes_a_folder_that_is_not_a_variant(tiny_dir, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "quantkit", "export", "fp32", "--model", "synthetic-tiny",
                           "--out", ".", "--force"], cwd=d, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_line_error(proc, "is not a quantkit variant")
    assert_one_line_error(run_cli_here("export", "fp32", "--model", "synthetic-tiny", "--out", str(d), "--force"),
                          "is not a quantkit variant")
    assert (d / "thesis.tex").read_text() == "mine"


def test_force_onto_a_file_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert_one_line_error(run_cli_here("export", "fp32", "--model", "synthetic-tiny", "--out", str(f), "--force"),
                          "is not a directory")
    assert f.read_text() == "mine"


def test_force_replaces_a_variant_but_not_one_holding_other_files(tiny_dir, tmp_path):
    v = tmp_path / "v"
    assert run_cli("export", "fp32", "--model", "synthetic-tiny", "--out", str(v)).returncode == 0
    before = json.loads((v / "manifest.json").read_text())["recipe"]["name"]
    proc = run_cli("export", "bf16", "--model", "synthetic-tiny", "--out", str(v), "--force")
    assert proc.returncode == 0, proc.stderr
    assert (before, json.loads((v / "manifest.json").read_text())["recipe"]["name"]) == ("fp32", "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # the old one gone, no temporaries
    (v / "my-notes.txt").write_text("mine")
    assert_one_line_error(run_cli_here("export", "fp32", "--model", "synthetic-tiny", "--out", str(v), "--force"),
                          "is not a quantkit variant")
    assert (v / "my-notes.txt").read_text() == "mine"


def test_two_racing_exports_one_wins(tiny_dir, tmp_path):
    out = tmp_path / "v"
    cmd = [sys.executable, "-m", "quantkit", "export", "fp32", "--model", "synthetic-tiny", "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "appeared while exporting" in loser or "already exists" in loser
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_a_file_appearing_at_the_target_during_export_is_kept(tiny_dir, tmp_path, monkeypatch):
    from quantkit import export

    out = tmp_path / "v"
    real = export._write_manifest

    def meanwhile(folder, manifest):  # someone creates the target while export works
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        real(folder, manifest)

    monkeypatch.setattr(export, "_write_manifest", meanwhile)
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="appeared while exporting"):
        export.export_variant(out, recipe="fp32", model="synthetic-tiny")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_stale_temporaries_of_a_killed_export_are_removed(tiny_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".v.export-{dead.pid}.abcd"
    (stale / "asset").mkdir(parents=True)
    (stale / "asset" / "big.bin").write_bytes(b"0" * 1000)
    alive = tmp_path / f".v.export-{os.getpid()}.efgh"  # a running export's: left alone
    alive.mkdir()
    proc = run_cli("export", "fp32", "--model", "synthetic-tiny", "--out", str(tmp_path / "v"))
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and alive.exists()


# ---------------------------------------------------------------- variants are code

@pytest.fixture(scope="module")
def int8_variant(tiny_dir, tmp_path_factory):
    from quantkit.export import export_variant

    out = tmp_path_factory.mktemp("v") / "int8"
    export_variant(out, recipe="int8-dynamic", model="synthetic-tiny")
    return out


def _copy(variant, tmp_path):
    dst = tmp_path / "v"
    shutil.copytree(variant, dst, symlinks=True)
    return dst


def _rehash(v: Path, edit=None) -> None:
    """Do what an attacker would: fix the manifest's hashes after changing files."""
    m = json.loads((v / "manifest.json").read_text())
    if edit:
        edit(m)
    if isinstance(m["files"], dict):
        m["files"] = {rel: sha256(v / rel) if (v / rel).is_file() else h for rel, h in m["files"].items()}
    (v / "manifest.json").write_text(json.dumps(m))


def _synth(v: Path, tmp_path, *extra) -> subprocess.CompletedProcess:
    return run_cli_here("synth", "--variant", str(v), "--text", "x", "--steps", "4",
                   "--out-wav", str(tmp_path / "x.wav"), *extra)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_a_pickle_in_the_weights_does_not_run(int8_variant, tmp_path):
    v = _copy(int8_variant, tmp_path)
    marker = tmp_path / "marker"
    with open(v / "gpt.pt", "wb") as fh:
        pickle.dump({"x": _Marker(marker)}, fh)
    _rehash(v)
    for extra in ((), ("--trust-compiled",)):
        assert_one_line_error(_synth(v, tmp_path, *extra), "could not be loaded")
        assert not marker.exists()


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.update(files={}), "empty or malformed"),
    (lambda m: m.update(files=[]), "empty or malformed"),
    (lambda m: m["files"].update({"../outside.bin": "0" * 64}), "outside the variant"),
    (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "outside the variant"),
    (lambda m: m["gpt_weights"].update(file="../gpt.pt"), "does not list"),
])
def test_a_manifest_that_breaks_the_rules_is_refused(int8_variant, tmp_path, edit, fragment):
    v = _copy(int8_variant, tmp_path)
    _rehash(v, edit)
    assert_one_line_error(_synth(v, tmp_path), fragment)


def test_unlisted_files_and_links_are_refused(int8_variant, tmp_path):
    v = _copy(int8_variant, tmp_path)
    (v / "asset" / "extra.so").write_bytes(b"\x7fELF")
    assert_one_line_error(_synth(v, tmp_path), "asset/extra.so is not listed")
    (v / "asset" / "extra.so").unlink()
    (v / "asset" / "link").symlink_to(tmp_path)
    assert_one_line_error(_synth(v, tmp_path), "asset/link is a symbolic link")


@pytest.mark.slow
def test_compiled_code_from_elsewhere_is_not_loaded_unless_trusted(tiny_dir, tmp_path):
    from quantkit.export import export_variant

    v = tmp_path / "v"
    export_variant(v, recipe="fp32-compiled", model="synthetic-tiny")
    code = ("import json, sys, torch, quantkit; from quantkit.synth import synthesize;"
            "c = quantkit.load_variant(sys.argv[1], trust_compiled=sys.argv[2] == 'yes');"
            "t = synthesize(c, 'Hi.', seed=0, steps=6);"
            "print(json.dumps([torch._dynamo.utils.counters['stats']['unique_graphs'], t.tokens.tolist()]))")
    runs = {}
    for trust in ("no", "yes"):  # another machine: its quantkit cache has no record of this variant
        env = {**os.environ, "QUANTKIT_CACHE": str(tmp_path / f"elsewhere-{trust}")}
        # "no" compiles just in time, its kernels found in the Inductor cache export filled (a cold
        # build proves nothing more); "yes" must find everything in the variant: an empty cache
        if trust == "yes":
            env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
        proc = subprocess.run([sys.executable, "-c", code, str(v), trust], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[trust] = (json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr)
    (graphs_no, tokens_no), err_no = runs["no"]
    (graphs_yes, tokens_yes), _ = runs["yes"]
    assert "not exported on this machine" in err_no and graphs_no > 0  # compiled just in time
    assert graphs_yes == 0 and tokens_yes == tokens_no


def test_a_compile_cache_from_elsewhere_is_not_loaded(tiny_dir, tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    write_compile_cache(cache, pickle.dumps(_Marker(marker)), b"x")
    proc = run_cli("apply", "fp32-compiled", "--model", "synthetic-tiny", "--steps", "4",
                   "--compile-cache", str(cache), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "not written on this machine" in proc.stderr and not marker.exists()
    assert json.loads(proc.stdout)["compile_cache"] == "saved"  # compiled here, then saved


def test_a_compile_cache_is_saved_only_where_quantkit_owns_the_folder(tiny_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for folder, fragment in [(mine, "holds files quantkit did not write"), (mine / "notes.txt", "is not a directory")]:
        proc = run_cli_here("apply", "fp32-compiled", "--compile-cache", str(folder), "--model", "no-such-model")
        assert_one_line_error(proc, fragment)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"
    # A save killed half-way leaves its marker: the folder is still quantkit's, and not loadable.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "compiled.json").write_text('{"saving": true}')
    (cache / "decode_step.aot").write_bytes(b"half written")
    proc = run_cli("apply", "fp32-compiled", "--model", "synthetic-tiny", "--steps", "4",
                   "--compile-cache", str(cache), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compile_cache"] == "saved"
    assert "for" in json.loads((cache / "compiled.json").read_text())


# ---------------------------------------------------------------- eval

def test_eval_refuses_path_ids(tmp_path):
    texts = tmp_path / "t.tsv"
    for bad in ("../../../../x", "/tmp/x", ".hidden"):
        texts.write_text(f"{bad}\tHello there.\n")
        assert_one_line_error(run_cli_here("eval", "--model", "synthetic-tiny", "--texts", str(texts),
                                           *QUICK, "--out", str(tmp_path / "o")), "must be a plain file name")


def test_eval_resumes_and_keeps_what_it_did_not_write(tiny_dir, tmp_path):
    """Three runs into one folder holding the user's own audio: bf16; bf16 and fp16 resumed (fp32
    and bf16 kept, not run again); fp16 alone, resumed (nothing run, bf16's audio gone)."""
    out = tmp_path / "o"
    mine = out / "audio" / "my_recordings"
    mine.mkdir(parents=True)
    (mine / "take1.wav").write_bytes(b"RIFF")
    texts = tmp_path / "t.tsv"
    texts.write_text("a\tHello there.\n")
    args = ["eval", "--model", "synthetic-tiny", "--texts", str(texts), *QUICK, "--runs", "1",
            "--max-new-tokens", "8", "--out", str(out)]
    assert run_cli(*args, "--recipes", "bf16").returncode == 0
    first = json.loads((out / "results.json").read_text())
    assert (out / "audio" / "bf16" / "a.wav").is_file()
    proc = run_cli(*args, "--recipes", "bf16,fp16", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("already measured") == 2  # fp32 and bf16
    doc = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in doc["recipes"]] == ["fp32", "bf16", "fp16"] and doc["complete"]
    assert doc["recipes"][1]["warm_s_median"] == first["recipes"][1]["warm_s_median"]
    assert doc["recipes"][2]["fidelity"]["token_agreement"] > 0.5  # against the kept fp32 reference
    proc = run_cli(*args, "--recipes", "fp16", "--resume")
    assert proc.returncode == 0 and proc.stderr.count("already measured") == 2, proc.stderr
    assert (mine / "take1.wav").read_bytes() == b"RIFF"  # never quantkit's
    assert not (out / "audio" / "bf16").exists()  # quantkit's own, from an earlier run: gone
    assert (out / "audio" / "fp16" / "a.wav").is_file()


def test_resume_keys_change_with_what_a_measurement_depends_on():
    from quantkit.evaluate import EvalConfig, config_key

    texts = {"a": "Hello there."}
    key = config_key("bf16", EvalConfig(), texts)
    assert key == config_key("bf16", EvalConfig(resume=True, skip_asr=True), texts)  # not measured by the recipe
    for other in (("fp16", EvalConfig(), texts), ("bf16", EvalConfig(seed=3), texts),
                  ("bf16", EvalConfig(max_new_tokens=9), texts), ("bf16", EvalConfig(model="synthetic-tiny"), texts),
                  ("bf16", EvalConfig(long_steps=10), texts), ("bf16", EvalConfig(), {"a": "Hello."})):
        assert config_key(*other) != key, other


def test_killed_eval_leaves_a_consistent_run_and_no_orphans(tiny_dir, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "quantkit", "eval", "--model", "synthetic-tiny",
                             "--recipes", "bf16,fp16", "--limit", "1", *QUICK, "--runs", "1",
                             "--max-new-tokens", "8", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # until fp32 is in results.json and bf16's worker runs
        try:
            doc = json.loads((out / "results.json").read_text())
        except (OSError, ValueError):
            doc = None
        if doc and len(doc["recipes"]) == 1 and (out / ".quantkit-work" / "bf16.spec.json").exists():
            break
        time.sleep(0.2)
    else:
        pytest.fail("the eval never got to its second recipe")
    time.sleep(1)
    worker_pids = _children(proc.pid)
    assert worker_pids
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_exists(p) for p in worker_pids):
        time.sleep(0.2)
    assert not any(_exists(p) for p in worker_pids)  # the worker died with its parent
    doc = json.loads((out / "results.json").read_text())
    assert not doc["complete"] and [r["name"] for r in doc["recipes"]] == ["fp32"]
    rows = (out / "utterances.csv").read_text().splitlines()
    wavs = [row.split(",")[3] for row in rows[1:]]
    assert wavs and all((out / w).is_file() for w in wavs)  # every listed wav in place
    assert not (out / "audio" / "bf16").exists()


def test_a_second_eval_into_a_folder_in_use_is_refused(tiny_dir, tmp_path):
    """Two evals into one folder: the second would clear the first's scratch folder under its
    running worker and mix the two runs' results. It is refused, and the first completes."""
    out = tmp_path / "o"
    args = ["eval", "--model", "synthetic-tiny", "--recipes", "bf16", "--limit", "1", *QUICK, "--runs", "1",
            "--max-new-tokens", "8", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "quantkit", *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / ".quantkit-work" / "fp32.spec.json").exists():  # its first worker has started
        assert time.time() < deadline and first.poll() is None, "the first eval never started a recipe"
        time.sleep(0.2)
    assert_one_line_error(run_cli(*args), f"another eval is writing to {out}")
    assert (out / ".quantkit-work" / "fp32.spec.json").exists()  # the first's scratch, untouched
    assert first.wait(timeout=300) == 0, first.stderr.read()
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] and [r["name"] for r in doc["recipes"]] == ["fp32", "bf16"]
    assert all(r["status"] == "ok" for r in doc["recipes"])
    assert run_cli(*args, "--resume").returncode == 0  # the folder is free again


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _exists(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------- bad input, one line each

def _wav(path: Path, frames: bytes, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(frames)
    return path


def test_bad_audio_for_transcribe(tmp_path):
    empty = _wav(tmp_path / "empty.wav", b"")
    assert_one_line_error(run_cli_here("transcribe", str(empty)), "holds no samples")
    stereo = _wav(tmp_path / "stereo.wav", b"\x01\x00\x02\x00" * 800, channels=2)
    stereo.write_bytes(stereo.read_bytes()[:-3])  # cut mid-frame
    proc = run_cli_here("transcribe", str(stereo))
    assert proc.returncode == 0, proc.stderr  # the whole frames are read


def test_bad_asr_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    speech = ROOT / "tests" / "data" / "zh_speech" / "z01.wav"
    assert_one_line_error(run_cli_here("transcribe", str(speech), "--asr-model", str(garbage)),
                          "not a loadable openai-whisper checkpoint")
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump(_Marker(marker), fh)
    assert_one_line_error(run_cli_here("transcribe", str(speech), "--asr-model", str(evil)),
                          "not a loadable openai-whisper checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("content", ["garbage{", "[1, 2]", '{"config": [1]}', '{"config": {"gpt": 3}}',
                                     '{"config": {"no_such_section": {}}}'])
def test_bad_model_configuration(tiny_dir, tmp_path, content):
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    (model / "quantkit_config.json").write_text(content)
    proc = run_cli_here("apply", "fp32", "--model", str(model), "--steps", "4")
    assert_one_line_error(proc, "quantkit_config.json")


@pytest.mark.parametrize("content", ["[]", '{"schema": 1, "recipes": [1]}',
                                     '{"schema": 1, "recipes": [{"name": "x", "status": "ok"}]}'])
def test_malformed_results_for_report_and_export_best(tmp_path, content):
    (tmp_path / "results.json").write_text(content)
    assert_one_line_error(run_cli_here("report", str(tmp_path)))
    assert_one_line_error(run_cli_here("export", "--best", str(tmp_path), "--out", str(tmp_path / "v")))


@pytest.mark.parametrize("args, fragment", [
    (["apply", "fp32", "--seed", str(2**70)], "outside 0..2**63-1"),
    (["eval", "--timeout", "0"], "positive number of seconds"),
    (["eval", "--timeout", "-5"], "positive number of seconds"),
    (["apply", "fp32-compiled", "--steps", "4096"], "--steps 4096 does not fit: ChatTTS's GPT has 4096 positions"),
    (["apply", "fp32", "--steps", "5000"], "4096 positions"),
    (["eval", "--long-steps", "4100"], "--long-steps 4100 does not fit"),
    (["eval", "--max-new-tokens", "4096"], "--max-new-tokens 4096 does not fit"),
    (["apply", "fp32", "--text", ""], "--text: the text is empty"),
    (["apply", "fp32", "--text", " \n"], "--text: the text is empty"),
])
def test_out_of_range_options(args, fragment):
    assert_one_line_error(run_cli_here(*args, "--model", "no-such-model"), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--text", ""], "--text: the text is empty"),
    (["--text", "hi", "--steps", "4096"], "--steps 4096 does not fit"),
])
def test_synth_checks_its_options_before_loading(tmp_path, args, fragment):
    proc = run_cli_here("synth", "--variant", str(tmp_path / "no-such-variant"), "--out-wav", str(tmp_path / "x.wav"),
                        *args)
    assert_one_line_error(proc, fragment)


def test_binary_recipe_file(tmp_path):
    recipe = tmp_path / "bin.toml"
    recipe.write_bytes(os.urandom(64) + b"\xff\xfe")
    assert_one_line_error(run_cli_here("apply", str(recipe)), "is not UTF-8 text")


def test_truncated_cached_synthetic_asset_is_rebuilt(tmp_path):
    env = {"QUANTKIT_CACHE": str(tmp_path / "cache")}
    assert run_cli("apply", "fp32", "--model", "synthetic-tiny", "--steps", "4", env=env).returncode == 0
    gpt = tmp_path / "cache" / "models" / "synthetic-tiny" / "asset" / "gpt" / "model.safetensors"
    gpt.write_bytes(gpt.read_bytes()[:1000])
    proc = run_cli("apply", "fp32", "--model", "synthetic-tiny", "--steps", "4", env=env)
    assert proc.returncode == 0, proc.stderr
    assert gpt.stat().st_size > 1000


def test_exports_recorded_at_once_are_all_trusted(tmp_path, monkeypatch):
    """Each export records its manifest in one file of trusted hashes: processes recording at once
    must not drop each other's entries (the export would then load as a stranger's)."""
    manifests = [tmp_path / f"m{i}.json" for i in range(4 * 40)]
    for i, m in enumerate(manifests):
        m.write_text(str(i))
    code = ("import sys; from pathlib import Path; from quantkit import trust\n"
            "for p in sys.argv[1:]: trust.record(Path(p))")
    env = {**os.environ, "QUANTKIT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, manifests[k::4])], env=env, cwd=ROOT)
             for k in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    from quantkit import trust

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    assert sum(trust.is_trusted(m) for m in manifests) == len(manifests)


def test_a_variants_kernels_join_inductors_cache_without_rewriting_what_is_there(tmp_path):
    """Loading a variant copies its built kernels into Inductor's cache, which other processes
    share and may have loaded: one already there is left as it is (a copy over it in place would
    rewrite a library under a process running it); the others arrive whole, under their names."""
    from quantkit.compile_artifacts import _add_missing

    src, cache = tmp_path / "variant" / "kernels", tmp_path / "inductor"
    for rel, data in (("ab/kab.so", b"variant's"), ("ab/kab.cpp", b"src"), ("cd/kcd.so", b"new")):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (cache / "ab").mkdir(parents=True)
    (cache / "ab" / "kab.so").write_bytes(b"loaded elsewhere")
    inode = (cache / "ab" / "kab.so").stat().st_ino
    _add_missing(src, cache)
    assert (cache / "ab" / "kab.so").read_bytes() == b"loaded elsewhere"
    assert (cache / "ab" / "kab.so").stat().st_ino == inode
    assert (cache / "ab" / "kab.cpp").read_bytes() == b"src" and (cache / "cd" / "kcd.so").read_bytes() == b"new"
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == [
        "ab/kab.cpp", "ab/kab.so", "cd/kcd.so"]
