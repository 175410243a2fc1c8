"""vpkg: the guest's package manager, found from outside and run inside, on the real kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hostagent import guest, pkg
from hostagent.cgroup import Cgroup, cgroup_base
from hostagent.cli import vpkg as vpkg_cli
from hostagent.paths import Paths

VPKG = [sys.executable, "-m", "hostagent.cli.vpkg"]

# A stand-in for apt-get, run by the guest's busybox sh: what it was asked, and
# where it ran. It fails (3) when told "fail", or when its guest has the marker.
FAKE_APT_GET = """#!/bin/sh
echo "apt-get $*"
echo "hostname: $(hostname)"
[ -e /etc/vpkg-fail ] && exit 3
case " $* " in *fail*) exit 3;; esac
exit 0
"""


def make_guest(paths: Paths, name: str, *, fake: bool = True, fails: bool = False,
               start: bool = True) -> None:
    guest.build(paths, name, guest.BuildOptions(method="busybox", hostname=f"{name}.guest"))
    root = paths.root(name)
    if fake:
        (root / "usr/bin/apt-get").write_text(FAKE_APT_GET)
        os.chmod(root / "usr/bin/apt-get", 0o700)  # guest root runs it
    if fails:
        (root / "etc/vpkg-fail").write_text("")
    if start:
        guest.start(paths, name)


def vpkg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VPKG, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy(), check=False)


def section(out: str, name: str) -> str:
    """The part of vpkg's report between NAME's header and its result line."""
    start = out.index(f"== {name} ")
    return out[start:out.index(f"-- {name}: ", start)]


def summary(out: str) -> list[list[str]]:
    """The closing table's rows, each split into NAME, MANAGER, RESULT."""
    lines = out.splitlines()
    head = max(i for i, line in enumerate(lines) if line.split()[:3] == ["NAME", "MANAGER",
                                                                          "RESULT"])
    return [line.split(None, 2) for line in lines[head + 1:]]


def nothing_running(paths: Paths, name: str) -> bool:
    return (not guest.running(paths, name) and not paths.state(name).exists()
            and not Cgroup(f"{cgroup_base()}/{name}").exists())


@pytest.fixture
def two_guests(vroots: Paths) -> tuple[str, str]:
    """g1 and g2, running, each with the fake apt-get."""
    make_guest(vroots, "g1")
    make_guest(vroots, "g2")
    return "g1", "g2"


# --- detection, from outside -------------------------------------------------------

@pytest.mark.parametrize(("present", "expected"), [
    (["usr/bin/apt-get", "usr/bin/dpkg"], "apt-get"),
    (["usr/bin/dpkg"], "dpkg"),
    (["usr/bin/dnf", "usr/bin/yum", "usr/bin/rpm"], "dnf"),
    (["usr/bin/yum", "usr/bin/rpm"], "yum"),
    (["sbin/apk"], "apk"),
    (["usr/bin/rpm", "usr/bin/dpkg"], "rpm"),
    (["usr/bin/apt", "bin/rpm", "usr/sbin/apk"], None),
    ([], None),
])
def test_detection_order(tmp_path: Path, present: list[str], expected: str | None) -> None:
    for rel in present:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    mgr = pkg.detect(tmp_path)
    assert (mgr.name if mgr else None) == expected


def test_busybox_guest_has_no_package_manager(vroots: Paths, busybox_guest: str) -> None:
    root = vroots.root("bb")
    # busybox's dpkg and rpm applets are there, and are no package manager.
    assert os.path.islink(root / "usr/bin/dpkg") and os.path.islink(root / "bin/rpm")
    assert pkg.detect(root) is None
    res = vpkg("bb", "--", "install", "foo")
    assert res.returncode == 1, res.stderr
    assert "== bb ==\n-- bb: no package manager\n" in res.stdout
    assert summary(res.stdout) == [["bb", "-", "no package manager"]]
    assert nothing_running(vroots, "bb")  # detection needs no running guest


def test_a_link_is_judged_by_lexists_and_never_followed_on_the_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    os.symlink("/usr/bin/evil", root / "usr/bin/apt-get")

    def no_stat(*_a: object, **_k: object) -> None:
        raise AssertionError("detection followed a link (os.stat)")

    with monkeypatch.context() as m:
        m.setattr(os, "stat", no_stat)
        m.setattr(os.path, "realpath", no_stat)
        mgr = pkg.detect(root)
    assert mgr == pkg.Manager("apt-get", "/usr/bin/apt-get")


