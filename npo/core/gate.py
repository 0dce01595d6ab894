"""The NPO gate and slot replacement (docs/method.md: gate, behaviour log-probs).

A group of n on-policy samples for prompt x keeps all its slots unless

    p_hat(x) <= tau_gate   AND   a guide o'_x verified correct exists,

in which case slot n is replaced:  G_NPO(x) = {o_1, ..., o_{n-1}, o'_x}. With k = algo.guide_slots > 1 guide slots
the last m = min(k, number of verified guides of x) slots are replaced by x's distinct guides, in their order:

    G_NPO(x) = {o_1, ..., o_{n-m}, o'_x,1, ..., o'_x,m}          (1 <= k <= n - 1, so one on-policy slot stays)

Behaviour log-probs q_i per slot (the denominator of the ratio r_it = pi_theta / q_i); every guide slot is treated
alike:
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
    """One prompt's group after the gate: n slots, the last `guides` of them guides."""

    prompt_id: str
    samples: list[Sample]
    """n samples; samples[n - guides:] are the guides."""
    is_guide: list[bool]
    """Per slot: True for a guide slot."""
    behaviour_logprobs: list[list[float]]
    """Per slot, per response token: q_i, the denominator of the importance ratio."""
    pass_rate: float
    """p_hat(x): the on-policy group's pass rate before any replacement."""
    guides: int = 0
    """m: how many slots (the last m) hold a guide; 0 when the group was not gated or had no guide."""

    @property
    def replaced(self) -> bool:
        """True when at least slot n holds a guide."""
        return self.guides > 0

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
    groups: Sequence[Sequence[Sample]],
    correct_threshold: float,
    rule: GuideSelect | str = GuideSelect.FIRST,
    k: int = 1,
) -> list[Sample]:
    """Up to k distinct guides per group that has a correct sample (reward >= correct_threshold), groups in order and
    each group's guides in the rule's order:

        first     the correct samples in sampling order
        shortest  ascending |o_i| over the correct samples
        likely    descending (1/|o_i|) sum_t log q(o_it) over the correct samples, q the policy that sampled them

    Ties go to the earliest sample. A group contributes min(k, its correct samples) guides, consecutive in the result.
    With rule first and k = 1 this is first_correct."""
    rule = GuideSelect(rule)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive number of guides per group, got {k!r}")
    chosen: list[Sample] = []
    for group in groups:
        correct = [s for s in group if s.reward >= correct_threshold]
        if rule is GuideSelect.SHORTEST:
            correct.sort(key=lambda s: len(s.response_ids))  # a stable sort keeps the earliest of ties first
        elif rule is GuideSelect.LIKELY:
            correct.sort(key=_mean_logprob, reverse=True)  # stable with reverse=True too: ties keep sampling order
        chosen.extend(correct[:k])
    return chosen


def guide_lists(guides: Sequence[Sample]) -> dict[str, list[Sample]]:
    """Guides grouped by prompt id, each prompt's in the given order (the shape build_mixed_groups and the stores
    take for k > 1)."""
    lists: dict[str, list[Sample]] = {}
    for guide in guides:
        lists.setdefault(guide.prompt_id, []).append(guide)
    return lists


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
    guides: Mapping[str, Sample | Sequence[Sample]],
    *,
    tau_gate: float,
    correct_threshold: float,
    is_correction: bool,
    rollout_logprobs: RolloutScorer | None = None,
    gate_mode: GateMode | str = GateMode.PASS_RATE,
    guide_slots: int = 1,
) -> list[MixedGroup]:
    """Apply the gate to every on-policy group and insert verified guides in its last slots.

    Args:
        groups: G groups, each n on-policy Samples of one prompt (all groups the same n >= 2).
        guides: prompt_id -> the prompt's guides from the guide checkpoint, one Sample or an ordered list (may hold
            unverified or unrelated entries; only verified-correct guides for the group's prompt are inserted).
        tau_gate: gate threshold in [0, 1].
        correct_threshold: reward at or above which a sample is correct.
        is_correction: behaviour log-probs of the guide slots from the guide policy (True) or from pi^(t) (False).
        rollout_logprobs: scorer giving pi^(t)'s log-probs of guide tokens; required when is_correction is False and
            a guide is inserted.
        gate_mode: pass_rate (p_hat <= tau_gate) or all_failed (p_hat = 0); see should_replace.
        guide_slots: k, the most slots a gated group gives to guides, 1 <= k <= n - 1: the last m = min(k, verified
            distinct guides of the prompt) slots take the first m of them, in order (slot n - m + j holds guide j).
    Returns:
        G MixedGroups in input order. Groups above the gate are returned unchanged.
    """
    check_tau_gate(tau_gate)
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"groups: all groups must have the same size n, got sizes {sorted(sizes)}")
    if sizes and min(sizes) < 2:
        raise ValueError("groups: n must be >= 2 so that a guide can replace one slot and leave on-policy samples")
    if isinstance(guide_slots, bool) or not isinstance(guide_slots, int) or guide_slots < 1:
        raise ValueError(f"guide_slots: expected a positive number of guide slots, got {guide_slots!r}")
    if sizes and guide_slots > min(sizes) - 1:
        raise ValueError(f"guide_slots: at most n - 1 = {min(sizes) - 1} so that one on-policy slot stays")
    mixed: list[MixedGroup] = []
    for g, group in enumerate(groups):
        prompt_id = group[0].prompt_id
        for s in group:
            if s.prompt_id != prompt_id:
                raise ValueError(f"groups[{g}]: mixes prompts {prompt_id!r} and {s.prompt_id!r}")
            if not math.isfinite(s.reward):
                raise ValueError(f"groups[{g}]: reward is NaN or infinite for prompt {prompt_id!r}")
        p_hat = group_pass_rate(group, correct_threshold)
        inserted = []
        if should_replace(p_hat, tau_gate, gate_mode):
            inserted = _verified(guides.get(prompt_id), prompt_id, correct_threshold)[:guide_slots]
        samples = list(group)
        is_guide = [False] * len(samples)
        behaviour = [list(s.logprobs) for s in samples]
        first = len(samples) - len(inserted)
        for slot, guide in enumerate(inserted, start=first):
            samples[slot] = guide
            is_guide[slot] = True
            behaviour[slot] = list(guide.logprobs)  # replaced below when is_correction is off
        mixed.append(MixedGroup(prompt_id, samples, is_guide, behaviour, p_hat, len(inserted)))

    if not is_correction:
        slots = [(m, i) for m in mixed for i in range(len(m.samples) - m.guides, len(m.samples))]
        if slots:
            if rollout_logprobs is None:
                raise ValueError("rollout_logprobs: required when is_correction is False and guides are inserted")
            scored = rollout_logprobs([m.samples[i] for m, i in slots])
            if len(scored) != len(slots):
                raise ValueError(f"rollout_logprobs: returned {len(scored)} sequences for {len(slots)} guides")
            for (m, i), lp in zip(slots, scored):
                if len(lp) != len(m.samples[i].response_ids):
                    raise ValueError(
                        f"rollout_logprobs: {len(lp)} log-probs for a guide of {len(m.samples[i].response_ids)} tokens"
                    )
                m.behaviour_logprobs[i] = list(lp)
    return mixed


def _verified(offered: Sample | Sequence[Sample] | None, prompt_id: str, correct_threshold: float) -> list[Sample]:
    """The offered guides of a prompt (one Sample or a list) that pass is_verified_guide, in order."""
    candidates = [offered] if isinstance(offered, Sample) or offered is None else list(offered)
    return [guide for guide in candidates if is_verified_guide(guide, prompt_id, correct_threshold)]
