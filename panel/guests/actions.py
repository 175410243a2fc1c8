"""Every change to a vserver, one function each (Zulip's do_*).

Each runs in a transaction, checks who may do it and what the plan allows,
writes the audit row and records an Operation; the work on the host is
handed to the agent once the transaction has committed (panel/guests/agent.py),
and the vserver's event goes out then too. Views, serializers, consumers and
the admin call these and never save lifecycle state themselves.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

from django.db import transaction
from django.db.models import Count, Q, Sum

from panel.guests.choices import (
    DesiredStateChoices,
    OperationKindChoices,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, SSHKey, VServer
from panel.hosting.choices import (
    MANAGING_ROLES,
    SCOPED_ROLES,
    AuditResultChoices,
    HostStateChoices,
    RoleChoices,
)
from panel.hosting.models import AuditLog, Customer, Host, IPAddress, IPPool, PoolExhausted

__all__ = [
    "ActionError",
    "Denied",
    "add_ssh_key",
    "audit",
    "create_vserver",
    "delete_vserver",
    "reinstall_vserver",
    "remove_ssh_key",
    "reset_root_password",
    "restart_vserver",
    "set_hostname",
    "set_limits",
    "start_vserver",
    "stop_vserver",
    "system_start",
    "system_stop",
]


P = ParamSpec("P")
R = TypeVar("R")


class ActionError(Exception):
    """The action cannot be done; the message says why (and FIELD what to fix)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


class Denied(ActionError):
    """The acting user's role does not allow the action.

    AUDIT holds the audit row's arguments: the refusal is recorded by
    `records_denials` once the action's transaction has rolled back, since a
    row written inside it would roll back with it.
    """

    def __init__(self, message: str, field: str | None = None,
                 audit: tuple[Any, ...] | None = None) -> None:
        super().__init__(message, field)
        self.audit = audit


def records_denials(fn: Callable[P, R]) -> Callable[P, R]:
    """Outermost decorator of an action: write the audit row of a refusal."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Denied as e:
            if e.audit is not None:
                pending, e.audit = e.audit, None  # once, even through nested actions
                audit(*pending, result=AuditResultChoices.RESULT_DENIED)
            raise
    return wrapper


@dataclass(frozen=True)
class Actor:
    user: Any
    source_ip: str | None = None


# --- audit and roles ---------------------------------------------------------------

def audit(actor: Actor, customer: Customer | None, target: Any, action: str, *,
          result: str = AuditResultChoices.RESULT_OK, **detail: Any) -> AuditLog:
    user = actor.user if getattr(actor.user, "is_authenticated", False) else None
    return AuditLog.objects.create(
        actor=user, actor_name=getattr(user, "username", "") or "system", customer=customer,
        target_type=type(target).__name__.lower() if target is not None else "",
        target_id=str(getattr(target, "pk", "") or ""), target_repr=str(target or "")[:200],
        source_ip=actor.source_ip, action=action, result=result, detail=detail)


def role(user: Any, customer: Customer) -> str | None:
    """The user's role in CUSTOMER; staff count as owners."""
    if getattr(user, "is_staff", False):
        return RoleChoices.ROLE_OWNER
    return customer.role_of(user)


def _require(actor: Actor, customer: Customer, managing: bool, action: str,
             target: Any = None) -> None:
    r = role(actor.user, customer)
    allowed = r is not None and (not managing or r in MANAGING_ROLES)
    if not allowed:
        raise Denied(f"your role ({r or 'none'}) may not {action.replace('-', ' ')}",
                     audit=(actor, customer, target, action))
    if r in SCOPED_ROLES and (not isinstance(target, VServer) or not VServer.objects.visible_to(
            actor.user).filter(pk=target.pk).exists()):
        # A student acts on their own server only, a TA on their groups' servers.
        raise Denied(f"your role ({r}) may not {action.replace('-', ' ')} on this vserver",
                     audit=(actor, customer, target, action))


def _require_idle(vs: VServer, action: str) -> None:
    if vs.busy:
        raise ActionError(f"{vs.name} is {vs.get_status_display().lower()}: wait until it "
                          f"has finished before you {action}", "status")


# --- plan limits ------------------------------------------------------------------

