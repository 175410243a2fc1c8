"""A class against a real agent: students' servers built from one template,
each with its own root password; a reset to the template with and without
/home, as the student asks it, keeps that password. Root only; every guest
and the agent are ended at teardown (the lan fixture and `agent` below)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from hostagent import guest, templates, wire
from hostagent.client import AgentClient
from panel.classroom import actions
from panel.classroom.models import Seat
from panel.guests import actions as gactions
from panel.guests.actions import Actor
from panel.guests.choices import OperationStateChoices
from panel.guests.models import Operation
from panel.hosting.choices import IPFamilyChoices
from panel.hosting.models import Host, IPPool, Plan
from tests.agent import conftest as agent_conftest
from tests.agent.conftest import UPLINK, Lan
from tests.classroom.conftest import roster_csv
from tests.helpers import AgentProcess
from tests.panel.factories import make_user

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

lan = agent_conftest.lan


@pytest.fixture
def agent(lan: Lan) -> Iterator[AgentProcess]:
    a = AgentProcess(lan.paths, lan.host).start()
    try:
        yield a
    finally:
        a.kill(signal.SIGKILL)


@pytest.fixture
def klass(settings: Any, lan: Lan, agent: AgentProcess) -> dict[str, Any]:
    """Class lab1 on template bbt (busybox) with students ann and ben, servers up."""
    settings.VPANEL_OPERATIONS_INLINE = True
    templates.create(lan.paths, "bbt", "busybox", None)
    host = Host.objects.create(name="lanhost", agent_socket=str(agent.socket),
                               iprootdev=UPLINK, memory_mb=8192, cpu_cores=Decimal(8))
    IPPool.objects.create(name="lan-v4", host=host, family=IPFamilyChoices.FAMILY_4,
                          network=f"{lan.v4(0)}/24", first=lan.v4(10), last=lan.v4(20))
    plan = Plan.objects.create(name="lab", max_vservers=5, max_ipv4=5, memory_mb=4096,
                               cpu_cores=Decimal(4), disk_gb=20, templates=["bbt"])
    staff, teacher = make_user("root-staff", staff=True), make_user("tina")
    classroom = actions.create_class(actor=Actor(staff), name="Lab 1", slug="lab1", plan=plan,
                                     template="bbt", teacher=teacher, seat_memory_mb=128,
                                     seat_cpu_cores=Decimal("0.5"))
    data = roster_csv(("ann", "Ann", "ann@school.example"), ("ben", "Ben", "ben@school.example"))
    _, made = actions.apply_roster(classroom, data, actor=Actor(teacher))
    return {"classroom": classroom, "teacher": teacher, "made": {c.username: c for c in made}}


def sh(lan: Lan, name: str, script: str) -> tuple[int, str]:
    buf = bytearray()
    with lan.on_host():
        code = guest.exec_in(lan.paths, name, ["/bin/sh", "-c", script], output=buf.extend)
    return code, buf.decode(errors="replace")


def root_hash(lan: Lan, name: str) -> str:
    code, out = sh(lan, name, "cat /etc/shadow 2>/dev/null || cat /etc/passwd")
    assert code == 0, out
    return next(line.split(":")[1] for line in out.splitlines() if line.startswith("root:"))


def state(agent: AgentProcess, name: str) -> str:
    with AgentClient(agent.socket) as c:
        return {g.name: g.state for g in c.guests()}[name]


def test_every_student_gets_a_running_server_with_its_own_root_password(
        klass: dict[str, Any], lan: Lan, agent: AgentProcess) -> None:
    failed = Operation.objects.exclude(state=OperationStateChoices.STATE_SUCCESS)
    assert not failed.exists(), list(failed.values("kind", "vserver_name", "error"))
    hashes = {}
    for name in ("ann", "ben"):
        seat = Seat.objects.select_related("vserver").get(user__username=name)
        assert seat.vserver is not None
        assert state(agent, seat.vserver.name) == wire.STATE_RUNNING
        hashes[name] = root_hash(lan, seat.vserver.name)
        assert hashes[name] == seat.root_password_hash
        assert hashes[name].startswith("$6$")
    assert hashes["ann"] != hashes["ben"]
    # The hash is not left in any operation's record.
    assert not any("password" in str(op.result or "") for op in Operation.objects.all())


@pytest.mark.parametrize("keep_home", [True, False])
def test_a_student_resets_their_server_keeping_home_or_not(
        klass: dict[str, Any], lan: Lan, agent: AgentProcess, keep_home: bool) -> None:
    seat = Seat.objects.select_related("vserver", "user", "classroom").get(user__username="ann")
    vs = seat.vserver
    assert vs is not None
    code, out = sh(lan, vs.name, "mkdir -p /home/ann/lab3 && echo mine > /home/ann/lab3/notes "
                                 "&& echo broken > /etc/hostname.broken && rm -f /bin/ls")
    assert code == 0, out
    before = root_hash(lan, vs.name)
    op = actions.reset_seat(seat, actor=Actor(seat.user), keep_home=keep_home, confirm=vs.name)
    op.refresh_from_db()
    assert op.state == OperationStateChoices.STATE_SUCCESS, op.error
    assert state(agent, vs.name) == wire.STATE_RUNNING
    code, out = sh(lan, vs.name, "cat /home/ann/lab3/notes; ls /etc/hostname.broken; "
                                 "ls /bin/ls")
    assert ("mine" in out) is keep_home
    assert "No such file" in out and "/bin/ls" in out.splitlines()[-1]  # template's again
    assert root_hash(lan, vs.name) == before  # the same root password as handed out


def test_a_student_cannot_reset_another_students_server(
        klass: dict[str, Any], lan: Lan, agent: AgentProcess) -> None:
    ann = Seat.objects.select_related("user").get(user__username="ann")
    ben = Seat.objects.select_related("vserver").get(user__username="ben")
    assert ben.vserver is not None
    with pytest.raises(gactions.Denied):
        actions.reset_seat(ben, actor=Actor(ann.user), keep_home=True, confirm=ben.vserver.name)
    assert state(agent, ben.vserver.name) == wire.STATE_RUNNING


def test_the_teacher_collects_a_path_from_every_server_into_one_zip(
        klass: dict[str, Any], lan: Lan, agent: AgentProcess) -> None:
    import io
    import zipfile

    from django.test import Client

    ann = Seat.objects.select_related("vserver").get(user__username="ann")
    ben = Seat.objects.select_related("vserver").get(user__username="ben")
    assert ann.vserver is not None and ben.vserver is not None
    code, out = sh(lan, ann.vserver.name, "mkdir -p /home/lab3/sub && echo ann-work > "
                                          "/home/lab3/answer.txt && echo deep > /home/lab3/sub/x "
                                          "&& ln -s / /home/lab3/escape && ln -s /etc/passwd "
                                          "/home/lab3/pw")
    assert code == 0, out
    # ben's server has no such path.
    c = Client()
    c.force_login(klass["teacher"])
    with lan.on_host():
        r = c.post("/classes/lab1/collect/", {"path": "/home/lab3"})
    assert r.status_code == 200, r.content[:500]
    assert r["Content-Type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(b"".join(r.streaming_content)))  # type: ignore[attr-defined]
    names = set(zf.namelist())
    assert zf.read("ann/answer.txt") == b"ann-work\n"
    assert zf.read("ann/sub/x") == b"deep\n"
    assert not any("escape" in n or n.endswith("/pw") for n in names)  # links are not copied
    assert not any(n.startswith(("/", "..")) or "/../" in n for n in names)
    report = zf.read("REPORT.txt").decode()
    assert "ann (" in report and "2 file(s)" in report and "escape (link)" in report
    ben_line = next(line for line in report.splitlines() if line.startswith("ben ("))
    assert "no such" in ben_line.lower(), report


def test_a_student_cannot_collect_from_the_class(
        klass: dict[str, Any], lan: Lan, agent: AgentProcess) -> None:
    from django.test import Client

    c = Client()
    c.force_login(Seat.objects.get(user__username="ann").user)
    assert c.post("/classes/lab1/collect/", {"path": "/home"}).status_code == 404
