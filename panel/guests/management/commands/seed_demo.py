"""`manage.py seed_demo`: the demo world of `make run`, made once and kept.

A staff user `admin` and a customer user `demo` (owner of "Demo Hosting",
plan "Starter"), a Host "local" on the agent `make run` started (its socket
under $VSERVER_RUNDIR), IP pools for it, and a running busybox vserver "web"
with one IPv4 address, created through actions.create_vserver like any other.

Idempotent: a second run changes nothing that is right and prints the same
logins. The passwords are generated once and kept in VAR_DIR/demo-logins.txt
(mode 0600); delete that file to get new ones. Runs as root, in the network
namespace of the agent (the Makefile's run target does both).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.test.utils import override_settings

from hostagent.client import AgentClient, AgentError
from hostagent.paths import Paths
from panel.guests import actions, agent
from panel.guests.choices import OperationStateChoices, VServerStatusChoices
from panel.guests.models import Operation, VServer
from panel.hosting.choices import HostStateChoices, IPFamilyChoices, RoleChoices
from panel.hosting.models import Customer, Host, IPPool, Membership, Plan

HOST = "local"
VSERVER = "web"
CUSTOMER = "Demo Hosting"
PLAN = "Starter"
USERS = (("admin", "staff: every customer, host and pool"),
         ("demo", f"owner of the customer {CUSTOMER!r}"))

# The demo's guests announce their addresses on this veth pair, never on the
# machine's uplink: the agent turns on proxy ARP/NDP on a guest's IPROOTDEV
# and answers for the guest's addresses there, which on eth0 would put
# 198.18.200.x on the real LAN. vpdemo0 leads nowhere (its peer vpdemo1 is
# up and unused), so the guest is reachable from this machine only, through
# the /32 route the agent adds to it.
DEMO_DEV, DEMO_PEER = "vpdemo0", "vpdemo1"

POOLS = (
    # name, family, network, first, last
    ("demo-v4", IPFamilyChoices.FAMILY_4, "198.18.200.0/24", "198.18.200.10", "198.18.200.250"),
    ("demo-v6", IPFamilyChoices.FAMILY_6, "fd00:200::/64", "fd00:200::10", "fd00:200::ffff"),
)


def logins_file() -> Path:
    return Path(settings.VAR_DIR) / "demo-logins.txt"


def read_logins(path: Path) -> dict[str, str]:
    """USER PASSWORD lines of PATH ('#' comments); {} when it does not exist."""
    try:
        with path.open(encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                os.fchmod(f.fileno(), 0o600)  # it holds passwords: nobody else reads it
            text = f.read()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#"):
            out[parts[0]] = parts[1]
    return out


def write_logins(path: Path, logins: dict[str, str]) -> None:
    lines = ["# make run's demo logins (manage.py seed_demo); delete this file for new ones"]
    lines += [f"{user} {logins[user]}  # {what}" for user, what in USERS]
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    # Created 0600 from the start: the passwords are never readable by others.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def ensure_demo_link() -> None:
    """The veth pair the demo's guest addresses live on (only made if missing), both up."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            if not ipr.link_lookup(ifname=DEMO_DEV):
                ipr.link("add", ifname=DEMO_DEV, kind="veth", peer={"ifname": DEMO_PEER})
            for dev in (DEMO_DEV, DEMO_PEER):
                found = ipr.link_lookup(ifname=dev)
                if not found:
                    raise CommandError(f"{dev} is missing: delete {DEMO_DEV} "
                                       f"(ip link del {DEMO_DEV}) and run the seed again")
                ipr.link("set", index=found[0], state="up")
        except NetlinkError as e:
            raise CommandError(f"making the demo's veth pair {DEMO_DEV}/{DEMO_PEER}: {e} "
                               "(run as root)") from e


