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
    """The task (data + reward) and the policy model for a run config.

    The tiny preset is fitted to the task by plan_tiny (vocabulary, warm-up pairs, prompt kind, context length):
    a problem that cannot fit is a ConfigError before the warm-up starts. Torch's threads are the caller's.
    """
    import dataclasses

    from npo.core.config import TINY
    from npo.runtime.models import load_policy, plan_tiny
    from npo.runtime.tasks import COMPACT_ALPHABET, load_task

    task = load_task(cfg.task)
    if cfg.model.preset != TINY:
        return load_policy(cfg.model, seed=cfg.seed, device=cfg.train.device), task
    plan = plan_tiny(
        cfg.model,
        task.train,
        task.test,
        compact_alphabet=COMPACT_ALPHABET,
        max_new_tokens=cfg.rollout.max_new_tokens,
        sources=_task_sources(cfg.task),
    )
    model_cfg = dataclasses.replace(cfg.model, max_position_embeddings=plan.max_position_embeddings)
    policy = load_policy(
        model_cfg,
        seed=cfg.seed,
        warmup_pairs=plan.warmup_pairs,
        alphabet=plan.alphabet,
        kind=plan.kind,
        device=cfg.train.device,
    )
    return policy, task


def _task_sources(task_cfg) -> dict[str, str]:
    """Where each split of a file task comes from, for error messages: "task.<key> <path>" per split, when set."""
    sources = {}
    for split, keys in (("train", ("train_file", "jsonl_train")), ("test", ("test_file", "jsonl_test"))):
        for key in keys:
            path = getattr(task_cfg, key, "")
            if path and split not in sources:
                sources[split] = f"task.{key} {path}"
    return sources


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
