"""Forms of the hosting pages: login steps, account, API tokens and the staff pages.

Validation lives here and in the models' clean() (ModelForms call it), never
only in templates or JavaScript (STYLE.md).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm
from django.utils import timezone

from panel.hosting.choices import AuditResultChoices, RoleChoices
from panel.hosting.models import AuditLog, Customer, Host, IPPool, Plan

__all__ = [
    "ApiTokenForm",
    "AuditFilterForm",
    "BootstrapForm",
    "CustomerForm",
    "HostForm",
    "IPPoolForm",
    "LoginForm",
    "MemberForm",
    "OTPCodeForm",
    "PlanForm",
]


class BootstrapForm:
    """Give every widget Bootstrap's class, and mark the fields that have errors.

    A mixin for forms.Form and forms.ModelForm: the templates then render any
    form the same way (templates/includes/field.html).
    """

    fields: dict[str, forms.Field]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        for f in self.fields.values():
            w = f.widget
            if isinstance(w, forms.CheckboxInput):
                css = "form-check-input"
            elif isinstance(w, forms.Select | forms.SelectMultiple):
                css = "form-select"
            else:
                css = "form-control"
            w.attrs["class"] = f"{w.attrs.get('class', '')} {css}".strip()

    def full_clean(self) -> None:
        super().full_clean()  # type: ignore[misc]
        for name in getattr(self, "errors", {}):
            if name in self.fields:
                w = self.fields[name].widget
                if "is-invalid" not in w.attrs.get("class", ""):
                    w.attrs["class"] = f"{w.attrs.get('class', '')} is-invalid".strip()
                w.attrs["aria-invalid"] = "true"


def add_error(form: forms.BaseForm, field: str | None, message: Any) -> None:
    """form.add_error for a field the form may not have (then a form-wide error)."""
    form.add_error(field if field in form.fields else None, message)
    if isinstance(form, BootstrapForm) and field in form.fields:
        w = form.fields[field].widget
        if "is-invalid" not in w.attrs.get("class", ""):
            w.attrs["class"] = f"{w.attrs.get('class', '')} is-invalid".strip()


# --- logging in ----------------------------------------------------------------------

class LoginForm(BootstrapForm, AuthenticationForm):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["username"].widget.attrs["autocomplete"] = "username"
        self.fields["password"].widget.attrs["autocomplete"] = "current-password"


class OTPCodeForm(BootstrapForm, forms.Form):
    """The six digits of an authenticator app."""

    code = forms.RegexField(
        regex=r"^\s*\d{6}\s*$", label="Code from your authenticator app",
        error_messages={"invalid": "six digits"},
        widget=forms.TextInput(attrs={"inputmode": "numeric", "autocomplete": "one-time-code",
                                      "maxlength": "7", "autofocus": True}))

    def clean_code(self) -> str:
        return str(self.cleaned_data["code"]).strip()


# --- account ---------------------------------------------------------------------------

class ApiTokenForm(BootstrapForm, forms.Form):
    name = forms.CharField(max_length=64, help_text="what the token is for, e.g. 'billing'")
    expires = forms.DateTimeField(
        required=False, help_text="optional; empty: until revoked",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"},
                                   format="%Y-%m-%dT%H:%M"))

    def clean_expires(self) -> Any:
        expires = self.cleaned_data["expires"]
        if expires is not None and expires <= timezone.now():
            raise forms.ValidationError("a time in the future")
        return expires


# --- staff pages -------------------------------------------------------------------------

class PlanForm(BootstrapForm, forms.ModelForm):
    class Meta:
        model = Plan
        fields = ["name", "description", "max_vservers", "max_ipv4", "max_ipv6", "memory_mb",
                  "cpu_cores", "disk_gb", "processes", "allowed_caps", "allowed_flags",
                  "console_allowed", "templates"]


class CustomerForm(BootstrapForm, forms.ModelForm):
    class Meta:
        model = Customer
        fields = ["name", "slug", "kind", "plan", "is_active", "override_max_vservers",
                  "override_max_ipv4", "override_max_ipv6", "override_memory_mb",
                  "override_cpu_cores", "override_disk_gb", "override_processes"]
        help_texts = {f"override_{f}": "empty: the plan's value" for f in (
            "max_vservers", "max_ipv4", "max_ipv6", "memory_mb", "cpu_cores", "disk_gb",
            "processes")}


class MemberForm(BootstrapForm, forms.Form):
    """Add a user to a customer (or change their role there)."""

    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=RoleChoices.choices, initial=RoleChoices.ROLE_MEMBER)

    def clean_username(self) -> Any:
        name = self.cleaned_data["username"]
        user = get_user_model().objects.filter(username=name).first()
        if user is None:
            raise forms.ValidationError(f"no user {name!r}")
        return user


class HostForm(BootstrapForm, forms.ModelForm):
    class Meta:
        model = Host
        fields = ["name", "agent_socket", "state", "max_vservers", "memory_mb", "cpu_cores",
                  "disk_gb", "iprootdev"]


class IPPoolForm(BootstrapForm, forms.ModelForm):
    class Meta:
        model = IPPool
        fields = ["name", "host", "family", "network", "first", "last", "gateway", "reserved"]


class AuditFilterForm(BootstrapForm, forms.Form):
    customer = forms.ModelChoiceField(queryset=Customer.objects.none(), required=False,
                                      empty_label="all customers")
    action = forms.ChoiceField(required=False)
    result = forms.ChoiceField(required=False,
                               choices=[("", "any result"), *AuditResultChoices.choices])

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["customer"].queryset = Customer.objects.visible_to(user)  # type: ignore[attr-defined]
        actions = (AuditLog.objects.visible_to(user).order_by("action")
                   .values_list("action", flat=True).distinct())
        self.fields["action"].choices = [  # type: ignore[attr-defined]
            ("", "any action"), *((a, a) for a in actions)]
