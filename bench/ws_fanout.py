"""The live pages' fan-out: M websocket clients on K vservers, in-memory layer against redis.

    .venv/bin/python bench/ws_fanout.py [--clients 200] [--vservers 20] [--seconds 10]
                                        [--status-rate 1] [--interval 0.5]
                                        [--layers memory,redis]

A real Daphne (panel.asgi.application, as `make run` serves it) listens on
127.0.0.1 in a child process of its own, on a throwaway SQLite database
(VPANEL_VAR_DIR under /tmp): K customers, a member and a vserver each, all on
one host whose agent socket is served by THIS process: the agent's own API
and event bus (hostagent.api.make_app, hostagent.events.EventBus) with pretend
guests of 12 processes each. M aiohttp websocket clients, each logged in by a
session cookie of its own, open `ws/vservers/ID/` (M/K a vserver) and ask for
the process list, as the vserver page does. Then, for --seconds:

  status     inside the Daphne process, every vserver gets a `vserver.changed`
             through the channel layer --status-rate times a second, exactly as
             events.vserver_changed sends it (the consumers read the vserver
             again after each, once per change and process);
  processes  the panel's ProcessWatcher keeps one agent stream per vserver
             open (however many clients watch it) and fans each list out
             through the layer (group procs-ID); the agent samples every
             --interval seconds.

Measured, per layer, in the same run: the latency of each message from the
timestamp it carries (`ts`: when it was sent for a status; when the agent
sampled, for processes) to its arrival at the client, p50 and p99; and the
Daphne process's CPU seconds (user + system, /proc/PID/stat) per 1,000
messages delivered. The clients and the agent run in this process, not in
the panel's. redis is a private one (scripts/redis.sh, under the throwaway
directory), stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROWS = 12  # processes of each pretend guest


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of PID (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_django(var: Path) -> None:
    os.environ["VPANEL_VAR_DIR"] = str(var)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "panel.settings")
    sys.path.insert(0, str(REPO))
    import django

    django.setup()


# --- the panel: Daphne in a child process ------------------------------------------------------

def serve(port: int) -> None:
    """The child: Daphne on 127.0.0.1:PORT, and a status publisher started by `go S R`
    on stdin (it prints `published N` when done)."""
    import daphne.server  # first: it installs Twisted's asyncio reactor

    setup_django(Path(os.environ["VPANEL_VAR_DIR"]))
    from channels.db import database_sync_to_async
    from channels.layers import get_channel_layer
    from daphne.endpoints import build_endpoint_description_strings

    from panel.asgi import application
    from panel.guests import events
    from panel.guests.models import VServer
    from panel.guests.processes import WATCHER

    loop = daphne.server.twisted_loop
    ids = list(VServer.objects.order_by("pk").values_list("pk", flat=True))
    WATCHER.interval = float(os.environ.get("BENCH_INTERVAL", "2"))

    async def publish(seconds: float, rate: float) -> int:
        layer = get_channel_layer()
        snaps = {i: await database_sync_to_async(
            lambda i=i: events.snapshot(VServer.objects.get(pk=i)))() for i in ids}
        n, end = 0, loop.time() + seconds
        while loop.time() < end:
            t0 = loop.time()
            for i in ids:
                await layer.group_send(f"vserver-{i}", {
                    "type": "vserver.changed", "vserver": snaps[i], "ts": time.time(),
                    "eid": uuid.uuid4().hex})
                n += 1
            await asyncio.sleep(max(0.0, 1 / rate - (loop.time() - t0)))
        return n

    def control() -> None:
        for line in sys.stdin:
            words = line.split()
            if words and words[0] == "go":
                fut = asyncio.run_coroutine_threadsafe(
                    publish(float(words[1]), float(words[2])), loop)
                print(f"published {fut.result()}", flush=True)
            elif words and words[0] == "streams":
                print(f"streams {WATCHER.streams()} opened {WATCHER.opened}", flush=True)

    threading.Thread(target=control, daemon=True).start()
    daphne.server.Server(application=application, signal_handlers=True, verbosity=0,
                         endpoints=build_endpoint_description_strings(
                             host="127.0.0.1", port=port)).run()


# --- this process: the agent, the database, the clients ----------------------------------------

def populate(k: int, m: int, agent_socket: str) -> list[tuple[int, str]]:
    """K customers with a member and a vserver each; M sessions: (vserver id, cookie)."""
    from decimal import Decimal

    from django.core.management import call_command
    from django.test import Client

    from panel.guests.choices import VServerStatusChoices
    from panel.guests.models import VServer
    from panel.hosting.choices import RoleChoices
    from panel.hosting.models import Customer, Host, Membership, Plan
    from tests.panel.factories import make_user

    call_command("migrate", verbosity=0, interactive=False)
    plan = Plan.objects.create(name="bench", max_vservers=10, memory_mb=65536,
                               cpu_cores=Decimal(64), disk_gb=1000)
    host = Host.objects.create(name="bench", agent_socket=agent_socket, memory_mb=1_000_000,
                               cpu_cores=Decimal(512), disk_gb=100_000, max_vservers=1000)
    vservers = []
    for i in range(k):
        c = Customer.objects.create(name=f"c{i}", slug=f"c{i}", plan=plan)
        u = make_user(f"u{i}")
        Membership.objects.create(customer=c, user=u, role=RoleChoices.ROLE_MEMBER)
        vs = VServer.objects.create(name=f"vs{i}", customer=c, host=host, hostname=f"vs{i}",
                                    status=VServerStatusChoices.STATUS_RUNNING,
                                    context_id=49152 + i, init_pid=1000 + i)
        vservers.append((vs.pk, u))
    from django.conf import settings

    out = []
    for j in range(m):
        vs_id, user = vservers[j % k]
        client = Client()
        client.force_login(user)
        out.append((vs_id, client.cookies[settings.SESSION_COOKIE_NAME].value))
    return out


def fake_rows(name: str) -> list[dict[str, Any]]:
    return [{"pid": 5000 + n, "guest_pid": n + 1, "user": "root" if n < 3 else "www-data",
             "cpu": round((n * 7.3) % 20, 1), "mem": round((n * 1.7) % 5, 1),
             "rss": (n + 1) * 3 << 20, "command": f"/usr/sbin/worker-{n} --name {name} -f"}
            for n in range(ROWS)]


class Clients:
    def __init__(self, port: int, sessions: list[tuple[int, str]]) -> None:
        self.port, self.sessions = port, sessions
        self.lat: dict[str, list[float]] = {"vserver": [], "processes": []}
        self.counting = False
        self.count = 0
        self.ready: set[int] = set()
        self.errors: list[str] = []
        self.connected = 0

    async def client(self, http: Any, idx: int, vs_id: int, cookie: str) -> None:
        from django.conf import settings

        url = f"http://127.0.0.1:{self.port}/ws/vservers/{vs_id}/"
        headers = {"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}",
                   "Origin": f"http://127.0.0.1:{self.port}"}
        async with http.ws_connect(url, headers=headers, max_msg_size=0) as ws:
            self.connected += 1
            await ws.send_str(json.dumps({"type": "watch-processes"}))
            async for msg in ws:
                now = time.time()
                data = json.loads(msg.data)
                kind = data.get("type")
                if kind == "closing":
                    self.errors.append(f"client {idx}: {data}")
                    return
                if kind == "processes" and data.get("running"):
                    self.ready.add(idx)
                if self.counting and kind in self.lat and data.get("ts"):
                    self.lat[kind].append((now - data["ts"]) * 1000)
                    self.count += 1
            self.errors.append(f"client {idx}: closed ({ws.close_code}, {ws.exception()!r})")


async def one_layer(layer: str, args: argparse.Namespace, sessions: list[tuple[int, str]],
                    env: dict[str, str], agent_listeners: Callable[[], int]) -> dict[str, Any]:
    import aiohttp

    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)],
                             env={**env, "BENCH_INTERVAL": str(args.interval)},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert child.poll() is None, "the panel exited"
            assert time.monotonic() < deadline, "the panel did not listen within 30 s"
            await asyncio.sleep(0.1)
        clients = Clients(port, sessions)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as http:
            tasks = []
            for i, (vs_id, cookie) in enumerate(sessions):
                tasks.append(asyncio.create_task(clients.client(http, i, vs_id, cookie)))
                if i % 20 == 19:
                    await asyncio.sleep(0.05)  # not every handshake in the same instant
            deadline = time.monotonic() + 60
            while len(clients.ready) < len(sessions):
                assert not clients.errors, clients.errors[:3]
                ended = [t for t in tasks if t.done()]
                assert time.monotonic() < deadline, (
                    f"only {len(clients.ready)} of {len(sessions)} clients got a process list "
                    f"({clients.connected} connected, {len(ended)} ended: "
                    f"{[repr(t.exception()) for t in ended[:3]]})")
                await asyncio.sleep(0.1)
            loop = asyncio.get_running_loop()
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("streams\n")
            child.stdin.flush()
            streams = await loop.run_in_executor(None, child.stdout.readline)
            await asyncio.sleep(1.0)  # past the warm-up lists
            cpu0 = cpu_seconds(child.pid)
            clients.counting = True
            child.stdin.write(f"go {args.seconds} {args.status_rate}\n")
            child.stdin.flush()
            published = await loop.run_in_executor(None, child.stdout.readline)
            await asyncio.sleep(0.5)  # the last ones in flight
            clients.counting = False
            cpu = cpu_seconds(child.pid) - cpu0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Every page gone: the watcher's streams close, and the agent's listeners with them
        # (the agent notices at its next write, within an interval).
        await asyncio.sleep(args.interval + 1)
        child.stdin.write("streams\n")
        child.stdin.flush()
        streams_after = await loop.run_in_executor(None, child.stdout.readline)
        listeners_after = agent_listeners()
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    lat = clients.lat
    return {"layer": layer, "messages": clients.count, "cpu": cpu,
            "cpu_per_1000": 1000 * cpu / max(clients.count, 1),
            "status": (pct(lat["vserver"], 50), pct(lat["vserver"], 99), len(lat["vserver"])),
            "processes": (pct(lat["processes"], 50), pct(lat["processes"], 99),
                          len(lat["processes"])),
            "all": (pct(lat["vserver"] + lat["processes"], 50),
                    pct(lat["vserver"] + lat["processes"], 99)),
            "published": published.strip(), "streams": streams.strip(),
            "streams_after": streams_after.strip(), "listeners_after": listeners_after,
            "mean_ms": statistics.fmean(lat["vserver"] + lat["processes"] or [0.0])}


async def run_all(args: argparse.Namespace, var: Path,
                  sessions: list[tuple[int, str]]) -> list[dict[str, Any]]:
    from aiohttp import web

    from hostagent import api, wire
    from hostagent.events import EventBus

    agent_sock = var / "agent.sock"
    loop = asyncio.get_running_loop()

    class Agent:
        group_id = os.getgid()
        bus = EventBus(loop, fake_rows)

        async def guests(self) -> list[wire.GuestInfo]:
            return []

    runner = web.AppRunner(api.make_app(Agent()))  # type: ignore[arg-type]
    await runner.setup()
    await web.UnixSite(runner, str(agent_sock)).start()
    results = []
    try:
        for layer in args.layers:
            env = dict(os.environ)
            env.pop("REDIS_URL", None)
            if layer == "redis":
                res = subprocess.run([str(REPO / "scripts" / "redis.sh"), "start"],
                                     env={**os.environ, "VPANEL_REDIS_DIR": str(var / "redis")},
                                     capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    print(f"redis: cannot start one: {res.stderr.strip()}", file=sys.stderr)
                    continue
                env["REDIS_URL"] = res.stdout.strip()
            print(f"  [{layer}] {args.clients} clients on {args.vservers} vservers ...",
                  file=sys.stderr, flush=True)
            results.append(await one_layer(layer, args, sessions, env, Agent.bus.listeners))
    finally:
        await Agent.bus.close()
        await runner.cleanup()
        subprocess.run([str(REPO / "scripts" / "redis.sh"), "stop"], check=False,
                       env={**os.environ, "VPANEL_REDIS_DIR": str(var / "redis")})
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--vservers", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--status-rate", type=float, default=1.0,
                    help="status changes a second, of each vserver")
    ap.add_argument("--interval", type=float, default=2.0,
                    help="seconds between two process lists of a vserver (the page's: 2; "
                         "the agent's least: 0.5)")
    ap.add_argument("--layers", default="memory,redis")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    args.layers = [x for x in args.layers.split(",") if x]
    var = Path(tempfile.mkdtemp(prefix="vpanel-wsbench-"))
    try:
        setup_django(var)
        sessions = populate(args.vservers, args.clients, str(var / "agent.sock"))
        results = asyncio.run(run_all(args, var, sessions))
    finally:
        shutil.rmtree(var, ignore_errors=True)
    per = args.clients // max(args.vservers, 1)
    print(f"\nws_fanout: {args.clients} websocket clients on {args.vservers} vservers "
          f"({per} a vserver), a real Daphne on 127.0.0.1 (child process); {args.seconds:g} s "
          f"of {args.status_rate:g} status change/s a vserver and a process list every "
          f"{args.interval:g} s a vserver")
    cols = [r["layer"] for r in results]
    head = f"{'':34}" + "".join(f"{c:>22}" for c in cols)
    if len(results) == 2:
        head += f"{results[1]['layer'] + '/' + results[0]['layer']:>22}"
    print(head)
    print("-" * len(head))

    def row(label: str, values: list[float], fmt: str, ratio: bool = True) -> None:
        line = f"{label:34}" + "".join(f"{format(v, fmt):>22}" for v in values)
        if ratio and len(values) == 2 and values[0]:
            line += f"{values[1] / values[0]:>22.2f}"
        print(line)

    row("messages delivered", [r["messages"] for r in results], "d")
    for key, label in (("status", "status"), ("processes", "processes")):
        row(f"{label} latency p50 (ms)", [r[key][0] for r in results], ".1f")
        row(f"{label} latency p99 (ms)", [r[key][1] for r in results], ".1f")
    row("all latency p50 (ms)", [r["all"][0] for r in results], ".1f")
    row("all latency p99 (ms)", [r["all"][1] for r in results], ".1f")
    row("panel CPU s per 1,000 messages", [r["cpu_per_1000"] for r in results], ".3f")
    row("panel CPU s in all", [r["cpu"] for r in results], ".2f")
    for r in results:
        print(f"{r['layer']}: {r['published']} status changes sent; the ProcessWatcher with "
              f"every client watching: {r['streams']}; once they had left: "
              f"{r['streams_after']}, and {r['listeners_after']} agent listeners")
    return 0


if __name__ == "__main__":
    sys.exit(main())
