"""The Python client against a real agent ($LEASEHOLD_SOCKET, started by
crates/leasehold/tests/python.rs through scripts/test)."""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

import leasehold


@pytest.fixture
def client() -> leasehold.Client:
    return leasehold.Client()


def name(what: str) -> str:
    return f"py/{what}/{uuid.uuid4()}"


def wait_until(what, f, limit=20.0):
    deadline = time.monotonic() + limit
    while not f():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.02)


def test_the_agent_is_found_like_the_cli(monkeypatch):
    monkeypatch.setenv("LEASEHOLD_SOCKET", "/x/agent.sock")
    assert leasehold.default_socket() == "/x/agent.sock"
    monkeypatch.delenv("LEASEHOLD_SOCKET")
    if os.geteuid() == 0:
        assert leasehold.default_socket() == "/run/leasehold/agent.sock"
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
        assert leasehold.default_socket() == "/run/user/7/leasehold/agent.sock"


def test_a_lease_gives_a_token_and_is_released_at_the_end_of_the_block(client):
    r = name("vol")
    with client.lease(r, wait=30, owner="cinder-volume") as lease:
        assert lease.token > 0
        assert client.validate(r, lease.token)
        assert lease.is_still_owner()
        holder = client.inspect(r)["holders"][0]["owner"]
        assert holder["pid"] == os.getpid()
        assert holder["owner_id"] == lease.owner_id
        assert holder["label"] == "cinder-volume"
        assert any(x["resource"] == r for x in client.list(prefix="py/vol/"))
    assert not client.validate(r, lease.token)
    assert not lease.is_still_owner()
    assert client.inspect(r)["holders"] == []
    assert client.inspect(r).get("dirty") is None


def test_an_exception_in_the_block_leaves_an_exclusive_resource_dirty(client):
    r = name("failing")
    with pytest.raises(RuntimeError):
        with client.lease(r):
            raise RuntimeError("write failed half-way")
    with pytest.raises(leasehold.NeedsCheck) as e:
        client.acquire(r)
    assert e.value.exit_code == 4
    assert e.value.holder["pid"] == os.getpid()
    assert "RuntimeError" in (e.value.dirty.get("note") or "")


def test_two_threads_of_one_process_exclude_each_other(client):
    r = name("threads")
    first = client.acquire(r)
    with pytest.raises(leasehold.Held) as e:
        client.acquire(r)
    assert e.value.exit_code == 3
    assert e.value.holder["owner_id"] == first.owner_id
    assert e.value.holder["pid"] == os.getpid()
    assert first.owner_id in str(e.value) or str(os.getpid()) in str(e.value)

    order = []
    def second():
        with client.lease(r, wait=30) as lease:
            order.append(("second", lease.token))
    t = threading.Thread(target=second)
    t.start()
    wait_until("the thread waits", lambda: len(client.inspect(r)["waiters"]) == 1)
    order.append(("first", first.token))
    first.release()
    t.join(30)
    assert not t.is_alive()
    assert [o for o, _ in order] == ["first", "second"]
    assert order[1][1] > order[0][1], "the later grant has the larger token"


def test_shared_leases_coexist_and_a_timed_wait_ends_with_held(client):
    r = name("shared")
    a = client.acquire(r, shared=True)
    b = client.acquire(r, shared=True)
    assert a.token != b.token and len(client.inspect(r)["holders"]) == 2
    started = time.monotonic()
    with pytest.raises(leasehold.Held) as e:
        client.acquire(r, wait=0.3)
    assert time.monotonic() - started >= 0.3
    assert e.value.code == "timed-out"
    a.release()
    b.release()
    client.acquire(r).release()


def test_bad_requests_raise_usage_and_a_missing_agent_is_unreachable(client, tmp_path):
    with pytest.raises(leasehold.Usage) as e:
        client.acquire("")
    assert e.value.exit_code == 2
    with pytest.raises(leasehold.Usage):
        client.acquire(name("x"), owner_id="not valid")
    gone = leasehold.Client(socket=str(tmp_path / "nobody.sock"))
    with pytest.raises(leasehold.AgentUnreachable) as e:
        gone.acquire("x")
    assert e.value.exit_code == 5
    assert "nobody.sock" in str(e.value)


def test_a_dying_holder_leaves_the_resource_dirty_naming_it(client):
    r = name("dies")
    code = (
        "import leasehold, os; leasehold.Client().acquire(%r); print('held', flush=True); "
        "os.kill(os.getpid(), 9)" % r
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "held" in p.stdout, p.stderr
    wait_until("its lease ended", lambda: client.inspect(r)["holders"] == [])
    with pytest.raises(leasehold.NeedsCheck) as e:
        client.acquire(r)
    assert e.value.dirty["how"] == "process-died"
    assert e.value.holder["pid"] != os.getpid()


def test_a_forked_child_neither_shares_nor_releases_its_parents_lease(client):
    r = name("fork")
    lease = client.acquire(r)
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            with pytest.raises(leasehold.LeaseholdError):
                lease.release()
            try:
                leasehold.Client().acquire(r)
                status = 10  # the child is another process: it must be refused
            except leasehold.Held:
                pass
            lease.__exit__(None, None, None)  # leaving the block in the child: nothing
        except BaseException:
            status = 11
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.validate(r, lease.token), "the child left the parent's lease alone"
    lease.release()


def test_watch_streams_events(client):
    r = name("watched")
    events = client.watch(r)
    got = []

    def reader():
        for e in events:
            got.append(e["kind"])
            # The stream may open between a grant and its release: a release seen first
            # is not the end.
            if e["kind"] == "released" and "granted" in got:
                return
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    # The stream opens when the reader first asks; take leases until it has seen one.
    deadline = time.monotonic() + 20
    while "granted" not in got:
        assert time.monotonic() < deadline, got
        client.acquire(r).release()
        time.sleep(0.05)
    t.join(20)
    assert "released" in got, got


@pytest.mark.skipif(os.geteuid() != 0, reason="force-release needs root or the admin group")
def test_a_revocable_lease_is_revoked_without_killing_and_the_client_learns_it(client):
    r = name("revoke")
    lease = client.acquire(r, on_lost="revoke")
    assert client.force_release(r, "test")
    assert not lease.is_still_owner()
    assert not client.validate(r, lease.token)
    with pytest.raises(leasehold.LeaseLost):
        lease.release()
