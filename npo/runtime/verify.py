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


Rewards = Callable[[Sequence[Problem], Sequence[str]], list[float]]
"""(problems, responses) -> one reward each, in one batch (Task.rewards: a TRL-style function sees the whole batch)."""


def verify_groups(
    problems: Sequence[Problem],
    generations: Sequence[Sequence[Generation]],
    decode: Callable[[list[int]], str],
    rewards: Rewards,
    policy_step: int,
) -> list[list[Sample]]:
    """The rule of verified_sample for every generation, the finished ones scored in one `rewards` call: one group
    of Samples per problem, in order."""
    if len(problems) != len(generations):
        raise ValueError(f"generations: {len(generations)} groups for {len(problems)} problems")
    texts = [[decode(g.token_ids) for g in gens] for gens in generations]
    done = [(i, j) for i, gens in enumerate(generations) for j, g in enumerate(gens) if g.finished]
    scores = rewards([problems[i] for i, _ in done], [texts[i][j] for i, j in done]) if done else []
    value = dict(zip(done, map(float, scores), strict=True))
    return [
        [
            Sample(
                p.prompt_id,
                list(g.token_ids),
                list(g.logprobs),
                value.get((i, j), 0.0),
                texts[i][j],
                policy_step,
                g.finished,
            )  # fmt: skip
            for j, g in enumerate(gens)
        ]
        for i, (p, gens) in enumerate(zip(problems, generations))
    ]
