"""Command line: argument parsing and error reporting only; the work lives in the modules."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from quantkit.errors import QuantkitError

DEFAULT_TEXT = "The birch canoe slid on the smooth planks."
SEED_HELP = "seeds the speaker and the sampling: the same seed gives the same audio (default: 0)"
MAX_NEW_TOKENS_HELP = "most GPT steps when --steps is not given (default: 2048, ChatTTS's)"
LANGUAGE_HELP = "en (WER) or zh (CER) (default: en)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


class _Progress(logging.Formatter):
    """Progress (INFO) as plain lines; warnings and errors with their level and source."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return super().format(record)


def _integer(value: str, low: int, high: int, bounds: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not an integer") from None
    if not low <= n <= high:
        raise argparse.ArgumentTypeError(f"{n} is outside {bounds}")
    return n


def _positive(value: str) -> int:
    return _integer(value, 1, 2**62, "1..2**62")


def _seed(value: str) -> int:
    return _integer(value, 0, 2**63 - 1, "0..2**63-1")  # what torch's generators take


def _text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the text is empty")
    return value


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number") from None


def _positive_seconds(value: str) -> float:
    x = _number(value)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a positive number of seconds")
    return x


def _between(low: float, high: float):
    """An argument type: a number from ``low`` to ``high`` (a budget outside its scale would
    only show as "no recipe recommended" once every recipe has run)."""
    def number(value: str) -> float:
        x = _number(value)
        if not low <= x <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{value} is outside {low:g}..{high:g}")
        return x
    return number


def _sizes(value: str) -> list[int]:
    sizes = [_positive(v.strip()) for v in value.split(",") if v.strip()]
    if not sizes or len(set(sizes)) != len(sizes) or max(sizes) > 64:
        raise argparse.ArgumentTypeError(f"'{value}' must be distinct sizes from 1 to 64, comma-separated")
    return sizes


def _add_model(p: argparse.ArgumentParser, from_eval: bool = False) -> None:
    """--model and --device; ``from_eval`` (export): by default the eval's with --best."""
    said = "with --best the eval's, else " if from_eval else ""
    p.add_argument("--model", default=None if from_eval else "synthetic",
                   help=f"chattts | synthetic | synthetic-tiny | a ChatTTS asset directory (default: {said}synthetic)")
    p.add_argument("--device", default=None if from_eval else "cpu", help=f"cpu | cuda | auto (default: {said}cpu)")


def cmd_recipes(args: argparse.Namespace) -> int:
    from quantkit.recipes import all_recipes

    recipes = all_recipes()
    width = max(len(r.name) for r in recipes)
    for r in recipes:
        print(f"{r.name:<{width}}  {r.description}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from quantkit.run import run_recipe

    result = run_recipe(args.recipe, model=args.model, device=args.device, text=args.text,
                        seed=args.seed, steps=args.steps, max_new_tokens=args.max_new_tokens,
                        out_wav=args.out_wav, compile_cache=args.compile_cache,
                        trust_compiled=args.trust_compiled)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:>{width}}: {value:.4g}" if isinstance(value, float) else f"{key:>{width}}: {value}")
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from quantkit.asr import DEFAULT_MODELS, load_asr, transcribe
    from quantkit.metrics import error_rates

    refs, stems, audio = _read_inputs(args)
    model = load_asr(args.asr_model or DEFAULT_MODELS[args.language])
    hyps = []
    for stem, (wav, rate) in zip(stems, audio):
        hyps.append(transcribe(model, wav, rate, args.language))
        print(f"{stem}\t{hyps[-1]}", flush=True)
    if refs is not None:
        rates = error_rates([refs[s] for s in stems], hyps, args.language, ids=stems)
        print(f"{rates.metric.upper()} {rates.mean:.4f}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from quantkit.audio import read_wav

    refs, stems, audio = _read_inputs(args)
    speaker = read_wav(args.speaker_reference) if args.speaker_reference else None
    from quantkit.quality import dnsmos, similarity, speaker_embedding

    ref_emb = speaker_embedding(*speaker) if speaker else None
    errors = _score_errors(args, stems, refs, audio)
    rows = []
    for path, stem, (wav, rate) in zip(args.wavs, stems, audio):
        sim = similarity(speaker_embedding(wav, rate), ref_emb) if ref_emb is not None else None
        rows.append({"file": path, "dnsmos": dnsmos(wav, rate).to_dict(), "speaker_similarity": sim,
                     "error_rate": errors.get(stem) if errors else None})
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        _print_scores(rows, "cer" if args.language == "zh" else "wer")
    return 0


def _read_inputs(args: argparse.Namespace) -> tuple[dict[str, str] | None, list[str], list]:
    """(references or None, the WAVs' stems, their audio), every one checked before a model loads:
    each WAV has a reference with words in it, and reads as audio."""
    from pathlib import Path

    from quantkit.audio import read_wav
    from quantkit.metrics import check_references
    from quantkit.texts import read_tsv

    stems = [Path(w).stem for w in args.wavs]
    refs = read_tsv(args.references) if args.references else None
    if refs is not None:
        shared = sorted({s for s in stems if stems.count(s) > 1})
        if shared:
            raise QuantkitError(f"two of the WAVs share the name '{shared[0]}', and a reference is found by "
                                "the WAV's name: rename one")
        missing = [s for s in stems if s not in refs]
        if missing:
            raise QuantkitError(f"no reference for {', '.join(missing)} in {args.references}")
        check_references({s: refs[s] for s in stems}, args.language)
    return refs, stems, [read_wav(w) for w in args.wavs]


def _score_errors(args: argparse.Namespace, stems: list[str], refs: dict | None, audio: list) -> dict[str, float]:
    """Per file WER or CER (uncapped) against the references; {} without them."""
    if refs is None:
        return {}
    from quantkit.asr import DEFAULT_MODELS, load_asr, transcribe
    from quantkit.metrics import error_rates

    model = load_asr(args.asr_model or DEFAULT_MODELS[args.language])
    hyps = [transcribe(model, wav, rate, args.language) for wav, rate in audio]
    rates = error_rates([refs[s] for s in stems], hyps, args.language, ids=stems)
    return dict(zip(stems, rates.uncapped))


def _print_scores(rows: list[dict], metric: str) -> None:
    print(f"{'file':<40} {'SIG':>5} {'BAK':>5} {'OVRL':>5} {'P808':>5} {'SIM':>6} {metric.upper():>6}")
    for r in rows:
        d = r["dnsmos"]
        sim = "—" if r["speaker_similarity"] is None else f"{r['speaker_similarity']:.3f}"
        err = "—" if r["error_rate"] is None else f"{r['error_rate']:.3f}"
        print(f"{r['file'][-40:]:<40} {d['sig']:5.2f} {d['bak']:5.2f} {d['ovrl']:5.2f} {d['p808']:5.2f} "
              f"{sim:>6} {err:>6}")


def cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pathlib import Path

    from quantkit.evaluate import EvalConfig, default_command, failures, run_eval

    recipes = None if args.recipes is None else [r.strip() for r in args.recipes.split(",") if r.strip()]
    cfg = EvalConfig(model=args.model, device=args.device, recipes=recipes, texts=args.texts,
                     limit=args.limit, asr_model=args.asr_model, runs=args.runs,
                     max_new_tokens=args.max_new_tokens, skip_asr=args.skip_asr, seed=args.seed,
                     timeout_s=args.timeout, max_error_increase=args.max_error_increase,
                     resume=args.resume, call_shapes=not args.skip_call_shapes,
                     quality=not args.skip_quality, min_similarity=args.min_similarity,
                     max_mos_drop=args.max_mos_drop,
                     long_steps=args.long_steps, batch_sizes=args.batch_sizes,
                     command=default_command(list(argv)))
    doc = run_eval(cfg, Path(args.out))
    rec = doc["recommendation"]
    print(f"wrote {args.out}/results.json, report.md, report.html, pareto.png, throughput.png, utterances.csv")
    print(f"recommendation: {rec['name']} ({rec['reason']})")
    failed = failures(doc)
    if failed:
        sys.stderr.write(f"error: {len(failed)} of {len(doc['recipes'])} recipes failed: {'; '.join(failed)}\n")
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from quantkit.report import write_report

    write_report(args.dir)
    print(f"wrote {args.dir}: report.md, report.html, pareto.png and throughput.png")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from quantkit.export import export_variant

    if (args.recipe is None) == (args.best is None):
        raise QuantkitError("give either a RECIPE or --best DIR")
    info = export_variant(args.out, recipe=args.recipe, best=args.best, model=args.model,
                          device=args.device, force=args.force, batches=args.batches)
    print(f"wrote {info['out']}: recipe {info['recipe']}, {info['total_bytes'] / 2**20:.1f} MiB on disk "
          f"(GPT {info['gpt_bytes'] / 2**20:.1f} MiB)"
          + (", compile artifacts included" if info["compile_artifacts"] else ""))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import time

    from quantkit.atomic import check_writable_target
    from quantkit.audio import write_wav
    from quantkit.chattts import check_steps
    from quantkit.export import load_variant
    from quantkit.machine import process_seconds
    from quantkit.synth import SAMPLE_RATE, synthesize

    check_steps(args.steps)
    check_writable_target(args.out_wav)
    t0 = time.perf_counter()
    chat = load_variant(args.variant, device=args.device, trust_compiled=args.trust_compiled)
    t1 = time.perf_counter()
    out = synthesize(chat, args.text, seed=args.seed, steps=args.steps, max_new_tokens=args.max_new_tokens)
    since_start = process_seconds()
    write_wav(args.out_wav, out.wav, SAMPLE_RATE)
    print(f"wrote {args.out_wav}: {out.audio_s:.2f} s of audio, {out.steps} steps; "
          f"load {t1 - t0:.2f} s, first audio {out.total_s:.2f} s ({since_start:.2f} s from process start)")
    return 0


def _apply_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe name (see `recipes`) or a path to a .toml file")
    _add_model(p)
    p.add_argument("--text", type=_text, default=DEFAULT_TEXT, help=f"what to say (default: {DEFAULT_TEXT!r})")
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p.add_argument("--steps", type=_positive, default=None,
                   help="generate exactly N GPT steps (N x 512 samples) for equal-work timing")
    p.add_argument("--max-new-tokens", type=_positive, default=2048, help=MAX_NEW_TOKENS_HELP)
    p.add_argument("--out-wav", default=None, help="write the warm call's audio (24 kHz WAV)")
    p.add_argument("--compile-cache", default=None,
                   help="directory of saved compile artifacts (compiled recipes): load them "
                        "before the first call and save them after it (a new or empty directory, or "
                        "one it saved into before)")
    p.add_argument("--trust-compiled", action="store_true",
                   help="load compiled code from a --compile-cache written on another machine")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    p.add_argument("--recipes", default=None,
                   help="comma-separated recipe names or .toml paths (default: all shipped that the device runs); "
                        "fp32, the reference, is always added")
    p.add_argument("--texts", default="en", help="en | zh | a TSV of id<TAB>text (default: en)")
    p.add_argument("--limit", type=_positive, default=None, help="use only the first N texts")
    p.add_argument("--asr-model", default=None,
                   help="Whisper name or checkpoint path (default: bundled tiny.en / base)")
    p.add_argument("--runs", type=_positive, default=3,
                   help="warm timing runs per recipe (and calls per batch size in the call shapes)")
    p.add_argument("--max-new-tokens", type=_positive, default=96,
                   help="GPT steps of the timing utterance (fixed) and cap for the others")
    p.add_argument("--skip-asr", action="store_true", help="no Whisper, no WER/CER")
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p.add_argument("--timeout", type=_positive_seconds, default=1800.0, help="seconds per recipe process")
    p.add_argument("--max-error-increase", type=_between(0, 1), default=0.01,
                   help="error budget over fp32 for the recommendation, 0 to 1 (default 0.01 = 1 point)")
    p.add_argument("--out", default="out/eval", help="output directory (default: out/eval)")
    p.add_argument("--skip-quality", action="store_true", help="no DNSMOS, no speaker similarity")
    p.add_argument("--min-similarity", type=_between(-1, 1), default=None,
                   help="recommendation budget: least speaker similarity to fp32, -1 to 1 (e.g. 0.8)")
    p.add_argument("--max-mos-drop", type=_between(0, 4), default=None,
                   help="recommendation budget: most DNSMOS OVRL below fp32, 0 to 4 (e.g. 0.1)")
    p.add_argument("--skip-call-shapes", action="store_true",
                   help="do not time Chat.infer's call shapes (long utterance, batches, refinement, streaming)")
    p.add_argument("--long-steps", type=_positive, default=1100,
                   help="GPT steps of the long-utterance call (default 1100)")
    p.add_argument("--batch-sizes", type=_sizes, default=[1, 4, 8, 16],
                   help="batch sizes whose throughput is timed (default 1,4,8,16)")
    p.add_argument("--resume", action="store_true",
                   help="keep recipes already measured in --out with the same configuration")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="an eval output directory (its results.json)")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=None, help="a recipe name or .toml path")
    p.add_argument("--best", default=None, metavar="DIR",
                   help="export the recipe an eval directory recommends")
    _add_model(p, from_eval=True)
    p.add_argument("--out", required=True, help="the variant directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument("--batches", type=_sizes, default=None,
                   help="compiled recipes: the batch sizes (texts per Chat.infer call) whose compiled steps "
                        "the variant carries, each as its power-of-two bucket (default 1,2,4: ChatTTS's "
                        "default split_text runs a text's sentences in batches of up to 4; others compile "
                        "at their first call)")


