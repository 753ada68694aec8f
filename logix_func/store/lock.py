"""One process per writer id: an OS lock on local files, a lease in the commit marker elsewhere.

Local files: ``shards/<writer>/writer.lock`` is locked with ``flock`` while the writer is open.
The kernel releases it when the process ends, however it ends (SIGKILL included), and no other
process can take it while the holder lives.

Other kvstores (``memory://``, ``gs://``, ``s3://``...): the commit marker holds a lease, the
owner's token and an expiry time ``LEASE_SECONDS`` ahead, renewed by a background thread every
quarter of that and by every commit. A writer refuses a marker whose lease has not expired, and
takes the marker over with a write conditioned on its storage generation, so of two openers one
wins. A holder that is killed blocks its writer id until its lease expires.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import weakref
from datetime import datetime, timezone
from typing import Any

from .errors import StoreIOError, WriterConflictError
from .layout import Root, shard_path

LEASE_SECONDS = 60.0


def holder_name() -> str:
    """``host/pid``: who holds a writer id, as written into its lock file or lease."""
    return f"{socket.gethostname()}/{os.getpid()}"


def in_use(writer: int, url: str, how: str, holder: str) -> WriterConflictError:
    if holder == holder_name():
        return WriterConflictError(
            f"writer {writer} of {url} is in use by another LogStore of this process ({how}); "
            "close() that one first (or use a with block), or pass another writer id"
        )
    return WriterConflictError(
        f"writer {writer} of {url} is in use by another process ({how}, holder {holder or '?'}); "
        "give every process its own writer id (e.g. writer=rank), or wait until that process "
        "has closed the store"
    )


class FileLock:
    """``flock`` on ``shards/<writer>/writer.lock``: held until :meth:`release` or exit."""

    def __init__(self, root: Root, writer: int):
        path = os.path.join(root.local, shard_path(writer).rsplit("/", 1)[0], "writer.lock")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.file = open(path, "a+b")  # noqa: SIM115 (closed, so unlocked, on release or exit)
        except OSError as e:
            raise StoreIOError(f"opening the lock of writer {writer} of {root.url}: {e}") from e
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read(200).decode(errors="replace")
            self.file.close()
            raise in_use(writer, root.url, f"it holds the lock on {path}", holder) from None
        self.file.truncate(0)
        self.file.write(holder_name().encode())
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def check_lease(marker: dict | None, writer: int, url: str) -> None:
    """Refuse a commit marker whose lease another writer still holds."""
    expires = None if marker is None else marker.get("expires")
    if expires is not None and expires > time.time():
        until = datetime.fromtimestamp(expires, timezone.utc).isoformat(timespec="seconds")
        how = f"its lease in commits/{writer}.json runs until {until} unless renewed"
        raise in_use(writer, url, how, marker.get("owner", "").rsplit("/", 1)[0])


class Renewal:
    """Calls ``renew()`` of an object every ``LEASE_SECONDS / 4`` until stopped or collected;
    an error is kept in ``error`` and ends the renewals."""

    def __init__(self, owner: Any):
        self.stop = threading.Event()
        self.error: Exception | None = None
        ref = weakref.ref(owner)
        threading.Thread(target=self._run, args=(ref,), daemon=True).start()

    def _run(self, ref: weakref.ref) -> None:
        while not self.stop.wait(LEASE_SECONDS / 4):
            owner = ref()
            if owner is None:
                return
            try:
                owner.renew()
            except Exception as e:  # reported by the writer at its next append or flush
                self.error = e
                return
            del owner
