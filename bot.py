"""DingTalk AI assistant (钉钉 AI 助理) skills served over Stream mode, in one asyncio file.

Your part comes first: one async function per operation of tools.yaml, registered in ACTIONS.
Below the fence is the engine, which you should not need to edit.

Run:   python bot.py         (CLIENT_ID / CLIENT_SECRET from the environment or .env)
Try:   python -m tests.simulate 杭州 明天   (offline, no credentials)
Stop:  Ctrl+C or SIGTERM     (callbacks in hand finish first, up to SHUTDOWN_GRACE_SECONDS)
运行 python bot.py；离线试用 python -m tests.simulate；Ctrl+C 停止。你的代码写在 ACTIONS 一节。
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import json
import logging
import math
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
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus, unquote, urlsplit

import aiohttp
import dingtalk_stream
import websockets
import websockets.exceptions  # websockets>=15 loads submodules lazily; bind it before use
import yaml
from aiohttp import web
from dingtalk_stream.version import VERSION_STRING as SDK_VERSION
from dotenv import load_dotenv
from websockets.protocol import State as WebSocketState

# ----- Your actions / 你的动作 --------------------------------------------------------------------
# One `async def` per path in tools.yaml, written above ACTIONS and registered in it. It gets the parameters
# it names (context ones such as userId too), checked and typed from tools.yaml. Return what the operation's
# x-dingtalk-display-result asks for:
#   auto: data (dict or list)   markdown: a str   disabled: a str of markdown, or Card(...) of your own

DEMO_RATES = {"USD": 7.12, "EUR": 7.71, "JPY": 0.047, "HKD": 0.91}  # CNY per unit
DEMO_PEOPLE = ("张伟 Zhang Wei", "李娜 Li Na", "王芳 Wang Fang")


async def get_weather(location: str, date: str = "今天") -> str:
    """disabled: the bot posts this markdown to the chat through sessionWebhook (made-up weather)."""
    return (
        f"### {location} · {date}\n- 天气 / Weather: 晴 Sunny\n- 温度 / Temperature: 22°C\n\n"
        "> 演示数据，非真实天气 / Demo data, not a real forecast"
    )


async def get_exchange_rate(currency: str, amount: float = 1) -> dict[str, Any]:
    """auto: the assistant's model turns this data into its answer (made-up rates)."""
    rate = DEMO_RATES[currency]  # tools.yaml's enum lets only these through
    return {"currency": currency, "amount": amount, "cny": round(amount * rate, 2), "rate": rate, "demo": True}


async def get_on_call(team: str, weeks: int = 1) -> str:
    """markdown: the assistant shows this as is (made-up roster)."""
    rows = "".join(f"\n| {week + 1} | {DEMO_PEOPLE[(len(team) + week) % 3]} |" for week in range(weeks))
    return f"**{team}** 值班表 / on-call (演示数据 / demo data)\n\n| 周 Week | 值班 On call |\n|---|---|{rows}"


ACTIONS: dict[str, Action] = {
    "/v1/actions/weather": get_weather,
    "/v1/actions/exchange-rate": get_exchange_rate,
    "/v1/actions/on-call": get_on_call,
}


@dataclass(frozen=True)
class Card:
    """For a `disabled` operation: a card of your own AI card template (README, "Three ways to answer")."""

    template_id: str  # from DingTalk's card platform, ends in .schema
    data: dict[str, Any]  # the template's variables


# ===== The engine: you should not need to edit below. It reads in the order a callback travels: =====
# settings -> callback (parse, route, check, run, answer) -> reply -> connection -> lifecycle and main.
# README "Reliability" explains what it does and why.

Action = Callable[..., Awaitable[Any]]
log = logging.getLogger("bot")


# ----- Settings / 配置 ------------------------------------------------------------------------------

TOOLS_FILE = Path(__file__).with_name("tools.yaml")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """A setting or tools.yaml is wrong; the message is one line naming what and where."""


def setting(default: Any, meaning: str, low: float | None = None, high: float | None = None,
            parse: Callable[[str], Any] | None = None, required: bool = False) -> Any:  # fmt: skip
    """One row of the settings table: default, allowed range, one-line meaning, and how to read the text."""
    metadata = {"meaning": meaning, "low": low, "high": high, "parse": parse, "required": required}
    return field(default=default, metadata=metadata)


def log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def endpoint(text: str) -> str:
    if urlsplit(text).scheme not in ("http", "https"):
        raise ValueError("must start with https:// (or http://)")
    return text.rstrip("/")


def allowed_hosts(text: str) -> frozenset[str]:
    """WEBHOOK_ALLOWED_HOSTS: "host" (any port) or "host:port", IPv6 as [::1]:8080, comma-separated."""
    return frozenset(allowed_host(entry) for entry in text.split(",") if entry.strip())


