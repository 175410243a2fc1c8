"""vps: the host's ps, with a CONTEXT column after PID (the seed's scripts/vps).

    vps [PS-OPTION...]          ps PS-OPTION... (default: ps ax), plus CONTEXT
    vps --json [PS-SELECTION...] a JSON list of {pid, context, guest, user,
                                cpu, mem, command}

CONTEXT is the context number and its name: a vserver's name, MAIN for the
host (context 0), UNKNOWN for a chcontext context, '-' for a process that
exited before vps looked at it (ps itself, usually). Any ps output format
works as long as it has a PID column; vps finds it in the header.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence

from hostagent.cgroup import CgroupError
from hostagent.paths import Paths
from hostagent.views import Context, ContextMap, print_json, stdout_closed

_TOKEN = re.compile(r"\S+")
_JSON_FORMAT = ["-ww", "-o", "pid=,user:64=,pcpu=,pmem=,args="]


def _ps(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ps", *args], capture_output=True, text=True, check=False,
                          errors="replace")


def pid_span(line: str, header_end: int, index: int) -> tuple[int, int] | None:
    """Where the PID is in LINE: (start, end), or None if it has none.

    ps right-aligns PID under its header, so the number ending where the
    header's 'PID' ends is it. A wider column to its left can push it along;
    then it is the INDEX-th whitespace-separated field (true unless an
    earlier column holds spaces, as lstart does).
    """
    tokens = list(_TOKEN.finditer(line))
    for m in tokens:
        if m.end() == header_end and m.group().isdigit():
            return m.start(), m.end()
    if index < len(tokens) and tokens[index].group().isdigit():
        return tokens[index].start(), tokens[index].end()
    return None


def annotate(output: str, ctxmap: ContextMap) -> str | None:
    """PS OUTPUT with the CONTEXT column inserted after PID; None without a PID column."""
    lines = output.splitlines()
    if not lines:
        return output
    header, body = lines[0], lines[1:]
    htokens = list(_TOKEN.finditer(header))
    index = next((i for i, m in enumerate(htokens) if m.group() == "PID"), None)
    if index is None:
        return None
    header_end = htokens[index].end()
    rows: list[tuple[str, tuple[int, int] | None, Context | None]] = []
    for line in body:
        span = pid_span(line, header_end, index)
        ctx = ctxmap.of_pid(int(line[span[0]:span[1]])) if span else None
        rows.append((line, span, ctx))
    num_w = max([1, *(len(str(c.number)) for _, _, c in rows if c is not None)])
    name_w = max([4, *(len(c.label) for _, _, c in rows if c is not None)])
    width = max(len("CONTEXT"), num_w + 1 + name_w)
    out = [header[:header_end] + " " + "CONTEXT".ljust(width) + header[header_end:]]
    for line, span, ctx in rows:
        if span is None:
            out.append(line)
            continue
        field = "-" if ctx is None else f"{ctx.number:<{num_w}} {ctx.label}"
        out.append(line[:span[1]] + " " + field.ljust(width) + line[span[1]:])
    return "\n".join(out) + "\n"


def as_records(output: str, ctxmap: ContextMap) -> list[dict[str, object]]:
    """Rows of `ps -o pid=,user=,pcpu=,pmem=,args=` as the JSON objects of --json."""
    records: list[dict[str, object]] = []
    for line in output.splitlines():
        if not line.strip():
            continue
        fields = line.split(None, 4)
        if len(fields) < 4 or not fields[0].isdigit():
            raise ValueError(f"unexpected ps output line {line!r}")
        pid = int(fields[0])
        ctx = ctxmap.of_pid(pid)
        records.append({
            "pid": pid,
            "context": None if ctx is None else ctx.number,
            "guest": None if ctx is None else ctx.guest,
            "user": fields[1],
            "cpu": float(fields[2]),
            "mem": float(fields[3]),
            "command": fields[4] if len(fields) > 4 else "",
        })
    return records


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--help"]:
        print(__doc__)
        return 0
    json_out = "--json" in args
    args = [a for a in args if a != "--json"]
    try:
        ctxmap = ContextMap(Paths.from_env())
        if json_out:
            res = _ps([*(args or ["-e"]), *_JSON_FORMAT])
            if res.returncode != 0:
                sys.stderr.write(res.stderr)
                return res.returncode
            print_json(as_records(res.stdout, ctxmap))
            return 0
        res = _ps(args or ["ax"])
        sys.stderr.write(res.stderr)
        if res.returncode != 0 and not res.stdout:
            return res.returncode
        text = annotate(res.stdout, ctxmap)
        if text is None:
            print("vps: ps printed no PID column: give ps options that show one "
                  "(e.g. -o pid,...), and a header", file=sys.stderr)
            return 1
        sys.stdout.write(text)
        return res.returncode
    except BrokenPipeError:
        return stdout_closed()
    except (OSError, CgroupError, ValueError) as e:
        print(f"vps: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
