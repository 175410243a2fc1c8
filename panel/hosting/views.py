"""Pages of the hosting app: logging in (password, then a TOTP code), the account
(two-factor device, API tokens) and the staff pages (customers, plans, hosts,
IP pools, audit log).

Views declare, actions act: every change goes through panel/hosting/actions.py
(or panel/guests/actions.py), which checks and audits it.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlencode

import segno
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import mark_safe
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST
from django_otp import devices_for_user
from django_otp import login as otp_login
from django_otp.plugins.otp_totp.models import TOTPDevice

from panel.guests.actions import ActionError, Actor
from panel.hosting import actions
from panel.hosting.forms import (
    ApiTokenForm,
    AuditFilterForm,
    CustomerForm,
    HostForm,
    IPPoolForm,
    LoginForm,
    MemberForm,
    OTPCodeForm,
    PlanForm,
    add_error,
)
from panel.hosting.middleware import VERIFY, second_step
from panel.hosting.models import ApiToken, AuditLog, Customer, Host, IPPool, Membership, Plan

__all__ = [
    "LoginView",
    "LogoutView",
    "account",
    "actor_of",
    "audit_log",
    "bar_colour",
    "customer_edit",
    "customer_list",
    "host_edit",
    "host_list",
    "member_add",
    "member_remove",
    "otp_verify",
    "plan_edit",
    "plan_list",
    "pool_edit",
    "pool_list",
    "staff_required",
    "token_create",
    "token_revoke",
    "totp_enrol",
    "totp_remove",
]


# --- helpers shared with panel/guests/views.py ------------------------------------------------

def source_ip(request: HttpRequest) -> str | None:
    """The client's address for the audit log, if it is an address at all.

    REMOTE_ADDR, unless settings.VPANEL_PROXIES says N proxies of the
    provider's own stand in front: then the Nth address from the right of
    X-Forwarded-For, the one the outermost of them appended. Anything further
    left is the client's own word and is never taken; a header with fewer
    addresses than that gives REMOTE_ADDR.
    """
    raw = request.META.get("REMOTE_ADDR") or ""
    proxies = int(getattr(settings, "VPANEL_PROXIES", 0))
    if proxies:
        hops = [h.strip() for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        hops = [h for h in hops if h]
        if len(hops) >= proxies:
            raw = hops[-proxies]
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        return None


def actor_of(request: HttpRequest) -> Actor:
    return Actor(request.user, source_ip(request))


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Log in first; then a staff page answers 404 to everyone else, like a missing page."""

    @wraps(view)
    @login_required
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_staff:
            raise Http404("no such page")
        return view(request, *args, **kwargs)

    return wrapper


def bar_colour(percent: int) -> str:
    """The colour of a used/total bar: red from 90 %, amber from 75 %."""
    return "danger" if percent >= 90 else "warning" if percent >= 75 else "primary"


def safe_next(request: HttpRequest, default: str = "dashboard") -> str:
    """The `next` parameter if it points into this site, else DEFAULT's URL."""
    url = request.POST.get("next") or request.GET.get("next") or ""
    if url and url_has_allowed_host_and_scheme(url, allowed_hosts={request.get_host()},
                                               require_https=request.is_secure()):
        return url
    return reverse(default)


# --- logging in -------------------------------------------------------------------------------

class LoginView(auth_views.LoginView):
    """Django's login: axes counts its failures; the session key is new afterwards."""

    template_name = "registration/login.html"
    authentication_form = LoginForm
    redirect_authenticated_user = True

    def get_success_url(self) -> str:
        url = super().get_success_url()
        step = second_step(self.request)
        if step is not None:  # a code (or, for staff under VPANEL_STAFF_2FA, a device) first
            return f"{reverse(step)}?{urlencode({'next': url})}"
        return url


class LogoutView(auth_views.LogoutView):
    """POST only (Django's): a link or an image elsewhere cannot log anyone out."""


def _check_code(user: Any, code: str) -> tuple[Any, str]:
    """The confirmed device that accepts CODE, or None and why not."""
    why = "wrong or expired code"
    for device in devices_for_user(user, confirmed=True):
        allowed, data = device.verify_is_allowed()
        if not allowed:
            wait = (data or {}).get("locked_until")
            why = "too many wrong codes: try again " + (
                f"after {wait:%H:%M:%S} UTC" if wait else "in a little while")
            continue
        if device.verify_token(code):
            return device, ""
    return None, why


