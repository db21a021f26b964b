"""Try the bot offline: a local DingTalk simulator, no credentials needed.

    python -m tests.simulate --list                                    # the operations in tools.yaml, their modes
    python -m tests.simulate 杭州 明天                                 # the first path; values in declared order
    python -m tests.simulate --path /v1/actions/weather 杭州 明天      # disabled: reply through sessionWebhook
    python -m tests.simulate --path /v1/actions/exchange-rate USD 100  # auto: data for the assistant's model
    python -m tests.simulate --path /v1/actions/on-call 运维 2         # markdown: shown as is in the result card
    python -m tests.simulate location=杭州 date=明天                   # or by name
    python -m tests.simulate '{"location": "杭州"}'                    # or as a JSON object
    python -m tests.simulate -i                                        # interactive: each line you type is one call
    python -m tests.simulate --verbose 杭州                            # also show the frames on the wire
    python -m tests.simulate --context userId=manager-01 杭州          # a value DingTalk fills in (x-dingtalk-context)
    python -m tests.simulate --repeat 50 --concurrency 10 杭州         # 50 calls, 10 at a time: statuses, latencies
    python -m tests.simulate --tools my_tools.yaml --actions my_skills:ACTIONS ...  # skills of your own module
    python -m tests.simulate --fake http://127.0.0.1:8765 ...          # to the bot or app connected to a fake
                                                                       # started by python -m tests.fake_dingtalk
    FORWARD_URL=http://127.0.0.1:8000 python -m tests.simulate ...     # paths without an action: to your service

It starts the fake DingTalk from tests/fake_dingtalk.py on 127.0.0.1, runs the unmodified bot.py
against it (as `python bot.py`, with dummy credentials; with --tools or --actions, those skills through
bot.running(), as tests/serve_skills.py does), builds the Graph callback for the operation
as bot.py itself reads tools.yaml (bot.load_operations), and prints what the user would see for the
operation's x-dingtalk-display-result: the card posted to the sessionWebhook (disabled), the markdown
result card (markdown) or the data for the assistant's model (auto); then the Graph response in the ack.
With FORWARD_URL set (the environment, or .env beside bot.py), the bot forwards each operation without an action
to that HTTP service (docs/forwarding.md), as `python bot.py` would: start your service first.
Exit code: 0 when every call was answered 200 as its mode expects, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import signal
import sys
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import dingtalk_stream

import bot
from tests import authoring
from tests.fake_dingtalk import GRAPH_TOPIC, FakeDingTalk, GraphResult, WebhookPost, bot_env, graph_request
from tests.serve_skills import actions_of

ROOT = Path(__file__).resolve().parent.parent
CONNECT_TIMEOUT = 15.0

# Plausible demo values for the x-dingtalk-context fields, keyed by (property, format).
DEMO_CONTEXT = {
    ("currentUser", "userId"): "demo-user-0001",
    ("currentUser", "unionId"): "demo-union-0001",
    ("currentUser", "jobNum"): "A0001",
    ("currentUser", "oauthAuthCode"): "demo-auth-code",
    ("currentOrg", "corpId"): "dingdemocorp0001",
    ("currentInput", "attribute"): '{"msgType":"text"}',
    ("currentConversation", "openConversationId"): "cid-demo-conversation",
    ("currentConversation", "threadId"): "demo-thread-0001",
    ("currentConversation", "runId"): "demo-run-0001",
    ("currentConversation", "conversationToken"): "ct_demo_conversation_token",
}

# What the user sees for each x-dingtalk-display-result.
DISPLAY_LABELS = {
    "auto": "data for the assistant's model",
    "markdown": "markdown shown as is",
    "disabled": "reply through sessionWebhook",
}


class UsageError(Exception):
    pass


# ----- the operations of tools.yaml, as bot.py reads them -----


def load_operations(
    tools: Path = bot.TOOLS_FILE, actions: dict[str, Any] | None = None, forwarding: bool = False
) -> dict[str, bot.Operation]:
    """The tools file's operations exactly as bot.py reads them at start ("METHOD /path" -> Operation; with
    `forwarding`, as with FORWARD_URL set), after the authoring check (tests/authoring.py): what you would get wrong
    while writing a skill is said first."""
    return authoring.check_file(tools, actions, forwarding)


def pick_operation(operations: dict[str, bot.Operation], path: str | None) -> bot.Operation:
    """The operation --path names ("/path" or "METHOD /path"); the first one without --path."""
    if path is None:
        return next(iter(operations.values()))
    for key, operation in operations.items():
        if path in (operation.path, key):
            return operation
    known = ", ".join(dict.fromkeys(op.path for op in operations.values()))
    raise UsageError(f"{path} is not in tools.yaml (known paths: {known})")


@dataclass(frozen=True)
class Parameter:
    """One parameter of an operation, as the simulator shows and fills it in (read from its JSON Schema)."""

    name: str
    location: str  # "path" or "query" (sent as text), or "body" (JSON)
    type: str | None
    required: bool
    enum: list | None
    minimum: float | None
    maximum: float | None
    context: dict | None  # x-dingtalk-context: DingTalk fills it in
    example: Any
    rules: dict[str, Any]  # its other rules: pattern, lengths, format, items ...


def parameters(operation: bot.Operation) -> list[Parameter]:
    required = operation.schema.get("required", [])
    found = []
    for name, prop in operation.schema["properties"].items():
        kinds = prop.get("type") if isinstance(prop.get("type"), list) else [prop.get("type")]
        kind = next((k for k in kinds if k != "null"), None)  # "nullable" makes it [type, "null"]
        low, high = prop.get("minimum", prop.get("exclusiveMinimum")), prop.get("maximum", prop.get("exclusiveMaximum"))
        location = "path" if name in path_parameters(operation) else "query" if name in operation.query else "body"
        context, example = prop.get("x-dingtalk-context"), prop.get("example")
        rules = {key: value for key, value in prop.items() if key not in SHOWN and not str(key).startswith("x-")}
        if "x-pattern" in prop:  # as written in tools.yaml, not as the bot translated it for Python
            rules["pattern"] = prop["x-pattern"]
        found.append(
            Parameter(name, location, kind, name in required, prop.get("enum"), low, high, context, example, rules)
        )
    return found


SHOWN = {
    "type",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "example",
    "description",
    "title",
}


def path_parameters(operation: bot.Operation) -> list[str]:
    """The names of the operation's {name} path segments, in order."""
    return re.findall(r"{([^}/]+)}", operation.path)


