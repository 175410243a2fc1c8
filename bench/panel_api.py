"""The panel's API: the vserver list and a start action, on SQLite and on PostgreSQL.

    sudo .venv/bin/python bench/panel_api.py [--sizes 1000,10000] [--requests 300]
                                             [--databases sqlite,postgresql]

For each database and each size, N vservers across 100 customers (10 hosts,
one IPv4 address each) are written straight into a fresh database with
bulk_create, then timed, one request after the other:

  list staff p1     GET /api/v1/vservers/ as staff: the first page (50 of N, with its count)
  list staff last   the same, its last page (?offset=N-50)
  list owner p1     GET /api/v1/vservers/ as one customer's owner (N/100 of theirs, the
                    tenant gate's join included)
  start             POST /api/v1/vservers/ID/start/ as staff on a stopped vserver (a new
                    one each time): the action's transaction, audit row, Operation row,
                    status change and event. The agent is NOT called: the dispatch that
                    would hand the operation to the host's agent after commit is replaced
                    by a no-op, so this is the panel's side of a start only.

Requests go through Django's test Client, in this process, authenticated with
an API token (`Authorization: Token ...`), as a script would: everything of
the panel (middleware, DRF, serializers, the database) and nothing of a
network or an ASGI server. requests/s is that of one client in sequence
(1000 / mean ms). Each database runs in a child process of its own, as
Django reads its settings once.

SQLite: a throwaway VPANEL_VAR_DIR under /tmp. PostgreSQL: a throwaway
cluster under /tmp (initdb and pg_ctl as the `postgres` user, on a Unix
socket only; the postgresql package is installed with apt when missing),
migrated through DATABASE_URL. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CUSTOMERS = 100
HOSTS = 10
PAGE = 50


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# --- the worker: one database, every size ------------------------------------------------

def worker(sizes: list[int], requests: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "panel.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, setup_test_environment

    from panel.guests import actions

    setup_test_environment()  # 'testserver' in ALLOWED_HOSTS, as in tests
    # The panel's side only: no operation reaches an agent.
    actions._dispatch = lambda op_id: None

    call_command("migrate", verbosity=0, interactive=False)
    out: dict[str, Any] = {"vendor": connection.vendor, "results": {}}
    for n in sizes:
        staff_token, owner_token, stopped = populate(n)
        staff = Client(headers={"authorization": f"Token {staff_token}"})
        owner = Client(headers={"authorization": f"Token {owner_token}"})
        last = max(0, n - PAGE)

        def get(client: Client, path: str, expect: int) -> Callable[[int], None]:
            def call(_i: int) -> None:
                resp = client.get(path)
                assert resp.status_code == 200, (resp.status_code, resp.content[:300])
                body = resp.json()
                assert body["count"] == expect and len(body["results"]) == min(PAGE, expect)
            return call

        def start(i: int, staff: Client = staff, stopped: list[int] = stopped) -> None:
            resp = staff.post(f"/api/v1/vservers/{stopped[i]}/start/")
            assert resp.status_code == 202, (resp.status_code, resp.content[:300])

        cases = {
            "list staff p1": (get(staff, "/api/v1/vservers/", n), requests),
            "list staff last": (get(staff, f"/api/v1/vservers/?offset={last}", n), requests),
            "list owner p1": (get(owner, "/api/v1/vservers/", n // CUSTOMERS), requests),
            "start": (start, min(requests, len(stopped) - 11)),
        }
        res: dict[str, Any] = {}
        for name, (fn, count) in cases.items():
            res[name] = timeit(fn, count)
            with CaptureQueriesContext(connection) as queries:
                fn(count + 10)  # one more, counted: N+1 queries show here first
            res[name]["queries"] = len(queries)
        out["results"][str(n)] = res
        print(f"  [{connection.vendor}] {n} vservers done", file=sys.stderr, flush=True)
    return out


def timeit(fn: Callable[[int], None], count: int, warmup: int = 10) -> dict[str, float]:
    for i in range(warmup):
        fn(i)
    ms = []
    for i in range(warmup, warmup + count):
        t0 = time.perf_counter()
        fn(i)
        ms.append((time.perf_counter() - t0) * 1000)
    mean = statistics.fmean(ms)
    return {"p50": pct(ms, 50), "p99": pct(ms, 99), "rps": 1000 / mean, "n": len(ms)}


def populate(n: int) -> tuple[str, str, list[int]]:
    """N vservers over CUSTOMERS customers and HOSTS hosts, written in bulk; the tokens
    of a staff user and of one customer's owner, and the ids of stopped vservers."""
    from decimal import Decimal

    from django.contrib.auth import get_user_model
    from django.db import transaction

    from panel.guests.choices import VServerStatusChoices
    from panel.guests.models import Operation, VServer
    from panel.hosting.choices import IPFamilyChoices, RoleChoices
    from panel.hosting.models import (
        ApiToken,
        AuditLog,
        Customer,
        Host,
        IPAddress,
        IPPool,
        Membership,
        Plan,
    )

    User = get_user_model()
    with transaction.atomic():
        # A clean slate for each size (the audit log refuses queryset deletes: raw SQL).
        Operation.objects.all().delete()
        IPAddress.objects.all().delete()
        VServer.objects.all().delete()
        from django.db import connection

        with connection.cursor() as cur:
            cur.execute(f"DELETE FROM {AuditLog._meta.db_table}")  # noqa: S608 - our table name
        IPPool.objects.all().delete()
        Host.objects.all().delete()
        Membership.objects.all().delete()
        Customer.objects.all().delete()
        Plan.objects.all().delete()
        ApiToken.objects.all().delete()
        User.objects.all().delete()

        plan = Plan.objects.create(name="bench", max_vservers=100_000, max_ipv4=100_000,
                                   memory_mb=10**8, cpu_cores=Decimal(9999), disk_gb=10**6)
        hosts = Host.objects.bulk_create(
            Host(name=f"node{i}", agent_socket=f"/run/vpanel-bench/node{i}.sock",
                 max_vservers=100_000, memory_mb=10**8, cpu_cores=Decimal(9999),
                 disk_gb=10**6) for i in range(HOSTS))
        customers = Customer.objects.bulk_create(
            Customer(name=f"Customer {i}", slug=f"c{i}", plan=plan) for i in range(CUSTOMERS))
        owners = User.objects.bulk_create(User(username=f"owner{i}") for i in range(CUSTOMERS))
        Membership.objects.bulk_create(
            Membership(user=u, customer=c, role=RoleChoices.ROLE_OWNER)
            for u, c in zip(owners, customers, strict=True))
        staff = User.objects.create(username="staff", is_staff=True)
        pool = IPPool.objects.create(name="bench", family=IPFamilyChoices.FAMILY_4,
                                     network="198.18.0.0/15", first="198.18.0.1",
                                     last="198.19.255.254")
        statuses = (VServerStatusChoices.STATUS_RUNNING, VServerStatusChoices.STATUS_STOPPED)
        vservers = VServer.objects.bulk_create(
            (VServer(name=f"vs{i}", customer=customers[i % CUSTOMERS], host=hosts[i % HOSTS],
                     hostname=f"vs{i}.example.test", status=statuses[i % 2])
             for i in range(n)), batch_size=1000)
        first = ipaddress.ip_address(pool.first)
        IPAddress.objects.bulk_create(
            (IPAddress(pool=pool, vserver=vs, address=str(first + i))
             for i, vs in enumerate(vservers)), batch_size=1000)
        _, staff_secret = ApiToken.issue(staff, "bench")
        _, owner_secret = ApiToken.issue(owners[0], "bench")
    stopped = list(VServer.objects.filter(status=VServerStatusChoices.STATUS_STOPPED)
                   .order_by("id").values_list("id", flat=True))
    return staff_secret, owner_secret, stopped


