"""The OpenAPI schema generates cleanly, its docs page needs no CDN, and the
browsable API renders."""

from __future__ import annotations

from pathlib import Path

import yaml
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from tests.panel.factories import World, make_vserver


def test_schema_validates_without_warnings(tmp_path: Path) -> None:
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    schema = yaml.safe_load(out.read_text())
    paths = set(schema["paths"])
    for p in ("/api/v1/vservers/", "/api/v1/vservers/{id}/reset-password/",
              "/api/v1/vservers/{vserver_id}/ssh-keys/{id}/", "/api/v1/customers/",
              "/api/v1/memberships/", "/api/v1/plans/", "/api/v1/hosts/", "/api/v1/ip-pools/",
              "/api/v1/ip-addresses/", "/api/v1/audit-log/", "/api/v1/tokens/",
              "/api/v1/operations/"):
        assert p in paths, p
    assert "tokenAuth" in schema["components"]["securitySchemes"]
    # What a client sends to create a vserver has no host, IPs or status.
    request = schema["components"]["schemas"]["VServerCreateRequest"]["properties"]
    assert not {"host", "ips", "status", "context_id", "desired_state"} & set(request)
    patch = schema["components"]["schemas"]["PatchedVServerUpdateRequest"]["properties"]
    assert set(patch) == {"hostname", "memory_mb", "cpu_cores", "processes", "disk_gb"}
    # The token's digest is in no schema at all.
    assert "digest" not in out.read_text()


def test_schema_is_served(client: Client) -> None:
    r = client.get("/api/schema/")
    assert r.status_code == 200
    assert b"/api/v1/vservers/" in r.content


def test_docs_are_served_without_a_cdn(client: Client) -> None:
    r = client.get("/api/docs/")
    assert r.status_code == 200
    html = r.content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in html
    assert "cdn." not in html and "unpkg" not in html and "jsdelivr" not in html
    assert reverse("api-schema") in html


def test_api_root_lists_both_apps(world: World) -> None:
    body = world.client("member").get(reverse("api-root")).json()
    assert {"vservers", "operations", "customers", "memberships", "plans", "tokens",
            "audit-log", "hosts", "ip-pools", "ip-addresses"} <= set(body)


def test_browsable_api_renders_every_list_and_detail(world: World) -> None:
    """The browser's view of the API (session auth): forms and filters render."""
    vs = make_vserver(world.customer, world.host)
    urls = [reverse(f"{name}-list") for name in (
        "vserver", "operation", "customer", "membership", "plan", "host", "ippool",
        "ipaddress", "auditlog", "apitoken")]
    urls += [reverse("vserver-detail", args=[vs.pk]),
             reverse("vserver-ssh-key-list", args=[vs.pk]), reverse("api-root")]
    for role in ("staff", "owner"):
        c = Client()
        c.force_login(world.user(role))
        for url in urls:
            r = c.get(url, HTTP_ACCEPT="text/html")
            assert r.status_code in (200, 403), (role, url, r.status_code)
            assert r["Content-Type"].startswith("text/html")

