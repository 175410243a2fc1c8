"""Roster import (panel/classroom/roster.py, actions.apply_roster): every row
checked before anything is made, idempotent applies, and removals only on a
confirm."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from panel.classroom import actions, roster
from panel.classroom.models import Seat
from panel.guests.actions import ActionError
from panel.guests.models import Operation, VServer
from tests.classroom.conftest import School, add_students, roster_csv

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1hZGUtdXAta2V5LWZvci10ZXN0cy1vbmx5LTEy "
       "ann@laptop")


def _errors(preview: roster.Preview) -> dict[str, list[str]]:
    return {r.username: r.errors for r in preview.rows if r.errors}


def test_a_preview_shows_every_row_and_creates_nothing(school: School) -> None:
    data = roster_csv(("ann", "Ann Lee", "ann@school.example", "lab-a", KEY),
                      ("ben", "Ben Ode", "ben@school.example", "", ""))
    p = roster.preview(school.cs101, data)
    assert [(r.username, r.action, r.errors) for r in p.rows] == [
        ("ann", "add", []), ("ben", "add", [])]
    assert not Seat.objects.exists() and not VServer.objects.exists()
    assert not get_user_model().objects.filter(username__in=["ann", "ben"]).exists()


def test_duplicates_are_errors_that_name_the_first_line(school: School) -> None:
    data = roster_csv(("ann", "Ann", "ann@school.example"), ("ann", "Ann Two", "a2@school.example"),
                      ("bob", "Bob", "ANN@school.example"))
    errors = {r.line: r.errors for r in roster.preview(school.cs101, data).rows}
    assert errors[2] == []
    assert errors[3] == ["username: a duplicate of line 2"]
    assert errors[4] == ["email: a duplicate of line 2"]


@pytest.mark.parametrize("email", ["nobody", "a@", "@b.example", "a b@c.example", "a@b@c.example"])
def test_bad_emails_are_refused(school: School, email: str) -> None:
    p = roster.preview(school.cs101, roster_csv(("ann", "Ann", email)))
    assert any(e.startswith("email:") for e in _errors(p)["ann"])


@pytest.mark.parametrize("username", ["Ann", "1ann", "-ann", "an n", "ann.lee", "zoë",
                                      "x" * 33, "", "../etc", "ann;rm"])
def test_names_that_are_not_valid_logins_are_refused(school: School, username: str) -> None:
    p = roster.preview(school.cs101, roster_csv((username, "Ann", "ann@school.example")))
    assert any(e.startswith("username:") for e in p.rows[0].errors)


def test_unicode_full_names_are_kept_as_written(school: School) -> None:
    names = ["Zoë Ångström", "李雷", "Søren Kierkegård", "Nguyễn Thị Minh"]
    data = roster_csv(*[(f"s{i}", n, f"s{i}@school.example") for i, n in enumerate(names)])
    _, made = actions.apply_roster(school.cs101, data, actor=school.actor("teacher"))
    assert sorted(c.full_name for c in made) == sorted(names)
    assert sorted(Seat.objects.values_list("full_name", flat=True)) == sorted(names)


def test_a_bad_ssh_key_and_a_bad_group_are_refused(school: School) -> None:
    p = roster.preview(school.cs101, roster_csv(
        ("ann", "Ann", "ann@school.example", "lab/../a", "ssh-rsa not-base64!")))
    errs = p.rows[0].errors
    assert any(e.startswith("group:") for e in errs) and any(e.startswith("ssh key:") for e in errs)


def test_rows_over_the_class_cap_are_errors(school: School) -> None:
    plan = school.cs101.customer.plan
    assert plan is not None
    school.cs101.customer.override_max_vservers = 3
    school.cs101.customer.save()
    add_students(school, school.cs101, "ann")
    data = roster_csv(*[(n, f"Student {n}", f"{n}@school.example")
                        for n in ("ann", "ben", "cat", "dan")])
    p = roster.preview(school.cs101, data)
    assert [r.action for r in p.rows] == ["keep", "add", "add", ""]
    assert p.rows[3].errors == ["over the class cap: the plan allows 3 students"]


def test_a_login_taken_by_another_account_is_refused(school: School) -> None:
    p = roster.preview(school.cs101, roster_csv(("olga", "Olga", "olga@school.example")))
    assert _errors(p)["olga"] == ["username: taken by another account of this panel"]


def test_five_hundred_students_preview_and_apply(school: School) -> None:
    data = roster_csv(*[(f"s{i:03d}", f"Student {i}", f"s{i:03d}@school.example",
                         f"lab-{i % 5}") for i in range(500)])
    p = roster.preview(school.cs101, data)
    assert p.count_add == 500 and p.error_count == 0
    _, made = actions.apply_roster(school.cs101, data, actor=school.actor("teacher"))
    assert len(made) == 500
    assert Seat.objects.filter(classroom=school.cs101).count() == 500
    assert {f"lab-{i}" for i in range(5)} <= set(school.cs101.groups.values_list("name",
                                                                               flat=True))
    assert len({c.root_password for c in made}) == 500  # every server its own password


def test_the_same_roster_twice_creates_nothing_twice(school: School) -> None:
    data = roster_csv(("ann", "Ann", "ann@school.example"), ("ben", "Ben", "ben@school.example"))
    _, first = actions.apply_roster(school.cs101, data, actor=school.actor("teacher"))
    ops = Operation.objects.count()
    p, again = actions.apply_roster(school.cs101, data, actor=school.actor("teacher"))
    assert len(first) == 2 and again == []
    assert [r.action for r in p.rows] == ["keep", "keep"]
    assert Seat.objects.count() == 2 and VServer.objects.count() == 2
    assert Operation.objects.count() == ops


def test_a_changed_roster_adds_updates_and_lists_the_missing_without_removing(
        school: School) -> None:
    add_students(school, school.cs101, "ann", "ben", "cat")
    data = roster_csv(("ann", "Ann Lee", "ann@school.example"),  # full name changed
                      ("ben", "Student ben", "ben@school.example"),
                      ("dan", "Dan", "dan@school.example"))
    p, made = actions.apply_roster(school.cs101, data, actor=school.actor("teacher"))
    assert {r.username: r.action for r in p.rows} == {"ann": "update", "ben": "keep",
                                                     "dan": "add"}
    assert p.rows[0].changes == ["full name"]
    assert p.missing == ["cat"]
    assert [c.username for c in made] == ["dan"]
    assert Seat.objects.get(user__username="ann").full_name == "Ann Lee"
    assert Seat.objects.filter(user__username="cat").exists()  # nobody removed


def test_removing_the_missing_needs_the_confirm_word(school: School) -> None:
    add_students(school, school.cs101, "ann", "cat")
    with pytest.raises(ActionError):
        actions.remove_students(school.cs101, ["cat"], actor=school.actor("teacher"),
                                confirm="yes")
    assert Seat.objects.filter(user__username="cat").exists()
    n = actions.remove_students(school.cs101, ["cat"], actor=school.actor("teacher"),
                                confirm="remove")
    assert n == 1
    assert not get_user_model().objects.filter(username="cat").exists()
    assert VServer.objects.get(name="cs101-cat").status == "deleting"


def test_a_file_without_a_header_and_with_semicolons_is_read(school: School) -> None:
    data = b"ann;Ann Lee;ann@school.example;lab-a\nben;Ben;ben@school.example;\n"
    p = roster.preview(school.cs101, data)
    assert [(r.username, r.full_name, r.group, r.errors) for r in p.rows] == [
        ("ann", "Ann Lee", "lab-a", []), ("ben", "Ben", "", [])]


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff\xfe\x00a", "not UTF-8"),
    (b"username,shoe size\nann,42\n", "unknown column"),
    (b"username,email\nann,a@b.example\n", "no full name column"),
])
def test_an_unreadable_file_is_refused_as_a_whole(school: School, data: bytes,
                                                  message: str) -> None:
    with pytest.raises(roster.RosterError, match=message):
        roster.preview(school.cs101, data)


def test_only_the_teacher_imports_a_roster(school: School) -> None:
    data = roster_csv(("ann", "Ann", "ann@school.example"))
    for who in ("ta", "teacher2", "outsider"):
        with pytest.raises(ActionError):
            actions.apply_roster(school.cs101, data, actor=school.actor(who))
    assert not Seat.objects.exists()


def test_server_names_are_valid_and_unique_for_long_and_clashing_logins(school: School) -> None:
    made = add_students(school, school.cs101, "a" * 32, "a" * 31 + "b", "x_y")
    names = [c.vserver for c in made]
    assert len(set(names)) == 3
    assert all(len(n) <= 31 and n[0].isalpha() for n in names)
    assert "cs101-x-y" in names


def test_a_changed_ssh_key_in_the_roster_replaces_the_servers_key(school: School) -> None:
    other = KEY.replace("ann@laptop", "ann@desktop")
    actions.apply_roster(school.cs101, roster_csv(("ann", "Ann", "ann@school.example", "", KEY)),
                         actor=school.actor("teacher"))
    vs = Seat.objects.get(user__username="ann").vserver
    assert vs is not None
    VServer.objects.filter(pk=vs.pk).update(status="running")
    p, _ = actions.apply_roster(school.cs101,
                                roster_csv(("ann", "Ann", "ann@school.example", "", other)),
                                actor=school.actor("teacher"))
    assert p.rows[0].changes == ["ssh key"]
    assert list(vs.ssh_keys.values_list("key", flat=True)) == [other]
    assert Operation.objects.filter(vserver=vs, kind="ssh-keys").count() == 1
    # Dropped from the roster: gone from the server.
    actions.apply_roster(school.cs101, roster_csv(("ann", "Ann", "ann@school.example")),
                         actor=school.actor("teacher"))
    assert not vs.ssh_keys.exists()
