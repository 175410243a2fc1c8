"""The account page's API tokens: the secret is shown once, on the answer that made it."""

from __future__ import annotations

import re

from django.test import Client
from django.urls import reverse

from panel.hosting.models import ApiToken, AuditLog
from tests.panel.factories import World
from tests.panel.pages.conftest import ClientAs


def make_token(client: Client, name: str = "billing", expires: str = "") -> tuple[str, str]:
    response = client.post(reverse("token_create"), {"name": name, "expires": expires})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    body = response.content.decode()
    secret = re.search(r'value="(vp_[A-Za-z0-9_-]+)"', body)
    assert secret is not None
    return secret.group(1), body


def test_a_token_is_shown_once_and_the_list_never_shows_it(client_as: ClientAs,
                                                           people: World) -> None:
    client = client_as("member")
    secret, body = make_token(client)
    assert "shown on this page only" in body
    token = ApiToken.objects.get(user=people.users["member"], name="billing")
    assert token.digest == ApiToken.hash(secret)  # the secret made is the one kept (hashed)
    assert AuditLog.objects.filter(action="create-api-token",
                                   actor=people.users["member"]).exists()

    account = client.get(reverse("account")).content.decode()
    assert "billing" in account
    assert f"vp_{token.prefix}" in account  # the first characters, to tell tokens apart
    assert secret not in account
    assert token.digest not in account
    # The secret works on the API.
    api = Client(HTTP_AUTHORIZATION=f"Token {secret}")
    assert api.get("/api/v1/").status_code != 401


def test_a_token_with_an_expiry_in_the_past_is_refused(client_as: ClientAs,
                                                       people: World) -> None:
    response = client_as("member").post(reverse("token_create"),
                                        {"name": "old", "expires": "2000-01-01T00:00"})
    assert response.status_code == 400
    assert "a time in the future" in response.content.decode()
    assert not ApiToken.objects.filter(name="old").exists()


def test_revoke_is_for_the_tokens_owner_only(client_as: ClientAs, people: World) -> None:
    mine = client_as("member")
    make_token(mine)
    token = ApiToken.objects.get(name="billing")
    response = client_as("other").post(reverse("token_revoke", args=[token.pk]))
    assert response.status_code == 404
    token.refresh_from_db()
    assert token.revoked is None
    response = mine.post(reverse("token_revoke", args=[token.pk]))
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked is not None
    assert "Revoked" in mine.get(reverse("account")).content.decode()
