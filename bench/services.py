"""Service-mode costs, each as a ratio measured in this one run (no absolute targets are asserted anywhere).

    .venv/bin/python bench/services.py [--config configs/tiny.yaml] [--steps 12] [--replicas 1] [--out runs/bench]

1. step time: the same seeded GRPO run as `npo train` (embedded, one process) and as `npo up` + `npo train
   --connect` (cache, rollout replicas and learner as processes on loopback); median wall time per step over the
   steps after the first (goal: service / embedded <= 1.15).
2. weight publication: median time to write the weights and load them into every replica, over the median service
   step time (goal <= 0.10).
3. GetGuides of 256 prompts through the guidance cache service (a separate process, real Redis): p50 and p99 over
   300 calls (goal p99 < 5 ms), beside the same read straight from Redis in this process.
4. vLLM against transformers (when `.venv-vllm` exists, see scripts/setup_vllm_venv.sh): generated tokens per
   second of a vLLM rollout server over a transformers rollout server, same model, same batch, same client.

Prints one table and writes it, with the machine and the command, to OUT/services.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def npo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def step_seconds(run_dir: Path) -> tuple[list[float], list[float]]:
    """Wall time of each step after the first (from the rows' cumulative wall_time), and each step's publication
    time (empty for an embedded run)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["segment"] != "final"]
    walls = [b["wall_time"] - a["wall_time"] for a, b in zip(rows, rows[1:])]
    return walls, [r["weight_sync_seconds"] for r in rows[1:] if "weight_sync_seconds" in r]


def bench_steps(config: str, overrides: list[str], steps: int, replicas: int, work: Path) -> dict[str, float]:
    sets = [f"train.steps={steps}", "method=grpo", "eval.every=0", *overrides]
    flags = [x for s in sets for x in ("--set", s)]
    embedded, service = work / "embedded", work / "service"
    npo("train", "--config", config, *flags, "--out", str(embedded), "--no-progress")
    npo("up", "--config", config, *flags, "--out", str(service), "--replicas", str(replicas))
    try:
        npo("train", "--connect", str(service), "--no-progress")
    finally:
        npo("down", str(service))
    embedded_walls, _ = step_seconds(embedded)
    service_walls, syncs = step_seconds(service)
    e, s, p = statistics.median(embedded_walls), statistics.median(service_walls), statistics.median(syncs)
    return {
        "embedded_step_s": e,
        "service_step_s": s,
        "service_over_embedded": s / e,
        "publish_s": p,
        "publish_over_step": p / s,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_get_guides(work: Path, prompts: int = 256, calls: int = 300, tokens: int = 64) -> dict[str, float]:
    from npo.core.types import Sample
    from services.guidance_cache.client import GuidanceCacheClient
    from services.guidance_cache.embedded import EmbeddedRedis
    from services.guidance_cache.store import RedisGuideStore
    from services.ops.launcher import spawn, stop, wait_serving
    from services.ops.state import Started

    guides = [
        Sample(f"p{i:05d}", list(range(4, 4 + tokens)), [-0.25] * tokens, 1.0, "x" * tokens, 40, True)
        for i in range(prompts)
    ]
    ids = [g.prompt_id for g in guides]

    def timed(get) -> list[float]:
        for _ in range(20):
            get()
        out = []
        for _ in range(calls):
            started = time.perf_counter()
            got = get()
            out.append(time.perf_counter() - started)
            assert len(got) == prompts
        return out

    with EmbeddedRedis(unix_socket=False) as redis, RedisGuideStore(redis.url) as direct:
        direct.put_guides("bench", 40, guides)
        direct_times = timed(lambda: direct.get_guides("bench", 40, ids))
        argv = [sys.executable, "-m", "services.guidance_cache", "--address", "127.0.0.1:0", "--redis-url", redis.url]
        proc, log = spawn("guidance_cache", argv, work)
        try:
            address, _ = wait_serving("guidance_cache", proc, log, time.monotonic() + 60)
            with GuidanceCacheClient(address) as client:
                service_times = timed(lambda: client.get_guides("bench", 40, ids))
        finally:
            stop([Started("guidance_cache", proc.pid, "", str(log))])
    ms = 1000.0
    return {
        "get_guides_p50_ms": statistics.median(service_times) * ms,
        "get_guides_p99_ms": percentile(service_times, 0.99) * ms,
        "redis_direct_p50_ms": statistics.median(direct_times) * ms,
        "redis_direct_p99_ms": percentile(direct_times, 0.99) * ms,
        "service_over_direct_p50": statistics.median(service_times) / statistics.median(direct_times),
    }


def bench_vllm(config: str, overrides: list[str], vllm_python: Path, work: Path) -> dict[str, float]:
    """Tokens/s of a vLLM rollout server over a transformers rollout server: same config (model), same batch of
    64 prompts x 8 samples x 16 new tokens (no EOS stop), same client; best of 3 after a warm-up."""
    from npo.runtime.engine import SamplingParams
    from npo.runtime.run_config import load_run_config
    from services.ops.launcher import spawn, stop, wait_serving
    from services.ops.state import Started
    from services.rollout.client import RolloutClient
    from services.rollout.vllm_engine import rollout_tokens_per_second
    from services.wiring import build_policy_and_task

    cfg = load_run_config(config, overrides)
    policy, task = build_policy_and_task(cfg)  # warms the model cache the servers read
    prompts = [policy.encode_prompt(p) for p in task.train[:64]]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, stop_on_eos=False)
    flags = ["--config", config, *[x for o in overrides for x in ("--set", o)], "--address", "127.0.0.1:0"]
    out = {}
    for name, python, engine in (("transformers", sys.executable, "transformers"), ("vllm", vllm_python, "vllm")):
        argv = [str(python), "-m", "services.rollout", *flags, "--engine", engine]
        proc, log = spawn(f"rollout-{name}", argv, work)
        try:
            address, _ = wait_serving(name, proc, log, time.monotonic() + 300)
            with RolloutClient(address) as client:
                out[name] = rollout_tokens_per_second(client, prompts, 8, params, repeats=3)["tokens_per_s"]
        finally:
            stop([Started(name, proc.pid, "", str(log))])
    return {
        "transformers_tokens_per_s": out["transformers"],
        "vllm_tokens_per_s": out["vllm"],
        "vllm_over_transformers": out["vllm"] / out["transformers"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: steps,guides,vllm")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="npo-bench-") as tmp:
        work = Path(tmp)
        if "steps" not in skip:
            results.update(bench_steps(args.config, args.overrides, args.steps, args.replicas, work))
        if "guides" not in skip:
            results.update(bench_get_guides(work))
        if "vllm" not in skip:
            vllm_python = ROOT / ".venv-vllm" / "bin" / "python"
            if vllm_python.exists():
                results.update(bench_vllm(args.config, args.overrides, vllm_python, work))
            else:
                print("vllm: skipped (no .venv-vllm; `make vllm` creates it)")
    goals = {"service_over_embedded": "<= 1.15", "publish_over_step": "<= 0.10", "get_guides_p99_ms": "< 5"}
    print(f"{'measure':28s} {'value':>10s}  goal")
    for key, value in results.items():
        print(f"{key:28s} {value:10.4f}  {goals.get(key, '')}")
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "results": results,
    }
    (out / "services.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {out / 'services.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
