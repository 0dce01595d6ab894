import json
import random

import numpy as np
import pytest
import torch

from npo.runtime.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state


def _writer(payload: bytes):
    def write(folder):
        (folder / "model.safetensors").write_bytes(payload)

    return write


def test_save_load_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path)
    state = {"optimizer": {"lr": 0.1, "t": torch.arange(3)}, "data_cursor": 7}
    mgr.save(7, _writer(b"weights"), state, {"a": 1}, ['{"x": 1}'], {"seed": 3})
    assert mgr.steps() == [7]
    ck = mgr.load(7)
    assert ck.step == 7 and ck.trainer_state["data_cursor"] == 7 and ck.trainer_state["step"] == 7
    assert torch.equal(ck.trainer_state["optimizer"]["t"], torch.arange(3))
    assert ck.runner_state == {"a": 1} and ck.guides_jsonl == ['{"x": 1}'] and ck.meta["config"] == {"seed": 3}
    assert (ck.path / "model.safetensors").read_bytes() == b"weights"


def test_failed_write_leaves_nothing(tmp_path):
    mgr = CheckpointManager(tmp_path)

    def broken(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        mgr.save(3, broken, {})
    assert mgr.steps() == [] and list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(2, _writer(b"old"), {})
    mgr.save(2, _writer(b"new"), {})
    assert mgr.steps() == [2]
    assert (mgr.load(2).path / "model.safetensors").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["step_000002"]


def test_corruption_is_detected_and_named(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, _writer(b"weights"), {})
    (path / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        mgr.load(1)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.pt is missing"):
        mgr.verify(1)
    with pytest.raises(CheckpointError, match="no checkpoint at step 9"):
        mgr.load(9)


def test_incomplete_folder_is_not_listed(tmp_path):
    mgr = CheckpointManager(tmp_path)
    (tmp_path / "step_000005").mkdir()  # no meta.json: an interrupted copy, not a checkpoint
    mgr.save(4, _writer(b"w"), {})
    assert mgr.steps() == [4] and mgr.latest() == 4


def test_prune_keeps_newest_and_protected(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for s in range(0, 60, 10):
        mgr.save(s, _writer(b"w"), {})
    deleted = mgr.prune(2, protected={10})
    assert deleted == [0, 20, 30]
    assert mgr.steps() == [10, 40, 50]
    assert mgr.prune(0) == []  # 0 = keep all


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    mgr = CheckpointManager(tmp_path)
    mgr.save(0, _writer(b"w"), {"rng": rng_state()})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(mgr.load(0).trainer_state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_meta_records_checksums(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(0, _writer(b"w"), {})
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["sha256"]) == {"model.safetensors", "trainer_state.pt", "runner_state.json", "guides.jsonl"}


def test_newest_valid_goes_by_save_time_and_sets_a_corrupt_one_aside(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in (5, 10, 15, 10):  # 10 is saved again last: after a rollback, 15 belongs to an abandoned line
        mgr.save(step, _writer(b"weights %d" % step), {"s": step}, {"step": step})
    assert mgr.newest_first() == [10, 15, 5]
    (mgr.path(10) / "model.safetensors").write_bytes(b"weig")  # truncated
    warnings = []
    ck = mgr.newest_valid(warnings.append)
    assert ck.step == 15 and ck.runner_state == {"step": 15}
    assert len(warnings) == 1 and "step_000010" in warnings[0] and "model.safetensors" in warnings[0]
    assert mgr.steps() == [5, 15] and (tmp_path / "step_000010.corrupt" / "model.safetensors").is_file()


def test_no_valid_checkpoint_is_one_line_with_a_hint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    assert mgr.newest_valid(print) is None  # no checkpoint at all: the caller decides (a fresh run)
    for step in (1, 2):
        mgr.save(step, _writer(b"weights"), {})
        (mgr.path(step) / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError) as info:
        mgr.newest_valid(lambda line: None)
    message = str(info.value)
    assert "\n" not in message and "no valid checkpoint" in message and "hint:" in message
    assert "step_000002" in message and "step_000001" in message
