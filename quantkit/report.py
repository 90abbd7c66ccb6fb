"""results.json -> report.md, report.html and their plots (rebuildable at any time with `quantkit report DIR`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from quantkit.atomic import atomic_path, write_text
from quantkit.errors import QuantkitError

SYNTHETIC_NOTE = ("**Synthetic weights.** The model has ChatTTS's real architecture and sizes but "
                  "random weights: it makes noise, not speech. Latency, memory, size and fidelity "
                  "figures are real; WER/CER on this audio means nothing, so the recommendation "
                  "uses fidelity to fp32 instead.")


def load_results(out: Path) -> dict[str, Any]:
    path = Path(out) / "results.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantkitError(f"{path} does not exist (run `python -m quantkit eval --out {out}` first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantkitError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") not in (1, 2, 3, 4) or not isinstance(doc.get("recipes"), list):
        raise QuantkitError(f"{path} is not a quantkit results file (schema 1 to 4)")
    for r in doc["recipes"]:
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or r.get("status") not in ("ok", "failed"):
            raise QuantkitError(f"{path}: malformed recipe entry {str(r)[:80]}")
    if not isinstance(doc.get("recommendation"), dict):
        raise QuantkitError(f"{path}: malformed or missing 'recommendation'")
    return doc


def _f(value, fmt: str = ".3g", none: str = "—") -> str:
    return none if value is None else format(value, fmt)


def _mb(value) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def error_axis(doc: dict) -> tuple[str, Any]:
    """What the plot's y axis shows: the error rate on real weights, else KL to fp32."""
    ok = [r for r in doc["recipes"] if r["status"] == "ok"]
    if not doc.get("synthetic_weights") and any(r.get("error_rate") for r in ok):
        metric = next(r["error_rate"]["metric"] for r in ok if r.get("error_rate"))
        return f"{metric.upper()} (mean, per-utterance capped at 1)", \
            lambda r: r["error_rate"]["mean"] if r.get("error_rate") else None
    return "KL divergence to fp32 (nats/token, teacher-forced)", \
        lambda r: r["fidelity"]["kl"] if r.get("fidelity") else None


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points no other point beats on both latency and error, by increasing latency."""
    front, best = [], float("inf")
    for x, y, name in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


def plot_pareto(doc: dict, path: Path) -> None:
    label, value = error_axis(doc)
    points = [(r["ms_per_step"], value(r), r["name"]) for r in doc["recipes"]
              if r["status"] == "ok" and value(r) is not None]
    fig, ax = _figure()
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1.2, marker="o",
                mfc="none", ms=10, drawstyle="steps-post", label="Pareto front", zorder=2)
        ax.legend(loc="best", fontsize=8)
        positive = [p[1] for p in points if p[1] > 0]
        if "KL" in label and positive:
            # KL spans orders of magnitude and is exactly 0 for fp32 itself
            ax.set_yscale("symlog", linthresh=min(positive))
    ax.set_xlabel("GPT latency, ms per step (warm median)")
    ax.set_ylabel(label)
    title = f"{doc['model']} on {doc['device']}"
    ax.set_title(title + (" — synthetic weights" if doc.get("synthetic_weights") else ""), fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _figure():
    """A report's figure and axes, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5), dpi=120)


