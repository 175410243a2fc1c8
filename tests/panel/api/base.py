"""The generic API test case (after NetBox's utilities/testing/api.py).

An endpoint's test class subclasses APIViewTestCase and mostly sets class
attributes: the router basename, which operations exist, which roles may do
what, the payloads. The inherited tests then check list, get, create, update,
delete and every action as each role of tests/panel/conftest.py:

- anonymous: 401, nothing changed;
- other (another tenant's owner): the object answers exactly like a missing
  one (same status, same body), and nothing changed;
- member, admin, owner, staff: allowed ones succeed, the rest answer 403 and
  change nothing.

Plus a fixed query count on the list as rows grow (2 vs 20), and pagination,
ordering and search on the list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from django.db import connection
from django.db.models import Model
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from panel.guests.models import Operation, SSHKey
from panel.hosting.models import ApiToken, AuditLog, IPAddress, Membership
from tests.panel.factories import ROLES, World

TENANT_ROLES = frozenset({"member", "admin", "owner", "staff"})
MANAGERS = frozenset({"admin", "owner", "staff"})
STAFF = frozenset({"staff"})

MISSING_PK = 987_654_321


@dataclass(frozen=True)
class ActionSpec:
    """A POST route on the object (`@action`), who may call it and what it answers."""

    name: str  # the URL name suffix: basename-NAME
    roles: frozenset[str]
    payload: Callable[[Any], dict[str, Any]] = field(default=lambda obj: {})
    status: int = 202
    prepare: Callable[[Any], None] | None = None  # put the object in a state it needs


class APIViewTestCase:
    """Configure with class attributes; override the make_* hooks."""

    basename: ClassVar[str]
    model: ClassVar[type[Model]]
    # Which of create, update and delete the endpoint has (list and get: always);
    # the others must answer 405.
    operations: ClassVar[frozenset[str]] = frozenset({"create", "update", "delete"})
    # True: the object belongs to tenant A (others answer 404); False: a platform
    # object, the whole endpoint is staff-only (others answer 403).
    tenant_scoped: ClassVar[bool] = True
    read_roles: ClassVar[frozenset[str]] = TENANT_ROLES
    create_roles: ClassVar[frozenset[str]] = MANAGERS
    update_roles: ClassVar[frozenset[str]] = MANAGERS
    delete_roles: ClassVar[frozenset[str]] = MANAGERS
    create_status: ClassVar[int] = 201
    update_status: ClassVar[int] = 200
    delete_status: ClassVar[int] = 204
    # What a create by the other tenant answers: 400 when the payload names
    # tenant A's customer (refused like a missing id), 403 when writes are
    # staff-only, 404 when the URL itself names A's object.
    create_other_status: ClassVar[int] = 400
    actions: ClassVar[tuple[ActionSpec, ...]] = ()
    # True: the list's URL names tenant A's object (/vservers/{id}/ssh-keys/), so
    # the other tenant's list answers 404 too.
    nested: ClassVar[bool] = False
    ordering_field: ClassVar[str] = "id"
    search_term: ClassVar[str | None] = None  # a term that finds the objects made

    # --- hooks ------------------------------------------------------------------------

    def make_object(self, world: World) -> Model:
        """A new object of tenant A (or of the platform); each call a different one."""
        raise NotImplementedError

    def make_deletable(self, world: World) -> Model:
        """An object for the delete test: one nothing protects from deletion."""
        return self.make_object(world)

    def create_payload(self, world: World) -> dict[str, Any]:
        raise NotImplementedError

    def update_payload(self, world: World, obj: Any) -> dict[str, Any]:
        raise NotImplementedError

    def list_url(self, world: World, obj: Any = None) -> str:
        return reverse(f"{self.basename}-list")

    def detail_url(self, obj: Any, pk: Any = None) -> str:
        return reverse(f"{self.basename}-detail", args=[obj.pk if pk is None else pk])

    def missing_url(self, obj: Any, suffix: str = "detail") -> str:
        """The URL of the same kind naming an object that does not exist."""
        if suffix == "detail":
            return self.detail_url(obj, MISSING_PK)
        return reverse(f"{self.basename}-{suffix}", args=[MISSING_PK])

    def delete_query(self, obj: Any) -> str:
        return ""

    def assert_created(self, world: World, response: Any) -> None:
        pass

    def assert_updated(self, world: World, obj: Any, response: Any) -> None:
        assert self.snapshot(obj) != self._before

    def assert_deleted(self, world: World, obj: Any) -> None:
        assert not type(obj)._base_manager.filter(pk=obj.pk).exists()

    def snapshot(self, obj: Any) -> Any:
        """Everything a request might change: the row and what hangs off it."""
        row = type(obj)._base_manager.filter(pk=obj.pk).values().first()
        return (row, self.counts())

    @staticmethod
    def counts() -> dict[str, int]:
        return {m.__name__: m._base_manager.count()
                for m in (Operation, SSHKey, IPAddress, Membership, ApiToken)} | {
            "revoked": ApiToken.objects.filter(revoked__isnull=False).count(),
            "audit_ok": AuditLog.objects.filter(result="ok").count()}

    # --- helpers ------------------------------------------------------------------------

    def _absent(self, operation: str, world: World, role: str) -> bool:
        """True when the endpoint has no OPERATION: then it must answer 405 (to staff)
        and change nothing."""
        if operation in self.operations:
            return False
        if role == "staff":
            obj = self.make_object(world)
            before = self.snapshot(obj)
            client = world.client(role)
            r = {"create": lambda: client.post(self.list_url(world, obj), {}, format="json"),
                 "update": lambda: client.patch(self.detail_url(obj), {}, format="json"),
                 "delete": lambda: client.delete(self.detail_url(obj)),
                 }[operation]()
            assert r.status_code == 405, r.content
            assert self.snapshot(obj) == before
        return True

    def refused_status(self, role: str) -> int:
        """What ROLE gets for a request it may not make on tenant A's object."""
        if role == "anonymous":
            return 401
        if not self.tenant_scoped:
            return 403
        if role == "other":
            return 404
        return 403

    def assert_like_missing(self, client: Any, method: str, url: str, missing: str,
                            data: Any = None) -> Any:
        """Another tenant's object answers exactly as a missing one: same status, same body."""
        call = getattr(client, method)
        seen = call(url, data, format="json") if data is not None else call(url)
        absent = call(missing, data, format="json") if data is not None else call(missing)
        assert seen.status_code == absent.status_code == 404, (seen.status_code, seen.content)
        assert seen.content == absent.content
        return seen

    # --- the tests ------------------------------------------------------------------------

    @pytest.mark.parametrize("role", ROLES)
    def test_list(self, world: World, role: str) -> None:
        obj = self.make_object(world)
        r = world.client(role).get(self.list_url(world, obj))
        if role in self.read_roles:
            assert r.status_code == 200, r.content
            assert obj.pk in [o["id"] for o in r.json()["results"]]
        elif role == "anonymous":
            assert r.status_code == 401
        elif self.tenant_scoped and role == "other" and self.nested:
            assert r.status_code == 404, r.content
        elif self.tenant_scoped and role == "other":
            assert r.status_code == 200, r.content
            assert obj.pk not in [o["id"] for o in r.json()["results"]]
        else:
            assert r.status_code == self.refused_status(role), r.content

    @pytest.mark.parametrize("role", ROLES)
    def test_get(self, world: World, role: str) -> None:
        obj = self.make_object(world)
        client = world.client(role)
        if role in self.read_roles:
            r = client.get(self.detail_url(obj))
            assert r.status_code == 200, r.content
            assert r.json()["id"] == obj.pk
        elif role == "other" and self.tenant_scoped:
            self.assert_like_missing(client, "get", self.detail_url(obj), self.missing_url(obj))
        else:
            assert client.get(self.detail_url(obj)).status_code == self.refused_status(role)

    @pytest.mark.parametrize("role", ROLES)
    def test_create(self, world: World, role: str) -> None:
        if self._absent("create", world, role):
            return
        payload, url = self.create_payload(world), self.list_url(world)
        before = self.counts() | {"n": self.model._base_manager.count()}
        r = world.client(role).post(url, payload, format="json")
        if role in self.create_roles:
            assert r.status_code == self.create_status, r.content
            assert self.model._base_manager.count() == before["n"] + 1
            self.assert_created(world, r)
            return
        if role == "anonymous":
            expected = 401
        elif role == "other" and self.tenant_scoped:
            expected = self.create_other_status
        else:
            expected = 403
        assert r.status_code == expected, r.content
        assert self.counts() | {"n": self.model._base_manager.count()} == before

    @pytest.mark.parametrize("role", ROLES)
    def test_update(self, world: World, role: str) -> None:
        if self._absent("update", world, role):
            return
        obj = self.make_object(world)
        payload = self.update_payload(world, obj)
        self._before = self.snapshot(obj)
        client = world.client(role)
        if role in self.update_roles:
            r = client.patch(self.detail_url(obj), payload, format="json")
            assert r.status_code == self.update_status, r.content
            self.assert_updated(world, obj, r)
            return
        if role == "other" and self.tenant_scoped:
            self.assert_like_missing(client, "patch", self.detail_url(obj),
                                     self.missing_url(obj), payload)
        else:
            r = client.patch(self.detail_url(obj), payload, format="json")
            assert r.status_code == self.refused_status(role), r.content
        assert self.snapshot(obj) == self._before

    @pytest.mark.parametrize("role", ROLES)
    def test_delete(self, world: World, role: str) -> None:
        if self._absent("delete", world, role):
            return
        obj = self.make_deletable(world)
        before = self.snapshot(obj)
        client = world.client(role)
        query = self.delete_query(obj)
        if role in self.delete_roles:
            r = client.delete(self.detail_url(obj) + query)
            assert r.status_code == self.delete_status, r.content
            self.assert_deleted(world, obj)
            return
        if role == "other" and self.tenant_scoped:
            self.assert_like_missing(client, "delete", self.detail_url(obj) + query,
                                     self.missing_url(obj) + query)
        else:
            r = client.delete(self.detail_url(obj) + query)
            assert r.status_code == self.refused_status(role), r.content
        assert self.snapshot(obj) == before

    @pytest.mark.parametrize("role", ROLES)
    def test_actions(self, world: World, role: str) -> None:
        for spec in self.actions:
            obj = self.make_object(world)
            if spec.prepare:
                spec.prepare(obj)
            before = self.snapshot(obj)
            client = world.client(role)
            url = reverse(f"{self.basename}-{spec.name}", args=[obj.pk])
            if role in spec.roles:
                r = client.post(url, spec.payload(obj), format="json")
                assert r.status_code == spec.status, (spec.name, r.content)
                continue
            if role == "other" and self.tenant_scoped:
                self.assert_like_missing(client, "post", url, self.missing_url(obj, spec.name),
                                         spec.payload(obj))
            else:
                r = client.post(url, spec.payload(obj), format="json")
                assert r.status_code == self.refused_status(role), (spec.name, r.content)
            assert self.snapshot(obj) == before, spec.name

    def test_list_query_count_is_fixed(self, world: World) -> None:
        """No N+1: the list costs as many queries for 20 rows as for 2."""
        role = sorted(self.read_roles - {"staff"})[0] if self.read_roles - {"staff"} \
            else "staff"
        objs = [self.make_object(world) for _ in range(2)]
        url = self.list_url(world, objs[0])
        client = world.client(role)
        client.get(url)  # warm up (content types, sessions)
        with CaptureQueriesContext(connection) as few:
            r = client.get(url)
        assert r.status_code == 200 and r.json()["count"] >= 2
        objs += [self.make_object(world) for _ in range(18)]
        with CaptureQueriesContext(connection) as many:
            r = client.get(url)
        assert r.status_code == 200 and r.json()["count"] >= 20
        assert len(many) == len(few), "\n".join(q["sql"] for q in many.captured_queries)

    def test_list_paginates_orders_and_searches(self, world: World) -> None:
        role = "staff" if "staff" in self.read_roles else sorted(self.read_roles)[0]
        objs = [self.make_object(world) for _ in range(3)]
        client = world.client(role)
        url = self.list_url(world, objs[0])
        r = client.get(url, {"limit": 1})
        assert r.status_code == 200
        body = r.json()
        assert set(body) >= {"count", "next", "previous", "results"}
        assert len(body["results"]) == 1 and body["count"] >= 3 and body["next"]
        desc = client.get(url, {"ordering": f"-{self.ordering_field}"}).json()["results"]
        asc = client.get(url, {"ordering": self.ordering_field}).json()["results"]
        assert [o["id"] for o in desc] == [o["id"] for o in reversed(asc)]
        if self.search_term is not None:
            found = client.get(url, {"search": self.search_term}).json()["results"]
            assert found, f"?search={self.search_term} found nothing"
            assert not client.get(url, {"search": "no-such-thing-anywhere"}).json()["results"]
