"""The one rule that turns generations into verified Samples.

A response is decoded (special tokens skipped) and scored by the task's reward only when it finished (EOS within
max_new_tokens); an unfinished response gets reward 0 (docs/method.md: reward only with EOS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from npo.core.types import Problem, Sample
from npo.runtime.engine import Generation


def verified_sample(
    prompt_id: str,
    problem: Problem | None,
    generation: Generation,
    decode: Callable[[list[int]], str],
    reward: Callable[[Problem, str], float],
    policy_step: int,
) -> Sample:
    """The Sample of one generation: decoded text, and reward(problem, text) when it finished and a problem is
    given, 0.0 otherwise (the one verification rule: the runner, the analysis and the rollout service all use it)."""
    text = decode(generation.token_ids)
    value = float(reward(problem, text)) if problem is not None and generation.finished else 0.0
    return Sample(
        prompt_id, list(generation.token_ids), list(generation.logprobs), value, text, policy_step, generation.finished
    )


def verify_groups(
    problems: Sequence[Problem],
    generations: Sequence[Sequence[Generation]],
    decode: Callable[[list[int]], str],
    reward: Callable[[Problem, str], float],
    policy_step: int,
) -> list[list[Sample]]:
    """verified_sample for every generation: one group of Samples per problem, in order."""
    return [
        [verified_sample(problem.prompt_id, problem, g, decode, reward, policy_step) for g in gens]
        for problem, gens in zip(problems, generations, strict=True)
    ]
