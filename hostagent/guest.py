"""A guest's life: build, start, stop, enter, status, delete.

This is the library behind the `vserver` command (and, later, the agent
daemon): every function takes the Paths it works in, holds the guest's lock
for its whole duration, and leaves the host as it found it when it fails.

Runtime state of a running guest is one file, RUNDIR/NAME.ctx, in the seed's
own spirit (it saved S_CONTEXT there): the context id, the host pid of the
guest's PID 1 and that process's start time (so a recycled pid is never
mistaken for the guest), and the cgroup. Nothing else is needed to find,
enter or stop a guest, so any process (the CLI now, the agent later, or an
agent restarted after a crash) can pick a running guest up again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import os
import resource
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hostagent import caps as capmod
from hostagent import conf as confmod
from hostagent import (
    context,
    idmap,
    limits,
    procfs,
    projquota,
    quota,
    rebootmgr,
    seccomp,
    syscalls,
    templates,
)
from hostagent.cgroup import Cgroup, cgroup_base, cgroup_of, tracking_hierarchy
from hostagent.contexts import ContextInUse, ContextRegistry, ContextsExhausted
from hostagent.names import check_name
from hostagent.paths import Paths
from hostagent.ulimit import Limit

if TYPE_CHECKING:
    from hostagent import netns

__all__ = [
    "Console",
    "GuestError",
    "Output",
    "RunState",
    "build",
    "delete",
    "exec_in",
    "open_console",
    "running",
    "service",
    "start",
    "status",
    "stop",
]

_SVC_RE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@+-")


Output = Callable[[bytes], None] | None


class GuestError(RuntimeError):
    """An operation on a guest failed; the message is meant for the user."""


@dataclass(frozen=True)
class RunState:
    name: str
    context: int
    init_pid: int
    init_start: int  # field 22 of /proc/PID/stat: start time in clock ticks
    started: float  # time.time() at start
    cgroup: str  # relative path in the tracking hierarchy
    namespaces: int
    host_if: str = ""  # the host end of its veth pair, if it has addresses
    proxy6: tuple[tuple[str, str], ...] = ()  # (uplink, address) proxy NDP entries to remove
    # The id range it runs with (IDMAP): first host id, None for guest root = host root.
    idmap_base: int | None = None

    def dump(self) -> str:
        proxy6 = ",".join(f"{dev}/{addr}" for dev, addr in self.proxy6)
        base = "" if self.idmap_base is None else self.idmap_base
        return (
            f"S_CONTEXT={self.context}\nINIT_PID={self.init_pid}\nINIT_START={self.init_start}\n"
            f"STARTED={self.started:.3f}\nCGROUP={self.cgroup}\nNAMESPACES={self.namespaces}\n"
            f"HOST_IF={self.host_if}\nPROXY6={proxy6}\nIDMAP_BASE={base}\n"
        )

    @classmethod
    def parse(cls, name: str, text: str) -> RunState:
        kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        return cls(
            name=name,
            context=int(kv["S_CONTEXT"]),
            init_pid=int(kv["INIT_PID"]),
            init_start=int(kv["INIT_START"]),
            started=float(kv["STARTED"]),
            cgroup=kv["CGROUP"],
            namespaces=int(kv.get("NAMESPACES", context.GUEST_NAMESPACES)),
            host_if=kv.get("HOST_IF", ""),
            proxy6=tuple(
                (dev, addr) for dev, _, addr in
                (item.partition("/") for item in kv.get("PROXY6", "").split(",") if item)
            ),
            idmap_base=int(kv["IDMAP_BASE"]) if kv.get("IDMAP_BASE") else None,
        )


# --- helpers ----------------------------------------------------------------

@contextlib.contextmanager
def _locked(paths: Paths, name: str) -> Iterator[None]:
    """One operation per guest at a time, across processes."""
    paths.ensure()
    fd = os.open(paths.lock(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_settings(paths: Paths, name: str) -> confmod.GuestSettings:
    path = paths.conf(name)
    if not path.exists():
        raise GuestError(f"{name}: no such vserver ({path} does not exist)")
    try:
        return confmod.settings_from_file(path)
    except (confmod.ConfigError, OSError) as e:
        raise GuestError(str(e)) from e


def read_state(paths: Paths, name: str) -> RunState | None:
    try:
        text = paths.state(name).read_text()
    except FileNotFoundError:
        return None
    try:
        return RunState.parse(name, text)
    except (KeyError, ValueError):
        return None


def _alive(st: RunState) -> bool:
    """Is ST's PID 1 still the very process we started, in its cgroup?"""
    if procfs.start_time(st.init_pid) != st.init_start:
        return False
    return cgroup_of(st.init_pid, tracking_hierarchy()) == st.cgroup


def running(paths: Paths, name: str) -> bool:
    check_name(name)
    st = read_state(paths, name)
    return st is not None and _alive(st)


def used_contexts(paths: Paths) -> set[int]:
    """Context numbers of the running guests."""
    used = set()
    for other in paths.guest_names():
        st = read_state(paths, other)
        if st is not None and _alive(st):
            used.add(st.context)
    return used


def find_guest_by_context(paths: Paths, ctx: int) -> str | None:
    """The running guest whose context number is CTX, if any."""
    for name in paths.guest_names():
        st = read_state(paths, name)
        if st is not None and st.context == ctx and _alive(st):
            return name
    return None


# hostagent.netns (and pyroute2 with it, 15 MB) is imported only where a guest
# has addresses: every fork from a bigger process costs more (page tables),
# and exec and enter fork twice.

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def addresses_of_other_guests(paths: Paths, name: str) -> dict[IPAddress, str]:
    """Every IPROOT address another guest's NAME.conf names, with that guest's name."""
    held: dict[IPAddress, str] = {}
    for other in paths.guest_names():
        if other == name:
            continue
        try:
            s = confmod.settings_from_file(paths.conf(other))
        except (confmod.ConfigError, OSError):
            continue
        for token in s.iproot:
            held[confmod.parse_ip_token(token).address] = other
    return held


def _check_addresses_free(paths: Paths, name: str, tokens: Sequence[str]) -> None:
    wanted = [confmod.parse_ip_token(t).address for t in tokens]
    if not wanted:
        return
    from hostagent import netns

    with netns.IPRoute() as ipr:
        try:
            netns.check_free(wanted, addresses_of_other_guests(paths, name), ipr)
        except netns.NetworkError as e:
            raise GuestError(f"{name}: {e}") from e


