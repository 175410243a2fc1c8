"""The guest's own package manager, run in several guests at once (the seed's vrpm).

The seed's vrpm ran the host's `rpm --root /vservers/NAME` for each guest: the
host's rpm binary, the host's rpm database format, the guest's files written by
a host process. Today's guests are Debian, Alpine, Fedora and busybox trees
with package managers of their own, so vpkg runs the guest's own manager
*inside* the guest's context (guest.exec_in), as guest root, confined as every
other command the host runs there.

Which manager a guest has is judged from outside, by what exists in its root
tree; nothing there is executed, opened or followed on the host (see
`locate`). The run itself needs the guest running: a stopped guest is
reported, or with `start=True` started for the run and stopped again.

Re-unification after a run (`--unify`) belongs to hostagent.unify, imported
only when asked for, so that vpkg works on an install without it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hostagent import guest
from hostagent.names import check_name
from hostagent.paths import Paths
from hostagent.views import render_table

__all__ = [
    "ALL",
    "MANAGERS",
    "Manager",
    "Outcome",
    "PkgError",
    "UnifyUnavailable",
    "detect",
    "load_unify",
    "locate",
    "reunify",
    "run_all",
    "run_one",
    "select_guests",
    "summary",
]

ALL = "ALL"

Write = Callable[[bytes], None]


@dataclass(frozen=True)
class Manager:
    name: str  # what the reports call it: "apt-get"
    path: str  # where it is inside the guest: "/usr/bin/apt-get"


# In order of preference: the first one a guest has is its manager. apt-get
# before dpkg and dnf/yum before rpm, since the front end resolves
# dependencies and the back end does not; dnf before yum, since Fedora and
# RHEL 8+ keep /usr/bin/yum as a link to dnf.
MANAGERS: tuple[Manager, ...] = (
    Manager("apt-get", "/usr/bin/apt-get"),
    Manager("dnf", "/usr/bin/dnf"),
    Manager("yum", "/usr/bin/yum"),
    Manager("apk", "/sbin/apk"),
    Manager("rpm", "/usr/bin/rpm"),
    Manager("dpkg", "/usr/bin/dpkg"),
)

# Linux's MAXSYMLINKS: more links than this in one lookup is a loop (ELOOP).
_MAX_LINKS = 40


class PkgError(ValueError):
    """A request vpkg refuses before running anything; the message is for the user."""


class UnifyUnavailable(RuntimeError):
    """hostagent.unify is absent, or has no unify(paths, ref, guests)."""


# --- detection ----------------------------------------------------------------

def locate(root: Path, guest_path: str) -> Path | None:
    """The host path that names GUEST_PATH's last component, or None if its directory is missing.

    The directories on the way are looked up as the guest would see them,
    never as the host would: a symlink among them (/sbin -> usr/sbin on a
    merged-/usr system) is read with readlink and resolved against ROOT, and
    ".." stops at ROOT, as openat2's RESOLVE_IN_ROOT does. A plain path join
    would let the kernel follow `ROOT/usr -> /usr` into the host's /usr. The
    last component itself is not followed at all: callers lstat it.
    """
    pending = [p for p in reversed(guest_path.split("/")) if p]
    done: list[str] = []  # components checked to be real directories under ROOT
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if not pending:
            return here
        try:
            st = os.lstat(here)
        except OSError:  # absent, or a component is no directory
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            pending.extend(p for p in reversed(target.split("/")) if p)
            continue
        if not stat.S_ISDIR(st.st_mode):
            return None
        done.append(part)
    return None


def _is_busybox_applet(root: Path, where: Path) -> bool:
    """Is WHERE (already known to exist) one of busybox's applets?

    Debian's busybox-static offers `dpkg`, `dpkg-deb` and `rpm` applets, and a
    busybox guest links every applet: those can unpack an archive but keep no
    database, resolve nothing and download nothing, so a busybox-only guest
    has no package manager. An applet is a symlink whose text names busybox,
    or a hard link to the guest's /bin/busybox.
    """
    st = os.lstat(where)
    if stat.S_ISLNK(st.st_mode):
        return os.path.basename(os.readlink(where)) == "busybox"
    box = locate(root, "/bin/busybox")
    if box is None:
        return False
    try:
        bst = os.lstat(box)
    except OSError:
        return False
    return stat.S_ISREG(bst.st_mode) and (st.st_dev, st.st_ino) == (bst.st_dev, bst.st_ino)


def detect(root: Path) -> Manager | None:
    """The package manager of the guest tree ROOT, judged from outside.

    Only lstat and readlink are used: a candidate counts if its path exists
    in the tree (os.path.lexists), even as a symlink pointing outside or
    nowhere, since what it names is the guest's business and only the guest
    resolves it when the command runs inside.
    """
    for mgr in MANAGERS:
        where = locate(root, mgr.path)
        if where is None or not os.path.lexists(where):
            continue
        if _is_busybox_applet(root, where):
            continue
        return mgr
    return None


# --- the run -------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What happened in one guest."""

    name: str
    manager: str | None  # None: unknown guest, or no package manager
    code: int | None = None  # the manager's exit status, if it ran
    problem: str = ""  # why it did not run, or what failed around the run

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.problem

    def result(self) -> str:
        parts = [] if self.code is None else [f"exit {self.code}"]
        if self.problem:
            parts.append(self.problem)
        return "; ".join(parts)


