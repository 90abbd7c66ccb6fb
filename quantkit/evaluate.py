"""recipes x texts -> results.json, utterances.csv, audio; each recipe in its own process.

A recipe's process loads ChatTTS, applies the recipe, times a fixed-length benchmark
utterance (first call, then --runs warm calls), synthesizes every text for the ear (ASR), and
computes teacher-forced fidelity against the fp32 reference, which always runs first and
leaves its token sequences, log-probabilities and log-mels for the others.
Whisper runs afterwards in the parent, once for all recipes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantkit.atomic import sole_writer, write_text
from quantkit.errors import QuantkitError
from quantkit.machine import environment, peak_memory, probe_buffer, read_bandwidth_gbs, reset_peak
from quantkit.records import FAILED, Measurement, RecipeResult, Timing, Utterance, WorkerSpec

if TYPE_CHECKING:
    import torch
    import whisper
    from ChatTTS import Chat

log = logging.getLogger(__name__)

SCHEMA = 4  # 2: call_shapes, complete, source, config_key; 3: row_steps_per_s; 4: runs_s (docs/methodology.md)
REFERENCE = "fp32"


@dataclass
class EvalConfig:
    model: str = "synthetic"
    device: str = "cpu"
    recipes: list[str] | None = None  # None: every shipped recipe the device can run
    texts: str = "en"
    limit: int | None = None
    asr_model: str | None = None
    runs: int = 3
    max_new_tokens: int = 96
    skip_asr: bool = False
    seed: int = 0
    timeout_s: float = 1800.0
    max_error_increase: float = 0.01
    min_token_agreement: float = 0.9
    resume: bool = False
    call_shapes: bool = True  # also time Chat.infer's call shapes (quantkit.shapes)
    quality: bool = True  # DNSMOS and speaker similarity (quantkit.quality)
    min_similarity: float | None = None
    max_mos_drop: float | None = None
    long_steps: int = 1100
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    command: str = ""


# ---------------------------------------------------------------- the per-recipe process

def measure(chat: Chat, cfg: EvalConfig, bench_text: str) -> tuple[Timing, int]:
    """First call, then ``cfg.runs`` warm calls. Each warm call sits between two sums over a
    256 MiB buffer on the model's device: a shared machine's read bandwidth swings within
    seconds as neighbours come and go, so each call's achieved bandwidth is taken
    against the read bandwidth at that moment (the mean of the two sums around it).
    -> the timing, and the peak memory before the bandwidth probe's buffer."""
    from quantkit.apply import weight_bytes
    from quantkit.synth import synthesize

    first = synthesize(chat, bench_text, seed=cfg.seed, steps=cfg.max_new_tokens)
    steps = first.steps
    sizes = weight_bytes(chat)
    peak = peak_memory(chat.device)  # before the probe's buffer
    probe = probe_buffer(device=chat.device)
    reads = [read_bandwidth_gbs(buffer=probe, repeats=3)]
    warm = []
    for _ in range(cfg.runs):
        warm.append(synthesize(chat, bench_text, seed=cfg.seed, steps=cfg.max_new_tokens))
        reads.append(read_bandwidth_gbs(buffer=probe, repeats=3))
    del probe
    reset_peak(chat.device)
    totals = np.array([w.total_s for w in warm])
    gpt_s = float(np.median([w.gpt_s for w in warm]))
    runs = [{"achieved_gbs": sizes.decode * steps / w.gpt_s / 1e9, "read_gbs": (a + b) / 2}
            for w, a, b in zip(warm, reads, reads[1:])]
    timing = Timing(
        first_call_s=first.total_s, warm_s_median=float(np.median(totals)),
        warm_s_p90=float(np.percentile(totals, 90)), gpt_s_median=gpt_s,
        decode_s_median=float(np.median([w.decode_s for w in warm])), steps=steps,
        ms_per_step=1000.0 * gpt_s / steps, rtf=float(np.median(totals)) / first.audio_s,
        weight_bytes=sizes.total, decode_weight_bytes=sizes.decode,
        bandwidth_gbs=sizes.decode * steps / gpt_s / 1e9,
        read_bandwidth_gbs=float(np.median([r["read_gbs"] for r in runs])),
        bandwidth_fraction=_median_fraction(runs, "achieved_gbs"), bandwidth_runs=runs)
    # The GPT time above includes the prompt pass (compute-bound) and ChatTTS's work around the loop.
    if all(w.step_s for w in warm):
        step_s = float(np.median([w.step_s for w in warm]))
        for run, w in zip(runs, warm):
            run["step_gbs"] = sizes.decode / w.step_s / 1e9
        timing.step_ms_median = 1000.0 * step_s
        timing.step_bandwidth_gbs = sizes.decode / step_s / 1e9
        timing.step_bandwidth_fraction = _median_fraction(runs, "step_gbs")
    return timing, peak


