"""The logging sinks (npo.runtime.logsinks): metrics.csv, TensorBoard, Weights & Biases (offline), run_info.json, and
the CSV-only run folder that npo.analysis.runs and `npo compare` accept.

Rows are real: ROWS are the metrics rows of `npo train --config configs/tiny.yaml` (3 steps, eval every 2); the slow
test trains a real NPO run with a rollback. W&B runs offline only (WANDB_MODE=offline): nothing leaves the machine.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from npo.analysis.runs import load_run, metrics_file
from npo.core.config import ConfigError, from_dict
from npo.runtime.logsinks import (
    RUN_INFO,
    WANDB_RUN,
    CsvSink,
    LoggingConfig,
    flatten_row,
    open_sinks,
    read_metrics_csv,
    resolve_wandb_dir,
    write_run_info,
)

ROOT = Path(__file__).resolve().parents[1]

ROWS_JSONL = """\
{"approx_kl": 6.802401659533955e-14, "clip_frac": 0.0, "clip_frac_guide": 0.0, "entropy": 0.8945370842428768, "eval_acc": 0.17, "eval_greedy_acc": 0.18, "gated_groups": 30, "gen_seconds": 0.14463653200002113, "grad_norm": 1.8174301385879517, "guide_slots": 0, "loss": 0.0, "optimizer_steps": 1, "pass_rate": 0.171875, "response_len": 2.65625, "reward_mean": 0.171875, "samples_total": 256, "segment": "grpo", "step": 0, "train_seconds": 0.8345573990000048, "wall_time": 1.1047131680000177, "zero_groups": 0.375}
{"approx_kl": 4.554083144121292e-14, "clip_frac": 0.0, "clip_frac_guide": 0.0, "entropy": 0.9192855953246124, "gated_groups": 32, "gen_seconds": 0.13033250499998417, "grad_norm": 1.0460532903671265, "guide_slots": 0, "loss": -1.979060471057892e-08, "optimizer_steps": 2, "pass_rate": 0.1640625, "response_len": 2.51953125, "reward_mean": 0.1640625, "samples_total": 512, "segment": "grpo", "step": 1, "train_seconds": 0.4894712330000175, "wall_time": 1.773890999999992, "zero_groups": 0.375}
{"approx_kl": 5.092754085740843e-14, "clip_frac": 0.0, "clip_frac_guide": 0.0, "entropy": 0.8834224866288304, "eval_acc": 0.17, "eval_greedy_acc": 0.2, "gated_groups": 32, "gen_seconds": 0.12281660499999703, "grad_norm": 1.7737840414047241, "guide_slots": 0, "loss": -1.1175870895385742e-08, "optimizer_steps": 3, "pass_rate": 0.125, "response_len": 2.61328125, "reward_mean": 0.125, "samples_total": 768, "segment": "grpo", "step": 2, "train_seconds": 0.45978124199999115, "wall_time": 2.4490668349999964, "zero_groups": 0.40625}
{"eval_acc": 0.22, "eval_greedy_acc": 0.2, "optimizer_steps": 3, "samples_total": 768, "segment": "final", "step": 3, "wall_time": 2.577170453000008}
"""  # noqa: E501
ROWS = [json.loads(line) for line in ROWS_JSONL.splitlines()]
"""Real metrics rows (see the module docstring)."""
EXTRA_ROW = {
    "step": 3,
    "segment": "grpo",
    "entropy": math.nan,
    "skipped": True,
    "timing": {"gen": 0.5, "train": {"fwd": 0.25}},
    "note": None,
    "deltas": [10, 20],
}
"""A row as a later runner might write it: NaN, a bool, nested values, a list, a null, and new keys."""
TB_TAGS = {k for r in ROWS for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
"""What the runner's TensorBoard code logged: every top-level int / float / bool but `step`."""


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B strictly offline, its files under tmp_path/wandb-home."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    return home


