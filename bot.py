"""DingTalk AI assistant (钉钉 AI 助理) skills served over Stream mode, in one asyncio file.

Your part comes first: one function per operation of tools.yaml (async def, or def for blocking code), in ACTIONS.
Below the fence is the engine, which you should not need to edit.

Run:   python bot.py         (CLIENT_ID / CLIENT_SECRET from the environment or .env)
Try:   python -m tests.simulate 杭州 明天   (offline, no credentials)
Stop:  Ctrl+C or SIGTERM     (callbacks in hand finish first, up to SHUTDOWN_GRACE_SECONDS)
运行 python bot.py；离线试用 python -m tests.simulate；Ctrl+C 停止。你的代码写在 ACTIONS 一节。
"""

from __future__ import annotations

from typing import Any

# ----- Your actions / 你的动作 --------------------------------------------------------------------
# One function per path in tools.yaml, written above ACTIONS and registered in it: an `async def`, or a plain `def`
# for blocking code (it runs in a thread). It gets the parameters it names (context ones such as userId too),
# checked and typed from tools.yaml, and may refuse with ActionError. Return what the operation's
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


ACTIONS = {
    "/v1/actions/weather": get_weather,
    "/v1/actions/exchange-rate": get_exchange_rate,
    "/v1/actions/on-call": get_on_call,
}


# ===== The engine / 引擎: to upgrade, replace everything below this line (CHANGELOG.md) =====
# It reads in the order a callback travels: settings -> operations (tools.yaml) -> callback -> reply -> connection ->
# lifecycle. It never reads the part above: main(ACTIONS) and running(actions, tools) hand it your actions.

import asyncio
import concurrent.futures
import contextlib
import difflib
import functools
import gc
import inspect
import json
import logging
import math
import os
import platform
import queue
import random
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple, get_args, get_type_hints  # noqa: F811 (the engine imports all it uses itself)
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import aiohttp
import aiohttp.abc
import dingtalk_stream
import fastjsonschema
import websockets
import websockets.exceptions  # websockets>=15 loads submodules lazily; bind it before use
import yaml
import yarl
from dingtalk_stream.version import VERSION_STRING as SDK_VERSION
from dotenv import find_dotenv, load_dotenv
from websockets.protocol import State as WebSocketState

__all__ = [  # what your code may rely on; the rest (a leading underscore) may change when you upgrade
    "TOOLS_FILE", "VERSION", "ActionError", "Card", "ConfigError", "Operation",
    "Settings", "load_operations", "load_settings", "main", "running"
]  # fmt: skip
VERSION = "1.2.1"  # this engine's version: CHANGELOG.md says what changed, and what to do when you upgrade
_Action = Callable[..., Any]  # an async def, or a plain def (run in a worker thread)
_log = logging.getLogger("bot")
_HTTP_STATUSES = frozenset(HTTPStatus)


# ----- Your contract / 约定：what an action may raise and return ----------------------------------------


@dataclass(frozen=True)
class Card:
    """For a `disabled` operation: a card of your own AI card template (docs/skills.md#card-template)."""

    template_id: str  # from DingTalk's card platform, ends in .schema
    data: dict[str, Any]  # the template's variables


class ActionError(Exception):
    """Refuses a call with your message and a 4xx `status`, no traceback: raise ActionError("工单号格式不对")."""

    def __init__(self, message: str, status: int = 400) -> None:
        if isinstance(status, bool) or not (status in _HTTP_STATUSES and 400 <= status < 500):
            raise ValueError(f"ActionError's status is one of HTTP's 4xx codes, not {status!r}")
        super().__init__(message)
        self.status = int(status)


# ----- Settings / 配置 ------------------------------------------------------------------------------


class ConfigError(Exception):
    """A setting or tools.yaml is wrong; the message is one line naming what and where."""


@dataclass(frozen=True)
class Settings:
    """Each from the environment variable of its name in upper case, or .env (docs/configuration.md#settings)."""

    client_id: str
    client_secret: str  # never logged
    instances: int = 1  # Stream connections in this process
    health_port: int | None = None  # serve GET /healthz on it
    health_host: str = "127.0.0.1"
    log_level: str = "INFO"
    webhook_timeout_seconds: float = 5.0
    # action + reply should stay under ~16 s, the earliest redelivery of an unacked callback reported
    action_timeout_seconds: float = 10.0
    shutdown_grace_seconds: float = 20.0
    connect_timeout_seconds: float = 10.0
    # a ping every 5 s, its pong within 10 s: a late pong keeps the connection, a dead one is replaced within 20 s
    keepalive_seconds: float = 5.0
    webhook_allowed_hosts: frozenset[str] = frozenset()  # local testing only: "host" or "host:port"
    dingtalk_openapi_endpoint: str = "https://api.dingtalk.com"
    forward_url: str | None = None  # operations without an action go to this HTTP service (docs/forwarding.md)


_SETTING_TYPES = get_type_hints(Settings)  # (annotations as text, or not: the part above decides)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_RANGES = {"instances": (1, 32), "health_port": (1, 65535), "action_timeout_seconds": (0.1, 3600)}
_RANGES |= {"shutdown_grace_seconds": (0, 3600), "float": (0.1, 300)}  # "float": any other number of seconds


def _read_dotenv() -> None:
    """The .env beside bot.py (or above) into the environment; real environment variables win."""
    try:
        load_dotenv(override=False)
    except UnicodeDecodeError as exc:  # e.g. saved by PowerShell 5 (UTF-16) or Notepad's "ANSI" (GBK)
        raise ConfigError(f"{find_dotenv()} is not UTF-8 ({exc.reason}): save it as UTF-8") from None


def load_settings(env: Mapping[str, str] = os.environ) -> Settings:
    """Settings from `env`; ConfigError names the variable that is missing or wrong."""
    values = {}
    for row in fields(Settings):
        if text := env.get(row.name.upper(), "").strip():
            values[row.name] = _setting_value(row.name.upper(), text)
        elif row.default is MISSING:
            raise ConfigError(
                f"{row.name.upper()} is not set: copy .env.example to .env and fill in your app's credentials"
                " (or try the bot offline first: python -m tests.simulate)"
            )
    return Settings(**values)


def _setting_value(key: str, text: str) -> Any:
    """Setting `key` written as `text`, read as its field's type (numbers within RANGES), or ConfigError."""
    name = key.lower()
    kind = next((k for k in (int, float) if k in (_SETTING_TYPES[name], *get_args(_SETTING_TYPES[name]))), None)
    if kind is not None:  # int, float, or int | None
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a valid {kind.__name__}") from None
        low, high = _RANGES.get(name, _RANGES["float"])
        if not low <= value <= high:
            raise ConfigError(f"{key}={text!r} must be between {low} and {high}")
        return value
    if name == "log_level" and text.upper() not in _LOG_LEVELS:
        raise ConfigError(f"{key}={text!r} must be one of {', '.join(_LOG_LEVELS)}")
    if name in ("dingtalk_openapi_endpoint", "forward_url"):
        with contextlib.suppress(ValueError):  # (reading the port checks it is a number)
            url = urlsplit(text)
            if url.scheme in ("http", "https") and url.hostname and url.port != 0 and "@" not in url.netloc:
                if not {"?", "#"} & set(text):
                    return text.rstrip("/")
        raise ConfigError(
            f"{key}={_redact(text)!r} must be an http(s) URL, no user:password@, ? or #: http://host:port"
        )
    if name == "webhook_allowed_hosts":
        return frozenset(entry.strip().lower() for entry in text.split(",") if entry.strip())
    return text.upper() if name == "log_level" else text


# ----- Operations / 操作：tools.yaml read once at start, each operation joined with its action ---------

TOOLS_FILE = Path(__file__).with_name("tools.yaml")
_DISPLAY_MODES = ("auto", "markdown", "disabled")
_WEBHOOK_CONTEXT = {"property": "currentConversation", "format": "sessionWebhook"}
_INTEGER_FORMATS = {"int32": 2**31, "int64": 2**63}
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", type(None): "null"}
_SEGMENT = re.compile(r"{([^}/]+)}")  # a path's {name} segment


class _ActionParameters(NamedTuple):
    names: frozenset[str]  # the keyword parameters it takes
    required: tuple[str, ...]  # those without a default
    takes_all: bool  # it has **params


@dataclass(frozen=True)
class Operation:
    """One operation of tools.yaml, joined with its action."""

    method: str
    path: str
    display: str  # x-dingtalk-display-result: auto, markdown or disabled
    action: _Action | None  # None: forwarded to FORWARD_URL
    takes: _ActionParameters  # what its action takes
    schema: dict[str, Any]  # its parameters, query, path and body, as one JSON Schema object (draft 7)
    validate: Callable[[Any], Any]  # the schema, compiled
    query: frozenset[str]  # the parameters that come as text, in the query string or the path
    types: dict[str, frozenset[str] | None]  # the JSON types each parameter allows (None: any)
    webhook: str | None  # the parameter that carries the sessionWebhook
    template: re.Pattern | None  # for a path with {name} segments: matches it, one group per segment
    time_limit: float | None  # x-action-timeout-seconds, if it has its own (else ACTION_TIMEOUT_SECONDS)

    def check(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """`params` typed and validated, or ActionError (400) naming the parameter and the rule it broke."""
        values = {}
        for name, value in params.items():
            types = self.types.get(name) or frozenset()
            if value is not None or "null" in types:  # null means "not given"
                values[name] = _typed(value, types, name in self.query)
        if missing := [name for name in self.schema.get("required", ()) if name not in values]:
            raise ActionError(f"missing parameter(s): {', '.join(missing)}")
        try:
            return self.validate(values)
        except fastjsonschema.JsonSchemaValueException as exc:
            name = exc.name.removeprefix("data.") if exc.name != "data" else "parameters"
            rule = exc.message.removeprefix(f"{exc.name} ")
            if exc.rule == "pattern":  # as the author wrote it, not as translated for Python
                rule = f"must match pattern {exc.definition.get('x-pattern', exc.definition['pattern'])}"
            raise ActionError(f"parameter {name} {rule}, got {_shown(exc.value)}") from None


def _as_list(kind: Any) -> list:
    return kind if isinstance(kind, list) else [kind]


def _typed(value: Any, types: frozenset[str], from_query: bool) -> Any:
    """Query text read by JSON's rules ("3", "2.5", "true", "[1]") where its schema allows only types other than
    string; 3.0 for an integer is 3. A value that does not convert is left as it is, for the validator to refuse."""
    if from_query and isinstance(value, str) and types and "string" not in types:
        with contextlib.suppress(ValueError, RecursionError):
            converted = json.loads(value, parse_constant=str)  # NaN, Infinity: not numbers
            value = converted if not isinstance(converted, float) or math.isfinite(converted) else value
    is_integral = isinstance(value, float) and value.is_integer()
    return int(value) if is_integral and "integer" in types else value


def _allowed_types(schema: Any) -> frozenset[str] | None:
    """The JSON types a schema allows, as its type, enum, allOf, anyOf and oneOf say; None when they do not."""
    if not isinstance(schema, dict):
        return None
    known = [frozenset(_as_list(schema["type"]))] if "type" in schema else []
    if isinstance(schema.get("enum"), list):
        known.append(frozenset(_JSON_TYPES.get(type(value), "object") for value in schema["enum"]))
    known += [types for sub in schema.get("allOf") or () if (types := _allowed_types(sub)) is not None]
    for key in ("anyOf", "oneOf"):
        if (parts := [_allowed_types(sub) for sub in schema.get(key) or ()]) and None not in parts:
            known.append(frozenset().union(*parts))
    known = [types | {"integer"} if "number" in types else types for types in known]  # an integer is a number
    return frozenset.intersection(*known) if known else None


def _shown(value: Any) -> str:
    with contextlib.suppress(ValueError, RecursionError):
        text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else f"{text[:57]}..."
    return f"a {type(value).__name__}"


def load_operations(
    path: Path | Mapping[str, Any], actions: Mapping[str, _Action], *, forwarding: bool = False
) -> dict[str, Operation]:
    """The tools file (its path, or its description already read) as "METHOD /path" -> Operation, its paths and
    `actions` matched both ways (`forwarding`: a path without an action is forwarded). What a running bot cannot use
    is a one-line ConfigError; tests/authoring.py checks the rest while you write."""
    if isinstance(path, Mapping):
        return _operations_of(path, actions, forwarding)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path.name}: cannot read {path} ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        problem = " ".join(str(exc).replace('"<unicode string>"', path.name).split()) or "nested too deeply"
        raise ConfigError(f"{path.name} is not valid YAML: {problem}") from None
    return _operations_of(spec, actions, forwarding, path.name)