def test_directories_on_the_way_resolve_inside_the_root(tmp_path: Path) -> None:
    # A host tree that holds an apt-get, where a link followed on the host would lead.
    host = tmp_path / "hostusr"
    (host / "bin").mkdir(parents=True)
    (host / "bin/apt-get").write_text("")
    root = tmp_path / "root"
    root.mkdir()
    for target in (str(host), "../hostusr", "../../../../../../" + str(host)[1:], "usr"):
        os.symlink(target, root / "usr")
        assert pkg.detect(root) is None, target
        os.unlink(root / "usr")
    # The guest's own merged-/usr link is read as the guest reads it.
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/apk").write_text("")
    os.symlink("usr/sbin", root / "sbin")
    assert pkg.detect(root) == pkg.Manager("apk", "/sbin/apk")
    assert pkg.locate(root, "/sbin/apk") == root / "usr/sbin/apk"


# --- the run, inside ----------------------------------------------------------------

def test_runs_in_each_guests_own_context(vroots: Paths, two_guests: tuple[str, str]) -> None:
    res = vpkg("g1", "g2", "--", "install", "foo")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.index("== g1 (apt-get) ==") < out.index("== g2 (apt-get) ==")
    for name in two_guests:
        part = section(out, name)
        assert "apt-get install foo\n" in part
        # Its own UTS namespace: the hostname its NAME.conf gives, not the host's.
        assert f"hostname: {name}.guest\n" in part
        assert f"-- {name}: exit 0\n" in out
    assert os.uname().nodename not in ("g1.guest", "g2.guest")
    assert summary(out) == [["g1", "apt-get", "exit 0"], ["g2", "apt-get", "exit 0"]]


def test_exit_codes_propagate(vroots: Paths) -> None:
    make_guest(vroots, "g1")
    make_guest(vroots, "g2", fails=True)  # the marker is in g2's tree only
    res = vpkg("g1", "g2", "--", "install", "foo")
    assert res.returncode == 1
    assert summary(res.stdout) == [["g1", "apt-get", "exit 0"], ["g2", "apt-get", "exit 3"]]
    buf = bytearray()
    outcomes = pkg.run_all(vroots, ["g1", "g2"], ["install", "fail"], output=buf.extend)
    assert [(o.code, o.ok) for o in outcomes] == [(3, False), (3, False)]
    assert buf.decode().count("apt-get install fail\n") == 2


def test_all_means_every_guest_in_name_order(vroots: Paths) -> None:
    make_guest(vroots, "gb")
    make_guest(vroots, "ga")
    res = vpkg("ALL", "--", "upgrade")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.index("== ga ") < res.stdout.index("== gb ")
    assert [row[0] for row in summary(res.stdout)] == ["ga", "gb"]
    make_guest(vroots, "gc", fake=False, start=False)
    res = vpkg("ALL", "--", "upgrade")
    assert res.returncode == 1
    assert summary(res.stdout) == [["ga", "apt-get", "exit 0"], ["gb", "apt-get", "exit 0"],
                                   ["gc", "-", "no package manager"]]


def test_a_stopped_guest_is_reported_or_started_and_stopped_again(vroots: Paths) -> None:
    make_guest(vroots, "g1", start=False)
    res = vpkg("g1", "--", "install", "foo")
    assert res.returncode == 1
    assert "apt-get install" not in res.stdout
    assert summary(res.stdout)[0][:2] == ["g1", "apt-get"]
    assert summary(res.stdout)[0][2].startswith("not running")
    assert nothing_running(vroots, "g1")

    res = vpkg("--start", "g1", "--", "install", "foo")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hostname: g1.guest\n" in section(res.stdout, "g1")
    assert summary(res.stdout) == [["g1", "apt-get", "exit 0"]]
    assert nothing_running(vroots, "g1")


def test_start_leaves_an_already_running_guest_running(vroots: Paths) -> None:
    make_guest(vroots, "g1")
    res = vpkg("--start", "g1", "--", "install", "foo")
    assert res.returncode == 0, res.stdout + res.stderr
    assert guest.running(vroots, "g1")


