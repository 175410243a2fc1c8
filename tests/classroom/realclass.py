"""A class on a real agent, for the auto-stop and end-of-term tests.

A real `hostagent serve` in the host namespace of a throwaway "lan" world
(tests/agent/conftest.py: 198.18.N.0/24 on the uplink up0, never the
machine's own interfaces), a template `lab` made from a stopped busybox
guest (`vtemplate create --from`),
and a class `os1` on it whose students' servers are built from it, with
operations run inline (VPANEL_OPERATIONS_INLINE) so that each action has
reached the host when it returns.

Use in a test module as tests/panel/test_e2e_agent.py uses the lan fixture:
`lan = realclass.lan` and so on. Root only; every guest and agent is ended
at teardown, failed test or not (the lan and vroots fixtures, `agent`).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from hostagent import wire
from hostagent.client import AgentClient
from panel.classroom import actions
from panel.classroom.models import Classroom, Seat
from panel.guests.actions import Actor
from panel.guests.choices import OperationStateChoices, VServerStatusChoices
from panel.guests.models import Operation
from panel.hosting.choices import IPFamilyChoices
from panel.hosting.models import Host, IPPool
from tests.agent import conftest as agent_conftest
from tests.agent.conftest import UPLINK, Lan
from tests.helpers import AgentProcess, run
from tests.panel.factories import make_plan, make_user

__all__ = ["RealClass", "agent", "lan", "on_host", "real_class"]

lan = agent_conftest.lan

TEMPLATE = "lab"


@pytest.fixture
def agent(lan: Lan) -> Iterator[AgentProcess]:
    """A real agent in the lan's host namespace, on the test's roots; ended at
    teardown (before the lan fixture stops the guests and removes the namespaces)."""
    a = AgentProcess(lan.paths, lan.host).start()
    try:
        yield a
    finally:
        a.kill(signal.SIGKILL)


@dataclass
class RealClass:
    classroom: Classroom
    host: Host
    pool: IPPool
    agent: AgentProcess
    users: dict[str, Any]

    def actor(self, who: str) -> Actor:
        return Actor(self.users[who])

    def seat(self, username: str) -> Seat:
        return Seat.objects.select_related("vserver", "user", "classroom").get(
            user__username=username)


def on_host(agent: AgentProcess, name: str) -> wire.GuestInfo | None:
    """What the agent says of NAME (None: it has no such guest)."""
    with AgentClient(agent.socket) as c:
        return {g.name: g for g in c.guests()}.get(name)


def make_template(agent: AgentProcess) -> None:
    """`lab`: a template made from a stopped busybox guest, as an admin would
    (`vtemplate create lab --from labsrc`, on the test's roots: VSERVER_* are
    in the environment)."""
    with AgentClient(agent.socket) as c:
        c.run(c.build(wire.BuildRequest.from_json({"name": "labsrc", "method": "busybox"})))
        run([str(Path(sys.executable).parent / "vtemplate"), "create", TEMPLATE,
             "--from", "labsrc"])
        c.run(c.delete("labsrc"))


@pytest.fixture
def real_class(settings: Any, lan: Lan, agent: AgentProcess) -> RealClass:
    """Class os1 (teacher tina) with students ann and ben, their servers built
    from the template and running; any time allowed, idle stop after 30
    minutes with a warning 5 minutes before, idle under 10 % of a core."""
    settings.VPANEL_OPERATIONS_INLINE = True
    make_template(agent)
    host = Host.objects.create(name="lanhost", agent_socket=str(agent.socket),
                               iprootdev=UPLINK, memory_mb=8192, cpu_cores=Decimal(8))
    pool = IPPool.objects.create(name="lan-v4", host=host, family=IPFamilyChoices.FAMILY_4,
                                 network=f"{lan.v4(0)}/24", first=lan.v4(10), last=lan.v4(20))
    plan = make_plan("os-class", max_vservers=5, max_ipv4=5, memory_mb=4096,
                     cpu_cores=Decimal(4), disk_gb=20)
    users = {"staff": make_user("root-staff", staff=True), "teacher": make_user("tina")}
    classroom = actions.create_class(
        actor=Actor(users["staff"]), name="Operating systems 1", slug="os1", plan=plan,
        template=TEMPLATE, teacher=users["teacher"], seat_memory_mb=128,
        seat_cpu_cores=Decimal("0.5"), idle_minutes=30, idle_warning_minutes=5,
        idle_cpu_percent=Decimal(10))
    data = (b"username,full name,email\n"
            b"ann,Ann Lee,ann@school.example\n"
            b"ben,Ben Ode,ben@school.example\n")
    preview, made = actions.apply_roster(classroom, data, actor=Actor(users["teacher"]))
    assert [r.errors for r in preview.rows] == [[], []] and len(made) == 2
    ops = list(Operation.objects.values_list("vserver_name", "kind", "state", "error"))
    assert {(n, k, s) for n, k, s, _ in ops} == {
        ("os1-ann", "create", OperationStateChoices.STATE_SUCCESS),
        ("os1-ben", "create", OperationStateChoices.STATE_SUCCESS)}, ops
    for seat in Seat.objects.select_related("vserver"):
        assert seat.vserver is not None
        assert seat.vserver.status == VServerStatusChoices.STATUS_RUNNING
        info = on_host(agent, seat.vserver.name)
        assert info is not None and info.state == wire.STATE_RUNNING, info
    users.update({s.user.username: s.user for s in Seat.objects.select_related("user")})
    return RealClass(classroom=classroom, host=host, pool=pool, agent=agent, users=users)