def _usage(customer: Customer, exclude: VServer | None = None) -> dict[str, Any]:
    qs = customer.vservers.all()
    if exclude is not None:
        qs = qs.exclude(pk=exclude.pk)
    agg = qs.aggregate(n=Count("id"), memory=Sum("memory_mb"), cpu=Sum("cpu_cores"),
                       disk=Sum("disk_gb"))
    ips = IPAddress.objects.filter(vserver__customer=customer)
    if exclude is not None:
        ips = ips.exclude(vserver=exclude)
    v4 = sum(1 for a in ips.values_list("address", flat=True) if ":" not in a)
    v6 = ips.count() - v4
    return {"max_vservers": agg["n"] or 0, "memory_mb": agg["memory"] or 0,
            "cpu_cores": agg["cpu"] or Decimal(0), "disk_gb": agg["disk"] or 0,
            "max_ipv4": v4, "max_ipv6": v6}


def plan_usage(customer: Customer) -> dict[str, Any]:
    """What CUSTOMER's vservers take now, keyed like its plan's limits (usage bars)."""
    return _usage(customer)


_UNITS = {"max_vservers": "vservers", "memory_mb": "MiB of memory", "cpu_cores": "CPU cores",
          "disk_gb": "GiB of disk", "max_ipv4": "IPv4 addresses", "max_ipv6": "IPv6 addresses",
          "processes": "processes per vserver"}


def check_plan(customer: Customer, *, memory_mb: int, cpu_cores: Decimal, disk_gb: int,
               processes: int, ipv4: int, ipv6: int, new_vserver: bool,
               exclude: VServer | None = None, capabilities: list[str] | None = None,
               flags: list[str] | None = None) -> None:
    """Refuse what would take CUSTOMER past its plan, saying which limit and by how much."""
    limits = customer.limits()
    if customer.plan is None:
        raise ActionError(f"{customer} has no plan: a staff member must give it one")
    used = _usage(customer, exclude)
    wanted = {"max_vservers": used["max_vservers"] + (1 if new_vserver else 0),
              "memory_mb": used["memory_mb"] + memory_mb,
              "cpu_cores": used["cpu_cores"] + cpu_cores,
              "disk_gb": used["disk_gb"] + disk_gb,
              "max_ipv4": used["max_ipv4"] + ipv4, "max_ipv6": used["max_ipv6"] + ipv6}
    field_of = {"memory_mb": "memory_mb", "cpu_cores": "cpu_cores", "disk_gb": "disk_gb",
                "max_ipv4": "ipv4", "max_ipv6": "ipv6", "max_vservers": "name"}
    for key, total in wanted.items():
        cap = getattr(limits, key)
        if total > cap:
            over = total - cap
            raise ActionError(
                f"plan limit: {_UNITS[key]}: {total} asked in total, the plan allows {cap} "
                f"({over} over)", field_of[key])
    if processes > limits.processes:
        raise ActionError(f"plan limit: {_UNITS['processes']}: {processes} asked, the plan "
                          f"allows {limits.processes} ({processes - limits.processes} over)",
                          "processes")
    for cap in capabilities or []:
        if cap.startswith("!"):
            continue
        if cap not in limits.allowed_caps:
            raise ActionError(f"plan limit: capability {cap} is not in your plan",
                              "capabilities")
    for flag in flags or []:
        if flag not in limits.allowed_flags and flag not in ("lock", "nproc"):
            raise ActionError(f"plan limit: flag {flag} is not in your plan", "flags")


# --- placement ------------------------------------------------------------------------

def place(name: str, memory_mb: int, cpu_cores: Decimal, disk_gb: int) -> Host:
    """An enabled host with room for the vserver, the least loaded first."""
    hosts = Host.objects.filter(state=HostStateChoices.STATE_ENABLED).annotate(
        n=Count("vservers"), memory=Sum("vservers__memory_mb"),
        disk=Sum("vservers__disk_gb")).order_by("memory", "name")
    why = []
    for h in hosts:
        if h.vservers.filter(name=name).exists():
            why.append(f"{h.name}: the name {name} is taken there")
        elif h.n >= h.max_vservers:
            why.append(f"{h.name}: full ({h.n} vservers)")
        elif (h.memory or 0) + memory_mb > h.memory_mb:
            why.append(f"{h.name}: not enough memory")
        elif (h.disk or 0) + disk_gb > h.disk_gb:
            why.append(f"{h.name}: not enough disk")
        else:
            return h
    detail = "; ".join(why) or "no host is enabled"
    raise ActionError(f"no host has room for this vserver ({detail})", "name")


def _pools(host: Host, family: int) -> list[IPPool]:
    return list(IPPool.objects.filter(Q(host=host) | Q(host__isnull=True), family=family)
                .order_by("host", "name"))


def _allocate(vs: VServer, family: int, count: int) -> list[IPAddress]:
    out = []
    for _ in range(count):
        for pool in _pools(vs.host, family):
            try:
                out.append(pool.allocate(vs))
                break
            except PoolExhausted:
                continue
        else:
            raise ActionError(f"no free IPv{family} address on {vs.host}", f"ipv{family}")
    return out


