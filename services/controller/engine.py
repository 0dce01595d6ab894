"""The AutoNPO controller: turns the method's decisions into commands to the learner, the rollout replicas and the
guidance cache (docs/architecture.md, control path).

A background loop reads the run's reward and entropy (services/controller/metrics.py) and feeds the AutoNPO
trigger (npo.core.autonpo) with every new step. When the trigger asks for a probe (and no intervention runs), the
controller pauses the learner (which checkpoints step t), loads pi^(t) into the rollout replicas, samples the probe
on the mistake pool, scores it under each candidate checkpoint pi^(t - Delta), chooses Delta* by S_hat, writes the
probe's verified-correct responses to the cache as guides of step t, rolls the learner back to t - Delta*, runs
the NPO segment with guide step t, then continues the main line to where it was going; then cool-down. The probe
itself is npo.runtime.probe, the one the embedded runner runs, here with the services' clients as its ports.

Manual interventions (early bootstrap, plateau breakthrough, plain rollback) run the same way in a worker thread,
one intervention at a time (records.start refuses a second with errors.Busy). Every intervention is recorded
durably (services/controller/records.py): the trigger readings, the candidates with Q_hat/V_hat/S_hat, the choice,
where the learner was paused (`Controller.Paused`: its step and the end of the segment it ran), each command sent
with its result, and the outcome. The trigger's state, the cool-down and the AutoNPO switch are saved after every
change, so a restarted controller continues with its history.

The learner unreachable (restarting, network): `status()` answers with `learner: {reachable: false, error}` instead
of failing, the metrics loop skips the learner until it answers again, and a REST request that needs the learner
is 503. An intervention in flight retries its idempotent learner calls (Status, Pause, Resume, Rollback,
SaveCheckpoint, ListCheckpoints) for up to `learner_retry_s`, then fails with the reason. RunSegment is not
retried (a lost answer may have started a segment): it fails the intervention. A segment waited for must end at its
end step in the same segment; a learner that restarted meanwhile (another segment id, another step) fails the
intervention with both steps named, and the main line is left to `npo train --connect`.

A controller restarted while an intervention was running (SIGKILL, OOM) applies this rule, so that the run ends as
an uninterrupted one would wherever the learner still holds what the intervention commanded:
- its last recorded command is a Learner.RunSegment the learner accepted, and the learner still runs that segment or
  finished it without starting another (same segment id, idle at its end step): the controller re-attaches. It
  waits for the segment and sends the intervention's remaining commands, as the dead controller would have (after
  a scout or lookahead segment: checkpoint, guides, roll back, NPO replay, continue the main line; after an NPO
  replay: continue the main line). The record gets a `Controller.Reattach` command and ends as usual. When that
  segment was the main-line continuation (the intervention's last command) it is marked succeeded.
- anything else is abandoned: its remaining commands never reached the learner (the controller died between two
  commands, during the probe or guide sampling, or the learner has moved on); a learner left paused by it is
  resumed and `npo train --connect` continues the main line. The record says which command came last.

The learner's own run config should not run AutoNPO itself (`npo up` starts it with method=grpo when the
controller runs AutoNPO). Checkpoint retention (`checkpoint.keep_last`) must keep the steps interventions need.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from npo.core.autonpo import AutoNPO
from npo.core.config import AutoNPOConfig, from_dict, to_dict
from npo.core.gate import guide_lists, select_guides
from npo.core.interventions import early_bootstrap_plan, plateau_breakthrough_plan
from npo.core.seeds import derive_seed
from npo.core.types import Problem, Sample
from npo.runtime.probe import ProbePorts, run_probe
from npo.runtime.run_config import RunConfig
from npo.runtime.runner import PromptSampler
from services.controller.errors import Busy, Conflict, NotFound
from services.controller.metrics import Reading

log = logging.getLogger(__name__)

AUTONPO_STATE_KEY = "autonpo"
"""records' state key of the AutoNPO switch, its overrides, the trigger's state and the last step observed."""
REATTACHED_LABELS = ("scout", "lookahead", "npo_replay", "autonpo_replay")
"""Segments of an intervention a restarted controller re-attaches to (see the module docstring)."""
UNREACHABLE = (ConnectionError, TimeoutError)
"""What a learner call raises when the learner does not answer."""


def wait_for_learner(learner: Any, timeout_s: float, poll_s: float = 1.0) -> Any:
    """The learner's status once it answers (retrying for up to `timeout_s`); ConnectionError after that."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return learner.status()
        except UNREACHABLE as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"the learner stayed unreachable for {timeout_s:g} s: {exc}") from None
            time.sleep(poll_s)


