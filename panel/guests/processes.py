"""Process lists and usage for the vserver pages: one agent stream per watched vserver.

A vserver page asks for its process list (`{"type": "watch-processes"}` on
its websocket). However many pages watch one vserver, this process keeps ONE
stream open to that vserver's agent
(`GET /1.0/events?type=lifecycle&guest=NAME&processes=NAME&interval=2`; the
agent samples the guest every INTERVAL seconds while someone listens) and
sends each list to the group `procs-ID`, which the watching consumers have
joined. The first watcher opens the stream, the last one to leave closes it:
nothing is asked of the agent while nobody watches.

Each list carries the guest's usage for the page's bars. The process rows
give their sums; and at each list of a running guest, the same task asks the
agent what the kernel counts for the guest as a whole
(`GET /1.0/guests/NAME/usage`: its cgroup's memory, CPU time and processes,
and its disk where the agent counts it there) and, from an agent that does
not, every DISK_EVERY seconds its disk (`GET /1.0/guests/NAME/quota`, where
the host measures it). So usage follows the same rule as the lists: sampled
while someone watches, at the stream's pace, and not at all otherwise.

(`type=lifecycle&guest=NAME` rather than no type at all: the agent refuses
an empty `type`, and the few lifecycle events of the guest itself cost
nothing; they are not forwarded.)

The counts live in this process, in its event loop, so with several panel
processes each opens its own stream for the vservers its own pages watch;
every message says which process sent it (`source`), and a consumer takes
only its own process's rows, as the group spans processes with channels-redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import ssl
import uuid
from typing import Any

import httpx
from channels.layers import get_channel_layer

from hostagent import wire
from hostagent.client import AgentError
from panel.guests.watching import SharedTasks

__all__ = ["DISK_EVERY", "INTERVAL", "MAX_ROWS", "WATCHER", "ProcessWatcher", "group", "tls",
           "to_page"]

_LOG = logging.getLogger(__name__)

INTERVAL = 2.0  # seconds between two samples of a guest's processes
MAX_ROWS = 200  # rows sent to the pages, the busiest first; `total` says how many there are
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
DISK_EVERY = 30.0  # seconds between two looks at a watched guest's disk (a qgroup query)
USAGE_RETRY = 30.0  # seconds before asking again an agent that could not say the usage
ASK_TIMEOUT = 5.0  # seconds for one usage or quota answer


@functools.cache
def tls() -> ssl.SSLContext:
    """One TLS context for every stream. A Unix socket never uses it, but httpx makes
    one per transport otherwise, reading the system's CA bundle each time (0.1 s)."""
    return ssl.create_default_context()


def group(vs_id: int) -> str:
    return f"procs-{vs_id}"


def to_page(message: dict[str, Any]) -> dict[str, Any]:
    """A list as the stream sends it to `procs-ID`, as the pages are sent it."""
    return {"type": "processes", "running": message.get("running"),
            "rows": message.get("rows", []), "total": message.get("total", 0),
            "usage": message.get("usage"), "error": message.get("error"),
            "ts": message.get("ts")}


def _rows(event: wire.Event) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """The rows to show (the busiest MAX_ROWS), how many there are, and their sums
    (`memory` and `disk`, the guest's as a whole, are _Usage's to fill in)."""
    raw = event.metadata.get("processes") or []
    rows = [wire.ProcessRow.from_json(r, f"processes.{i}")
            for i, r in enumerate(raw if isinstance(raw, list) else [])]
    rows.sort(key=lambda r: (-r.cpu, -r.mem, r.pid))
    usage = {"processes": len(rows), "cpu": round(sum(r.cpu for r in rows), 1),
             "mem": round(sum(r.mem for r in rows), 1), "rss": sum(r.rss for r in rows),
             "memory": None, "disk": None}
    # The guest's own pid (what `ps` inside it says); the host's pids stay on the host.
    shown = [{"pid": r.guest_pid, "user": r.user, "cpu": r.cpu, "mem": r.mem, "rss": r.rss,
              "command": r.command} for r in rows[:MAX_ROWS]]
    return shown, len(rows), usage


