"""Try the bot offline: a local DingTalk simulator, no credentials needed.

    python -m tests.simulate 杭州 明天                 # parameters in the order tools.yaml declares them
    python -m tests.simulate location=杭州 date=明天   # or by name
    python -m tests.simulate '{"location": "杭州"}'    # or as a JSON object
    python -m tests.simulate -i                        # interactive: each line you type is one call
    python -m tests.simulate --verbose 杭州            # also show the frames on the wire

It starts the fake DingTalk from tests/fake_dingtalk.py on 127.0.0.1, runs the unmodified bot.py
against it (as `python bot.py`, with dummy credentials), builds the Graph callback from tools.yaml,
and prints the markdown the bot posted to the sessionWebhook and the Graph response from its ack.
Exit code: 0 when every call was answered 200, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
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

import yaml

from tests.fake_dingtalk import GRAPH_TOPIC, FakeDingTalk, GraphResult, bot_env, graph_request

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


class UsageError(Exception):
    pass


@dataclass
class Operation:
    """The one operation of tools.yaml the simulator calls."""

    path: str
    method: str
    user_params: list[tuple[str, str]]  # (name, type), filled from the command line
    context_params: dict[str, tuple[str, str]]  # name -> (property, format), filled by "DingTalk"

    @classmethod
    def from_tools_yaml(cls, spec: dict[str, Any], path: str | None = None) -> Operation:
        paths = spec.get("paths") or {}
        if not paths:
            raise UsageError("tools.yaml declares no paths")
        path = path or next(iter(paths))  # the first one unless --path says otherwise
        if path not in paths:
            raise UsageError(f"{path} is not in tools.yaml (paths: {', '.join(paths)})")
        method, operation = next((m, op) for m, op in paths[path].items() if m in ("get", "post"))
        if method == "post":
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            while "$ref" in schema:
                schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
            props = schema.get("properties", {})
        else:
            props = {p["name"]: {**p.get("schema", {}), **p} for p in operation.get("parameters", [])}
        user, context = [], {}
        for name, prop in props.items():
            if "x-dingtalk-context" in prop:
                context[name] = (prop["x-dingtalk-context"]["property"], prop["x-dingtalk-context"]["format"])
            else:
                user.append((name, prop.get("type", "string")))
        return cls(path, method.upper(), user, context)

    def parse_args(self, words: list[str]) -> dict[str, Any]:
        """Positional words, key=value pairs or one JSON object -> the user's parameters."""
        if len(words) == 1 and words[0].lstrip().startswith("{"):
            try:
                value = json.loads(words[0])
            except ValueError as exc:
                raise UsageError(f"not a JSON object: {exc}") from None
            if not isinstance(value, dict):
                raise UsageError("the JSON argument must be an object")
            return value
        types = dict(self.user_params)
        params: dict[str, Any] = {}
        positional = iter(name for name, _ in self.user_params)
        for word in words:
            key, sep, value = word.partition("=")
            if not (sep and key in types):
                key, value = next(positional, None), word
                if key is None:
                    raise UsageError(f"too many values: {self.path} takes {', '.join(types) or 'no parameters'}")
            params[key] = coerce(value, types[key])
        return params

    def callback(self, params: dict[str, Any], raw_input: str, webhook: str) -> dict[str, Any]:
        """The Graph callback DingTalk would push for this call."""
        values = dict(params)
        for name, (prop, fmt) in self.context_params.items():
            if (prop, fmt) == ("currentConversation", "sessionWebhook"):
                values[name] = webhook
            elif (prop, fmt) == ("currentInput", "raw"):
                values[name] = raw_input
            else:
                values[name] = DEMO_CONTEXT.get((prop, fmt), f"demo-{fmt}")
        return graph_request(self.path, values, method=self.method)


def coerce(value: str, type_: str) -> Any:
    try:
        if type_ == "integer":
            return int(value)
        if type_ == "number":
            return float(value)
    except ValueError:
        raise UsageError(f"{value!r} is not a valid {type_}") from None
    if type_ == "boolean":
        return value.lower() in ("1", "true", "yes", "y")
    return value