def sent_path(operation: bot.Operation, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The path as DingTalk sends it, its {name} segments filled in from `values` (percent-encoded), and the values
    left for the query string or the body."""
    values, path = dict(values), operation.path
    for name in path_parameters(operation):
        if name in values:
            path = path.replace(f"{{{name}}}", quote(str(values.pop(name)), safe=""))
    return path, values


def user_parameters(operation: bot.Operation) -> list[Parameter]:
    """The parameters the assistant's model fills in from the user's words (no x-dingtalk-context)."""
    return [p for p in parameters(operation) if p.context is None]


def context_parameters(operation: bot.Operation) -> list[Parameter]:
    """The parameters DingTalk fills in itself (x-dingtalk-context)."""
    return [p for p in parameters(operation) if p.context is not None]


def parse_args(operation: bot.Operation, words: list[str]) -> dict[str, Any]:
    """Positional words, key=value pairs or one JSON object -> the user's parameters.

    Positional words fill the parameters without x-dingtalk-context in declared order. Typed words are
    converted to the declared type for a JSON body; query parameters stay text, as in a real query string
    (the bot converts those itself). A JSON object is sent as given."""
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        try:
            value = json.loads(words[0])
        except ValueError as exc:
            raise UsageError(f"not a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise UsageError("the JSON argument must be an object")
        if filled := sorted(value.keys() & {p.name for p in context_parameters(operation)}):
            raise UsageError(f"{filled[0]} is filled in by DingTalk (x-dingtalk-context): set it with --context")
        return value
    declared = {p.name: p for p in user_parameters(operation)}
    filled_in = {p.name for p in context_parameters(operation)}
    if not words:  # nothing typed: the examples tools.yaml gives, so a bare `python -m tests.simulate` works
        return {p.name: convert(p, str(p.example)) for p in declared.values() if p.example is not None}
    params: dict[str, Any] = {}
    positional = iter(declared.values())
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key in filled_in:
            raise UsageError(f"{key} is filled in by DingTalk (x-dingtalk-context): set it with --context {word}")
        if sep and key in declared:
            param = declared[key]
        else:
            param, value = next(positional, None), word
            if param is None:
                takes = ", ".join(declared) or "no parameters"
                raise UsageError(f"too many values: {operation.method} {operation.path} takes {takes}")
        params[param.name] = convert(param, value)
    return params


_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BOOLEANS = {"true": True, "yes": True, "y": True, "1": True, "false": False, "no": False, "n": False, "0": False}


def convert(param: Parameter, value: str) -> Any:
    """A word typed for `param` as DingTalk would send it: its JSON type in a body, text in a query string."""
    kind = param.type
    if kind == "integer" and _INTEGER.fullmatch(value):
        typed: Any = int(value)
    elif kind == "number" and _NUMBER.fullmatch(value):
        typed = int(value) if _INTEGER.fullmatch(value) else float(value)
    elif kind == "boolean" and value.lower() in _BOOLEANS:
        typed = _BOOLEANS[value.lower()]
    elif kind in ("array", "object"):
        try:
            typed = json.loads(value)
        except ValueError:
            typed = None
        if not isinstance(typed, list if kind == "array" else dict):
            raise UsageError(f"{param.name}: {value!r} is not a JSON {kind}")
    elif kind in ("integer", "number", "boolean"):
        raise UsageError(f"{param.name}: {value!r} is not {'an' if kind == 'integer' else 'a'} {kind}")
    else:
        typed = value
    if param.location in ("path", "query"):  # a URI carries text; the bot converts it to the declared type
        return value if kind in (None, "string", "integer", "number") else json.dumps(typed)
    return typed


def context_values(operation: bot.Operation, pairs: list[str]) -> dict[str, str]:
    """--context NAME=VALUE pairs, each a context parameter the operation declares and its action takes."""
    declared = {p.name for p in context_parameters(operation)}
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        where = f"{operation.method} {operation.path}"
        if not sep:
            raise UsageError(f"--context {pair}: write it as NAME=VALUE")
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise UsageError(
                f"--context {name}: {where} declares no x-dingtalk-context parameter {name} (it has: {known})"
            )
        if operation.action is not None and name not in operation.takes.names and not operation.takes.takes_all:
            action = getattr(operation.action, "__name__", type(operation.action).__name__)
            raise UsageError(f"--context {name}: {action}() does not take {name}, so it would never see the value")
        values[name] = value
    return values


def build_callback(
    operation: bot.Operation,
    params: dict[str, Any],
    raw_input: str,
    webhook: str,
    context: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Graph callback DingTalk would push for this call, with its context parameters filled in and the values of
    its path's {name} segments in the path."""
    values = dict(params)
    for param in context_parameters(operation):
        prop, fmt = param.context.get("property"), param.context.get("format")  # type: ignore[union-attr]
        if param.name in (context or {}):
            values[param.name] = context[param.name]  # type: ignore[index]
        elif param.name == operation.webhook:
            values[param.name] = webhook
        elif (prop, fmt) == ("currentInput", "raw"):
            values[param.name] = raw_input
        else:
            values[param.name] = DEMO_CONTEXT.get((prop, fmt), f"demo-{fmt}")
    path, values = sent_path(operation, values)
    return graph_request(path, values, method=operation.method)


def describe(
    operations: dict[str, bot.Operation],
    name: str = "tools.yaml",
    forward_url: str | None = None,
    time_limit: float = bot.Settings.action_timeout_seconds,
) -> str:
    """--list: each operation's method, path, display mode, time limit, where it is served (with FORWARD_URL) and
    parameters, with every rule they carry."""
    forwarded = sum(operation.action is None for operation in operations.values())
    said = f"; {forwarded} forwarded to {forward_url} (no action in ACTIONS)" if forwarded else ""
    blocks = [f"{name} declares {len(operations)} operation(s){said}:"]
    for operation in operations.values():
        lines = [f"{operation.method} {operation.path}"]
        lines.append(f"    display: {operation.display} — {DISPLAY_LABELS[operation.display]}")
        if operation.time_limit is not None:
            lines.append(f"    time limit: {operation.time_limit:g} s (x-action-timeout-seconds)")
        else:
            lines.append(f"    time limit: {time_limit:g} s (ACTION_TIMEOUT_SECONDS)")
        if operation.action is None:
            lines.append(f"    forwarded to {forward_url}{operation.path}")
        user, context = user_parameters(operation), context_parameters(operation)
        in_path, rest = [p for p in user if p.location == "path"], [p for p in user if p.location != "path"]
        where = "query string" if operation.method == "GET" else "JSON body"
        width = max((len(p.name) for p in parameters(operation)), default=0)
        for heading, params in (("path", in_path), (where, rest)):
            if params:
                lines.append(f"    parameters ({heading}):")
                lines += [f"      {param.name:<{width}}  {describe_parameter(param)}" for param in params]
        if not user:
            lines.append("    parameters: none")
        if context:
            lines.append("    filled in by DingTalk:")
            for param in context:
                source = ".".join(str(param.context.get(k, "?")) for k in ("property", "format"))  # type: ignore[union-attr]
                lines.append(f"      {param.name:<{width}}  {source}")
        blocks.append("\n".join(lines))
    blocks.append("Call one: python -m tests.simulate --path <path> [values...]")
    return "\n\n".join(blocks)


def describe_parameter(param: Parameter) -> str:
    parts = [param.type or "any", "required" if param.required else "optional"]
    if param.enum is not None:
        parts.append("one of " + ", ".join(map(str, param.enum)))
    low, high = param.minimum, param.maximum
    if low is not None and high is not None:
        parts.append(f"{low}–{high}")
    elif low is not None:
        parts.append(f"≥ {low}")
    elif high is not None:
        parts.append(f"≤ {high}")
    rules = dict(param.rules)
    low, high = rules.pop("minLength", None), rules.pop("maxLength", None)
    if low is not None or high is not None:
        parts.append(f"length {low}" if low == high else f"length {low or 0}–{high if high is not None else '∞'}")
    parts += [f"{key} {value if isinstance(value, str) else json.dumps(value)}" for key, value in rules.items()]
    return ", ".join(parts)


# ----- showing replies in a terminal -----


def render_markdown(text: str) -> str:
    """Markdown as a terminal shows it readably: headings underlined, bullets, quotes, tables aligned,
    no ** markers."""
    lines: list[str] = []
    table: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
        if line.lstrip().startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if table:
            lines += render_table(table)
            table = []
        if heading := re.match(r"#{1,6}\s+(.*)", line):
            lines += [heading.group(1), "‾" * display_width(heading.group(1))]
        elif bullet := re.match(r"\s*[-*+]\s+(.*)", line):
            lines.append(f"  • {bullet.group(1)}")
        elif quote := re.match(r">\s?(.*)", line):
            lines.append(f"  │ {quote.group(1)}")
        else:
            lines.append(line)
    return "\n".join("    " + line if line else "" for line in lines).rstrip("\n")


def render_table(rows: list[list[str]]) -> list[str]:
    """A markdown table with its columns aligned; the |---| row becomes a rule."""
    is_rule = [all(re.fullmatch(r":?-{1,}:?", cell) for cell in row) for row in rows]
    cells = [row for row, rule in zip(rows, is_rule, strict=True) if not rule]
    columns = max(len(row) for row in cells) if cells else 0
    widths = [max((display_width(row[i]) for row in cells if i < len(row)), default=0) for i in range(columns)]
    out = []
    for row, rule in zip(rows, is_rule, strict=True):
        if rule:
            out.append("─┼─".join("─" * w for w in widths))
        else:
            padded = [cell + " " * (w - display_width(cell)) for cell, w in zip(row, widths, strict=False)]
            out.append(" │ ".join(padded).rstrip())
    return out


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def indented(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def show_webhook_post(post: WebhookPost) -> None:
    payload = post.payload
    content = payload.get("content") if isinstance(payload, dict) else None
    template = content.get("templateId") if isinstance(content, dict) else None
    if template == dingtalk_stream.GraphHandler.MARKDOWN_TEMPLATE_ID and post.markdown is not None:  # the bot's card
        print("\n── reply in the chat (markdown card via sessionWebhook) ──")
        print(render_markdown(post.markdown))
    elif template is not None:
        print(f"\n── reply in the chat (AI card {template} via sessionWebhook) ──")
        print(indented(json.dumps(content.get("cardData"), ensure_ascii=False, indent=2)))  # type: ignore[union-attr]
    else:
        print("\n── posted to the sessionWebhook (not an AI card) ──")
        print(indented(payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, indent=2)))


# ----- the simulator -----


class Simulator:
    """Calls as DingTalk makes them, to a bot it starts against a fake of its own, or (with `fake_url`) to whatever
    is connected to a fake running on its own."""

    def __init__(
        self,
        operation: bot.Operation,
        verbose: bool,
        timeout: float,
        context: dict[str, str] | None = None,
        fake_url: str | None = None,
        serve: list[str] | None = None,
        forward_url: str | None = None,
    ) -> None:
        self.operation, self.verbose, self.timeout, self.context = operation, verbose, timeout, context or {}
        self.fake_url, self.serve = fake_url, serve  # serve: `python -m tests.serve_skills` arguments, or None
        self.forward_url = forward_url  # FORWARD_URL, for the bot it starts: where operations without an action go
        self.fake = FakeDingTalk(client_id="simulator-client-id", client_secret="simulator-client-secret")
        self.bot: asyncio.subprocess.Process | None = None
        self.bot_output: list[str] = []
        self._reader: asyncio.Task | None = None
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self.fake_url is not None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout + 5))
            try:
                async with self.http.get(f"{self.fake_url}/simulator/status") as response:
                    connections = (await response.json())["connections"]
            except (aiohttp.ClientError, ValueError, KeyError, TimeoutError) as exc:
                raise RuntimeError(
                    f"no fake DingTalk answers at {self.fake_url} ({exc or type(exc).__name__})"
                ) from None
            if not connections:
                raise RuntimeError(
                    f"nothing is connected to the fake at {self.fake_url}: start your bot or app with the lines "
                    "python -m tests.fake_dingtalk printed"
                )
            print(f"sending calls to the {connections} connection(s) of the fake DingTalk at {self.fake_url}")
            return
        await self.fake.start()
        if self.verbose:
            self.fake.trace = lambda direction, frame: print(
                f"  {'→ frame' if direction == '>' else '← ack'} {json.dumps(frame, ensure_ascii=False)}"
            )
        # set even where empty, so a .env beside bot.py cannot turn them back on
        env = bot_env(self.fake, INSTANCES="1", HEALTH_PORT="", LOG_LEVEL="INFO" if self.verbose else "WARNING")
        if self.forward_url is not None:  # read from the environment or .env as bot.py reads it: said to it outright
            env["FORWARD_URL"] = self.forward_url
        command = ["-m", "tests.serve_skills", *self.serve] if self.serve is not None else [str(ROOT / "bot.py")]
        started = time.monotonic()
        self.bot = await asyncio.create_subprocess_exec(
            sys.executable, *command, cwd=Path.cwd() if self.serve is not None else ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl+C reaches the simulator only; it stops the bot with SIGTERM
        )  # fmt: skip
        self._reader = asyncio.create_task(self._echo_bot_output())
        connected = asyncio.create_task(self.fake.wait_connected(1, CONNECT_TIMEOUT))
        exited = asyncio.create_task(self.bot.wait())
        done, _ = await asyncio.wait({connected, exited}, timeout=CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        exited.cancel()
        if connected not in done or connected.cancelled() or connected.exception():
            reason = f"exited with code {self.bot.returncode}" if exited in done else f"{CONNECT_TIMEOUT:.0f} s passed"
            raise RuntimeError(f"bot.py did not connect to the simulator ({reason})")
        print(f"bot.py connected to the local DingTalk simulator in {time.monotonic() - started:.2f} s")

    async def _echo_bot_output(self) -> None:
        assert self.bot is not None and self.bot.stdout is not None
        async for raw in self.bot.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.bot_output.append(line)
            print(f"  bot| {line}")

    def callback(self, params: dict[str, Any], raw_input: str) -> tuple[dict[str, Any], str]:
        """The callback DingTalk would push for these values, and the session of its sessionWebhook."""
        session = f"aswh_sim_{uuid.uuid4().hex[:16]}"
        base = self.fake_url or self.fake.base_url
        webhook = f"{base}/agent/send?session={session}"
        return build_callback(self.operation, params, raw_input, webhook, self.context), session

    async def invoke(
        self, params: dict[str, Any], raw_input: str, callback: tuple[dict[str, Any], str] | None = None
    ) -> tuple[GraphResult, list[WebhookPost]]:
        """One callback (`callback`, or one made of the values) pushed as DingTalk pushes it: its ack and what was
        posted to its sessionWebhook. Raises TimeoutError when no ack came."""
        request, session = callback or self.callback(params, raw_input)
        if self.http is None:
            started = time.monotonic()
            message_id = await self.fake.send_frame("CALLBACK", GRAPH_TOPIC, request)
            ack = await self.fake.wait_ack(message_id, self.timeout)
            posts = [post for post in self.fake.webhook_posts if post.session == session]
            return GraphResult.from_ack(ack, time.monotonic() - started), posts
        call = {"request": request, "session": session, "timeout": self.timeout}
        async with self.http.post(f"{self.fake_url}/simulator/invoke", json=call) as response:
            answer = await response.json()
        if response.status != 200:
            if response.status == 504:
                raise TimeoutError
            raise RuntimeError(answer.get("error", f"the fake answered HTTP {response.status}"))
        posts = [WebhookPost(**post) for post in answer["posts"]]
        return GraphResult.from_ack(answer["ack"], answer["elapsed"]), posts

    async def call(self, params: dict[str, Any], raw_input: str) -> bool:
        """One call as DingTalk makes it; print what the user would see. True when answered 200 as the
        operation's display mode expects."""
        op = self.operation
        examples = (
            "  ← tools.yaml's examples (nothing typed; {} sends none)" if params and not raw_input.strip() else ""
        )
        callback = self.callback(params, raw_input)
        path, rest = sent_path(op, params)  # the path as sent, its {name} segments filled in; the values left
        if op.method == "GET":
            print(f"\n▶ GET {path}  query {'&'.join(f'{k}={v}' for k, v in rest.items()) or '(none)'}{examples}")
        else:
            print(f"\n▶ {op.method} {path}  body {json.dumps(rest, ensure_ascii=False)}{examples}")
        if context := context_parameters(op):
            given = [f"{p.name}={self.context[p.name]}" if p.name in self.context else p.name for p in context]
            print(f"  + filled in by DingTalk: {', '.join(given)}")
        if op.action is None:  # FORWARD_URL followed by the callback's path and query, as the bot sends them
            uri = callback[0]["requestLine"]["uri"]
            print(f"  → forwarded by the bot to {self.forward_url or 'FORWARD_URL'}{uri} (no action in ACTIONS)")
        try:
            result, posts = await self.invoke(params, raw_input, callback)
        except TimeoutError:
            print(f"✗ no ack within {self.timeout:.0f} s: the bot did not answer")
            return False
        problems = self.show_result(result, posts)
        body = result.body if isinstance(result.body, str) else json.dumps(result.body, ensure_ascii=False)
        print("\n── Graph response (in the ack) ──")
        print(f"    status {result.status}  body {body}")
        print(f"    round trip {result.elapsed * 1000:.0f} ms")
        if result.status != 200:
            problems.insert(0, f"the bot answered Graph status {result.status}")
        for problem in problems:
            print(f"✗ {problem}")
        return not problems

    async def repeat(self, params: dict[str, Any], raw_input: str, count: int, concurrency: int) -> bool:
        """`count` calls, `concurrency` at a time: the statuses they got and their latency percentiles."""
        op, slots, outcomes = self.operation, asyncio.Semaphore(concurrency), []

        async def one() -> None:
            async with slots:
                try:
                    result, _ = await self.invoke(params, raw_input)
                    outcomes.append((str(result.status), result.elapsed))
                except TimeoutError:
                    outcomes.append(("no ack", self.timeout))

        path, rest = sent_path(op, params)
        print(f"\n▶ {count} × {op.method} {path}, {concurrency} at a time  {json.dumps(rest, ensure_ascii=False)}")
        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        took = time.monotonic() - started
        statuses = collections.Counter(status for status, _ in outcomes)
        latencies = sorted(elapsed * 1000 for _, elapsed in outcomes)

        def percentile(share: float) -> float:
            return latencies[min(len(latencies) - 1, int(share * len(latencies)))]

        print(f"    statuses: {', '.join(f'{status} × {n}' for status, n in sorted(statuses.items()))}")
        print(
            f"    latency ms: p50 {percentile(0.5):.0f}, p90 {percentile(0.9):.0f}, p99 {percentile(0.99):.0f}, "
            f"max {latencies[-1]:.0f}"
        )
        print(f"    {count} calls in {took:.2f} s")
        return set(statuses) == {"200"}

    def show_result(self, result: GraphResult, posts: list[WebhookPost]) -> list[str]:
        """Print what the user sees for the operation's display mode; return what went against the mode."""
        display, body, ok = self.operation.display, result.body, result.status == 200
        problems = []
        if display == "disabled":
            for post in posts:
                show_webhook_post(post)
            if ok and not posts:
                problems.append(
                    "x-dingtalk-display-result is disabled, but the bot posted nothing to the sessionWebhook"
                )
            return problems
        if posts:
            problems.append(
                f"x-dingtalk-display-result is {display}, but the bot also posted {len(posts)} message(s) to the "
                "sessionWebhook: the user would see the answer twice"
            )
        if not ok:
            return problems
        if display == "markdown":
            content = body.get("content") if isinstance(body, dict) else None
            print("\n── result card (markdown shown as is) ──")
            if isinstance(content, str):
                print(render_markdown(content))
                if not posts:
                    print("    (no sessionWebhook call: DingTalk shows this markdown in the assistant's result card)")
            else:
                problems.append('x-dingtalk-display-result is markdown, but the body is not {"content": "<markdown>"}')
        else:  # auto
            print("\n── data for the assistant's model (x-dingtalk-display-result: auto) ──")
            print(indented(body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, indent=2)))
            if not posts:
                print("    (in DingTalk the assistant's model turns this data into its answer; no sessionWebhook call)")
        return problems

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
            return
        if self.bot is not None and self.bot.returncode is None:
            self.bot.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.bot.wait(), 10)
            except TimeoutError:
                self.bot.kill()
                print("✗ bot.py did not stop within 10 s of SIGTERM; killed it")
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=2)
        await self.fake.close()