def _operations_of(spec: Any, actions: Mapping[str, _Action], forwarding: bool, name: str = "tools.yaml") -> dict:
    """The operations of an OpenAPI description already read (see load_operations)."""
    if not (isinstance(spec, dict) and str(spec.get("openapi", "")).startswith("3.") and spec.get("paths")):
        raise ConfigError(f"{name} is not an OpenAPI 3 description with paths (openapi: 3.0.1, paths: ...)")
    for route in sorted(spec["paths"].keys() - actions.keys() if not forwarding else ()):  # authoring.py: where
        hint = _nearest(route, actions) or " (and FORWARD_URL is not set)"
        raise ConfigError(f"{name} declares {route}, but ACTIONS in bot.py has no action for it{hint}")
    for route in sorted(actions.keys() - spec["paths"].keys()):
        hint = _nearest(route, spec["paths"])
        raise ConfigError(f"ACTIONS in bot.py has {route}, but {name} does not declare it{hint}")
    operations = {}
    for route, method in [(route, method) for route in spec["paths"] for method in ("get", "post")]:
        where = f"{name}: {method.upper()} {route}"
        try:
            if method in spec["paths"][route]:
                operations[f"{method.upper()} {route}"] = _read_operation(
                    spec, where, route, method, actions.get(route)
                )
        except ConfigError:
            raise
        except (ValueError, re.error) as exc:  # a schema fastjsonschema cannot compile
            raise ConfigError(f"{where}: {exc}") from None
        except Exception as exc:  # a shape bot.py cannot read; tests/authoring.py (python -m pytest) says more
            raise ConfigError(f"{where}: cannot read it ({exc!r})") from None
    if missing := sorted(actions.keys() - {operation.path for operation in operations.values()}):
        raise ConfigError(f"{name}: {missing[0]} has no get or post operation")
    return operations


def _nearest(name: str, names: Any, cutoff: float = 0.8) -> str:
    guess = difflib.get_close_matches(name, [str(n) for n in names], n=1, cutoff=cutoff)
    return f" (did you mean {guess[0]}?)" if guess else ""


def _read_operation(spec: dict, where: str, route: str, method: str, action: _Action | None) -> Operation:
    """One operation: its display mode, time limit, and its query, path and body parameters as one JSON Schema."""
    op = spec["paths"][route][method]
    if (display := op.get("x-dingtalk-display-result", "auto")) not in _DISPLAY_MODES:  # auto: DingTalk's default
        raise ConfigError(f"{where}: x-dingtalk-display-result must be one of {', '.join(_DISPLAY_MODES)}")
    limit = op.get("x-action-timeout-seconds")
    if "x-action-timeout-seconds" in op and not (
        isinstance(limit, int | float) and not isinstance(limit, bool) and 0.1 <= limit <= 3600
    ):
        raise ConfigError(f"{where}: x-action-timeout-seconds must be a number from 0.1 to 3600, not {limit!r}")
    schema: dict[str, Any] = {"type": "object", "properties": {}}
    if "requestBody" in op:
        body = _follow_ref(spec, op["requestBody"]["content"]["application/json"]["schema"], f"{where}: the body")
        schema = _json_schema(spec, {key: value for key, value in body.items() if key != "properties"}, where)
        if schema.get("type") != "object" or not isinstance(body.get("properties", {}), dict):
            raise ConfigError(f"{where}: the body schema must be type: object with properties")
        schema["properties"] = {  # each named as a parameter, as the query's are
            name: _json_schema(spec, prop, f"{where}: parameter {name}")
            for name, prop in body.get("properties", {}).items()
        }
    props, query = schema["properties"], []
    for entry in [*spec["paths"][route].get("parameters", []), *op.get("parameters", [])]:
        entry = _follow_ref(spec, entry, where)
        if entry["in"] not in ("query", "path"):
            raise ConfigError(f"{where}: only query and path parameters (in: query or path) are supported")
        extras = {k: v for k, v in entry.items() if k == "example" or str(k).startswith("x-")}
        given = next(iter(entry["content"].values())) if "content" in entry else entry  # content: {type: {schema}}
        props[entry["name"]] = _json_schema(spec, given.get("schema", {}), f"{where}: parameter {entry['name']}")
        props[entry["name"]] |= extras
        if entry.get("required") is True:
            schema["required"] = [*schema.get("required", []), entry["name"]]
        query.append(entry["name"])
    for name, prop in props.items():  # else DingTalk would not fill it in, and the model could
        if "x-dingtalk-context" in prop and not isinstance(prop["x-dingtalk-context"], dict):
            raise ConfigError(f"{where}: parameter {name}: indent property and format under its x-dingtalk-context")
    validate = _compiled(schema, where)
    webhook = next((p for p in props if props[p].get("x-dingtalk-context") == _WEBHOOK_CONTEXT), None)
    if display == "disabled" and webhook is None:
        raise ConfigError(
            f"{where} is x-dingtalk-display-result: disabled, so the bot replies through sessionWebhook, but it "
            "declares no parameter with x-dingtalk-context {property: currentConversation, format: sessionWebhook}"
        )
    takes = _action_parameters(action) if action else _ActionParameters(frozenset(), (), False)  # forwarded: none
    for name in takes.names - props.keys():  # a parameter the action names that tools.yaml does not declare
        hint = _nearest(name, props, cutoff=0.5)
        raise ConfigError(f"{_described(action)} takes {name!r}, but {where} does not declare it{hint}")
    template = re.compile(re.sub(r"\\{[^}/]+\\}", "([^/]+)", re.escape(route))) if _SEGMENT.search(route) else None
    types = {name: _allowed_types(prop) for name, prop in props.items()}
    args = (method.upper(), route, display, action, takes, schema, validate, frozenset(query), types, webhook)
    return Operation(*args, template, limit)


def _compiled(schema: dict[str, Any], where: str) -> Callable[[Any], Any]:
    """The parameters' schema compiled; if it does not compile, the parameter whose schema does not is named."""
    try:
        return fastjsonschema.compile(schema)
    except Exception:
        for name, prop in schema["properties"].items():
            try:
                fastjsonschema.compile(prop)
            except Exception as exc:
                raise ConfigError(f"{where}: parameter {name}: {exc}") from None
        raise


def _follow_ref(spec: dict, node: Any, where: str) -> dict:
    """Follow local $refs ("#/components/schemas/X") to the mapping they name."""
    for _ in range(32):  # a circle of $refs is an error, not a hang
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: expected a mapping, found {node!r:.60}")
        if (ref := node.get("$ref")) is None:
            return node
        if not (isinstance(ref, str) and ref.startswith("#/")):
            raise ConfigError(f"{where}: only local $refs (#/...) are supported, not {ref!r}")
        node = functools.reduce(lambda n, key: n.get(key) if isinstance(n, dict) else None, ref[2:].split("/"), spec)
        if node is None:
            raise ConfigError(f"{where}: $ref {ref} names nothing")
    raise ConfigError(f"{where}: $refs go round in a circle")


def _json_schema(spec: dict, node: Any, where: str, depth: int = 0) -> dict[str, Any]:
    """An OpenAPI 3.0 schema as JSON Schema draft 7, for fastjsonschema: $refs resolved, `nullable` and the boolean
    exclusive bounds translated, int32/int64 as bounds. Without this, those rules would be enforced wrongly."""
    if depth > 32:
        raise ConfigError(f"{where}: the schema is nested too deeply (or its $refs go round in a circle)")
    if isinstance(node, dict) and "$ref" in node and len(node) > 1:  # OpenAPI 3.0 would ignore the others: keep both
        beside = {key: value for key, value in node.items() if key != "$ref"}
        both = [
            _json_schema(spec, {"$ref": node["$ref"]}, where, depth + 1),
            _json_schema(spec, beside, where, depth + 1),
        ]
        return {"allOf": both} | ({"default": beside["default"]} if "default" in beside else {})
    out = {}
    for key, value in _follow_ref(spec, node, where).items():
        if key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _json_schema(spec, value, where, depth + 1)
        elif key in ("allOf", "anyOf", "oneOf") and isinstance(value, list):
            out[key] = [_json_schema(spec, item, where, depth + 1) for item in value]
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: _json_schema(spec, v, f"{where}.{name}", depth + 1) for name, v in value.items()}
        else:
            out[key] = value
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(flag := out.get(exclusive), bool):  # OpenAPI 3.0: a flag on the bound; draft 7: a number
            del out[exclusive]
            if flag and bound in out:
                out[exclusive] = out.pop(bound)
    if limit := _INTEGER_FORMATS.get(out.get("format")):
        out = {"minimum": -limit, "maximum": limit - 1} | out
    if isinstance(out.get("pattern"), str):  # kept as written too, for the 400's reason
        out["pattern"], out["x-pattern"] = _ecma_pattern(out["pattern"], where), out["pattern"]
    if isinstance(step := out.get("multipleOf"), int | float) and not (math.isfinite(step) and step > 0):
        raise ConfigError(f"{where}: multipleOf must be greater than 0, not {step!r}")
    if out.pop("nullable", False) is True:
        if "type" in out:
            out["type"] = [*_as_list(out["type"]), "null"]
        if isinstance(out.get("enum"), list):
            out["enum"] = [*out["enum"], None]
    return out


_ECMA_SPACE = "\t\n\v\f\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"  # ECMA 262's \s
_ECMA_SETS = {"d": "0-9", "w": "A-Za-z0-9_", "s": _ECMA_SPACE}  # \d \w \s; \D \W \S are their complements
_ECMA_ANCHORS = {"$": r"\Z", ".": "[^\n\r\u2028\u2029]", "\\b": r"(?a:\b)", "\\B": r"(?a:\B)", "[]": "(?!)"}
_PYTHON_ONLY = ("\\A", "\\Z", "\\a", "\\N", "\\U", "(?", "+")  # escapes, groups, possessive quantifiers
# a [class], a {n,m} quantifier, an escape or a character
_PATTERN_TOKEN = re.compile(r"\[\^?(?:\\.|[^\]\\])*\]?|\{[0-9]+(?:,[0-9]*)?\}|\\.|.", re.DOTALL)


def _ecma_pattern(pattern: str, where: str) -> str:
    """A JSON Schema pattern (ECMA 262) as a Python pattern that matches the same: \\d \\w \\s and their negations
    ASCII or ECMA's spaces, `.` not a line end, `$` the end only (not before a last newline), \\b ASCII, a `{` that
    starts no quantifier a character. What Python would read otherwise stops the start."""
    out, previous, written = [], "", pattern
    pattern = _SURROGATE_PAIR.sub(lambda pair: chr(int(pair[1], 16) * 1024 + int(pair[2], 16) - 0x35FDC00), pattern)
    if half := _LONE_SURROGATE.search(pattern):  # ECMA 262 reads UTF-16, Python code points
        raise ConfigError(f"{where}: pattern {written!r}: {half[0]} is half a character: write its pair in full")
    for match in _PATTERN_TOKEN.finditer(pattern):
        token, rest = match.group(), pattern[match.end() :]
        lookaround = token == "(" and rest.startswith("?") and not rest.startswith(("?:", "?=", "?!", "?<"))
        possessive = token == "+" and (previous in ("*", "+", "?") or (previous[:1] == "{" and len(previous) > 1))
        if token in _PYTHON_ONLY[:5] or lookaround or possessive:
            what = "(?" + rest[1:2] if lookaround else previous + token if possessive else token
            raise ConfigError(f"{where}: pattern {written!r}: {what} is Python's, not ECMA 262's: {_PATTERN_FIX}")
        if token in _ECMA_ANCHORS:
            out.append(_ECMA_ANCHORS[token])
        elif token[0] == "\\" and token[1].lower() in _ECMA_SETS:
            out.append(f"[{'^' if token[1].isupper() else ''}{_ECMA_SETS[token[1].lower()]}]")
        elif token.startswith("[") and len(token) > 1:
            out.append(_ecma_class(written, token, where))
        elif token[0] == "\\" and token[1] in "123456789":  # a group that took no part matches empty in ECMA 262
            out.append(f"(?({token[1]}){token})")
        else:
            out.append("\\{" if token == "{" else token)  # ({,3} is a quantifier in Python, characters in ECMA)
        previous = token
    try:
        return re.compile("".join(out)).pattern
    except (re.error, OverflowError) as exc:  # e.g. (?<name>...), \p{L}: ECMA 262 only; a{4294967296}
        problem = getattr(exc, "msg", str(exc))
        raise ConfigError(f"{where}: pattern {written!r} cannot be enforced here ({problem}): {_PATTERN_FIX}") from None