def select_guests(paths: Paths, names: Sequence[str]) -> list[str]:
    """NAMES checked, duplicates dropped; ALL alone means every guest with a NAME.conf."""
    if not names:
        raise PkgError("name the vservers, or ALL")
    if ALL in names:
        if len(names) > 1:
            raise PkgError("ALL stands alone: it already means every vserver")
        return paths.guest_names()
    seen: dict[str, None] = {}
    for name in names:
        seen[check_name(name)] = None
    return list(seen)


def check_args(args: Sequence[str]) -> list[str]:
    """The package manager's arguments. Only an empty list is refused: the
    command runs inside the guest as guest root, so any argument is the guest's
    business and can do no more there than guest root could anyway."""
    if not args:
        raise PkgError("no arguments for the package manager after '--'")
    return list(args)


def run_one(paths: Paths, name: str, args: Sequence[str], *, output: Write,
            start: bool = False) -> Outcome:
    """Run the guest's package manager with ARGS in NAME; report to OUTPUT as it goes."""
    args = check_args(args)
    check_name(name)
    if not paths.conf(name).exists():
        out = Outcome(name, None, problem="no such vserver")
    else:
        mgr = detect(paths.root(name))
        if mgr is None:
            out = Outcome(name, None, problem="no package manager")
        else:
            output(f"== {name} ({mgr.name}) ==\n".encode())
            out = _run_in(paths, name, mgr, args, output=output, start=start)
    if out.manager is None:
        output(f"== {name} ==\n".encode())
    output(f"-- {name}: {out.result()}\n".encode())
    return out


def _run_in(paths: Paths, name: str, mgr: Manager, args: list[str], *, output: Write,
            start: bool) -> Outcome:
    started = False
    if not guest.running(paths, name):
        if not start:
            return Outcome(name, mgr.name, problem="not running (--start runs it for the command)")
        output(f"{name}: starting it for the command\n".encode())
        try:
            guest.start(paths, name, output=output)
        except (guest.GuestError, OSError) as e:
            return Outcome(name, mgr.name, problem=f"start failed: {_reason(name, e)}")
        started = True
    tail = _LineEnd(output)
    code: int | None = None
    problems: list[str] = []
    try:
        code = guest.exec_in(paths, name, [mgr.path, *args], output=tail)
    except (guest.GuestError, OSError) as e:
        problems.append(_reason(name, e))
    finally:
        tail.finish()
        if started:
            output(f"{name}: stopping it again\n".encode())
            try:
                guest.stop(paths, name, output=output)
            except (guest.GuestError, OSError) as e:
                problems.append(f"stop failed: {_reason(name, e)}")
    return Outcome(name, mgr.name, code, "; ".join(problems))


def _reason(name: str, e: Exception) -> str:
    """E's message without the guest's name in front: the report already names it."""
    return str(e).removeprefix(f"{name}: ")


class _LineEnd:
    """Pass the command's output on, and end its last line if it did not."""

    def __init__(self, output: Write) -> None:
        self._output = output
        self._open = False

    def __call__(self, data: bytes) -> None:
        if data:
            self._output(data)
            self._open = not data.endswith(b"\n")

    def finish(self) -> None:
        if self._open:
            self._output(b"\n")
            self._open = False


def run_all(paths: Paths, names: Sequence[str], args: Sequence[str], *, output: Write,
            start: bool = False) -> list[Outcome]:
    """run_one for each of NAMES in turn (ALL expanded), then the summary table."""
    args = check_args(args)
    outcomes = [run_one(paths, n, args, output=output, start=start)
                for n in select_guests(paths, names)]
    output(summary(outcomes).encode())
    return outcomes


def summary(outcomes: Sequence[Outcome]) -> str:
    rows = [(o.name, o.manager or "-", o.result()) for o in outcomes]
    return "\n".join(render_table(("NAME", "MANAGER", "RESULT"), rows,
                                  (False, False, False))) + "\n"


# --- re-unification ----------------------------------------------------------------

UnifyFn = Callable[..., object]


def load_unify() -> UnifyFn:
    """hostagent.unify.unify, imported only now; UnifyUnavailable if there is none."""
    try:
        mod = importlib.import_module("hostagent.unify")
    except ImportError as e:
        raise UnifyUnavailable(f"hostagent.unify cannot be imported ({e})") from e
    fn: object = getattr(mod, "unify", None)
    if not callable(fn):
        raise UnifyUnavailable("hostagent.unify has no unify() function")
    try:
        inspect.signature(fn).bind(None, "", [])
    except TypeError as e:
        raise UnifyUnavailable(
            f"hostagent.unify.unify does not take (paths, ref, guests): {e}") from e
    except ValueError:
        pass  # no signature to read (a builtin): let the call itself tell
    return fn


def reunify(paths: Paths, ref: str, guests: Sequence[str], *, output: Write) -> object:
    """hostagent.unify.unify(paths, REF, GUESTS), with OUTPUT if it takes one.

    Raises UnifyUnavailable without the module; whatever unify itself raises
    passes through.
    """
    fn = load_unify()
    try:
        takes_output = "output" in inspect.signature(fn).parameters
    except ValueError:
        takes_output = False
    if takes_output:
        return fn(paths, ref, list(guests), output=output)
    return fn(paths, ref, list(guests))