def read_lines() -> asyncio.Queue[str | None]:
    """Lines from stdin, read on a daemon thread so Ctrl+C never waits for Enter; None at EOF.

    os.read, not input(): a daemon thread blocked in input() holds stdin's lock, and the interpreter
    aborts when it exits under it."""
    loop, lines = asyncio.get_running_loop(), asyncio.Queue()

    def reader() -> None:
        pending = b""
        while chunk := os.read(sys.stdin.fileno(), 4096):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                loop.call_soon_threadsafe(lines.put_nowait, line.decode(errors="replace").rstrip("\r"))
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=reader, daemon=True).start()
    return lines


async def interactive(sim: Simulator) -> bool:
    names = " ".join(p.name for p in user_parameters(sim.operation))
    print(f"Type the parameters ({names}) like on the command line, or key=value / JSON.")
    print("An empty line, Ctrl+D or Ctrl+C quits.")
    lines, all_ok = read_lines(), True
    while True:
        print("\n你 / you> ", end="", flush=True)
        line = await lines.get()
        if line is None or not line.strip():
            break
        try:
            params = parse_args(sim.operation, line.split() if not line.lstrip().startswith("{") else [line])
        except UsageError as exc:
            print(f"✗ {exc}")
            continue
        all_ok = await sim.call(params, line) and all_ok
    return all_ok


