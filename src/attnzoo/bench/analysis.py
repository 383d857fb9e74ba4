"""Numbers derived from stored measurements: speed-up over dense measured in the same run, sparse
efficiency (dense time x density / method time; 1.0 is ideal), efficiency length (CAB: the shortest
length from which the method stays faster than dense), the growth exponent of peak memory, and the
compatibility matrix (which method runs which of CAB's patterns, and its efficiency length there)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from .patterns import BY_NAME

PATTERN_NAMES = tuple(BY_NAME)

SHAPE_KEY = ("pattern", "causal", "pass", "batch", "heads_q", "heads_kv", "length_q", "length", "dim", "dtype", "device")
CURVE_KEY = ("spec", "pattern", "causal", "pass", "batch", "heads_q", "heads_kv", "dim", "dtype", "device")


def _key(row: dict[str, Any], fields: tuple[str, ...]) -> tuple:
    return tuple(row[f] for f in fields)


def with_dense(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy of the rows with ``dense_ms``, ``speedup`` and ``sparse_efficiency`` where dense ran at that shape."""
    dense = {_key(r, SHAPE_KEY): r["median_ms"] for r in results if r["method"] == "dense" and r["status"] == "ok"}
    out = []
    for r in results:
        r = dict(r)
        base = dense.get(_key(r, SHAPE_KEY))
        ok = r["status"] == "ok" and base is not None
        r["dense_ms"] = base
        r["speedup"] = base / r["median_ms"] if ok else None
        r["sparse_efficiency"] = base * r["density"] / r["median_ms"] if ok and r["density"] is not None else None
        out.append(r)
    return out


def curves(results: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped per method spec and setting (everything but the length), sorted by length."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[_key(r, CURVE_KEY)].append(r)
    return {k: sorted(v, key=lambda r: r["length"]) for k, v in groups.items()}


def efficiency_length(curve: list[dict[str, Any]]) -> int | None:
    """Shortest measured length from which the method is faster than dense at every longer measured
    length where both ran; None if it is not faster at the longest such length."""
    compared = [r for r in curve if r.get("speedup") is not None]
    found = None
    for r in reversed(compared):
        if r["speedup"] <= 1.0:
            break
        found = r["length"]
    return found


def growth_exponent(curve: list[dict[str, Any]], field: str) -> float | None:
    """Least-squares slope of log(field) against log(length): 1 is linear, 2 quadratic."""
    points = [(math.log(r["length"]), math.log(r[field])) for r in curve
              if r["status"] == "ok" and r.get(field) not in (None, 0)]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method spec and setting: efficiency length, speed-up and sparse efficiency at the
    longest length where dense also ran, growth exponents of time and peak memory."""
    rows = []
    for curve in curves(with_dense(results)).values():
        first = curve[0]
        compared = [r for r in curve if r.get("speedup") is not None]
        last = compared[-1] if compared else None
        ok = [r for r in curve if r["status"] == "ok"]
        rows.append({
            "spec": first["spec"], "method": first["method"], "family": first["family"], "pattern": first["pattern"],
            "causal": first["causal"],
            "pass": first["pass"], "dtype": first["dtype"], "device": first["device"],
            "lengths": [r["length"] for r in ok], "failed": [(r["length"], r["status"]) for r in curve if r["status"] != "ok"],
            "efficiency_length": efficiency_length(curve),
            "at_length": last["length"] if last else None,
            "speedup": last["speedup"] if last else None,
            "sparse_efficiency": last["sparse_efficiency"] if last else None,
            "density": last["density"] if last else None,
            "time_exponent": growth_exponent(curve, "median_ms"),
            "memory_exponent": growth_exponent(curve, "peak_bytes"),
            "max_peak_bytes": max((r["peak_bytes"] for r in ok if r.get("peak_bytes") is not None), default=None),
        })
    return sorted(rows, key=lambda r: (r["method"] != "dense", r["family"], r["spec"], pattern_order(r["pattern"]), r["pass"]))


def pattern_order(name: str) -> int:
    return PATTERN_NAMES.index(name) if name in PATTERN_NAMES else len(PATTERN_NAMES)


def compatibility(results: list[dict[str, Any]], declared: dict[str, dict[str, bool]]) -> list[dict[str, Any]]:
    """One row per method spec of the run: for each of CAB's patterns, whether the method declares it
    (``declared[method][pattern]``; None when the method is unknown) and, from its forward rows, the
    efficiency length, the speed-up at the longest length and the last failure, if it never ran."""
    forward = [s for s in summary(results) if s["pass"] == "forward"]
    rows = []
    for spec in dict.fromkeys(s["spec"] for s in summary(results)):
        method = next(r["method"] for r in results if r["spec"] == spec)
        cells = {}
        for pattern in PATTERN_NAMES:
            measured = [s for s in forward if s["spec"] == spec and s["pattern"] == pattern]
            tried = [r for r in results if r["spec"] == spec and r["pattern"] == pattern and r["pass"] == "forward"]
            ok = [s for s in measured if s["lengths"]]
            cells[pattern] = {
                "declared": declared.get(method, {}).get(pattern),
                "measured": bool(ok),
                "efficiency_length": ok[0]["efficiency_length"] if ok else None,
                "speedup": ok[0]["speedup"] if ok else None,
                "at_length": ok[0]["at_length"] if ok else None,
                "failure": None if ok or not tried else f"{tried[-1]['status']}: {tried[-1]['message'] or ''}",
            }
        rows.append({"spec": spec, "method": method, "cells": cells})
    return rows


def compare_runs(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measurements present in both runs at the same spec and shape: time and memory ratios (B / A) and
    status changes; rows in only one run are listed with the other side None."""
    key = ("spec",) + SHAPE_KEY
    index_a = {_key(r, key): r for r in a}
    index_b = {_key(r, key): r for r in b}
    out = []
    for k in sorted(set(index_a) | set(index_b), key=lambda k: tuple(str(x) for x in k)):
        ra, rb = index_a.get(k), index_b.get(k)
        both_ok = ra is not None and rb is not None and ra["status"] == rb["status"] == "ok"
        out.append({
            **dict(zip(key, k)),
            "status_a": ra["status"] if ra else None, "status_b": rb["status"] if rb else None,
            "ms_a": ra["median_ms"] if ra else None, "ms_b": rb["median_ms"] if rb else None,
            "time_ratio": rb["median_ms"] / ra["median_ms"] if both_ok else None,
            "peak_a": ra["peak_bytes"] if ra else None, "peak_b": rb["peak_bytes"] if rb else None,
            "memory_ratio": rb["peak_bytes"] / ra["peak_bytes"] if both_ok and ra["peak_bytes"] and rb["peak_bytes"] is not None else None,
        })
    return out
