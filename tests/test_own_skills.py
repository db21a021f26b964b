"""Replace the demo skills with your own and the suite stays green: the engine's tests never read your skills.

On a copy of the project, bot.py's demo actions, tools.yaml and tests/test_actions.py are replaced with one skill of
one's own; then every test file that reads the project's own skills runs there and passes. The other files get their
skills from tests/samples.py (the `start_bot` and `bot_process` fixtures, the simulator's --tools/--actions), never
from bot.py's ACTIONS or tools.yaml; a check below keeps them so.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.fake_dingtalk import bot_env

OWN_ACTIONS = '''
async def get_leave(userId: str, year: int = 2026) -> dict[str, Any]:
    """auto: the days of leave left (a lookup of your own would go here)."""
    return {"user": userId, "year": year, "days": 5}


ACTIONS: dict[str, Callable[..., Any]] = {"/v1/actions/leave": get_leave}


'''

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
'''

# What a copy with skills of one's own runs: every test file that reads bot.py's skills or tools.yaml.
READS_THE_PROJECTS_SKILLS = [
    "tests/test_actions.py",
    "tests/test_tools_yaml.py",
    "tests/test_authoring.py",
    "tests/test_readme_recipe.py",
]


def test_with_the_demo_skills_replaced_by_ones_own_the_suite_passes(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".env"))
    source = (project / "bot.py").read_text(encoding="utf-8")
    # whatever skills are there now (the demos, or yours): after the actions part's comment, up to Card
    part = r"# ----- Your actions [^\n]*\n(?:#[^\n]*\n)*\n(.*?)\n(?=@dataclass\(frozen=True\)\nclass Card)"
    actions = re.search(part, source, re.DOTALL)
    assert actions, "bot.py's actions part ends where Card begins"
    (project / "bot.py").write_text(source.replace(actions.group(1), OWN_ACTIONS), encoding="utf-8")
    (project / "tools.yaml").write_text(OWN_TOOLS, encoding="utf-8")
    (project / "tests" / "test_actions.py").write_text(OWN_TESTS, encoding="utf-8")
    run = [sys.executable, "-m", "pytest", "-q", "-n", "4", "-p", "no:cacheprovider", *READS_THE_PROJECTS_SKILLS]
    result = subprocess.run(run, cwd=project, env=bot_env(), capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


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