@never_cache
@login_required
def otp_verify(request: HttpRequest) -> HttpResponse:
    """The second login step: a code from the user's confirmed TOTP device."""
    next_url = safe_next(request)
    if second_step(request) != VERIFY:
        return redirect(next_url)
    form = OTPCodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        device, why = _check_code(request.user, form.cleaned_data["code"])
        if device is not None:
            otp_login(request, device)
            request.session.cycle_key()  # a new key for the fully logged-in session
            return redirect(next_url)
        add_error(form, "code", why)
    return render(request, "registration/otp_verify.html", {"form": form, "next": next_url},
                  status=400 if form.errors else 200)


# --- account: two-factor device ------------------------------------------------------------------

def _qr_svg(device: TOTPDevice) -> str:
    """The device's otpauth:// URL as an inline SVG QR code (segno; nothing leaves the page)."""
    svg = segno.make(device.config_url, error="m").svg_inline(
        scale=5, omitsize=True, dark="#000", light="#fff", title="TOTP key as a QR code")
    return mark_safe(svg)  # noqa: S308 (segno's own markup; the URL is ours)


def _secret_text(device: TOTPDevice) -> str:
    """The key in base32, in groups of four, for typing into an app by hand."""
    b32 = base64.b32encode(device.bin_key).decode().rstrip("=")
    return " ".join(b32[i:i + 4] for i in range(0, len(b32), 4))


@never_cache
@login_required
def totp_enrol(request: HttpRequest) -> HttpResponse:
    """Add a TOTP device: it counts only once a code from it has been typed back."""
    user = request.user
    confirmed = TOTPDevice.objects.filter(user=user, confirmed=True).first()
    if confirmed is not None:
        return render(request, "registration/totp_enrol.html", {
            "confirmed": confirmed, "remove_form": OTPCodeForm(),
            "staff_must_keep": settings.VPANEL_STAFF_2FA and user.is_staff})
    device = TOTPDevice.objects.filter(user=user, confirmed=False).first() \
        or TOTPDevice.objects.create(user=user, name="authenticator app", confirmed=False)
    form = OTPCodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if device.verify_token(form.cleaned_data["code"]):
            with transaction.atomic():
                TOTPDevice.objects.filter(pk=device.pk).update(confirmed=True)
                TOTPDevice.objects.filter(user=user, confirmed=False).delete()
                actions.two_factor_changed(actor_of(request), "enrol-totp")
            device.confirmed = True
            otp_login(request, device)
            request.session.cycle_key()
            messages.success(request, "Two-factor login is on: from now on you will be asked "
                                      "for a code from your app after your password.")
            return redirect(safe_next(request, "account"))
        add_error(form, "code", "that code does not match: check the time on your phone, "
                                "and type the code the app shows now")
    return render(request, "registration/totp_enrol.html", {
        "form": form, "qr_svg": _qr_svg(device), "secret": _secret_text(device),
        "next": request.GET.get("next") or request.POST.get("next") or "",
        "enforced": settings.VPANEL_STAFF_2FA and user.is_staff,
    }, status=400 if form.errors else 200)


@never_cache
@login_required
@require_POST
def totp_remove(request: HttpRequest) -> HttpResponse:
    """Turn two-factor login off: a current code is asked, so a stolen session cannot."""
    user = request.user
    if settings.VPANEL_STAFF_2FA and user.is_staff:
        messages.error(request, "Staff accounts must keep two-factor login on "
                                "(VPANEL_STAFF_2FA).")
        return redirect("totp_enrol")
    form = OTPCodeForm(request.POST)
    if form.is_valid():
        device, why = _check_code(user, form.cleaned_data["code"])
        if device is not None:
            with transaction.atomic():
                TOTPDevice.objects.filter(user=user).delete()
                actions.two_factor_changed(actor_of(request), "remove-totp")
            messages.success(request, "Two-factor login is off.")
            return redirect("account")
        messages.error(request, f"Two-factor login stays on: {why}.")
    else:
        messages.error(request, "Two-factor login stays on: type the six digits your app shows.")
    return redirect("totp_enrol")