def _median_fraction(runs: list[dict], key: str) -> float:
    """Median over warm calls of a call's bandwidth over the read bandwidth around it."""
    return float(np.median([r[key] / r["read_gbs"] for r in runs]))


def _utterances(chat: Chat, cfg: EvalConfig, texts: dict[str, str], audio_dir: Path, name: str,
                reference: dict | None) -> tuple[list[Utterance], dict | None, dict | None]:
    """Synthesize every text into ``audio_dir``; teacher-force on the fp32 tokens (or record
    them, for fp32)."""
    from quantkit.audio import write_wav
    from quantkit.metrics import combine_fidelity, fidelity
    from quantkit.synth import SAMPLE_RATE, synthesize, teacher_forced

    rows, ref_out, fids, weights = [], {}, [], []
    is_reference = name == REFERENCE
    for uid, text in _progress(texts.items(), f"{name}: utterances"):
        syn = synthesize(chat, text, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)
        write_wav(audio_dir / f"{uid}.wav", syn.wav, SAMPLE_RATE)
        rows.append(Utterance(recipe=name, id=uid, text=text, steps=syn.steps, wav=f"audio/{name}/{uid}.wav"))
        if not is_reference and (reference is None or uid not in reference):
            continue  # no fp32 reference, or fp32 stopped at once on this text: nothing to compare
        ref_tokens = syn.tokens if is_reference else reference[uid]["tokens"]
        if ref_tokens.shape[0] == 0:
            continue
        tf = teacher_forced(chat, text, ref_tokens, seed=cfg.seed)
        if is_reference:
            ref_out[uid] = {"tokens": ref_tokens, "logprobs": tf.logprobs, "logmel": tf.logmel}
            ref = ref_out[uid]
        else:
            ref = reference[uid]
        fids.append(fidelity(ref["logprobs"], tf.logprobs, ref["logmel"], tf.logmel))
        weights.append(int(ref_tokens.shape[0]))
    fid = asdict(combine_fidelity(fids, weights)) if fids else None
    return rows, (ref_out if is_reference else None), fid


def _progress(items, desc: str):
    from tqdm import tqdm

    return tqdm(list(items), desc=desc, leave=False, file=sys.stderr, disable=None)


def worker(spec_path: str) -> int:
    """Entry point of one recipe's process: writes its Measurement and utterances as JSON."""
    import torch

    from quantkit.apply import apply_recipe
    from quantkit.models import load_chat
    from quantkit.recipes import get_recipe
    from quantkit.texts import load_texts

    spec = WorkerSpec(**json.loads(Path(spec_path).read_text()))
    cfg = EvalConfig(**spec.config)
    _lang, texts = load_texts(cfg.texts)
    texts = dict(list(texts.items())[: cfg.limit])
    recipe = get_recipe(spec.recipe)
    import ChatTTS  # noqa: F401 - import time is not load time

    t0 = time.perf_counter()
    chat = load_chat(cfg.model, cfg.device)
    t1 = time.perf_counter()
    apply_recipe(chat, recipe)
    t2 = time.perf_counter()
    timing, peak = measure(chat, cfg, next(iter(texts.values())))
    shapes = None
    if cfg.call_shapes:
        from quantkit.shapes import ShapeSettings, measure_call_shapes

        settings = ShapeSettings(long_steps=cfg.long_steps, batch_sizes=tuple(cfg.batch_sizes),
                                 batch_runs=cfg.runs)
        shapes = measure_call_shapes(chat, list(texts.values()), settings, cfg.seed)
    # fp32's token sequences, log-probabilities and log-mels: tensors only
    reference = torch.load(spec.reference, weights_only=True) if spec.reference else None
    rows, ref_out, fid = _utterances(chat, cfg, texts, Path(spec.audio), recipe.name, reference)
    if ref_out is not None:
        torch.save(ref_out, spec.save_reference)
    measured = Measurement(load_s=t1 - t0, apply_s=t2 - t1, timing=timing, call_shapes=shapes, fidelity=fid,
                           peak_mem_bytes=max(peak, peak_memory(chat.device)), device=str(chat.device))
    Path(spec.result).write_text(json.dumps({"result": measured.to_dict(),
                                             "utterances": [asdict(r) for r in rows]}))
    return 0


