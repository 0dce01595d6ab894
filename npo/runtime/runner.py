"""The step loop: GRPO, NPO (manual interventions) and AutoNPO on one set of roles.

The runner drives the data path of one step (docs/architecture.md):

    prompts (data cursor = step) -> rollout.generate(n) -> verify -> p_hat -> mistakes to the pool
    -> [NPO segment] guides from the cache for gated prompts -> mixed groups -> learner.train_step -> metrics

and executes interventions, which are pure plans (npo.core.interventions) or AutoNPO decisions (npo.core.autonpo):
scout (plain training), generate + verify guides with the guide checkpoint, cache them, roll back (weights,
optimizer, RNG, data cursor), replay the segment with NPO.

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

from npo.core.autonpo import AutoNPO, mean_token_kl
from npo.core.config import Method
from npo.core.gate import build_mixed_groups, first_correct, group_pass_rate
from npo.core.interventions import (
    InterventionPlan,
    autonpo_plan,
    early_bootstrap_plan,
    plateau_breakthrough_plan,
)
from npo.core.seeds import derive_seed
from npo.core.types import Problem, Sample
from npo.runtime.checkpoint import CheckpointManager, rng_state, set_rng_state
from npo.runtime.engine import RolloutEngine, SamplingParams, TransformersEngine
from npo.runtime.learner import TorchLearner, load_weights
from npo.runtime.run_config import MODEL_SOURCES, RunConfig, run_config_to_dict
from npo.runtime.store import GuideStore, sample_from_json, sample_to_json


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
    """What the runner needs of a learner: npo.runtime.learner.TorchLearner, or services/learner's DeepSpeedLearner."""

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
        self._tb = None
        self.guide_source = cfg.guide.resolved(cfg.method)
        self._past: dict[str, Sample] = {}  # guide.source past: prompt -> newest verified trajectory
        self._model_guides: dict[str, Sample] | None = None  # far_future / external: prompt -> guide
        if cfg.method is Method.NPO:
            for name, make in (("early", early_bootstrap_plan), ("late", plateau_breakthrough_plan)):
                iv = getattr(cfg.npo, name)
                if iv.enabled:
                    plan = make(iv.at_step, iv.delta, iv.replay_steps or None)
                    self.plans.append({"plan": plan, "phase": "pending"})

    # ------------------------------------------------------------------------------------------------------------
    # Public entry points.

    def train(self, resume: bool = False) -> Path:
        """Run to train.steps (from the latest checkpoint when resuming); returns the run folder."""
        (self.out / "config.yaml").write_text(_yaml(run_config_to_dict(self.cfg)))
        if resume:
            self._resume()
        else:
            for name in ("metrics.jsonl", "interventions.jsonl"):
                (self.out / name).write_text("")
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        previous = self._install_sigint()
        try:
            self.run_until(self.cfg.train.steps)
            self.finish()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self._tb is not None:
                self._tb.close()
                self._tb = None
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

    def _rollout_params(self) -> SamplingParams:
        return self.cfg.rollout

    def _verify(self, problems: Sequence[Problem], generations, policy_step: int) -> list[list[Sample]]:
        decode = self.policy.tokenizer.decode
        groups = []
        for problem, gens in zip(problems, generations):
            group = []
            for g in gens:
                text = decode(g.token_ids, skip_special_tokens=True)
                reward = float(self.task.reward(problem, text)) if g.finished else 0.0
                group.append(
                    Sample(
                        problem.prompt_id, list(g.token_ids), list(g.logprobs), reward, text, policy_step, g.finished
                    )
                )
            groups.append(group)
        self.samples_total += sum(len(g) for g in generations)
        return groups

    def _train_one_step(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.step
        started = time.perf_counter()
        self.sync_weights()
        problems = self.sampler.batch(t)
        prompt_ids = {p.prompt_id: self.policy.encode_prompt(p) for p in problems}
        gens = self.engine.generate(
            [prompt_ids[p.prompt_id] for p in problems],
            cfg.algo.group_size,
            self._rollout_params(),
            seed=derive_seed(cfg.seed, "rollout", t),
        )
        groups = self._verify(problems, gens, t)
        gen_seconds = time.perf_counter() - started
        thr = cfg.algo.correct_threshold
        pass_rates = {g[0].prompt_id: group_pass_rate(g, thr) for g in groups}
        failed = [p for p, r in pass_rates.items() if r <= cfg.autonpo.mistake_pass_rate]
        if failed:
            self.store.record_mistakes(self.run, t, failed)

        guides: dict[str, Sample] = {}
        tau_gate, is_correction = self.segment.gate(cfg.algo)
        gated = [p for p, r in pass_rates.items() if r <= tau_gate]
        if self.segment.npo and gated:
            guides = self.store.get_guides(self.run, self.segment.guide_step, gated)
        elif self.guide_source == "past":
            oldest = t - cfg.guide.past_max_age if cfg.guide.past_max_age else 0
            guides = {p: self._past[p] for p in gated if p in self._past and self._past[p].policy_step >= oldest}
        elif self.guide_source in MODEL_SOURCES:
            model_guides = self._guide_model_guides()
            guides = {p: model_guides[p] for p in gated if p in model_guides}
        if self.guide_source == "past":
            for sample in first_correct(groups, thr):
                self._past[sample.prompt_id] = sample

        def rollout_logprobs(guide_samples: list[Sample]) -> list[list[float]]:
            return self.engine.score(
                [prompt_ids[s.prompt_id] for s in guide_samples],
                [s.response_ids for s in guide_samples],
                temperature=cfg.rollout.temperature,
            )

        mixed = build_mixed_groups(
            groups,
            guides,
            tau_gate=tau_gate,
            correct_threshold=thr,
            is_correction=is_correction,
            rollout_logprobs=rollout_logprobs,
        )
        metrics = self.learner.train_step(mixed, prompt_ids)
        self._weights_changed = True
        self.optimizer_steps += 1
        onpolicy = [s for g in groups for s in g]
        row: dict[str, Any] = {
            "step": t,
            "segment": self.segment.name,
            "reward_mean": float(np.mean([s.reward for s in onpolicy])),
            "pass_rate": float(np.mean(list(pass_rates.values()))),
            "zero_groups": sum(r == 0.0 for r in pass_rates.values()) / len(pass_rates),
            "gated_groups": sum(r <= tau_gate for r in pass_rates.values()),
            "response_len": float(np.mean([len(s.response_ids) for s in onpolicy])),
            "gen_seconds": gen_seconds,
            **metrics,
            "optimizer_steps": self.optimizer_steps,
            "samples_total": self.samples_total,
        }
        row.update(self._pending_eval)
        self._pending_eval = {}
        if self.publish is not None:
            row["weight_sync_seconds"] = self._sync_seconds
            self._sync_seconds = 0.0
        row["wall_time"] = self.wall_offset + time.perf_counter() - self._start
        self._write_row(row)
        if cfg.method is Method.AUTONPO and math.isfinite(row["entropy"]):
            self._last_reading = self.autonpo.observe(t, row["reward_mean"], row["entropy"])
        if self.segment.end == t + 1:
            self.segment = Segment("grpo")
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
        if entry["phase"] == "pending" and plan.scout_from is not None and t == plan.scout_from:
            entry["phase"] = "scouting"
            self.segment = Segment("scout")
            self._record({"kind": plan.kind.value, "event": "scout_start", "step": t, "plan": plan.to_dict()})
        if entry["phase"] == "scouting" and t == plan.guide_step:
            prompts = {p.prompt_id: p for s in plan.replay_range() for p in self.sampler.batch(s)}
            found = self._make_guides(list(prompts.values()), plan.guide_step)
            self._record(
                {
                    "kind": plan.kind.value,
                    "event": "guides",
                    "step": t,
                    "guide_step": plan.guide_step,
                    "prompts": len(prompts),
                    "guides": found,
                }
            )
            self._rollback(plan.rollback_step)
            entry["phase"] = "replaying"
            self.segment = Segment("npo_replay", True, plan.guide_step, plan.replay_end)
            self._record(
                {
                    "kind": plan.kind.value,
                    "event": "rollback",
                    "step": t,
                    "to_step": plan.rollback_step,
                    "replay_steps": plan.replay_steps,
                }
            )
        elif entry["phase"] == "replaying" and self.step >= plan.replay_end:
            entry["phase"] = "done"

    def _make_guides(self, problems: list[Problem], guide_step: int) -> int:
        """Sample guide_samples responses per prompt with the current policy pi^(guide_step); cache the first
        verified-correct one of each prompt. Returns the number of prompts with a guide."""
        cfg = self.cfg
        self.sync_weights()
        prompt_ids = [self.policy.encode_prompt(p) for p in problems]
        gens = self.engine.generate(
            prompt_ids, cfg.npo.guide_samples, self._rollout_params(), seed=derive_seed(cfg.seed, "guides", guide_step)
        )
        groups = self._verify(problems, gens, guide_step)
        guides = first_correct(groups, cfg.algo.correct_threshold)
        if guides:
            self.store.put_guides(self.run, guide_step, guides)
        return len(guides)

    def _guide_model_guides(self) -> dict[str, Sample]:
        """guide.source far_future / external: guide.model's first verified-correct sample of npo.guide_samples for
        every train prompt, sampled once (seeded by the run seed only, so a resumed run gets the same guides)."""
        if self._model_guides is not None:
            return self._model_guides
        from npo.runtime.models import ModelConfig, load_policy

        cfg = self.cfg
        folder = Path(cfg.guide.model).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"guide.model: {folder} is not an HF model folder (no config.json)")
        guide_policy = load_policy(ModelConfig(preset=str(folder), dtype="float32"), seed=0)
        if guide_policy.tokenizer.get_vocab() != self.policy.tokenizer.get_vocab():
            raise ValueError(f"guide.model: {folder} has another vocabulary than the policy (tokens must be shared)")
        device = next(self.policy.model.parameters()).device
        guide_policy.model.to(device)
        engine = TransformersEngine(guide_policy.model, eos_id=guide_policy.eos_id, pad_id=guide_policy.pad_id)
        problems = list(self.task.train)
        guides: dict[str, Sample] = {}
        chunk = 512
        for lo in range(0, len(problems), chunk):
            part = problems[lo : lo + chunk]
            gens = engine.generate(
                [self.policy.encode_prompt(p) for p in part],
                cfg.npo.guide_samples,
                self._rollout_params(),
                seed=derive_seed(cfg.seed, f"guide-model/{lo}", 0),
            )
            for sample in first_correct(self._verify(part, gens, -1), cfg.algo.correct_threshold):
                guides[sample.prompt_id] = sample
        self._model_guides = guides
        self._record(
            {
                "kind": self.guide_source,
                "event": "guides",
                "step": self.step,
                "model": str(folder),
                "prompts": len(problems),
                "guides": len(guides),
            }
        )
        return guides

    def _maybe_autonpo(self, t: int) -> None:
        reading = self._last_reading
        if reading is None or not self.autonpo.wants_probe(reading):
            return
        cfg = self.cfg
        deltas = self.autonpo.candidate_deltas(t, self.ckpt.steps())
        if not deltas:
            return
        mistakes = self.store.get_mistakes(self.run, t - max(deltas), t)
        probe_ids = self.autonpo.probe_prompts(t, mistakes, deltas, derive_seed(cfg.seed, "probe-pick", t))
        if not probe_ids:
            self.autonpo.cooldown_until = t + cfg.autonpo.window
            return
        problems = [self.problems[p] for p in probe_ids if p in self.problems]
        self.sync_weights()
        prompt_ids = [self.policy.encode_prompt(p) for p in problems]
        gens = self.engine.generate(
            prompt_ids, cfg.autonpo.probe_samples, self._rollout_params(), seed=derive_seed(cfg.seed, "probe", t)
        )
        groups = self._verify(problems, gens, t)
        thr = cfg.algo.correct_threshold
        solved = {g[0].prompt_id: any(s.reward >= thr for s in g) for g in groups}
        flat = [(pi, s) for pi, g in zip(prompt_ids, groups) for s in g if s.response_ids]
        current = [s.logprobs for _, s in flat]
        kl_by_delta = {}
        for d in deltas:
            past = self._score_under(t - d, [pi for pi, _ in flat], [s.response_ids for _, s in flat])
            kl_by_delta[d] = mean_token_kl(current, past, cfg.autonpo.kl_estimator)
        mean_len = float(np.mean([len(s.response_ids) for _, s in flat])) if flat else 0.0
        decision = self.autonpo.decide(t, mistakes, solved, kl_by_delta, mean_len, reading)
        self._record(
            {
                "kind": "autonpo",
                "event": "probe",
                "step": t,
                "probed": len(problems),
                "solved": int(sum(solved.values())),
                "reading": reading.__dict__,
                "candidates": [c.__dict__ for c in self.autonpo.last_candidates],
                "decision": decision.to_dict() if decision else None,
            }
        )
        if decision is None:
            return
        by_prompt = {g[0].prompt_id: g for g in groups}
        guides = [next(s for s in by_prompt[p] if s.reward >= thr) for p in decision.prompt_ids]
        self.store.put_guides(self.run, decision.guide_step, guides)
        plan = autonpo_plan(t, decision.delta)
        self._rollback(plan.rollback_step)
        self.segment = Segment("autonpo_replay", True, plan.guide_step, plan.replay_end)
        self._record(
            {
                "kind": "autonpo",
                "event": "rollback",
                "step": t,
                "to_step": plan.rollback_step,
                "delta": decision.delta,
                "guides": len(guides),
                "plan": plan.to_dict(),
            }
        )

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
        decode = self.policy.tokenizer.decode
        scores = [
            float(self.task.reward(p, decode(g.token_ids, skip_special_tokens=True))) if g.finished else 0.0
            for p, gs in zip(problems, gens)
            for g in gs
        ]
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
            "past_guides": [sample_to_json(s) for _, s in sorted(self._past.items())],
            "metrics_lines": _count_lines(self.out / "metrics.jsonl"),
            "interventions_lines": _count_lines(self.out / "interventions.jsonl"),
            "wall_time": self.wall_offset + time.perf_counter() - self._start,
        }

    def _save_checkpoint(self, step: int) -> Path:
        guides = []
        if self.segment.npo:
            ids = sorted({p.prompt_id for s in range(step, self.segment.end) for p in self.sampler.batch(s)})
            guides = [sample_to_json(g) for g in self.store.get_guides(self.run, self.segment.guide_step, ids).values()]

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
        checkpoint = self.ckpt.load(step)
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
        self._past = {p: s for p, s in self._past.items() if s.policy_step < to_step}
        self.autonpo.on_rollback(to_step)
        self._last_reading = None
        self._pending_eval = self._evaluate(to_step) if self._eval_due(to_step) else {}

    def _resume(self) -> None:
        step = self.ckpt.latest()
        if step is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt.root}")
        checkpoint = self._restore_trainer(step)
        state = checkpoint.runner_state
        self.step = state["step"]
        self.optimizer_steps = state["optimizer_steps"]
        self.samples_total = state["samples_total"]
        self.segment = Segment(**state["segment"])
        self.plans = [{"plan": InterventionPlan(**_plan_args(e["plan"])), "phase": e["phase"]} for e in state["plans"]]
        self.autonpo.load_state_dict(state["autonpo"])
        self.wall_offset = state["wall_time"]
        self._past = {s.prompt_id: s for s in map(sample_from_json, state.get("past_guides", []))}
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
        row["wall_time"] = self.wall_offset + time.perf_counter() - self._start
        self._write_row(row)

    # ------------------------------------------------------------------------------------------------------------
    # Logging.

    def _write_row(self, row: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    tb.add_scalar(key, value, row["step"])

    def _record(self, event: dict[str, Any]) -> None:
        event = {
            **event,
            "optimizer_steps": self.optimizer_steps,
            "wall_time": self.wall_offset + time.perf_counter() - self._start,
        }
        with open(self.out / "interventions.jsonl", "a") as f:
            f.write(json.dumps(event, sort_keys=True, default=_jsonable) + "\n")
        if self.progress:
            self.log(f"[{self.run}] step {event['step']}: {event['kind']} {event['event']}")

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.out / "tensorboard"))
        return self._tb or None

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
