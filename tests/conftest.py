"""Shared fixtures: a fake DingTalk on its own thread and loop, and the bot served in-process against it.

The fake gets its own thread because dingtalk-stream 0.24.3 opens connections with a blocking
`requests.post` on the bot's event loop: a fake on that same loop could never answer it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import os
import re
import shutil
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

import bot
from tests.fake_dingtalk import FakeDingTalk, GraphResult, graph_request, unproxied_loopback
from tests.samples import PRELUDE, SAMPLE_ACTIONS, SAMPLE_TOOLS

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# The in-process bot honours HTTP(S)_PROXY too; keep the fake DingTalk on loopback out of any proxy.
os.environ.update(unproxied_loopback(dict(os.environ)))


@pytest.fixture(autouse=True)
def lenient_log_formatting(monkeypatch: pytest.MonkeyPatch) -> None:
    """dingtalk-stream 0.24.3 logs `logger.exception("unknown exception", e)`. The logging module reports
    such a malformed call and goes on; pytest's log capture raises instead, inside the SDK's reconnect
    loop. Behave like production."""
    monkeypatch.setattr(logging, "raiseExceptions", False)


@pytest.fixture(autouse=True)
def fresh_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger is one per process: each test starts with an empty one, as each `python bot.py` does."""
    monkeypatch.setattr(bot, "_LEDGER", bot._CallbackLedger())


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class FakeThread:
    """Runs a FakeDingTalk on a private loop; `await remote(coro)` runs a fake coroutine there."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.loop, self.tls = asyncio.new_event_loop(), tls
        self.fake = FakeDingTalk()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-dingtalk", daemon=True)

    def __enter__(self) -> FakeThread:
        self.thread.start()
        self.sync(self.fake.start(tls=self.tls))
        return self

    def __exit__(self, *exc: object) -> None:
        self.sync(self.fake.close())
        self.sync(_cancel_other_tasks())  # e.g. a webhook a test left hanging
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    def sync(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))


@pytest.fixture
def remote() -> Iterator[FakeThread]:
    with FakeThread() as thread:
        yield thread


@pytest.fixture
def fake(remote: FakeThread) -> FakeDingTalk:
    return remote.fake


def operations() -> dict[str, bot.Operation]:
    """The sample skills' operations, plus a `disabled` POST one for each action a test registered beside them."""
    spec = yaml.safe_load(SAMPLE_TOOLS.read_text(encoding="utf-8"))
    for path, action in bot.ACTIONS.items():
        if path not in SAMPLE_ACTIONS:
            params = inspect.signature(action).parameters.values()
            required = [
                p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            properties = {name: {"type": "string"} for name in required}
            context = {"property": "currentConversation", "format": "sessionWebhook"}
            properties["sessionWebhook"] = {"type": "string", "x-dingtalk-context": context}
            schema = {"type": "object", "required": required, "properties": properties}
            body = {"content": {"application/json": {"schema": schema}}}
            spec["paths"][path] = {"post": {"x-dingtalk-display-result": "disabled", "requestBody": body}}
    return bot.load_operations(spec, bot.ACTIONS)


def settings_for(fake: FakeDingTalk, **overrides: Any) -> bot.Settings:
    settings = bot.Settings(
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        webhook_allowed_hosts=frozenset({f"{fake.host}:{fake.port}"}),
        dingtalk_openapi_endpoint=fake.base_url,
        webhook_timeout_seconds=10.0,  # generous, for a busy machine: tests of the time limit set their own
        shutdown_grace_seconds=5.0,
    )
    return replace(settings, **overrides)


@dataclass
class InProcessBot:
    task: asyncio.Task  # what python bot.py serves; its result is the exit code
    stop: asyncio.Event  # what SIGTERM sets in `python bot.py`


@pytest.fixture
def start_bot(
    remote: FakeThread, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., contextlib.AbstractAsyncContextManager[InProcessBot]]:
    """`async with start_bot(**settings) as running:` serves the bot, with the sample skills, in this loop until
    the block ends. (A test may add actions to bot.ACTIONS before starting it.)"""
    monkeypatch.setattr(bot, "ACTIONS", dict(SAMPLE_ACTIONS))

    @contextlib.asynccontextmanager
    async def run(connected: int | None = None, **overrides: Any) -> AsyncIterator[InProcessBot]:
        settings = settings_for(remote.fake, **overrides)
        stop = asyncio.Event()
        task = asyncio.create_task(bot._serve_until_stopped(settings, stop, operations()))
        try:
            await remote(remote.fake.wait_connected(settings.instances if connected is None else connected))
            yield InProcessBot(task, stop)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    return run


@pytest.fixture
def serve_actions(
    remote: FakeThread, tmp_path: Path
) -> Callable[..., contextlib.AbstractAsyncContextManager[Callable[..., Coroutine[Any, Any, GraphResult]]]]:
    """`async with serve_actions({"/a": action}, **settings) as call:` serves each action as a POST operation (display
    markdown; its keyword parameters, and any `declared` beside them, in the body, of any JSON type; or GET ones,
    in the query) through
    bot.running() and the fake; `await call("/a", location="杭州")` answers as DingTalk gets it (a GraphResult).
    `lifespan=` is handed to bot.running(); a setting such as `forward_url=` goes to Settings."""
    served = itertools.count(1)

    @contextlib.asynccontextmanager
    async def serve(
        actions: dict[str, Callable[..., Any]],
        declared: tuple[str, ...] = (),
        method: str = "post",
        lifespan: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None,
        **overrides: Any,
    ) -> AsyncIterator[Callable[..., Coroutine[Any, Any, GraphResult]]]:
        paths = {}
        for path, action in actions.items():
            params = inspect.signature(action).parameters.values()
            named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            names, required = [*(p.name for p in named), *declared], [p.name for p in named if p.default is p.empty]
            operation: dict[str, Any] = {"x-dingtalk-display-result": "markdown"}
            if method == "get":  # each a query parameter
                operation["parameters"] = [
                    {"name": name, "in": "query", "required": name in required, "schema": {}} for name in names
                ]
            else:  # each a property of the JSON body
                schema = {"type": "object", "properties": {name: {} for name in names}}
                schema |= {"required": required} if required else {}
                operation["requestBody"] = {"content": {"application/json": {"schema": schema}}}
            paths[path] = {method: operation}
        tools = tmp_path / f"tools-{next(served)}.yaml"
        tools.write_text(json.dumps({"openapi": "3.0.1", "info": {"title": "t", "version": "1"}, "paths": paths}))

        async def call(path: str, **params: Any) -> GraphResult:
            return await remote(remote.fake.invoke(graph_request(path, params, method=method), timeout=60))

        given = {"lifespan": lifespan} if lifespan is not None else {}
        async with bot.running(actions, tools, settings=settings_for(remote.fake, **overrides), **given):
            yield call

    return serve


# ----- subprocess helpers -----


ENGINE_FENCE = re.compile(r"^# ===== The engine.*$", re.MULTILINE)


class BotProcess:
    """`python bot.py` as a user runs it, from a copy in a directory of its own (so no developer's .env next to
    the real bot.py is read), serving the sample skills: run_bot.py runs PRELUDE (and a test's own `prelude`),
    then bot.main(bot.ACTIONS). Or, given `above_the_fence` (an author's part of bot.py: its ACTIONS, and its
    `lifespan` if it has one), that copy of bot.py is that part and this engine, run as `python bot.py` itself.
    Its output (stdout+stderr) is collected as it comes."""

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        prelude: str = "",
        tools: str | None = None,
        above_the_fence: str | None = None,
    ) -> None:
        self.env, self.workdir, self.prelude, self.tools = env, workdir, prelude, tools
        self.above_the_fence = above_the_fence
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> BotProcess:
        shutil.copy(ROOT / "bot.py", self.workdir / "bot.py")
        tools = SAMPLE_TOOLS.read_text(encoding="utf-8") if self.tools is None else self.tools
        if tools:  # "" for no tools.yaml at all
            (self.workdir / "tools.yaml").write_text(tools, encoding="utf-8")
        if self.above_the_fence is not None:
            source = (ROOT / "bot.py").read_text(encoding="utf-8")
            [fence] = ENGINE_FENCE.finditer(source)
            engine = self.above_the_fence + source[fence.start() :]
            (self.workdir / "bot.py").write_text(engine, encoding="utf-8")
            script = "bot.py"
        else:
            script = "run_bot.py"
            (self.workdir / script).write_text(f"{PRELUDE}\n{self.prelude}\nraise SystemExit(bot.main(bot.ACTIONS))\n")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            cwd=self.workdir,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        await wait_until(lambda: text in self.output, timeout)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None and self._reader is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def bot_process(tmp_path: Path) -> AsyncIterator[Callable[..., Coroutine[Any, Any, BotProcess]]]:
    started: list[BotProcess] = []

    async def launch(
        env: dict[str, str], prelude: str = "", tools: str | None = None, above_the_fence: str | None = None
    ) -> BotProcess:
        process = await BotProcess(env, tmp_path, prelude, tools, above_the_fence).start()
        started.append(process)
        return process

    yield launch
    for process in started:
        process.kill()
        with contextlib.suppress(Exception):
            await process.wait()


