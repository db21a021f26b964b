"""The authoring check (tests/authoring.py) on this project's own skills, and where else it runs.

It fails with the check's one-line message when tools.yaml or ACTIONS break a rule that bot.py does not check at
start: fix what it names, as you would a linter's complaint.
"""

from __future__ import annotations

import json
import re
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
        authoring.check_file(bot.TOOLS_FILE, bot.ACTIONS, authoring.forwarding())  # FORWARD_URL: as bot.py reads it
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


# ----- FORWARD_URL: a path without an action is forwarded, and the rest is checked all the same -----

FORWARDED = {
    "openapi": "3.0.1",
    "info": {"title": "t", "version": "1"},
    "paths": {
        "/v1/leave": {
            "get": {
                "x-dingtalk-display-result": "auto",
                "parameters": [{"name": "year", "in": "query", "schema": {"type": "integer"}}],
                "responses": {"200": {"description": "OK"}},
            }
        },
        "/v1/tickets/{ticket}": {
            "get": {
                "x-dingtalk-display-result": "auto",
                "x-action-timeout-seconds": 12,
                "parameters": [{"name": "ticket", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }
        },
    },
}


async def get_leave(year: int = 2026) -> dict:
    return {"year": year}


def forwarded(change=lambda spec: None) -> dict:
    spec = json.loads(json.dumps(FORWARDED))
    change(spec)
    return spec


def test_a_forwarded_operation_has_no_function_to_check_and_the_rest_is_checked_all_the_same():
    operations = authoring.check_spec(forwarded(), {"/v1/leave": get_leave}, forwarding=True)
    assert operations["GET /v1/tickets/{ticket}"].action is None
    with pytest.raises(bot.ConfigError, match=r"declares /v1/tickets/\{ticket\}, but ACTIONS in bot.py has no action"):
        authoring.check_spec(forwarded(), {"/v1/leave": get_leave})  # without FORWARD_URL, as bot.py says

    async def get_leave_as_text(year: str = "2026") -> dict:
        return {"year": year}

    with pytest.raises(
        bot.ConfigError, match=re.escape("takes 'year' as string, but tools.yaml: GET /v1/leave declares integer")
    ):
        authoring.check_spec(forwarded(), {"/v1/leave": get_leave_as_text}, forwarding=True)
    unknown_format = forwarded(
        lambda spec: spec["paths"]["/v1/tickets/{ticket}"]["get"]["parameters"][0]["schema"].update(format="ticket")
    )
    with pytest.raises(bot.ConfigError, match="parameter ticket: format 'ticket' is not one the bot can check"):
        authoring.check_spec(unknown_format, {"/v1/leave": get_leave}, forwarding=True)


def test_a_time_limit_where_bot_py_never_reads_it_is_named():
    misplaced = forwarded(lambda spec: spec["paths"]["/v1/leave"].update({"x-action-timeout-seconds": 12}))
    with pytest.raises(bot.ConfigError, match="/v1/leave: x-action-timeout-seconds goes under get: or post:"):
        authoring.check_spec(misplaced, {"/v1/leave": get_leave}, forwarding=True)
    out_of_range = forwarded(lambda spec: spec["paths"]["/v1/leave"]["get"].update({"x-action-timeout-seconds": 0}))
    with pytest.raises(bot.ConfigError, match="GET /v1/leave") as err:  # bot.py's own check, said here first
        authoring.check_spec(out_of_range, {"/v1/leave": get_leave}, forwarding=True)
    assert "x-action-timeout-seconds" in str(err.value)


def test_a_setting_is_read_as_bot_py_reads_it_from_the_environment_or_the_dotenv_beside_it_or_above(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / ".env").write_text("FORWARD_URL=http://127.0.0.1:8000/api/\n", encoding="utf-8")  # above bot.py
    assert authoring.setting("forward_url", {}, project) == "http://127.0.0.1:8000/api"
    (project / ".env").write_text("FORWARD_URL=http://127.0.0.1:9000\nACTION_TIMEOUT_SECONDS=12\n", encoding="utf-8")
    assert authoring.setting("forward_url", {}, project) == "http://127.0.0.1:9000"  # beside it: the nearer one
    assert authoring.setting("action_timeout_seconds", {}, project) == 12
    assert authoring.setting("forward_url", {"FORWARD_URL": "https://a.example"}, project) == "https://a.example"
    assert authoring.setting("forward_url", {"FORWARD_URL": ""}, project) is None  # set, even empty: .env is not read
    with pytest.raises(bot.ConfigError, match="FORWARD_URL"):
        authoring.setting("forward_url", {"FORWARD_URL": "ftp://a.example"}, project)