def spec_for(paths: Paths, name: str, s: confmod.GuestSettings,
             cgroup: Cgroup | None) -> context.ContextSpec:
    pol = seccomp.SeccompPolicy()
    if "lock" in s.flags:
        pol = pol.with_lock()
    ulimits = tuple(s.ulimits)
    if s.nofile is not None:
        ulimits += (Limit(resource.RLIMIT_NOFILE, s.nofile, s.nofile),)
    join: tuple[str, ...] = ()
    if cgroup is not None:
        join = limits.GuestCgroups(
            cgroup.relpath, limits.limits_from_settings(s).controllers()).join_files()
    # Until its addresses are configured a guest has a network of its own
    # with only lo; IPROOT="ALL" (or 0.0.0.0) is the seed's unrestricted
    # guest, which shares the host's network.
    namespaces = context.GUEST_NAMESPACES | (
        0 if s.iproot_unrestricted else syscalls.CLONE_NEWNET)
    return context.ContextSpec(
        root=paths.root(name),
        caps=_with_sys_boot(s, namespaces, pol),
        hostname=s.hostname or name,
        domainname=s.domainname,
        nice=s.nice,
        ulimits=ulimits,
        join_cgroups=join,
        seccomp=pol,
        cgroup=cgroup,
        fakeinit="fakeinit" in s.flags,
        hideinfo="hideinfo" in s.flags,
        namespaces=namespaces,
        reboot_dir=rebootmgr.prepare(paths, name),
        idmap_base=s.idmap_base,
    )


def _with_sys_boot(s: confmod.GuestSettings, namespaces: int,
                   pol: seccomp.SeccompPolicy) -> frozenset[int]:
    """The guest's ceiling plus CAP_SYS_BOOT, where that cannot reach the host.

    reference/security.md lists SYS_BOOT as never-grant: on the host it
    reboots the machine. In a PID namespace of its own reboot(2) only kills
    the guest's PID 1, with an exit status that says restart or halt
    (rebootmgr.classify_exit), and the capability's one other use, kexec,
    is refused by the guest's seccomp filter. So a guest's own `reboot -f`,
    and systemd's or sysvinit's last step, work as on a machine.
    sys_boot_allowed checks both conditions here, at the one place the grant
    is made; "!CAP_SYS_BOOT" in S_CAPS keeps it out.
    """
    sys_boot = capmod.CAPS["CAP_SYS_BOOT"]
    refused = any(w.startswith("!") and capmod.cap_number(w[1:]) == sys_boot
                  for w in s.caps_spec)
    if refused or not rebootmgr.sys_boot_allowed(namespaces, pol):
        return s.caps
    return s.caps | {sys_boot}


def _run_hook(paths: Paths, name: str, point: str) -> None:
    """The seed's NAME.sh, run on the host with pre-start|post-start|pre-stop|post-stop NAME."""
    hook = paths.hooks(name)
    if not hook.exists():
        return
    if not os.access(hook, os.X_OK):
        raise GuestError(f"{hook} exists but is not executable")
    try:
        res = subprocess.run([str(hook), point, name], capture_output=True, text=True,
                             check=False, timeout=300)
    except subprocess.TimeoutExpired as e:
        # run() has killed the hook; without this, callers saw a traceback.
        raise GuestError(f"{hook} {point} did not finish in {e.timeout:g} s and was killed") \
            from e
    except OSError as e:  # no #! line (ENOEXEC), a missing interpreter (ENOENT), ...
        raise GuestError(f"{hook} {point} could not run: {e.strerror}") from e
    if res.returncode != 0:
        raise GuestError(f"{hook} {point} failed ({res.returncode}): {res.stderr.strip()}")


# --- build and delete ---------------------------------------------------------

@dataclass(frozen=True)
class BuildOptions:
    method: str
    source: str | None = None
    hostname: str | None = None
    ips: Sequence[str] = ()
    caps: Sequence[str] = ()
    flags: Sequence[str] = ()
    nice: int | None = None
    ulimit: str | None = None
    onboot: bool = False
    context: int | None = None
    allow_unsafe_caps: bool = False
    description: str | None = None
    disk_limit: str | None = None  # a size; needs $VSERVER_ROOTDIR on btrfs, or disk_image
    disk_image: bool = False  # DISK_LIMIT_MODE="image"
    idmap: str = "none"  # IDMAP: isolated, shared or none (hostagent/idmap.py)


def build(paths: Paths, name: str, opts: BuildOptions,
          log: Callable[[str], None] = lambda _m: None) -> None:
    """vserver NAME build: validate everything, build the root, then write NAME.conf."""
    # Imported here: tarfile, zstandard and friends cost the other verbs ~40 ms.
    from hostagent import build as buildmod

    check_name(name)
    methods = (*buildmod.METHODS, templates.TEMPLATE_METHOD)
    if opts.method not in methods:
        raise GuestError(f"unknown build method {opts.method!r}; use one of "
                         + ", ".join(methods))
    if opts.method == templates.TEMPLATE_METHOD:
        if not opts.source:
            raise GuestError("build -m template needs the template's name")
        check_name(opts.source)
    if opts.idmap not in confmod.IDMAP_MODES:
        raise GuestError(f"unknown IDMAP {opts.idmap!r}; use one of "
                         + ", ".join(confmod.IDMAP_MODES))
    with _locked(paths, name):
        registry = idmap.RangeRegistry(paths)
        try:
            _build_locked(paths, name, opts, log, registry)
        finally:
            # NAME.conf records the range now, or the build failed.
            registry.release(name)


def _build_locked(paths: Paths, name: str, opts: BuildOptions, log: Callable[[str], None],
                  registry: idmap.RangeRegistry) -> None:
    from hostagent import build as buildmod

    conf_path, root = paths.conf(name), paths.root(name)
    if conf_path.exists() or root.exists() or os.path.lexists(root):
        raise GuestError(f"{name}: already exists ({conf_path} or {root})")
    try:
        base = None if opts.idmap == idmap.NONE else registry.allocate(name, opts.idmap)
    except idmap.IdmapError as e:
        raise GuestError(f"{name}: {e}") from e
    try:
        text = confmod.render_new(
            description=opts.description or "",
            hostname=opts.hostname or name,
            iproot=tuple(opts.ips),
            onboot=opts.onboot,
            context=opts.context,
            nice=opts.nice,
            caps=tuple(opts.caps),
            caps_unsafe=opts.allow_unsafe_caps,
            # The seed's template had "lock nproc"; nproc is the limits
            # issue's, so a new guest gets the part that works today.
            flags=tuple(opts.flags) if opts.flags else ("lock",),
            ulimit=opts.ulimit or "",
            build_method=opts.method + (f" {opts.source}" if opts.source else ""),
            limit_values=({"DISK_LIMIT": opts.disk_limit,
                           "DISK_LIMIT_MODE": "image" if opts.disk_image else ""}
                          if opts.disk_limit else None),
            idmap=opts.idmap,
            idmap_base=base,
        )
        settings = confmod.settings(confmod.GuestConf.parse(text, str(conf_path)))
    except (confmod.ConfigError, capmod.CapabilityError, ValueError) as e:
        raise GuestError(str(e)) from e
    _check_addresses_free(paths, name, opts.ips)
    by_image = settings.disk_limit is not None and settings.disk_limit_mode == "image"
    if by_image and opts.method == templates.TEMPLATE_METHOD:
        raise GuestError(f"{name}: a unified guest's disk limit is a btrfs qgroup or a project "
                         'quota; DISK_LIMIT_MODE="image" is for plain guests')
    project = None  # the project id of a DISK_LIMIT kept by project quota (projquota)
    if settings.disk_limit is not None and not by_image:
        how, why = quota.method(paths.rootdir)
        if why is not None:
            raise GuestError(f"{name}: DISK_LIMIT cannot be enforced: {why}; or set "
                             'DISK_LIMIT_MODE="image" for a fixed-size image of its own')
        if how == quota.PROJECT_QUOTA:
            try:
                text, project = projquota.for_build(paths, name, text)
            except (projquota.ProjQuotaError, confmod.ConfigError, OSError) as e:
                raise GuestError(f"{name}: DISK_LIMIT cannot be enforced: {e}") from e
    _sweep_stale_builds(paths, name)
    try:
        limited = settings.disk_limit is not None and not by_image
        qgroup = limited and project is None
        if opts.method == templates.TEMPLATE_METHOD:
            templates.build_guest(paths, name, opts.source or "", subvolume=qgroup,
                                  idmap_base=base)
            own = templates.overlay_dirs(paths, name)[0].parent
        else:
            buildmod.build_root(root, opts.method, opts.source, log=log)
            if base is not None:
                # Once, here: the tree becomes the range's, guest root's "/" included.
                idmap.shift_tree(root, 0, base, log)
            if qgroup:
                _into_subvolume(root)
            elif by_image and settings.disk_limit is not None:
                quota.move_into_image(root, quota.image_path(paths.rootdir, name),
                                      settings.disk_limit)
            own = root
        if project is not None:
            quota.assign_project(own, project)
        if limited:
            quota.set_limit(own, settings.disk_limit)
        checkpoint("build:tree")
    except (buildmod.BuildError, templates.TemplateError, quota.QuotaError, idmap.IdmapError,
            OSError) as e:
        with contextlib.suppress(Exception):
            _remove_tree(paths, name)
        raise GuestError(f"{name}: build failed: {e}") from e
    try:
        conf_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = conf_path.with_name(f".{conf_path.name}.new")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, conf_path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _remove_tree(paths, name)
        raise