# --- the driver: throwaway databases, a worker each ---------------------------------------

def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return found[-1] if found else shutil.which(name)


def ensure_postgresql() -> None:
    if pg_bin("initdb") and pg_bin("pg_ctl"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql, as root)")
    print("installing postgresql with apt ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
                   check=True, env=env)


def as_postgres(argv: list[str]) -> list[str]:
    # initdb and the server refuse to run as root.
    return argv if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *argv]


@contextlib.contextmanager
def postgresql_cluster() -> Iterator[str]:
    """A throwaway cluster under /tmp on a Unix socket only; its DATABASE_URL."""
    ensure_postgresql()
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    assert initdb and pg_ctl
    base = Path(tempfile.mkdtemp(prefix="vpanel-bench-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    started = False
    try:
        subprocess.run(as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                                    "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True)
        opts = f"-c listen_addresses='' -k {sock} -c fsync=off -c synchronous_commit=off"
        subprocess.run(as_postgres([pg_ctl, "-D", str(data), "-o", opts, "-l",
                                    str(base / "log"), "-w", "start"]),
                       check=True, capture_output=True)
        started = True
        subprocess.run(as_postgres([pg_bin("createdb") or "createdb", "-h", str(sock),
                                    "-U", "postgres", "vpbench"]),
                       check=True, capture_output=True)
        yield f"postgres://postgres@{str(sock).replace('/', '%2F')}/vpbench"
    finally:
        if started:
            subprocess.run(as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]),
                           capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def run_worker(env: dict[str, str], sizes: list[int], requests: int) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--worker", "--sizes", ",".join(map(str, sizes)),
            "--requests", str(requests)]
    proc = subprocess.run(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the worker failed ({proc.returncode}); see above")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--databases", default="sqlite,postgresql")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(worker(sizes, args.requests)))
        return 0

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VPANEL_") and k not in ("DATABASE_URL", "REDIS_URL")}
    results: dict[str, dict[str, Any]] = {}
    for db in args.databases.split(","):
        print(f"{db}: {', '.join(map(str, sizes))} vservers, {args.requests} requests "
              "per case ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="vpanel-bench-var-") as var:
            wenv = {**env, "VPANEL_VAR_DIR": var}
            if db == "sqlite":
                results[db] = run_worker(wenv, sizes, args.requests)
            elif db == "postgresql":
                with postgresql_cluster() as url:
                    results[db] = run_worker({**wenv, "DATABASE_URL": url}, sizes,
                                             args.requests)
            else:
                raise SystemExit(f"unknown database {db!r}: sqlite or postgresql")
    report(results, sizes)
    return 0


def report(results: dict[str, dict[str, Any]], sizes: list[int]) -> None:
    dbs = list(results)
    print("\nDjango test Client in-process, one client in sequence (req/s = 1000 / mean ms); "
          "'start' is the panel's side only, the agent is not called. q: SQL queries of one "
          "request.")
    head = f"{'case':<16}{'vservers':>9}"
    for db in dbs:
        head += f" | {db:<10}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>7}{'q':>4}"
    print(head)
    print("-" * len(head))
    for n in sizes:
        for case in results[dbs[0]]["results"][str(n)]:
            line = f"{case:<16}{n:>9}"
            for db in dbs:
                r = results[db]["results"][str(n)][case]
                line += (f" | {'':<10}{r['p50']:>8.1f}{r['p99']:>8.1f}{r['rps']:>7.0f}"
                         f"{r['queries']:>4}")
            print(line)


if __name__ == "__main__":
    sys.exit(main())
