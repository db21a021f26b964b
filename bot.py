"""DingTalk AI assistant (钉钉 AI 助理) action served over Stream mode.

DingTalk pushes each call of an action declared in tools.yaml over a websocket
("Stream mode", no public URL needed). This bot runs the matching async function
in ACTIONS and replies with its markdown through the conversation's sessionWebhook.

Run:   python bot.py          (CLIENT_ID / CLIENT_SECRET from the environment or .env)
Stop:  Ctrl+C or SIGTERM      (in-flight replies finish first, up to SHUTDOWN_GRACE_SECONDS)

运行：python bot.py（从环境变量或 .env 读取 CLIENT_ID / CLIENT_SECRET）；按 Ctrl+C 停止。
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import random
import re
import signal
import sys
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlsplit

import aiohttp
import dingtalk_stream
import websockets
import websockets.exceptions  # websockets>=15 loads submodules lazily; bind it before use
from aiohttp import web
from dingtalk_stream.version import VERSION_STRING as SDK_VERSION
from dotenv import load_dotenv
from websockets.protocol import State as WebSocketState

log = logging.getLogger("bot")

# ---------------------------------------------------------------------------------------------
# Config / 配置
# ---------------------------------------------------------------------------------------------

GRAPH_TOPIC = dingtalk_stream.GraphMessage.TOPIC  # "/v1.0/graph/api/invoke"
MARKDOWN_CARD_TEMPLATE_ID = dingtalk_stream.GraphHandler.MARKDOWN_TEMPLATE_ID
# AI assistant webhooks live on api.dingtalk.com, chatbot ones on oapi.dingtalk.com: accept both.
DINGTALK_WEBHOOK_HOSTS = frozenset({"api.dingtalk.com", "oapi.dingtalk.com"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
RECONNECT_MAX_DELAY_SECONDS = 60.0
REMEMBERED_CALLBACKS = 10_000  # results kept by messageId, to answer redeliveries without replying twice
MAX_FRAMES_IN_FLIGHT = 500  # per connection; past it, reading pauses until one finishes


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class Settings:
    client_id: str
    client_secret: str
    instances: int = 1
    health_host: str = "127.0.0.1"
    health_port: int | None = None
    log_level: str = "INFO"
    # Action + webhook stay under ~16 s, the earliest redelivery of an unacked callback reported.
    webhook_timeout_seconds: float = 5.0
    action_timeout_seconds: float = 10.0
    shutdown_grace_seconds: float = 20.0
    webhook_allowed_hosts: frozenset[str] = frozenset()
    connect_timeout_seconds: float = 10.0
    keepalive_seconds: float = 15.0
    openapi_endpoint: str = "https://api.dingtalk.com"


def load_settings(env: Mapping[str, str] = os.environ) -> Settings:
    """Build Settings from environment variables; raise ConfigError naming the bad key."""

    def get(key: str) -> str | None:
        value = env.get(key, "").strip()
        return value or None

    def number(key: str, default: float, kind: type, low: float, high: float) -> Any:
        raw = get(key)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a valid {kind.__name__}") from None
        if not low <= value <= high:
            raise ConfigError(f"{key}={raw!r} must be between {low} and {high}")
        return value

    for key in ("CLIENT_ID", "CLIENT_SECRET"):
        if get(key) is None:
            raise ConfigError(
                f"{key} is not set: copy .env.example to .env and fill in your app's credentials"
                " (or try the bot offline first: python -m tests.simulate)"
            )
    log_level = (get("LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={log_level!r} must be one of {', '.join(LOG_LEVELS)}")
    allowed = frozenset(h.strip().lower() for h in (get("WEBHOOK_ALLOWED_HOSTS") or "").split(",") if h.strip())
    endpoint = get("DINGTALK_OPENAPI_ENDPOINT") or Settings.openapi_endpoint
    if urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError(f"DINGTALK_OPENAPI_ENDPOINT={endpoint!r} must start with https:// (or http://)")
    defaults = Settings  # the dataclass's field defaults
    return Settings(
        client_id=get("CLIENT_ID") or "",
        client_secret=get("CLIENT_SECRET") or "",
        instances=number("INSTANCES", defaults.instances, int, 1, 32),
        health_host=get("HEALTH_HOST") or defaults.health_host,
        health_port=number("HEALTH_PORT", None, int, 1, 65535),
        log_level=log_level,
        webhook_timeout_seconds=number("WEBHOOK_TIMEOUT_SECONDS", defaults.webhook_timeout_seconds, float, 0.1, 300),
        action_timeout_seconds=number("ACTION_TIMEOUT_SECONDS", defaults.action_timeout_seconds, float, 0.1, 3600),
        shutdown_grace_seconds=number("SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_seconds, float, 0, 3600),
        webhook_allowed_hosts=allowed,
        connect_timeout_seconds=number("CONNECT_TIMEOUT_SECONDS", defaults.connect_timeout_seconds, float, 0.1, 300),
        keepalive_seconds=number("KEEPALIVE_SECONDS", defaults.keepalive_seconds, float, 0.1, 300),
        openapi_endpoint=endpoint,
    )


# ---------------------------------------------------------------------------------------------
# Actions / 动作：the part you edit. One async function per path declared in tools.yaml.
# Parameters arrive as keyword arguments named as in tools.yaml; return markdown.
# ---------------------------------------------------------------------------------------------


async def get_weather(location: str, date: str = "今天") -> str:
    """Demo action: echo the place and day the user asked for, with made-up weather."""
    return (
        f"### {location} · {date}\n"
        "- 天气 / Weather: 晴 Sunny\n"
        "- 温度 / Temperature: 22°C\n\n"
        "> 演示数据，非真实天气 / Demo data, not a real forecast"
    )


Action = Callable[..., Awaitable[str]]

ACTIONS: dict[str, Action] = {
    "/v1/actions/weather": get_weather,
}


# ---------------------------------------------------------------------------------------------
# Handler / 回调处理：Graph callback -> action -> webhook reply -> Graph response in the ack
# ---------------------------------------------------------------------------------------------


class GraphError(Exception):
    """Ends a callback with this Graph status; `reason` is safe to show to the caller."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class GraphCall:
    method: str
    path: str
    params: dict[str, Any]


