"""A class roster from CSV: parse, check every row, and compare with the class.

`preview()` touches nothing: it returns each row with its errors and what
applying it would do (add, update, keep), and the students of the class the
roster no longer names. panel/classroom/actions.py applies a preview.

The CSV has a header row naming its columns (any order, any case):
`username`, `full name` (or `name`), `email`, and optionally `group` and
`ssh key`. A file without a header is read as those five columns in that order.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from panel.classroom.models import Classroom, Seat, group_validator
from panel.guests.models import SSHKey

__all__ = ["MAX_BYTES", "MAX_ROWS", "Preview", "RosterError", "Row", "preview"]

MAX_BYTES = 1 << 20
MAX_ROWS = 2000

# A login that works as a Linux user name and a panel username alike.
LOGIN_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")

_COLUMNS = {
    "username": "username", "login": "username", "user": "username",
    "full name": "full_name", "fullname": "full_name", "full_name": "full_name",
    "name": "full_name",
    "email": "email", "e-mail": "email", "mail": "email",
    "group": "group", "section": "group",
    "ssh key": "ssh_key", "ssh_key": "ssh_key", "sshkey": "ssh_key", "key": "ssh_key",
    "ssh public key": "ssh_key",
}
_ORDER = ("username", "full_name", "email", "group", "ssh_key")


class RosterError(ValueError):
    """The file as a whole cannot be read (not one row's problem)."""


@dataclass
class Row:
    line: int
    username: str
    full_name: str
    email: str
    group: str = ""
    ssh_key: str = ""
    errors: list[str] = field(default_factory=list)
    action: str = ""  # add, update, keep; empty when the row has errors
    changes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("line", "username", "full_name", "email", "group",
                                              "ssh_key", "errors", "action", "changes")}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Row:
        return cls(**d)


@dataclass
class Preview:
    rows: list[Row]
    missing: list[str]  # usernames of seats the roster does not name
    capacity: int  # seats the class may have in all

    @property
    def ok_rows(self) -> list[Row]:
        return [r for r in self.rows if r.ok]

    @property
    def error_count(self) -> int:
        return sum(1 for r in self.rows if not r.ok)

    def count(self, action: str) -> int:
        return sum(1 for r in self.rows if r.ok and r.action == action)

    @property
    def count_add(self) -> int:
        return self.count("add")

    @property
    def count_update(self) -> int:
        return self.count("update")

    @property
    def count_keep(self) -> int:
        return self.count("keep")

    def to_json(self) -> dict[str, Any]:
        return {"rows": [r.to_json() for r in self.rows], "missing": self.missing,
                "capacity": self.capacity}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Preview:
        return cls(rows=[Row.from_json(r) for r in d["rows"]], missing=list(d["missing"]),
                   capacity=int(d["capacity"]))


