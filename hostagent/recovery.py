"""What the agent does before it serves: finish or undo what a dead agent left.

Each journal entry is an operation that an earlier agent began and never
ended (it was killed, or the host lost power). The rule per kind:

  build              rolled back: a guest without NAME.conf was never built
  start, restart     rolled back: the guest ends stopped, with nothing of the
                     half-start left (processes, cgroups, veth, proxy entries)
  stop               completed: the guest is killed and cleaned up
  delete             completed
  template-create    rolled back (hostagent.templates removes its staging)
  reset              completed: the guest's own layer is emptied but for the
                     paths it was to keep (doing it again is harmless)
  exec, set          nothing to do (an exec's command may still run; a
                     NAME.conf write is atomic)

and, journaled or not, a change of IDMAP whose shift of a guest's files was
cut short (its bases are beside NAME.conf) is finished: the shift is
idempotent, and the guest cannot start until it is done.

A start is rolled back rather than completed because the start is what may
have killed the agent: doing it again at every agent start could loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hostagent import guest, idmap, templates, wire
from hostagent.names import InvalidName, check_name
from hostagent.operations import Journal
from hostagent.paths import Paths

__all__ = ["Recovered", "recover"]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovered:
    kind: str
    guest: str | None
    outcome: str  # what was done
    error: str | None = None


def recover(paths: Paths, journal: Journal) -> list[Recovered]:
    out = []
    for entry in journal.entries():
        out.append(_recover_one(paths, entry))
        journal.finish(str(entry["id"]))
    for name in paths.guest_names():
        shift = idmap.pending_shift(paths, name)
        if shift is not None:
            try:
                guest.set_key(paths, name, "IDMAP", shift.mode)
                out.append(Recovered("set", name, f"completed: IDMAP={shift.mode}"))
            except guest.GuestError as e:
                out.append(Recovered("set", name, "failed", str(e)))
    for r in out:
        log = _LOG.error if r.error else _LOG.warning
        log("recovery: %s of %s interrupted by an agent stop: %s%s", r.kind, r.guest,
            r.outcome, f" ({r.error})" if r.error else "")
    return out


def _recover_one(paths: Paths, entry: dict[str, Any]) -> Recovered:
    kind = str(entry.get("kind"))
    try:
        name = check_name(entry.get("guest"))
    except InvalidName:
        return Recovered(kind, None, "ignored: the entry names no valid guest")
    try:
        if kind == "build":
            done = guest.rollback_build(paths, name)
            return Recovered(kind, name, "rolled back" if done else "had finished")
        if kind in ("start", "restart"):
            guest.rollback_start(paths, name)
            return Recovered(kind, name, "rolled back: the guest is stopped")
        if kind == "stop":
            guest.stop(paths, name, timeout=0)
            return Recovered(kind, name, "completed: the guest is stopped")
        if kind == "delete":
            if paths.conf(name).exists() or paths.root(name).exists():
                guest.delete(paths, name)
            return Recovered(kind, name, "completed: the guest is deleted")
        if kind == "reset":
            keep = entry.get("args", {}).get("keep", [])
            guest.reset(paths, name, wire.ResetRequest.from_json({"keep": keep}).keep)
            return Recovered(kind, name, "completed: the guest is reset to its template")
        if kind == "template-create":
            templates.rollback_create(paths, name)
            return Recovered(kind, name, "rolled back")
        return Recovered(kind, name, "nothing to do")
    except (guest.GuestError, templates.TemplateError, wire.WireError, OSError) as e:
        return Recovered(kind, name, "failed", str(e))
