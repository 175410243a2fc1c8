"""Reset a template guest to its template, and archive a path from inside a guest,
through a real agent (the classroom's two calls)."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent import guest, quota, recovery, templates, wire
from hostagent.cgroup import Cgroup
from hostagent.client import AgentClient, AgentError
from hostagent.operations import Journal
from hostagent.paths import Paths
from tests.agent.test_agent_api import EventLog
from tests.agent.test_quota import btrfs_roots  # noqa: F401 - a fixture used below
from tests.helpers import AgentProcess, run

TEMPLATE = "bbt"


@pytest.fixture
def agent(vroots: Paths) -> Iterator[AgentProcess]:
    templates.create(vroots, TEMPLATE, "busybox", None)
    # Something of the template's below /home that a guest may hide.
    (templates.template_path(vroots, TEMPLATE) / "home/readme").write_text("from the template\n")
    proc = AgentProcess(vroots).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[AgentClient]:
    with AgentClient(agent.socket) as c:
        yield c


def build(client: AgentClient, name: str, method: str = "template", **kw: object) -> None:
    body: dict[str, object] = {"name": name, "method": method, **kw}
    if method == "template":
        body["source"] = TEMPLATE
    client.run(client.build(wire.BuildRequest.from_json(body)))


def started(client: AgentClient, name: str, method: str = "template", **kw: object) -> str:
    build(client, name, method, **kw)
    client.run(client.state(name, "start"))
    return name


def sh(paths: Paths, name: str, script: str) -> str:
    buf = bytearray()
    code = guest.exec_in(paths, name, ["/bin/sh", "-c", script], output=buf.extend)
    out = buf.decode(errors="replace")
    assert code == 0, out
    return out


def upper_entries(paths: Paths, name: str) -> set[str]:
    upper, _ = templates.overlay_dirs(paths, name)
    return {str(Path(d, f).relative_to(upper)) for d, dirs, files in os.walk(upper)
            for f in (*dirs, *files)}


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.removeprefix("./").rstrip("/") or ".": m for m in tar.getmembers()}


def read_member(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            if m.name.removeprefix("./") == name:
                f = tar.extractfile(m)
                assert f is not None
                return f.read()
    raise AssertionError(f"no member {name}")


# --- the wire ---------------------------------------------------------------------------

def test_requests_normalise_paths_and_round_trip() -> None:
    req = wire.ResetRequest.from_json({"keep": ["/home/", "//srv/./www", "/a b/é"]})
    assert req.keep == ("/home", "/srv/www", "/a b/é")
    assert wire.ResetRequest.from_json(req.to_json()) == req
    assert wire.ResetRequest.from_json({}) == wire.ResetRequest(keep=())
    arch = wire.ArchiveRequest.from_query([("path", "/home/s/lab3/"), ("max_bytes", "1024")])
    assert arch == wire.ArchiveRequest(path="/home/s/lab3", max_bytes=1024)
    assert wire.ArchiveRequest.from_json(arch.to_json()) == arch
    assert wire.ArchiveRequest.from_query([("path", "/")]).max_bytes == 64 << 20


paths_ish = st.text(max_size=30) | st.sampled_from(["/", "/..", "/a/../b", "/home", "a/b"])


@settings(max_examples=300, deadline=None, database=None)
@given(keep=st.lists(paths_ish, max_size=20) | st.integers() | st.none(),
       pairs=st.lists(st.tuples(st.sampled_from(["path", "max_bytes", "x"]),
                                paths_ish | st.integers().map(str)), max_size=4))
def test_reset_and_archive_requests_raise_only_wire_errors(keep: object,
                                                           pairs: list[tuple[str, str]]) -> None:
    for make in (lambda: wire.ResetRequest.from_json({"keep": keep}),
                 lambda: wire.ArchiveRequest.from_query(pairs)):
        try:
            got = make()
        except wire.WireError as e:
            assert e.field and e.message
            continue
        assert type(got).from_json(got.to_json()) == got


# --- reset ------------------------------------------------------------------------------

def test_reset_removes_what_the_guest_wrote_and_restores_what_it_deleted(
        agent: AgentProcess, client: AgentClient, vroots: Paths) -> None:
    started(client, "u1")
    sh(vroots, "u1", "echo mine > /etc/new; rm /var/www/index.html; mkdir -p /opt/x/y; "
       "echo z > /opt/x/y/z; chmod 0700 /")
    client.run(client.state("u1", "stop"))
    assert upper_entries(vroots, "u1")
    log = EventLog(agent.socket)
    result = client.run(client.reset("u1"))
    assert result == {"kept": [], "absent": [], "refused": []}
    assert upper_entries(vroots, "u1") == set()
    root = vroots.root("u1")
    assert not (root / "etc/new").exists() and not (root / "opt").exists()
    assert (root / "var/www/index.html").is_file()
    tpl = templates.template_path(vroots, TEMPLATE)
    assert os.stat(root).st_mode == os.stat(tpl).st_mode
    log.wait_for("u1", wire.EVENT_GUEST_RESET)
    assert log.lifecycle("u1") == [wire.EVENT_GUEST_RESETTING, wire.EVENT_GUEST_RESET]
    assert client.guest("u1").state == wire.STATE_STOPPED
    # And the guest itself sees its template again.
    client.run(client.state("u1", "start"))
    assert sh(vroots, "u1", "ls /etc/new /opt 2>&1; head -c 6 /var/www/index.html; echo") \
        .count("No such file") == 2


def test_reset_keeping_home_keeps_its_files_and_drops_the_rest(
        client: AgentClient, vroots: Paths) -> None:
    started(client, "u1")
    sh(vroots, "u1", "mkdir -p /home/student/lab3 && echo work > /home/student/lab3/a.txt; "
       "rm /home/readme; echo secret > /root/notes; echo hi > /etc/motd; "
       "rm /var/www/index.html")
    client.run(client.state("u1", "stop"))
    result = client.run(client.reset("u1", keep=["/home", "/srv/nothing"]))
    assert result == {"kept": ["/home"], "absent": ["/srv/nothing"], "refused": []}
    root = vroots.root("u1")
    assert (root / "home/student/lab3/a.txt").read_text() == "work\n"
    assert not (root / "home/readme").exists()  # its deletion (a whiteout) is kept too
    assert (root / "home/guest").is_dir()
    assert not (root / "root/notes").exists() and not (root / "etc/motd").exists()
    assert (root / "var/www/index.html").is_file()
    assert {e.split("/")[0] for e in upper_entries(vroots, "u1")} == {"home"}


def test_reset_keeps_a_path_below_an_opaque_directory_and_shows_the_template_again(
        client: AgentClient, vroots: Paths) -> None:
    # rm -rf /home and mkdir again: the upper /home is opaque, hiding the template's.
    started(client, "u1")
    sh(vroots, "u1", "rm -rf /home && mkdir -p /home/guest/lab && echo w > /home/guest/lab/f && "
       "mkdir /home/other")
    root = vroots.root("u1")
    assert not (root / "home/readme").exists()
    client.run(client.state("u1", "stop"))
    result = client.run(client.reset("u1", keep=["/home/guest/lab"]))
    assert result["kept"] == ["/home/guest/lab"]
    assert (root / "home/guest/lab/f").read_text() == "w\n"
    assert (root / "home/readme").read_text() == "from the template\n"
    assert not (root / "home/other").exists()


def test_reset_does_not_follow_a_symlink_the_guest_put_in_place_of_a_kept_parent(
        client: AgentClient, vroots: Paths, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    (canary / "student").mkdir(parents=True)
    (canary / "student/precious").write_text("host data\n")
    started(client, "u1")
    # On the host, upper/home -> the canary and upper/srv -> /: a reset that
    # followed either would empty a host directory.
    sh(vroots, "u1", f"rm -rf /home && ln -s {canary} /home && ln -s / /srv && "
       "mkdir -p /etc/keep && ln -s / /etc/keep/up")
    client.run(client.state("u1", "stop"))
    result = client.run(client.reset("u1", keep=["/home/student", "/srv/etc", "/etc/keep"]))
    assert result == {"kept": ["/etc/keep"], "absent": [],
                      "refused": ["/home/student", "/srv/etc"]}
    assert (canary / "student/precious").read_text() == "host data\n"
    root = vroots.root("u1")
    assert (root / "home").is_dir() and not (root / "home").is_symlink()
    assert (root / "home/readme").read_text() == "from the template\n"
    assert os.readlink(root / "etc/keep/up") == "/"  # kept as the link it is
    assert upper_entries(vroots, "u1") == {"etc", "etc/keep", "etc/keep/up"}


def test_reset_is_refused_while_running_and_for_a_guest_not_on_a_template(
        client: AgentClient, vroots: Paths) -> None:
    started(client, "u1")
    sh(vroots, "u1", "echo mine > /etc/new")
    with pytest.raises(AgentError) as e:
        client.reset("u1")
    assert (e.value.status, e.value.field) == (409, "name")
    assert "is running" in e.value.error
    assert (vroots.root("u1") / "etc/new").exists()
    build(client, "plain", "busybox")
    with pytest.raises(AgentError) as e:
        client.reset("plain")
    assert e.value.status == 409 and "reset needs a template guest" in e.value.error
    with pytest.raises(AgentError) as e:
        client.reset("nosuch")
    assert e.value.status == 404


@pytest.mark.parametrize(("keep", "field", "words"), [
    (["home"], "keep.0", "absolute"),
    (["/home/../etc"], "keep.0", "'..'"),
    (["/ok", "/"], "keep.1", "keep everything"),
    ([f"/p{i}" for i in range(17)], "keep", "more than 16"),
    (["/a\nb"], "keep.0", "control character"),
    ("/home", "keep", "expected an array"),
])
def test_bad_keep_paths_get_400_naming_the_field(
        client: AgentClient, keep: object, field: str, words: str) -> None:
    with pytest.raises(AgentError) as e:
        client.request("POST", "/guests/u1/reset", {"keep": keep})
    assert (e.value.status, e.value.field) == (400, field)
    assert words in e.value.error


def test_reset_keeps_the_disk_limit_of_the_guest(btrfs_roots: Paths) -> None:  # noqa: F811
    paths = btrfs_roots
    templates.create(paths, "t", "busybox", None)
    guest.build(paths, "u", guest.BuildOptions(method="template", source="t",
                                               disk_limit="20M"))
    guest.start(paths, "u")
    sh(paths, "u", "dd if=/dev/zero of=/root/big bs=1M count=8 conv=fsync 2>/dev/null")
    guest.stop(paths, "u")
    own = guest.disk_of(paths, "u")
    assert own is not None and quota.usage(own).exclusive > 7 << 20
    guest.reset(paths, "u")
    assert guest.disk_of(paths, "u") == own
    deadline = time.monotonic() + 30
    while (used := quota.usage(own)).exclusive >= 1 << 20:  # counted at a commit
        assert time.monotonic() < deadline, used
        os.sync()
        time.sleep(0.2)
    assert used.limit == 20 << 20
    guest.start(paths, "u")
    buf = bytearray()
    guest.exec_in(paths, "u", ["/bin/sh", "-c", "dd if=/dev/zero of=/root/big bs=1M count=40 "
                               "conv=fsync; echo rc=$?"], output=buf.extend)
    assert "Disk quota exceeded" in buf.decode(), buf.decode()


def stopped_with_changes(paths: Paths) -> Path:
    """A stopped unified guest u1 with /etc/new and /home/guest/keep of its own; its root."""
    templates.create(paths, TEMPLATE, "busybox", None)
    guest.build(paths, "u1", guest.BuildOptions(method="template", source=TEMPLATE))
    root = paths.root("u1")
    (root / "etc/new").write_text("x\n")
    (root / "home/guest/keep").write_text("k\n")
    return root


def test_an_interrupted_reset_is_completed_by_the_next_agent(vroots: Paths) -> None:
    root = stopped_with_changes(vroots)
    journal = Journal(vroots.rundir / "journal")
    journal.dir.mkdir(parents=True, exist_ok=True)
    (journal.dir / "op1.json").write_text(json.dumps(
        {"id": "op1", "kind": "reset", "guest": "u1", "args": {"keep": ["/home/guest"]},
         "pid": 1, "time": time.time()}))
    [r] = recovery.recover(vroots, journal)
    assert (r.kind, r.error) == ("reset", None) and r.outcome.startswith("completed")
    assert not (root / "etc/new").exists() and (root / "home/guest/keep").exists()


def test_vserver_reset_on_the_command_line(vroots: Paths) -> None:
    root = stopped_with_changes(vroots)
    vserver = str(Path(sys.executable).parent / "vserver")
    bad = run([vserver, "u1", "reset", "--keep", "home"], check_rc=2)
    assert "absolute" in bad.stderr and (root / "etc/new").exists()
    out = run([vserver, "u1", "reset", "--keep", "/home/guest"]).stdout
    assert "kept: /home/guest" in out
    assert not (root / "etc/new").exists() and (root / "home/guest/keep").exists()


# --- archive ----------------------------------------------------------------------------

def test_archive_of_a_directory_holds_what_the_guest_wrote(
        client: AgentClient, vroots: Paths) -> None:
    started(client, "u1")
    sh(vroots, "u1", "mkdir -p /home/student/lab3/sub && cd /home/student/lab3 && "
       "echo answer > a.txt && head -c 300000 /dev/urandom > sub/b.bin && "
       "chown -R 1000:1000 . && chmod 0640 a.txt && ln -s a.txt link")
    data = b"".join(client.archive("u1", "/home/student/lab3"))
    got = members(data)
    assert set(got) == {".", "a.txt", "sub", "sub/b.bin", "link"}
    assert read_member(data, "a.txt") == b"answer\n"
    b_bin = (vroots.root("u1") / "home/student/lab3/sub/b.bin").read_bytes()
    assert read_member(data, "sub/b.bin") == b_bin
    assert (got["a.txt"].uid, got["a.txt"].mode) == (1000, 0o640)
    assert got["link"].issym() and got["link"].linkname == "a.txt"
    # Its operation says how it went.
    [op] = [o for o in client.request("GET", "/operations").json() if o["kind"] == "archive"]
    assert op["state"] == wire.OP_SUCCESS
    assert op["result"] == {"path": "/home/student/lab3", "bytes": len(data), "exit_code": 0,
                            "truncated": False}


def test_a_symlink_to_root_in_the_archived_dir_is_stored_as_a_symlink(
        client: AgentClient, vroots: Paths) -> None:
    started(client, "u1")
    sh(vroots, "u1", "mkdir -p /home/s/d && ln -s / /home/s/d/root && "
       f"ln -s {vroots.rootdir} /home/s/d/host && echo hi > /home/s/d/f")
    data = b"".join(client.archive("u1", "/home/s/d"))
    got = members(data)
    assert set(got) == {".", "root", "host", "f"}
    assert got["root"].issym() and got["root"].linkname == "/"
    assert got["host"].issym() and got["host"].linkname == str(vroots.rootdir)


def test_archive_of_a_missing_path_or_a_file_is_an_error_with_tars_message(
        client: AgentClient, vroots: Paths) -> None:
    started(client, "u1")
    with pytest.raises(AgentError) as e:
        client.archive("u1", "/home/nobody/lab3")
    assert (e.value.status, e.value.field) == (404, "path")
    assert "No such file or directory" in e.value.error and "/home/nobody/lab3" in e.value.error
    with pytest.raises(AgentError) as e:
        client.archive("u1", "/etc/passwd")
    assert (e.value.status, e.value.field) == (422, "path")
    assert "Not a directory" in e.value.error


def test_archive_is_refused_for_a_private_or_stopped_guest_and_bad_queries(
        client: AgentClient, vroots: Paths) -> None:
    started(client, "priv", "busybox", flags=["lock", "private"])
    with pytest.raises(AgentError) as e:
        client.archive("priv", "/etc")
    assert e.value.status == 409 and "private" in e.value.error
    build(client, "off")
    with pytest.raises(AgentError) as e:
        client.archive("off", "/etc")
    assert e.value.status == 409 and "not running" in e.value.error
    for params, field in (({"path": "etc"}, "path"), ({"path": "/a/../etc"}, "path"),
                          ({"path": "/etc", "max_bytes": "0"}, "max_bytes"),
                          ({"path": "/etc", "max_bytes": str((1 << 30) + 1)}, "max_bytes"),
                          ({"path": "/etc", "max_bytes": "1e3"}, "max_bytes"),
                          ({"path": "/etc", "user": "x"}, "user"), ({}, "path")):
        with pytest.raises(AgentError) as e:
            client.request("GET", "/guests/priv/archive", params=params)
        assert (e.value.status, e.value.field) == (400, field), params


def _agent_counts(agent: AgentProcess) -> tuple[int, int]:
    """(threads, child processes) of the agent."""
    assert agent.proc is not None
    pid = agent.proc.pid
    tasks = os.listdir(f"/proc/{pid}/task")
    children = 0
    for t in tasks:
        with open(f"/proc/{pid}/task/{t}/children") as f:
            children += len(f.read().split())
    return len(tasks), children


def _guest_procs(paths: Paths, name: str) -> int:
    st = guest.read_state(paths, name)
    assert st is not None
    return len(Cgroup(st.cgroup).procs())


def _settles(what: object, want: object, probe: object) -> None:
    deadline = time.monotonic() + 30
    while (got := probe()) != want:  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: {got} != {want}"
        time.sleep(0.1)


FOREVER = ("#!/bin/sh\n"
           "trap '' PIPE\n"  # a closed pipe does not end it: only a kill does
           "while :; do echo 0123456789abcdef0123456789abcdef0123456789abcdef; done\n")


def forever_tar(paths: Paths, name: str) -> None:
    """Put FOREVER first on the guest's PATH as its tar."""
    sh(paths, name, "mkdir -p /usr/local/bin && "
       f"cat > /usr/local/bin/tar <<'EOF'\n{FOREVER}EOF\nchmod 755 /usr/local/bin/tar")