class Command(BaseCommand):
    help = "Create make run's demo: users admin and demo, a plan, a customer, a host, " \
           "IP pools and a running vserver 'web' (idempotent)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--agent-socket", help="the agent's socket (default "
                            "$VSERVER_RUNDIR/agent.sock)")

    def handle(self, *args: Any, **opts: Any) -> None:
        socket = opts["agent_socket"]
        if not socket:
            if not os.environ.get("VSERVER_RUNDIR"):
                raise CommandError("VSERVER_RUNDIR is not set: the demo runs on make run's "
                                   "roots under var/demo, never the real /run/vservers "
                                   "(or give --agent-socket)")
            socket = str(Paths.from_env().rundir.resolve() / "agent.sock")
        logins = self._users()
        customer = self._tenant(logins)
        host = self._host(socket)
        self._pools(host)
        vs = self._vserver(customer, host)
        self._say(logins, vs)

    # --- the rows ---

    def _users(self) -> dict[str, str]:
        path = logins_file()
        logins = read_logins(path)
        changed = False
        for user, _what in USERS:
            if not logins.get(user):
                logins[user] = actions.generate_password(20)
                changed = True
        if changed:
            write_logins(path, logins)
        User = get_user_model()
        for name, _what in USERS:
            staff = name == "admin"
            u, _ = User.objects.get_or_create(username=name)
            if (u.is_staff, u.is_superuser, u.is_active) != (staff, staff, True) \
                    or not u.check_password(logins[name]):
                u.is_staff = u.is_superuser = staff
                u.is_active = True
                u.set_password(logins[name])
                u.save()
        return logins

    @transaction.atomic
    def _tenant(self, logins: dict[str, str]) -> Customer:
        plan, _ = Plan.objects.get_or_create(name=PLAN, defaults={
            "description": "the demo's plan: small vservers for trying the panel",
            "max_vservers": 3, "max_ipv4": 3, "max_ipv6": 3, "memory_mb": 1024,
            "cpu_cores": 2, "disk_gb": 10, "processes": 256})
        customer, _ = Customer.objects.get_or_create(slug="demo-hosting", defaults={
            "name": CUSTOMER, "plan": plan})
        if customer.plan_id is None:
            Customer.objects.filter(pk=customer.pk).update(plan=plan)
            customer.plan = plan
        demo = get_user_model().objects.get(username="demo")
        Membership.objects.update_or_create(user=demo, customer=customer,
                                            defaults={"role": RoleChoices.ROLE_OWNER})
        return customer

    def _host(self, socket: str) -> Host:
        ensure_demo_link()
        host, _ = Host.objects.update_or_create(name=HOST, defaults={
            "agent_socket": socket, "iprootdev": DEMO_DEV,
            "state": HostStateChoices.STATE_ENABLED})
        host.full_clean()
        return host

    def _pools(self, host: Host) -> None:
        for name, family, network, first, last in POOLS:
            pool, _ = IPPool.objects.get_or_create(name=name, defaults={
                "host": host, "family": family, "network": network, "first": first,
                "last": last})
            pool.full_clean()

    # --- the vserver ---

    def _vserver(self, customer: Customer, host: Host) -> VServer:
        admin = get_user_model().objects.get(username="admin")
        actor = actions.Actor(admin)
        # The demo waits for each operation here rather than in a thread:
        # make run prints the logins only once 'web' runs.
        with override_settings(VPANEL_OPERATIONS_INLINE=True):
            vs = VServer.objects.filter(host=host, name=VSERVER).first()
            if vs is not None and agent.refresh_status(vs) == VServerStatusChoices.STATUS_ERROR:
                # The database knows it and the host does not (var/demo was
                # wiped): the row goes, through the action, and it is made afresh.
                self.stdout.write(f"{VSERVER}: the host has no such guest; creating it afresh")
                actions.delete_vserver(vs, actor=actor, confirm=vs.name)
                vs = None
            if vs is None:
                self._clear_unknown_guest(host)
                self.stdout.write(f"Creating the vserver {VSERVER!r} (busybox, one IPv4 "
                                  f"address on {DEMO_DEV}) ...")
                # IPv4 only: a guest with an IPv6 address makes the agent turn
                # on IPv6 forwarding in this namespace, which would make the
                # machine's own uplink ignore router advertisements.
                vs, op = actions.create_vserver(
                    customer, actor=actor, name=VSERVER, hostname="web.demo.vpanel.test",
                    description="the demo vserver of make run", ipv4=1, ipv6=0,
                    memory_mb=256, processes=128)
                self._check(op)
            vs.refresh_from_db()
            if vs.status == VServerStatusChoices.STATUS_UNKNOWN:
                raise CommandError(f"the agent on {host.agent_socket} does not answer: "
                                   f"{vs.status_message}")
            if vs.status != VServerStatusChoices.STATUS_RUNNING and not vs.busy:
                self.stdout.write(f"Starting {VSERVER} ...")
                self._check(actions.start_vserver(vs, actor=actor))
            vs.refresh_from_db()
        if vs.status != VServerStatusChoices.STATUS_RUNNING:
            raise CommandError(f"{VSERVER} is {vs.status}, not running: {vs.status_message}")
        return vs

    def _clear_unknown_guest(self, host: Host) -> None:
        """A guest named 'web' on the host that the database does not know (var/ was
        wiped and var/demo kept): it holds the address the new one gets, so it goes.
        Only ever on make run's own roots, which is where the seed's host points."""
        try:
            with AgentClient(host.agent_socket, timeout=30) as c:
                if VSERVER not in {g.name for g in c.guests()}:
                    return
                self.stdout.write(f"{VSERVER}: a guest the panel does not know is on the "
                                  "demo's roots; deleting it to make the panel's own")
                c.run(c.state(VSERVER, "stop", force=True))
                c.run(c.delete(VSERVER))
        except AgentError as e:
            raise CommandError(f"the demo agent: {e}") from e
        except (OSError, httpx.HTTPError) as e:
            raise CommandError(f"the demo agent on {host.agent_socket} does not answer: "
                               f"{e} (make run starts it with scripts/agent.sh)") from e

    def _check(self, op: Operation) -> None:
        op.refresh_from_db()
        if op.state == OperationStateChoices.STATE_FAILURE:
            raise CommandError(f"{op.kind} of {op.vserver_name} failed: {op.error}")

    def _say(self, logins: dict[str, str], vs: VServer) -> None:
        addrs = ", ".join(a.address for a in vs.ips.all())
        self.stdout.write(
            f"\nVserver {vs.name!r} is {vs.status} on host {vs.host.name}: {addrs} "
            f"(context {vs.context_id}); try: curl http://{addrs.split(',')[0]}/\n"
            f"Logins (kept in {logins_file()}):\n"
            + "".join(f"  {user:<6} {logins[user]}   {what}\n" for user, what in USERS))
