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
import concurrent.futures
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
import threading
import time
import urllib.request
from collections import OrderedDict, deque
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
DEFAULT_PORTS = {"http": 80, "https": 443}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
RECONNECT_MAX_DELAY_SECONDS = 60.0
HEALTHY_AFTER_SECONDS = 30.0  # a connection that lived this long resets the backoff
OPENS_PER_MINUTE = 10  # per stream instance, whatever the gateway does
RETIRE_WINDOW_SECONDS = 10.0  # DingTalk keeps a connection open this long after sending `disconnect`
# Results kept by messageId, to answer redeliveries without replying twice: for 5 minutes (redeliveries
# are reported 16-60 s after a late ack), at most this many finished ones.
REMEMBER_SECONDS = 300.0
REMEMBERED_CALLBACKS = 100_000
MAX_FRAMES_IN_FLIGHT = 500  # per connection; past it, reading pauses until one finishes


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class Proxies:
    """One proxy per destination, used alike for the connection open, the websocket and the webhook."""

    https: str | None = None  # for https:// and wss://
    http: str | None = None  # for http:// and ws://
    no_proxy: str = ""

    def for_url(self, url: str) -> str | None:
        parts = urlsplit(url)
        proxy = self.https if parts.scheme in ("https", "wss") else self.http
        if proxy and urllib.request.proxy_bypass_environment(parts.hostname or "", {"no": self.no_proxy}):
            return None
        return proxy


def read_proxies(env: Mapping[str, str]) -> Proxies:
    """HTTPS_PROXY / HTTP_PROXY, else ALL_PROXY, and NO_PROXY; lower-case names win, as in curl.
    HTTP(S) proxies only: a SOCKS one is a ConfigError naming the variable."""

    def variable(name: str) -> tuple[str, str] | None:
        for key in (name.lower(), name):
            if value := env.get(key, "").strip():
                return key, value
        return None

    def proxy(name: str) -> str | None:
        found = variable(name) or variable("ALL_PROXY")
        if found is None:
            return None
        key, value = found
        url = value if "://" in value else f"http://{value}"  # "proxy:3128" means http, as in curl
        try:
            parts = urlsplit(url)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:
            usable = False
        if not usable:
            raise ConfigError(
                f"{key}={redact_userinfo(value)!r} is not an http:// proxy (SOCKS is not supported): "
                "set HTTPS_PROXY=http://host:port, or unset it"
            )
        return url

    no_proxy = variable("NO_PROXY")
    return Proxies(proxy("HTTPS_PROXY"), proxy("HTTP_PROXY"), no_proxy[1] if no_proxy else "")


def redact_userinfo(url: str) -> str:
    """A proxy URL without its password, for messages."""
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url)


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
    proxies: Proxies = Proxies()


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
    allowed = frozenset(allowed_host(h) for h in (get("WEBHOOK_ALLOWED_HOSTS") or "").split(",") if h.strip())
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
        proxies=read_proxies(env),
    )


def allowed_host(entry: str) -> str:
    """A WEBHOOK_ALLOWED_HOSTS entry as check_webhook compares it: "host" or "host:port", IPv6 in brackets."""
    entry = entry.strip().lower()
    if entry.count(":") > 1 and not entry.startswith("["):  # a bare IPv6 address, any port
        return host_key(entry, None)
    try:
        parts = urlsplit(f"//{entry}")
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"WEBHOOK_ALLOWED_HOSTS entry {entry!r} is not a host or host:port") from None
    if not host:
        raise ConfigError(f"WEBHOOK_ALLOWED_HOSTS entry {entry!r} is not a host or host:port")
    return host_key(host, port)


