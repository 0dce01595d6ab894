"""The NPO gate and slot replacement (docs/method.md: gate, behaviour log-probs).

A group of n on-policy samples for prompt x keeps all its slots unless

    p_hat(x) <= tau_gate   AND   a guide o'_x verified correct exists,

in which case slot n is replaced:  G_NPO(x) = {o_1, ..., o_{n-1}, o'_x}.

Behaviour log-probs q_i per slot (the denominator of the ratio r_it = pi_theta / q_i):
- on-policy slot: pi^(t), the rollout policy's log-probs recorded by the sampler;
- guide slot, is_correction=True: pi^(t+Delta), the guide policy's log-probs stored with the guide;
- guide slot, is_correction=False: pi^(t)'s own log-probs of the guide tokens (the guide treated as on-policy),
  obtained from the `rollout_logprobs` callback (teacher-forced scoring under the rollout policy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from npo.core.config import GateMode, GuideSelect
from npo.core.types import Sample

RolloutScorer = Callable[[list[Sample]], list[list[float]]]
"""Given guide samples, return the rollout policy pi^(t)'s per-token log-probs of each guide's response tokens."""


@dataclass
class MixedGroup:
    """One prompt's group after the gate: n slots, the last possibly a guide."""

    prompt_id: str
    samples: list[Sample]
    """n samples; samples[-1] is the guide when `replaced`."""
    is_guide: list[bool]
    """Per slot: True for the guide slot."""
    behaviour_logprobs: list[list[float]]
    """Per slot, per response token: q_i, the denominator of the importance ratio."""
    pass_rate: float
    """p_hat(x): the on-policy group's pass rate before any replacement."""
    replaced: bool
    """True when slot n holds a guide."""

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]


def group_pass_rate(samples: Sequence[Sample], correct_threshold: float) -> float:
    """p_hat(x) = |{i : R_i >= correct_threshold}| / n."""
    if not samples:
        raise ValueError("samples: a group needs at least one sample")
    for s in samples:
        if not math.isfinite(s.reward):
            raise ValueError(f"reward: NaN or infinite reward for prompt {s.prompt_id!r}")
    return sum(s.reward >= correct_threshold for s in samples) / len(samples)


def first_correct(groups: Sequence[Sequence[Sample]], correct_threshold: float) -> list[Sample]:
    """The first verified-correct sample (reward >= correct_threshold) of each group that has one, in group order:
    the guides a guide policy's groups yield."""
    return [next(s for s in g if s.reward >= correct_threshold) for g in groups if any(
        s.reward >= correct_threshold for s in g)]  # fmt: skip


def _mean_logprob(sample: Sample) -> float:
    return sum(sample.logprobs) / len(sample.logprobs) if sample.logprobs else -math.inf


def select_guides(
    groups: Sequence[Sequence[Sample]], correct_threshold: float, rule: GuideSelect | str = GuideSelect.FIRST
) -> list[Sample]:
    """One guide per group that has a correct sample (reward >= correct_threshold), in group order:

        first     the first correct sample in sampling order
        shortest  argmin |o_i| over the correct samples
        likely    argmax (1/|o_i|) sum_t log q(o_it) over the correct samples, q the policy that sampled them

    Ties go to the earliest sample. With rule first this is first_correct."""
    rule = GuideSelect(rule)
    chosen: list[Sample] = []
    for group in groups:
        correct = [s for s in group if s.reward >= correct_threshold]
        if not correct:
            continue
        if rule is GuideSelect.SHORTEST:
            chosen.append(min(correct, key=lambda s: len(s.response_ids)))  # min keeps the first of ties
        elif rule is GuideSelect.LIKELY:
            chosen.append(max(correct, key=lambda s: (_mean_logprob(s), -correct.index(s))))
        else:
            chosen.append(correct[0])
    return chosen


def check_tau_gate(tau_gate: float, key: str = "tau_gate", error: type[ValueError] = ValueError) -> float:
    """The gate threshold's range, 0 <= tau_gate <= 1 (NaN refused); raises `error` naming `key`."""
    if not 0.0 <= tau_gate <= 1.0:
        raise error(f"{key}: must lie in [0, 1], got {tau_gate}")
    return tau_gate