def test_a_link_out_of_the_root_runs_nothing_on_the_host(vroots: Paths, tmp_path: Path) -> None:
    marker = tmp_path / "evil-ran"
    evil = tmp_path / "evil"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    os.chmod(evil, 0o700)
    make_guest(vroots, "g1", fake=False)
    os.symlink(evil, vroots.root("g1") / "usr/bin/apt-get")
    assert pkg.detect(vroots.root("g1")) == pkg.Manager("apt-get", "/usr/bin/apt-get")
    res = vpkg("g1", "--", "install", "foo")
    # The link is resolved inside the guest, where that host path does not exist.
    assert res.returncode == 1
    [row] = summary(res.stdout)
    assert row[:2] == ["g1", "apt-get"]
    assert "No such file" in row[2] and not row[2].startswith("exit")
    assert not marker.exists()


# --- usage ------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "message"), [
    (["g1", "install"], "follow '--'"),
    (["g1", "--"], "no arguments"),
    (["ALL", "g1", "--", "x"], "ALL stands alone"),
    (["../x", "--", "x"], "invalid guest name"),
    (["--ref", "g1", "g1", "g2", "--", "x"], "--ref goes with --unify"),
    (["--unify", "g1", "--", "x"], "besides the reference"),
    (["--unify", "--ref", "zz", "g1", "--", "x"], "zz: no such vserver"),
    (["--", "x"], "usage"),
])
def test_usage_errors_run_nothing(vroots: Paths, capsys: pytest.CaptureFixture[str],
                                  argv: list[str], message: str) -> None:
    make_guest(vroots, "g1", start=False)
    assert vpkg_cli.main(argv) == 2
    err = capsys.readouterr()
    assert message in err.err
    assert err.out == ""
    with pytest.raises(pkg.PkgError):
        pkg.run_all(vroots, ["g1"], [], output=bytearray().extend)


def test_unknown_guest_is_reported(vroots: Paths) -> None:
    res = vpkg("nope", "--", "install", "foo")
    assert res.returncode == 1
    assert summary(res.stdout) == [["nope", "-", "no such vserver"]]


def test_console_script_help() -> None:
    res = subprocess.run([str(Path(sys.executable).with_name("vpkg")), "--help"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0
    assert "ALL|GUEST... -- ARGS..." in res.stdout


# --- --unify ---------------------------------------------------------------------

def fake_unify_module(calls: list[tuple[Paths, str, list[str]]],
                      fail: bool = False) -> types.ModuleType:
    mod = types.ModuleType("hostagent.unify")

    def unify(paths: Paths, ref: str, guests: list[str], *,
              output: object = None) -> str:
        calls.append((paths, ref, guests))
        if fail:
            raise OSError("no space left")
        return "2 files shared"

    mod.unify = unify  # type: ignore[attr-defined]
    return mod


def test_unify_absent_fails_only_for_that(vroots: Paths, two_guests: tuple[str, str],
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # None in sys.modules makes the import fail as if the module did not exist.
    monkeypatch.setitem(sys.modules, "hostagent.unify", None)
    code = vpkg_cli.main(["--unify", "g1", "g2", "--", "install", "foo"])
    out = capsys.readouterr()
    assert code == vpkg_cli.EXIT_UNIFY_UNAVAILABLE == 3
    assert "re-unification is not available" in out.err
    assert summary(out.out) == [["g1", "apt-get", "exit 0"], ["g2", "apt-get", "exit 0"]]

    monkeypatch.setitem(sys.modules, "hostagent.unify", types.ModuleType("hostagent.unify"))
    assert vpkg_cli.main(["--unify", "g1", "g2", "--", "install", "foo"]) == 3
    assert "has no unify()" in capsys.readouterr().err


def test_unify_runs_after_success_only(vroots: Paths, two_guests: tuple[str, str],
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[Paths, str, list[str]]] = []
    monkeypatch.setitem(sys.modules, "hostagent.unify", fake_unify_module(calls))
    assert vpkg_cli.main(["--unify", "g1", "g2", "--", "install", "foo"]) == 0
    assert calls == [(vroots, "g1", ["g2"])]
    assert "re-unified g2 with g1: 2 files shared" in capsys.readouterr().out
    assert vpkg_cli.main(["--unify", "--ref", "g2", "ALL", "--", "install", "foo"]) == 0
    assert calls[-1] == (vroots, "g2", ["g1"])

    calls.clear()
    assert vpkg_cli.main(["--unify", "g1", "g2", "--", "install", "fail"]) == 1
    assert calls == []
    assert "not every guest succeeded" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "hostagent.unify", fake_unify_module(calls, fail=True))
    assert vpkg_cli.main(["--unify", "g1", "g2", "--", "install", "foo"]) == 1
    assert "no space left" in capsys.readouterr().err
