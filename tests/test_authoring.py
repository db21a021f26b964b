"""The authoring check (tests/authoring.py) on this project's own skills, and where else it runs.

It fails with the check's one-line message when tools.yaml or ACTIONS break a rule that bot.py does not check at
start: fix what it names, as you would a linter's complaint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import bot
from tests import authoring
from tests.fake_dingtalk import bot_env
from tests.samples import ON_CALL, SAMPLE_ACTIONS, SAMPLE_TOOLS

ROOT = Path(__file__).resolve().parent.parent


def test_this_projects_tools_yaml_and_actions_pass_the_authoring_check():
    problem = None
    try:
        authoring.check_file(bot.TOOLS_FILE, bot.ACTIONS)
    except bot.ConfigError as exc:
        problem = str(exc)
    if problem:  # failed outside the except: the one line, without "During handling of the above exception"
        pytest.fail(problem, pytrace=False)


def test_a_rule_bot_py_leaves_to_the_check_starts_the_bot_but_stops_the_simulator(tmp_path):
    spec = yaml.safe_load(SAMPLE_TOOLS.read_text(encoding="utf-8"))
    on_call = spec["paths"][ON_CALL]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    on_call["weeks"]["format"] = "week-number"  # no format fastjsonschema knows: it would go unchecked
    broken = tmp_path / "tools.yaml"
    broken.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    assert bot.load_operations(broken, SAMPLE_ACTIONS)  # bot.py would start: it checks what a running bot needs
    run = [sys.executable, "-m", "tests.simulate", "--tools", str(broken), "--actions", "tests.samples", "--list"]
    result = subprocess.run(run, cwd=ROOT, env=bot_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("✗ tools.yaml: ") and "format 'week-number' is not one the bot can check" in line
