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
import inspect
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import dingtalk_stream
from aiohttp import web
from dotenv import load_dotenv

# Importing websockets.protocol also binds `websockets.exceptions`, which websockets>=15 loads lazily
# and the SDK's reconnect loop refers to; without it an early error kills the loop (AttributeError).
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
    webhook_timeout_seconds: float = 10.0
    action_timeout_seconds: float = 30.0
    shutdown_grace_seconds: float = 15.0
    webhook_allowed_hosts: frozenset[str] = frozenset()
    openapi_endpoint: str | None = None  # None = the SDK's default, https://api.dingtalk.com


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
    return Settings(
        client_id=get("CLIENT_ID") or "",
        client_secret=get("CLIENT_SECRET") or "",
        instances=number("INSTANCES", 1, int, 1, 32),
        health_host=get("HEALTH_HOST") or "127.0.0.1",
        health_port=number("HEALTH_PORT", None, int, 1, 65535),
        log_level=log_level,
        webhook_timeout_seconds=number("WEBHOOK_TIMEOUT_SECONDS", 10.0, float, 0.1, 300),
        action_timeout_seconds=number("ACTION_TIMEOUT_SECONDS", 30.0, float, 0.1, 3600),
        shutdown_grace_seconds=number("SHUTDOWN_GRACE_SECONDS", 15.0, float, 0, 3600),
        webhook_allowed_hosts=allowed,
        openapi_endpoint=get("DINGTALK_OPENAPI_ENDPOINT"),
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


async def run_action(action: Action, params: dict[str, Any], timeout: float) -> str:
    """Call `action` with the parameters its signature names; a missing one is the caller's error."""
    signature = inspect.signature(action)
    takes_all = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    kwargs = params if takes_all else {k: v for k, v in params.items() if k in signature.parameters}
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise GraphError(400, f"bad parameters: {exc}") from None
    try:
        result = await asyncio.wait_for(action(**kwargs), timeout)
    except asyncio.TimeoutError:
        log.error("action %s timed out after %.1f s", action.__name__, timeout)
        raise GraphError(504, "action timed out") from None
    except Exception:
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


class ActionHandler(dingtalk_stream.GraphHandler):
    """Serves Graph callbacks: dispatch by path to ACTIONS, reply via sessionWebhook, ack the truth."""

    def __init__(self, settings: Settings, http: aiohttp.ClientSession, inflight: dict[asyncio.Task, str]):
        super().__init__()
        self.settings = settings
        self.http = http
        # SDK task of each callback being served -> its messageId. The task ends after the ack is
        # sent, so waiting for these tasks on shutdown waits for reply *and* ack.
        self.inflight = inflight

    async def process(self, callback: dingtalk_stream.CallbackMessage) -> tuple[int, dict[str, Any]]:
        message_id = callback.headers.message_id or "-"
        task = asyncio.current_task()
        if task is not None:
            self.inflight[task] = message_id
            task.add_done_callback(lambda t: self.inflight.pop(t, None))
        started = time.monotonic()
        call: GraphCall | None = None
        try:
            call = parse_graph_request(callback.data)
            status = await self.dispatch(call)
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
        return dingtalk_stream.AckMessage.STATUS_OK, graph_response(status, payload)

    async def dispatch(self, call: GraphCall) -> int:
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


class WebhookError(Exception):
    """The webhook did not accept the reply."""


async def reply_markdown(http: aiohttp.ClientSession, webhook: str, markdown: str, timeout: float) -> None:
    """POST `markdown` as an AI card (same payload as the SDK's reply_markdown); raise GraphError(502) on failure."""
    payload = {
        "contentType": "ai_card",
        "content": {"templateId": MARKDOWN_CARD_TEMPLATE_ID, "cardData": {"content": markdown}},
    }
    try:
        async with http.post(
            webhook, json=payload, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            status, text = response.status, await response.text()
        if not 200 <= status < 300:
            raise WebhookError(f"HTTP {status}: {text[:200]}")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        # DingTalk reports some failures (e.g. 300001, expired session) with HTTP 200 and an errcode.
        if isinstance(answer, dict) and answer.get("errcode") not in (None, 0, "0"):
            raise WebhookError(f"errcode {answer.get('errcode')}: {answer.get('errmsg', '')}")
    except asyncio.TimeoutError:
        log.error("webhook %s timed out after %.1f s", redact(webhook), timeout)
        raise GraphError(502, "reply webhook timed out") from None
    except (aiohttp.ClientError, WebhookError) as exc:
        log.error("webhook %s failed: %s", redact(webhook), redact(str(exc)))
        raise GraphError(502, "reply webhook failed") from None


# ---------------------------------------------------------------------------------------------
# Lifecycle / 生命周期：clients, health endpoint, signals, graceful shutdown
# ---------------------------------------------------------------------------------------------


def build_client(settings: Settings, handler: ActionHandler) -> dingtalk_stream.DingTalkStreamClient:
    """One Stream connection with our handler registered on the Graph topic."""
    if settings.openapi_endpoint:
        # The SDK reads DINGTALK_OPENAPI_ENDPOINT only at import; this also honours .env and tests.
        dingtalk_stream.DingTalkStreamClient.OPEN_CONNECTION_API = (
            settings.openapi_endpoint.rstrip("/") + "/v1.0/gateway/connections/open"
        )
    credential = dingtalk_stream.Credential(settings.client_id, settings.client_secret)
    client = dingtalk_stream.DingTalkStreamClient(credential, logger=logging.getLogger("dingtalk_stream.client"))
    client.register_callback_handler(GRAPH_TOPIC, handler)
    return client


def is_connected(client: dingtalk_stream.DingTalkStreamClient) -> bool:
    websocket = getattr(client, "websocket", None)
    return websocket is not None and getattr(websocket, "state", None) is WebSocketState.OPEN


async def start_health_server(settings: Settings, clients: list, stopping: asyncio.Event) -> web.AppRunner:
    """GET /healthz: 200 when every instance is connected, 503 otherwise (or while stopping)."""

    async def healthz(_: web.Request) -> web.Response:
        connected = sum(map(is_connected, clients))
        healthy = connected == len(clients) and not stopping.is_set()
        state = "stopping" if stopping.is_set() else "ok" if healthy else "degraded"
        body = {"status": state, "instances": len(clients), "connected": connected}
        return web.json_response(body, status=200 if healthy else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.health_host, settings.health_port).start()
    log.info("health endpoint on http://%s:%d/healthz", settings.health_host, settings.health_port)
    return runner


async def stop_client(client: dingtalk_stream.DingTalkStreamClient, task: asyncio.Task, timeout: float) -> None:
    """Stop one client, on SDK versions with and without `stop()`."""
    stop = getattr(client, "stop", None)
    if stop is not None:  # dingtalk-stream >= 0.24.4
        try:
            await asyncio.wait_for(stop(), timeout)
        except Exception as exc:  # a socket that fails to close cleanly is still closed below
            log.debug("client stop: %r", exc)
        await asyncio.wait({task}, timeout=timeout)
    # 0.24.3 has no stop() and retries after the first CancelledError, so cancel until it ends.
    deadline = time.monotonic() + timeout
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    if not task.done():
        log.warning("stream client did not stop within %.1f s", timeout)


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Run the stream client(s) (and health endpoint) until `stop` is set; return an exit code."""
    inflight: dict[asyncio.Task, str] = {}
    stopping = asyncio.Event()
    async with aiohttp.ClientSession(trust_env=False) as http:
        clients = [build_client(settings, ActionHandler(settings, http, inflight)) for _ in range(settings.instances)]
        runner = None
        if settings.health_port:
            try:
                runner = await start_health_server(settings, clients, stopping)
            except OSError as exc:
                log.error("cannot serve HEALTH_PORT=%d: %s", settings.health_port, exc)
                return 2
        tasks = [asyncio.create_task(client.start(), name=f"dingtalk-stream-{i}") for i, client in enumerate(clients)]
        log.info("serving %d action(s) with %d stream instance(s)", len(ACTIONS), len(clients))
        stop_waiter = asyncio.create_task(stop.wait())
        exit_code = 0
        try:
            done, _ = await asyncio.wait([stop_waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if stop_waiter not in done:
                ended = done.pop()
                log.error("a stream client ended unexpectedly: %r", None if ended.cancelled() else ended.exception())
                exit_code = 1
        finally:
            stop_waiter.cancel()
            stopping.set()
            if inflight:
                log.info(
                    "stopping: waiting up to %.0f s for %d callback(s)", settings.shutdown_grace_seconds, len(inflight)
                )
                await asyncio.wait(list(inflight), timeout=settings.shutdown_grace_seconds)
            for message_id in inflight.values():
                log.warning("callback %s abandoned: still running after the grace period", message_id)
            await asyncio.gather(*(stop_client(c, t, 3.0) for c, t in zip(clients, tasks, strict=True)))
            if runner is not None:
                await runner.cleanup()
    log.info("stopped")
    return exit_code


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
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
