"""A client for the agent's API, for the panel, the tools and the tests.

Synchronous (httpx over the Unix socket); every reply is decoded into the
wire types of hostagent.wire, every error raised as AgentError with the
agent's status, message and field. attach_console is the one asynchronous
part: a console's websocket, for the panel's async consumer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import httpx

from hostagent import wire
from hostagent.paths import Paths

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AgentClient", "AgentError", "attach_console"]

V = f"/{wire.API_VERSION}"


class AgentError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(f"{status}: {error}" + (f" ({field})" if field else ""))
        self.status, self.error, self.field = status, error, field


def _socket(socket_path: Path | str | None) -> str:
    return str(socket_path or Paths.from_env().rundir / "agent.sock")


class AgentClient:
    def __init__(self, socket_path: Path | str | None = None, timeout: float = 60.0) -> None:
        path = _socket(socket_path)
        self.socket_path = path
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=path),
                                  base_url="http://agent", timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- plumbing ---

    def request(self, method: str, path: str, body: Any = None,
                headers: Mapping[str, str] | None = None,
                params: Mapping[str, str] | None = None) -> httpx.Response:
        resp = self._http.request(method, f"{V}{path}", json=body, headers=headers,
                                  params=params)
        if resp.status_code >= 400:
            try:
                err = resp.json()
                raise AgentError(resp.status_code, str(err.get("error")), err.get("field"))
            except ValueError:
                raise AgentError(resp.status_code, resp.text[:200]) from None
        return resp

    def _op(self, resp: httpx.Response) -> wire.Operation:
        return wire.Operation.from_json(resp.json())

    # --- host ---

    def host(self) -> wire.HostInfo:
        return wire.HostInfo.from_json(self.request("GET", "").json())

    def stats(self) -> list[wire.Usage]:
        return [wire.Usage.from_json(u) for u in self.request("GET", "/stats").json()]

    def quotas(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/quotas").json())

    # --- guests ---

    def guests(self) -> list[wire.GuestInfo]:
        return [wire.GuestInfo.from_json(g) for g in self.request("GET", "/guests").json()]

    def guest(self, name: str) -> wire.GuestInfo:
        return wire.GuestInfo.from_json(self.request("GET", f"/guests/{name}").json())

    def build(self, req: wire.BuildRequest) -> wire.Operation:
        return self._op(self.request("POST", "/guests", req.to_json()))

    def delete(self, name: str) -> wire.Operation:
        return self._op(self.request("DELETE", f"/guests/{name}"))

    def config(self, name: str) -> wire.Config:
        return wire.Config.from_json(self.request("GET", f"/guests/{name}/config").json())

    def put_config(self, name: str, values: Mapping[str, str],
                   etag: str | None = None) -> tuple[wire.Config, list[str]]:
        headers = {"If-Match": f'"{etag}"'} if etag else None
        body = self.request("PUT", f"/guests/{name}/config", {"values": dict(values)},
                            headers=headers).json()
        applied = body.pop("applied", [])
        return wire.Config.from_json(body), list(applied)

    def state(self, name: str, action: str, *, force: bool = False,
              timeout: int | None = None) -> wire.Operation:
        body: dict[str, Any] = {"action": action, "force": force}
        if timeout is not None:
            body["timeout"] = timeout
        return self._op(self.request("PUT", f"/guests/{name}/state", body))

    def exec(self, name: str, command: Iterable[str], *, user: str | None = None,
             timeout: float = 60.0) -> wire.Operation:
        body: dict[str, Any] = {"command": list(command), "timeout": timeout}
        if user is not None:
            body["user"] = user
        return self._op(self.request("POST", f"/guests/{name}/exec", body))

    def reset(self, name: str, keep: Iterable[str] = ()) -> wire.Operation:
        """Reset stopped template guest NAME to its template, keeping KEEP (absolute paths
        inside it, with all below them). The result: {"kept", "absent", "refused"}."""
        return self._op(self.request("POST", f"/guests/{name}/reset", {"keep": list(keep)}))

    def archive(self, name: str, path: str, *,
                max_bytes: int = wire.ARCHIVE_DEFAULT_BYTES) -> Generator[bytes, None, None]:
        """A tar of PATH, made inside running guest NAME, as an iterator of byte chunks.

        The request is made at once, so a refusal (no such guest or path, a
        private or stopped guest) raises AgentError here. An archive that
        would pass MAX_BYTES raises AgentError(413, field "max_bytes") after
        its first MAX_BYTES bytes; tar failing half-way raises AgentError(422).
        The chunks before the error are a tar that is not whole. Iterate to
        the end, or close() the iterator, to free the connection.
        """
        params = {"path": path, "max_bytes": str(max_bytes)}
        req = self._http.build_request("GET", f"{V}/guests/{name}/archive", params=params)
        resp = self._http.send(req, stream=True)
        if resp.status_code >= 400:
            try:
                resp.read()
            finally:
                resp.close()
            _raise(resp)
        return self._archive_chunks(resp)

    def _archive_chunks(self, resp: httpx.Response) -> Generator[bytes, None, None]:
        try:
            try:
                yield from resp.iter_bytes()
                return
            except httpx.RemoteProtocolError:
                pass  # no last chunk: the agent says the archive is not whole
        finally:
            resp.close()
        op_id = resp.headers.get("X-Operation", "")
        op = self.operation(op_id) if op_id else None
        if op is not None and (op.result or {}).get("truncated"):
            raise AgentError(413, "the archive is larger than max_bytes "
                             f"({resp.headers.get('X-Archive-Limit')} bytes); it was cut "
                             "there", "max_bytes")
        raise AgentError(422, (op.error if op is not None else None)
                         or "the archive ended before it was whole", "path")

    def processes(self, name: str) -> list[wire.ProcessRow]:
        return [wire.ProcessRow.from_json(r)
                for r in self.request("GET", f"/guests/{name}/processes").json()]

    # --- consoles ---

    def console_open(self, name: str, cols: int = 80, rows: int = 24, user: str | None = None,
                     idle: float | None = None) -> wire.ConsoleInfo:
        """A login shell in NAME on a COLS x ROWS terminal; attach with attach_console."""
        body: dict[str, Any] = {"cols": cols, "rows": rows, "user": user}
        if idle is not None:
            body["idle"] = idle
        return wire.ConsoleInfo.from_json(
            self.request("POST", f"/guests/{name}/console", body).json())

    def consoles(self) -> list[wire.ConsoleInfo]:
        return list(wire.decode_list(wire.ConsoleInfo, self.request("GET", "/consoles").json()))

    def console(self, console_id: str) -> wire.ConsoleInfo:
        return wire.ConsoleInfo.from_json(self.request("GET", f"/consoles/{console_id}").json())

    def console_close(self, console_id: str) -> wire.ConsoleExit:
        """End the session: its shell and what it left running are killed."""
        return wire.ConsoleExit.from_json(
            self.request("DELETE", f"/consoles/{console_id}").json())

    # --- templates ---

    def templates(self) -> list[wire.TemplateInfo]:
        return [wire.TemplateInfo.from_json(t) for t in self.request("GET", "/templates").json()]

    def create_template(self, req: wire.TemplateCreate) -> wire.Operation:
        return self._op(self.request("POST", "/templates", req.to_json()))

    def delete_template(self, name: str) -> None:
        self.request("DELETE", f"/templates/{name}")

    # --- operations and events ---

    def operation(self, op_id: str) -> wire.Operation:
        return wire.Operation.from_json(self.request("GET", f"/operations/{op_id}").json())

    def wait(self, op: wire.Operation | str, timeout: float = 120.0) -> wire.Operation:
        """Block until the operation ends (or TIMEOUT passes); its last state."""
        op_id = op if isinstance(op, str) else op.id
        resp = self._http.get(f"{V}/operations/{op_id}/wait",
                              params={"timeout": str(timeout)}, timeout=timeout + 10)
        if resp.status_code >= 400:
            err = resp.json()
            raise AgentError(resp.status_code, str(err.get("error")), err.get("field"))
        return wire.Operation.from_json(resp.json())

    def run(self, op: wire.Operation, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for OP and return its result; raise AgentError if it did not succeed."""
        done = self.wait(op, timeout)
        if done.state != wire.OP_SUCCESS:
            raise AgentError(500 if done.state == wire.OP_FAILURE else 408,
                             done.error or f"operation {done.id} is {done.state}")
        return done.result or {}

    def cancel(self, op_id: str) -> wire.Operation:
        return wire.Operation.from_json(self.request("DELETE", f"/operations/{op_id}").json())

    def events(self, types: Iterable[str] = ("lifecycle", "operation"),
               guests: Iterable[str] | None = None, processes: Iterable[str] = (),
               interval: float = 2.0,
               on_open: Callable[[], None] | None = None) -> Iterator[wire.Event]:
        """The event stream, one Event at a time, until the agent ends it.

        ON_OPEN is called once the agent has answered, before the first event:
        the listener is in place then, so state read from there on misses no
        event (the panel's bridge refreshes every vserver at that point).
        """
        params = {"type": ",".join(types), "interval": str(interval)}
        if guests is not None:
            params["guest"] = ",".join(guests)
        if processes:
            params["processes"] = ",".join(processes)
        with self._http.stream("GET", f"{V}/events", params=params,
                               timeout=httpx.Timeout(10.0, read=None)) as resp:
            if resp.status_code >= 400:
                resp.read()
                err = resp.json()
                raise AgentError(resp.status_code, str(err.get("error")), err.get("field"))
            if on_open is not None:
                on_open()
            for line in resp.iter_lines():
                if line:
                    yield wire.Event.from_json(json.loads(line))


