"""Which saved compiled code this machine trusts: variants and compile caches that quantkit
wrote here, recorded by the hash of their manifest in quantkit's cache.

Compiled artifacts (pickled functions, C++ kernel libraries) run code when loaded, so they load
only from a trusted folder or when the user says so (``trust_compiled``), as Hugging Face's
``trust_remote_code`` works; otherwise the weights load and compilation runs just in time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from quantkit.atomic import held, write_text

TRUSTED = "trusted_compiled.json"


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _store() -> Path:
    from quantkit.cache import cache_dir

    return cache_dir() / TRUSTED


def _trusted() -> set[str]:
    try:
        data = json.loads(_store().read_text())
    except (OSError, ValueError):
        return set()
    return {d for d in data if isinstance(d, str)} if isinstance(data, list) else set()


def record(manifest: Path) -> None:
    """Trust the compiled code that ``manifest`` (just written here) lists."""
    store = _store()
    store.parent.mkdir(parents=True, exist_ok=True)
    with held(store.with_name(store.name + ".lock")):  # two exports at once: neither drops the other's entry
        write_text(store, json.dumps(sorted(_trusted() | {digest(manifest)}), indent=0))


def is_trusted(manifest: Path) -> bool:
    return digest(manifest) in _trusted()