def parse_graph_request(data: Any) -> GraphCall:
    """Turn callback data into method, path and parameters (query string merged with a JSON body)."""
    if not isinstance(data, dict):
        raise GraphError(400, "callback data is not a JSON object")
    try:
        request = dingtalk_stream.GraphRequest.from_dict(data)
    except (AttributeError, TypeError):
        raise GraphError(400, "requestLine is not a JSON object") from None
    method, uri = request.request_line.method, request.request_line.uri
    if not isinstance(method, str) or method.upper() not in ("GET", "POST"):
        raise GraphError(400, f"unsupported method {method!r}")
    if not isinstance(uri, str):
        raise GraphError(400, "requestLine.uri is not a string")
    url = urlsplit(uri)
    body: Any = request.body
    if body in (None, ""):
        body = {}
    elif isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            body = None
    if not isinstance(body, dict):
        raise GraphError(400, "body is not a JSON object")
    # GET operations carry parameters in the query string, POST ones in the body.
    return GraphCall(method.upper(), url.path, {**dict(parse_qsl(url.query, keep_blank_values=True)), **body})


@dataclass(frozen=True)
class ActionParameters:
    names: frozenset[str]  # the keyword parameters it takes
    required: tuple[str, ...]  # those without a default
    takes_all: bool  # it has **params


@functools.cache
def action_parameters(action: Action) -> ActionParameters:
    """What `action` takes, read from its signature once."""
    params = inspect.signature(action).parameters.values()
    keyword = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return ActionParameters(
        frozenset(p.name for p in keyword),
        tuple(p.name for p in keyword if p.default is p.empty),
        any(p.kind is p.VAR_KEYWORD for p in params),
    )


