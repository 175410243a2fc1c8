"""/etc/vservers/NAME.conf in the seed's own format, read without a shell.

The seed sourced NAME.conf with sh, so a conf could run anything as host root
at every start. Here the file keeps its sh-compatible look (`KEY="value"`,
`# comments`) but is parsed by a grammar that has no expansion at all: a line
is a comment, a blank line or one assignment of a literal value, and anything
a shell would have expanded or executed is refused with the file, line and key.

GuestConf edits the file as text, so comments, blank lines, key order and keys
this version does not know survive load/set/save byte for byte; settings()
then validates the known keys into a GuestSettings.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hostagent import caps as capslib
from hostagent.ulimit import Limit, UlimitError, parse_ulimit

__all__ = [
    "DEFAULT_PRIORITY",
    "DEFAULT_STOP_TIMEOUT",
    "FLAGS",
    "IDMAP_MODES",
    "KNOWN_KEYS",
    "MAX_IPROOT",
    "NEW_FLAGS",
    "ConfigError",
    "GuestConf",
    "GuestSettings",
    "IpToken",
    "check_hostname",
    "parse_ip_token",
    "parse_size",
    "render_new",
    "settings",
    "settings_from_file",
]

StrPath = str | os.PathLike[str]

KNOWN_KEYS: tuple[str, ...] = (
    # The seed's keys (util-vserver scripts/legacy/vserver).
    "IPROOT",
    "IPROOTDEV",
    "IPROOTMASK",
    "IPROOTBCAST",
    "ONBOOT",
    "S_CAPS",
    "S_CONTEXT",
    "S_DOMAINNAME",
    "S_HOSTNAME",
    "S_NICE",
    "S_FLAGS",
    "ULIMIT",
    # New in vpanel.
    "S_CAPS_UNSAFE",
    "DESCRIPTION",
    "PRIORITY",
    "BUILD_METHOD",
    "STOP_TIMEOUT",
    # Resource limits (the seed's "global limits"), enforced with cgroups.
    "MEMORY_LIMIT",
    "SWAP_LIMIT",
    "CPU_WEIGHT",
    "CPU_MAX",
    "PIDS_MAX",
    "IO_WEIGHT",
    "NOFILE",
    "DISK_LIMIT",
    "DISK_LIMIT_MODE",
    # A private range of host ids per guest (a user namespace), hostagent/idmap.py.
    "IDMAP",
    "IDMAP_BASE",
)

# The seed's context flags (chcontext --flag). `minit` was a pseudo-flag of
# the start script only and is not accepted.
FLAGS: frozenset[str] = frozenset(
    {"lock", "sched", "nproc", "private", "fakeinit", "hideinfo", "ulimit"}
)

DEFAULT_PRIORITY = 100
PRIORITY_RANGE = (-1000, 1000)
DEFAULT_STOP_TIMEOUT = 10
STOP_TIMEOUT_RANGE = (0, 3600)
# S_FLAGS of a new conf unless told otherwise: the seed template's. Its
# ULIMIT="-HS -u 1000" is not copied: without a user namespace RLIMIT_NPROC
# counts a uid's processes host-wide, so the guest's www-data would share the
# host's budget (the nproc flag, pids.max, is the per-guest limit).
NEW_FLAGS: tuple[str, ...] = ("lock", "nproc")
# Context 0 is the host and 1 the spectator (it sees every context); the top
# is the 2.x kernel's limit, kept so seed configs mean the same here.
CONTEXT_RANGE = (2, 49151)
NICE_RANGE = (-20, 19)
# The seed's chbind took at most 16 addresses per context.
MAX_IPROOT = 16
# __NEW_UTS_LEN in include/uapi/linux/utsname.h.
UTS_LEN = 64
# IDMAP: a private range of 65536 host ids, one range for every shared guest,
# or none (guest root is host root, the seed's privileged mode).
IDMAP_MODES = ("isolated", "shared", "none")
# IDMAP_BASE: the first host id of the range, written by the agent; never one
# of the host's own ids (below 100000), never reaching (uid_t)-1.
IDMAP_BASE_RANGE = (100000, (1 << 32) - 1 - 65536)
# A conf is a screenful of keys; a huge file is a mistake, not a guest.
MAX_CONF_BYTES = 1 << 20

_KEY_RE = re.compile(r"[A-Z_][A-Z0-9_]*\Z")
# Characters an unquoted value may hold: none of them means anything to sh
# in an assignment (no expansion, globbing, tilde or word splitting).
_UNQUOTED_RE = re.compile(r"[A-Za-z0-9_./:,+@%=!-]*\Z")
_UNQUOTED_BAD_RE = re.compile(r"[^A-Za-z0-9_./:,+@%=!-]")
_AFTER_VALUE_RE = re.compile(r"(?:[ \t]+(?:#.*)?)?\Z")
_LEGACY_DESCRIPTION_RE = re.compile(r"[ \t]*#[ \t]*description:[ \t]*(.*?)[ \t]*\Z", re.I)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
# Linux accepts almost any byte in an interface name (dev_valid_name); this is
# the subset that is safe to pass to ip(8) and to print, within IFNAMSIZ - 1.
_IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\Z")
_INT_RE = re.compile(r"-?[0-9]+\Z")
# C0 and C1 controls: free text ends up on terminals (vserver-stat) and in
# the panel, where escape sequences must not travel.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The seed's IPROOT values for "not bound to any address" (0.0.0.0) and "every
# host address" (ALL); both mean no address restriction here. Only compared
# against conf text, never bound.
_UNRESTRICTED = frozenset({"ALL", "0.0.0.0"})  # noqa: S104
# First words that make a line shell code rather than an assignment; the
# seed's own template wrapped IPROOT and S_HOSTNAME in `case $PROFILE in`.
_SHELL_WORDS = frozenset(
    {
        "if", "then", "else", "elif", "fi", "case", "esac", "for", "while", "until",
        "do", "done", "function", "export", "readonly", "local", "unset", "set",
        "source", ".", ";;", "{", "}", "[", "test", "eval", "exec",
    }
)  # fmt: skip
_TRUE = frozenset({"yes", "true", "1"})
_FALSE = frozenset({"no", "false", "0"})


class ConfigError(ValueError):
    """A conf file or value refused; str() is "PATH:LINE: KEY: message"."""

    def __init__(
        self,
        message: str,
        *,
        path: str,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.key is None:
            return f"{where}: {self.message}"
        return f"{where}: {self.key}: {self.message}"


@dataclass(frozen=True)
class _Line:
    """One line of a conf file, kept verbatim so a rewrite changes only what it must."""

    text: str  # without the line ending
    eol: str  # "\n", or "" for a last line without one
    key: str | None = None  # None for comments and blank lines
    value: str = ""
    quote: str = ""  # '"', "'" or "" (unquoted)
    indent: str = ""
    suffix: str = ""  # what follows the value: spaces and an optional # comment


def _fail(message: str, path: str, line: int | None, key: str | None = None) -> ConfigError:
    return ConfigError(message, path=path, line=line, key=key)


def _parse_double_quoted(
    text: str, start: int, path: str, lineno: int, key: str
) -> tuple[str, int]:
    """Value of the double-quoted string opening at START, and the index after it."""
    out: list[str] = []
    i = start + 1
    while True:
        if i >= len(text):
            raise _fail("unterminated double quote", path, lineno, key)
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= len(text):
                raise _fail("a backslash at the end of a line is not allowed", path, lineno, key)
            escaped = text[i + 1]
            if escaped not in '"\\$':
                raise _fail(
                    f'backslash escape \\{escaped} is not allowed (only \\" \\\\ \\$)',
                    path,
                    lineno,
                    key,
                )
            out.append(escaped)
            i += 2
            continue
        if c == "$":
            raise _fail(_dollar_message(text, i), path, lineno, key)
        if c == "`":
            raise _fail("command substitution (`...`) is not allowed", path, lineno, key)
        out.append(c)
        i += 1


def _dollar_message(text: str, i: int) -> str:
    if text.startswith("$(", i):
        return "command substitution ($(...)) is not allowed"
    return "variable expansion ($...) is not allowed; write \\$ inside double quotes"


def _unquoted_message(value: str, i: int) -> str:
    """Why VALUE cannot stand unquoted, given its first refused character at I."""
    c = value[i]
    if c == "$":
        return _dollar_message(value, i)
    if c == "`":
        return "command substitution (`...`) is not allowed"
    if c in "\"'":
        return "quotes must enclose the whole value"
    return f"character {c!r} is not allowed in an unquoted value; quote the value"


def _parse_line(text: str, eol: str, path: str, lineno: int) -> _Line:
    if "\0" in text:
        raise _fail("NUL byte in line", path, lineno)
    if "\r" in text:
        raise _fail("carriage return in line (DOS line endings?)", path, lineno)
    stripped = text.strip(" \t")
    if not stripped or stripped.startswith("#"):
        return _Line(text=text, eol=eol)
    indent = text[: len(text) - len(text.lstrip(" \t"))]
    word = stripped.split()[0]
    if word in _SHELL_WORDS or (word.endswith(")") and "=" not in word):
        raise _fail(
            f'shell syntax ({word}) is not allowed: only KEY="value" lines, comments and '
            "blank lines (flatten the seed's PROFILE case blocks to one profile)",
            path,
            lineno,
        )
    eq = text.find("=")
    name = text[len(indent) : eq] if eq >= 0 else ""
    inner = name.rstrip(" \t")
    if not inner or re.search(r"[ \t]", inner):
        # No "=", or words before it: a shell command, not an assignment.
        raise _fail('expected KEY="value", a # comment or a blank line', path, lineno)
    if name != inner:
        raise _fail("no spaces are allowed around '='", path, lineno, inner)
    if not _KEY_RE.match(name):
        if _KEY_RE.match(name.upper()):
            raise _fail("keys are upper case", path, lineno, name)
        raise _fail("invalid key: use A-Z, 0-9 and _", path, lineno, name)
    start = eq + 1
    quote = text[start] if start < len(text) and text[start] in "\"'" else ""
    if quote == '"':
        value, end = _parse_double_quoted(text, start, path, lineno, name)
    elif quote == "'":
        end = text.find("'", start + 1)
        if end < 0:
            raise _fail("unterminated single quote", path, lineno, name)
        value = text[start + 1 : end]
        end += 1
    else:
        end = start
        while end < len(text) and text[end] not in " \t":
            end += 1
        value = text[start:end]
        bad = _UNQUOTED_BAD_RE.search(value)
        if bad:
            raise _fail(_unquoted_message(value, bad.start()), path, lineno, name)
    suffix = text[end:]
    if not _AFTER_VALUE_RE.match(suffix):
        if quote and not suffix[:1].isspace():
            message = "unexpected text right after the closing quote"
        else:
            message = "only a # comment may follow the value (a value with spaces needs quotes)"
        raise _fail(message, path, lineno, name)
    return _Line(
        text=text,
        eol=eol,
        key=name,
        value=value,
        quote=quote,
        indent=indent,
        suffix=suffix,
    )


def _check_value(value: str, path: str, line: int | None, key: str) -> None:
    for bad, what in (("\n", "a newline"), ("\r", "a carriage return"), ("\0", "a NUL byte")):
        if bad in value:
            raise _fail(f"a value cannot contain {what}", path, line, key)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (from os.fsdecode of undecodable bytes) have no UTF-8 form.
        raise _fail("a value must be valid Unicode text", path, line, key) from None


def _encode(value: str, quote: str, path: str, line: int | None, key: str) -> tuple[str, str]:
    """VALUE written for a conf line, preferring the QUOTE style; (text, style used)."""
    _check_value(value, path, line, key)
    if quote == "" and value and _UNQUOTED_RE.match(value):
        return value, ""
    if quote == "'" and "'" not in value:
        return f"'{value}'", "'"
    if "`" not in value:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
        return f'"{escaped}"', '"'
    # A backtick cannot be escaped in our double quotes, but is literal in single ones.
    if "'" not in value:
        return f"'{value}'", "'"
    raise _fail("a value cannot contain both ` and '", path, line, key)


class GuestConf:
    """The lines of one NAME.conf, editable without losing anything else in it."""

    def __init__(self, lines: Iterable[_Line] = (), path: StrPath = "<string>") -> None:
        self.path = os.fspath(path)
        self._lines: list[_Line] = list(lines)

    @classmethod
    def parse(cls, text: str, path: StrPath = "<string>") -> GuestConf:
        shown = os.fspath(path)
        parts = text.split("\n")
        # text.split leaves "" after a final newline: that is no line at all.
        last = parts.pop()
        lines = [_parse_line(p, "\n", shown, i) for i, p in enumerate(parts, 1)]
        if last:
            lines.append(_parse_line(last, "", shown, len(parts) + 1))
        return cls(lines, shown)

    @classmethod
    def load(cls, path: StrPath) -> GuestConf:
        shown = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read(MAX_CONF_BYTES + 1)
        if len(data) > MAX_CONF_BYTES:
            raise _fail(f"file is larger than {MAX_CONF_BYTES} bytes", shown, None)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail("not valid UTF-8", shown, data[: e.start].count(b"\n") + 1) from None
        return cls.parse(text, shown)

    def _last_index(self, key: str) -> int | None:
        for i in range(len(self._lines) - 1, -1, -1):
            if self._lines[i].key == key:
                return i
        return None

    def __contains__(self, key: object) -> bool:
        return any(line.key == key for line in self._lines)

    def get(self, key: str, default: str | None = None) -> str | None:
        """Value of KEY (the last assignment wins, as in sh), else DEFAULT."""
        i = self._last_index(key)
        return default if i is None else self._lines[i].value

    def line_of(self, key: str) -> int | None:
        """1-based line number of the assignment get(KEY) reads, else None."""
        i = self._last_index(key)
        return None if i is None else i + 1

    def keys(self) -> list[str]:
        """Keys assigned in the file, in order of first appearance."""
        seen: dict[str, None] = {}
        for line in self._lines:
            if line.key is not None:
                seen.setdefault(line.key)
        return list(seen)

    def set(self, key: str, value: str) -> None:
        """Assign KEY: rewrite its last line in place (keeping quoting style and
        trailing comment), or append a line."""
        if not _KEY_RE.match(key):
            raise _fail("invalid key: use A-Z, 0-9 and _", self.path, None, key)
        i = self._last_index(key)
        if i is None:
            text, quote = _encode(value, '"', self.path, None, key)
            if self._lines and not self._lines[-1].eol:
                self._lines[-1] = replace(self._lines[-1], eol="\n")
            self._lines.append(
                _Line(text=f"{key}={text}", eol="\n", key=key, value=value, quote=quote)
            )
            return
        old = self._lines[i]
        text, quote = _encode(value, old.quote, self.path, i + 1, key)
        self._lines[i] = replace(
            old,
            text=f"{old.indent}{key}={text}{old.suffix}",
            value=value,
            quote=quote,
        )

    def unset(self, key: str) -> bool:
        """Remove every assignment of KEY; True if there was one."""
        before = len(self._lines)
        self._lines = [line for line in self._lines if line.key != key]
        return len(self._lines) != before

    def legacy_description(self) -> tuple[str, int] | None:
        """The seed's `# Description: text` comment (read by vserver-stat), with its line."""
        for i, line in enumerate(self._lines, 1):
            if line.key is None:
                m = _LEGACY_DESCRIPTION_RE.match(line.text)
                if m:
                    return m.group(1), i
        return None

    def dump(self) -> str:
        return "".join(line.text + line.eol for line in self._lines)

    def save(self, path: StrPath) -> None:
        """Write the file atomically: a temporary file in the same directory,
        fsync, rename over PATH, fsync the directory; mode 0644.

        A crash leaves either the old file or the new one, never a torn conf
        that the next start would misread.
        """
        text = self.dump()
        # Every value passed set()'s checks; parsing the result back makes sure
        # no edit ever writes a file the next load would refuse.
        GuestConf.parse(text, path)
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass(frozen=True)
class GuestSettings:
    """The validated meaning of a NAME.conf. Defaults are those of an empty conf."""

    hostname: str | None = None  # None: the host's
    domainname: str | None = None  # None: the host's; "": cleared
    iproot: tuple[str, ...] = ()  # raw [DEV:]ADDR[/PREFIX] tokens
    iproot_unrestricted: bool = False  # IPROOT was ALL or 0.0.0.0
    iprootdev: str | None = None
    iprootmask: str | None = None
    iprootbcast: str | None = None
    onboot: bool = False
    priority: int = DEFAULT_PRIORITY
    caps: frozenset[int] = capslib.DEFAULT_CEILING
    caps_spec: tuple[str, ...] = ()
    caps_unsafe: bool = False
    context: int | None = None  # None: a free one at start
    nice: int | None = None
    flags: frozenset[str] = frozenset()
    ulimits: tuple[Limit, ...] = ()
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    description: str | None = None
    build_method: str | None = None
    memory_limit: int | None = None  # bytes
    swap_limit: int | None = None  # bytes of swap on top of memory_limit
    cpu_weight: int | None = None  # 1..10000, cgroup v2 scale (100 = one ordinary share)
    cpu_max: float | None = None  # cores, may be fractional
    pids_max: int | None = None
    io_weight: int | None = None  # 1..10000
    nofile: int | None = None  # RLIMIT_NOFILE of every guest process
    disk_limit: int | None = None  # bytes the guest itself may add (hostagent/quota.py)
    disk_limit_mode: str = "auto"  # auto (btrfs qgroup) or image (a loop-mounted ext4 image)
    idmap: str = "none"  # isolated, shared or none (hostagent/idmap.py)
    idmap_base: int | None = None  # first host id of the guest's range; None with IDMAP none


