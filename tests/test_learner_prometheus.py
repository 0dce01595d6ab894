"""The learner's /metrics endpoint, read over HTTP and scraped by a real Prometheus on loopback."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.learner.prometheus import LearnerMetrics


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.fixture
def metrics():
    m = LearnerMetrics("run-a")
    port = m.serve(0)
    yield m, port
    m.stop()


def test_rows_become_labelled_metrics_and_missing_values_stay_missing(metrics):
    m, port = metrics
    m.observe({"step": 0, "reward_mean": 0.25, "pass_rate": 0.25, "entropy": 0.9, "guide_slots": 3,
               "gen_seconds": 0.2, "train_seconds": 0.5, "optimizer_steps": 1})  # fmt: skip
    m.observe({"step": 1, "reward_mean": 0.5, "entropy": float("nan"), "guide_slots": 2, "eval_acc": 0.4})
    got = scrape(port)
    run = (("run", "run-a"),)
    assert got[("npo_step", run)] == 1.0
    assert got[("npo_reward_mean", run)] == 0.5
    assert got[("npo_pass_rate", run)] == 0.25  # absent from the second row: kept, not zeroed
    assert got[("npo_entropy", run)] == 0.9  # NaN is not a reading
    assert got[("npo_eval_acc", run)] == 0.4
    assert got[("npo_guide_slots_total", run)] == 5.0  # a counter: 3 + 2
    assert got[("npo_step_seconds_count", run)] == 1.0  # only the first row had timings
    assert got[("npo_step_seconds_sum", run)] == pytest.approx(0.7)


def test_metric_never_observed_is_absent_and_bad_sync_time_is_refused(metrics):
    m, port = metrics
    assert not any(name == "npo_eval_acc" for name, _ in scrape(port))
    with pytest.raises(ValueError, match="seconds"):
        m.observe_weight_sync(-1.0)
    m.observe_weight_sync(0.02)
    assert scrape(port)[("npo_weight_sync_seconds_count", (("run", "run-a"),))] == 1.0
    with pytest.raises(ValueError, match="run"):
        LearnerMetrics("")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    return json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]


def test_a_real_prometheus_scrapes_the_learner(metrics, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the prometheus binary is not installed; CI must run this test (.ci/run installs it)")
        pytest.skip("the prometheus binary is not installed (.ci/run installs Debian's prometheus package)")
    m, port = metrics
    m.observe({"step": 7, "reward_mean": 0.375, "entropy": 0.8125, "guide_slots": 4})
    prom_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: learner\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
    )
    log = tmp_path / "prometheus.log"
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # a file: a full pipe would block Prometheus
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        reward = entropy = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                reward, entropy = _query(prom_port, "npo_reward_mean"), _query(prom_port, "npo_entropy")
            except OSError:
                pass  # not listening yet
            if reward and entropy:
                break
            time.sleep(0.5)
        assert reward and entropy, "Prometheus did not scrape the learner within 60 s"
        assert reward[0]["metric"]["run"] == "run-a" and float(reward[0]["value"][1]) == 0.375
        assert float(entropy[0]["value"][1]) == 0.8125
    finally:
        proc.terminate()
        proc.wait(timeout=30)
