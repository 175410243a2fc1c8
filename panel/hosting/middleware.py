"""The second login step, for every page (the panel's, the admin's, the API's by session).

A password alone logs a user in (Django's LoginView or the admin's), but while
that user has a confirmed TOTP device and this session has not given one of
its codes (django-otp's OTPMiddleware says: user.is_verified()), every request
is sent to the code page. Under VPANEL_STAFF_2FA, staff without a device are
sent to enrolment instead. Only those two pages and logout are let through.

Requests authenticated by an API token carry no session user here (DRF
authenticates them later), so the API's token clients are not affected.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlencode

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.urls import reverse
from django_otp import user_has_device

__all__ = ["TwoFactorMiddleware", "second_step"]

# Where a session that still owes its second factor is sent, by what it owes.
VERIFY, ENROL = "otp_verify", "totp_enrol"


def second_step(request: HttpRequest) -> str | None:
    """The URL name of the page this session must pass first, or None."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    is_verified = getattr(user, "is_verified", None)
    if is_verified is not None and is_verified():
        return None
    if user_has_device(user, confirmed=True):
        return VERIFY
    if getattr(settings, "VPANEL_STAFF_2FA", False) and user.is_staff:
        return ENROL
    return None


class TwoFactorMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        step = second_step(request)
        if step is not None:
            allowed = {reverse(step), reverse("logout")}
            if request.path_info not in allowed:
                return self._refuse(request, step)
        return self.get_response(request)

    @staticmethod
    def _refuse(request: HttpRequest, step: str) -> HttpResponse:
        if request.path_info.startswith("/api/"):
            what = "a code from your authenticator" if step == VERIFY else "a TOTP device"
            return JsonResponse({"detail": f"log in completely first: this session needs "
                                           f"{what}"}, status=403)
        url = reverse(step)
        if request.method in ("GET", "HEAD"):
            url += "?" + urlencode({"next": request.get_full_path()})
        return HttpResponseRedirect(url)
