"""Templates and unified guests: the seed's unification on overlayfs.

A template is a guest root tree kept under $VSERVER_ROOTDIR/.templates/NAME.
A unified guest is an overlay: the template is its shared read-only lower
layer and $VSERVER_ROOTDIR/.overlay/NAME/upper holds what the guest itself
changed, so files are shared on disk and in the page cache, and `rm /bin/ls`
or a package upgrade in one guest changes that guest's upper layer only.
The merged tree is mounted at $VSERVER_ROOTDIR/NAME on the host, running or
not, so the host sees (and backs up) each guest whole, as in the seed.

The seed hard-linked files and marked them immutable-but-unlinkable; that
bit does not exist in mainline kernels (reference/vserver.md section 4), and
an overlay gives the same sharing with every file still writable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hostagent import syscalls
from hostagent.names import check_name
from hostagent.paths import Paths

__all__ = [
    "ResetResult",
    "TemplateError",
    "TemplateInfo",
    "create",
    "delete",
    "guests_using",
    "idmapped_lower",
    "is_unified",
    "list_templates",
    "mount_guest",
    "overlay_dirs",
    "remove_guest",
    "reset_upper",
    "template_of",
    "unmount_guest",
]

TEMPLATE_METHOD = "template"


class TemplateError(RuntimeError):
    pass


def templates_dir(paths: Paths) -> Path:
    return paths.rootdir / ".templates"


def template_path(paths: Paths, name: str) -> Path:
    return templates_dir(paths) / check_name(name)


def overlay_dirs(paths: Paths, guest: str) -> tuple[Path, Path]:
    """(upper, work) of a unified guest."""
    base = paths.rootdir / ".overlay" / check_name(guest)
    return base / "upper", base / "work"


def idmapped_lower(paths: Paths, guest: str) -> Path:
    """Where a guest with an id range (IDMAP) has its template mounted idmapped,
    the overlay's lower layer. Outside the guest's own layer: a mount there
    could otherwise be walked by the removal of that layer."""
    return paths.rootdir / ".overlay" / ".lower" / check_name(guest)


def template_of(build_method: str | None) -> str | None:
    """The template a guest was built from, read from its BUILD_METHOD."""
    if not build_method:
        return None
    method, _, source = build_method.partition(" ")
    return source.strip() or None if method == TEMPLATE_METHOD else None


def is_unified(paths: Paths, guest: str) -> bool:
    upper, _ = overlay_dirs(paths, guest)
    return upper.is_dir()


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    size_bytes: int
    guests: tuple[str, ...]
    source: str


def _du_bytes(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirs, files in os.walk(path):
        for f in (*files, *dirs):
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def guests_using(paths: Paths, template: str) -> list[str]:
    from hostagent import conf as confmod

    users = []
    for name in paths.guest_names():
        try:
            s = confmod.settings_from_file(paths.conf(name))
        except (confmod.ConfigError, OSError):
            continue
        if template_of(s.build_method) == template:
            users.append(name)
    return users


def list_templates(paths: Paths) -> list[TemplateInfo]:
    out: list[TemplateInfo] = []
    base = templates_dir(paths)
    if not base.is_dir():
        return out
    for p in sorted(base.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        meta = _read_meta(p)
        out.append(TemplateInfo(p.name, _du_bytes(p), tuple(guests_using(paths, p.name)),
                                str(meta.get("source", ""))))
    return out


def _meta_path(tpl: Path) -> Path:
    return tpl.parent / f".{tpl.name}.json"


def _read_meta(tpl: Path) -> dict[str, object]:
    try:
        data = json.loads(_meta_path(tpl).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def create(paths: Paths, name: str, method: str, source: str | None,
           log: Callable[[str], None] = lambda _m: None) -> Path:
    """vtemplate create: a template from a guest (stopped), a rootfs, debootstrap or busybox."""
    from hostagent import build as buildmod
    from hostagent import guest as guestmod

    check_name(name)
    paths.ensure()
    base = templates_dir(paths)
    base.mkdir(mode=0o700, exist_ok=True)
    os.chmod(base, 0o700)  # never reachable by anyone but root, let alone a guest
    target = template_path(paths, name)
    if os.path.lexists(target):
        raise TemplateError(f"template {name} already exists")
    if method == "guest":
        if source is None:
            raise TemplateError("--from needs a guest name")
        check_name(source)
        if guestmod.running(paths, source):
            raise TemplateError(f"vserver {source} is running: stop it before making a template")
        src = paths.root(source)
        if not src.is_dir():
            raise TemplateError(f"vserver {source} has no root tree at {src}")
        buildmod.build_root(target, "rootfs", str(src), log=log)
        _unshift_copy(paths, source, target, log)
    elif method in ("rootfs", "debootstrap", "busybox"):
        buildmod.build_root(target, method, source, log=log)
    else:
        raise TemplateError(f"unknown template source {method!r}")
    _meta_path(target).write_text(json.dumps(
        {"source": f"{method} {source or ''}".strip(), "created": time.time()}))
    return target


def _unshift_copy(paths: Paths, source: str, target: Path, log: Callable[[str], None]) -> None:
    """A template copied from a guest with an id range (IDMAP) is given the host's
    own ids: templates stay real root's, and each guest sees them through its
    own idmapped mount."""
    from hostagent import conf as confmod
    from hostagent import idmap

    try:
        s = confmod.settings_from_file(paths.conf(source))
    except (confmod.ConfigError, OSError):
        return
    if s.idmap_base is not None:
        try:
            idmap.shift_tree(target, s.idmap_base, 0, log)
        except BaseException:
            from hostagent import build as buildmod

            buildmod.delete_root(target)
            raise


def rollback_create(paths: Paths, name: str) -> None:
    """Remove what an unfinished `create` of NAME left (its metadata is written last)."""
    from hostagent import build as buildmod

    check_name(name)
    target = template_path(paths, name)
    base = templates_dir(paths)
    for p in base.glob(f".{name}.build-*") if base.is_dir() else ():
        buildmod.delete_root(p)
    if target.is_dir() and not _meta_path(target).exists():
        buildmod.delete_root(target)


def delete(paths: Paths, name: str) -> None:
    """vtemplate delete: refused while a guest is built on it."""
    from hostagent import build as buildmod

    target = template_path(paths, name)
    if not target.is_dir():
        raise TemplateError(f"no template {name}")
    users = guests_using(paths, name)
    if users:
        raise TemplateError(f"template {name} is used by {', '.join(users)}: delete them first")
    buildmod.delete_root(target)
    with contextlib.suppress(FileNotFoundError):
        _meta_path(target).unlink()


# --- unified guests ----------------------------------------------------------------

def _is_mountpoint(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def mount_guest(paths: Paths, guest: str, template: str, idmap_base: int | None = None) -> None:
    """Mount the guest's merged tree at ROOTDIR/NAME (idempotent).

    redirect_dir, metacopy and index stay off: an upper layer that guest root
    filled can then never point overlayfs at another file of the lower layer
    (setting the trusted.overlay.* attributes needs CAP_SYS_ADMIN anyway).

    With IDMAP_BASE (a guest with an id range), the lower layer is the
    template through an idmapped mount (overlayfs takes idmapped layers since
    Linux 5.19): its files, owned by real root on disk and left so, read as
    the range's; the upper layer is owned by the range itself.
    """
    lower = template_path(paths, template)
    if not lower.is_dir():
        raise TemplateError(f"template {template} does not exist ({lower})")
    upper, work = overlay_dirs(paths, guest)
    root = paths.root(guest)
    if _is_mountpoint(root):
        return
    root.mkdir(mode=0o755, exist_ok=True)
    mapped = None
    if idmap_base is not None:
        mapped = _mount_idmapped_lower(paths, guest, lower, idmap_base)
        lower = mapped
    opts = (f"lowerdir={lower},upperdir={upper},workdir={work},"
            "redirect_dir=off,metacopy=off,index=off,xino=off")
    try:
        syscalls.mount("overlay", root, "overlay", 0, opts)
    except BaseException:
        if mapped is not None:
            syscalls.umount2(mapped, syscalls.UMOUNT_NOFOLLOW | syscalls.MNT_DETACH)
        raise


def _mount_idmapped_lower(paths: Paths, guest: str, template: Path, base: int) -> Path:
    """The template idmapped to BASE.. at idmapped_lower(GUEST); its path."""
    from hostagent import idmap

    point = idmapped_lower(paths, guest)
    point.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        point.mkdir(mode=0o700)
    # A stale one (a failed mount, a change of range) is never reused.
    _umount_if_mounted(point, syscalls.MNT_DETACH)
    fd = idmap.idmapped_tree(template, base)
    try:
        syscalls.move_mount(fd, point)
    finally:
        os.close(fd)
    return point


def unmount_guest(paths: Paths, guest: str) -> None:
    """Unmount a unified guest's merged tree and its idmapped lower layer, if mounted."""
    root = paths.root(guest)
    if _is_mountpoint(root):
        syscalls.umount2(root, syscalls.UMOUNT_NOFOLLOW)
    lower = idmapped_lower(paths, guest)
    _umount_if_mounted(lower)
    with contextlib.suppress(FileNotFoundError, OSError):
        lower.rmdir()


