"""Your tools.yaml is a valid OpenAPI 3.0.1 description for a Stream-mode skill, in step with ACTIONS in bot.py.

These read your own files (as tests/test_authoring.py does), so they hold for whatever skills you put there.
"""

from __future__ import annotations

import yaml
from openapi_spec_validator import validate

import bot

SPEC = yaml.safe_load(bot.TOOLS_FILE.read_text(encoding="utf-8"))


def test_tools_yaml_is_valid_openapi_3_0_1_for_stream():
    validate(SPEC)
    assert SPEC["openapi"] == "3.0.1"  # what the assistant's skill editor takes
    assert SPEC["x-dingtalk-protocol"] == "stream"


def test_bot_reads_it_and_its_paths_are_the_registered_actions():
    assert {op.path for op in bot.load_operations().values()} == set(bot.ACTIONS)


def test_exactly_the_disabled_operations_declare_a_session_webhook():
    for key, operation in bot.load_operations().items():  # auto and markdown answer in the ack: no webhook reply
        assert (operation.webhook is not None) == (operation.display == "disabled"), key
