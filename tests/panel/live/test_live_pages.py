"""The live bits of the pages: what static/js/live.js finds in the server's HTML.

The pages stay complete without it (badges, operations, usage bars, the
"shown live" note); with it, it needs the websocket's path, the badges and
fields to update, the operation tables, the usage bars, the process table and
the regions it fetches again, and the page must carry no inline script. No
page reloads itself: what changes reaches it over the websocket.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.contrib.staticfiles import finders
from django.test import Client
from django.urls import reverse

from panel.guests.choices import OperationKindChoices, VServerStatusChoices
from panel.guests.models import Operation, VServer
from tests.panel.live.helpers import World, make_world

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def world(db: None) -> World:
    return make_world()


def scripts(body: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>(.*?)</script>", body, re.S)


def page(world: World, url: str, who: str = "alice") -> str:
    c = Client()
    c.force_login(world.users[who])
    return c.get(url).content.decode()


def test_the_vserver_page_carries_its_socket_badge_usage_and_process_table(
        world: World) -> None:
    body = page(world, reverse("vserver_detail", args=[world.vs.pk]))
    assert f'data-vp-live="/ws/vservers/{world.vs.pk}/"' in body
    assert f'data-vp-page="/vservers/{world.vs.pk}/"' in body
    assert 'data-vp-rendered-status="stopped"' in body
    assert f'data-vp-status="{world.vs.pk}"' in body
    assert "data-vp-processes" in body and "data-vp-proc-rows" in body
    for head in ("PID", "USER", "%CPU", "%MEM", "RSS", "COMMAND"):
        assert f">{head}</th>" in body
    # A bar for each limit the guest's usage is drawn against, and the limits themselves.
    for key in ("cpu", "memory", "processes", "disk"):
        assert f'data-vp-usage-bar="{key}"' in body and f'data-vp-usage-text="{key}"' in body
    for field in ("memory_mb", "cpu_cores", "disk_gb", "processes", "status_message"):
        assert f'data-vp-field="{field}"' in body
    assert 'data-vp-ops="vserver"' in body
    # What only the server can say, fetched again when the status changes.
    for region in ("actions", "dialogs", "overview", "audit"):
        assert f'data-vp-refresh="{region}"' in body
    assert 'src="/static/js/live.js"' in body
    assert all(not s.strip() for s in scripts(body)), "no inline script"
    assert "{#" not in body and "#}" not in body, "a template comment shows"


def test_the_dashboard_carries_its_socket_badges_operations_and_plan_bars(
        world: World) -> None:
    Operation.objects.create(vserver=world.vs, vserver_name="shop", customer=world.a,
                             kind=OperationKindChoices.KIND_START, progress=40)
    body = page(world, reverse("dashboard"))
    assert 'data-vp-live="/ws/vservers/"' in body
    assert f'<td data-vp-status="{world.vs.pk}"><span class="badge' in body
    assert f'data-vp-status="{world.theirs.pk}"' not in body
    assert f'<tr data-vp-vserver="{world.vs.pk}">' in body
    assert f'data-vp-refresh="customer-{world.a.pk}"' in body
    assert f'data-vp-plan="{world.a.pk}"' in body and f'data-vp-plan="{world.b.pk}"' not in body
    assert 'data-vp-bar="memory_mb"' in body
    op = Operation.objects.get()
    assert 'data-vp-ops="dashboard"' in body and f'data-vp-op="{op.pk}"' in body
    assert 'src="/static/js/live.js"' in body
    assert all(not s.strip() for s in scripts(body)), "no inline script"
    assert "{#" not in body and "#}" not in body, "a template comment shows"


def test_the_operations_section_is_there_to_fill_in_even_when_nothing_runs(
        world: World) -> None:
    body = page(world, reverse("dashboard"))
    assert re.search(r'<section [^>]*data-vp-ops-section hidden>', body)


# --- no page reloads itself ------------------------------------------------------------

RELOADERS = (
    re.compile(r"location\s*\.\s*reload"),  # location.reload(), window.location.reload()
    re.compile(r"location\s*(\.\s*href\s*)?=(?!=)"),  # location = ..., location.href = ...
    re.compile(r"location\s*\.\s*(assign|replace)\s*\("),
    re.compile(r"http-equiv\s*=\s*[\"']?refresh", re.I),
)


def served_scripts() -> dict[str, str]:
    """Every script of ours the pages load (static/js, not the vendored libraries)."""
    found = finders.find("js/live.js")
    assert found, "static/js/live.js is not served"
    return {p.name: p.read_text() for p in sorted(Path(found).parent.glob("*.js"))}


def test_no_served_script_reloads_the_page() -> None:
    js = served_scripts()
    assert {"live.js", "vpanel.js"} <= set(js)
    for name, text in js.items():
        for pattern in RELOADERS:
            assert not pattern.search(text), f"{name} reloads or leaves the page: {pattern.pattern}"


def test_the_pages_ask_for_no_reload_even_while_something_is_under_way(world: World) -> None:
    """Busy and with an operation running: the state in which the pages used to
    reload themselves every 5 seconds."""
    VServer.objects.filter(pk=world.vs.pk).update(status=VServerStatusChoices.STATUS_STARTING)
    Operation.objects.create(vserver=world.vs, vserver_name="shop", customer=world.a,
                             kind=OperationKindChoices.KIND_START)
    for url in (reverse("dashboard"), reverse("vserver_detail", args=[world.vs.pk])):
        body = page(world, url)
        assert "data-auto-refresh" not in body, url
        for pattern in RELOADERS:
            assert not pattern.search(body), (url, pattern.pattern)


def test_the_reload_patterns_do_catch_a_reload() -> None:
    """The check above would see the loop this page once had."""
    old = ('window.setInterval(function () { if (!busy) { window.location.reload(); } }, '
           'every * 1000);')
    assert any(p.search(old) for p in RELOADERS)
    assert any(p.search('<meta http-equiv="refresh" content="5">') for p in RELOADERS)
    assert not any(p.search("if (window.location.protocol === 'https:')") for p in RELOADERS)
