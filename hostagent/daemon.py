"""hostagent serve: the root daemon behind the panel.

One process per host. It owns nothing a guest needs to keep running: a
guest's PID 1 is a plain process in its own cgroup, its network lives in its
namespace, its records are files in $VSERVER_RUNDIR. So the agent may be
stopped or killed at any moment; the next one finishes or undoes what the
last one left (hostagent.recovery), finds the running guests in their records
and cgroups and watches them again (same PIDs, network untouched), and serves
their /dev/reboot sockets anew.

Work runs in threads (hostagent.operations); the event loop thread only
answers requests, fans out events, watches guests' PID 1s through pidfds and
relays the terminals of console sessions (hostagent.consoles).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import grp
import hashlib
import logging
import os
import platform
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from hostagent import conf as confmod
from hostagent import guest, onboot, rebootmgr, recovery, syscalls, templates, wire
from hostagent.api import ApiError, make_app
from hostagent.archive import ArchiveStream
from hostagent.cgroup import Cgroup
from hostagent.consoles import Consoles
from hostagent.events import EventBus
from hostagent.guest import Console
from hostagent.operations import Journal, Operation, Operations, Progress
from hostagent.paths import Paths

__all__ = ["Agent", "serve"]

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

RESCAN_SECONDS = 2.0  # how often guests started outside the agent are looked for
EXEC_OUTPUT_MAX = 1 << 20  # bytes of an exec's output kept in its result
# Archives streaming at once; more wait their turn. Each holds an operation
# worker thread for as long as its client takes, and the pool has 32.
ARCHIVE_SLOTS = 8
DEFAULT_GROUP = "vpanel"


def default_socket(paths: Paths) -> Path:
    return paths.rundir / "agent.sock"


class Agent:
    def __init__(self, paths: Paths, socket_path: Path | None = None,
                 group: str = DEFAULT_GROUP, *, run_onboot: bool = True) -> None:
        self.paths = paths
        self.socket_path = socket_path or default_socket(paths)
        self.group_name = group
        self.group_id: int | None = None
        self.run_onboot = run_onboot
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: dict[str, tuple[int, int]] = {}  # guest -> (init pid, pidfd)
        self._samplers: dict[str, Any] = {}
        self._conf_cache: dict[str, tuple[tuple[int, int, int], confmod.GuestSettings]] = {}
        self._recovered: list[recovery.Recovered] = []
        self._lock_fd = -1
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.stopped = asyncio.Event()
        self.archive_slots = asyncio.Semaphore(ARCHIVE_SLOTS)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the agent has not started")
        return self._loop

    # --- life of the agent ---

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.paths.ensure()
        self._take_instance_lock()
        try:
            self.group_id = grp.getgrnam(self.group_name).gr_gid
        except KeyError:
            _LOG.warning("group %s does not exist: only root may use the agent's socket",
                         self.group_name)
        self.bus = EventBus(loop, self._sample_processes)
        self.ops = Operations(self.bus, Journal(self.paths.rundir / "journal"))
        self.reboot = rebootmgr.RebootManager(self.paths, self._on_reboot_request)
        self.consoles = Consoles(loop, self._open_console, self._console_event)
        # Before anyone may ask for anything: finish or undo the last agent's work.
        self._recovered = await loop.run_in_executor(
            None, recovery.recover, self.paths, self.ops.journal)
        for r in self._recovered:
            self.ops.add_finished(r.kind, r.guest,
                                  f"interrupted by an agent stop; {r.outcome}"
                                  + (f": {r.error}" if r.error else ""))
        await self._rescan(adopting=True)
        await self._listen()
        self._tasks.append(loop.create_task(self._rescan_forever()))
        if self.run_onboot:
            self.ops.submit("onboot", None, self._onboot)
        _LOG.info("agent serving on %s", self.socket_path)

    def _take_instance_lock(self) -> None:
        fd = os.open(self.paths.rundir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another agent is running on {self.paths.rundir}") from None
        self._lock_fd = fd

    async def _listen(self) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._runner = web.AppRunner(make_app(self), access_log=None, handle_signals=False,
                                    shutdown_timeout=2.0)
        await self._runner.setup()
        # Made 0600 and only then opened to the group: no moment when others may connect.
        old = os.umask(0o177)
        try:
            await web.UnixSite(self._runner, str(path)).start()
        finally:
            os.umask(old)
        if self.group_id is not None:
            os.chown(path, 0, self.group_id)
            os.chmod(path, 0o660)
            # The run directory must let the group reach the socket, and no more.
            rundir = self.paths.rundir
            os.chown(rundir, 0, self.group_id)
            os.chmod(rundir, 0o710)  # noqa: S103 - search for the group, no listing

    async def close(self) -> None:
        """Stop serving. Running guests are left running: that is the point."""
        for t in self._tasks:
            t.cancel()
        await self.consoles.close_all()  # a console's terminal lives in this process
        await self.bus.close()  # ends every event stream, so no connection lingers
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        for name in list(self._watched):
            self._unwatch(name)
        await self.reboot.close()
        await self.ops.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
        self.stopped.set()

    # --- watching running guests ---

    async def _rescan_forever(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_SECONDS)
            try:
                await self._rescan()
            except Exception:
                _LOG.exception("rescanning guests")

    async def _rescan(self, adopting: bool = False) -> None:
        """Watch every running guest not yet watched (started by the CLI, or before us)."""
        states = await self.loop.run_in_executor(None, self._running_states)
        for name, st in states.items():
            if name in self._watched or self.ops.busy_state(name) is not None:
                continue
            if self._watch(name, st):
                await self.reboot.watch(name)
                self.bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_ADOPTED, name,
                                 state=wire.STATE_RUNNING, init_pid=st.init_pid,
                                 at_agent_start=adopting)

    def _running_states(self) -> dict[str, guest.RunState]:
        out = {}
        for name in self.paths.guest_names():
            st = guest.read_state(self.paths, name)
            if st is not None and guest.running(self.paths, name):
                out[name] = st
        return out

    def _watch(self, name: str, st: guest.RunState) -> bool:
        """Be told through a pidfd when NAME's PID 1 ends."""
        if name in self._watched:
            self._unwatch(name)
        try:
            fd = syscalls.pidfd_open(st.init_pid)
        except OSError:
            return False
        self._watched[name] = (st.init_pid, fd)
        self.loop.add_reader(fd, self._on_init_exit, name, st.init_pid, fd)
        return True

    def _unwatch(self, name: str) -> None:
        entry = self._watched.pop(name, None)
        if entry is not None:
            self.loop.remove_reader(entry[1])
            os.close(entry[1])

    def _on_init_exit(self, name: str, pid: int, fd: int) -> None:
        """NAME's PID 1 ended: it crashed, halted or rebooted itself, or we stopped it."""
        self.consoles.end_guest(name)
        how = "exit"
        with contextlib.suppress(ChildProcessError, OSError):
            # Only the parent (us, if we started it) may read how it ended;
            # WNOWAIT leaves it for guest.stop to reap.
            info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                how = rebootmgr.classify_exit(info, fakeinit=self._fakeinit(name))
        if self._watched.get(name, (0, -1))[1] == fd:
            self._unwatch(name)
        if self.ops.busy_state(name) is not None:
            return  # a stop or restart of ours is under way; it reports the end itself
        asyncio.get_running_loop().create_task(self.reboot.unwatch(name))
        if how == "restart":
            self.bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_REBOOT_REQUESTED, name,
                             state=wire.STATE_RESTARTING, source="reboot(2)")
            self._submit_state(name, "restart", force=True)
            return

        def cleanup(_p: Progress) -> dict[str, Any]:
            return {"how": how, "cleaned": guest.cleanup_after_exit(self.paths, name, pid)}

        self.ops.submit("exited", name, cleanup, on_done=lambda op: self.bus.publish(
            wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_EXITED, name,
            state=self._state_of_quick(name, None), how=how, init_pid=pid))

    def _fakeinit(self, name: str) -> bool:
        try:
            return "fakeinit" in self._settings(name).flags
        except (confmod.ConfigError, OSError):
            return False

    def _on_reboot_request(self, name: str, action: str) -> None:
        """A guest wrote to its /dev/reboot: at most one restart or halt queued per guest."""
        if any(op.guest == name and op.kind in ("restart", "stop") and not op.done.is_set()
               for op in self.ops.all()):
            _LOG.info("reboot request from %s ignored: one is already queued", name)
            return
        self.bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_REBOOT_REQUESTED, name,
                         state=wire.STATE_RESTARTING if action == "restart"
                         else wire.STATE_STOPPING, source="/dev/reboot", action=action)
        self._submit_state(name, "restart" if action == "restart" else "stop")

    # --- reads ---

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self.loop.run_in_executor(None, fn, *args)

    def _exists(self, name: str) -> None:
        if not self.paths.conf(name).exists():
            raise ApiError(404, f"no vserver {name}", "name")

    async def host_info(self) -> wire.HostInfo:
        return await self._in_thread(self._host_info)

    def _host_info(self) -> wire.HostInfo:
        from hostagent import cgroup, limits, lxcfs, quota

        try:
            track = cgroup.tracking_hierarchy()
            cg = f"v{track.version}"
        except cgroup.CgroupError:
            cg = "none"
        controllers = {k: f"v{h.version}" for k, h in limits.controller_hierarchies().items()}
        names = self.paths.guest_names()
        running = sum(1 for n in names if guest.running(self.paths, n))
        return wire.HostInfo(
            api_version=wire.API_VERSION, hostname=platform.node(), kernel=platform.release(),
            cgroup=cg, cgroup_controllers=controllers,
            quota=quota.support(self.paths.rootdir),
            features={
                "lxcfs": lxcfs.mountpoint() is not None,
                "clone_into_cgroup": cg == "v2",
                "pidfd": True,
                "ipv6": os.path.exists("/proc/sys/net/ipv6"),
                "nftables": os.path.exists("/usr/sbin/nft"),
                "btrfs_quota": quota.method(self.paths.rootdir)[0] == quota.BTRFS_QGROUP,
                "project_quota": quota.method(self.paths.rootdir)[0] == quota.PROJECT_QUOTA,
            },
            guests=len(names), running=running)

    def _state_of(self, name: str) -> str:
        busy = self.ops.busy_state(name)
        if busy is not None:
            return busy
        return wire.STATE_RUNNING if guest.running(self.paths, name) else wire.STATE_STOPPED

    def _settings(self, name: str) -> confmod.GuestSettings:
        """NAME.conf parsed, cached while the file is unchanged (listing reads them all)."""
        path = self.paths.conf(name)
        st = os.stat(path)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._conf_cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        s = confmod.settings_from_file(path)
        self._conf_cache[name] = (key, s)
        return s

    def _info(self, name: str, full: bool = False) -> wire.GuestInfo:
        try:
            s = self._settings(name)
        except (confmod.ConfigError, OSError) as e:
            self._conf_cache.pop(name, None)
            return wire.GuestInfo(name=name, state=wire.STATE_UNKNOWN, context=None,
                                  init_pid=None, processes=0, uptime=0.0, addresses=(),
                                  description=f"NAME.conf unreadable: {e}"[:200], onboot=False,
                                  priority=confmod.DEFAULT_PRIORITY, template=None,
                                  unrestricted_network=False, disk=None, limits=())
        try:
            return self._info_now(name, s, full)
        except (guest.GuestError, OSError):
            # It ended while we read it (its cgroup or /proc entries went):
            # read again, now as the stopped guest it is. Anything else raises.
            if guest.running(self.paths, name):
                raise
            return self._info_now(name, s, full)

    def _info_now(self, name: str, s: confmod.GuestSettings, full: bool) -> wire.GuestInfo:
        run = guest.read_state(self.paths, name)
        alive = run is not None and guest.running(self.paths, name)
        state = self.ops.busy_state(name) or (wire.STATE_RUNNING if alive
                                              else wire.STATE_STOPPED)
        st = guest.status(self.paths, name) if alive and full else None
        return wire.GuestInfo(
            name=name, state=state,
            context=run.context if run and alive else None,
            init_pid=run.init_pid if run and alive else None,
            processes=len(Cgroup(run.cgroup).procs()) if run and alive else 0,
            uptime=round(time.time() - run.started, 3) if run and alive else 0.0,
            addresses=tuple(str(confmod.parse_ip_token(t).address) for t in s.iproot),
            description=s.description or "", onboot=s.onboot, priority=s.priority,
            template=templates.template_of(s.build_method),
            unrestricted_network=s.iproot_unrestricted,
            disk=guest._disk_text(self.paths, name) if full else None,
            limits=st.limits if st else ())

    async def guests(self) -> list[wire.GuestInfo]:
        return await self._in_thread(
            lambda: [self._info(n) for n in self.paths.guest_names()])

    async def guest(self, name: str) -> wire.GuestInfo:
        self._exists(name)
        return await self._in_thread(self._info, name, True)

    def _config(self, name: str) -> wire.Config:
        path = self.paths.conf(name)
        data = path.read_bytes()
        conf = confmod.GuestConf.parse(data.decode(), str(path))
        values = {k: conf.get(k) or "" for k in conf.keys()}  # noqa: SIM118 - GuestConf is no dict
        return wire.Config(values=values, etag=hashlib.sha256(data).hexdigest())

    async def config(self, name: str) -> wire.Config:
        self._exists(name)
        return await self._in_thread(self._config, name)

    async def put_config(self, name: str, put: wire.ConfigPut,
                         etag: str | None) -> tuple[wire.Config, list[str]]:
        """Change NAME.conf keys, all or none, and apply them to the running guest."""
        self._exists(name)

        def work(_p: Progress) -> dict[str, Any]:
            before = self._config(name)
            if etag is not None and etag != before.etag:
                raise ApiError(412, f"{name}.conf changed since it was read (ETag mismatch)",
                               "If-Match")
            conf = confmod.GuestConf.parse(self.paths.conf(name).read_text())
            for key, value in put.values.items():
                if value:
                    conf.set(key, value)
                else:
                    conf.unset(key)
            try:
                confmod.settings(conf)  # the whole file must still be valid
            except (confmod.ConfigError, ValueError) as e:
                raise ApiError(400, str(e), _field_of(str(e), put.values)) from e
            lines: list[str] = []
            for key, value in put.values.items():
                lines += guest.set_key(self.paths, name, key, value)
            return {"applied": lines}

        op = self.ops.submit("set", name, work)
        await op.done.wait()
        if op.state != wire.OP_SUCCESS:
            raise _as_api_error(op)
        self.bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_UPDATED, name,
                         state=self._state_of(name), keys=sorted(put.values))
        applied = (op.result or {}).get("applied", [])
        return await self._in_thread(self._config, name), list(applied)

    async def processes(self, name: str) -> list[wire.ProcessRow]:
        self._exists(name)
        rows = await self._in_thread(self._sample_processes, name)
        if rows is None:
            raise ApiError(409, f"{name} is not running", "name")
        return [wire.ProcessRow.from_json(r) for r in rows]

    def _sample_processes(self, name: str) -> list[dict[str, Any]] | None:
        """NAME's processes as vtop shows them; %CPU since the previous sample."""
        from hostagent.cli.vtop import Sampler

        if not guest.running(self.paths, name):
            self._samplers.pop(name, None)
            return None
        sampler = self._samplers.setdefault(name, Sampler(self.paths, name))
        rows = sampler.sample()
        user = self._guest_users(name)
        return [{"pid": r.pid, "guest_pid": r.guest_pid, "user": user(r.uid),
                 "cpu": round(r.cpu, 1), "mem": round(r.mem, 1), "rss": r.rss_kib * 1024,
                 "command": r.command} for r in rows]

    def _guest_users(self, name: str) -> Callable[[int], str]:
        """Host uid -> the user as the guest knows it: its own uid (the host's
        less the guest's id range, if it has one) named from its /etc/passwd."""
        from hostagent import idmap, views

        base = self._settings(name).idmap_base
        names = views.guest_user_names(self.paths.root(name))

        def user(uid: int) -> str:
            inner = uid
            if base is not None:
                if not base <= uid < base + idmap.RANGE:
                    return str(uid)  # not one of the guest's ids: the host's number
                inner = uid - base
            return names.get(inner, str(inner))
        return user

    async def stats(self) -> list[wire.Usage]:
        from hostagent import usage

        rows = await self._in_thread(usage.usage_all, self.paths)
        return [wire.Usage.from_json(u.as_dict()) for u in rows.values()]

    async def quotas(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        for n in names or ():
            self._exists(n)
        return await self._in_thread(self._quotas, names)

    def _quotas(self, names: list[str] | None) -> list[dict[str, Any]]:
        from hostagent import quota

        out = []
        for name in names if names is not None else self.paths.guest_names():
            item: dict[str, Any] = {"name": name, "mode": None, "used": None, "limit": None}
            root = self.paths.root(name)
            try:
                if quota.image_path(self.paths.rootdir, name).exists():
                    item["mode"] = "image"
                    if os.path.ismount(root):
                        u = quota.image_usage(root)
                        item["used"], item["limit"] = u.exclusive, u.limit
                elif (own := guest.disk_of(self.paths, name)) is not None:
                    item["mode"] = (quota.BTRFS_QGROUP if quota.is_subvolume(own)
                                    else quota.PROJECT_QUOTA)
                    u = quota.usage(own)
                    item["used"], item["limit"] = u.exclusive, u.limit
            except (quota.QuotaError, OSError) as e:
                item["error"] = str(e)
            out.append(item)
        return out

    async def templates(self) -> list[wire.TemplateInfo]:
        rows = await self._in_thread(templates.list_templates, self.paths)
        return [wire.TemplateInfo.from_json(_template_json(t)) for t in rows]

    # --- changes: every one an operation ---

    def _lifecycle_done(self, name: str, success: str) -> Callable[[Operation], None]:
        def done(op: Operation) -> None:
            if op.state == wire.OP_SUCCESS:
                self.bus.publish(wire.TYPE_LIFECYCLE, success, name,
                                 state=self._state_of_quick(name, success), operation=op.id)
            else:
                self.bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_OPERATION_FAILED, name,
                                 state=self._state_of_quick(name, None), operation=op.id,
                                 kind=op.kind, error=op.error)
        return done

    def _state_of_quick(self, name: str, event: str | None) -> str:
        if event in (wire.EVENT_GUEST_STARTED, wire.EVENT_GUEST_RESTARTED):
            return wire.STATE_RUNNING
        if event in (wire.EVENT_GUEST_STOPPED, wire.EVENT_GUEST_CREATED):
            return wire.STATE_STOPPED
        if event == wire.EVENT_GUEST_DELETED:
            return wire.STATE_STOPPED
        try:
            return wire.STATE_RUNNING if guest.running(self.paths, name) \
                else wire.STATE_STOPPED
        except ValueError:
            return wire.STATE_UNKNOWN

    def build(self, req: wire.BuildRequest) -> wire.Operation:
        if self.paths.conf(req.name).exists():
            raise ApiError(409, f"vserver {req.name} already exists", "name")
        source = req.source
        if req.method == "rootfs" and source is not None:
            source = str(rootfs_dir(self.paths) / source)
        opts = guest.BuildOptions(
            method=req.method, source=source, hostname=req.hostname, ips=req.ips,
            caps=req.caps, flags=req.flags, nice=req.nice, ulimit=req.ulimit,
            onboot=req.onboot, context=req.context, description=req.description,
            disk_limit=req.disk_limit, disk_image=req.disk_image, idmap=req.idmap)

        def work(progress: Progress) -> dict[str, Any]:
            progress(5, "building the root tree")
            guest.build(self.paths, req.name, opts, log=lambda m: progress(50, m))
            if req.priority is not None:
                guest.set_key(self.paths, req.name, "PRIORITY", str(req.priority))
            return {"name": req.name}

        return self.ops.submit("build", req.name, work, journal={"method": req.method},
                               on_done=self._lifecycle_done(req.name,
                                                            wire.EVENT_GUEST_CREATED)).wire()

    def delete(self, name: str) -> wire.Operation:
        self._exists(name)

        def work(_p: Progress) -> None:
            guest.delete(self.paths, name)

        return self.ops.submit("delete", name, work, journal={},
                               on_done=self._lifecycle_done(name,
                                                            wire.EVENT_GUEST_DELETED)).wire()

    async def change_state(self, name: str, change: wire.StateChange) -> wire.Operation:
        self._exists(name)
        return self._submit_state(name, change.action, change.force, change.timeout).wire()

    def _submit_state(self, name: str, action: str, force: bool = False,
                      timeout: int | None = None) -> Operation:
        grace = 0 if force else timeout

        def start(_p: Progress) -> dict[str, Any]:
            st = guest.start(self.paths, name, output=guest_output(name))
            return {"context": st.context, "init_pid": st.init_pid}

        def stop(_p: Progress) -> dict[str, Any]:
            return {"was_running": guest.stop(self.paths, name, timeout=grace,
                                              output=guest_output(name))}

        def restart(p: Progress) -> dict[str, Any]:
            p(10, "stopping")
            guest.stop(self.paths, name, timeout=grace, output=guest_output(name))
            p(50, "starting")
            return start(p)

        work = {"start": start, "stop": stop, "restart": restart}[action]
        if action != "start":
            # Now, not when the stop gets there: an interactive shell ignores the
            # TERM a stop sends, and would hold the stop for its whole grace time.
            self.consoles.end_guest(name)
        event = {"start": wire.EVENT_GUEST_STARTED, "stop": wire.EVENT_GUEST_STOPPED,
                 "restart": wire.EVENT_GUEST_RESTARTED}[action]
        lifecycle = self._lifecycle_done(name, event)

        def done(op: Operation) -> None:
            self._after_state_change(name)
            lifecycle(op)

        return self.ops.submit(action, name, work, journal={"force": force}, on_done=done)

    def _after_state_change(self, name: str) -> None:
        """Watch the guest's new PID 1, or stop watching the old one."""
        st = guest.read_state(self.paths, name)
        if st is not None and guest.running(self.paths, name):
            self._watch(name, st)
            self.loop.create_task(self.reboot.watch(name))
        else:
            self._unwatch(name)
            self.loop.create_task(self.reboot.unwatch(name))

    async def exec(self, name: str, req: wire.ExecRequest) -> wire.Operation:
        self._exists(name)

        def work(_p: Progress) -> dict[str, Any]:
            buf = bytearray()
            truncated = False

            def output(data: bytes) -> None:
                nonlocal truncated
                room = EXEC_OUTPUT_MAX - len(buf)
                if len(data) > room:
                    truncated = True
                buf.extend(data[:max(room, 0)])

            code = guest.exec_in(self.paths, name, list(req.command), user=req.user,
                                 output=output, timeout=req.timeout)
            return wire.ExecResult(exit_code=code, output=buf.decode(errors="replace"),
                                   truncated=truncated).to_json()

        # Not serialised behind the guest's other operations: an exec does
        # not change the guest, and a long one must not hold up a stop.
        return self.ops.submit("exec", name, work, serialize=False).wire()

    # --- reset to the template, archive of a path ---

    async def reset(self, name: str, req: wire.ResetRequest) -> wire.Operation:
        """Empty a stopped template guest's own layer but for REQ.keep (guest.reset)."""
        self._exists(name)
        await self._in_thread(self._check_resettable, name)

        def work(progress: Progress) -> dict[str, Any]:
            progress(10, "emptying the guest's own layer")
            return guest.reset(self.paths, name, req.keep).as_dict()

        return self.ops.submit("reset", name, work, journal={"keep": list(req.keep)},
                               on_done=self._lifecycle_done(name, wire.EVENT_GUEST_RESET)
                               ).wire()

    def _check_resettable(self, name: str) -> None:
        """The clear refusals, before an operation is queued (it checks again, locked)."""
        try:
            s = self._settings(name)
        except (confmod.ConfigError, OSError) as e:
            raise ApiError(409, f"{name}.conf cannot be read: {e}", "name") from e
        if templates.template_of(s.build_method) is None \
                or not templates.is_unified(self.paths, name):
            raise ApiError(409, f"{name} was not built on a template: reset needs a template "
                           "guest", "name")
        state = self._state_of(name)
        if state != wire.STATE_STOPPED:
            raise ApiError(409, f"{name} is {state}: stop it before a reset", "name")

    async def archive(self, name: str, req: wire.ArchiveRequest
                      ) -> tuple[ArchiveStream, Operation]:
        """Start tar inside NAME for REQ.path; its bytes come through the stream.

        Hold archive_slots while it runs. Not serialised behind the guest's other
        operations (a read, like an exec): a stop kills the tar with the rest.
        """
        self._exists(name)
        await self._in_thread(self._check_archivable, name)
        stream = ArchiveStream(self.loop, req.max_bytes)

        def work(_p: Progress) -> dict[str, Any]:
            return stream.run(functools.partial(guest.exec_in, self.paths, name), req.path)

        op = self.ops.submit("archive", name, work, serialize=False)
        if op.task is not None:
            op.task.add_done_callback(lambda _t: stream.close())
        return stream, op

    def _check_archivable(self, name: str) -> None:
        try:
            s = self._settings(name)
        except (confmod.ConfigError, OSError) as e:
            raise ApiError(409, f"{name}.conf cannot be read: {e}", "name") from e
        if "private" in s.flags:
            raise ApiError(409, f"{name} has the 'private' flag: the host may not read "
                           "files inside it", "name")
        if not guest.running(self.paths, name):
            raise ApiError(409, f"{name} is not running: an archive is made by tar inside "
                           "the guest", "name")

    # --- consoles ---

    async def open_console(self, name: str, req: wire.ConsoleRequest) -> wire.ConsoleInfo:
        self._exists(name)
        return await self.consoles.open(name, req)

    def _open_console(self, name: str, user: str | None, cols: int,
                      rows: int) -> Console:
        return guest.open_console(self.paths, name, user=user, cols=cols, rows=rows)

    def _console_event(self, action: str, name: str, **metadata: Any) -> None:
        self.bus.publish(wire.TYPE_LIFECYCLE, action, name, state=self._state_of(name),
                         **metadata)

    def create_template(self, req: wire.TemplateCreate) -> wire.Operation:
        source = req.source
        if req.method == "rootfs":
            source = str(rootfs_dir(self.paths) / req.source)

        def work(progress: Progress) -> dict[str, Any]:
            progress(5, "building the template")
            templates.create(self.paths, req.name, req.method, source,
                             log=lambda m: progress(50, m))
            return {"name": req.name}

        return self.ops.submit("template-create", f"template:{req.name}", work,
                               journal={"template": req.name}).wire()

    async def delete_template(self, name: str) -> None:
        try:
            await self._in_thread(templates.delete, self.paths, name)
        except templates.TemplateError as e:
            status = 404 if str(e).startswith("no template") else 409
            raise ApiError(status, str(e), "name") from e

    def _onboot(self, progress: Progress) -> dict[str, Any]:
        """Start the ONBOOT guests, in PRIORITY order, with retries."""
        loop = self.loop

        def report(o: onboot.Outcome) -> None:
            def publish() -> None:
                if o.ok and not o.skipped:
                    self._after_state_change(o.name)
                    self.bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_STARTED, o.name,
                                     state=wire.STATE_RUNNING, onboot=True,
                                     attempts=o.attempts)
                elif not o.ok:
                    self.bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_ONBOOT_FAILED, o.name,
                                     state=wire.STATE_STOPPED, attempts=o.attempts,
                                     error=o.error)
            loop.call_soon_threadsafe(publish)

        # Once per host boot: an agent restarted later must not start again
        # the guests an admin has stopped since ($VSERVER_RUNDIR is a tmpfs
        # on a real host, but the boot id makes it so wherever it lives).
        marker = self.paths.rundir / "onboot.boot_id"
        boot = boot_id()
        with contextlib.suppress(OSError):
            if marker.read_text().strip() == boot:
                return {"skipped": "the ONBOOT guests were started once since this host booted"}
        outcomes = onboot.start_onboot(self.paths, report=report)
        marker.write_text(boot + "\n")
        failed = [o for o in outcomes if not o.ok]
        result = {"started": [o.name for o in outcomes if o.ok and not o.skipped],
                  "failed": {o.name: o.error for o in failed}}
        if failed:
            raise RuntimeError("ONBOOT guests failed to start: "
                               + "; ".join(f"{o.name}: {o.error}" for o in failed))
        return result


