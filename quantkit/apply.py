"""Apply a recipe to a loaded ChatTTS ``Chat``: precision, then quantization, then compilation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.utils.parametrize as P
from torch import nn

from quantkit import chattts
from quantkit.errors import QuantkitError
from quantkit.precision import cast_module, float_dtype
from quantkit.quantize import module_weight_bytes, quantize_module, unavailable
from quantkit.recipes import COMPONENTS, Recipe

if TYPE_CHECKING:
    from ChatTTS import Chat

log = logging.getLogger(__name__)


def component_module(chat: Chat, name: str) -> nn.Module:
    """The module a recipe's component table acts on (quantkit.chattts.components)."""
    return chattts.components(chat)[name]


def _fold_weight_norm(heads: nn.ModuleList) -> None:
    for head in heads:
        if P.is_parametrized(head, "weight"):
            P.remove_parametrizations(head, "weight", leave_parametrized=True)


@dataclass
class WeightBytes:
    total: int
    decode: int  # the weights one GPT step streams: transformer and code heads


def weight_bytes(chat: Chat) -> WeightBytes:
    groups = {role: sum(module_weight_bytes(m) for m in mods) for role, mods in chattts.weight_groups(chat).items()}
    # A step looks up one row of each code embedding (4 x 3 KB), it does not stream the tables.
    return WeightBytes(total=sum(groups.values()), decode=groups["gpt"] + groups["heads"])


def unrunnable(recipe: Recipe, device: torch.device) -> str | None:
    """Why ``recipe``'s quantization cannot run on ``device``, or None (nothing loaded to tell)."""
    for name in COMPONENTS:
        comp = recipe.component(name)
        reason = unavailable(comp.quantize, device, compiled=recipe.compile.enabled and name == "gpt")
        if reason:
            return (f"recipe '{recipe.name}': component {name} ({comp.dtype}, {comp.quantize}) "
                    f"cannot run on {device.type}: {reason}")
    return None


def check_runnable(recipe: Recipe, device: torch.device) -> None:
    """Refuse a recipe whose quantization cannot run on ``device`` (before anything loads)."""
    reason = unrunnable(recipe, device)
    if reason:
        raise QuantkitError(reason)


_APPLIED = "_quantkit_recipe"  # set by apply_recipe on the loaded GPT: a Chat loaded again has none


def apply_recipe(chat: Chat, recipe: Recipe, compile_step: bool = True,
                 preapplied: tuple[str, ...] = ()) -> None:
    """Modify ``chat`` in place as ``recipe`` says. A component the device cannot run raises
    QuantkitError naming the recipe, the component and the reason. ``compile_step=False`` keeps
    a compiled recipe's static-cache decoding but runs the step eagerly (fast tests).
    ``preapplied`` components already hold quantized weights (an exported variant)."""
    chattts.check_loaded(chat)
    earlier = getattr(chattts.gpt(chat), _APPLIED, None)
    if earlier is not None:  # a recipe assumes ChatTTS as loaded: casts and quantizers do not stack
        raise QuantkitError(f"this Chat already has recipe '{earlier}' applied: apply '{recipe.name}' "
                            "to a freshly loaded one (quantkit.load_chat)")
    if recipe.baseline:
        return
    device = torch.device(chat.device)
    check_runnable(recipe, device)
    setattr(chattts.gpt(chat), _APPLIED, recipe.name)
    for name in COMPONENTS:
        comp = recipe.component(name)
        module = component_module(chat, name)
        try:
            if name == "heads" and comp.weight_norm == "fold":
                _fold_weight_norm(module)
            targets = list(module) if isinstance(module, nn.ModuleList) else [module]
            for target in targets:
                cast_module(target, comp.dtype)
            if name not in preapplied:
                quantize_module(module, comp.quantize, device)
            chattts.rebind_heads(chat)
            if comp.dtype != "fp32" or comp.quantize != "none":
                chattts.probe(chat, name, float_dtype(chattts.gpt(chat)))
        except QuantkitError:
            raise
        except Exception as exc:  # noqa: BLE001 - kernels and backends fail in many ways
            reason = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
            raise QuantkitError(
                f"recipe '{recipe.name}': component {name} ({comp.dtype}, {comp.quantize}) cannot "
                f"run on {device.type}: {reason}") from None
        log.info("recipe %s: %s -> %s, %s", recipe.name, name, comp.dtype, comp.quantize)
    # Inference only; and a compiled graph's cache key depends on requires_grad, which must be
    # the same whether the weights were quantized here or loaded from an exported variant.
    # (After folding: a folded weight stays a Parameter only if its originals required grad.)
    for module in chattts.all_modules(chat):
        module.requires_grad_(False)
    if recipe.compile.enabled:
        from quantkit.compile import enable_compiled_decoding

        enable_compiled_decoding(chat, recipe.compile, compile_step=compile_step)


def component_dtype(chat: Chat, name: str) -> torch.dtype:
    return float_dtype(component_module(chat, name))

