"""The settings each end of a guest's veth gets, and the bytes counted on it.

Same test world as test_networking.py (tests/agent/conftest.py `lan`): a host
and a LAN network namespace, never the machine's own interfaces.
"""

from __future__ import annotations

from pathlib import Path

from hostagent import usage
from tests.agent.conftest import UPLINK, Lan


def sysctl(path: str) -> str:
    """A /proc/sys value in the calling thread's network namespace."""
    return (Path("/proc/sys") / path).read_text().strip()


def test_host_end_filters_sources_and_ignores_router_advertisements(lan: Lan) -> None:
    st = lan.guest("ga", lan.v4(10), lan.v6(10))
    host_if = st.host_if
    assert host_if == "vs-ga"
    with lan.on_host():
        got = {p: sysctl(p) for p in (
            f"net/ipv4/conf/{host_if}/rp_filter",  # 1: strict reverse-path filtering
            f"net/ipv4/conf/{host_if}/proxy_arp",
            f"net/ipv4/neigh/{host_if}/proxy_delay",
            f"net/ipv6/conf/{host_if}/accept_ra",
            f"net/ipv4/conf/{UPLINK}/proxy_arp",
            f"net/ipv4/neigh/{UPLINK}/proxy_delay",
            f"net/ipv6/conf/{UPLINK}/proxy_ndp",
            f"net/ipv6/neigh/{UPLINK}/proxy_delay",
        )}
    assert got == {
        f"net/ipv4/conf/{host_if}/rp_filter": "1",
        f"net/ipv4/conf/{host_if}/proxy_arp": "1",
        f"net/ipv4/neigh/{host_if}/proxy_delay": "0",
        f"net/ipv6/conf/{host_if}/accept_ra": "0",
        f"net/ipv4/conf/{UPLINK}/proxy_arp": "1",
        f"net/ipv4/neigh/{UPLINK}/proxy_delay": "0",
        f"net/ipv6/conf/{UPLINK}/proxy_ndp": "1",
        f"net/ipv6/neigh/{UPLINK}/proxy_delay": "0",
    }


def test_guest_end_has_lo_up_and_takes_no_router_advertisements(lan: Lan) -> None:
    lan.guest("ga", lan.v4(10), lan.v6(10))
    code, out = lan.run("ga", "ip -o link show lo; "
                        "cat /proc/sys/net/ipv6/conf/eth0/accept_ra; "
                        "ip -o addr show lo")
    assert code == 0, out
    link, accept_ra, *addrs = out.splitlines()
    flags = link.split("<", 1)[1].split(">", 1)[0].split(",")
    assert "UP" in flags, link
    assert accept_ra == "0"
    assert any("127.0.0.1/8" in a for a in addrs), out


def test_usage_counts_the_bytes_a_guest_sends_and_receives(lan: Lan) -> None:
    page = "x" * 5000 + "\n"
    lan.guest("ga", lan.v4(10), page=page)
    with lan.on_host():
        before = usage.usage_of(lan.paths, "ga")
    assert before is not None
    assert before.net_rx_bytes is not None and before.net_tx_bytes is not None
    for _ in range(3):
        assert lan.http_get(lan.v4(10)) == page
    with lan.on_host():
        after = usage.usage_of(lan.paths, "ga")
    assert after is not None and after.net_rx_bytes is not None and after.net_tx_bytes is not None
    # The three pages left the guest; the three requests came in.
    assert after.net_tx_bytes - before.net_tx_bytes >= 3 * len(page)
    assert after.net_rx_bytes > before.net_rx_bytes
    with lan.on_host():
        assert usage.usage_all(lan.paths)["ga"].net_tx_bytes is not None
