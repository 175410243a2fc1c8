"""reducecap: lower the capability ceiling of a command and everything it runs.

The seed ("Playing with /usr/sbin/reducecap"): after `reducecap --secure
/bin/sh` the CapBnd line of /proc/self/status "shows many more 0s", and even
a setuid-root program cannot get back what was dropped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent import caps
from tests.helpers import run

BIN = Path(sys.executable).parent
REDUCECAP = str(BIN / "reducecap")
NOBODY = 65534
SETPRIV_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
STATUS_CAPS = "grep -E '^Cap(Bnd|Eff|Prm):' /proc/self/status"


def reducecap(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run([REDUCECAP, *args], **kw)


def status_mask(text: str, field: str) -> int:
    m = re.search(rf"^{field}:\s*([0-9a-f]+)$", text, re.MULTILINE)
    assert m, f"no {field} line in {text!r}"
    return int(m.group(1), 16)


def own_mask(field: str) -> int:
    return status_mask(Path("/proc/self/status").read_text(), field)


def bit(name: str) -> int:
    return 1 << caps.CAPS[name]


@pytest.fixture
def owned_file(tmp_path: Path) -> Path:
    f = tmp_path / "file"
    f.write_text("")
    os.chown(f, 0, 0)
    return f


def test_reducecap_show_prints_the_sets(root_required: None) -> None:
    out = reducecap("--show").stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert set(rows) == {"Bounding", "Effective", "Permitted", "Inheritable"}, out
    assert int(rows["Bounding"][0], 16) == own_mask("CapBnd")
    assert "CAP_CHOWN" in rows["Bounding"]
    for label, (mask, *named) in rows.items():
        expected = caps.names(caps.from_mask(int(mask, 16))) or ["-"]
        assert named == expected, f"{label}: {mask} listed as {named}"

    # --show reports the set after this call's own drops.
    out = reducecap("--CAP_CHOWN", "--show").stdout
    bnd = next(line for line in out.splitlines() if line.startswith("Bounding")).split()
    assert int(bnd[1], 16) == own_mask("CapBnd") & ~bit("CAP_CHOWN")
    assert "CAP_CHOWN" not in bnd


def test_reducecap_without_command_or_show_is_a_usage_error(root_required: None) -> None:
    res = reducecap(check_rc=None)
    assert res.returncode == 2
    assert "no command" in res.stderr


def test_reducecap_removes_a_capability(root_required: None, owned_file: Path) -> None:
    # Control: root can chown here.
    reducecap("chown", "1", str(owned_file))
    assert owned_file.stat().st_uid == 1
    os.chown(owned_file, 0, 0)

    res = reducecap("--CAP_CHOWN", "sh", "-c", f"{STATUS_CAPS}; chown 1 {owned_file}",
                    check_rc=None)
    assert res.returncode != 0
    assert "Operation not permitted" in res.stderr, res.stderr
    assert owned_file.stat().st_uid == 0
    assert status_mask(res.stdout, "CapBnd") == own_mask("CapBnd") & ~bit("CAP_CHOWN")
    assert status_mask(res.stdout, "CapEff") & bit("CAP_CHOWN") == 0

    # The short form of the seed's man page.
    out = reducecap("--NET_RAW", "sh", "-c", STATUS_CAPS).stdout
    assert status_mask(out, "CapBnd") == own_mask("CapBnd") & ~bit("CAP_NET_RAW")


def test_reducecap_secure_leaves_the_default_ceiling(root_required: None) -> None:
    out = reducecap("--secure", "sh", "-c", STATUS_CAPS).stdout
    assert status_mask(out, "CapBnd") == caps.to_mask(caps.DEFAULT_CEILING)
    assert status_mask(out, "CapEff") & ~caps.to_mask(caps.DEFAULT_CEILING) == 0
    # and is irreversible: a nested reducecap cannot widen it.
    out = reducecap("--secure", REDUCECAP, "sh", "-c", STATUS_CAPS).stdout
    assert status_mask(out, "CapBnd") == caps.to_mask(caps.DEFAULT_CEILING)


@pytest.fixture
def setuid_dir() -> Iterator[Path]:
    """A directory uid 65534 can reach (tmp_path's parents are 0700) for setuid copies."""
    d = Path(tempfile.mkdtemp(prefix="vpanel-reducecap-"))
    try:
        os.chmod(d, 0o755)  # noqa: S103 - uid 65534 must reach it
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _setuid_copy(src: str, d: Path) -> Path:
    dst = d / Path(src).name
    shutil.copy2(src, dst)
    os.chown(dst, 0, 0)
    os.chmod(dst, 0o4755)  # noqa: S103 - the setuid-root copy is the point
    return dst


def test_setuid_program_cannot_regain_dropped_capability(root_required: None,
                                                         setuid_dir: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    ceiling = caps.to_mask(caps.DEFAULT_CEILING)

    # busybox drops its setuid privilege for ordinary applets, so it shows
    # nothing either way; the check that matters is the coreutils cat below.
    busybox = shutil.which("busybox")
    if busybox is not None:
        bb = _setuid_copy(busybox, setuid_dir)
        out = reducecap("--secure", *SETPRIV_NOBODY, str(bb), "sh", "-c",
                        "grep CapEff /proc/self/status").stdout
        assert status_mask(out, "CapEff") & ~ceiling == 0

    cat = _setuid_copy(shutil.which("cat") or "/bin/cat", setuid_dir)
    # Control: without reducecap, nobody running the setuid-root copy gets
    # root's full set (so the program really would regain capabilities).
    out = run([*SETPRIV_NOBODY, str(cat), "/proc/self/status"]).stdout
    assert status_mask(out, "CapEff") == own_mask("CapBnd")
    assert status_mask(out, "CapEff") & ~ceiling != 0

    out = reducecap("--secure", *SETPRIV_NOBODY, str(cat), "/proc/self/status").stdout
    assert re.search(r"^Uid:\s+65534\s+0\s", out, re.MULTILINE), out  # it did run setuid
    assert status_mask(out, "CapEff") & ~ceiling == 0
    assert status_mask(out, "CapPrm") & ~ceiling == 0
    assert status_mask(out, "CapBnd") == ceiling


def test_reducecap_unknown_capability_is_an_error(root_required: None, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    res = reducecap("--CAP_BOGUS", "touch", str(marker), check_rc=None)
    assert res.returncode != 0
    assert "CAP_BOGUS" in res.stderr
    assert "unknown capability" in res.stderr
    assert not marker.exists()


def test_reducecap_lock_flag_blocks_namespaces(root_required: None) -> None:
    # Control: root may make a namespace without the flag.
    reducecap("unshare", "-m", "true")
    res = reducecap("--flag", "lock", "unshare", "-m", "true", check_rc=None)
    assert res.returncode != 0
    assert "Operation not permitted" in res.stderr, res.stderr
    res = reducecap("--flag", "lock", "unshare", "-u", "-i", "-p", "-f", "true", check_rc=None)
    assert res.returncode != 0
    out = reducecap("--flag", "lock", "grep", "^Seccomp:", "/proc/self/status").stdout
    assert out.split() == ["Seccomp:", "2"]


def test_reducecap_unsupported_flag_is_refused(root_required: None) -> None:
    res = reducecap("--flag", "sched", "true", check_rc=None)
    assert res.returncode == 2
    assert "sched" in res.stderr