def host_key(host: str, port: int | None) -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port is None else f"{bracketed}:{port}"


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
    """Results by messageId, shared by all connections of this process: a redelivered callback is
    answered from memory, so the user never gets a second reply. A callback in flight is never
    forgotten; a finished one is kept for `ttl` seconds, at most `capacity` of them (oldest go first).
    (Another process does not see them: keep actions idempotent.)"""

    def __init__(self, ttl: float = REMEMBER_SECONDS, capacity: int = REMEMBERED_CALLBACKS,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.in_flight: dict[str, asyncio.Future] = {}  # messageId -> future (status, payload)
        self.finished: OrderedDict[str, tuple[float, asyncio.Future]] = OrderedDict()  # by finishing time
        self.ttl, self.capacity, self.clock = ttl, capacity, clock

    def claim(self, message_id: str) -> tuple[bool, asyncio.Future]:
        """(True, new entry) for a first delivery, (False, the first one's result) for a redelivery."""
        self.expire()
        if (earlier := self.in_flight.get(message_id)) is not None:
            return False, earlier
        if (done := self.finished.get(message_id)) is not None:
            return False, done[1]
        result = self.in_flight[message_id] = asyncio.get_running_loop().create_future()
        return True, result

    def settle(self, message_id: str, status: int, payload: dict[str, Any]) -> None:
        """The first delivery has its result: remember it for redeliveries."""
        result = self.in_flight.pop(message_id)
        result.set_result((status, payload))
        self.finished[message_id] = (self.clock(), result)
        self.expire()

    def forget(self, message_id: str) -> None:
        """The first delivery was cancelled before it had a result: let a redelivery start afresh."""
        result = self.in_flight.pop(message_id, None)
        if result is not None and not result.done():
            result.cancel()

    def expire(self) -> None:
        too_old = self.clock() - self.ttl
        while self.finished:
            message_id, (finished_at, _) = next(iter(self.finished.items()))
            if finished_at > too_old and len(self.finished) <= self.capacity:
                break
            del self.finished[message_id]


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
            self.ledger.settle(message_id, status, payload)
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
        await reply_markdown(self.http, webhook, markdown, self.settings.webhook_timeout_seconds, self.settings.proxies)
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
    if host_key(host, None) in extra_hosts or host_key(host, port or DEFAULT_PORTS[parts.scheme]) in extra_hosts:
        return url
    if parts.scheme == "https" and host in DINGTALK_WEBHOOK_HOSTS and port in (None, 443):
        return url
    raise GraphError(400, f"sessionWebhook host {host!r} is not allowed")


def post_json(
    http: aiohttp.ClientSession, url: str, payload: Any, timeout: float, proxies: Proxies, **kwargs: Any
) -> Any:
    """POST JSON with a total timeout, no redirects, through the proxy the settings name for `url`."""
    return http.post(
        url,
        json=payload,
        allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=timeout),
        proxy=proxies.for_url(url),
        **kwargs,
    )


class WebhookError(Exception):
    """The webhook did not accept the reply."""


async def reply_markdown(
    http: aiohttp.ClientSession, webhook: str, markdown: str, time_limit: float, proxies: Proxies
) -> None:
    """POST `markdown` as an AI card (same payload as the SDK's reply_markdown); raise GraphError(502) on failure."""
    payload = {
        "contentType": "ai_card",
        "content": {"templateId": MARKDOWN_CARD_TEMPLATE_ID, "cardData": {"content": markdown}},
    }
    try:
        async with post_json(http, webhook, payload, time_limit, proxies) as response:
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
        accept = {"Accept": "application/json"}
        async with post_json(http, url, body, timeout, settings.proxies, headers=accept) as response:
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
    """0-1 s after a healthy connection ends, then about 1, 2, 4 … 60 s, for ever; the jitter keeps
    bots (and the instances of one bot) out of step."""
    backoff = 0.0 if failures <= 0 else min(2.0 ** min(failures - 1, 16), RECONNECT_MAX_DELAY_SECONDS)
    return backoff + random.uniform(0, 1)