def should_replace(pass_rate: float, tau_gate: float, mode: GateMode | str = GateMode.PASS_RATE) -> bool:
    """The gate: replace slot n when p_hat <= tau_gate (mode pass_rate) or when p_hat = 0 (mode all_failed)."""
    check_tau_gate(tau_gate)
    if GateMode(mode) is GateMode.ALL_FAILED:
        return pass_rate == 0.0
    return pass_rate <= tau_gate


def is_verified_guide(guide: Sample | None, prompt_id: str, correct_threshold: float) -> bool:
    """A guide may enter a group only if it answers this prompt and its verified reward counts as correct."""
    return (
        guide is not None
        and guide.prompt_id == prompt_id
        and math.isfinite(guide.reward)
        and guide.reward >= correct_threshold
        and len(guide.response_ids) > 0
    )


def build_mixed_groups(
    groups: Sequence[Sequence[Sample]],
    guides: Mapping[str, Sample],
    *,
    tau_gate: float,
    correct_threshold: float,
    is_correction: bool,
    rollout_logprobs: RolloutScorer | None = None,
    gate_mode: GateMode | str = GateMode.PASS_RATE,
) -> list[MixedGroup]:
    """Apply the gate to every on-policy group and insert verified guides in slot n.

    Args:
        groups: G groups, each n on-policy Samples of one prompt (all groups the same n >= 2).
        guides: prompt_id -> guide Sample from the guide checkpoint (may hold unverified or unrelated entries; only
            verified-correct guides for the group's prompt are inserted).
        tau_gate: gate threshold in [0, 1].
        correct_threshold: reward at or above which a sample is correct.
        is_correction: behaviour log-probs of the guide slot from the guide policy (True) or from pi^(t) (False).
        rollout_logprobs: scorer giving pi^(t)'s log-probs of guide tokens; required when is_correction is False and
            a guide is inserted.
        gate_mode: pass_rate (p_hat <= tau_gate) or all_failed (p_hat = 0); see should_replace.
    Returns:
        G MixedGroups in input order. Groups above the gate are returned unchanged.
    """
    check_tau_gate(tau_gate)
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"groups: all groups must have the same size n, got sizes {sorted(sizes)}")
    if sizes and min(sizes) < 2:
        raise ValueError("groups: n must be >= 2 so that a guide can replace one slot and leave on-policy samples")
    mixed: list[MixedGroup] = []
    for g, group in enumerate(groups):
        prompt_id = group[0].prompt_id
        for s in group:
            if s.prompt_id != prompt_id:
                raise ValueError(f"groups[{g}]: mixes prompts {prompt_id!r} and {s.prompt_id!r}")
            if not math.isfinite(s.reward):
                raise ValueError(f"groups[{g}]: reward is NaN or infinite for prompt {prompt_id!r}")
        p_hat = group_pass_rate(group, correct_threshold)
        guide = guides.get(prompt_id)
        replace = should_replace(p_hat, tau_gate, gate_mode) and is_verified_guide(guide, prompt_id, correct_threshold)
        samples = list(group)
        is_guide = [False] * len(samples)
        behaviour = [list(s.logprobs) for s in samples]
        if replace:
            assert guide is not None
            samples[-1] = guide
            is_guide[-1] = True
            behaviour[-1] = list(guide.logprobs)  # replaced below when is_correction is off
        mixed.append(MixedGroup(prompt_id, samples, is_guide, behaviour, p_hat, replace))

    if not is_correction:
        inserted = [m for m in mixed if m.replaced]
        if inserted:
            if rollout_logprobs is None:
                raise ValueError("rollout_logprobs: required when is_correction is False and guides are inserted")
            scored = rollout_logprobs([m.samples[-1] for m in inserted])
            if len(scored) != len(inserted):
                raise ValueError(f"rollout_logprobs: returned {len(scored)} sequences for {len(inserted)} guides")
            for m, lp in zip(inserted, scored):
                if len(lp) != len(m.samples[-1].response_ids):
                    raise ValueError(
                        f"rollout_logprobs: {len(lp)} log-probs for a guide of {len(m.samples[-1].response_ids)} tokens"
                    )
                m.behaviour_logprobs[-1] = list(lp)
    return mixed
