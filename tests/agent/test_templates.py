"""Unified guests: one template on disk, each guest's changes its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostagent import guest, syscalls, templates
from hostagent.paths import Paths


def run_in(paths: Paths, name: str, script: str) -> tuple[int, str]:
    buf = bytearray()
    code = guest.exec_in(paths, name, ["/bin/sh", "-c", script], output=buf.extend)
    return code, buf.decode(errors="replace")


@pytest.fixture
def template(vroots: Paths) -> str:
    templates.create(vroots, "bbt", "busybox", None)
    return "bbt"


def unified(paths: Paths, name: str, template: str) -> None:
    guest.build(paths, name, guest.BuildOptions(method="template", source=template))


def tree_bytes(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512
               for d, dirs, files in os.walk(path) for f in (*files, *dirs))


def test_a_change_in_one_guest_reaches_neither_the_other_nor_the_template(
        vroots: Paths, template: str) -> None:
    unified(vroots, "u1", template)
    unified(vroots, "u2", template)
    guest.start(vroots, "u1")
    guest.start(vroots, "u2")
    code, out = run_in(vroots, "u1", "rm /bin/ls && echo one > /etc/motd && "
                       "echo patched > /etc/init.d/httpd && echo ok")
    assert (code, out) == (0, "ok\n")
    assert run_in(vroots, "u2", "ls /bin/ls; cat /etc/motd 2>&1; head -c2 /etc/init.d/httpd")[1] \
        .startswith("/bin/ls\ncat: can't open '/etc/motd'")
    tpl = templates.template_path(vroots, template)
    assert (tpl / "bin/ls").is_symlink() and not (tpl / "etc/motd").exists()
    assert (tpl / "etc/init.d/httpd").read_text().startswith("#!")


def test_guest_root_cannot_write_the_shared_layer(vroots: Paths, template: str) -> None:
    unified(vroots, "u1", template)
    guest.start(vroots, "u1")
    tpl = templates.template_path(vroots, template)
    before = {p: p.read_bytes() for p in (tpl / "etc/passwd", tpl / "etc/inittab")}
    lower = str(tpl)
    code, out = run_in(vroots, "u1", f"""
        echo x >> /etc/passwd
        ls {lower} 2>&1 | head -1
        cat /proc/self/mountinfo | grep -c lowerdir
        for p in /proc/1/root{lower}/etc/passwd {lower}/etc/passwd \\
                 /proc/self/root/../../{lower}/etc/passwd; do
            echo y >> "$p" 2>/dev/null && echo "WROTE $p"
        done
        mount -o remount,rw / 2>/dev/null && echo REMOUNTED
        true""")
    assert code == 0
    assert "WROTE" not in out and "REMOUNTED" not in out, out
    assert "No such file" in out  # the template's path does not exist in the guest
    after = {p: p.read_bytes() for p in before}
    assert after == before  # the guest's own passwd changed; the template's did not
    assert (vroots.root("u1") / "etc/passwd").read_bytes().endswith(b"x\n")


def test_host_sees_the_whole_tree_running_or_not_and_it_costs_a_few_kb(
        vroots: Paths, template: str) -> None:
    unified(vroots, "u1", template)
    root = vroots.root("u1")
    assert (root / "bin/busybox").is_file() and (root / "etc/init.d/rc").is_file()
    upper, _ = templates.overlay_dirs(vroots, "u1")
    assert tree_bytes(upper) < 100 * 1024
    guest.start(vroots, "u1")
    guest.stop(vroots, "u1")
    assert (root / "bin/busybox").is_file()


def test_template_in_use_cannot_be_deleted(vroots: Paths, template: str) -> None:
    unified(vroots, "u1", template)
    with pytest.raises(templates.TemplateError, match="used by u1"):
        templates.delete(vroots, template)
    guest.delete(vroots, "u1")
    assert not vroots.root("u1").exists()
    assert not templates.overlay_dirs(vroots, "u1")[0].parent.exists()
    templates.delete(vroots, template)
    assert not templates.template_path(vroots, template).exists()
    assert [t.name for t in templates.list_templates(vroots)] == []


def test_list_shows_size_and_users(vroots: Paths, template: str) -> None:
    unified(vroots, "u1", template)
    unified(vroots, "u2", template)
    [info] = templates.list_templates(vroots)
    assert info.name == template and info.guests == ("u1", "u2") and info.size_bytes > 0


def test_unified_guest_comes_back_after_its_tree_was_unmounted(
        vroots: Paths, template: str) -> None:
    # As after a host reboot: start mounts the merged tree again.
    unified(vroots, "u1", template)
    (vroots.root("u1") / "etc/mine").write_text("kept\n")
    syscalls.umount2(vroots.root("u1"))  # a test's stand-in for a host reboot
    assert not (vroots.root("u1") / "etc/mine").exists()
    guest.start(vroots, "u1")
    assert run_in(vroots, "u1", "cat /etc/mine")[1] == "kept\n"


def test_building_from_a_missing_template_leaves_nothing(vroots: Paths) -> None:
    with pytest.raises(guest.GuestError, match="no template"):
        unified(vroots, "u1", "nosuch")
    assert not vroots.root("u1").exists() and vroots.guest_names() == []
    assert not templates.overlay_dirs(vroots, "u1")[0].parent.exists()


def test_template_from_a_stopped_guest(vroots: Paths, busybox_guest: str) -> None:
    (vroots.root(busybox_guest) / "etc/marker").write_text("from bb\n")
    templates.create(vroots, "fromguest", "guest", busybox_guest)
    unified(vroots, "child", "fromguest")
    assert (vroots.root("child") / "etc/marker").read_text() == "from bb\n"
    guest.start(vroots, busybox_guest)
    with pytest.raises(templates.TemplateError, match="running"):
        templates.create(vroots, "again", "guest", busybox_guest)