def _save(fig, path: Path) -> None:
    """Write the figure whole under ``path`` (a temporary name, renamed) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def render_markdown(doc: dict) -> str:
    recipes = doc["recipes"]
    ok = [r for r in recipes if r["status"] == "ok"]
    out = [f"# quantkit evaluation: {doc['model']} on {doc['device']}", ""]
    if doc.get("synthetic_weights"):
        out += [SYNTHETIC_NOTE, ""]
    rec = doc.get("recommendation") or {}
    out += ["## Recommendation", "",
            f"**{rec.get('name') or 'none'}** — {rec.get('reason', '')}", ""]
    out += _latency_section(doc, ok) + _memory_section(ok) + _intelligibility_section(doc, ok)
    out += _fidelity_section(ok)
    out += _quality_section(doc, [r for r in ok if r.get("dnsmos")])
    out += _call_shapes_section(ok)
    failed = [r for r in recipes if r["status"] != "ok"]
    if failed:
        out += ["## Failed recipes", ""] + [f"- **{r['name']}**: {r['error']}" for r in failed] + [""]
    out += ["![latency versus error](pareto.png)", ""] + _environment_section(doc)
    return "\n".join(out)


def _latency_section(doc: dict, ok: list[dict]) -> list[str]:
    stock = next((r for r in ok if r["name"] == "stock"), None)
    speed = lambda r: _f(stock["ms_per_step"] / r["ms_per_step"], ".2f") + "x" if stock else "—"  # noqa: E731
    return ["## Latency", "",
            f"Fixed {doc.get('max_new_tokens')} GPT steps per call, warm figures over {doc.get('runs')} runs; "
            "ms/step is GPT time (embedding, prefill, decode, sampling) over the step count; "
            "decode step ms (compiled decoding only) is one decode step alone, prompt pass excluded; "
            "RTF is whole-call time over audio length (512 samples at 24 kHz per step).", "",
            _table(["recipe", "load s", "apply s", "first call s", "warm median s", "warm p90 s",
                    "GPT ms/step", "decode step ms", "decoder+vocoder s", "RTF", "speed-up vs stock (ms/step)"],
                   [[r["name"], _f(r["load_s"]), _f(r["apply_s"]), _f(r["first_call_s"]),
                     _f(r["warm_s_median"]), _f(r["warm_s_p90"]), _f(r["ms_per_step"]),
                     _f(r.get("step_ms_median")), _f(r.get("decode_s_median")), _f(r["rtf"]), speed(r)]
                    for r in ok]), ""]


def _memory_section(ok: list[dict]) -> list[str]:
    return ["## Memory and size", "",
            "Peak memory is the process's peak RSS on CPU (load included) or "
            "`torch.cuda.max_memory_allocated` on CUDA. Bandwidth = bytes read per GPT step "
            "(transformer and code heads; the code embeddings are looked up, not streamed) x steps per "
            "second; read bandwidth: per warm call, the mean of two sums over 256 MiB (on CPU on huge pages, "
            "on CUDA in GPU memory) right before and after it (best of three each), median over the calls; "
            "fraction: median over the calls of each one's bandwidth / the read bandwidth around it. "
            "Decode-step columns: the "
            "same over decode steps alone (compiled decoding), without the prompt pass.", "",
            _table(["recipe", "peak memory MiB", "weights MiB", "per-step weights MiB", "bandwidth GB/s",
                    "read bandwidth GB/s", "fraction", "decode-step GB/s", "decode-step fraction"],
                   [[r["name"], _mb(r["peak_mem_bytes"]), _mb(r["weight_bytes"]),
                     _mb(r.get("decode_weight_bytes")), _f(r["bandwidth_gbs"]),
                     _f(r.get("read_bandwidth_gbs")), _f(r.get("bandwidth_fraction"), ".0%"),
                     _f(r.get("step_bandwidth_gbs")), _f(r.get("step_bandwidth_fraction"), ".0%")]
                    for r in ok]), ""]


def _intelligibility_section(doc: dict, ok: list[dict]) -> list[str]:
    if not any(r.get("error_rate") for r in ok):
        return []
    metric = next(r["error_rate"]["metric"] for r in ok if r.get("error_rate")).upper()
    out = ["## Intelligibility", "",
           f"Whisper at temperature 0, language forced; {metric} per utterance capped at 1; "
           "delta is the paired mean difference to fp32 with a 95% bootstrap interval.", ""]
    if doc.get("synthetic_weights"):
        out += ["*Synthetic weights: these numbers only show that the pipeline runs.*", ""]
    return out + [_table(["recipe", f"{metric} mean", f"{metric} uncapped mean (Seed-TTS-eval)",
                          f"{metric} corpus", "delta vs fp32", "95% CI"],
                         [[r["name"], _f(e["mean"], ".3f"), _f(e.get("uncapped_mean"), ".3f"),
                           _f(e["corpus"], ".3f"), _f(e["delta_vs_fp32"], "+.3f"),
                           f"[{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]" if e.get("ci95") else "—"]
                          for r in ok if (e := r.get("error_rate"))]), ""]


def _fidelity_section(ok: list[dict]) -> list[str]:
    return ["## Fidelity to fp32", "",
            "Teacher-forced on fp32's own token sequences: top-1 agreement of next-token "
            "predictions (all codebooks, then per codebook), mean KL(fp32 || variant) in nats, and "
            "mean absolute log-mel difference of decoder+vocoder output on the same tokens.", "",
            _table(["recipe", "token agreement", "per codebook", "KL", "log-mel distance"],
                   [[r["name"], _f(f["token_agreement"], ".4f"),
                     " / ".join(f"{x:.3f}" for x in f["per_codebook"]), _f(f["kl"], ".2e"),
                     _f(f["mel_distance"], ".2e")] for r in ok if (f := r.get("fidelity"))]), ""]


def _environment_section(doc: dict) -> list[str]:
    env = doc.get("environment", {})
    return ["## Environment and reproduction", "",
            f"- machine: {env.get('cpu')}, {env.get('threads')} threads"
            + (f", measured read bandwidth {env['read_bandwidth_gbs']:.1f} GB/s"
               if env.get("read_bandwidth_gbs") else "")
            + (f", GPU {env['gpu']}" if env.get("gpu") else ""),
            "- versions: " + ", ".join(f"{k} {env[k]}" for k in
                                       ("torch", "torchao", "chattts", "transformers", "bitsandbytes")
                                       if env.get(k)),
            f"- texts: {doc.get('texts')} ({doc.get('utterances')} utterances, {doc.get('language')})",
            "", "```", doc.get("command", ""), "```", ""]


def _quality_section(doc: dict, rows: list[dict]) -> list[str]:
    """DNSMOS and speaker similarity to fp32, with paired deltas and bootstrap intervals."""
    if not rows:
        return []
    ci = lambda c: f"[{c[0]:+.2f}, {c[1]:+.2f}]" if c else "—"  # noqa: E731
    out = ["## Naturalness and speaker similarity", "",
           "DNSMOS (P.835 SIG, BAK, OVRL and P.808, Microsoft's ONNX models via speechmos, 16 kHz) per "
           "utterance, mean per recipe, OVRL's paired delta to fp32 with a 95% bootstrap interval; speaker "
           "similarity: cosine of GE2E embeddings (resemblyzer) of each utterance and fp32's same one.", ""]
    if doc.get("synthetic_weights"):
        out += ["*Synthetic weights: noise, not speech; these numbers only show that the pipeline runs.*", ""]
    out += [_table(["recipe", "SIG", "BAK", "OVRL", "P.808", "OVRL delta vs fp32", "95% CI",
                    "speaker similarity", "95% CI"],
                   [[r["name"], *[_f(d[k]["mean"], ".2f") for k in ("sig", "bak", "ovrl", "p808")],
                     _f(d["ovrl"]["delta_vs_fp32"], "+.2f"), ci(d["ovrl"]["ci95"]),
                     _f(s.get("mean"), ".3f"), ci(s.get("ci95"))]
                    for r in rows if (d := r["dnsmos"]) and (s := r.get("speaker_similarity") or {}) is not None]), ""]
    return out


# One recipe's row in a table that report.md and report.html both render: (value, template) per column.
Cells = list[tuple[Any, str]]
Table = tuple[str, list[str], list[tuple[str, Cells]]]  # lead-in, header (after "recipe"), rows


def cell(value: float | None, template: str = "{:.3g}") -> str:
    return "—" if value is None else template.format(value)


def _call_shape_columns(sizes: list[int], base: dict | None) -> list[tuple[str, Callable[[dict], Any], str]]:
    """Header, value from one recipe's call_shapes, template; speed-ups against base (stock's)."""
    def vs(get: Callable[[dict], float]) -> Callable[[dict], float | None]:
        return lambda c: get(base) / get(c) if base else None

    def batch(i: int) -> Callable[[dict], float]:
        return lambda c: c["batches"][i]["audio_s_per_s"]

    long_s, refine_s = (lambda c: c["long"]["s"]), (lambda c: c["refine"]["s"])
    return [("long s", long_s, "{:.3g}"), ("long vs stock", vs(long_s), "{:.2f}x"),
            *[(f"batch {b} audio s/s", batch(i), "{:.3g}") for i, b in enumerate(sizes)],
            ("batch max / batch 1", lambda c: batch(-1)(c) / batch(0)(c), "{:.2f}x"),
            ("refine s", refine_s, "{:.3g}"), ("refine vs stock", vs(refine_s), "{:.2f}x"),
            ("first chunk s", lambda c: c["stream"]["first_chunk_s"], "{:.3g}"),
            ("whole call s", lambda c: c["stream"]["whole_s"], "{:.3g}"),
            ("first chunk / whole", lambda c: c["stream"]["ratio"], "{:.2f}")]


def call_shapes_tables(ok: list[dict]) -> list[Table]:
    """What users get through Chat.infer (long utterance, batches, refinement, streaming), then,
    where compiled decoding timed them apart, the batches' decode steps alone: what sharing a
    step's weight reads between rows gives, before the prompt pass, decoder and vocoder."""
    rows = [r for r in ok if r.get("call_shapes")]
    if not rows:
        return []
    first = rows[0]["call_shapes"]
    sizes = [b["batch"] for b in first["batches"]]
    stock = next((r["call_shapes"] for r in rows if r["name"] == "stock"), None)
    columns = _call_shape_columns(sizes, stock)
    lead = (f"Through ChatTTS's own `Chat.infer`, fixed lengths, each timed warm: one utterance of "
            f"{first['long']['steps']} steps; batches of {', '.join(map(str, sizes))} texts of "
            f"{first['batches'][0]['steps']} steps (throughput in audio seconds per wall second{_median_of(first)}); "
            f"{first['refine']['texts']} texts with text refinement on ({first['refine']['refine_steps']} "
            f"refinement steps, then {first['refine']['steps']} code steps); `stream=True` with "
            f"`stream_batch` {first['stream']['stream_batch']} and no hand-over skipped, "
            f"{first['stream']['steps']} steps: time to the first chunk against the whole call "
            "unstreamed. Speed-ups are against stock's same call.")
    tables = [(lead, [h for h, _, _ in columns],
               [(r["name"], [(get(r["call_shapes"]), t) for _, get, t in columns]) for r in rows])]
    timed = [(r["name"], rates) for r in rows
             if all(rates := [b.get("row_steps_per_s") for b in r["call_shapes"]["batches"]])]
    if timed:
        tables.append(("The same batches' decode steps alone (compiled decoding times them apart), in rows "
                       "times steps a second:", [*[f"batch {b} steps/s" for b in sizes], "batch max / batch 1"],
                       [(name, [*[(x, "{:.0f}") for x in rates], (rates[-1] / rates[0], "{:.2f}x")])
                        for name, rates in timed]))
    return tables


