"""The classroom's pages: roster upload → preview → apply → credentials once,
per-student new passwords, the settings, TAs, bulk actions and the end of term's
confirm, through the browser's forms (Django's test client)."""

from __future__ import annotations

import csv
import io

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from panel.classroom.models import Classroom, Seat, TeachingAssistant
from panel.guests.models import Operation, VServer
from panel.hosting.models import AuditLog, Customer
from tests.classroom.conftest import School, add_students, roster_csv


def _client(school: School, who: str) -> Client:
    c = Client()
    c.force_login(school.users[who])
    return c


def _upload(c: Client, data: bytes) -> bytes:
    r = c.post(reverse("class_roster", args=["cs101"]),
               {"file": SimpleUploadedFile("roster.csv", data, "text/csv")})
    assert r.status_code == 200, r.content[:300]
    return r.content


def test_upload_preview_apply_and_credentials_shown_once(school: School) -> None:
    c = _client(school, "teacher")
    page = _upload(c, roster_csv(("ann", "Zoë Ann", "ann@school.example", "lab-a"),
                                 ("bad name", "X", "x@school.example")))
    assert b"Zo\xc3\xab Ann" in page and b"username: 1 to 32" in page
    assert not Seat.objects.exists()  # the preview made nothing
    r = c.post(reverse("class_roster", args=["cs101"]), {"step": "apply"})
    assert r.status_code == 302 and r["Location"] == reverse("class_credentials", args=["cs101"])
    seat = Seat.objects.get(user__username="ann")
    creds = c.get(reverse("class_credentials", args=["cs101"]))
    assert b"ann" in creds.content and creds["Cache-Control"].startswith("max-age=0")
    rows = list(csv.reader(io.StringIO(c.get(reverse("class_credentials", args=["cs101"]),
                                             {"format": "csv"}).content.decode())))
    assert rows[0][0] == "username" and rows[1][0] == "ann" and rows[1][3] == seat.vserver.name
    panel_pw, root_pw = rows[1][4], rows[1][5]
    assert len(panel_pw) == 16 and len(root_pw) == 16
    assert panel_pw not in seat.root_password_hash and root_pw not in str(
        Operation.objects.values_list("result", flat=True))
    # The student logs in with it (and it is re-hashed with the default then).
    student = Client()
    r = student.post(reverse("login"), {"username": "ann", "password": panel_pw})
    assert r.status_code == 302, r.content[:300]
    seat.user.refresh_from_db()
    assert seat.user.password.startswith("pbkdf2_sha256$")
    # Done: gone from the panel.
    c.post(reverse("class_credentials", args=["cs101"]))
    assert panel_pw.encode() not in c.get(reverse("class_credentials", args=["cs101"])).content


def test_a_stale_apply_without_a_preview_changes_nothing(school: School) -> None:
    r = _client(school, "teacher").post(reverse("class_roster", args=["cs101"]),
                                        {"step": "apply"})
    assert r.status_code == 302 and not Seat.objects.exists()


def test_new_passwords_for_one_student(school: School) -> None:
    add_students(school, school.cs101, "ann")
    c = _client(school, "teacher")
    old = Seat.objects.get(user__username="ann").root_password_hash
    r = c.post(reverse("seat_credentials", args=["cs101", "ann"]),
               {"which": ["panel", "root"]})
    assert r.status_code == 302
    assert Seat.objects.get(user__username="ann").root_password_hash != old
    assert b"ann" in c.get(reverse("class_credentials", args=["cs101"])).content
    # Not for a student of another class, nor by another class's teacher.
    assert _client(school, "teacher2").post(
        reverse("seat_credentials", args=["cs101", "ann"])).status_code == 404


def test_a_student_resets_their_own_root_password_and_sees_it_once(school: School) -> None:
    add_students(school, school.cs101, "ann")
    seat = Seat.objects.select_related("user").get(user__username="ann")
    c = Client()
    c.force_login(seat.user)
    r = c.post(reverse("student_home"), {"do": "credentials"})
    assert r.status_code == 200 and b"root-password" in r.content
    assert r["Cache-Control"].startswith("max-age=0")
    assert Seat.objects.get(pk=seat.pk).root_password_hash != seat.root_password_hash