# --- operations ------------------------------------------------------------------------

def _operation(vs: VServer, kind: str, actor: Actor, **result: Any) -> Operation:
    op = Operation.objects.create(vserver=vs, vserver_name=vs.name, customer=vs.customer,
                                  kind=kind, created_by=actor.user if getattr(
                                      actor.user, "is_authenticated", False) else None,
                                  result=result or None)
    transaction.on_commit(lambda: _dispatch(op.pk))
    return op


def _dispatch(op_id: int) -> None:
    from panel.guests import agent

    agent.dispatch(op_id)


def _set_status(vs: VServer, status: str) -> None:
    VServer.objects.filter(pk=vs.pk).update(status=status)
    vs.status = status
    transaction.on_commit(lambda: _send_event(vs.pk))


def _send_event(vs_id: int) -> None:
    from panel.guests import events

    events.vserver_changed(vs_id)


# --- the actions ------------------------------------------------------------------------

@records_denials
@transaction.atomic
def create_vserver(customer: Customer, *, actor: Actor, name: str, hostname: str = "",
                   template: str = "", memory_mb: int = 256,
                   cpu_cores: Decimal | int | str = Decimal("1"), processes: int = 128,
                   disk_gb: int = 1, ipv4: int = 1, ipv6: int = 0,
                   capabilities: list[str] | None = None, flags: list[str] | None = None,
                   nice: int | None = None, onboot: bool = True,
                   description: str = "", root_password_hash: str = "",
                   ssh_keys: tuple[tuple[str, str], ...] = ()) -> tuple[VServer, Operation]:
    """ROOT_PASSWORD_HASH (crypt) and SSH_KEYS ((name, key) pairs) are put in
    once the new vserver runs; the hash is dropped from the operation then."""
    _require(actor, customer, True, "create-vserver")
    cpu = Decimal(str(cpu_cores))
    customer = Customer.objects.select_for_update().get(pk=customer.pk)
    check_plan(customer, memory_mb=memory_mb, cpu_cores=cpu, disk_gb=disk_gb,
               processes=processes, ipv4=ipv4, ipv6=ipv6, new_vserver=True,
               capabilities=capabilities, flags=flags)
    plan_templates = customer.plan.templates if customer.plan else []
    if template and plan_templates and template not in plan_templates:
        raise ActionError(f"template {template} is not offered by your plan", "template")
    host = place(name, memory_mb, cpu, disk_gb)
    vs = VServer(name=name, customer=customer, host=host, template=template,
                 hostname=hostname or name, description=description,
                 capabilities=list(capabilities or []), flags=list(flags or []), nice=nice,
                 memory_mb=memory_mb, cpu_cores=cpu, processes=processes, disk_gb=disk_gb,
                 onboot=onboot, status=VServerStatusChoices.STATUS_BUILDING,
                 desired_state=DesiredStateChoices.DESIRED_RUNNING)
    vs.full_clean()
    vs.save()
    for key_name, key in ssh_keys:
        k = SSHKey(vserver=vs, name=key_name, key=key.strip())
        k.full_clean()
        k.save()
    ips = _allocate(vs, 4, ipv4) + _allocate(vs, 6, ipv6)
    audit(actor, customer, vs, "create-vserver", host=host.name, template=template,
          ips=[a.address for a in ips])
    extra = {"password_hash": root_password_hash} if root_password_hash else {}
    op = _operation(vs, OperationKindChoices.KIND_CREATE, actor, **extra)
    _set_status(vs, VServerStatusChoices.STATUS_BUILDING)
    return vs, op


def _lifecycle(vs: VServer, actor: Actor, kind: str, status: str, desired: str,
               **extra: Any) -> Operation:
    with transaction.atomic():
        vs = VServer.objects.select_for_update().get(pk=vs.pk)
        _require(actor, vs.customer, False, f"{kind}-vserver", vs)
        _require_idle(vs, kind)
        pointless = {OperationKindChoices.KIND_START: VServerStatusChoices.STATUS_RUNNING,
                     OperationKindChoices.KIND_STOP: VServerStatusChoices.STATUS_STOPPED}
        if pointless.get(kind) == vs.status:
            raise ActionError(f"{vs.name} is already {vs.get_status_display().lower()}",
                              "status")
        VServer.objects.filter(pk=vs.pk).update(desired_state=desired)
        audit(actor, vs.customer, vs, f"{kind}-vserver", **extra)
        op = _operation(vs, kind, actor, **extra)
        _set_status(vs, status)
        return op


