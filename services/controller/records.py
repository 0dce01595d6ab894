"""Durable intervention records and controller state, in SQLite (WAL, one transaction per write).

A committed write survives a SIGKILL of the controller; an uncommitted one is never half-visible. Starting an
intervention checks and inserts in one IMMEDIATE transaction, so two concurrent starts cannot both win.

    records = InterventionRecords("runs/svc/controller/controller.db")
    iv = records.start("rollback", {"step": 20})          # errors.Busy when one is running
    records.add_command(iv.id, "Learner.Rollback", {"to_step": 20}, 20)
    records.finish(iv.id, "succeeded", outcome={"step": 20})
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.controller.errors import Busy, NotFound

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
    updated_unix_ms: int
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
            iv = Intervention(f"iv-{seq:06d}", kind, "running", now, now, request=dict(request))
            cur.execute(
                "INSERT INTO interventions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, iv.id, kind, "running", now, now, *(json.dumps(getattr(iv, f)) for f in _JSON_FIELDS), ""),
            )
            return iv

        return self._tx(insert)

    def update(self, intervention_id: str, **fields: Any) -> Intervention:
        """Replace some of readings, candidates, choice, outcome, error."""
        allowed = {"readings", "candidates", "choice", "outcome", "error"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"fields: cannot update {sorted(unknown)} (only {sorted(allowed)})")

        def write(cur: sqlite3.Cursor) -> Intervention:
            iv = self._get(cur, intervention_id)
            for name, value in fields.items():
                setattr(iv, name, value)
            iv.updated_unix_ms = _now_ms()
            self._write(cur, iv)
            return iv

        return self._tx(write)

    def add_command(self, intervention_id: str, call: str, args: dict[str, Any], result: Any = None) -> None:
        """Append one command sent (with its result) to the intervention's log."""

        def write(cur: sqlite3.Cursor) -> None:
            iv = self._get(cur, intervention_id)
            iv.commands.append({"at_unix_ms": _now_ms(), "call": call, "args": args, "result": result})
            iv.updated_unix_ms = _now_ms()
            self._write(cur, iv)

        self._tx(write)

    def finish(self, intervention_id: str, state: str, outcome: dict | None = None, error: str = "") -> Intervention:
        """End a running intervention in a final state."""
        if state not in STATES or state == "running":
            raise ValueError(f"state: expected one of {STATES[1:]}, got {state!r}")

        def write(cur: sqlite3.Cursor) -> Intervention:
            iv = self._get(cur, intervention_id)
            iv.state, iv.error, iv.updated_unix_ms = state, error, _now_ms()
            if outcome is not None:
                iv.outcome = outcome
            self._write(cur, iv)
            return iv

        return self._tx(write)

    @staticmethod
    def _write(cur: sqlite3.Cursor, iv: Intervention) -> None:
        cur.execute(
            "UPDATE interventions SET state=?, updated_unix_ms=?, request=?, readings=?, candidates=?, choice=?, "
            "commands=?, outcome=?, error=? WHERE id=?",
            (iv.state, iv.updated_unix_ms, *(json.dumps(getattr(iv, f), default=str) for f in _JSON_FIELDS),
             iv.error, iv.id),
        )  # fmt: skip

    def get(self, intervention_id: str) -> Intervention | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM interventions WHERE id = ?", (intervention_id,)).fetchone()
        return self._row(row)

    def list(self, limit: int = 100, offset: int = 0, kind: str | None = None) -> list[Intervention]:
        """Newest first."""
        query, args = "SELECT * FROM interventions", []
        if kind is not None:
            query, args = query + " WHERE kind = ?", [kind]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [self._row(r) for r in rows]

    def running(self) -> Intervention | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM interventions WHERE state = 'running' LIMIT 1").fetchone()
        return self._row(row)

    # -- controller state ------------------------------------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_state(self, key: str, value: Any) -> None:
        self._tx(lambda cur: cur.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, json.dumps(value))))
