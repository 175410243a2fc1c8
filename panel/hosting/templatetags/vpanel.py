"""Template helpers of the panel's pages: badges coloured from choices.py, form fields
with Bootstrap's classes, and numbers without trailing zeros.

Colours come from the *_COLOURS maps next to each choice set (STYLE.md), so
no template spells out which status is green.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import template
from django.utils.html import format_html
from django.utils.safestring import SafeString

from panel.guests.choices import OPERATION_COLOURS, STATUS_COLOURS
from panel.hosting.choices import AUDIT_RESULT_COLOURS, HOST_STATE_COLOURS

register = template.Library()


def _badge(colour: str, label: Any) -> SafeString:
    return format_html('<span class="badge text-bg-{}">{}</span>', colour, label)


@register.filter
def status_badge(vserver: Any) -> SafeString:
    """A vserver's status as a coloured badge."""
    return _badge(STATUS_COLOURS.get(vserver.status, "secondary"), vserver.get_status_display())


@register.filter
def operation_badge(op: Any) -> SafeString:
    return _badge(OPERATION_COLOURS.get(op.state, "secondary"), op.get_state_display())


@register.filter
def host_badge(host: Any) -> SafeString:
    return _badge(HOST_STATE_COLOURS.get(host.state, "secondary"), host.get_state_display())


@register.filter
def result_badge(row: Any) -> SafeString:
    return _badge(AUDIT_RESULT_COLOURS.get(row.result, "secondary"), row.get_result_display())


@register.filter
def plain_number(value: Any) -> str:
    """1.50 -> 1.5, 2.00 -> 2; anything else unchanged."""
    if isinstance(value, Decimal):
        return f"{value.normalize():f}"
    return str(value)


@register.filter
def detail_text(detail: Any) -> str:
    """An audit row's detail as 'key: value' pairs (lists joined), empty values left out."""
    if not isinstance(detail, dict):
        return "" if detail is None else str(detail)
    parts = []
    for key, value in detail.items():
        if value in (None, "", [], {}):
            continue
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        parts.append(f"{key}: {value}")
    return " · ".join(parts)


@register.inclusion_tag("includes/field.html")
def field(bound_field: Any, *, label: bool = True) -> dict[str, Any]:
    """One form field: label, widget, help text and errors, in Bootstrap's markup."""
    return {"field": bound_field, "show_label": label}
