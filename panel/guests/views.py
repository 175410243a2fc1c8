"""Pages of the guests app: the dashboard, vserver lists, a vserver's page and its actions.

Every vserver comes through `VServer.objects.visible_to(user)`: another
tenant's answers 404, exactly like a missing one, on its page and on every
action URL. Every change is one call into panel/guests/actions.py; its
ActionError (or Denied) is shown to the user, on the field it names when
the page has that field.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_POST

from panel.guests import actions, events
from panel.guests.availability import vserver_actions
from panel.guests.choices import OperationStateChoices
from panel.guests.console import console_availability
from panel.guests.forms import (
    ConfirmForm,
    HostnameForm,
    LimitsForm,
    SSHKeyForm,
    StopForm,
    VServerCreateForm,
    VServerFilterForm,
    managed_customers,
)
from panel.guests.models import Operation, SSHKey, VServer
from panel.guests.plan_usage import customers_of, usage_bars
from panel.hosting.forms import add_error
from panel.hosting.models import AuditLog
from panel.hosting.views import actor_of, staff_required

__all__ = [
    "dashboard",
    "staff_vserver_list",
    "usage_bars",
    "vserver_console",
    "vserver_create",
    "vserver_delete",
    "vserver_detail",
    "vserver_hostname",
    "vserver_key_add",
    "vserver_key_remove",
    "vserver_limits",
    "vserver_list",
    "vserver_reinstall",
    "vserver_reset_password",
    "vserver_restart",
    "vserver_start",
    "vserver_stop",
]

_IN_PROGRESS = (OperationStateChoices.STATE_PENDING, OperationStateChoices.STATE_RUNNING)


def _plain(value: Any) -> Any:
    return value.normalize() if isinstance(value, Decimal) else value


# --- dashboard and lists --------------------------------------------------------------------------

@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """The user's own customers: their vservers, usage against the plan, work under way."""
    user = request.user
    if hasattr(user, "seat") and not user.is_staff:
        return redirect("student_home")  # a student's page is their own server's
    customers = customers_of(user)
    vservers = (VServer.objects.visible_to(user).filter(customer__in=customers)
                .select_related("customer", "host").prefetch_related("ips"))
    by_customer: dict[int, list[VServer]] = {}
    for vs in vservers:
        by_customer.setdefault(vs.customer_id, []).append(vs)
    sections = [{"customer": c, "role": c.role_of(user), "bars": usage_bars(c),
                 "vservers": by_customer.get(c.pk, [])} for c in customers]
    # What the page's websocket then keeps current (static/js/live.js, from
    # events.state_for): the operations under way on the vservers the user may see.
    operations = (Operation.objects.visible_to(user)
                  .filter(state__in=_IN_PROGRESS, vserver__isnull=False)
                  .select_related("vserver")[:events.DASHBOARD_OPERATIONS])
    return render(request, "guests/dashboard.html", {
        "sections": sections, "operations": operations,
        "can_create": managed_customers(user).exists(),
    })


def _vserver_list(request: HttpRequest, *, staff: bool) -> HttpResponse:
    user = request.user
    form = VServerFilterForm(request.GET or None, user=user)
    vservers = (VServer.objects.visible_to(user)
                .select_related("customer", "host").prefetch_related("ips"))
    if form.is_valid():
        d = form.cleaned_data
        if d["q"]:
            vservers = vservers.filter(name__icontains=d["q"])
        if d["customer"] is not None:
            vservers = vservers.filter(customer=d["customer"])
        if d["status"]:
            vservers = vservers.filter(status=d["status"])
        if d.get("host") is not None:
            vservers = vservers.filter(host=d["host"])
    page = Paginator(vservers, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "guests/vserver_list.html", {
        "form": form, "page": page, "query": query.urlencode(), "staff_view": staff,
        "can_create": managed_customers(user).exists()})


@login_required
def vserver_list(request: HttpRequest) -> HttpResponse:
    """The vservers of the user's customers (for staff: every vserver)."""
    return _vserver_list(request, staff=False)


@staff_required
def staff_vserver_list(request: HttpRequest) -> HttpResponse:
    """Every vserver on every host, with host and customer filters."""
    return _vserver_list(request, staff=True)


ActionErrorLike = actions.ActionError | ValidationError


def _put_errors(form: forms.BaseForm, error: ActionErrorLike) -> None:
    """An ActionError or a model ValidationError onto FORM, on its fields where it has them."""
    if isinstance(error, actions.ActionError):
        add_error(form, error.field, error.message)
    elif hasattr(error, "error_dict"):
        for field, errors in error.message_dict.items():
            for message in errors:
                add_error(form, field, message)
    else:
        for message in error.messages:
            add_error(form, None, message)


