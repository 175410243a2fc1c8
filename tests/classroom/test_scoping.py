"""Who sees and acts on which student's server: through the pages, the API and
the websockets. A student: their own only; a TA: their groups'; a teacher: all
of their class and nothing of another class. Another's server answers exactly
like a missing one (404, or the websocket's not-found close)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from panel.classroom.models import Seat
from panel.guests import actions as gactions
from panel.guests import consumers
from panel.guests.models import Operation, VServer
from panel.hosting.models import AuditLog
from tests.classroom.conftest import School, add_students
from tests.panel.live.helpers import closed_with, communicator, connect, run, session_cookie


def _seat(username: str) -> Seat:
    return Seat.objects.select_related("vserver", "user").get(user__username=username)


@pytest.fixture
def klass(school: School) -> School:
    add_students(school, school.cs101, "ann", "ben", group="lab-a")
    add_students(school, school.cs101, "cat", group="lab-b")
    add_students(school, school.cs202, "dan")
    for name in ("ann", "ben", "cat", "dan"):
        school.users[name] = _seat(name).user
    VServer.objects.update(status="stopped")
    return school


def _page_client(user: Any) -> Client:
    c = Client()
    c.force_login(user)
    return c


def _api_client(user: Any) -> APIClient:
    c = APIClient()
    c.force_authenticate(user)
    return c


def _visible_names(user: Any) -> set[str]:
    return set(VServer.objects.visible_to(user).values_list("name", flat=True))


def test_a_student_sees_their_own_server_only(klass: School) -> None:
    assert _visible_names(klass.users["ann"]) == {"cs101-ann"}
    assert _visible_names(klass.users["dan"]) == {"cs202-dan"}


def test_a_ta_sees_the_servers_of_their_groups_only(klass: School) -> None:
    assert _visible_names(klass.users["ta"]) == {"cs101-ann", "cs101-ben"}


def test_a_teacher_sees_all_of_their_class_and_nothing_of_another(klass: School) -> None:
    assert _visible_names(klass.users["teacher"]) == {"cs101-ann", "cs101-ben", "cs101-cat"}
    assert _visible_names(klass.users["teacher2"]) == {"cs202-dan"}


def test_students_cannot_open_each_others_server_pages(klass: School) -> None:
    ann = _page_client(klass.users["ann"])
    ben_vs = _seat("ben").vserver
    mine = _seat("ann").vserver
    assert ben_vs is not None and mine is not None
    assert ann.get(reverse("vserver_detail", args=[mine.pk])).status_code == 200
    for name in ("vserver_detail", "vserver_console"):
        assert ann.get(reverse(name, args=[ben_vs.pk])).status_code == 404
    for name in ("vserver_start", "vserver_stop", "vserver_restart"):
        assert ann.post(reverse(name, args=[ben_vs.pk])).status_code == 404
    r = ann.get(reverse("vserver_list"))
    assert b"cs101-ann" in r.content and b"cs101-ben" not in r.content
    home = ann.get(reverse("student_home"))
    assert b"cs101-ann" in home.content and b"cs101-ben" not in home.content
    # The class's pages are the teacher's and the TA's.
    assert ann.get(reverse("class_detail", args=["cs101"])).status_code == 404
    assert ann.get(reverse("class_roster", args=["cs101"])).status_code == 404


def test_students_cannot_list_or_act_on_each_others_servers_through_the_api(
        klass: School) -> None:
    ann = _api_client(klass.users["ann"])
    ben_vs = _seat("ben").vserver
    assert ben_vs is not None
    ids = [v["name"] for v in ann.get(reverse("vserver-list")).json()["results"]]
    assert ids == ["cs101-ann"]
    assert ann.get(reverse("vserver-detail", args=[ben_vs.pk])).status_code == 404
    before = Operation.objects.count()
    for verb in ("start", "stop", "restart"):
        assert ann.post(reverse(f"vserver-{verb}", args=[ben_vs.pk])).status_code == 404
    assert Operation.objects.count() == before
    # Nor see who else is in the class, or what the others did.
    members = ann.get(reverse("membership-list")).json()["results"]
    assert {m["user"] for m in members} <= {"ann", klass.users["ann"].pk}
    assert not AuditLog.objects.visible_to(klass.users["ann"]).exclude(
        actor=klass.users["ann"]).exists()


def test_a_student_starts_their_own_server(klass: School) -> None:
    mine = _seat("ann").vserver
    assert mine is not None
    r = _api_client(klass.users["ann"]).post(reverse("vserver-start", args=[mine.pk]))
    assert r.status_code in (200, 201, 202), r.content


def test_a_student_may_not_create_resize_or_delete(klass: School) -> None:
    mine = _seat("ann").vserver
    assert mine is not None
    actor = klass.actor("ann")
    with pytest.raises(gactions.Denied):
        gactions.delete_vserver(mine, actor=actor, confirm=mine.name)
    with pytest.raises(gactions.Denied):
        gactions.set_limits(mine, actor=actor, memory_mb=64)
    with pytest.raises(gactions.Denied):
        gactions.create_vserver(klass.cs101.customer, actor=actor, name="extra")
    assert AuditLog.objects.filter(actor=klass.users["ann"], result="denied").count() == 3


def test_a_ta_acts_on_their_groups_servers_and_is_denied_the_others(klass: School) -> None:
    actor = klass.actor("ta")
    ben, cat = _seat("ben").vserver, _seat("cat").vserver
    assert ben is not None and cat is not None
    gactions.start_vserver(ben, actor=actor)
    with pytest.raises(gactions.Denied):
        gactions.start_vserver(cat, actor=actor)
    ta = _page_client(klass.users["ta"])
    page = ta.get(reverse("class_detail", args=["cs101"])).content
    assert b"cs101-ann" in page and b"cs101-ben" in page and b"cs101-cat" not in page
    assert ta.get(reverse("class_roster", args=["cs101"])).status_code == 404  # teacher's
    assert ta.get(reverse("class_detail", args=["cs202"])).status_code == 404


def test_a_teacher_cannot_reach_another_class(klass: School) -> None:
    tina = _page_client(klass.users["teacher"])
    dan = _seat("dan").vserver
    assert dan is not None
    assert tina.get(reverse("class_detail", args=["cs202"])).status_code == 404
    assert tina.get(reverse("vserver_detail", args=[dan.pk])).status_code == 404
    with pytest.raises(gactions.Denied):
        gactions.stop_vserver(dan, actor=klass.actor("teacher"))


@pytest.mark.django_db(transaction=True)
def test_students_cannot_watch_each_others_servers_over_websockets(
        school: School, settings: Any) -> None:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    add_students(school, school.cs101, "ann", "ben")
    ann, ben = _seat("ann"), _seat("ben")
    assert ann.vserver is not None and ben.vserver is not None
    cookie = session_cookie(ann.user)
    mine_path, theirs_path = f"/ws/vservers/{ann.vserver.pk}/", f"/ws/vservers/{ben.vserver.pk}/"

    async def go() -> None:
        comm, hello = await connect(mine_path, cookie)
        assert hello["type"] in ("state", "hello", "snapshot") or hello
        await comm.disconnect()
        code, _ = await closed_with(communicator(theirs_path, cookie))
        assert code == consumers.CLOSE_MISSING

    run(go)