def hangs_until(release: threading.Event) -> Callable[[str], str]:
    """A plain-def action that hangs, like requests.get without a timeout, until `release` is set (120 s at most:
    far longer than any test waits for something else)."""

    def hangs(location: str) -> str:
        release.wait(120)
        return location

    return hangs


def echoes(location: str) -> str:
    """A plain-def action that answers at once."""
    return location


async def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until truthy or the deadline passes (then fail). The deadline is generous, for a busy
    machine: a wait is bounded, never a measure of speed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def healthz(port: int) -> tuple[int, dict]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
        return resp.status, await resp.json()


async def wait_health(port: int, status: int, timeout: float = 30.0) -> dict:
    async def probe() -> dict | None:
        code, body = await healthz(port)
        return body if code == status else None

    deadline = time.monotonic() + timeout
    while (body := await probe()) is None:
        assert time.monotonic() < deadline, f"/healthz never answered {status}"
        await asyncio.sleep(0.05)
    return body


# ----- your own skills through the bot: the `skill` fixture -----


@dataclass
class SkillAnswer:
    """What one call through the bot came to, as the assistant and the user would see it."""

    status: int  # the Graph status in the ack: 200, or 400 (a value breaking tools.yaml, an ActionError), 500...
    body: Any  # auto: your data; markdown: {"content": ...}; disabled: {"success": true}; else {"error": ...}
    card: Any  # disabled: the markdown posted through sessionWebhook, or a Card's {"templateId", "cardData"}


