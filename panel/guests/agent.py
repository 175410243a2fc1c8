"""The panel's side of the agent: run an Operation on its host, keep the vserver's status.

`dispatch(op_id)` is called once the action's transaction has committed. The
work runs in a thread of its own (or inline when VPANEL_OPERATIONS_INLINE is
set, as in tests): it talks to the host's agent through hostagent.client on
the shared wire types, follows the agent's operation to its end, and records
progress, result and the vserver's status as the agent reports them. The
agent is the truth: after every step the status is read back from it.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import httpx
from django.conf import settings
from django.db import close_old_connections
from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone

from hostagent import wire
from hostagent.client import AgentClient, AgentError
from panel.guests.choices import (
    DesiredStateChoices,
    OperationKindChoices,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, VServer
from panel.hosting.models import IPAddress

__all__ = ["dispatch", "hash_password", "refresh_status"]

_LOG = logging.getLogger(__name__)

WAIT = 600.0  # seconds an agent operation may take before the panel gives up on it


def dispatch(op_id: int) -> None:
    if getattr(settings, "VPANEL_OPERATIONS_INLINE", False):
        run(op_id)
        return
    threading.Thread(target=_thread, args=(op_id,), name=f"op-{op_id}", daemon=True).start()


def _thread(op_id: int) -> None:
    close_old_connections()
    try:
        run(op_id)
    finally:
        close_old_connections()


def hash_password(password: str) -> str:
    """SHA-512 crypt, as /etc/shadow wants it (openssl reads it on stdin, not argv)."""
    res = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n",
                         capture_output=True, text=True, check=True, timeout=30)
    return res.stdout.strip()


class _Run:
    def __init__(self, op: Operation, vs: VServer) -> None:
        self.op, self.vs = op, vs
        self.client = AgentClient(vs.host.agent_socket, timeout=30)

    def progress(self, percent: int, message: str) -> None:
        self.op.progress, self.op.message = percent, message[:500]
        # Never lower: the agent event bridge may have moved it on already, and a
        # reinstall's build starts over at the create's first step.
        Operation.objects.filter(pk=self.op.pk).update(
            progress=Greatest(F("progress"), percent), message=message[:500],
            updated=timezone.now())
        _event(self.vs.pk)

    def follow(self, agent_op: wire.Operation, percent: int, message: str) -> dict[str, Any]:
        """Wait for the agent's operation; its result, or AgentError with its error."""
        Operation.objects.filter(pk=self.op.pk).update(agent_operation=agent_op.id)
        self.progress(percent, message)
        done = self.client.wait(agent_op, WAIT)
        if done.state != wire.OP_SUCCESS:
            raise AgentError(500, done.error or f"the agent's operation is {done.state}")
        return done.result or {}


def run(op_id: int) -> None:
    op = Operation.objects.select_related("vserver__host", "vserver__customer").get(pk=op_id)
    vs = op.vserver
    if vs is None:
        return
    Operation.objects.filter(pk=op.pk).update(state=OperationStateChoices.STATE_RUNNING)
    r = _Run(op, vs)
    work: dict[str, Callable[[_Run], dict[str, Any] | None]] = {
        OperationKindChoices.KIND_CREATE: _create,
        OperationKindChoices.KIND_START: lambda r: _state(r, "start"),
        OperationKindChoices.KIND_STOP: lambda r: _state(r, "stop"),
        OperationKindChoices.KIND_RESTART: lambda r: _state(r, "restart"),
        OperationKindChoices.KIND_REINSTALL: _reinstall,
        OperationKindChoices.KIND_RESET: _reset,
        OperationKindChoices.KIND_DELETE: _delete,
        OperationKindChoices.KIND_SET_HOSTNAME: _set_hostname,
        OperationKindChoices.KIND_SET_LIMITS: _set_limits,
        OperationKindChoices.KIND_RESET_PASSWORD: _reset_password,
        OperationKindChoices.KIND_SSH_KEYS: _ssh_keys,
    }
    try:
        result = work[op.kind](r)
        Operation.objects.filter(pk=op.pk).update(
            state=OperationStateChoices.STATE_SUCCESS, progress=100, message="done",
            result=_public(result), updated=timezone.now())
    # httpx.TransportError: the agent's socket is gone or the agent hung up (not an OSError).
    except (AgentError, OSError, ValueError, httpx.HTTPError) as e:
        _LOG.warning("operation %s (%s %s) failed: %s", op.pk, op.kind, vs.name, e)
        Operation.objects.filter(pk=op.pk).update(
            state=OperationStateChoices.STATE_FAILURE, error=str(e)[:5000],
            updated=timezone.now())
    finally:
        r.client.close()
        if op.kind != OperationKindChoices.KIND_DELETE or VServer.objects.filter(
                pk=vs.pk).exists():
            refresh_status(vs)
        _event(vs.pk, vs.customer_id)  # the customer's: a deleted vserver's dashboard is told too


