"""The context-1 tools as a person uses them: vtop's live screen, and guest names.

test_views.py checks what the tools report; this module checks the two
things it leaves out: the curses screen of `vtop` (run on a pty), and that
`--guest NAME` takes only a valid guest name, as every other command does.
"""

from __future__ import annotations

import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest

from hostagent import guest
from hostagent.paths import Paths
from tests.helpers import run

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("bad", ["../x", "-rf", "A", "a" * 40, "a/b"])
@pytest.mark.parametrize(("tool", "rc", "rest"), [
    ("vkill", 1, ["1"]), ("vtop", 2, ["--once"]), ("vpstree", 2, []),
])
def test_view_tools_refuse_an_invalid_guest_name(vroots: Paths, tool: str, rc: int,
                                                 rest: list[str], bad: str) -> None:
    res = run([str(BIN / tool), f"--guest={bad}", *rest], check_rc=rc)
    assert "invalid guest name" in res.stderr, res.stderr


def read_until(fd: int, want: list[bytes], timeout: float = 20) -> bytes:
    """What FD (a pty master) gives until every byte string of WANT has appeared."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(w in out for w in want):
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
    return out


def test_vtop_live_screen_shows_ctx_and_name_and_quits_on_q(vroots: Paths,
                                                            busybox_guest: str) -> None:
    st = guest.start(vroots, busybox_guest)
    env = {**os.environ, "TERM": "xterm", "LINES": "40", "COLUMNS": "160"}
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(str(BIN / "vtop"), [str(BIN / "vtop"), "-d", "0.3", "--guest", "bb"], env)
    reaped, status = 0, 0
    try:
        screen = read_until(fd, [b"CTX", b"NAME", b"q quits", f" {st.context} ".encode()])
        os.write(fd, b"q")
        deadline = time.monotonic() + 10
        while not reaped and time.monotonic() < deadline:
            read_until(fd, [b"\0"], timeout=0.2)  # drain, so curses can finish
            reaped, status = os.waitpid(pid, os.WNOHANG)
    finally:
        if not reaped:
            os.kill(pid, 9)  # never leave a vtop behind
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = screen.decode(errors="replace")
    assert "CTX" in text and "NAME" in text and "q quits" in text, text
    assert f" {st.context} " in text and " bb " in text, text
    assert os.waitstatus_to_exitcode(status) == 0