class Controller:
    """The controller of one run. `learner`, `rollout`, `cache` are the services' clients (LearnerClient,
    RolloutClient, GuidanceCacheClient); `source` reads the metrics; `records` is an InterventionRecords;
    `problems` the run's training problems and `encode` their prompt token ids (the policy's tokenizer).
    `learner_retry_s`: how long idempotent learner calls are retried while the learner does not answer."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        learner: Any,
        rollout: Any,
        cache: Any,
        source: Any,
        records: Any,
        problems: Sequence[Problem],
        encode: Callable[[Problem], list[int]],
        autonpo: bool = True,
        poll_s: float = 1.0,
        segment_timeout_s: float = 24 * 3600.0,
        learner_retry_s: float = 120.0,
    ) -> None:
        self.cfg, self.learner, self.rollout, self.cache = cfg, learner, rollout, cache
        self.source, self.records, self.encode = source, records, encode
        self.problems = {p.prompt_id: p for p in problems}
        self.sampler = PromptSampler(list(problems), cfg.train.prompts_per_step, cfg.seed)
        self.poll_s, self.segment_timeout_s, self.learner_retry_s = poll_s, segment_timeout_s, learner_retry_s
        self.run = wait_for_learner(learner, learner_retry_s).run
        self._unreachable_logged = False
        self.reading = Reading(error="not read yet")
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        saved = records.get_state(AUTONPO_STATE_KEY)
        self.autonpo_enabled = bool(saved["enabled"]) if saved else autonpo
        self.overrides: dict[str, Any] = dict(saved["overrides"]) if saved else {}
        self.autonpo = AutoNPO(self._autonpo_config(self.overrides))
        self.last_step: int | None = None
        if saved:
            self.autonpo.load_state_dict(saved["state"])
            self.last_step = saved["last_step"]
        self.recovered = self._recover()

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the metrics loop in a background thread."""
        self._thread = threading.Thread(target=self._loop, name="controller-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop (an intervention in progress is left to finish in its thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _recover(self) -> dict[str, Any]:
        """After a restart: re-attach to the running intervention's segment, or mark it abandoned and resume a
        learner it left paused (the rule is in the module docstring)."""
        running = self.records.running()
        if running is None:
            return {}
        status = self._retry(self.learner.status)
        last = running.commands[-1]["call"] if running.commands else "none"
        note = {"learner_state": status.state, "learner_step": status.step, "last_command": last}
        body = self._reattach(running, status)
        if body is not None:
            self.records.add_command(running.id, "Controller.Reattach", {"after": "restart"}, note)
            self._worker = threading.Thread(
                target=self._execute, args=(running.id, body), name=f"intervention-{running.id}", daemon=True
            )
            self._worker.start()
            log.warning("re-attached to intervention %s after a restart: %s", running.id, note)
            return {"reattached": running.id, **note}
        if status.state == "paused":
            state, step = self._retry(self.learner.resume)
            note["resumed"] = {"state": state, "step": step}
        self.records.finish(
            running.id, "abandoned", outcome=note, error=f"the controller restarted during it (last command: {last})"
        )
        log.warning("intervention %s was abandoned by a restart: %s", running.id, note)
        return {"abandoned": running.id, **note}

    def _reattach(self, running: Any, status: Any) -> Callable[[str], dict] | None:
        """The rest of `running` when its last command is a segment the learner holds (see the module docstring),
        else None."""
        last = running.commands[-1] if running.commands else {}
        result = last.get("result")
        if last.get("call") != "Learner.RunSegment" or not isinstance(result, dict):
            return None
        args, seg_id, end_step = last["args"], result["segment_id"], result["end_step"]
        if args.get("phase") == "main_line":  # the intervention had sent its last command
            return lambda iv: {"main_line": {"continued": True, "segment_id": seg_id, "end_step": end_step},
                               "reattached": True}  # fmt: skip
        paused = next((c["result"] for c in reversed(running.commands) if c["call"] == "Controller.Paused"), None)
        label = args.get("label", "")
        if paused is None or label not in REATTACHED_LABELS or status.segment_id != seg_id:
            return None
        if status.state not in ("running", "idle") or status.state == "idle" and status.step != end_step:
            return None
        end, request = paused["segment_end"], running.request
        if label == "scout":
            plan = early_bootstrap_plan(paused["step"], request["scout_steps"])
            return lambda iv: self._early_rest(iv, plan, end, seg_id)
        if label == "lookahead":
            plan = plateau_breakthrough_plan(request["plateau_start"], request["lookahead_steps"])
            return lambda iv: self._plateau_rest(iv, plan, end, seg_id)
        guides = next((c["args"]["guides"] for c in reversed(running.commands) if c["call"].endswith("PutGuides")), 0)
        outcome = {"guides": guides, "reattached": True}
        if running.kind == "autonpo":
            outcome.update(intervened=True, delta=args["length"])
        return lambda iv: self._replay_rest(iv, seg_id, end_step, end, outcome)

    def _retry(self, fn: Callable[[], Any]) -> Any:
        """`fn()` (an idempotent learner call), retried while the learner does not answer, for up to
        learner_retry_s; then ConnectionError naming how long it waited."""
        deadline = time.monotonic() + self.learner_retry_s
        while True:
            try:
                return fn()
            except UNREACHABLE as exc:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise ConnectionError(
                        f"the learner stayed unreachable for {self.learner_retry_s:g} s: {exc}"
                    ) from None
                time.sleep(min(1.0, self.poll_s))

    # -- reads -----------------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Step, reward and entropy of the latest reading (None when missing: never 0), the learner (`reachable`
        False with the `error` when it does not answer), the AutoNPO state and the running intervention."""
        reading = self.reading
        try:
            learner = {"reachable": True, **asdict(self.learner.status())}
            learner.pop("metrics", None)
        except UNREACHABLE as exc:
            learner = {"reachable": False, "error": str(exc), "state": "unreachable", "step": None, "segment_id": "",
                       "mode": "", "guide_step": None, "segment_end_step": None, "run_steps": None}  # fmt: skip
        running = self.records.running()
        return {
            "step": reading.step,
            "reward": reading.reward,
            "entropy": reading.entropy,
            "metrics": {**reading.to_dict(), "source": self.source.describe()},
            "learner": learner,
            "segment": {k: learner[k] for k in ("segment_id", "mode", "guide_step", "segment_end_step")},
            "autonpo": self.autonpo_state(),
            "running_intervention": running.id if running else None,
            "recovered": self.recovered,
        }

    def autonpo_state(self) -> dict[str, Any]:
        with self._lock:
            reading = self.autonpo.detector.reading() if self.autonpo.detector.state_dict().get("raw") else None
            return {
                "enabled": self.autonpo_enabled,
                "overrides": self.overrides,
                "cooldown_until": self.autonpo.cooldown_until,
                "last_step_observed": self.last_step,
                "trigger": asdict(reading) if reading is not None else None,
            }

    def interventions(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        return [iv.to_dict() for iv in self.records.list(limit=limit, offset=offset)]

    def intervention(self, intervention_id: str) -> dict[str, Any] | None:
        found = self.records.get(intervention_id)
        return found.to_dict() if found else None

    # -- AutoNPO switch --------------------------------------------------------------------------------------------

    def _autonpo_config(self, overrides: dict[str, Any]) -> AutoNPOConfig:
        return from_dict(AutoNPOConfig, {**to_dict(self.cfg.autonpo), **overrides}, "autonpo.")

    def set_autonpo(self, enabled: bool, overrides: dict[str, Any]) -> dict[str, Any]:
        """Switch AutoNPO on/off and set config overrides (keys of the autonpo section; ConfigError naming a bad
        one). The trigger's history and cool-down are kept."""
        cfg = self._autonpo_config(overrides)  # raises before anything changes
        with self._lock:
            state = self.autonpo.state_dict()
            self.autonpo = AutoNPO(cfg)
            self.autonpo.load_state_dict(state)
            self.autonpo_enabled, self.overrides = bool(enabled), dict(overrides)
            self._save_autonpo()
        return self.autonpo_state()

    def _save_autonpo(self) -> None:
        self.records.set_state(
            AUTONPO_STATE_KEY,
            {
                "enabled": self.autonpo_enabled,
                "overrides": self.overrides,
                "state": self.autonpo.state_dict(),
                "last_step": self.last_step,
            },
        )

    # -- the loop --------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
                self._unreachable_logged = False
            except UNREACHABLE as exc:  # the learner restarts: poll again until it answers
                if not self._unreachable_logged:
                    log.warning("the learner does not answer; polling on: %s", exc)
                    self._unreachable_logged = True
            except Exception:  # noqa: BLE001 - the loop must outlive a failed poll; the error is logged
                log.exception("controller poll failed")
            self._stop.wait(self.poll_s)

    def poll_once(self) -> None:
        """Read the metrics once; observe a new step; run AutoNPO when its trigger asks for it."""
        reading = self.source.read()
        self.reading = reading
        if not reading.ok:
            return
        with self._lock:
            if reading.step == self.last_step:
                return
            if self.last_step is not None and reading.step < self.last_step:
                self.autonpo.on_rollback(reading.step)  # the run went back: forget the abandoned future
            trigger = self.autonpo.observe(reading.step, reading.reward, reading.entropy)
            self.last_step = reading.step
            self._save_autonpo()
            wants = self.autonpo_enabled and self.autonpo.wants_probe(trigger)
        if not wants or self.records.running() is not None:
            return
        status = self.learner.status()
        if status.state != "running" or status.mode != "grpo" or status.finished:
            return  # only the main line (not a replay, not an idle or finished learner) is probed
        try:
            intervention = self.records.start("autonpo", {"trigger": asdict(trigger)})
        except Busy:
            return
        self._execute(intervention.id, lambda iv: self._autonpo(iv, trigger))

    # -- manual interventions (validated now, executed in a worker thread) -------------------------------------------

    def _checkpoints(self) -> dict[int, str]:
        return {c.step: c.path for c in self._retry(self.learner.list_checkpoints)}

    def _refuse_when_busy(self) -> None:
        running = self.records.running()
        if running is not None:
            raise Busy(running.id)

    def start_early_bootstrap(self, scout_steps: int) -> dict[str, Any]:
        """Scout `scout_steps` from the current step t0, guide with pi^(t0+Delta), roll back to t0, replay with NPO."""
        if scout_steps < 1:
            raise ValueError(f"scout_steps: must be >= 1, got {scout_steps}")
        self._refuse_when_busy()
        status = self.learner.status()
        if status.finished or status.step + scout_steps > status.run_steps:
            raise Conflict(f"scout_steps: step {status.step} + {scout_steps} passes the run's end ({status.run_steps})")
        return self._launch("early_bootstrap", {"scout_steps": scout_steps}, lambda iv: self._early(iv, scout_steps))

    def start_plateau_breakthrough(self, plateau_start: int, lookahead_steps: int) -> dict[str, Any]:
        """Guide with pi^(t_p + Delta) (trained to first when not there yet), roll back to t_p, replay with NPO."""
        if plateau_start < 0:
            raise ValueError(f"plateau_start: must be >= 0, got {plateau_start}")
        if lookahead_steps < 1:
            raise ValueError(f"lookahead_steps: must be >= 1, got {lookahead_steps}")
        self._refuse_when_busy()
        status = self.learner.status()
        if plateau_start > status.step:
            raise Conflict(f"plateau_start: {plateau_start} is after the learner's step {status.step}")
        guide = plateau_start + lookahead_steps
        if guide > status.run_steps:
            raise Conflict(f"lookahead_steps: the guide step {guide} passes the run's end ({status.run_steps})")
        have = self._checkpoints()
        if plateau_start != status.step and plateau_start not in have:
            raise NotFound(f"plateau_start: no checkpoint of step {plateau_start} (have: {sorted(have)})")
        if guide < status.step and guide not in have:
            raise NotFound(f"lookahead_steps: no checkpoint of the guide step {guide} (have: {sorted(have)})")
        request = {"plateau_start": plateau_start, "lookahead_steps": lookahead_steps}
        return self._launch(
            "plateau_breakthrough", request, lambda iv: self._plateau(iv, plateau_start, lookahead_steps)
        )

    def start_rollback(self, step: int) -> dict[str, Any]:
        """Roll the learner back to checkpoint `step` (at most its current step: else Conflict, 409) and continue
        the main line from there."""
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        self._refuse_when_busy()
        current = self.learner.status().step
        if step > current:
            raise Conflict(f"step: {step} is beyond the learner's current step {current}; a rollback goes back")
        have = self._checkpoints()
        if step not in have:
            raise NotFound(f"step: no checkpoint of step {step} (have: {sorted(have)})")
        return self._launch("rollback", {"step": step}, lambda iv: self._rollback(iv, step))

    def _launch(self, kind: str, request: dict[str, Any], body: Callable[[str], dict]) -> dict[str, Any]:
        intervention = self.records.start(kind, request)
        self._worker = threading.Thread(
            target=self._execute, args=(intervention.id, body), name=f"intervention-{intervention.id}", daemon=True
        )
        self._worker.start()
        return intervention.to_dict()

    def wait_idle(self, timeout_s: float = 600.0) -> None:
        """Wait until no intervention runs (tests, `npo intervene --wait`)."""
        deadline = time.monotonic() + timeout_s
        while self.records.running() is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"an intervention still runs after {timeout_s:g} s")
            time.sleep(0.1)

    def _execute(self, intervention_id: str, body: Callable[[str], dict]) -> None:
        try:
            outcome = body(intervention_id)
        except Exception as exc:  # noqa: BLE001 - recorded as the intervention's failure
            log.exception("intervention %s failed", intervention_id)
            self.records.finish(intervention_id, "failed", error=f"{type(exc).__name__}: {exc}"[:500])
            return
        self.records.finish(intervention_id, "succeeded", outcome=outcome)

    # -- commands ----------------------------------------------------------------------------------------------------

    def _cmd(self, iv: str, call: str, args: dict[str, Any], fn: Callable[[], Any], summary=None, retry=False) -> Any:
        """Run one command (an idempotent learner call with `retry`: retried while the learner does not answer),
        record it with its (summarised) result."""
        result = self._retry(fn) if retry else fn()
        shown = summary(result) if summary else result
        self.records.add_command(iv, call, args, shown if isinstance(shown, (dict, list, int, float, str)) else None)
        return result

    def _pause(self, iv: str) -> tuple[int, int | None]:
        """Stop the learner between steps and end its segment; returns (its step, the end step of the segment it was
        running, None when it was idle), recorded as `Controller.Paused`."""
        status = self._retry(self.learner.status)
        end = status.segment_end_step if status.state in ("running", "paused") and not status.finished else None
        deadline = time.monotonic() + self.segment_timeout_s
        while status.state == "running":
            self._cmd(iv, "Learner.Pause", {}, self.learner.pause, lambda r: {"state": r[0], "step": r[1]}, True)
            status = self._retry(self.learner.status)
            if time.monotonic() > deadline:
                raise TimeoutError("the learner did not pause")
        if status.state == "failed":
            raise Conflict(f"the learner's last segment failed: {status.error}")
        if status.state == "paused":
            # End the paused segment (the intervention runs its own): roll back to the step the pause checkpointed,
            # which restores exactly the state the learner is in.
            self._cmd(iv, "Learner.Rollback", {"to_step": status.step, "why": "end the paused segment"},
                      lambda: self.learner.rollback(status.step), retry=True)  # fmt: skip
        if end is not None and status.step >= end:
            end = None  # the segment completed while we paused it
        self.records.add_command(iv, "Controller.Paused", {}, {"step": status.step, "segment_end": end})
        return status.step, end

    def _start(self, iv: str, from_step: int, length: int, mode: str, guide_step: int = -1, label: str = "") -> str:
        """Start a segment (RunSegment: not retried); returns its id."""
        args = {"from_step": from_step, "length": length, "mode": mode, "guide_step": guide_step, "label": label}
        started = self._cmd(
            iv,
            "Learner.RunSegment",
            args,
            lambda: self.learner.run_segment(from_step, length, mode, guide_step=guide_step, label=label),
            lambda r: {"segment_id": r.segment_id, "end_step": r.end_step},
        )
        return started.segment_id

    def _wait(self, iv: str, segment_id: str, end_step: int) -> Any:
        """Wait for segment `segment_id` to end at `end_step` (Status retried while the learner does not answer);
        Conflict naming both steps when the learner is elsewhere (it restarted, or another segment runs)."""
        deadline = time.monotonic() + self.segment_timeout_s
        while True:
            status = self._retry(self.learner.status)
            if status.segment_id != segment_id or status.state != "running":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"segment {segment_id}: still running after {self.segment_timeout_s:g} s")
            time.sleep(0.2)
        if status.segment_id == segment_id and status.state == "failed":
            raise RuntimeError(f"segment {segment_id} failed: {status.error}")
        if status.segment_id != segment_id or status.step != end_step:
            raise Conflict(
                f"segment {segment_id} did not end at step {end_step}: the learner is {status.state} at step "
                f"{status.step} in segment {status.segment_id or '-'} (it restarted, or someone else commanded it)"
            )
        self.records.add_command(iv, "Learner.WaitSegment", {"segment_id": segment_id}, {"step": status.step})
        return status

    def _run(self, iv: str, from_step: int, length: int, mode: str, guide_step: int = -1, label: str = "") -> Any:
        return self._wait(iv, self._start(iv, from_step, length, mode, guide_step, label), from_step + length)

    def _continue_main(self, iv: str, end: int | None) -> dict[str, Any]:
        """Continue the main line to `end` (where the learner was going before the intervention)."""
        status = self._retry(self.learner.status)
        if end is None or status.step >= end:
            return {"continued": False, "step": status.step}
        started = self._cmd(
            iv,
            "Learner.RunSegment",
            {"from_step": status.step, "length": end - status.step, "mode": "grpo", "phase": "main_line"},
            lambda: self.learner.run_segment(status.step, end - status.step, "grpo"),
            lambda r: {"segment_id": r.segment_id, "end_step": r.end_step},
        )
        return {"continued": True, "from_step": status.step, "end_step": end, "segment_id": started.segment_id}

    def _save_checkpoint(self, iv: str) -> str:
        record = self._cmd(
            iv, "Learner.SaveCheckpoint", {}, self.learner.save_checkpoint, lambda r: {"step": r.step}, retry=True
        )
        return record.path

    def _load_policy(self, iv: str, step: int, path: str) -> None:
        self._cmd(
            iv,
            "Rollout.LoadPolicy",
            {"step": step, "path": path},
            lambda: self.rollout.load_policy(path, step=step),
            lambda r: [{"replica": x.address, "step": x.step, "load_seconds": x.load_seconds} for x in r],
        )

    def _sample(self, iv: str, problems: list[Problem], n: int, purpose: str, step: int) -> list[list[Sample]]:
        seed = derive_seed(self.cfg.seed, purpose, step)
        return self._cmd(
            iv,
            "Rollout.Generate",
            {"prompts": len(problems), "n": n, "purpose": purpose, "step": step},
            lambda: self.rollout.generate_verified(
                [p.prompt_id for p in problems], [self.encode(p) for p in problems], n, self.cfg.rollout, seed=seed
            ),
            lambda groups: {"samples": sum(len(g) for g in groups)},
        )

    def _guides(self, iv: str, guide_step: int, path: str, replay: range) -> int:
        """Sample guides with pi^(guide_step) for the prompts of the replay steps and cache the verified ones."""
        problems = list({p.prompt_id: p for s in replay for p in self.sampler.batch(s)}.values())
        self._load_policy(iv, guide_step, path)
        groups = self._sample(iv, problems, self.cfg.npo.guide_samples, "guides", guide_step)
        algo = self.cfg.algo
        guides = select_guides(groups, algo.correct_threshold, algo.guide_select, algo.guide_slots)
        if guides:
            self._cmd(
                iv,
                "GuidanceCache.PutGuides",
                {"guide_step": guide_step, "guides": len(guides)},
                lambda: self.cache.put_guides(self.run, guide_step, guides),
            )
        return len(guide_lists(guides))

    def _rollback_to(self, iv: str, step: int) -> None:
        self._cmd(iv, "Learner.Rollback", {"to_step": step}, lambda: self.learner.rollback(step), retry=True)
        with self._lock:
            self.autonpo.on_rollback(step)

    # -- the interventions -------------------------------------------------------------------------------------------

    def _early(self, iv: str, scout_steps: int) -> dict[str, Any]:
        t0, end = self._pause(iv)
        plan = early_bootstrap_plan(t0, scout_steps)
        self.records.update(iv, choice={"plan": plan.to_dict()})
        self._save_checkpoint(iv)
        return self._early_rest(iv, plan, end, self._start(iv, t0, scout_steps, "grpo", label="scout"))

    def _early_rest(self, iv: str, plan: Any, end: int | None, scout_id: str) -> dict[str, Any]:
        """An early bootstrap from its running scout segment on (a restarted controller re-attaches here)."""
        self._wait(iv, scout_id, plan.guide_step)
        path = self._save_checkpoint(iv)
        return self._guided_replay(iv, plan, path, end, "npo_replay")

    def _plateau(self, iv: str, plateau_start: int, lookahead: int) -> dict[str, Any]:
        t, end = self._pause(iv)
        plan = plateau_breakthrough_plan(plateau_start, lookahead)
        self.records.update(iv, choice={"plan": plan.to_dict()})
        if t < plan.guide_step:
            return self._plateau_rest(iv, plan, end, self._start(iv, t, plan.guide_step - t, "grpo", label="lookahead"))
        path = self._checkpoints()[plan.guide_step] if t > plan.guide_step else self._save_checkpoint(iv)
        return self._guided_replay(iv, plan, path, end, "npo_replay")

    def _plateau_rest(self, iv: str, plan: Any, end: int | None, lookahead_id: str) -> dict[str, Any]:
        """A plateau breakthrough from its running lookahead segment on (a restarted controller re-attaches here)."""
        self._wait(iv, lookahead_id, plan.guide_step)
        return self._guided_replay(iv, plan, self._save_checkpoint(iv), end, "npo_replay")

    def _guided_replay(self, iv: str, plan: Any, path: str, end: int | None, label: str) -> dict[str, Any]:
        """Guides of plan.guide_step from the checkpoint at `path`, roll back, replay with NPO, continue the main."""
        found = self._guides(iv, plan.guide_step, path, plan.replay_range())
        self._rollback_to(iv, plan.rollback_step)
        replay = self._start(iv, plan.rollback_step, plan.replay_steps, "npo", guide_step=plan.guide_step, label=label)
        return self._replay_rest(iv, replay, plan.rollback_step + plan.replay_steps, end, {"guides": found})

    def _replay_rest(self, iv: str, replay_id: str, end_step: int, end: int | None, outcome: dict) -> dict[str, Any]:
        """Wait for the NPO replay, continue the main line (a restarted controller re-attaches here)."""
        self._wait(iv, replay_id, end_step)
        return {**outcome, "main_line": self._continue_main(iv, end)}

    def _rollback(self, iv: str, step: int) -> dict[str, Any]:
        _, end = self._pause(iv)
        self._rollback_to(iv, step)
        return {"step": step, "main_line": self._continue_main(iv, end)}

    def _autonpo(self, iv: str, trigger: Any) -> dict[str, Any]:
        t, end = self._pause(iv)
        readings = {"trigger": asdict(trigger), "paused_at": t, "reading": self.reading.to_dict()}
        self.records.update(iv, readings=readings)
        every = self.cfg.checkpoint.every
        if t % every:  # probe at a checkpoint step, as the embedded runner does: candidates t - Delta exist there
            ahead = every - t % every
            if end is None or t + ahead > end:
                return self._autonpo_done(iv, end, {"reason": f"no checkpoint step before the segment's end ({end})"})
            self._run(iv, t, ahead, "grpo")
            t += ahead
            self.records.update(iv, readings={**readings, "probe_step": t})
        path_t = self._save_checkpoint(iv)
        have = self._checkpoints()
        result = run_probe(
            self._locked_autonpo,
            t,
            have,
            self._probe_ports(iv, path_t, have),
            problems=self.problems,
            seed=self.cfg.seed,
            correct_threshold=self.cfg.algo.correct_threshold,
            reading=trigger,
            guide_slots=self.cfg.algo.guide_slots,
        )
        if result.reason == "no_candidates":
            with self._lock:
                self.autonpo.cooldown_until = t + self.autonpo.cfg.window
            return self._autonpo_done(iv, end, {"reason": f"no checkpoint at any candidate distance from step {t}"})
        if result.reason == "empty_pool":
            return self._autonpo_done(iv, end, {"reason": "the mistake pool is empty"})
        decision = result.decision
        self.records.update(
            iv,
            candidates=[asdict(c) for c in result.candidates],
            choice=decision.to_dict() if decision else {"delta": None, "reason": "no candidate reached q_min"},
        )
        probed = {"probed": len(result.problems)}
        if decision is None:
            return self._autonpo_done(iv, end, {**probed, "solved": int(sum(result.solved.values()))})
        self._cmd(
            iv,
            "GuidanceCache.PutGuides",
            {"guide_step": t, "guides": len(result.guides)},
            lambda: self.cache.put_guides(self.run, t, result.guides),
        )
        with self._lock:
            self._save_autonpo()  # the cool-down the probe set survives a restart during the replay
        self._rollback_to(iv, t - decision.delta)
        replay = self._start(iv, t - decision.delta, decision.delta, "npo", guide_step=t, label="autonpo_replay")
        outcome = {"intervened": True, "delta": decision.delta, "guides": len(guide_lists(result.guides)), **probed}
        return self._replay_rest(iv, replay, t, end, outcome)

    def _autonpo_done(self, iv: str, end: int | None, outcome: dict[str, Any]) -> dict[str, Any]:
        """An AutoNPO intervention that did not intervene: save the state, continue the main line."""
        with self._lock:
            self._save_autonpo()
        return {**outcome, "intervened": False, "main_line": self._continue_main(iv, end)}

    @contextlib.contextmanager
    def _locked_autonpo(self) -> Iterator[AutoNPO]:
        """The AutoNPO state under the controller's lock (the metrics loop observes it concurrently)."""
        with self._lock:
            yield self.autonpo

    def _probe_ports(self, iv: str, path_t: str, have: dict[int, str]) -> ProbePorts:
        """The probe's ports in service mode: the cache's mistakes, the rollout replicas (loaded with pi^(t)) for
        sampling, a checkpoint folder per candidate for scoring; every call recorded as a command of `iv`."""

        def mistakes(lo: int, hi: int) -> dict[str, int]:
            return self._cmd(
                iv,
                "GuidanceCache.GetMistakes",
                {"from_step": lo, "to_step": hi},
                lambda: self.cache.get_mistakes(self.run, lo, hi),
                lambda m: {"prompts": len(m)},
            )

        def sample(problems: list[Problem], n: int, step: int) -> list[list[Sample]]:
            self._load_policy(iv, step, path_t)
            return self._sample(iv, problems, n, "probe", step)

        def score(step: int, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
            return self._cmd(
                iv,
                "Rollout.Score",
                {"checkpoint_step": step, "sequences": len(prompts)},
                lambda: self.rollout.score(
                    prompts, responses, temperature=self.cfg.rollout.temperature, checkpoint=have[step], step=step
                ),
                lambda r: {"scored": len(r)},
            )

        return ProbePorts(mistakes=mistakes, sample=sample, score=score, encode=self.encode)
