"""The panel end to end against a real agent: every step checked on the host itself.

A real `hostagent serve` runs in the host namespace of a throwaway "lan"
world (tests/agent/conftest.py: 198.18.N.0/24 on the uplink up0, never the
machine's own interfaces), and a Host row points at its socket. Vservers are
created, started, stopped, restarted, reinstalled and deleted through the
REST API (/api/v1/), with operations run inline (VPANEL_OPERATIONS_INLINE),
and each time the agent (GET /1.0/guests), the host's own records
(hostagent.guest.running) and the LAN (an HTTP request to the guest's
address) must agree. Then the reconciler: drift after a stop behind the
panel's back, its repair, a guest the panel does not know, and a silent agent.

Root only (namespaces, cgroups); every guest and agent is ended at teardown,
failed test or not (the lan and vroots fixtures, and `agent` below).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from hostagent import guest, wire
from hostagent.client import AgentClient, AgentError
from panel.guests import reconcile
from panel.guests.choices import (
    DesiredStateChoices,
    OperationKindChoices,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, VServer
from panel.hosting.choices import IPFamilyChoices, RoleChoices
from panel.hosting.models import AuditLog, Customer, Host, IPAddress, IPPool, Membership, Plan
from tests.agent import conftest as agent_conftest
from tests.agent.conftest import UPLINK, Lan
from tests.helpers import AgentProcess

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# The agent tests' fixture (a host and a LAN network namespace), used here as is.
lan = agent_conftest.lan

RUNNING, STOPPED = VServerStatusChoices.STATUS_RUNNING, VServerStatusChoices.STATUS_STOPPED


@pytest.fixture
def agent(lan: Lan) -> Iterator[AgentProcess]:
    """A real agent in the lan's host namespace, on the test's roots; ended at teardown
    (before the lan fixture stops the guests and removes the namespaces)."""
    a = AgentProcess(lan.paths, lan.host).start()
    try:
        yield a
    finally:
        a.kill(signal.SIGKILL)


@pytest.fixture
def panel(settings: Any, lan: Lan, agent: AgentProcess) -> dict[str, Any]:
    """A host on that agent, a pool on the lan's subnet, a customer and its owner."""
    settings.VPANEL_OPERATIONS_INLINE = True
    host = Host.objects.create(name="lanhost", agent_socket=str(agent.socket),
                               iprootdev=UPLINK, memory_mb=8192, cpu_cores=Decimal(8))
    IPPool.objects.create(name="lan-v4", host=host, family=IPFamilyChoices.FAMILY_4,
                          network=f"{lan.v4(0)}/24", first=lan.v4(10), last=lan.v4(20))
    plan = Plan.objects.create(name="e2e", max_vservers=5, max_ipv4=5, memory_mb=4096,
                               cpu_cores=Decimal(4), disk_gb=20)
    customer = Customer.objects.create(name="E2E", slug="e2e", plan=plan)
    owner = get_user_model().objects.create_user("owner", password=None)
    Membership.objects.create(user=owner, customer=customer, role=RoleChoices.ROLE_OWNER)
    api = APIClient()
    api.force_authenticate(owner)
    return {"host": host, "customer": customer, "owner": owner, "api": api}


def on_host(agent: AgentProcess, name: str) -> wire.GuestInfo | None:
    """What the agent says of NAME (None: it has no such guest)."""
    with AgentClient(agent.socket) as c:
        return {g.name: g for g in c.guests()}.get(name)


