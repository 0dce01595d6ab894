"""Durable intervention records and controller state, in SQLite (WAL, one transaction per write).

A committed write survives a SIGKILL of the controller (WAL with synchronous=FULL); an uncommitted one is never
half-visible (each write is one transaction, rolled back on any error). Starting an intervention checks and inserts
in one IMMEDIATE transaction, so two concurrent starts (threads, or processes on the same file) cannot both win.
Values are stored as JSON; non-finite floats (NaN, inf) are stored as null, since JSON has no such numbers and a
missing reading is never 0.

    records = InterventionRecords("runs/svc/controller/controller.db")
    iv = records.start("rollback", {"step": 20})          # errors.Busy when one is running
    records.add_command(iv.id, "Learner.Rollback", {"to_step": 20}, 20)
    records.finish(iv.id, "succeeded", outcome={"step": 20})
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.controller.errors import Busy, Conflict, NotFound

KINDS = ("autonpo", "early_bootstrap", "plateau_breakthrough", "rollback")
"""Intervention kinds."""
STATES = ("running", "succeeded", "failed", "abandoned")
"""Intervention states; every state but running is final."""
_JSON_FIELDS = ("request", "readings", "candidates", "choice", "commands", "outcome")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS interventions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    updated_unix_ms INTEGER NOT NULL,
    request TEXT NOT NULL,
    readings TEXT NOT NULL,
    candidates TEXT NOT NULL,
    choice TEXT NOT NULL,
    commands TEXT NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


def finite(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    """JSON text of `value` (non-finite floats as null; other non-JSON objects as their str)."""
    return json.dumps(finite(value), default=str, allow_nan=False)


@dataclass
class Intervention:
    """One intervention and everything it did."""

    id: str
    """iv-000001, increasing."""
    kind: str
    """autonpo | early_bootstrap | plateau_breakthrough | rollback"""
    state: str
    """running | succeeded | failed | abandoned"""
    created_unix_ms: int
    """When it was started (Unix time, ms)."""
    updated_unix_ms: int
    """When its record last changed (Unix time, ms)."""
    request: dict = field(default_factory=dict)
    """What was asked (the API body, or the trigger for AutoNPO)."""
    readings: dict = field(default_factory=dict)
    """Metrics when it started (AutoNPO: the trigger's EMAs)."""
    candidates: list = field(default_factory=list)
    """AutoNPO: every scored Delta with q_hat, v_hat, s_hat."""
    choice: dict = field(default_factory=dict)
    """What was chosen (Delta*, the plan)."""
    commands: list = field(default_factory=list)
    """Commands sent, in order: {at_unix_ms, call, args, result}."""
    outcome: dict = field(default_factory=dict)
    """How it ended."""
    error: str = ""
    """Why it failed or was abandoned."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (what the REST API answers)."""
        return asdict(self)


class InterventionRecords:
    """The records of one controller in the SQLite file at `path` (created with its folder)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database connection (committed writes are already on disk)."""
        with self._lock:
            self._db.close()

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _tx(self, fn):
        """Run fn(cursor) in one IMMEDIATE transaction (committed, or rolled back on an exception)."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                result = fn(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return result

    @staticmethod
    def _row(row: tuple | None) -> Intervention | None:
        if row is None:
            return None
        _, id_, kind, state, created, updated, *rest = row
        values = dict(zip(_JSON_FIELDS, (json.loads(v) for v in rest[: len(_JSON_FIELDS)]), strict=True))
        return Intervention(id_, kind, state, created, updated, **values, error=rest[-1])

    def _get(self, cur: sqlite3.Cursor, intervention_id: str) -> Intervention:
        found = self._row(cur.execute("SELECT * FROM interventions WHERE id = ?", (intervention_id,)).fetchone())
        if found is None:
            raise NotFound(f"no intervention {intervention_id!r}")
        return found

    # -- interventions ---------------------------------------------------------------------------------------------

    def start(self, kind: str, request: dict[str, Any]) -> Intervention:
        """Record a new running intervention; errors.Busy when one is running already."""
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")

        def insert(cur: sqlite3.Cursor) -> Intervention:
            running = cur.execute("SELECT id FROM interventions WHERE state = 'running' LIMIT 1").fetchone()
            if running:
                raise Busy(running[0])
            seq = (cur.execute("SELECT COALESCE(MAX(seq), 0) FROM interventions").fetchone()[0]) + 1
            now = _now_ms()
            iv = Intervention(f"iv-{seq:06d}", kind, "running", now, now, request=finite(dict(request)))
            cur.execute(
                "INSERT INTO interventions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, iv.id, kind, "running", now, now, *(_dumps(getattr(iv, f)) for f in _JSON_FIELDS), ""),
            )
            return iv

        return self._tx(insert)

    def update(self, intervention_id: str, **fields: Any) -> Intervention:
        """Replace some of readings, candidates, choice, outcome, error; NotFound for an unknown id."""
        allowed = {"readings", "candidates", "choice", "outcome", "error"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"fields: cannot update {sorted(unknown)} (only {sorted(allowed)})")

        def write(cur: sqlite3.Cursor) -> Intervention:
            iv = self._get(cur, intervention_id)
            for name, value in fields.items():
                setattr(iv, name, finite(value))
            iv.updated_unix_ms = _now_ms()
            self._write(cur, iv)
            return iv

        return self._tx(write)

    def add_command(self, intervention_id: str, call: str, args: dict[str, Any], result: Any = None) -> None:
        """Append one command sent (with its result) to the intervention's log; NotFound for an unknown id."""

        def write(cur: sqlite3.Cursor) -> None:
            iv = self._get(cur, intervention_id)
            iv.commands.append(finite({"at_unix_ms": _now_ms(), "call": call, "args": args, "result": result}))
            iv.updated_unix_ms = _now_ms()
            self._write(cur, iv)

        self._tx(write)

    def finish(self, intervention_id: str, state: str, outcome: dict | None = None, error: str = "") -> Intervention:
        """End a running intervention in a final state (succeeded | failed | abandoned). NotFound for an unknown id;
        Conflict when it has ended already (a final state is never overwritten)."""
        if state not in STATES or state == "running":
            raise ValueError(f"state: expected one of {STATES[1:]}, got {state!r}")

        def write(cur: sqlite3.Cursor) -> Intervention:
            iv = self._get(cur, intervention_id)
            if iv.state != "running":
                raise Conflict(f"intervention {intervention_id} has ended already ({iv.state})")
            iv.state, iv.error, iv.updated_unix_ms = state, error, _now_ms()
            if outcome is not None:
                iv.outcome = finite(outcome)
            self._write(cur, iv)
            return iv

        return self._tx(write)

    @staticmethod
    def _write(cur: sqlite3.Cursor, iv: Intervention) -> None:
        cur.execute(
            "UPDATE interventions SET state=?, updated_unix_ms=?, request=?, readings=?, candidates=?, choice=?, "
            "commands=?, outcome=?, error=? WHERE id=?",
            (iv.state, iv.updated_unix_ms, *(_dumps(getattr(iv, f)) for f in _JSON_FIELDS),
             iv.error, iv.id),
        )  # fmt: skip

    def get(self, intervention_id: str) -> Intervention | None:
        """The intervention with this id, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM interventions WHERE id = ?", (intervention_id,)).fetchone()
        return self._row(row)

    def list(self, limit: int = 100, offset: int = 0, kind: str | None = None) -> list[Intervention]:
        """At most `limit` interventions (of `kind` when given), newest first, skipping the `offset` newest."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit, offset: must be >= 0, got {limit}, {offset}")
        query, args = "SELECT * FROM interventions", []
        if kind is not None:
            query, args = query + " WHERE kind = ?", [kind]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [self._row(r) for r in rows]

    def running(self) -> Intervention | None:
        """The running intervention (at most one), or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM interventions WHERE state = 'running' LIMIT 1").fetchone()
        return self._row(row)

    # -- controller state ------------------------------------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under `key` (cool-down, AutoNPO switch and overrides, trigger state), or default."""
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_state(self, key: str, value: Any) -> None:
        """Store the JSON value `value` under `key`, replacing any previous one, in one transaction."""
        self._tx(lambda cur: cur.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, _dumps(value))))
