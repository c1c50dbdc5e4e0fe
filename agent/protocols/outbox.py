"""A bounded, on-disk, first-in-first-out outbox for MQTT messages.

Messages wait here until the broker acknowledges them (PUBACK), so a broker outage or a
restart of the agent loses nothing up to the bound. The design keeps the loop fast:

- The in-memory deque is the authority while the process runs; the journal on disk only
  lets a restarted process pick up where the last one stopped.
- The journal `outbox.jsonl` is append-only. A message is one line
  `{"seq": N, "topic": ..., "payload": ..., "qos": ..., "retain": ...}`; removal (after
  PUBACK, or a drop) is always of a prefix of the queue, written as one line `{"upto": N}`.
  One small `write` per call, no `fsync`: a crash of the process loses nothing, a power cut
  may lose the last writes the kernel had not flushed.
- When the queue becomes empty the journal is truncated; when it grows past a few times the
  bound it is rewritten with the live messages only (rare, bounded work).
- Beyond `max_events` the **oldest** message is dropped (the newest matter most to a live
  agent) and counted in `dropped`.
- A disk that is full or unwritable never fails `put`: the error is counted in
  `disk_errors`, logged once, and the message is still queued in memory. After a failed
  write the journal no longer matches the queue (a torn line, missing records), so appending
  stops; at most every `DISK_RETRY_S`, and whenever the queue empties, the whole live queue is
  written to a fresh journal that replaces the stale one (which frees the space a full disk
  needs). `disk_ok` and `last_disk_error` say where things stand.
- The journal is written unbuffered (bytes, one `write` per record): no buffer can hold a
  failed record back and replay it later, out of place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

JOURNAL_NAME = "outbox.jsonl"
# Rewrite the journal once it holds this many times more lines than the bound.
_COMPACT_FACTOR = 4
#: After a disk error, how often (at most) to try a fresh journal while messages wait, seconds.
DISK_RETRY_S = 2.0


@dataclass(frozen=True)
class OutboxEntry:
    """One queued message.

    Attributes:
        seq: sequence number, strictly increasing across restarts.
        topic: MQTT topic.
        payload: UTF-8 text payload (events are JSON).
        qos: MQTT QoS.
        retain: publish retained.
    """

    seq: int
    topic: str
    payload: str
    qos: int = 1
    retain: bool = False


class Outbox:
    """Bounded FIFO of messages awaiting acknowledgement, journalled under `directory`.

    Args:
        directory: where the journal lives (created if missing); None keeps the outbox in
            memory only.
        max_events: the bound; beyond it the oldest message is dropped and counted.

    Not thread-safe: use it from the event loop only.
    """

    def __init__(self, directory: Path | None, max_events: int) -> None:
        if max_events < 1:
            raise ValueError(f"max_events: expected >= 1, got {max_events}")
        self._dir = directory
        self._max = max_events
        self._queue: deque[OutboxEntry] = deque()
        self._next_seq = 1
        self._file: Any = None  # the journal, opened unbuffered in binary mode
        self._journal_lines = 0
        self._disk_ok = True
        self._last_disk_error: str | None = None
        self._next_retry = 0.0
        self._closed = False
        self.put_count = 0
        self.acked = 0
        self.dropped = 0
        self.disk_errors = 0
        self.recovered = 0
        self._open()

    # -- public API -----------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The journal file, or None for an in-memory outbox."""
        return None if self._dir is None else self._dir / JOURNAL_NAME

    @property
    def max_events(self) -> int:
        """The bound."""
        return self._max

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[OutboxEntry]:
        return iter(list(self._queue))

    def first(self) -> OutboxEntry | None:
        """The oldest queued message, or None when empty."""
        return self._queue[0] if self._queue else None

    def after(self, seq: int, limit: int) -> list[OutboxEntry]:
        """Up to `limit` queued messages with a sequence number above `seq`, oldest first."""
        out: list[OutboxEntry] = []
        for entry in self._queue:
            if entry.seq > seq:
                out.append(entry)
                if len(out) >= limit:
                    break
        return out

    def put(self, topic: str, payload: str, qos: int = 1, retain: bool = False) -> int:
        """Queue a message; returns how many old messages were dropped to make room (0 or 1).

        Never raises on disk errors (they are counted in `disk_errors`).
        """
        if self._closed:
            raise RuntimeError("outbox is closed")
        entry = OutboxEntry(self._next_seq, topic, payload, qos, retain)
        self._next_seq += 1
        self._queue.append(entry)
        self.put_count += 1
        self._append(
            {"seq": entry.seq, "topic": topic, "payload": payload, "qos": qos, "retain": retain}
        )
        dropped = 0
        if len(self._queue) > self._max:
            oldest = self._queue[0]
            self._remove_upto(oldest.seq)
            self.dropped += 1
            dropped = 1
        return dropped

    def ack(self, seq: int) -> bool:
        """Remove the message `seq` after its PUBACK; only the oldest message can be acked.

        Returns:
            True if it was removed; False if it was no longer queued (dropped meanwhile).

        Raises:
            ValueError: if `seq` is queued but not the oldest (acks must come in order).
        """
        if not self._queue or seq < self._queue[0].seq:
            return False
        if seq != self._queue[0].seq:
            raise ValueError(
                f"outbox ack out of order: expected seq {self._queue[0].seq}, got {seq}"
            )
        self._remove_upto(seq)
        self.acked += 1
        return True

    @property
    def disk_ok(self) -> bool:
        """False from a failed journal operation until a fresh journal is written."""
        return self._disk_ok

    @property
    def last_disk_error(self) -> str | None:
        """The text of the last disk error (``OSError``), or None if there never was one."""
        return self._last_disk_error

    def stats(self) -> dict[str, int]:
        """Counters: `queued`, `put`, `acked`, `dropped`, `disk_errors`, `recovered`."""
        return {
            "queued": len(self._queue),
            "put": self.put_count,
            "acked": self.acked,
            "dropped": self.dropped,
            "disk_errors": self.disk_errors,
            "recovered": self.recovered,
        }

    def close(self) -> None:
        """Flush and close the journal (idempotent); queued messages stay on disk."""
        if self._closed:
            return
        self._closed = True
        self._close_file()

    # -- internals ------------------------------------------------------------------------

    def _open(self) -> None:
        if self._dir is None:
            return
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self._dir / JOURNAL_NAME
            if path.exists():
                self._recover(path)
            if self._queue:
                # Start from a compact journal holding the recovered messages only.
                self._rewrite()
            else:
                self._file = path.open("wb", buffering=0)
                path.chmod(0o600)
        except OSError as exc:
            self._disk_error("opening", exc)

    def _recover(self, path: Path) -> None:
        entries: dict[int, OutboxEntry] = {}
        upto = 0
        bad = 0
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    if "upto" in rec:
                        upto = max(upto, int(rec["upto"]))
                    else:
                        e = OutboxEntry(
                            int(rec["seq"]),
                            str(rec["topic"]),
                            str(rec["payload"]),
                            int(rec.get("qos", 1)),
                            bool(rec.get("retain", False)),
                        )
                        entries[e.seq] = e
                except (ValueError, KeyError, TypeError):
                    bad += 1  # a torn last line after a crash, most likely
        if bad:
            logger.warning("outbox %s: skipped %d unreadable journal line(s)", path, bad)
        live = sorted((e for s, e in entries.items() if s > upto), key=lambda e: e.seq)
        if len(live) > self._max:
            self.dropped += len(live) - self._max
            logger.warning(
                "outbox %s: %d recovered messages exceed the bound %d; dropped the oldest %d",
                path,
                len(live),
                self._max,
                len(live) - self._max,
            )
            live = live[-self._max :]
        self._queue.extend(live)
        self.recovered = len(live)
        self._next_seq = max([upto, *entries]) + 1 if (entries or upto) else 1
        if live:
            logger.info("outbox %s: recovered %d undelivered message(s)", path, len(live))

    def _remove_upto(self, seq: int) -> None:
        while self._queue and self._queue[0].seq <= seq:
            self._queue.popleft()
        if not self._queue:
            self._truncate()
        else:
            self._append({"upto": seq})
            if self._journal_lines > _COMPACT_FACTOR * self._max:
                self._rewrite()

    def _append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            if self._dir is not None and not self._closed and time.monotonic() >= self._next_retry:
                self._rewrite()  # the queue includes `record` (or `record` removed a prefix)
            return
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        try:
            view = memoryview(data)
            while view:  # a raw write may be short
                written = self._file.write(view)
                view = view[written or 0 :]
            self._journal_lines += 1
        except OSError as exc:
            # The journal may now end in a torn line: stop appending to it (see the module
            # docstring); a fresh one replaces it when the disk allows.
            self._close_file()
            self._disk_error("writing", exc)

    def _truncate(self) -> None:
        if self._file is None:
            if self._dir is not None and not self._closed:
                self._rewrite()  # an empty journal replaces the stale one, freeing its space
            return
        try:
            self._file.seek(0)
            self._file.truncate()
            self._journal_lines = 0
        except OSError as exc:
            self._close_file()
            self._disk_error("truncating", exc)

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()  # unbuffered: nothing left to flush, so this only frees the fd
            except OSError as exc:
                self._disk_error("closing", exc)

    def _rewrite(self) -> None:
        """Write the live messages to a fresh journal and swap it in atomically (also the
        way back after a disk error)."""
        assert self._dir is not None
        path = self._dir / JOURNAL_NAME
        tmp = path.with_suffix(".tmp")
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tmp.open("w", encoding="utf-8") as f:
                tmp.chmod(0o600)
                for e in self._queue:
                    rec = {
                        "seq": e.seq,
                        "topic": e.topic,
                        "payload": e.payload,
                        "qos": e.qos,
                        "retain": e.retain,
                    }
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
            self._close_file()
            self._file = path.open("ab", buffering=0)
            self._journal_lines = len(self._queue)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # give back what the attempt took of a full disk
            self._disk_error("writing a fresh copy of", exc)
            return
        self._disk_recovered()

    def _disk_error(self, action: str, exc: OSError) -> None:
        self.disk_errors += 1
        self._last_disk_error = f"{action} the journal failed: {exc}"
        self._next_retry = time.monotonic() + DISK_RETRY_S
        if self._disk_ok:
            logger.warning(
                "outbox %s: %s the journal failed (%s); messages are kept in memory only "
                "until the disk recovers",
                self._dir,
                action,
                exc,
            )
        self._disk_ok = False

    def _disk_recovered(self) -> None:
        if not self._disk_ok:
            logger.info("outbox %s: journal writable again", self._dir)
            self._disk_ok = True
