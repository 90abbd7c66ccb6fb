"""Evaluation text sets: TSV files of `id<TAB>text`, shipped (en, zh) or the user's own."""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError

DATA = Path(__file__).resolve().parent / "data"
SHIPPED = {"en": DATA / "harvard_en.tsv", "zh": DATA / "zh_everyday.tsv"}


def plain_name(name: str) -> bool:
    """A name usable as one file name inside a folder, and nothing more."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0") and len(name) < 200


def read_tsv(path: str | Path) -> dict[str, str]:
    """`id<TAB>text` lines; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a spreadsheet's export starts with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantkitError(f"cannot read text file {path}: {exc}") from None
    rows: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        uid, sep, text = line.partition("\t")
        if not sep or not uid.strip():
            raise QuantkitError(f"{path}:{n}: expected 'id<TAB>text'")
        uid = uid.strip()
        if not plain_name(uid):
            raise QuantkitError(f"{path}:{n}: id {uid!r} must be a plain file name "
                                "(no '/', no leading '.'): it names the utterance's audio file")
        if uid in rows:
            raise QuantkitError(f"{path}:{n}: duplicate id '{uid}'")
        if not text.strip():
            raise QuantkitError(f"{path}:{n}: the text of '{uid}' is empty")
        rows[uid] = text.strip()
    if not rows:
        raise QuantkitError(f"{path} holds no utterances")
    return rows


def guess_language(texts: list[str]) -> str:
    cjk = sum(1 for t in texts for ch in t if "\u4e00" <= ch <= "\u9fff")
    return "zh" if cjk > sum(len(t) for t in texts) / 4 else "en"


def load_texts(spec: str) -> tuple[str, dict[str, str]]:
    """(language, {id: text}) for `en`, `zh` or a TSV path (language guessed from its script)."""
    if spec in SHIPPED:
        return spec, read_tsv(SHIPPED[spec])
    if not Path(spec).is_file():
        raise QuantkitError(f"unknown text set '{spec}' (allowed: en, zh, or a TSV file of id<TAB>text)")
    rows = read_tsv(spec)
    return guess_language(list(rows.values())), rows
