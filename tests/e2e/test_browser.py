"""The panel in a real browser: Debian's Chromium, driven by Playwright, against real processes.

A real agent runs in the host namespace of a throwaway "lan" world
(tests/agent/conftest.py), a real Daphne serves the panel (tests/e2e/asgi.py:
panel.asgi plus static files) on a free port of 127.0.0.1 with a database of
its own (a temporary VPANEL_VAR_DIR, migrated, seeded by tests/e2e/seed.py
with a customer user and a running busybox vserver), and Chromium, headless,
does what a customer would:

- logs in and opens the dashboard, with its usage bars against the plan;
- restarts the vserver from its page while the dashboard stays open in another
  tab, whose badge goes to "Restarting" and back to "Running", and whose
  "Operations in progress" shows the restart while it runs, with no reload;
- on the vserver's page, loaded while the restart runs (the guest takes a few
  seconds to shut down: tests/e2e/seed.py), sees the restart's progress, the
  badge back to "Running", the actions offered again, the operation ended and
  the usage bars of the running guest, all without a reload: a marker put on
  the page's window just after it loaded is still there at the end;
- opens the console, types a command and a paste and sees their output, is
  resized with the window;
- reloads the console and is back in the same shell, with its output replayed.

Screenshots of the dashboard, the vserver page and the console go to
test-artifacts/ (ignored by git). Daphne, the agent, the guest and the
namespaces are ended at teardown whatever happened (fixtures below, and the
lan and vroots fixtures).

Playwright's own browser download is not used (nor possible here): it drives
/usr/bin/chromium, which scripts/bootstrap.sh installs. Without it, or as non-root,
the test fails saying so rather than skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agent import conftest as agent_conftest
from tests.agent.conftest import UPLINK, Lan
from tests.helpers import AgentProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The agent tests' fixture (a host and a LAN network namespace), used here as is.
lan = agent_conftest.lan

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 30_000  # what a page may take to show a change (a guest's restart included)


@dataclass
class Panel:
    url: str
    username: str
    password: str
    vserver: int
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def agent(lan: Lan) -> Iterator[AgentProcess]:
    a = AgentProcess(lan.paths, lan.host).start()
    try:
        yield a
    finally:
        a.kill(signal.SIGKILL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End PROC and everything it started (its own session), politely, then not."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture
def panel(tmp_path: Path, lan: Lan, agent: AgentProcess) -> Iterator[Panel]:
    """Daphne serving the panel on its own database, seeded; ended at teardown."""
    with serve_panel(tmp_path, lan, agent, "tests.e2e.seed") as (url, seeded, log):
        yield Panel(url, seeded["username"], seeded["password"], seeded["vserver"], log)


@contextlib.contextmanager
def serve_panel(tmp_path: Path, lan: Lan, agent: AgentProcess,
                seed: str) -> Iterator[tuple[str, dict[str, Any], Path]]:
    """Daphne serving the panel on its own database, seeded by the module SEED (given the
    agent's socket, the LAN's prefix and the uplink; its last line of output is JSON),
    and the agent's event bridge: (its URL, what the seed said, Daphne's log). Ended on
    the way out, whatever happened."""
    var = tmp_path / "panel-var"
    var.mkdir(mode=0o700)
    # Its own SQLite and the in-memory channel layer: one Daphne process carries the
    # operations' events to its pages by itself, and a shared redis would mix in the
    # events of other test runs, whose vservers have the same ids in their databases.
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "VPANEL_HTTPS")}
    env.update({"VPANEL_VAR_DIR": str(var), "DJANGO_SETTINGS_MODULE": "panel.settings",
                "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    py = sys.executable

    def manage(*args: str, timeout: float = 300) -> str:
        res = subprocess.run([py, *args], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        assert res.returncode == 0, f"{args}: {res.stdout[-2000:]}\n{res.stderr[-4000:]}"
        return res.stdout

    manage("manage.py", "migrate", "--noinput")
    prefix = lan.v4(0).rsplit(".", 1)[0]
    seeded = json.loads(manage("-m", seed, str(agent.socket), prefix, UPLINK)
                        .strip().splitlines()[-1])

    port = free_port()
    log = tmp_path / "daphne.log"
    with log.open("wb") as out:
        daphne = subprocess.Popen(
            [py, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
             "tests.e2e.asgi:application"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    extra: list[subprocess.Popen[bytes]] = []
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert daphne.poll() is None, f"daphne exited: {log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        # The agent's event bridge, where the panel has one: it keeps statuses current
        # from the agent's own events (the restart below is also followed by the
        # operation's thread in Daphne, which is enough for the badges on its own).
        if (REPO / "panel/guests/management/commands/agent_events.py").exists():
            with (tmp_path / "agent_events.log").open("wb") as out:
                extra.append(subprocess.Popen(
                    [py, "manage.py", "agent_events"], cwd=REPO, env=env, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True))
        yield url, seeded, log
    finally:
        for proc in (*extra, daphne):
            _stop(proc)


@pytest.fixture
def browser(root_required: None) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: run scripts/bootstrap.sh"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to run as root, which these tests are.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=True)


def console_text(page: Any) -> str:
    return str(page.evaluate("window.vpanelConsole.text()"))


def wait_console(page: Any, pattern: str) -> re.Match[str]:
    """Wait until the terminal's text matches PATTERN; the match.

    Patterns carry a tag of their own (`size-(\\d+)-end`) that the command line
    echoed as typed cannot match ($(...) unexpanded), so no offset into the
    screen is needed, which would not hold: output fills the terminal's blank
    rows rather than adding to the end of its text.
    """
    page.wait_for_function(
        "re => window.vpanelConsole && new RegExp(re).test(window.vpanelConsole.text())",
        arg=pattern, timeout=WAIT_MS)
    found = re.search(pattern, console_text(page))
    assert found is not None
    return found


def wait_connected(page: Any) -> None:
    page.wait_for_selector('#console-status[data-state="open"]', timeout=WAIT_MS)


def run_in_console(page: Any, command: str) -> None:
    page.keyboard.type(command)
    page.keyboard.press("Enter")


def shell_pid(page: Any, tag: str) -> int:
    run_in_console(page, f"echo {tag}-$$-end")
    return int(wait_console(page, rf"{tag}-(\d+)-end").group(1))


def test_a_customer_logs_in_restarts_live_and_uses_the_console(
        panel: Panel, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        run_the_story(panel, context)
    except Exception as e:
        if context.pages:
            with contextlib.suppress(Exception):  # the failure itself is what must show
                shot(context.pages[-1], "failure")
        e.add_note("Daphne's log ends:\n" + panel.log.read_text(errors="replace")[-3000:])
        raise
    finally:
        context.close()


def run_the_story(panel: Panel, context: Any) -> None:
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))

    # Log in.
    page.goto(f"{panel.url}/login/")
    page.fill('input[name="username"]', panel.username)
    page.fill('input[name="password"]', panel.password)
    page.click('button[type="submit"]:has-text("Log in")')
    page.wait_for_url(re.compile(r"/dashboard/$"))

    # The dashboard, left open: its badge must follow the restart by itself.
    # (Its row of the vservers' table: "Operations in progress" links to web too.)
    badge = page.locator(f"tr[data-vp-vserver='{panel.vserver}'] td[data-vp-status]")
    assert badge.inner_text().strip() == "Running"
    shot(page, "dashboard")
    page.evaluate("""() => {
        window.vpNoReload = true;
        window.vpSeen = [];
        const cell = () => {
            const td = document.querySelector('tr[data-vp-vserver] td[data-vp-status]');
            return td ? td.innerText.trim() : null;
        };
        new MutationObserver(() => {
            const now = cell();
            if (now && window.vpSeen[window.vpSeen.length - 1] !== now) window.vpSeen.push(now);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")

    # The usage bars against the plan: one web of 3 vservers, its 256 MiB of 2048.
    plan = page.locator("[data-vp-plan]")
    assert plan.locator(".usage-row").count() == 6
    assert "1 of 3" in plan.inner_text() and "256 of 2048" in plan.inner_text()
    assert page.locator("[data-vp-ops-section]").is_hidden()

    # Restart from the vserver's page, in a second tab.
    vpage = context.new_page()
    vpage.on("pageerror", lambda e: errors.append(str(e)))
    vpage.goto(f"{panel.url}/vservers/{panel.vserver}/")
    shot(vpage, "vserver")
    vpage.click("#btn-restart")
    vpage.locator("#modal-restart").get_by_role("button", name="Restart").click()
    vpage.wait_for_load_state()
    # Loaded while the restart runs: the state in which the page once reloaded itself.
    vpage.evaluate("window.vpNoReload = 'kept'")
    assert vpage.locator("[data-vp-rendered-status]").get_attribute(
        "data-vp-rendered-status") == "restarting"
    assert vpage.locator("#btn-stop").is_disabled()
    shot(vpage, "vserver-restarting")

    # The dashboard: the restart under way, then the badge back, then nothing under way.
    page.wait_for_function("!document.querySelector('[data-vp-ops-section]').hidden",
                           timeout=WAIT_MS)
    assert "Restart" in page.locator("[data-vp-ops='dashboard']").inner_text()
    page.wait_for_function("window.vpSeen.includes('Restarting')", timeout=WAIT_MS)
    page.wait_for_function(
        "window.vpSeen.length && window.vpSeen[window.vpSeen.length - 1] === 'Running'",
        timeout=WAIT_MS)
    page.wait_for_function("document.querySelector('[data-vp-ops-section]').hidden",
                           timeout=WAIT_MS)
    assert badge.inner_text().strip() == "Running"
    assert page.evaluate("window.vpNoReload === true"), "the dashboard was reloaded"
    seen = page.evaluate("window.vpSeen")
    assert seen[seen.index("Restarting"):][-1] == "Running", seen

    # The vserver's page, on its own: the badge, the actions offered again (the server's
    # fresh copy of them), the operation ended, the usage of the running guest.
    vpage.wait_for_function("document.querySelector('#vs-status').innerText.trim() === 'Running'",
                            timeout=WAIT_MS)
    vpage.wait_for_function("!document.querySelector('#btn-stop').disabled", timeout=WAIT_MS)
    first_op = vpage.locator("[data-vp-ops='vserver'] tr").first
    vpage.wait_for_function(
        "document.querySelector(\"[data-vp-ops='vserver'] tr\").innerText.includes('Success')",
        timeout=WAIT_MS)
    assert "Restart" in first_op.inner_text() and "100%" in first_op.inner_text()
    vpage.wait_for_selector("[data-vp-proc-usage]:not([hidden])", timeout=WAIT_MS)
    assert "of 256 MiB" in vpage.inner_text("[data-vp-usage-text='memory']")
    assert vpage.evaluate("window.vpNoReload === 'kept'"), "the vserver page was reloaded"
    # The dialog came with the fresh actions: Stop opens it, and it is the real one.
    vpage.click("#btn-stop")
    vpage.locator("#modal-stop .modal-footer").get_by_role("button", name="Cancel").click()
    vpage.wait_for_selector("#modal-stop", state="hidden")
    shot(vpage, "vserver-live")

    # The console, from the vserver's page.
    vpage.goto(f"{panel.url}/vservers/{panel.vserver}/")
    vpage.wait_for_function("document.querySelector('#vs-status').innerText.includes('Running')",
                            timeout=WAIT_MS)
    vpage.click("#btn-console")
    vpage.wait_for_url(re.compile(rf"/vservers/{panel.vserver}/console/$"))
    wait_connected(vpage)

    # Typing.
    run_in_console(vpage, "echo browser-$((6*7))")
    wait_console(vpage, r"\nbrowser-42")

    # A paste, through xterm.js's own paste handler (a real ClipboardEvent).
    vpage.evaluate("""() => {
        const data = new DataTransfer();
        data.setData('text/plain', 'echo pasted-$((5*5))\\n');
        document.querySelector('.xterm-helper-textarea').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""")
    wait_console(vpage, r"\npasted-25")

    # Resize: the window shrinks, the fit addon gives the shell the terminal's new size.
    vpage.set_viewport_size({"width": 900, "height": 700})
    vpage.wait_for_function("window.vpanelConsole.term.cols < 100", timeout=WAIT_MS)
    time.sleep(0.5)  # the fit is debounced; the resize message follows it
    cols, rows = vpage.evaluate("[window.vpanelConsole.term.cols, window.vpanelConsole.term.rows]")
    run_in_console(vpage, "echo size-$(stty size | tr ' ' x)-end")
    assert wait_console(vpage, r"size-(\d+x\d+)-end").group(1) == f"{rows}x{cols}"
    vpage.set_viewport_size({"width": 1280, "height": 900})
    pid = shell_pid(vpage, "pid")
    shot(vpage, "console")
    run_in_console(vpage, "MARK=kept-$((2+3))")

    # A reload: the same shell, with what it showed replayed.
    vpage.reload()
    wait_connected(vpage)
    wait_console(vpage, r"browser-42")
    assert shell_pid(vpage, "again") == pid
    run_in_console(vpage, "echo got-$MARK-end")
    wait_console(vpage, r"got-kept-5-end")
    shot(vpage, "console-reattached")

    # The vserver restarts under the open console: the page says its shell ended, its
    # badge follows, and a new shell is one click away, in the restarted vserver.
    page.goto(f"{panel.url}/vservers/{panel.vserver}/")
    page.click("#btn-restart")
    page.locator("#modal-restart").get_by_role("button", name="Restart").click()
    vpage.wait_for_selector('#console-status[data-state="exited"]', timeout=WAIT_MS)
    assert "The vserver stopped" in vpage.inner_text("#console-status")
    vpage.wait_for_function(
        "document.querySelector('#vs-status').innerText.trim() === 'Running'", timeout=WAIT_MS)
    vpage.click("#console-again")
    wait_connected(vpage)
    # (Not the pid: a restarted vserver's PID namespace numbers its shell the same.)
    run_in_console(vpage, "echo new-[$MARK]-end")
    wait_console(vpage, r"new-\[\]-end")

    assert not errors, errors
