"""`make run`'s guest: a busybox vserver named 'demo', built and started by the agent.

Runs against the agent `make run` started on the VSERVER_* roots the
Makefile sets (under var/demo), never a real /etc/vservers. The guest is
ONBOOT, so a restarted agent starts it again; running this again and again
is not an error.
"""

from __future__ import annotations

import sys

from hostagent import wire
from hostagent.client import AgentClient, AgentError
from hostagent.paths import Paths

NAME = "demo"


def main() -> int:
    paths = Paths.from_env()
    try:
        with AgentClient(paths.rundir / "agent.sock") as agent:
            if NAME not in {g.name for g in agent.guests()}:
                print(f"Building the demo vserver in {paths.root(NAME)} ...", flush=True)
                agent.run(agent.build(wire.BuildRequest(
                    name=NAME, method="busybox", hostname="demo.vpanel.test",
                    description="the demo guest of make run", onboot=True)))
            info = agent.guest(NAME)
            if info.state == wire.STATE_RUNNING:
                print("The demo vserver is already running.")
            else:
                agent.run(agent.state(NAME, "start"))
                info = agent.guest(NAME)
    except (AgentError, OSError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    print(f"Vserver '{NAME}' is {info.state}: context {info.context}, PID 1 is host pid "
          f"{info.init_pid}, {info.processes} processes")
    sock = paths.rundir / "agent.sock"
    print(
        "\nEnter it:        make demo-enter     (a shell inside; 'exit' to leave)\n"
        "Run a command:   make demo-exec CMD='ps'\n"
        "Stop it:         make demo-stop\n"
        f"The agent's API: curl --unix-socket {sock} http://agent/1.0/guests\n"
        f"Its files:       {paths.root(NAME)}   its config: {paths.conf(NAME)}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