def render_markdown(text: str) -> str:
    """Markdown as a terminal shows it readably: headings underlined, bullets, quotes, no ** markers."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
        if heading := re.match(r"#{1,6}\s+(.*)", line):
            lines += [heading.group(1), "‾" * display_width(heading.group(1))]
        elif bullet := re.match(r"\s*[-*+]\s+(.*)", line):
            lines.append(f"  • {bullet.group(1)}")
        elif quote := re.match(r">\s?(.*)", line):
            lines.append(f"  │ {quote.group(1)}")
        else:
            lines.append(line)
    return "\n".join("    " + line if line else "" for line in lines)


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


class Simulator:
    def __init__(self, operation: Operation, verbose: bool, timeout: float) -> None:
        self.operation, self.verbose, self.timeout = operation, verbose, timeout
        self.fake = FakeDingTalk(client_id="simulator-client-id", client_secret="simulator-client-secret")
        self.bot: asyncio.subprocess.Process | None = None
        self.bot_output: list[str] = []
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        await self.fake.start()
        if self.verbose:
            self.fake.trace = lambda direction, frame: print(
                f"  {'→ frame' if direction == '>' else '← ack'} {json.dumps(frame, ensure_ascii=False)}"
            )
        # set even where empty, so a .env beside bot.py cannot turn them back on
        env = bot_env(self.fake, INSTANCES="1", HEALTH_PORT="", LOG_LEVEL="INFO" if self.verbose else "WARNING")
        started = time.monotonic()
        self.bot = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bot.py"), cwd=ROOT, env=env,
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

    async def call(self, params: dict[str, Any], raw_input: str) -> bool:
        """One call as DingTalk makes it; print what the user would see. True when answered 200."""
        session = f"aswh_sim_{uuid.uuid4().hex[:16]}"
        request = self.operation.callback(params, raw_input, self.fake.webhook_url(session))
        print(f"\n▶ {self.operation.method} {self.operation.path} {json.dumps(params, ensure_ascii=False)}")
        posts_before = len(self.fake.webhook_posts)
        started = time.monotonic()
        try:
            message_id = await self.fake.send_frame("CALLBACK", GRAPH_TOPIC, request)
            ack = await self.fake.wait_ack(message_id, self.timeout)
        except TimeoutError:
            print(f"✗ no ack within {self.timeout:.0f} s: the bot did not answer")
            return False
        result = GraphResult.from_ack(ack, time.monotonic() - started)
        for post in self.fake.webhook_posts[posts_before:]:
            if post.session == session:
                print("\n── reply in the chat (markdown card via sessionWebhook) ──")
                print(render_markdown(post.markdown or json.dumps(post.payload, ensure_ascii=False)))
        body = result.body if isinstance(result.body, str) else json.dumps(result.body, ensure_ascii=False)
        print("\n── Graph response (in the ack) ──")
        print(f"    status {result.status}  body {body}")
        print(f"    round trip {result.elapsed * 1000:.0f} ms")
        if result.status != 200:
            print(f"✗ the bot answered Graph status {result.status}")
        return result.status == 200

    async def stop(self) -> None:
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
    names = " ".join(name for name, _ in sim.operation.user_params)
    print(f"Type the parameters ({names}) like on the command line, or key=value / JSON.")
    print("An empty line, Ctrl+D or Ctrl+C quits.")
    lines, all_ok = read_lines(), True
    while True:
        print("\n你 / you> ", end="", flush=True)
        line = await lines.get()
        if line is None or not line.strip():
            break
        try:
            params = sim.operation.parse_args(line.split() if not line.lstrip().startswith("{") else [line])
        except UsageError as exc:
            print(f"✗ {exc}")
            continue
        all_ok = await sim.call(params, line) and all_ok
    return all_ok


async def main_async(args: argparse.Namespace) -> int:
    spec = yaml.safe_load((ROOT / "tools.yaml").read_text(encoding="utf-8"))
    try:
        operation = Operation.from_tools_yaml(spec, args.path)
        params = operation.parse_args(args.params)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sim = Simulator(operation, args.verbose, args.timeout)
    try:
        await sim.start()
        ok = await interactive(sim) if args.interactive else await sim.call(params, " ".join(args.params))
    except RuntimeError as exc:
        print(f"✗ {exc}")
        ok = False
    finally:
        await sim.stop()
    return 0 if ok else 1


def main() -> int:
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="replace")  # type: ignore[union-attr]  # consoles that cannot show 中文
    parser = argparse.ArgumentParser(prog="python -m tests.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("params", nargs="*", help="parameter values in tools.yaml order, key=value pairs, or JSON")
    parser.add_argument("-i", "--interactive", action="store_true", help="keep the bot running; one call per line")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the frames on the wire and bot logs")
    parser.add_argument("--path", help="the tools.yaml path to call (when it declares several)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the ack (default 15)")
    try:
        return asyncio.run(main_async(parser.parse_args()))
    except KeyboardInterrupt:  # the bot was already stopped by main_async's cleanup
        return 130


if __name__ == "__main__":
    sys.exit(main())
