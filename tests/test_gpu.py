"""The embedded engines on a CUDA device (marker `gpu`; every test is skipped when torch.cuda.is_available() is False).

- TransformersEngine samples on CUDA with its own CUDA generator; the sampled log-probs equal teacher-forced scoring
  (float32 and bfloat16) and float32 scores equal the CPU's.
- TorchLearner's step on CUDA matches the same step on the CPU.
- DeepSpeedLearner, ZeRO-2 over NCCL in a one-process world, takes NPO steps on CUDA (matching TorchLearner on CUDA),
  and a rollback through a checkpoint (save_pretrained + torch.save, read back the runner's way) replays bit for bit.
- Runner: a short NPO run of the tiny preset on CUDA, with the torch and the deepspeed learner: scout, guides,
  rollback, replay, checkpoints; scoring under a checkpoint runs on the policy's device.

Step timings are printed, never asserted (see them with -rA or -s). Nothing here needs reasoning-gym or a server:
the runner's task is a small local addition task and the guidance store is the in-memory one.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
from reference import EARLY_BOOTSTRAP_SEGMENTS, GROUP_PROMPTS, PAD, mixed_groups, tiny_llama
from safetensors.torch import load_file

from npo.core.config import AlgoConfig
from npo.core.types import Problem
from npo.runtime.engine import SamplingParams, TransformersEngine
from npo.runtime.learner import TorchLearner, load_weights
from npo.runtime.models import ModelConfig, load_policy
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import Runner, learner_kwargs
from npo.runtime.store import MemoryGuideStore
from npo.runtime.tasks import COMPACT_ALPHABET

DEVICE = torch.device("cuda")
"""Where the checks run."""
ON_DEVICE = torch.cuda.is_available()

if ON_DEVICE:
    os.environ.setdefault("DS_ACCELERATOR", DEVICE.type)  # read once, when deepspeed picks its accelerator
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at its first use)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_DEVICE, reason="needs a CUDA device")]

PROMPTS = GROUP_PROMPTS
ALGO = AlgoConfig(group_size=4, tau_gate=0.6, is_correction=True)
LR = 1e-2


def kwargs_for_learner(**overrides):
    kwargs = dict(pad_id=PAD, algo=ALGO, lr=LR, betas=(0.9, 0.99), weight_decay=0.01, grad_clip=1.0, micro_batch_size=5)
    return {**kwargs, **overrides}


def weights(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def device_rng_state() -> torch.Tensor:
    """The global RNG state of DEVICE (what a checkpoint would have to save if anything drew from it)."""
    return torch.cuda.get_rng_state() if DEVICE.type == "cuda" else torch.random.get_rng_state()


def assert_adam_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], steps: int) -> None:
    """Weights after the same AdamW steps on two devices agree.

    AdamW's first update is lr * g / (|g| + 1e-8) per element: for |g| near 1e-8 a float32 rounding difference in
    g (about 1e-6 of the summed terms) changes the update by up to lr, so a handful of elements may differ by up to
    a few lr. The check: every element within 4 * lr * steps, and all but 1 in 1000 within 1e-5 (an elementwise
    rounding difference of g moves an update by ~1e-8).
    """
    for name, want in expected.items():
        diff = (actual[name] - want).abs()
        assert float(diff.max()) <= 4 * LR * steps, name
        assert float((diff > 1e-5).float().mean()) <= 1e-3, (name, float(diff.max()))


@pytest.fixture
def strict_float32():
    """float32 matmuls without TF32, deterministic kernels where torch has them; restored afterwards."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved[0]
    torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


@pytest.fixture(scope="module")
def batches():
    """Three steps' worth of NPO groups, scored under the seed-0 model on the CPU."""
    model = tiny_llama(0)
    return [mixed_groups(model, seed) for seed in range(3)]


# ----------------------------------------------------------------------------------------------------------------
# Rollout engine.


