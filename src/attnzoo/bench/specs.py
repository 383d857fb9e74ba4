"""Which methods a sweep runs and with what configuration at each length.

A method spec is ``name`` or ``name:key=value,key=value`` (values are Python literals, e.g.
``neighborhood:kernel_size=13`` or ``halo:block_size=(8,8)``). Spatial methods without a ``grid`` get a
near-square 2-D grid whose product is the length (``grid=1d`` / ``grid=3d`` ask for another rank).
Methods whose budget is one number the user did not set run at comparable density: the density
target of the block-selection methods' budget rule (``methods/dynamic/budget.py``: 0.15 at 4K
keys, falling as 1 / N), which hip, block_sparse and vertical_slash follow by default.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from ..methods.dynamic.budget import density_for
from ..registry import list_methods, method_class
from .patterns import NONCAUSAL_SELF, Pattern

# Defaults a sweep needs where a method's own default cannot run on the default grids (powers of two).
SWEEP_DEFAULTS: dict[str, dict[str, Any]] = {
    "maxvit_block": {"block_size": 8},
    "maxvit_grid": {"grid_size": 8},
    "biformer": {"n_win": 8},
}

GRID_RANKS = {"1d": 1, "2d": 2, "3d": 3}


@dataclass(frozen=True)
class MethodSpec:
    """A method name plus the config the user gave (``grid`` may be a rank name such as ``"2d"``)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        """Stable text identifying name + config (the label in tables and the store)."""
        return self.name if not self.config else f"{self.name}:{config_text(self.config)}"

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, MethodSpec) and self.key == other.key


def config_text(config: dict[str, Any]) -> str:
    return ",".join(f"{k}={_literal(v)}" for k, v in sorted(config.items()))


def _literal(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(_literal(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value) if not isinstance(value, str) else value


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _parse_value(text: str) -> Any:
    if "x" in text and all(p.isdigit() for p in text.split("x")):  # 128x128
        return tuple(int(p) for p in text.split("x"))
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def parse_method_spec(text: str) -> MethodSpec:
    """``"name:key=value,..."`` -> :class:`MethodSpec`; the name must be registered."""
    name, _, rest = text.partition(":")
    name = name.strip()
    method_class(name)  # raises UnknownNameError with suggestions
    config: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InvalidArgumentError("--method", "name:key=value,key=value", repr(text))
        config[key.strip()] = _parse_value(value.strip())
    return MethodSpec(name, config)


def default_specs() -> list[MethodSpec]:
    """Every registered method with its default config (dense first)."""
    names = [i.name for i in list_methods()]
    return [MethodSpec(n) for n in sorted(names, key=lambda n: (n != "dense", n))]


def near_square_grid(n: int, rank: int = 2) -> tuple[int, ...]:
    """Factor ``n`` into ``rank`` factors as equal as possible (row-major: largest last)."""
    if rank == 1:
        return (n,)
    target = round(n ** (1 / rank))
    first = min((d for d in range(1, n + 1) if n % d == 0 and d <= max(1, target)), key=lambda d: abs(d - target),
                default=1)
    return (first, *near_square_grid(n // first, rank - 1))


def keys_per_query(length: int, pattern: Pattern) -> int:
    """Keys a query attends to at the budget rule's density: the density target times the keys a
    query sees on average in ``pattern`` (all N; causal: N - (Nq - 1) / 2, bottom-right aligned)."""
    len_q = pattern.query_length(length)
    seen = length - (len_q - 1) / 2 if pattern.causal else length
    return max(1, round(density_for(length) * seen))


def _odd_at_most(x: float) -> int:
    k = max(1, int(x))
    return k if k % 2 else k - 1


def comparable_budget(name: str, config: dict[str, Any], length: int, pattern: Pattern) -> dict[str, Any]:
    """Options giving a method whose budget is one number (a window, a kernel) the budget rule's
    density at ``length``; empty for other methods and where ``config`` sets the budget."""
    keys = keys_per_query(length, pattern)
    if name == "sliding_window" and not {"window", "left", "right"} & set(config):
        return {"window": keys}
    if name == "streaming" and "window" not in config:
        return {"window": max(1, keys - int(config.get("sinks", 4)))}
    if name == "neighborhood" and "kernel_size" not in config and isinstance(config.get("grid"), tuple):
        grid = config["grid"]  # a k^rank box of keys, inside the grid
        return {"kernel_size": min(_odd_at_most(keys ** (1 / len(grid))), _odd_at_most(min(grid)))}
    return {}


def config_at(spec: MethodSpec, length: int, pattern: Pattern = NONCAUSAL_SELF) -> dict[str, Any]:
    """The config the method runs with at sequence ``length`` in ``pattern``: sweep defaults, the
    user's config, for spatial methods a grid of ``length - num_global`` tokens (near-square 2-D
    unless told otherwise), and the comparable budget (:func:`comparable_budget`)."""
    config = {**SWEEP_DEFAULTS.get(spec.name, {}), **spec.config}
    if method_class(spec.name).info.spatial:
        grid = config.get("grid", "2d")
        if isinstance(grid, str):
            if grid not in GRID_RANKS:
                raise InvalidArgumentError("grid", f"a tuple of ints or one of {sorted(GRID_RANKS)}", repr(grid))
            config["grid"] = near_square_grid(length - int(config.get("num_global", 0)), GRID_RANKS[grid])
    return {**config, **comparable_budget(spec.name, config, length, pattern)}


def config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)
