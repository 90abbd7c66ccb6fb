"""results.json + utterances.csv -> report.html: one self-contained page (plots embedded, no
network) with tables that sort by column and, for every recipe, its figures beside a player
for each of its utterances (relative paths to the eval's wavs), to compare variants by ear."""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

from quantkit.report import SYNTHETIC_NOTE, call_shapes_tables, cell

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff4d6; padding: 0.6em 1em; border-left: 4px solid #e0a800; }
.utt { margin: 0.3em 0; } .utt span { display: inline-block; min-width: 4em; font-weight: 600; }
audio { height: 28px; vertical-align: middle; } img { max-width: 100%; }
"""

# Click a header to sort by it (numbers by value, the rest as text); again to reverse.
_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var col = th.cellIndex, body = th.closest("table").tBodies[0];
    var asc = !th.classList.contains("sorted-asc");
    th.closest("tr").querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
    th.classList.add(asc ? "sorted-asc" : "sorted-desc");
    var key = function (tr) { var c = tr.cells[col]; var v = c.getAttribute("data-v");
      return v === null ? c.textContent : (v === "" ? NaN : parseFloat(v)); };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      if (typeof x === "number" && typeof y === "number") {
        if (isNaN(x)) return 1; if (isNaN(y)) return -1; return asc ? x - y : y - x; }
      return asc ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
    }).forEach(function (tr) { body.appendChild(tr); });
  });
});
"""


def _num(value, template: str = "{:.3g}") -> str:
    """A numeric cell that sorts by its value."""
    data = "" if value is None else repr(float(value))
    return f'<td class="num" data-v="{data}">{cell(value, template)}</td>'


def _get(r: dict, *path):
    for key in path:
        r = r.get(key) if isinstance(r, dict) else None
    return r


COLUMNS = [  # header, value of a recipe's result, template
    ("GPT ms/step", lambda r: r.get("ms_per_step"), "{:.3g}"),
    ("RTF", lambda r: r.get("rtf"), "{:.3g}"),
    ("warm s", lambda r: r.get("warm_s_median"), "{:.3g}"),
    ("peak MiB", lambda r: r["peak_mem_bytes"] / 2**20 if r.get("peak_mem_bytes") else None, "{:.0f}"),
    ("error (capped)", lambda r: _get(r, "error_rate", "mean"), "{:.3f}"),
    ("error (uncapped)", lambda r: _get(r, "error_rate", "uncapped_mean"), "{:.3f}"),
    ("Δ error", lambda r: _get(r, "error_rate", "delta_vs_fp32"), "{:+.3f}"),
    ("DNSMOS OVRL", lambda r: _get(r, "dnsmos", "ovrl", "mean"), "{:.2f}"),
    ("Δ OVRL", lambda r: _get(r, "dnsmos", "ovrl", "delta_vs_fp32"), "{:+.2f}"),
    ("speaker similarity", lambda r: _get(r, "speaker_similarity", "mean"), "{:.3f}"),
    ("token agreement", lambda r: _get(r, "fidelity", "token_agreement"), "{:.4f}"),
]


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _utterances(out: Path) -> list[dict]:
    try:
        with open(out / "utterances.csv", newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def _players(rows: list[dict]) -> str:
    items = []
    for u in rows:
        heard = f" — heard: “{html.escape(u['transcript'])}”" if u.get("transcript") else ""
        items.append(f'<div class="utt"><span>{html.escape(u["id"])}</span> '
                     f'<audio controls preload="metadata" src="{html.escape(u["wav"], quote=True)}"></audio> '
                     f'{html.escape(u["text"])}{heard}</div>')
    return "".join(items)


def _sortable(table_id: str, header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A table that sorts by column: rows of (recipe, its numeric cells)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["recipe", *header])
    body = "".join(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>" for name, cells in rows)
    return f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _call_shapes(ok: list[dict]) -> str:
    """report.md's call-shapes tables: what users get through Chat.infer, per recipe."""
    tables = call_shapes_tables(ok)
    parts = [f"<p>{html.escape(lead.replace('`', ''))}</p>"
             + _sortable(table_id, header, [(name, [_num(v, t) for v, t in cells]) for name, cells in rows])
             for table_id, (lead, header, rows) in zip(("call-shapes", "decode-steps"), tables)]
    return f"<h2>What users get: Chat.infer</h2>{''.join(parts)}" if parts else ""


def render_html(doc: dict, out: Path) -> str:
    ok = [r for r in doc["recipes"] if r["status"] == "ok"]
    rows = _utterances(out)
    rec = doc.get("recommendation") or {}
    table = _sortable("recipes", [h for h, _, _ in COLUMNS],
                      [(r["name"], [_num(get(r), t) for _, get, t in COLUMNS]) for r in ok])
    listen = "".join(
        f"<tr><td><b>{html.escape(r['name'])}</b></td>"
        + "".join(_num(get(r), t) for _, get, t in COLUMNS[:1] + COLUMNS[4:5] + COLUMNS[7:])
        + f"<td>{_players([u for u in rows if u['recipe'] == r['name']])}</td></tr>"
        for r in ok)
    failed = "".join(f"<li><b>{html.escape(r['name'])}</b>: {html.escape(str(r.get('error')))}</li>"
                     for r in doc["recipes"] if r["status"] != "ok")
    note = (f'<p class="note">{html.escape(SYNTHETIC_NOTE.replace("**", ""))}</p>'
            if doc.get("synthetic_weights") else "")
    listen_head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in COLUMNS[:1] + COLUMNS[4:5] + COLUMNS[7:])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>quantkit evaluation: {html.escape(str(doc['model']))} on {html.escape(str(doc['device']))}</title>
<style>{_STYLE}</style></head><body>
<h1>quantkit evaluation: {html.escape(str(doc['model']))} on {html.escape(str(doc['device']))}</h1>
{note}
<h2>Recommendation</h2><p><b>{html.escape(str(rec.get('name') or 'none'))}</b> — {html.escape(str(rec.get('reason', '')))}</p>
<h2>Recipes</h2><p>Click a column to sort. Details of every figure: report.md.</p>
{table}
<h2>Listen</h2><p>Each recipe's figures beside its utterances; fp32 is the reference.</p>
<table class="sortable" id="listen"><thead><tr><th>recipe</th>{listen_head}<th>utterances</th></tr></thead>
<tbody>{listen}</tbody></table>
{_call_shapes(ok)}
{f"<h2>Failed recipes</h2><ul>{failed}</ul>" if failed else ""}
<h2>Plots</h2>{_image(out / "pareto.png", "latency versus error")}{_image(out / "throughput.png", "throughput versus batch size")}
<h2>Reproduce</h2><pre>{html.escape(str(doc.get('command', '')))}</pre>
<script>{_SCRIPT}</script>
</body></html>
"""