@records_denials
def start_vserver(vs: VServer, *, actor: Actor) -> Operation:
    return _lifecycle(vs, actor, OperationKindChoices.KIND_START,
                      VServerStatusChoices.STATUS_STARTING, DesiredStateChoices.DESIRED_RUNNING)


@records_denials
def stop_vserver(vs: VServer, *, actor: Actor, force: bool = False) -> Operation:
    return _lifecycle(vs, actor, OperationKindChoices.KIND_STOP,
                      VServerStatusChoices.STATUS_STOPPING, DesiredStateChoices.DESIRED_STOPPED,
                      force=force)


@records_denials
def restart_vserver(vs: VServer, *, actor: Actor) -> Operation:
    return _lifecycle(vs, actor, OperationKindChoices.KIND_RESTART,
                      VServerStatusChoices.STATUS_RESTARTING,
                      DesiredStateChoices.DESIRED_RUNNING)


# The panel acting on its own (the reconciler): audit rows name 'system'.
SYSTEM = Actor(None)


@transaction.atomic
def system_start(vs: VServer, *, reason: str) -> Operation | None:
    """Start VS for the panel itself: it should run (desired_state) and does not.

    No user asked, so no role check; still nothing while the vserver is busy
    or no longer meant to run (None then). Audited with actor 'system'.
    """
    vs = VServer.objects.select_for_update().get(pk=vs.pk)
    if vs.busy or vs.desired_state != DesiredStateChoices.DESIRED_RUNNING:
        return None
    audit(SYSTEM, vs.customer, vs, "start-vserver", reason=reason)
    op = _operation(vs, OperationKindChoices.KIND_START, SYSTEM)
    _set_status(vs, VServerStatusChoices.STATUS_STARTING)
    return op


@transaction.atomic
def system_stop(vs: VServer, *, reason: str) -> Operation | None:
    """Stop VS for the panel itself (a classroom's auto-stop: outside its hours, idle).

    No user asked, so no role check. Nothing unless it runs with no operation
    under way (None then): a busy vserver is never stopped. It is then meant
    to stay stopped (desired_state), so the reconciler leaves it so. Audited
    with actor 'system' and REASON.
    """
    vs = VServer.objects.select_for_update().get(pk=vs.pk)
    if vs.busy or vs.status != VServerStatusChoices.STATUS_RUNNING or vs.operations.filter(
            state__in=(OperationStateChoices.STATE_PENDING,
                       OperationStateChoices.STATE_RUNNING)).exists():
        return None
    VServer.objects.filter(pk=vs.pk).update(desired_state=DesiredStateChoices.DESIRED_STOPPED)
    audit(SYSTEM, vs.customer, vs, "stop-vserver", reason=reason)
    op = _operation(vs, OperationKindChoices.KIND_STOP, SYSTEM, force=False)
    _set_status(vs, VServerStatusChoices.STATUS_STOPPING)
    return op


def _confirm(vs: VServer, confirm: str, action: str) -> None:
    if confirm != vs.name:
        raise ActionError(f"type the vserver's name ({vs.name}) to confirm the {action}",
                          "confirm")


@records_denials
@transaction.atomic
def reinstall_vserver(vs: VServer, *, actor: Actor, confirm: str,
                      template: str | None = None) -> Operation:
    vs = VServer.objects.select_for_update().get(pk=vs.pk)
    _require(actor, vs.customer, True, "reinstall-vserver", vs)
    _require_idle(vs, "reinstall")
    _confirm(vs, confirm, "reinstall")
    if template is not None:
        plan_templates = vs.customer.plan.templates if vs.customer.plan else []
        if template and plan_templates and template not in plan_templates:
            raise ActionError(f"template {template} is not offered by your plan", "template")
        VServer.objects.filter(pk=vs.pk).update(template=template)
    audit(actor, vs.customer, vs, "reinstall-vserver", template=template or vs.template)
    op = _operation(vs, OperationKindChoices.KIND_REINSTALL, actor)
    _set_status(vs, VServerStatusChoices.STATUS_BUILDING)
    return op


@records_denials
@transaction.atomic
def delete_vserver(vs: VServer, *, actor: Actor, confirm: str) -> Operation:
    vs = VServer.objects.select_for_update().get(pk=vs.pk)
    _require(actor, vs.customer, True, "delete-vserver", vs)
    _require_idle(vs, "delete it")
    _confirm(vs, confirm, "deletion")
    audit(actor, vs.customer, vs, "delete-vserver")
    op = _operation(vs, OperationKindChoices.KIND_DELETE, actor)
    _set_status(vs, VServerStatusChoices.STATUS_DELETING)
    return op


