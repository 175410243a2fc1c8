"""The classroom browser test's world, made by `python -m tests.e2e.classroom_seed`.

Run as tests/e2e/seed.py is (the test's Daphne's environment, a migrated
database of its own; arguments: the agent's socket, the LAN's prefix 198.18.N,
the uplink), with the template `bbt` already on the agent's roots. Makes a
class `lab1` (teacher tina, with a password) on a host on that agent, and its
students ann and ben from a roster, their servers built from the template
through panel/classroom/actions with the agent's work run inline, running,
and last used (Seat.last_activity) 5 minutes ago.
Ann's server takes a few seconds to shut down (seed.SLOW_SHUTDOWN), so that
the grid's "Stopping" lasts long enough to be seen whatever the machine's
load. Prints a JSON line {"teacher": [name, password], "students": {name:
[password, seat id, vserver id]}, "slug"}.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from decimal import Decimal

from tests.e2e.seed import SLOW_SHUTDOWN

TEMPLATE = "bbt"
LAST_USED = dt.timedelta(minutes=5)


def main(socket: str, prefix: str, uplink: str) -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from hostagent.client import AgentClient
    from panel.classroom import actions
    from panel.classroom.models import Seat
    from panel.guests import actions as gactions
    from panel.guests.choices import VServerStatusChoices
    from panel.hosting.choices import IPFamilyChoices
    from panel.hosting.models import Host, IPPool, Plan

    settings.VPANEL_OPERATIONS_INLINE = True
    User = get_user_model()
    staff = User.objects.create_user("root-staff", password=None, is_staff=True)
    password = gactions.generate_password(20)
    teacher = User.objects.create_user("tina", password=password)
    host = Host.objects.create(name="lanhost", agent_socket=socket, iprootdev=uplink,
                               memory_mb=8192, cpu_cores=Decimal(8))
    IPPool.objects.create(name="lan-v4", host=host, family=IPFamilyChoices.FAMILY_4,
                          network=f"{prefix}.0/24", first=f"{prefix}.10", last=f"{prefix}.20")
    plan = Plan.objects.create(name="Lab", max_vservers=5, max_ipv4=5, memory_mb=4096,
                               cpu_cores=Decimal(4), disk_gb=20, templates=[TEMPLATE],
                               console_allowed=True)
    classroom = actions.create_class(
        actor=gactions.Actor(staff), name="Lab 1", slug="lab1", plan=plan, template=TEMPLATE,
        teacher=teacher, seat_memory_mb=128, seat_cpu_cores=Decimal("0.5"))
    data = (b"username,full name,email,group\n"
            b"ann,Ann Lee,ann@school.example,lab-a\n"
            b"ben,Ben Ode,ben@school.example,lab-b\n")
    preview, made = actions.apply_roster(classroom, data, actor=gactions.Actor(teacher))
    if [r.errors for r in preview.rows] != [[], []] or len(made) != 2:
        sys.exit(f"the roster: {[r.errors for r in preview.rows]}, {len(made)} made")
    students = {}
    for cred in made:
        seat = Seat.objects.select_related("vserver").get(user__username=cred.username)
        vs = seat.vserver
        if vs is None or vs.status != VServerStatusChoices.STATUS_RUNNING:
            sys.exit(f"{cred.username}'s server is {vs and vs.status}: {vs and vs.status_message}")
        students[cred.username] = [cred.panel_password, seat.pk, vs.pk]
        # As the auto-stop's pass leaves it (panel/classroom/autostop.py): last used then.
        Seat.objects.filter(pk=seat.pk).update(last_activity=timezone.now() - LAST_USED)
        if cred.username == "ann":
            with AgentClient(socket) as agent:
                done = agent.run(agent.exec(vs.name, ["/bin/sh", "-c", SLOW_SHUTDOWN]))
            if done.get("exit_code") != 0:
                sys.exit(f"ann's slow shutdown script: {done.get('output')}")
    print(json.dumps({"teacher": [teacher.username, password], "students": students,
                      "slug": classroom.customer.slug}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