async def main_async(
    args: argparse.Namespace, operation: bot.Operation, forward_url: str | None = None, time_limit: float = 10.0
) -> int:
    try:
        params = parse_args(operation, args.params)
        context = context_values(operation, args.context)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve = [args.actions or "bot:ACTIONS", str(args.tools)] if args.actions or args.tools != bot.TOOLS_FILE else None
    timeout = args.timeout or max(15.0, (operation.time_limit or time_limit) + 5)  # the bot answers first
    sim = Simulator(operation, args.verbose, timeout, context, args.fake, serve, forward_url)
    raw_input = " ".join(args.params)
    try:
        await sim.start()
        if args.interactive:
            ok = await interactive(sim)
        elif args.repeat > 1:
            ok = await sim.repeat(params, raw_input, args.repeat, args.concurrency)
        else:
            ok = await sim.call(params, raw_input)
    except RuntimeError as exc:
        print(f"✗ {exc}")
        ok = False
    finally:
        await sim.stop()
    return 0 if ok else 1


def main() -> int:
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="replace")  # type: ignore[union-attr]  # consoles that cannot show 中文
    parser = argparse.ArgumentParser(
        prog="python -m tests.simulate",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("params", nargs="*", help="parameter values in tools.yaml order, key=value pairs, or JSON")
    parser.add_argument("--list", action="store_true", help="list the operations of tools.yaml and exit")
    parser.add_argument("-i", "--interactive", action="store_true", help="keep the bot running; one call per line")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the frames on the wire and bot logs")
    parser.add_argument("--path", help="the tools.yaml path to call (default: the first one)")
    parser.add_argument(
        "--timeout", type=float, help="seconds to wait for the ack (default: 15, or the time limit + 5 if longer)"
    )
    parser.add_argument(
        "--context", action="append", default=[], metavar="NAME=VALUE", help="set an x-dingtalk-context value"
    )
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="send N calls, print statuses and latencies")
    parser.add_argument("--concurrency", type=int, default=1, metavar="C", help="with --repeat: C calls at a time")
    parser.add_argument("--tools", type=Path, default=bot.TOOLS_FILE, help="the tools file (default: tools.yaml)")
    parser.add_argument("--actions", metavar="MODULE[:NAME]", help="the actions (default: ACTIONS in bot.py)")
    parser.add_argument("--fake", metavar="URL", help="send to what is connected to python -m tests.fake_dingtalk")
    args = parser.parse_args()
    if args.repeat < 1 or args.concurrency < 1:
        parser.error("--repeat and --concurrency take a number of 1 or more")
    if args.concurrency > 1 and args.repeat == 1:
        parser.error("--concurrency goes with --repeat N: it says how many of the N calls go at a time")
    try:
        forward_url, time_limit = authoring.setting("forward_url"), authoring.setting("action_timeout_seconds")
        actions = actions_of(args.actions) if args.actions else None
        operations = load_operations(args.tools, actions, forwarding=forward_url is not None)
    except bot.ConfigError as exc:  # bot.py would refuse to start the same way, or the authoring check failed
        print(f"✗ {exc}", file=sys.stderr)
        return 2
    except (ImportError, AttributeError) as exc:
        print(f"error: --actions {args.actions}: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print(describe(operations, args.tools.name, forward_url, time_limit))
        return 0
    try:
        operation = pick_operation(operations, args.path)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(main_async(args, operation, forward_url, time_limit))
    except KeyboardInterrupt:  # the bot was already stopped by main_async's cleanup
        return 130


if __name__ == "__main__":
    sys.exit(main())
