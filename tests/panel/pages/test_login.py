"""Logging in and out: Django's login with axes' throttling, a new session key at login."""

from __future__ import annotations

from django.conf import settings
from django.test import Client
from django.urls import reverse

from tests.panel.factories import World
from tests.panel.pages.conftest import PASSWORD


def test_login_page_renders_with_bootstrap_and_no_cdn(client: Client) -> None:
    response = client.get(reverse("login"))
    assert response.status_code == 200
    body = response.content.decode()
    assert 'name="password"' in body
    assert "/static/vendor/bootstrap-5.3.9/bootstrap.min.css" in body
    assert "/static/vendor/bootstrap-5.3.9/bootstrap.bundle.min.js" in body
    assert "cdn" not in body.lower()


def test_login_works_and_rotates_the_session_key(client: Client, people: World) -> None:
    session = client.session  # an anonymous session, before logging in
    session["seen"] = True
    session.save()
    before = session.session_key
    assert client.cookies[settings.SESSION_COOKIE_NAME].value == before

    response = client.post(reverse("login"), {"username": "mia", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == reverse("dashboard")
    after = client.cookies[settings.SESSION_COOKIE_NAME].value
    assert after and after != before  # a fixed session id cannot be planted before login
    assert client.get(reverse("dashboard")).status_code == 200


def test_login_follows_a_local_next_but_not_a_foreign_one(client: Client, people: World) -> None:
    response = client.post(reverse("login") + "?next=/account/",
                           {"username": "mia", "password": PASSWORD, "next": "/account/"})
    assert response["Location"] == "/account/"
    client.post(reverse("logout"))
    response = client.post(reverse("login"), {"username": "mia", "password": PASSWORD,
                                              "next": "https://evil.example/"})
    assert response["Location"] == reverse("dashboard")


def test_five_wrong_passwords_lock_the_user_out_with_a_message(client: Client,
                                                               people: World) -> None:
    for _ in range(4):
        response = client.post(reverse("login"), {"username": "mia", "password": "wrong"})
        assert response.status_code == 200
        assert "Please enter a correct username and password" in response.content.decode()
    response = client.post(reverse("login"), {"username": "mia", "password": "wrong"})
    assert response.status_code == 429
    body = response.content.decode()
    assert "Too many failed logins" in body
    assert "Logging in as mia is locked" in body
    # Now even the right password is refused, from this address for this user.
    response = client.post(reverse("login"), {"username": "mia", "password": PASSWORD})
    assert response.status_code == 429
    assert "Too many failed logins" in response.content.decode()
    assert client.get(reverse("dashboard")).status_code == 302  # not logged in


def test_the_lock_is_per_user_and_address(client: Client, people: World) -> None:
    for _ in range(5):
        client.post(reverse("login"), {"username": "mia", "password": "wrong"})
    other_address = Client(REMOTE_ADDR="198.18.100.7")
    response = other_address.post(reverse("login"), {"username": "mia", "password": PASSWORD})
    assert response.status_code == 302
    response = client.post(reverse("login"), {"username": "adam", "password": PASSWORD})
    assert response.status_code == 302


def test_logout_takes_a_post_only(client: Client, people: World) -> None:
    client.force_login(people.users["member"])
    assert client.get(reverse("logout")).status_code == 405
    response = client.post(reverse("logout"))
    assert response.status_code == 302
    assert response["Location"] == reverse("login")
    assert client.get(reverse("dashboard")).status_code == 302


def test_home_sends_a_logged_in_user_to_the_dashboard(client: Client, people: World) -> None:
    assert client.get("/").status_code == 200  # anonymous: what vpanel is
    client.force_login(people.users["member"])
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == reverse("dashboard")


def test_pages_ask_anonymous_users_to_log_in(client: Client, people: World) -> None:
    for name in ("dashboard", "vserver_list", "vserver_create", "account", "totp_enrol"):
        response = client.get(reverse(name))
        assert response.status_code == 302, name
        assert response["Location"].startswith(reverse("login") + "?next="), name
