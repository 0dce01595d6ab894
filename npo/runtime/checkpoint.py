"""Checkpoints: everything a rollback or a resume needs, written atomically and verified on load.

Layout of one checkpoint, `checkpoints/step_000040/`:

    model.safetensors, config.json, generation_config.json   the policy, loadable by AutoModelForCausalLM
    tokenizer files                                          loadable by AutoTokenizer
    trainer_state.pt   optimizer state, RNG states (python, numpy, torch), data cursor, step
    runner_state.json  runner bookkeeping (AutoNPO state, active segment, pending plans); used by --resume only
    guides.jsonl       the guides the active NPO segment reads (a resume needs them; the cache is not durable)
    meta.json          step, sha256 of every file above, the resolved run config, when it was saved

It is written to a temporary sibling folder, fsynced, then renamed into place: a crash leaves either the whole
checkpoint or none. Loading verifies every checksum and refuses a corrupted checkpoint with a clear error.

A resume starts from the newest valid checkpoint by save time, not by step: after a rollback the checkpoints of
higher steps belong to an abandoned line (a scout, a rolled-back future), while the one saved last holds the state
the run was in. A corrupted one is set aside (renamed `step_000040.corrupt`, kept for inspection) and the previous
one is tried (`newest_valid`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Global RNG states of python, numpy and torch (the runtime derives its sampling seeds from step; these are
    saved so that any user code relying on global RNGs also rolls back exactly)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.random.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])


@dataclass
class Checkpoint:
    """A loaded checkpoint (weights are loaded separately from `path` by the learner)."""

    step: int
    path: Path
    trainer_state: dict[str, Any]
    runner_state: dict[str, Any]
    guides_jsonl: list[str]
    meta: dict[str, Any]


class CheckpointManager:
    """Save, list, load and prune the checkpoints of one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def steps(self) -> list[int]:
        """Steps of complete checkpoints, ascending (temporary folders of interrupted writes are ignored)."""
        out = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and (p / "meta.json").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        write_model: Callable[[Path], None],
        trainer_state: dict[str, Any],
        runner_state: dict[str, Any] | None = None,
        guides_jsonl: Iterable[str] = (),
        config: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically; an existing checkpoint of that step is replaced.

        Args:
            write_model: writes the HF model + tokenizer folder into the given directory.
            trainer_state: optimizer state, RNG states, data cursor (torch-serialisable, tensors allowed).
        """
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        final = self.path(step)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.root))
        try:
            write_model(tmp)
            torch.save({**trainer_state, "step": step}, tmp / "trainer_state.pt")
            (tmp / "runner_state.json").write_text(json.dumps(runner_state or {}, sort_keys=True))
            (tmp / "guides.jsonl").write_text("".join(line.rstrip("\n") + "\n" for line in guides_jsonl))
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            meta = {
                "step": step,
                "sha256": {f: _sha256(tmp / f) for f in files},
                "config": config or {},
                "saved_unix_ns": time.time_ns(),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            for p in tmp.iterdir():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def verify(self, step: int) -> dict[str, Any]:
        """Check every file's checksum; returns meta. Raises CheckpointError naming the bad file."""
        path = self.path(step)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise CheckpointError(f"no checkpoint at step {step} in {self.root} (have: {self.steps()})")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{meta_path}: unreadable ({exc})") from None
        for name, digest in meta["sha256"].items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint {path}: file {name} is missing")
            if _sha256(f) != digest:
                raise CheckpointError(f"checkpoint {path}: file {name} is corrupted (checksum mismatch)")
        return meta

    def load(self, step: int) -> Checkpoint:
        meta = self.verify(step)
        path = self.path(step)
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
        runner_state = json.loads((path / "runner_state.json").read_text())
        guides = [line for line in (path / "guides.jsonl").read_text().splitlines() if line.strip()]
        return Checkpoint(step, path, trainer_state, runner_state, guides, meta)

    def saved_ns(self, step: int) -> int:
        """When checkpoint `step` was saved (ns since the epoch): meta.json's `saved_unix_ns`, else its mtime."""
        meta_path = self.path(step) / "meta.json"
        try:
            return int(json.loads(meta_path.read_text())["saved_unix_ns"])
        except (OSError, ValueError, KeyError, TypeError):
            return meta_path.stat().st_mtime_ns if meta_path.exists() else 0

    def newest_first(self) -> list[int]:
        """Steps of complete checkpoints, the one saved last first (ties: the higher step first)."""
        return sorted(self.steps(), key=lambda s: (self.saved_ns(s), s), reverse=True)

    def set_aside(self, step: int) -> Path:
        """Rename corrupted checkpoint `step` to `step_NNNNNN.corrupt` (`.corrupt.1`, ... when taken) so that it is
        no longer listed; returns its new folder."""
        path = self.path(step)
        target, n = path.with_name(f"{path.name}.corrupt"), 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt.{n}")
        path.rename(target)
        return target

    def newest_valid(self, warn: Callable[[str], None]) -> Checkpoint | None:
        """Load the checkpoint saved last that verifies; each corrupted one before it is set aside with a warning
        naming it. None when there is no checkpoint at all; CheckpointError when none of them is valid."""
        problems = []
        for step in self.newest_first():
            try:
                return self.load(step)
            except CheckpointError as exc:
                moved = self.set_aside(step)
                problems.append(str(exc))
                warn(f"warning: checkpoint {self.path(step)} is unusable ({exc}); set aside as {moved.name}")
        if not problems:
            return None
        raise CheckpointError(
            f"no valid checkpoint left in {self.root} ({'; '.join(problems)}); "
            "hint: start a new run, or restore a checkpoint folder (step_NNNNNN) from a backup"
        )

    def prune(self, keep_last: int, protected: Iterable[int] = ()) -> list[int]:
        """Delete all but the newest `keep_last` checkpoints, never one in `protected`; returns deleted steps."""
        if keep_last <= 0:
            return []
        steps = self.steps()
        keep = set(steps[-keep_last:]) | set(protected)
        deleted = []
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.path(s), ignore_errors=True)
                deleted.append(s)
        return deleted
