"""The live bits of the pages: what static/js/live.js finds in the server's HTML.

The pages stay complete without it (badges, operations, the "shown live"
note); with it, it needs the websocket's path, the badges to update and the
process table, and the page must carry no inline script.
"""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from tests.panel.live.helpers import World, make_world

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def world(db: None) -> World:
    return make_world()


def scripts(body: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>(.*?)</script>", body, re.S)


def test_the_vserver_page_carries_its_socket_badge_and_process_table(world: World) -> None:
    from django.test import Client

    c = Client()
    c.force_login(world.users["alice"])
    body = c.get(reverse("vserver_detail", args=[world.vs.pk])).content.decode()
    assert f'data-vp-live="/ws/vservers/{world.vs.pk}/"' in body
    assert f'data-vp-status="{world.vs.pk}"' in body
    assert 'data-vp-memory-mb="' in body and 'data-vp-cpu-cores="1"' in body
    assert "data-vp-processes" in body and "data-vp-proc-rows" in body
    for head in ("PID", "USER", "%CPU", "%MEM", "RSS", "COMMAND"):
        assert f">{head}</th>" in body
    assert 'src="/static/js/live.js"' in body
    assert all(not s.strip() for s in scripts(body)), "no inline script"


def test_the_dashboard_carries_its_socket_and_badges(world: World) -> None:
    from django.test import Client

    c = Client()
    c.force_login(world.users["alice"])
    body = c.get(reverse("dashboard")).content.decode()
    assert 'data-vp-live="/ws/vservers/"' in body
    assert f'<td data-vp-status="{world.vs.pk}"><span class="badge' in body
    assert f'data-vp-status="{world.theirs.pk}"' not in body
    assert 'src="/static/js/live.js"' in body
    assert all(not s.strip() for s in scripts(body)), "no inline script"
