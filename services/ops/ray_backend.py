"""`npo up --ray ADDRESS`: the run's roles placed on a Ray cluster; they still talk gRPC.

Each role is one Ray actor (`RoleProcess`) that starts the role's service process on the node Ray placed it on
and reports its address (that node's IP, or `host` when given). Placement: the rollout replicas go into one
placement group, one bundle per replica (`{"CPU": cpus, "GPU": gpus_per_replica}`, strategy SPREAD by default so
replicas land on different nodes when they can); the learner asks for `learner_gpus`; the guidance cache and the
controller ask for a fraction of a CPU and land anywhere. Ports are chosen by each service on its node (port 0) and
read back from its `serving on` line; the embedded Redis of the cache keeps its append-only file in the run folder
(RUN/cache-data). `npo restart` is for local runs only. Actors are detached and named in the namespace `npo-<run>`
when `detached` (what `npo up --ray` does, so the roles outlive the command; `npo down` kills them),
or tied to the calling driver (tests).

The run folder must be on storage every node sees at the same path (checkpoints and published weights are read
by path): a shared file system on a cluster, the local disk on one machine. `ray start --head` (or a RayCluster,
deploy/ray/) provides the cluster.

    ray start --head --num-cpus 8 --num-gpus 2
    npo up --config configs/smollm2.yaml --out /shared/runs/r1 --ray auto --replicas 2
    npo train --connect /shared/runs/r1
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from services.ops import launcher, state
from services.ops.state import Started


@ray.remote
class RoleProcess:
    """One role's service process on this actor's node."""

    def __init__(self, name: str, module: str, args: list[str], log_dir: str, host: str) -> None:
        self.name, self.host = name, host or ray.util.get_node_ip_address()
        argv = [sys.executable, "-m", module, *args]
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.proc, self.log = launcher.spawn(name, argv, Path(log_dir))
        self.argv = argv

    def serving(self, timeout_s: float) -> tuple[str, str, int, str, list[str]]:
        """(address, http url, pid, log, argv) once the service listens; the address uses this node's IP."""
        address, url = launcher.wait_serving(self.name, self.proc, self.log, time.monotonic() + timeout_s)
        port = address.rsplit(":", 1)[1]
        url = url.replace("0.0.0.0", self.host)
        return f"{self.host}:{port}", url, self.proc.pid, str(self.log), self.argv

    def stop(self) -> None:
        launcher.stop([Started(self.name, self.proc.pid, "", str(self.log))])

    def alive(self) -> bool:
        return self.proc.poll() is None


def _started(name: str, reply: tuple) -> Started:
    address, url, pid, log, argv = reply
    return Started(name, pid, address, log, url, argv)


def up_ray(
    config: str | None,
    overrides: list[str],
    out: str | os.PathLike,
    *,
    ray_address: str | None = "auto",
    replicas: int = 1,
    gpus_per_replica: float = 0.0,
    learner_gpus: float = 0.0,
    cpus_per_role: float = 0.25,
    strategy: str = "SPREAD",
    host: str = "",
    controller: bool = True,
    detached: bool = True,
    timeout_s: float = 600.0,
) -> tuple[list[Started], dict[str, Any]]:
    """Start the roles as Ray actors (see the module docstring). `ray_address` None: use the Ray already
    initialised in this process. `host`: bind and advertise this address instead of each node's IP (one-machine
    clusters). Returns what was started and the handles ({"actors": {name: actor}, "placement_group": pg})."""
    if ray_address is not None and not ray.is_initialized():
        ray.init(address=ray_address, namespace=None)
    cfg, run_dir, config_file = launcher.prepare_run(config, overrides, out, replicas)
    logs = str(run_dir.resolve() / "logs")
    namespace = f"npo-{run_dir.resolve().name}"
    bind = host or "0.0.0.0"

    def actor(name: str, **options: Any):
        if detached:
            options.update(name=f"{namespace}/{name}", lifetime="detached")
        return RoleProcess.options(num_cpus=options.pop("num_cpus", cpus_per_role), **options)

    handles: dict[str, Any] = {"actors": {}}
    try:
        bundles = [{"CPU": cpus_per_role, **({"GPU": gpus_per_replica} if gpus_per_replica else {})}] * replicas
        pg = placement_group(bundles, strategy=strategy)
        handles["placement_group"] = pg
        ray.get(pg.ready(), timeout=timeout_s)
        actors = handles["actors"]
        cache_argv = launcher.cache_args(cfg, bind, 0, run_dir.resolve() / launcher.CACHE_DATA)
        actors["guidance_cache"] = actor("guidance_cache").remote(
            "guidance_cache", "services.guidance_cache", cache_argv, logs, host
        )
        for i in range(replicas):
            placement = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
            actors[f"rollout-{i}"] = actor(
                f"rollout-{i}", num_gpus=gpus_per_replica, scheduling_strategy=placement
            ).remote(f"rollout-{i}", "services.rollout", launcher.rollout_args(cfg, config_file, bind), logs, host)
        first = {name: _started(name, reply) for name, reply in zip(
            actors, ray.get([a.serving.remote(timeout_s) for a in actors.values()], timeout=timeout_s))}  # fmt: skip
        rollout = ",".join(s.address for n, s in first.items() if n.startswith("rollout-"))
        cache = first["guidance_cache"].address
        args = launcher.learner_args(cfg, config_file, run_dir.resolve(), bind, 0, rollout, cache, 0, controller)
        actors["learner"] = actor("learner", num_gpus=learner_gpus).remote(
            "learner", "services.learner", args, logs, host
        )
        learner = _started("learner", ray.get(actors["learner"].serving.remote(timeout_s), timeout=timeout_s))
        started = [*first.values(), learner]
        for entry in started:
            launcher.wait_healthy(entry.address, time.monotonic() + timeout_s)
        if controller:
            args = launcher.controller_args(
                config_file, run_dir.resolve(), bind, 0, learner.address, rollout, cache, learner.metrics_url
            )
            actors["controller"] = actor("controller").remote("controller", "services.controller", args, logs, host)
            reply = ray.get(actors["controller"].serving.remote(timeout_s), timeout=timeout_s)
            entry = _started("controller", reply)
            entry.metrics_url = f"http://{entry.address}"
            launcher.wait_http(f"{entry.metrics_url}/healthz", time.monotonic() + timeout_s)
            started.append(entry)
    except BaseException:
        down_ray_handles(handles)
        raise
    state.write_state(run_dir, config_file, started, backend="ray", namespace=namespace if detached else "")
    return started, handles


def down_ray_handles(handles: dict[str, Any]) -> None:
    """Stop the services of `handles` (learner and controller first) and release their actors and placement."""
    actors = handles.get("actors", {})
    for name in sorted(actors, key=lambda n: (n not in ("controller", "learner"), n)):
        try:
            ray.get(actors[name].stop.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - a dead actor's process died with it
            pass
        ray.kill(actors[name])
    if handles.get("placement_group") is not None:
        remove_placement_group(handles["placement_group"])


def down_ray(run_dir: str | os.PathLike, ray_address: str = "auto") -> list[str]:
    """`npo down` of a run started with `npo up --ray`: the named, detached actors in its namespace."""
    recorded = state.load_state(run_dir)
    if not ray.is_initialized():
        ray.init(address=ray_address)
    actors, names = {}, []
    for entry in recorded["services"]:
        try:
            actors[entry["name"]] = ray.get_actor(f"{recorded['namespace']}/{entry['name']}")
            names.append(entry["name"])
        except ValueError:
            pass  # already gone
    down_ray_handles({"actors": actors})
    state.remove_state(run_dir)
    return names