def test_the_settings_refuse_a_template_or_limits_the_plan_does_not_give(school: School) -> None:
    plan = school.cs101.customer.plan
    assert plan is not None
    plan.templates = ["debian"]
    plan.save()
    c = _client(school, "teacher")
    data = {"template": "other", "seat_memory_mb": 10 ** 7, "seat_cpu_cores": "0.5",
            "seat_processes": 128, "seat_disk_gb": 1, "seat_ipv4": 1,
            "hours": "mon-fri 8-18", "idle_minutes": 0, "idle_cpu_percent": 2,
            "idle_warning_minutes": 5}
    r = c.post(reverse("class_settings", args=["cs101"]), data)
    assert r.status_code == 400
    for text in (b"the plan offers debian", b"MiB of memory in all", b"DAYS HH:MM-HH:MM"):
        assert text in r.content
    data.update(template="debian", seat_memory_mb=512, hours="mon-fri 08:00-18:00")
    assert c.post(reverse("class_settings", args=["cs101"]), data).status_code == 302
    assert Classroom.objects.get(pk=school.cs101.pk).seat_memory_mb == 512


def test_the_teacher_names_a_ta_for_groups_and_removes_them(school: School) -> None:
    add_students(school, school.cs101, "ann", group="lab-b")
    lab_b = school.cs101.groups.get(name="lab-b")
    c = _client(school, "teacher")
    r = c.post(reverse("class_assistants", args=["cs101"]),
               {"username": "olga", "groups": [lab_b.pk]})
    assert r.status_code == 302
    assert TeachingAssistant.objects.filter(membership__user__username="olga",
                                            group=lab_b).exists()
    assert set(VServer.objects.visible_to(school.users["outsider"])
               .values_list("name", flat=True)) == {"cs101-ann"}
    # A student cannot be made a TA.
    r = c.post(reverse("class_assistants", args=["cs101"]), {"username": "ann"})
    assert r.status_code == 400 and b"is a student" in r.content
    c.post(reverse("class_assistants", args=["cs101"]), {"remove": "olga"})
    assert not VServer.objects.visible_to(school.users["outsider"]).exists()


def test_bulk_start_acts_on_each_selected_server(school: School) -> None:
    add_students(school, school.cs101, "ann", "ben")
    VServer.objects.update(status="stopped")
    seats = list(Seat.objects.filter(classroom=school.cs101))
    c = _client(school, "teacher")
    r = c.post(reverse("class_bulk", args=["cs101"]),
               {"action": "start", "seats": [s.pk for s in seats]})
    assert r.status_code == 302
    assert set(VServer.objects.values_list("status", flat=True)) == {"starting"}
    # A reset needs the confirm word; a TA cannot select outside their groups.
    r = c.post(reverse("class_bulk", args=["cs101"]),
               {"action": "reset", "seats": [seats[0].pk], "confirm": "no"})
    assert Operation.objects.filter(kind="reset").count() == 0


def test_the_end_of_term_needs_the_class_s_short_name(school: School) -> None:
    add_students(school, school.cs101, "ann")
    c = _client(school, "teacher")
    r = c.post(reverse("class_delete", args=["cs101"]), {"confirm": "yes"})
    assert r.status_code == 400
    assert Customer.objects.get(slug="cs101").is_active
    r = c.post(reverse("class_delete", args=["cs101"]), {"confirm": "cs101"})
    assert r.status_code == 302
    assert not Customer.objects.get(slug="cs101").is_active
    assert not Seat.objects.exists() and VServer.objects.get().status == "deleting"
    assert AuditLog.objects.filter(action="delete-class").exists()


def test_the_classes_menu_and_a_students_landing_page(school: School) -> None:
    add_students(school, school.cs101, "ann")
    ann = Client()
    ann.force_login(Seat.objects.get(user__username="ann").user)
    assert ann.get("/")["Location"] == reverse("student_home")
    assert ann.get(reverse("dashboard"))["Location"] == reverse("student_home")
    assert b"My server" in ann.get(reverse("student_home")).content
    tina = _client(school, "teacher").get(reverse("class_list")).content
    assert b"Systems 101" in tina and b"Networks 202" not in tina