def _synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", required=True, metavar="DIR", help="a directory written by `export`")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    p.add_argument("--text", type=_text, required=True, help="what to say")
    p.add_argument("--out-wav", required=True, help="the audio to write (24 kHz WAV)")
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p.add_argument("--steps", type=_positive, default=None,
                   help="generate exactly N GPT steps (N x 512 samples) instead of stopping at the end of speech")
    p.add_argument("--max-new-tokens", type=_positive, default=2048, help=MAX_NEW_TOKENS_HELP)
    p.add_argument("--trust-compiled", action="store_true",
                   help="load the variant's compiled code even though it was exported elsewhere "
                        "(compiled code runs on load: only for variants you trust)")


def _score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("wavs", nargs="+", metavar="WAV", help="the audio files to score (WAV, FLAC, OGG, MP3)")
    p.add_argument("--references", default=None,
                   help="TSV of id<TAB>text (id = the WAV's stem): also WER (en) or CER (zh)")
    p.add_argument("--language", choices=("en", "zh"), default="en", help=LANGUAGE_HELP)
    p.add_argument("--speaker-reference", default=None, metavar="WAV",
                   help="a WAV of the reference voice: also speaker similarity to it")
    p.add_argument("--asr-model", default=None, help="Whisper name or checkpoint path (with --references)")
    p.add_argument("--json", action="store_true", help="one JSON object per file")


