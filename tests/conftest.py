"""Shared fixtures: a fake DingTalk on its own thread and loop, and the bot served in-process against it.

The fake gets its own thread because dingtalk-stream 0.24.3 opens connections with a blocking
`requests.post` on the bot's event loop: a fake on that same loop could never answer it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

import bot
from tests.fake_dingtalk import FakeDingTalk

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class FakeThread:
    """Runs a FakeDingTalk on a private loop; `await remote(coro)` runs a fake coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.fake = FakeDingTalk()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-dingtalk", daemon=True)

    def __enter__(self) -> FakeThread:
        self.thread.start()
        self.sync(self.fake.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.sync(self.fake.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def sync(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
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


def settings_for(fake: FakeDingTalk, **overrides: Any) -> bot.Settings:
    settings = bot.Settings(
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        webhook_allowed_hosts=frozenset({f"{fake.host}:{fake.port}"}),
        openapi_endpoint=fake.base_url,
        webhook_timeout_seconds=2.0,
        shutdown_grace_seconds=5.0,
    )
    return replace(settings, **overrides)


@pytest.fixture
def start_bot(remote: FakeThread) -> Callable[..., contextlib.AbstractAsyncContextManager[asyncio.Task]]:
    """`async with start_bot(**settings) as task:` serves the bot in this loop until the block ends."""

    @contextlib.asynccontextmanager
    async def run(connected: int | None = None, **overrides: Any) -> AsyncIterator[asyncio.Task]:
        settings = settings_for(remote.fake, **overrides)
        stop = asyncio.Event()
        task = asyncio.create_task(bot.serve(settings, stop))
        try:
            await remote(remote.fake.wait_connected(settings.instances if connected is None else connected))
            yield task
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    return run


# ----- subprocess helpers -----


def bot_env(fake: FakeDingTalk | None = None, **extra: str) -> dict[str, str]:
    """Environment for `python bot.py`: no inherited DingTalk settings, no .env surprises."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIENT_", "DINGTALK_", "WEBHOOK_", "HEALTH_"))}
    env["PYTHONUNBUFFERED"] = "1"
    if fake is not None:
        env.update(
            CLIENT_ID=fake.client_id,
            CLIENT_SECRET=fake.client_secret,
            DINGTALK_OPENAPI_ENDPOINT=fake.base_url,
            WEBHOOK_ALLOWED_HOSTS=f"{fake.host}:{fake.port}",
        )
    env.update(extra)
    return env


def start_bot_process(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """`python bot.py` from a directory without a .env; output (stdout+stderr) is read by the test."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "bot.py")],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
