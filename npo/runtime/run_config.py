"""The whole run's configuration: one YAML file, sections mapping to dataclasses, CLI overrides `key=value`.

    method: autonpo          # grpo | npo | autonpo
    seed: 0
    model: {preset: tiny}
    task: {name: chain_sum, options: {min_terms: 2, max_terms: 2}}
    train: {steps: 300, prompts_per_step: 32, lr: 3e-4}
    algo: {group_size: 8, tau_gate: 0.6}
    autonpo: {candidate_deltas: [10, 20, 40]}

Every section's fields are documented where the dataclass is defined; `npo train --help-config` prints them all.
Loading and validating a run config imports no torch, transformers or reasoning-gym until every other check has
passed (the task's generator options are checked last, with reasoning-gym), so that a config error is reported in
well under two seconds, before the runtime is imported.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npo.core.config import (
    DEVICES,
    AlgoConfig,
    AutoNPOConfig,
    ConfigError,
    Method,
    ModelConfig,
    SamplingParams,
    _check_range,
    _field_doc,
    apply_override,
    from_dict,
    load_yaml,
    to_dict,
)
from npo.core.interventions import InterventionPlan, repeated_plateau_plans
from npo.runtime.logsinks import LoggingConfig
from npo.runtime.tasks import TaskConfig


@dataclass
class TrainConfig:
    """The learner's step loop."""

    steps: int = 300
    """Training steps of the main line (replayed segments are extra optimizer steps, counted as compute)."""
    prompts_per_step: int = 32
    """Prompts per step; each gets a group of algo.group_size samples."""
    lr: float = 3e-4
    """AdamW learning rate (constant)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    micro_batch_size: int = 256
    """Sequences per forward/backward; gradients accumulate over micro-batches into one optimizer step."""
    dtype: str = "float32"
    """Training precision: float32 or bfloat16 (autocast; master weights stay float32)."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default)."""
    device: str = "auto"
    """Where the policy trains and samples: "auto" (cuda when torch.cuda.is_available(), else cpu), "cpu" or
    "cuda" (an error when torch sees no GPU). The rollout engine and the learner use the policy's device; the
    deepspeed engine picks its accelerator (NCCL on CUDA, gloo on the CPU) from it. Bit-reproducibility across
    runs is promised on the CPU only."""
    engine: str = "torch"
    """Learner engine: "torch" (embedded default) or "deepspeed" (services/learner; needs the `deepspeed` extra)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (0, 1 or 2) when engine is "deepspeed"."""


@dataclass
class EvalConfig:
    """Held-out evaluation, on its own random stream (it never changes training)."""

    every: int = 20
    """Evaluate every this many steps (and at step 0 and at the end); 0 = never."""
    num_prompts: int = 500
    """Held-out prompts (from the task's test split)."""
    samples_per_prompt: int = 2
    """Sampled responses per prompt; eval_acc is the mean verified reward."""
    temperature: float = 1.0
    """Sampling temperature for evaluation."""
    greedy: bool = True
    """Also report eval_greedy_acc (one greedy response per prompt)."""


@dataclass
class CheckpointConfig:
    """Checkpoints: HF safetensors weights + optimizer + RNG + data cursor + step + config, written atomically."""

    every: int = 10
    """Save every this many steps (and at segment boundaries). AutoNPO checks its trigger at these steps."""
    keep_last: int = 0
    """Keep at most this many checkpoints besides those a pending intervention needs (0 = keep all)."""


@dataclass
class CacheConfig:
    """The guidance-trajectory cache."""

    url: str = ""
    """Redis URL (redis://host:port/db or unix:///path); empty = start an embedded Redis-protocol server."""
    prefix: str = "npo"
    """Key prefix; keys are namespaced by run name under it."""


@dataclass
class PrometheusConfig:
    """Where the controller reads the run's metrics."""

    url: str = ""
    """Prometheus server (http://host:9090) queried with PromQL; empty = scrape the learner's /metrics directly."""


@dataclass
class ControllerConfig:
    """The AutoNPO controller service (services/controller)."""

    poll_seconds: float = 1.0
    """Seconds between two reads of the metrics (each new step is fed to the AutoNPO trigger)."""
    stale_after_seconds: float = 60.0
    """Metrics older than this are reported stale and not used (Prometheus source)."""
    autonpo: bool = True
    """Run AutoNPO from the controller when method=autonpo (the learner then trains with method=grpo)."""


@dataclass
class InterventionConfig:
    """One manual NPO intervention (docs/method.md: manual plans)."""

    enabled: bool = False
    """Run this intervention."""
    at_step: int = 0
    """t0 (early bootstrap) or t_p (plateau): where scouting starts and the run rolls back to."""
    delta: int = 20
    """Delta: scout length; the guide is pi^(at_step + delta)."""
    replay_steps: int = 0
    """NPO segment length after the rollback (0 = delta)."""
    repeat_every: int = 0
    """Late intervention only: repeat it every this many steps after at_step while it fits in train.steps (0 = once;
    the paper runs it once). Each repeat must start after the previous replay ends."""
    delta_growth: float = 1.0
    """Late intervention only: the k-th repeat uses Delta_k = round(delta * delta_growth^k) (1 = the same Delta; the
    Delta schedule of repeated interventions, see npo.core.interventions.repeated_plateau_plans)."""