def _raise(resp: httpx.Response) -> NoReturn:
    try:
        err = resp.json()
        raise AgentError(resp.status_code, str(err.get("error")), err.get("field"))
    except ValueError:
        raise AgentError(resp.status_code, resp.text[:200]) from None


@contextlib.asynccontextmanager
async def attach_console(socket_path: Path | str | None, console_id: str, *,
                         heartbeat: float = 30.0
                         ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """Attach to console CONSOLE_ID: `async with attach_console(sock, id) as ws:`.

    Binary frames are the terminal's bytes both ways (ws.send_bytes for
    keystrokes); text frames are JSON: send wire.ConsoleResize(...).to_json()
    with ws.send_json, receive wire.ConsoleExit (then the socket closes) or
    wire.ConsoleError. The session outlives the socket: leaving the block
    only detaches. Raises AgentError if there is no such console.
    """
    import aiohttp  # only here: the panel's other imports of this module stay light

    connector = aiohttp.UnixConnector(path=_socket(socket_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            ws = await session.ws_connect(f"http://agent{V}/consoles/{console_id}",
                                          heartbeat=heartbeat, max_msg_size=wire.MAX_BODY)
        except aiohttp.WSServerHandshakeError as e:
            if e.status == 404:
                raise AgentError(404, f"no console {console_id[:64]!r}", "id") from e
            raise AgentError(e.status, e.message) from e
        async with ws:
            yield ws
