"""`make run`'s guest: build (once) and start a busybox vserver named 'demo'.

Runs in the VSERVER_* roots the Makefile sets (under var/demo), never in a
real /etc/vservers. Starting an already running demo is not an error: the
command can be run again and again.
"""

from __future__ import annotations

import sys

from hostagent import guest
from hostagent.paths import Paths

NAME = "demo"


def _echo(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def main() -> int:
    paths = Paths.from_env()
    try:
        if not paths.conf(NAME).exists():
            print(f"Building the demo vserver in {paths.root(NAME)} ...", flush=True)
            guest.build(paths, NAME, guest.BuildOptions(
                method="busybox", hostname="demo.vpanel.test",
                description="make run's demo guest"))
        if guest.running(paths, NAME):
            print("The demo vserver is already running.")
        else:
            guest.start(paths, NAME, output=_echo)
        print(guest.status(paths, NAME).text())
    except guest.GuestError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    print(
        "\nEnter it:        make demo-enter     (a shell inside; 'exit' to leave)\n"
        "Run a command:   make demo-exec CMD='ps'\n"
        "Stop it:         make demo-stop\n"
        f"Its files:       {paths.root(NAME)}   its config: {paths.conf(NAME)}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
