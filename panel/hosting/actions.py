"""Every change to memberships, API tokens, two-factor devices and staff records (do_*).

Like panel/guests/actions.py: each runs in a transaction, checks who may do it,
and writes its audit row (action names verb-object, as there); the API's
viewsets, the pages and the admin call these rather than saving themselves.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.db import transaction
from django.utils import timezone

from panel.guests.actions import ActionError, Actor, Denied, audit, records_denials, role
from panel.hosting.choices import RoleChoices
from panel.hosting.models import ApiToken, Customer, Membership

__all__ = [
    "add_member",
    "issue_token",
    "remove_member",
    "revoke_token",
    "save_form",
    "set_member_role",
    "two_factor_changed",
]


def _require_owner(actor: Actor, customer: Customer, action: str, target: Any = None) -> None:
    """Memberships are their customer's owners' (and staff's) to change."""
    r = role(actor.user, customer)
    if r != RoleChoices.ROLE_OWNER:
        raise Denied(f"your role ({r or 'none'}) may not {action.replace('-', ' ')}",
                     audit=(actor, customer, target, action))


def _keep_an_owner(m: Membership, new_role: str | None) -> None:
    """Refuse to leave a customer without an owner (nobody could then manage it)."""
    if m.role != RoleChoices.ROLE_OWNER or new_role == RoleChoices.ROLE_OWNER:
        return
    others = Membership.objects.filter(customer_id=m.customer_id,
                                       role=RoleChoices.ROLE_OWNER).exclude(pk=m.pk)
    if not others.exists():
        raise ActionError(f"{m.user} is the last owner of {m.customer}: make another member "
                          f"owner first", "role")


# --- memberships ---------------------------------------------------------------------------

@records_denials
@transaction.atomic
def add_member(customer: Customer, *, actor: Actor, user: Any, role: str) -> Membership:
    _require_owner(actor, customer, "add-member", customer)
    customer = Customer.objects.select_for_update().get(pk=customer.pk)
    if Membership.objects.filter(customer=customer, user=user).exists():
        raise ActionError(f"{user} is already a member of {customer}", "user")
    m = Membership.objects.create(customer=customer, user=user, role=role)
    audit(actor, customer, m, "add-member", user=user.get_username(), role=role)
    return m


@records_denials
@transaction.atomic
def set_member_role(m: Membership, *, actor: Actor, role: str) -> Membership:
    m = Membership.objects.select_for_update().select_related("customer", "user").get(pk=m.pk)
    _require_owner(actor, m.customer, "set-member-role", m)
    _keep_an_owner(m, role)
    old = m.role
    Membership.objects.filter(pk=m.pk).update(role=role)
    m.role = role
    audit(actor, m.customer, m, "set-member-role", user=m.user.get_username(), old=old,
          new=role)
    return m


@records_denials
@transaction.atomic
def remove_member(m: Membership, *, actor: Actor) -> None:
    m = Membership.objects.select_for_update().select_related("customer", "user").get(pk=m.pk)
    _require_owner(actor, m.customer, "remove-member", m)
    _keep_an_owner(m, None)
    name, customer = m.user.get_username(), m.customer
    audit(actor, customer, m, "remove-member", user=name, role=m.role)
    m.delete()


# --- API tokens -------------------------------------------------------------------------------

@records_denials
@transaction.atomic
def issue_token(*, actor: Actor, name: str, expires: Any = None) -> tuple[ApiToken, str]:
    """A new API token of the acting user, and its secret: shown once, only its hash kept."""
    token, secret = ApiToken.issue(actor.user, name, expires)
    audit(actor, None, token, "create-api-token",
          expires=expires.isoformat() if expires is not None else None)
    return token, secret


@records_denials
@transaction.atomic
def revoke_token(token: ApiToken, *, actor: Actor) -> None:
    if token.user_id != getattr(actor.user, "pk", None):
        raise Denied("only its owner may revoke a token")
    if ApiToken.objects.filter(pk=token.pk, revoked__isnull=True).update(revoked=timezone.now()):
        audit(actor, None, token, "revoke-api-token")


# --- two-factor devices and staff records ----------------------------------------------------

def two_factor_changed(actor: Actor, action: str) -> None:
    """Audit a user's TOTP enrolment ('enrol-totp') or its removal ('remove-totp')."""
    audit(actor, None, actor.user, action)


@records_denials
@transaction.atomic
def save_form(form: forms.ModelForm, *, actor: Actor) -> Any:  # type: ignore[type-arg]
    """Save a staff page's valid ModelForm (the model's clean() has run) and audit it.

    Staff only: the pages that call it are. Audited as 'create-<model>' or
    'update-<model>' with the changed fields, as the API's staff edits are.
    """
    if not getattr(actor.user, "is_staff", False):
        raise Denied("staff only")
    creating = form.instance.pk is None
    obj = form.save()
    customer = obj if isinstance(obj, Customer) else getattr(obj, "customer", None)
    verb = "create" if creating else "update"
    audit(actor, customer, obj, f"{verb}-{type(obj).__name__.lower()}",
          fields=sorted(form.changed_data))
    return obj
