"""Collect one path from every student's server into a single zip.

Each server makes a tar of the path itself, inside, with its own view and
permissions (the agent's GET /1.0/guests/NAME/archive). What comes back is
written by the guest and so is hostile: it is read as a stream, member by
member, and only regular files and directories go into the zip, under
`USERNAME/` with names that cannot leave that folder; links, devices and
anything else are listed in the report instead, and every server and the
whole zip have a size limit. `REPORT.txt` in the zip says what became of
each student.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from hostagent.client import AgentClient, AgentError
from panel.classroom.models import Seat
from panel.guests.choices import VServerStatusChoices

__all__ = ["PER_SERVER_BYTES", "TOTAL_BYTES", "Outcome", "collect"]

PER_SERVER_BYTES = 64 << 20
TOTAL_BYTES = 1 << 30


class _ChunkReader(io.RawIOBase):
    """A file over an iterator of byte chunks (what tarfile's stream mode reads)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._rest = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._rest:
            try:
                self._rest = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buf), len(self._rest))
        buf[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


@dataclass
class Outcome:
    username: str
    server: str
    files: int = 0
    bytes: int = 0
    skipped: list[str] | None = None
    error: str = ""

    def line(self) -> str:
        if self.error:
            return f"{self.username} ({self.server or 'no server'}): {self.error}"
        s = f"{self.username} ({self.server}): {self.files} file(s), {self.bytes} bytes"
        if self.skipped:
            s += "; not copied: " + ", ".join(self.skipped[:20])
            if len(self.skipped) > 20:
                s += f" and {len(self.skipped) - 20} more"
        return s


def _safe_name(name: str) -> str | None:
    """A tar member's name as a relative path that stays in its folder, or None."""
    parts = [p for p in posixpath.normpath("/" + name).split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or "\x00" in p for p in parts):
        return None
    return "/".join(parts)


def _copy(seat: Seat, path: str, zf: zipfile.ZipFile, budget: int) -> Outcome:
    vs = seat.vserver
    out = Outcome(seat.username, vs.name if vs else "", skipped=[])
    if vs is None:
        out.error = "no server"
        return out
    if vs.status != VServerStatusChoices.STATUS_RUNNING:
        out.error = f"server {vs.get_status_display().lower()}: start it to collect"
        return out
    limit = min(PER_SERVER_BYTES, budget)
    try:
        with AgentClient(vs.host.agent_socket, timeout=60) as client:
            chunks = client.archive(vs.name, path, max_bytes=limit)
            try:
                with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks)),
                                  mode="r|") as tar:
                    for m in tar:
                        name = _safe_name(m.name)
                        if name is None:
                            out.skipped.append(repr(m.name)[:80])  # type: ignore[union-attr]
                            continue
                        arc = f"{seat.username}/{name}"
                        if m.isdir():
                            zf.writestr(arc + "/", b"")
                        elif m.isfile():
                            src = tar.extractfile(m)
                            if src is None:
                                continue
                            with zf.open(arc, "w", force_zip64=True) as dst:
                                while block := src.read(1 << 16):
                                    dst.write(block)
                            out.files += 1
                            out.bytes += m.size
                        else:
                            kind = "link" if m.issym() or m.islnk() else "special file"
                            out.skipped.append(f"{name} ({kind})")  # type: ignore[union-attr]
            finally:
                chunks.close()
    except AgentError as e:
        out.error = e.error if e.status != 413 else (
            f"more than {limit} bytes: cut there (what came before is in the zip)")
    except (tarfile.TarError, OSError) as e:
        out.error = f"the server sent no readable archive ({e})"
    return out


def collect(seats: Iterable[Seat], path: str) -> tuple[IO[bytes], list[Outcome]]:
    """A zip (a temporary file, at its start) of PATH from every seat's server."""
    f = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the response, which closes it
    outcomes = []
    used = 0
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for seat in seats:
            if used >= TOTAL_BYTES:
                outcomes.append(Outcome(seat.username, seat.vserver.name if seat.vserver else "",
                                        error="the zip is full (1 GiB)"))
                continue
            o = _copy(seat, path, zf, TOTAL_BYTES - used)
            used += o.bytes
            outcomes.append(o)
        report = [f"Collected {path} from {len(outcomes)} server(s).", ""]
        report += [o.line() for o in outcomes]
        zf.writestr("REPORT.txt", "\n".join(report) + "\n")
    f.seek(0)
    return f, outcomes
