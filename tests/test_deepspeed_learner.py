"""DeepSpeedLearner (services.learner.deepspeed_engine) on a tiny random Llama: a real DeepSpeed engine, ZeRO on
the CPU with gloo, checked against the embedded TorchLearner.

The first engine start in a fresh environment JIT-compiles DeepSpeed's small shared-memory comm op (cached after).
"""

from __future__ import annotations

import copy
import io
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed picks its accelerator
pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")

from reference import GROUP_PROMPTS, PAD, mixed_groups, tiny_llama  # noqa: E402

from npo.core.config import AlgoConfig, LossAggregation  # noqa: E402
from npo.runtime.learner import TorchLearner, load_weights, micro_batches, training_rows  # noqa: E402
from services.learner.deepspeed_engine import DeepSpeedLearner  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = GROUP_PROMPTS
ALGO = AlgoConfig(group_size=4, tau_gate=0.6, is_correction=True)


def learner_kwargs(**overrides):
    kwargs = dict(
        pad_id=PAD, algo=ALGO, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, grad_clip=1.0, micro_batch_size=5
    )
    return {**kwargs, **overrides}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def batches():
    """Three steps' worth of mixed groups, scored under the seed-0 model."""
    model = tiny_llama(0)
    return [mixed_groups(model, seed) for seed in range(3)]


def test_zero2_step_gives_finite_metrics_and_changes_weights(batches):
    model = tiny_llama(0)
    learner = DeepSpeedLearner(model, **learner_kwargs(), zero_stage=2)
    assert learner.engine.zero_optimization_stage() == 2
    before = weights(model)
    metrics = learner.train_step(batches[0], PROMPTS)
    assert set(metrics) >= {"loss", "clip_frac", "clip_frac_guide", "approx_kl", "entropy", "grad_norm", "guide_slots"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["guide_slots"] == 1
    assert metrics["grad_norm"] > 0 and metrics["entropy"] > 0
    after = weights(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every parameter moved (AdamW with a nonzero gradient everywhere)


@pytest.mark.parametrize(
    ("zero_stage", "micro_batch_size", "aggregation"),
    [
        (2, 5, LossAggregation.SEQ_MEAN_TOKEN_MEAN),  # 12 rows -> 3 micro-batches
        (2, 12, LossAggregation.TOKEN_MEAN),  # one micro-batch
        (1, 4, LossAggregation.SEQ_MEAN_TOKEN_SUM_NORM),
        (0, 5, LossAggregation.SEQ_MEAN_TOKEN_MEAN),
    ],
)
def test_one_step_matches_torch_learner(batches, zero_stage, micro_batch_size, aggregation):
    algo = AlgoConfig(group_size=4, tau_gate=0.6, loss_aggregation=aggregation)
    kwargs = learner_kwargs(algo=algo, micro_batch_size=micro_batch_size, max_len=8, grad_clip=0.2)
    reference = tiny_llama(0)
    model = copy.deepcopy(reference)
    plain = TorchLearner(reference, **kwargs)
    learner = DeepSpeedLearner(model, **kwargs, zero_stage=zero_stage)
    want = plain.train_step(batches[0], PROMPTS)
    got = learner.train_step(batches[0], PROMPTS)
    for key in ("loss", "clip_frac", "approx_kl", "entropy", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert want["grad_norm"] > 0.2  # the clip was active
    expected, actual = weights(reference), weights(model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("zero_stage", [2, 0])
def test_rollback_restores_weights_and_optimizer_exactly(batches, tmp_path, zero_stage):
    model = tiny_llama(0)
    learner = DeepSpeedLearner(model, **learner_kwargs(), zero_stage=zero_stage)
    learner.train_step(batches[0], PROMPTS)
    # Checkpoint after step 1 the way the runner does: save_pretrained + torch.save of the learner state.
    model.save_pretrained(tmp_path / "step1", safe_serialization=True)
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    for groups in batches[1:]:
        learner.train_step(groups, PROMPTS)
    first = weights(model)

    load_weights(model, tmp_path / "step1")
    buffer.seek(0)
    learner.load_state_dict(torch.load(buffer, weights_only=True))
    assert learner.optimizer_steps == 1
    for groups in batches[1:]:
        learner.train_step(groups, PROMPTS)
    second = weights(model)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert learner.optimizer_steps == 3


def test_one_optimizer_step_per_train_step_with_many_micro_batches(batches):
    model = tiny_llama(0)
    learner = DeepSpeedLearner(model, **learner_kwargs(micro_batch_size=2), zero_stage=2)
    rows = training_rows(batches[0], PROMPTS, ALGO)
    assert len(micro_batches(rows, 2, LossAggregation(ALGO.loss_aggregation))) == 6
    for step, groups in enumerate(batches[:2], start=1):
        learner.train_step(groups, PROMPTS)
        assert learner.optimizer_steps == step
        base = learner.engine.optimizer.optimizer  # the AdamW inside ZeRO, on the flat fp32 partition
        [state] = base.state.values()
        assert int(state["step"]) == step


def test_bfloat16_autocast_step_keeps_float32_weights(batches):
    model = tiny_llama(0)
    learner = DeepSpeedLearner(model, **learner_kwargs(dtype="bfloat16"), zero_stage=2)
    before = weights(model)
    metrics = learner.train_step(batches[0], PROMPTS)
    assert all(math.isfinite(v) for v in metrics.values())
    after = weights(model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_micro_batch_weights_sum_to_one(batches):
    rows = training_rows(batches[0], PROMPTS, ALGO)
    for mode in LossAggregation:
        chunks = micro_batches(rows, 5, mode)
        assert [len(c) for c, _ in chunks] == [5, 5, 2]
        assert sum(w for _, w in chunks) == pytest.approx(1.0)


def test_rejects_zero3_and_unknown_dtype():
    with pytest.raises(ValueError, match="zero_stage"):
        DeepSpeedLearner(tiny_llama(0), **learner_kwargs(), zero_stage=3)
    with pytest.raises(ValueError, match="dtype"):
        DeepSpeedLearner(tiny_llama(0), **learner_kwargs(dtype="float16"))


@pytest.mark.parametrize("zero_stage", [2, 0])
def test_nan_guide_logprobs_skip_the_step_like_torch_learner(batches, zero_stage):
    poisoned = mixed_groups(tiny_llama(0), 0)
    (gated,) = [g for g in poisoned if g.replaced]
    gated.behaviour_logprobs[-1] = [float("nan")] * len(gated.behaviour_logprobs[-1])  # the guide slot's q_i
    reference = tiny_llama(0)
    model = copy.deepcopy(reference)
    plain = TorchLearner(reference, **learner_kwargs())
    learner = DeepSpeedLearner(model, **learner_kwargs(), zero_stage=zero_stage)
    before = weights(model)
    metrics = learner.train_step(poisoned, PROMPTS)
    assert metrics["nonfinite_skipped"] == 1 and not math.isfinite(metrics["loss"])
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())
    assert learner.state_dict()["nonfinite_skipped"] == 1
    plain.train_step(poisoned, PROMPTS)
    for groups in batches[:2]:  # both go on from untouched weights and optimizer state
        want, got = plain.train_step(groups, PROMPTS), learner.train_step(groups, PROMPTS)
        assert got["nonfinite_skipped"] == want["nonfinite_skipped"] == 1
    expected, actual = weights(reference), weights(model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
