"""tools.yaml is a valid OpenAPI 3.0.1 document for a Stream-mode action, in step with bot.ACTIONS."""

from __future__ import annotations

from pathlib import Path

import yaml
from openapi_spec_validator import validate

import bot

SPEC = yaml.safe_load((Path(__file__).resolve().parent.parent / "tools.yaml").read_text(encoding="utf-8"))


def _resolve(node: dict) -> dict:
    while "$ref" in node:
        *_, name = node["$ref"].split("/")
        node = SPEC["components"]["schemas"][name]
    return node


def _operations():
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_tools_yaml_is_valid_openapi_3_0_1_for_stream():
    validate(SPEC)
    assert SPEC["openapi"] == "3.0.1"
    assert SPEC["x-dingtalk-protocol"] == "stream"


def test_paths_equal_the_registered_actions():
    assert set(SPEC["paths"]) == set(bot.ACTIONS)


def test_every_operation_says_how_its_answer_is_shown_and_disabled_ones_get_a_session_webhook():
    for path, method, operation in _operations():
        assert method in ("get", "post")
        mode = operation["x-dingtalk-display-result"]  # explicit, though DingTalk defaults to auto
        if method == "post":
            schema = _resolve(operation["requestBody"]["content"]["application/json"]["schema"])
            properties = schema["properties"]
        else:
            params = operation.get("parameters", [])
            properties = {p["name"]: p["schema"] | {k: v for k, v in p.items() if k.startswith("x-")} for p in params}
        contexts = {
            name: prop["x-dingtalk-context"] for name, prop in properties.items() if "x-dingtalk-context" in prop
        }
        webhook = {"property": "currentConversation", "format": "sessionWebhook"}
        assert (contexts.get("sessionWebhook") == webhook) == (mode == "disabled"), path


def test_bot_reads_it_without_complaint():
    assert {op.path for op in bot.load_operations().values()} == set(bot.ACTIONS)