def write_jsonl(path: Path, rows) -> None:
    """metrics.jsonl exactly as the runner writes it (json.dumps(row, sort_keys=True), one per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


# ----------------------------------------------------------------------------------------------------------------
# Config.


def test_defaults_log_to_tensorboard_and_csv_and_not_wandb():
    cfg = LoggingConfig()
    cfg.validate()
    assert (cfg.tensorboard, cfg.csv, cfg.wandb) == (True, True, False)
    assert (cfg.wandb_mode, cfg.wandb_project, cfg.wandb_dir, cfg.wandb_tags) == ("offline", "npo", "", [])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"wandb_mode": "cloud"}, "logging.wandb_mode: must be one of ['offline', 'online', 'disabled'], got 'cloud'"),
        ({"wandb": True, "wandb_project": " "}, "logging.wandb_project: must not be empty"),
        ({"wandb_tags": ["ok", ""]}, "logging.wandb_tags: expected non-empty strings"),
    ],
)
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        LoggingConfig(**values).validate()
    # As a `logging:` section of a run config (from_dict validates each section).
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        from_dict(LoggingConfig, values, "logging.")


def test_config_section_rejects_unknown_keys_with_a_hint():
    with pytest.raises(
        ConfigError, match="unknown config key 'logging.wandb_projct'; did you mean 'logging.wandb_project'"
    ):
        from_dict(LoggingConfig, {"wandb_projct": "x"}, "logging.")
    cfg = from_dict(LoggingConfig, {"wandb": True, "wandb_tags": ["a", "b"]}, "logging.")
    assert cfg.wandb and cfg.wandb_tags == ["a", "b"]


def test_wandb_enabled_but_not_installed_is_one_config_error_before_anything_opens(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as without the package
    with pytest.raises(ConfigError) as err:
        open_sinks(LoggingConfig(wandb=True), tmp_path / "run", {})
    assert str(err.value).startswith("logging.wandb: the wandb package is not installed")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
    open_sinks(LoggingConfig(tensorboard=False), tmp_path / "run", {}).close()  # off: wandb is never imported


# ----------------------------------------------------------------------------------------------------------------
# metrics.csv and metrics.jsonl as tables.


def test_flatten_row_joins_nested_keys_with_a_slash():
    assert flatten_row(EXTRA_ROW) == {
        "step": 3,
        "segment": "grpo",
        "entropy": EXTRA_ROW["entropy"],
        "skipped": True,
        "timing/gen": 0.5,
        "timing/train/fwd": 0.25,
        "note": None,
        "deltas": [10, 20],
    }


def test_csv_mirrors_the_rows_and_grows_its_header(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "metrics.csv"
    sink = CsvSink(path)
    for row in ROWS[:2]:
        sink.log(row, row["step"])
    header_before = path.read_text().splitlines()[0].split(",")
    assert header_before[:2] == ["step", "segment"] and "eval_acc" in header_before
    for row in [*ROWS[2:], EXTRA_ROW]:
        sink.log(row, row["step"])
    sink.close()

    header = path.read_text().splitlines()[0].split(",")
    assert header[:2] == ["step", "segment"] and header[2:] == sorted(header[2:])
    assert {"timing/gen", "timing/train/fwd", "skipped", "deltas"} <= set(header)
    frame = pd.read_csv(path)
    assert len(frame) == len(ROWS) + 1 and list(frame.columns) == header
    assert frame["step"].tolist() == [0, 1, 2, 3, 3]
    assert frame["segment"].tolist() == ["grpo", "grpo", "grpo", "final", "grpo"]
    assert frame["reward_mean"].iloc[:3].tolist() == [r["reward_mean"] for r in ROWS[:3]]  # floats round-trip
    assert math.isnan(frame["eval_acc"].iloc[1]) and math.isnan(frame["entropy"].iloc[4])
    assert frame["timing/train/fwd"].iloc[4] == 0.25

    back = read_metrics_csv(path)  # what npo.analysis.runs reads
    expected = [{k: v for k, v in flatten_row(r).items() if v is not None} for r in ROWS]
    assert back[:4] == expected
    assert back[4]["skipped"] is True and back[4]["deltas"] == "[10, 20]" and "note" not in back[4]
    assert all(same(back[4][k], v) for k, v in flatten_row(EXTRA_ROW).items() if k not in ("deltas", "note"))


def test_csv_is_rebuilt_from_metrics_jsonl_when_the_sinks_open(tmp_path):
    """A resumed run: metrics.jsonl was truncated to the checkpoint's rows; metrics.csv follows it."""
    run = tmp_path / "run"
    write_jsonl(run / "metrics.jsonl", ROWS[:2])
    (run / "metrics.csv").write_text("step,stale\n0,1\n5,1\n")
    with open_sinks(LoggingConfig(tensorboard=False), run, {}) as sinks:
        assert read_metrics_csv(run / "metrics.csv") == ROWS[:2]
        sinks.log(ROWS[2], 2)
    assert read_metrics_csv(run / "metrics.csv") == ROWS[:3]
    assert not list(run.glob("*.partial"))


def test_metrics_jsonl_reads_with_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [*ROWS, EXTRA_ROW])  # NaN is written as the JSON extension `NaN`, as the runner does
    frame = pd.read_json(path, lines=True)
    assert frame["step"].tolist() == [0, 1, 2, 3, 3]
    assert frame["reward_mean"].iloc[0] == ROWS[0]["reward_mean"]
    assert math.isnan(frame["entropy"].iloc[4]) and frame["timing"].iloc[4] == EXTRA_ROW["timing"]


