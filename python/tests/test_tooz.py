"""The tooz driver against real agents: $LEASEHOLD_SOCKET, and with $LEASEHOLD_SOCKET_B a
second host on the same etcd (crates/leasehold/tests/python.rs)."""

import os
import threading
import uuid

import pytest

tooz = pytest.importorskip("tooz")
from tooz import coordination  # noqa: E402

import tooz_leasehold  # noqa: E402


def coordinator(sock: str, member: str = "m"):
    c = coordination.get_coordinator("leasehold://" + sock, f"{member}-{uuid.uuid4()}".encode())
    c.start()
    return c


def test_the_driver_is_found_by_its_entry_point_and_says_what_it_is():
    c = coordinator(os.environ["LEASEHOLD_SOCKET"])
    try:
        assert isinstance(c, tooz_leasehold.LeaseholdDriver)
        ch = set(c.CHARACTERISTICS)
        assert coordination.Characteristics.DISTRIBUTED_ACROSS_THREADS in ch
        assert coordination.Characteristics.DISTRIBUTED_ACROSS_PROCESSES in ch
        backend = c._client.status()["backend"]
        across_hosts = coordination.Characteristics.DISTRIBUTED_ACROSS_HOSTS in ch
        assert across_hosts == (backend == "etcd")
    finally:
        c.stop()
    with pytest.raises(coordination.ToozConnectionError):
        coordination.get_coordinator("leasehold://localhost:1/x", b"m").start()


def test_locks_of_two_threads_exclude_each_other_and_carry_tokens():
    c = coordinator(os.environ["LEASEHOLD_SOCKET"])
    name = f"vol-{uuid.uuid4()}".encode()
    a, b = c.get_lock(name), c.get_lock(name)
    try:
        assert a.acquire()
        first = a.token
        assert first and a.is_still_owner()
        got = []
        t = threading.Thread(target=lambda: got.append((b.acquire(timeout=30), b.token)))
        t.start()
        t.join(0.3)
        assert t.is_alive(), "the second thread must wait"
        assert a.release()
        t.join(30)
        assert got and got[0][0] and got[0][1] > first
        assert not a.is_still_owner() and b.is_still_owner()
        assert b.release()
    finally:
        c.stop()


def test_two_hosts_on_one_etcd_exclude_each_other_through_tooz():
    other = os.environ.get("LEASEHOLD_SOCKET_B")
    if not other:
        pytest.skip("needs two agents on one etcd (LEASEHOLD_SOCKET_B)")
    a = coordinator(os.environ["LEASEHOLD_SOCKET"], "host-a")
    b = coordinator(other, "host-b")
    name = f"vol-{uuid.uuid4()}".encode()
    la, lb = a.get_lock(name), b.get_lock(name)
    try:
        assert la.acquire(blocking=False)
        assert not lb.acquire(blocking=False)
        assert not lb.acquire(shared=True, blocking=False)
        assert not lb.acquire(timeout=0.5)
        assert la.release()
        assert lb.acquire(timeout=30)
        assert lb.token > 0 and not la.acquire(blocking=False)
        assert lb.release()
        assert la.acquire(shared=True) and lb.acquire(shared=True, blocking=False)
        assert la.release() and lb.release()
    finally:
        a.stop()
        b.stop()