def _umount_if_mounted(path: Path, flags: int = 0) -> None:
    """Unmount PATH if something is mounted there. os.path.ismount cannot tell:
    an idmapped mount of the template is on the same device as its mount point."""
    try:
        syscalls.umount2(path, syscalls.UMOUNT_NOFOLLOW | flags)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.EINVAL:  # not a mount point
            raise


def build_guest(paths: Paths, guest: str, template: str, subvolume: bool = False,
                idmap_base: int | None = None) -> None:
    """A unified guest: empty upper and work directories, and the merged tree mounted.

    With IDMAP_BASE, the upper layer is the range's and the template is
    mounted idmapped (mount_guest). Everything made is removed again if a
    step fails.
    """
    lower = template_path(paths, template)
    if not lower.is_dir():
        raise TemplateError(f"no template {template} (vtemplate list shows them)")
    upper, work = overlay_dirs(paths, guest)
    root = paths.root(guest)
    if os.path.lexists(root) or os.path.lexists(upper.parent):
        raise TemplateError(f"{root} or {upper.parent} already exists")
    try:
        upper.parent.parent.mkdir(mode=0o700, exist_ok=True)
        if subvolume:
            # Its own btrfs subvolume, so a qgroup can limit what the guest adds.
            from hostagent import quota

            quota.make_subvolume(upper.parent)
            os.chmod(upper.parent, 0o700)
        else:
            upper.parent.mkdir(mode=0o700)
        upper.mkdir(mode=0o755)
        work.mkdir(mode=0o700)
        # The upper layer's root takes the template root's owner (in the
        # guest's range, if it has one) and mode.
        st = lower.stat()
        shift = 0 if idmap_base is None else idmap_base
        os.chown(upper, st.st_uid + shift, st.st_gid + shift)
        os.chmod(upper, st.st_mode & 0o7777)
        mount_guest(paths, guest, template, idmap_base)
    except BaseException:
        remove_guest(paths, guest)
        raise