# --- account: API tokens -----------------------------------------------------------------------

def _account_page(request: HttpRequest, form: ApiTokenForm, status: int = 200) -> HttpResponse:
    user = request.user
    return render(request, "hosting/account.html", {
        "tokens": ApiToken.objects.filter(user=user),
        "token_form": form,
        "has_totp": TOTPDevice.objects.filter(user=user, confirmed=True).exists(),
        "memberships": Membership.objects.filter(user=user).select_related("customer__plan"),
    }, status=status)


@login_required
def account(request: HttpRequest) -> HttpResponse:
    return _account_page(request, ApiTokenForm())


@never_cache
@login_required
@require_POST
def token_create(request: HttpRequest) -> HttpResponse:
    """Make a token and show its secret, in this answer only (never stored, never cached)."""
    form = ApiTokenForm(request.POST)
    if not form.is_valid():
        return _account_page(request, form, status=400)
    try:
        token, secret = actions.issue_token(actor=actor_of(request),
                                            name=form.cleaned_data["name"],
                                            expires=form.cleaned_data["expires"])
    except ActionError as e:
        add_error(form, e.field, e.message)
        return _account_page(request, form, status=400)
    return render(request, "hosting/token_created.html", {"token": token, "secret": secret})


@login_required
@require_POST
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(ApiToken, pk=pk, user=request.user)
    try:
        actions.revoke_token(token, actor=actor_of(request))
    except ActionError as e:
        messages.error(request, e.message)
    else:
        messages.success(request, f"Token {token.name} is revoked.")
    return redirect("account")


# --- staff pages ------------------------------------------------------------------------------

def _edit(request: HttpRequest, form_class: type, instance: Any, *, kind: str, list_url: str,
          template: str = "hosting/staff/form.html", extra: dict[str, Any] | None = None,
          done: Callable[[Any], str] | None = None) -> HttpResponse:
    """Create or change one record through its ModelForm (so through its clean())."""
    form = form_class(request.POST or None, instance=instance)
    if request.method == "POST" and form.is_valid():
        try:
            obj = actions.save_form(form, actor=actor_of(request))
        except ActionError as e:
            add_error(form, e.field, e.message)
        except ValidationError as e:
            form.add_error(None, e)
        else:
            messages.success(request, f"{kind.capitalize()} {obj} is saved.")
            return redirect(done(obj) if done else list_url)
    title = f"{kind.capitalize()} {instance}" if instance is not None else f"New {kind}"
    return render(request, template, {"form": form, "title": title, "object": instance,
                                      "kind": kind, "list_url": list_url, **(extra or {})},
                  status=400 if form.errors else 200)


@staff_required
def customer_list(request: HttpRequest) -> HttpResponse:
    customers = (Customer.objects.select_related("plan")
                 .annotate(n_vservers=Count("vservers", distinct=True),
                           n_members=Count("memberships", distinct=True)))
    q = request.GET.get("q", "").strip()
    if q:
        customers = customers.filter(Q(name__icontains=q) | Q(slug__icontains=q))
    return render(request, "hosting/staff/customer_list.html", {"customers": customers, "q": q})


