"""End of term (issue 9, point 6): deleting a class after a confirm stops and
deletes its servers on the host, deletes its students' accounts, frees its
addresses and removes the class once its servers are gone, leaving audit rows
that outlive it; a wrong confirm, or anyone but its teacher, changes nothing.

Against a real agent (tests/classroom/realclass.py), and in the database for
the class that waits for its last server's deletion.
"""

from __future__ import annotations

import datetime as dt

import pytest
from django.contrib.auth import get_user_model

from hostagent import wire
from panel.classroom import actions, autostop
from panel.classroom.models import Classroom, Seat
from panel.guests import actions as gactions
from panel.guests.actions import ActionError, Denied
from panel.guests.choices import OperationKindChoices, OperationStateChoices
from panel.guests.models import Operation, VServer
from panel.hosting.choices import AuditResultChoices
from panel.hosting.models import AuditLog, Customer, IPAddress, Membership
from tests.agent.conftest import Lan
from tests.classroom import realclass
from tests.classroom.conftest import School, add_students
from tests.classroom.realclass import RealClass, on_host

lan = realclass.lan
agent = realclass.agent
real_class = realclass.real_class

User = get_user_model()


def _state(rc: RealClass) -> dict[str, object]:
    """What a wrong confirm must leave as it was."""
    return {
        "active": Customer.objects.get(slug="os1").is_active,
        "seats": sorted(Seat.objects.values_list("user__username", "vserver__name")),
        "vservers": sorted(VServer.objects.values_list("name", "status", "desired_state")),
        "ips": sorted(IPAddress.objects.values_list("address", flat=True)),
        "users": sorted(User.objects.values_list("username", flat=True)),
        "on host": sorted((n, getattr(on_host(rc.agent, n), "state", None))
                          for n in ("os1-ann", "os1-ben", "demo")),
        "operations": Operation.objects.count(),
    }


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_deleting_a_class_removes_its_servers_accounts_addresses_and_itself(
        real_class: RealClass, lan: Lan) -> None:
    rc = real_class
    customer = rc.classroom.customer
    # A server the teacher made by hand goes too.
    gactions.create_vserver(customer, actor=rc.actor("teacher"), name="demo",
                            template=realclass.TEMPLATE, memory_mb=128, cpu_cores="0.5")
    names = ["os1-ann", "os1-ben", "demo"]
    addresses = sorted(IPAddress.objects.values_list("address", flat=True))
    assert len(addresses) == 3
    for n in names:
        assert on_host(rc.agent, n).state == wire.STATE_RUNNING  # type: ignore[union-attr]

    with pytest.raises(ActionError, match="type the class's short name"):
        actions.delete_class(rc.classroom, actor=rc.actor("teacher"), confirm="os-1")
    with pytest.raises(Denied):
        actions.delete_class(rc.classroom, actor=rc.actor("ann"), confirm="os1")
    before = _state(rc)
    assert before["active"] is True and len(before["seats"]) == 2  # type: ignore[arg-type]

    n = actions.delete_class(rc.classroom, actor=rc.actor("teacher"), confirm="os1")

    assert n == 3
    # The servers: stopped, deleted on the host, their trees gone.
    for name in names:
        assert on_host(rc.agent, name) is None
        assert not lan.paths.conf(name).exists() and not lan.paths.root(name).exists()
    deletes = Operation.objects.filter(kind=OperationKindChoices.KIND_DELETE)
    assert sorted(deletes.values_list("vserver_name", "state")) == [
        (name, OperationStateChoices.STATE_SUCCESS) for name in sorted(names)]
    assert not VServer.objects.exists()
    # The addresses: free, and the pool hands the first one out again.
    assert not IPAddress.objects.exists()
    for a in addresses:
        assert lan.http_get(a).startswith("FAILED")
    # The accounts: the students' are gone; the teacher keeps theirs, not the class.
    assert not User.objects.filter(username__in=["ann", "ben"]).exists()
    assert User.objects.filter(username="tina").exists()
    assert not Membership.objects.filter(user__username="tina").exists()
    # The class itself, once its last server went (here at once: operations ran inline).
    assert not Customer.objects.filter(slug="os1").exists()
    assert not Classroom.objects.exists() and not Seat.objects.exists()
    # The record outlives it.
    rows = AuditLog.objects.filter(action__in=["delete-class", "class-removed"],
                                   result=AuditResultChoices.RESULT_OK).order_by("id")
    assert [(r.action, r.actor_name, r.target_repr, r.customer_id) for r in rows] == [
        ("delete-class", "tina", "Operating systems 1", None),
        ("class-removed", "system", "Operating systems 1", None)]
    assert rows[0].detail == {"servers": 3, "students": 2}
    assert rows[1].detail["slug"] == "os1"
    assert set(AuditLog.objects.filter(action="remove-student")
               .values_list("detail__username", flat=True)) == {"ann", "ben"}
    refused = AuditLog.objects.get(action="delete-class", result=AuditResultChoices.RESULT_DENIED)
    assert refused.actor_name == "ann"

    # The pool is free again: a new class can use the same addresses.
    demo = Customer.objects.create(name="Next term", slug="next", plan=rc.classroom.customer.plan)
    vs = VServer.objects.create(name="again", customer=demo, host=rc.host, hostname="again")
    assert rc.pool.allocate(vs).address == addresses[0]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_wrong_confirm_changes_nothing_on_the_host_or_in_the_panel(
        real_class: RealClass) -> None:
    rc = real_class
    before = _state(rc)
    audit_rows = AuditLog.objects.count()
    for wrong in ("", "OS1", "os1 ", "Operating systems 1", "os2"):
        with pytest.raises(ActionError):
            actions.delete_class(rc.classroom, actor=rc.actor("teacher"), confirm=wrong)
    assert _state(rc) == before
    assert AuditLog.objects.count() == audit_rows  # an unconfirmed click is not an action
    assert before["on host"] == [("demo", None), ("os1-ann", wire.STATE_RUNNING),
                                 ("os1-ben", wire.STATE_RUNNING)]


