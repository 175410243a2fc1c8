"""N guests from one template three ways: full copy, vunify, overlay; cp -a is the reference.

    sudo .venv/bin/python bench/unify.py [--guests 20] [--template-mb 200]

All of it happens on a loop-mounted btrfs made for the run (vunify shares
blocks, which ext4 cannot), removed at the end. The template is a synthetic
tree: files of random bytes of a few sizes plus many small ones, so the
disk figures cannot be flattered by compression or holes. Per extra guest
it prints the time to have it ready and the disk it adds (the filesystem's
used bytes after a sync), and the seed's figure to beat: "a 2 GIG
installation shrinks to 38 megs", i.e. about 2 % of the template per guest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from roots import bench_roots  # bench/roots.py, beside this script

from hostagent import guest, templates, unify


def used_bytes(mnt: Path) -> int:
    os.sync()
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def make_template(root: Path, total_mb: int) -> None:
    """A tree of TOTAL_MB of incompressible files: big ones, middling ones, many small ones."""
    sizes = [(4 << 20, 0.5), (256 << 10, 0.35), (8 << 10, 0.15)]
    for i, (size, share) in enumerate(sizes):
        d = root / "usr" / f"lib{i}"
        d.mkdir(parents=True)
        for n in range(max(1, int(total_mb * (1 << 20) * share) // size)):
            (d / f"f{n}").write_bytes(os.urandom(size))
    for sub in ("etc", "var", "root", "tmp", "bin", "dev", "proc", "sys"):
        (root / sub).mkdir(exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")


def per_guest(times: list[float], used0: int, used1: int, n: int) -> tuple[float, float]:
    return statistics.median(times), (used1 - used0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=20)
    ap.add_argument("--template-mb", type=int, default=200)
    args = ap.parse_args()
    n, size = args.guests, args.template_mb
    if os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None:
        print("bench/unify.py: needs root and mkfs.btrfs (btrfs-progs)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="vpanel-unify-"))
    image, mnt = work / "fs.img", work / "fs"
    with open(image, "wb") as f:
        f.truncate((size * (2 * n + 4) + 1024) << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        with bench_roots("unify") as _tmp_paths:
            os.environ["VSERVER_ROOTDIR"] = str(mnt / "vservers")
            from hostagent.paths import Paths

            paths = Paths.from_env()
            paths.ensure()
            tpl = templates.template_path(paths, "big")
            tpl.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tpl.mkdir()
            make_template(tpl, size)
            tpl_bytes = used_bytes(mnt)
            results = {}

            # 1. cp -a, the reference: every guest a full copy.
            copies = mnt / "copies"
            copies.mkdir()
            u0, times = used_bytes(mnt), []
            for i in range(n):
                t0 = time.perf_counter()
                subprocess.run(["cp", "-a", "--reflink=never", str(tpl), str(copies / f"c{i}")],
                               check=True)
                times.append((time.perf_counter() - t0) * 1000)
            results["cp -a (full copy)"] = per_guest(times, u0, used_bytes(mnt), n)
            shutil.rmtree(copies)

            # 2. vunify: a full copy, then its blocks shared with the template's.
            uni = mnt / "unified"
            uni.mkdir()
            u0, times = used_bytes(mnt), []
            for i in range(n):
                t0 = time.perf_counter()
                dst = uni / f"v{i}"
                subprocess.run(["cp", "-a", "--reflink=never", str(tpl), str(dst)], check=True)
                unify.unify_tree(tpl, dst)
                times.append((time.perf_counter() - t0) * 1000)
            results["cp -a + vunify (FIDEDUPERANGE)"] = per_guest(times, u0, used_bytes(mnt), n)
            shutil.rmtree(uni)

            # 3. overlay: vserver NAME build -m template.
            u0, times = used_bytes(mnt), []
            for i in range(n):
                t0 = time.perf_counter()
                guest.build(paths, f"o{i}", guest.BuildOptions(method="template", source="big"))
                times.append((time.perf_counter() - t0) * 1000)
            results["overlay (build -m template)"] = per_guest(times, u0, used_bytes(mnt), n)
            for i in range(n):
                guest.delete(paths, f"o{i}")

            ref_ms, ref_bytes = results["cp -a (full copy)"]
            print(f"template: {tpl_bytes >> 20} MiB on btrfs; {n} guests each way; "
                  f"kernel {os.uname().release}")
            for label, (ms, per) in results.items():
                print(f"{label:<32} {ms:9.1f} ms/guest {per / 1024:11.0f} KB/guest   "
                      f"time x{ms / ref_ms:.3f}, disk x{per / max(1, ref_bytes):.4f} of cp -a")
            ov = results["overlay (build -m template)"][1]
            print(f"the seed: 2 GB shrank to 38 MB (1.9 %); here {tpl_bytes >> 20} MiB -> "
                  f"{ov / 1024:.0f} KB per unified guest ({100 * ov / max(1, tpl_bytes):.3f} %)")
        return 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