def boot_id() -> str:
    """The kernel's id of this boot (a new one at every host boot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def guest_output(name: str) -> Callable[[bytes], None]:
    """Where a guest's runlevel scripts write while it starts or stops: the agent's log."""
    log = logging.getLogger(f"hostagent.guest.{name}")

    def write(data: bytes) -> None:
        for line in data.decode(errors="replace").splitlines():
            if line.strip():
                log.info("%s", line.rstrip()[:500])
    return write


def rootfs_dir(paths: Paths) -> Path:
    """Where the API's rootfs sources live: images and trees put there by the admin."""
    return paths.rootdir / ".rootfs"


def _template_json(t: templates.TemplateInfo) -> dict[str, Any]:
    import dataclasses

    d = dataclasses.asdict(t)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _field_of(message: str, values: Any) -> str:
    for key in values:
        if key in message:
            return str(key)
    return "values"


def _as_api_error(op: Operation) -> ApiError:
    if isinstance(op.exc, ApiError):
        return op.exc
    return ApiError(409 if "is running" in (op.error or "") else 400,
                    op.error or "failed", "values")


async def serve(paths: Paths, socket_path: Path | None = None, group: str = DEFAULT_GROUP,
                run_onboot: bool = True) -> None:
    """Run the agent until SIGTERM or SIGINT; guests keep running after it."""
    agent = Agent(paths, socket_path, group, run_onboot=run_onboot)
    await agent.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    await stop.wait()
    _LOG.info("agent stopping after %.0f s; guests keep running", time.monotonic() - started)
    await agent.close()
