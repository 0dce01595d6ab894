"""Rollout speed: our KV-cache sampler against transformers' `generate` on the same model, in the same process.

    .venv/bin/python bench/rollout_speed.py [--prompts 32] [--n 8] [--new-tokens 8] [--repeats 5]

Prints the median time of each and the ratio (ours / generate). Both sample from the full distribution
(generate with top_k=0, top_p=1.0) at temperature 1; generate returns no per-token log-probs here, ours does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from npo.runtime.engine import SamplingParams, TransformersEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=25,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    prompts = [[1] + [4 + (i * 7 + j) % 20 for j in range(5 + i % 4)] for i in range(args.prompts)]
    engine = TransformersEngine(model, eos_id=2, pad_id=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_on_eos=False)

    def ours() -> None:
        engine.generate(prompts, args.n, params, seed=0)

    rows = [p for p in prompts for _ in range(args.n)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()

    def baseline() -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_base, t_ours = timed(baseline), timed(ours)
    print(f"{args.prompts} prompts x {args.n} samples x {args.new_tokens} tokens, {args.threads} threads")
    print(f"transformers generate: {t_base * 1000:8.1f} ms")
    print(f"npo TransformersEngine: {t_ours * 1000:7.1f} ms   (with per-token log-probs)")
    print(f"ratio ours / generate: {t_ours / t_base:.2f}")


if __name__ == "__main__":
    main()
