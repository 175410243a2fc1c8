"""vpstree: the host's process tree, each process with its context.

    vpstree [-a] [--guest NAME] [--json] [PID]

Every line is `comm(pid) [CTX NAME]`, NAME being the vserver, MAIN for the
host or UNKNOWN for a chcontext context, as in vps. PID: show only the tree
below that (host) pid. --guest NAME: only NAME's processes, one tree per
process whose parent is not NAME's (its init, and what `vserver NAME exec`
started). -a: command lines instead of names. Kernel threads are left out,
as pstree does. --json: the same trees as nested objects.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hostagent.cgroup import CgroupError
from hostagent.names import guest_name_arg
from hostagent.paths import Paths
from hostagent.views import (
    Context,
    ContextMap,
    Proc,
    all_procs,
    print_json,
    printable,
    stdout_closed,
    user_name,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vpstree", description=__doc__.split("\n\n")[0])
    p.add_argument("-a", "--arguments", action="store_true", help="show command lines")
    p.add_argument("--guest", metavar="NAME", type=guest_name_arg,
                   help="only this vserver's processes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("pid", nargs="?", type=int, help="root of the tree (a host pid)")
    return p


class Tree:
    def __init__(self, procs: list[Proc], ctxmap: ContextMap) -> None:
        self.ctxmap = ctxmap
        self.procs = {p.pid: p for p in procs}
        self.ctx = {p.pid: ctxmap.of_cgroup(p.cgroup) for p in procs}
        self.children: dict[int, list[int]] = {}
        for p in procs:
            self.children.setdefault(p.ppid, []).append(p.pid)

    def roots(self, guest: str | None, pid: int | None) -> list[int]:
        if pid is not None:
            return [pid] if pid in self.procs else []
        if guest is not None:
            return [p for p in self.procs if self.ctx[p].guest == guest
                    and (self.ctx.get(self.procs[p].ppid) or Context(-1)).guest != guest]
        return [p for p in self.procs if self.procs[p].ppid not in self.procs]

    def node(self, pid: int) -> dict[str, object]:
        p, ctx = self.procs[pid], self.ctx[pid]
        return {
            "pid": pid,
            "ppid": p.ppid,
            "context": ctx.number,
            "guest": ctx.guest,
            "guest_pid": self.ctxmap.inner_pid(p, ctx),
            "user": user_name(p.uid),
            "comm": p.comm,
            "command": p.command,
            "children": [self.node(c) for c in sorted(self.children.get(pid, ()))],
        }

    def lines(self, pid: int, args: bool, prefix: str = "", last: bool = True,
              top: bool = True) -> list[str]:
        p, ctx = self.procs[pid], self.ctx[pid]
        label = p.command if args else printable(p.comm)
        branch = "" if top else ("`-" if last else "|-")
        out = [f"{prefix}{branch}{label}({pid}) [{ctx.number} {ctx.label}]"]
        kids = sorted(self.children.get(pid, ()))
        inner = prefix if top else prefix + ("  " if last else "| ")
        for i, c in enumerate(kids):
            out += self.lines(c, args, inner, i == len(kids) - 1, False)
        return out


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        ctxmap = ContextMap(Paths.from_env())
        if a.guest is not None and ctxmap.guest_context(a.guest) is None:
            print(f"vpstree: vserver {a.guest} is not running", file=sys.stderr)
            return 1
        procs = [p for p in all_procs(ctxmap.hierarchy) if not p.kthread]
        tree = Tree(procs, ctxmap)
        roots = tree.roots(a.guest, a.pid)
        if a.pid is not None and not roots:
            print(f"vpstree: no process {a.pid}", file=sys.stderr)
            return 1
        if a.json:
            print_json([tree.node(r) for r in roots])
        else:
            for r in roots:
                sys.stdout.write("\n".join(tree.lines(r, a.arguments)) + "\n")
        return 0
    except BrokenPipeError:
        return stdout_closed()
    except (OSError, CgroupError) as e:
        print(f"vpstree: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
