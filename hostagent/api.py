"""The agent's REST API: /1.0/... over its Unix socket, JSON in and out.

Handlers only translate: they check the caller and the input (hostagent.wire),
hand the work to the agent (hostagent.daemon.Agent) and shape the reply.
Anything that may take more than about a second is an operation: the reply
is 202 with the operation, to follow at /1.0/operations/ID or in the event
stream. Every error is JSON: {"error": ..., "field": ..., "status": ...}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from hostagent import wire
from hostagent.names import InvalidName, check_name

if TYPE_CHECKING:
    from hostagent.daemon import Agent

__all__ = ["make_app"]

_LOG = logging.getLogger(__name__)

V = f"/{wire.API_VERSION}"
AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")
_PEER_KEY = "peer"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.field = status, error, field


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":")), status=status,
                        content_type="application/json", headers=headers)


def _error(status: int, error: str, field: str | None = None) -> web.Response:
    return _json(wire.ErrorReply(error=error, field=field, status=status).to_json(), status)


# --- who is asking ---------------------------------------------------------------

def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end, from SO_PEERCRED."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _supplementary_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def caller_allowed(cred: tuple[int, int, int] | None, group: int | None) -> bool:
    """Root, or a member of the agent's group (primary or supplementary)."""
    if cred is None:
        return False
    pid, uid, gid = cred
    if uid == 0:
        return True
    if group is None:
        return False
    return gid == group or group in _supplementary_groups(pid)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    cred = peer_credentials(request)
    if not caller_allowed(cred, agent.group_id):
        uid = cred[1] if cred else "unknown"
        _LOG.warning("refused a caller with uid %s: not root and not in the agent's group", uid)
        return _error(403, "not allowed: the caller must be root or in the agent's group")
    try:
        return await handler(request)
    except ApiError as e:
        return _error(e.status, e.error, e.field)
    except wire.WireError as e:
        return _error(400, e.message, e.field)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reason = {404: "no such path", 405: f"method {request.method} not allowed here",
                  413: f"request body over {wire.MAX_BODY} bytes"}.get(e.status, e.reason)
        return _error(e.status, reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        _LOG.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal error; the agent's log has the details")


# --- input --------------------------------------------------------------------

def _name(request: web.Request, key: str = "name") -> str:
    try:
        return check_name(request.match_info[key])
    except InvalidName as e:
        raise ApiError(400, str(e), key) from e


async def _body(request: web.Request) -> object:
    if request.content_length is not None and request.content_length > wire.MAX_BODY:
        raise ApiError(413, f"request body over {wire.MAX_BODY} bytes", "body")
    data = await request.read()
    return wire.decode_json(data)


def _query_float(request: web.Request, key: str, default: float, lo: float,
                 hi: float) -> float:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{key} must be a number", key) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be between {lo:g} and {hi:g}", key)
    return value


def _query_names(request: web.Request, key: str) -> list[str] | None:
    raw = request.query.get(key)
    if raw is None:
        return None
    out = []
    for item in filter(None, raw.split(",")):
        try:
            out.append(check_name(item))
        except InvalidName as e:
            raise ApiError(400, str(e), key) from e
    return out


def _operation_reply(op: wire.Operation) -> web.Response:
    return _json(op.to_json(), 202, {"Location": f"{V}/operations/{op.id}"})


# --- handlers -------------------------------------------------------------------

