"""A client for the leasehold agent, in Python's standard library only.

It speaks the agent's HTTP/1.1 + JSON API (``/v1/``) over its Unix socket with
:mod:`http.client`, one connection per call: nothing is shared across ``fork``, and it runs
under eventlet's green sockets.

>>> import leasehold
>>> client = leasehold.Client()                       # finds the agent like the CLI
>>> with client.lease("vol-1", wait=30, owner="cinder") as lease:   # doctest: +SKIP
...     write_with_token(lease.token)

A lease belongs to the calling *process* and, inside it, to a fresh owner id (a UUID) of its
own: two leases taken by two threads of one process exclude each other as two processes'
would, and the process's exit ends them all. Refusals raise :class:`Held` (exit code 3),
:class:`NeedsCheck` (4), :class:`Usage` (2) or :class:`AgentUnreachable` (5), each carrying
the holder.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket as _socket
import urllib.parse
import uuid
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

__all__ = [
    "Client",
    "Lease",
    "LeaseholdError",
    "Held",
    "NeedsCheck",
    "Usage",
    "AgentUnreachable",
    "LeaseLost",
    "default_socket",
]

#: How long a call may take before the agent counts as unreachable (seconds), besides a wait.
DEFAULT_TIMEOUT = 30.0


class LeaseholdError(Exception):
    """An error answered by the agent (or met reaching it).

    ``code`` is the agent's stable error code (``held``, ``needs-check``, ...),
    ``exit_code`` the CLI's exit code for it, ``message`` what happened and what to do next,
    ``resource`` the resource concerned, ``conflict`` who is in the way (``held``),
    ``dirty`` the lease that left a resource dirty (``needs-check``).
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        code: str = "error",
        resource: Optional[str] = None,
        conflict: Optional[Dict[str, Any]] = None,
        dirty: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.resource = resource
        self.conflict = conflict
        self.dirty = dirty

    @property
    def holder(self) -> Optional[Dict[str, Any]]:
        """The owner in the way (a holder for ``held``, the last writer for
        ``needs-check``), as the agent shows it: ``host``, ``pid``, ``owner_id``, ``label``..."""
        if self.conflict and self.conflict.get("holders"):
            return self.conflict["holders"][0].get("owner")
        if self.dirty:
            return self.dirty.get("owner")
        return None


class Held(LeaseholdError):
    """Held by another owner, or the wait ran out (exit code 3)."""

    exit_code = 3


class NeedsCheck(LeaseholdError):
    """The resource is dirty: its last writer died mid-write; check it first (exit code 4)."""

    exit_code = 4


class Usage(LeaseholdError):
    """The request is malformed: a bad name, value or option (exit code 2)."""

    exit_code = 2


class AgentUnreachable(LeaseholdError):
    """The agent could not be reached or did not answer in time (exit code 5)."""

    exit_code = 5


class LeaseLost(LeaseholdError):
    """The lease is no longer held: it was revoked (force-release) or its host was lost."""


_BY_CODE = {
    "held": Held,
    "timed-out": Held,
    "needs-check": NeedsCheck,
    "usage": Usage,
    "too-large": Usage,
    "unavailable": AgentUnreachable,
}


def _error(body: Dict[str, Any]) -> LeaseholdError:
    cls = _BY_CODE.get(body.get("code", ""), LeaseholdError)
    return cls(
        body.get("message", "the agent answered an error"),
        code=body.get("code", "error"),
        resource=body.get("resource"),
        conflict=body.get("conflict"),
        dirty=body.get("dirty"),
    )


def default_socket() -> str:
    """The agent's socket as the CLI finds it: ``$LEASEHOLD_SOCKET``, else
    ``/run/leasehold/agent.sock`` for root, else ``$XDG_RUNTIME_DIR/leasehold/agent.sock``."""
    env = os.environ.get("LEASEHOLD_SOCKET")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/leasehold/agent.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg:
        raise Usage(
            "no agent socket: pass socket= or set LEASEHOLD_SOCKET (XDG_RUNTIME_DIR is not set "
            "either)",
            code="usage",
        )
    return os.path.join(xdg, "leasehold", "agent.sock")