async def run_action(action: Action, params: dict[str, Any], time_limit: float) -> str:
    """Call `action` with the parameters its signature names; a missing one is the caller's error."""
    takes = action_parameters(action)
    missing = [name for name in takes.required if name not in params]
    if missing:
        raise GraphError(400, f"missing parameter(s): {', '.join(missing)}")
    kwargs = params if takes.takes_all else {k: v for k, v in params.items() if k in takes.names}
    try:
        async with asyncio.timeout(time_limit) as deadline:
            result = await action(**kwargs)
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():  # we are being cancelled (shutdown): let it through
            raise
        log.exception("action %s failed: something it awaited was cancelled", action.__name__)
        raise GraphError(500, "internal error in action") from None
    except Exception as exc:
        if isinstance(exc, TimeoutError) and deadline.expired():  # ours; a TimeoutError from inside is a failure
            log.error("action %s timed out after %.3g s", action.__name__, time_limit)
            raise GraphError(504, "action timed out") from None
        log.exception("action %s failed", action.__name__)
        raise GraphError(500, "internal error in action") from None
    if not isinstance(result, str):
        log.error("action %s returned %s, expected str (markdown)", action.__name__, type(result).__name__)
        raise GraphError(500, "internal error in action")
    return result


def graph_response(status: int, payload: dict[str, Any]) -> dict[str, Any]:
    """The Graph response DingTalk reads from the ack: status line, headers and a JSON body."""
    response = dingtalk_stream.GraphResponse()
    response.status_line.code = status
    response.status_line.reason_phrase = HTTPStatus(status).phrase
    response.headers["Content-Type"] = "application/json"
    response.body = json.dumps(payload, ensure_ascii=False)
    return response.to_dict()


class CallbackLedger:
    """Recent results by messageId, shared by all connections of this process: a redelivered
    callback is answered from memory, so the user never gets a second reply. Bounded: the oldest
    results are forgotten first. (Another process does not see them: keep actions idempotent.)"""

    def __init__(self, capacity: int = REMEMBERED_CALLBACKS) -> None:
        self.results: OrderedDict[str, asyncio.Future] = OrderedDict()  # messageId -> (status, payload)
        self.capacity = capacity

    def claim(self, message_id: str) -> tuple[bool, asyncio.Future]:
        """(True, new entry) for a first delivery, (False, the first one's result) for a redelivery."""
        earlier = self.results.get(message_id)
        if earlier is not None:
            return False, earlier
        result = self.results[message_id] = asyncio.get_running_loop().create_future()
        while len(self.results) > self.capacity:
            self.results.popitem(last=False)
        return True, result

    def forget(self, message_id: str) -> None:
        """The first delivery was cancelled before it had a result: let a redelivery start afresh."""
        result = self.results.pop(message_id, None)
        if result is not None and not result.done():
            result.cancel()


