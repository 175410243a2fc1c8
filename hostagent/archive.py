"""GET /1.0/guests/NAME/archive: a tar of a path, made inside the running guest.

The tar is the guest's own `tar -cf - -C PATH .`, run as `vserver NAME exec`
runs a command (hostagent.guest.exec_in): the guest's view of its files, its
symlinks resolved inside it, nothing of the host's opened on its behalf. The
agent only relays the bytes, and never holds much of them:

    tar (in the guest) -> pipe -> worker thread (output sink)
        -> bounded asyncio.Queue -> the request's handler -> the client

The sink runs in an operation's worker thread and hands each chunk to the
event loop, waiting until the queue has room: a slow client slows tar down
(the pipe fills and tar blocks in write), it does not make the agent buffer
the archive. Past MAX_BYTES, when the client goes away, or when it takes
nothing for STALL_SECONDS, the sink or a byte on the cancel pipe makes
copy_until_exit kill tar (context.StopCopy); the exec then ends as a
timeout's would, and nothing is left running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

from hostagent import context

__all__ = ["ArchiveFailed", "ArchiveStream", "tar_argv"]

QUEUE_CHUNKS = 8  # chunks of at most 64 KiB between tar and the client: 512 KiB
STALL_SECONDS = 120.0  # a client that takes nothing for this long is dropped
TIMEOUT_SECONDS = 3600.0  # the longest an archive may take
ERRORS_MAX = 4096  # bytes of tar's stderr kept for the error message
WATCH_SECONDS = 2.0  # how often a client waiting for bytes is checked for being there


def tar_argv(path: str) -> list[str]:
    """The command run in the guest. PATH is absolute (wire.check_guest_path), so it
    never reads as an option, and `.` stores the members relative to it."""
    return ["tar", "-cf", "-", "-C", path, "."]


class ArchiveFailed(RuntimeError):
    """tar failed inside the guest; MISSING if it said the path does not exist."""

    def __init__(self, message: str, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


class ArchiveStream:
    """One archive on its way from the guest to one client.

    The worker thread calls run(); the handler, in the event loop, takes chunks
    with next() until it returns None, and calls cancel() if the client goes
    away. close() (in the loop, once the operation has ended) frees the pipe.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_bytes: int) -> None:
        self.loop = loop
        self.max_bytes = max_bytes
        self.sent = 0
        self.truncated = False
        self.stalled = False
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        self._errors = bytearray()
        self._stop = threading.Event()
        self._ended = False  # the end (None) was queued
        self._closed = False
        # A byte written here wakes the copy loop and has tar killed at once,
        # even while tar writes nothing (a long walk of a big tree).
        self._cancel_r, self._cancel_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    # --- the worker thread's side ---

    def run(self, exec_in: Callable[..., int], path: str) -> dict[str, Any]:
        """Run tar through EXEC_IN (guest.exec_in bound to the guest) and feed the queue."""
        try:
            code = exec_in(tar_argv(path), output=self._output, errors=self._error_output,
                           cancel=self._cancel_r, timeout=TIMEOUT_SECONDS)
        finally:
            self._put_end()
        message = self._errors.decode(errors="replace").strip()
        if self.truncated:
            return {"path": path, "bytes": self.sent, "exit_code": code, "truncated": True}
        if self._stop.is_set():
            why = (f"the client took nothing for {STALL_SECONDS:.0f} s" if self.stalled
                   else "the client went away")
            raise RuntimeError(f"{why} after {self.sent} bytes; tar was stopped")
        if code != 0:
            text = message or f"tar exited with status {code}"
            raise ArchiveFailed(text[-ERRORS_MAX:], "No such file or directory" in message)
        return {"path": path, "bytes": self.sent, "exit_code": code, "truncated": False}

    def _output(self, data: bytes) -> None:
        if self._stop.is_set():
            raise context.StopCopy
        room = self.max_bytes - self.sent
        if len(data) >= room:
            self.truncated = len(data) > room
            data = data[:room]
        if data:
            self._put(data)
            self.sent += len(data)
        if self.truncated:
            raise context.StopCopy

    def _error_output(self, data: bytes) -> None:
        self._errors.extend(data[:max(0, ERRORS_MAX - len(self._errors))])

    def _put(self, item: bytes | None) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
        try:
            fut.result(timeout=STALL_SECONDS)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            self.stalled = True
            self._stop.set()
            raise context.StopCopy from None

    def _put_end(self) -> None:
        try:
            fut = asyncio.run_coroutine_threadsafe(self.queue.put(None), self.loop)
            fut.result(timeout=STALL_SECONDS)
            self._ended = True
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # nobody reads any more (the handler is gone, or the loop is closing)

    # --- the event loop's side ---

    async def next(self, alive: Callable[[], bool] = lambda: True) -> bytes | None:
        """The next chunk; None once tar has ended (or was stopped).

        ALIVE is asked every WATCH_SECONDS while tar writes nothing (a long walk,
        or a tar that only sleeps): once it says no, ConnectionResetError.
        """
        get = asyncio.ensure_future(self.queue.get())
        try:
            while True:
                done, _ = await asyncio.wait({get}, timeout=WATCH_SECONDS)
                if done:
                    return get.result()
                if not alive():
                    raise ConnectionResetError("the client went away")
        finally:
            get.cancel()  # no item is lost: Queue.get takes it only once it runs

    def cancel(self) -> None:
        """The client is gone: have tar killed, and unblock the worker."""
        self._stop.set()
        if not self._closed:
            with contextlib.suppress(OSError):
                os.write(self._cancel_w, b"x")
        while not self.queue.empty():
            self.queue.get_nowait()

    def close(self) -> None:
        """Once the work has ended (or never began): free the pipe, end next()."""
        if self._closed:
            return
        self._closed = True
        os.close(self._cancel_r)
        os.close(self._cancel_w)
        if not self._ended:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)
            self._ended = True