# ----------------------------------------------------------------------------------------------------------------
# TensorBoard and Weights & Biases.


def test_tensorboard_logs_the_top_level_numbers_of_each_row(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    with open_sinks(LoggingConfig(csv=False), run, {}) as sinks:
        for row in [*ROWS, EXTRA_ROW]:
            sinks.log(row, row["step"])
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == TB_TAGS | {"skipped"}  # nested (`timing`), lists, strings, None and `step` are not scalars
    eval_acc = events.Scalars("eval_acc")
    assert [e.step for e in eval_acc] == [0, 2, 3] and [e.value for e in eval_acc] == pytest.approx([0.17, 0.17, 0.22])
    assert [e.step for e in events.Scalars("reward_mean")] == [0, 1, 2]
    assert not (run / "metrics.csv").exists()


def wandb_files(home: Path) -> list[Path]:
    return sorted(home.glob("wandb/offline-run-*/run-*.wandb"))


def wait_for_bytes(path: Path, keys, timeout: float = 30.0) -> list[bytes]:
    """The keys missing from `path` once they are all there or `timeout` passed (W&B's service process writes the
    transaction log asynchronously: finish() may return before the last records reach the disk)."""
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        missing = [k for k in keys if k not in data]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


def test_wandb_dir_is_the_option_else_the_environment_else_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env"))
    assert resolve_wandb_dir(LoggingConfig(wandb_dir=str(tmp_path / "opt")), tmp_path / "run") == tmp_path / "opt"
    assert resolve_wandb_dir(LoggingConfig(), tmp_path / "run") == tmp_path / "env"
    monkeypatch.delenv("WANDB_DIR")
    assert resolve_wandb_dir(LoggingConfig(), tmp_path / "run") == tmp_path / "run"


def test_wandb_offline_writes_the_run_under_its_dir_and_a_resume_continues_it(tmp_path, offline_wandb):
    run = tmp_path / "run"
    cfg = LoggingConfig(tensorboard=False, csv=False, wandb=True, wandb_tags=["t1"])  # wandb_dir: $WANDB_DIR
    run_config = {"method": "grpo", "seed": 0, "train": {"steps": 3}}
    info = write_run_info(run)
    with open_sinks(cfg, run, run_config, run_info=info) as sinks:
        for row in [*ROWS, EXTRA_ROW]:
            sinks.log(row, row["step"])
    files = wandb_files(offline_wandb)
    assert len(files) == 1
    record = json.loads((run / WANDB_RUN).read_text())
    assert record["mode"] == "offline" and files[0].name == f"run-{record['id']}.wandb"
    keys = (b"reward_mean", b"eval_acc", b"timing/train/fwd", b"segment", b"run_info", b"t1")
    assert wait_for_bytes(files[0], keys) == [], "W&B's transaction log misses these"

    with open_sinks(cfg, run, run_config, resume=True) as sinks:
        sinks.log(ROWS[2], 2)
    files = wandb_files(offline_wandb)
    assert len(files) == 2 and {f.name for f in files} == {f"run-{record['id']}.wandb"}
    assert json.loads((run / WANDB_RUN).read_text())["id"] == record["id"]


# ----------------------------------------------------------------------------------------------------------------
# run_info.json.


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_run_info_records_the_checkout_and_the_environment(tmp_path):
    info = write_run_info(tmp_path / "run", argv=["npo", "train", "--out", "a b"])
    saved = json.loads((tmp_path / "run" / RUN_INFO).read_text())
    assert saved == info
    if (ROOT / ".git").exists():
        assert len(info["git"]["commit"]) == 40 and isinstance(info["git"]["dirty"], bool)
    assert info["command"] == "npo train --out 'a b'" and info["python"].count(".") == 2
    assert info["npo_version"] and info["torch"] and info["hostname"] and info["started"].endswith("+00:00")
    assert info["config"] == "config.yaml"


def test_run_info_without_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert write_run_info(tmp_path / "a", code_dir=tmp_path)["git"] == {}  # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git executable
    assert write_run_info(tmp_path / "b")["git"] == {}


def test_resume_appends_to_run_info(tmp_path):
    first = write_run_info(tmp_path, argv=["npo", "train"])
    write_run_info(tmp_path, resume=True, argv=["npo", "train", "--resume", str(tmp_path)])
    saved = json.loads((tmp_path / RUN_INFO).read_text())
    assert saved["argv"] == first["argv"] and [r["argv"][-2] for r in saved["resumes"]] == ["--resume"]


# ----------------------------------------------------------------------------------------------------------------
# A run folder with only metrics.csv: npo.analysis.runs and `npo compare`.


def run_folder(folder: Path, rows) -> Path:
    """A run folder as the runner (metrics.jsonl, config.yaml, interventions.jsonl) plus the CSV sink write it."""
    write_jsonl(folder / "metrics.jsonl", [])
    (folder / "config.yaml").write_text("method: grpo\nseed: 0\n")
    (folder / "interventions.jsonl").write_text("")
    with open_sinks(LoggingConfig(tensorboard=False), folder, {}) as sinks:
        for row in rows:
            with open(folder / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            sinks.log(row, row["step"])
    return folder


def test_a_csv_only_run_folder_loads_like_the_jsonl_one(tmp_path):
    full = run_folder(tmp_path / "grpo", ROWS)
    csv_only = tmp_path / "csv" / "grpo"
    shutil.copytree(full, csv_only)
    (csv_only / "metrics.jsonl").unlink()
    a, b, c = load_run(full), load_run(csv_only), load_run(full / "metrics.csv")
    assert metrics_file(csv_only).name == "metrics.csv" and metrics_file(full).name == "metrics.jsonl"
    assert a.rows == b.rows == c.rows == ROWS
    assert a.main == b.main and a.evals == b.evals == c.evals and len(a.evals) == 3
    assert b.method == c.method == "grpo" and c.folder == full
    assert load_run(full / "metrics.jsonl").rows == ROWS
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl or metrics.csv"):
        load_run(tmp_path)


def test_npo_compare_accepts_a_csv_only_run(tmp_path, capsys):
    from services.cli import main

    reference = run_folder(tmp_path / "grpo", ROWS)
    other = tmp_path / "csv" / "grpo-csv"
    shutil.copytree(run_folder(tmp_path / "b" / "grpo-csv", ROWS[:2] + ROWS[3:]), other)
    (other / "metrics.jsonl").unlink()
    assert main(["compare", str(reference), str(other), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "grpo-csv" in out and (tmp_path / "cmp" / "compare.md").is_file()
    assert main(["compare", str(other / "metrics.csv"), "--out", str(tmp_path / "cmp2")]) == 0


# ----------------------------------------------------------------------------------------------------------------
# End to end: a real NPO run (scout, rollback, replay) feeding every sink.


@pytest.mark.slow
def test_real_run_rows_through_every_sink(tmp_path, offline_wandb):
    pd = pytest.importorskip("pandas")
    from reference import EARLY_BOOTSTRAP_NPO, EARLY_BOOTSTRAP_SEGMENTS, TINY_CHAIN_SUM

    from npo.runtime.models import load_policy
    from npo.runtime.run_config import load_run_config, run_config_to_dict
    from npo.runtime.runner import Runner
    from npo.runtime.store import MemoryGuideStore
    from npo.runtime.tasks import COMPACT_ALPHABET, load_task

    overrides = [f"model.cache_dir={tmp_path / 'models'}", "model.warmup_steps=40", *TINY_CHAIN_SUM]
    overrides += [*EARLY_BOOTSTRAP_NPO, "npo.early.delta=2", "eval.every=2", "eval.num_prompts=8"]
    overrides += ["checkpoint.every=1", "train.threads=1"]
    cfg = load_run_config(None, overrides)
    task = load_task(cfg.task)
    pairs = [(p.compact_prompt, p.solution) for p in task.train]
    policy = load_policy(cfg.model, seed=cfg.seed, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET)
    run = tmp_path / "run"
    logging = LoggingConfig(wandb=True)
    sinks = open_sinks(logging, run, run_config_to_dict(cfg), run_info=write_run_info(run))
    runner = Runner(
        cfg, run, policy=policy, task=task, store=MemoryGuideStore(), progress=False,
        after_step=lambda _runner, row: sinks.log(row, row["step"]),
    )  # fmt: skip
    runner.train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sinks.log(rows[-1], rows[-1]["step"])  # the final row (written by finish, not an after_step row)
    sinks.close()

    assert [(r["step"], r["segment"]) for r in rows] == EARLY_BOOTSTRAP_SEGMENTS
    segments = [s for _, s in EARLY_BOOTSTRAP_SEGMENTS]
    assert pd.read_json(run / "metrics.jsonl", lines=True)["segment"].tolist() == segments
    frame = pd.read_csv(run / "metrics.csv")
    assert frame["step"].tolist() == [r["step"] for r in rows]  # superseded rows kept, as in metrics.jsonl
    assert frame["reward_mean"].iloc[:-1].tolist() == [r["reward_mean"] for r in rows[:-1]]
    jsonl_run = load_run(run)
    (run / "metrics.jsonl").unlink()
    csv_run = load_run(run)
    assert csv_run.main == jsonl_run.main and csv_run.evals == jsonl_run.evals and csv_run.superseded
    assert (run / "tensorboard").is_dir() and len(wandb_files(offline_wandb)) == 1
    assert json.loads((run / RUN_INFO).read_text())["python"]