# ---------------------------------------------------------------- the parent

WORK = ".quantkit-work"  # the run's scratch folder inside --out: quantkit's own, removed at the end
REFERENCE_FILE = "fp32_reference.pt"  # fp32's tokens for teacher forcing (kept for --resume)


def _run_worker(source: str, cfg: EvalConfig, out: Path, reference: Path | None) -> tuple[RecipeResult, list[Utterance]]:
    """Run one recipe (a name or .toml path) in its own process; its audio lands in
    WORK/audio/NAME, fp32's reference in WORK/REFERENCE_FILE."""
    from quantkit.recipes import get_recipe

    name = get_recipe(source).name
    work = out / WORK
    (work / "audio" / name).mkdir(parents=True, exist_ok=True)
    result_path = work / f"{name}.json"
    spec = WorkerSpec(config=asdict(cfg), recipe=source, result=str(result_path), audio=str(work / "audio" / name),
                      reference=str(reference) if reference else None,
                      save_reference=str(work / REFERENCE_FILE) if name == REFERENCE else None)
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "quantkit.evaluate", str(spec_path)]
    try:
        # stderr passes through: the worker's progress bars are the user's progress display.
        # A fresh Inductor cache per recipe: its first call is a real cold compile.
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str((work / f"inductor-{name}").resolve())}
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=cfg.timeout_s, env=env,
                              preexec_fn=_die_with_parent)
        data = json.loads(result_path.read_text()) if result_path.exists() else {}
        error = data.get("error") or (None if proc.returncode == 0 else
                                      f"the recipe's process exited with code {proc.returncode}")
    except subprocess.TimeoutExpired:
        data, error = {}, f"timed out after {cfg.timeout_s:.0f} s"
    if error is None and "result" in data:
        return (RecipeResult(name=name, source=source, measured=Measurement.from_dict(data["result"])),
                [Utterance(**u) for u in data["utterances"]])
    return RecipeResult(name=name, source=source, status=FAILED, error=error or "no result written"), []