def _public(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """What of a result may be shown (never a password hash)."""
    if result is None:
        return None
    return {k: v for k, v in result.items() if "password" not in k}


def _event(vs_id: int, customer_id: int | None = None) -> None:
    from panel.guests import events

    events.vserver_changed(vs_id, customer_id=customer_id)


def refresh_status(vs: VServer, client: AgentClient | None = None) -> str:
    """Read the vserver's state from its agent into the database; 'unknown' if silent."""
    own = client is None
    c = client or AgentClient(vs.host.agent_socket, timeout=10)
    try:
        info = c.guest(vs.name)
        status, ctx, pid, msg = info.state, info.context, info.init_pid, ""
    except AgentError as e:
        if e.status == 404:
            status, ctx, pid, msg = VServerStatusChoices.STATUS_ERROR, None, None, \
                "the host has no such vserver"
        else:
            status, ctx, pid, msg = VServerStatusChoices.STATUS_UNKNOWN, None, None, str(e)
    except (OSError, httpx.HTTPError) as e:
        status, ctx, pid, msg = VServerStatusChoices.STATUS_UNKNOWN, None, None, \
            f"the host's agent does not answer: {e}"
    finally:
        if own:
            c.close()
    VServer.objects.filter(pk=vs.pk).update(status=status, context_id=ctx, init_pid=pid,
                                            status_message=msg[:500],
                                            status_updated=timezone.now())
    return status


# --- the work of each kind ------------------------------------------------------------------

def _build_request(vs: VServer) -> wire.BuildRequest:
    ips = [a.iproot_token() for a in IPAddress.objects.filter(vserver=vs).select_related("pool")]
    return wire.BuildRequest.from_json({
        "name": vs.name,
        "method": "template" if vs.template else "busybox",
        **({"source": vs.template} if vs.template else {}),
        "hostname": vs.hostname,
        "ips": ips,
        "caps": list(vs.capabilities),
        "flags": list(vs.flags) or ["lock"],
        **({"nice": vs.nice} if vs.nice is not None else {}),
        "onboot": vs.onboot,
        **({"description": vs.description} if vs.description else {}),
        # A private range of host ids: the panel's guests' root is no host root.
        "idmap": "isolated",
    })


def _config_after_build(r: _Run) -> None:
    vs = r.vs
    values = vs.limit_values()
    if vs.host.iprootdev and IPAddress.objects.filter(vserver=vs).exists():
        values["IPROOTDEV"] = vs.host.iprootdev
    r.client.put_config(vs.name, values)


def _create(r: _Run) -> dict[str, Any]:
    r.follow(r.client.build(_build_request(r.vs)), 10, "building")
    _config_after_build(r)
    result: dict[str, Any] = {"built": True}
    if r.vs.desired_state == DesiredStateChoices.DESIRED_RUNNING:
        result.update(r.follow(r.client.state(r.vs.name, "start"), 70, "starting"))
        _credentials(r, str((r.op.result or {}).get("password_hash", "")))
    return result


def _credentials(r: _Run, password_hash: str) -> None:
    """Put a new server's root password and SSH keys in (it runs by now)."""
    if password_hash:
        _exec(r, _SET_ROOT_HASH, password_hash, "setting the root password")
        Operation.objects.filter(pk=r.op.pk).update(result=None)  # keep no copy of the hash
    keys = "".join(k.key.strip() + "\n" for k in r.vs.ssh_keys.all())
    if keys:
        _exec(r, _SET_KEYS, keys, "writing /root/.ssh/authorized_keys")


def _reset(r: _Run) -> dict[str, Any]:
    """Back to the template (keeping the paths the operation names), then up
    again with the same root password and keys if it should run."""
    keep = [str(p) for p in (r.op.result or {}).get("keep", [])]
    r.follow(r.client.state(r.vs.name, "stop", force=True), 10, "stopping")
    r.follow(r.client.reset(r.vs.name, keep=keep), 40, "resetting to the template")
    result: dict[str, Any] = {"reset": True, "keep": keep}
    if r.vs.desired_state == DesiredStateChoices.DESIRED_RUNNING:
        result.update(r.follow(r.client.state(r.vs.name, "start"), 80, "starting"))
        _credentials(r, str((r.op.result or {}).get("password_hash", "")))
    return result


def _state(r: _Run, action: str) -> dict[str, Any]:
    force = bool((r.op.result or {}).get("force"))
    return r.follow(r.client.state(r.vs.name, action, force=force), 20, f"{action}ing")


def _reinstall(r: _Run) -> dict[str, Any]:
    r.follow(r.client.state(r.vs.name, "stop", force=True), 10, "stopping")
    r.follow(r.client.delete(r.vs.name), 30, "removing the old files")
    vs = VServer.objects.select_related("host").get(pk=r.vs.pk)
    r.vs = vs
    return _create(r)


def _delete(r: _Run) -> None:
    try:
        r.follow(r.client.state(r.vs.name, "stop", force=True), 10, "stopping")
        r.follow(r.client.delete(r.vs.name), 50, "deleting")
    except AgentError as e:
        if e.status != 404:
            raise
    IPAddress.objects.filter(vserver=r.vs).delete()
    VServer.objects.filter(pk=r.vs.pk).delete()


def _set_hostname(r: _Run) -> dict[str, Any]:
    _, applied = r.client.put_config(r.vs.name, {"S_HOSTNAME": r.vs.hostname})
    return {"applied": applied, "note": "takes effect at the next restart"}


def _set_limits(r: _Run) -> dict[str, Any]:
    _, applied = r.client.put_config(r.vs.name, r.vs.limit_values())
    return {"applied": applied}


# The new hash goes in as an argument, never through a shell's parsing of it.
_SET_ROOT_HASH = (
    'f=/etc/shadow; [ -f "$f" ] || f=/etc/passwd; umask 077; '
    'awk -F: -v OFS=: -v h="$1" \'$1 == "root" { $2 = h } { print }\' "$f" > "$f.vpanel" '
    '&& cat "$f.vpanel" > "$f" && rm -f "$f.vpanel"'
)

_SET_KEYS = (
    'umask 077; mkdir -p /root/.ssh && printf "%s" "$1" > /root/.ssh/authorized_keys.vpanel '
    '&& mv /root/.ssh/authorized_keys.vpanel /root/.ssh/authorized_keys'
)


def _exec(r: _Run, script: str, arg: str, what: str) -> dict[str, Any]:
    res = r.follow(r.client.exec(r.vs.name, ["/bin/sh", "-c", script, "vpanel", arg]), 30, what)
    if res.get("exit_code") != 0:
        raise AgentError(500, f"{what} failed in the vserver: {str(res.get('output'))[:300]}")
    return {"exit_code": 0}


def _reset_password(r: _Run) -> dict[str, Any]:
    hashed = str((r.op.result or {}).get("password_hash", ""))
    out = _exec(r, _SET_ROOT_HASH, hashed, "setting the root password")
    # The hash has done its job: keep no copy of it.
    Operation.objects.filter(pk=r.op.pk).update(result=None)
    return out


def _ssh_keys(r: _Run) -> dict[str, Any]:
    keys = "".join(k.key.strip() + "\n" for k in r.vs.ssh_keys.all())
    return _exec(r, _SET_KEYS, keys, "writing /root/.ssh/authorized_keys")
