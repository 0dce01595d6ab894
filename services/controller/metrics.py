"""Where the controller reads the run's reward and entropy: a Prometheus server (PromQL over its HTTP API) or, when
none is configured, a direct scrape of the learner's /metrics.

A reading is the latest training row's step, reward and entropy, or an error saying why there is none: a metric
that is missing, a source that does not answer, or values older than `stale_after_s`. A missing value is never read
as zero, and a reading with an error is never fed to the AutoNPO trigger.

    source = PrometheusSource("http://127.0.0.1:9090", run="svc")     # or ScrapeSource("http://.../metrics", "svc")
    reading = source.read()
    if reading.ok: autonpo.observe(reading.step, reading.reward, reading.entropy)
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

METRICS = {"step": "npo_step", "reward": "npo_reward_mean", "entropy": "npo_entropy"}
"""Reading field -> the learner's metric (services/learner/prometheus.py)."""


@dataclass(frozen=True)
class Reading:
    """One read of the run's training signals."""

    step: int | None = None
    """Main-line step of the latest row (None when unknown)."""
    reward: float | None = None
    """Its mean verified reward."""
    entropy: float | None = None
    """Its mean per-token entropy."""
    age_s: float | None = None
    """Seconds since the values were sampled (Prometheus: the sample timestamp; direct scrape: 0)."""
    read_unix: float = 0.0
    """When this reading was taken."""
    error: str = ""
    """Why there is no usable reading (missing metric, source down, stale values); empty when ok."""

    @property
    def ok(self) -> bool:
        return not self.error

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _label_value(run: str) -> str:
    return run.replace("\\", "\\\\").replace('"', '\\"')


def _get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # noqa: S310 - configured http(s) URL
        return reply.read()


class PrometheusSource:
    """Instant PromQL queries `npo_step{run="RUN"}` etc. against the Prometheus server at `url`."""

    def __init__(self, url: str, run: str, *, stale_after_s: float = 60.0, timeout_s: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"prometheus.url: expected an http(s):// URL, got {url!r}")
        self.url, self.run = url.rstrip("/"), run
        self.stale_after_s, self.timeout_s = stale_after_s, timeout_s

    def describe(self) -> str:
        return f"prometheus {self.url}"

    def _query(self, metric: str) -> tuple[float, float] | None:
        """(sample unix time, value) of `metric` for this run, None when Prometheus has no such series."""
        promql = f'{metric}{{run="{_label_value(self.run)}"}}'
        body = _get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", self.timeout_s)
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise ConnectionError(f"query {promql}: {answer.get('error', 'failed')}")
        result = answer["data"]["result"]
        if not result:
            return None
        stamp, value = result[0]["value"]
        return float(stamp), float(value)

    def read(self) -> Reading:
        now = time.time()
        try:
            values = {field: self._query(metric) for field, metric in METRICS.items()}
        except (OSError, ValueError, KeyError) as exc:
            return Reading(read_unix=now, error=f"{self.describe()}: {exc}")
        missing = [METRICS[f] for f, v in values.items() if v is None]
        if missing:
            return Reading(read_unix=now, error=f"{self.describe()}: no samples of {', '.join(missing)} for this run")
        return _checked(values, now, self.stale_after_s, self.describe())


class ScrapeSource:
    """Reads the learner's /metrics at `url` directly (no Prometheus server)."""

    def __init__(self, url: str, run: str, *, timeout_s: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"metrics url: expected an http(s):// URL, got {url!r}")
        self.url, self.run, self.timeout_s = url, run, timeout_s

    def describe(self) -> str:
        return f"scrape {self.url}"

    def read(self) -> Reading:
        now = time.time()
        try:
            text = _get(self.url, self.timeout_s).decode()
        except (OSError, UnicodeDecodeError) as exc:
            return Reading(read_unix=now, error=f"{self.describe()}: {exc}")
        found: dict[str, tuple[float, float]] = {}
        wanted = {metric: field for field, metric in METRICS.items()}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted and sample.labels.get("run") == self.run:
                    found[wanted[sample.name]] = (now, float(sample.value))
        missing = [METRICS[f] for f in METRICS if f not in found]
        if missing:
            return Reading(read_unix=now, error=f"{self.describe()}: no samples of {', '.join(missing)} for this run")
        return _checked(found, now, math.inf, self.describe())


def _checked(values: dict, now: float, stale_after_s: float, where: str) -> Reading:
    stamp = min(t for t, _ in values.values())
    step, reward, entropy = (values[f][1] for f in ("step", "reward", "entropy"))
    age = max(0.0, now - stamp)
    if not all(math.isfinite(v) for v in (step, reward, entropy)):
        return Reading(read_unix=now, age_s=age, error=f"{where}: a value is not finite")
    reading = Reading(int(step), reward, entropy, age, now)
    if age > stale_after_s:
        return Reading(int(step), reward, entropy, age, now, f"{where}: values are {age:.0f} s old (stale)")
    return reading