def _valid_ifname(name: str) -> bool:
    return bool(_IFNAME_RE.match(name))


def _valid_ipv4_mask(text: str) -> bool:
    try:
        mask = int(ipaddress.IPv4Address(text))
    except ValueError:
        return False
    inverse = mask ^ 0xFFFFFFFF
    # A netmask is ones then zeros: its inverse plus one is a power of two.
    return inverse & (inverse + 1) == 0


@dataclass(frozen=True)
class IpToken:
    """One IPROOT word: [DEV:]ADDR[/PREFIX|/DOTTEDMASK]."""

    dev: str | None
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefixlen: int | None  # None: take IPROOTMASK or the device's


def parse_ip_token(token: str) -> IpToken:
    """Parse one IPROOT word, or raise ValueError saying what is wrong."""
    addr_text, slash, suffix = token.partition("/")
    if "%" in addr_text:
        raise ValueError(f"{token!r}: a zone index (%...) is not allowed")
    dev: str | None = None
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        # Not a bare address, so it must be DEV:ADDR. Trying the whole text
        # first is what lets an IPv6 address keep its colons.
        dev, colon, rest = addr_text.partition(":")
        if not colon:
            raise ValueError(f"{token!r} is not an IPv4 or IPv6 address") from None
        if not _valid_ifname(dev):
            raise ValueError(
                f"{token!r}: invalid device name {dev!r} (1 to 15 of A-Z a-z 0-9 _ . -)"
            ) from None
        try:
            addr = ipaddress.ip_address(rest)
        except ValueError:
            raise ValueError(f"{token!r}: {rest!r} is not an IPv4 or IPv6 address") from None
    prefixlen: int | None = None
    if slash:
        if re.fullmatch(r"[0-9]{1,3}", suffix):
            prefixlen = int(suffix)
            if prefixlen > addr.max_prefixlen:
                raise ValueError(f"{token!r}: prefix length {suffix} is above {addr.max_prefixlen}")
        elif addr.version == 4 and _valid_ipv4_mask(suffix):
            prefixlen = ipaddress.IPv4Network(f"0.0.0.0/{suffix}").prefixlen
        else:
            raise ValueError(f"{token!r}: {suffix!r} is not a prefix length or netmask")
    return IpToken(dev, addr, prefixlen)


