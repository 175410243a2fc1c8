"""How the API knows who asks: named tokens (hashed, expiring, revocable, the
secret shown once) and browser sessions (with CSRF on every unsafe request)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.crypto import get_random_string
from rest_framework.test import APIClient

from panel.hosting.models import ApiToken
from tests.panel.factories import World, make_vserver


def with_token(secret: str) -> APIClient:
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Token {secret}")
    return c


def issue(world: World, role: str = "owner", **data: Any) -> dict[str, Any]:
    r = world.client(role).post(reverse("apitoken-list"), {"name": "ci", **data}, format="json")
    assert r.status_code == 201, r.content
    body: dict[str, Any] = r.json()
    return body


def test_token_secret_is_shown_once_and_never_its_digest(world: World) -> None:
    body = issue(world)
    secret = body["secret"]
    assert secret.startswith("vp_") and body["prefix"] == secret[3:11]
    token = ApiToken.objects.get(pk=body["id"])
    assert token.digest == ApiToken.hash(secret) and secret not in token.digest
    client = world.client("owner")
    for r in (client.get(reverse("apitoken-list")),
              client.get(reverse("apitoken-detail", args=[token.pk]))):
        text = r.content.decode()
        assert r.status_code == 200
        assert secret not in text and token.digest not in text
        assert "secret" not in text and "digest" not in text


def test_token_authenticates_the_api(world: World) -> None:
    vs = make_vserver(world.customer, world.host)
    secret = issue(world)["secret"]
    r = with_token(secret).get(reverse("vserver-list"))
    assert r.status_code == 200
    assert [v["id"] for v in r.json()["results"]] == [vs.pk]
    assert ApiToken.objects.get(digest=ApiToken.hash(secret)).last_used is not None


def test_token_of_another_tenant_sees_only_its_own(world: World) -> None:
    make_vserver(world.customer, world.host)
    secret = issue(world, "other")["secret"]
    assert with_token(secret).get(reverse("vserver-list")).json()["results"] == []


def test_expired_revoked_and_unknown_tokens_are_refused(world: World) -> None:
    expired = issue(world, expires=(timezone.now() + timedelta(seconds=30)).isoformat())
    ApiToken.objects.filter(pk=expired["id"]).update(
        expires=timezone.now() - timedelta(seconds=1))
    revoked = issue(world)
    r = world.client("owner").delete(reverse("apitoken-detail", args=[revoked["id"]]))
    assert r.status_code == 204
    for secret in (expired["secret"], revoked["secret"], "vp_" + "x" * 43, "garbage"):
        r = with_token(secret).get(reverse("vserver-list"))
        assert r.status_code == 401, secret
        assert r["WWW-Authenticate"] == "Token"


def test_token_of_an_inactive_user_is_refused(world: World) -> None:
    secret = issue(world)["secret"]
    user = world.user("owner")
    user.is_active = False
    user.save()
    assert with_token(secret).get(reverse("vserver-list")).status_code == 401


def test_revoking_keeps_the_token_listed_with_the_time(world: World) -> None:
    body = issue(world)
    world.client("owner").delete(reverse("apitoken-detail", args=[body["id"]]))
    listed = world.client("owner").get(reverse("apitoken-list")).json()["results"]
    assert [(t["id"], t["active"], t["revoked"] is not None) for t in listed] == \
        [(body["id"], False, True)]
    active = world.client("owner").get(reverse("apitoken-list"), {"active": "true"})
    assert active.json()["results"] == []


def test_tokens_are_private_to_their_user(world: World) -> None:
    body = issue(world, "owner")
    staff = world.client("staff")
    assert staff.get(reverse("apitoken-list")).json()["results"] == []
    for client in (staff, world.client("member")):
        mine = client.get(reverse("apitoken-detail", args=[body["id"]]))
        missing = client.get(reverse("apitoken-detail", args=[987654321]))
        assert mine.status_code == missing.status_code == 404
        assert mine.content == missing.content
        assert client.delete(reverse("apitoken-detail", args=[body["id"]])).status_code == 404
    assert ApiToken.objects.get(pk=body["id"]).revoked is None


def test_tokens_cannot_be_changed(world: World) -> None:
    body = issue(world)
    r = world.client("owner").patch(reverse("apitoken-detail", args=[body["id"]]),
                                    {"expires": None, "revoked": None}, format="json")
    assert r.status_code == 405


def test_token_expiry_must_be_in_the_future(world: World) -> None:
    r = world.client("owner").post(reverse("apitoken-list"),
                                   {"name": "old", "expires": "2000-01-01T00:00:00Z"},
                                   format="json")
    assert r.status_code == 400 and "expires" in r.json()
    assert not ApiToken.objects.exists()


def test_a_token_cannot_mint_a_longer_lived_one(world: World) -> None:
    soon = timezone.now() + timedelta(hours=1)
    parent = issue(world, expires=soon.isoformat())
    client = with_token(parent["secret"])
    for expires in (None, (soon + timedelta(days=1)).isoformat()):
        r = client.post(reverse("apitoken-list"), {"name": "child", "expires": expires},
                        format="json")
        assert r.status_code == 400 and r.json()["field"] == "expires"
    r = client.post(reverse("apitoken-list"),
                    {"name": "child", "expires": (soon - timedelta(minutes=5)).isoformat()},
                    format="json")
    assert r.status_code == 201


def test_token_list_cannot_be_ordered_by_digest(world: World) -> None:
    ids = [issue(world)["id"] for _ in range(4)]
    client = world.client("owner")
    default = [t["id"] for t in client.get(reverse("apitoken-list")).json()["results"]]
    by_digest = client.get(reverse("apitoken-list"), {"ordering": "digest"}).json()["results"]
    assert [t["id"] for t in by_digest] == default
    assert sorted(default) == sorted(ids)


# --- sessions and CSRF ---------------------------------------------------------------------

def session_client(world: World, role: str = "owner") -> Client:
    c = Client(enforce_csrf_checks=True)
    c.force_login(world.user(role))
    return c


def test_session_write_without_csrf_token_is_refused(world: World) -> None:
    vs = make_vserver(world.customer, world.host)
    c = session_client(world)
    assert c.get(reverse("vserver-list")).status_code == 200  # reads need no token
    r = c.post(reverse("apitoken-list"), {"name": "x"}, content_type="application/json")
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = c.post(reverse("vserver-start", args=[vs.pk]), content_type="application/json")
    assert r.status_code == 403
    r = c.delete(reverse("vserver-detail", args=[vs.pk]) + f"?confirm={vs.name}")
    assert r.status_code == 403
    vs.refresh_from_db()
    assert vs.status == "stopped"
    assert not ApiToken.objects.exists()


def test_session_write_with_csrf_token_is_accepted(world: World) -> None:
    from django.conf import settings

    c = session_client(world)
    secret = get_random_string(32)
    c.cookies[settings.CSRF_COOKIE_NAME] = secret
    r = c.post(reverse("apitoken-list"), {"name": "x"}, content_type="application/json",
               HTTP_X_CSRFTOKEN=secret)
    assert r.status_code == 201, r.content


def test_token_requests_need_no_csrf_token(world: World) -> None:
    secret = issue(world)["secret"]
    c = Client(enforce_csrf_checks=True)
    r = c.post(reverse("apitoken-list"), {"name": "y"}, content_type="application/json",
               HTTP_AUTHORIZATION=f"Token {secret}")
    assert r.status_code == 201


def test_anonymous_requests_are_asked_to_authenticate(world: World) -> None:
    c = APIClient()
    for name in ("vserver-list", "customer-list", "apitoken-list", "auditlog-list",
                 "host-list", "api-root"):
        r = c.get(reverse(name))
        assert r.status_code == 401, name


def test_a_client_over_its_rate_gets_429_with_retry_after(world: World, settings: Any) -> None:
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"user": "5/min", "anon": "2/min"}}
    client = world.client("owner")
    codes = [client.get(reverse("vserver-list")).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    r = client.get(reverse("vserver-list"))
    assert r.status_code == 429 and int(r["Retry-After"]) > 0
    # Another user has a rate of their own.
    assert world.client("admin").get(reverse("vserver-list")).status_code == 200
