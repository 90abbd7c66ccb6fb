"""quantkit: precision and quantization experiments for ChatTTS.

The user's verbs: ``load_chat`` (a ChatTTS ``Chat``), ``apply_recipe`` (modify it in place, as
torchao's ``quantize_``) and ``load_variant`` (a ready ``Chat`` from an exported variant).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ChatTTS import Chat
    from quantkit.recipes import Recipe

__version__ = "0.1.0"
__all__ = ["load_chat", "apply_recipe", "load_variant"]


def load_chat(model: str = "synthetic", device: str = "cpu") -> Chat:
    """A ChatTTS ``Chat`` loaded through ChatTTS's own loader: ``chattts`` (real weights),
    ``synthetic``, ``synthetic-tiny`` or a directory in ChatTTS's asset layout."""
    from quantkit.models import load_chat as _load

    return _load(model, device)


def apply_recipe(chat: Chat, recipe: "str | Path | Recipe") -> None:
    """Apply a recipe (a shipped name, a .toml path or a Recipe) to ``chat`` in place."""
    from quantkit.apply import apply_recipe as _apply
    from quantkit.recipes import Recipe, get_recipe

    _apply(chat, recipe if isinstance(recipe, Recipe) else get_recipe(str(recipe)))


def load_variant(path: str | Path, device: str = "cpu", trust_compiled: bool = False) -> Chat:
    """A ready ChatTTS ``Chat`` from a directory written by ``python -m quantkit export``. Its
    compiled code (which runs on load) loads only if this machine exported it or
    ``trust_compiled``; otherwise it compiles just in time."""
    from quantkit.export import load_variant as _load

    return _load(path, device=device, trust_compiled=trust_compiled)
