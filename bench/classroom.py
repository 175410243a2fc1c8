"""A class of N students through the panel: unified servers against full copies.

    sudo .venv/bin/python bench/classroom.py [--students 100]

Everything through the panel's own code, as a teacher's roster import does it:
a roster of N students is applied (classroom.actions.apply_roster: a panel
login, a generated root password and a server each), with every operation run
to its end against a real `hostagent serve` (VPANEL_OPERATIONS_INLINE), so the
time printed is until every student's server is built, configured, running
and has its root password. The class's template is made as an admin would:
a busybox guest, stopped, then `vtemplate create lab --from GUEST`.

The peer, in the same run: the same N students in a second class whose
servers are full copies of that template (the agent's `rootfs` build of a
copy of the template tree, `cp -ax`, as `vserver NAME build -m rootfs` does)
instead of overlays on it; the one difference is the build request.

Printed for each: total time, time per student, the part of it spent in the
agents' operations, and the disk the class uses: the template once plus
`vdu` of every student's server (what is its own: an overlay's upper layer,
a copy's whole tree), against the template's own size; then the ratios.
Each class is deleted at the end of its run (end of term, timed too). A
small class made and deleted first, not measured, warms the caches up.

Throwaway everything: VSERVER_* roots and a cgroup parent (bench/roots.py), a
SQLite panel database in a temporary VPANEL_VAR_DIR, and a network namespace
of this process's own (guests get addresses from 198.19.0.0/16 there; the
machine's own network is never touched: their uplink up0 is a veth in it).
All removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from roots import bench_roots  # bench/roots.py, beside this script

from hostagent import guest, syscalls, templates, unify, wire
from hostagent.client import AgentClient
from hostagent.paths import Paths

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEMPLATE = "lab"
SEAT_MEMORY_MB = 64
UPLINK = "up0"


@dataclass
class Run:
    label: str
    seconds: float  # the roster's apply, until every server runs
    op_seconds: float  # of which in the agents' operations (create: build, start, password)
    running: int
    disk: int  # bytes: what the class adds on disk (vdu of every server)
    delete_seconds: float  # the end of term


def start_agent(paths: Paths) -> subprocess.Popen[bytes]:
    sock = paths.rundir / "agent.sock"
    log = open(paths.rundir.parent / "agent.log", "ab")  # noqa: SIM115 - the agent's, for its life
    agent = subprocess.Popen([str(BIN / "hostagent"), "serve", "--no-onboot"],
                             stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    log.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            with AgentClient(sock, timeout=5) as c:
                c.host()
            return agent
        except Exception:
            if time.monotonic() > deadline or agent.poll() is not None:
                agent.kill()
                raise SystemExit("bench/classroom.py: the agent did not come up") from None
            time.sleep(0.05)


def make_template(paths: Paths) -> int:
    """`lab` from a stopped busybox guest; the template's own size (vdu's count)."""
    with AgentClient(paths.rundir / "agent.sock") as c:
        c.run(c.build(wire.BuildRequest.from_json({"name": "labsrc", "method": "busybox"})))
        subprocess.run([str(BIN / "vtemplate"), "create", TEMPLATE, "--from", "labsrc"],
                       check=True, capture_output=True)
        c.run(c.delete("labsrc"))
    return unify.disk_usage(templates.template_path(paths, TEMPLATE)).bytes


def setup_django(var: Path) -> None:
    os.environ["VPANEL_VAR_DIR"] = str(var)
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)  # the in-memory channel layer: no page watches
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "panel.settings")
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def panel_world(paths: Paths, n: int) -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    from panel.hosting.choices import IPFamilyChoices
    from panel.hosting.models import Host, IPPool, Plan

    host = Host.objects.create(name="benchhost", agent_socket=str(paths.rundir / "agent.sock"),
                               iprootdev=UPLINK,
                               memory_mb=4 * n * SEAT_MEMORY_MB, cpu_cores=Decimal(4 * n),
                               disk_gb=10 * n, max_vservers=4 * n)
    IPPool.objects.create(name="class-v4", host=host, family=IPFamilyChoices.FAMILY_4,
                          network="198.19.0.0/16", first="198.19.0.10", last="198.19.255.250")
    plan = Plan.objects.create(name="class", max_vservers=n, max_ipv4=n,
                               memory_mb=n * SEAT_MEMORY_MB, cpu_cores=Decimal(n),
                               disk_gb=n, processes=256)
    User = get_user_model()
    return {"plan": plan, "staff": User.objects.create_user("bench-staff", is_staff=True),
            "teacher": User.objects.create_user("bench-teacher")}


def roster(n: int) -> bytes:
    lines = ["username,full name,email"]
    lines += [f"s{i:04d},Student {i},s{i:04d}@school.example" for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def run_class(paths: Paths, world: dict[str, Any], label: str, slug: str, n: int) -> Run:
    from django.db.models import DurationField, ExpressionWrapper, F, Sum
    from django.test.utils import override_settings

    from panel.classroom import actions
    from panel.classroom.models import Seat
    from panel.guests.actions import Actor
    from panel.guests.choices import OperationStateChoices
    from panel.guests.models import Operation

    staff, teacher = Actor(world["staff"]), Actor(world["teacher"])
    classroom = actions.create_class(actor=staff, name=label, slug=slug, plan=world["plan"],
                                     template=TEMPLATE, teacher=world["teacher"],
                                     seat_memory_mb=SEAT_MEMORY_MB,
                                     seat_cpu_cores=Decimal("0.5"), seat_processes=64)
    with override_settings(VPANEL_OPERATIONS_INLINE=True):
        t0 = time.perf_counter()
        preview, made = actions.apply_roster(classroom, roster(n), actor=teacher)
        seconds = time.perf_counter() - t0
        bad = [(r.username, r.errors) for r in preview.rows if r.errors]
        if bad or len(made) != n:
            raise SystemExit(f"{label}: the roster did not apply: {bad[:5]}")
        names = list(Seat.objects.filter(classroom=classroom)
                     .values_list("vserver__name", flat=True))
        ops = Operation.objects.filter(vserver_name__in=names)
        failed = list(ops.exclude(state=OperationStateChoices.STATE_SUCCESS)
                      .values_list("vserver_name", "error")[:5])
        if failed:
            raise SystemExit(f"{label}: operations failed: {failed}")
        op_time = ops.aggregate(t=Sum(ExpressionWrapper(F("updated") - F("created"),
                                                        output_field=DurationField())))["t"]
        with AgentClient(paths.rundir / "agent.sock") as c:
            running = sum(1 for g in c.guests()
                          if g.name in set(names) and g.state == wire.STATE_RUNNING)
        disk = sum(unify.disk_usage(unify.usage_dir(paths, name)).bytes for name in names)
        t0 = time.perf_counter()
        actions.delete_class(classroom, actor=teacher, confirm=slug)
        delete_seconds = time.perf_counter() - t0
        with AgentClient(paths.rundir / "agent.sock") as c:
            left = [g.name for g in c.guests() if g.name in set(names)]
        if left:
            raise SystemExit(f"{label}: the end of term left {len(left)} servers: {left[:5]}")
    return Run(label, seconds, op_time.total_seconds() if op_time else 0.0, running, disk,
               delete_seconds)


def full_copies(paths: Paths) -> None:
    """From here on the panel builds every server as a full copy of the template."""
    from panel.guests import agent as panel_agent

    src = templates.template_path(paths, TEMPLATE)
    images = paths.rootdir / ".rootfs"
    images.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=never", str(src), str(images / TEMPLATE)],
                   check=True)
    overlay = panel_agent._build_request

    def copy_request(vs: Any) -> wire.BuildRequest:
        body = overlay(vs).to_json()
        body.update(method="rootfs", source=TEMPLATE)
        return wire.BuildRequest.from_json(body)

    panel_agent._build_request = copy_request


def report(n: int, template_bytes: int, ours: Run, peer: Run) -> None:
    def line(r: Run, class_bytes: int) -> str:
        return (f"{r.label:<26} {r.seconds:8.1f} s  {1000 * r.seconds / n:7.0f} ms/student "
                f"(agent operations {1000 * r.op_seconds / n:5.0f} ms)  "
                f"{r.running}/{n} running  disk {class_bytes / 2**20:8.1f} MiB "
                f"= {class_bytes / max(1, template_bytes):6.2f} x the template  "
                f"(+{r.disk / n / 1024:6.0f} KiB/student)  end of term {r.delete_seconds:5.1f} s")

    ours_total = template_bytes + ours.disk  # the template once, shared by every server
    peer_total = peer.disk  # each copy is whole
    print(f"students: {n}; template {TEMPLATE} (busybox guest): "
          f"{template_bytes / 2**20:.1f} MiB; kernel {os.uname().release}")
    print(line(ours, ours_total))
    print(line(peer, peer_total))
    print(f"ratio unified/full copies: time {ours.seconds / max(1e-9, peer.seconds):.2f}, "
          f"disk {ours_total / max(1, peer_total):.4f} "
          f"(per student {ours.disk / max(1, peer.disk):.4f})")


def unmount_all(paths: Paths) -> None:
    """Stop what still runs and detach the overlays of unified guests left
    behind (a run that failed half-way), so that bench_roots can remove the tree."""
    for name in paths.guest_names():
        with contextlib.suppress(guest.GuestError):
            guest.stop(paths, name, timeout=0)
    base = str(paths.rootdir.parent).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(base)]
    for point in sorted(points, key=len, reverse=True):
        with contextlib.suppress(OSError):
            syscalls.umount2(point, syscalls.MNT_DETACH)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", type=int, default=100)
    args = ap.parse_args()
    n = args.students
    if n < 1:
        ap.error("--students must be at least 1")
    if os.geteuid() != 0:
        print("bench/classroom.py: run as root", file=sys.stderr)
        return 2
    # The guests' addresses, routes and veths live in a namespace of our own.
    syscalls.unshare(syscalls.CLONE_NEWNET)
    for argv in (["link", "set", "lo", "up"],
                 # The uplink the guests' addresses are announced on (IPROOTDEV).
                 ["link", "add", UPLINK, "type", "veth", "peer", "name", f"{UPLINK}p"],
                 ["link", "set", UPLINK, "up"], ["link", "set", f"{UPLINK}p", "up"],
                 ["addr", "add", "198.19.0.1/16", "dev", UPLINK]):
        subprocess.run(["ip", *argv], check=True)
    var = Path(tempfile.mkdtemp(prefix="vpanel-classroom-db-"))
    try:
        with bench_roots("classroom") as paths:
            agent = start_agent(paths)
            try:
                template_bytes = make_template(paths)
                setup_django(var)
                world = panel_world(paths, n)
                # Not measured: the first class pays for cold caches (Django's, the
                # agent's, the page cache), which would be charged to whichever ran first.
                run_class(paths, world, "warm-up", "warm", min(n, 3))
                print(f"class of {n}, unified servers ...", file=sys.stderr, flush=True)
                ours = run_class(paths, world, "unified (template overlay)", "uni", n)
                full_copies(paths)
                print(f"class of {n}, full copies ...", file=sys.stderr, flush=True)
                peer = run_class(paths, world, "full copies (rootfs cp -ax)", "copy", n)
                report(n, template_bytes, ours, peer)
            finally:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(30)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
                unmount_all(paths)
        return 0
    finally:
        shutil.rmtree(var, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
