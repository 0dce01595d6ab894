"""Building a run's parts from its config: policy and task, learner engine, guidance store.

Used by the embedded run (services/ops/embedded.py), the other ops tools and every role's main; imports neither the
CLI nor services/ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from npo.core.config import ConfigError


@contextlib.contextmanager
def open_store(url: str, prefix: str) -> Iterator[object]:
    """The guidance store: Redis at `url`, or an embedded Redis-protocol server when url is empty."""
    from services.guidance_cache.embedded import EmbeddedRedis
    from services.guidance_cache.store import RedisGuideStore

    with contextlib.ExitStack() as stack:
        if not url:
            server = stack.enter_context(EmbeddedRedis())
            url = server.url
        store = RedisGuideStore(url, prefix=prefix)
        stack.callback(store.close)
        yield store


def build_policy_and_task(cfg):
    """The task (data + reward) and the policy model for a run config."""
    from npo.runtime.models import load_policy
    from npo.runtime.tasks import COMPACT_ALPHABET, load_task

    task = load_task(cfg.task)
    pairs = [(p.compact_prompt, p.solution) for p in task.train if p.compact_prompt and p.solution]
    policy = load_policy(
        cfg.model, seed=cfg.seed, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET, device=cfg.train.device
    )
    return policy, task


def build_learner(cfg, policy):
    """The learner engine named by train.engine; None = the runner's embedded TorchLearner."""
    if cfg.train.engine != "deepspeed":
        return None
    import os

    from npo.runtime.models import resolve_device
    from npo.runtime.runner import learner_kwargs

    os.environ.setdefault("DS_ACCELERATOR", resolve_device(cfg.train.device).type)
    try:
        from services.learner.deepspeed_engine import DeepSpeedLearner
    except ImportError as exc:
        raise ConfigError(
            f"train.engine: 'deepspeed' needs the deepspeed package ({exc}); install the extra: "
            "DS_BUILD_OPS=0 pip install -e '.[deepspeed]'"
        ) from None
    return DeepSpeedLearner(policy.model, **learner_kwargs(cfg, policy.pad_id), zero_stage=cfg.train.zero_stage)