@records_denials
@transaction.atomic
def set_hostname(vs: VServer, *, actor: Actor, hostname: str) -> Operation:
    vs = VServer.objects.select_for_update().get(pk=vs.pk)
    _require(actor, vs.customer, True, "set-hostname", vs)
    old = vs.hostname
    vs.hostname = hostname
    vs.full_clean(exclude=["customer", "host"])
    VServer.objects.filter(pk=vs.pk).update(hostname=hostname)
    audit(actor, vs.customer, vs, "set-hostname", old=old, new=hostname)
    return _operation(vs, OperationKindChoices.KIND_SET_HOSTNAME, actor, hostname=hostname)


@records_denials
@transaction.atomic
def set_limits(vs: VServer, *, actor: Actor, memory_mb: int | None = None,
               cpu_cores: Decimal | str | None = None, processes: int | None = None,
               disk_gb: int | None = None) -> Operation:
    vs = VServer.objects.select_for_update().get(pk=vs.pk)
    _require(actor, vs.customer, True, "set-limits", vs)
    new = {"memory_mb": vs.memory_mb if memory_mb is None else memory_mb,
           "cpu_cores": vs.cpu_cores if cpu_cores is None else Decimal(str(cpu_cores)),
           "processes": vs.processes if processes is None else processes,
           "disk_gb": vs.disk_gb if disk_gb is None else disk_gb}
    Customer.objects.select_for_update().get(pk=vs.customer_id)
    check_plan(vs.customer, ipv4=0, ipv6=0, new_vserver=False, exclude=vs, **new)
    old = {k: str(getattr(vs, k)) for k in new}
    for k, v in new.items():
        setattr(vs, k, v)
    vs.full_clean(exclude=["customer", "host"])
    VServer.objects.filter(pk=vs.pk).update(**new)
    audit(actor, vs.customer, vs, "set-limits", old=old, new={k: str(v) for k, v in new.items()})
    return _operation(vs, OperationKindChoices.KIND_SET_LIMITS, actor)


def generate_password(length: int = 16) -> str:
    alphabet = string.ascii_letters + string.digits
    while True:
        pw = "".join(secrets.choice(alphabet) for _ in range(length))
        if any(c.isdigit() for c in pw) and any(c.isupper() for c in pw) \
                and any(c.islower() for c in pw):
            return pw


@records_denials
@transaction.atomic
def reset_root_password(vs: VServer, *, actor: Actor) -> tuple[Operation, str]:
    """A new random root password: returned once, to show once; only its hash leaves."""
    vs = VServer.objects.select_for_update().get(pk=vs.pk)
    _require(actor, vs.customer, True, "reset-root-password", vs)
    if vs.status != VServerStatusChoices.STATUS_RUNNING:
        raise ActionError(f"{vs.name} must be running to change its root password", "status")
    password = generate_password()
    from panel.guests import agent

    hashed = agent.hash_password(password)
    audit(actor, vs.customer, vs, "reset-root-password")
    return _operation(vs, OperationKindChoices.KIND_RESET_PASSWORD, actor,
                      password_hash=hashed), password


@records_denials
@transaction.atomic
def add_ssh_key(vs: VServer, *, actor: Actor, name: str, key: str) -> SSHKey:
    vs = VServer.objects.select_for_update().get(pk=vs.pk)
    _require(actor, vs.customer, True, "add-ssh-key", vs)
    k = SSHKey(vserver=vs, name=name, key=key.strip())
    k.full_clean()
    k.save()
    audit(actor, vs.customer, vs, "add-ssh-key", name=name)
    if vs.status == VServerStatusChoices.STATUS_RUNNING:
        _operation(vs, OperationKindChoices.KIND_SSH_KEYS, actor)
    return k


@records_denials
@transaction.atomic
def remove_ssh_key(key: SSHKey, *, actor: Actor) -> None:
    vs = VServer.objects.select_for_update().get(pk=key.vserver_id)
    _require(actor, vs.customer, True, "remove-ssh-key", vs)
    name = key.name
    key.delete()
    audit(actor, vs.customer, vs, "remove-ssh-key", name=name)
    if vs.status == VServerStatusChoices.STATUS_RUNNING:
        _operation(vs, OperationKindChoices.KIND_SSH_KEYS, actor)


def address_family(address: str) -> int:
    return ipaddress.ip_address(address).version


__all__ += [
    "Actor",
    "OperationStateChoices",
    "check_plan",
    "generate_password",
    "place",
    "plan_usage",
    "records_denials",
]