@staff_required
def customer_edit(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    customer = get_object_or_404(Customer, pk=pk) if pk is not None else None
    extra: dict[str, Any] = {}
    if customer is not None:
        extra = {"members": customer.memberships.select_related("user").order_by(
                     "user__username"),
                 "member_form": MemberForm(), "limits": customer.limits()}
    return _edit(request, CustomerForm, customer, kind="customer",
                 list_url=reverse("customer_list"), template="hosting/staff/customer_form.html",
                 extra=extra, done=lambda c: reverse("customer_edit", args=[c.pk]))


@staff_required
@require_POST
def member_add(request: HttpRequest, pk: int) -> HttpResponse:
    """Add a member to a customer, or change the role of one who is already there."""
    customer = get_object_or_404(Customer, pk=pk)
    form = MemberForm(request.POST)
    if form.is_valid():
        user, role = form.cleaned_data["username"], form.cleaned_data["role"]
        existing = Membership.objects.filter(customer=customer, user=user).first()
        try:
            if existing is not None:
                actions.set_member_role(existing, actor=actor_of(request), role=role)
            else:
                actions.add_member(customer, actor=actor_of(request), user=user, role=role)
        except ActionError as e:
            messages.error(request, e.message)
        else:
            messages.success(request, f"{user} is {role} of {customer}.")
    else:
        for errors in form.errors.values():
            for error in errors:
                messages.error(request, error)
    return redirect("customer_edit", pk=customer.pk)


@staff_required
@require_POST
def member_remove(request: HttpRequest, pk: int, member_pk: int) -> HttpResponse:
    m = get_object_or_404(Membership, pk=member_pk, customer_id=pk)
    try:
        actions.remove_member(m, actor=actor_of(request))
    except ActionError as e:
        messages.error(request, e.message)
    else:
        messages.success(request, f"{m.user} is no longer a member of {m.customer}.")
    return redirect("customer_edit", pk=pk)


@staff_required
def plan_list(request: HttpRequest) -> HttpResponse:
    plans = Plan.objects.annotate(n_customers=Count("customers"))
    return render(request, "hosting/staff/plan_list.html", {"plans": plans})


@staff_required
def plan_edit(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    plan = get_object_or_404(Plan, pk=pk) if pk is not None else None
    return _edit(request, PlanForm, plan, kind="plan", list_url=reverse("plan_list"))


@staff_required
def host_list(request: HttpRequest) -> HttpResponse:
    hosts = Host.objects.annotate(n_vservers=Count("vservers"),
                                  memory_used=Sum("vservers__memory_mb"),
                                  disk_used=Sum("vservers__disk_gb"))
    return render(request, "hosting/staff/host_list.html", {"hosts": hosts})


@staff_required
def host_edit(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    host = get_object_or_404(Host, pk=pk) if pk is not None else None
    return _edit(request, HostForm, host, kind="host", list_url=reverse("host_list"))


def pool_size(pool: IPPool) -> int:
    """How many addresses POOL can hand out: its range less the ones allocate() skips."""
    try:
        first, last = int(ipaddress.ip_address(pool.first)), int(ipaddress.ip_address(pool.last))
        net = pool.net()
    except ValueError:
        return 0
    skip = {ipaddress.ip_address(r) for r in pool.reserved or [] if isinstance(r, str)}
    if pool.gateway:
        skip.add(ipaddress.ip_address(pool.gateway))
    skip.add(net.network_address)
    if net.version == 4:
        skip.add(net.broadcast_address)
    return max(0, last - first + 1 - sum(1 for a in skip if first <= int(a) <= last))


@staff_required
def pool_list(request: HttpRequest) -> HttpResponse:
    pools = IPPool.objects.select_related("host").annotate(used=Count("addresses"))
    rows = []
    for pool in pools:
        size = pool_size(pool)
        percent = min(100, round(100 * pool.used / size)) if size else 100
        rows.append({"pool": pool, "size": size, "used": pool.used,
                     "free": max(0, size - pool.used), "percent": percent,
                     "colour": bar_colour(percent)})
    return render(request, "hosting/staff/pool_list.html", {"rows": rows})


@staff_required
def pool_edit(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    pool = get_object_or_404(IPPool, pk=pk) if pk is not None else None
    return _edit(request, IPPoolForm, pool, kind="IP pool", list_url=reverse("pool_list"))


@staff_required
def audit_log(request: HttpRequest) -> HttpResponse:
    form = AuditFilterForm(request.GET or None, user=request.user)
    rows = AuditLog.objects.visible_to(request.user).select_related("customer")
    if form.is_valid():
        if form.cleaned_data["customer"] is not None:
            rows = rows.filter(customer=form.cleaned_data["customer"])
        if form.cleaned_data["action"]:
            rows = rows.filter(action=form.cleaned_data["action"])
        if form.cleaned_data["result"]:
            rows = rows.filter(result=form.cleaned_data["result"])
    page = Paginator(rows, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "hosting/staff/audit_log.html", {
        "form": form, "page": page, "query": query.urlencode()})