def remove_guest(paths: Paths, guest: str) -> None:
    """Unmount a unified guest's tree and remove its own layer (the template stays)."""
    root = paths.root(guest)
    unmount_guest(paths, guest)
    with contextlib.suppress(FileNotFoundError, OSError):
        root.rmdir()
    upper, _ = overlay_dirs(paths, guest)
    from hostagent import build as buildmod
    from hostagent import quota

    if quota.is_subvolume(upper.parent):
        quota.delete_subvolume(upper.parent)
    else:
        buildmod.delete_root(upper.parent)


# --- reset to the template ---------------------------------------------------------

# An overlayfs directory marked so hides the lower layer's directory of that
# name (Documentation/filesystems/overlayfs.rst, "whiteouts and opaque directories").
OPAQUE_XATTR = "trusted.overlay.opaque"


@dataclass(frozen=True)
class ResetResult:
    kept: tuple[str, ...]  # kept paths the guest's own layer held, kept whole
    absent: tuple[str, ...]  # kept paths it did not hold: the template's show there
    refused: tuple[str, ...]  # kept paths below something not a real directory: dropped

    def as_dict(self) -> dict[str, list[str]]:
        return {"kept": list(self.kept), "absent": list(self.absent),
                "refused": list(self.refused)}


# A node of the tree of kept paths: a component -> the node below it, or
# None when that path is kept whole.
_KeepTree = dict[str, "_KeepTree | None"]


def _keep_tree(keep: tuple[str, ...]) -> _KeepTree:
    tree: _KeepTree = {}
    # Shallowest first, so that a kept path below another kept path adds nothing.
    for path in sorted(set(keep), key=lambda p: (p.count("/"), p)):
        parts = path.strip("/").split("/")
        node: _KeepTree | None = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if node is not None else None
        if node is not None:
            node.setdefault(parts[-1], None)
    return tree


