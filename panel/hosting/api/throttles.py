"""Request rates of the REST API: per user (or token) and per anonymous address.

DRF's own classes read their rates once, at import; these read
settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] at each request, so a
deployment (VPANEL_API_RATE, VPANEL_API_ANON_RATE) and a test may change them.
A client over its rate gets 429 with Retry-After. The counters live in
Django's cache: per process with the default cache, so several panel
processes each allow the rate (a shared cache makes it one).
"""

from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import AnonRateThrottle, UserRateThrottle

__all__ = ["AnonThrottle", "UserThrottle"]


def _rate(scope: str) -> str | None:
    rates: dict[str, str | None] = settings.REST_FRAMEWORK.get("DEFAULT_THROTTLE_RATES", {})
    return rates.get(scope)


class UserThrottle(UserRateThrottle):
    def get_rate(self) -> str | None:
        return _rate(self.scope)


class AnonThrottle(AnonRateThrottle):
    def get_rate(self) -> str | None:
        return _rate(self.scope)