def _duration(seconds: Union[float, int, bool, None]) -> Optional[str]:
    """A wait in seconds as the API writes it; ``None`` or 0: no wait; ``True`` or
    ``math.inf``: forever."""
    if seconds is None or seconds is False:
        return None
    if seconds is True or (isinstance(seconds, float) and math.isinf(seconds)):
        return "forever"
    if seconds < 0:
        raise Usage(f"wait must be >= 0 seconds, not {seconds}", code="usage")
    ms = int(round(seconds * 1000))
    return None if ms == 0 else f"{ms}ms"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("leasehold", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class Client:
    """A client of one agent. Cheap: it holds no connection (each call opens its own), so
    one client may be shared by threads, and used in a forked child.

    ``socket``: the agent's socket path (default: :func:`default_socket`); ``timeout``: how
    long a call may take, in seconds, besides a wait.
    """

    def __init__(self, socket: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = socket if socket is not None else default_socket()
        self.timeout = timeout

    # -- transport ---------------------------------------------------------------------------

    def _open(
        self, method: str, path: str, body: Any = None, timeout: Optional[float] = None
    ) -> "tuple[_UnixConnection, http.client.HTTPResponse]":
        conn = _UnixConnection(self.socket, self.timeout if timeout is None else timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"content-type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise AgentUnreachable(
                f"cannot reach the leasehold agent at {self.socket}: {e} (is it running? "
                "`systemctl status leasehold`; or pass socket= / set LEASEHOLD_SOCKET)",
                code="unreachable",
            ) from e

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        conn, r = self._open(method, path, body)
        try:
            try:
                raw = r.read()
            except (OSError, http.client.HTTPException) as e:
                raise AgentUnreachable(
                    f"the agent at {self.socket} did not answer: {e}", code="unreachable"
                ) from e
            try:
                value = json.loads(raw) if raw else {}
            except ValueError as e:
                raise LeaseholdError(f"the agent answered {r.status} with no JSON: {raw[:200]!r}") from e
            if r.status >= 400:
                raise _error(value)
            return value
        finally:
            conn.close()

    def _lines(self, path: str, body: Any, timeout: Optional[float]) -> Iterator[Dict[str, Any]]:
        """A streaming call: its JSON lines as they come."""
        conn, r = self._open("POST", path, body, timeout=timeout)
        try:
            if r.status >= 400:
                raw = r.read()
                try:
                    raise _error(json.loads(raw))
                except ValueError:
                    raise LeaseholdError(f"the agent answered {r.status}: {raw[:200]!r}") from None
            while True:
                try:
                    line = r.readline()
                except (OSError, http.client.HTTPException) as e:
                    raise AgentUnreachable(
                        f"the agent at {self.socket} stopped answering: {e}", code="unreachable"
                    ) from e
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()

    # -- leases ------------------------------------------------------------------------------

    def acquire(
        self,
        resources: Union[str, Sequence[str]],
        shared: bool = False,
        wait: Union[float, int, bool, None] = None,
        owner: Optional[str] = None,
        accept_dirty: bool = False,
        on_lost: str = "kill",
        owner_id: Optional[str] = None,
    ) -> "Lease":
        """Takes leases on ``resources`` (one name, or several: all or none) for this
        process, under a fresh owner id of its own, and returns the :class:`Lease`.

        ``shared``: a read-only lease beside other shared ones; ``wait``: seconds to wait
        (``None``/0: try once; ``True``: forever); ``owner``: a label for people (a volume
        or VM name); ``accept_dirty``: take a dirty resource, promising to check it (root or
        the admin group); ``on_lost``: ``"kill"`` (default) or ``"revoke"``: what a
        force-release does to this process (see the README); ``owner_id``: the owner id
        (default: a new UUID).

        Raises :class:`Held` naming the holder, :class:`NeedsCheck` naming the last writer,
        :class:`Usage`, :class:`AgentUnreachable`.
        """
        names = [resources] if isinstance(resources, str) else list(resources)
        mode = "shared" if shared else "exclusive"
        oid = owner_id if owner_id is not None else str(uuid.uuid4())
        body: Dict[str, Any] = {
            "items": [{"resource": n, "mode": mode} for n in names],
            "owner_id": oid,
        }
        w = _duration(wait)
        if w is not None:
            body["wait"] = w
        if owner is not None:
            body["label"] = owner
        if accept_dirty:
            body["accept_dirty"] = True
        if on_lost != "kill":
            body["on_lost"] = on_lost
        timeout: Optional[float]
        if w == "forever":
            timeout = None
        else:
            timeout = self.timeout + (float(wait) if w is not None else 0.0)  # type: ignore[arg-type]
        for line in self._lines("/v1/acquire", body, timeout):
            event = line.get("event")
            if event == "granted":
                return Lease(self, line["grants"], line.get("owner", {}), oid, os.getpid())
            if event == "error":
                fields = {k: v for k, v in line.items() if k != "event"}
                raise _error(fields)
        raise AgentUnreachable(
            f"the agent at {self.socket} closed the acquire of {names} without an answer",
            code="unreachable",
        )

    def lease(self, resources: Union[str, Sequence[str]], **kwargs: Any) -> "Lease":
        """:meth:`acquire`, for ``with``: the lease is released when the block ends (clean;
        dirty if the block raised and the lease is exclusive, so the next user checks)."""
        return self.acquire(resources, **kwargs)

    def release(
        self,
        resources: Union[str, Sequence[str]],
        owner_id: Optional[str] = None,
        dirty: bool = False,
        note: Optional[str] = None,
        pid: Optional[int] = None,
        tokens: Optional[Sequence[int]] = None,
    ) -> List[Dict[str, Any]]:
        """Ends this process's leases (of ``owner_id``, when given) on ``resources``;
        returns what ended. With ``tokens`` (one per resource, in their order), only the
        leases with those tokens: never a later grant to the same owner. Raises
        :class:`LeaseLost` when one was not held any more."""
        names = [resources] if isinstance(resources, str) else list(resources)
        body: Dict[str, Any] = {"resources": names}
        if owner_id is not None:
            body["owner_id"] = owner_id
        if pid is not None:
            body["pid"] = pid
        if tokens:
            body["tokens"] = list(tokens)
        if dirty:
            body["dirty"] = True
            if note is not None:
                body["note"] = note
        try:
            answer = self._call("POST", "/v1/release", body)
        except LeaseholdError as e:
            # An agent from before release tokens refuses the field, releasing nothing: ask
            # again by owner, as that agent releases.
            if "tokens" not in body or e.code != "usage" or "unknown field `tokens`" not in str(e):
                raise
            del body["tokens"]
            answer = self._call("POST", "/v1/release", body)
        failed = answer.get("failed") or []
        if failed:
            f = failed[0]
            err = _error(f.get("error", {}))
            if err.code in ("refused", "not-found"):
                raise LeaseLost(
                    f"{f.get('resource')} was not held by this owner any more "
                    f"(revoked, or its host was lost): {err.message}",
                    code=err.code,
                    resource=f.get("resource"),
                )
            raise err
        return list(answer.get("released", []))

    def validate(self, resource: str, token: int) -> bool:
        """Whether ``token`` is a live grant of ``resource`` (for storage that checks
        writes by token)."""
        return bool(self._call("POST", "/v1/validate", {"resource": resource, "token": token})["current"])

    def inspect(self, resource: str) -> Optional[Dict[str, Any]]:
        """What the agent knows of ``resource`` (holders, dirty mark, last ending), or
        ``None``."""
        return self._call("POST", "/v1/inspect", {"resource": resource}).get("resource")

    def list(self, prefix: Optional[str] = None) -> List[Dict[str, Any]]:
        """Every known resource (under ``prefix``), following the agent's pages."""
        out: List[Dict[str, Any]] = []
        after: Optional[str] = None
        while True:
            q: Dict[str, str] = {}
            if prefix is not None:
                q["prefix"] = prefix
            if after is not None:
                q["after"] = after
            path = "/v1/leases" + ("?" + urllib.parse.urlencode(q) if q else "")
            page = self._call("GET", path)
            out.extend(page.get("resources", []))
            after = page.get("next")
            if not after:
                return out

    def watch(self, resource: Optional[str] = None) -> Iterator[Dict[str, Any]]:
        """Lease events as they happen (``granted``, ``released``, ``forced``, ...), one dict
        each, until the iterator is closed. The stream is open once the first event is asked
        for."""
        body: Dict[str, Any] = {} if resource is None else {"resource": resource}
        for event in self._lines("/v1/watch", body, timeout=None):
            if event.get("kind") == "error":
                raise _error(event.get("error") or {"message": "the watch fell behind"})
            yield event

    def status(self) -> Dict[str, Any]:
        """The agent's status (host, backend, session)."""
        return self._call("GET", "/v1/status")

    def force_release(self, resource: str, reason: str) -> List[Dict[str, Any]]:
        """Revokes every lease on ``resource`` (root or the admin group): holders that asked
        ``on_lost="kill"`` are killed, and the resource is left dirty."""
        answer = self._call("POST", "/v1/force-release", {"resource": resource, "reason": reason})
        return list(answer.get("released", []))

    def mark_clean(self, resource: str) -> Optional[Dict[str, Any]]:
        """Clears a dirty mark after a check (root or the admin group); returns the mark."""
        return self._call("POST", "/v1/mark-clean", {"resource": resource}).get("was")


class Lease:
    """Leases granted together, to this process under one owner id.

    ``token`` is the fencing token (of the first resource; ``tokens`` maps every resource):
    pass it with every write, so storage can refuse a stale writer (``Client.validate``).
    """

    def __init__(
        self,
        client: Client,
        grants: List[Dict[str, Any]],
        owner: Dict[str, Any],
        owner_id: str,
        pid: int,
    ) -> None:
        self.client = client
        self.grants = grants
        self.owner = owner
        self.owner_id = owner_id
        self.pid = pid
        self.resources: List[str] = [g["resource"] for g in grants]
        self.tokens: Dict[str, int] = {g["resource"]: g["token"] for g in grants}
        self.shared = bool(grants) and grants[0].get("mode") == "shared"
        self.released = False

    @property
    def resource(self) -> str:
        """The (first) resource."""
        return self.resources[0]

    @property
    def token(self) -> int:
        """The fencing token of the (first) resource."""
        return self.tokens[self.resources[0]]

    def _mine(self) -> bool:
        return os.getpid() == self.pid

    def is_still_owner(self) -> bool:
        """Whether every lease is still live (not released, revoked or lost)."""
        if self.released:
            return False
        return all(self.client.validate(r, t) for r, t in self.tokens.items())

    def release(self, dirty: bool = False, note: Optional[str] = None) -> None:
        """Ends the leases: clean, or ``dirty`` (the resource needs a check). Raises
        :class:`LeaseLost` when they had already ended otherwise (revoked), and
        :class:`LeaseholdError` in a forked child (the lease is its parent's)."""
        if self.released:
            return
        if not self._mine():
            raise LeaseholdError(
                f"this lease belongs to pid {self.pid}, not to {os.getpid()} (a forked child "
                "does not hold its parent's leases)",
                code="refused",
            )
        try:
            self.client.release(
                self.resources,
                owner_id=self.owner_id,
                dirty=dirty,
                note=note,
                tokens=[self.tokens[r] for r in self.resources],
            )
        finally:
            self.released = True

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.released or not self._mine():
            # A forked child leaving the block leaves its parent's lease alone.
            return
        failed = exc_type is not None and not self.shared
        note = f"{exc_type.__name__} raised in the lease's block" if failed else None
        self.release(dirty=failed, note=note)

    def __repr__(self) -> str:
        return f"<Lease {self.tokens} owner_id={self.owner_id} pid={self.pid}>"