@dataclass
class NPOConfig:
    """Manual interventions of method=npo, and guide generation."""

    early: InterventionConfig = field(default_factory=lambda: InterventionConfig(enabled=True, at_step=0, delta=20))
    """Early-stage bootstrapping."""
    late: InterventionConfig = field(default_factory=InterventionConfig)
    """Late-stage plateau breakthrough (disabled by default)."""
    guide_samples: int = 8
    """Samples per prompt drawn from the guide checkpoint; the first verified-correct one becomes the guide."""


GUIDE_SOURCES = ("auto", "near_future", "past", "far_future", "external", "none")
MODEL_SOURCES = ("far_future", "external")


@dataclass
class GuideConfig:
    """Where the guide slot's trajectory comes from (docs/method.md: guide sources, the quality/variance trade-off)."""

    source: str = "auto"
    """near_future: pi^(t+Delta) of this run, reached by scouting ahead (NPO; method npo or autonpo). past: the run's
    own earlier verified trajectories (ExGRPO-like replay). far_future: a finished run's final checkpoint,
    `guide.model` (RLEP-like). external: another model, `guide.model` (LUFFY-like). none: no guide (GRPO).
    auto = near_future for method npo/autonpo, none for grpo. past, far_future and external run with method grpo and
    offer a guide at every step to every gated group (pass rate <= algo.tau_gate) that has one."""
    model: str = ""
    """far_future / external: the guide model's HF folder (a checkpoint folder of another run, or any model with the
    policy's vocabulary). Its guides are sampled once for the whole train split (npo.guide_samples per prompt, seeded
    by the run seed; the first verified-correct sample of a prompt is its guide) and counted in samples_total."""
    past_max_age: int = 0
    """past: replay only trajectories at most this many steps old (0 = any age). The newest verified trajectory of a
    prompt is kept; a rollback to step s forgets those sampled at or after s."""

    def resolved(self, method: Method) -> str:
        """The source in effect: auto resolved by the method."""
        if self.source != "auto":
            return self.source
        return "none" if method is Method.GRPO else "near_future"


