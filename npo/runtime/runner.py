"""The step loop: GRPO, NPO (manual interventions) and AutoNPO on one set of roles.

The runner drives the data path of one step (docs/architecture.md):

    prompts (data cursor = step) -> rollout.generate(n) -> verify -> p_hat -> mistakes to the pool
    -> guides for gated prompts (npo.runtime.guides: the NPO segment's cache, or the configured source)
    -> mixed groups -> learner.train_step -> metrics

and executes interventions, which are pure plans (npo.core.interventions) or AutoNPO decisions (npo.core.autonpo):
scout (plain training), generate + verify guides with the guide checkpoint, cache them, roll back (weights,
optimizer, RNG, data cursor), replay the segment with NPO. AutoNPO's probe is npo.runtime.probe, run here with this
process's ports (the service-mode controller runs the same probe with its clients).

Randomness: every random draw derives its seed from (run seed, purpose, step): the rollout of step t always uses
the same seed, evaluation has its own stream, and the data order is a function of the step. So a rollback needs no
RNG bookkeeping to replay exactly, evaluation never changes training, and a GRPO run and an NPO run with the same
seed are identical until the first guide is used (common random numbers).

Step convention: pi^(t) is the policy after t optimizer steps of the main line. Row `step: t` of metrics.jsonl holds
the rollout statistics of pi^(t) on batch t and the loss of the update to pi^(t+1); `eval_acc` in row t is pi^(t)'s.
Checkpoint t holds pi^(t).
"""

from __future__ import annotations

import copy
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from npo.core.autonpo import AutoNPO
from npo.core.config import Method
from npo.core.gate import build_mixed_groups, group_pass_rate, guide_lists, select_guides, should_replace
from npo.core.interventions import (
    InterventionPlan,
    autonpo_plan,
    early_bootstrap_plan,
)
from npo.core.seeds import derive_seed
from npo.core.types import Problem, Sample
from npo.runtime.checkpoint import CheckpointManager, rng_state, set_rng_state
from npo.runtime.engine import RolloutEngine, SamplingParams, TransformersEngine
from npo.runtime.guides import NearFutureGuides, make_guide_source
from npo.runtime.learner import TorchLearner, load_weights
from npo.runtime.logsinks import Sinks, open_sinks, write_run_info
from npo.runtime.models import choose_threads
from npo.runtime.probe import ProbePorts, run_probe, unguarded
from npo.runtime.run_config import RunConfig, run_config_to_dict
from npo.runtime.store import GuideStore, sample_from_json, sample_to_json
from npo.runtime.verify import verify_groups


class PolicyLike(Protocol):
    """What the runner needs of a policy (npo.runtime.models.Policy satisfies it)."""

    model: torch.nn.Module
    tokenizer: Any
    eos_id: int
    pad_id: int

    def encode_prompt(self, problem: Problem) -> list[int]: ...


class TaskLike(Protocol):
    """What the runner needs of a task (npo.runtime.tasks.Task satisfies it)."""

    name: str
    train: list[Problem]
    test: list[Problem]

    def reward(self, problem: Problem, response: str) -> float: ...


class LearnerLike(Protocol):
    """What the runner needs of a learner: npo.runtime.learner.TorchLearner, or services/learner's DeepSpeedLearner.
    A learner that refuses steps (a non-finite loss or gradient norm) counts them in `nonfinite_skipped`; the runner
    then logs the step and leaves the optimizer-step counter and the published weights as they were."""

    def train_step(self, groups: Sequence[Any], prompt_ids: dict[str, list[int]]) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def learner_kwargs(cfg: RunConfig, pad_id: int) -> dict[str, Any]:
    """The learner's settings from a run config (every learner engine takes these keyword arguments)."""
    t = cfg.train
    return {
        "pad_id": pad_id,
        "algo": cfg.algo,
        "lr": t.lr,
        "betas": t.betas,
        "weight_decay": t.weight_decay,
        "grad_clip": t.grad_clip,
        "micro_batch_size": t.micro_batch_size,
        "dtype": t.dtype,
        "temperature": cfg.rollout.temperature,
        "max_len": cfg.rollout.max_new_tokens,
    }