def _transcribe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("wavs", nargs="+", metavar="WAV", help="the audio files to transcribe (WAV, FLAC, OGG, MP3)")
    p.add_argument("--asr-model", default=None,
                   help="Whisper name (tiny.en, base, ...) or checkpoint path "
                        "(default: bundled tiny.en for en, base for zh)")
    p.add_argument("--language", choices=("en", "zh"), default="en", help=LANGUAGE_HELP)
    p.add_argument("--references", default=None,
                   help="TSV of id<TAB>text (id = the WAV's stem): also print WER (en) or CER (zh), "
                        "the mean of per-utterance errors capped at 1")


# name, help, handler, its arguments: one row per command, in `--help`'s order
COMMANDS = [
    ("recipes", "list the shipped recipes", cmd_recipes, None),
    ("apply", "load ChatTTS, apply a recipe, synthesize, print timings", cmd_apply, _apply_arguments),
    ("eval", "measure recipes: latency, memory, size, intelligibility, fidelity", cmd_eval, _eval_arguments),
    ("report", "rebuild the report (report.md, report.html, plots) from DIR/results.json", cmd_report,
     _report_arguments),
    ("export", "write a deployable variant directory", cmd_export, _export_arguments),
    ("synth", "synthesize with an exported variant", cmd_synth, _synth_arguments),
    ("score", "DNSMOS, speaker similarity and WER/CER of any WAV files", cmd_score, _score_arguments),
    ("transcribe", "transcribe WAV files with Whisper; score them against references", cmd_transcribe,
     _transcribe_arguments),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m quantkit",
                     description="Precision and quantization experiments for ChatTTS.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text, handler, arguments in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if arguments is not None:
            arguments(p)
        p.set_defaults(func=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_Progress("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("quantkit.evaluate").setLevel(logging.INFO)  # eval's progress, one line a recipe
    # ChatTTS warns on every fixed-length run ("hit max_new_token"): that is the point of it.
    logging.getLogger("ChatTTS").setLevel(logging.INFO if args.verbose else logging.ERROR)
    if args.command in ("apply", "export", "synth") and not args.verbose:
        from quantkit.quiet import hide_load_bars

        hide_load_bars()
    try:
        return args.func(args, argv) if args.func is cmd_eval else args.func(args)
    except QuantkitError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:  # a full disk, a vanished folder: one line, not a traceback
        from quantkit.atomic import os_error

        sys.stderr.write(f"error: {os_error(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