def test_a_tar_that_writes_forever_is_cut_at_max_bytes_and_leaves_nothing_behind(
        agent: AgentProcess, client: AgentClient, vroots: Paths) -> None:
    started(client, "u1")
    assert members(b"".join(client.archive("u1", "/etc")))  # warm: the agent's threads exist
    forever_tar(vroots, "u1")
    threads, children = _agent_counts(agent)
    procs = _guest_procs(vroots, "u1")
    chunks = client.archive("u1", "/etc", max_bytes=1 << 20)
    got = bytearray()
    with pytest.raises(AgentError) as e:
        for chunk in chunks:
            got += chunk
    assert (e.value.status, e.value.field) == (413, "max_bytes")
    assert len(got) == 1 << 20 and got.startswith(b"0123456789abcdef")
    _settles("agent threads and children", (threads, children), lambda: _agent_counts(agent))
    _settles("guest processes", procs, lambda: _guest_procs(vroots, "u1"))
    [op] = [o for o in client.request("GET", "/operations").json()
            if o["kind"] == "archive" and o["result"] and o["result"]["truncated"]]
    assert op["result"]["bytes"] == 1 << 20 and op["result"]["exit_code"] == 137


def test_a_client_that_goes_away_has_the_tar_killed(
        agent: AgentProcess, client: AgentClient, vroots: Paths) -> None:
    started(client, "u1")
    assert members(b"".join(client.archive("u1", "/etc")))
    forever_tar(vroots, "u1")
    threads, children = _agent_counts(agent)
    procs = _guest_procs(vroots, "u1")
    chunks = client.archive("u1", "/etc", max_bytes=1 << 30)
    assert next(iter(chunks))
    chunks.close()
    _settles("guest processes", procs, lambda: _guest_procs(vroots, "u1"))
    _settles("agent threads and children", (threads, children), lambda: _agent_counts(agent))
    ops = [o for o in client.request("GET", "/operations").json() if o["kind"] == "archive"]
    assert ops[-1]["state"] == wire.OP_FAILURE and "went away" in ops[-1]["error"]


def test_a_client_that_goes_away_before_the_first_byte_has_a_silent_tar_killed(
        agent: AgentProcess, client: AgentClient, vroots: Paths) -> None:
    started(client, "u1")
    sh(vroots, "u1", "mkdir -p /usr/local/bin && printf '#!/bin/sh\\nexec sleep 3600\\n' "
       "> /usr/local/bin/tar && chmod 755 /usr/local/bin/tar")
    procs = _guest_procs(vroots, "u1")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(agent.socket))
        s.sendall(b"GET /1.0/guests/u1/archive?path=/etc HTTP/1.1\r\nHost: agent\r\n\r\n")
        _settles("the silent tar running", procs + 1, lambda: _guest_procs(vroots, "u1"))
    # Nothing was written, so only the agent's look at the connection notices.
    _settles("guest processes", procs, lambda: _guest_procs(vroots, "u1"))
    ops = [o for o in client.request("GET", "/operations").json() if o["kind"] == "archive"]
    _settles("the operation's end", wire.OP_FAILURE,
             lambda: client.operation(ops[-1]["id"]).state)