@login_required
def vserver_create(request: HttpRequest) -> HttpResponse:
    form = VServerCreateForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        d = dict(form.cleaned_data)
        customer = d.pop("customer")
        try:
            vs, _op = actions.create_vserver(customer, actor=actor_of(request), **d)
        except (actions.ActionError, ValidationError) as e:
            _put_errors(form, e)
        else:
            messages.success(request, f"{vs.name} is being built on {vs.host}.")
            return redirect("vserver_detail", pk=vs.pk)
    return render(request, "guests/vserver_form.html", {"form": form},
                  status=400 if form.errors else 200)


# --- a vserver's page ---------------------------------------------------------------------------

def _visible(request: HttpRequest, pk: int) -> VServer:
    """The vserver PK if the user may see it; 404 otherwise, as for a missing one."""
    return get_object_or_404(
        VServer.objects.visible_to(request.user).select_related("customer__plan", "host"), pk=pk)


def _headroom(vs: VServer) -> dict[str, Any]:
    """How far each limit of VS could go within its customer's plan (the others' use aside)."""
    limits = vs.customer.limits()
    used = actions.plan_usage(vs.customer)
    room = {}
    for key in ("memory_mb", "cpu_cores", "disk_gb"):
        room[key] = _plain(getattr(limits, key) - used[key] + getattr(vs, key))
    room["processes"] = limits.processes
    return room


# The live usage bars of the vserver page (static/js/live.js fills them in), in order.
_USAGE_ROWS = (("cpu", "CPU"), ("memory", "Memory"), ("processes", "Processes"),
               ("disk", "Disk"))

# The forms of the vserver page, by the key the page and the action views share.
_FORMS: dict[str, type[forms.Form]] = {
    "stop": StopForm, "reinstall": ConfirmForm, "delete": ConfirmForm,
    "hostname": HostnameForm, "limits": LimitsForm, "ssh_key": SSHKeyForm}


def _detail(request: HttpRequest, vs: VServer, *, bound: dict[str, forms.Form] | None = None,
            status: int = 200) -> HttpResponse:
    """The vserver page; BOUND replaces a form that came back with errors (by its key)."""
    vs.refresh_from_db()
    forms_: dict[str, forms.Form] = {
        key: _FORMS[key](auto_id=f"id_{key}_%s", initial=initial) for key, initial in (
            ("stop", {}), ("reinstall", {"template": vs.template}), ("delete", {}),
            ("hostname", {"hostname": vs.hostname}),
            ("limits", {k: _plain(getattr(vs, k)) for k in (
                "memory_mb", "cpu_cores", "disk_gb", "processes")}),
            ("ssh_key", {}))}
    forms_.update(bound or {})
    forms_["delete"].fields.pop("template", None)  # reinstall's only
    operations = vs.operations.select_related("created_by")[:events.RECENT_OPERATIONS]
    audit = (AuditLog.objects.visible_to(request.user)
             .filter(target_type="vserver", target_id=str(vs.pk))[:20])
    return render(request, "guests/vserver_detail.html", {
        "vs": vs, "ips": vs.ips.select_related("pool"), "limits": vs.customer.limits(),
        "headroom": _headroom(vs), "can": vserver_actions(vs, request.user),
        "role": actions.role(request.user, vs.customer), "forms": forms_,
        "console": console_availability(vs, request.user),
        "ssh_keys": vs.ssh_keys.all(), "operations": operations, "audit": audit,
        "usage_rows": _USAGE_ROWS,
    }, status=status)


@login_required
def vserver_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return _detail(request, _visible(request, pk))


@login_required
def vserver_console(request: HttpRequest, pk: int) -> HttpResponse:
    """A terminal on a shell inside the vserver; panel/guests/console.py checks and relays."""
    vs = _visible(request, pk)
    return render(request, "guests/vserver_console.html",
                  {"vs": vs, "console": console_availability(vs, request.user)})


def _act(request: HttpRequest, pk: int, *, form_key: str | None,
         run: Callable[[VServer, dict[str, Any]], str | HttpResponse]) -> HttpResponse:
    """Run one action on a visible vserver from a POSTed form.

    RUN gets the vserver and the form's cleaned data and returns the success
    message (or a response of its own). A form error, or an ActionError about
    one of its fields, shows the page again with that form and its errors (and
    the page's script opens its dialog again); any other ActionError (a role
    that may not, a busy vserver) is a message above the page.
    """
    vs = _visible(request, pk)
    form = _FORMS[form_key](request.POST, auto_id=f"id_{form_key}_%s") if form_key else None
    if form is not None and not form.is_valid():
        return _detail(request, vs, bound={form_key: form}, status=400)  # type: ignore[dict-item]
    data = form.cleaned_data if form is not None else {}
    try:
        result = run(vs, data)
    except (actions.ActionError, ValidationError) as e:
        field = e.field if isinstance(e, actions.ActionError) else None
        if form is not None and (field in form.fields or isinstance(e, ValidationError)):
            _put_errors(form, e)
            return _detail(request, vs, bound={form_key: form}, status=400)  # type: ignore[dict-item]
        messages.error(request, e.message if isinstance(e, actions.ActionError)
                       else "; ".join(e.messages))
        return redirect("vserver_detail", pk=vs.pk)
    if isinstance(result, HttpResponse):
        return result
    messages.success(request, result)
    return redirect("vserver_detail", pk=vs.pk)