_PATTERN_FIX = "write it in the syntax ECMA 262 and Python share"
_SURROGATE_PAIR = re.compile(r"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})")  # an emoji, say
_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SET_ESCAPES = ("\\d", "\\D", "\\w", "\\W", "\\s", "\\S")


def _ecma_class(pattern: str, token: str, where: str) -> str:
    """A [class] of `pattern` as ECMA 262 reads it: \\d \\w \\s as above, a `-` beside one of them a character,
    [^] any character. One with \\D \\W or \\S in it (Python's classes cannot say "not in ECMA's \\s") is written
    as an alternation: [a\\S] as (?:[a]|[^\\s]), [^\\W_] as (?:(?![_])[\\w])."""
    if token == "[^]":
        return r"[\s\S]"
    negated, closed = token.startswith("[^"), token.endswith("]")
    parts = re.findall(r"\\.|.", token[2 if negated else 1 : -1 if closed else None], re.DOTALL)
    included, excluded = [], []  # what the class lists; the sets its \D \W \S leave out
    for n, part in enumerate(parts):
        if part in _PYTHON_ONLY[:5]:
            raise ConfigError(f"{where}: pattern {pattern!r}: {part} is Python's, not ECMA 262's: {_PATTERN_FIX}")
        if part in _SET_ESCAPES[1::2]:
            excluded.append(_ECMA_SETS[part[1].lower()])
        elif part == "-" and _SET_ESCAPES.count(parts[n - 1] if n else "") + _SET_ESCAPES.count(
            "".join(parts[n + 1 : n + 2])
        ):
            included.append("\\-")  # [+-\d] is +, - or a digit in ECMA 262, not a range
        elif part in "[$^&~|":  # characters in ECMA 262 (Python would read ^ as "not" or warn of set operations)
            included.append("\\" + part)
        else:
            included.append(_ECMA_SETS.get(part[1:], part) if part[0] == "\\" else part)
    listed = "".join(included)
    if not excluded or not closed:
        return f"[{'^' if negated else ''}{listed}{']' if closed else ''}"
    if not negated:  # in the list, or outside one of the sets
        return "(?:" + "|".join([f"[{listed}]"] * bool(listed) + [f"[^{left_out}]" for left_out in excluded]) + ")"
    ahead = f"(?![{listed}])" * bool(listed) + "".join(f"(?=[{left_out}])" for left_out in excluded[:-1])
    return f"(?:{ahead}[{excluded[-1]}])"  # not in the list, and in every set


def _named(action: _Action) -> str:
    action = action.func if isinstance(action, functools.partial) else action
    return getattr(action, "__name__", type(action).__name__)


def _described(action: _Action) -> str:
    """`name() (file.py:12)`, pointing at the code."""
    name, code = _named(action), getattr(inspect.unwrap(action), "__code__", None)
    return f"{name}() ({Path(code.co_filename).name}:{code.co_firstlineno})" if code else f"{name}()"


def _action_parameters(action: _Action) -> _ActionParameters:
    """What `action` takes, read from its signature."""
    params = inspect.signature(action).parameters.values()
    keyword = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = tuple(p.name for p in keyword if p.default is p.empty)
    return _ActionParameters(frozenset(p.name for p in keyword), required, any(p.kind is p.VAR_KEYWORD for p in params))


# ----- Callback / 回调：parse -> route -> check parameters -> run the action -> answer ------------------

_FORWARDED_ANSWERS = {
    "auto": "JSON data (application/json)",
    "markdown": 'text/markdown, text/plain or JSON {"content": ...}',
    "disabled": "text/markdown or text/plain (for the bot to post), or 204 (it replied itself)",
}
_EXPECTED_RESULT = {
    "auto": "data: a dict or list of JSON values (for the assistant's model to present)",
    "markdown": "a str of markdown (shown as is)",
    "disabled": "a str of markdown or a Card (sent through sessionWebhook)",
}
_REMEMBER_SECONDS = 300.0  # redeliveries are reported 16-60 s after a late ack
_REMEMBERED_CALLBACKS = 100_000
_REMEMBERED_BYTES = 32 << 20  # of answers: an `auto` action's data can be large
_MAX_ACK_BYTES = 256 << 10  # as sent: the Java SDK reads at most 256 KiB a frame; DingTalk documents no limit
_ACK_ROOM = _MAX_ACK_BYTES - 1024  # for the Graph response: the rest of an ack takes a few hundred bytes


class _GraphError(Exception):
    """Ends a callback with this Graph status; its message, the reason, is safe to show to the caller."""

    def __init__(self, status: int, reason: str, body: str | None = None) -> None:
        super().__init__(reason)
        self.status, self.body = status, body  # body: the Graph body, if not the reason's


def _parse_graph_request(data: Any) -> tuple[str, str, dict[str, Any]]:
    """Callback data as method, path and parameters (the query string's and a JSON body's)."""
    if not isinstance(data, dict):
        raise _GraphError(400, "callback data is not a JSON object")
    try:
        request = dingtalk_stream.GraphRequest.from_dict(data)
    except (AttributeError, TypeError):
        raise _GraphError(400, "requestLine is not a JSON object") from None
    method, uri, body = request.request_line.method, request.request_line.uri, request.body or "{}"
    if not isinstance(method, str) or method.upper() not in ("GET", "POST"):
        raise _GraphError(400, f"unsupported method {method!r}")
    if not isinstance(uri, str):
        raise _GraphError(400, "requestLine.uri is not a string")
    try:
        url = urlsplit(uri)
    except ValueError:
        raise _GraphError(400, "requestLine.uri is not a valid URI") from None
    if not url.path.startswith("/") or _UNPRINTABLE.search(uri):  # (urlsplit drops tabs and line ends silently)
        raise _GraphError(400, "requestLine.uri's path does not start with /, or it has control characters")
    with contextlib.suppress(ValueError, RecursionError):  # RecursionError: nested too deeply
        body = _JSON_NUMBERS.decode(body) if isinstance(body, str) else body
    if not isinstance(body, dict):
        raise _GraphError(400, "body is not a JSON object")
    path = unquote(url.path)  # "/v1/%E5%A4%A9" routes as "/v1/天"
    return method.upper(), path, dict(parse_qsl(url.query, keep_blank_values=True)) | body


def _finite(text: str) -> float:
    """A JSON number as a float; NaN, Infinity and 1e400 are refused (ValueError), as JSON has no such numbers."""
    if not math.isfinite(value := float(text)):
        raise ValueError(f"{text} is not a JSON number")
    return value


_JSON_NUMBERS = json.JSONDecoder(parse_float=_finite, parse_constant=_finite)  # made once: json.loads makes one a call


def _find_operation(operations: Mapping[str, Operation], method: str, path: str) -> tuple[Operation, dict[str, str]]:
    """The operation for `method` and `path`, with the values of its path's {name} segments; GraphError(404)."""
    if (operation := operations.get(f"{method} {path}")) is not None and operation.template is None:
        return operation, {}  # (a template's own text, "/items/{id}", is not a path of it)
    for operation in operations.values():
        if operation.method == method and operation.template and (match := operation.template.fullmatch(path)):
            return operation, dict(zip(_SEGMENT.findall(operation.path), match.groups(), strict=True))
    raise _GraphError(404, f"no action for {method} {path}")


async def _run_action(action: _Action, params: dict[str, Any], operation: Operation, default_limit: float) -> Any:
    """Call `action` with the parameters its signature names, within its operation's time limit, in a task of its own
    (so that one which ignores cancellation cannot hold its answer back; a plain def runs in a worker thread);
    GraphError says how it failed."""
    takes = operation.takes
    if missing := [name for name in takes.required if name not in params]:
        raise _GraphError(400, f"missing parameter(s): {', '.join(missing)}")
    kwargs = params if takes.takes_all else {k: v for k, v in params.items() if k in takes.names}
    loop, label = asyncio.get_running_loop(), f"{_named(action)} ({operation.method} {operation.path})"
    time_limit = operation.time_limit or default_limit
    deadline = loop.time() + time_limit
    try:
        job = None
        if inspect.iscoroutinefunction(action):
            work = action(**kwargs)
        else:
            job = _Job(label, action)
            work = _ACTION_THREADS.run(functools.partial(action, **kwargs), job)
        result = await _settled(work, deadline, f"action {label}")
        if inspect.isawaitable(result):  # an async def behind a plain decorator, or with async __call__
            result = await _settled(result, deadline, f"action {label}")
        return result
    except (ActionError, _GraphError):
        raise
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():  # we are being cancelled (shutdown): let it through
            raise
        _log.exception("action %s failed: something it awaited was cancelled", _named(action))
    except BaseException as exc:  # (GeneratorExit too)
        if isinstance(exc, TimeoutError) and loop.time() >= deadline and job and job.started is None:  # never ran
            _log.warning("action %s did not start within %.3g s: %s", label, time_limit, _ACTION_THREADS.held_by())
            raise _GraphError(503, "busy: no thread for the action within its time limit") from None
        if isinstance(exc, TimeoutError) and loop.time() >= deadline:  # ours, not one from inside the action
            setting = "x-action-timeout-seconds" if operation.time_limit else "ACTION_TIMEOUT_SECONDS"
            _log.error("action %s timed out after %.3g s (%s)", label, time_limit, setting)
            raise _GraphError(504, "action timed out") from None
        _log.exception("action %s failed", _named(action))
    raise _GraphError(500, "internal error in action")


async def _settled(work: Awaitable, deadline: float, name: str) -> Any:
    """`work`'s outcome by `deadline` (loop time), or TimeoutError. It runs in a task of its own, cancelled when late
    and left behind if it ignores that, so that nothing an action does can hold its answer back."""
    loop = asyncio.get_running_loop()
    woken = loop.create_future()  # set as the task ends (not by its done callback: a step of the loop later)
    call = loop.create_task(_contained(work, woken), name=name)
    timer = loop.call_at(deadline, lambda: woken.done() or woken.set_result(None))
    try:
        await woken
    finally:
        timer.cancel()
        if not call.done():  # past its time limit, or we are being cancelled (shutdown)
            call.cancel()
            call.add_done_callback(lambda done: done.cancelled() or done.exception())  # its outcome is moot
        elif not call.cancelled():
            call.exception()  # read, so that a failure is never reported as "never retrieved"
    if not call.done() or loop.time() > deadline:  # (one that held the loop past its limit is too late too)
        raise TimeoutError
    return call.result()


async def _contained(coro: Awaitable, woken: asyncio.Future | None = None) -> Any:
    """`coro`'s result; sys.exit() or KeyboardInterrupt in it is an error of its own, not the end of the event loop.
    `woken` is set as it ends."""
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        raise RuntimeError(f"{type(exc).__name__}({exc}) raised in an action") from exc
    finally:
        if woken is not None and not woken.done():
            woken.set_result(None)


class _Job:
    """A plain-def call: its name and action, when a thread took it, the thread's CPU clock and reading then."""

    def __init__(self, name: str, action: _Action) -> None:
        self.name, self.action, self.started, self.cpu = name, action, None, None


