"""Operations: long work with an id, progress and an end state, and its journal.

Every change to a guest runs as an operation in a worker thread. Operations
on one guest run one after the other, in the order they were asked for;
operations on different guests run in parallel. An operation that has not
begun (it waits for its guest) may be cancelled; one that runs may not, since
stopping a build or a start half-way is what the journal exists to undo.

The journal is one small file per running operation under
$VSERVER_RUNDIR/journal, written before the work begins and removed when it
ends. If the agent dies in between, the next agent finds the file and
completes the operation or rolls it back (hostagent.recovery), so that no
half-built guest, stray mount, veth, cgroup or address survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostagent import wire
from hostagent.events import EventBus

__all__ = ["Journal", "Operation", "Operations", "Progress"]

_LOG = logging.getLogger(__name__)

KEEP_FINISHED = 1000  # finished operations kept for GET /1.0/operations/ID
KEEP_SECONDS = 3600.0

Progress = Callable[[int, str], None]  # (percent, message), callable from any thread
Work = Callable[[Progress], dict[str, Any] | None]


@dataclass(eq=False)
class Operation:
    id: str
    kind: str
    guest: str | None
    state: str = wire.OP_PENDING
    progress: int = 0
    message: str = ""
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    exc: Exception | None = None  # why it failed, for callers inside the agent

    @property
    def may_cancel(self) -> bool:
        return self.state == wire.OP_PENDING

    def wire(self) -> wire.Operation:
        return wire.Operation(id=self.id, kind=self.kind, guest=self.guest, state=self.state,
                              progress=self.progress, message=self.message,
                              result=self.result, error=self.error, created=self.created,
                              updated=self.updated, may_cancel=self.may_cancel)


class Journal:
    """One file per operation in flight: what to finish or undo after a crash."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def record(self, op: Operation, args: dict[str, Any]) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        entry = {"id": op.id, "kind": op.kind, "guest": op.guest, "args": args,
                 "pid": os.getpid(), "time": time.time()}
        tmp = self.dir / f".{op.id}.new"
        with open(tmp, "w") as f:
            json.dump(entry, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"{op.id}.json")

    def finish(self, op_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{op_id}.json").unlink()

    def entries(self) -> list[dict[str, Any]]:
        """What an earlier agent left unfinished, oldest first."""
        out = []
        for p in self.dir.glob("*.json") if self.dir.is_dir() else ():
            try:
                entry = json.loads(p.read_text())
                if not isinstance(entry, dict) or "id" not in entry:
                    raise ValueError("not a journal entry")
            except (OSError, ValueError) as e:
                _LOG.warning("journal: ignoring %s: %s", p, e)
                p.unlink(missing_ok=True)
                continue
            out.append(entry)
        for p in self.dir.glob(".*.new") if self.dir.is_dir() else ():
            p.unlink(missing_ok=True)  # never renamed: its work never began
        return sorted(out, key=lambda e: float(e.get("time", 0)))


# The state a guest is in while an operation of each kind runs on it.
BUSY_STATE = {
    "build": wire.STATE_BUILDING,
    "start": wire.STATE_STARTING,
    "stop": wire.STATE_STOPPING,
    "restart": wire.STATE_RESTARTING,
    "delete": wire.STATE_DELETING,
    "reset": wire.STATE_STOPPED,  # a reset needs it stopped, and it stays so
}
# The lifecycle event sent when an operation of each kind begins.
BEGIN_EVENT = {
    "build": wire.EVENT_GUEST_BUILDING,
    "start": wire.EVENT_GUEST_STARTING,
    "stop": wire.EVENT_GUEST_STOPPING,
    "restart": wire.EVENT_GUEST_RESTARTING,
    "delete": wire.EVENT_GUEST_DELETING,
    "reset": wire.EVENT_GUEST_RESETTING,
}


class Operations:
    def __init__(self, bus: EventBus, journal: Journal, *, workers: int = 32) -> None:
        self.bus = bus
        self.journal = journal
        self._ops: OrderedDict[str, Operation] = OrderedDict()
        self._guest_locks: dict[str, asyncio.Lock] = {}
        self._running: dict[str, Operation] = {}  # guest -> its operation now running
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="op")

    def get(self, op_id: str) -> Operation | None:
        return self._ops.get(op_id)

    def all(self) -> list[Operation]:
        return list(self._ops.values())

    def busy_state(self, guest: str) -> str | None:
        """The in-between state of GUEST while an operation runs on it."""
        op = self._running.get(guest)
        return BUSY_STATE.get(op.kind) if op is not None else None

    def add_finished(self, kind: str, guest: str | None, error: str | None,
                     result: dict[str, Any] | None = None) -> Operation:
        """Record an operation that ended elsewhere (one an earlier agent left)."""
        op = Operation(id=str(uuid.uuid4()), kind=kind, guest=guest,
                       state=wire.OP_FAILURE if error else wire.OP_SUCCESS, progress=100,
                       error=error, result=result)
        op.done.set()
        self._keep(op)
        return op

    def submit(self, kind: str, guest: str | None, work: Work, *,
               journal: dict[str, Any] | None = None,
               on_done: Callable[[Operation], None] | None = None,
               serialize: bool = True) -> Operation:
        """Queue WORK; it runs in a worker thread once GUEST is free.

        SERIALIZE False: run at once, beside the guest's other operations (an
        exec, which changes nothing the agent manages).
        With JOURNAL, the operation is journaled with those arguments while it
        runs. ON_DONE runs in the event loop after the end state is set.
        """
        op = Operation(id=str(uuid.uuid4()), kind=kind, guest=guest)
        self._keep(op)
        self._event(op)
        key = (guest or "") if serialize else f"op:{op.id}"
        op.task = asyncio.get_running_loop().create_task(
            self._run(op, key, work, journal, on_done))
        return op

    def _keep(self, op: Operation) -> None:
        self._ops[op.id] = op
        now = time.time()
        while len(self._ops) > KEEP_FINISHED:
            oldest = next(iter(self._ops.values()))
            if not oldest.done.is_set() and now - oldest.created < KEEP_SECONDS:
                break
            self._ops.popitem(last=False)

    async def _run(self, op: Operation, key: str, work: Work,
                   journal: dict[str, Any] | None,
                   on_done: Callable[[Operation], None] | None) -> None:
        loop = asyncio.get_running_loop()
        lock = self._guest_locks.setdefault(key, asyncio.Lock())
        busy = op.guest is not None and op.kind in BUSY_STATE
        try:
            async with lock:
                if op.state == wire.OP_CANCELLED:
                    return
                self._set(op, wire.OP_RUNNING)
                if busy and op.guest is not None:
                    self._running[op.guest] = op
                    self.bus.publish(wire.TYPE_LIFECYCLE, BEGIN_EVENT[op.kind], op.guest,
                                     state=BUSY_STATE[op.kind], operation=op.id)

                def progress(percent: int, message: str) -> None:
                    loop.call_soon_threadsafe(self._progress, op, percent, message)

                if journal is not None:
                    self.journal.record(op, journal)
                try:
                    op.result = await loop.run_in_executor(self.pool, work, progress)
                    op.progress = 100
                    self._set(op, wire.OP_SUCCESS)
                except Exception as e:  # every failure ends the operation, with its reason
                    op.error, op.exc = str(e) or type(e).__name__, e
                    if not isinstance(e, wire.WireError | ValueError | RuntimeError | OSError):
                        _LOG.exception("operation %s (%s %s) failed", op.id, op.kind, op.guest)
                    self._set(op, wire.OP_FAILURE)
                finally:
                    if journal is not None:
                        self.journal.finish(op.id)
                    if busy and op.guest is not None:
                        self._running.pop(op.guest, None)
                    if on_done is not None:
                        on_done(op)
        finally:
            op.done.set()
            if not lock.locked() and self._guest_locks.get(key) is lock:
                del self._guest_locks[key]

    def _progress(self, op: Operation, percent: int, message: str) -> None:
        op.progress = max(0, min(99, percent))
        op.message = message[:500]
        op.updated = time.time()
        self._event(op)

    def _set(self, op: Operation, state: str) -> None:
        op.state = state
        op.updated = time.time()
        self._event(op)

    def _event(self, op: Operation) -> None:
        self.bus.publish(wire.TYPE_OPERATION, "operation", op.guest, **op.wire().to_json())

    def cancel(self, op_id: str) -> bool:
        """Cancel a pending operation; False if it has begun or ended."""
        op = self._ops.get(op_id)
        if op is None or op.state != wire.OP_PENDING:
            return False
        self._set(op, wire.OP_CANCELLED)
        op.done.set()
        return True

    async def wait(self, op: Operation, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(op.done.wait(), timeout)

    async def close(self) -> None:
        """Let running work finish (a thread cannot be interrupted), start nothing new."""
        for op in self._ops.values():
            if op.state == wire.OP_PENDING:
                self.cancel(op.id)
        self.pool.shutdown(wait=False, cancel_futures=True)
