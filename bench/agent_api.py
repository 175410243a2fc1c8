"""The agent's API: listing 100 guests, and starting/stopping 20 in parallel.

    sudo .venv/bin/python bench/agent_api.py [--guests 100] [--parallel 20] [--requests 300]

A real `hostagent serve` on throwaway roots. Each call is timed through the
project's client (hostagent.client, httpx over the Unix socket) and, as the
reference, through `curl --unix-socket` doing the same call, in the same run.
curl's times include starting the curl process, which is what a shell script
pays; the ratio says how much of a call is the agent's own work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from roots import bench_roots  # bench/roots.py, beside this script

from hostagent import guest, wire
from hostagent.client import AgentClient


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def curl(sock: Path, method: str, path: str, body: str | None = None) -> list[str]:
    argv = ["curl", "-fsS", "--unix-socket", str(sock), "-X", method,
            f"http://agent/1.0{path}"]
    return argv + (["-d", body] if body else [])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=20)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/agent_api.py: run as root", file=sys.stderr)
        return 2
    if shutil.which("curl") is None:
        print("bench/agent_api.py: curl not found", file=sys.stderr)
        return 2
    with bench_roots("api") as paths:
        print(f"building {args.guests} busybox guests ...", flush=True)
        names = [f"g{i:03d}" for i in range(args.guests)]
        for n in names:
            guest.build(paths, n, guest.BuildOptions(method="busybox"))
            for link in (paths.root(n) / "etc/rc3.d").iterdir():
                link.unlink()  # the mechanism, not busybox's services
        sock = paths.rundir / "agent.sock"
        agent = subprocess.Popen(
            [str(Path(sys.executable).parent / "hostagent"), "serve", "--no-onboot"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise SystemExit("the agent did not come up")
                time.sleep(0.05)
            client = AgentClient(sock)
            run_bench(client, sock, names, args)
        finally:
            agent.terminate()
            agent.wait(30)
    return 0


def run_bench(client: AgentClient, sock: Path, names: list[str],
              args: argparse.Namespace) -> None:
    # Some guests running, so the list reads real state.
    some = names[: args.parallel]
    for op in [client.state(n, "start") for n in some[:5]]:
        client.run(op)
    client.guests()
    ours = [timed(client.guests) for _ in range(args.requests)]
    theirs = [timed(lambda: subprocess.run(curl(sock, "GET", "/guests"), check=True,
                                           capture_output=True))
              for _ in range(max(20, args.requests // 5))]
    for op in [client.state(n, "stop") for n in some[:5]]:
        client.run(op)
    rps = 1000 / statistics.mean(ours)
    print(f"\nGET /1.0/guests ({len(names)} guests with state), sequential:")
    print(f"  client: {rps:7.1f} req/s  p50 {pct(ours, 50):6.2f} ms  p99 {pct(ours, 99):6.2f} ms")
    print(f"  curl:   {1000 / statistics.mean(theirs):7.1f} req/s  p50 "
          f"{pct(theirs, 50):6.2f} ms  p99 {pct(theirs, 99):6.2f} ms")
    print(f"  ratio curl/client p50: {pct(theirs, 50) / pct(ours, 50):.2f}")

    def ours_parallel(action: str) -> float:
        t0 = time.perf_counter()
        ops = [client.state(n, action) for n in some]
        for op in ops:
            if client.wait(op, 120).state != wire.OP_SUCCESS:
                raise SystemExit(f"{action} {op.guest} failed: {client.operation(op.id)}")
        return (time.perf_counter() - t0) * 1000

    def curl_parallel(action: str) -> float:
        import json

        t0 = time.perf_counter()
        procs = [subprocess.Popen(curl(sock, "PUT", f"/guests/{n}/state",
                                       json.dumps({"action": action})),
                                  stdout=subprocess.PIPE) for n in some]
        ids = [json.loads(p.communicate()[0])["id"] for p in procs]
        waits = [subprocess.Popen(curl(sock, "GET", f"/operations/{i}/wait?timeout=120"),
                                  stdout=subprocess.PIPE) for i in ids]
        for w in waits:
            if json.loads(w.communicate()[0])["state"] != wire.OP_SUCCESS:
                raise SystemExit(f"curl {action} failed")
        return (time.perf_counter() - t0) * 1000

    rounds = 3
    res: dict[str, list[float]] = {k: [] for k in
                                   ("start-client", "stop-client", "start-curl", "stop-curl")}
    for _ in range(rounds):
        res["start-client"].append(ours_parallel("start"))
        res["stop-client"].append(ours_parallel("stop"))
        res["start-curl"].append(curl_parallel("start"))
        res["stop-curl"].append(curl_parallel("stop"))
    print(f"\n{len(some)} guests at once, median of {rounds} rounds (wall time):")
    for action in ("start", "stop"):
        c, u = statistics.median(res[f"{action}-client"]), statistics.median(res[f"{action}-curl"])
        print(f"  {action:5s} client {c:8.1f} ms ({c / len(some):6.1f} ms/guest)   curl {u:8.1f} ms"
              f"   ratio curl/client {u / c:.2f}")


if __name__ == "__main__":
    sys.exit(main())
