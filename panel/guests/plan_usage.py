"""What a customer takes of its plan: the dashboard's usage bars.

One computation for both ways a page gets them: the dashboard's template
renders `usage_bars(customer)`, and its websocket is sent `plan_of(customer)`
(the same bars as JSON) whenever one of the customer's vservers changes, so
that the bars a page shows after its events equal a fresh load
(panel/guests/events.py, consumers.py).

`used` and `limit` are text, as the page shows them (1.5, not 1.50 or 1.5E0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

from django.db.models import QuerySet

from panel.guests import actions
from panel.hosting.models import PLAN_LIMIT_FIELDS, Customer

__all__ = ["BARS", "UsageBar", "customers_of", "plan_of", "usage_bars"]

# The bars of the dashboard, in order: the plan's limit field and its label.
BARS = (("max_vservers", "Vservers"), ("memory_mb", "Memory (MiB)"),
        ("cpu_cores", "CPU cores"), ("disk_gb", "Disk (GiB)"),
        ("max_ipv4", "IPv4 addresses"), ("max_ipv6", "IPv6 addresses"))


@dataclass(frozen=True)
class UsageBar:
    key: str  # the plan's limit field
    label: str
    used: str
    limit: str
    percent: int
    colour: str  # Bootstrap's: primary, warning from 75 %, danger from 90 %


def _text(value: Any) -> str:
    return f"{value.normalize():f}" if isinstance(value, Decimal) else str(value)


def usage_bars(customer: Customer) -> list[UsageBar]:
    """What CUSTOMER uses against its plan (with overrides), one bar per limit."""
    from panel.hosting.views import bar_colour

    limits, used = customer.limits(), actions.plan_usage(customer)
    bars = []
    for key, label in BARS:
        assert key in PLAN_LIMIT_FIELDS  # noqa: S101 (a typo here is a programming error)
        cap, now = getattr(limits, key), used[key]
        percent = 100 if not cap else min(100, round(100 * now / cap))
        bars.append(UsageBar(key, label, _text(now), _text(cap), percent, bar_colour(percent)))
    return bars


def customers_of(user: Any) -> QuerySet[Customer]:
    """The customers whose bars USER's dashboard shows: those USER is a member of
    (staff too: their dashboard is their own customers'; the Staff menu has the rest)."""
    return (Customer.objects.visible_to(user).filter(memberships__user=user)
            .select_related("plan").distinct())


def plan_of(customer: Customer) -> dict[str, Any]:
    """CUSTOMER's bars as the live dashboard is sent them."""
    return {"customer": customer.pk, "bars": [asdict(b) for b in usage_bars(customer)]}
