"""Your tools.yaml is a valid OpenAPI 3.0.1 description for a Stream-mode skill, in step with ACTIONS in bot.py.

These read your own files (as tests/test_authoring.py does), so they hold for whatever skills you put there; with
FORWARD_URL set (the environment or .env), the paths without an action are those bot.py forwards to your service.
"""

from __future__ import annotations

import pytest
import yaml
from openapi_spec_validator import validate

import bot
from tests import authoring


def test_tools_yaml_is_valid_openapi_3_0_1_for_stream():
    problem = None
    try:
        spec = yaml.safe_load(bot.TOOLS_FILE.read_text(encoding="utf-8"))
    except yaml.YAMLError:  # said in one line by bot.py, as `python bot.py` would
        with pytest.raises(bot.ConfigError) as err:
            bot.load_operations(bot.TOOLS_FILE, bot.ACTIONS)
        problem = str(err.value)
    if problem:
        pytest.fail(problem, pytrace=False)
    validate(spec)
    assert spec["openapi"] == "3.0.1"  # what the assistant's skill editor takes
    assert spec["x-dingtalk-protocol"] == "stream"


def operations() -> dict[str, bot.Operation]:
    return bot.load_operations(bot.TOOLS_FILE, bot.ACTIONS, forwarding=authoring.forwarding())


def test_bot_reads_it_and_its_paths_are_the_registered_actions():
    assert {op.path for op in operations().values() if op.action is not None} == set(bot.ACTIONS)


def test_exactly_the_disabled_operations_declare_a_session_webhook():
    for key, operation in operations().items():  # auto and markdown answer in the ack: no webhook reply
        assert (operation.webhook is not None) == (operation.display == "disabled"), key
