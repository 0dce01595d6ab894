"""Where a step's guides come from: one strategy per guide source (docs/method.md, guide sources).

    near_future   the NPO segment's guides of pi^(t+Delta), cached by an intervention (guidance cache)
    past          the run's own newest verified trajectory of the prompt, at most guide.past_max_age steps old
    far_future,   guide.model's verified-correct samples of npo.guide_samples (algo.guide_select's first
    external      algo.guide_slots), sampled once for the whole train split (seeded by the run seed only, so a
                  resumed run gets the same guides)
    none          no guide (GRPO)

A source offers each gated prompt an ordered list of guides; the gate uses the first algo.guide_slots of them (past
offers one).

Every source is asked for the gated prompts only (p_hat <= tau_gate); the gate (npo.core.gate) still checks each guide.
An NPO segment reads the cache whatever the configured source (the controller runs NPO segments on any learner).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from npo.core.gate import first_correct, guide_lists, select_guides
from npo.core.seeds import derive_seed
from npo.core.types import Problem, Sample
from npo.runtime.run_config import MODEL_SOURCES, RunConfig
from npo.runtime.store import GuideStore, sample_from_json, sample_to_json

Verify = Callable[[Sequence[Problem], Any, int], list[list[Sample]]]
"""(problems, generations, policy_step) -> verified groups (counted in the run's samples_total)."""


class GuideSource:
    """No guide (guide.source none); the base of the other sources."""

    name = "none"

    def guides(self, step: int, gated: Sequence[str]) -> dict[str, list[Sample]]:
        """prompt_id -> its guides, in order, for the gated prompts of step `step` that have one."""
        return {}

    def observe(self, groups: Sequence[Sequence[Sample]], correct_threshold: float) -> None:
        """Step's verified on-policy groups (a source that replays them keeps them)."""

    def forget_from(self, step: int) -> None:
        """A rollback to `step`: forget what was sampled at or after it."""

    def state(self) -> list[dict[str, Any]]:
        """Checkpoint state (JSON)."""
        return []

    def load_state(self, state: Sequence[dict[str, Any]]) -> None:
        """Restore `state()`."""


class NearFutureGuides(GuideSource):
    """The NPO segment's cached guides of pi^(guide_step)."""

    name = "near_future"

    def __init__(self, store: GuideStore, run: str, guide_step: Callable[[], int], k: int = 1) -> None:
        self.store, self.run, self.guide_step, self.k = store, run, guide_step, k

    def guides(self, step: int, gated: Sequence[str]) -> dict[str, list[Sample]]:
        return self.store.get_guide_lists(self.run, self.guide_step(), list(gated), self.k) if gated else {}


class PastGuides(GuideSource):
    """The run's newest verified trajectory per prompt; offered while at most `max_age` steps old (0 = any age)."""

    name = "past"

    def __init__(self, max_age: int) -> None:
        self.max_age = max_age
        self.kept: dict[str, Sample] = {}  # prompt -> newest verified trajectory

    def guides(self, step: int, gated: Sequence[str]) -> dict[str, list[Sample]]:
        oldest = step - self.max_age if self.max_age else 0
        return {p: [self.kept[p]] for p in gated if p in self.kept and self.kept[p].policy_step >= oldest}

    def observe(self, groups: Sequence[Sequence[Sample]], correct_threshold: float) -> None:
        for sample in first_correct(groups, correct_threshold):
            self.kept[sample.prompt_id] = sample

    def forget_from(self, step: int) -> None:
        self.kept = {p: s for p, s in self.kept.items() if s.policy_step < step}

    def state(self) -> list[dict[str, Any]]:
        return [sample_to_json(s) for _, s in sorted(self.kept.items())]

    def load_state(self, state: Sequence[dict[str, Any]]) -> None:
        self.kept = {s.prompt_id: s for s in map(sample_from_json, state)}


class ModelGuides(GuideSource):
    """guide.model's guides for every train prompt, sampled on first use (far_future / external)."""

    chunk = 512
    """Prompts per generate call."""

    def __init__(
        self,
        name: str,
        cfg: RunConfig,
        policy: Any,
        problems: Sequence[Problem],
        verify: Verify,
        record: Callable[[dict[str, Any]], None],
    ) -> None:
        self.name, self.cfg, self.policy, self.problems = name, cfg, policy, list(problems)
        self.verify, self.record = verify, record
        self.sampled: dict[str, list[Sample]] | None = None

    def guides(self, step: int, gated: Sequence[str]) -> dict[str, list[Sample]]:
        if self.sampled is None:
            self.sampled = self._sample(step)
        return {p: self.sampled[p] for p in gated if p in self.sampled}

    def _sample(self, step: int) -> dict[str, list[Sample]]:
        from npo.runtime.engine import TransformersEngine
        from npo.runtime.models import ModelConfig, load_policy

        cfg, folder = self.cfg, Path(self.cfg.guide.model).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"guide.model: {folder} is not an HF model folder (no config.json)")
        guide_policy = load_policy(ModelConfig(preset=str(folder), dtype="float32"), seed=0)
        if guide_policy.tokenizer.get_vocab() != self.policy.tokenizer.get_vocab():
            raise ValueError(f"guide.model: {folder} has another vocabulary than the policy (tokens must be shared)")
        guide_policy.model.to(next(self.policy.model.parameters()).device)
        engine = TransformersEngine(guide_policy.model, eos_id=guide_policy.eos_id, pad_id=guide_policy.pad_id)
        guides: dict[str, list[Sample]] = {}
        for lo in range(0, len(self.problems), self.chunk):
            part = self.problems[lo : lo + self.chunk]
            seed = derive_seed(cfg.seed, f"guide-model/{lo}", 0)
            prompts = [self.policy.encode_prompt(p) for p in part]
            gens = engine.generate(prompts, cfg.npo.guide_samples, cfg.rollout, seed=seed)
            groups, algo = self.verify(part, gens, -1), cfg.algo
            chosen = select_guides(groups, algo.correct_threshold, algo.guide_select, algo.guide_slots)
            guides.update(guide_lists(chosen))
        event = {"kind": self.name, "event": "guides", "step": step, "model": str(folder)}
        self.record({**event, "prompts": len(self.problems), "guides": len(guides)})
        return guides


def make_guide_source(
    cfg: RunConfig, policy: Any, problems: Sequence[Problem], verify: Verify, record: Callable[[dict[str, Any]], None]
) -> GuideSource:
    """The strategy of cfg.guide's source outside NPO segments (near_future and none offer nothing there)."""
    source = cfg.guide.resolved(cfg.method)
    if source == "past":
        return PastGuides(cfg.guide.past_max_age)
    if source in MODEL_SOURCES:
        return ModelGuides(source, cfg, policy, problems, verify, record)
    return GuideSource()