def post(api: APIClient, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    resp = api.post(path, body or {}, format="json")
    assert resp.status_code == 202, (resp.status_code, resp.content[:2000])
    data = resp.json()
    # The answer shows the operation as accepted; inline, it has run by now.
    op = Operation.objects.get(pk=data["operation"]["id"])
    assert op.state == OperationStateChoices.STATE_SUCCESS, (op.kind, op.state, op.error)
    return data


def assert_running(lan: Lan, agent: AgentProcess, vs: VServer, page: str = "") -> None:
    vs.refresh_from_db()
    info = on_host(agent, vs.name)
    assert info is not None and info.state == wire.STATE_RUNNING, info
    with lan.on_host():
        assert guest.running(lan.paths, vs.name)
    assert (vs.status, vs.context_id, vs.init_pid) == (RUNNING, info.context, info.init_pid)
    addr = vs.ips.get().address
    assert addr in info.addresses
    got = lan.http_get(addr)
    assert "FAILED" not in got and page in got, got


def assert_stopped(lan: Lan, agent: AgentProcess, vs: VServer) -> None:
    vs.refresh_from_db()
    info = on_host(agent, vs.name)
    assert info is not None and info.state == wire.STATE_STOPPED, info
    with lan.on_host():
        assert not guest.running(lan.paths, vs.name)
    assert (vs.status, vs.context_id, vs.init_pid) == (STOPPED, None, None)
    assert lan.http_get(vs.ips.get().address).startswith("FAILED")


def create(panel: dict[str, Any], name: str) -> VServer:
    data = post(panel["api"], "/api/v1/vservers/",
                {"customer": panel["customer"].pk, "name": name, "ipv4": 1,
                 "hostname": f"{name}.e2e.test"})
    return VServer.objects.get(pk=data["vserver"]["id"])


# --- the life of a vserver, through the API ------------------------------------------------

def test_create_start_stop_restart_reinstall_delete_through_the_api(
        panel: dict[str, Any], lan: Lan, agent: AgentProcess) -> None:
    api = panel["api"]
    vs = create(panel, "shop")
    assert vs.ips.get().address == lan.v4(10)
    assert_running(lan, agent, vs, page="shop")
    with AgentClient(agent.socket) as c:
        values = c.config("shop").values
    assert values["IPROOTDEV"] == UPLINK and values["MEMORY_LIMIT"] == "256M", values
    base = f"/api/v1/vservers/{vs.pk}"

    post(api, f"{base}/stop/")
    assert_stopped(lan, agent, vs)
    assert vs.desired_state == DesiredStateChoices.DESIRED_STOPPED

    post(api, f"{base}/start/")
    assert_running(lan, agent, vs)
    assert vs.desired_state == DesiredStateChoices.DESIRED_RUNNING

    before = vs.init_pid
    post(api, f"{base}/restart/")
    assert_running(lan, agent, vs)
    assert vs.init_pid != before

    # A file of the old install must be gone after a reinstall; the address stays.
    code, _ = lan.run("shop", "echo old > /root/marker")
    assert code == 0
    post(api, f"{base}/reinstall/", {"confirm": "shop"})
    assert_running(lan, agent, vs)
    code, out = lan.run("shop", "cat /root/marker 2>&1 || echo none")
    assert "none" in out, out
    assert vs.ips.get().address == lan.v4(10)

    resp = api.delete(f"{base}/?confirm=shop")
    assert resp.status_code == 202, resp.content[:2000]
    assert on_host(agent, "shop") is None
    assert not lan.paths.conf("shop").exists() and not lan.paths.root("shop").exists()
    assert not VServer.objects.filter(pk=vs.pk).exists()
    assert not IPAddress.objects.filter(address=lan.v4(10)).exists()
    assert lan.http_get(lan.v4(10)).startswith("FAILED")
    kinds = list(Operation.objects.filter(vserver_name="shop").order_by("id")
                 .values_list("kind", "state"))
    assert kinds == [(k, OperationStateChoices.STATE_SUCCESS) for k in (
        "create", "stop", "start", "restart", "reinstall", "delete")]


# --- the reconciler ----------------------------------------------------------------------------

def drift_of(reports: list[reconcile.HostReport]) -> set[tuple[str, str]]:
    return {(d.kind, d.vserver) for r in reports for d in r.drift}


def test_reconciler_reports_a_stop_behind_the_panels_back_and_repairs_it(
        panel: dict[str, Any], lan: Lan, agent: AgentProcess) -> None:
    vs = create(panel, "web")
    assert_running(lan, agent, vs)
    assert drift_of(reconcile.reconcile()) == set()

    # Behind the panel's back: the agent stops it, and a guest the panel never made.
    with AgentClient(agent.socket) as c:
        c.run(c.state("web", "stop", force=True))
        c.run(c.build(wire.BuildRequest.from_json({"name": "stray", "method": "busybox"})))
    vs.refresh_from_db()
    assert vs.status == RUNNING  # the panel has not noticed

    reports = reconcile.reconcile()
    assert drift_of(reports) == {("status", "web"), ("desired", "web"), ("unmanaged", "stray")}
    (status,) = [d for d in reports[0].drift if d.kind == "status"]
    assert (status.panel, status.host) == (RUNNING, STOPPED)
    vs.refresh_from_db()
    assert vs.status == RUNNING, "without --repair nothing is written"
    assert on_host(agent, "web").state == wire.STATE_STOPPED  # type: ignore[union-attr]

    reports = reconcile.reconcile(repair=True)
    (desired,) = [d for d in reports[0].drift if d.kind == "desired"]
    assert desired.repair.startswith("start (operation") and desired.repair.endswith("success")
    # Its status was set from the agent, then the panel started it again, as it
    # wants it running: an operation and an audit row by 'system'.
    assert_running(lan, agent, vs)
    op = Operation.objects.filter(vserver=vs, kind=OperationKindChoices.KIND_START).get()
    assert op.created_by is None and op.state == OperationStateChoices.STATE_SUCCESS
    row = AuditLog.objects.filter(target_id=str(vs.pk), action="start-vserver").get()
    assert row.actor_name == "system" and "reconciler" in row.detail["reason"]
    # Never deleted: the guest it does not know is still there, still reported.
    assert on_host(agent, "stray") is not None
    assert drift_of(reconcile.reconcile(repair=True)) == {("unmanaged", "stray")}

    # Stopped through the panel, it stays stopped: no drift, nothing started.
    post(panel["api"], f"/api/v1/vservers/{vs.pk}/stop/")
    assert drift_of(reconcile.reconcile(repair=True)) == {("unmanaged", "stray")}
    assert_stopped(lan, agent, vs)


def test_a_silent_agent_makes_the_reconciler_mark_its_vservers_unknown(
        panel: dict[str, Any], lan: Lan, agent: AgentProcess) -> None:
    vs = create(panel, "web")
    assert_running(lan, agent, vs)
    agent.stop()

    reports = reconcile.reconcile(repair=True)
    assert not reports[0].reachable and drift_of(reports) == {("unreachable", "")}
    vs.refresh_from_db()
    host = Host.objects.get(pk=panel["host"].pk)
    assert vs.status == VServerStatusChoices.STATUS_UNKNOWN  # never 'stopped'
    assert "does not answer" in vs.status_message and host.last_error
    # The guest itself runs on, without its agent.
    with lan.on_host():
        assert guest.running(lan.paths, "web")
    assert "FAILED" not in lan.http_get(vs.ips.get().address)
    # An action on it fails cleanly while the agent is away, and leaves it unknown.
    data = panel["api"].post(f"/api/v1/vservers/{vs.pk}/restart/", format="json").json()
    op = Operation.objects.get(pk=data["operation"]["id"])
    assert op.state == OperationStateChoices.STATE_FAILURE, (op.state, op.error)
    vs.refresh_from_db()
    assert vs.status == VServerStatusChoices.STATUS_UNKNOWN

    # The next agent adopts the guest; the next pass brings the status back.
    agent.start()
    reports = reconcile.reconcile(repair=True)
    assert reports[0].reachable and drift_of(reports) == {("status", "web")}
    assert_running(lan, agent, vs)
    host.refresh_from_db()
    assert host.last_error == "" and host.last_seen is not None


def test_reconcile_command_prints_drift_and_json(
        panel: dict[str, Any], lan: Lan, agent: AgentProcess) -> None:
    import io
    import json

    from django.core.management import call_command

    vs = create(panel, "web")
    with AgentClient(agent.socket) as c:
        c.run(c.state("web", "stop", force=True))
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    text = out.getvalue()
    assert "web" in text and "status" in text and "(--repair: start)" in text, text
    out = io.StringIO()
    call_command("reconcile", "--json", "--repair", stdout=out)
    doc = json.loads(out.getvalue())
    (h,) = doc["hosts"]
    assert h["host"] == "lanhost" and {d["kind"] for d in h["drift"]} == {"status", "desired"}
    assert_running(lan, agent, vs)
    with pytest.raises(AgentError):
        AgentClient(agent.socket).guest("nothing")


@pytest.fixture
def plain_agent(vroots: Any) -> Iterator[AgentProcess]:
    """A real agent on the test's roots, in this network namespace (guests without addresses)."""
    a = AgentProcess(vroots).start()
    try:
        yield a
    finally:
        a.kill(signal.SIGKILL)


def test_reconciler_marks_missing_fails_stale_operations_and_holds_back_its_starts(
        settings: Any, plain_agent: AgentProcess) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from panel.hosting.choices import HostStateChoices

    settings.VPANEL_OPERATIONS_INLINE = True
    host = Host.objects.create(name="h1", agent_socket=str(plain_agent.socket),
                               state=HostStateChoices.STATE_MAINTENANCE)
    plan = Plan.objects.create(name="p")
    customer = Customer.objects.create(name="C", slug="c", plan=plan)
    with AgentClient(plain_agent.socket) as c:
        for name in ("idle", "stuck"):
            c.run(c.build(wire.BuildRequest.from_json({"name": name, "method": "busybox"})))

    def row(name: str, status: str) -> VServer:
        return VServer.objects.create(name=name, customer=customer, host=host, hostname=name,
                                      status=status)

    idle, stuck = row("idle", STOPPED), row("stuck", VServerStatusChoices.STATUS_STARTING)
    ghost = row("ghost", RUNNING)
    op = Operation.objects.create(vserver=stuck, vserver_name="stuck", customer=customer,
                                  kind=OperationKindChoices.KIND_START,
                                  state=OperationStateChoices.STATE_RUNNING)
    Operation.objects.filter(pk=op.pk).update(updated=timezone.now() - timedelta(hours=1))

    reports = reconcile.reconcile(repair=True)
    found = {(d.kind, d.vserver): d for d in reports[0].drift}
    assert set(found) == {("missing", "ghost"), ("stale-op", "stuck"), ("status", "stuck"),
                          ("desired", "stuck"), ("desired", "idle")}, found
    ghost.refresh_from_db()
    stuck.refresh_from_db()
    op.refresh_from_db()
    assert ghost.status == VServerStatusChoices.STATUS_ERROR  # and the row is still there
    assert op.state == OperationStateChoices.STATE_FAILURE and "abandoned" in op.error
    assert stuck.status == STOPPED
    assert "maintenance" in found[("desired", "idle")].detail
    assert not Operation.objects.filter(vserver=idle).exists(), "nothing started in maintenance"

    # Enabled: 'stuck' waits out the backoff of its failed start; 'idle' is started.
    Host.objects.filter(pk=host.pk).update(state=HostStateChoices.STATE_ENABLED)
    reports = reconcile.reconcile(repair=True)
    found = {(d.kind, d.vserver): d for d in reports[0].drift}
    assert "next try in" in found[("desired", "stuck")].detail
    assert found[("desired", "idle")].repair.endswith("success")
    idle.refresh_from_db()
    assert idle.status == RUNNING
    with AgentClient(plain_agent.socket) as c:
        assert {g.name: g.state for g in c.guests()} == {"idle": "running", "stuck": "stopped"}