class PromptSampler:
    """Deterministic data order: batch t is a slice of a per-epoch permutation seeded by (seed, epoch).

    The data cursor is the step itself, so rolling back the step rolls back the data.
    """

    def __init__(self, problems: Sequence[Problem], batch_size: int, seed: int):
        if batch_size > len(problems):
            raise ValueError(f"batch_size: {batch_size} prompts per step but the train split has {len(problems)}")
        self.problems = list(problems)
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(self.problems) // batch_size

    def batch(self, step: int) -> list[Problem]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng(derive_seed(self.seed, "data", epoch)).permutation(len(self.problems))
        picked = order[index * self.batch_size : (index + 1) * self.batch_size]
        return [self.problems[i] for i in picked]


@dataclass
class Segment:
    """What the steps from now until `end` do: plain GRPO or NPO with guides of `guide_step`."""

    name: str
    """grpo | scout | npo_replay | autonpo_replay"""
    npo: bool = False
    guide_step: int = -1
    end: int = -1
    tau_gate: float | None = None
    """This NPO segment's gate threshold; None = algo.tau_gate of the run config."""
    is_correction: bool | None = None
    """This NPO segment's IS switch for the guide slot; None = algo.is_correction of the run config."""

    def gate(self, algo: Any) -> tuple[float, bool]:
        """(tau_gate, is_correction) in force during this segment: its own values in an NPO segment, else the run's."""
        tau = self.tau_gate if self.npo and self.tau_gate is not None else algo.tau_gate
        correction = self.is_correction if self.npo and self.is_correction is not None else algo.is_correction
        return tau, correction

    def state(self) -> dict[str, Any]:
        """The segment as checkpoint state (gate fields only when set, so older checkpoints read the same)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Interrupted(Exception):
    """Ctrl-C arrived; a checkpoint was saved at `step`."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted: checkpoint saved at step {step} in {path}")
        self.step, self.path = step, path


