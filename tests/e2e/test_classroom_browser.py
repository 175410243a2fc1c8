"""The teacher's live grid in a real browser (issue 9): Debian's Chromium, a real Daphne,
a real agent, real students' servers.

The setup is tests/e2e/test_browser.py's (its `serve_panel`: Daphne on a database
of its own, the agent's event bridge; the agent in a throwaway "lan" world),
seeded by tests/e2e/classroom_seed.py with a class lab1 whose students ann and
ben have running servers built from a busybox template. Then:

- the teacher logs in and opens the class's grid: both rows Running, and their
  CPU and memory cells fill with figures (one sampler, GET /1.0/stats) while
  the last activity reads "N min ago";
- "select all" ticks every row, unticking one leaves it half-ticked, and it
  unticks them all;
- ann, in a browser of her own, stops her server from her page (/my-server/);
  the teacher's grid, never reloaded (a marker on its window stays), shows her
  badge go to Stopping, then Stopped, and her CPU and memory cells empty, while
  ben's keep their figures; ann's own page follows to Stopped by itself.

A screenshot of the grid goes to test-artifacts/classroom-grid.png. Root only;
Daphne, the agent, the guests and the namespaces end at teardown whatever happened.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hostagent import templates
from tests.agent.conftest import Lan
from tests.e2e import test_browser
from tests.e2e.classroom_seed import TEMPLATE
from tests.helpers import AgentProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

lan = test_browser.lan
agent = test_browser.agent
browser = test_browser.browser
WAIT_MS = test_browser.WAIT_MS
SHOT = test_browser.ARTIFACTS / "classroom-grid.png"

CPU = re.compile(r"^\d+\.\d %$")
MEMORY = re.compile(r"^\d+\.\d MiB / 128 MiB$")


@dataclass
class Student:
    password: str
    seat: int
    vserver: int


@dataclass
class Class:
    url: str
    slug: str
    teacher: tuple[str, str]
    students: dict[str, Student]
    log: Path


@pytest.fixture
def lab(tmp_path: Path, lan: Lan, agent: AgentProcess) -> Iterator[Class]:
    templates.create(lan.paths, TEMPLATE, "busybox", None)
    with test_browser.serve_panel(tmp_path, lan, agent, "tests.e2e.classroom_seed") as (
            url, seeded, log):
        yield Class(url, seeded["slug"], tuple(seeded["teacher"]),
                    {name: Student(*s) for name, s in seeded["students"].items()}, log)


def log_in(page: Any, url: str, username: str, password: str) -> None:
    page.goto(f"{url}/login/")
    page.fill('input[name="username"]', username)
    page.fill('input[name="password"]', password)
    page.click('button[type="submit"]:has-text("Log in")')
    page.wait_for_load_state()
    assert "/login/" not in page.url, f"{username} could not log in"


def cells(page: Any, seat: int) -> dict[str, str]:
    """The texts of a row's live cells."""
    return dict(page.evaluate("""seat => {
        const row = document.querySelector(`tr[data-vp-seat='${seat}']`);
        const text = sel => row.querySelector(sel).innerText.trim();
        return [['status', text('[data-vp-status]')], ['cpu', text("[data-vp-usage='cpu']")],
                ['memory', text("[data-vp-usage='memory']")],
                ['activity', text("[data-vp-usage='activity']")]];
    }""", seat))


def wait_figures(page: Any, seat: int) -> None:
    """Until the row of SEAT shows a CPU and a memory figure."""
    page.wait_for_function("""seat => {
        const row = document.querySelector(`tr[data-vp-seat='${seat}']`);
        return /^\\d+\\.\\d %$/.test(row.querySelector("[data-vp-usage='cpu']").innerText.trim())
            && /MiB \\/ 128 MiB$/.test(row.querySelector("[data-vp-usage='memory']").innerText);
    }""", arg=seat, timeout=WAIT_MS)


def test_the_teachers_grid_follows_a_students_stop_live(lab: Class, browser: Any) -> None:
    teacher = browser.new_context(viewport={"width": 1280, "height": 800})
    student = browser.new_context(viewport={"width": 1024, "height": 800})
    try:
        run_the_story(lab, teacher, student)
    except Exception as e:
        for ctx, name in ((teacher, "classroom-failure-grid"), (student, "classroom-failure-ann")):
            if ctx.pages:
                with contextlib.suppress(Exception):  # the failure itself is what must show
                    ctx.pages[-1].screenshot(path=str(test_browser.ARTIFACTS / f"{name}.png"),
                                             full_page=True)
        e.add_note("Daphne's log ends:\n" + lab.log.read_text(errors="replace")[-3000:])
        raise
    finally:
        teacher.close()
        student.close()