def _remove_tree(paths: Paths, name: str) -> None:
    """A guest's files: its own layer and mount if unified, else its whole tree."""
    from hostagent import build as buildmod

    root = paths.root(name)
    image = quota.image_path(paths.rootdir, name)
    project = quota.project_of(projquota.own_dir(paths, name))
    if templates.is_unified(paths, name):
        templates.remove_guest(paths, name)
    elif quota.is_subvolume(root):
        quota.delete_subvolume(root)
    elif image.exists():
        if os.path.ismount(root):
            syscalls.umount2(root, syscalls.UMOUNT_NOFOLLOW)
        with contextlib.suppress(OSError):
            root.rmdir()
        image.unlink()
    else:
        buildmod.delete_root(root)
    if project is not None:
        # Its files are gone; its context number may be another guest's next
        # (docs/storage.md). A limit left behind binds no file, and the next
        # build with that id sets its own, so a failure here does not stop a delete.
        with contextlib.suppress(quota.QuotaError):
            quota.clear_project(paths.rootdir, project)


def _sweep_stale_builds(paths: Paths, name: str) -> None:
    """What a build killed half-way left (its temporary tree or image staging), removed
    by the next build of that name; we hold the guest's lock, so none is in use."""
    from hostagent import build as buildmod

    for p in paths.rootdir.glob(f".{name}.*"):
        if p.name.startswith((f".{name}.build-", f".{name}.image", f".{name}.subvol")):
            if os.path.ismount(p):
                syscalls.umount2(p, syscalls.MNT_DETACH)
            if quota.is_subvolume(p):
                quota.delete_subvolume(p)
            else:
                buildmod.delete_root(p)


def _into_subvolume(root: Path) -> None:
    """Move a freshly built tree into a btrfs subvolume of its own (reflinked: no copy)."""
    sub = root.with_name(f".{root.name}.subvol")
    quota.make_subvolume(sub)
    try:
        subprocess.run(["cp", "-a", "--reflink=always", f"{root}/.", str(sub)],
                       check=True, capture_output=True)
        os.chmod(sub, os.stat(root).st_mode & 0o7777)
        from hostagent import build as buildmod

        buildmod.delete_root(root)
        os.rename(sub, root)
    except BaseException:
        with contextlib.suppress(Exception):
            quota.delete_subvolume(sub)
        raise


def disk_of(paths: Paths, name: str) -> Path | None:
    """The tree that holds what the guest itself wrote, if it has a disk limit of its
    own: a btrfs subvolume, or a project id of its own (XFS or ext4)."""
    own = projquota.own_dir(paths, name)
    return own if quota.has_own_limit(own) else None