def allowed_host(entry: str) -> str:
    entry = entry.strip().lower()
    if any(c in entry for c in "/*@") or entry.endswith("."):
        raise ValueError(f"has an entry that is not a host or host:port (no scheme, path or wildcard): {entry!r}")
    if entry.count(":") > 1 and not entry.startswith("["):  # a bare IPv6 address, any port
        return host_key(entry, None)
    try:
        parts = urlsplit(f"//{entry}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host:
        raise ValueError(f"has an entry that is not a host or host:port: {entry!r}")
    return host_key(host, port)


def host_key(host: str, port: int | None) -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port is None else f"{bracketed}:{port}"


@dataclass(frozen=True)
class Proxies:
    """One proxy per destination, the same for the connection open, the websocket and the webhook."""

    https: str | None = None  # for https:// and wss://
    http: str | None = None  # for http:// and ws://
    no_proxy: str = ""

    def for_url(self, url: str) -> str | None:
        parts = urlsplit(url)
        proxy = self.https if parts.scheme in ("https", "wss") else self.http
        if proxy and urllib.request.proxy_bypass_environment(parts.hostname or "", {"no": self.no_proxy}):
            return None
        return proxy

    def passwords(self) -> tuple[str, ...]:
        """For the log filter."""
        return tuple(unquote(p) for url in (self.https, self.http) if url and (p := urlsplit(url).password))


@dataclass(frozen=True)
class Settings:
    """Every setting, each declared once here: read from the environment variable of the field's name in upper
    case (or .env). load_settings() parses them from this table; a test keeps .env.example and the README's
    table in step with it."""

    client_id: str = setting("", "Your app's Client ID", required=True)
    client_secret: str = setting("", "Your app's Client Secret (never logged)", required=True)
    instances: int = setting(1, "Stream connections in this process", 1, 32)
    health_port: int | None = setting(None, "Serve GET /healthz on this port (unset: no HTTP server)", 1, 65535, int)
    health_host: str = setting("127.0.0.1", "Address of the health endpoint; 0.0.0.0 in a container")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR", parse=log_level)
    webhook_timeout_seconds: float = setting(5.0, "Give up on a sessionWebhook reply after this long (502)", 0.1, 300)
    # action + reply should stay under ~16 s, the earliest redelivery of an unacked callback reported
    action_timeout_seconds: float = setting(10.0, "Give up on an action after this long (504)", 0.1, 3600)
    shutdown_grace_seconds: float = setting(20.0, "On Ctrl+C / SIGTERM, wait this long for callbacks in hand", 0, 3600)
    connect_timeout_seconds: float = setting(
        10.0, "Give up opening a connection (HTTP + handshake) after this", 0.1, 300
    )
    # ping every 3 s, pong within 3 s: a dead connection is noticed within 6 s, replaced within about 10
    keepalive_seconds: float = setting(3.0, "Websocket ping interval and pong timeout", 0.1, 300)
    webhook_allowed_hosts: frozenset[str] = setting(
        frozenset(), "Extra webhook hosts for local testing, http allowed: host or host:port", parse=allowed_hosts
    )
    dingtalk_openapi_endpoint: str = setting(
        "https://api.dingtalk.com", "DingTalk's OpenAPI base URL (the simulator points it at a fake)", parse=endpoint
    )
    # not from variables of their own: the usual proxy variables, and tools.yaml
    proxies: Proxies = Proxies()
    operations: Mapping[str, Operation] = field(default_factory=dict)  # "POST /path" -> Operation


def load_settings(env: Mapping[str, str] = os.environ) -> Settings:
    """Settings from the environment, and the operations of tools.yaml; ConfigError names what is wrong."""
    values: dict[str, Any] = {}
    for row in fields(Settings):
        if "meaning" not in row.metadata:
            continue
        key, text = row.name.upper(), env.get(row.name.upper(), "").strip()
        if not text and row.metadata["required"]:
            raise ConfigError(
                f"{key} is not set: copy .env.example to .env and fill in your app's credentials"
                " (or try the bot offline first: python -m tests.simulate)"
            )
        if text:
            values[row.name] = setting_value(key, text, row.metadata, type(row.default))
    return Settings(**values, proxies=read_proxies(env), operations=load_operations())


def setting_value(key: str, text: str, row: Mapping[str, Any], kind: type) -> Any:
    parse = row["parse"] or kind
    try:
        value = parse(text)
    except ValueError as exc:
        problem = f"is not a valid {parse.__name__}" if parse in (int, float) else str(exc)
        raise ConfigError(f"{key}={text!r} {problem}") from None
    low, high = row["low"], row["high"]
    if low is not None and not low <= value <= high:
        raise ConfigError(f"{key}={text!r} must be between {low} and {high}")
    return value


def read_proxies(env: Mapping[str, str]) -> Proxies:
    """HTTPS_PROXY / HTTP_PROXY, else ALL_PROXY, and NO_PROXY; lower-case names win, as in curl.
    HTTP(S) proxies only: anything else is a ConfigError naming the variable (never its password)."""

    def variable(name: str) -> tuple[str, str] | None:
        for key in (name.lower(), name):
            if value := env.get(key, "").strip():
                return key, value
        return None

    def proxy(name: str) -> str | None:
        if (found := variable(name) or variable("ALL_PROXY")) is None:
            return None
        key, value = found
        url = value if "://" in value else f"http://{value}"  # "proxy:3128" means http, as in curl
        shown = re.sub(r"^([^/]*//)?.*@", lambda m: f"{m.group(1) or ''}***@", value)  # without user info
        if urlsplit(url).scheme.lower().startswith("socks"):
            raise ConfigError(
                f"{key}={shown!r} is a SOCKS proxy, which the bot does not support: "
                "use an HTTP proxy (HTTPS_PROXY=http://host:port) or unset it"
            )
        if not usable_proxy(url):
            raise ConfigError(f"{key}={shown!r} is not a proxy URL like http://[user:password@]host:port")
        return url

    no_proxy = variable("NO_PROXY")
    return Proxies(proxy("HTTPS_PROXY"), proxy("HTTP_PROXY"), no_proxy[1] if no_proxy else "")


def usable_proxy(url: str) -> bool:
    """http(s)://[user:password@]host[:port][/], which aiohttp and websockets both accept."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # e.g. a port that is not a number
        return False
    return (
        parts.scheme.lower() in ("http", "https")
        and bool(parts.hostname)
        and port != 0
        and parts.path in ("", "/")
        and not (parts.query or parts.fragment)
        and (parts.username is None) == (parts.password is None)
    )


# tools.yaml: the operations DingTalk calls, read once at start and matched with ACTIONS.

DISPLAY_MODES = ("auto", "markdown", "disabled")
WEBHOOK_CONTEXT = {"property": "currentConversation", "format": "sessionWebhook"}


@dataclass(frozen=True)
class Parameter:
    """One parameter of an operation, as tools.yaml declares it."""

    name: str
    location: str  # "query" (text, converted to `type`) or "body" (JSON, checked against `type`)
    type: str | None = None  # integer, number, boolean, string, array, object; None: anything
    required: bool = False
    enum: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    context: dict[str, Any] | None = None  # x-dingtalk-context: DingTalk fills it in, not the model
    example: Any = None  # what the simulator sends when given no value


@dataclass(frozen=True)
class Operation:
    """One operation of tools.yaml: how DingTalk calls it and how its answer is shown."""

    method: str
    path: str
    display: str  # x-dingtalk-display-result: auto, markdown or disabled
    parameters: tuple[Parameter, ...]

    @functools.cached_property  # read on every callback of a `disabled` operation
    def webhook(self) -> str | None:
        """The parameter that carries the sessionWebhook, if any."""
        return next((p.name for p in self.parameters if p.context == WEBHOOK_CONTEXT), None)


def load_operations(path: Path = TOOLS_FILE, actions: Mapping[str, Action] | None = None) -> dict[str, Operation]:
    """tools.yaml as "METHOD /path" -> Operation, each path matched with an action of `actions` (default
    ACTIONS) and the other way round. Anything amiss is a one-line ConfigError naming the file and the path."""
    actions = ACTIONS if actions is None else actions
    name = path.name
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), UniqueKeyLoader)  # a SafeLoader: safe_load, stricter
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path} ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{name} is nested too deeply to read") from None
    if not (isinstance(spec, dict) and str(spec.get("openapi", "")).startswith("3.") and spec.get("paths")):
        raise ConfigError(f"{name} is not an OpenAPI 3 description with paths (openapi: 3.0.1, paths: ...)")
    if not isinstance(spec["paths"], dict):
        raise ConfigError(f"{name}: paths must be a mapping of path -> operations")
    operations: dict[str, Operation] = {}
    for route, item in spec["paths"].items():
        for method, op in item.items() if isinstance(item, dict) else ():
            if method in ("parameters", "summary", "description") or str(method).startswith("x-"):
                continue
            if method not in ("get", "post"):
                raise ConfigError(f"{name}: {str(method).upper()} {route}: DingTalk calls only GET and POST operations")
            operation = read_operation(spec, route, method, op, item.get("parameters"))
            operations[f"{operation.method} {route}"] = operation
        if not any(op.path == route for op in operations.values()):
            raise ConfigError(f"{name}: {route} has no get or post operation")
    declared = {op.path for op in operations.values()}
    for route in declared - actions.keys():
        raise ConfigError(f"{name} declares {route}, but ACTIONS in bot.py has no action for it")
    for route in actions.keys() - declared:
        raise ConfigError(f"ACTIONS in bot.py has {route}, but {name} does not declare it")
    for operation in operations.values():
        check_operation(f"{name}: {operation.method} {operation.path}", operation, actions[operation.path])
    return operations


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error: a second `paths:` pasted at the end of the file
    would otherwise silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for key, (key_node, _) in zip(keys, node.value, strict=True):
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice in one mapping", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def read_operation(spec: dict, route: str, method: str, op: Any, shared: Any) -> Operation:
    where = f"{TOOLS_FILE.name}: {method.upper()} {route}"
    if not isinstance(op, dict):
        raise ConfigError(f"{where} is not a mapping")
    display = op.get("x-dingtalk-display-result", "auto")  # DingTalk's default
    if display not in DISPLAY_MODES:
        raise ConfigError(f"{where}: x-dingtalk-display-result must be one of {', '.join(DISPLAY_MODES)}")
    parameters: dict[str, Parameter] = {}
    for entry in [*listed(shared, "parameters", where), *listed(op.get("parameters"), "parameters", where)]:
        entry = resolve(spec, entry, where)
        if entry.get("in") == "query" and isinstance(entry.get("name"), str):
            schema = resolve(spec, entry.get("schema") or {}, where)
            parameters[entry["name"]] = parameter(
                entry["name"], "query", {**schema, **entry}, entry.get("required"), where
            )
    if (body := op.get("requestBody")) is not None:
        try:
            schema = resolve(spec, body["content"]["application/json"]["schema"], where)
        except (KeyError, TypeError):
            raise ConfigError(f"{where}: requestBody needs content: application/json: schema") from None
        required = listed(schema.get("required"), "the body schema's required (names, e.g. [location])", where)
        properties = schema.get("properties") or {}
        if not isinstance(properties, dict):
            raise ConfigError(f"{where}: the body schema's properties must be a mapping of name -> schema")
        for prop_name, prop in properties.items():
            parameters[prop_name] = parameter(
                prop_name, "body", resolve(spec, prop, where), prop_name in required, where
            )
    return Operation(method.upper(), route, display, tuple(parameters.values()))


def listed(value: Any, what: str, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {what} must be a list")
    return value


def resolve(spec: dict, node: Any, where: str) -> dict:
    """Follow local $refs ("#/components/schemas/X") to the mapping they name."""
    for _ in range(32):  # a circle of $refs is an error, not a hang
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: expected a mapping, found {node!r:.60}")
        if (ref := node.get("$ref")) is None:
            return node
        if not (isinstance(ref, str) and ref.startswith("#/")):
            raise ConfigError(f"{where}: only local $refs (#/...) are supported, not {ref!r}")
        node = spec
        for key in ref[2:].split("/"):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            raise ConfigError(f"{where}: $ref {ref} names nothing")
    raise ConfigError(f"{where}: $refs go round in a circle")


def parameter(name: str, location: str, schema: dict, required: Any, where: str) -> Parameter:
    enum, context = schema.get("enum"), schema.get("x-dingtalk-context")
    for bound in ("minimum", "maximum"):
        limit = schema.get(bound)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)):
            raise ConfigError(f"{where}: {name}'s {bound} must be a number, not {limit!r}")
    return Parameter(
        name,
        location,
        schema.get("type") if isinstance(schema.get("type"), str) else None,
        required is True,
        tuple(listed(enum, f"{name}'s enum", where)) if enum is not None else None,
        schema.get("minimum"),
        schema.get("maximum"),
        context if isinstance(context, dict) else None,
        schema.get("example"),
    )


def check_operation(where: str, operation: Operation, action: Action) -> None:
    """What the display mode needs from tools.yaml, and what the action needs, must be declared."""
    if operation.display == "disabled" and operation.webhook is None:
        raise ConfigError(
            f"{where} is x-dingtalk-display-result: disabled, so the bot replies through sessionWebhook, but it "
            "declares no parameter with x-dingtalk-context {property: currentConversation, format: sessionWebhook}"
        )
    if not inspect.iscoroutinefunction(action):
        raise ConfigError(f"{where}: its action {action.__name__}() must be an async def (it is awaited)")
    declared = {p.name for p in operation.parameters}
    for needed in action_parameters(action).required:
        if needed not in declared:
            raise ConfigError(f"{where} does not declare {needed!r}, which {action.__name__}() requires")


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


# ----- Callback / 回调：parse -> route -> check parameters -> run the action -> answer ------------------


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
    try:
        url = urlsplit(uri)
    except ValueError:
        raise GraphError(400, "requestLine.uri is not a valid URI") from None
    body: Any = request.body
    if body in (None, ""):
        body = {}
    elif isinstance(body, str):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            body = None
    if not isinstance(body, dict):
        raise GraphError(400, "body is not a JSON object")
    # GET operations carry parameters in the query string, POST ones in the body.
    return GraphCall(method.upper(), url.path, {**dict(parse_qsl(url.query, keep_blank_values=True)), **body})


def check_parameters(operation: Operation, params: dict[str, Any]) -> dict[str, Any]:
    """`params` checked against the operation's declared parameters: required ones present, values of the
    declared type (query strings converted to it); GraphError(400) naming the parameter if not."""
    checked = {k: v for k, v in params.items() if v is not None}  # null means "not given"
    missing = [p.name for p in operation.parameters if p.required and p.name not in checked]
    if missing:
        raise GraphError(400, f"missing parameter(s): {', '.join(missing)}")
    for param in operation.parameters:
        if param.name in checked:
            checked[param.name] = typed_value(param, checked[param.name])
    return checked


_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


_FITS: dict[str | None, Callable[[Any], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v)),
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def typed_value(param: Parameter, value: Any) -> Any:
    kind = param.type
    if param.location == "query" and isinstance(value, str) and len(value) < 40:  # query strings carry text
        if kind == "integer" and _INTEGER.fullmatch(value):
            value = int(value)
        elif kind == "number" and _NUMBER.fullmatch(value) and math.isfinite(float(value)):
            value = int(value) if _INTEGER.fullmatch(value) else float(value)
        elif kind == "boolean" and value.lower() in ("true", "false"):
            value = value.lower() == "true"
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)  # 3.0 in JSON is the integer 3
    fits = _FITS.get(kind)  # None: no type, or one we do not know; anything goes
    if fits is not None and not fits(value):
        article = "an" if kind == "integer" else "a"
        raise GraphError(400, f"parameter {param.name} must be {article} {kind}, got {shown(value)}")
    if param.enum is not None and not any(same(value, e) for e in param.enum):
        choices = ", ".join(map(str, param.enum))
        raise GraphError(400, f"parameter {param.name} must be one of {choices}, got {shown(value)}")
    low, high = param.minimum, param.maximum
    if (low is not None or high is not None) and _FITS["number"](value):
        if (low is not None and value < low) or (high is not None and value > high):
            limits = [f"at least {low}" if low is not None else "", f"at most {high}" if high is not None else ""]
            limits_text = " and ".join(filter(None, limits))
            raise GraphError(400, f"parameter {param.name} must be {limits_text}, got {shown(value)}")
    return value


def same(value: Any, choice: Any) -> bool:
    return value == choice and isinstance(value, bool) == isinstance(choice, bool)  # True is not 1 here


def shown(value: Any) -> str:
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except RecursionError:
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 60 else f"{text[:57]}..."


async def run_action(action: Action, params: dict[str, Any], time_limit: float) -> Any:
    """Call `action` with the parameters its signature names, within `time_limit` seconds."""
    takes = action_parameters(action)
    missing = [name for name in takes.required if name not in params]
    if missing:
        raise GraphError(400, f"missing parameter(s): {', '.join(missing)}")
    kwargs = params if takes.takes_all else {k: v for k, v in params.items() if k in takes.names}
    try:
        async with asyncio.timeout(time_limit) as deadline:
            return await action(**kwargs)
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


EXPECTED_RESULT = {
    "auto": "data: a dict or list of JSON values (for the assistant's model to present)",
    "markdown": "a str of markdown (shown as is)",
    "disabled": "a str of markdown or a Card (sent through sessionWebhook)",
}


def is_json(data: Any) -> bool:
    try:
        json.dumps(data)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def graph_response(status: int, payload: Any) -> dict[str, Any]:
    """The Graph response DingTalk reads from the ack: status line, headers and a JSON body."""
    response = dingtalk_stream.GraphResponse()
    response.status_line.code = status
    response.status_line.reason_phrase = HTTPStatus(status).phrase
    response.headers["Content-Type"] = "application/json"
    response.body = json.dumps(payload, ensure_ascii=False)
    return response.to_dict()


REMEMBER_SECONDS = 300.0  # redeliveries are reported 16-60 s after a late ack
REMEMBERED_CALLBACKS = 100_000


class CallbackLedger:
    """Results by messageId, shared by all connections of this process: a redelivered callback is answered
    from memory, so the user never gets a second reply. A callback in flight is never forgotten; a finished
    one is kept `ttl` seconds, at most `capacity` of them. (Other processes do not see it: keep actions
    idempotent.)"""

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

    def settle(self, message_id: str, status: int, payload: Any) -> None:
        """The first delivery has its result: remember it for redeliveries."""
        result = self.in_flight.pop(message_id)
        result.set_result((status, payload))
        self.finished[message_id] = (self.clock(), result)

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
    """Serves Graph callbacks: route by tools.yaml to ACTIONS, answer as the display mode says, ack the truth."""

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

    async def answer(self, callback: dingtalk_stream.CallbackMessage, message_id: str) -> tuple[int, Any]:
        started = time.monotonic()
        call: GraphCall | None = None
        try:
            call = parse_graph_request(callback.data)
            status, payload = 200, await self.serve_call(call)
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

    async def serve_call(self, call: GraphCall) -> Any:
        """Run the action for the call and answer as its operation's display mode says; return the body."""
        operation = self.settings.operations.get(f"{call.method} {call.path}")
        if operation is None:
            raise GraphError(404, f"no action for {call.method} {call.path}")
        params = check_parameters(operation, call.params)
        webhook = None
        if operation.display == "disabled":  # check the webhook before running the action
            webhook = check_webhook(params.get(operation.webhook or ""), self.settings.webhook_allowed_hosts)
        action = ACTIONS[call.path]
        result = await run_action(action, params, self.settings.action_timeout_seconds)
        if operation.display == "auto" and isinstance(result, dict | list) and is_json(result):
            return result  # the assistant's model presents the data
        if operation.display == "markdown" and isinstance(result, str):
            return {"content": result}  # shown as is
        if operation.display == "disabled" and isinstance(result, str | Card) and webhook is not None:
            card = result if isinstance(result, Card) else Card(MARKDOWN_CARD_TEMPLATE_ID, {"content": result})
            await reply_card(self.http, webhook, card, self.settings)
            return {"success": True}
        log.error(
            "action %s returned %s, but %s %s is x-dingtalk-display-result: %s, which expects %s",
            action.__name__, type(result).__name__, call.method, call.path, operation.display,
            EXPECTED_RESULT[operation.display],
        )  # fmt: skip
        raise GraphError(500, "internal error in action")


# ----- Reply / 回复：an AI card to the sessionWebhook, only to DingTalk, without blocking the loop -----------

MARKDOWN_CARD_TEMPLATE_ID = dingtalk_stream.GraphHandler.MARKDOWN_TEMPLATE_ID  # the SDK's reply_markdown card
# AI assistant webhooks live on api.dingtalk.com, chatbot ones on oapi.dingtalk.com: accept both.
DINGTALK_WEBHOOK_HOSTS = frozenset({"api.dingtalk.com", "oapi.dingtalk.com"})
DEFAULT_PORTS = {"http": 80, "https": 443}
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


def post_json(http: aiohttp.ClientSession, url: str, payload: Any, timeout: float, proxies: Proxies,
              **kwargs: Any) -> Any:  # fmt: skip
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


async def reply_card(http: aiohttp.ClientSession, webhook: str, card: Card, settings: Settings) -> None:
    """POST an AI card to the sessionWebhook; raise GraphError(502) unless DingTalk took it."""
    payload = {"contentType": "ai_card", "content": {"templateId": card.template_id, "cardData": card.data}}
    time_limit = settings.webhook_timeout_seconds
    try:
        async with post_json(http, webhook, payload, time_limit, settings.proxies) as response:
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


# ----- Connection / 连接：open, keep alive, answer every frame, reconnect --------------------------------

RECONNECT_MAX_DELAY_SECONDS = 60.0
HEALTHY_AFTER_SECONDS = 30.0  # a connection that lived this long resets the backoff
OPENS_PER_MINUTE = 10  # per client, whatever the gateway does
RETIRE_WINDOW_SECONDS = 10.0  # DingTalk keeps a connection open this long after sending `disconnect`
RETIRED_MAX_DELAY_SECONDS = 4.0  # the longest backoff before replacing a retired connection (+ jitter)
MAX_FRAMES_IN_FLIGHT = 500  # per connection; past it, new callbacks are left for DingTalk to redeliver


class CredentialsRejected(Exception):
    """DingTalk refused CLIENT_ID / CLIENT_SECRET (HTTP 401, authFailed)."""


class OpenFailed(Exception):
    """Connection open failed for another reason; worth retrying."""


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
    url = settings.dingtalk_openapi_endpoint + "/v1.0/gateway/connections/open"
    timeout, accept = settings.connect_timeout_seconds, {"Accept": "application/json"}
    try:
        async with post_json(http, url, body, timeout, settings.proxies, headers=accept) as response:
            status, text = response.status, (await response.read()).decode("utf-8", "replace")
    except TimeoutError:
        raise OpenFailed(f"connection open: no answer within {timeout:.0f} s") from None
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


def reconnect_delay(failures: int, longest: float = RECONNECT_MAX_DELAY_SECONDS) -> float:
    """0-1 s after a healthy connection ends, then about 1, 2, 4 … `longest` s, for ever; the jitter keeps
    bots (and the clients of one bot) out of step."""
    backoff = 0.0 if failures <= 0 else min(2.0 ** min(failures - 1, 16), longest)
    return backoff + random.uniform(0, 1)


class OpenLimiter:
    """At most `limit` connection opens in any `period` seconds."""

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


class StreamClient(dingtalk_stream.DingTalkStreamClient):
    """The SDK's client (same credential, same register_callback_handler, same handlers and frame classes)
    with its own start() and stop(): the connection open is non-blocking with a timeout, a dead connection
    is noticed by keepalive pings, reconnects back off, DingTalk's routine `disconnect` loses no ack, and
    stop() finishes the callbacks in hand first. Both behave the same on dingtalk-stream 0.24.3 and 0.24.4b1."""

    def __init__(self, credential: dingtalk_stream.Credential, settings: Settings, name: str = "stream-1") -> None:
        super().__init__(credential, logger=logging.getLogger("dingtalk_stream.client"))
        self.settings, self.name = settings, name
        self.stopping = asyncio.Event()  # set by stop(): take no new callbacks, open no new connection
        self.accepted = False  # DingTalk accepted the credentials once: a later refusal is retried
        self.current: Connection | None = None  # the connection new callbacks arrive on
        self.connections: set[Connection] = set()  # the current one and retired ones finishing their frames
        self.retiring: set[asyncio.Task] = set()
        self.failures = 0  # connections in a row that failed or did not stay up HEALTHY_AFTER_SECONDS
        self.limiter = OpenLimiter()
        self.http: aiohttp.ClientSession | None = None
        # Frames being answered, on any connection, lost ones included: stop() waits for these.
        self.frame_tasks: dict[asyncio.Task, str] = {}

    @property
    def connected(self) -> bool:
        return self.current is not None and self.current.websocket.state is WebSocketState.OPEN

    async def start(self) -> None:
        """Stay connected until stop(). Credentials refused before any connection ever succeeded are a
        configuration error: CredentialsRejected is raised instead of retrying."""
        self.pre_start()
        async with aiohttp.ClientSession() as self.http:
            try:
                while not self.stopping.is_set():
                    await self.connect_and_serve()
            finally:
                if not self.stopping.is_set():  # cancelled, or failed, rather than stopped: let nothing dangle
                    self.stopping.set()
                    for task in self.frame_tasks:
                        task.cancel()
                    await self.close_connections()

    async def stop(self, grace: float = 0.0) -> None:
        """Take no new callbacks and open no new connection; give the callbacks in hand up to `grace`
        seconds (each one still running then is logged and cancelled); close the connections."""
        self.stopping.set()
        if in_hand := len(self.frame_tasks):
            log.info("%s: stopping: waiting up to %.3g s for %d callback(s)", self.name, grace, in_hand)
        await settle(lambda: self.frame_tasks, grace)
        if pending := self.frame_tasks:
            for task, message_id in pending.items():
                log.warning("callback %s abandoned: still running after the %.3g s grace period", message_id, grace)
                task.cancel()
            await asyncio.wait(list(pending), timeout=1)
        await self.close_connections()

    async def close_connections(self) -> None:
        """Close every connection, retired ones included (their retirement ends with it)."""
        for task in self.retiring:
            task.cancel()
        await asyncio.gather(*(conn.close() for conn in list(self.connections)))

    async def connect_and_serve(self) -> None:
        """One connection from open to its end (or retirement), then the pause before the next."""
        conn: Connection | None = None
        try:
            conn = await self.unless_stopping(self.connect())
            if conn is None:
                return
            log_level, problem = logging.INFO, await self.serve(conn)
        except CredentialsRejected as exc:
            if not self.accepted:
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
        # Only a connection that stayed up a while resets the backoff: a gateway that closes every new
        # connection at once must not make the bot reconnect in a tight loop.
        lived = time.monotonic() - conn.opened_at if conn else 0.0
        self.failures = 0 if lived >= HEALTHY_AFTER_SECONDS else self.failures + 1
        # A routine `disconnect` is no outage: its replacement waits at most ~5 s even after failures.
        longest = RETIRED_MAX_DELAY_SECONDS if conn and conn.retired.is_set() else RECONNECT_MAX_DELAY_SECONDS
        delay = max(reconnect_delay(self.failures, longest), self.limiter.wait_needed())
        if not self.accepted and log_level == logging.WARNING:  # never reached DingTalk yet
            problem += " (never connected yet: check the network, or HTTPS_PROXY behind a proxy; README §12)"
        log.log(log_level, "%s: %s; reconnecting in %.1f s", self.name, problem, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)

    async def unless_stopping(self, opening: Awaitable[Connection]) -> Connection | None:
        """Await `opening` unless stop() comes first: then abandon it (no connection opens while stopping)."""
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
        """Ask DingTalk for an endpoint and open the websocket, each within CONNECT_TIMEOUT_SECONDS."""
        assert self.http is not None, "start() opens the HTTP session"
        self.limiter.record()
        url = await open_connection(self.http, self.settings, list(self.callback_handler_map))
        keepalive = self.settings.keepalive_seconds
        websocket = await websockets.connect(
            url,
            open_timeout=self.settings.connect_timeout_seconds,
            ping_interval=keepalive,  # a silently dead connection is noticed within 2 x keepalive
            ping_timeout=keepalive,
            close_timeout=min(keepalive, 5),
            proxy=self.settings.proxies.for_url(url),  # never websockets' own reading of the environment
        )
        return Connection(websocket)

    async def serve(self, conn: Connection) -> str:
        """Read frames until the connection ends or DingTalk retires it; return how it ended."""
        self.current, self.websocket, self.accepted = conn, conn.websocket, True
        self.connections.add(conn)
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
            self.current = self.websocket = None
        if reader.done():
            self.connections.discard(conn)
            reader.result()  # raises how it was lost
            return f"connection closed (code {conn.websocket.close_code} {conn.websocket.close_reason or ''})".strip()
        # DingTalk keeps a retired connection open a while: the frames in hand are answered on it,
        # new ones come on the replacement, opened now.
        task = asyncio.create_task(self.retire(conn, reader))
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)
        return "DingTalk retired the connection (disconnect)"

    async def read(self, conn: Connection) -> None:
        async for raw in conn.websocket:
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
        message_id, kind = str(headers.get("messageId") or "-"), frame.get("type")
        if kind == dingtalk_stream.CallbackMessage.TYPE:
            # Left unacked, DingTalk delivers it again to a live connection. (Reading never pauses: the
            # websocket must go on reading pongs, or keepalive takes the connection down.)
            why = ("stopping" if self.stopping.is_set() else "connection retired" if conn.retired.is_set()
                   else f"{MAX_FRAMES_IN_FLIGHT} callbacks in hand" if len(conn.frame_tasks) >= MAX_FRAMES_IN_FLIGHT
                   else None)  # fmt: skip
            if why is not None:
                log.log(logging.WARNING if why[0].isdigit() else logging.INFO,
                        "%s: callback %s left for another connection: %s", self.name, message_id, why)  # fmt: skip
                return
        if kind == dingtalk_stream.SystemMessage.TYPE and headers.get("topic") == "disconnect":
            conn.retired.set()
        task = asyncio.create_task(self.answer_frame(frame, message_id, conn.websocket))
        conn.frame_tasks[task] = self.frame_tasks[task] = message_id
        task.add_done_callback(lambda t: (conn.frame_tasks.pop(t, None), self.frame_tasks.pop(t, None)))

    async def answer_frame(self, frame: dict[str, Any], message_id: str, websocket: Any) -> None:
        """Parse the frame with the SDK, run its handler and send the ack on the socket it came on."""
        kind = frame.get("type")
        try:
            if kind == dingtalk_stream.SystemMessage.TYPE:  # ping, disconnect
                message: Any = dingtalk_stream.SystemMessage.from_dict(frame)
                handler: Any = self.system_handler
            elif kind == dingtalk_stream.CallbackMessage.TYPE:
                message = dingtalk_stream.CallbackMessage.from_dict(frame)
                handler = self.callback_handler_map.get(message.headers.topic)
            else:  # EVENT frames come only to event subscribers, which this bot is not
                log.warning("%s: ignored a %r frame", self.name, kind)
                return
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:  # e.g. `data` not JSON
            log.warning("%s: frame %s is malformed (%s): 400", self.name, message_id, exc)
            ack = frame_ack(dingtalk_stream.AckMessage.STATUS_BAD_REQUEST, message_id, f"malformed frame: {exc}")
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


