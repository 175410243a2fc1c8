"""Which actions a user may take on a vserver now, and if not, why: for the pages.

A disabled action stays on the page, greyed, with its reason in words
("your role (member) may not delete", "busy: starting", "not running"), so
this computes both. It follows the rules panel/guests/actions.py enforces
(roles, busy states, a running vserver for the password) and adds the ones
that only make sense on a page (no Start for what already runs); the actions
remain the authority and check again whatever is posted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from panel.guests.actions import role
from panel.guests.choices import VServerStatusChoices
from panel.guests.models import VServer
from panel.hosting.choices import MANAGING_ROLES

__all__ = ["ACTIONS", "Availability", "vserver_actions"]

_S = VServerStatusChoices


@dataclass(frozen=True)
class Availability:
    enabled: bool
    reason: str = ""


@dataclass(frozen=True)
class _Rule:
    verb: str  # as in "your role (member) may not VERB"
    managing: bool  # owners and admins only (actions.py: _require(..., managing=True))
    idle: bool  # refused while an operation runs (actions.py: _require_idle)
    needs: frozenset[str] | None = None  # the statuses in which it makes sense
    needs_reason: str = ""


# Every action of the vserver page, in the order its buttons appear.
ACTIONS: dict[str, _Rule] = {
    "start": _Rule("start", False, True,
                   frozenset({_S.STATUS_STOPPED, _S.STATUS_ERROR, _S.STATUS_UNKNOWN}),
                   "already running"),
    "stop": _Rule("stop", False, True,
                  frozenset({_S.STATUS_RUNNING, _S.STATUS_ERROR, _S.STATUS_UNKNOWN}),
                  "not running"),
    "restart": _Rule("restart", False, True, frozenset({_S.STATUS_RUNNING}), "not running"),
    "reset_password": _Rule("reset the root password", True, True,
                            frozenset({_S.STATUS_RUNNING}), "not running"),
    "reinstall": _Rule("reinstall", True, True),
    "delete": _Rule("delete", True, True),
    "hostname": _Rule("change the hostname", True, False),
    "limits": _Rule("change the limits", True, False),
    "ssh_keys": _Rule("change SSH keys", True, False),
}


def vserver_actions(vs: VServer, user: Any) -> dict[str, Availability]:
    """Each action of ACTIONS for USER on VS: enabled, or disabled with the reason."""
    r = role(user, vs.customer)
    out: dict[str, Availability] = {}
    for name, rule in ACTIONS.items():
        if r is None:
            why = "you are not a member of this vserver's customer"
        elif rule.managing and r not in MANAGING_ROLES:
            why = f"your role ({r}) may not {rule.verb}"
        elif rule.idle and vs.busy:
            why = f"busy: {vs.get_status_display().lower()}"
        elif rule.needs is not None and vs.status not in rule.needs:
            why = rule.needs_reason
        else:
            out[name] = Availability(True)
            continue
        out[name] = Availability(False, why)
    return out
