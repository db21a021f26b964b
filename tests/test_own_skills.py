"""Replace the demo skills with your own and the suite stays green: the engine's tests never read your skills.

On a copy of the project, bot.py's demo actions, tools.yaml and tests/test_actions.py are replaced with one skill of
one's own; then every test file that reads the project's own skills runs there and passes. The other files get their
skills from tests/samples.py (the `start_bot` and `bot_process` fixtures, the simulator's --tools/--actions), never
from bot.py's ACTIONS or tools.yaml (what the `skill` fixture calls, for the files listed below); a check below keeps
them so.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bot
from tests.conftest import ROOT
from tests.fake_dingtalk import bot_env

OWN_PART = '''"""My leave skill: the part above the fence, with only its own imports."""

from __future__ import annotations

from typing import Any


async def get_leave(userId: str, year: int = 2026) -> dict[str, Any]:
    """auto: the days of leave left (a lookup of your own would go here)."""
    return {"user": userId, "year": year, "days": 5}


ACTIONS = {"/v1/actions/leave": get_leave}


'''
FENCE = re.compile(r"^# ===== The engine.*$", re.MULTILINE)
ENGINE_1_0_0_PART = Path(__file__).with_name("fixtures") / "bot_1.0.0_above_the_fence.txt"  # from this repo's history
TOOLS_1_0_0 = Path(__file__).with_name("fixtures") / "tools_1.0.0.yaml"  # the tools.yaml it shipped with


def project_with(tmp_path: Path, above_the_fence: str) -> Path:
    """A copy of the project whose bot.py is `above_the_fence`, then this engine: the fence line and all below it."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".env"))
    source = (project / "bot.py").read_text(encoding="utf-8")
    [fence] = FENCE.finditer(source)
    (project / "bot.py").write_text(above_the_fence + source[fence.start() :], encoding="utf-8")
    return project


def run(project: Path, *args: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=project, env=bot_env(), capture_output=True, text=True, timeout=timeout
    )


OWN_TOOLS = """openapi: 3.0.1
info: {title: Leave, version: 1.0.0}
x-dingtalk-protocol: stream
paths:
  /v1/actions/leave:
    get:
      operationId: GetLeave
      summary: 查假期余额 / Leave balance
      x-dingtalk-display-result: auto
      parameters:
        - name: userId
          in: query
          schema: {type: string}
          x-dingtalk-context: {property: currentUser, format: userId}
        - name: year
          in: query
          schema: {type: integer, minimum: 2000, maximum: 2100, example: 2026}
      responses:
        '200': {description: OK}
"""

OWN_TESTS = '''"""Tests of my own skill."""

import pytest

import bot


async def test_get_leave_says_how_many_days_are_left():
    assert await bot.get_leave(userId="u1", year=2026) == {"user": "u1", "year": 2026, "days": 5}


async def test_get_leave_through_the_bot_types_the_year_and_keeps_to_its_range(skill):
    answer = await skill("/v1/actions/leave", userId="u1", year=2027)
    assert (answer.status, answer.body) == (200, {"user": "u1", "year": 2027, "days": 5})
    assert (await skill("/v1/actions/leave", userId="u1", year=1999)).status == 400
'''

# What a copy with skills of one's own runs: every test file that reads bot.py's skills or tools.yaml.
READS_THE_PROJECTS_SKILLS = [
    "tests/test_actions.py",
    "tests/test_tools_yaml.py",
    "tests/test_authoring.py",
    "tests/test_readme_recipe.py",
]


def test_with_the_demo_skills_replaced_by_ones_own_the_suite_passes(tmp_path: Path) -> None:
    project = project_with(tmp_path, OWN_PART)
    (project / "tools.yaml").write_text(OWN_TOOLS, encoding="utf-8")
    (project / "tests" / "test_actions.py").write_text(OWN_TESTS, encoding="utf-8")
    result = run(project, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", *READS_THE_PROJECTS_SKILLS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
    answered = run(project, "-m", "tests.simulate", "year=2027", "--context", "userId=u1", timeout=60)
    assert answered.returncode == 0 and '"days": 5' in answered.stdout, answered.stdout + answered.stderr


SHARED_CLIENT_PART = '''"""My leave skill, its client made once by lifespan (docs/skills.md#shared-clients)."""

from __future__ import annotations

import contextlib
from typing import Any

SHARED: dict[str, Any] = {}


@contextlib.asynccontextmanager
async def lifespan():
    SHARED["balances"] = {"u1": 5}  # stands for a client made once: an HTTP session, a database pool
    yield
    SHARED.clear()


async def get_leave(userId: str, year: int = 2026) -> dict[str, Any]:
    """auto: the days of leave left, looked up with the shared client."""
    return {"user": userId, "year": year, "days": SHARED["balances"][userId]}


ACTIONS = {"/v1/actions/leave": get_leave}


'''
SHARED_CLIENT_TESTS = '''"""Tests of my own skill, whose client lifespan makes."""


async def test_get_leave_through_the_bot_uses_the_client_lifespan_made(skill):
    answer = await skill("/v1/actions/leave", userId="u1", year=2027)
    assert (answer.status, answer.body) == (200, {"user": "u1", "year": 2027, "days": 5})
'''


def test_the_skill_fixture_enters_the_lifespan_of_bot_py_as_python_bot_py_does(tmp_path: Path) -> None:
    project = project_with(tmp_path, SHARED_CLIENT_PART)
    (project / "tools.yaml").write_text(OWN_TOOLS, encoding="utf-8")
    (project / "tests" / "test_actions.py").write_text(SHARED_CLIENT_TESTS, encoding="utf-8")
    result = run(project, "-m", "pytest", "-rA", "-n0", "-p", "no:cacheprovider", "tests/test_actions.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "PASSED tests/test_actions.py::test_get_leave_through_the_bot_uses_the_client_lifespan_made" in result.stdout


def test_the_part_above_the_fence_of_engine_1_0_0_runs_on_this_engine(tmp_path: Path) -> None:
    project = project_with(tmp_path, ENGINE_1_0_0_PART.read_text(encoding="utf-8"))  # its imports, Card, ActionError
    shutil.copy(TOOLS_1_0_0, project / "tools.yaml")  # its skills, whatever this project's are now
    version = run(project, "bot.py", "--version", timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(f"dingtalk-skill-bot {bot.VERSION} "), version
    answered = run(project, "-m", "tests.simulate", "杭州", "明天", timeout=60)
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert "杭州 · 明天" in answered.stdout and 'status 200  body {"success": true}' in answered.stdout


def test_the_other_test_files_get_their_skills_from_the_fixtures() -> None:
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if f"tests/{path.name}" in READS_THE_PROJECTS_SKILLS or path.name == "test_own_skills.py":
            continue
        source = path.read_text(encoding="utf-8")
        for banned in ("TOOLS_FILE", "DEMO_", "bot.get_", "load_operations()", 'ROOT / "tools.yaml"'):
            assert banned not in source, f"{path.name} reads the project's own skills ({banned})"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                uses_actions = "bot.ACTIONS" in (ast.get_source_segment(source, node) or "")
                fixtures = {arg.arg for arg in node.args.args}
                assert not uses_actions or fixtures & {"start_bot", "bot_process"}, f"{path.name}: {node.name}"
                assert "skill" not in fixtures, f"{path.name}: {node.name} calls the project's own skills"
