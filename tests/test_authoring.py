"""The authoring check (tests/authoring.py) on this project's own skills, and where else it runs.

It fails with the check's one-line message when tools.yaml or ACTIONS break a rule that bot.py does not check at
start: fix what it names, as you would a linter's complaint.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bot
from tests import authoring
from tests.fake_dingtalk import bot_env

ROOT = Path(__file__).resolve().parent.parent


def test_this_projects_tools_yaml_and_actions_pass_the_authoring_check():
    try:
        authoring.check_file(bot.TOOLS_FILE, bot.ACTIONS)
    except bot.ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


def copy_of_the_project(tmp_path: Path, tools: str) -> Path:
    for name in ("bot.py", "tests"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    (tmp_path / "tools.yaml").write_text(tools, encoding="utf-8")
    return tmp_path


def test_a_rule_bot_py_leaves_to_the_check_starts_the_bot_but_stops_the_simulator(tmp_path):
    tools = (ROOT / "tools.yaml").read_text(encoding="utf-8")
    broken = tools.replace("type: integer", "type: integer\n                  format: week-number", 1)
    assert broken != tools
    project = copy_of_the_project(tmp_path, broken)
    assert bot.load_operations(project / "tools.yaml")  # bot.py would start: it checks what a running bot needs
    run = [sys.executable, "-m", "tests.simulate", "--list"]
    result = subprocess.run(run, cwd=project, env=bot_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("✗ tools.yaml: ") and "format 'week-number' is not one the bot can check" in line