class OpenLimiter:
    """At most `limit` connection opens in any `period` seconds, whatever the gateway does."""

    def __init__(self, limit: int = OPENS_PER_MINUTE, period: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.opens: deque[float] = deque(maxlen=limit)
        self.period, self.clock = period, clock

    def wait_needed(self) -> float:
        """Seconds to wait before the next open is allowed."""
        if len(self.opens) < (self.opens.maxlen or 0):
            return 0.0
        return max(0.0, self.opens[0] + self.period - self.clock())

    def record(self) -> None:
        self.opens.append(self.clock())


class Connection:
    """One websocket and the frames it has in hand."""

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket
        self.opened_at = time.monotonic()
        self.frame_tasks: dict[asyncio.Task, str] = {}  # frame being answered -> messageId
        self.retired = asyncio.Event()  # DingTalk sent `disconnect`: take no new callbacks here

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort: the peer may be gone already
            await self.websocket.close()


class StreamLink:
    """One Stream connection: open it, answer every frame through the SDK's handlers, reconnect with backoff."""

    def __init__(self, name: str, client: dingtalk_stream.DingTalkStreamClient, http: aiohttp.ClientSession,
                 settings: Settings, accepted: asyncio.Event, stopping: asyncio.Event) -> None:  # fmt: skip
        self.name, self.client, self.http, self.settings = name, client, http, settings
        self.accepted = accepted  # set once DingTalk accepted the credentials on any connection
        self.stopping = stopping  # set on shutdown: take no new callbacks, open no new connection
        self.current: Connection | None = None  # the connection new callbacks arrive on
        self.connections: set[Connection] = set()  # the current one and retired ones finishing their frames
        self.retiring: set[asyncio.Task] = set()
        self.failures = 0  # connections in a row that failed or did not stay up HEALTHY_AFTER_SECONDS
        self.limiter = OpenLimiter()

    @property
    def connected(self) -> bool:
        return self.current is not None and self.current.websocket.state is WebSocketState.OPEN

    @property
    def frame_tasks(self) -> dict[asyncio.Task, str]:
        """Frames being answered on any of this link's connections; shutdown waits on these."""
        return {task: mid for conn in self.connections for task, mid in conn.frame_tasks.items()}

    async def run(self) -> None:
        """Stay connected until stopping. Credentials refused before any connection ever succeeded
        are a configuration error: CredentialsRejected is raised instead of retrying."""
        self.client.pre_start()
        try:
            while not self.stopping.is_set():
                await self.connect_and_serve()
        finally:
            for task in self.retiring:
                task.cancel()
            for conn in list(self.connections):
                await conn.close()

    async def connect_and_serve(self) -> None:
        """One connection from open to its end (or retirement), then the pause before the next."""
        conn: Connection | None = None
        try:
            conn = await self.unless_stopping(self.connect())
            if conn is None:
                return
            log_level, problem = logging.INFO, await self.serve(conn)
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
            return
        # Only a connection that stayed up a while resets the backoff: a gateway that closes every
        # new connection at once must not make the bot reconnect in a tight loop.
        lived = time.monotonic() - conn.opened_at if conn else 0.0
        self.failures = 0 if lived >= HEALTHY_AFTER_SECONDS else self.failures + 1
        delay = max(reconnect_delay(self.failures), self.limiter.wait_needed())
        log.log(log_level, "%s: %s; reconnecting in %.1f s", self.name, problem, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)

    async def unless_stopping(self, opening: Awaitable[Connection]) -> Connection | None:
        """Await `opening` unless shutdown begins first: then abandon it (no connection opens while stopping)."""
        task = asyncio.ensure_future(opening)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            return None
        conn = task.result()
        if self.stopping.is_set():
            await conn.close()
            return None
        return conn

    async def connect(self) -> Connection:
        """Ask DingTalk for an endpoint and open the websocket, both within CONNECT_TIMEOUT_SECONDS."""
        self.limiter.record()
        url = await open_connection(self.http, self.settings, list(self.client.callback_handler_map))
        keepalive = self.settings.keepalive_seconds
        websocket = await websockets.connect(
            url,
            open_timeout=self.settings.connect_timeout_seconds,
            ping_interval=keepalive,  # a silently dead connection is noticed within 2 x keepalive
            ping_timeout=keepalive,
            close_timeout=5,
            proxy=self.settings.proxies.for_url(url),  # never websockets' own reading of the environment
        )
        return Connection(websocket)

    async def serve(self, conn: Connection) -> str:
        """Read frames until the connection ends or DingTalk retires it; return how it ended."""
        self.current = conn
        self.connections.add(conn)
        self.accepted.set()
        log.info("%s: connected", self.name)
        reader = asyncio.create_task(self.read(conn))
        retired = asyncio.create_task(conn.retired.wait())
        try:
            await asyncio.wait([reader, retired], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            reader.cancel()
            raise
        finally:
            retired.cancel()
            self.current = None
        if reader.done():
            self.connections.discard(conn)
            reader.result()  # raises how it was lost
            return f"connection closed (code {conn.websocket.close_code} {conn.websocket.close_reason or ''})".strip()
        # DingTalk keeps a retired connection open a while: answer what it has in hand there, new frames come
        # on the replacement, opened now.
        task = asyncio.create_task(self.retire(conn, reader))
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)
        return "DingTalk retired the connection (disconnect)"

    async def read(self, conn: Connection) -> None:
        async for raw in conn.websocket:
            if len(conn.frame_tasks) >= MAX_FRAMES_IN_FLIGHT:  # back-pressure: read on when one ends
                await asyncio.wait(list(conn.frame_tasks), return_when=asyncio.FIRST_COMPLETED)
            self.handle_frame(raw, conn)

    async def retire(self, conn: Connection, reader: asyncio.Task) -> None:
        """Close a retired connection once its frames in hand are answered (within RETIRE_WINDOW_SECONDS)."""
        try:
            await settle(lambda: conn.frame_tasks, RETIRE_WINDOW_SECONDS)
            for message_id in conn.frame_tasks.values():
                log.warning("%s: callback %s outlived its retired connection: its ack is lost", self.name, message_id)
            await conn.close()
            with contextlib.suppress(Exception):
                await reader
        finally:
            reader.cancel()
            self.connections.discard(conn)

    def handle_frame(self, raw: str | bytes, conn: Connection) -> None:
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
        kind = frame.get("type")
        if kind == dingtalk_stream.CallbackMessage.TYPE and (self.stopping.is_set() or conn.retired.is_set()):
            # left unacked, so DingTalk delivers it again to a live connection
            why = "stopping" if self.stopping.is_set() else "connection retired"
            log.info("%s: callback %s left for another connection: %s", self.name, message_id, why)
            return
        if kind == dingtalk_stream.SystemMessage.TYPE and headers.get("topic") == "disconnect":
            conn.retired.set()
        task = asyncio.create_task(self.answer_frame(frame, message_id, conn.websocket))
        conn.frame_tasks[task] = message_id
        task.add_done_callback(lambda t: conn.frame_tasks.pop(t, None))

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


async def settle(tasks: Callable[[], Mapping[asyncio.Task, str]], within: float) -> None:
    """Wait up to `within` seconds until `tasks()` (re-read as tasks come and go) is empty."""
    deadline = time.monotonic() + within
    while (pending := tasks()) and (remaining := deadline - time.monotonic()) > 0:
        await asyncio.wait(list(pending), timeout=remaining)


async def drain(links: list[StreamLink], grace: float) -> None:
    """Wait up to `grace` seconds for every frame in hand (reply and ack); log each one still running after."""
    in_hand = len([task for link in links for task in link.frame_tasks])
    if in_hand:
        log.info("stopping: waiting up to %.3g s for %d callback(s)", grace, in_hand)
    await settle(lambda: {task: mid for link in links for task, mid in link.frame_tasks.items()}, grace)
    pending = {task: mid for link in links for task, mid in link.frame_tasks.items()}
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
    # Our own pool for asyncio.to_thread: asyncio.run would wait for its threads without limit (3.11)
    # or for 300 s (3.12+) after the grace period; we wait a second, then leave them.
    threads = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="bot-thread")
    loop.set_default_executor(threads)
    exit_code = await serve(settings, stop)
    threads.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + 1.0
    busy = [t for t in threading.enumerate() if t.name.startswith("bot-thread")]
    while busy and time.monotonic() < deadline:  # a thread offers nothing to await: poll
        await asyncio.sleep(0.05)
        busy = [t for t in busy if t.is_alive()]
    if busy:
        log.warning("exiting with %d thread(s) still running (e.g. an action in asyncio.to_thread)", len(busy))
        logging.shutdown()
        sys.stdout.flush()
        os._exit(exit_code)
    return exit_code


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
