"""Recipes: one YAML file describes a whole run (quantize -> validate -> eval -> serve smoke test).

Keys map 1:1 onto frozen config dataclasses (`QuantConfig` for the `quantize:` section); an unknown key,
a wrong type or a missing required field is a `RecipeError` naming the file, the line and the key, raised
before any model is loaded. Strings may use `${VAR}` / `${VAR:-default}` environment substitution.

    model: smollm2-135m                 # dir, embedded name, or hub id
    output: runs/smollm2-135m-awq       # checkpoint dir; reports go next to it
    quantize: {method: awq, group_size: 64, calib: c4, n_samples: 128, seqlen: 512}
    validate: {strict: false, deep: true}
    eval: {datasets: [wikitext2], seqlen: 2048, windows: 16, gates: {max_ppl_increase: 0.10}}
    serve_smoke: {prompts: ["What is the capital of France?"], max_tokens: 32, expect_contains: ["Paris"]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qserve.errors import ConfigError, RecipeError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class ValidateStage:
    enabled: bool = True
    strict: bool = False
    deep: bool = True


@dataclass(frozen=True)
class Gates:
    max_ppl_increase: float | None = None  # relative: 0.10 = quantized ppl at most 10% above original
    max_ppl: float | None = None  # absolute ceiling on the quantized ppl
    # Relative: 0.05 = quantized ppl at least 5% below round-to-nearest's on the same grid (bits, group
    # size, zero points) and the same windows. The RTN checkpoint is made and scored in the same run, so a
    # calibration that silently degrades to rounding fails however loose max_ppl_increase is.
    min_gain_over_rtn: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_ppl_increase", "max_ppl", "min_gain_over_rtn"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"gate {name}={v}: expected a positive number")


@dataclass(frozen=True)
class EvalStage:
    enabled: bool = True
    datasets: tuple[str, ...] = ("wikitext2",)
    seqlen: int = 2048
    windows: int | None = 16
    batch_size: int = 1
    gates: Gates = field(default_factory=Gates)

    def __post_init__(self) -> None:
        if self.seqlen < 2 or (self.windows is not None and self.windows < 1) or self.batch_size < 1:
            raise ConfigError(
                "eval: seqlen >= 2, windows >= 1 (or null for all) and batch_size >= 1 are required"
            )
        if not self.datasets:
            raise ConfigError("eval: datasets must name at least one dataset")


@dataclass(frozen=True)
class SmokeStage:
    enabled: bool = True
    prompts: tuple[str, ...] = ("What is the capital of France?",)
    chat: bool = True  # apply the model's chat template
    max_tokens: int = 32
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    expect_nonempty: bool = True
    expect_contains: tuple[str, ...] = ()  # each answer must contain these (case-insensitive)
    max_model_len: int | None = None  # None: the engine's default (the model's own limit)
    tensor_parallel_size: int = 1  # ranks the smoke test's engine splits the model over

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.temperature < 0 or not self.prompts:
            raise ConfigError("serve_smoke: needs prompts, max_tokens >= 1 and temperature >= 0")
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"serve_smoke: tensor_parallel_size: expected an integer >= 1, found {tp!r}")


@dataclass(frozen=True)
class Recipe:
    path: Path
    model: str
    output: str
    quantize: dict[str, Any]  # QuantConfig fields (model/output come from the top level)
    validate: ValidateStage
    eval: EvalStage
    serve_smoke: SmokeStage

    def quant_config(self, **overrides):
        from qserve.quantize.config import QuantConfig

        return QuantConfig.from_dict(
            {**self.quantize, "model": self.model, "output": self.output, **overrides}
        )


_SECTIONS = {"validate": ValidateStage, "eval": EvalStage, "serve_smoke": SmokeStage}
_TOP_KEYS = ("model", "output", "quantize", "validate", "eval", "serve_smoke")


def _lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Map each dotted key path of a YAML mapping to its 1-based line number."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            out[path] = key_node.start_mark.line + 1
            _lines(value_node, path + ".", out)
    return out


def _substitute(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise RecipeError(
                f"{where}: environment variable ${{{name}}} is not set (use ${{{name}:-default}})"
            )

        return _ENV.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, f"{where}.{k}") for k, v in value.items()}
    return value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {key}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set a.b=value` items; values are parsed as YAML scalars (8 -> int, true -> bool, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set quantize.n_samples=16")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Parse and check a recipe file (plus `--set` overrides) without touching any model."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror}).{_existing_recipes(path)}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with keys {', '.join(_TOP_KEYS)}")
    lines = _lines(node)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
        lines.setdefault(key, 0)

    def where(key: str) -> str:
        line = lines.get(key)
        return (
            f"{path}:{line}" if line else f"{path} (--set {key})" if key in (overrides or {}) else str(path)
        )

    data = {k: _substitute(v, where(k)) for k, v in data.items()}
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise RecipeError(
            f"{where(unknown[0])}: unknown key {unknown[0]!r}; a recipe has {', '.join(_TOP_KEYS)}"
        )
    for req in ("model", "output"):
        if not isinstance(data.get(req), str) or not data[req]:
            raise RecipeError(
                f"{where(req) if req in data else path}: required key {req!r} (a string) is missing"
            )
    quantize = data.get("quantize") or {}
    if not isinstance(quantize, dict) or "method" not in quantize:
        raise RecipeError(
            f"{where('quantize') if 'quantize' in data else path}: 'quantize' needs at least 'method'"
        )
    for k in ("model", "output"):
        if k in quantize:
            raise RecipeError(f"{where('quantize.' + k)}: {k!r} belongs at the top level, not under quantize")
    sections = {name: _build(cls, data.get(name), name, where) for name, cls in _SECTIONS.items()}
    recipe = Recipe(path=path, model=data["model"], output=data["output"], quantize=quantize, **sections)
    try:  # check the quantize section now: unknown keys and types, before any model is loaded
        recipe.quant_config()
    except (RecipeError, ConfigError) as exc:
        key = _key_in_message(str(exc), quantize)
        raise RecipeError(
            f"{where('quantize.' + key) if key else where('quantize')}: quantize: {exc}"
        ) from None
    return recipe


def _existing_recipes(path: Path) -> str:
    """` Recipes that exist: ...` from the missing file's folder and the repository's recipes/ folder."""
    folders = [path.parent, Path(__file__).resolve().parents[1] / "recipes"]
    found: list[str] = []
    seen: set[Path] = set()
    for folder in folders:
        if not folder.is_dir() or folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        found += [
            os.path.relpath(p) if not os.path.relpath(p).startswith("..") else str(p)
            for p in sorted(folder.glob("*.y*ml"))
        ]
    return f" Recipes that exist: {', '.join(found)}." if found else ""


def _key_in_message(msg: str, section: dict) -> str | None:
    for key in sorted(section, key=len, reverse=True):
        if f"'{key}'" in msg or f"{key}=" in msg:
            return key
    return None


def _build(cls, raw, name: str, where):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise RecipeError(f"{where(name)}: {name!r} must be a mapping, found {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            raise RecipeError(
                f"{where(dotted)}: unknown key {key!r} in {name}; valid keys: {', '.join(fields)}"
            )
        if key == "gates":
            value = _build(Gates, value, dotted, where)
        else:
            value = _coerce(value, fields[key], dotted, where)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise RecipeError(f"{where(name)}: {exc}") from None


def _coerce(value, f: dataclasses.Field, dotted: str, where):
    """Check a YAML value against the field's default/annotation; lists become tuples."""
    ann = str(f.type)
    expect = "tuple" if ann.startswith("tuple") else ann.split(" |")[0]
    optional = "None" in ann
    if value is None and optional:
        return None
    if expect == "float" and isinstance(value, str):
        # YAML 1.1 reads `1e-9` (no dot) as a string; accept any spelling float() accepts.
        with contextlib.suppress(ValueError):
            value = float(value)
    checks = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "tuple": lambda v: (
            isinstance(v, (list, str)) and all(isinstance(x, str) for x in ([v] if isinstance(v, str) else v))
        ),
    }
    if not checks.get(expect, lambda v: True)(value):
        want = "a list of strings" if expect == "tuple" else expect + (" or null" if optional else "")
        raise RecipeError(
            f"{where(dotted)}: key {dotted!r} expects {want}, found {type(value).__name__} {value!r}"
        )
    if expect == "tuple":
        return (value,) if isinstance(value, str) else tuple(value)
    if expect == "float":
        return float(value)
    return value
