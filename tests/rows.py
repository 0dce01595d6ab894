"""Comparing the metrics rows of two runs that must agree (service mode, Ray, ... against the embedded run)."""

import json

import pytest

TIMING_KEYS = {"wall_time", "gen_seconds", "train_seconds", "weight_sync_seconds"}
"""Row keys that measure time: they differ between any two runs."""


def read_rows(run_dir):
    """The rows of run_dir/metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_rows_close(got, expected, ignore=TIMING_KEYS):
    """Same rows with the same keys (less `ignore`); floats within rel 1e-6 / abs 1e-9 (nan equals nan), the rest
    equal."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        a = {k: v for k, v in a.items() if k not in ignore}
        b = {k: v for k, v in b.items() if k not in ignore}
        assert a.keys() == b.keys(), (a["step"], a.keys() ^ b.keys())
        for key in a:
            if isinstance(a[key], float) or isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9, nan_ok=True), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key)
