"""The roles placed on a local Ray cluster (2 CPUs, on 127.0.0.1) as Ray actors running the services, talking
gRPC: a seeded tiny run driven through the learner gives the embedded run's metrics."""

import pytest

ray = pytest.importorskip("ray")

from rows import assert_rows_close, read_rows  # noqa: E402

from npo.runtime.models import load_policy  # noqa: E402
from npo.runtime.run_config import load_run_config  # noqa: E402
from npo.runtime.runner import Runner  # noqa: E402
from npo.runtime.tasks import COMPACT_ALPHABET, load_task  # noqa: E402
from services.guidance_cache.embedded import EmbeddedRedis  # noqa: E402
from services.guidance_cache.store import RedisGuideStore  # noqa: E402
from services.ops.connect import train_connected  # noqa: E402
from services.ops.ray_backend import down_ray_handles, up_ray  # noqa: E402


@pytest.mark.slow
def test_roles_on_a_local_ray_cluster_give_the_embedded_metrics(tmp_path):
    overrides = [
        "seed=4", "method=npo", "npo.early={enabled: true, at_step: 0, delta: 2}", "npo.guide_samples=4",
        f"model.cache_dir={tmp_path / 'models'}", "model.warmup_steps=100", "task.train_size=60", "task.test_size=20",
        "train.steps=5", "train.prompts_per_step=6", "train.threads=1", "algo.group_size=4", "algo.tau_gate=0.75",
        "rollout.max_new_tokens=4", "eval.every=2", "eval.num_prompts=12", "checkpoint.every=2",
    ]  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text("")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    handles = {}
    try:
        started, handles = up_ray(
            str(config), overrides, tmp_path / "ray-run", ray_address=None, replicas=1, host="127.0.0.1",
            controller=False, detached=False, timeout_s=300,
        )  # fmt: skip
        assert [s.name for s in started] == ["guidance_cache", "rollout-0", "learner"]
        assert all(s.address.startswith("127.0.0.1:") for s in started)
        learner = next(s for s in started if s.name == "learner")
        run_dir = train_connected(learner.address, progress=False, timeout_s=600)
    finally:
        down_ray_handles(handles)
        ray.shutdown()
    served = read_rows(tmp_path / "ray-run")
    assert run_dir.endswith("ray-run")

    cfg = load_run_config(str(config), overrides)
    task = load_task(cfg.task)
    pairs = [(p.compact_prompt, p.solution) for p in task.train]
    policy = load_policy(cfg.model, seed=cfg.seed, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET)
    with EmbeddedRedis() as redis, RedisGuideStore(redis.url) as store:
        Runner(cfg, tmp_path / "embedded", policy=policy, task=task, store=store, progress=False).train()
    embedded = read_rows(tmp_path / "embedded")
    assert [r["segment"] for r in served] == [r["segment"] for r in embedded]
    assert_rows_close(served, embedded)
