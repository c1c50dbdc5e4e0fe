"""`agent.protocols.outbox.Outbox`: FIFO, bound with drop-oldest, journal recovery, disk errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.protocols.outbox import JOURNAL_NAME, Outbox


def topics(box: Outbox) -> list[str]:
    return [e.topic for e in box]


def test_fifo_and_ack_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10)
    for i in range(3):
        box.put(f"t/{i}", f"p{i}")
    assert topics(box) == ["t/0", "t/1", "t/2"]
    first = box.first()
    assert first is not None and first.seq == 1
    assert [e.seq for e in box.after(1, 5)] == [2, 3]
    with pytest.raises(ValueError, match="out of order: expected seq 1, got 2"):
        box.ack(2)
    assert box.ack(1) and topics(box) == ["t/1", "t/2"]
    assert not box.ack(1)  # already gone: not counted twice
    assert box.stats()["acked"] == 1


def test_bound_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 3)
    dropped = [box.put(f"t/{i}", "x") for i in range(5)]
    assert dropped == [0, 0, 0, 1, 1]
    assert topics(box) == ["t/2", "t/3", "t/4"]
    assert box.stats() == {
        "queued": 3,
        "put": 5,
        "acked": 0,
        "dropped": 2,
        "disk_errors": 0,
        "recovered": 0,
    }
    assert not box.ack(1)  # was dropped while "in flight": ignored


def test_recovery_after_restart_keeps_unacked_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10)
    for i in range(5):
        box.put(f"t/{i}", f"p{i}", qos=1, retain=i == 4)
    box.ack(1)
    box.ack(2)
    box.close()
    box.close()  # idempotent
    again = Outbox(tmp_path, 10)
    assert [(e.seq, e.topic, e.payload) for e in again] == [
        (3, "t/2", "p2"),
        (4, "t/3", "p3"),
        (5, "t/4", "p4"),
    ]
    assert list(again)[-1].retain
    assert again.stats()["recovered"] == 3
    assert again.put("t/5", "p5") == 0
    assert list(again)[-1].seq == 6  # sequence numbers keep increasing across restarts
    # The journal was compacted at start: only live messages remain.
    assert len((tmp_path / JOURNAL_NAME).read_text().splitlines()) == 4


def test_recovery_skips_a_torn_last_line_and_respects_a_smaller_bound(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10)
    for i in range(6):
        box.put(f"t/{i}", "x")
    box.close()
    with (tmp_path / JOURNAL_NAME).open("a") as f:
        f.write('{"seq": 7, "topic": "t/6", "pay')  # a crash in the middle of a write
    again = Outbox(tmp_path, 4)
    assert topics(again) == ["t/2", "t/3", "t/4", "t/5"]
    assert again.stats()["dropped"] == 2


def test_journal_is_truncated_when_empty_and_compacted_when_long(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 5)
    for i in range(100):
        box.put("t", str(i))
        first = box.first()
        assert first is not None
        if i % 10 != 9:
            box.ack(first.seq)
    assert len(box) == 5  # 10 left unacked, 5 dropped
    lines = (tmp_path / JOURNAL_NAME).read_text().splitlines()
    assert len(lines) <= 4 * 5 + 2
    while (first := box.first()) is not None:
        box.ack(first.seq)
    assert (tmp_path / JOURNAL_NAME).read_text() == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_directory_counts_errors_and_keeps_messages(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        box = Outbox(locked / "outbox", 10)
        box.put("t", "x")
        assert len(box) == 1 and box.stats()["disk_errors"] >= 1
    finally:
        locked.chmod(0o700)


def test_disk_full_counts_errors_and_keeps_messages(tmp_path: Path) -> None:
    """Writes failing with ENOSPC (simulated with /dev/full) never fail `put`; the journal is
    then left alone (it may end in a torn line) until a fresh one can be written."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    box = Outbox(tmp_path, 10)
    box.put("t/0", "x")
    assert box._file is not None
    box._file.close()
    box._file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 - replaces the journal
    for i in range(1, 4):
        box.put(f"t/{i}", "x")
    assert topics(box) == ["t/0", "t/1", "t/2", "t/3"]
    assert box.stats()["disk_errors"] == 1 and not box.disk_ok
    assert "No space left on device" in (box.last_disk_error or "")
    # Drained: a fresh (empty) journal replaces the stale one and is used again.
    while (first := box.first()) is not None:
        box.ack(first.seq)
    assert box.disk_ok and (tmp_path / JOURNAL_NAME).read_text() == ""
    box.put("t/4", "y")
    assert '"t/4"' in (tmp_path / JOURNAL_NAME).read_text()
    box.close()


def test_in_memory_outbox() -> None:
    box = Outbox(None, 2)
    for i in range(3):
        box.put(f"t/{i}", "x")
    assert topics(box) == ["t/1", "t/2"] and box.path is None


def test_a_new_outbox_is_private(tmp_path: Path) -> None:
    """Transcripts wait in the journal: its directory is 0700 and the journal 0600, whatever
    the umask, also after a rewrite."""
    old = os.umask(0o022)
    try:
        box = Outbox(tmp_path / "state" / "outbox", 10)
        box.put("t/0", "secret words")
    finally:
        os.umask(old)
    assert (tmp_path / "state" / "outbox").stat().st_mode & 0o777 == 0o700
    journal = tmp_path / "state" / "outbox" / JOURNAL_NAME
    assert journal.stat().st_mode & 0o777 == 0o600
    box.close()
    reopened = Outbox(tmp_path / "state" / "outbox", 10)  # recovery rewrites the journal
    assert topics(reopened) == ["t/0"]
    assert journal.stat().st_mode & 0o777 == 0o600
    reopened.close()