@pytest.mark.parametrize(
    ("dtype", "atol"),
    [
        # float32: the sampler's incremental KV-cache forward and the one-pass scoring forward are the same maths
        # in different kernels and reduction orders; rounding of ~1e-6 relative through 4 layers gives ~1e-5 on
        # log-probs of magnitude <= 5, so 1e-4 leaves 10x headroom (the CPU test in test_rollout.py uses the same).
        ("float32", 1e-4),
        # bfloat16: weights and activations round to 8 significant bits (2^-9 ~ 2e-3 relative per op) differently
        # in the two forwards; the log-softmax is taken in float32 on logits that each differ by up to a few 1e-3.
        # 5e-2 nats bounds that with headroom (measured on the CPU: under 1e-2) and still fails a wrong position
        # or token, which moves a log-prob by about log(vocabulary) ~ 3.
        ("bfloat16", 5e-2),
    ],
)
def test_engine_samples_on_device_with_logprobs_equal_to_scoring(dtype, atol, tmp_path):
    policy = load_policy(
        ModelConfig(dtype=dtype, warmup_steps=0, cache_dir=str(tmp_path)),
        seed=0,
        alphabet=COMPACT_ALPHABET,
        device=DEVICE,
    )
    parameter = next(policy.model.parameters())
    assert parameter.device.type == DEVICE.type and parameter.dtype == getattr(torch, dtype)
    engine = TransformersEngine(policy.model, eos_id=policy.eos_id, pad_id=policy.pad_id)
    problems = [Problem(f"p{i}", "", "", compact_prompt=f"{i}+{9 - i}=") for i in range(6)]
    prompts = [policy.encode_prompt(p) for p in problems]
    params = SamplingParams(temperature=0.8, max_new_tokens=8)
    rng_before = device_rng_state()
    groups = engine.generate(prompts, 8, params, seed=7)
    assert torch.equal(device_rng_state(), rng_before)  # sampling draws from its own generator only
    again = engine.generate(prompts, 8, params, seed=7)
    assert [[g.token_ids for g in gs] for gs in groups] == [[g.token_ids for g in gs] for gs in again]
    flat = [(prompt, g) for prompt, gs in zip(prompts, groups) for g in gs]
    assert all(g.token_ids and 0 <= min(g.token_ids) and max(g.token_ids) < len(policy.tokenizer) for _, g in flat)
    responses = [g.token_ids for _, g in flat]
    scores = engine.score([p for p, _ in flat], responses, temperature=params.temperature)
    sampled = torch.tensor([v for _, g in flat for v in g.logprobs])
    rescored = torch.tensor([v for row in scores for v in row])
    assert sampled.shape == rescored.shape and bool(torch.isfinite(sampled).all())
    print(f"\n[{dtype}] sampled vs scored log-probs: max |diff| {float((sampled - rescored).abs().max()):.2e}")
    torch.testing.assert_close(rescored, sampled, atol=atol, rtol=0)
    if dtype == "float32":  # the same weights on the CPU give the same scores
        cpu_engine = TransformersEngine(copy.deepcopy(policy.model).cpu(), eos_id=policy.eos_id, pad_id=policy.pad_id)
        cpu_scores = cpu_engine.score([p for p, _ in flat], responses, temperature=params.temperature)
        torch.testing.assert_close(torch.tensor([v for row in cpu_scores for v in row]), rescored, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Learners.


def test_torch_learner_steps_on_device_match_cpu(batches, strict_float32):
    cpu_model = tiny_llama(0)
    device_model = copy.deepcopy(cpu_model).to(DEVICE)
    kwargs = kwargs_for_learner(grad_clip=0.2, max_len=8)
    cpu_learner, device_learner = TorchLearner(cpu_model, **kwargs), TorchLearner(device_model, **kwargs)
    for step, groups in enumerate(batches[:2], start=1):
        want = cpu_learner.train_step(groups, PROMPTS)
        got = device_learner.train_step(groups, PROMPTS)
        for key in ("loss", "clip_frac", "approx_kl", "entropy", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (step, key)
        assert got["guide_slots"] == want["guide_slots"] == 1
        print(
            f"\nTorchLearner step {step}: {DEVICE.type} {got['train_seconds']:.4f} s, cpu {want['train_seconds']:.4f} s"
        )
    assert want["grad_norm"] > 0.2  # the clip was active
    assert all(v.device.type == DEVICE.type for v in device_model.state_dict().values())
    assert_adam_close(weights(device_model), weights(cpu_model), steps=2)


def test_torch_learner_bfloat16_autocast_step_on_device(batches):
    reference = tiny_llama(0).to(DEVICE)
    model = copy.deepcopy(reference)
    want = TorchLearner(reference, **kwargs_for_learner()).train_step(batches[0], PROMPTS)
    got = TorchLearner(model, **kwargs_for_learner(dtype="bfloat16")).train_step(batches[0], PROMPTS)
    assert all(math.isfinite(v) for v in got.values())
    assert got["entropy"] == pytest.approx(want["entropy"], rel=2e-2)  # ~log(20) from a random init, bf16 rounding
    after = weights(model)
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay float32
    assert not torch.equal(after["lm_head.weight"], weights(tiny_llama(0))["lm_head.weight"])


def test_deepspeed_zero2_nccl_npo_steps_and_exact_rollback(batches, tmp_path, strict_float32):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    from services.learner.deepspeed_engine import DeepSpeedLearner

    reference = tiny_llama(0).to(DEVICE)
    model = copy.deepcopy(reference)
    plain = TorchLearner(reference, **kwargs_for_learner())
    learner = DeepSpeedLearner(model, **kwargs_for_learner(), zero_stage=2)
    assert learner.engine.zero_optimization_stage() == 2
    assert learner.device.type == DEVICE.type and next(model.parameters()).device.type == DEVICE.type
    if DEVICE.type == "cuda":
        assert torch.distributed.get_backend() == "nccl"
        assert torch.distributed.get_world_size() == 1
        assert os.environ["MASTER_ADDR"] == "127.0.0.1"

    want = plain.train_step(batches[0], PROMPTS)
    got = learner.train_step(batches[0], PROMPTS)
    assert got["guide_slots"] == 1 and all(math.isfinite(v) for v in got.values())
    for key in ("loss", "clip_frac", "approx_kl", "entropy", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    expected, actual = weights(reference), weights(model)
    for name in expected:  # the same device and kernels: only the clip coefficient's rounding differs
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

    # Checkpoint after step 1 the way the runner does, and read it back the runner's way (map_location="cpu").
    model.save_pretrained(tmp_path / "step1", safe_serialization=True)
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    timings = [learner.train_step(groups, PROMPTS)["train_seconds"] for groups in batches[1:]]
    first = weights(model)
    load_weights(model, tmp_path / "step1")
    buffer.seek(0)
    learner.load_state_dict(torch.load(buffer, weights_only=True, map_location="cpu"))
    assert learner.optimizer_steps == 1
    timings += [learner.train_step(groups, PROMPTS)["train_seconds"] for groups in batches[1:]]
    second = weights(model)
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    assert learner.optimizer_steps == 3
    print(f"\nDeepSpeed ZeRO-2 step seconds on {DEVICE.type}: {[round(t, 4) for t in timings]}")


# ----------------------------------------------------------------------------------------------------------------
# The step loop.


@dataclass
class AdditionTask:
    """a+b= over one-digit a, b (100 problems): 80 train, 20 test; the reward is an exact match of the sum."""

    name: str = "addition"

    def __post_init__(self) -> None:
        problems = [
            Problem(f"add/{a}+{b}", f"What is {a}+{b}?", str(a + b), compact_prompt=f"{a}+{b}=", solution=str(a + b))
            for a in range(10)
            for b in range(10)
        ]
        order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(0)).tolist()
        self.train = [problems[i] for i in order[:80]]
        self.test = [problems[i] for i in order[80:]]

    def reward(self, problem: Problem, response: str) -> float:
        return 1.0 if response == problem.answer else 0.0


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_npo_run_of_the_tiny_preset_on_device(tmp_path, model_cache, engine):
    task = AdditionTask()
    data = tmp_path / "train.jsonl"  # the config names the same problems (task.name=jsonl needs no generator)
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in task.train))
    cfg = load_run_config(
        None,
        [
            "method=npo",
            "seed=3",
            f"model.cache_dir={model_cache}",
            "model.warmup_steps=120",
            "task.name=jsonl",
            f"task.jsonl_train={data}",
            f"train.device={DEVICE.type}",
            f"train.engine={engine}",
            "train.steps=5",
            "train.prompts_per_step=8",
            "algo.group_size=4",
            "algo.tau_gate=1.0",
            "rollout.max_new_tokens=4",
            "eval.every=2",
            "eval.num_prompts=12",
            "checkpoint.every=1",
            "npo.early.at_step=1",
            "npo.early.delta=2",
            "npo.guide_samples=16",
        ],
    )
    pairs = [(p.compact_prompt, p.solution) for p in task.train]
    policy = load_policy(
        cfg.model, seed=cfg.seed, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET, device=cfg.train.device
    )
    assert next(policy.model.parameters()).device.type == DEVICE.type
    learner = None
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
        from services.learner.deepspeed_engine import DeepSpeedLearner

        learner = DeepSpeedLearner(policy.model, **learner_kwargs(cfg, policy.pad_id), zero_stage=cfg.train.zero_stage)
    runner = Runner(
        cfg, tmp_path / "run", policy=policy, task=task, store=MemoryGuideStore(), learner=learner, progress=False
    )
    runner.train()

    rows = [json.loads(line) for line in (runner.out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["segment"]) for r in rows] == EARLY_BOOTSTRAP_SEGMENTS
    assert rows[-1]["optimizer_steps"] == 7  # 5 main-line steps + 2 scout steps
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["entropy"]) for r in rows[:-1])
    events = [json.loads(line) for line in (runner.out / "interventions.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["scout_start", "guides", "rollback"]
    assert next(policy.model.parameters()).device.type == DEVICE.type  # rollbacks load weights in place
    assert runner.ckpt.steps() == [0, 1, 2, 3, 4, 5]

    # The final checkpoint holds the live weights (saved from the device as CPU tensors).
    saved = load_file(str(runner.ckpt.path(5) / "model.safetensors"))
    live = weights(policy.model)
    assert all(torch.equal(tensor, live[name]) for name, tensor in saved.items())
    # Scoring under a checkpoint (AutoNPO's V_hat) runs a copy of the policy on its device: pi^(5) is the policy.
    prompts = [policy.encode_prompt(p) for p in task.test[:6]]
    responses = [gs[0].token_ids for gs in runner.engine.generate(prompts, 1, cfg.rollout, seed=1)]
    past = runner._score_under(5, prompts, responses)
    assert next(runner._scorer.parameters()).device.type == DEVICE.type
    now = runner.engine.score(prompts, responses, temperature=cfg.rollout.temperature)
    torch.testing.assert_close(
        torch.tensor([v for row in past for v in row]), torch.tensor([v for row in now for v in row]), atol=1e-6, rtol=0
    )
    timings = [(r["step"], r["segment"], round(r["gen_seconds"], 4), round(r["train_seconds"], 4)) for r in rows[:-1]]
    print(f"\n{engine} runner on {DEVICE.type}, (step, segment, gen s, train s): {timings}")