def _median_of(shapes: dict) -> str:
    runs = shapes["batches"][0].get("runs_s")  # schema 4
    return f"; each size the median of {len(runs)} calls in alternating rounds" if runs else ""


def _call_shapes_section(ok: list[dict]) -> list[str]:
    tables = call_shapes_tables(ok)
    if not tables:
        return []
    out = ["## What users get: Chat.infer", ""]
    for lead, header, rows in tables:
        body = [[name, *[cell(v, t) for v, t in cells]] for name, cells in rows]
        out += [lead, "", _table(["recipe", *header], body), ""]
    return out + ["![throughput versus batch size](throughput.png)", ""]


def plot_throughput(doc: dict, path: Path) -> None:
    """Audio seconds per wall second against batch size, per recipe (where measured)."""
    rows = [r for r in doc["recipes"] if r["status"] == "ok" and r.get("call_shapes")]
    if not rows:
        return
    fig, ax = _figure()
    for r in rows:
        batches = r["call_shapes"]["batches"]
        ax.plot([b["batch"] for b in batches], [b["audio_s_per_s"] for b in batches], marker="o", label=r["name"])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="real time")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("texts per Chat.infer call (batch)")
    ax.set_ylabel("audio seconds per wall second")
    ax.set_title(f"{doc['model']} on {doc['device']}: throughput", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def write_report(out: Path) -> None:
    out = Path(out)
    doc = load_results(out)
    try:
        text = render_markdown(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise QuantkitError(f"{out / 'results.json'} is malformed ({type(exc).__name__}: {exc})") from None
    write_text(out / "report.md", text)
    plot_pareto(doc, out / "pareto.png")
    plot_throughput(doc, out / "throughput.png")
    from quantkit.report_html import render_html

    write_text(out / "report.html", render_html(doc, out))