@dataclass
class RunConfig:
    """A training run."""

    method: Method = Method.AUTONPO
    """grpo (no guides), npo (manual interventions in `npo`), or autonpo (adaptive, `autonpo`)."""
    seed: int = 0
    """Run seed: rollout, evaluation and data order all derive from it and the step (bit-reproducible on CPU)."""
    run_name: str = ""
    """Namespace of this run in the guidance cache (empty = derived from the output folder)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Task, data and reward."""
    rollout: SamplingParams = field(default_factory=SamplingParams)
    """Sampling of training rollouts."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Learner."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """GRPO / NPO step."""
    autonpo: AutoNPOConfig = field(default_factory=AutoNPOConfig)
    """AutoNPO trigger and Delta selection."""
    npo: NPOConfig = field(default_factory=NPOConfig)
    """Manual NPO interventions."""
    guide: GuideConfig = field(default_factory=GuideConfig)
    """Guide source (near future, past, far future, external, none)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Guidance cache."""
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    """Prometheus server the controller reads."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """The controller service."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Where metrics rows go besides metrics.jsonl: TensorBoard, metrics.csv, Weights & Biases (offline by default)."""

    def late_plans(self) -> list[InterventionPlan]:
        """method npo's late intervention(s): one plan, or its repeats (npo.late.repeat_every, delta_growth)."""
        late = self.npo.late
        return repeated_plateau_plans(
            late.at_step, late.delta, late.replay_steps or None, late.repeat_every, late.delta_growth, self.train.steps
        )

    def _validate_repeats(self) -> None:
        if self.npo.early.repeat_every or self.npo.early.delta_growth != 1.0:
            raise ConfigError("npo.early.repeat_every: only the late intervention repeats (delta_growth likewise)")
        late = self.npo.late
        _check_range("npo.late.repeat_every", late.repeat_every, 0)
        if not late.delta_growth > 0:
            raise ConfigError(f"npo.late.delta_growth: must be > 0, got {late.delta_growth}")
        if self.method is Method.NPO and late.enabled:
            try:
                self.late_plans()
            except ValueError as exc:
                raise ConfigError(f"npo.late.repeat_every: {exc}") from None

    def validate(self) -> None:
        t = self.train
        _check_range("train.steps", t.steps, 1)
        _check_range("train.prompts_per_step", t.prompts_per_step, 1)
        _check_range("train.lr", t.lr, 0.0)
        _check_range("train.grad_clip", t.grad_clip, 0.0)
        _check_range("train.micro_batch_size", t.micro_batch_size, 1)
        _check_range("train.threads", t.threads, 0)
        if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
            raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
        if t.engine not in ("torch", "deepspeed"):
            raise ConfigError(f"train.engine: must be 'torch' or 'deepspeed', got {t.engine!r}")
        if t.zero_stage not in (0, 1, 2):
            raise ConfigError(f"train.zero_stage: must be 0, 1 or 2 (stage 3 is not supported), got {t.zero_stage}")
        if t.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.dtype: must be 'float32' or 'bfloat16', got {t.dtype!r}")
        if t.device not in DEVICES:  # "cuda" without a GPU fails where the device is used (resolve_device), so a
            # CPU-only role (the controller) can read a GPU run's config
            raise ConfigError(f"train.device: must be one of {list(DEVICES)}, got {t.device!r}")
        _check_range("rollout.temperature", self.rollout.temperature, 1e-3)
        _check_range("rollout.top_p", self.rollout.top_p, 1e-6, 1.0)
        _check_range("rollout.max_new_tokens", self.rollout.max_new_tokens, 1)
        _check_range("eval.every", self.eval.every, 0)
        _check_range("eval.num_prompts", self.eval.num_prompts, 1)
        _check_range("eval.samples_per_prompt", self.eval.samples_per_prompt, 1)
        _check_range("checkpoint.every", self.checkpoint.every, 1)
        _check_range("checkpoint.keep_last", self.checkpoint.keep_last, 0)
        _check_range("npo.guide_samples", self.npo.guide_samples, 1)
        _check_range("controller.poll_seconds", self.controller.poll_seconds, 0.01)
        _check_range("controller.stale_after_seconds", self.controller.stale_after_seconds, 0.0)
        if self.prometheus.url and not self.prometheus.url.startswith(("http://", "https://")):
            raise ConfigError(f"prometheus.url: expected an http(s):// URL, got {self.prometheus.url!r}")
        for name in ("early", "late"):
            iv: InterventionConfig = getattr(self.npo, name)
            _check_range(f"npo.{name}.at_step", iv.at_step, 0)
            _check_range(f"npo.{name}.delta", iv.delta, 1)
            _check_range(f"npo.{name}.replay_steps", iv.replay_steps, 0)
            if iv.enabled and self.method is Method.NPO and iv.at_step + iv.delta > t.steps:
                raise ConfigError(f"npo.{name}: at_step + delta ({iv.at_step + iv.delta}) exceeds train.steps")
        self._validate_repeats()
        early, late = self.npo.early, self.npo.late
        if self.method is Method.NPO and early.enabled and late.enabled:
            early_end = early.at_step + max(early.delta, early.replay_steps or early.delta)
            if late.at_step < early_end:
                raise ConfigError(
                    f"npo.late.at_step: {late.at_step} starts before the early intervention ends (step {early_end})"
                )
        g = self.guide
        if g.source not in GUIDE_SOURCES:
            raise ConfigError(f"guide.source: must be one of {list(GUIDE_SOURCES)}, got {g.source!r}")
        source = g.resolved(self.method)
        if self.method is not Method.GRPO and source != "near_future":
            raise ConfigError(
                f"guide.source: method {self.method.value} takes its guides from the near future; {source!r} guides "
                "run with method: grpo"
            )
        if self.method is Method.GRPO and source == "near_future":
            raise ConfigError("guide.source: near_future guides come from scouting ahead: use method npo or autonpo")
        if source in MODEL_SOURCES and not g.model:
            raise ConfigError(f"guide.model: guide.source {source!r} needs the guide model's folder")
        if source not in MODEL_SOURCES and g.model:
            raise ConfigError(f"guide.model: only used by guide.source far_future or external, not {source!r}")
        _check_range("guide.past_max_age", g.past_max_age, 0)
        for d in self.autonpo.candidate_deltas:
            if d % self.checkpoint.every:
                raise ConfigError(
                    f"autonpo.candidate_deltas: {d} is not a multiple of checkpoint.every ({self.checkpoint.every})"
                )
        self.task.validate_options()  # last: it imports reasoning-gym (from_dict ran task.validate_fields only)


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (optional), apply `key=value` overrides, build and validate. Raises ConfigError naming the key."""
    data: dict[str, Any] = load_yaml(path) if path else {}
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return from_dict(RunConfig, data)


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return to_dict(cfg)


def describe_config(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default and the field's docstring (for `npo train --help-config`)."""
    lines = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{prefix}{f.name}:  # {_field_doc(cls, f.name)}")
            lines.extend(describe_config(type(value), prefix + f.name + "."))
        else:
            lines.append(f"{prefix}{f.name} = {to_dict(value)!r}  # {_field_doc(cls, f.name)}")
    return lines
