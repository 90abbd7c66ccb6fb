"""Recipe schema: what to do to each ChatTTS component, as data (recipes/*.toml).

A recipe names a precision and a quantization method per component and the compile
settings; the techniques live in precision.py, quantize.py and compile.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from quantkit.errors import QuantkitError
from quantkit.quantize import METHODS as QUANTIZE_METHODS


def _recipes_dir() -> Path:
    # A wheel carries the recipes in quantkit/_recipes; a source checkout keeps them in recipes/.
    packaged = Path(__file__).resolve().parent / "_recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


RECIPES_DIR = _recipes_dir()

COMPONENTS = ("gpt", "heads", "decoder", "vocos")
DTYPES = ("fp32", "fp16", "bf16")
METHODS = ("none", *QUANTIZE_METHODS)  # quantkit.quantize's registry
WEIGHT_NORM = ("fold", "keep")
# "auto": CUDA graphs ("reduce-overhead") on CUDA, where a decode step is hundreds of kernel
# launches; Inductor's default on CPU, where CUDA graphs do not apply.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
KV_CACHES = ("model", "bf16")  # the KV cache's dtype: the model's float dtype, or bf16


@dataclass(frozen=True)
class Component:
    dtype: str = "fp32"
    quantize: str = "none"
    # Only for heads: ChatTTS's code heads are weight-norm parametrized Linears. "fold" bakes
    # g * v / |v| into a plain weight once (same outputs, no per-step norm); quantizing needs it.
    weight_norm: str = "keep"


@dataclass(frozen=True)
class CompileSettings:
    enabled: bool = False
    mode: str = "auto"
    freezing: bool = False
    cache_capacity: int = 1024
    kv_cache: str = "model"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    # True: ChatTTS exactly as shipped, nothing applied (the baseline every figure is compared to).
    baseline: bool = False
    gpt: Component = Component()
    heads: Component = Component()
    decoder: Component = Component()
    vocos: Component = Component()
    compile: CompileSettings = CompileSettings()
    source: str = field(default="", compare=False)

    def component(self, name: str) -> Component:
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "description": self.description,
                               "baseline": self.baseline}
        for comp in COMPONENTS:
            out[comp] = {f.name: getattr(self.component(comp), f.name) for f in fields(Component)
                         if comp == "heads" or f.name != "weight_norm"}
        out["compile"] = {f.name: getattr(self.compile, f.name) for f in fields(CompileSettings)}
        return out


def _fail(where: str, message: str) -> QuantkitError:
    return QuantkitError(f"recipe {where}: {message}")


def _check_keys(where: str, table: dict, allowed: tuple[str, ...], section: str) -> None:
    for key in table:
        if key not in allowed:
            raise _fail(where, f"unknown key '{key}' in {section} (allowed: {', '.join(allowed)})")


def _choice(where: str, section: str, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _fail(where, f"{section}.{key} = {value!r} is not allowed (allowed: {', '.join(allowed)})")
    return value


def _component(where: str, name: str, table: Any) -> Component:
    if not isinstance(table, dict):
        raise _fail(where, f"[{name}] must be a table")
    allowed = ("dtype", "quantize", "weight_norm") if name == "heads" else ("dtype", "quantize")
    _check_keys(where, table, allowed, f"[{name}]")
    comp = Component(
        dtype=_choice(where, name, "dtype", table.get("dtype", "fp32"), DTYPES),
        quantize=_choice(where, name, "quantize", table.get("quantize", "none"), METHODS),
        weight_norm=_choice(where, name, "weight_norm", table.get("weight_norm", "keep"), WEIGHT_NORM),
    )
    if name == "heads" and comp.quantize != "none" and comp.weight_norm != "fold":
        raise _fail(where, "[heads] quantize needs weight_norm = 'fold' (a parametrized weight "
                           "cannot be replaced by a quantized one)")
    return comp


def _compile(where: str, table: Any) -> CompileSettings:
    if not isinstance(table, dict):
        raise _fail(where, "[compile] must be a table")
    _check_keys(where, table, tuple(f.name for f in fields(CompileSettings)), "[compile]")
    enabled, freezing = table.get("enabled", False), table.get("freezing", False)
    capacity = table.get("cache_capacity", 1024)
    for key, value in (("enabled", enabled), ("freezing", freezing)):
        if not isinstance(value, bool):
            raise _fail(where, f"compile.{key} must be true or false, not {value!r}")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or not 16 <= capacity <= 8192:
        raise _fail(where, f"compile.cache_capacity must be an integer in 16..8192, not {capacity!r}")
    mode = _choice(where, "compile", "mode", table.get("mode", "auto"), COMPILE_MODES)
    kv_cache = _choice(where, "compile", "kv_cache", table.get("kv_cache", "model"), KV_CACHES)
    return CompileSettings(enabled=enabled, mode=mode, freezing=freezing, cache_capacity=capacity,
                           kv_cache=kv_cache)


def parse_recipe(name: str, data: dict[str, Any], where: str | None = None) -> Recipe:
    where = where or name
    _check_keys(where, data, ("description", "baseline", *COMPONENTS, "compile"), "the top level")
    baseline = data.get("baseline", False)
    if not isinstance(baseline, bool):
        raise _fail(where, f"baseline must be true or false, not {baseline!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(where, "description must be a string")
    comps = {c: _component(where, c, data.get(c, {})) for c in COMPONENTS}
    settings = _compile(where, data.get("compile", {}))
    if baseline and (any(c != Component() for c in comps.values()) or settings.enabled):
        raise _fail(where, "a baseline recipe applies nothing: remove its component and compile tables")
    return Recipe(name=name, description=description, baseline=baseline, compile=settings,
                  source=where, **comps)


def load_recipe_file(path: Path) -> Recipe:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _fail(str(path), "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(str(path), f"not valid TOML ({exc})") from None
    except OSError as exc:
        raise _fail(str(path), f"cannot be read ({exc.strerror})") from None
    return parse_recipe(path.stem, data, where=str(path))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def get_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a path to a .toml file."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise QuantkitError(f"recipe file {path} does not exist")
        return load_recipe_file(path)
    path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise QuantkitError(f"unknown recipe '{name_or_path}' (shipped: {', '.join(recipe_names())})")
    return load_recipe_file(path)


def all_recipes() -> list[Recipe]:
    return [get_recipe(n) for n in recipe_names()]
