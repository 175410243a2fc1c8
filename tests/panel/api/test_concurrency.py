"""Concurrent requests never hand out one address twice.

Real transactions (transactional_db) and real threads, each with its own
database connection. The agent never runs: create_vserver's after-commit
work (dispatch to the agent, the websocket event) is replaced by a no-op.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections

from panel.guests import actions
from panel.guests.models import VServer
from panel.hosting.choices import IPFamilyChoices, RoleChoices
from panel.hosting.models import Customer, Host, IPAddress, IPPool, Membership
from tests.panel.factories import make_plan, make_user

THREADS = 8


def in_threads(n: int, work: Callable[[int], Any]) -> tuple[list[Any], list[BaseException]]:
    """Run WORK(i) in N threads started together; their results and their errors."""
    barrier = threading.Barrier(n)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            barrier.wait()
            out = work(i)
            with lock:
                results.append(out)
        except BaseException as e:  # the test reports it
            with lock:
                errors.append(e)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


@pytest.fixture
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actions, "_dispatch", lambda op_id: None)
    monkeypatch.setattr(actions, "_send_event", lambda vs_id: None)


@pytest.fixture
def setup(transactional_db: None, no_agent: None) -> Iterator[dict[str, Any]]:
    plan = make_plan(max_vservers=THREADS * 2, max_ipv4=THREADS * 2)
    customer = Customer.objects.create(name="Race", slug="race", plan=plan)
    owner = make_user("racer")
    Membership.objects.create(customer=customer, user=owner, role=RoleChoices.ROLE_OWNER)
    host = Host.objects.create(name="node1", agent_socket="/run/x.sock",
                               memory_mb=1_000_000, cpu_cores=Decimal(512))
    pool = IPPool.objects.create(name="v4", family=IPFamilyChoices.FAMILY_4,
                                 network="198.18.2.0/24", first="198.18.2.10",
                                 last="198.18.2.250")
    yield {"customer": customer, "owner": owner, "host": host, "pool": pool}


def test_concurrent_allocations_never_share_an_address(setup: dict[str, Any]) -> None:
    host, customer, pool = setup["host"], setup["customer"], setup["pool"]
    vservers = [VServer.objects.create(name=f"vs{i}", customer=customer, host=host,
                                       hostname=f"vs{i}") for i in range(THREADS)]

    def allocate(i: int) -> str:
        return IPPool.objects.get(pk=pool.pk).allocate(vservers[i]).address

    got, errors = in_threads(THREADS, allocate)
    assert not errors, errors
    assert len(got) == THREADS
    assert len(set(got)) == THREADS
    addresses = list(IPAddress.objects.values_list("address", flat=True))
    assert sorted(addresses) == sorted(got)


def test_concurrent_creates_never_share_an_address(setup: dict[str, Any]) -> None:
    customer, owner = setup["customer"], setup["owner"]

    def create(i: int) -> int:
        vs, _op = actions.create_vserver(Customer.objects.get(pk=customer.pk),
                                         actor=actions.Actor(owner), name=f"race{i}",
                                         memory_mb=16, ipv4=1)
        return vs.pk

    made, errors = in_threads(THREADS, create)
    assert not errors, errors
    assert len(made) == THREADS
    addresses = list(IPAddress.objects.values_list("address", flat=True))
    assert len(addresses) == THREADS == len(set(addresses))
    assert sorted(IPAddress.objects.values_list("vserver_id", flat=True)) == sorted(made)
