"""Fixtures of the classroom tests (tests/classroom/).

Each section belongs to the tests named in its heading; add yours in a section
of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from panel.classroom import actions
from panel.classroom.models import ClassGroup, Classroom, TeachingAssistant
from panel.guests import actions as gactions
from panel.guests.actions import Actor
from panel.hosting.choices import IPFamilyChoices, RoleChoices
from panel.hosting.models import Customer, Host, IPPool, Membership
from tests.panel.factories import make_plan, make_user

# =====================================================================================
# Roster and scoping tests (test_roster.py, test_scoping.py): a class cs101 with a
# teacher, a TA of group lab-a, and a second class cs202 with its own teacher.
# Servers are rows in the database; no agent runs (operations start on commit,
# which plain `db` tests never reach).
# =====================================================================================


@dataclass
class School:
    cs101: Classroom
    cs202: Classroom
    users: dict[str, Any]
    host: Host

    def actor(self, who: str) -> Actor:
        return Actor(self.users[who])


def roster_csv(*rows: tuple[str, ...], header: str = "username,full name,email,group,ssh key"
               ) -> bytes:
    lines = [header] if header else []
    lines += [",".join(f'"{c}"' if "," in c else c for c in r) for r in rows]
    return ("\n".join(lines) + "\n").encode()


def add_students(school: School, classroom: Classroom, *names: str,
                 group: str = "") -> list[actions.Credential]:
    data = roster_csv(*[(n, f"Student {n}", f"{n}@school.example", group) for n in names])
    preview, made = actions.apply_roster(classroom, data, actor=school.actor("staff"))
    assert not [r.errors for r in preview.rows if r.errors]
    return made


@pytest.fixture
def school(db: None, monkeypatch: pytest.MonkeyPatch) -> School:
    monkeypatch.setattr(gactions, "_dispatch", lambda op_id: None)
    plan = make_plan("class-plan", max_vservers=600, max_ipv4=600, memory_mb=600 * 256,
                     cpu_cores=Decimal(300), disk_gb=600, processes=256)
    users = {"staff": make_user("root-staff", staff=True), "teacher": make_user("tina"),
             "ta": make_user("tom"), "teacher2": make_user("theo"), "outsider": make_user("olga")}
    host = Host.objects.create(name="node1", agent_socket="/nonexistent/agent.sock",
                               memory_mb=1_000_000, cpu_cores=Decimal(512), disk_gb=100_000,
                               max_vservers=2000)
    IPPool.objects.create(name="lab", family=IPFamilyChoices.FAMILY_4, network="198.18.64.0/22",
                          first="198.18.64.10", last="198.18.67.250")
    staff = Actor(users["staff"])
    cs101 = actions.create_class(actor=staff, name="Systems 101", slug="cs101", plan=plan,
                                 template="debian", teacher=users["teacher"])
    cs202 = actions.create_class(actor=staff, name="Networks 202", slug="cs202", plan=plan,
                                 template="debian", teacher=users["teacher2"])
    m = Membership.objects.create(user=users["ta"], customer=cs101.customer,
                                  role=RoleChoices.ROLE_TA)
    lab_a = ClassGroup.objects.create(classroom=cs101, name="lab-a")
    TeachingAssistant.objects.create(membership=m, group=lab_a)
    Customer.objects.create(name="Hosting", slug="hosting", plan=plan)
    return School(cs101=cs101, cs202=cs202, users=users, host=host)

# ======================== end of the roster and scoping section ========================
