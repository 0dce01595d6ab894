"""SmolLM2-135M-Instruct throughput: the project's rollout engine against transformers' `generate`, and the learner's
training step against a plain torch step, each pair in this one process on the same batch.

    .venv/bin/python bench/bench_smollm2.py [--batch 128] [--new-tokens 32] [--repeats 3] [--threads N] [--quick]

Rollout: `batch` chain_sum questions in SmolLM2's chat template, one sample each, exactly `new_tokens` tokens per
response (no stop at EOS), temperature 1 over the full distribution (generate: top_k=0, top_p=1, min_new_tokens =
max_new_tokens). tokens/s = batch * new_tokens / median seconds.

Learner: the prompt + response rows of that rollout, in groups of --group-size with alternating 0/1 rewards, one
TorchLearner.train_step (the GRPO loss, micro-batches of --micro-batch rows, gradient clipping, AdamW) against a
plain step over the same micro-batches: forward with labels on the response tokens (transformers' cross-entropy),
backward, AdamW step. tokens/s = every prompt + response token of the batch / median seconds.

Prints both pairs and their ratios (ours / baseline tokens/s: above 1 = ours faster). --quick: batch 8, 8 new
tokens, one repeat (a minute or two on 2 CPU cores, most of it loading the model).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from npo.core.config import AlgoConfig, ModelConfig, SamplingParams
from npo.core.gate import MixedGroup
from npo.core.types import Sample
from npo.runtime.batch import build_batch
from npo.runtime.engine import TransformersEngine
from npo.runtime.learner import TorchLearner, micro_batches, training_rows
from npo.runtime.models import Policy, choose_threads, load_policy
from npo.runtime.tasks import TaskConfig, load_task


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rollout_pair(policy: Policy, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, float, list]:
    """(ours tokens/s, generate tokens/s, our generations) for one sample per prompt."""
    engine = TransformersEngine(policy.model, eos_id=policy.eos_id, pad_id=policy.pad_id, batch_size=len(prompts))
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, stop_on_eos=False)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[policy.pad_id] * (width - len(p)) + p for p in prompts])  # (B, P) left-padded
    starts = torch.tensor([width - len(p) for p in prompts])  # (B,)
    mask = (torch.arange(width)[None, :] >= starts[:, None]).long()  # (B, P)

    def ours():
        return engine.generate(prompts, 1, params, seed=0)

    def baseline():
        with torch.inference_mode():
            policy.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=policy.pad_id,
            )

    tokens = len(prompts) * new_tokens
    t_ours = median_seconds(ours, repeats)
    t_base = median_seconds(baseline, repeats)
    return tokens / t_ours, tokens / t_base, ours()


def learner_pair(
    policy: Policy, prompts: list[list[int]], generations: list, group_size: int, micro_batch: int, repeats: int
) -> tuple[float, float]:
    """(learner tokens/s, plain step tokens/s) on the rollout's rows; the weights are restored after each."""
    algo = AlgoConfig(group_size=group_size)
    groups, prompt_ids = [], {}
    for start in range(0, len(prompts) - group_size + 1, group_size):
        samples = [
            Sample(f"p{start}", g[0].token_ids, g[0].logprobs, reward=float(i % 2))
            for i, g in enumerate(generations[start : start + group_size])
        ]
        prompt_ids[f"p{start}"] = prompts[start]
        groups.append(MixedGroup(f"p{start}", samples, [False] * group_size, [s.logprobs for s in samples], 0.5, 0))
    rows = training_rows(groups, prompt_ids, algo)
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    initial = {k: v.clone() for k, v in policy.model.state_dict().items()}
    learner = TorchLearner(policy.model, pad_id=policy.pad_id, algo=algo, lr=1e-6, micro_batch_size=micro_batch)
    t_ours = median_seconds(lambda: learner.train_step(groups, prompt_ids), repeats)
    policy.model.load_state_dict(initial)

    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-6)
    chunks = micro_batches(rows, micro_batch, algo.loss_aggregation)
    batches = [
        (build_batch([r.prompt_ids for r in chunk], [r.response_ids for r in chunk], policy.pad_id), weight)
        for chunk, weight in chunks
    ]

    def plain() -> None:
        policy.model.train()
        optimizer.zero_grad(set_to_none=True)
        for batch, weight in batches:
            labels = torch.full_like(batch.input_ids, -100)  # (B, T)
            labels[:, 1:] = torch.where(batch.response_mask.bool(), batch.targets, -100)
            out = policy.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                labels=labels,
            )
            (out.loss * weight).backward()
        optimizer.step()
        policy.model.eval()

    t_plain = median_seconds(plain, repeats)
    policy.model.load_state_dict(initial)
    return tokens / t_ours, tokens / t_plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="prompts in the rollout (one sample each)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per response")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--group-size", type=int, default=8, help="rows per group in the learner step")
    parser.add_argument("--micro-batch", type=int, default=16, help="rows per forward/backward in the learner step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = the cores this process may use)")
    parser.add_argument("--quick", action="store_true", help="batch 8, 8 new tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.new_tokens, args.repeats, args.group_size = 8, 8, 1, 4
    torch.set_num_threads(choose_threads(args.threads))
    torch.manual_seed(0)

    policy = load_policy(ModelConfig(preset="smollm2-135m"), seed=0)
    task = load_task(TaskConfig(name="chain_sum", format="natural", train_size=max(args.batch, 16), test_size=0))
    prompts = [policy.encode_prompt(p) for p in task.train[: args.batch]]
    ours, generate, generations = rollout_pair(policy, prompts, args.new_tokens, args.repeats)
    learner, plain = learner_pair(policy, prompts, generations, args.group_size, args.micro_batch, args.repeats)

    print(
        f"SmolLM2-135M, batch {args.batch} x {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(f"rollout  engine     {ours:9.1f} tok/s   transformers generate {generate:9.1f} tok/s   ", end="")
    print(f"ratio {ours / generate:.2f}")
    print(f"learner  train_step {learner:9.1f} tok/s   plain torch step      {plain:9.1f} tok/s   ", end="")
    print(f"ratio {learner / plain:.2f}")


if __name__ == "__main__":
    main()