class Runner:
    """Runs one training run in `out_dir` with the given roles (embedded: all in this process)."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        policy: PolicyLike,
        task: TaskLike,
        store: GuideStore,
        engine: RolloutEngine | None = None,
        learner: LearnerLike | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
        after_step: Callable[[Runner, dict[str, Any]], None] | None = None,
        publish: Callable[[int], float] | None = None,
    ) -> None:
        """`engine` samples with the policy's weights: the embedded TransformersEngine shares `policy.model`; an
        engine in other processes (rollout replicas) needs `publish(step) -> seconds`, called before the engine
        samples whenever the learner changed the weights since the last call (a step, a rollback, a resume)."""
        self.cfg = cfg
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.policy, self.task, self.store = policy, task, store
        self.run = cfg.run_name or self.out.resolve().name
        self.engine = engine or TransformersEngine(policy.model, eos_id=policy.eos_id, pad_id=policy.pad_id)
        self.learner = learner or TorchLearner(policy.model, **learner_kwargs(cfg, policy.pad_id))
        self.ckpt = CheckpointManager(self.out / "checkpoints")
        self.sampler = PromptSampler(task.train, cfg.train.prompts_per_step, cfg.seed)
        self.problems = {p.prompt_id: p for p in task.train}
        self.autonpo = AutoNPO(cfg.autonpo)
        self.progress, self.log, self.after_step = progress, log, after_step
        self.publish = publish
        self._weights_changed = publish is not None
        self._sync_seconds = 0.0
        # Run state (saved in checkpoints for --resume; a rollback keeps it).
        self.step = 0
        self.optimizer_steps = 0
        self.samples_total = 0
        self.segment = Segment("grpo")
        self.plans: list[dict[str, Any]] = []  # {"plan": InterventionPlan.to_dict(), "phase": ...}
        self.wall_offset = 0.0
        self._start = time.perf_counter()
        self._stop_requested = False
        self._scorer: torch.nn.Module | None = None
        self._last_reading = None
        self._pending_eval: dict[str, Any] = {}
        self._sinks: Sinks | None = None  # TensorBoard / metrics.csv / W&B (cfg.logging): _open_sinks
        self._resumed = False
        self.guide_source = make_guide_source(cfg, policy, task.train, self._verify, self._record)
        self._near_future = NearFutureGuides(store, self.run, lambda: self.segment.guide_step, cfg.algo.guide_slots)
        self._probe_ports = ProbePorts(
            mistakes=lambda lo, hi: self.store.get_mistakes(self.run, lo, hi),
            sample=self._probe_sample,
            score=self._score_under,
            encode=policy.encode_prompt,
        )
        if cfg.method is Method.NPO:
            early = cfg.npo.early
            if early.enabled:
                plan = early_bootstrap_plan(early.at_step, early.delta, early.replay_steps or None)
                self.plans.append({"plan": plan, "phase": "pending"})
            if cfg.npo.late.enabled:
                self.plans += [{"plan": plan, "phase": "pending"} for plan in cfg.late_plans()]

    # ------------------------------------------------------------------------------------------------------------
    # Public entry points.

    def train(self, resume: bool = False) -> Path:
        """Run to train.steps (from the latest checkpoint when resuming); returns the run folder."""
        (self.out / "config.yaml").write_text(_yaml(run_config_to_dict(self.cfg)))
        if resume:
            self.resume()
        else:
            for name in ("metrics.jsonl", "interventions.jsonl"):
                (self.out / name).write_text("")
        torch.set_num_threads(choose_threads(self.cfg.train.threads))  # 0: the cores this process may use
        previous = self._install_sigint()
        try:
            self._open_sinks()  # a logging error (e.g. W&B on but not installed) before the first step
            self.run_until(self.cfg.train.steps)
            self.finish()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self._sinks is not None:
                self._sinks.close()
                self._sinks = None
        return self.out

    def run_until(self, end_step: int) -> None:
        """Train until the main line reaches `end_step` (interventions may roll back and replay on the way).

        Raises Interrupted, after saving a checkpoint, when a stop was requested (Ctrl-C)."""
        bar = self._progress_bar()
        try:
            while self.step < end_step:
                if self._stop_requested:
                    self._stop_requested = False
                    path = self._save_checkpoint(self.step)
                    raise Interrupted(self.step, path)
                self._before_step()
                if self.step >= end_step:
                    break
                row = self._train_one_step()
                self.step += 1
                if self.after_step is not None:
                    self.after_step(self, row)
                if bar is not None:
                    bar.n = self.step
                    postfix = {"reward": f"{row['reward_mean']:.3f}", "entropy": f"{row['entropy']:.3f}"}
                    bar.set_postfix(**postfix, seg=row["segment"], refresh=False)
                    bar.refresh()
        finally:
            if bar is not None:
                bar.close()

    def rollback(self, to_step: int) -> None:
        """Manual rollback to checkpoint `to_step` (weights, optimizer, RNG, data cursor)."""
        if to_step > self.step:
            raise ValueError(f"to_step: cannot roll forward ({to_step} > current step {self.step})")
        from_step = self.step
        self._rollback(to_step)
        self._record({"kind": "rollback", "event": "rollback", "step": from_step, "to_step": to_step})

    def request_stop(self) -> None:
        """Stop at the next step boundary, saving a checkpoint (what Ctrl-C does)."""
        self._stop_requested = True

    def clear_stop(self) -> None:
        """Forget a stop request that arrived after the last step of run_until (it would stop the next call)."""
        self._stop_requested = False

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (replacing one of the same step); returns its folder."""
        return self._save_checkpoint(self.step)

    def sync_weights(self) -> None:
        """Publish the weights to the rollout engine when the learner changed them since the last publication
        (no-op for the embedded engine, which shares the model)."""
        if self.publish is not None and self._weights_changed:
            self._sync_seconds += float(self.publish(self.step))
            self._weights_changed = False

    # ------------------------------------------------------------------------------------------------------------
    # One step.

    def _verify(self, problems: Sequence[Problem], generations, policy_step: int) -> list[list[Sample]]:
        """verify_groups with the policy's tokenizer and the task's reward; counted in samples_total."""
        groups = verify_groups(problems, generations, self._decode, self.task.rewards, policy_step)
        self.samples_total += sum(len(g) for g in generations)
        return groups

    def _decode(self, token_ids: list[int]) -> str:
        return self.policy.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _sample(self, problems: Sequence[Problem], prompts: list[list[int]], n: int, seed: int, policy_step: int):
        """n verified responses per problem of the current policy pi^(policy_step), with the rollout's sampling."""
        self.sync_weights()
        gens = self.engine.generate(prompts, n, self.cfg.rollout, seed=seed)
        return self._verify(problems, gens, policy_step)

    def _train_one_step(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.step
        started = time.perf_counter()
        problems = self.sampler.batch(t)
        prompt_ids = {p.prompt_id: self.policy.encode_prompt(p) for p in problems}
        prompts = [prompt_ids[p.prompt_id] for p in problems]
        groups = self._sample(problems, prompts, cfg.algo.group_size, derive_seed(cfg.seed, "rollout", t), t)
        gen_seconds = time.perf_counter() - started
        pass_rates = self._pass_rates(t, groups)
        tau_gate, is_correction = self.segment.gate(cfg.algo)
        gated = [p for p, r in pass_rates.items() if should_replace(r, tau_gate, cfg.algo.gate_mode)]
        guides = self._step_guides(t, gated)
        self.guide_source.observe(groups, cfg.algo.correct_threshold)
        mixed = build_mixed_groups(
            groups,
            guides,
            tau_gate=tau_gate,
            correct_threshold=cfg.algo.correct_threshold,
            is_correction=is_correction,
            rollout_logprobs=lambda samples: self._score_now(prompt_ids, samples),
            gate_mode=cfg.algo.gate_mode,
            guide_slots=cfg.algo.guide_slots,
        )
        refused_before = getattr(self.learner, "nonfinite_skipped", 0)
        metrics = self.learner.train_step(mixed, prompt_ids)
        if getattr(self.learner, "nonfinite_skipped", 0) > refused_before:
            self.log(
                f"[{self.run}] step {t}: non-finite loss ({metrics.get('loss')}) or gradient norm "
                f"({metrics.get('grad_norm')}); optimizer step skipped, weights unchanged "
                f"({int(metrics['nonfinite_skipped'])} skipped so far)"
            )
        else:
            self._weights_changed = True
            self.optimizer_steps += 1
        row = self._step_row(t, groups, pass_rates, len(gated), gen_seconds, metrics)
        self._write_row(row)
        if cfg.method is Method.AUTONPO and math.isfinite(row["entropy"]):
            self._last_reading = self.autonpo.observe(t, row["reward_mean"], row["entropy"])
        if self.segment.end == t + 1:
            self.segment = Segment("grpo")
        return row

    def _pass_rates(self, t: int, groups: list[list[Sample]]) -> dict[str, float]:
        """p_hat per prompt; prompts with p_hat <= autonpo.mistake_pass_rate go to the mistake pool at step t."""
        thr = self.cfg.algo.correct_threshold
        pass_rates = {g[0].prompt_id: group_pass_rate(g, thr) for g in groups}
        failed = [p for p, r in pass_rates.items() if r <= self.cfg.autonpo.mistake_pass_rate]
        if failed:
            self.store.record_mistakes(self.run, t, failed)
        return pass_rates

    def _step_guides(self, t: int, gated: list[str]) -> dict[str, list[Sample]]:
        """The gated prompts' guide lists: an NPO segment's cached ones, else the configured source's."""
        source = self._near_future if self.segment.npo and gated else self.guide_source
        return source.guides(t, gated)

    def _score_now(self, prompt_ids: dict[str, list[int]], samples: list[Sample]) -> list[list[float]]:
        """pi^(t)'s log-probs of guide tokens (the guide slot's behaviour log-probs when IS correction is off)."""
        return self.engine.score(
            [prompt_ids[s.prompt_id] for s in samples],
            [s.response_ids for s in samples],
            temperature=self.cfg.rollout.temperature,
        )

    def _step_row(self, t, groups, pass_rates, gated_groups, gen_seconds, metrics) -> dict[str, Any]:
        """Row `step: t` of metrics.jsonl: pi^(t)'s rollout statistics, the learner's metrics, counters, eval."""
        onpolicy = [s for g in groups for s in g]
        row: dict[str, Any] = {
            "step": t,
            "segment": self.segment.name,
            "reward_mean": float(np.mean([s.reward for s in onpolicy])),
            "pass_rate": float(np.mean(list(pass_rates.values()))),
            "zero_groups": sum(r == 0.0 for r in pass_rates.values()) / len(pass_rates),
            "gated_groups": gated_groups,
            "response_len": float(np.mean([len(s.response_ids) for s in onpolicy])),
            "gen_seconds": gen_seconds,
            **metrics,
            "optimizer_steps": self.optimizer_steps,
            "samples_total": self.samples_total,
            "reward_errors": self.task.reward_errors,  # responses a reward function failed on (scored 0), this process
        }
        row.update(self._pending_eval)
        self._pending_eval = {}
        if self.publish is not None:
            row["weight_sync_seconds"] = self._sync_seconds
            self._sync_seconds = 0.0
        row["wall_time"] = self._wall_time()
        return row

    # ------------------------------------------------------------------------------------------------------------
    # Before each step: evaluation, checkpoints, interventions.

    def _before_step(self) -> None:
        t = self.step
        self._pending_eval = self._evaluate(t) if self._eval_due(t) else {}
        boundary = any(
            t in (p["plan"].scout_from, p["plan"].rollback_step) and p["phase"] in ("pending", "scouting")
            for p in self.plans
        )
        if t % self.cfg.checkpoint.every == 0 or boundary:
            self._save_checkpoint(t)
        for entry in self.plans:
            self._advance_plan(entry, t)
        if self.cfg.method is Method.AUTONPO and not self.segment.npo and t % self.cfg.checkpoint.every == 0:
            self._maybe_autonpo(t)

    def _eval_due(self, t: int) -> bool:
        every = self.cfg.eval.every
        return every > 0 and t % every == 0

    def _advance_plan(self, entry: dict[str, Any], t: int) -> None:
        plan: InterventionPlan = entry["plan"]
        kind = plan.kind.value
        if entry["phase"] == "pending" and plan.scout_from is not None and t == plan.scout_from:
            entry["phase"] = "scouting"
            self.segment = Segment("scout")
            self._record({"kind": kind, "event": "scout_start", "step": t, "plan": plan.to_dict()})
        if entry["phase"] == "scouting" and t == plan.guide_step:
            prompts = {p.prompt_id: p for s in plan.replay_range() for p in self.sampler.batch(s)}
            found = self._make_guides(list(prompts.values()), plan.guide_step)
            event = {"kind": kind, "event": "guides", "step": t, "guide_step": plan.guide_step}
            self._record({**event, "prompts": len(prompts), "guides": found})
            self._rollback(plan.rollback_step)
            entry["phase"] = "replaying"
            self.segment = Segment("npo_replay", True, plan.guide_step, plan.replay_end)
            event = {"kind": kind, "event": "rollback", "step": t, "to_step": plan.rollback_step}
            self._record({**event, "replay_steps": plan.replay_steps})
        elif entry["phase"] == "replaying" and self.step >= plan.replay_end:
            entry["phase"] = "done"

    def _make_guides(self, problems: list[Problem], guide_step: int) -> int:
        """Sample guide_samples responses per prompt with the current policy pi^(guide_step); cache up to
        algo.guide_slots verified-correct ones of each prompt (algo.guide_select picks which, in which order). Returns
        how many prompts got a guide."""
        cfg = self.cfg
        prompts = [self.policy.encode_prompt(p) for p in problems]
        seed = derive_seed(cfg.seed, "guides", guide_step)
        groups = self._sample(problems, prompts, cfg.npo.guide_samples, seed, guide_step)
        guides = select_guides(groups, cfg.algo.correct_threshold, cfg.algo.guide_select, cfg.algo.guide_slots)
        if guides:
            self.store.put_guides(self.run, guide_step, guides)
        return len(guide_lists(guides))

    # ------------------------------------------------------------------------------------------------------------
    # AutoNPO: the probe (npo.runtime.probe) with this process's ports, then the rollback and the replay.

    def _maybe_autonpo(self, t: int) -> None:
        reading = self._last_reading
        if reading is None or not self.autonpo.wants_probe(reading):
            return
        result = run_probe(
            unguarded(self.autonpo),
            t,
            self.ckpt.steps(),
            self._probe_ports,
            problems=self.problems,
            seed=self.cfg.seed,
            correct_threshold=self.cfg.algo.correct_threshold,
            reading=reading,
            guide_slots=self.cfg.algo.guide_slots,
        )
        if result.reason is not None:
            return
        decision = result.decision
        self._record(
            {
                "kind": "autonpo",
                "event": "probe",
                "step": t,
                "probed": len(result.problems),
                "solved": int(sum(result.solved.values())),
                "reading": reading.__dict__,
                "candidates": [c.__dict__ for c in result.candidates],
                "decision": decision.to_dict() if decision else None,
            }
        )
        if decision is not None:
            self._autonpo_replay(t, decision.delta, result.guides)

    def _autonpo_replay(self, t: int, delta: int, guides: list[Sample]) -> None:
        """Cache the probe's guides as guides of step t, roll back Delta* steps, replay them with NPO."""
        self.store.put_guides(self.run, t, guides)
        plan = autonpo_plan(t, delta)
        self._rollback(plan.rollback_step)
        self.segment = Segment("autonpo_replay", True, plan.guide_step, plan.replay_end)
        event = {"kind": "autonpo", "event": "rollback", "step": t, "to_step": plan.rollback_step, "delta": delta}
        self._record({**event, "guides": len(guide_lists(guides)), "plan": plan.to_dict()})

    def _probe_sample(self, problems: list[Problem], n: int, step: int) -> list[list[Sample]]:
        prompts = [self.policy.encode_prompt(p) for p in problems]
        return self._sample(problems, prompts, n, derive_seed(self.cfg.seed, "probe", step), step)

    def _score_under(self, step: int, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of the responses under checkpoint pi^(step) (a separate model copy)."""
        if self._scorer is None:
            self._scorer = copy.deepcopy(self.policy.model).eval()
        self.ckpt.verify(step)
        load_weights(self._scorer, self.ckpt.path(step))
        engine = TransformersEngine(self._scorer, eos_id=self.policy.eos_id, pad_id=self.policy.pad_id)
        return engine.score(prompts, responses, temperature=self.cfg.rollout.temperature)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation.

    def _evaluate(self, t: int) -> dict[str, Any]:
        """Held-out accuracy of the current policy; its seeds derive from (seed, 'eval', step) only."""
        cfg = self.cfg.eval
        self.sync_weights()
        problems = self.task.test[: cfg.num_prompts]
        prompt_ids = [self.policy.encode_prompt(p) for p in problems]
        params = SamplingParams(temperature=cfg.temperature, top_p=1.0, max_new_tokens=self.cfg.rollout.max_new_tokens)
        gens = self.engine.generate(
            prompt_ids, cfg.samples_per_prompt, params, seed=derive_seed(self.cfg.seed, "eval", t)
        )
        out = {"eval_acc": self._accuracy(problems, gens)}
        if cfg.greedy:
            greedy = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.rollout.max_new_tokens)
            out["eval_greedy_acc"] = self._accuracy(problems, self.engine.generate(prompt_ids, 1, greedy, seed=0))
        return out

    def _accuracy(self, problems, gens) -> float:
        """Mean verified reward (not counted in samples_total: evaluation is not training compute)."""
        groups = verify_groups(problems, gens, self._decode, self.task.rewards, -1)
        scores = [s.reward for g in groups for s in g]
        return float(np.mean(scores)) if scores else 0.0

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints, rollback, resume.

    def _runner_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer_steps": self.optimizer_steps,
            "samples_total": self.samples_total,
            "segment": self.segment.state(),
            "plans": [{"plan": e["plan"].to_dict(), "phase": e["phase"]} for e in self.plans],
            "autonpo": self.autonpo.state_dict(),
            "mistakes": sorted(self.store.get_mistakes(self.run, 0, 1 << 62).items()),
            "past_guides": self.guide_source.state(),
            "metrics_lines": _count_lines(self.out / "metrics.jsonl"),
            "interventions_lines": _count_lines(self.out / "interventions.jsonl"),
            "wall_time": self._wall_time(),
        }

    def _save_checkpoint(self, step: int) -> Path:
        guides = []
        if self.segment.npo:
            ids = sorted({p.prompt_id for s in range(step, self.segment.end) for p in self.sampler.batch(s)})
            lists = self.store.get_guide_lists(self.run, self.segment.guide_step, ids, self.cfg.algo.guide_slots)
            guides = [sample_to_json(g) for prompt_guides in lists.values() for g in prompt_guides]

        def write_model(folder: Path) -> None:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # one bar per checkpoint would drown the run's own progress bar
            self.policy.model.save_pretrained(folder, safe_serialization=True)
            self.policy.tokenizer.save_pretrained(folder)

        trainer_state = {**self.learner.state_dict(), "rng": rng_state(), "data_cursor": step}
        path = self.ckpt.save(
            step, write_model, trainer_state, self._runner_state(), guides, run_config_to_dict(self.cfg)
        )
        if self.cfg.checkpoint.keep_last:
            self.ckpt.prune(self.cfg.checkpoint.keep_last, self._protected_steps())
        return path

    def _protected_steps(self) -> set[int]:
        keep: set[int] = set()
        for e in self.plans:
            if e["phase"] != "done":
                keep |= e["plan"].checkpoints_needed()
        if self.segment.npo:
            keep.add(self.segment.guide_step)
        if self.cfg.method is Method.AUTONPO:
            horizon = self.step - max(self.cfg.autonpo.candidate_deltas)
            keep |= {s for s in self.ckpt.steps() if s >= horizon}
        return keep

    def _restore_trainer(self, step: int):
        return self._apply_trainer(self.ckpt.load(step))

    def _apply_trainer(self, checkpoint):
        """Weights, optimizer and RNG of a loaded checkpoint."""
        load_weights(self.policy.model, checkpoint.path)
        self.learner.load_state_dict(checkpoint.trainer_state)
        self._weights_changed = self.publish is not None
        set_rng_state(checkpoint.trainer_state["rng"])
        return checkpoint

    def _rollback(self, to_step: int) -> None:
        """Return to checkpoint `to_step`: weights, optimizer, RNG, data cursor; the mistake pool and AutoNPO's
        trigger history forget what happened after it. Run bookkeeping (counters, plans, cool-down) is kept."""
        self._restore_trainer(to_step)
        self.step = to_step
        self.store.truncate_mistakes(self.run, to_step)
        self.guide_source.forget_from(to_step)
        self.autonpo.on_rollback(to_step)
        self._last_reading = None
        self._pending_eval = self._evaluate(to_step) if self._eval_due(to_step) else {}

    def resume(self) -> int:
        """Continue the run from its newest valid checkpoint (by save time; a corrupted one is set aside with a
        warning and the previous one is used): weights, optimizer, RNG, runner state (segment, plans, AutoNPO,
        mistake pool, the segment's guides); metrics.jsonl / interventions.jsonl lose the rows written after it.
        Returns the step. FileNotFoundError without any checkpoint, CheckpointError when none is valid."""
        checkpoint = self.ckpt.newest_valid(self.log)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt.root}")
        self._apply_trainer(checkpoint)
        self._load_runner_state(checkpoint)
        if self._sinks is not None:  # reopened on the next row: metrics.csv follows the truncated metrics.jsonl
            self._sinks.close()
            self._sinks = None
        self._resumed = True
        return self.step

    def _load_runner_state(self, checkpoint) -> None:
        state = checkpoint.runner_state
        self.step = state["step"]
        self.optimizer_steps = state["optimizer_steps"]
        self.samples_total = state["samples_total"]
        self.segment = Segment(**state["segment"])
        self.plans = [{"plan": InterventionPlan(**_plan_args(e["plan"])), "phase": e["phase"]} for e in state["plans"]]
        self.autonpo.load_state_dict(state["autonpo"])
        self.wall_offset = state["wall_time"]
        self.guide_source.load_state(state.get("past_guides", []))
        self.store.truncate_mistakes(self.run, 0)
        by_step: dict[int, list[str]] = {}
        for prompt_id, s in state["mistakes"]:
            by_step.setdefault(int(s), []).append(prompt_id)
        for s in sorted(by_step):
            self.store.record_mistakes(self.run, s, by_step[s])
        if checkpoint.guides_jsonl:
            self.store.put_guides(
                self.run, self.segment.guide_step, [sample_from_json(x) for x in checkpoint.guides_jsonl]
            )
        for name, key in (("metrics.jsonl", "metrics_lines"), ("interventions.jsonl", "interventions_lines")):
            _truncate_lines(self.out / name, state[key])
        raw = self.autonpo.detector.state_dict()["raw"]
        self._last_reading = self.autonpo.detector.reading() if raw else None

    def finish(self) -> None:
        """End the run at the current step: a final checkpoint and a `final` metrics row (with evaluation)."""
        t = self.step
        self._save_checkpoint(t)
        row: dict[str, Any] = {
            "step": t,
            "segment": "final",
            "optimizer_steps": self.optimizer_steps,
            "samples_total": self.samples_total,
        }
        if self.cfg.eval.every > 0:
            row.update(self._evaluate(t))
        row.update(reward_errors=self.task.reward_errors, skipped_rows=self.task.skipped_rows)
        row["wall_time"] = self._wall_time()
        self._write_row(row)

    # ------------------------------------------------------------------------------------------------------------
    # Logging.

    def _write_row(self, row: dict[str, Any]) -> None:
        sinks = self._open_sinks()  # before the append: opening rebuilds metrics.csv from metrics.jsonl
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        sinks.log(row, row["step"])

    def _wall_time(self) -> float:
        return self.wall_offset + time.perf_counter() - self._start

    def _record(self, event: dict[str, Any]) -> None:
        event = {
            **event,
            "optimizer_steps": self.optimizer_steps,
            "wall_time": self._wall_time(),
        }
        with open(self.out / "interventions.jsonl", "a") as f:
            f.write(json.dumps(event, sort_keys=True, default=_jsonable) + "\n")
        if self.progress:
            self.log(f"[{self.run}] step {event['step']}: {event['kind']} {event['event']}")

    def _open_sinks(self) -> Sinks:
        """The logging sinks (npo.runtime.logsinks), opened with run_info.json on the first call after a start or a
        resume, once metrics.jsonl is emptied or truncated (metrics.csv is rebuilt from it)."""
        if self._sinks is None:
            info = write_run_info(self.out, resume=self._resumed)
            config = run_config_to_dict(self.cfg)
            self._sinks = open_sinks(self.cfg.logging, self.out, config, resume=self._resumed, run_info=info)
        return self._sinks

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.cfg.train.steps,
            initial=self.step,
            desc=f"{self.cfg.method.value} {self.run}",
            unit="step",
            dynamic_ncols=True,
        )

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.log("\nCtrl-C: finishing the current step, saving a checkpoint (press again to abort)")

        return signal.signal(signal.SIGINT, handler)


def _plan_args(d: dict[str, Any]) -> dict[str, Any]:
    from npo.core.interventions import InterventionKind

    return {**d, "kind": InterventionKind(d["kind"])}


def _count_lines(path: Path) -> int:
    return sum(1 for _ in open(path)) if path.exists() else 0


def _truncate_lines(path: Path, keep: int) -> None:
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)[:keep]
        path.write_text("".join(lines))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dict__"):
        return value.__dict__
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