@login_required
@require_POST
def vserver_start(request: HttpRequest, pk: int) -> HttpResponse:
    def run(vs: VServer, d: dict[str, Any]) -> str:
        actions.start_vserver(vs, actor=actor_of(request))
        return f"{vs.name} is starting."
    return _act(request, pk, form_key=None, run=run)


@login_required
@require_POST
def vserver_stop(request: HttpRequest, pk: int) -> HttpResponse:
    def run(vs: VServer, d: dict[str, Any]) -> str:
        actions.stop_vserver(vs, actor=actor_of(request), force=d["force"])
        return f"{vs.name} is stopping{' (forced)' if d['force'] else ''}."
    return _act(request, pk, form_key="stop", run=run)


@login_required
@require_POST
def vserver_restart(request: HttpRequest, pk: int) -> HttpResponse:
    def run(vs: VServer, d: dict[str, Any]) -> str:
        actions.restart_vserver(vs, actor=actor_of(request))
        return f"{vs.name} is restarting."
    return _act(request, pk, form_key=None, run=run)


@login_required
@require_POST
def vserver_reinstall(request: HttpRequest, pk: int) -> HttpResponse:
    def run(vs: VServer, d: dict[str, Any]) -> str:
        actions.reinstall_vserver(vs, actor=actor_of(request), confirm=d["confirm"],
                                  template=d["template"] or None)
        return f"{vs.name} is being reinstalled: everything on it is erased."
    return _act(request, pk, form_key="reinstall", run=run)


@login_required
@require_POST
def vserver_delete(request: HttpRequest, pk: int) -> HttpResponse:
    def run(vs: VServer, d: dict[str, Any]) -> str:
        actions.delete_vserver(vs, actor=actor_of(request), confirm=d["confirm"])
        return f"{vs.name} is being deleted."
    return _act(request, pk, form_key="delete", run=run)


@login_required
@require_POST
def vserver_reset_password(request: HttpRequest, pk: int) -> HttpResponse:
    """A new root password, shown in this answer only: never stored in clear, never cached."""
    def run(vs: VServer, d: dict[str, Any]) -> HttpResponse:
        _op, password = actions.reset_root_password(vs, actor=actor_of(request))
        response = render(request, "guests/password_shown.html", {"vs": vs, "password": password})
        add_never_cache_headers(response)
        return response
    return _act(request, pk, form_key=None, run=run)


@login_required
@require_POST
def vserver_hostname(request: HttpRequest, pk: int) -> HttpResponse:
    def run(vs: VServer, d: dict[str, Any]) -> str:
        actions.set_hostname(vs, actor=actor_of(request), hostname=d["hostname"])
        return f"The hostname of {vs.name} becomes {d['hostname']}."
    return _act(request, pk, form_key="hostname", run=run)


@login_required
@require_POST
def vserver_limits(request: HttpRequest, pk: int) -> HttpResponse:
    def run(vs: VServer, d: dict[str, Any]) -> str:
        actions.set_limits(vs, actor=actor_of(request), **d)
        return f"The new limits of {vs.name} are being applied."
    return _act(request, pk, form_key="limits", run=run)


@login_required
@require_POST
def vserver_key_add(request: HttpRequest, pk: int) -> HttpResponse:
    def run(vs: VServer, d: dict[str, Any]) -> str:
        actions.add_ssh_key(vs, actor=actor_of(request), name=d["name"], key=d["key"])
        return f"SSH key {d['name']} is added to {vs.name}."
    return _act(request, pk, form_key="ssh_key", run=run)


@login_required
@require_POST
def vserver_key_remove(request: HttpRequest, pk: int, key_pk: int) -> HttpResponse:
    def run(vs: VServer, d: dict[str, Any]) -> str:
        key = get_object_or_404(SSHKey, pk=key_pk, vserver=vs)
        actions.remove_ssh_key(key, actor=actor_of(request))
        return f"SSH key {key.name} is removed from {vs.name}."
    return _act(request, pk, form_key=None, run=run)
