"""CDC's checkpoint file on its own: where a restarted publisher resumes, what
it does with a checkpoint it cannot use, and that a save is atomic, only moves
forward and survives a failed write."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fluxkv.cdc.checkpoint import Checkpoint

EPOCH = "0123456789abcdef"


def held(path: Path) -> object:
    return json.loads(path.read_text())


def test_without_a_checkpoint_it_starts_one_at_the_end_of_the_log(tmp_path: Path) -> None:
    path = tmp_path / "node.aof.cdc-checkpoint"
    checkpoint = Checkpoint(str(path))
    assert checkpoint.load(EPOCH, 7) == 7 and checkpoint.revision == 7
    assert held(path) == {"epoch": EPOCH, "confirmed_revision": 7}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.aof.cdc-checkpoint"]  # no temporary file left


def test_a_new_log_gets_a_checkpoint_at_zero(tmp_path: Path) -> None:
    # Written before the node takes a write: a crash before the first confirm
    # must resume from 0, not from the end of the log it finds then.
    path = tmp_path / "node.aof.cdc-checkpoint"
    assert Checkpoint(str(path)).load(EPOCH, 0) == 0
    assert held(path) == {"epoch": EPOCH, "confirmed_revision": 0}


def test_a_restart_resumes_from_the_saved_revision(tmp_path: Path) -> None:
    path = tmp_path / "node.aof.cdc-checkpoint"
    path.write_bytes(b'{"epoch":"%s","confirmed_revision":33}\n' % EPOCH.encode())  # as earlier versions wrote it
    checkpoint = Checkpoint(str(path))
    assert checkpoint.load(EPOCH, 100) == 33
    checkpoint.save(40)
    assert path.read_bytes() == b'{"epoch":"%s","confirmed_revision":40}\n' % EPOCH.encode()
    again = Checkpoint(str(path))
    assert again.load(EPOCH, 100) == 40 and again.revision == 40


@pytest.mark.parametrize(
    ("content", "warning"),
    [
        (b'{"epoch":"another","confirmed_revision":5}', "belongs to another epoch"),
        (b'{"epoch":"%s","confirm' % EPOCH.encode(), "ignoring the CDC checkpoint"),
        (b'{"epoch":"%s","confirmed_revision":-1}' % EPOCH.encode(), None),
        (b'{"epoch":"%s","confirmed_revision":500}' % EPOCH.encode(), None),  # beyond the log's end
    ],
)
def test_a_checkpoint_it_cannot_use_is_replaced_by_one_at_the_end_of_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, warning: str | None
) -> None:
    path = tmp_path / "node.aof.cdc-checkpoint"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="fluxkv.cdc"):
        assert Checkpoint(str(path)).load(EPOCH, 100) == 100
    assert held(path) == {"epoch": EPOCH, "confirmed_revision": 100}
    if warning is not None:
        assert warning in caplog.text


def test_a_save_only_moves_forward(tmp_path: Path) -> None:
    path = tmp_path / "node.aof.cdc-checkpoint"
    checkpoint = Checkpoint(str(path))
    checkpoint.load(EPOCH, 0)
    checkpoint.save(10)
    checkpoint.save(5)  # a save cut short by shutdown, finishing after a later one
    assert checkpoint.revision == 10 and held(path) == {"epoch": EPOCH, "confirmed_revision": 10}


def test_a_failed_save_keeps_the_old_checkpoint_and_the_next_one_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node.aof.cdc-checkpoint"
    checkpoint = Checkpoint(str(path))
    checkpoint.load(EPOCH, 10)
    blocker = tmp_path / "node.aof.cdc-checkpoint.tmp"
    blocker.mkdir()  # the temporary file cannot be created (even by root)
    with caplog.at_level(logging.ERROR, logger="fluxkv.cdc"):
        checkpoint.save(20)
    assert "cannot write the CDC checkpoint" in caplog.text and "trying again later" in caplog.text
    assert checkpoint.revision == 10 and held(path) == {"epoch": EPOCH, "confirmed_revision": 10}
    blocker.rmdir()
    checkpoint.save(20)
    assert checkpoint.revision == 20 and held(path) == {"epoch": EPOCH, "confirmed_revision": 20}
