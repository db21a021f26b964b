"""python -m tests.serve_skills MODULE[:NAME] TOOLS: serve those actions and that tools file with bot.py's engine.

What `python bot.py` does for the skills in bot.py, done for skills of your own module (bot.running(), settings
from the environment and .env, the same log lines, the module's `lifespan` if it defines one); Ctrl+C or SIGTERM
stops it. The simulator runs it for `--actions` / `--tools`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import bot


def module_of(spec: str) -> ModuleType:
    """ "my_skills" or "my_skills:ACTIONS" -> the module my_skills."""
    if sys.path[0] != (here := str(Path.cwd())):  # a module beside where you run it, as `python app.py` finds it
        sys.path.insert(0, here)
    return importlib.import_module(spec.partition(":")[0])


def actions_of(spec: str) -> dict[str, Any]:
    """ "my_skills" or "my_skills:ACTIONS" -> that module's mapping of paths to actions."""
    return getattr(module_of(spec), spec.partition(":")[2] or "ACTIONS")


def lifespan_of(spec: str) -> Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None:
    """ "my_skills" or "my_skills:ACTIONS" -> that module's `lifespan`, if it defines one (as bot.py's own)."""
    return getattr(module_of(spec), "lifespan", None)


async def serve(actions: dict[str, Any], tools: str, lifespan: Any = None) -> None:
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with bot.running(actions, tools, lifespan=lifespan):
        await stop.wait()


def main() -> int:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        asyncio.run(serve(actions_of(sys.argv[1]), sys.argv[2], lifespan_of(sys.argv[1])))
    except bot.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