@pytest.fixture
async def skill(
    fake: FakeDingTalk, remote: FakeThread
) -> AsyncIterator[Callable[..., Coroutine[Any, Any, SkillAnswer]]]:
    """`answer = await skill("/v1/actions/stock", symbol="AAPL", days=5)` calls one of bot.py's own operations
    (ACTIONS and tools.yaml) through the real bot and the local fake DingTalk, as the assistant calls it: the values
    checked against the operation's schema and typed, the result answered in its display mode. Context values
    (userId...) are passed like the others; a path served by more than one method is written "GET /v1/...". With
    FORWARD_URL set (the environment or .env, as for python bot.py), an operation without an action is forwarded to
    it, as python bot.py would: your service has to be running for a call of one. bot.py's `lifespan`, if its part
    above the fence defines one, is entered first and left last, as python bot.py does."""
    import json

    from tests import authoring
    from tests.fake_dingtalk import graph_request

    forward_url = authoring.setting("forward_url")
    operations = bot.load_operations(bot.TOOLS_FILE, bot.ACTIONS, forwarding=forward_url is not None)

    async def call(route: str, /, **params: Any) -> SkillAnswer:
        method, _, path = route.rpartition(" ")
        [operation] = [
            op
            for op in operations.values()
            if method in ("", op.method) and (op.path == path or (op.template and op.template.fullmatch(path)))
        ]
        if operation.method == "GET":  # a query string carries text, as DingTalk sends it
            params = {name: v if isinstance(v, str) else json.dumps(v) for name, v in params.items()}
        webhook = fake.webhook_url() if operation.display == "disabled" else None
        request = graph_request(path, params, method=operation.method, session_webhook=webhook)
        result = await remote(fake.invoke(request))
        posts = [post for post in fake.webhook_posts if webhook and webhook.endswith(f"session={post.session}")]
        card = posts[-1].payload["content"] if posts else None  # your own Card's templateId and cardData ...
        if card and card["templateId"] == bot._MARKDOWN_CARD_TEMPLATE_ID:
            card = card["cardData"]["content"]  # ... or the markdown, in the built-in card
        return SkillAnswer(result.status, result.body, card)

    settings, lifespan = settings_for(fake, forward_url=forward_url), getattr(bot, "lifespan", None)
    async with bot.running(bot.ACTIONS, bot.TOOLS_FILE, settings=settings, lifespan=lifespan):
        yield call
