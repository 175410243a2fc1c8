"""Fixtures of the agent tests: a little test world of network namespaces.

The "lan" world never touches the machine's own interfaces: a "host" network
namespace (where the guests' host ends, routes and proxy entries live, as
they would in the real host's) with an uplink veth into a "LAN" namespace,
addresses from 198.18.0.0/15 and fd00::/8.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from hostagent import guest, netns
from hostagent.conf import GuestConf
from hostagent.paths import Paths

UPLINK = "up0"


def ip(*args: str) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    assert res.returncode == 0, f"ip {' '.join(args)}: {res.stderr}"
    return res.stdout


@dataclass
class Lan:
    host: str  # netns names
    lan: str
    subnet: int  # the third octet: 198.18.N.0/24 and fd00:N::/64
    paths: Paths

    def v4(self, last: int) -> str:
        return f"198.18.{self.subnet}.{last}"

    def v6(self, last: int) -> str:
        return f"fd00:{self.subnet}::{last:x}"

    @contextlib.contextmanager
    def on_host(self) -> Iterator[None]:
        fd = os.open(f"/run/netns/{self.host}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with netns.in_netns_of(fd):
                yield
        finally:
            os.close(fd)

    def from_lan(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.lan}", *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def http_get(self, addr: str, port: int = 80) -> str:
        host = f"[{addr}]" if ":" in addr else addr
        # Not busybox wget: its -T (timeout) crashes in Debian's 1.35 build.
        code = ("import sys,urllib.request;"
                f"sys.stdout.write(urllib.request.urlopen('http://{host}:{port}/',"
                "timeout=5).read().decode())")
        res = self.from_lan("/usr/bin/python3", "-I", "-c", code)
        return res.stdout if res.returncode == 0 else f"FAILED: {res.stderr.strip()[-200:]}"

    def guest(self, name: str, *ips: str, caps: tuple[str, ...] = (), page: str | None = None,
              extra: dict[str, str] | None = None) -> guest.RunState:
        with self.on_host():
            guest.build(self.paths, name, guest.BuildOptions(method="busybox", ips=ips,
                                                              caps=caps))
            conf = GuestConf.load(self.paths.conf(name))
            conf.set("IPROOTDEV", UPLINK)
            for k, v in (extra or {}).items():
                conf.set(k, v)
            conf.save(self.paths.conf(name))
            if page is not None:
                (self.paths.root(name) / "var/www/index.html").write_text(page)
            return guest.start(self.paths, name, output=lambda _b: None)

    def run(self, name: str, script: str, user: str | None = None) -> tuple[int, str]:
        buf = bytearray()
        with self.on_host():
            code = guest.exec_in(self.paths, name, ["/bin/sh", "-c", script], user=user,
                                 output=buf.extend)
        return code, buf.decode(errors="replace")


@pytest.fixture
def lan(vroots: Paths) -> Iterator[Lan]:
    tag = uuid.uuid4().hex[:8]
    world = Lan(f"vph-{tag}", f"vpl-{tag}", int(tag[:2], 16) % 200 + 1, vroots)
    ip("netns", "add", world.host)
    try:
        ip("netns", "add", world.lan)
        ip("link", "add", UPLINK, "netns", world.host, "type", "veth",
           "peer", "name", "lan0", "netns", world.lan)
        for ns, dev, last in ((world.host, UPLINK, 254), (world.lan, "lan0", 1)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "addr", "add", f"{world.v4(last)}/24", "dev", dev)
            ip("-n", ns, "addr", "add", f"{world.v6(last)}/64", "dev", dev, "nodad")
        yield world
    finally:
        with world.on_host():
            for name in vroots.guest_names():
                with contextlib.suppress(Exception):
                    guest.stop(vroots, name, timeout=0)
        for ns in (world.lan, world.host):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


