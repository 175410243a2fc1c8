"""Fixtures of the page tests: the API tests' world (tests/panel/conftest.py), with
passwords, and clients logged in as each role.

Actions run their database part only: the agent's work starts on commit, which
plain `db` tests never reach (VPANEL_OPERATIONS_INLINE stays unset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from panel.guests.models import VServer
from tests.panel.factories import World

PASSWORD = "correct horse battery staple"  # noqa: S105 (a test user's)

ClientAs = Callable[[str], Client]
MakeVServer = Callable[..., VServer]


@pytest.fixture
def people(world: World) -> World:
    """The world, with PASSWORD as every user's password."""
    for user in world.users.values():
        user.set_password(PASSWORD)
        user.save()
    return world


@pytest.fixture
def client_as(world: World) -> ClientAs:
    """A page client logged in as ROLE (owner, admin, member, other, staff)."""

    def make(role: str, **kwargs: Any) -> Client:
        c = Client(**kwargs)
        c.force_login(world.users[role])
        return c

    return make


@pytest.fixture(autouse=True)
def fast_password_hashes(settings: Any) -> None:
    """PBKDF2's deliberate slowness, times five users per test, is not what is tested here."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