def _check_ip_token(token: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of one IPROOT token, or ValueError saying what is wrong."""
    return parse_ip_token(token).address


class _Reader:
    """settings() helpers that know where each key came from, for error messages."""

    def __init__(self, conf: GuestConf) -> None:
        self.conf = conf

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.conf.path, line=self.conf.line_of(key), key=key)

    def text(self, key: str) -> str:
        return self.conf.get(key) or ""

    def boolean(self, key: str) -> bool:
        value = self.text(key).lower()
        if value in _TRUE:
            return True
        if value in _FALSE or not value:
            return False
        raise self.error(key, f"{self.text(key)!r} is not yes or no")

    def optional_integer(self, key: str, bounds: tuple[int, int]) -> int | None:
        value = self.text(key)
        if not value:
            return None
        low, high = bounds
        if not _INT_RE.match(value) or not low <= int(value) <= high:
            raise self.error(key, f"{value!r} is not a whole number from {low} to {high}")
        return int(value)

    def integer(self, key: str, bounds: tuple[int, int], default: int) -> int:
        value = self.optional_integer(key, bounds)
        return default if value is None else value

    def free_text(self, key: str) -> str | None:
        value = self.conf.get(key)
        if not value:
            return None
        if _CONTROL_RE.search(value):
            raise self.error(key, "control characters are not allowed")
        return value

    def optional(self, key: str, check: Callable[[str], bool], what: str) -> str | None:
        value = self.text(key)
        if not value:
            return None
        if not check(value):
            raise self.error(key, f"{value!r} is not {what}")
        return value


def check_hostname(value: str) -> str:
    """VALUE if S_HOSTNAME may hold it, else ValueError saying why (hostagent.wire uses it)."""
    if len(value) > UTS_LEN or not _HOSTNAME_RE.match(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise ValueError(
            f"{shown!r} is not a host name (RFC 1123 labels of A-Z a-z 0-9 -, "
            f"at most {UTS_LEN} characters)"
        )
    return value


def _hostname(r: _Reader) -> str | None:
    value = r.text("S_HOSTNAME")
    if not value:
        return None
    try:
        return check_hostname(value)
    except ValueError as e:
        raise r.error("S_HOSTNAME", str(e)) from None


def _domainname(r: _Reader) -> str | None:
    value = r.text("S_DOMAINNAME")
    if not value:
        return None
    if value == "none":
        return ""
    if len(value) > UTS_LEN or not _HOSTNAME_RE.match(value):
        raise r.error(
            "S_DOMAINNAME",
            f"{value!r} is not a domain name (labels of A-Z a-z 0-9 -, at most "
            f'{UTS_LEN} characters; "none" clears it)',
        )
    return value


def _iproot(r: _Reader) -> tuple[tuple[str, ...], bool]:
    tokens = tuple(r.text("IPROOT").split())
    if len(tokens) == 1 and tokens[0] in _UNRESTRICTED:
        return (), True
    if _UNRESTRICTED.intersection(tokens):
        raise r.error("IPROOT", "ALL and 0.0.0.0 cannot be combined with addresses")
    if len(tokens) > MAX_IPROOT:
        raise r.error("IPROOT", f"{len(tokens)} addresses, at most {MAX_IPROOT} are allowed")
    seen: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for token in tokens:
        try:
            addr = _check_ip_token(token)
        except ValueError as e:
            raise r.error("IPROOT", str(e)) from None
        if addr in seen:
            raise r.error("IPROOT", f"address {addr} is listed twice")
        seen.add(addr)
    return tokens, False


def _caps(r: _Reader, unsafe: bool) -> tuple[frozenset[int], tuple[str, ...]]:
    spec = tuple(r.text("S_CAPS").split())
    try:
        return capslib.ceiling(spec, allow_unsafe=unsafe), spec
    except capslib.CapabilityError as e:
        raise r.error("S_CAPS", str(e)) from None


def _flags(r: _Reader) -> frozenset[str]:
    flags = frozenset(r.text("S_FLAGS").split())
    unknown = sorted(flags - FLAGS)
    if unknown:
        raise r.error(
            "S_FLAGS",
            f"unknown flag {unknown[0]!r} (known: {' '.join(sorted(FLAGS))})",
        )
    return flags


def _ulimits(r: _Reader) -> tuple[Limit, ...]:
    try:
        return tuple(parse_ulimit(r.text("ULIMIT")))
    except UlimitError as e:
        raise r.error("ULIMIT", str(e)) from None


def _description(r: _Reader) -> str | None:
    if r.conf.get("DESCRIPTION"):
        return r.free_text("DESCRIPTION")
    legacy = r.conf.legacy_description()
    if legacy is None:
        return None
    text, line = legacy
    if _CONTROL_RE.search(text):
        raise ConfigError(
            "control characters are not allowed", path=r.conf.path, line=line, key="DESCRIPTION"
        )
    return text or None


def settings(conf: GuestConf) -> GuestSettings:
    """Validate every known key of CONF; ConfigError names the line and key at fault."""
    r = _Reader(conf)
    iproot, unrestricted = _iproot(r)
    unsafe = r.boolean("S_CAPS_UNSAFE")
    caps, caps_spec = _caps(r, unsafe)
    if r.text("S_CONTEXT") in ("0", "1"):
        raise r.error(
            "S_CONTEXT",
            f"context {r.text('S_CONTEXT')} is reserved (0 is the host, 1 the spectator); "
            f"use {CONTEXT_RANGE[0]} to {CONTEXT_RANGE[1]}",
        )
    context = r.optional_integer("S_CONTEXT", CONTEXT_RANGE)
    idmap, idmap_base = _idmap(r)
    return GuestSettings(
        hostname=_hostname(r),
        domainname=_domainname(r),
        iproot=iproot,
        iproot_unrestricted=unrestricted,
        iprootdev=r.optional("IPROOTDEV", _valid_ifname, "a network device name"),
        iprootmask=r.optional(
            "IPROOTMASK", _valid_mask_or_prefix, "an IPv4 netmask or prefix length"
        ),
        iprootbcast=r.optional("IPROOTBCAST", _valid_ipv4, "an IPv4 address"),
        onboot=r.boolean("ONBOOT"),
        priority=r.integer("PRIORITY", PRIORITY_RANGE, DEFAULT_PRIORITY),
        caps=caps,
        caps_spec=caps_spec,
        caps_unsafe=unsafe,
        context=context,
        nice=r.optional_integer("S_NICE", NICE_RANGE),
        flags=_flags(r),
        ulimits=_ulimits(r),
        stop_timeout=r.integer("STOP_TIMEOUT", STOP_TIMEOUT_RANGE, DEFAULT_STOP_TIMEOUT),
        description=_description(r),
        build_method=r.free_text("BUILD_METHOD"),
        memory_limit=_size(r, "MEMORY_LIMIT", minimum=4 << 20),
        swap_limit=_size(r, "SWAP_LIMIT", minimum=0),
        cpu_weight=r.optional_integer("CPU_WEIGHT", (1, 10000)),
        cpu_max=_cores(r),
        pids_max=r.optional_integer("PIDS_MAX", (1, 4194304)),
        io_weight=r.optional_integer("IO_WEIGHT", (1, 10000)),
        nofile=r.optional_integer("NOFILE", (64, 1 << 20)),
        disk_limit=_size(r, "DISK_LIMIT", minimum=16 << 20),
        disk_limit_mode=r.optional("DISK_LIMIT_MODE", lambda v: v in ("auto", "image"),
                                   "auto or image") or "auto",
        idmap=idmap,
        idmap_base=idmap_base,
    )


def _idmap(r: _Reader) -> tuple[str, int | None]:
    mode = r.optional("IDMAP", lambda v: v in IDMAP_MODES, "isolated, shared or none") or "none"
    base = r.optional_integer("IDMAP_BASE", IDMAP_BASE_RANGE)
    # A base left beside IDMAP="none" names nothing the guest uses.
    return mode, None if mode == "none" else base


_LIMIT_KEYS = ("MEMORY_LIMIT", "SWAP_LIMIT", "CPU_WEIGHT", "CPU_MAX", "PIDS_MAX",
               "IO_WEIGHT", "NOFILE", "DISK_LIMIT", "DISK_LIMIT_MODE")
_SIZE_RE = re.compile(r"([0-9]+)([KMGT]?)(i?B?)?\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as 4096, 512M, 1G, 2GiB (binary units); ValueError if not one."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (a number with an optional K, M, G or T)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def _size(r: _Reader, key: str, minimum: int) -> int | None:
    value = r.text(key)
    if not value:
        return None
    try:
        n = parse_size(value)
    except ValueError as e:
        raise r.error(key, str(e)) from None
    if n < minimum or n > 1 << 50:
        raise r.error(key, f"{value!r} is out of range ({minimum} bytes to 1 PiB)")
    return n


def _cores(r: _Reader) -> float | None:
    value = r.text("CPU_MAX")
    if not value:
        return None
    try:
        n = float(value)
    except ValueError:
        n = -1.0
    if not 0.01 <= n <= 4096:
        raise r.error("CPU_MAX", f"{value!r} is not a number of cores from 0.01 to 4096")
    return n


def _valid_mask_or_prefix(text: str) -> bool:
    if re.fullmatch(r"[0-9]{1,2}", text):
        return int(text) <= 32
    return _valid_ipv4_mask(text)


def _valid_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def settings_from_file(path: StrPath) -> GuestSettings:
    return settings(GuestConf.load(path))


_TEMPLATE: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("Free text shown by vserver-stat and the panel.",), ("DESCRIPTION",)),
    (
        ("Start at host boot (yes/no), lower PRIORITY first (default 100).",),
        ("ONBOOT", "PRIORITY"),
    ),
    (
        (
            "Guest addresses, space-separated [DEV:]ADDR[/PREFIX], at most 16.",
            "Empty: none yet. ALL or 0.0.0.0: not restricted to any address.",
        ),
        ("IPROOT",),
    ),
    (
        ("Device for addresses without DEV:, and the default IPv4 mask and broadcast.",),
        ("IPROOTDEV", "IPROOTMASK", "IPROOTBCAST"),
    ),
    (
        ('Host and domain name inside the guest. Empty: the host\'s. Domain "none": cleared.',),
        ("S_HOSTNAME", "S_DOMAINNAME"),
    ),
    (
        ("Fixed security context number 2..49151. Empty: a free one at each start.",),
        ("S_CONTEXT",),
    ),
    (
        (
            'Capabilities added to the default ceiling ("CAP_NET_RAW") or removed from it',
            '("!CAP_SYS_CHROOT"). SYS_ADMIN SYS_MODULE SYS_RAWIO DAC_READ_SEARCH BPF are',
            'refused unless S_CAPS_UNSAFE="yes": each one lets the guest reach the host.',
        ),
        ("S_CAPS", "S_CAPS_UNSAFE"),
    ),
    (("Nice value of the guest's processes, -20..19. Empty: unchanged.",), ("S_NICE",)),
    (("Context flags: fakeinit hideinfo lock nproc private sched ulimit.",), ("S_FLAGS",)),
    (('Arguments of the shell\'s ulimit builtin, e.g. "-H -n 4096 -c 0".',), ("ULIMIT",)),
    (("Seconds between TERM and KILL when the guest stops, 0..3600.",), ("STOP_TIMEOUT",)),
    (("How the guest was built, recorded by vserver build.",), ("BUILD_METHOD",)),
    (
        (
            "Resource limits, enforced with cgroups (empty: none). Sizes take K M G T.",
            "MEMORY_LIMIT and SWAP_LIMIT (swap on top of memory); CPU_WEIGHT 1..10000",
            "(100 = an ordinary share); CPU_MAX in cores (0.5, 2); PIDS_MAX; IO_WEIGHT",
            "1..10000; NOFILE, the open-files limit of every process. `vserver NAME set`",
            "changes them on a running guest; `vserver NAME status` says how each is enforced.",
            "DISK_LIMIT: what the guest itself may write, set at build: a btrfs qgroup, an",
            "XFS or ext4 project quota (project id = S_CONTEXT), or with",
            'DISK_LIMIT_MODE="image" a fixed-size filesystem image of its own.',
        ),
        ("MEMORY_LIMIT", "SWAP_LIMIT", "CPU_WEIGHT", "CPU_MAX", "PIDS_MAX", "IO_WEIGHT",
         "NOFILE", "DISK_LIMIT", "DISK_LIMIT_MODE"),
    ),
    (
        (
            "User ids: isolated (guest ids 0..65535 are a private range of host ids, in a",
            "user namespace), shared (one range for all shared guests) or none (guest root",
            "is host root). IDMAP_BASE, the range's first host id, is the agent's record.",
            "`vserver NAME set IDMAP isolated` on a stopped guest shifts its files once.",
        ),
        ("IDMAP", "IDMAP_BASE"),
    ),
)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def render_new(
    *,
    description: str = "",
    hostname: str | None = None,
    domainname: str | None = None,
    iproot: Sequence[str] = (),
    iprootdev: str = "",
    iprootmask: str = "",
    iprootbcast: str = "",
    onboot: bool = False,
    priority: int = DEFAULT_PRIORITY,
    context: int | None = None,
    nice: int | None = None,
    caps: Sequence[str] = (),
    caps_unsafe: bool = False,
    flags: Iterable[str] = NEW_FLAGS,
    ulimit: str = "",
    stop_timeout: int = DEFAULT_STOP_TIMEOUT,
    build_method: str = "",
    limit_values: dict[str, str] | None = None,
    idmap: str = "none",
    idmap_base: int | None = None,
) -> str:
    """Text of a fresh NAME.conf for `vserver build`, every known key with a comment.

    The arguments mean what the GuestSettings fields of the same name mean
    (domainname "" clears it, None keeps the host's; caps are the S_CAPS words;
    ulimit is the ULIMIT text). The text is parsed back and validated before it
    is returned, so a bad argument raises ConfigError here, naming the key,
    rather than at the guest's first start.
    """
    merged: dict[str, str] = {
        "DESCRIPTION": description,
        "ONBOOT": _yes_no(onboot),
        "PRIORITY": str(priority),
        "IPROOT": " ".join(iproot),
        "IPROOTDEV": iprootdev,
        "IPROOTMASK": iprootmask,
        "IPROOTBCAST": iprootbcast,
        "S_HOSTNAME": hostname or "",
        "S_DOMAINNAME": "" if domainname is None else domainname or "none",
        "S_CONTEXT": "" if context is None else str(context),
        "S_CAPS": " ".join(caps),
        "S_CAPS_UNSAFE": _yes_no(caps_unsafe),
        "S_NICE": "" if nice is None else str(nice),
        "S_FLAGS": " ".join(flags),
        "ULIMIT": ulimit,
        "STOP_TIMEOUT": str(stop_timeout),
        "BUILD_METHOD": build_method,
        **{key: "" for key in _LIMIT_KEYS},
        **{key.upper(): value for key, value in (limit_values or {}).items()},
        "IDMAP": idmap,
        "IDMAP_BASE": "" if idmap_base is None else str(idmap_base),
    }
    out = [
        "# Guest configuration, read by vserver(8) without a shell: only",
        '# KEY="value" lines, comments and blank lines. docs/config.md lists every key.',
    ]
    for comment, keys in _TEMPLATE:
        out.append("")
        out.extend(f"# {c}" for c in comment)
        for key in keys:
            text, _ = _encode(merged[key], '"', "<new conf>", None, key)
            out.append(f"{key}={text}")
    text = "\n".join(out) + "\n"
    settings(GuestConf.parse(text, "<new conf>"))
    return text