class ActionHandler(dingtalk_stream.GraphHandler):
    """Serves Graph callbacks: dispatch by path to ACTIONS, reply via sessionWebhook, ack the truth."""

    def __init__(self, settings: Settings, http: aiohttp.ClientSession, ledger: CallbackLedger) -> None:
        super().__init__()
        self.settings, self.http, self.ledger = settings, http, ledger

    async def process(self, callback: dingtalk_stream.CallbackMessage) -> tuple[int, dict[str, Any]]:
        message_id = callback.headers.message_id
        if not (message_id and isinstance(message_id, str)):  # nothing to recognise a redelivery by
            status, payload = await self.answer(callback, "-")
            return dingtalk_stream.AckMessage.STATUS_OK, graph_response(status, payload)
        first, result = self.ledger.claim(message_id)
        if not first:
            log.info("callback %s redelivered: answering with the first result, no second reply", message_id)
            status, payload = await asyncio.shield(result)
        else:
            try:
                status, payload = await self.answer(callback, message_id)
            except asyncio.CancelledError:
                self.ledger.forget(message_id)
                raise
            result.set_result((status, payload))
        return dingtalk_stream.AckMessage.STATUS_OK, graph_response(status, payload)

    async def answer(self, callback: dingtalk_stream.CallbackMessage, message_id: str) -> tuple[int, dict[str, Any]]:
        started = time.monotonic()
        call: GraphCall | None = None
        try:
            call = parse_graph_request(callback.data)
            status = await self.serve_call(call)
            payload: dict[str, Any] = {"success": True}
        except GraphError as err:
            log.warning("callback %s: %d %s", message_id, err.status, err.reason)
            status, payload = err.status, {"success": False, "error": err.reason}
        except Exception:  # a bug here must still produce an ack, or DingTalk waits and redelivers
            log.exception("callback %s: unexpected error", message_id)
            status, payload = 500, {"success": False, "error": "internal error"}
        elapsed_ms = (time.monotonic() - started) * 1000
        path = f"{call.method} {call.path}" if call else "-"
        log.info("callback %s %s -> %d in %.0f ms", message_id, path, status, elapsed_ms)
        return status, payload

    async def serve_call(self, call: GraphCall) -> int:
        action = ACTIONS.get(call.path)
        if action is None:
            raise GraphError(404, f"no action for path {call.path}")
        webhook = check_webhook(call.params.get("sessionWebhook"), self.settings.webhook_allowed_hosts)
        markdown = await run_action(action, call.params, self.settings.action_timeout_seconds)
        await reply_markdown(self.http, webhook, markdown, self.settings.webhook_timeout_seconds)
        return 200


# ---------------------------------------------------------------------------------------------
# Reply / 回复：POST an AI card to the sessionWebhook, without blocking the event loop
# ---------------------------------------------------------------------------------------------

_SESSION_TOKEN = re.compile(r"(session=)[^&\s\"'\\]+")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Hide webhook session tokens and the given secret values in a log line."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return _SESSION_TOKEN.sub(r"\1***", text)


def check_webhook(url: Any, extra_hosts: frozenset[str] = frozenset()) -> str:
    """Return `url` if the bot may POST to it, else raise GraphError(400).

    Allowed: https on api.dingtalk.com / oapi.dingtalk.com (default port), or http/https on a
    WEBHOOK_ALLOWED_HOSTS entry ("host" = any port, "host:port" = that port only).
    """
    if not isinstance(url, str) or not url:
        raise GraphError(400, "missing sessionWebhook")
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        raise GraphError(400, "sessionWebhook is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        raise GraphError(400, "sessionWebhook is not a valid http(s) URL")
    if host in extra_hosts or f"{host}:{port}" in extra_hosts:
        return url
    if parts.scheme == "https" and host in DINGTALK_WEBHOOK_HOSTS and port in (None, 443):
        return url
    raise GraphError(400, f"sessionWebhook host {host!r} is not allowed")


@functools.lru_cache(maxsize=64)
def proxy_for(scheme: str, host: str) -> str | None:
    """HTTP(S)_PROXY / NO_PROXY for this host, as urllib reads them, looked up once per host.
    (aiohttp's trust_env=True would look them up, and .netrc, in a thread on every request.)"""
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(scheme)


def post_json(http: aiohttp.ClientSession, url: str, payload: Any, timeout: float, **kwargs: Any) -> Any:
    """POST JSON with a total timeout, no redirects, through the environment's proxy if it names one."""
    parts = urlsplit(url)
    return http.post(
        url,
        json=payload,
        allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=timeout),
        proxy=proxy_for(parts.scheme, parts.hostname or ""),
        **kwargs,
    )


class WebhookError(Exception):
    """The webhook did not accept the reply."""