def _decode(data: bytes) -> str:
    if len(data) > MAX_BYTES:
        raise RosterError(f"the file is over {MAX_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RosterError(f"the file is not UTF-8 (byte {e.start})") from e
    if "\x00" in text:
        raise RosterError("the file holds NUL bytes: is it a spreadsheet, not CSV?")
    return text


def _read(text: str) -> list[tuple[int, dict[str, str]]]:
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    out: list[tuple[int, dict[str, str]]] = []
    columns: tuple[str, ...] | None = None
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if columns is None:
                names = [_COLUMNS.get(c.strip().lower()) for c in cells]
                if "username" in names:
                    unknown = [c for c, n in zip(cells, names, strict=True) if n is None]
                    if unknown:
                        raise RosterError(f"line {line}: unknown column {unknown[0]!r} (columns:"
                                          " username, full name, email, group, ssh key)")
                    columns = tuple(n or "" for n in names)
                    for need in ("username", "full_name", "email"):
                        if need not in columns:
                            raise RosterError(f"line {line}: the header has no "
                                              f"{need.replace('_', ' ')} column")
                    continue
                columns = _ORDER
            if len(out) >= MAX_ROWS:
                raise RosterError(f"more than {MAX_ROWS} students in one roster")
            row = {c: "" for c in _ORDER}
            extra = cells[len(columns):]
            if any(x.strip() for x in extra):
                row["_extra"] = "yes"
            for name, value in zip(columns, cells, strict=False):
                row[name] = value.strip()
            out.append((line, row))
    except csv.Error as e:
        raise RosterError(f"line {reader.line_num}: {e}") from e
    return out


def _check_row(row: Row, extra: bool) -> None:
    if extra:
        row.errors.append("more cells than columns")
    if not LOGIN_RE.match(row.username):
        row.errors.append("username: 1 to 32 of a-z, 0-9, '_' and '-', not starting with a "
                          "digit or '-' (it is the student's login)")
    if not row.full_name:
        row.errors.append("full name: missing")
    elif len(row.full_name) > 150 or any(ord(c) < 32 for c in row.full_name):
        row.errors.append("full name: at most 150 printable characters")
    try:
        validate_email(row.email)
    except ValidationError:
        row.errors.append(f"email: {row.email!r} is not an email address")
    if row.group:
        try:
            group_validator(row.group)
        except ValidationError:
            row.errors.append("group: 1 to 32 letters, digits, spaces, '_', '.' or '-'")
    if row.ssh_key:
        try:
            SSHKey(name="roster", key=row.ssh_key).clean()
        except ValidationError:
            row.errors.append("ssh key: not one OpenSSH public key line")


def capacity(classroom: Classroom) -> int:
    """How many seats the class's plan allows, with each seat's own limits."""
    limits = classroom.customer.limits()
    caps = [limits.max_vservers]
    for total, each in ((limits.memory_mb, classroom.seat_memory_mb),
                        (limits.cpu_cores, classroom.seat_cpu_cores),
                        (limits.disk_gb, classroom.seat_disk_gb)):
        caps.append(math.floor(total / each) if each else limits.max_vservers)
    if classroom.seat_ipv4:
        caps.append(limits.max_ipv4 // classroom.seat_ipv4)
    return max(0, min(int(c) for c in caps))


def preview(classroom: Classroom, data: bytes) -> Preview:
    """Read DATA (the CSV's bytes) against CLASSROOM; change nothing."""
    parsed = _read(_decode(data))
    seats = {s.user.username: s for s in Seat.objects.filter(classroom=classroom)
             .select_related("user", "group")}
    rows: list[Row] = []
    seen_user: dict[str, int] = {}
    seen_mail: dict[str, int] = {}
    for line, cells in parsed:
        row = Row(line=line, username=cells["username"], full_name=cells["full_name"],
                  email=cells["email"], group=cells["group"], ssh_key=cells["ssh_key"])
        _check_row(row, bool(cells.get("_extra")))
        key = row.username.lower()
        if key in seen_user:
            row.errors.append(f"username: a duplicate of line {seen_user[key]}")
        else:
            seen_user[key] = line
        mail = row.email.lower()
        if mail and mail in seen_mail:
            row.errors.append(f"email: a duplicate of line {seen_mail[mail]}")
        elif mail:
            seen_mail[mail] = line
        rows.append(row)

    # Logins taken by somebody who is not a student of this class.
    names = [r.username for r in rows if r.ok and r.username not in seats]
    taken = set(get_user_model().objects.filter(username__in=names)
                .values_list("username", flat=True))
    for r in rows:
        if r.ok and r.username in taken:
            r.errors.append("username: taken by another account of this panel")

    cap = capacity(classroom)
    room = cap - len(seats)
    for r in rows:
        if not r.ok:
            continue
        seat = seats.get(r.username)
        if seat is None:
            if room <= 0:
                r.errors.append(f"over the class cap: the plan allows {cap} students")
                continue
            room -= 1
            r.action = "add"
            continue
        for what, old, new in (("full name", seat.full_name, r.full_name),
                               ("email", seat.email, r.email),
                               ("group", seat.group.name if seat.group else "", r.group),
                               ("ssh key", seat.ssh_key, r.ssh_key)):
            if old != new:
                r.changes.append(what)
        r.action = "update" if r.changes else "keep"
    named = {r.username for r in rows}
    missing = sorted(u for u in seats if u not in named)
    return Preview(rows=rows, missing=missing, capacity=cap)