def test_a_deleted_class_stays_until_its_last_server_is_gone_then_a_pass_removes_it(
        school: School) -> None:
    # No agent: the deletes wait (their operations never leave the database here).
    add_students(school, school.cs101, "ann", "ben")
    n = actions.delete_class(school.cs101, actor=school.actor("teacher"), confirm="cs101")
    assert n == 2
    customer = Customer.objects.get(slug="cs101")
    assert not customer.is_active
    assert not User.objects.filter(username__in=["ann", "ben"]).exists()
    assert set(customer.vservers.values_list("status", flat=True)) == {"deleting"}
    assert Operation.objects.filter(kind=OperationKindChoices.KIND_DELETE).count() == 2

    now = dt.datetime(2030, 1, 7, 12, 0, tzinfo=dt.UTC)
    assert autostop.run_once(now) == []  # one server is left: the class stays
    first = customer.vservers.first()
    assert first is not None
    IPAddress.objects.filter(vserver=first).delete()
    first.delete()  # as the agent's delete does when it has finished
    assert autostop.run_once(now) == []
    assert Customer.objects.filter(slug="cs101").exists()

    last = customer.vservers.get()
    IPAddress.objects.filter(vserver=last).delete()
    last.delete()
    outcomes = autostop.run_once(now)
    assert [(o.vserver, o.action) for o in outcomes] == [("cs101", "class-removed")]
    assert not Customer.objects.filter(slug="cs101").exists()
    assert Customer.objects.filter(slug="cs202").exists()  # the other class is left alone
    row = AuditLog.objects.get(action="class-removed")
    assert (row.actor_name, row.target_repr, row.detail["at"]) == (
        "system", "Systems 101", now.isoformat())