def run_the_story(lab: Class, teacher: Any, student: Any) -> None:
    errors: list[str] = []
    ann, ben = lab.students["ann"], lab.students["ben"]

    # The teacher's grid: both running, with figures.
    grid = teacher.new_page()
    grid.on("pageerror", lambda e: errors.append(str(e)))
    log_in(grid, lab.url, *lab.teacher)
    grid.goto(f"{lab.url}/classes/{lab.slug}/")
    for seat in (ann, ben):
        assert cells(grid, seat.seat)["status"] == "Running"
    grid.evaluate("""ann => {
        window.vpNoReload = true;
        window.vpSeen = [];
        const cell = () => {
            const td = document.querySelector(`tr[data-vp-seat='${ann}'] td[data-vp-status]`);
            return td ? td.innerText.trim() : null;
        };
        new MutationObserver(() => {
            const now = cell();
            if (now && window.vpSeen[window.vpSeen.length - 1] !== now) window.vpSeen.push(now);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""", ann.seat)
    for seat in (ann, ben):
        wait_figures(grid, seat.seat)
        row = cells(grid, seat.seat)
        assert CPU.match(row["cpu"]) and MEMORY.match(row["memory"]), row
        # Last used 5 minutes ago (the seed's), read when the page was served or since.
        assert row["activity"] in ("5 min ago", "6 min ago"), row

    # Select all, then one row less: half-ticked.
    grid.check("[data-vp-select-all]")
    assert grid.locator("#class-grid input[name='seats']:checked").count() == 2
    grid.uncheck(f"#class-grid input[name='seats'][value='{ben.seat}']")
    assert grid.evaluate("document.querySelector('[data-vp-select-all]').indeterminate")
    grid.click("[data-vp-select-all]")  # half-ticked: a click ticks every row again
    assert grid.locator("#class-grid input[name='seats']:checked").count() == 2
    grid.uncheck("[data-vp-select-all]")
    assert grid.locator("#class-grid input[name='seats']:checked").count() == 0

    # Ann stops her server from her own page.
    mine = student.new_page()
    mine.on("pageerror", lambda e: errors.append(str(e)))
    log_in(mine, lab.url, "ann", ann.password)
    mine.goto(f"{lab.url}/my-server/")
    assert mine.inner_text(f"[data-vp-status='{ann.vserver}']").strip() == "Running"
    mine.click('button[name="do"][value="stop"]')
    mine.wait_for_load_state()
    mine.evaluate("window.vpNoReload = 'kept'")

    # The grid: Stopping, then Stopped, by itself; her figures gone, ben's still there.
    grid.wait_for_function("window.vpSeen.includes('Stopping')", timeout=WAIT_MS)
    grid.wait_for_function(
        "window.vpSeen.length && window.vpSeen[window.vpSeen.length - 1] === 'Stopped'",
        timeout=WAIT_MS)
    seen = grid.evaluate("window.vpSeen")
    assert seen[seen.index("Stopping"):] == ["Stopping", "Stopped"], seen
    grid.wait_for_function(
        """seat => document.querySelector(`tr[data-vp-seat='${seat}'] [data-vp-usage='cpu']`)
            .innerText.trim() === '—'""", arg=ann.seat, timeout=WAIT_MS)
    assert cells(grid, ann.seat)["memory"] == "—"
    wait_figures(grid, ben.seat)
    assert cells(grid, ben.seat)["status"] == "Running"
    assert grid.evaluate("window.vpNoReload === true"), "the grid was reloaded"
    grid.screenshot(path=str(SHOT), full_page=True)

    # Her own page followed too, without a reload.
    mine.wait_for_function(
        f"document.querySelector(\"[data-vp-status='{ann.vserver}']\").innerText.trim()"
        " === 'Stopped'", timeout=WAIT_MS)
    assert mine.evaluate("window.vpNoReload === 'kept'"), "ann's page was reloaded"

    assert not errors, errors
