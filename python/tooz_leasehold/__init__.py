"""A tooz driver on the leasehold agent: ``leasehold:///run/leasehold/agent.sock``.

Locks are leasehold leases on the resource ``PREFIX + name`` (prefix ``tooz/`` unless the
URL says ``?prefix=...``), held by the calling process under a fresh owner id per
acquisition, so threads (and green threads) of one process exclude each other. They end when
released, when the process exits, or when the host is lost (on etcd); shared locks
(``acquire(shared=True)``) coexist with each other. Each lock exposes the fencing token of
its lease (``lock.token``) for storage that checks writes by token.

Locks are taken with ``on_lost = revoke``: an administrator's ``break_()`` (force-release)
ends the lease without killing the service; ``is_still_owner()`` then turns false and
``release()`` returns False. A process that dies holding an exclusive lock leaves it dirty:
the next ``acquire`` raises :class:`LockNeedsCheck` naming the dead holder, until an
administrator clears it (``leasehold mark-clean``, or ``break_()``), unless the URL says
``?on_dirty=accept`` (the service's user must then be root or in the admin group). Group
membership and leader election are not implemented (``tooz.NotImplemented``).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Union

import tooz
from tooz import coordination, locking

import leasehold

__all__ = ["LeaseholdDriver", "LeaseholdLock", "LockNeedsCheck"]

C = coordination.Characteristics


class LockNeedsCheck(tooz.ToozError):
    """The lock's last exclusive holder died holding it: whatever it guarded may be half
    done. Check it, then ``leasehold mark-clean RESOURCE`` (or ``break_()``)."""


def _opt(options: Dict[str, Any], key: str, default: str) -> str:
    v = options.get(key)
    if isinstance(v, list):
        return str(v[-1]) if v else default
    return default if v is None else str(v)


class LeaseholdLock(locking.Lock):
    """A tooz lock on one leasehold resource."""

    def __init__(self, name: bytes, driver: "LeaseholdDriver") -> None:
        super().__init__(name)
        self._driver = driver
        self._resource = driver._prefix + (name.decode("utf-8") if isinstance(name, bytes) else str(name))
        self._leases: List[leasehold.Lease] = []
        self._mutex = threading.Lock()

    @property
    def resource(self) -> str:
        """The leasehold resource this lock is."""
        return self._resource

    @property
    def token(self) -> Optional[int]:
        """The fencing token of the latest acquisition still held, or None."""
        with self._mutex:
            return self._leases[-1].token if self._leases else None

    def acquire(
        self,
        blocking: Union[bool, float] = True,
        shared: bool = False,
        timeout: Optional[float] = None,
    ) -> bool:
        if blocking is False:
            wait: Union[bool, float, None] = None
        elif blocking is True:
            wait = True if timeout is None else float(timeout)
        else:
            wait = float(blocking)
        try:
            lease = self._driver._client.acquire(
                self._resource,
                shared=shared,
                wait=wait,
                owner=self._driver._label,
                accept_dirty=self._driver._accept_dirty,
                on_lost="revoke",
            )
        except leasehold.Held:
            return False
        except leasehold.NeedsCheck as e:
            raise LockNeedsCheck(str(e)) from e
        except leasehold.AgentUnreachable as e:
            raise coordination.ToozConnectionError(str(e)) from e
        except leasehold.LeaseholdError as e:
            raise tooz.ToozError(str(e)) from e
        with self._mutex:
            self._leases.append(lease)
        return True

    def release(self) -> bool:
        with self._mutex:
            if not self._leases:
                return False
            lease = self._leases.pop()
        try:
            lease.release()
        except leasehold.LeaseLost:
            return False
        except leasehold.AgentUnreachable as e:
            raise coordination.ToozConnectionError(str(e)) from e
        except leasehold.LeaseholdError as e:
            raise tooz.ToozError(str(e)) from e
        return True

    def is_still_owner(self) -> bool:
        with self._mutex:
            leases = list(self._leases)
        if not leases:
            return False
        try:
            return leases[-1].is_still_owner()
        except leasehold.AgentUnreachable as e:
            raise coordination.ToozConnectionError(str(e)) from e

    def break_(self) -> bool:
        """Force-releases every lease on the lock (root or the leasehold admin group) and
        clears the dirty mark that leaves, so a waiter may take it at once."""
        client = self._driver._client
        try:
            released = client.force_release(self._resource, f"tooz break_ by {self._driver._label}")
            client.mark_clean(self._resource)
        except leasehold.LeaseholdError as e:
            if e.code in ("refused", "not-found"):
                return False
            if isinstance(e, leasehold.AgentUnreachable):
                raise coordination.ToozConnectionError(str(e)) from e
            raise tooz.ToozError(str(e)) from e
        return bool(released)


class LeaseholdDriver(coordination.CoordinationDriver):
    """``leasehold:///path/to/agent.sock[?prefix=tooz/&on_dirty=refuse|accept&timeout=30]``.

    The socket path may be left out (``leasehold://``): the agent is found like the CLI finds
    it. Characteristics are read from the agent when it answers at creation: threads,
    processes and linearizable always; across hosts on etcd; not timeout-based on the local
    store (an etcd host session has a ttl).
    """

    CHARACTERISTICS = (
        C.DISTRIBUTED_ACROSS_THREADS,
        C.DISTRIBUTED_ACROSS_PROCESSES,
        C.LINEARIZABLE,
    )

    def __init__(self, member_id: bytes, parsed_url: Any, options: Dict[str, Any]) -> None:
        super().__init__(member_id, parsed_url, options)
        self._remote = bool(parsed_url.netloc)
        path = parsed_url.path or None
        self._prefix = _opt(options, "prefix", "tooz/")
        on_dirty = _opt(options, "on_dirty", "refuse")
        if on_dirty not in ("refuse", "accept"):
            raise ValueError(f"on_dirty must be refuse or accept, not {on_dirty!r}")
        self._accept_dirty = on_dirty == "accept"
        timeout = float(_opt(options, "timeout", str(leasehold.DEFAULT_TIMEOUT)))
        m = member_id.decode("utf-8", "replace") if isinstance(member_id, bytes) else str(member_id)
        self._label = ("tooz " + m)[:256]
        self._client = leasehold.Client(socket=path, timeout=timeout) if not self._remote else None  # type: ignore[assignment]
        if self._client is not None:
            try:
                backend = self._client.status().get("backend", "")
            except leasehold.LeaseholdError:
                backend = ""
            if backend == "etcd":
                self.CHARACTERISTICS = self.CHARACTERISTICS + (C.DISTRIBUTED_ACROSS_HOSTS,)
            elif backend == "local":
                self.CHARACTERISTICS = self.CHARACTERISTICS + (C.NON_TIMEOUT_BASED,)

    def _start(self) -> None:
        if self._client is None:
            raise coordination.ToozConnectionError(
                "leasehold talks to the local agent's Unix socket: write "
                "leasehold:///path/to/agent.sock (three slashes), not a host"
            )
        try:
            self._client.status()
        except leasehold.LeaseholdError as e:
            raise coordination.ToozConnectionError(str(e)) from e

    def get_lock(self, name: bytes) -> LeaseholdLock:
        return LeaseholdLock(name, self)
