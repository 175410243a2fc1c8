"""hostagent.wire: every message round-trips, and every bad field is refused by name.

No kernel, no root: these run anywhere, fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostagent import conf, wire
from hostagent.wire import (
    BuildRequest,
    Config,
    ConfigPut,
    ErrorReply,
    Event,
    ExecRequest,
    ExecResult,
    GuestInfo,
    HostInfo,
    Operation,
    ProcessRow,
    StateChange,
    TemplateCreate,
    TemplateInfo,
    Usage,
    WireError,
    check_relative_path,
    decode_json,
    decode_list,
)

REPO = Path(__file__).resolve().parents[2]

# --- Valid messages ----------------------------------------------------------------------------

VALID: list[Any] = [
    BuildRequest(name="web", method="copy"),
    BuildRequest(name="web", method="busybox", ips=("10.0.0.2",)),
    BuildRequest(
        name="web-1",
        method="debootstrap",
        source="bookworm",
        hostname="web.example.org",
        ips=("10.0.0.2", "eth0:10.0.0.3/24", "fd00:db8::2/64", "dummy0:198.18.2.1/255.255.255.0"),
        caps=("CAP_NET_RAW", "!CAP_SYS_CHROOT", "!CAP_SYS_ADMIN"),
        flags=("lock", "nproc"),
        nice=-5,
        ulimit="-H -n 4096 -c 0",
        onboot=True,
        priority=10,
        context=4242,
        description="the company web server, v2 (prod)",
        disk_limit="2G",
        disk_image=True,
    ),
    BuildRequest(name="db", method="rootfs", source="images/debian-12.tar.zst", disk_limit="512M"),
    BuildRequest(name="db", method="template", source="bookworm-base", disk_limit="1GiB"),
    ConfigPut(values={"DESCRIPTION": "a 'quoted' $thing", "S_NICE": "5", "IPROOT": ""}),
    ConfigPut(values={}),
    StateChange(action="start"),
    StateChange(action="stop", force=True, timeout=30),
    StateChange(action="restart", timeout=0),
    ExecRequest(command=("ls", "-l", "/")),
    ExecRequest(command=("printf", "a\tb\x1b[0m\n", ""), user="www-data", timeout=0.5),
    ExecRequest(command=("id",), user="1000", timeout=3600),
    TemplateCreate(name="base", method="guest", source="web"),
    TemplateCreate(name="base", method="rootfs", source="debian.tar"),
    TemplateCreate(name="base", method="debootstrap", source="trixie"),
    Config(values={"IPROOT": "10.0.0.2", "X_LOCAL": "kept"}, etag='"abc123"'),
    ExecResult(exit_code=0, output="hello\n\x00\x1b[31mred", truncated=False),
    ExecResult(exit_code=-9, output="", truncated=True),
    GuestInfo(
        name="web",
        state=wire.STATE_RUNNING,
        context=4242,
        init_pid=1234,
        processes=7,
        uptime=12.5,
        addresses=("10.0.0.2/24",),
        description="web server",
        onboot=True,
        priority=100,
        template="base",
        unrestricted_network=False,
        disk="10 MiB used of 1024 MiB",
        limits=("memory 512M: enforced",),
    ),
    GuestInfo(
        name="off",
        state=wire.STATE_STOPPED,
        context=None,
        init_pid=None,
        processes=0,
        uptime=0,
        addresses=(),
        description=None,
        onboot=False,
        priority=-3,
        template=None,
        unrestricted_network=True,
        disk=None,
        limits=(),
    ),
    Operation(
        id="0f8e2d9c-4b1a-4c55-9a51-2a8b7f3e1d00",
        kind="build",
        guest="web",
        state=wire.OP_RUNNING,
        progress=40,
        message="unpacking\nstep 2",
        result=None,
        error=None,
        created=1700000000.0,
        updated=1700000001.5,
        may_cancel=True,
    ),
    Operation(
        id="op1",
        kind="template-create",
        guest=None,
        state=wire.OP_SUCCESS,
        progress=100,
        message="",
        result={"path": "/x", "n": [1, 2.5, None, True, {"deep": "yes"}]},
        error=None,
        created=1.0,
        updated=2.0,
        may_cancel=False,
    ),
    Event(
        type=wire.TYPE_LIFECYCLE,
        timestamp=1700000000.25,
        guest="web",
        action=wire.EVENT_GUEST_EXITED,
        metadata={"exit_code": 0},
    ),
    Event(type=wire.TYPE_DROPPED, timestamp=1.0, guest=None, action="", metadata={}),
    ProcessRow(
        pid=4321, guest_pid=1, user="root\x1b", cpu=0.5, mem=1.25, rss=4096, command="init [2]"
    ),
    ProcessRow(pid=1, guest_pid=None, user="1000", cpu=0, mem=0, rss=0, command=""),
    HostInfo(
        api_version=wire.API_VERSION,
        hostname="host1",
        kernel="6.1.0-18-amd64",
        cgroup="v2",
        cgroup_controllers={"memory": "enforced", "io": "not delegated"},
        quota=None,
        features={"lxcfs": True, "seccomp": False},
        guests=3,
        running=1,
    ),
    Usage(
        name="web",
        context=4242,
        cgroup="vpanel/web",
        processes=3,
        cpu_seconds=1.5,
        cpu_user_seconds=1.0,
        cpu_system_seconds=0.5,
        memory_current=1 << 20,
        memory_peak=2 << 20,
        net_rx_bytes=None,
        net_tx_bytes=0,
        disk_used=None,
        uptime=60.0,
    ),
    TemplateInfo(name="base", size_bytes=123456, guests=("web", "db"), source="debootstrap trixie"),
    ErrorReply(error="web: already exists\nsee the log", field="name", status=409),
    ErrorReply(error="internal"),
]

MESSAGE_TYPES = [
    BuildRequest,
    ConfigPut,
    StateChange,
    ExecRequest,
    TemplateCreate,
    Config,
    ExecResult,
    GuestInfo,
    Operation,
    Event,
    ProcessRow,
    HostInfo,
    Usage,
    TemplateInfo,
    ErrorReply,
]


def example(cls: type, n: int = 0) -> Any:
    """The Nth valid CLS in VALID."""
    return [m for m in VALID if type(m) is cls][n]


def wire_trip(message: Any) -> Any:
    """MESSAGE as the other side decodes it: to_json, bytes, decode_json, from_json."""
    body = json.dumps(message.to_json()).encode()
    return type(message).from_json(decode_json(body))


@pytest.mark.parametrize("message", VALID, ids=lambda m: type(m).__name__)
def test_valid_message_round_trips_through_json(message: Any) -> None:
    assert wire_trip(message) == message


def test_every_message_type_has_a_valid_example() -> None:
    assert {type(m) for m in VALID} == set(MESSAGE_TYPES)
    assert set(MESSAGE_TYPES) <= {getattr(wire, n) for n in wire.__all__}


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_messages_are_frozen_dataclasses(cls: type) -> None:
    assert dataclasses.is_dataclass(cls)
    field = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(example(cls), field, None)


def test_request_defaults_may_be_left_out() -> None:
    assert BuildRequest.from_json({"name": "web", "method": "copy"}) == BuildRequest("web", "copy")
    assert StateChange.from_json({"action": "stop"}) == StateChange("stop")
    assert ExecRequest.from_json({"command": ["true"]}) == ExecRequest(("true",), None, 60.0)
    assert ErrorReply.from_json({"error": "x", "field": "ips.2"}) == ErrorReply("x", "ips.2", 400)


def test_null_means_absent_for_optional_request_fields() -> None:
    got = BuildRequest.from_json(
        {"name": "web", "method": "copy", "source": None, "nice": None, "description": None}
    )
    assert got == BuildRequest("web", "copy")


def test_integers_are_accepted_where_a_float_is_wanted() -> None:
    got = ExecRequest.from_json({"command": ["true"], "timeout": 5})
    assert got.timeout == 5.0 and isinstance(got.timeout, float)


# --- Bad fields --------------------------------------------------------------------------------

BUILD = {"name": "web", "method": "copy"}
ROOTFS = {"name": "web", "method": "rootfs", "source": "debian.tar"}
EXEC = {"command": ["ls"]}
GUEST_INFO = example(GuestInfo).to_json()
OPERATION = example(Operation).to_json()
LIFECYCLE = example(Event).to_json()
PROCESS = example(ProcessRow).to_json()
HOST = example(HostInfo).to_json()
USAGE = example(Usage).to_json()
EXEC_RESULT = example(ExecResult).to_json()

SEVENTEEN_IPS = [f"10.0.0.{i}" for i in range(1, 18)]

# (type, valid base, keys to change, the one field the error must name)
BAD: list[tuple[type, dict[str, Any], dict[str, Any], str]] = [
    # names
    (BuildRequest, BUILD, {"name": "Web"}, "name"),
    (BuildRequest, BUILD, {"name": "web_1"}, "name"),
    (BuildRequest, BUILD, {"name": "a" * 32}, "name"),
    (BuildRequest, BUILD, {"name": 7}, "name"),
    (BuildRequest, BUILD, {"name": ["web"]}, "name"),
    (BuildRequest, {"method": "copy"}, {}, "name"),
    (BuildRequest, BUILD, {"method": "docker"}, "method"),
    (BuildRequest, BUILD, {"method": "COPY"}, "method"),
    # sources
    (BuildRequest, ROOTFS, {"source": "../x"}, "source"),
    (BuildRequest, ROOTFS, {"source": "images/../../etc"}, "source"),
    (BuildRequest, ROOTFS, {"source": "/abs"}, "source"),
    (BuildRequest, ROOTFS, {"source": "-rf"}, "source"),
    (BuildRequest, ROOTFS, {"source": "images/-rf"}, "source"),
    (BuildRequest, ROOTFS, {"source": "a\x00b"}, "source"),
    (BuildRequest, ROOTFS, {"source": "a\nb"}, "source"),
    (BuildRequest, ROOTFS, {"source": "a//b"}, "source"),
    (BuildRequest, ROOTFS, {"source": "a/./b"}, "source"),
    (BuildRequest, ROOTFS, {"source": "dir/"}, "source"),
    (BuildRequest, ROOTFS, {"source": ""}, "source"),
    (BuildRequest, ROOTFS, {"source": None}, "source"),
    (BuildRequest, ROOTFS, {"source": ["debian.tar"]}, "source"),
    (BuildRequest, ROOTFS, {"source": "x" * 256}, "source"),
    (BuildRequest, BUILD, {"source": "debian.tar"}, "source"),
    (BuildRequest, {"name": "web", "method": "busybox"}, {"source": ""}, "source"),
    (BuildRequest, {"name": "web", "method": "template"}, {}, "source"),
    (BuildRequest, {"name": "web", "method": "template"}, {"source": "Base"}, "source"),
    (BuildRequest, {"name": "web", "method": "template"}, {"source": "../base"}, "source"),
    (BuildRequest, {"name": "web", "method": "debootstrap"}, {}, "source"),
    (BuildRequest, {"name": "web", "method": "debootstrap"}, {"source": "Bookworm"}, "source"),
    (BuildRequest, {"name": "web", "method": "debootstrap"}, {"source": "../b"}, "source"),
    # addresses
    (BuildRequest, BUILD, {"ips": SEVENTEEN_IPS}, "ips"),
    (BuildRequest, BUILD, {"ips": "10.0.0.1"}, "ips"),
    (BuildRequest, BUILD, {"ips": {"0": "10.0.0.1"}}, "ips"),
    (BuildRequest, BUILD, {"ips": ["10.0.0.1", "10.0.0.1"]}, "ips.1"),
    (BuildRequest, BUILD, {"ips": ["10.0.0.1", "10.0.0.2", "eth0:10.0.0.1/24"]}, "ips.2"),
    (BuildRequest, BUILD, {"ips": ["ALL"]}, "ips.0"),
    (BuildRequest, BUILD, {"ips": ["0.0.0.0"]}, "ips.0"),
    (BuildRequest, BUILD, {"ips": ["10.0.0.1", ""]}, "ips.1"),
    (BuildRequest, BUILD, {"ips": ["::"]}, "ips.0"),
    (BuildRequest, BUILD, {"ips": ["eth0:0.0.0.0/8"]}, "ips.0"),
    (BuildRequest, BUILD, {"ips": ["10.0.0.1 10.0.0.2"]}, "ips.0"),
    (BuildRequest, BUILD, {"ips": ["10.0.0.256"]}, "ips.0"),
    (BuildRequest, BUILD, {"ips": ["10.0.0.1/33"]}, "ips.0"),
    (BuildRequest, BUILD, {"ips": ["fe80::1%eth0"]}, "ips.0"),
    (BuildRequest, BUILD, {"ips": ["eth 0:10.0.0.1"]}, "ips.0"),
    (BuildRequest, BUILD, {"ips": [167772161]}, "ips.0"),
    # capabilities and flags
    (BuildRequest, BUILD, {"caps": ["CAP_SYS_ADMIN"]}, "caps.0"),
    (BuildRequest, BUILD, {"caps": ["CAP_NET_RAW", "CAP_SYS_MODULE"]}, "caps.1"),
    (BuildRequest, BUILD, {"caps": ["CAP_NOPE"]}, "caps.0"),
    (BuildRequest, BUILD, {"caps": ["cap_net_raw"]}, "caps.0"),
    (BuildRequest, BUILD, {"caps": ["CAP_NET_RAW CAP_KILL"]}, "caps.0"),
    (BuildRequest, BUILD, {"caps": ["CAP_NET_RAW", "!CAP_NET_RAW"]}, "caps.1"),
    (BuildRequest, BUILD, {"caps": "CAP_NET_RAW"}, "caps"),
    (BuildRequest, BUILD, {"flags": ["bogus"]}, "flags.0"),
    (BuildRequest, BUILD, {"flags": ["minit"]}, "flags.0"),
    (BuildRequest, BUILD, {"flags": ["lock", "lock"]}, "flags.1"),
    (BuildRequest, BUILD, {"flags": "lock"}, "flags"),
    # numbers: true is not 1, 1.0 is not 1
    (BuildRequest, BUILD, {"nice": True}, "nice"),
    (BuildRequest, BUILD, {"nice": 20}, "nice"),
    (BuildRequest, BUILD, {"nice": 1.0}, "nice"),
    (BuildRequest, BUILD, {"nice": "5"}, "nice"),
    (BuildRequest, BUILD, {"priority": True}, "priority"),
    (BuildRequest, BUILD, {"priority": 5000}, "priority"),
    (BuildRequest, BUILD, {"context": 1}, "context"),
    (BuildRequest, BUILD, {"context": False}, "context"),
    (BuildRequest, BUILD, {"context": 49152}, "context"),
    (BuildRequest, BUILD, {"onboot": 1}, "onboot"),
    (BuildRequest, BUILD, {"onboot": "yes"}, "onboot"),
    (BuildRequest, BUILD, {"onboot": None}, "onboot"),
    # free text and the rest
    (BuildRequest, BUILD, {"hostname": "-bad"}, "hostname"),
    (BuildRequest, BUILD, {"hostname": "a" * 65}, "hostname"),
    (BuildRequest, BUILD, {"hostname": "web\n"}, "hostname"),
    (BuildRequest, BUILD, {"hostname": ""}, "hostname"),
    (BuildRequest, BUILD, {"ulimit": "-n"}, "ulimit"),
    (BuildRequest, BUILD, {"ulimit": "-z 5"}, "ulimit"),
    (BuildRequest, BUILD, {"ulimit": "-n 10\n-c 0"}, "ulimit"),
    (BuildRequest, BUILD, {"description": 'say "hi"'}, "description"),
    (BuildRequest, BUILD, {"description": "it's"}, "description"),
    (BuildRequest, BUILD, {"description": "back\\slash"}, "description"),
    (BuildRequest, BUILD, {"description": "two\nlines"}, "description"),
    (BuildRequest, BUILD, {"description": "\x1b[2J"}, "description"),
    (BuildRequest, BUILD, {"description": "x" * 201}, "description"),
    (BuildRequest, BUILD, {"disk_limit": "lots"}, "disk_limit"),
    (BuildRequest, BUILD, {"disk_limit": " 1G"}, "disk_limit"),
    (BuildRequest, BUILD, {"disk_limit": 1 << 30}, "disk_limit"),
    (BuildRequest, BUILD, {"disk_image": True}, "disk_image"),
    (
        BuildRequest,
        {"name": "web", "method": "template", "source": "base", "disk_limit": "1G"},
        {"disk_image": True},
        "disk_image",
    ),
    (BuildRequest, BUILD, {"colour": "blue"}, "colour"),
    (BuildRequest, BUILD, {"Name": "web"}, "Name"),
    # ConfigPut
    (ConfigPut, {"values": {}}, {"values": {"FOO": "x"}}, "values.FOO"),
    (ConfigPut, {"values": {}}, {"values": {"iproot": "10.0.0.2"}}, "values.iproot"),
    (ConfigPut, {"values": {}}, {"values": {"DESCRIPTION": "a\nb"}}, "values.DESCRIPTION"),
    (ConfigPut, {"values": {}}, {"values": {"DESCRIPTION": "a\rb"}}, "values.DESCRIPTION"),
    (ConfigPut, {"values": {}}, {"values": {"DESCRIPTION": "a\x00b"}}, "values.DESCRIPTION"),
    (ConfigPut, {"values": {}}, {"values": {"DESCRIPTION": "x" * 4097}}, "values.DESCRIPTION"),
    (ConfigPut, {"values": {}}, {"values": {"S_NICE": 5}}, "values.S_NICE"),
    (ConfigPut, {"values": {}}, {"values": {"ONBOOT": True}}, "values.ONBOOT"),
    (ConfigPut, {"values": {}}, {"values": {"IPROOT": "ALL"}}, "values.IPROOT"),
    (ConfigPut, {"values": {}}, {"values": {"IPROOT": " 0.0.0.0 "}}, "values.IPROOT"),
    (ConfigPut, {"values": {}}, {"values": {"S_CAPS_UNSAFE": "yes"}}, "values.S_CAPS_UNSAFE"),
    (ConfigPut, {"values": {}}, {"values": {"BUILD_METHOD": "template x"}}, "values.BUILD_METHOD"),
    (ConfigPut, {"values": {}}, {"values": [["IPROOT", "x"]]}, "values"),
    (ConfigPut, {"values": {}}, {"values": "IPROOT=x"}, "values"),
    (ConfigPut, {}, {}, "values"),
    (ConfigPut, {"values": {}}, {"etag": "x"}, "etag"),
    # StateChange
    (StateChange, {"action": "start"}, {"action": "pause"}, "action"),
    (StateChange, {"action": "start"}, {"action": 1}, "action"),
    (StateChange, {"action": "stop"}, {"timeout": True}, "timeout"),
    (StateChange, {"action": "stop"}, {"timeout": 3601}, "timeout"),
    (StateChange, {"action": "stop"}, {"timeout": -1}, "timeout"),
    (StateChange, {"action": "stop"}, {"timeout": 1.5}, "timeout"),
    (StateChange, {"action": "stop"}, {"force": "yes"}, "force"),
    (StateChange, {"action": "stop"}, {"force": 0}, "force"),
    # ExecRequest
    (ExecRequest, EXEC, {"command": "ls -l"}, "command"),
    (ExecRequest, EXEC, {"command": []}, "command"),
    (ExecRequest, EXEC, {"command": ["x"] * 257}, "command"),
    (ExecRequest, EXEC, {"command": ["ls", "a\x00"]}, "command.1"),
    (ExecRequest, EXEC, {"command": ["ls", 1]}, "command.1"),
    (ExecRequest, EXEC, {"command": [""]}, "command.0"),
    (ExecRequest, EXEC, {"command": ["echo", "x" * 65537]}, "command.1"),
    (ExecRequest, EXEC, {"command": ["echo", "\u00e9" * 40000]}, "command.1"),
    (ExecRequest, EXEC, {"command": ["echo"] + ["x" * 60000] * 5}, "command"),
    (ExecRequest, EXEC, {"user": "Root"}, "user"),
    (ExecRequest, EXEC, {"user": "-root"}, "user"),
    (ExecRequest, EXEC, {"user": "4294967295"}, "user"),
    (ExecRequest, EXEC, {"user": "007"}, "user"),
    (ExecRequest, EXEC, {"user": 0}, "user"),
    (ExecRequest, EXEC, {"user": ""}, "user"),
    (ExecRequest, EXEC, {"timeout": 0}, "timeout"),
    (ExecRequest, EXEC, {"timeout": -1}, "timeout"),
    (ExecRequest, EXEC, {"timeout": 3600.5}, "timeout"),
    (ExecRequest, EXEC, {"timeout": True}, "timeout"),
    (ExecRequest, EXEC, {"timeout": "60"}, "timeout"),
    (ExecRequest, EXEC, {"timeout": math.nan}, "timeout"),
    (ExecRequest, EXEC, {"timeout": math.inf}, "timeout"),
    (ExecRequest, EXEC, {"timeout": 10**400}, "timeout"),
    (ExecRequest, EXEC, {"cwd": "/"}, "cwd"),
    # TemplateCreate
    (TemplateCreate, {"name": "base", "method": "guest", "source": "web"}, {"name": "B"}, "name"),
    (TemplateCreate, {"name": "base", "method": "guest"}, {}, "source"),
    (TemplateCreate, {"name": "base", "method": "guest", "source": "../web"}, {}, "source"),
    (TemplateCreate, {"name": "base", "method": "rootfs", "source": "/etc"}, {}, "source"),
    (TemplateCreate, {"name": "base", "method": "busybox"}, {}, "method"),
    (TemplateCreate, {"name": "base", "method": "template", "source": "x"}, {}, "method"),
    # Replies
    (GuestInfo, GUEST_INFO, {"state": "exploded"}, "state"),
    (GuestInfo, GUEST_INFO, {"processes": -1}, "processes"),
    (GuestInfo, GUEST_INFO, {"onboot": 1}, "onboot"),
    (GuestInfo, GUEST_INFO, {"addresses": "10.0.0.2"}, "addresses"),
    (GuestInfo, GUEST_INFO, {"limits": ["ok", "\x1b[2J"]}, "limits.1"),
    (GuestInfo, GUEST_INFO, {"uptime": True}, "uptime"),
    (GuestInfo, {k: v for k, v in GUEST_INFO.items() if k != "state"}, {}, "state"),
    (GuestInfo, GUEST_INFO, {"extra": 1}, "extra"),
    (Operation, OPERATION, {"progress": 101}, "progress"),
    (Operation, OPERATION, {"state": "done"}, "state"),
    (Operation, OPERATION, {"result": ["x"]}, "result"),
    (Operation, OPERATION, {"result": {"x": [1, math.nan]}}, "result.x.1"),
    (Operation, OPERATION, {"id": "../etc"}, "id"),
    (Operation, OPERATION, {"may_cancel": None}, "may_cancel"),
    (Event, LIFECYCLE, {"action": "guest-exploded"}, "action"),
    (Event, LIFECYCLE, {"type": "gossip"}, "type"),
    (Event, LIFECYCLE, {"metadata": []}, "metadata"),
    (Event, LIFECYCLE, {"guest": "Web"}, "guest"),
    (ProcessRow, PROCESS, {"rss": True}, "rss"),
    (ProcessRow, PROCESS, {"pid": 0}, "pid"),
    (ProcessRow, PROCESS, {"command": "a\x00b"}, "command"),
    (ProcessRow, PROCESS, {"cpu": "0.5"}, "cpu"),
    (HostInfo, HOST, {"features": {"lxcfs": "yes"}}, "features.lxcfs"),
    (HostInfo, HOST, {"features": ["lxcfs"]}, "features"),
    (HostInfo, HOST, {"cgroup_controllers": {"memory": 1}}, "cgroup_controllers.memory"),
    (HostInfo, HOST, {"api_version": "one"}, "api_version"),
    (HostInfo, HOST, {"guests": True}, "guests"),
    (Usage, {k: v for k, v in USAGE.items() if k != "uptime"}, {}, "uptime"),
    (Usage, USAGE, {"memory_peak": -1}, "memory_peak"),
    (TemplateInfo, example(TemplateInfo).to_json(), {"guests": ["web", "Db"]}, "guests.1"),
    (ExecResult, EXEC_RESULT, {"exit_code": True}, "exit_code"),
    (ExecResult, EXEC_RESULT, {"exit_code": 256}, "exit_code"),
    (ExecResult, EXEC_RESULT, {"output": None}, "output"),
    (ErrorReply, {"error": "x"}, {"status": 200}, "status"),
    (Config, {"values": {}, "etag": "x"}, {"values": {"bad key": "x"}}, "values.bad key"),
]


def bad_id(case: tuple[type, dict[str, Any], dict[str, Any], str]) -> str:
    cls, _, change, field = case
    return f"{cls.__name__}-{field}-{repr(change)[:40]}"


@pytest.mark.parametrize("case", BAD, ids=[bad_id(c) for c in BAD])
def test_bad_field_is_refused_naming_exactly_that_field(
    case: tuple[type, dict[str, Any], dict[str, Any], str],
) -> None:
    cls, base, change, field = case
    with pytest.raises(WireError) as caught:
        cls.from_json({**base, **change})  # type: ignore[attr-defined]
    assert caught.value.field == field, caught.value.message
    assert caught.value.message


@pytest.mark.parametrize("base", [BUILD, ROOTFS, EXEC], ids=str)
def test_bases_of_the_bad_field_table_are_valid(base: dict[str, Any]) -> None:
    cls = ExecRequest if "command" in base else BuildRequest
    cls.from_json(base)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("obj", [None, [], "web", 1, True, 1.5])
def test_a_message_that_is_not_an_object_is_refused_as_the_body(cls: Any, obj: object) -> None:
    with pytest.raises(WireError) as caught:
        cls.from_json(obj)
    assert caught.value.field == "body"


def test_unknown_key_with_unprintable_name_is_quoted_in_the_field() -> None:
    with pytest.raises(WireError) as caught:
        BuildRequest.from_json({**BUILD, "\x1b[2J" + "x" * 100: 1})
    assert "\x1b" not in caught.value.field
    assert len(caught.value.field) < 80


def test_sixteen_addresses_are_allowed() -> None:
    ips = tuple(f"10.0.0.{i}" for i in range(1, conf.MAX_IPROOT + 1))
    assert BuildRequest.from_json({**BUILD, "ips": list(ips)}).ips == ips


def test_every_conf_key_is_accepted_by_config_put_but_the_read_only_ones() -> None:
    writable = [k for k in conf.KNOWN_KEYS if k not in ConfigPut.READ_ONLY_KEYS]
    got = ConfigPut.from_json({"values": dict.fromkeys(writable, "")})
    assert list(got.values) == writable


def test_config_put_refuses_more_keys_than_a_conf_has() -> None:
    values = {f"K{i}": "" for i in range(len(conf.KNOWN_KEYS) + 1)}
    with pytest.raises(WireError) as caught:
        ConfigPut.from_json({"values": values})
    assert caught.value.field == "values"


def test_removing_an_unsafe_capability_is_allowed() -> None:
    got = BuildRequest.from_json({**BUILD, "caps": ["!CAP_SYS_ADMIN", "!CAP_BPF"]})
    assert got.caps == ("!CAP_SYS_ADMIN", "!CAP_BPF")


def test_decode_list_prefixes_the_item_index() -> None:
    items = [GUEST_INFO, {**GUEST_INFO, "state": "exploded"}]
    with pytest.raises(WireError) as caught:
        decode_list(GuestInfo, items)
    assert caught.value.field == "1.state"
    assert decode_list(GuestInfo, [GUEST_INFO]) == (example(GuestInfo),)
    with pytest.raises(WireError) as caught:
        decode_list(GuestInfo, GUEST_INFO)
    assert caught.value.field == "body"


# --- check_relative_path -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["debian.tar", "sub/dir/img.tar.zst", "a-b/.hidden", "x..y", "é"])
def test_relative_path_below_the_base_is_accepted(path: str) -> None:
    assert check_relative_path(path, "f") == path


@pytest.mark.parametrize(
    "path",
    ["", "/abs", "..", "../x", "a/..", "a/../b", ".", "./a", "a//b", "a/", "-rf", "a/-rf",
     "a\x00b", "a\nb", "a\tb", "x" * 4096, "x" * 256, 7, None, ["a"]],
)
def test_relative_path_that_could_leave_the_base_is_refused(path: object) -> None:
    with pytest.raises(WireError) as caught:
        check_relative_path(path, "source")
    assert caught.value.field == "source"


# --- decode_json -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b" " * (wire.MAX_BODY + 1),
        b"[" * 33 + b"]" * 33,
        b'{"a":' * 40 + b"1" + b"}" * 40,
        b"[" * 100000,
        b"NaN",
        b'{"timeout": Infinity}',
        b"[-Infinity]",
        b"1e400",
        b"\xff\xfe{}",
        b'{"a": "\xc3"}',
        b"\xef\xbb\xbf{}",
        b'{"a": 1, "a": 2}',
        b"",
        b"{} {}",
        b"{'a': 1}",
        b"1" * 5000,
    ],
    ids=lambda b: repr(b[:24]),
)
def test_bad_body_is_refused_as_the_body(body: bytes) -> None:
    with pytest.raises(WireError) as caught:
        decode_json(body)
    assert caught.value.field == "body"


def test_body_at_the_limits_is_accepted() -> None:
    assert decode_json(b"[" * wire.MAX_DEPTH + b"]" * wire.MAX_DEPTH) is not None
    padded = b'"' + b"x" * (wire.MAX_BODY - 2) + b'"'
    assert decode_json(padded) == "x" * (wire.MAX_BODY - 2)
    # Brackets and escaped quotes inside strings are not nesting.
    deep_text = json.dumps({"a": "[" * 100 + '\\"{' * 100}).encode()
    assert decode_json(deep_text) == {"a": "[" * 100 + '\\"{' * 100}


def test_wire_error_is_a_value_error_with_a_json_form() -> None:
    e = WireError("ips.2", "address 10.0.0.1 is also item 0")
    assert isinstance(e, ValueError)
    assert (e.field, e.message) == ("ips.2", "address 10.0.0.1 is also item 0")
    assert e.to_json() == {"error": "address 10.0.0.1 is also item 0", "field": "ips.2"}
    assert ErrorReply.from_json(e.to_json()) == ErrorReply(e.message, "ips.2", 400)


# --- Agreement with the rest of hostagent ------------------------------------------------------


def test_build_methods_are_the_builders_plus_template() -> None:
    from hostagent import build, templates

    builders = (*build.METHODS, templates.TEMPLATE_METHOD)
    assert builders == wire.BUILD_METHODS


def test_suite_rule_is_the_builders() -> None:
    from hostagent import build

    assert wire.SUITE_RE.pattern == build.SUITE_RE.pattern
    assert wire.SUITE_RE.flags == build.SUITE_RE.flags


def test_usage_mirrors_guest_usage() -> None:
    from hostagent import usage

    ours = [(f.name, f.type) for f in dataclasses.fields(Usage)]
    theirs = [(f.name, f.type) for f in dataclasses.fields(usage.GuestUsage)]
    assert ours == theirs


def test_template_info_mirrors_templates() -> None:
    from hostagent import templates

    ours = [(f.name, f.type) for f in dataclasses.fields(TemplateInfo)]
    theirs = [(f.name, f.type) for f in dataclasses.fields(templates.TemplateInfo)]
    assert ours == theirs


def test_event_and_state_names_are_distinct() -> None:
    for names in (wire.GUEST_STATES, wire.LIFECYCLE_EVENTS, wire.EVENT_TYPES, wire.OP_STATES):
        assert len(set(names)) == len(names)
    assert wire.EVENT_GUEST_EXITED == "guest-exited"


def test_importing_wire_stays_light() -> None:
    """The panel imports wire: it must not drag in the agent's heavy or Django modules."""
    code = "import json, sys, hostagent.wire; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    heavy = {
        "pyroute2", "aiohttp", "zstandard", "tarfile", "django", "cffi", "httpx",
        "hostagent.build", "hostagent.guest", "hostagent.syscalls", "hostagent.netns",
    }  # fmt: skip
    assert not {m for m in loaded if m.split(".")[0] in heavy or m in heavy}


