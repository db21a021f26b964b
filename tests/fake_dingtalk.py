"""A local fake of DingTalk's side of Stream mode, on 127.0.0.1.

One aiohttp server plays three parts:
  POST /v1.0/gateway/connections/open   hands out a websocket endpoint and a single-use ticket
  GET  /connect?ticket=...              the websocket gateway: pushes frames, collects acks
  POST /agent/send?session=...          the sessionWebhook sink: records replies

Point the bot at it with DINGTALK_OPENAPI_ENDPOINT=fake.base_url and allow the loopback webhook
host (WEBHOOK_ALLOWED_HOSTS=127.0.0.1). Used by the tests and by `python -m tests.simulate`.

On its own, for a bot or an app of yours (docs/offline.md#the-fake-on-its-own):

    python -m tests.fake_dingtalk [--port 8765]

prints the environment lines that point a bot or app at it, then waits; `python -m tests.simulate --fake URL`
sends calls to whatever is connected to it (through POST /simulator/invoke).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import WSMsgType, web

GRAPH_TOPIC = "/v1.0/graph/api/invoke"
LOOPBACK = "127.0.0.1,localhost"  # the bot honours HTTP(S)_PROXY; the fake must never be reached through one


def unproxied_loopback(env: dict[str, str]) -> dict[str, str]:
    """`env` with loopback added to NO_PROXY / no_proxy."""
    return env | {key: ",".join(filter(None, (env.get(key), LOOPBACK))) for key in ("NO_PROXY", "no_proxy")}


def bot_env(fake: FakeDingTalk | None = None, **extra: str) -> dict[str, str]:
    """Environment for `python bot.py` pointed at `fake`: no inherited DingTalk settings, loopback unproxied."""
    prefixes = ("CLIENT_", "DINGTALK_", "WEBHOOK_", "HEALTH_")
    env = unproxied_loopback({k: v for k, v in os.environ.items() if not k.startswith(prefixes)})
    env["PYTHONUNBUFFERED"] = "1"
    if fake is not None:
        env.update(
            CLIENT_ID=fake.client_id,
            CLIENT_SECRET=fake.client_secret,
            DINGTALK_OPENAPI_ENDPOINT=fake.base_url,
            WEBHOOK_ALLOWED_HOSTS=f"{fake.host}:{fake.port}",
        )
    return env | extra


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OpenRequest:
    body: dict[str, Any]
    status: int  # what the fake answered
    headers: dict[str, str] = field(default_factory=dict)
    received_at: float = field(default_factory=time.monotonic)


@dataclass
class WebhookPost:
    session: str
    host: str
    payload: Any
    received_at: float

    @property
    def markdown(self) -> str | None:
        """The markdown of an AI card reply, if this post is one."""
        try:
            return self.payload["content"]["cardData"]["content"]
        except (KeyError, TypeError):
            return None


@dataclass
class GraphResult:
    """The Graph response a bot put in its ack, decoded from its three layers of JSON."""

    ack: dict[str, Any]
    status: int | None
    headers: dict[str, Any]
    body: Any
    elapsed: float

    @classmethod
    def from_ack(cls, ack: dict[str, Any], elapsed: float) -> GraphResult:
        response = json.loads(ack["data"])["response"]
        body = response.get("body")
        try:
            body = json.loads(body)
        except (TypeError, ValueError):
            pass
        return cls(ack, response["statusLine"]["code"], response.get("headers", {}), body, elapsed)


@dataclass
class Connection:
    """One live websocket from a bot."""

    id: str
    ws: web.WebSocketResponse
    transport: Any
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    frozen: bool = False  # stop answering the bot's websocket pings: a silently dead connection
    retired: bool = False  # sent `disconnect`; closed by the fake `retire_close_after` seconds later
    pings: int = 0  # websocket pings from the bot
    handshake: dict[str, str] = field(default_factory=dict)  # the bot's handshake request headers


class FakeDingTalk:
    """The fake. Configure faults by setting the public attributes before or during a test."""

    def __init__(self, client_id: str = "test-client-id", client_secret: str = "test-client-secret") -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        # sessionWebhook sink behaviour
        self.webhook_latency = 0.0
        self.webhook_status = 200
        self.webhook_errcode = 0
        self.webhook_answer: dict[str, Any] | None = None  # answer 200 with this JSON instead
        self.webhook_cut_off = False  # close the connection halfway through the response
        self.webhook_endless: float | None = None  # answer 200, then stream a body for ever, a chunk every this many s
        self.webhook_streamed = 0  # bytes of such endless bodies written so far
        self.slow_sessions: dict[str, float] = {}  # session -> latency, overriding webhook_latency
        self.webhooks_held = False  # answer no webhook post until release_webhooks(): replies that hang until told
        self.expired_sessions: set[str] = set()
        # connection-open faults
        self.open_status: int | None = None  # answer with this HTTP error status
        self.open_raw_body: str | bytes | None = None  # answer 200 with this instead of endpoint/ticket
        self.open_delay = 0.0  # seconds before answering (a hanging open)
        self.endpoint_query = ""  # a query string the endpoint carries before the bot adds its ticket
        self.xml_without_accept = True  # answer XML to an open without `Accept: application/json` (Node SDK's note)
        # gateway habits and faults
        self.reject_websocket = False  # answer the websocket handshake with 403
        self.disconnect_at_once = False  # send `disconnect` on every new connection as soon as it opens
        self.retire_close_after = 10.0  # DingTalk closes a connection this long after its `disconnect`
        self.push_to_retired = False  # pushes without a `conn` may go to a retired connection too
        self.strict_acks = True  # an ack counts only on the connection its frame went out on
        self.pong_delay = 0.0  # answer each websocket ping this late ...
        self.pong_jitter = 0.0  # ... give or take up to this much
        self.chatter = False  # send SYSTEM CONNECTED, REGISTERED and KEEPALIVE frames on every new connection
        self.max_frame_bytes = 4 << 20  # a bigger frame from the bot closes its connection with 1009 (aiohttp's)
        # what the fake saw
        self.open_requests: list[OpenRequest] = []  # answered ones
        self.open_attempts = 0  # arrived ones, answered or not
        self.webhook_posts: list[WebhookPost] = []
        self.connections: list[Connection] = []  # every connection ever made, in order
        self.acks: dict[str, list[dict[str, Any]]] = {}
        self.misrouted_acks: list[dict[str, Any]] = []  # acks on another connection than their frame's
        self.frames_out: list[dict[str, Any]] = []
        self._sent_on: dict[str, set[str]] = {}  # messageId -> the connections its frames went out on
        self._background: set[asyncio.Task] = set()
        self.trace: Any = None  # optional callable(direction, frame) for --verbose output
        self._tickets: set[str] = set()
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.tls = False

    # ----- lifecycle -----

    async def start(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> FakeDingTalk:
        """Serve on host:port; with `tls`, every part over TLS (https://, wss://), as the real gateway is."""
        app = web.Application()
        app.router.add_post("/v1.0/gateway/connections/open", self._open)
        app.router.add_get("/connect", self._connect)
        app.router.add_post("/agent/send", self._webhook)
        app.router.add_get("/simulator/status", self._simulator_status)
        app.router.add_post("/simulator/invoke", self._simulator_invoke)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=tls)
        await site.start()
        self.host, self.tls = host, tls is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        for conn in self.live_connections(retired=True):
            await conn.ws.close(code=1001, message=b"fake shutting down")
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def webhook_url(self, session: str | None = None, host: str | None = None) -> str:
        session = session or f"aswh_{uuid.uuid4().hex}"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host or self.host}:{self.port}/agent/send?session={session}"

    def live_connections(self, retired: bool = False) -> list[Connection]:
        """The open connections, without those sent `disconnect` unless `retired`."""
        return [c for c in self.connections if not c.closed.is_set() and (retired or not c.retired)]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> Any:
        """Wait until predicate() is truthy (re-checked whenever the fake sees something). The default timeout is
        generous, for a busy machine: a bound on the wait, not a measure of speed."""
        async with self._changed:
            return await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def wait_connected(self, count: int = 1, timeout: float = 30.0) -> list[Connection]:
        await self.wait_for(lambda: len(self.live_connections()) >= count, timeout)
        return self.live_connections()

    # ----- HTTP: connection open -----

    async def _open(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        self.open_attempts += 1
        headers = dict(request.headers)
        await self._notify()
        if self.open_delay:
            await asyncio.sleep(self.open_delay)
        if self.xml_without_accept and request.headers.get("Accept") != "application/json":
            self.open_requests.append(OpenRequest(body, 200, headers))
            await self._notify()
            xml = "<?xml version='1.0' encoding='UTF-8'?><OpenConnectionResponse><endpoint>…</endpoint>"
            return web.Response(text=f"{xml}</OpenConnectionResponse>", content_type="application/xml")
        if body.get("clientId") != self.client_id or body.get("clientSecret") != self.client_secret:
            status, answer = 401, {"requestid": uuid.uuid4().hex, "code": "authFailed", "message": "鉴权失败"}
        elif self.open_status is not None:
            status, answer = self.open_status, {"requestid": uuid.uuid4().hex, "code": "serverError", "message": "fake"}
        elif self.open_raw_body is not None:
            self.open_requests.append(OpenRequest(body, 200, headers))
            await self._notify()
            raw = self.open_raw_body
            return web.Response(body=raw.encode() if isinstance(raw, str) else raw, content_type="application/json")
        else:
            ticket = str(uuid.uuid4())
            self._tickets.add(ticket)
            endpoint = f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}/connect" + (
                f"?{self.endpoint_query}" if self.endpoint_query else ""
            )
            status, answer = 200, {"endpoint": endpoint, "ticket": ticket}
        self.open_requests.append(OpenRequest(body, status, headers))
        await self._notify()
        return web.json_response(answer, status=status)

    # ----- websocket gateway -----

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if self.reject_websocket:
            return web.json_response({"code": "forbidden"}, status=403)
        expected = dict(parse_qsl(self.endpoint_query))
        if ticket not in self._tickets or any(request.query.get(k) != v for k, v in expected.items()):
            return web.json_response({"code": "invalidTicket"}, status=401)
        self._tickets.discard(ticket)  # a ticket opens one connection only
        ws = web.WebSocketResponse(autoping=False, max_msg_size=self.max_frame_bytes)  # pongs by hand: see below
        await ws.prepare(request)
        conn = Connection(id=f"conn-{next(self._ids)}", ws=ws, transport=request.transport)
        conn.handshake = dict(request.headers)
        self.connections.append(conn)
        await self._notify()
        if self.chatter:
            for topic in ("CONNECTED", "REGISTERED", "KEEPALIVE"):
                await self.send_frame("SYSTEM", topic, {}, conn=conn)
        if self.disconnect_at_once:
            await self.disconnect(conn)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.PING:
                    conn.pings += 1
                    await self._notify()
                if msg.type == WSMsgType.PING and not conn.frozen and (self.pong_delay or self.pong_jitter):
                    self._later(self._late_pong(conn, msg.data))
                elif msg.type == WSMsgType.PING and not conn.frozen:
                    await ws.pong(msg.data)
                if msg.type != WSMsgType.TEXT or conn.frozen:
                    continue
                ack = json.loads(msg.data)
                if self.trace:
                    self.trace("<", ack)
                message_id = ack.get("headers", {}).get("messageId", "")
                if not isinstance(message_id, str):  # file odd ids under their JSON text
                    message_id = json.dumps(message_id)
                if self.strict_acks and conn.id not in self._sent_on.get(message_id, {conn.id}):
                    self.misrouted_acks.append(ack)
                else:
                    self.acks.setdefault(message_id, []).append(ack)
                await self._notify()
        finally:
            conn.closed.set()
            await self._notify()
        return ws

    def _later(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _late_pong(self, conn: Connection, data: bytes) -> None:
        """Answer a websocket ping `pong_delay` (give or take `pong_jitter`) seconds late: a jittery network."""
        await asyncio.sleep(max(0.0, self.pong_delay + random.uniform(-self.pong_jitter, self.pong_jitter)))
        with contextlib.suppress(ConnectionError, RuntimeError):  # closed meanwhile
            await conn.ws.pong(data)

    def _pick(self, conn: Connection | None) -> Connection:
        if conn is not None:
            return conn
        live = self.live_connections(retired=self.push_to_retired)
        if not live:
            raise RuntimeError("no bot is connected to the fake gateway")
        return live[next(self._ids) % len(live)]  # spread pushes, as DingTalk does

    async def send_frame(
        self,
        type_: str,
        topic: str,
        data: Any,
        *,
        message_id: str | None = None,
        conn: Connection | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Push one frame; `data` is sent as given if a str, else JSON-encoded; `headers` override the
        usual ones; message_id="" sends none. Returns the messageId."""
        conn = self._pick(conn)
        message_id = f"msg-{uuid.uuid4().hex[:12]}" if message_id is None else message_id
        frame = {
            "specVersion": "1.0",
            "type": type_,
            "headers": {
                "appId": "fake-app",
                "connectionId": conn.id,
                "contentType": "application/json",
                "messageId": message_id,
                "time": str(int(time.time() * 1000)),
                "topic": topic,
                **(headers or {}),
            },
            "data": data if isinstance(data, str) else json.dumps(data, ensure_ascii=False),
        }
        if not message_id:
            del frame["headers"]["messageId"]
        self._sent_on.setdefault(message_id, set()).add(conn.id)
        self.frames_out.append(frame)
        if self.trace:
            self.trace(">", frame)
        await conn.ws.send_str(json.dumps(frame, ensure_ascii=False))
        return message_id

    async def wait_ack(self, message_id: str, timeout: float = 30.0, count: int = 1) -> dict[str, Any]:
        await self.wait_for(lambda: len(self.acks.get(message_id, [])) >= count, timeout)
        return self.acks[message_id][count - 1]

    async def invoke(
        self,
        graph_request: dict[str, Any] | str,
        *,
        message_id: str | None = None,
        timeout: float = 30.0,
        conn: Connection | None = None,
    ) -> GraphResult:
        """Push a Graph callback and wait for its ack."""
        started = time.monotonic()
        message_id = await self.send_frame("CALLBACK", GRAPH_TOPIC, graph_request, message_id=message_id, conn=conn)
        ack = await self.wait_ack(message_id, timeout)
        return GraphResult.from_ack(ack, time.monotonic() - started)

    async def invoke_many(self, requests: list[dict[str, Any]], timeout: float = 30.0) -> list[GraphResult]:
        """Push several Graph callbacks at once and wait for all their acks."""
        return await asyncio.gather(*(self.invoke(r, timeout=timeout) for r in requests))

    async def ping(self, conn: Connection | None = None, timeout: float = 30.0) -> dict[str, Any]:
        opaque = uuid.uuid4().hex
        message_id = await self.send_frame("SYSTEM", "ping", {"opaque": opaque}, conn=conn)
        ack = await self.wait_ack(message_id, timeout)
        if json.loads(ack["data"]).get("opaque") != opaque:
            raise AssertionError(f"ping ack lost the opaque: {ack}")
        return ack

    async def disconnect(self, conn: Connection | None = None) -> None:
        """Send SYSTEM disconnect and, like DingTalk, close the connection `retire_close_after` seconds later
        (unless the bot closed it first); pushes without a `conn` no longer go to it (unless push_to_retired)."""
        conn = self._pick(conn)
        conn.retired = True
        await self.send_frame("SYSTEM", "disconnect", {"reason": "connection is expired"}, conn=conn)

        async def close_later() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.closed.wait(), self.retire_close_after)
            await conn.ws.close(code=1000, message=b"connection retired")

        self._later(close_later())

    async def release_webhooks(self) -> None:
        """Let the webhook posts held by `webhooks_held` be answered, and those to come."""
        self.webhooks_held = False
        await self._notify()

    async def drop(self, conn: Connection) -> None:
        """Cut the TCP connection without a websocket close frame."""
        conn.transport.abort()
        await conn.closed.wait()

    # ----- sessionWebhook sink -----

    async def _webhook(self, request: web.Request) -> web.Response:
        session = request.query.get("session", "")
        try:
            payload = await request.json()
        except ValueError:
            payload = await request.text()
        self.webhook_posts.append(WebhookPost(session, request.host, payload, time.monotonic()))
        await self._notify()
        latency = self.slow_sessions.get(session, self.webhook_latency)
        if latency:
            await asyncio.sleep(latency)
        if self.webhooks_held:
            async with self._changed:
                await self._changed.wait_for(lambda: not self.webhooks_held)
        if self.webhook_endless is not None:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                while True:  # until the bot hangs up
                    await response.write(b" " * 65536)
                    self.webhook_streamed += 65536
                    await asyncio.sleep(self.webhook_endless)
            return response
        if self.webhook_cut_off:
            response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "64"})
            await response.prepare(request)
            await response.write(b'{"errcode": 0, "errm')
            request.transport.abort()
            return response
        if session in self.expired_sessions:
            return web.json_response({"errcode": 300001, "errmsg": "session 不存在"})
        if self.webhook_status != 200:
            return web.json_response({"code": "serverError", "message": "fake failure"}, status=self.webhook_status)
        if self.webhook_answer is not None:
            return web.json_response(self.webhook_answer)
        if self.webhook_errcode:
            return web.json_response({"errcode": self.webhook_errcode, "errmsg": "fake errcode"})
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    # ----- HTTP: for the simulator, when the fake runs on its own -----

    async def _simulator_status(self, _: web.Request) -> web.Response:
        return web.json_response({"connections": len(self.live_connections())})

    async def _simulator_invoke(self, request: web.Request) -> web.Response:
        """Push one Graph callback to a connected bot or app; answer with its ack and what was posted to the
        callback's sessionWebhook (the session given)."""
        call = await request.json()
        try:
            result = await self.invoke(call["request"], timeout=float(call.get("timeout", 15)))
        except RuntimeError as exc:  # nothing connected
            return web.json_response({"error": str(exc)}, status=503)
        except TimeoutError:
            return web.json_response({"error": "no ack: the bot did not answer"}, status=504)
        posts = [vars(post) for post in self.webhook_posts if post.session == call.get("session")]
        return web.json_response({"ack": result.ack, "elapsed": result.elapsed, "posts": posts})


class LoopbackServer:
    """A raw TCP server on 127.0.0.1, a free port; a subclass says how it serves each connection (`_serve`)."""

    _server: asyncio.Server | None = None
    port = 0

    async def start(self) -> Any:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ForwardProxy(LoopbackServer):
    """A plain HTTP proxy on 127.0.0.1 that records what passes through it: absolute-form requests
    (plain http://) are forwarded, CONNECT (websockets, https://) is tunnelled."""

    def __init__(self, require_auth: bool = False) -> None:
        self.requests: list[str] = []  # "POST http://127.0.0.1:1234/v1.0/gateway/...", "CONNECT 127.0.0.1:1234"
        self.require_auth = require_auth  # answer every request 407, as a proxy refusing the credentials does

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, rest = head.split(b"\r\n", 1)
            method, target, version = request_line.decode().split(" ", 2)
            self.requests.append(f"{method} {target}")
            if self.require_auth:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=p\r\n")
                writer.write(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # absolute form: on in origin form, one request per connection so each one is seen here
                url = urlsplit(target)
                upstream_reader, upstream_writer = await asyncio.open_connection(url.hostname, url.port)
                path = url.path + (f"?{url.query}" if url.query else "")
                upstream_writer.write(f"{method} {path} {version}\r\nConnection: close\r\n".encode() + rest)
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def graph_request(
    path: str, params: dict[str, Any], *, method: str = "POST", session_webhook: str | None = None
) -> dict[str, Any]:
    """A Graph callback payload as DingTalk builds it: POST params in a JSON body string, GET ones in the query."""
    params = dict(params)
    if session_webhook is not None:
        params["sessionWebhook"] = session_webhook
    if method.upper() == "GET":
        uri = f"{path}?{urlencode(params)}" if params else path
        body = "{}"
    else:
        uri, body = path, json.dumps(params, ensure_ascii=False)
    return {
        "requestLine": {"method": method.upper(), "uri": uri},
        "headers": {"content-type": "application/json"},
        "body": body,
    }


async def serve_alone(port: int) -> None:
    """The fake on its own until Ctrl+C: prints what points a bot or app at it, and each connection as it comes."""
    fake = await FakeDingTalk(client_id="fake-client-id", client_secret="fake-client-secret").start(port=port)
    print("# The local fake DingTalk is listening. Point a bot or app at it (run these in its terminal, or put the")
    print("# lines without `export` in its .env):")
    for key, value in bot_env(fake).items():
        if key.startswith(("CLIENT_", "DINGTALK_", "WEBHOOK_")) or key in ("NO_PROXY", "no_proxy"):
            print(f"export {key}={value}")
    print(f"# Then, in another terminal: python -m tests.simulate --fake {fake.base_url} [--tools YOUR_TOOLS.yaml")
    print("#   --actions YOUR_MODULE] [--path /v1/...] [values...]   (the tools file and actions your app serves)")
    print("# Ctrl+C stops the fake.", flush=True)
    stop, loop, seen = asyncio.Event(), asyncio.get_running_loop(), 0
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        if len(fake.connections) != seen:
            seen = len(fake.connections)
            print(f"# connected: {len(fake.live_connections())} connection(s) open", flush=True)
    await fake.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_dingtalk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="the port to listen on (default: a free one)")
    asyncio.run(serve_alone(parser.parse_args().port))


if __name__ == "__main__":
    main()