def _leaves(node: _KeepTree | None, path: str) -> list[str]:
    if node is None:
        return [path]
    return [leaf for name, sub in node.items() for leaf in _leaves(sub, f"{path}/{name}")]


def reset_upper(paths: Paths, guest: str, keep: tuple[str, ...] | list[str], *,
                template: str) -> ResetResult:
    """Empty a stopped unified guest's own layer but for KEEP: it sees its template again.

    KEEP: absolute paths inside the guest (wire.check_guest_path), each kept
    with everything below it, whiteouts and opaque markers included. The
    directories above a kept path stay (without their opaque marker, so the
    template's other entries show through them again), as long as they are
    real directories in the upper layer; a kept path below a symlink, a
    whiteout or a file there is not followed but removed with the rest.

    The upper layer is written by guest root and so hostile: every step is
    relative to a directory fd, opens nothing through a symlink
    (O_NOFOLLOW), and never crosses into another filesystem (the removal is
    hostagent.build's, as for deleting a guest). The upper and work
    directories themselves stay, so a btrfs subvolume that holds them keeps
    its qgroup (the guest's DISK_LIMIT). The merged tree must be unmounted
    (unmount_guest; overlayfs forbids changing a layer under a mounted
    overlay), and the caller mounts it again after; it holds the guest's lock
    and knows the guest is stopped.
    """
    from hostagent import wire

    try:
        wanted = tuple(wire.check_guest_path(k, "keep") for k in keep)
    except wire.WireError as e:
        raise TemplateError(f"keep: {e.message}") from None
    if "/" in wanted:
        raise TemplateError("keeping / would keep everything: that is no reset")
    upper, work = overlay_dirs(paths, guest)
    if _is_mountpoint(paths.root(guest)):
        raise TemplateError(f"{paths.root(guest)} is mounted: unmount it before a reset")
    # The root of the guest's tree takes the template root's mode again, as at
    # the build (its owner stays: it is the guest's, whatever its id range).
    mode = stat.S_IMODE(os.stat(template_path(paths, template)).st_mode)
    kept: list[str] = []
    refused: list[str] = []
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    ufd = os.open(upper, flags)
    try:
        dev = os.fstat(ufd).st_dev
        _prune(ufd, _keep_tree(wanted), "", str(upper), dev, kept, refused)
        os.fchmod(ufd, mode)
    finally:
        os.close(ufd)
    wfd = os.open(work, flags)
    try:
        _prune(wfd, {}, "", str(work), os.fstat(wfd).st_dev, [], [])
    finally:
        os.close(wfd)
    found = {*kept, *refused}
    absent = [p for p in _leaves(_keep_tree(wanted), "") if p not in found]
    return ResetResult(tuple(sorted(kept)), tuple(sorted(absent)), tuple(sorted(refused)))


def _prune(dfd: int, tree: _KeepTree, path: str, shown: str, dev: int,
           kept: list[str], refused: list[str]) -> None:
    """Remove every entry of the directory open as DFD but those TREE keeps.

    PATH is the directory inside the guest, SHOWN where it is on the host (for
    messages). Recursion only follows kept paths: at most 128 levels (wire).
    """
    from hostagent import build as buildmod

    for name in sorted(os.listdir(dfd)):
        here = f"{path}/{name}"
        where = f"{shown}/{name}"
        if name in tree:
            below = tree[name]
            if below is None:
                kept.append(here)
                continue
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=dfd)
                try:
                    if os.fstat(fd).st_ino != st.st_ino:
                        raise TemplateError(f"{where} changed during the reset; is the "
                                            "guest stopped?")
                    with contextlib.suppress(OSError):  # ENODATA: it was not opaque
                        os.removexattr(fd, OPAQUE_XATTR)
                    _prune(fd, below, here, where, dev, kept, refused)
                finally:
                    os.close(fd)
                continue
            # A symlink (the guest's, pointing anywhere), a whiteout or a file:
            # what is below it in the guest's view is not the upper layer's to keep.
            refused.extend(_leaves(below, here))
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            buildmod._remove_dir_at(dfd, name, where, dev, clear_holder=True)
        else:
            buildmod._unlink_at(dfd, name, where, is_dir=False, clear_holder=True)
