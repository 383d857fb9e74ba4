"""The results store: SQLite (stdlib), one row per measurement, runs accumulating across machines
and versions. Every row is committed as soon as it is written, so an interrupted run keeps what it
measured; a run's status says whether it completed."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,            -- running | complete | interrupted | failed
    options TEXT NOT NULL,           -- JSON of the sweep options
    machine TEXT NOT NULL            -- JSON: cpu, cores, threads, gpu, torch, attnzoo, python, git commit
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    created REAL NOT NULL,
    method TEXT NOT NULL,            -- registry name
    spec TEXT NOT NULL,              -- name[:config as given by the user]
    family TEXT NOT NULL,
    config TEXT NOT NULL,            -- JSON of the config the method ran with
    causal INTEGER NOT NULL,
    pattern TEXT,                    -- CAB's: noncausal-self | causal-self | noncausal-cross | causal-cross
    pass TEXT NOT NULL,              -- forward | forward+backward
    batch INTEGER NOT NULL, heads_q INTEGER NOT NULL, heads_kv INTEGER NOT NULL,
    length INTEGER NOT NULL,         -- keys (the swept length)
    length_q INTEGER,                -- queries (= length for self-attention)
    dim INTEGER NOT NULL,
    dtype TEXT NOT NULL, device TEXT NOT NULL,
    status TEXT NOT NULL,            -- ok | error | oom | skipped
    message TEXT,
    backend TEXT,
    setup_ms REAL, median_ms REAL, min_ms REAL, times_ms TEXT, repeats INTEGER,
    peak_bytes INTEGER, density REAL, flops REAL, tflops REAL
);
CREATE TABLE IF NOT EXISTS quality (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    created REAL NOT NULL,
    method TEXT NOT NULL, spec TEXT NOT NULL, config TEXT NOT NULL,
    model TEXT NOT NULL,
    metric TEXT NOT NULL,            -- e.g. rel_error, mass_recall, perplexity, passkey_accuracy
    value REAL,
    status TEXT NOT NULL, message TEXT,
    detail TEXT                      -- JSON
);
CREATE TABLE IF NOT EXISTS heatmaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    model TEXT NOT NULL, layer INTEGER NOT NULL, head INTEGER NOT NULL,
    label TEXT NOT NULL,
    data TEXT NOT NULL               -- JSON 2-D list (a pooled attention map)
);
CREATE INDEX IF NOT EXISTS results_run ON results(run_id);
CREATE INDEX IF NOT EXISTS quality_run ON quality(run_id);
"""

# Columns added after the first stores were written: added to an older store on opening, and its
# rows (all self-attention then) filled in.
ADDED_COLUMNS = {
    "pattern": ("TEXT", "CASE WHEN causal THEN 'causal-self' ELSE 'noncausal-self' END"),
    "length_q": ("INTEGER", "length"),
}

RESULT_FIELDS = (
    "method", "spec", "family", "config", "pattern", "causal", "pass", "batch", "heads_q", "heads_kv", "length_q",
    "length", "dim",
    "dtype", "device", "status", "message", "backend", "setup_ms", "median_ms", "min_ms", "times_ms", "repeats",
    "peak_bytes", "density", "flops", "tflops",
)
QUALITY_FIELDS = ("method", "spec", "config", "model", "metric", "value", "status", "message", "detail")


class NotStoredError(LookupError):
    """A store file or a run that is not there."""


class Store:
    """A SQLite file of runs and their measurements."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30)
        self.conn.row_factory = sqlite3.Row
        with self.conn:
            self.conn.executescript(SCHEMA)
            have = {r["name"] for r in self.conn.execute("PRAGMA table_info(results)")}
            for column, (kind, fill) in ADDED_COLUMNS.items():
                if column not in have:
                    self.conn.execute(f"ALTER TABLE results ADD COLUMN {column} {kind}")
                    self.conn.execute(f"UPDATE results SET {column} = {fill}")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- writing (each call is its own committed transaction) --------------------------------
    def start_run(self, options: dict[str, Any], machine: dict[str, Any]) -> str:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        with self.conn:
            self.conn.execute("INSERT INTO runs (id, started, status, options, machine) VALUES (?, ?, 'running', ?, ?)",
                              (run_id, time.time(), json.dumps(options, default=str), json.dumps(machine, default=str)))
        return run_id

    def finish_run(self, run_id: str, status: str) -> None:
        with self.conn:
            self.conn.execute("UPDATE runs SET status = ?, finished = ? WHERE id = ?", (status, time.time(), run_id))

    def add_result(self, run_id: str, **row: Any) -> int:
        return self._insert("results", RESULT_FIELDS, run_id, row)

    def add_quality(self, run_id: str, **row: Any) -> int:
        return self._insert("quality", QUALITY_FIELDS, run_id, row)

    def add_heatmap(self, run_id: str, *, model: str, layer: int, head: int, label: str, data: list) -> None:
        with self.conn:
            self.conn.execute("INSERT INTO heatmaps (run_id, model, layer, head, label, data) VALUES (?, ?, ?, ?, ?, ?)",
                              (run_id, model, layer, head, label, json.dumps(data)))

    def _insert(self, table: str, fields: tuple[str, ...], run_id: str, row: dict[str, Any]) -> int:
        unknown = set(row) - set(fields)
        if unknown:
            raise KeyError(f"unknown {table} fields {sorted(unknown)}")
        values = [json.dumps(row[f]) if isinstance(row.get(f), (list, dict)) else row.get(f) for f in fields]
        with self.conn:
            cur = self.conn.execute(
                f"INSERT INTO {table} (run_id, created, {', '.join(fields)}) VALUES (?, ?, {', '.join('?' * len(fields))})",
                (run_id, time.time(), *values))
        return int(cur.lastrowid)

    # ---- reading -----------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM runs ORDER BY started").fetchall()
        return [_run_dict(r) for r in rows]

    def run(self, run_id: str | None = None) -> dict[str, Any]:
        """One run by id (a unique prefix is enough), or the latest run."""
        if run_id is None:
            row = self.conn.execute("SELECT * FROM runs ORDER BY started DESC LIMIT 1").fetchone()
            if row is None:
                raise NotStoredError(f"no runs in {self.path}")
            return _run_dict(row)
        rows = self.conn.execute("SELECT * FROM runs WHERE id LIKE ?", (run_id + "%",)).fetchall()
        if len(rows) != 1:
            known = ", ".join(r["id"] for r in self.runs()) or "none"
            raise NotStoredError(f"run {run_id!r} matches {len(rows)} runs in {self.path} (runs: {known})")
        return _run_dict(rows[0])

    def results(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM results WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        return [_decode(r, ("config", "times_ms")) for r in rows]

    def quality(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM quality WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        return [_decode(r, ("config", "detail")) for r in rows]

    def heatmaps(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM heatmaps WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        return [_decode(r, ("data",)) for r in rows]

    def export(self, run_id: str) -> dict[str, Any]:
        """Everything about one run as plain JSON-able data."""
        return {"run": self.run(run_id), "results": self.results(run_id), "quality": self.quality(run_id),
                "heatmaps": self.heatmaps(run_id)}

    def export_json(self, run_id: str, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.export(run_id), indent=1))
        return path


def _decode(row: sqlite3.Row, json_fields: tuple[str, ...]) -> dict[str, Any]:
    d = dict(row)
    for f in json_fields:
        if d.get(f) is not None:
            d[f] = json.loads(d[f])
    return d


def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
    return _decode(row, ("options", "machine"))