def _die_with_parent() -> None:
    """In the worker, before exec: the kernel kills it when the eval process dies, however."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _transcribe_all(model, language: str, rows: list[Utterance], out: Path) -> None:
    from quantkit.asr import transcribe
    from quantkit.audio import read_wav

    for row in _progress(rows, "ASR"):
        audio, rate = read_wav(out / row.wav)
        row.transcript = transcribe(model, audio, rate, language)


def _score(results: list[RecipeResult], rows: list[Utterance], language: str) -> None:
    from quantkit.metrics import bootstrap_delta, error_rates

    by_recipe: dict[str, list[Utterance]] = {}
    for row in rows:
        by_recipe.setdefault(row.recipe, []).append(row)
    rates = {}
    for name, rs in by_recipe.items():
        rates[name] = error_rates([r.text for r in rs], [r.transcript for r in rs], language, ids=[r.id for r in rs])
        for r, e, u in zip(rs, rates[name].per_utterance, rates[name].uncapped):
            r.error, r.error_uncapped = e, u
    ref = rates.get(REFERENCE)
    for res in results:
        er = rates.get(res.name)
        if er is None:
            res.error_rate = None
            continue
        delta, ci = bootstrap_delta(er.per_utterance, ref.per_utterance) if ref else (None, None)
        res.error_rate = {"metric": er.metric, "mean": er.mean, "corpus": er.corpus,
                          "uncapped_mean": float(np.mean(er.uncapped)),
                          "delta_vs_fp32": delta, "ci95": list(ci) if ci else None}


def recommend(results: list[RecipeResult], synthetic: bool, cfg: EvalConfig) -> dict[str, Any]:
    """Fastest recipe within the error budget (real weights) or the fidelity floor (synthetic)."""
    ok = [r for r in results if r.ok]
    if synthetic or not any(r.error_rate for r in ok):
        eligible = [r for r in ok if r.measured.fidelity and
                    r.measured.fidelity["token_agreement"] >= cfg.min_token_agreement]
        rule = (f"fastest warm median with teacher-forced token agreement >= "
                f"{cfg.min_token_agreement:.2f} against fp32 "
                f"({'synthetic weights: WER is meaningless, so fidelity decides' if synthetic else 'no ASR run'})")
    else:
        eligible = [r for r in ok if r.error_rate and r.error_rate["delta_vs_fp32"] is not None
                    and r.error_rate["delta_vs_fp32"] <= cfg.max_error_increase]
        metric = next(r.error_rate["metric"] for r in ok if r.error_rate)
        rule = (f"fastest warm median whose {metric.upper()} rises at most "
                f"{100 * cfg.max_error_increase:.1f} points over fp32")
    broken = {r.name: why for r in eligible if (why := _broken_budgets(r, cfg))}
    eligible = [r for r in eligible if r.name not in broken]
    rule += "".join(f"; {b}" for b in _budget_rules(cfg))
    if broken:
        rule += "; rejected: " + ", ".join(f"{n} ({why})" for n, why in broken.items())
    if not eligible:
        return {"name": None, "reason": f"no recipe met the rule: {rule}"}
    best = min(eligible, key=lambda r: r.measured.timing.warm_s_median)
    base = next((r for r in ok if r.name == "stock"), None)
    speed = (f"; {base.measured.timing.warm_s_median / best.measured.timing.warm_s_median:.2f}x stock's "
             "warm latency" if base else "")
    return {"name": best.name, "reason": rule + speed}


def _budget_rules(cfg: EvalConfig) -> list[str]:
    rules = []
    if cfg.min_similarity is not None:
        rules.append(f"speaker similarity to fp32 at least {cfg.min_similarity:g}")
    if cfg.max_mos_drop is not None:
        rules.append(f"DNSMOS OVRL at most {cfg.max_mos_drop:g} below fp32")
    return rules


def _broken_budgets(r: RecipeResult, cfg: EvalConfig) -> str:
    """Which of the similarity and naturalness budgets recipe ``r`` broke ('' if none)."""
    broken = []
    sim = (r.speaker_similarity or {}).get("mean")
    if cfg.min_similarity is not None and (sim is None or sim < cfg.min_similarity):
        broken.append(f"similarity {sim:.3f} < {cfg.min_similarity:g}" if sim is not None else "no similarity")
    drop = ((r.dnsmos or {}).get("ovrl") or {}).get("delta_vs_fp32")
    if cfg.max_mos_drop is not None and (drop is None or -drop > cfg.max_mos_drop):
        broken.append(f"OVRL {drop:+.2f} vs fp32" if drop is not None else "no DNSMOS")
    return ", ".join(broken)


def _assess(results: list[RecipeResult], rows: list[Utterance], out: Path) -> None:
    """DNSMOS of every utterance, and its speaker similarity to fp32's same utterance; per recipe
    the means, with paired deltas to fp32 and 95% bootstrap intervals."""
    from quantkit.audio import read_wav
    from quantkit.metrics import bootstrap_delta
    from quantkit.quality import dnsmos, similarity, speaker_embedding

    embeddings = {}
    for row in _progress(rows, "DNSMOS, speaker"):
        audio, rate = read_wav(out / row.wav)
        row.dnsmos = dnsmos(audio, rate).to_dict()
        embeddings[row.recipe, row.id] = speaker_embedding(audio, rate)
    for row in rows:
        ref = embeddings.get((REFERENCE, row.id))
        row.speaker_similarity = None if ref is None else similarity(embeddings[row.recipe, row.id], ref)
    by_id = {(r.recipe, r.id): r for r in rows}
    for res in results:
        mine = [r for r in rows if r.recipe == res.name]
        if not mine:
            continue
        paired = [(r, by_id[REFERENCE, r.id]) for r in mine if (REFERENCE, r.id) in by_id]
        res.dnsmos = {}
        for key in ("sig", "bak", "ovrl", "p808"):
            delta, ci = bootstrap_delta([a.dnsmos[key] for a, _ in paired], [b.dnsmos[key] for _, b in paired])
            res.dnsmos[key] = {"mean": float(np.mean([r.dnsmos[key] for r in mine])),
                               "delta_vs_fp32": delta if paired else None, "ci95": list(ci) if paired else None}
        sims = [r.speaker_similarity for r in mine if r.speaker_similarity is not None]
        mean, ci = bootstrap_delta(sims, [0.0] * len(sims))
        res.speaker_similarity = {"mean": mean if sims else None, "ci95": list(ci) if sims else None}


def write_utterances_csv(path: Path, rows: list[Utterance]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=Utterance.COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(r.row() for r in rows)
    write_text(path, buf.getvalue())


def plan_recipes(sources: list[str], device: torch.device) -> list[str]:
    """The recipe sources to run, fp32 (the reference) first; refuses an empty list, a source
    given twice, two sources whose recipes share a name, and one that cannot run on ``device``."""
    from quantkit.apply import check_runnable
    from quantkit.recipes import get_recipe

    if not sources:
        raise QuantkitError("--recipes names no recipe")
    names: dict[str, str] = {}
    for source in sources:
        recipe = get_recipe(source)
        name = recipe.name
        if name in names:
            first = names[name]
            raise QuantkitError(f"recipe '{source}' is listed twice" if first == source else
                                f"recipes '{first}' and '{source}' are both named '{name}'")
        names[name] = source
        check_runnable(recipe, device)
    if REFERENCE in names and get_recipe(names[REFERENCE]) != get_recipe(REFERENCE):
        raise QuantkitError(f"recipe '{names[REFERENCE]}' is named '{REFERENCE}', the name of the "
                            "reference every recipe is compared with: rename it")
    names.setdefault(REFERENCE, REFERENCE)
    return [names[REFERENCE]] + [src for n, src in names.items() if n != REFERENCE]


def load_checked_asr(cfg: EvalConfig, language: str, device: torch.device) -> whisper.Whisper:
    """The Whisper model the run will use, on the run's device, refused now if it cannot
    transcribe ``language``."""
    from quantkit.asr import DEFAULT_MODELS, load_asr

    name = cfg.asr_model or DEFAULT_MODELS[language]
    model = load_asr(name, device=str(device))
    if language != "en" and not model.is_multilingual:
        raise QuantkitError(f"Whisper '{name}' is English-only; it cannot transcribe the "
                            f"'{language}' text set (use --asr-model base, or --skip-asr)")
    return model


def run_eval(cfg: EvalConfig, out: Path) -> dict[str, Any]:
    """Every input is checked before the first recipe runs. Each recipe's result and audio are
    in place as soon as it finishes; a failed recipe is recorded (status "failed") and the run
    goes on. With ``cfg.resume``, recipes already measured here with the same configuration
    are kept, not run again."""
    from quantkit.chattts import check_steps
    from quantkit.metrics import check_references
    from quantkit.models import resolve_device
    from quantkit.texts import load_texts

    device = resolve_device(cfg.device)
    names = plan_recipes(_default_recipes(device) if cfg.recipes is None else cfg.recipes, device)
    language, texts = load_texts(cfg.texts)
    if cfg.limit:
        texts = dict(list(texts.items())[: cfg.limit])
    check_references(texts, language)  # an utterance with nothing to say or score
    check_steps(cfg.max_new_tokens, "--max-new-tokens")
    if cfg.call_shapes:
        check_steps(cfg.long_steps, "--long-steps")
    asr = None if cfg.skip_asr else load_checked_asr(cfg, language, device)
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"--out {out} is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with sole_writer(out, "eval"):
        return _run_in(out, cfg, device, names, language, texts, asr)


def _run_in(out: Path, cfg: EvalConfig, device: torch.device, names: list[str], language: str,
            texts: dict[str, str], asr: whisper.Whisper | None) -> dict[str, Any]:
    """The run proper, in a folder this process alone writes to."""
    from quantkit.report import write_report

    work = out / WORK
    shutil.rmtree(work, ignore_errors=True)  # a killed run's scratch
    previous = _previous_run(out)
    kept = _resumable(previous, cfg, texts, out) if cfg.resume else {}
    env = environment(str(device))  # once: its bandwidth probe takes a second
    try:
        results, rows = _run_recipes(names, cfg, language, texts, out, kept, env)
        if asr is not None and rows:
            _transcribe_all(asr, language, rows, out)
            _score(results, rows, language)
        if cfg.quality and rows:
            _assess(results, rows, out)
        doc = _document(cfg, language, texts, results, env, complete=True)
        _write_results(out, doc, rows)
        write_report(out)
        _drop_stale_audio(out, _recipes_of(previous) - {r.name for r in results})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return doc


def _run_recipes(names: list[str], cfg: EvalConfig, language: str, texts: dict, out: Path,
                 kept: dict, env: dict) -> tuple[list[RecipeResult], list[Utterance]]:
    """Each recipe in its own process (or kept from an earlier run), fp32 first; results.json
    and the audio in place after each."""
    results, rows, reference = [], [], None  # fp32's reference, once it is measured
    for i, source in enumerate(names, 1):
        key = config_key(source, cfg, texts)
        if key in kept:
            res, utt = kept[key]
            reference = out / REFERENCE_FILE if res.name == REFERENCE else reference
            log.info("[%d/%d] %s: already measured with this configuration (--resume)", i, len(names), res.name)
        else:
            log.info("[%d/%d] %s", i, len(names), source)
            t = time.perf_counter()
            res, utt = _run_worker(source, cfg, out, reference)
            log.log(logging.INFO if res.ok else logging.WARNING, "[%d/%d] %s: %s in %.0f s%s", i, len(names),
                    res.name, res.status, time.perf_counter() - t, f" ({res.error})" if res.error else "")
            res.config_key = key
            _install(out, res, utt)
            if res.name == REFERENCE and res.ok:
                reference = out / REFERENCE_FILE
        results.append(res)
        rows += utt
        _write_results(out, _document(cfg, language, texts, results, env, complete=False), rows)
    return results, rows


def _default_recipes(device: torch.device) -> list[str]:
    """Every shipped recipe that can run on ``device``."""
    from quantkit.apply import unrunnable
    from quantkit.recipes import get_recipe, recipe_names

    names = []
    for name in recipe_names():
        reason = unrunnable(get_recipe(name), device)
        if reason:
            log.info("skipping %s", reason)
        else:
            names.append(name)
    return names


def config_key(source: str, cfg: EvalConfig, texts: dict[str, str]) -> str:
    """What a recipe's measurement depends on: its settings, the model, the texts and the
    measuring options (not the ASR, which runs over every recipe's audio at the end)."""
    import hashlib

    from quantkit.recipes import get_recipe

    what = {"recipe": get_recipe(source).to_dict(), "model": cfg.model, "device": cfg.device,
            "texts": texts, "runs": cfg.runs, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
            "call_shapes": [cfg.call_shapes, cfg.long_steps, cfg.batch_sizes]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _document(cfg: EvalConfig, language: str, texts: dict, results: list[RecipeResult], env: dict,
              complete: bool) -> dict:
    from quantkit.models import OVERRIDES_FILE, SYNTHETIC_CONFIGS

    synthetic = cfg.model in SYNTHETIC_CONFIGS or (Path(cfg.model) / OVERRIDES_FILE).exists()
    return {
        "schema": SCHEMA, "model": cfg.model, "synthetic_weights": synthetic, "device": cfg.device,
        "language": language, "texts": cfg.texts, "utterances": len(texts), "runs": cfg.runs,
        "max_new_tokens": cfg.max_new_tokens,
        "environment": env,
        "command": cfg.command, "complete": complete, "recipes": [r.to_dict() for r in results],
        "recommendation": recommend(results, synthetic, cfg) if complete else
        {"name": None, "reason": "the run is not complete"},
    }


def _write_results(out: Path, doc: dict, rows: list[Utterance]) -> None:
    write_text(out / "results.json", json.dumps(doc, indent=1, ensure_ascii=False))
    write_utterances_csv(out / "utterances.csv", rows)


def _install(out: Path, res: RecipeResult, rows: list[Utterance]) -> None:
    """Move a finished recipe's audio (and fp32's reference) from the scratch folder into place."""
    work = out / WORK
    if not res.ok:
        return
    target = out / "audio" / res.name
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise QuantkitError(f"{target} is not a folder: cannot put {res.name}'s audio there")
    target.mkdir(parents=True, exist_ok=True)
    new = {Path(r.wav).name for r in rows}
    for wav in target.glob("*.wav"):  # the same recipe's audio from an earlier run here
        if wav.name not in new and wav.is_file() and not wav.is_symlink():
            wav.unlink()
    for name in new:
        os.replace(work / "audio" / res.name / name, target / name)
    if res.name == REFERENCE and (work / REFERENCE_FILE).is_file():
        os.replace(work / REFERENCE_FILE, out / REFERENCE_FILE)


def _previous_run(out: Path) -> dict | None:
    try:
        doc = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("recipes"), list) else None


def _resumable(previous: dict | None, cfg: EvalConfig, texts: dict,
               out: Path) -> dict[str, tuple[RecipeResult, list[Utterance]]]:
    """config key -> (result, utterance rows) of recipes an earlier run here measured with the
    same configuration, whose audio is all in place (fp32 also needs its reference file)."""
    if previous is None:
        return {}
    rows = _read_utterances(out / "utterances.csv")
    kept = {}
    for d in previous["recipes"]:
        try:
            res = RecipeResult.from_dict(d)
        except (TypeError, KeyError, AttributeError):
            continue  # not a result this version wrote
        if not res.ok or not res.config_key:
            continue
        utt = [r for r in rows if r.recipe == res.name]
        if len(utt) != len(texts) or not all((out / r.wav).is_file() for r in utt):
            continue
        if res.name == REFERENCE and not (out / REFERENCE_FILE).is_file():
            continue
        res.error_rate = res.dnsmos = res.speaker_similarity = None  # measured again over every recipe's audio
        kept[res.config_key] = (res, utt)
    return kept


def _read_utterances(path: Path) -> list[Utterance]:
    """utterances.csv's rows, as the recipe's process wrote them (what the parent adds is redone)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    keys = ("recipe", "id", "text", "wav")
    return [Utterance(**{k: r[k] for k in keys}, steps=int(r["steps"])) for r in rows
            if all(isinstance(r.get(k), str) for k in (*keys, "steps")) and r["steps"].isdigit()]


def failures(doc: dict[str, Any]) -> list[str]:
    """'name (why)' for each recipe of a results document that failed."""
    return [f"{r['name']} ({r['error']})" for r in doc["recipes"] if r["status"] != "ok"]


def _recipes_of(doc: dict | None) -> set[str]:
    if doc is None:
        return set()
    return {r["name"] for r in doc["recipes"] if isinstance(r, dict) and isinstance(r.get("name"), str)}


def _drop_stale_audio(out: Path, stale: set[str]) -> None:
    """The audio of recipes an earlier run here wrote (named in its results.json) and this run
    did not: only their .wav files go, and a folder only once it is empty."""
    for name in stale:
        folder = out / "audio" / name
        if folder.is_dir() and not folder.is_symlink():
            for wav in folder.glob("*.wav"):
                if wav.is_file() and not wav.is_symlink():
                    wav.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()


def default_command(argv: list[str]) -> str:
    return "python -m quantkit " + " ".join(shlex.quote(a) for a in argv)


def _worker_main(spec_path: str) -> int:
    """Run a worker; whatever stops it is written where the parent looks for the result."""
    import warnings

    from quantkit.quiet import hide_load_bars

    warnings.filterwarnings("ignore")  # library deprecation chatter would bury the progress bars
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    hide_load_bars()
    result_path = Path(json.loads(Path(spec_path).read_text())["result"])
    try:
        return worker(spec_path)
    except QuantkitError as exc:
        message, code = str(exc), 2
    except Exception as exc:  # noqa: BLE001 - recorded as the recipe's failure, the run goes on
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        message, code = f"{type(exc).__name__}: {first}", 1
    result_path.write_text(json.dumps({"error": message}))
    sys.stderr.write(f"error: {message}\n")
    return code


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
