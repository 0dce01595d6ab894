"""Plain data types shared by the roles. Token ids only: no tensors, no transport.

A `Sample` is one response to one prompt: its token ids, the per-token log-probs of the policy that sampled it
(the behaviour policy), and its verified reward. A guide is a `Sample` from a later checkpoint (`policy_step`
is the guide step) whose reward was verified correct.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One task instance: what the policy sees and what the verifier needs."""

    prompt_id: str
    """Stable id, unique within the task's split (used as cache key and mistake-pool key)."""
    prompt: str
    """Natural-language prompt (for instruct models)."""
    answer: str
    """Reference answer given to the verifier."""
    compact_prompt: str = ""
    """Short symbolic prompt for small-vocabulary models (e.g. '12+34='); empty if the task has none."""
    solution: str = ""
    """A correct response in the compact format (used by the supervised warm-up); empty if unknown."""
    metadata: dict = field(default_factory=dict, compare=False, hash=False)
    """Task-specific data the verifier may need (JSON-serialisable)."""


@dataclass
class Sample:
    """One response to one prompt with its behaviour log-probs and verified reward."""

    prompt_id: str
    """The Problem this responds to."""
    response_ids: list[int]
    """Generated token ids, including EOS when generation finished."""
    logprobs: list[float]
    """log pi_behaviour(token_t | prefix) for every response token, as the sampler computed it."""
    reward: float = 0.0
    """Verified reward (1 correct / 0 wrong, or graded)."""
    text: str = ""
    """Decoded response text."""
    policy_step: int = -1
    """Training step of the policy that sampled it (the guide step for a guide)."""
    finished: bool = True
    """True when the response ended with EOS inside max_new_tokens."""

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.logprobs):
            raise ValueError(
                f"logprobs: expected one log-prob per response token ({len(self.response_ids)}), "
                f"got {len(self.logprobs)}"
            )