# --- Fuzz: nothing but WireError ever escapes --------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["web", "copy", "rootfs", "../x", "ALL", "CAP_NET_RAW", "lock", "10.0.0.1"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=10,
)
FIELD_NAMES = sorted({f.name for cls in MESSAGE_TYPES for f in dataclasses.fields(cls)})
# Objects whose keys are mostly real field names, so the fuzz reaches the field checks.
messages = st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=8), json_values, max_size=8
)
# Bounded so the suite stays fast; no example database, so no .hypothesis/ in the repo.
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _only_wire_errors(cls: Any, value: object) -> None:
    try:
        got = cls.from_json(value)
    except WireError as e:
        assert isinstance(e.field, str) and e.field
        assert isinstance(e.message, str) and e.message
        return
    # Whatever is accepted survives its own round trip unchanged.
    assert cls.from_json(json.loads(json.dumps(got.to_json(), allow_nan=False))) == got


@FUZZ
@given(cls=st.sampled_from(MESSAGE_TYPES), value=json_values | messages)
def test_from_json_raises_only_wire_error_on_arbitrary_values(cls: Any, value: object) -> None:
    _only_wire_errors(cls, value)


@FUZZ
@given(example=st.sampled_from(VALID), data=st.data())
def test_from_json_raises_only_wire_error_when_one_field_is_arbitrary(
    example: Any, data: st.DataObject
) -> None:
    # One of the message's own keys, so the other fields stay valid and the check
    # of this one is what answers.
    key = data.draw(st.sampled_from([f.name for f in dataclasses.fields(example)]))
    _only_wire_errors(type(example), {**example.to_json(), key: data.draw(json_values)})


@FUZZ
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_decode_json_raises_only_wire_error_on_arbitrary_bytes(body: bytes) -> None:
    try:
        value = decode_json(body)
    except WireError as e:
        assert e.field == "body" and e.message
        return
    for cls in MESSAGE_TYPES:
        _only_wire_errors(cls, value)