# ----- Lifecycle / 生命周期：clients, health endpoint, signals, logging, main -----------------------------


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Run settings.instances clients in this event loop, as the official example does (credential -> client
    -> register the handler -> start), plus the health endpoint, until `stop` is set. Return an exit code:
    0, or 2 (credentials refused, HEALTH_PORT busy) or 1 (a bug) when the bot could not go on serving."""
    credential = dingtalk_stream.Credential(settings.client_id, settings.client_secret)
    ledger = CallbackLedger()  # one for all clients: DingTalk may redeliver on another connection
    async with aiohttp.ClientSession() as http:  # one for every webhook reply
        clients = []
        for n in range(1, settings.instances + 1):
            client = StreamClient(credential, settings, name=f"stream-{n}")
            client.register_callback_handler(dingtalk_stream.GraphMessage.TOPIC, ActionHandler(settings, http, ledger))
            clients.append(client)
        try:
            async with health_endpoint(settings, clients):
                return await start_until(stop, clients, settings.shutdown_grace_seconds)
        except OSError as exc:
            log.error("cannot serve HEALTH_PORT=%s: %s", settings.health_port, exc)
            return 2


async def start_until(stop: asyncio.Event, clients: list[StreamClient], grace: float) -> int:
    """await client.start() for every client until `stop` is set (or one of them gives up), then stop them all."""
    started = [asyncio.create_task(client.start(), name=client.name) for client in clients]
    log.info("serving %d action(s) with %d stream client(s)", len(ACTIONS), len(clients))
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopped, *started], return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0 if stopped in done else exit_code_of(done.pop())
    finally:
        stopped.cancel()
        await asyncio.gather(*(client.stop(grace) for client in clients))
        await asyncio.wait(started, timeout=10)
        for task in started:  # collect every outcome, so none is reported as "never retrieved"
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()
    log.info("stopped")
    return exit_code


@contextlib.asynccontextmanager
async def health_endpoint(settings: Settings, clients: list[StreamClient]) -> Any:
    """GET /healthz on HEALTH_PORT, if set: 200 when every client is connected, else 503 (and while stopping)."""

    async def healthz(_: web.Request) -> web.Response:
        connected = sum(client.connected for client in clients)
        stopping = any(client.stopping.is_set() for client in clients)
        healthy = connected == len(clients) and not stopping
        state = "stopping" if stopping else "ok" if healthy else "degraded"
        body = {"status": state, "instances": len(clients), "connected": connected}
        return web.json_response(body, status=200 if healthy else 503)

    if not settings.health_port:
        yield
        return
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.health_host, settings.health_port).start()
        log.info("health endpoint on http://%s:%d/healthz", settings.health_host, settings.health_port)
        yield
    finally:
        await runner.cleanup()


def exit_code_of(ended: asyncio.Task) -> int:
    """A client that ended on its own: wrong credentials (2) or a bug (1)."""
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
    handler.addFilter(RedactingFilter((settings.client_secret, *settings.proxies.passwords())))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # Per-frame websocket debug output drowns everything else; keep it at INFO or above.
    logging.getLogger("websockets").setLevel(max(logging.INFO, logging.getLevelName(settings.log_level)))


async def run(settings: Settings) -> int:
    """serve() until SIGINT/SIGTERM; a second signal exits at once. Threads still running after the grace
    period do not hold the exit."""
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
    # asyncio.run, and the interpreter, would wait for threads (an action's asyncio.to_thread, or any
    # other) without limit (3.11) or 300 s (3.12+). Our own default pool lets its idle workers go at the
    # end; threads still busy a second later are left behind.
    threads = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="bot-thread")
    loop.set_default_executor(threads)
    exit_code = await serve(settings, stop)
    threads.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + 1.0
    busy = [t for t in threading.enumerate() if not t.daemon and t is not threading.current_thread()]
    while busy and time.monotonic() < deadline:  # a thread offers nothing to await: poll
        await asyncio.sleep(0.05)
        busy = [t for t in busy if t.is_alive()]
    if busy:
        names = ", ".join(t.name for t in busy)
        log.warning(
            "exiting with %d thread(s) still running (e.g. an action in asyncio.to_thread): %s", len(busy), names
        )
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
