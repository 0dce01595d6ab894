"""AlgoConfig and AutoNPOConfig (npo/core/config.py): defaults, strict loading, coercion, overrides, clear errors."""

import ast
import dataclasses
import inspect
import math
import re

import pytest

from npo.core.config import (
    AlgoConfig,
    AutoNPOConfig,
    ConfigError,
    LossAggregation,
    apply_override,
    from_dict,
    to_dict,
)


def field_docstrings(cls: type) -> dict[str, str]:
    """name -> the string literal written right under the field in the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def test_defaults_follow_the_method_doc():
    algo, auto = AlgoConfig(), AutoNPOConfig()
    # [paper]: n = 8, tau_gate = 0.6, clip 0.2 / 0.28, IS correction available, seq-mean token-mean loss, no KL term
    assert (algo.group_size, algo.tau_gate, algo.eps_low, algo.eps_high) == (8, 0.6, 0.2, 0.28)
    assert algo.loss_aggregation is LossAggregation.SEQ_MEAN_TOKEN_MEAN
    assert algo.kl_coef == 0.0 and algo.entropy_coef == 0.0
    # [ours]: EMA 0.9, window 10, gain < 0.01, entropy drop >= 10%, D = {10, 20, 40, 80}, q_min 0.1, k3, beta = length
    assert (auto.ema_decay, auto.window, auto.reward_gain_min, auto.entropy_drop_frac) == (0.9, 10, 0.01, 0.10)
    assert auto.candidate_deltas == [10, 20, 40, 80]
    assert (auto.q_min, auto.kl_estimator, auto.beta, auto.mistake_pass_rate) == (0.1, "k3", None, 0.0)
    assert AutoNPOConfig().candidate_deltas is not auto.candidate_deltas  # no shared mutable default


@pytest.mark.parametrize("cls", [AlgoConfig, AutoNPOConfig])
def test_every_field_has_a_docstring(cls):
    docs = field_docstrings(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"


@pytest.mark.parametrize("cls", [AlgoConfig, AutoNPOConfig])
def test_defaults_validate_and_round_trip(cls):
    default = cls()
    assert from_dict(cls, {}) == default
    assert from_dict(cls, to_dict(default)) == default


def test_from_dict_reads_values_and_coerces_yaml_strings():
    algo = from_dict(
        AlgoConfig,
        {
            "group_size": 4.0,  # integral float -> 4
            "tau_gate": "0.5",  # string from a CLI override -> 0.5
            "is_correction": "false",
            "scale_std": "yes",
            "loss_aggregation": "token_mean",
            "eps_high": 1,  # int -> 1.0
        },
    )
    assert algo.group_size == 4 and isinstance(algo.group_size, int)
    assert algo.tau_gate == 0.5
    assert algo.is_correction is False and algo.scale_std is True
    assert algo.loss_aggregation is LossAggregation.TOKEN_MEAN
    assert algo.eps_high == 1.0 and isinstance(algo.eps_high, float)
    auto = from_dict(AutoNPOConfig, {"candidate_deltas": "[5, 15]", "beta": None, "kl_estimator": "k1"})
    assert auto.candidate_deltas == [5, 15] and auto.beta is None and auto.kl_estimator == "k1"
    assert from_dict(AutoNPOConfig, {"beta": "2.5"}).beta == 2.5


def test_unknown_key_names_the_closest_key():
    with pytest.raises(ConfigError) as info:
        from_dict(AlgoConfig, {"tau_gat": 0.5})
    assert "tau_gat" in str(info.value) and "'tau_gate'" in str(info.value)
    with pytest.raises(ConfigError, match="candidate_deltas"):
        from_dict(AutoNPOConfig, {"candidate_delta": [10]})
    with pytest.raises(ConfigError, match="algo.*tau_gate"):
        from_dict(AlgoConfig, {"tau_gat": 0.5}, prefix="algo.")


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        from_dict(AlgoConfig, {"zzzzzz": 1})
    message = str(info.value)
    assert "zzzzzz" in message
    assert all(f.name in message for f in dataclasses.fields(AlgoConfig))


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (AlgoConfig, "group_size", 1),
        (AlgoConfig, "tau_gate", -0.1),
        (AlgoConfig, "tau_gate", 1.5),
        (AlgoConfig, "tau_gate", math.nan),
        (AlgoConfig, "eps_low", -0.1),
        (AlgoConfig, "eps_low", 1.5),
        (AlgoConfig, "eps_high", -0.1),
        (AlgoConfig, "adv_eps", -1e-6),
        (AlgoConfig, "entropy_coef", -0.1),
        (AlgoConfig, "kl_coef", -0.1),
        (AutoNPOConfig, "ema_decay", 1.1),
        (AutoNPOConfig, "window", 0),
        (AutoNPOConfig, "entropy_drop_frac", 1.5),
        (AutoNPOConfig, "candidate_deltas", []),
        (AutoNPOConfig, "candidate_deltas", [10, 0]),
        (AutoNPOConfig, "beta", -1.0),
        (AutoNPOConfig, "q_min", 1.5),
        (AutoNPOConfig, "kl_estimator", "k2"),
        (AutoNPOConfig, "cooldown_steps", -1),
        (AutoNPOConfig, "mistake_pool_size", 0),
        (AutoNPOConfig, "mistake_pass_rate", -0.1),
        (AutoNPOConfig, "probe_size", 0),
        (AutoNPOConfig, "probe_samples", 0),
        (AutoNPOConfig, "min_step", -1),
    ],
)
def test_out_of_range_value_names_the_key(cls, key, value):
    with pytest.raises(ConfigError, match=re.escape(key)):
        from_dict(cls, {key: value})


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (AlgoConfig, "group_size", "eight"),
        (AlgoConfig, "group_size", 8.5),
        (AlgoConfig, "group_size", True),
        (AlgoConfig, "tau_gate", "high"),
        (AlgoConfig, "tau_gate", [0.5]),
        (AlgoConfig, "tau_gate", False),
        (AlgoConfig, "is_correction", "maybe"),
        (AlgoConfig, "is_correction", 2),
        (AlgoConfig, "loss_aggregation", "token_men"),
        (AutoNPOConfig, "candidate_deltas", 10),
        (AutoNPOConfig, "candidate_deltas", ["ten"]),
        (AutoNPOConfig, "beta", "large"),
        (AutoNPOConfig, "kl_estimator", True),
    ],
)
def test_wrong_type_names_the_key(cls, key, value):
    with pytest.raises(ConfigError, match=re.escape(key)):
        from_dict(cls, {key: value})


def test_config_error_is_a_value_error_and_enum_error_suggests_a_value():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="did you mean 'token_mean'"):
        from_dict(AlgoConfig, {"loss_aggregation": "token_men"})
    with pytest.raises(ConfigError, match="config"):
        from_dict(AlgoConfig, [("tau_gate", 0.5)])


def test_apply_override_sets_nested_values_parsed_as_yaml():
    data = {"algo": {"tau_gate": 0.6}}
    apply_override(data, "algo.tau_gate=0.4")
    apply_override(data, "algo.is_correction=false")
    apply_override(data, "autonpo.candidate_deltas=[5, 10]")  # a missing section is created
    apply_override(data, " method = npo")  # spaces around the key are stripped
    assert data == {
        "algo": {"tau_gate": 0.4, "is_correction": False},
        "autonpo": {"candidate_deltas": [5, 10]},
        "method": "npo",
    }
    assert from_dict(AlgoConfig, data["algo"]) == AlgoConfig(tau_gate=0.4, is_correction=False)
    assert from_dict(AutoNPOConfig, data["autonpo"]).candidate_deltas == [5, 10]


def test_apply_override_then_validation_names_the_key():
    data = {"algo": {}}
    apply_override(data, "algo.tau_gate=2")
    with pytest.raises(ConfigError, match="tau_gate"):
        from_dict(AlgoConfig, data["algo"], prefix="algo.")


def test_apply_override_rejects_malformed_assignments():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "algo.tau_gate")
    with pytest.raises(ConfigError, match="section"):
        apply_override({"algo": 3}, "algo.tau_gate=0.5")


@pytest.mark.parametrize(("cls", "key"), [(AlgoConfig, "correct_threshold"), (AutoNPOConfig, "reward_gain_min")])
def test_nan_is_rejected_for_unbounded_numbers(cls, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(cls, {key: math.nan})


def test_train_device_is_checked_by_value_in_the_config_and_by_availability_where_used():
    import torch

    from npo.runtime.models import resolve_device
    from npo.runtime.run_config import load_run_config

    assert load_run_config(None, ["train.device=cuda"]).train.device == "cuda"  # a CPU controller reads GPU configs
    with pytest.raises(ConfigError, match="train.device"):
        load_run_config(None, ["train.device=tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device: 'cuda'"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_model_and_rollout_sections_live_in_the_pure_schema():
    """ModelConfig and SamplingParams are defined here (no torch) and are the very classes the runtime uses."""
    from npo.core import config
    from npo.runtime import engine, models

    assert models.ModelConfig is config.ModelConfig and engine.SamplingParams is config.SamplingParams
    assert models.DEVICES is config.DEVICES and models.PRESETS is config.PRESETS
    assert list(models.DTYPES) == list(config.MODEL_DTYPES)
    for cls in (config.ModelConfig, config.SamplingParams):
        docs = field_docstrings(cls)
        assert all(docs.get(f.name, "").strip() for f in dataclasses.fields(cls)), cls
        assert from_dict(cls, {}) == cls() and from_dict(cls, to_dict(cls())) == cls()
    with pytest.raises(ConfigError, match=r"model.dtype: must be one of \['float32', 'bfloat16'\], got 'float16'"):
        from_dict(config.ModelConfig, {"dtype": "float16"})


def test_task_options_are_checked_last_and_other_errors_first():
    """The task's generator options need reasoning-gym (a second to import): the run config checks them after
    every other key, so any other error is reported without that import."""
    from npo.runtime.run_config import load_run_config

    with pytest.raises(ConfigError, match=r"task.options.min_termz: .*did you mean 'min_terms'"):
        load_run_config(None, ["task.options={min_termz: 2}"])
    with pytest.raises(ConfigError, match=r"algo.tau_gate: must be <= 1.0, got 1.5"):
        load_run_config(None, ["task.options={min_termz: 2}", "algo.tau_gate=1.5"])


def test_loading_a_run_config_imports_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; from npo.runtime.run_config import load_run_config; load_run_config('configs/tiny.yaml'); "
        "print([m for m in ('torch', 'transformers', 'services') if m in sys.modules])"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr
