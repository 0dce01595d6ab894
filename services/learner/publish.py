"""Weight publication: the learner's policy weights to every rollout replica, after each change, timed.

    publisher = WeightPublisher(policy.model, RolloutClient(addresses), run_dir / "published")
    Runner(..., engine=rollout_client, publish=publisher)       # the runner calls publisher(step) before sampling

One publication writes the model's weights to `folder/model.safetensors` (a temporary file renamed into place, so
a replica never reads half a file) and has every replica load that folder in place (RolloutService.LoadPolicy,
in parallel) under a fresh version tag. The folder must be on storage the replicas see at the same path (the local
disk for `npo up`, a shared volume in a cluster). Each publication's wall time goes to the
`npo_weight_sync_seconds` histogram when metrics are given.

A dead replica does not fail a publication: RolloutClient.load_policy loads into the live replicas, drops one found
down, and has every dropped replica load the last published weights (this folder, the last version tag) before it
serves again; only with no replica live does a publication wait (the client's outage_timeout_s) and then fail.
`replicas_loaded`, `replica_drops`, `replica_rejoins` and `live_replicas` are there for the learner to export.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

WEIGHTS_FILE = "model.safetensors"
"""The weights file a replica loads (npo.runtime.learner.load_weights reads it)."""


def weights_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors, without the output head when it is tied to the input
    embedding (as save_pretrained writes it; npo.runtime.learner.load_weights re-ties it)."""
    tied = {"lm_head.weight"} if getattr(getattr(model, "config", None), "tie_word_embeddings", False) else set()
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in tied}


class WeightPublisher:
    """Callable publish(step) -> seconds for npo.runtime.runner.Runner: saves `model`'s weights and loads them into the
    replicas of `rollout` (a services.rollout.client.RolloutClient or anything with its load_policy)."""

    def __init__(self, model: torch.nn.Module, rollout: Any, folder: str | os.PathLike, metrics: Any = None) -> None:
        self.model, self.rollout, self.metrics = model, rollout, metrics
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0
        """Publications so far."""
        self.last_seconds = 0.0
        """Wall time of the last publication."""
        self.replicas_loaded = 0
        """Replicas that loaded the last publication (the others were down; they load it when they rejoin)."""

    @property
    def replica_drops(self) -> int:
        """Rollout replicas dropped so far by the client (0 for a client without fail-over)."""
        return int(getattr(self.rollout, "replica_drops", 0))

    @property
    def replica_rejoins(self) -> int:
        """Dropped rollout replicas that rejoined so far."""
        return int(getattr(self.rollout, "replica_rejoins", 0))

    @property
    def live_replicas(self) -> int:
        """Rollout replicas live now (calls and publications go to them)."""
        live = getattr(self.rollout, "live_replicas", None)
        return self.replicas_loaded if live is None else len(live)

    def __call__(self, step: int) -> float:
        """Publish the current weights as those of `step`; returns the seconds it took (write + every live replica's
        load)."""
        started = time.perf_counter()
        tmp = self.folder / f".{WEIGHTS_FILE}.tmp"
        save_file(weights_to_save(self.model), str(tmp))
        os.replace(tmp, self.folder / WEIGHTS_FILE)
        self.count += 1
        reports = self.rollout.load_policy(self.folder, step=step, version=f"publish-{self.count}-step-{step}")
        self.replicas_loaded = len(reports) if reports is not None else 0
        self.last_seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.observe_weight_sync(self.last_seconds)
        return self.last_seconds
