"""The agent's wire schema: every request and reply of its REST API, in one module.

Imported by the agent's HTTP server and by the panel's client, so both sides
agree on one definition of each message (Incus keeps its `shared/api` the same
way). Requests carry only what a caller may write (Incus' `XPut`); replies carry
what the agent reports (`X`), e.g. ConfigPut is written and Config is read.

Every type is a frozen dataclass with `to_json()` (a dict for json.dumps) and a
`from_json(obj)` classmethod that takes whatever json.loads returned - any
type at all - and either returns the dataclass or raises WireError naming the
field at fault (dotted when nested: `ips.2`). The rules, for every from_json:

- a message is a JSON object; a key the type does not have is an error naming it;
- true/false are not numbers, and a number is never accepted where a string or
  list is wanted (nor a string where a list is);
- numbers are finite; a float field accepts an integer;
- strings hold no NUL and, unless the field says otherwise, no C0/C1 control
  character, and have a maximum length;
- names, addresses, sizes, capabilities, flags and ulimits follow the same rules
  NAME.conf does (hostagent.names, hostagent.conf, hostagent.caps,
  hostagent.ulimit), so what the wire accepts NAME.conf accepts too. Rules that
  need the whole file or the host (ranges of limit sizes, a free context, an
  address in use) stay with the server.

Constructing a dataclass directly validates nothing: the agent builds replies
from state it already validated, and requests are only ever trusted after
from_json. decode_json() turns a request body into the object from_json takes.

Only the standard library and cheap hostagent modules are imported here
(tests/agent/test_wire.py checks that pyroute2, aiohttp, zstandard, tarfile and
Django stay out), so the panel can import it without the agent's weight.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, Protocol, Self, TypeVar

from hostagent import caps as capslib
from hostagent import conf
from hostagent.names import InvalidName, check_name
from hostagent.ulimit import UlimitError, parse_ulimit

__all__ = [
    "API_VERSION",
    "ARCHIVE_DEFAULT_BYTES",
    "ARCHIVE_MAX_BYTES",
    "BUILD_METHODS",
    "CONSOLE_CLOSE_FELL_BEHIND",
    "CONSOLE_CLOSE_TAKEN_OVER",
    "CONSOLE_ENDINGS",
    "CONSOLE_IDLE_MAX",
    "CONSOLE_SIZE_MAX",
    "EVENT_CONSOLE_CLOSED",
    "EVENT_CONSOLE_OPENED",
    "EVENT_GUEST_ADOPTED",
    "EVENT_GUEST_BUILDING",
    "EVENT_GUEST_CREATED",
    "EVENT_GUEST_DELETED",
    "EVENT_GUEST_DELETING",
    "EVENT_GUEST_EXITED",
    "EVENT_GUEST_OPERATION_FAILED",
    "EVENT_GUEST_REBOOT_REQUESTED",
    "EVENT_GUEST_RESET",
    "EVENT_GUEST_RESETTING",
    "EVENT_GUEST_RESTARTED",
    "EVENT_GUEST_RESTARTING",
    "EVENT_GUEST_STARTED",
    "EVENT_GUEST_STARTING",
    "EVENT_GUEST_STOPPED",
    "EVENT_GUEST_STOPPING",
    "EVENT_GUEST_UPDATED",
    "EVENT_ONBOOT_FAILED",
    "EVENT_TYPES",
    "GUEST_STATES",
    "LIFECYCLE_EVENTS",
    "MAX_BODY",
    "MAX_DEPTH",
    "OP_CANCELLED",
    "OP_FAILURE",
    "OP_PENDING",
    "OP_RUNNING",
    "OP_STATES",
    "OP_SUCCESS",
    "RESET_KEEP_MAX",
    "STATE_ACTIONS",
    "STATE_BUILDING",
    "STATE_DELETING",
    "STATE_RESTARTING",
    "STATE_RUNNING",
    "STATE_STARTING",
    "STATE_STOPPED",
    "STATE_STOPPING",
    "STATE_UNKNOWN",
    "SUITE_RE",
    "TEMPLATE_METHODS",
    "TYPE_DROPPED",
    "TYPE_LIFECYCLE",
    "TYPE_OPERATION",
    "TYPE_PROCESSES",
    "ArchiveRequest",
    "BuildRequest",
    "Config",
    "ConfigPut",
    "ConsoleError",
    "ConsoleExit",
    "ConsoleInfo",
    "ConsoleRequest",
    "ConsoleResize",
    "ErrorReply",
    "Event",
    "ExecRequest",
    "ExecResult",
    "GuestInfo",
    "HostInfo",
    "Operation",
    "ProcessRow",
    "ResetRequest",
    "StateChange",
    "TemplateCreate",
    "TemplateInfo",
    "Usage",
    "WireError",
    "check_guest_path",
    "check_relative_path",
    "decode_json",
    "decode_list",
]

API_VERSION = "1.0"
# Largest request body the agent reads; the biggest real one is an ExecRequest
# (at most 256 KiB of arguments), so 1 MiB leaves room and bounds memory.
MAX_BODY = 1 << 20
# Deepest nesting decode_json accepts. No message nests more than three levels;
# the limit keeps json's recursive parser far from Python's recursion limit.
MAX_DEPTH = 32

# --- Guest states (GuestInfo.state) --------------------------------------------------------

STATE_STOPPED = "stopped"
STATE_STARTING = "starting"
STATE_RUNNING = "running"
STATE_STOPPING = "stopping"
STATE_RESTARTING = "restarting"
STATE_BUILDING = "building"
STATE_DELETING = "deleting"
STATE_UNKNOWN = "unknown"
GUEST_STATES: tuple[str, ...] = (
    STATE_STOPPED,
    STATE_STARTING,
    STATE_RUNNING,
    STATE_STOPPING,
    STATE_RESTARTING,
    STATE_BUILDING,
    STATE_DELETING,
    STATE_UNKNOWN,
)

# --- Events (Event.type and, for lifecycle events, Event.action) ---------------------------

EVENT_GUEST_CREATED = "guest-created"
EVENT_GUEST_STARTED = "guest-started"
EVENT_GUEST_STOPPED = "guest-stopped"  # stopped through the agent
EVENT_GUEST_RESTARTED = "guest-restarted"
EVENT_GUEST_DELETED = "guest-deleted"
EVENT_GUEST_UPDATED = "guest-updated"  # its NAME.conf changed
EVENT_GUEST_EXITED = "guest-exited"  # died on its own, or halted from inside
EVENT_GUEST_REBOOT_REQUESTED = "guest-reboot-requested"  # reboot(2) from inside
EVENT_GUEST_ADOPTED = "guest-adopted"  # found running when the agent started
EVENT_ONBOOT_FAILED = "onboot-failed"  # an ONBOOT guest did not start at host boot
# An operation on the guest began: the in-between states a page shows.
EVENT_GUEST_BUILDING = "guest-building"
EVENT_GUEST_STARTING = "guest-starting"
EVENT_GUEST_STOPPING = "guest-stopping"
EVENT_GUEST_RESTARTING = "guest-restarting"
EVENT_GUEST_DELETING = "guest-deleting"
EVENT_GUEST_RESETTING = "guest-resetting"  # back to its template (ResetRequest)
# An operation on the guest failed; metadata.state is the state it is left in.
EVENT_GUEST_OPERATION_FAILED = "guest-operation-failed"
# A console session in the guest began or ended; metadata.console is its id.
EVENT_CONSOLE_OPENED = "console-opened"
EVENT_CONSOLE_CLOSED = "console-closed"  # with metadata.code and metadata.reason
EVENT_GUEST_RESET = "guest-reset"  # its own layer emptied but for metadata.keep
LIFECYCLE_EVENTS: tuple[str, ...] = (
    EVENT_GUEST_BUILDING,
    EVENT_GUEST_STARTING,
    EVENT_GUEST_STOPPING,
    EVENT_GUEST_RESTARTING,
    EVENT_GUEST_DELETING,
    EVENT_GUEST_OPERATION_FAILED,
    EVENT_GUEST_CREATED,
    EVENT_GUEST_STARTED,
    EVENT_GUEST_STOPPED,
    EVENT_GUEST_RESTARTED,
    EVENT_GUEST_DELETED,
    EVENT_GUEST_UPDATED,
    EVENT_GUEST_EXITED,
    EVENT_GUEST_REBOOT_REQUESTED,
    EVENT_GUEST_ADOPTED,
    EVENT_ONBOOT_FAILED,
    EVENT_CONSOLE_OPENED,
    EVENT_CONSOLE_CLOSED,
    EVENT_GUEST_RESETTING,
    EVENT_GUEST_RESET,
)

TYPE_LIFECYCLE = "lifecycle"  # action is one of LIFECYCLE_EVENTS
TYPE_OPERATION = "operation"  # metadata is an Operation's to_json()
TYPE_PROCESSES = "processes"  # metadata holds a guest's process rows
TYPE_DROPPED = "dropped"  # the listener fell behind and events were lost: refetch
EVENT_TYPES: tuple[str, ...] = (TYPE_LIFECYCLE, TYPE_OPERATION, TYPE_PROCESSES, TYPE_DROPPED)

# --- Operations (Operation.state) ----------------------------------------------------------

OP_PENDING = "pending"
OP_RUNNING = "running"
OP_SUCCESS = "success"
OP_FAILURE = "failure"
OP_CANCELLED = "cancelled"
OP_STATES: tuple[str, ...] = (OP_PENDING, OP_RUNNING, OP_SUCCESS, OP_FAILURE, OP_CANCELLED)

# --- Consoles ----------------------------------------------------------------------------------

CONSOLE_SIZE_MAX = 1000  # columns or rows of a console's terminal
# Seconds a console outlives its last client: the default and the most a request may ask.
CONSOLE_IDLE_MAX = 300.0
# Why a console ended (ConsoleExit.reason, console-closed's metadata.reason).
CONSOLE_ENDINGS: tuple[str, ...] = ("exited", "closed", "idle", "guest-stopped", "agent-stopping")
# Websocket close codes (the private range 4000-4999, RFC 6455 7.4.2) for a
# client that loses its console's session while the session goes on.
CONSOLE_CLOSE_TAKEN_OVER = 4001  # another client attached to the session
CONSOLE_CLOSE_FELL_BEHIND = 4002  # it did not take the terminal's output: attach again

# --- Request vocabularies --------------------------------------------------------------------

# hostagent.build.METHODS plus templates.TEMPLATE_METHOD, spelled out rather than
# imported: hostagent.build pulls in tarfile and zstandard (the test checks they agree).
BUILD_METHODS: tuple[str, ...] = ("copy", "busybox", "rootfs", "debootstrap", "template")
TEMPLATE_METHODS: tuple[str, ...] = ("guest", "rootfs", "debootstrap")
STATE_ACTIONS: tuple[str, ...] = ("start", "stop", "restart")
# hostagent.build.SUITE_RE, copied for the same reason (the test checks they agree).
SUITE_RE = re.compile(r"^[a-z][a-z0-9-]{1,30}\Z")

# C0 and C1 controls, as hostagent.conf refuses them in free text: these strings
# reach terminals and the panel, where escape sequences must not travel.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# useradd's default NAME_REGEX (shadow-utils), or a numeric uid.
_LOGIN_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")
_UID_RE = re.compile(r"(?:0|[1-9][0-9]{0,9})\Z")
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel, never a user
_OP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_ACTION_RE = re.compile(r"[a-z0-9_-]{0,64}\Z")
_VERSION_RE = re.compile(r"[0-9]{1,4}\.[0-9]{1,4}\Z")
_CONF_KEY_RE = re.compile(r"[A-Z_][A-Z0-9_]*\Z")  # conf._KEY_RE
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_CAP_WORD_RE = re.compile(r"!?CAP_[A-Z0-9_]{1,32}\Z")
_DESCRIPTION_BAD = frozenset("\"'\\")

_PATH_MAX = 4096  # PATH_MAX, include/uapi/linux/limits.h (bytes, with the NUL)
_NAME_MAX = 255  # NAME_MAX, same file
_MAX_DESCRIPTION = 200
_MAX_CONF_VALUE = 4096
_MAX_ULIMIT = 1024
_MAX_EXEC_ARGS = 256
_MAX_EXEC_ARG = 65536  # bytes of one argument (UTF-8)
_MAX_EXEC_TOTAL = 262144  # bytes of all arguments with their NUL terminators
_MAX_EXEC_TIMEOUT = 3600.0
_TEXT = 4096  # most reply strings
_LONG_TEXT = MAX_BODY  # reply strings that carry output or logs
_MAX_ITEMS = 1 << 16  # list and object sizes in replies


_V = TypeVar("_V")


class WireError(ValueError):
    """A message refused; FIELD names the part at fault (dotted for nested: `ips.2`).

    FIELD is "body" when the message as a whole is wrong (not JSON, too big, not
    an object). The server answers 400 with to_json().
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def to_json(self) -> dict[str, object]:
        return {"error": self.message, "field": self.field}