class _ActionThreads:
    """Plain-def actions run in `size` long-lived daemon threads, all started at first use (never one per call). A
    thread running Python code holds the GIL, which the event loop needs to answer every ping: so a call waits its
    turn while CPU_BOUND_AT_ONCE calls burn CPU (or may: they began under 20 ms ago). When every thread is taken,
    e.g. by calls hung past their time limit, a call is answered 503 at once. A hung thread never holds the exit."""

    def __init__(self, size: int) -> None:
        self.size, self.threads, self.ticking = size, [], None  # ticking: the loop a look-again is due on
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: list[tuple[Callable[[], Any], asyncio.Future, _Job]] = []
        self.running: dict[asyncio.Future, _Job] = {}  # until its thread is done with it, time limit or not
        self.said: set[Any] = set()  # warnings given, each once: "full", "late", or an action (CPU-bound)

    async def run(self, call: Callable[[], Any], job: _Job) -> Any:
        why = "plain-def calls are answered 503 until one returns"
        if len(self.running) >= self.size:
            hung = sum(future.done() for future in list(self.running))
            self.warn(
                "full", "all %d action threads are taken, %d by calls past their time limit: %s", self.size, hung, why
            )
            raise _GraphError(503, f"all {self.size} action threads are busy")
        late = [job.name for future, job in list(self.running.items()) if future.done() and self.burns_cpu(job)]
        if len(late) >= _CPU_BOUND_AT_ONCE:  # it would wait for as long as they burn: perhaps for ever
            self.warn("late", "CPU-bound calls past their time limit hold the CPU: %s: %s", ", ".join(late), why)
            raise _GraphError(503, "busy: CPU-bound actions past their time limit are still running")
        while len(self.threads) < self.size:
            self.threads.append(
                threading.Thread(target=self.work, name=f"bot-action-{len(self.threads) + 1}", daemon=True)
            )
            self.threads[-1].start()
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((call, future, job))
        self.dispatch()
        return await future

    def held_by(self) -> str:
        """What kept a waiting call from a thread."""
        burning = [job.name for job in list(self.running.values()) if self.burns_cpu(job)]
        return f"CPU-bound calls held the CPU: {', '.join(burning)}" if burning else "every thread was taken"

    def dispatch(self) -> None:
        """Hand waiting calls to threads while fewer than CPU_BOUND_AT_ONCE running ones burn CPU."""
        loop = asyncio.get_running_loop()
        self.waiting = [waiting for waiting in self.waiting if not waiting[1].done()]  # timed out while waiting
        burning = sum(self.burns_cpu(job) for job in list(self.running.values()))
        while self.waiting and burning < _CPU_BOUND_AT_ONCE and len(self.running) < self.size:
            call, future, job = self.waiting.pop(0)
            self.running[future], job.started = job, time.monotonic()
            self.jobs.put((call, job, future))
            burning += 1
        if self.waiting and self.ticking is not loop:  # look again soon: a call that began may turn out to wait on I/O
            self.ticking = loop
            loop.call_later(0.01, self.tick)

    def tick(self) -> None:
        self.ticking = None
        self.dispatch()

    def burns_cpu(self, job: _Job) -> bool:
        """Whether the call began under 20 ms ago, or its thread has been on a CPU a tenth of the time since."""
        elapsed = time.monotonic() - job.started
        if elapsed < 0.02 or job.cpu is None:
            return elapsed < 0.02  # (no per-thread CPU clocks, e.g. on Windows: only the first 20 ms count)
        with contextlib.suppress(OSError):  # the thread is gone
            if time.clock_gettime(job.cpu[0]) - job.cpu[1] > 0.1 * elapsed:
                why = "it takes the GIL from the event loop, so plain-def calls wait their turn"
                self.warn(
                    job.action,
                    "action %s is CPU-bound: %s; run such work in a process pool (docs/skills.md#cpu-bound-work)",
                    job.name,
                    why,
                )
                return True
        return False

    def warn(self, key: Any, message: str, *args: Any) -> None:
        if key not in self.said:
            self.said.add(key)
            _log.warning(message, *args)

    def work(self) -> None:
        clock = time.pthread_getcpuclockid(threading.get_ident()) if hasattr(time, "pthread_getcpuclockid") else None
        while True:
            call, job, future = self.jobs.get()
            job.cpu = (clock, time.clock_gettime(clock)) if clock is not None else None
            try:
                outcome = (True, call())
            except BaseException as exc:
                outcome = (False, exc)
            try:
                future.get_loop().call_soon_threadsafe(self.settle, future, *outcome)
            except RuntimeError:  # its loop is closed: nobody is waiting any more
                self.running.pop(future, None)

    def settle(self, future: asyncio.Future, ok: bool, value: Any) -> None:
        del self.running[future]
        if not any(running.done() for running in list(self.running)):  # no call past its time limit left: warn again
            self.said -= {"full", "late"}
        if not future.done():  # it may have been cancelled: the time limit, or shutdown
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        self.dispatch()


_CPU_BOUND_AT_ONCE = 2  # plain-def calls burning CPU at a time: each more delays the event loop's every step
_ACTION_THREADS = _ActionThreads(32)  # one pool per process


class _CallbackLedger:
    """This process's answers by messageId: a redelivered callback gets the first answer, so the user never gets a
    second reply. One in flight is never forgotten; a finished one is kept `ttl` seconds, at most `capacity` of them
    and `max_bytes` of their answers. (Other processes do not see it: keep actions idempotent.)"""

    def __init__(
        self, ttl=_REMEMBER_SECONDS, capacity=_REMEMBERED_CALLBACKS, max_bytes=_REMEMBERED_BYTES, clock=time.monotonic
    ):
        self.ttl, self.capacity, self.max_bytes, self.clock = ttl, capacity, max_bytes, clock
        self.in_flight: dict[str, asyncio.Future] = {}  # messageId -> (status, body), once answered
        # messageId -> (when, status, body, its bytes), oldest first (a dict would scan the gaps its front leaves)
        self.finished: OrderedDict[str, tuple[float, int, str, int]] = OrderedDict()
        self.size = 0  # the finished answers' bodies, in bytes

    async def answer_once(self, message_id: str, answer: Callable[[], Awaitable[tuple[int, str]]]) -> tuple[int, str]:
        """`answer()` for the first delivery of `message_id`; for a redelivery, the first one's answer."""
        while self.finished and next(iter(self.finished.values()))[0] < self.clock() - self.ttl:
            self.forget_oldest()
        if message_id in self.finished or message_id in self.in_flight:
            _log.info("callback %s redelivered: answering with the first result, no second reply", message_id)
            if done := self.finished.get(message_id):
                return done[1], done[2]
            return await asyncio.shield(self.in_flight[message_id])
        result = self.in_flight[message_id] = asyncio.get_running_loop().create_future()
        try:
            status, body = await answer()
        except BaseException:  # cancelled before it had an answer: a redelivery starts afresh
            result.cancel()
            raise
        finally:
            del self.in_flight[message_id]
        result.set_result((status, body))
        self.finished[message_id] = (self.clock(), status, body, size := len(body.encode(errors="surrogatepass")))
        self.size += size
        while len(self.finished) > self.capacity or self.size > self.max_bytes:  # the caps are exact
            self.forget_oldest()
        return status, body

    def forget_oldest(self) -> None:
        self.size -= self.finished.popitem(last=False)[1][3]


_LEDGER = _CallbackLedger()  # one per process, for all its connections: DingTalk may redeliver on another one


class _ActionHandler(dingtalk_stream.GraphHandler):
    """Serves Graph callbacks: route by tools.yaml to the action, answer as the display mode says, ack the truth."""

    def __init__(self, settings: Settings, operations: Mapping[str, Operation], http: Any, ledger: _CallbackLedger):
        super().__init__()
        self.settings, self.operations, self.http, self.ledger = settings, operations, http, ledger
        endpoint = urlsplit(settings.dingtalk_openapi_endpoint)  # e.g. api.dingtalk.io for overseas tenants
        self.dingtalk_hosts = _DINGTALK_WEBHOOK_HOSTS | ({endpoint.hostname} if endpoint.scheme == "https" else set())
        self.direct = not {"http_proxy", "https_proxy"} & {name.lower() for name in os.environ}  # once, at start
        service = urlsplit(settings.forward_url or "")  # FORWARD_URL's host: named in 502s; loopback: never proxied
        loopback = re.fullmatch(r"localhost|127(\.[0-9]+){3}|::1", service.hostname or "") is not None
        self.service, self.service_direct = service.netloc, self.direct or loopback

    async def process(self, callback: dingtalk_stream.CallbackMessage) -> tuple[int, dict[str, Any]]:
        message_id = callback.headers.message_id
        if isinstance(message_id, str) and message_id:
            status, body = await self.ledger.answer_once(message_id, lambda: self.answer(callback.data, message_id))
        else:  # nothing to recognise a redelivery by
            status, body = await self.answer(callback.data, "-")
        return dingtalk_stream.AckMessage.STATUS_OK, _graph_response(status, body)

    async def answer(self, data: Any, message_id: str) -> tuple[int, str]:
        """parse -> route -> check parameters -> run the action -> answer as the display mode says."""
        started, route, forwarded = time.monotonic(), "-", False
        try:
            method, path, params = _parse_graph_request(data)
            route = f"{method} {path}"
            operation, path_params = _find_operation(self.operations, method, path)
            forwarded = operation.action is None
            params = operation.check(params | path_params)
            webhook = None
            if operation.display == "disabled":  # refused before the action runs
                url = params.get(operation.webhook or "")
                webhook = _check_webhook(url, self.settings.webhook_allowed_hosts, self.dingtalk_hosts)
            action = operation.action or functools.partial(self.forward, data, message_id, operation)
            result = await _run_action(action, params, operation, self.settings.action_timeout_seconds)
            as_given = forwarded and not isinstance(result, Card)  # the answer as the service gave it
            status, body = 200, result if as_given else await self.deliver(operation, result, webhook)
        except (_GraphError, ActionError) as err:  # a refusal: the call's parameters, or the action's own
            _log.warning("callback %s: %d %s", message_id, err.status, str(err)[:1000])
            status, body = err.status, getattr(err, "body", None) or _failure(str(err)[:1000])
        except Exception:  # a bug here must still produce an ack, or DingTalk waits and redelivers
            _log.exception("callback %s: unexpected error", message_id)
            status, body = 500, _failure("internal error")
        room = _ACK_ROOM - 12 * len(message_id)  # (an emoji is 14 bytes as sent, 12 in the ack's header)
        if len(body) * 14 > room and (size := _bytes_as_sent(body)) > room:
            _log.error("callback %s: answer too large: %d bytes as sent, over %d", message_id, size, _MAX_ACK_BYTES)
            said = "internal error in action: answer too large"  # what the ledger keeps too
            if forwarded:
                said = f"FORWARD_URL {self.service}: answer too large to ack"
            status, body = 502 if forwarded else 500, _failure(said)
        _log.info("callback %s %s -> %d in %.0f ms", message_id, route, status, (time.monotonic() - started) * 1000)
        return status, body

    async def deliver(self, operation: Operation, result: Any, webhook: str | None) -> str:
        """The action's result as its operation's display mode asks: the Graph response body."""
        if operation.display == "auto" and isinstance(result, dict | list):
            return _as_json(result, operation.action, "data that is", ensure_ascii=False)
        elif operation.display == "markdown" and isinstance(result, str):
            return _JSON_TEXT[False].encode({"content": result})
        elif operation.display == "disabled" and isinstance(result, str | Card) and webhook:
            card = result if isinstance(result, Card) else Card(_MARKDOWN_CARD_TEMPLATE_ID, {"content": result})
            payload = {"contentType": "ai_card", "content": {"templateId": card.template_id, "cardData": card.data}}
            data = _as_json(payload, operation.action, "a Card whose data is").encode()  # before anything is posted
            await _reply_card(self.http, webhook, data, self.settings.webhook_timeout_seconds, self.direct)
            return '{"success": true}'
        _log.error(
            "action %s returned %s, but %s %s is x-dingtalk-display-result: %s, which expects %s",
            *(_named(operation.action), type(result).__name__, operation.method, operation.path, operation.display),
            _EXPECTED_RESULT[operation.display],
        )
        raise _GraphError(500, "internal error in action")

    async def forward(self, data: dict[str, Any], message_id: str, operation: Operation) -> str | Card:
        """The callback as sent, to FORWARD_URL (the bot's checks came first); the service's answer read as the
        display mode asks: the Graph body, or a Card of its markdown for the bot to post (docs/forwarding.md)."""
        request, service = dingtalk_stream.GraphRequest.from_dict(data), self.service
        body = request.body or "{}"
        body = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
        uri = urlsplit(request.request_line.uri)  # its path and query only: the host is FORWARD_URL's
        if {".", ".."} & set(unquote(uri.path).split("/")):  # the service might read it as another path
            raise _GraphError(400, "a path with a . or .. segment is not forwarded")
        query, in_body = (
            [name for name, _ in parse_qsl(uri.query, keep_blank_values=True)],
            [*_JSON_NUMBERS.decode(body)],
        )
        if len(query + in_body) > len({*query, *in_body}) or (operation.method == "GET" and in_body):
            raise _GraphError(400, "a parameter given twice, or in a GET's body, is not forwarded")  # as checked
        path = quote(urlunsplit(("", "", uri.path, uri.query, "")), safe=_PRINTABLE_ASCII)  # as sent, if it is ASCII
        url = yarl.URL(quote(self.settings.forward_url, safe=_PRINTABLE_ASCII) + path, encoded=True)
        headers, sent = _FORWARD_HEADERS | {"X-DingTalk-Message-Id": message_id}, None
        if operation.method == "POST":  # (a lone surrogate, which UTF-8 cannot carry, as its JSON escape \udXXX)
            sent, headers["Content-Type"] = body.encode(errors="backslashreplace"), "application/json; charset=utf-8"
        try:  # within the operation's time limit, as an action
            response, raw = await _fetch(
                self.http, url, sent, None, headers, limit=_MAX_ACK_BYTES, direct=self.service_direct
            )
            text = raw.decode(response.charset or "utf-8", errors="replace")
        except OSError as exc:  # it does not listen, or its host does not resolve
            _log.error("cannot reach FORWARD_URL %s: %s", service, _redact(str(exc)))
            raise _GraphError(502, f"cannot reach FORWARD_URL {service}") from None
        except (aiohttp.ClientError, ValueError, LookupError) as exc:  # a bad answer, too large, a charset unknown
            _log.error("FORWARD_URL %s: %s", service, _redact(str(exc) or type(exc).__name__))
            problem = "answer too large to ack" if isinstance(exc, _TooLarge) else type(exc).__name__
            raise _GraphError(502, f"FORWARD_URL {service}: {problem}") from None
        status, kind, mode, value = response.status, response.content_type, operation.display, None
        if kind == "application/json" or kind.endswith("+json"):
            with contextlib.suppress(ValueError, RecursionError):  # (NaN and Infinity are not JSON)
                value = _JSON_NUMBERS.decode(text)
        if 400 <= status < 600:  # passed on, with what the service said
            said = text[:1000] or (HTTPStatus(status).phrase if status in _HTTP_STATUSES else f"HTTP {status}")
            raise _GraphError(status, said, text if value is not None else None)
        ok, is_text = 200 <= status < 300, kind in ("text/markdown", "text/plain")
        if status == 204 and mode == "disabled":  # it replied itself
            return '{"success": true}'
        if ok and isinstance(value, dict | list) and mode == "auto":
            return text
        if ok and isinstance(value, dict) and isinstance(value.get("content"), str) and mode == "markdown":
            return text
        if ok and is_text and mode == "markdown":
            return _JSON_TEXT[False].encode({"content": text})
        if ok and is_text and mode == "disabled":
            return Card(_MARKDOWN_CARD_TEMPLATE_ID, {"content": text})
        _log.error(
            "FORWARD_URL %s answered %s %s with HTTP %d %s, but it is x-dingtalk-display-result: %s, which expects %s",
            *(service, operation.method, operation.path, status, kind, mode, _FORWARDED_ANSWERS[mode]),
        )
        raise _GraphError(502, f"FORWARD_URL {service} answered HTTP {status} {kind}")


