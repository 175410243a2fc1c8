"""TOTP two-factor logins: enrolment (counts only once a code is typed back), the
second login step for every page, and VPANEL_STAFF_2FA's enrolment-first rule."""

from __future__ import annotations

import time
from typing import Any

from django.test import Client
from django.urls import reverse
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from panel.hosting.models import AuditLog
from tests.panel.factories import World
from tests.panel.pages.conftest import PASSWORD, ClientAs


def code(device: TOTPDevice, *, steps_ahead: int = 0) -> str:
    """The code DEVICE's app shows now (or STEPS_AHEAD periods later), as the app computes it."""
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time() + steps_ahead * device.step
    return f"{totp.token():0{device.digits}d}"


def wrong_code(device: TOTPDevice) -> str:
    """A code the device's app shows in none of the periods a check accepts."""
    good = {code(device, steps_ahead=n) for n in (-1, 0, 1, 2)}
    return next(c for c in ("000000", "111111", "222222", "333333", "444444") if c not in good)


def enrol(client: Client, user: object) -> TOTPDevice:
    response = client.get(reverse("totp_enrol"))
    assert response.status_code == 200
    device = TOTPDevice.objects.get(user=user, confirmed=False)
    response = client.post(reverse("totp_enrol"), {"code": code(device)})
    assert response.status_code == 302
    device.refresh_from_db()
    assert device.confirmed
    return device


def test_enrolment_shows_a_qr_code_and_counts_only_after_a_code(client: Client,
                                                                people: World) -> None:
    mia = people.users["member"]
    client.force_login(mia)
    response = client.get(reverse("totp_enrol"))
    body = response.content.decode()
    assert "<svg" in body and "TOTP key as a QR code" in body
    device = TOTPDevice.objects.get(user=mia)
    assert not device.confirmed
    # A wrong code: the device stays unconfirmed and logging in asks nothing more.
    response = client.post(reverse("totp_enrol"), {"code": wrong_code(device)})
    assert response.status_code == 400
    assert "does not match" in response.content.decode()
    device.refresh_from_db()
    assert not device.confirmed
    assert client.get(reverse("dashboard")).status_code == 200

    device.throttle_reset()  # the wrong code above made the device wait a second
    response = client.post(reverse("totp_enrol"), {"code": code(device)})
    assert response.status_code == 302
    device.refresh_from_db()
    assert device.confirmed
    assert AuditLog.objects.filter(action="enrol-totp", actor=mia).exists()
    # This session gave the code: it goes on without being asked again.
    assert client.get(reverse("dashboard")).status_code == 200


def test_login_with_a_device_asks_for_its_code_before_any_page(client: Client,
                                                               people: World) -> None:
    mia = people.users["member"]
    client.force_login(mia)
    device = enrol(client, mia)
    client.post(reverse("logout"))

    response = client.post(reverse("login"), {"username": "mia", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("otp_verify") + "?next=")
    # Password alone: every page, the admin's and the API's included, waits for the code.
    for url in (reverse("dashboard"), reverse("account"), "/admin/"):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("otp_verify")), url
    assert client.get("/api/v1/").status_code == 403

    response = client.post(reverse("otp_verify"), {"code": wrong_code(device)})
    assert response.status_code == 400
    assert "wrong or expired code" in response.content.decode()
    assert client.get(reverse("dashboard")).status_code == 302

    device.refresh_from_db()
    device.throttle_reset()
    # The enrolment used this period's code; a code is good once, so take the next one.
    response = client.post(reverse("otp_verify"), {"code": code(device, steps_ahead=1),
                                                   "next": reverse("account")})
    assert response.status_code == 302
    assert response["Location"] == reverse("account")
    assert client.get(reverse("dashboard")).status_code == 200


def test_a_used_code_is_not_taken_twice(client: Client, people: World) -> None:
    mia = people.users["member"]
    client.force_login(mia)
    device = enrol(client, mia)  # took this period's code
    other = Client()
    other.force_login(mia)
    response = other.post(reverse("otp_verify"), {"code": code(device)})
    assert response.status_code == 400


def test_turning_two_factor_off_needs_a_current_code(client: Client, people: World) -> None:
    mia = people.users["member"]
    client.force_login(mia)
    device = enrol(client, mia)
    client.post(reverse("totp_remove"), {"code": "12345x"})
    assert TOTPDevice.objects.filter(user=mia).exists()
    device.refresh_from_db()
    client.post(reverse("totp_remove"), {"code": code(device, steps_ahead=1)})
    assert not TOTPDevice.objects.filter(user=mia).exists()
    assert AuditLog.objects.filter(action="remove-totp", actor=mia).exists()


def test_staff_2fa_sends_staff_without_a_device_to_enrolment(client: Client, people: World,
                                                             settings: Any) -> None:
    settings.VPANEL_STAFF_2FA = True
    staff = people.users["staff"]
    response = client.post(reverse("login"), {"username": staff.username, "password": PASSWORD})
    assert response["Location"].startswith(reverse("totp_enrol"))
    for url in (reverse("dashboard"), reverse("customer_list"), "/admin/"):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("totp_enrol")), url
    response = client.get(reverse("totp_enrol"))
    assert "must use two-factor login" in response.content.decode()
    device = TOTPDevice.objects.get(user=staff)
    response = client.post(reverse("totp_enrol"), {"code": code(device),
                                                   "next": reverse("customer_list")})
    assert response["Location"] == reverse("customer_list")
    assert client.get(reverse("customer_list")).status_code == 200
    # And staff may not turn it off again.
    client.post(reverse("totp_remove"), {"code": code(device, steps_ahead=1)})
    assert TOTPDevice.objects.filter(user=staff, confirmed=True).exists()


def test_staff_2fa_leaves_other_users_alone(client_as: ClientAs, people: World,
                                            settings: Any) -> None:
    settings.VPANEL_STAFF_2FA = True
    assert client_as("member").get(reverse("dashboard")).status_code == 200


def test_staff_2fa_is_off_by_default(client_as: ClientAs, people: World) -> None:
    assert client_as("staff").get(reverse("dashboard")).status_code == 200
