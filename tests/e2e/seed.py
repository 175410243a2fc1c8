"""The browser test's world, made in its own database by `python -m tests.e2e.seed`.

Run with the environment of the test's Daphne (VPANEL_VAR_DIR: a fresh
SQLite, already migrated). Arguments: the agent's socket, the LAN's subnet
prefix (198.18.N) and the uplink the guest's address is announced on.
Makes a customer user with a password, a plan, a host on that agent, a pool
on the LAN and a running busybox vserver "web", created through
panel.guests.actions with the agent's work run inline, whose shutdown takes a
few seconds (a runlevel-0 script that sleeps, as real services take a moment
to stop): a page loaded just after a restart is asked for is then loaded
while the restart is under way, the state in which the panel once reloaded
its pages every 5 seconds, and the test checks that none does. Prints a
JSON line {"username", "password", "vserver"}.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal

# Run by the guest's `/etc/init.d/rc 0` at every stop (and restart), before its services stop.
# Longer than the 5 seconds after which the panel's pages once reloaded themselves: a page
# loaded as a restart begins would have reloaded before the restart ended.
SLOW_SHUTDOWN = ("mkdir -p /etc/rc0.d && printf '#!/bin/sh\\nsleep %s\\n' 6 "
                 "> /etc/rc0.d/K00slow && chmod 755 /etc/rc0.d/K00slow")


def main(socket: str, prefix: str, uplink: str) -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from hostagent.client import AgentClient
    from panel.guests import actions
    from panel.guests.choices import VServerStatusChoices
    from panel.hosting.choices import IPFamilyChoices, RoleChoices
    from panel.hosting.models import Customer, Host, IPPool, Membership, Plan

    settings.VPANEL_OPERATIONS_INLINE = True
    password = actions.generate_password(20)
    user = get_user_model().objects.create_user("carol", password=password)
    plan = Plan.objects.create(name="Browser", max_vservers=3, max_ipv4=3, memory_mb=2048,
                               cpu_cores=Decimal(2), disk_gb=10, console_allowed=True)
    customer = Customer.objects.create(name="Browser Hosting", slug="browser", plan=plan)
    Membership.objects.create(user=user, customer=customer, role=RoleChoices.ROLE_OWNER)
    host = Host.objects.create(name="lanhost", agent_socket=socket, iprootdev=uplink,
                               memory_mb=8192, cpu_cores=Decimal(8))
    IPPool.objects.create(name="lan-v4", host=host, family=IPFamilyChoices.FAMILY_4,
                          network=f"{prefix}.0/24", first=f"{prefix}.10", last=f"{prefix}.20")
    vs, _op = actions.create_vserver(customer, actor=actions.Actor(user), name="web",
                                     hostname="web.browser.test")
    vs.refresh_from_db()
    if vs.status != VServerStatusChoices.STATUS_RUNNING:
        sys.exit(f"web is {vs.status}: {vs.status_message}")
    with AgentClient(socket) as agent:
        done = agent.run(agent.exec("web", ["/bin/sh", "-c", SLOW_SHUTDOWN]))
    if done.get("exit_code") != 0:
        sys.exit(f"web's slow shutdown script: {done.get('output')}")
    print(json.dumps({"username": user.username, "password": password, "vserver": vs.pk}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