def _graph_response(status: int, body: str) -> dict[str, Any]:
    """The Graph response DingTalk reads from the ack: status line, headers and a JSON body."""
    response = dingtalk_stream.GraphResponse()
    phrase = HTTPStatus(status).phrase if status in _HTTP_STATUSES else ""  # (a service's 499, say)
    response.status_line.code, response.status_line.reason_phrase = status, phrase
    response.headers["Content-Type"], response.body = "application/json", body
    return response.to_dict()


def _failure(reason: str) -> str:
    return json.dumps({"success": False, "error": reason}, ensure_ascii=False)


_JSON_TEXT = {flag: json.JSONEncoder(ensure_ascii=flag, allow_nan=False) for flag in (True, False)}  # made once


def _as_json(value: Any, action: _Action, what: str, ensure_ascii: bool = True) -> str:
    """`value` as JSON text, or GraphError(500) and one line naming the action and what is not JSON."""
    try:
        return _JSON_TEXT[ensure_ascii].encode(value)
    except Exception as exc:  # a date, a Decimal, NaN, a 5,000-digit int, a cycle, a container that fails to iterate
        _log.error("action %s returned %s not JSON: %s", _named(action), what, exc)
        raise _GraphError(500, "internal error in action") from None


def _bytes_as_sent(body: str) -> int:
    """The bytes a Graph response of `body` takes in its ack: JSON inside the ack's JSON, so escaped twice."""
    return len(json.dumps(json.dumps({"response": _graph_response(200, body)})))


# ----- Reply / 回复：an AI card to the sessionWebhook, only to DingTalk, without blocking the loop -----------

_MARKDOWN_CARD_TEMPLATE_ID = dingtalk_stream.GraphHandler.MARKDOWN_TEMPLATE_ID  # the SDK's reply_markdown card
# AI assistant webhooks live on api.dingtalk.com, chatbot ones on oapi.dingtalk.com: accept both.
_DINGTALK_WEBHOOK_HOSTS = frozenset({"api.dingtalk.com", "oapi.dingtalk.com"})
_MAX_ANSWER_BYTES = 1 << 20  # of a webhook's or the connection open's answer; DingTalk's are a few hundred bytes
# As the official SDKs send them; without Accept, the open may answer XML (the Node SDK says so).
_USER_AGENT = f"DingTalkStream/1.0 SDK/{SDK_VERSION} Python/{platform.python_version()} dingtalk-skill-bot/{VERSION}"
_HEADERS = {"Accept": "application/json", "Content-Type": "application/json", "User-Agent": _USER_AGENT}
_PRINTABLE_ASCII = "".join(map(chr, range(33, 127)))  # what goes into a URL as it is
_FORWARD_HEADERS = {"Accept": "application/json, text/markdown, text/plain", "User-Agent": _USER_AGENT}
_SESSION_TOKEN = re.compile(r"(session(?:=|%3[dD]|\\u003[dD]))[^&%\s\"'\\]+")  # also URL- or JSON-escaped
_USER_INFO = re.compile(r"(//)[^@\s]*@")  # user:password@ in a URL (a proxy's in a library's error; "/" and all)


def _redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Hide webhook session tokens, URLs' user:password@ and the given secret values in a log line."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return _USER_INFO.sub(r"\1***@", _SESSION_TOKEN.sub(r"\1***", text))


