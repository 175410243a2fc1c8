"""rebootmgr: a guest asks the host to restart or stop it.

The seed's protocol (util-vserver src/rebootmgr.c, src/vreboot.c), kept as it
was: one AF_UNIX stream socket per guest, mode 0600, which the guest sees as
/dev/reboot; a client connects and writes exactly `reboot\\n` or `halt\\n`.
The guest is known by which socket accepted the connection, never by what it
wrote, so no payload can name another guest (reference/security.md RB1).

On the host the socket is RUNDIR/reboot/NAME/reboot. The guest gets the
directory, not the socket, bind-mounted read-only at /dev/.rebootmgr
(hostagent/context.py), with /dev/reboot a symlink into it: an agent that
restarts unlinks the socket and binds a new one in the same directory, and
every running guest reaches the new one through its existing mount.

RebootManager runs in the agent's asyncio loop and hands each valid request
to a callback; the agent does the restart or stop. A flood (RB2) costs the
agent a bounded amount: at most `max_connections` connections per guest are
read at once (others are closed on accept), each for at most one read of 99
bytes within `read_timeout`, at most `per_minute` requests per guest are
passed on in any `window`, and what is refused is logged a few lines per
window, not a line per connection.

A guest can also end itself with reboot(2) (`reboot -f`, systemd's last
step): in a PID namespace the kernel kills the namespace's PID 1 instead of
the machine, and PID 1's parent sees SIGHUP (restart) or SIGINT (halt)
(kernel/pid_namespace.c reboot_pid_ns). classify_exit() reads that status.
docs/rebootmgr.md has the whole picture.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hostagent import idmap
from hostagent.names import check_name
from hostagent.paths import Paths
from hostagent.syscalls import CLONE_NEWPID

if TYPE_CHECKING:
    from hostagent.seccomp import SeccompPolicy

__all__ = [
    "KEXEC_CALLS",
    "MAX_REQUEST",
    "REQUESTS",
    "SOCKET_NAME",
    "Action",
    "ExitKind",
    "RebootManager",
    "classify_exit",
    "prepare",
    "remove",
    "socket_dir",
    "socket_path",
    "sys_boot_allowed",
]

_LOG = logging.getLogger(__name__)

Action = Literal["restart", "halt"]
ExitKind = Literal["restart", "halt", "exit"]

SOCKET_NAME = "reboot"
# The one read the seed's rebootmgr made (char buf[100], read(fd, buf, 99)).
MAX_REQUEST = 99
# The only two requests; anything else, a prefix or a longer line included,
# is invalid.
REQUESTS: dict[bytes, Action] = {b"reboot\n": "restart", b"halt\n": "halt"}
# The calls that CAP_SYS_BOOT would open to a guest besides reboot(2): they
# load a new kernel into the host (kernel/kexec.c kexec_load_permitted checks
# capable(CAP_SYS_BOOT) in the initial user namespace, which guest root is in).
KEXEC_CALLS = frozenset({"kexec_load", "kexec_file_load"})

_BASE_MODE = 0o711  # RUNDIR/reboot: traversable, not listable
_DIR_MODE = 0o755  # RUNDIR/reboot/NAME: what the guest sees at /dev/.rebootmgr
_SOCKET_MODE = 0o600  # guest root only; connect(2) needs write permission on it
_STAGING = ".reboot.new"  # bound here, made 0600, then renamed over SOCKET_NAME
_BACKLOG = 10
# Lines about refused traffic per guest and window before the log goes quiet.
_LOG_BURST = 3


class RebootError(OSError):
    """The socket directory of a guest could not be made safe."""


# --- paths -----------------------------------------------------------------------

def socket_dir(paths: Paths, name: str) -> Path:
    """RUNDIR/reboot/NAME: the host directory a guest sees at /dev/.rebootmgr."""
    return paths.rundir / "reboot" / check_name(name)


def socket_path(paths: Paths, name: str) -> Path:
    return socket_dir(paths, name) / SOCKET_NAME


def _open_dir(path: Path | str, dir_fd: int | None = None) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=dir_fd)


def _own_dir_at(dfd: int, name: str, mode: int) -> int:
    """Open directory NAME in DFD, made if missing, ours and MODE; return its fd.

    A symlink or a file in its place is removed, never followed: the directory
    is bind-mounted into a guest, so following a planted link would hand the
    guest whatever it points at.
    """
    for _ in range(3):
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=dfd)
            continue
        if not stat.S_ISDIR(st.st_mode):
            _LOG.warning("rebootmgr: replacing %r, which is not a directory", name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)
            continue
        fd = _open_dir(name, dfd)
        try:
            fst = os.fstat(fd)
            uid = os.geteuid()
            if (fst.st_uid, fst.st_gid) != (uid, 0) and uid == 0:
                os.fchown(fd, 0, 0)
            if stat.S_IMODE(fst.st_mode) != mode:
                os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise RebootError(f"{name}: could not make it a directory of our own")


def prepare(paths: Paths, name: str) -> Path:
    """Create RUNDIR/reboot (0711) and RUNDIR/reboot/NAME (0755), root's; return the latter.

    Safe to call on every start, and while a manager listens in it: only the
    directories are made or repaired, the socket is left alone.
    """
    d = socket_dir(paths, name)
    paths.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
    rfd = _open_dir(paths.rundir)
    try:
        bfd = _own_dir_at(rfd, "reboot", _BASE_MODE)
        try:
            os.close(_own_dir_at(bfd, name, _DIR_MODE))
        finally:
            os.close(bfd)
    finally:
        os.close(rfd)
    return d


def remove(paths: Paths, name: str) -> None:
    """Remove RUNDIR/reboot/NAME and the socket in it; call it once the guest is gone."""
    d = socket_dir(paths, name)
    try:
        bfd = _open_dir(d.parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        try:
            st = os.stat(name, dir_fd=bfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=bfd)
            return
        gfd = _open_dir(name, bfd)
        try:
            for entry in os.listdir(gfd):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                    os.unlink(entry, dir_fd=gfd)
        finally:
            os.close(gfd)
        try:
            os.rmdir(name, dir_fd=bfd)
        except OSError as e:
            _LOG.warning("rebootmgr: could not remove %s: %s", d, e)
    finally:
        os.close(bfd)


def _listen(paths: Paths, name: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at socket_path(NAME), replacing a stale one; with its (dev, ino).

    Bound under a staging name, made 0600, then listened on and renamed over
    the old socket, so the path never names a socket of a wider mode that
    accepts connections, and never goes missing for a client of a running
    guest. The path is reached through /proc/self/fd, which keeps it within
    sun_path's 108 bytes whatever RUNDIR is.
    """
    d = prepare(paths, name)
    dfd = _open_dir(d)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_STAGING, dir_fd=dfd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"/proc/self/fd/{dfd}/{_STAGING}")
            os.chmod(_STAGING, _SOCKET_MODE, dir_fd=dfd, follow_symlinks=False)
            base = idmap.base_of(paths, name)
            if base is not None:
                # Guest root is host uid BASE in a guest with an id range (IDMAP),
                # and connect(2) wants write permission on the socket: its owner.
                os.chown(_STAGING, base, base, dir_fd=dfd, follow_symlinks=False)
            st = os.stat(_STAGING, dir_fd=dfd, follow_symlinks=False)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
            os.rename(_STAGING, SOCKET_NAME, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(_STAGING, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
    return sock, (st.st_dev, st.st_ino)


def _unlink_if(paths: Paths, name: str, ident: tuple[int, int]) -> None:
    """Unlink NAME's socket if it is still the one we bound (IDENT), not a newer agent's."""
    try:
        dfd = _open_dir(socket_dir(paths, name))
    except OSError:
        return
    try:
        st = os.stat(SOCKET_NAME, dir_fd=dfd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(SOCKET_NAME, dir_fd=dfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)


# --- the capability that makes the guest's own reboot(2) work ---------------------

def sys_boot_allowed(namespaces: int, policy: SeccompPolicy | None) -> bool:
    """May a context with NAMESPACES and POLICY hold CAP_SYS_BOOT?

    Only in a PID namespace of its own, where reboot(2) cannot reach the host:
    it kills the namespace's PID 1 (RESTART, RESTART2, HALT, POWER_OFF) or
    fails with EINVAL (CAD_ON, CAD_OFF, KEXEC, SW_SUSPEND), kernel/reboot.c and
    kernel/pid_namespace.c. The capability's other use, kexec_load and
    kexec_file_load, is checked in the initial user namespace, which a guest is
    in: POLICY must refuse both, or the guest could load a kernel for the host.
    """
    if not namespaces & CLONE_NEWPID:
        return False
    return policy is not None and frozenset(policy.deny) >= KEXEC_CALLS


# --- what the guest's PID 1 exit means -------------------------------------------

def classify_exit(info: os.waitid_result | int, *, fakeinit: bool = False) -> ExitKind:
    """What the end of a guest's PID 1 asks for, from os.waitid's result or a waitpid status.

    Killed by SIGHUP: reboot(2) RESTART inside the guest ("restart"); killed by
    SIGINT: HALT or POWER_OFF ("halt"). The kernel sets these as the exit
    signal of the namespace's PID 1 (zap_pid_ns_processes), so no process in
    the guest can fake them short of reboot(2) itself.

    The small init (catatonit -P) exits with status 0 on SIGTERM or SIGINT and
    ignores SIGUSR1 and SIGUSR2. busybox `reboot` without -f sends it SIGTERM,
    so for a guest without FAKEINIT an exit with status 0 is "restart" too
    (which a `kill 1` inside the guest also gives: it cannot be told apart).
    Everything else, a guest's own init exiting included, is "exit".

    Only PID 1's parent gets this status: the agent that started the guest.
    """
    if isinstance(info, int):
        if os.WIFSIGNALED(info):
            code, status = os.CLD_KILLED, os.WTERMSIG(info)
        elif os.WIFEXITED(info):
            code, status = os.CLD_EXITED, os.WEXITSTATUS(info)
        else:
            return "exit"
    else:
        code, status = info.si_code, info.si_status
    if code in (os.CLD_KILLED, os.CLD_DUMPED):
        if status == signal.SIGHUP:
            return "restart"
        if status == signal.SIGINT:
            return "halt"
        return "exit"
    if code == os.CLD_EXITED and status == 0 and not fakeinit:
        return "restart"
    return "exit"


# --- the manager -------------------------------------------------------------------

@dataclasses.dataclass
class _Quota:
    """Per-guest limits and log throttling; kept across re-watches of the guest."""

    times: collections.deque[float]  # when accepted requests came, at most per_minute
    drop_logged_until: float = float("-inf")
    noise_until: float = float("-inf")  # end of the current log window for refused traffic
    noise_logged: int = 0
    noise_quiet: int = 0  # refused connections not logged in the current window


@dataclasses.dataclass
class _Watch:
    sock: socket.socket
    ident: tuple[int, int]
    conns: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)
    task: asyncio.Task[None] | None = None


def _shown(data: bytes) -> str:
    """DATA for a log line: escaped, and cut short."""
    return repr(data[:32]) + ("..." if len(data) > 32 else "")


class RebootManager:
    """Serves every watched guest's socket from the running asyncio loop.

    ON_REQUEST(name, action) is called in the loop for each request that
    passes, with action "restart" or "halt"; it should only queue the work.
    """

    def __init__(
        self,
        paths: Paths,
        on_request: Callable[[str, str], None],
        *,
        per_minute: int = 6,
        window: float = 60.0,
        max_connections: int = 4,
        read_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1 or max_connections < 1 or window <= 0 or read_timeout <= 0:
            raise ValueError("per_minute, max_connections, window and read_timeout must be > 0")
        self._paths = paths
        self._on_request = on_request
        self._per_minute = per_minute
        self._window = window
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._clock = clock
        self._watches: dict[str, _Watch] = {}
        self._quotas: dict[str, _Quota] = {}
        # watch, unwatch and close one at a time: two watches of one guest
        # interleaved at an await would leave one of them serving unseen.
        self._lock = asyncio.Lock()

    def watching(self) -> set[str]:
        return set(self._watches)

    async def watch(self, name: str) -> None:
        """Listen on NAME's socket, made anew (a stale one is replaced); idempotent."""
        check_name(name)
        async with self._lock:
            await self._drop(name)
            sock, ident = _listen(self._paths, name)
            w = _Watch(sock, ident)
            w.task = asyncio.get_running_loop().create_task(self._serve(name, w),
                                                            name=f"rebootmgr {name}")
            self._watches[name] = w

    async def unwatch(self, name: str) -> None:
        """Stop serving NAME; its socket goes unless a newer agent has bound another."""
        async with self._lock:
            await self._drop(name)

    async def close(self) -> None:
        async with self._lock:
            for name in list(self._watches):
                await self._drop(name)

    async def _drop(self, name: str) -> None:
        w = self._watches.pop(name, None)
        if w is None:
            return
        tasks = [t for t in (w.task, *w.conns) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        w.sock.close()
        _unlink_if(self._paths, name, w.ident)
        self._forget_idle_quotas()

    def _forget_idle_quotas(self) -> None:
        """Drop the state of guests not watched and without a request in the window.

        A guest restarted by its own request keeps its window across the
        restart (that is what stops a reboot loop); one deleted since goes.
        """
        now = self._clock()
        for name in [n for n in self._quotas if n not in self._watches]:
            q = self._quotas[name]
            if not q.times or q.times[-1] <= now - self._window:
                del self._quotas[name]

    # -- serving --

    async def _serve(self, name: str, w: _Watch) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(w.sock)
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS: wait, do not spin
                self._noise(name, f"accept failed: {e.strerror}")
                await asyncio.sleep(0.1)
                continue
            if len(w.conns) >= self._max_connections:
                conn.close()
                self._noise(name, f"more than {self._max_connections} connections at once")
                continue
            task = loop.create_task(self._handle(name, conn))
            w.conns.add(task)
            task.add_done_callback(w.conns.discard)

    async def _handle(self, name: str, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                data = await asyncio.wait_for(loop.sock_recv(conn, MAX_REQUEST),
                                              self._read_timeout)
            except TimeoutError:
                self._noise(name, f"no request within {self._read_timeout:g} s")
                return
            except OSError as e:
                self._noise(name, f"read failed: {e.strerror}")
                return
            action = REQUESTS.get(data)
            if action is None:
                self._noise(name, f"invalid request {_shown(data)}")
                return
            if not self._admit(name):
                return
            try:
                self._on_request(name, action)
            except Exception:
                _LOG.exception("rebootmgr: handling %s's %s request failed", name, action)
        finally:
            conn.close()

    def _quota(self, name: str) -> _Quota:
        q = self._quotas.get(name)
        if q is None:
            q = self._quotas[name] = _Quota(collections.deque(maxlen=self._per_minute))
        return q

    def _admit(self, name: str) -> bool:
        """A sliding window: at most per_minute requests of NAME in any `window` seconds."""
        q = self._quota(name)
        now = self._clock()
        while q.times and q.times[0] <= now - self._window:
            q.times.popleft()
        if len(q.times) < self._per_minute:
            q.times.append(now)
            return True
        if now >= q.drop_logged_until:
            q.drop_logged_until = now + self._window
            _LOG.warning("rebootmgr: %s: more than %d requests in %g s; dropping them for "
                         "%.0f s", name, self._per_minute, self._window,
                         q.times[0] + self._window - now)
        return False

    def _noise(self, name: str, what: str) -> None:
        """Log refused traffic from NAME, at most _LOG_BURST lines per window."""
        q = self._quota(name)
        now = self._clock()
        if now >= q.noise_until:
            if q.noise_quiet:
                _LOG.warning("rebootmgr: %s: %d more refused connections were not logged",
                             name, q.noise_quiet)
            q.noise_until, q.noise_logged, q.noise_quiet = now + self._window, 0, 0
        if q.noise_logged < _LOG_BURST:
            q.noise_logged += 1
            _LOG.warning("rebootmgr: %s: %s%s", name, what,
                         "; not logging more of these for a while"
                         if q.noise_logged == _LOG_BURST else "")
        else:
            q.noise_quiet += 1
