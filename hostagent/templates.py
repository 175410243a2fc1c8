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
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hostagent import syscalls
from hostagent.names import check_name
from hostagent.paths import Paths

__all__ = [
    "TemplateError",
    "TemplateInfo",
    "create",
    "delete",
    "guests_using",
    "is_unified",
    "list_templates",
    "mount_guest",
    "overlay_dirs",
    "remove_guest",
    "template_of",
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
    elif method in ("rootfs", "debootstrap", "busybox"):
        buildmod.build_root(target, method, source, log=log)
    else:
        raise TemplateError(f"unknown template source {method!r}")
    _meta_path(target).write_text(json.dumps(
        {"source": f"{method} {source or ''}".strip(), "created": time.time()}))
    return target


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


def mount_guest(paths: Paths, guest: str, template: str) -> None:
    """Mount the guest's merged tree at ROOTDIR/NAME (idempotent).

    redirect_dir, metacopy and index stay off: an upper layer that guest root
    filled can then never point overlayfs at another file of the lower layer
    (setting the trusted.overlay.* attributes needs CAP_SYS_ADMIN anyway).
    """
    lower = template_path(paths, template)
    if not lower.is_dir():
        raise TemplateError(f"template {template} does not exist ({lower})")
    upper, work = overlay_dirs(paths, guest)
    root = paths.root(guest)
    if _is_mountpoint(root):
        return
    root.mkdir(mode=0o755, exist_ok=True)
    opts = (f"lowerdir={lower},upperdir={upper},workdir={work},"
            "redirect_dir=off,metacopy=off,index=off,xino=off")
    syscalls.mount("overlay", root, "overlay", 0, opts)


def build_guest(paths: Paths, guest: str, template: str, subvolume: bool = False) -> None:
    """A unified guest: empty upper and work directories, and the merged tree mounted.

    Everything made is removed again if a step fails.
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
        # The upper layer's root takes the template root's owner and mode.
        st = lower.stat()
        os.chown(upper, st.st_uid, st.st_gid)
        os.chmod(upper, st.st_mode & 0o7777)
        mount_guest(paths, guest, template)
    except BaseException:
        remove_guest(paths, guest)
        raise


def remove_guest(paths: Paths, guest: str) -> None:
    """Unmount a unified guest's tree and remove its own layer (the template stays)."""
    root = paths.root(guest)
    if _is_mountpoint(root):
        syscalls.umount2(root, syscalls.UMOUNT_NOFOLLOW)
    with contextlib.suppress(FileNotFoundError, OSError):
        root.rmdir()
    upper, _ = overlay_dirs(paths, guest)
    from hostagent import build as buildmod
    from hostagent import quota

    if quota.is_subvolume(upper.parent):
        quota.delete_subvolume(upper.parent)
    else:
        buildmod.delete_root(upper.parent)