def _check_webhook(url: Any, extra_hosts: frozenset[str] = frozenset(), dingtalk=_DINGTALK_WEBHOOK_HOSTS) -> str:
    """`url` if the bot may POST to it (https on a `dingtalk` host, or an `extra_hosts` "host" or "host:port")."""
    if not url or not isinstance(url, str):
        raise _GraphError(400, "sessionWebhook must be a string" if url else "missing sessionWebhook")
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        raise _GraphError(400, "sessionWebhook is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        raise _GraphError(400, "sessionWebhook is not a valid http(s) URL")
    if host in extra_hosts or parts.netloc.lower() in extra_hosts:
        return url
    if parts.scheme == "https" and host in dingtalk and port in (None, 443):
        return url
    raise _GraphError(400, f"sessionWebhook host {host!r} is not allowed")


_WEBSOCKET_SCHEMES = {"wss": "https", "ws": "http"}  # without WSS_PROXY / WS_PROXY, HTTPS_PROXY / HTTP_PROXY


def _proxy_for(url: str) -> str | None:
    """The proxy the standard variables name for `url` (NO_PROXY honoured), read here: aiohttp's trust_env would read
    them, and netrc, in the loop's default pool, where actions' asyncio.to_thread calls can hold every thread."""
    schemes = {scheme := url.partition(":")[0].lower(), _WEBSOCKET_SCHEMES.get(scheme, scheme)}
    if not any(os.environ.get(f"{name}_proxy") or os.environ.get(f"{name.upper()}_PROXY") for name in schemes):
        return None  # the usual case, in a few microseconds
    proxies, parts = urllib.request.getproxies_environment(), urlsplit(url)
    if urllib.request.proxy_bypass_environment(parts.netloc.rpartition("@")[2], proxies):  # "host" or "host:port"
        return None
    proxy = proxies.get(parts.scheme) or proxies.get(_WEBSOCKET_SCHEMES.get(parts.scheme, ""))
    socks = (proxy or "").startswith("socks") and parts.scheme in ("http", "https")  # aiohttp speaks no SOCKS
    return None if socks else proxy


def _secrets_of(settings: Settings) -> tuple[str, ...]:
    """What no log line may show: CLIENT_SECRET and each proxy's password, as written and decoded."""
    passwords = []
    for url in urllib.request.getproxies_environment().values():
        with contextlib.suppress(ValueError):  # "user:pw@host:port" without a scheme is read as one too
            passwords.append(urlsplit(url if "//" in url else f"//{url}").password or "")
    return (settings.client_secret, *passwords, *map(unquote, passwords))


async def _lookup(host: str, port: int, family: int = 0) -> list[tuple]:
    """getaddrinfo in a daemon thread of its own. aiohttp and websockets would look up in the loop's default pool,
    where actions' asyncio.to_thread calls run too: six of those hung would hold every lookup of the bot's."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def look_up() -> None:
        try:
            outcome = (done.set_result, socket.getaddrinfo(host, port, family, socket.SOCK_STREAM))
        except Exception as exc:  # OSError, or UnicodeError for a name that does not encode
            outcome = (done.set_exception, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(lambda: done.done() or outcome[0](outcome[1]))

    threading.Thread(target=look_up, name="bot-lookup", daemon=True).start()
    return await done


class _Resolver(aiohttp.abc.AbstractResolver):
    """aiohttp's lookups, through lookup()."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        found = await _lookup(host, port, family)
        return [
            {"hostname": host, "host": a[0], "port": a[1], "family": f, "proto": p, "flags": flags}
            for f, _, p, _, a in found
        ]

    async def close(self) -> None:
        pass


_client_timeout = functools.lru_cache(maxsize=64)(aiohttp.ClientTimeout)  # one per time limit, not one a call


class _TooLarge(ValueError):
    """An answer over its byte limit."""


async def _fetch(
    http: aiohttp.ClientSession,
    url: str | yarl.URL,
    data: bytes | None,
    time_limit: float | None,
    headers: Mapping[str, str] = _HEADERS,
    *,
    limit: int = _MAX_ANSWER_BYTES,
    direct: bool = False,
) -> tuple[aiohttp.ClientResponse, bytes]:
    """POST `data` (GET: None), no redirects: the response and its body within `time_limit` s and `limit` bytes,
    or an exception; `direct`: not through a proxy."""
    timeout, method, proxy = _client_timeout(total=time_limit), "GET" if data is None else "POST", None
    if not direct:
        proxy = _proxy_for(str(url))
    request = http.request(method, url, data=data, headers=headers, proxy=proxy, allow_redirects=False, timeout=timeout)
    async with request as response:
        body = bytearray()
        while chunk := await response.content.readany():  # the time limit holds while it waits for data
            body += chunk
            if len(body) > limit:  # and this while data keeps coming
                raise _TooLarge(f"answer larger than {limit} bytes")
        return response, bytes(body)


def _json_object(body: bytes) -> dict[str, Any]:
    """`body` parsed, if it is a JSON object; else {}."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return answer if isinstance(answer, dict) else {}


async def _reply_card(http: aiohttp.ClientSession, webhook: str, card: bytes, time_limit: float, direct: bool) -> None:
    """POST an AI card (its JSON) to the sessionWebhook; GraphError(502) unless DingTalk took it."""
    try:
        response, body = await _fetch(http, webhook, card, time_limit, direct=direct)
        status = response.status
    except TimeoutError:
        _log.error("webhook %s timed out after %.1f s", _redact(webhook), time_limit)
        raise _GraphError(502, "reply webhook timed out") from None
    except (aiohttp.ClientError, ValueError) as exc:
        problem = str(exc) or type(exc).__name__
    else:
        answer, text = _json_object(body), body[:200].decode(errors="replace")
        if not 200 <= status < 300:  # DingTalk reports some failures (e.g. 300001, expired session) with HTTP 200
            problem = f"HTTP {status}: {text}"
        elif answer.get("errcode") not in (None, 0, "0"):
            problem = f"errcode {answer['errcode']}: {answer.get('errmsg', '')}"
        elif answer.get("success") is False:
            problem = f"success: false: {text}"
        else:
            return
    _log.error("webhook %s failed: %s", _redact(webhook), _redact(problem))
    raise _GraphError(502, "reply webhook failed")


# ----- Connection / 连接：open, keep alive, answer every frame, reconnect --------------------------------

_RECONNECT_MAX_DELAY_SECONDS = 60.0
_HEALTHY_AFTER_SECONDS = 30.0  # a connection that lived this long resets the backoff
_RETIRE_WINDOW_SECONDS = 10.0  # DingTalk keeps a connection open this long after sending `disconnect`
_RETIRED_MAX_DELAY_SECONDS = 4.0  # the longest backoff before replacing a retired connection (+ jitter)
_MAX_CALLBACKS_IN_HAND = 500  # per client; past it, a new callback is answered 503 at once
_STOPPED = "the bot stopped before the action finished"  # a 503's reason, whoever answers it
_MAX_FRAME_BYTES = 16 << 20  # DingTalk's frames are a few KiB; websockets' default limit is 1 MiB


class _CredentialsRejected(Exception):
    """DingTalk refused CLIENT_ID / CLIENT_SECRET (HTTP 401, authFailed)."""


def _reconnect_delay(failures: int, longest: float = _RECONNECT_MAX_DELAY_SECONDS) -> float:
    """0, then about 1, 2, 4 … `longest` s, each + 0-1 s of jitter that keeps bots and clients out of step."""
    return (0.0 if failures <= 0 else min(2.0 ** min(failures - 1, 16), longest)) + random.uniform(0, 1)


@dataclass
class _Frame:
    """A frame in hand: its one ack goes back on the connection that read it."""

    message_id: str
    is_callback: bool
    acked: bool = False


class _Connection:
    """One websocket, from its open to its close: it reads its frames and answers each on itself (its frames in
    hand), pings to stay alive, and ends when it closes, when it dies (no pong), or when DingTalk retires it
    (`disconnect`): new callbacks then come on its replacement, and those that still come on it are answered on it
    until it closes (DingTalk closes it RETIRE_WINDOW_SECONDS later)."""

    def __init__(self, websocket: Any, client: "_StreamClient") -> None:  # noqa: UP037 (defined below)
        self.websocket, self.client, self.opened_at = websocket, client, time.monotonic()
        self.in_hand: dict[asyncio.Task, _Frame] = {}
        self.retired = asyncio.Event()  # DingTalk sent `disconnect`
        self.dead = asyncio.Event()  # no pong in time: replaced at once, not after a close handshake it cannot answer
        self.reader: asyncio.Task | None = None

    @property
    def live(self) -> bool:
        return self.websocket.state is WebSocketState.OPEN and not (self.retired.is_set() or self.dead.is_set())

    async def serve(self) -> str:
        """Read frames until the connection ends; how it ended. Retired or dead, it is let go at once: a retired one
        is read on in the background, a dead one closed there."""
        self.reader = asyncio.create_task(self.read())
        retired, dead = asyncio.create_task(self.retired.wait()), asyncio.create_task(self.dead.wait())
        try:
            await asyncio.wait([self.reader, retired, dead], return_when=asyncio.FIRST_COMPLETED)
        finally:
            retired.cancel()
            dead.cancel()
        if not self.reader.done():
            self.reader.add_done_callback(lambda task: task.cancelled() or task.exception())  # how it ends is no news
            if self.dead.is_set():
                no_pong = 2 * self.client.settings.keepalive_seconds
                raise ConnectionError(f"connection lost: keepalive ping timeout: no pong within {no_pong:.3g} s")
            return "DingTalk retired the connection (disconnect)"
        self.reader.result()  # raises how it was lost
        return f"connection closed (code {self.websocket.close_code} {self.websocket.close_reason or ''})".strip()

    async def read(self) -> None:
        """Take frames until the connection closes, or until RETIRE_WINDOW_SECONDS after DingTalk retired it."""
        pinging = asyncio.create_task(self.keep_alive())
        try:
            async with asyncio.timeout(None) as window:
                async for raw in self.websocket:
                    self.take(raw)
                    if self.retired.is_set() and window.when() is None:
                        window.reschedule(asyncio.get_running_loop().time() + _RETIRE_WINDOW_SECONDS)
        finally:
            pinging.cancel()
            await self.close()
            self.let_go()

    async def keep_alive(self) -> None:
        """A ping every KEEPALIVE_SECONDS. A pong may be late on a jittery network (the Java and Go SDKs wait 5 s), but
        none within twice that means the connection is dead: noticed within 3 x keepalive, replaced at once."""
        keepalive = self.client.settings.keepalive_seconds
        while True:
            await asyncio.sleep(keepalive)
            try:
                async with asyncio.timeout(2 * keepalive):  # the ping itself waits while the send buffer is full
                    await (await self.websocket.ping())
            except TimeoutError:
                self.dead.set()
                await self.close()  # in the background: the next connection opens meanwhile
                return
            except websockets.exceptions.ConnectionClosed:
                return

    def take(self, raw: str | bytes) -> None:
        """Answer one frame in a task of its own: reading never pauses, or keepalive would miss pongs."""
        try:
            frame = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
            frame = None
        name = self.client.name
        if not isinstance(frame, dict):
            _log.warning("%s: skipped a frame that is not a JSON object: %s", name, _redact(repr(raw)[:200]))
            return
        headers = frame.get("headers") if isinstance(frame.get("headers"), dict) else {}
        message_id, kind = str(headers.get("messageId") or "-"), frame.get("type")
        if kind == dingtalk_stream.SystemMessage.TYPE and headers.get("topic") == "disconnect":
            self.retired.set()
        in_hand = _Frame(message_id, is_callback=kind == dingtalk_stream.CallbackMessage.TYPE)
        if in_hand.is_callback and (why := self.client.refusal()):
            # DingTalk documents redelivery for EVENT frames only: a Graph call left unacked is most likely lost.
            _log.warning("%s: callback %s answered 503: %s", name, message_id, why)
            answer = self.send_ack(in_hand, _frame_ack(message_id, why, status=503))
        else:
            answer = self.answer(frame, in_hand)
        task = asyncio.create_task(answer, name=f"frame {message_id}")
        self.in_hand[task] = in_hand
        task.add_done_callback(self.answered)

    def answered(self, task: asyncio.Task) -> None:
        del self.in_hand[task]
        if self.reader is not None and self.reader.done():
            self.let_go()

    def let_go(self) -> None:
        """Once it is closed and answered all it read, the client forgets it."""
        if not self.in_hand:
            self.client.connections.discard(self)

    async def answer(self, frame: dict[str, Any], in_hand: _Frame) -> None:
        """Answer one frame with its handler and send the ack (cancelled by stop(), it is answered 503 there)."""
        try:
            ack = await self.client.ack_for(frame, in_hand.message_id)
        except asyncio.CancelledError:
            raise
        except BaseException:  # a bug, or sys.exit() in an action's code run here (json calls items()): answered too
            _log.exception("%s: frame %s: unexpected error", self.client.name, in_hand.message_id)
            ack = _frame_ack(in_hand.message_id, "internal error", dingtalk_stream.AckMessage.STATUS_SYSTEM_EXCEPTION)
        if ack is not None:
            await self.send_ack(in_hand, ack)

    async def send_ack(self, in_hand: _Frame, ack: dict[str, Any]) -> None:
        """Send a frame's one ack (answers too large to ack were made 500s before)."""
        if in_hand.acked:  # e.g. a callback answered 503 at stop() whose action then returned after all
            return
        in_hand.acked = True
        try:
            await self.websocket.send(json.dumps(ack))  # ASCII, as the SDK sends it
        except websockets.exceptions.ConnectionClosed:
            _log.warning("%s: ack for %s not sent: the connection closed", self.client.name, in_hand.message_id)

    async def answer_late_ones(self, grace: float) -> None:
        """Give up on what is still in hand after the grace period: each callback still gets its one ack, a 503."""
        if not (late := dict(self.in_hand)):
            return
        for task, frame in late.items():
            if frame.is_callback and inspect.getcoroutinestate(task.get_coro()) != inspect.CORO_CREATED:
                _log.warning(
                    "callback %s abandoned: still running after the %.3g s grace period", frame.message_id, grace
                )
            task.cancel()
        await asyncio.wait(late, timeout=1)
        for frame in late.values():  # one not begun has nothing to say: it gets its 503 too
            if frame.is_callback and not frame.acked:
                await self.send_ack(frame, _frame_ack(frame.message_id, _STOPPED, status=503))

    async def close(self) -> None:
        """Close the websocket, within its close timeout and a second: one the peer no longer reads (a network gone
        silent, its send buffer full) is dropped instead of waited on for ever."""
        try:
            async with asyncio.timeout(self.websocket.close_timeout + 1):
                await self.websocket.close()
        except TimeoutError:
            self.websocket.transport.abort()
        except Exception:  # best effort: the peer may be gone already
            pass


class _StreamClient(dingtalk_stream.DingTalkStreamClient):
    """The SDK's client (credential, register_callback_handler, handlers, frame classes) with a start() and stop() of
    its own, the same on dingtalk-stream 0.24.3 and 0.24.4b1. It holds a phase and its connections; each connection
    holds the rest."""

    def __init__(self, credential: dingtalk_stream.Credential, settings: Settings, name: str = "stream-1") -> None:
        super().__init__(credential, logger=logging.getLogger("dingtalk_stream.client"))
        self.settings, self.name = settings, name
        # "starting" until DingTalk first accepts the credentials (a refusal then ends it; later, one is retried),
        # then "serving"; "stopping" once stop() or a cancellation began: no new connection opens
        self.phase = "starting"
        self.stopping = asyncio.Event()  # set with the phase "stopping": it wakes the pause between connections
        self.connections: set[_Connection] = set()  # until each is closed and has answered all it read
        self.deadline = math.inf  # set by stop(): a callback that comes later is answered 503 at once
        self.opening: asyncio.Task | None = None  # an open under way, which stop() abandons
        self.failures = 0  # connections in a row that failed or did not stay up HEALTHY_AFTER_SECONDS
        self.tried = asyncio.Event()  # the first open has ended: connected, or not

    @property
    def connected(self) -> bool:
        return any(conn.live for conn in self.connections)

    def in_hand(self) -> dict[asyncio.Task, _Connection]:
        return {task: conn for conn in self.connections for task in conn.in_hand}

    def begin_stopping(self) -> None:
        self.phase = "stopping"
        self.stopping.set()

    async def start(self) -> None:
        """Stay connected until stop(); credentials refused before the first connection raise CredentialsRejected."""
        self.pre_start()
        try:
            connector = aiohttp.TCPConnector(resolver=_Resolver())
            async with aiohttp.ClientSession(connector=connector) as http:
                while self.phase != "stopping":
                    await self.connect_and_serve(http)
        finally:
            if self.phase != "stopping":  # cancelled or failed, not stopped: let nothing dangle
                self.begin_stopping()
                for task in self.in_hand():
                    task.cancel()
                await self.close_connections()

    async def stop(self, grace: float = 0.0) -> None:
        """Open no new connection, answer callbacks for up to `grace` seconds (then 503), close the connections."""
        self.begin_stopping()
        self.deadline = time.monotonic() + grace
        if self.opening is not None:
            self.opening.cancel()
        if in_hand := self.in_hand():
            _log.info("%s: stopping: waiting up to %.3g s for %d callback(s)", self.name, grace, len(in_hand))
        while (in_hand := self.in_hand()) and (left := self.deadline - time.monotonic()) > 0:
            await asyncio.wait(in_hand, timeout=left)
        await asyncio.gather(*(conn.answer_late_ones(grace) for conn in list(self.connections)))
        self.deadline = time.monotonic()  # a frame read while the connections close is answered 503, not served
        await self.close_connections()
        if in_hand := self.in_hand():  # those answers: nothing is left running once stopped
            await asyncio.wait(in_hand, timeout=1)

    async def close_connections(self) -> None:
        for conn in list(self.connections):  # each one's reader then ends
            await conn.close()

    def refusal(self) -> str | None:
        """Why a new callback is answered 503 at once instead of being served, if it is."""
        if time.monotonic() >= self.deadline:
            return "the bot is stopping"
        if sum(len(conn.in_hand) for conn in self.connections) >= _MAX_CALLBACKS_IN_HAND:
            return f"{_MAX_CALLBACKS_IN_HAND} callbacks in hand: busy"
        return None

    async def connect_and_serve(self, http: aiohttp.ClientSession) -> None:
        """One connection from open to its end (or retirement), then the pause before the next."""
        conn = None
        try:
            self.opening = asyncio.create_task(self.connect(http))
            try:
                conn = await self.opening
            except asyncio.CancelledError:
                if self.phase == "stopping" and not asyncio.current_task().cancelling():
                    return  # stop() abandoned the open
                raise
            if self.phase == "stopping":  # the open finished as stop() began
                await conn.close()
                return
            self.connections.add(conn)
            self.phase = "serving"
            self.tried.set()
            _log.info("%s: connected", self.name)
            level, problem = logging.INFO, await conn.serve()
        except _CredentialsRejected as exc:
            if self.phase == "starting":
                if self.tried.is_set():  # running() has returned already: nobody else would say why this client ends
                    _log.error("%s: %s", self.name, _rejected(exc))
                raise
            level, problem = logging.ERROR, f"DingTalk rejected CLIENT_ID / CLIENT_SECRET ({exc})"
        except websockets.exceptions.ConnectionClosed as exc:
            level, problem = logging.WARNING, f"connection lost: {exc}"
        except TimeoutError:
            level, problem = logging.WARNING, "websocket handshake timed out"
        except (OSError, ValueError, ImportError, websockets.exceptions.WebSocketException) as exc:
            # ValueError: an endpoint websockets cannot use, e.g. a port out of range; ImportError: a SOCKS proxy
            level, problem = logging.WARNING, str(exc) or type(exc).__name__
        finally:
            self.opening = None
        self.tried.set()
        if self.phase == "stopping":
            return
        # Only a connection that stayed up a while resets the backoff, so a gateway that closes every new connection
        # at once does not make the bot reconnect in a tight loop; a routine `disconnect` waits at most ~5 s.
        self.failures = 0 if conn and time.monotonic() - conn.opened_at >= _HEALTHY_AFTER_SECONDS else self.failures + 1
        longest = _RETIRED_MAX_DELAY_SECONDS if conn and conn.retired.is_set() else _RECONNECT_MAX_DELAY_SECONDS
        delay = _reconnect_delay(self.failures, longest)
        if self.phase == "starting" and level == logging.WARNING:
            problem += " (never connected yet: check the network, or HTTPS_PROXY behind a proxy; see"
            problem += " docs/troubleshooting.md#never-connected)"
        _log.log(level, "%s: %s; reconnecting in %.1f s", self.name, problem, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)

    async def connect(self, http: aiohttp.ClientSession) -> _Connection:
        """An endpoint and a one-time ticket from DingTalk, then the websocket, each within CONNECT_TIMEOUT_SECONDS.
        Not the SDK's open: 0.24.3's blocks the loop without a timeout, and neither says credentials were refused."""
        url = f"{self.settings.dingtalk_openapi_endpoint}/v1.0/gateway/connections/open"
        time_limit = self.settings.connect_timeout_seconds
        subscriptions = [{"type": "CALLBACK", "topic": topic} for topic in self.callback_handler_map]
        body = {"clientId": self.credential.client_id, "clientSecret": self.credential.client_secret}
        body |= {"subscriptions": subscriptions, "ua": f"dingtalk-sdk-python/v{SDK_VERSION}-union", "localIp": ""}
        try:
            response, raw = await _fetch(http, url, json.dumps(body).encode(), time_limit)
            status = response.status
        except TimeoutError:
            raise ConnectionError(f"connection open: no answer within {time_limit:.0f} s") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise ConnectionError(f"connection open: {exc or type(exc).__name__}") from None
        answer, text = _json_object(raw), raw[:200].decode(errors="replace")
        if status == 401 or answer.get("code") == "authFailed":
            raise _CredentialsRejected(f"{answer.get('code', status)}: {answer.get('message', text)}")
        endpoint, ticket = answer.get("endpoint"), answer.get("ticket")
        if status != 200 or not (isinstance(endpoint, str) and endpoint and isinstance(ticket, str) and ticket):
            raise ConnectionError(f"connection open: HTTP {status}, no endpoint and ticket in {text!r}")
        parts = urlsplit(endpoint)  # the ticket as a query parameter of its own, whatever the endpoint carries
        url = urlunsplit(parts._replace(query=urlencode([*parse_qsl(parts.query), ("ticket", ticket)])))
        # Keepalive is keep_alive()'s, not websockets' (which waits for the close handshake of a dead connection).
        keepalive = self.settings.keepalive_seconds
        options = {"ping_interval": None, "ping_timeout": None, "close_timeout": min(keepalive, 5)}
        options |= {"open_timeout": time_limit, "max_size": _MAX_FRAME_BYTES}
        options["compression"] = None  # as the Go SDK's handshake: per-message deflate costs CPU on every frame
        if proxy := _proxy_for(url):  # websockets looks up the proxy itself
            return _Connection(await websockets.connect(url, proxy=proxy, **options), self)
        failed = OSError(f"no address for {parts.hostname}")
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        for *_, address in await _lookup(parts.hostname or "", port):  # each in turn, e.g. IPv6's, then IPv4's
            try:
                return _Connection(
                    await websockets.connect(url, host=address[0], port=address[1], proxy=None, **options), self
                )
            except OSError as exc:
                failed = exc
        raise failed

    async def ack_for(self, frame: dict[str, Any], message_id: str) -> dict[str, Any] | None:
        """The frame parsed by the SDK's classes and answered by its handler (the system one for ping, disconnect)."""
        kind = frame.get("type")
        try:
            if kind == dingtalk_stream.SystemMessage.TYPE:
                system = dingtalk_stream.SystemMessage.from_dict(frame)
                return (await self.system_handler.raw_process(system)).to_dict()
            if kind != dingtalk_stream.CallbackMessage.TYPE:
                _log.warning("%s: ignored a %r frame", self.name, kind)  # EVENT frames come only to event subscribers
                return None
            message = dingtalk_stream.CallbackMessage.from_dict(frame)
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:  # e.g. `data` not JSON
            _log.warning("%s: frame %s is malformed (%s): 400", self.name, message_id, exc)
            return _frame_ack(message_id, f"malformed frame: {exc}", dingtalk_stream.AckMessage.STATUS_BAD_REQUEST)
        if (handler := self.callback_handler_map.get(message.headers.topic)) is None:
            _log.warning("%s: no handler for topic %r: 404", self.name, message.headers.topic)
            return _frame_ack(message_id, "topic not subscribed", dingtalk_stream.AckMessage.STATUS_NOT_IMPLEMENT)
        return (await handler.raw_process(message)).to_dict()


def _frame_ack(message_id: str, problem: str, code: int = 200, status: int | None = None) -> dict[str, Any]:
    """An ack with `code` and a Graph response of `status` (default: `code`) saying what went wrong."""
    response = _graph_response(status or code, _failure(problem[:300]))
    headers = {"messageId": message_id, "contentType": "application/json"}
    return {"code": code, "headers": headers, "message": problem[:300], "data": json.dumps({"response": response})}


# ----- Lifecycle / 生命周期：clients, health endpoint, signals, logging, main -----------------------------


@contextlib.asynccontextmanager
async def running(
    actions: Mapping[str, _Action],
    tools: str | Path = TOOLS_FILE,
    *,
    settings: Settings | None = None,
    connected_within: float = 30.0,
    lifespan: Callable[[], contextlib.AbstractAsyncContextManager] | None = None,
) -> AsyncIterator[list[_StreamClient]]:
    """The skill inside your own asyncio service, with your actions and tools file (default: tools.yaml beside bot.py)
    and settings (default: the environment and .env). Yields the clients once each is connected, or after
    `connected_within` seconds (saying so); raises ConfigError with the line `python bot.py` would print. On exit it
    finishes the callbacks in hand (SHUTDOWN_GRACE_SECONDS) and closes. `lifespan`: as main()'s."""
    if settings is None:
        _read_dotenv()
        settings = load_settings()
    with _logging_in_apps(settings):
        operations = load_operations(Path(tools), actions, forwarding=settings.forward_url is not None)
        async with (lifespan or contextlib.nullcontext)(), _serving(settings, operations) as started:
            await _wait_connected(started, connected_within)
            yield list(started)


async def _wait_connected(started: Mapping[_StreamClient, asyncio.Task], within: float) -> None:
    """Once each client's first open has ended, for up to `within` seconds: ConfigError if it cannot start (e.g.
    credentials refused); one that could not connect (a network down) is said so and keeps trying."""
    deadline = time.monotonic() + within
    for client, task in started.items():
        tried = asyncio.create_task(client.tried.wait())
        try:
            timeout = max(0.0, deadline - time.monotonic())
            await asyncio.wait([tried, task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            tried.cancel()
        if task.done():  # it ended before it connected
            error = task.exception()
            if isinstance(error, _CredentialsRejected):
                raise ConfigError(_rejected(error))
            raise error or ConfigError(f"{client.name} stopped before it connected")
        if client.phase == "starting":
            _log.warning("%s not connected yet: going on; it keeps trying in the background", client.name)


async def _serve_until_stopped(
    settings: Settings, stop: asyncio.Event, operations: Mapping, lifespan: Any = None
) -> int:
    """serving() until `stop` is set; the exit code: 0, 2 (credentials refused, HEALTH_PORT busy) or 1 (a bug)."""
    try:
        async with (lifespan or contextlib.nullcontext)(), _serving(settings, operations) as started:
            stopped = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait([stopped, *started.values()], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
    except ConfigError as exc:
        _log.error("%s", exc)
        return 2
    except (Exception, SystemExit):  # e.g. lifespan, as it opened or closed what actions share
        _log.exception("stopped on an error")
        return 1
    ended = None if stopped in done else next(iter(done))
    error = ended and not ended.cancelled() and ended.exception()
    if isinstance(error, _CredentialsRejected):
        _log.error("%s", _rejected(error))
        return 2
    if ended:
        _log.error("%s ended unexpectedly", ended.get_name(), exc_info=error or None)
    return 1 if ended else 0


@contextlib.asynccontextmanager
async def _serving(settings: Settings, operations: Mapping[str, Operation]) -> AsyncIterator[dict[Any, asyncio.Task]]:
    """The clients (credential -> client -> handler -> start, as the official example) and the health endpoint;
    yields each client's start() task; on exit they stop, finishing the callbacks in hand first."""
    credential = dingtalk_stream.Credential(settings.client_id, settings.client_secret)
    # As many HTTP connections as callbacks in hand, so no reply waits for a free one past its time limit.
    connector = aiohttp.TCPConnector(limit=_MAX_CALLBACKS_IN_HAND * settings.instances, resolver=_Resolver())
    async with aiohttp.ClientSession(connector=connector) as http:
        clients = [_StreamClient(credential, settings, name=f"stream-{n + 1}") for n in range(settings.instances)]
        for client in clients:
            handler = _ActionHandler(settings, operations, http, _LEDGER)
            client.register_callback_handler(dingtalk_stream.GraphMessage.TOPIC, handler)
        async with _health_endpoint(settings, clients), _watching_the_loop():
            started = {client: asyncio.create_task(client.start(), name=client.name) for client in clients}
            _log.info(
                "dingtalk-skill-bot %s (dingtalk-stream %s): serving %d operation(s) with %d stream client(s)",
                *(VERSION, SDK_VERSION, len(operations), len(clients)),
            )
            if forwarded := [key for key, operation in operations.items() if operation.action is None]:
                _log.info(
                    "forwarding %d operation(s) to %s: %s", len(forwarded), settings.forward_url, ", ".join(forwarded)
                )
            limits = {"ACTION_TIMEOUT_SECONDS": settings.action_timeout_seconds}
            limits |= {
                f"{key}: x-action-timeout-seconds": op.time_limit for key, op in operations.items() if op.time_limit
            }
            for name, limit in limits.items():
                if limit > 16:
                    _log.warning(
                        "%s=%g: DingTalk has been seen to redeliver a callback not acked within about 16 s; "
                        "docs/skills.md#slow-backends says what to do with a slower backend",
                        *(name, limit),
                    )
            try:
                yield started
            finally:
                draining = asyncio.ensure_future(_stop_all(started, settings.shutdown_grace_seconds))
                try:
                    await asyncio.shield(draining)
                except asyncio.CancelledError:  # cancelled again while draining: what is in hand is cancelled now
                    await _stop_all(started, 0)
                    raise
    _log.info("stopped")


async def _stop_all(started: Mapping[_StreamClient, asyncio.Task], grace: float) -> None:
    await asyncio.gather(*(client.stop(grace) for client in started))
    await asyncio.wait(started.values(), timeout=10)
    for task in started.values():  # every outcome collected, so none is reported as "never retrieved"
        task.cancel()
        if task.done() and not task.cancelled():
            task.exception()


def _rejected(error: BaseException) -> str:
    return (
        f"DingTalk rejected CLIENT_ID / CLIENT_SECRET ({error}): check both in the developer console, "
        "your app → 凭证与基础信息 / Credentials & basic info"
    )


@contextlib.asynccontextmanager
async def _health_endpoint(settings: Settings, clients: list[_StreamClient]) -> AsyncIterator[None]:
    """GET /healthz on HEALTH_PORT, if set: 200 when every client is connected, else 503 (and while stopping)."""
    if not settings.health_port:
        yield
        return
    from aiohttp import web  # here, not at the top: aiohttp's server adds 2.4 MB that a bot without it need not carry

    async def healthz(_: web.Request) -> web.Response:
        live, stopping = sum(c.connected for c in clients), any(c.phase == "stopping" for c in clients)
        status = "stopping" if stopping else "ok" if live == len(clients) else "degraded"
        body = {"status": status, "instances": len(clients), "connected": live}
        return web.json_response(body, status=200 if status == "ok" else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.health_host, settings.health_port).start()
        except OSError as exc:
            raise ConfigError(f"cannot serve HEALTH_PORT={settings.health_port}: {exc}") from None
        _log.info("health endpoint on http://%s:%d/healthz", settings.health_host, settings.health_port)
        yield
    finally:
        await runner.cleanup()


_BLOCKED_SECONDS = 1.0  # code that holds the event loop this long gets a warning


@contextlib.asynccontextmanager
async def _watching_the_loop() -> AsyncIterator[None]:
    """Warns once when an action holds the event loop (a blocking call inside an async def stalls keepalive and every
    other callback): the loop renews a mark every 0.25 s, and a thread that finds it late names the action the loop is
    running (its task's name). Said while the loop is held, since it may never let go. Nothing per callback."""
    loop, mark, done = asyncio.get_running_loop(), [time.monotonic()], threading.Event()

    def watch() -> None:  # in a thread of its own: it must run while the loop does not
        held = False
        while not done.wait(0.25):
            was_held, held = held, time.monotonic() - mark[0] > _BLOCKED_SECONDS
            task = asyncio.current_task(loop) if held and not was_held else None
            if task is not None and task.get_name().startswith("action "):
                _log.warning(
                    "%s has held the event loop for over %.3g s, stalling keepalive and every other callback: "
                    "use an async client, or make the action a plain def (it then runs in a worker thread)",
                    *(task.get_name(), _BLOCKED_SECONDS),
                )

    async def renew() -> None:
        while True:
            mark[0] = time.monotonic()
            await asyncio.sleep(0.25)

    renewing = asyncio.create_task(renew())
    threading.Thread(target=watch, name="bot-loop-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        renewing.cancel()


_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")  # line ends, controls, lone surrogates


def _messages_of(error: BaseException | None) -> Iterator[str]:
    """The messages and notes of `error`, its causes and contexts, and a group's exceptions: what a traceback shows."""
    seen, left = set(), [error]
    while left:
        error = left.pop()
        if error is None or id(error) in seen:  # (a chain may go round)
            continue
        seen.add(id(error))
        with contextlib.suppress(Exception):  # (a __str__ may fail)
            yield from [str(error), *map(str, getattr(error, "__notes__", ()))]
        left += [error.__cause__, error.__context__, *getattr(error, "exceptions", ())]


def _printable(text: str) -> str:
    """`text` on one line: line ends, control characters and lone surrogates escaped as Python writes them."""
    return _UNPRINTABLE.sub(lambda character: ascii(character.group())[1:-1], text)


class _RedactingFilter(logging.Filter):
    """Keeps secrets and webhook session tokens out of every log line, whichever library wrote it, and each message
    on one line: a value it shows is escaped (a path's %0A would otherwise start a forged line)."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if len(s) >= 4)  # a dummy "x" would mask every x in every line

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # e.g. 0.24.3's logger.exception("unknown exception", e)
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = _printable(_redact(message, self.secrets)), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            for said in _messages_of(record.exc_info[1]):  # each on one line too
                record.exc_text = record.exc_text.replace(said, _printable(said))
        if record.exc_text:
            record.exc_text = _redact(record.exc_text, self.secrets)
        return True


@contextlib.contextmanager
def _logging_in_apps(settings: Settings) -> Iterator[None]:
    """Embedded, the bot's lines as `python bot.py` prints them: at LOG_LEVEL, redacted, through the app's handlers,
    or a handler of their own where the app has none (uvicorn's defaults leave the root logger without one)."""
    redacting, level = _RedactingFilter(_secrets_of(settings)), _log.level
    own = None if logging.getLogger().handlers or _log.handlers else logging.StreamHandler()  # (another block's)
    _log.addFilter(redacting)
    _log.setLevel(level or settings.log_level)
    if own is not None:
        own.setFormatter(logging.Formatter(_LOG_FORMAT))
        _log.addHandler(own)
    try:
        yield
    finally:
        _log.removeFilter(redacting)
        _log.setLevel(level)
        if own is not None:
            _log.removeHandler(own)


def _configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.addFilter(_RedactingFilter(_secrets_of(settings)))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # Per-frame websocket debug output drowns everything else; keep it at INFO or above.
    logging.getLogger("websockets").setLevel(max(logging.INFO, logging.getLevelName(settings.log_level)))


async def _run_until_signalled(settings: Settings, operations: Mapping[str, Operation], lifespan: Any) -> int:
    """serve() until SIGINT, SIGTERM or SIGHUP; a second one exits at once. Whatever actions do, the process ends
    within the grace period and a few seconds."""
    loop, stop, received = asyncio.get_running_loop(), asyncio.Event(), []

    def on_signal(signum: int, _: Any) -> None:  # Python's own handler: it runs even while an action holds the loop
        name, held = signal.Signals(signum).name, settings.shutdown_grace_seconds + 10
        if received:
            _exit_now(f"second {name}: exiting without waiting", 128 + signum)
        # An action that holds the loop holds the grace period's timer too: this one runs in a thread of its own.
        message = f"still running {held:.3g} s after {name}: exiting without waiting"
        received.append(threading.Timer(held, _exit_now, (message, 128 + signum)))
        received[0].daemon = True
        received[0].start()
        _log.info("%s received: finishing in-flight callbacks, then exiting", name)
        loop.call_soon_threadsafe(stop.set)

    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):  # HUP: terminal closed
        if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored as it started (nohup: HUP): it stays ignored
            signal.signal(signum, on_signal)
    # sys.exit() in a task an action starts (asyncio.gather, create_task) would end the event loop: it ends that task
    loop.set_task_factory(_containing_task)
    threads = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="bot-thread")
    loop.set_default_executor(threads)  # for an action's asyncio.to_thread: its idle workers go at the end
    exit_code = await _serve_until_stopped(settings, stop, operations, lifespan)
    for timer in received:  # what is left is bounded below
        timer.cancel()
    threads.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + 1.0
    while any(left := _leftovers()) and time.monotonic() < deadline:  # noqa: ASYNC110 (threads offer nothing to await)
        await asyncio.sleep(0.05)
    if any(left):  # asyncio.run and the interpreter would wait for them without limit
        threads_left, tasks_left = left
        _log.warning(
            "exiting with %d thread(s) still running, and %d task(s) (an action that did not stop): %s",
            *(len(threads_left), len(tasks_left), ", ".join(threads_left + tasks_left)),
        )
        if "multiprocessing" in sys.modules:  # e.g. an action's process pool: its workers would outlive os._exit
            for child in sys.modules["multiprocessing"].active_children():
                child.terminate()
        try:
            logging.shutdown()
        finally:
            os._exit(exit_code)
    return exit_code


def _containing_task(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> asyncio.Task:
    """A task whose sys.exit() ends only itself. The engine's frame tasks (they answer whatever is raised) and its
    contained actions need no second layer: each layer costs every step of the task."""
    if getattr(coro, "cr_code", None) not in (_contained.__code__, _Connection.answer.__code__):
        coro = _contained(coro)
    return asyncio.Task(coro, loop=loop, **options)


def _exit_now(message: str, code: int) -> None:
    """Exit at once, whatever holds the loop or a lock: the last line goes straight to stderr."""
    try:
        os.write(2, f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING bot: {message}\n".encode())
    finally:
        os._exit(code)


def _leftovers() -> tuple[list[str], list[str]]:
    """The threads and tasks that would hold the exit."""
    threads = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.current_thread()]
    return threads, [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]


def main(
    actions: Mapping[str, _Action], lifespan: Callable[[], contextlib.AbstractAsyncContextManager] | None = None
) -> int:
    """`python bot.py`: serve `actions` as tools.yaml beside bot.py describes them, until a signal; the exit code.
    `lifespan()`, an async context manager, opens what actions share before the first callback and closes it after
    the last (docs/skills.md#shared-clients)."""
    if sys.argv[1:] == ["--version"]:
        print(f"dingtalk-skill-bot {VERSION} (dingtalk-stream {SDK_VERSION}, Python {platform.python_version()})")
        return 0
    if sys.argv[1:]:  # settings come from the environment and .env, not the command line
        print(
            "usage: python bot.py [--version]  (settings: the environment or .env, docs/configuration.md#settings)",
            file=sys.stderr,
        )
        return 0 if sys.argv[1:] in (["-h"], ["--help"]) else 2
    try:
        _read_dotenv()
        forwarding = bool(os.environ.get("FORWARD_URL", "").strip())
        operations = load_operations(TOOLS_FILE, actions, forwarding=forwarding)  # tools.yaml first, credentials or not
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    # What the start left (modules, tools.yaml's validators) is never garbage: out of the collector's way, which then
    # runs every 10,000 new objects, not every 700 (docs/performance.md#throughput-target).
    gc.freeze()
    gc.set_threshold(10_000)
    return asyncio.run(_run_until_signalled(settings, operations, lifespan))


if __name__ == "__main__":
    sys.exit(main(ACTIONS, globals().get("lifespan")))  # (lifespan: if your part above defines one)