async def reply_markdown(http: aiohttp.ClientSession, webhook: str, markdown: str, time_limit: float) -> None:
    """POST `markdown` as an AI card (same payload as the SDK's reply_markdown); raise GraphError(502) on failure."""
    payload = {
        "contentType": "ai_card",
        "content": {"templateId": MARKDOWN_CARD_TEMPLATE_ID, "cardData": {"content": markdown}},
    }
    try:
        async with post_json(http, webhook, payload, time_limit) as response:
            status, body = response.status, await response.read()
        if not 200 <= status < 300:
            raise WebhookError(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        # DingTalk reports some failures (e.g. 300001, expired session) with HTTP 200 and an errcode.
        if isinstance(answer, dict) and answer.get("errcode") not in (None, 0, "0"):
            raise WebhookError(f"errcode {answer.get('errcode')}: {answer.get('errmsg', '')}")
    except TimeoutError:
        log.error("webhook %s timed out after %.1f s", redact(webhook), time_limit)
        raise GraphError(502, "reply webhook timed out") from None
    except (aiohttp.ClientError, WebhookError) as exc:
        log.error("webhook %s failed: %s", redact(webhook), redact(str(exc)))
        raise GraphError(502, "reply webhook failed") from None


# ---------------------------------------------------------------------------------------------
# Lifecycle / 生命周期：clients, health endpoint, signals, graceful shutdown
# ---------------------------------------------------------------------------------------------


class CredentialsRejected(Exception):
    """DingTalk refused CLIENT_ID / CLIENT_SECRET (HTTP 401, authFailed)."""


class OpenFailed(Exception):
    """Connection open failed for another reason; worth retrying."""


def build_client(settings: Settings, handler: ActionHandler) -> dingtalk_stream.DingTalkStreamClient:
    """The SDK client, holding our handler for the Graph topic (and the SDK's own for SYSTEM frames)."""
    credential = dingtalk_stream.Credential(settings.client_id, settings.client_secret)
    client = dingtalk_stream.DingTalkStreamClient(credential, logger=logging.getLogger("dingtalk_stream.client"))
    client.register_callback_handler(GRAPH_TOPIC, handler)
    return client


async def open_connection(http: aiohttp.ClientSession, settings: Settings, topics: list[str]) -> str:
    """Ask DingTalk for a Stream endpoint and a one-time ticket; return the websocket URL.

    Done here with aiohttp and a timeout, not by the SDK: 0.24.3 opens with a blocking, timeout-less
    `requests.post` on the event loop, and neither version tells its caller that credentials were refused.
    """
    body = {
        "clientId": settings.client_id,
        "clientSecret": settings.client_secret,
        "subscriptions": [{"type": "CALLBACK", "topic": topic} for topic in topics],
        "ua": f"dingtalk-sdk-python/v{SDK_VERSION}-union",
        "localIp": "",
    }
    url = settings.openapi_endpoint.rstrip("/") + "/v1.0/gateway/connections/open"
    timeout = settings.connect_timeout_seconds
    try:
        async with post_json(http, url, body, timeout, headers={"Accept": "application/json"}) as response:
            status, text = response.status, (await response.read()).decode("utf-8", "replace")
    except TimeoutError:
        raise OpenFailed(f"connection open: no answer within {settings.connect_timeout_seconds:.0f} s") from None
    except aiohttp.ClientError as exc:
        raise OpenFailed(f"connection open: {exc or type(exc).__name__}") from None
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    answer = answer if isinstance(answer, dict) else {}
    if status == 401 or answer.get("code") == "authFailed":
        raise CredentialsRejected(f"{answer.get('code', status)}: {answer.get('message', text[:200])}")
    endpoint, ticket = answer.get("endpoint"), answer.get("ticket")
    if status != 200 or not (isinstance(endpoint, str) and endpoint and isinstance(ticket, str) and ticket):
        raise OpenFailed(f"connection open: HTTP {status}, no endpoint and ticket in {text[:200]!r}")
    return f"{endpoint}?ticket={quote_plus(ticket)}"


def reconnect_delay(failures: int) -> float:
    """No wait after a healthy connection ends, then about 1, 2, 4 … 60 s; jitter keeps bots out of step."""
    if failures == 0:
        return 0.0
    return min(2.0 ** (failures - 1), RECONNECT_MAX_DELAY_SECONDS) + random.uniform(0, 1)


class StreamLink:
    """One Stream connection: open it, answer every frame through the SDK's handlers, reconnect with backoff."""

    def __init__(self, name: str, client: dingtalk_stream.DingTalkStreamClient, http: aiohttp.ClientSession,
                 settings: Settings, accepted: asyncio.Event, stopping: asyncio.Event) -> None:  # fmt: skip
        self.name, self.client, self.http, self.settings = name, client, http, settings
        self.accepted = accepted  # set once DingTalk accepted the credentials on any connection
        self.stopping = stopping  # set on shutdown: take no new callbacks, open no new connection
        self.websocket: Any = None
        self.failures = 1  # failed attempts in a row; 0 once a connection has received a frame
        # Frames being handled -> messageId. A task ends after its ack is sent, so shutdown waits on these.
        self.frame_tasks: dict[asyncio.Task, str] = {}

    @property
    def connected(self) -> bool:
        return self.websocket is not None and self.websocket.state is WebSocketState.OPEN

    async def run(self) -> None:
        """Stay connected until stopping. Credentials refused before any connection ever succeeded
        are a configuration error: CredentialsRejected is raised instead of retrying."""
        self.client.pre_start()
        while not self.stopping.is_set():
            try:
                url = await open_connection(self.http, self.settings, list(self.client.callback_handler_map))
                ended = await self.serve_connection(url)
                log_level, problem = logging.INFO, f"connection closed ({ended})"
            except CredentialsRejected as exc:
                if not self.accepted.is_set():
                    raise
                log_level, problem = logging.ERROR, f"DingTalk rejected CLIENT_ID / CLIENT_SECRET ({exc})"
            except websockets.exceptions.ConnectionClosed as exc:
                log_level, problem = logging.WARNING, f"connection lost: {exc}"
            except TimeoutError:
                log_level, problem = logging.WARNING, "websocket handshake timed out"
            except (OpenFailed, OSError, ValueError, websockets.exceptions.WebSocketException) as exc:
                # ValueError: an endpoint websockets cannot use, e.g. a port out of range
                log_level, problem = logging.WARNING, str(exc) or type(exc).__name__
            if self.stopping.is_set():
                break
            delay = reconnect_delay(self.failures)
            self.failures += 1
            log.log(log_level, "%s: %s; reconnecting in %.1f s", self.name, problem, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def serve_connection(self, url: str) -> str:
        """Read frames until the connection ends; return how it ended."""
        keepalive = self.settings.keepalive_seconds
        async with websockets.connect(
            url,
            open_timeout=self.settings.connect_timeout_seconds,
            ping_interval=keepalive,  # a silently dead connection is noticed within 2 x keepalive
            ping_timeout=keepalive,
            close_timeout=5,
        ) as websocket:
            self.websocket = websocket
            self.accepted.set()
            log.info("%s: connected", self.name)
            try:
                async for raw in websocket:
                    self.failures = 0  # any frame proves the connection healthy
                    if len(self.frame_tasks) >= MAX_FRAMES_IN_FLIGHT:  # back-pressure: read on when one ends
                        await asyncio.wait(list(self.frame_tasks), return_when=asyncio.FIRST_COMPLETED)
                    self.handle_frame(raw, websocket)
            finally:
                self.websocket = None
            return f"code {websocket.close_code} {websocket.close_reason or ''}".strip()

    def handle_frame(self, raw: str | bytes, websocket: Any) -> None:
        """Answer one frame in a task of its own, so a slow action never holds up the others."""
        try:
            frame = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
            frame = None
        if not isinstance(frame, dict):
            log.warning("%s: skipped a frame that is not a JSON object: %s", self.name, redact(repr(raw)[:200]))
            return
        headers = frame.get("headers") if isinstance(frame.get("headers"), dict) else {}
        message_id = str(headers.get("messageId") or "-")
        if frame.get("type") == dingtalk_stream.CallbackMessage.TYPE and self.stopping.is_set():
            # left unacked, so DingTalk delivers it again to a live connection
            log.info("%s: callback %s left for another connection: stopping", self.name, message_id)
            return
        task = asyncio.create_task(self.answer_frame(frame, message_id, websocket))
        self.frame_tasks[task] = message_id
        task.add_done_callback(lambda t: self.frame_tasks.pop(t, None))

    async def answer_frame(self, frame: dict[str, Any], message_id: str, websocket: Any) -> None:
        """Parse the frame with the SDK, run its handler and send the ack on the socket it came on."""
        kind, message = frame.get("type"), None
        try:
            if kind == dingtalk_stream.SystemMessage.TYPE:  # ping, disconnect
                message: Any = dingtalk_stream.SystemMessage.from_dict(frame)
                handler: Any = self.client.system_handler
            elif kind == dingtalk_stream.CallbackMessage.TYPE:
                message = dingtalk_stream.CallbackMessage.from_dict(frame)
                handler = self.client.callback_handler_map.get(message.headers.topic)
            else:  # EVENT frames come only to event subscribers, which this bot is not
                log.warning("%s: ignored a %r frame", self.name, kind)
                return
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:  # e.g. `data` not JSON
            log.warning("%s: frame %s is malformed (%s): 400", self.name, message_id, exc)
            ack = frame_ack(dingtalk_stream.AckMessage.STATUS_BAD_REQUEST, message_id, f"malformed frame: {exc}")
            message = None
        else:
            if handler is None:
                log.warning("%s: no handler for topic %r: 404", self.name, message.headers.topic)
                ack = frame_ack(dingtalk_stream.AckMessage.STATUS_NOT_IMPLEMENT, message_id, "topic not subscribed")
            else:
                try:
                    ack = (await handler.raw_process(message)).to_dict()
                except Exception:  # a bug must still be answered, or DingTalk waits and redelivers
                    log.exception("%s: frame %s: unexpected error", self.name, message_id)
                    ack = frame_ack(dingtalk_stream.AckMessage.STATUS_SYSTEM_EXCEPTION, message_id, "internal error")
        try:
            await websocket.send(json.dumps(ack))
            if (
                message is not None
                and kind == dingtalk_stream.SystemMessage.TYPE
                and message.headers.topic == "disconnect"
            ):
                await websocket.close()  # DingTalk retires this connection: reconnect now
        except websockets.exceptions.ConnectionClosed:
            log.warning("%s: ack for %s not sent: the connection closed", self.name, message_id)


def frame_ack(code: int, message_id: str, problem: str) -> dict[str, Any]:
    """An ack for a frame no handler could answer, with a Graph response saying why."""
    response = graph_response(code, {"success": False, "error": problem[:300]})
    return {
        "code": code,
        "headers": {"messageId": message_id, "contentType": "application/json"},
        "message": problem[:300],
        "data": json.dumps({"response": response}),
    }


async def drain(links: list[StreamLink], grace: float) -> None:
    """Wait up to `grace` seconds for every frame in hand (reply and ack); log each one still running after."""
    deadline = time.monotonic() + grace
    while pending := {task: mid for link in links for task, mid in link.frame_tasks.items()}:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        log.info("stopping: waiting up to %.3g s for %d callback(s)", remaining, len(pending))
        await asyncio.wait(list(pending), timeout=remaining)
    for task, message_id in pending.items():
        log.warning("callback %s abandoned: still running after the %.3g s grace period", message_id, grace)
        task.cancel()
    if pending:
        await asyncio.wait(list(pending), timeout=1)


async def start_health_server(settings: Settings, links: list[StreamLink], stopping: asyncio.Event) -> web.AppRunner:
    """GET /healthz: 200 when every instance is connected, 503 otherwise (or while stopping)."""

    async def healthz(_: web.Request) -> web.Response:
        connected = sum(link.connected for link in links)
        healthy = connected == len(links) and not stopping.is_set()
        state = "stopping" if stopping.is_set() else "ok" if healthy else "degraded"
        body = {"status": state, "instances": len(links), "connected": connected}
        return web.json_response(body, status=200 if healthy else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.health_host, settings.health_port).start()
    log.info("health endpoint on http://%s:%d/healthz", settings.health_host, settings.health_port)
    return runner


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Run the stream connection(s) (and health endpoint) until `stop` is set; return an exit code."""
    ledger = CallbackLedger()
    stopping, accepted = asyncio.Event(), asyncio.Event()
    async with aiohttp.ClientSession() as http:
        links = [
            StreamLink(f"stream-{i + 1}", build_client(settings, ActionHandler(settings, http, ledger)), http,
                       settings, accepted, stopping)
            for i in range(settings.instances)
        ]  # fmt: skip
        runner = None
        if settings.health_port:
            try:
                runner = await start_health_server(settings, links, stopping)
            except OSError as exc:
                log.error("cannot serve HEALTH_PORT=%d: %s", settings.health_port, exc)
                return 2
        tasks = [asyncio.create_task(link.run(), name=link.name) for link in links]
        log.info("serving %d action(s) with %d stream instance(s)", len(ACTIONS), len(links))
        stop_waiter = asyncio.create_task(stop.wait())
        exit_code = 0
        try:
            done, _ = await asyncio.wait([stop_waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            exit_code = 0 if stop_waiter in done else exit_code_of(done.pop())
        finally:
            stopping.set()  # no new callbacks or connections; /healthz answers 503
            stop_waiter.cancel()
            await drain(links, settings.shutdown_grace_seconds)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=10)
            for task in tasks:  # retrieve every outcome, so none is reported as "never retrieved"
                if task.done() and not task.cancelled():
                    task.exception()
            if runner is not None:
                await runner.cleanup()
    log.info("stopped")
    return exit_code


def exit_code_of(ended: asyncio.Task) -> int:
    """A connection task that ended on its own: wrong credentials (2) or a bug (1)."""
    error = None if ended.cancelled() else ended.exception()
    if isinstance(error, CredentialsRejected):
        log.error(
            "DingTalk rejected CLIENT_ID / CLIENT_SECRET (%s): check both in the developer console, "
            "your app → 凭证与基础信息 / Credentials & basic info",
            error,
        )
        return 2
    log.error("%s ended unexpectedly", ended.get_name(), exc_info=error)
    return 1


class RedactingFilter(logging.Filter):
    """Keeps secrets and webhook session tokens out of every log line, whichever library wrote it."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # e.g. 0.24.3's logger.exception("unknown exception", e)
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message, self.secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter((settings.client_secret,)))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # Per-frame websocket debug output drowns everything else; keep it at INFO or above.
    logging.getLogger("websockets").setLevel(max(logging.INFO, logging.getLevelName(settings.log_level)))


async def run(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM; a second signal exits at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s received: finishing in-flight callbacks, then exiting", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
        except NotImplementedError:  # Windows: no loop signal handlers
            signal.signal(signum, lambda s, _f: loop.call_soon_threadsafe(on_signal, s))
    return await serve(settings, stop)


def main() -> int:
    load_dotenv(override=False)  # real environment variables win over .env
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    for key in ("CLIENT_ID", "CLIENT_SECRET"):
        if os.environ[key] != os.environ[key].strip():  # a common paste error that DingTalk rejects
            log.warning("%s had surrounding whitespace; using it without", key)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
