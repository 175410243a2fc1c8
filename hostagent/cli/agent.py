"""hostagent: the host agent daemon.

    hostagent serve [--socket PATH] [--group NAME] [--no-onboot] [-v]

Serves the REST API on $VSERVER_RUNDIR/agent.sock (docs/agent-api.md), starts
the ONBOOT guests, answers the guests' /dev/reboot, and re-adopts running
guests when it restarts. Stopping it (SIGTERM, or SIGKILL) leaves every guest
running; `vservers stop` stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hostagent.paths import Paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hostagent", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the agent in the foreground")
    s.add_argument("--socket", type=Path, help="default: $VSERVER_RUNDIR/agent.sock")
    s.add_argument("--group", default="vpanel",
                   help="the group allowed on the socket besides root (default vpanel)")
    s.add_argument("--no-onboot", action="store_true", help="do not start ONBOOT guests")
    s.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s hostagent %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from hostagent import daemon

    try:
        asyncio.run(daemon.serve(Paths.from_env(), args.socket, args.group,
                                 run_onboot=not args.no_onboot))
    except RuntimeError as e:
        print(f"hostagent: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
