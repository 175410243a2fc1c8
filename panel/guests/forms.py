"""Forms of the vserver pages. What they check is the shape of the input; what the
plan and the roles allow is checked by panel/guests/actions.py, whose ActionError
names the field it is about, so the views put its message on that field.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms

from panel.guests.choices import VServerStatusChoices
from panel.guests.models import hostname_validator, name_validator
from panel.hosting.choices import MANAGING_ROLES
from panel.hosting.forms import BootstrapForm
from panel.hosting.models import Customer, Host

__all__ = [
    "ConfirmForm",
    "HostnameForm",
    "LimitsForm",
    "SSHKeyForm",
    "StopForm",
    "VServerCreateForm",
    "VServerFilterForm",
    "managed_customers",
]


def managed_customers(user: Any) -> Any:
    """The active customers in which USER may create vservers (staff: all of them)."""
    customers = Customer.objects.visible_to(user).filter(is_active=True).select_related("plan")
    if user.is_staff:
        return customers
    return customers.filter(memberships__user=user, memberships__role__in=MANAGING_ROLES)


class _LimitFields(forms.Form):
    memory_mb = forms.IntegerField(label="Memory (MiB)", min_value=16, initial=256)
    cpu_cores = forms.DecimalField(label="CPU cores", min_value=Decimal("0.05"),
                                   max_digits=6, decimal_places=2, initial=Decimal("1"))
    disk_gb = forms.IntegerField(label="Disk (GiB)", min_value=1, initial=1)
    processes = forms.IntegerField(label="Processes", min_value=8, initial=128)


class VServerCreateForm(BootstrapForm, _LimitFields):
    customer = forms.ModelChoiceField(queryset=Customer.objects.none())
    name = forms.CharField(max_length=31, validators=[name_validator],
                           help_text="a lower-case letter, then lower-case letters, digits, '-'")
    hostname = forms.CharField(max_length=64, required=False, validators=[hostname_validator],
                               help_text="empty: the name")
    template = forms.CharField(max_length=31, required=False,
                               help_text="empty: a minimal busybox system")
    ipv4 = forms.IntegerField(label="IPv4 addresses", min_value=0, max_value=16, initial=1)
    ipv6 = forms.IntegerField(label="IPv6 addresses", min_value=0, max_value=16, initial=0)

    field_order = ["customer", "name", "hostname", "template", "memory_mb", "cpu_cores",
                   "disk_gb", "processes", "ipv4", "ipv6"]

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        customers = managed_customers(user)
        field = self.fields["customer"]
        field.queryset = customers  # type: ignore[attr-defined]
        if len(customers) == 1:
            field.initial = customers[0].pk
        # When the plans offer a fixed list of templates, offer that list.
        offered = sorted({t for c in customers if c.plan for t in c.plan.templates or []})
        if offered and all(c.plan and c.plan.templates for c in customers):
            self.fields["template"] = forms.ChoiceField(
                choices=[(t, t) for t in offered], help_text="the templates of your plan")
            self.fields["template"].widget.attrs["class"] = "form-select"


class StopForm(BootstrapForm, forms.Form):
    force = forms.BooleanField(required=False, label="Force stop",
                               help_text="kill every process at once instead of shutting "
                                         "down cleanly")


class ConfirmForm(BootstrapForm, forms.Form):
    """Reinstall and delete: type the vserver's name to confirm."""

    confirm = forms.CharField(max_length=31, label="Type the vserver's name to confirm",
                              widget=forms.TextInput(attrs={"autocomplete": "off",
                                                            "spellcheck": "false"}))
    template = forms.CharField(max_length=31, required=False,
                               help_text="reinstall only; empty: keep the current template")


class HostnameForm(BootstrapForm, forms.Form):
    hostname = forms.CharField(max_length=64, validators=[hostname_validator])


class LimitsForm(BootstrapForm, _LimitFields):
    pass


class SSHKeyForm(BootstrapForm, forms.Form):
    name = forms.CharField(max_length=64)
    key = forms.CharField(max_length=16384, label="Public key",
                          widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false",
                                                       "placeholder": "ssh-ed25519 AAAA... "
                                                                      "you@laptop"}))


class VServerFilterForm(BootstrapForm, forms.Form):
    q = forms.CharField(required=False, label="Name")
    customer = forms.ModelChoiceField(queryset=Customer.objects.none(), required=False,
                                      empty_label="all customers")
    status = forms.ChoiceField(required=False,
                               choices=[("", "any status"), *VServerStatusChoices.choices])
    host = forms.ModelChoiceField(queryset=Host.objects.none(), required=False,
                                  empty_label="all hosts")

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["customer"].queryset = Customer.objects.visible_to(  # type: ignore[attr-defined]
            user)
        if user.is_staff:
            self.fields["host"].queryset = Host.objects.all()  # type: ignore[attr-defined]
        else:
            del self.fields["host"]
