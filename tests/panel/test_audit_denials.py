"""A refused action is recorded in the audit log, not rolled back with the action."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from panel.guests import actions
from panel.guests.models import VServer
from panel.hosting import actions as hosting_actions
from panel.hosting.choices import AuditResultChoices
from panel.hosting.models import AuditLog, Membership
from tests.panel.factories import World


def test_a_members_refused_delete_is_audited_as_denied(
        world: World, vserver_of: Callable[..., VServer]) -> None:
    vs = vserver_of(name="keep")
    actor = actions.Actor(world.user("member"), "198.18.0.9")
    with pytest.raises(actions.Denied):
        actions.delete_vserver(vs, actor=actor, confirm="keep")
    row = AuditLog.objects.get(action="delete-vserver")
    assert (row.result, row.actor, row.customer, row.source_ip, row.target_id) == (
        AuditResultChoices.RESULT_DENIED, world.user("member"), world.customer, "198.18.0.9",
        str(vs.pk))
    assert VServer.objects.filter(pk=vs.pk).exists()


def test_an_outsiders_refused_membership_change_is_audited_as_denied(world: World) -> None:
    m = Membership.objects.get(customer=world.customer, user=world.user("member"))
    with pytest.raises(actions.Denied):
        hosting_actions.remove_member(m, actor=actions.Actor(world.user("admin")))
    assert AuditLog.objects.filter(result=AuditResultChoices.RESULT_DENIED).count() == 1
    assert Membership.objects.filter(pk=m.pk).exists()