# --- Decoding a body -------------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise WireError("body", f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise WireError("body", f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Parsers disagree on which duplicate wins; refuse to pick one.
            raise WireError("body", f"key {_show(key)} appears twice in one object")
        out[key] = value
    return out


def _depth(text: str) -> int:
    """Deepest [ / { nesting of TEXT outside strings, counted without parsing it."""
    # Escapes come in pairs read left to right, so dropping every \\ and then
    # every \" leaves each remaining " a string delimiter. Garbage is fine here:
    # json.loads refuses it afterwards.
    plain = text.replace("\\\\", "").replace('\\"', "")
    brackets = _NOT_BRACKET_RE.sub("", "".join(plain.split('"')[::2]))
    depth = deepest = 0
    for c in brackets:
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    break
        else:
            depth -= 1
    return deepest


def decode_json(body: bytes) -> object:
    """The JSON value of a request BODY, or WireError("body", ...).

    Refused: more than MAX_BODY bytes, invalid UTF-8, a byte order mark,
    nesting deeper than MAX_DEPTH, NaN/Infinity or numbers that overflow a
    float, and an object with the same key twice.
    """
    if len(body) > MAX_BODY:
        raise WireError("body", f"request body is larger than {MAX_BODY} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError("body", f"not valid UTF-8 at byte {e.start}") from None
    if _depth(text) > MAX_DEPTH:
        raise WireError("body", f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except WireError:
        raise
    except json.JSONDecodeError as e:
        raise WireError(
            "body", f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except (ValueError, RecursionError) as e:
        # Integers over sys.get_int_max_str_digits() digits land here.
        raise WireError("body", f"not valid JSON: {str(e)[:200]}") from None


# --- Field checks ----------------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(text: str) -> str:
    """TEXT quoted for a message, cut short so one bad value cannot flood a log."""
    return repr(text if len(text) <= 64 else text[:64] + "...")


def _join(prefix: str, key: str | int) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _key_field(prefix: str, key: str) -> str:
    """The field that names KEY, which the caller chose: shown as is only when harmless."""
    plain = key if len(key) <= 64 and key.isprintable() and key else _show(key)
    return _join(prefix, plain)


def _object(obj: object, prefix: str, known: frozenset[str]) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise WireError(prefix or "body", f"expected an object, not {_json_type(obj)}")
    for key in obj:
        if not isinstance(key, str):
            raise WireError(prefix or "body", f"object keys must be strings, not {_json_type(key)}")
        if key not in known:
            raise WireError(_key_field(prefix, key), "unknown key")
    return obj


def _utf8(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800" in JSON) has no UTF-8 form.
        raise WireError(field, "not valid Unicode text (a lone surrogate)") from None


def _str(
    value: object,
    field: str,
    *,
    max_len: int,
    empty: bool = True,
    controls: bool = False,
    allow: str = "",
) -> str:
    """VALUE as a string of at most MAX_LEN characters.

    No NUL ever; no other control character unless CONTROLS, or it is in ALLOW.
    """
    if not isinstance(value, str):
        raise WireError(field, f"expected a string, not {_json_type(value)}")
    if len(value) > max_len:
        raise WireError(field, f"longer than {max_len} characters")
    if not value and not empty:
        raise WireError(field, "must not be empty")
    if "\0" in value:
        raise WireError(field, "contains a NUL character")
    if not controls:
        bad = next((c for c in _CONTROL_RE.findall(value) if c not in allow), None)
        if bad is not None:
            raise WireError(field, f"contains the control character {bad!r}")
    _utf8(value, field)
    return value


def _opt_str(value: object, field: str, **kw: Any) -> str | None:
    return None if value is None else _str(value, field, **kw)


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(field, f"expected true or false, not {_json_type(value)}")
    return value


def _int(value: object, field: str, low: int | None = None, high: int | None = None) -> int:
    # bool is an int subclass in Python, but true is no number on the wire.
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(field, f"expected a whole number, not {_json_type(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "" if low is None else str(low)
        hi = "" if high is None else str(high)
        raise WireError(field, f"out of range {lo}..{hi}")
    return value


def _opt_int(
    value: object, field: str, low: int | None = None, high: int | None = None
) -> int | None:
    return None if value is None else _int(value, field, low, high)


def _float(value: object, field: str, low: float | None = None, high: float | None = None) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WireError(field, f"expected a number, not {_json_type(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise WireError(field, "number out of range") from None
    if not math.isfinite(number):
        raise WireError(field, "must be a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        lo = "" if low is None else f"{low:g}"
        hi = "" if high is None else f"{high:g}"
        raise WireError(field, f"out of range {lo}..{hi}")
    return number


def _opt_float(value: object, field: str, low: float | None = None) -> float | None:
    return None if value is None else _float(value, field, low)


def _list(value: object, field: str, max_items: int) -> list[object]:
    if not isinstance(value, list | tuple):
        raise WireError(field, f"expected an array, not {_json_type(value)}")
    if len(value) > max_items:
        raise WireError(field, f"more than {max_items} items")
    return list(value)


def _strings(value: object, field: str, **kw: Any) -> tuple[str, ...]:
    items = _list(value, field, _MAX_ITEMS)
    return tuple(_str(v, _join(field, i), **kw) for i, v in enumerate(items))


def _choice(value: object, field: str, choices: tuple[str, ...]) -> str:
    text = _str(value, field, max_len=64)
    if text not in choices:
        raise WireError(field, f"{_show(text)} is not one of {', '.join(choices)}")
    return text


def _pattern(value: object, field: str, regex: re.Pattern[str], what: str) -> str:
    text = _str(value, field, max_len=256)
    if not regex.match(text):
        raise WireError(field, f"{_show(text)} is not {what}")
    return text


def _name(value: object, field: str) -> str:
    try:
        return check_name(value)
    except InvalidName as e:
        raise WireError(field, str(e)) from None


def _opt_name(value: object, field: str) -> str | None:
    return None if value is None else _name(value, field)


def _names(value: object, field: str) -> tuple[str, ...]:
    return tuple(_name(v, _join(field, i)) for i, v in enumerate(_list(value, field, _MAX_ITEMS)))


def _json_value(value: object, field: str, depth: int = 0) -> object:
    """VALUE if it is plain JSON (finite numbers, string keys), copied; else WireError."""
    if depth > MAX_DEPTH:
        raise WireError(field, f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return _float(value, field)
    if isinstance(value, str):
        _utf8(value, field)
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v, _join(field, i), depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return _json_object(value, field, depth)
    raise WireError(field, f"not a JSON value: {_json_type(value)}")


def _json_object(value: object, field: str, depth: int = 0) -> dict[str, object]:
    if not isinstance(value, dict):
        raise WireError(field, f"expected an object, not {_json_type(value)}")
    out: dict[str, object] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise WireError(field, f"object keys must be strings, not {_json_type(key)}")
        _utf8(key, field)
        out[key] = _json_value(item, _key_field(field, key), depth + 1)
    return out


def _mapping(
    value: object, field: str, max_items: int, check: Callable[[str, object, str], _V]
) -> dict[str, _V]:
    """A JSON object of at most MAX_ITEMS keys, each item checked by CHECK(key, value, field)."""
    if not isinstance(value, dict):
        raise WireError(field, f"expected an object, not {_json_type(value)}")
    if len(value) > max_items:
        raise WireError(field, f"more than {max_items} keys")
    out: dict[str, _V] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise WireError(field, f"object keys must be strings, not {_json_type(key)}")
        sub = _key_field(field, key)
        _utf8(key, sub)
        out[key] = check(key, item, sub)
    return out


def check_relative_path(value: object, field: str) -> str:
    """VALUE if it is a relative path that stays below whatever base it is joined to.

    A non-empty string of at most PATH_MAX bytes, no control character, not
    absolute, and no component that is empty (`a//b`, a trailing /), `.`, `..`
    or starts with `-` (so it never reads as an option to a tool it reaches).
    Symlinks inside the base are the caller's to refuse (open with O_NOFOLLOW /
    RESOLVE_BENEATH): this checks the text only. Raises WireError(FIELD, ...).
    """
    text = _str(value, field, max_len=_PATH_MAX, empty=False)
    if len(text.encode("utf-8")) >= _PATH_MAX:
        raise WireError(field, f"longer than {_PATH_MAX - 1} bytes")
    if text.startswith("/"):
        raise WireError(field, "must be a relative path, not an absolute one")
    for part in text.split("/"):
        if part in ("", ".", ".."):
            raise WireError(field, f"{_show(text)}: empty, '.' and '..' components are not allowed")
        if part.startswith("-"):
            raise WireError(field, f"{_show(text)}: a component may not start with '-'")
        if len(part.encode("utf-8")) > _NAME_MAX:
            raise WireError(field, f"a component is longer than {_NAME_MAX} bytes")
    return text


def _hostname(value: object, field: str) -> str:
    text = _str(value, field, max_len=conf.UTS_LEN, empty=False)
    try:
        return conf.check_hostname(text)
    except ValueError as e:
        raise WireError(field, str(e)) from None


def _ips(value: object, field: str) -> tuple[str, ...]:
    """IPROOT tokens, each a distinct address the guest is bound to."""
    tokens = _list(value, field, conf.MAX_IPROOT)
    seen: dict[object, int] = {}
    out: list[str] = []
    for i, item in enumerate(tokens):
        sub = _join(field, i)
        token = _str(item, sub, max_len=128)
        # "", ALL and 0.0.0.0 are NAME.conf's "no address restriction": the guest
        # would share the host's network. The API never builds such a guest.
        if token.strip() in ("", "ALL", "0.0.0.0"):  # noqa: S104
            raise WireError(sub, f"{_show(token)}: the API never shares the host's network")
        if any(c.isspace() for c in token):
            raise WireError(sub, f"{_show(token)}: one address per item")
        try:
            addr = conf.parse_ip_token(token).address
        except ValueError as e:
            raise WireError(sub, str(e)) from None
        if addr.is_unspecified:
            raise WireError(sub, f"{_show(token)}: the unspecified address binds nothing")
        if addr in seen:
            raise WireError(sub, f"address {addr} is also item {seen[addr]}")
        seen[addr] = i
        out.append(token)
    return tuple(out)


def _caps(value: object, field: str) -> tuple[str, ...]:
    """S_CAPS words: CAP_X adds to the default ceiling, !CAP_X removes from it."""
    words = _list(value, field, len(capslib.CAPS))
    seen: dict[int, int] = {}
    out: list[str] = []
    for i, item in enumerate(words):
        sub = _join(field, i)
        word = _pattern(item, sub, _CAP_WORD_RE, "a capability (CAP_NET_RAW or !CAP_NET_RAW)")
        try:
            n = capslib.cap_number(word.removeprefix("!"))
        except capslib.CapabilityError as e:
            raise WireError(sub, str(e)) from None
        if n in capslib.UNSAFE and not word.startswith("!"):
            # The API has no S_CAPS_UNSAFE: a capability that lets the guest reach
            # the host is granted only by the host's admin, in NAME.conf.
            raise WireError(
                sub, f"{word} is granted only by the host's admin: {capslib.UNSAFE[n]}"
            )
        if n in seen:
            raise WireError(sub, f"{capslib.cap_name(n)} is also item {seen[n]}")
        seen[n] = i
        out.append(word)
    return tuple(out)


def _flags(value: object, field: str) -> tuple[str, ...]:
    items = _list(value, field, len(conf.FLAGS))
    out: list[str] = []
    for i, item in enumerate(items):
        sub = _join(field, i)
        flag = _choice(item, sub, tuple(sorted(conf.FLAGS)))
        if flag in out:
            raise WireError(sub, f"{flag} is also item {out.index(flag)}")
        out.append(flag)
    return tuple(out)


def _ulimit(value: object, field: str) -> str | None:
    if value is None:
        return None
    text = _str(value, field, max_len=_MAX_ULIMIT)
    try:
        parse_ulimit(text)
    except UlimitError as e:
        raise WireError(field, str(e)) from None
    return text


def _size(value: object, field: str) -> str | None:
    if value is None:
        return None
    text = _str(value, field, max_len=32, empty=False)
    if text != text.strip():
        raise WireError(field, "no spaces around a size")
    try:
        conf.parse_size(text)
    except ValueError as e:
        raise WireError(field, str(e)) from None
    return text


def _description(value: object, field: str) -> str | None:
    if value is None:
        return None
    text = _str(value, field, max_len=_MAX_DESCRIPTION)
    if not text.isprintable() or _DESCRIPTION_BAD.intersection(text):
        raise WireError(field, "printable text without quotes, backslashes or newlines")
    return text


def _source(method: str, value: object, field: str) -> str:
    """The source a build or template METHOD reads (every method but copy and busybox)."""
    if value is None:
        raise WireError(field, f"method {method} needs a source")
    if method in ("template", "guest"):
        return _name(value, field)
    if method == "rootfs":
        # A name below the agent's images directory, never a path on the host.
        return check_relative_path(value, field)
    return _pattern(value, field, SUITE_RE, "a Debian suite name (bookworm, trixie)")


class _Message:
    """The keys of one JSON object: unknown ones refused at once, the rest taken by name.

    req() and opt() return (value, field) so a check reads `_int(*m.req("pid"), 1)`.
    """

    def __init__(self, obj: object, cls: type, prefix: str) -> None:
        known = frozenset(f.name for f in dataclasses.fields(cls))
        self.d = _object(obj, prefix, known)
        self.prefix = prefix

    def field(self, key: str) -> str:
        return _join(self.prefix, key)

    def req(self, key: str) -> tuple[object, str]:
        if key not in self.d:
            raise WireError(self.field(key), "is required")
        return self.d[key], self.field(key)

    def opt(self, key: str, default: object = None) -> tuple[object, str]:
        return self.d.get(key, default), self.field(key)


# --- Requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildRequest:
    """POST /guests: build a new guest NAME with METHOD from SOURCE, then write NAME.conf.

    source: a template name (template), a file or directory name below the
    agent's images directory (rootfs), a suite (debootstrap); none for copy and
    busybox. ips: [DEV:]ADDR[/PREFIX] tokens, at most conf.MAX_IPROOT distinct
    addresses, never the unrestricted forms. caps: S_CAPS words, never adding one
    of caps.UNSAFE. flags: S_FLAGS words (empty: the agent's default). ulimit:
    ULIMIT text. disk_limit: a size (512M, 2G); disk_image puts the guest in a
    filesystem image of that size instead of a btrfs qgroup (not for template).
    idmap: IDMAP, conf.IDMAP_MODES (isolated: a private range of host ids; the
    panel asks for it, an API client that leaves it out gets none, as before).
    The server maps this to guest.BuildOptions; the wire does not import guest.
    """

    name: str
    method: str
    source: str | None = None
    hostname: str | None = None
    ips: tuple[str, ...] = ()
    caps: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    nice: int | None = None
    ulimit: str | None = None
    onboot: bool = False
    priority: int | None = None
    context: int | None = None
    description: str | None = None
    disk_limit: str | None = None
    disk_image: bool = False
    idmap: str = "none"

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        name = _name(*m.req("name"))
        method = _choice(*m.req("method"), BUILD_METHODS)
        idmap, idmap_field = m.opt("idmap")
        source, source_field = m.opt("source")
        if method in ("copy", "busybox"):
            if source is not None:
                raise WireError(source_field, f"method {method} takes no source")
        else:
            source = _source(method, source, source_field)
        hostname, hostname_field = m.opt("hostname")
        disk_limit = _size(*m.opt("disk_limit"))
        disk_image = _bool(*m.opt("disk_image", False))
        if disk_image and disk_limit is None:
            raise WireError(m.field("disk_image"), "needs disk_limit, the size of the image")
        if disk_image and method == "template":
            raise WireError(m.field("disk_image"), "a guest on a template is limited by qgroup")
        return cls(
            name=name,
            method=method,
            source=source,
            hostname=None if hostname is None else _hostname(hostname, hostname_field),
            ips=_ips(*m.opt("ips", [])),
            caps=_caps(*m.opt("caps", [])),
            flags=_flags(*m.opt("flags", [])),
            nice=_opt_int(*m.opt("nice"), *conf.NICE_RANGE),
            ulimit=_ulimit(*m.opt("ulimit")),
            onboot=_bool(*m.opt("onboot", False)),
            priority=_opt_int(*m.opt("priority"), *conf.PRIORITY_RANGE),
            context=_opt_int(*m.opt("context"), *conf.CONTEXT_RANGE),
            description=_description(*m.opt("description")),
            disk_limit=disk_limit,
            disk_image=disk_image,
            idmap="none" if idmap is None else _choice(idmap, idmap_field, conf.IDMAP_MODES),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ConfigPut:
    """PUT /guests/NAME/config: the NAME.conf keys to assign ("" clears a key).

    Keys must be conf.KNOWN_KEYS; values are single lines. The server assigns
    each with GuestConf.set (keys left out, comments and unknown keys stay as
    they are) and validates the resulting file with conf.settings before saving.
    Three things only the host's admin may do are refused here: a guest sharing
    the host's network (IPROOT ALL or 0.0.0.0), S_CAPS_UNSAFE, and rewriting
    BUILD_METHOD (the record of how the guest was built, which the template
    bookkeeping reads) or IDMAP_BASE (the agent's record of the guest's id
    range; IDMAP itself may change, on a stopped guest). The writable part of
    Config.
    """

    values: Mapping[str, str]

    READ_ONLY_KEYS: ClassVar[frozenset[str]] = frozenset({"BUILD_METHOD", "IDMAP_BASE"})

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(values=_mapping(*m.req("values"), len(conf.KNOWN_KEYS), _conf_value))

    def to_json(self) -> dict[str, object]:
        return {"values": dict(self.values)}


def _conf_value(key: str, value: object, field: str) -> str:
    if key not in conf.KNOWN_KEYS:
        raise WireError(field, "unknown NAME.conf key")
    if key in ConfigPut.READ_ONLY_KEYS:
        raise WireError(field, "is written by the agent, not through the API")
    text = _str(value, field, max_len=_MAX_CONF_VALUE, controls=True)
    for bad, what in (("\n", "a newline"), ("\r", "a carriage return")):
        if bad in text:
            raise WireError(field, f"a value cannot contain {what}")
    if key == "IPROOT" and any(t in ("ALL", "0.0.0.0") for t in text.split()):  # noqa: S104
        raise WireError(field, "the API never shares the host's network (ALL, 0.0.0.0)")
    if key == "S_CAPS_UNSAFE" and text.lower() not in ("", "no", "false", "0"):
        raise WireError(field, "unsafe capabilities are granted only by the host's admin")
    return text


@dataclass(frozen=True)
class StateChange:
    """PUT /guests/NAME/state: start, stop or restart.

    force: kill at once instead of TERM first. timeout: seconds between TERM
    and KILL (None: the guest's STOP_TIMEOUT).
    """

    action: str
    force: bool = False
    timeout: int | None = None

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            action=_choice(*m.req("action"), STATE_ACTIONS),
            force=_bool(*m.opt("force", False)),
            timeout=_opt_int(*m.opt("timeout"), *conf.STOP_TIMEOUT_RANGE),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ExecRequest:
    """POST /guests/NAME/exec: run COMMAND (an argv, no shell) in the guest.

    1 to 256 arguments, the first non-empty; each at most 64 KiB of UTF-8 and
    all together 256 KiB. Arguments may hold any character but NUL (a program
    may want a tab or an escape). user: a login name or a decimal uid (None:
    root). timeout: seconds, more than 0 and at most an hour.
    """

    command: tuple[str, ...]
    user: str | None = None
    timeout: float = 60.0

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            command=_command(*m.req("command")),
            user=_user(*m.opt("user")),
            timeout=_timeout(*m.opt("timeout", 60.0)),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


def _command(value: object, field: str) -> tuple[str, ...]:
    items = _list(value, field, _MAX_EXEC_ARGS)
    if not items:
        raise WireError(field, "needs at least the program to run")
    command: list[str] = []
    total = 0
    for i, item in enumerate(items):
        sub = _join(field, i)
        arg = _str(item, sub, max_len=_MAX_EXEC_ARG, empty=i > 0, controls=True)
        size = len(arg.encode("utf-8"))
        if size > _MAX_EXEC_ARG:
            raise WireError(sub, f"longer than {_MAX_EXEC_ARG} bytes")
        total += size + 1  # each argument ends in a NUL in the new process
        if total > _MAX_EXEC_TOTAL:
            raise WireError(field, f"arguments longer than {_MAX_EXEC_TOTAL} bytes in all")
        command.append(arg)
    return tuple(command)


def _user(value: object, field: str) -> str | None:
    if value is None:
        return None
    text = _str(value, field, max_len=32, empty=False)
    if _UID_RE.match(text):
        if int(text) > _MAX_UID:
            raise WireError(field, f"uid {text} is above {_MAX_UID}")
        return text
    if not _LOGIN_RE.match(text):
        raise WireError(field, f"{_show(text)} is not a login name or a uid")
    return text


def _timeout(value: object, field: str) -> float:
    number = _float(value, field, 0.0, _MAX_EXEC_TIMEOUT)
    if number <= 0:
        raise WireError(field, "must be more than 0 seconds")
    return number


@dataclass(frozen=True)
class TemplateCreate:
    """POST /templates: template NAME from a stopped guest, a rootfs or debootstrap.

    source: the guest's name (guest), a name below the images directory
    (rootfs) or a suite (debootstrap); always required.
    """

    name: str
    method: str
    source: str

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        name = _name(*m.req("name"))
        method = _choice(*m.req("method"), TEMPLATE_METHODS)
        return cls(name=name, method=method, source=_source(method, *m.opt("source")))

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ConsoleRequest:
    """POST /guests/NAME/console: open a login shell on a COLS x ROWS terminal.

    cols, rows: 1 to CONSOLE_SIZE_MAX. user: as ExecRequest's (None: root).
    idle: seconds the session outlives its last client, more than 0 and at
    most CONSOLE_IDLE_MAX (None: CONSOLE_IDLE_MAX).
    """

    cols: int = 80
    rows: int = 24
    user: str | None = None
    idle: float | None = None

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        idle, idle_field = m.opt("idle")
        if idle is not None:
            idle = _float(idle, idle_field, 0.0, CONSOLE_IDLE_MAX)
            if idle <= 0:
                raise WireError(idle_field, "must be more than 0 seconds")
        return cls(
            cols=_int(*m.opt("cols", 80), 1, CONSOLE_SIZE_MAX),
            rows=_int(*m.opt("rows", 24), 1, CONSOLE_SIZE_MAX),
            user=_user(*m.opt("user")),
            idle=idle,
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ConsoleResize:
    """A text frame from the client of an attached console: the terminal's new size.

    Binary frames are the terminal's bytes; text frames are JSON control
    messages, of which this is the only kind a client sends.
    """

    cols: int
    rows: int
    type: str = "resize"

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        _choice(*m.req("type"), ("resize",))
        return cls(cols=_int(*m.req("cols"), 1, CONSOLE_SIZE_MAX),
                   rows=_int(*m.req("rows"), 1, CONSOLE_SIZE_MAX))

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


# --- Replies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """GET /guests/NAME/config: every key NAME.conf assigns, and its ETag.

    Send the etag back in If-Match with a ConfigPut so a concurrent edit is
    refused (412) rather than overwritten.
    """

    values: dict[str, str]
    etag: str

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            values=_mapping(*m.req("values"), _MAX_ITEMS, _conf_text),
            etag=_str(*m.req("etag"), max_len=256),
        )

    def to_json(self) -> dict[str, object]:
        return {"values": dict(self.values), "etag": self.etag}


def _conf_text(key: str, value: object, field: str) -> str:
    # Any key NAME.conf holds, known to this version or not; values as the file has them.
    if len(key) > _MAX_CONF_VALUE or not _CONF_KEY_RE.match(key):
        raise WireError(field, "not a NAME.conf key")
    return _str(value, field, max_len=_MAX_CONF_VALUE, controls=True)


@dataclass(frozen=True)
class ExecResult:
    """Result of an ExecRequest. output: stdout and stderr interleaved, decoded with
    errors="replace", any character allowed; truncated: it was cut short.
    exit_code: negative when a signal killed the program (as subprocess says)."""

    exit_code: int
    output: str
    truncated: bool

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        exit_code = _int(*m.req("exit_code"), -128, 255)
        output, output_field = m.req("output")
        if not isinstance(output, str):
            raise WireError(output_field, f"expected a string, not {_json_type(output)}")
        _utf8(output, output_field)
        return cls(exit_code=exit_code, output=output, truncated=_bool(*m.req("truncated")))

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ConsoleInfo:
    """POST /guests/NAME/console (201), GET /consoles/ID, each item of GET /consoles.

    attached: a client's websocket is attached now. created: a Unix time.
    """

    id: str
    guest: str
    created: float
    attached: bool

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            id=_pattern(*m.req("id"), _OP_ID_RE, "a console id"),
            guest=_name(*m.req("guest")),
            created=_float(*m.req("created"), 0.0),
            attached=_bool(*m.req("attached")),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ConsoleExit:
    """The last text frame of an attached console: its session ended, the socket closes next.

    code: the shell's exit status (128 + N when signal N killed it, as when the
    session was closed, timed out or its guest stopped), None if it could not
    be learnt. reason: one of CONSOLE_ENDINGS.
    """

    code: int | None
    reason: str
    type: str = "exit"

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        _choice(*m.req("type"), ("exit",))
        return cls(code=_opt_int(*m.req("code"), 0, 255),
                   reason=_choice(*m.req("reason"), CONSOLE_ENDINGS))

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ConsoleError:
    """A text frame to the client of an attached console: its last control message
    was refused (what and which field, as ErrorReply says it). The session goes on."""

    error: str
    field: str | None = None
    type: str = "error"

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        _choice(*m.req("type"), ("error",))
        return cls(error=_str(*m.req("error"), max_len=_TEXT, allow="\t\n"),
                   field=_opt_str(*m.opt("field"), max_len=_TEXT))

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class GuestInfo:
    """GET /guests/NAME (and each item of GET /guests).

    context, init_pid: None while stopped. unrestricted_network: IPROOT is ALL
    or 0.0.0.0 (set on the host; addresses is then empty). disk: "used of
    limit" text where the guest has a limit. limits: each resource limit and
    how it is enforced, one line each. template: what a unified guest is built on.
    """

    name: str
    state: str
    context: int | None
    init_pid: int | None
    processes: int
    uptime: float
    addresses: tuple[str, ...]
    description: str | None
    onboot: bool
    priority: int
    template: str | None
    unrestricted_network: bool
    disk: str | None
    limits: tuple[str, ...]

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            name=_name(*m.req("name")),
            state=_choice(*m.req("state"), GUEST_STATES),
            context=_opt_int(*m.req("context"), 0),
            init_pid=_opt_int(*m.req("init_pid"), 1),
            processes=_int(*m.req("processes"), 0),
            uptime=_float(*m.req("uptime"), 0.0),
            addresses=_strings(*m.req("addresses"), max_len=128),
            description=_opt_str(*m.req("description"), max_len=_TEXT),
            onboot=_bool(*m.req("onboot")),
            priority=_int(*m.req("priority")),
            template=_opt_name(*m.req("template")),
            unrestricted_network=_bool(*m.req("unrestricted_network")),
            disk=_opt_str(*m.req("disk"), max_len=_TEXT),
            limits=_strings(*m.req("limits"), max_len=_TEXT),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


def _op_subject(value: object, field: str) -> str | None:
    """What an operation works on: a guest's name, "template:NAME" for a
    template's, or None."""
    if isinstance(value, str) and value.startswith("template:"):
        return "template:" + _name(value.removeprefix("template:"), field)
    return _opt_name(value, field)


@dataclass(frozen=True)
class Operation:
    """GET /operations/ID: anything slower than about a second (Incus operations).

    kind: what it does ("build", "start", ...). progress: percent. result:
    what it produced once state is OP_SUCCESS; error: why, once OP_FAILURE.
    message and error may span lines. created/updated: Unix times.
    """

    id: str
    kind: str
    guest: str | None
    state: str
    progress: int
    message: str
    result: dict[str, object] | None
    error: str | None
    created: float
    updated: float
    may_cancel: bool

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        result, result_field = m.req("result")
        return cls(
            id=_pattern(*m.req("id"), _OP_ID_RE, "an operation id"),
            kind=_pattern(*m.req("kind"), _KIND_RE, "an operation kind"),
            guest=_op_subject(*m.req("guest")),
            state=_choice(*m.req("state"), OP_STATES),
            progress=_int(*m.req("progress"), 0, 100),
            message=_str(*m.req("message"), max_len=_TEXT, allow="\t\n"),
            result=None if result is None else _json_object(result, result_field),
            error=_opt_str(*m.req("error"), max_len=_LONG_TEXT, allow="\t\n"),
            created=_float(*m.req("created"), 0.0),
            updated=_float(*m.req("updated"), 0.0),
            may_cancel=_bool(*m.req("may_cancel")),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class Event:
    """One message of GET /events (a stream): TYPE, when, which guest, what happened.

    action: for TYPE_LIFECYCLE one of LIFECYCLE_EVENTS; otherwise a short word
    or "". metadata: any JSON object (an Operation's to_json for TYPE_OPERATION).
    """

    type: str
    timestamp: float
    guest: str | None
    action: str
    metadata: dict[str, object]

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        kind = _choice(*m.req("type"), EVENT_TYPES)
        if kind == TYPE_LIFECYCLE:
            action = _choice(*m.req("action"), LIFECYCLE_EVENTS)
        else:
            action = _pattern(*m.req("action"), _ACTION_RE, "an event action")
        return cls(
            type=kind,
            timestamp=_float(*m.req("timestamp"), 0.0),
            guest=_opt_name(*m.req("guest")),
            action=action,
            metadata=_json_object(*m.opt("metadata", {})),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ProcessRow:
    """One process of GET /guests/NAME/processes (vps). pid: the host's; guest_pid:
    as the guest sees it (None if unknown). cpu and mem are percent; rss bytes.

    user and command come from inside the guest, so they may hold any character
    but NUL: whoever shows them escapes them.
    """

    pid: int
    guest_pid: int | None
    user: str
    cpu: float
    mem: float
    rss: int
    command: str

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            pid=_int(*m.req("pid"), 1),
            guest_pid=_opt_int(*m.req("guest_pid"), 1),
            user=_str(*m.req("user"), max_len=256, controls=True),
            cpu=_float(*m.req("cpu"), 0.0),
            mem=_float(*m.req("mem"), 0.0),
            rss=_int(*m.req("rss"), 0),
            command=_str(*m.req("command"), max_len=2 * _TEXT, controls=True),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class HostInfo:
    """GET /: the agent and its host.

    cgroup: the hierarchy in use ("v2", "v1"); cgroup_controllers: controller ->
    how it is used or why not. quota: why DISK_LIMIT cannot be enforced by
    qgroup here, or None when it can. features: name -> available.
    """

    api_version: str
    hostname: str
    kernel: str
    cgroup: str
    cgroup_controllers: dict[str, str]
    quota: str | None
    features: dict[str, bool]
    guests: int
    running: int

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            api_version=_pattern(*m.req("api_version"), _VERSION_RE, "a version (1.0)"),
            hostname=_str(*m.req("hostname"), max_len=256),
            kernel=_str(*m.req("kernel"), max_len=256),
            cgroup=_str(*m.req("cgroup"), max_len=64),
            cgroup_controllers=_mapping(*m.req("cgroup_controllers"), 256, _short_text),
            quota=_opt_str(*m.req("quota"), max_len=_TEXT),
            features=_mapping(*m.req("features"), 256, _feature),
            guests=_int(*m.req("guests"), 0),
            running=_int(*m.req("running"), 0),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


def _short_text(key: str, value: object, field: str) -> str:
    _str(key, field, max_len=64, empty=False)
    return _str(value, field, max_len=_TEXT)


def _feature(key: str, value: object, field: str) -> bool:
    _str(key, field, max_len=64, empty=False)
    return _bool(value, field)


@dataclass(frozen=True)
class Usage:
    """GET /guests/NAME/usage: hostagent.usage.GuestUsage on the wire, field for field.

    None: the host cannot tell (no such controller, or not accounted).
    """

    name: str
    context: int
    cgroup: str
    processes: int
    cpu_seconds: float | None
    cpu_user_seconds: float | None
    cpu_system_seconds: float | None
    memory_current: int | None
    memory_peak: int | None
    net_rx_bytes: int | None
    net_tx_bytes: int | None
    disk_used: int | None
    uptime: float

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            name=_name(*m.req("name")),
            context=_int(*m.req("context"), 0),
            cgroup=_str(*m.req("cgroup"), max_len=_PATH_MAX),
            processes=_int(*m.req("processes"), 0),
            cpu_seconds=_opt_float(*m.req("cpu_seconds"), 0.0),
            cpu_user_seconds=_opt_float(*m.req("cpu_user_seconds"), 0.0),
            cpu_system_seconds=_opt_float(*m.req("cpu_system_seconds"), 0.0),
            memory_current=_opt_int(*m.req("memory_current"), 0),
            memory_peak=_opt_int(*m.req("memory_peak"), 0),
            net_rx_bytes=_opt_int(*m.req("net_rx_bytes"), 0),
            net_tx_bytes=_opt_int(*m.req("net_tx_bytes"), 0),
            disk_used=_opt_int(*m.req("disk_used"), 0),
            uptime=_float(*m.req("uptime"), 0.0),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class TemplateInfo:
    """One item of GET /templates: hostagent.templates.TemplateInfo on the wire.

    source: how it was made ("debootstrap bookworm", "guest web").
    """

    name: str
    size_bytes: int
    guests: tuple[str, ...]
    source: str

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            name=_name(*m.req("name")),
            size_bytes=_int(*m.req("size_bytes"), 0),
            guests=_names(*m.req("guests")),
            source=_str(*m.req("source"), max_len=_TEXT),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ErrorReply:
    """Any 4xx/5xx answer: what went wrong, the request field at fault (if one is),
    and the HTTP status, repeated in the body for clients that lose it.

    WireError.to_json() is one without the status.
    """

    error: str
    field: str | None = None
    status: int = 400

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            error=_str(*m.req("error"), max_len=_LONG_TEXT, allow="\t\n"),
            field=_opt_str(*m.opt("field"), max_len=_TEXT),
            status=_int(*m.opt("status", 400), 400, 599),
        )

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


# --- Shared helpers --------------------------------------------------------------------------


def _to_json(obj: Any) -> dict[str, object]:
    """The fields of dataclass OBJ as JSON types: tuples become lists, dicts are copied."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


class _Decodable(Protocol):
    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self: ...


_T = TypeVar("_T", bound=_Decodable)


def decode_list(cls: type[_T], obj: object, *, max_items: int = _MAX_ITEMS) -> tuple[_T, ...]:
    """A JSON array of CLS (e.g. GET /guests), each item decoded with CLS.from_json;
    WireError fields are prefixed with the item's index ("2.state")."""
    if not isinstance(obj, list):
        raise WireError("body", f"expected an array, not {_json_type(obj)}")
    if len(obj) > max_items:
        raise WireError("body", f"more than {max_items} items")
    return tuple(cls.from_json(item, str(i)) for i, item in enumerate(obj))


# --- Reset and archive (the classroom's calls) -------------------------------------------------

RESET_KEEP_MAX = 16  # paths a reset may keep
_KEEP_DEPTH_MAX = 128  # components of a kept path (the agent walks them one by one)
ARCHIVE_DEFAULT_BYTES = 64 << 20
ARCHIVE_MAX_BYTES = 1 << 30


def check_guest_path(value: object, field: str) -> str:
    """VALUE as an absolute path inside a guest, normalised (`/home//a/./b/` is `/home/a/b`).

    At most PATH_MAX - 1 bytes, no control character (so no NUL and no
    newline), no `..` component (a path that climbs is refused, never
    resolved: what it means depends on symlinks only the guest may follow),
    each component at most NAME_MAX bytes. `/` itself is allowed here; the
    caller refuses it where it makes no sense. Raises WireError(FIELD, ...).
    """
    text = _str(value, field, max_len=_PATH_MAX, empty=False)
    if len(text.encode("utf-8")) >= _PATH_MAX:
        raise WireError(field, f"longer than {_PATH_MAX - 1} bytes")
    if not text.startswith("/"):
        raise WireError(field, f"{_show(text)} must be an absolute path (start with /)")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise WireError(field, f"{_show(text)}: '..' components are not allowed")
        if len(part.encode("utf-8")) > _NAME_MAX:
            raise WireError(field, f"a component is longer than {_NAME_MAX} bytes")
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class ResetRequest:
    """POST /guests/NAME/reset: empty a template guest's own layer, but for KEEP.

    keep: 0 to RESET_KEEP_MAX absolute paths inside the guest (check_guest_path;
    not `/`, at most 128 components each), each kept with everything below it.
    A kept path whose parent directories are not real directories in the
    guest's own layer (a symlink the guest put there) is not kept.
    """

    keep: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        items, keep_field = m.opt("keep", [])
        keep: list[str] = []
        for i, item in enumerate(_list(items, keep_field, RESET_KEEP_MAX)):
            sub = _join(keep_field, i)
            path = check_guest_path(item, sub)
            if path == "/":
                raise WireError(sub, "keeping / would keep everything: that is no reset")
            if path.count("/") > _KEEP_DEPTH_MAX:
                raise WireError(sub, f"more than {_KEEP_DEPTH_MAX} components")
            keep.append(path)
        return cls(keep=tuple(keep))

    def to_json(self) -> dict[str, object]:
        return _to_json(self)


@dataclass(frozen=True)
class ArchiveRequest:
    """GET /guests/NAME/archive?path=P&max_bytes=N: a tar of P, made inside the guest.

    path: an absolute path inside the guest (check_guest_path). max_bytes: 1 to
    ARCHIVE_MAX_BYTES, default ARCHIVE_DEFAULT_BYTES; the archive is cut there.
    from_query() takes the query string's (key, value) pairs.
    """

    path: str
    max_bytes: int = ARCHIVE_DEFAULT_BYTES

    @classmethod
    def from_json(cls, obj: object, field: str = "") -> Self:
        m = _Message(obj, cls, field)
        return cls(
            path=check_guest_path(*m.req("path")),
            max_bytes=_int(*m.opt("max_bytes", ARCHIVE_DEFAULT_BYTES), 1, ARCHIVE_MAX_BYTES),
        )

    @classmethod
    def from_query(cls, pairs: Iterable[tuple[str, str]]) -> Self:
        """From a query string's pairs: each key once, max_bytes in decimal digits."""
        obj: dict[str, object] = {}
        for key, value in pairs:
            if key in obj:
                raise WireError(_key_field("", key), "given more than once")
            obj[key] = value
        raw = obj.get("max_bytes")
        if isinstance(raw, str):
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 10:
                raise WireError("max_bytes", f"{_show(raw)} is not a whole number of bytes")
            obj["max_bytes"] = int(raw)
        return cls.from_json(obj)

    def to_json(self) -> dict[str, object]:
        return _to_json(self)