def delete(paths: Paths, name: str) -> None:
    """vserver NAME delete: remove the root tree, NAME.conf and runtime state."""
    from hostagent import build as buildmod

    check_name(name)
    with _locked(paths, name):
        if running(paths, name):
            raise GuestError(f"{name} is running; stop it first")
        conf_path, root = paths.conf(name), paths.root(name)
        if not conf_path.exists() and not root.exists() \
                and not templates.is_unified(paths, name) \
                and not quota.image_path(paths.rootdir, name).exists():
            raise GuestError(f"{name}: no such vserver")
        try:
            _remove_tree(paths, name)
        except (buildmod.BuildError, templates.TemplateError, OSError) as e:
            raise GuestError(str(e)) from e
        for p in (conf_path, paths.state(name)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        idmap.end_shift(paths, name)
    with contextlib.suppress(FileNotFoundError):
        paths.lock(name).unlink()


# --- start --------------------------------------------------------------------

# The seed's runlevel start: the first of these that the guest has.
_RC_CANDIDATES = (
    ("/etc/init.d/rc", "{level}"),
    ("/etc/rc.d/rc", "{level}"),
    ("/etc/rc.d/rc.M", None),
    ("/sbin/rc", "default"),
)
_RC_FALLBACK = (
    'for s in /etc/rc{level}.d/{kind}*; do [ -x "$s" ] && "$s" {action}; done; exit 0'
)


def _rc_argv(root: Path, level: int) -> list[str] | None:
    """The command that brings the guest to runlevel LEVEL, judged from outside.

    Only the existence of paths is read here (lexists, which follows nothing);
    the command itself runs inside the guest.
    """
    for path, arg in _RC_CANDIDATES:
        if os.path.lexists(root / path.lstrip("/")):
            if arg is None:
                return [path] if level else ["/etc/rc.d/rc.0"]
            return [path, arg.format(level=level) if arg != "default" else
                    ("default" if level else "shutdown")]
    if os.path.lexists(root / f"etc/rc{level}.d") and os.path.lexists(root / "bin/sh"):
        kind, action = ("S", "start") if level not in (0, 6) else ("K", "stop")
        return ["/bin/sh", "-c", _RC_FALLBACK.format(level=level, kind=kind, action=action)]
    return None


def start(paths: Paths, name: str, *, fail_at: str | None = None,
          output: Output = None) -> RunState:
    """vserver NAME start. Every step unwinds if a later one fails."""
    check_name(name)
    with _locked(paths, name):
        if running(paths, name):
            raise GuestError(f"{name} is already running")
        s = _load_settings(paths, name)
        _check_idmap(paths, name, s)
        root = paths.root(name)
        template = templates.template_of(s.build_method)
        image = quota.image_path(paths.rootdir, name)
        try:
            # After a host reboot the merged tree or the image is not mounted yet.
            if template is not None:
                templates.mount_guest(paths, name, template, s.idmap_base)
            elif image.exists():
                quota.mount_image(image, root)
        except (templates.TemplateError, quota.QuotaError, OSError) as e:
            raise GuestError(f"{name}: {e}") from e
        if not root.is_dir():
            raise GuestError(f"{name}: root {root} does not exist; build it first")
        registry = ContextRegistry(paths.rundir)
        try:
            ctx = registry.allocate(s.context, in_use=lambda: used_contexts(paths))
        except (ContextInUse, ContextsExhausted) as e:
            raise GuestError(f"{name}: {e}") from e
        with contextlib.ExitStack() as undo:
            # The reservation only covers the start: NAME.ctx holds the number after.
            undo.callback(registry.release, ctx)
            cg = Cgroup(f"{cgroup_base()}/{name}")
            if cg.exists():
                cg.kill()
                cg.wait_empty(5)
                cg.remove()
            cg.create()
            undo.callback(_destroy_cgroup, cg)
            lim = limits.limits_from_settings(s)
            gcg = limits.GuestCgroups(cg.relpath, lim.controllers())
            gcg.create()
            undo.callback(gcg.remove)
            applied = gcg.apply(lim)
            limits.save_applied(_limits_file(paths, name), applied)
            undo.callback(_unlink, _limits_file(paths, name))
            for a in applied:
                if not a.enforced:
                    _say(output, f"{name}: warning: {a.text()}\n")
            _run_hook(paths, name, "pre-start")
            spec = spec_for(paths, name, s, cg)
            undo.callback(rebootmgr.remove, paths, name)
            net = None
            configure = None
            if spec.namespaces & syscalls.CLONE_NEWNET and s.iproot:
                from hostagent import netns

                ipr = undo.enter_context(netns.IPRoute())
                net = _net_plan(paths, name, s, ipr)

                def configure(pidfd: int, pid: int, plan: netns.NetPlan = net) -> None:
                    netns.setup(plan, pidfd, pid, ipr)
            try:
                init_pid = context.launch_init(spec, fail_at=fail_at, configure=configure)
            except context.LaunchError as e:
                raise GuestError(f"{name}: start failed at {e}") from e
            if net is not None:
                undo.callback(netns.teardown, net.proxy6())
            checkpoint("start:launched")
            st = RunState(name, ctx, init_pid, procfs.start_time(init_pid) or 0, time.time(),
                          cg.relpath, spec.namespaces,
                          net.host_if if net else "", net.proxy6() if net else (),
                          spec.idmap_base)
            tmp = paths.state(name).with_suffix(".new")
            tmp.write_text(st.dump())
            os.replace(tmp, paths.state(name))
            undo.callback(_unlink, paths.state(name))
            checkpoint("start:recorded")
            if fail_at == "runlevel":
                raise GuestError(f"{name}: start failed at runlevel: injected failure")
            if not spec.fakeinit:
                argv = _rc_argv(root, 3)
                if argv is not None:
                    code = _enter(st, spec, context.EnterRequest(argv=argv), output=output)
                    if code != 0:
                        # The seed let a failing service script pass too: the
                        # guest is up, one of its services is not.
                        _say(output, f"{name}: runlevel start exited with {code}\n")
            _run_hook(paths, name, "post-start")
            undo.pop_all()
        registry.release(ctx)
        return st


def _check_idmap(paths: Paths, name: str, s: confmod.GuestSettings) -> None:
    """Refuse to start with files that are not the range's (an interrupted shift, a
    range never given) or with a range another guest holds."""
    pending = idmap.pending_shift(paths, name)
    if pending is not None:
        raise GuestError(f"{name}: a change of IDMAP to {pending.mode} was interrupted: run "
                         f"`vserver {name} set IDMAP {pending.mode}` to finish it")
    if s.idmap == idmap.NONE:
        return
    if s.idmap_base is None:
        raise GuestError(f"{name}: IDMAP={s.idmap} without an IDMAP_BASE: `vserver {name} set "
                         f"IDMAP {s.idmap}` gives it a range and shifts its files to it")
    try:
        idmap.RangeRegistry(paths).check(name, s.idmap, s.idmap_base)
    except idmap.IdmapError as e:
        raise GuestError(f"{name}: {e}") from e


def _net_plan(paths: Paths, name: str, s: confmod.GuestSettings,
              ipr: netns.IPRoute) -> netns.NetPlan:
    """The guest's addresses resolved on this host and checked free."""
    from hostagent import netns

    try:
        net = netns.plan(name, s, ipr)
        for other in paths.guest_names():
            ost = read_state(paths, other)
            if other != name and ost is not None and ost.host_if == net.host_if \
                    and _alive(ost):
                raise netns.NetworkError(
                    f"host device {net.host_if} is already vserver {other}'s")
        netns.check_free([a.ip for a in net.addresses],
                         addresses_of_other_guests(paths, name), ipr)
    except netns.NetworkError as e:
        raise GuestError(f"{name}: {e}") from e
    return net


def _limits_file(paths: Paths, name: str) -> Path:
    """What the last start or set made of the guest's limits (for status)."""
    return paths.rundir / f"{name}.limits"


def _say(output: Output, text: str) -> None:
    if output is not None:
        output(text.encode())


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def _destroy_cgroup(cg: Cgroup) -> None:
    cg.kill()
    if not cg.wait_empty(10):
        raise GuestError(f"processes of {cg.relpath} did not exit after SIGKILL")
    cg.remove()


# --- enter, exec ---------------------------------------------------------------

def _enter(st: RunState, spec: context.ContextSpec, req: context.EnterRequest,
           output: Output = None, timeout: float | None = None, errors: Output = None,
           cancel: int = -1) -> int:
    """Run REQ in the guest; with OUTPUT, its stdout+stderr go there, stdin is empty.

    With ERRORS as well, stderr goes there instead. CANCEL (with OUTPUT): an fd
    that becomes readable (a byte written to its pipe) to have the command killed.
    """
    pidfd = syscalls.pidfd_open(st.init_pid)
    try:
        if procfs.start_time(st.init_pid) != st.init_start:
            raise GuestError(f"{st.name} is not running")
        if output is None:
            return context.enter(pidfd, spec, req)
        r, w = os.pipe2(os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        open_fds = [r, w, null]
        er, ew = r, w
        if errors is not None:
            er, ew = os.pipe2(os.O_CLOEXEC)
            open_fds += [er, ew]

        def pump(pid: int) -> None:
            # Only the child may hold the write end, or the reader never sees EOF.
            for fd in {w, ew, null}:
                os.close(fd)
                open_fds.remove(fd)
            sinks = {r: output, er: errors or output}
            if cancel >= 0:
                sinks[cancel] = _cancelled
            context.copy_until_exit(pid, sinks, timeout=timeout)

        try:
            req = dataclasses.replace(req, stdio=(null, w, ew))
            return context.enter(pidfd, spec, req, on_child=pump)
        finally:
            for fd in open_fds:
                os.close(fd)
    finally:
        os.close(pidfd)


def _running_state(paths: Paths, name: str) -> tuple[RunState, confmod.GuestSettings]:
    check_name(name)
    s = _load_settings(paths, name)
    st = read_state(paths, name)
    if st is None or not _alive(st):
        raise GuestError(f"{name} is not running")
    return st, s


def _refuse_private(name: str, s: confmod.GuestSettings, what: str) -> None:
    if "private" in s.flags:
        raise GuestError(f"{name} has the 'private' flag: the host may not {what} it")


def exec_in(paths: Paths, name: str, argv: Sequence[str], *, user: str | None = None,
            tty: bool = False, output: Output = None, timeout: float | None = None,
            errors: Output = None, cancel: int = -1) -> int:
    """vserver NAME exec / suexec / enter: run ARGV inside, return its exit status.

    With OUTPUT and TIMEOUT, the command is killed after TIMEOUT seconds (exit 137).
    With OUTPUT and ERRORS, stdout goes to OUTPUT and stderr to ERRORS. With OUTPUT,
    OUTPUT or ERRORS raising context.StopCopy, or a byte arriving on the fd CANCEL,
    kills the command at once (exit 137).
    """
    if not argv:
        raise GuestError("no command given")
    st, s = _running_state(paths, name)
    _refuse_private(name, s, "enter or exec in")
    spec = spec_for(paths, name, s, Cgroup(st.cgroup))
    spec = dataclasses.replace(spec, namespaces=st.namespaces, idmap_base=st.idmap_base)
    req = context.EnterRequest(argv=list(argv), user=user, pty=tty)
    try:
        return _enter(st, spec, req, output=output, timeout=timeout, errors=errors,
                      cancel=cancel)
    except context.LaunchError as e:
        raise GuestError(f"{name}: {e}") from e


def _cancelled(_data: bytes) -> None:
    raise context.StopCopy


def _login_shell(root: Path) -> list[str]:
    """bash if the guest has it, else sh, as a login shell (judged from outside by
    lexists, which follows nothing; the shell itself runs inside)."""
    return ["/bin/bash" if os.path.lexists(root / "bin/bash") else "/bin/sh", "-l"]


def enter_shell(paths: Paths, name: str) -> int:
    """vserver NAME enter: a login shell inside, on a terminal of the guest's own."""
    return exec_in(paths, name, _login_shell(paths.root(name)), tty=os.isatty(0))


# What the panel's browser terminal (xterm.js) emulates.
CONSOLE_TERM = "xterm-256color"


class Console:
    """A login shell inside a running guest, on a terminal of the guest's own devpts.

    Made as `vserver NAME enter` makes its shell, but nobody relays it: the
    owner reads and writes MASTER_FD (non-blocking) in its own event loop.
    WAITER_FD, a pidfd of the helper that waits for the shell, becomes
    readable once the shell has ended; poll() then gives its exit status.
    PIDFD pins the shell for signals. Every descriptor is the owner's to end
    with close().
    """

    def __init__(self, guest: str, cgroup: str, term: context.Terminal) -> None:
        self.guest = guest
        self.master_fd = term.master
        self.pid = term.pid  # host pid of the shell, leader of its own session
        self.pidfd = term.pidfd
        self._cgroup = cgroup
        self._waiter = term.waiter
        # Our unreaped child: its pid cannot have been reused.
        self.waiter_fd = syscalls.pidfd_open(term.waiter)
        self.status: int | None = None
        self._killed = False

    def resize(self, cols: int, rows: int) -> None:
        """TIOCSWINSZ on the master: the kernel sends the shell's foreground job SIGWINCH."""
        fcntl.ioctl(self.master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def kill(self) -> None:
        """SIGKILL the shell and every process still in its session (its jobs and theirs).

        A process that left the session (setsid: a daemon started from the
        console) is not the console's and is left alone. Members are found in
        the guest's cgroup by their session id, the shell's host pid: that
        number cannot go to another process while any member still has it as
        its session id. Each is pinned with a pidfd before it is checked, so a
        signal never reaches a recycled pid. Repeated while a pass finds some,
        which catches children forked meanwhile.
        """
        self._killed = True
        with contextlib.suppress(OSError):  # it has ended already
            syscalls.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        for _ in range(10):
            found = 0
            for pid in Cgroup(self._cgroup).procs():
                try:
                    fd = syscalls.pidfd_open(pid)
                except OSError:
                    continue
                try:
                    if procfs.session_id(pid) == self.pid:
                        syscalls.pidfd_send_signal(fd, signal.SIGKILL)
                        found += 1
                except OSError:
                    pass
                finally:
                    os.close(fd)
            if not found:
                return

    def poll(self) -> int | None:
        """The shell's exit status once it has ended (128 + signal if killed), else None.

        Never blocks; reaps the helper, whose exit status is the shell's.
        """
        if self.status is None and self._waiter > 0:
            pid, status = os.waitpid(self._waiter, os.WNOHANG)
            if pid:
                self._waiter = 0
                self.status = (128 + os.WTERMSIG(status) if os.WIFSIGNALED(status)
                               else os.waitstatus_to_exitcode(status))
        return self.status

    def close_master(self) -> None:
        """Let go of the terminal: the kernel hangs it up when no one else holds it."""
        if self.master_fd >= 0:
            os.close(self.master_fd)
            self.master_fd = -1

    def close(self) -> int | None:
        """End the console: kill what is left of it (unless kill() did), close every
        descriptor, reap the helper.

        The wait for the helper is short once the shell is killed, but a shell
        stuck in an uninterruptible sleep would hold it: an event loop calls
        kill() first and close() only once WAITER_FD is readable.
        """
        if not self._killed:
            self.kill()
        self.close_master()
        if self._waiter > 0:
            _, status = os.waitpid(self._waiter, 0)
            self._waiter = 0
            self.status = (128 + os.WTERMSIG(status) if os.WIFSIGNALED(status)
                           else os.waitstatus_to_exitcode(status))
        for attr in ("pidfd", "waiter_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        return self.status


def open_console(paths: Paths, name: str, *, user: str | None = None, cols: int = 80,
                 rows: int = 24) -> Console:
    """A login shell in running guest NAME on a COLS x ROWS terminal of the guest's own.

    The terminal comes from the guest's devpts, never a host tty, as for
    `vserver NAME enter`; the shell is the same one, with TERM set for a
    browser terminal. Refused for a stopped guest and a private one.
    """
    st, s = _running_state(paths, name)
    _refuse_private(name, s, "open a console in")
    spec = spec_for(paths, name, s, Cgroup(st.cgroup))
    spec = dataclasses.replace(spec, namespaces=st.namespaces, idmap_base=st.idmap_base)
    req = context.EnterRequest(argv=_login_shell(paths.root(name)), user=user, pty=True,
                               winsize=(rows, cols), env={"TERM": CONSOLE_TERM})
    pidfd = syscalls.pidfd_open(st.init_pid)
    try:
        if procfs.start_time(st.init_pid) != st.init_start:
            raise GuestError(f"{name} is not running")
        term = context.open_terminal(pidfd, spec, req)
    except context.LaunchError as e:
        raise GuestError(f"{name}: {e}") from e
    finally:
        os.close(pidfd)
    try:
        return Console(name, st.cgroup, term)
    except BaseException:  # no descriptor left for the helper's pidfd (EMFILE)
        with contextlib.suppress(OSError):
            syscalls.pidfd_send_signal(term.pidfd, signal.SIGKILL)
        for fd in (term.master, term.pidfd):
            os.close(fd)
        os.waitpid(term.waiter, 0)
        raise


def service(paths: Paths, name: str, svc: str, action: str,
            output: Output = None) -> int:
    """vserver NAME service SVC ACTION: the guest's own init script."""
    if not svc or not set(svc) <= _SVC_RE_CHARS or svc.startswith("."):
        raise GuestError(f"invalid service name {svc!r}")
    if not action or not set(action) <= _SVC_RE_CHARS or action.startswith("-"):
        raise GuestError(f"invalid service action {action!r}")
    return exec_in(paths, name, [f"/etc/init.d/{svc}", action], output=output)


# --- stop -------------------------------------------------------------------

def _signal_all_but_init(st: RunState, sig: int) -> int:
    """Signal every process of the guest except its PID 1; return how many."""
    n = 0
    for pid in Cgroup(st.cgroup).procs():
        if pid == st.init_pid:
            continue
        try:
            fd = syscalls.pidfd_open(pid)
        except OSError:
            continue
        try:
            # The pidfd pins the process: if it is still in the guest's cgroup
            # now, the signal cannot reach a recycled pid.
            if cgroup_of(pid, tracking_hierarchy()) == st.cgroup:
                syscalls.pidfd_send_signal(fd, sig)
                n += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return n


def _wait_only_init(st: RunState, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        procs = [p for p in Cgroup(st.cgroup).procs() if p != st.init_pid]
        if not procs or not _alive(st):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def stop(paths: Paths, name: str, *, timeout: float | None = None,
         output: Output = None) -> bool:
    """vserver NAME stop. Return False if it was not running.

    As in the seed: the guest's own shutdown (runlevel 0, or its init told to
    power off), then TERM to what is left, then KILL after the grace period,
    until nothing of the guest remains.
    """
    check_name(name)
    with _locked(paths, name):
        st = read_state(paths, name)
        if st is None or not _alive(st):
            _cleanup_stale(paths, name, st)
            return False
        s = _load_settings(paths, name)
        grace = float(s.stop_timeout if timeout is None else timeout)
        _run_hook(paths, name, "pre-stop")
        spec = spec_for(paths, name, s, Cgroup(st.cgroup))
        spec = dataclasses.replace(spec, namespaces=st.namespaces, idmap_base=st.idmap_base)
        try:
            if grace > 0:
                _shutdown(paths, name, st, spec, grace, output)
                if not _wait_only_init(st, grace):
                    _signal_all_but_init(st, signal.SIGTERM)
                    _wait_only_init(st, grace)
        finally:
            _kill_guest(st)
            _remove_proxy6(st.proxy6)
            _unlink(paths.state(name))
            _unlink(_limits_file(paths, name))
            rebootmgr.remove(paths, name)
        _run_hook(paths, name, "post-stop")
        return True


def _shutdown(paths: Paths, name: str, st: RunState, spec: context.ContextSpec,
              grace: float, output: Output) -> None:
    root = paths.root(name)
    if spec.fakeinit:
        for cmd in ("/sbin/poweroff", "/sbin/halt"):
            if os.path.lexists(root / cmd.lstrip("/")):
                with contextlib.suppress(context.LaunchError, GuestError):
                    _enter(st, spec, context.EnterRequest(argv=[cmd]), output=output or _drop)
                return
        with contextlib.suppress(OSError):
            fd = syscalls.pidfd_open(st.init_pid)
            try:
                syscalls.pidfd_send_signal(fd, signal.SIGTERM)
            finally:
                os.close(fd)
        return
    argv = _rc_argv(root, 0)
    if argv is not None:
        with contextlib.suppress(context.LaunchError, GuestError):
            _enter(st, spec, context.EnterRequest(argv=argv), output=output or _drop)


def _drop(_data: bytes) -> None:
    return None


def _kill_guest(st: RunState) -> None:
    """KILL PID 1 (the kernel then kills its whole PID namespace) and the cgroup."""
    with contextlib.suppress(OSError):
        fd = syscalls.pidfd_open(st.init_pid)
        try:
            if procfs.start_time(st.init_pid) == st.init_start:
                syscalls.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
    _destroy_cgroup(Cgroup(st.cgroup))
    limits.GuestCgroups(st.cgroup, limits.ALL_CONTROLLERS).remove()
    _reap(st)


def _remove_proxy6(entries: Iterable[tuple[str, str]]) -> None:
    entries = tuple(entries)
    if entries:
        from hostagent import netns

        netns.teardown(entries)


def _reap(st: RunState) -> None:
    """Collect PID 1 if this process started the guest (it is then our child).

    Called only once PID 1 has been killed or has died, so the wait is short;
    for a guest some other process started, waitpid fails at once.
    """
    with contextlib.suppress(ChildProcessError):
        os.waitpid(st.init_pid, 0)


def _cleanup_stale(paths: Paths, name: str, st: RunState | None) -> None:
    """A guest that died on its own leaves a state file and maybe an empty cgroup."""
    cg = Cgroup(st.cgroup) if st else Cgroup(f"{cgroup_base()}/{name}")
    if cg.exists():
        _destroy_cgroup(cg)
    limits.GuestCgroups(cg.relpath, limits.ALL_CONTROLLERS).remove()
    _unlink(_limits_file(paths, name))
    if st is not None:
        _reap(st)
        _remove_proxy6(st.proxy6)
    _unlink(paths.state(name))
    rebootmgr.remove(paths, name)


# --- set ----------------------------------------------------------------------

def set_key(paths: Paths, name: str, key: str, value: str) -> list[str]:
    """vserver NAME set KEY VALUE: rewrite NAME.conf and apply it to the running guest.

    Returns what happened, a line per limit. Keys that only a start can apply
    (names, addresses, capabilities) are written and said to wait for it.
    """
    check_name(name)
    if not key or not key.replace("_", "").isalnum() or not key.isupper():
        raise GuestError(f"invalid key {key!r}: NAME.conf keys are upper case, like MEMORY_LIMIT")
    if key == "IDMAP_BASE":
        raise GuestError("IDMAP_BASE is the agent's record of the guest's id range; "
                         "set IDMAP instead (isolated, shared or none)")
    with _locked(paths, name):
        path = paths.conf(name)
        if not path.exists():
            raise GuestError(f"{name}: no such vserver ({path} does not exist)")
        if key in ("S_CONTEXT", "IDMAP") and \
                (project := quota.project_of(projquota.own_dir(paths, name))) is not None:
            # A DISK_LIMIT kept by project quota: its id is the context id, and only
            # a guest in a user namespace cannot change its files' id (projquota).
            if key == "S_CONTEXT" and value != str(project):
                raise GuestError(f"{name}'s S_CONTEXT {project} is the project id of its "
                                 "DISK_LIMIT (a project quota): it cannot change")
            if key == "IDMAP" and (value or idmap.NONE) == idmap.NONE:
                raise GuestError(f"{name}'s DISK_LIMIT is a project quota, which does not hold "
                                 'root of an IDMAP="none" guest (host root)')
        if key == "IDMAP":
            return [_change_idmap(paths, name, value or idmap.NONE)]
        try:
            conf = confmod.GuestConf.load(path)
            if value:
                conf.set(key, value)
            else:
                conf.unset(key)
            s = confmod.settings(conf)
            conf.save(path)
        except (confmod.ConfigError, ValueError) as e:
            raise GuestError(str(e)) from e
        if key in ("DISK_LIMIT", "DISK_LIMIT_MODE") and \
                quota.image_path(paths.rootdir, name).exists():
            raise GuestError(f"{name}'s disk is a fixed-size image: its size is set at build")
        if key == "DISK_LIMIT":
            own = disk_of(paths, name)
            if own is None:
                raise GuestError(f"{name} was built without DISK_LIMIT: its files are not in a "
                                 "subvolume of their own; rebuild it with one")
            try:
                how = quota.set_limit(own, s.disk_limit)
            except quota.QuotaError as e:
                raise GuestError(str(e)) from e
            return [f"DISK_LIMIT={value or 'none'}: enforced ({how})"]
        st = read_state(paths, name)
        if st is None or not _alive(st):
            return [f"{key} saved; {name} is not running"]
        previous = limits.load_applied(_limits_file(paths, name))
        if key == "NOFILE":
            nofile = limits.set_nofile(st.cgroup, *limits.nofile_from_settings(s))
            limits.save_applied(_limits_file(paths, name),
                                [a for a in previous if a.key != "NOFILE"] + [nofile])
            return [nofile.text()]
        if key not in limits.LIVE_KEYS and not (key == "S_FLAGS" or key == "ULIMIT"):
            return [f"{key} saved; it takes effect at the next start of {name}"]
        lim = limits.limits_from_settings(s)
        gcg = limits.GuestCgroups(st.cgroup, lim.controllers())
        gcg.create()
        gcg.adopt(Cgroup(st.cgroup).procs())
        applied = gcg.apply(lim)
        lift = {key} if key in limits.LIVE_KEYS and not value else set()
        if key in ("S_FLAGS", "ULIMIT"):
            # Dropping `nproc` (or ULIMIT's -u) or `sched` lifts what it imposed.
            lift |= {"PIDS_MAX", "CPU_WEIGHT"}
        for k in sorted(lift):
            if not lim.holds(k):  # PIDS_MAX emptied under `nproc` keeps nproc's limit
                lifted = gcg.clear(k)
                if k == key or not lifted.enforced or limits.was_set(previous, k):
                    applied.append(lifted)
        limits.save_applied(_limits_file(paths, name),
                            applied + [a for a in previous if a.key == "NOFILE"])
        return [a.text() for a in applied] or [f"{key} saved and applied"]


def _change_idmap(paths: Paths, name: str, mode: str) -> str:
    """IDMAP=MODE for stopped guest NAME: its files shifted once to the new range.

    The bases go to a file beside NAME.conf before a file is touched, so an
    interrupted shift is finished by the next try (the shift is idempotent),
    and the start refuses a guest with one pending.
    """
    if mode not in confmod.IDMAP_MODES:
        raise GuestError(f"IDMAP: {mode!r} is not one of " + ", ".join(confmod.IDMAP_MODES))
    st = read_state(paths, name)
    if st is not None and _alive(st):
        raise GuestError(f"{name} is running: stop it before changing IDMAP (the owner of "
                         "every file of the guest changes with it)")
    s = _load_settings(paths, name)
    pending = idmap.pending_shift(paths, name)
    if pending is not None:
        _shift_guest(paths, name, s, pending)
        s = _load_settings(paths, name)
    current = s.idmap_base or 0  # where the files are: 0 is the host's own ids
    if mode == s.idmap and (mode == idmap.NONE or s.idmap_base is not None):
        return f"IDMAP={mode}: unchanged"
    registry = idmap.RangeRegistry(paths)
    try:
        new = 0 if mode == idmap.NONE else registry.allocate(name, mode)
        shift = idmap.Shift(current, new, mode)
        idmap.begin_shift(paths, name, shift)  # records NEW: the reservation may go
    except (idmap.IdmapError, OSError) as e:
        raise GuestError(f"{name}: {e}") from e
    finally:
        registry.release(name)
    _shift_guest(paths, name, s, shift)
    if not new:
        return f"IDMAP=none: {name}'s files are owned by host ids again; guest root is host root"
    return (f"IDMAP={mode}: {name}'s files now belong to host ids {new}..{new + idmap.RANGE - 1}"
            " (guest ids 0..65535)")


def _shift_guest(paths: Paths, name: str, s: confmod.GuestSettings, shift: idmap.Shift) -> None:
    """Shift NAME's own files (a unified guest's upper layer: the template is
    idmapped instead) per SHIFT, then record the new range in NAME.conf."""
    template = templates.template_of(s.build_method)
    root = paths.root(name)
    image = quota.image_path(paths.rootdir, name)
    try:
        if template is not None:
            templates.unmount_guest(paths, name)
            idmap.shift_tree(templates.overlay_dirs(paths, name)[0], shift.old, shift.new)
            templates.mount_guest(paths, name, template, shift.new or None)
        else:
            if image.exists():
                quota.mount_image(image, root)
            idmap.shift_tree(root, shift.old, shift.new)
        conf = confmod.GuestConf.load(paths.conf(name))
        conf.set("IDMAP", shift.mode)
        if shift.new:
            conf.set("IDMAP_BASE", str(shift.new))
        else:
            conf.unset("IDMAP_BASE")
        confmod.settings(conf)
        conf.save(paths.conf(name))
    except (templates.TemplateError, quota.QuotaError, idmap.IdmapError, confmod.ConfigError,
            OSError) as e:
        raise GuestError(f"{name}: changing IDMAP to {shift.mode} stopped half-way ({e}); "
                         f"`vserver {name} set IDMAP {shift.mode}` finishes it") from e
    idmap.end_shift(paths, name)


# --- status -------------------------------------------------------------------

# Flags NAME.conf accepts whose enforcement comes with the resource-limits
# work: `status` names them rather than let them look active.
NOT_YET_ENFORCED = frozenset({"ulimit"})


@dataclass(frozen=True)
class Status:
    name: str
    running: bool
    context: int | None = None
    processes: int = 0
    uptime: float = 0.0
    init_pid: int | None = None
    unenforced: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    shared_network: bool = False  # IPROOT="ALL": the seed's unrestricted guest
    limits: tuple[str, ...] = ()  # each limit, and whether and how it is enforced
    disk: str | None = None  # "used of limit", where the guest has its own subvolume
    idmap: str | None = None  # its id range, if it has one (IDMAP)

    def text(self) -> str:
        if not self.running:
            return f"Vserver '{self.name}' is stopped"
        lines = [
            f"Vserver '{self.name}' is running",
            f"Context: {self.context}",
            f"Number of processes: {self.processes}",
            f"Uptime: {format_uptime(self.uptime)}",
        ]
        if self.shared_network:
            lines.append("Network: the host's own (IPROOT=ALL, unrestricted)")
        else:
            lines.append("Addresses: " + (" ".join(self.addresses) or "none (lo only)"))
        lines.extend(f"Limit {line}" for line in self.limits)
        if self.disk:
            lines.append(f"Disk: {self.disk}")
        if self.idmap:
            lines.append(f"User ids: {self.idmap}")
        if self.unenforced:
            lines.append("Flags not enforced on this host yet: " + " ".join(self.unenforced))
        return "\n".join(lines)


def _disk_text(paths: Paths, name: str) -> str | None:
    if quota.image_path(paths.rootdir, name).exists() and os.path.ismount(paths.root(name)):
        u = quota.image_usage(paths.root(name))
        return (f"{u.exclusive >> 20} MiB used of {(u.limit or 0) >> 20} MiB "
                "(a filesystem image of its own)")
    own = disk_of(paths, name)
    if own is None:
        return None
    try:
        u = quota.usage(own)
    except quota.QuotaError as e:
        return f"unknown ({e})"
    limit = "no limit" if u.limit is None else f"limit {u.limit >> 20} MiB"
    return f"{u.exclusive >> 20} MiB of its own, {limit} ({u.how})"


def format_uptime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    out = f"{hours:02d}:{minutes:02d}:{s:02d}"
    return f"{days}d {out}" if days else out


def status(paths: Paths, name: str) -> Status:
    check_name(name)
    s = _load_settings(paths, name)
    st = read_state(paths, name)
    if st is None or not _alive(st):
        return Status(name, False)
    return Status(name, True, st.context, len(Cgroup(st.cgroup).procs()),
                  time.time() - st.started, st.init_pid,
                  tuple(sorted(s.flags & NOT_YET_ENFORCED)),
                  tuple(str(confmod.parse_ip_token(t).address) for t in s.iproot),
                  s.iproot_unrestricted,
                  tuple(a.text() for a in limits.load_applied(_limits_file(paths, name))),
                  _disk_text(paths, name), _idmap_text(st.idmap_base, s.idmap))


def _idmap_text(base: int | None, mode: str) -> str | None:
    if base is None:
        return None
    return f"{mode}, guest 0..65535 = host {base}..{base + idmap.RANGE - 1}"


# --- after a crash ----------------------------------------------------------------
# The agent journals every build and start; when it died during one, the next
# agent calls these before it serves anyone (hostagent.recovery).

def rollback_build(paths: Paths, name: str) -> bool:
    """Remove what an unfinished build of NAME left; False if it had finished.

    A build writes NAME.conf last, so a guest without one was never built.
    """
    check_name(name)
    with _locked(paths, name):
        if paths.conf(name).exists():
            return False
        _sweep_stale_builds(paths, name)
        root = paths.root(name)
        if os.path.lexists(root) or templates.is_unified(paths, name) \
                or quota.image_path(paths.rootdir, name).exists():
            _remove_tree(paths, name)
        return True


def rollback_start(paths: Paths, name: str) -> None:
    """Undo an unfinished start of NAME: its processes, cgroups, network and records.

    The start may have died at any step, before or after it wrote NAME.ctx, so
    everything is looked for by name as well as through the record.
    """
    check_name(name)
    with _locked(paths, name):
        st = read_state(paths, name)
        if st is not None and _alive(st):
            _kill_guest(st)
        _cleanup_stale(paths, name, st)
        try:
            s = _load_settings(paths, name)
        except GuestError:
            return
        if s.iproot and not s.iproot_unrestricted:
            from hostagent import netns

            try:
                with netns.IPRoute() as ipr:
                    plan = netns.plan(name, s, ipr)
            except netns.NetworkError:
                return
            netns.forget(plan)


def checkpoint(step: str) -> None:
    """Fault injection for the crash tests, named steps of build and start.

    With VPANEL_TEST_HANG_AT=STEP in the environment, the process writes
    STEP to VPANEL_TEST_HANG_MARKER and sleeps there, so that a test can kill
    it at exactly that point. Unset (always, outside the tests), it does nothing.
    """
    if os.environ.get("VPANEL_TEST_HANG_AT") != step:
        return
    marker = os.environ.get("VPANEL_TEST_HANG_MARKER")
    if marker:
        Path(marker).write_text(step)
    time.sleep(3600)


def cleanup_after_exit(paths: Paths, name: str, init_pid: int) -> bool:
    """Clean up after NAME's PID 1 INIT_PID ended on its own; False if nothing to do.

    Nothing is done when NAME has been started again meanwhile (its record
    names another PID 1): a `vserver NAME restart` from the command line makes
    the agent see the old PID 1 end just before the new one starts.
    """
    check_name(name)
    with _locked(paths, name):
        st = read_state(paths, name)
        if st is not None and (st.init_pid != init_pid or _alive(st)):
            return False
        _cleanup_stale(paths, name, st)
        return True


# --- reset ---------------------------------------------------------------------

def reset(paths: Paths, name: str, keep: Sequence[str] = ()) -> templates.ResetResult:
    """vserver NAME reset: a stopped template guest back to its template, but for KEEP.

    KEEP: absolute paths inside the guest (wire.check_guest_path rules), kept
    with everything below them; templates.reset_upper has the rules. Its disk
    limit (the qgroup of its own layer's subvolume) stays as it was.
    """
    from hostagent import build as buildmod

    check_name(name)
    with _locked(paths, name):
        s = _load_settings(paths, name)
        template = templates.template_of(s.build_method)
        if template is None or not templates.is_unified(paths, name):
            raise GuestError(f"{name} was not built on a template: reset needs a template "
                             "guest (vserver NAME build -m template TEMPLATE)")
        st = read_state(paths, name)
        if st is not None and _alive(st):
            raise GuestError(f"{name} is running: stop it before a reset")
        try:
            if st is not None:
                _cleanup_stale(paths, name, st)  # died on its own: nothing of it may linger
            templates.unmount_guest(paths, name)
            result = templates.reset_upper(paths, name, tuple(keep), template=template)
            templates.mount_guest(paths, name, template, s.idmap_base)
        except (templates.TemplateError, buildmod.BuildError, OSError) as e:
            raise GuestError(f"{name}: reset failed: {e}") from e
        return result