async def host_info(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _json((await agent.host_info()).to_json())


async def list_guests(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _json([g.to_json() for g in await agent.guests()])


async def build_guest(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    req = wire.BuildRequest.from_json(await _body(request))
    return _operation_reply(agent.build(req))


async def get_guest(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _json((await agent.guest(_name(request))).to_json())


async def delete_guest(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _operation_reply(agent.delete(_name(request)))


async def get_config(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    cfg = await agent.config(_name(request))
    return _json(cfg.to_json(), headers={"ETag": f'"{cfg.etag}"'})


async def put_config(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    name = _name(request)
    put = wire.ConfigPut.from_json(await _body(request))
    match = request.headers.get("If-Match")
    etag = match.strip().strip('"') if match else None
    cfg, lines = await agent.put_config(name, put, etag)
    body = cfg.to_json()
    body["applied"] = lines
    return _json(body, headers={"ETag": f'"{cfg.etag}"'})


async def change_state(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    name = _name(request)
    change = wire.StateChange.from_json(await _body(request))
    return _operation_reply(await agent.change_state(name, change))


async def exec_in(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    name = _name(request)
    req = wire.ExecRequest.from_json(await _body(request))
    return _operation_reply(await agent.exec(name, req))


async def reset_guest(request: web.Request) -> web.Response:
    """POST /1.0/guests/NAME/reset: back to its template, but for the paths to keep."""
    agent = request.app[AGENT_KEY]
    name = _name(request)
    body = await _body(request) if request.can_read_body else {}
    return _operation_reply(await agent.reset(name, wire.ResetRequest.from_json(body)))


async def archive(request: web.Request) -> web.StreamResponse:
    """GET /1.0/guests/NAME/archive?path=P&max_bytes=N: a tar of P, made inside the guest.

    The headers go out with tar's first bytes, so a tar that fails before it
    writes anything (no such path) is an ordinary JSON error. Once the body
    has begun, an archive that is not whole (cut at max_bytes, or tar failed
    half-way) ends without the chunked encoding's last chunk: the connection
    is closed and the client sees an incomplete body, never a short archive
    that looks whole. X-Operation names the operation with the outcome.
    """
    from hostagent.archive import ArchiveFailed

    agent = request.app[AGENT_KEY]
    name = _name(request)
    req = wire.ArchiveRequest.from_query(request.query.items())
    async with agent.archive_slots:
        stream, op = await agent.archive(name, req)
        resp: web.StreamResponse | None = None

        def alive() -> bool:
            return request.transport is not None and not request.transport.is_closing()

        try:
            chunk = await stream.next(alive)
            if chunk is None:
                await op.done.wait()
                if op.state != wire.OP_SUCCESS:
                    if isinstance(op.exc, ArchiveFailed):
                        raise ApiError(404 if op.exc.missing else 422, str(op.exc), "path")
                    raise ApiError(409, op.error or f"operation {op.id} is {op.state}", "name")
            resp = web.StreamResponse(headers={
                "Content-Type": "application/x-tar", "Cache-Control": "no-cache",
                "X-Archive-Limit": str(req.max_bytes), "X-Operation": op.id})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            while chunk is not None:
                await resp.write(chunk)
                chunk = await stream.next(alive)
            await op.done.wait()
            if op.state == wire.OP_SUCCESS and not (op.result or {}).get("truncated"):
                await resp.write_eof()
            elif request.transport is not None:
                request.transport.close()  # flushes what was written, then no last chunk
            return resp
        except ConnectionError:  # the client went away
            return resp if resp is not None else web.StreamResponse()
        finally:
            if not op.done.is_set():
                stream.cancel()


async def open_console(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    name = _name(request)
    body = await _body(request) if request.can_read_body else {}
    info = await agent.open_console(name, wire.ConsoleRequest.from_json(body))
    return _json(info.to_json(), 201, {"Location": f"{V}/consoles/{info.id}"})


async def list_consoles(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _json([c.to_json() for c in agent.consoles.all()])


async def get_console(request: web.Request) -> web.StreamResponse:
    """GET /1.0/consoles/ID: the session; with a websocket upgrade, attach to it.

    Binary frames are the terminal's bytes both ways; text frames are JSON
    control messages (wire.ConsoleResize in, wire.ConsoleExit and
    wire.ConsoleError out). hostagent.consoles has the rules.
    """
    agent = request.app[AGENT_KEY]
    session = agent.consoles.get(request.match_info["id"])
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return _json(session.info().to_json())
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=wire.MAX_BODY)
    await ws.prepare(request)
    await session.attach(ws, request)
    return ws


async def close_console(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    ended = await agent.consoles.close(request.match_info["id"])
    return _json(ended.to_json())


async def processes(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    rows = await agent.processes(_name(request))
    return _json([r.to_json() for r in rows])


async def stats(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _json([u.to_json() for u in await agent.stats()])


async def guest_usage(request: web.Request) -> web.Response:
    """GET /1.0/guests/NAME/usage: one running guest's GET /1.0/stats row, for a
    client that watches one guest (the panel's vserver page) rather than the host."""
    from hostagent import usage

    agent = request.app[AGENT_KEY]
    name = _name(request)
    if not agent.paths.conf(name).exists():
        raise ApiError(404, f"no vserver {name}", "name")
    u = await asyncio.get_running_loop().run_in_executor(None, usage.usage_of, agent.paths,
                                                         name)
    if u is None:
        raise ApiError(409, f"{name} is not running", "name")
    return _json(wire.Usage.from_json(u.as_dict()).to_json())


async def quota_all(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _json(await agent.quotas())


async def quota_one(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _json((await agent.quotas([_name(request)]))[0])


async def list_templates(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _json([t.to_json() for t in await agent.templates()])


async def create_template(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    req = wire.TemplateCreate.from_json(await _body(request))
    return _operation_reply(agent.create_template(req))


async def delete_template(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    await agent.delete_template(_name(request))
    return _json({})


async def list_operations(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return _json([op.wire().to_json() for op in agent.ops.all()])


def _operation(request: web.Request) -> Any:
    agent = request.app[AGENT_KEY]
    op_id = request.match_info["id"]
    op = agent.ops.get(op_id)
    if op is None:
        raise ApiError(404, f"no operation {op_id[:64]!r}", "id")
    return op


async def get_operation(request: web.Request) -> web.Response:
    return _json(_operation(request).wire().to_json())


async def wait_operation(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    op = _operation(request)
    await agent.ops.wait(op, _query_float(request, "timeout", 30.0, 0.0, 3600.0))
    return _json(op.wire().to_json())


async def cancel_operation(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    op = _operation(request)
    if not agent.ops.cancel(op.id):
        raise ApiError(409, f"operation {op.id} is {op.state}: only a pending operation "
                       "can be cancelled", "id")
    return _json(op.wire().to_json())


EVENT_TYPES = (wire.TYPE_LIFECYCLE, wire.TYPE_OPERATION)


async def events(request: web.Request) -> web.StreamResponse:
    """GET /1.0/events: NDJSON (chunked), or a websocket when asked to upgrade.

    ?type=lifecycle,operation  ?guest=a,b  ?processes=a,b&interval=2
    """
    agent = request.app[AGENT_KEY]
    types = request.query.get("type", ",".join(EVENT_TYPES)).split(",")
    for t in types:
        if t not in EVENT_TYPES:
            raise ApiError(400, f"unknown event type {t[:32]!r}; use "
                           + " or ".join(EVENT_TYPES), "type")
    guests = _query_names(request, "guest")
    watched = _query_names(request, "processes") or []
    if len(watched) > 64:
        raise ApiError(400, "at most 64 guests' processes per listener", "processes")
    interval = _query_float(request, "interval", 2.0, 0.5, 3600.0)
    lst = agent.bus.subscribe(types, guests, watched, interval)
    try:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse(heartbeat=30)
            await ws.prepare(request)
            reader = asyncio.get_running_loop().create_task(_drain(ws))
            try:
                while (ev := await lst.next()) is not None:
                    await ws.send_str(json.dumps(ev.to_json()))
            finally:
                reader.cancel()
                await ws.close()
            return ws
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                           "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"")
        while (ev := await lst.next()) is not None:
            await resp.write(json.dumps(ev.to_json()).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp
    except ConnectionError:
        return web.StreamResponse()
    finally:
        agent.bus.unsubscribe(lst)


async def _drain(ws: web.WebSocketResponse) -> None:
    """A websocket listener only listens: read (and drop) what it sends until it closes."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break


def make_app(agent: Agent) -> web.Application:
    app = web.Application(client_max_size=wire.MAX_BODY, middlewares=[_guard])
    app[AGENT_KEY] = agent
    r = app.router
    r.add_get(V, host_info)
    r.add_get(f"{V}/guests", list_guests)
    r.add_post(f"{V}/guests", build_guest)
    r.add_get(f"{V}/guests/{{name}}", get_guest)
    r.add_delete(f"{V}/guests/{{name}}", delete_guest)
    r.add_get(f"{V}/guests/{{name}}/config", get_config)
    r.add_put(f"{V}/guests/{{name}}/config", put_config)
    r.add_put(f"{V}/guests/{{name}}/state", change_state)
    r.add_post(f"{V}/guests/{{name}}/exec", exec_in)
    r.add_post(f"{V}/guests/{{name}}/reset", reset_guest)
    r.add_get(f"{V}/guests/{{name}}/archive", archive)
    r.add_get(f"{V}/guests/{{name}}/processes", processes)
    r.add_get(f"{V}/guests/{{name}}/usage", guest_usage)
    r.add_post(f"{V}/guests/{{name}}/console", open_console)
    r.add_get(f"{V}/consoles", list_consoles)
    r.add_get(f"{V}/consoles/{{id}}", get_console)
    r.add_delete(f"{V}/consoles/{{id}}", close_console)
    r.add_get(f"{V}/guests/{{name}}/quota", quota_one)
    r.add_get(f"{V}/stats", stats)
    r.add_get(f"{V}/quotas", quota_all)
    r.add_get(f"{V}/templates", list_templates)
    r.add_post(f"{V}/templates", create_template)
    r.add_delete(f"{V}/templates/{{name}}", delete_template)
    r.add_get(f"{V}/operations", list_operations)
    r.add_get(f"{V}/operations/{{id}}", get_operation)
    r.add_get(f"{V}/operations/{{id}}/wait", wait_operation)
    r.add_delete(f"{V}/operations/{{id}}", cancel_operation)
    r.add_get(f"{V}/events", events)
    return app