class _Usage:
    """One watched guest's usage as its cgroup and its disk say, asked of its agent once
    per process list; what the rows summed stands where the agent cannot say."""

    def __init__(self, http: httpx.AsyncClient, name: str) -> None:
        self.http, self.name = http, name
        self.cpu: tuple[float, float] | None = None  # (cpu_seconds, uptime) of the last look
        self.disk: int | None = None
        self.disk_at = -DISK_EVERY  # loop time of the last look at the disk
        self.quiet_until = 0.0  # the agent could not say: not before this loop time

    async def _get(self, path: str) -> Any:
        resp = await self.http.get(f"/{wire.API_VERSION}/guests/{self.name}/{path}",
                                   timeout=ASK_TIMEOUT)
        if resp.status_code >= 400:
            raise AgentError(resp.status_code, resp.text[:200])
        return resp.json()

    async def fill(self, usage: dict[str, Any]) -> None:
        """USAGE (a list's sums) with the guest's cgroup and disk figures, in place."""
        now = asyncio.get_running_loop().time()
        if now < self.quiet_until:
            return
        try:
            u = wire.Usage.from_json(await self._get("usage"))
            if u.disk_used is not None:
                self.disk = u.disk_used  # an agent that counts it with the rest
            elif now - self.disk_at >= DISK_EVERY:
                self.disk_at = now
                used = (await self._get("quota")).get("used")
                self.disk = used if isinstance(used, int) and used >= 0 else None
        except (AgentError, OSError, ValueError, httpx.HTTPError) as e:
            # A stopped guest's 409 included: the next list says whether it runs.
            _LOG.info("usage of %s: %s", self.name, e or type(e).__name__)
            self.cpu, self.quiet_until = None, now + USAGE_RETRY
            return
        usage["processes"] = u.processes
        usage["memory"] = u.memory_current
        usage["disk"] = self.disk
        if u.cpu_seconds is not None:
            # Percent of one CPU since the last look, the time the kernel counted for
            # the whole cgroup (processes that came and went included, which the rows'
            # sum misses); the rows' sum stands for the first look.
            last, self.cpu = self.cpu, (u.cpu_seconds, u.uptime)
            if last is not None and u.uptime > last[1] and u.cpu_seconds >= last[0]:
                usage["cpu"] = round(100 * (u.cpu_seconds - last[0]) / (u.uptime - last[1]), 1)


class ProcessWatcher(SharedTasks):
    """Reference-counted agent streams of process lists, one per watched vserver."""

    def __init__(self, interval: float = INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self.token = uuid.uuid4().hex  # this process's name on its messages
        self._open: set[int] = set()  # vservers whose stream is open right now
        self.opened = 0  # streams opened since this process started (tests, bench)

    # --- what the consumers call (in the event loop) ---

    async def watch(self, vs_id: int, socket: str, name: str) -> dict[str, Any] | None:
        """One more page watches VS_ID (NAME on the agent at SOCKET).

        Returns the last list seen, to show at once (None before the first).
        """
        return await self._watch(vs_id, lambda: self._stream(vs_id, socket, name),
                                 f"processes-{vs_id}")

    # --- what tests and the benchmark look at ---

    def last(self, vs_id: int) -> dict[str, Any] | None:
        """The last list sent of VS_ID: what a page that starts watching gets at once."""
        return self._last.get(vs_id)

    def streams(self) -> int:
        """Agent streams open now (connected, not waiting to retry)."""
        return len(self._open)

    def reset(self) -> None:
        super().reset()
        self._open.clear()
        self.opened = 0

    # --- the stream ---

    def _message(self, vs_id: int, event: wire.Event) -> dict[str, Any]:
        rows, total, usage = _rows(event)
        return {"type": "processes.rows", "vserver": vs_id, "source": self.token,
                "eid": uuid.uuid4().hex, "running": bool(event.metadata.get("running")),
                "rows": rows, "total": total, "usage": usage, "error": None,
                "ts": event.timestamp}

    async def _publish(self, vs_id: int, message: dict[str, Any]) -> None:
        """MESSAGE to the pages watching VS_ID, and kept for the next one to come."""
        self._last[vs_id] = message
        layer = get_channel_layer()
        if layer is not None:
            await layer.group_send(group(vs_id), message)

    async def _stream(self, vs_id: int, socket: str, name: str) -> None:
        params = {"type": wire.TYPE_LIFECYCLE, "guest": name, "processes": name,
                  "interval": str(self.interval)}
        delay = BACKOFF_MIN
        while self.watched(vs_id):
            error = "the agent ended the stream"
            try:
                async with httpx.AsyncClient(
                        transport=httpx.AsyncHTTPTransport(uds=socket, verify=tls()),
                        base_url="http://agent",
                        timeout=httpx.Timeout(10.0, read=None)) as http, \
                        http.stream("GET", f"/{wire.API_VERSION}/events",
                                    params=params) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        raise AgentError(resp.status_code, resp.text[:200])
                    self._open.add(vs_id)
                    self.opened += 1
                    delay = BACKOFF_MIN
                    usage = _Usage(http, name)
                    async for line in resp.aiter_lines():
                        if not line:
                            continue
                        event = wire.Event.from_json(json.loads(line))
                        if event.type == wire.TYPE_DROPPED:
                            error = "the agent dropped the stream"
                            break
                        if event.type != wire.TYPE_PROCESSES:
                            continue
                        message = self._message(vs_id, event)
                        if message["running"]:
                            await usage.fill(message["usage"])
                        await self._publish(vs_id, message)
            except asyncio.CancelledError:
                raise
            except (AgentError, OSError, ValueError, httpx.HTTPError) as e:
                error = f"the host's agent does not answer: {e or type(e).__name__}"
            finally:
                self._open.discard(vs_id)
            if not self.watched(vs_id):
                return
            _LOG.info("process list of vserver %s: %s; again in %g s", vs_id, error, delay)
            message = {"type": "processes.rows", "vserver": vs_id, "source": self.token,
                       "eid": uuid.uuid4().hex, "running": None, "rows": [], "total": 0,
                       "usage": None, "error": error, "ts": None}
            with contextlib.suppress(Exception):
                await self._publish(vs_id, message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)


# The one watcher of this process (Daphne's): consumers share it.
WATCHER = ProcessWatcher()
