"""tools.yaml is a valid OpenAPI 3.0.1 document for a Stream-mode action, in step with bot.ACTIONS."""

from __future__ import annotations

import inspect
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


def test_every_operation_gets_a_session_webhook_and_declares_its_action_parameters():
    for path, method, operation in _operations():
        assert method in ("get", "post")
        if method == "post":
            schema = _resolve(operation["requestBody"]["content"]["application/json"]["schema"])
            properties, required = schema["properties"], set(schema.get("required", []))
        else:
            params = operation.get("parameters", [])
            properties = {p["name"]: p["schema"] | {k: v for k, v in p.items() if k.startswith("x-")} for p in params}
            required = {p["name"] for p in params if p.get("required")}
        contexts = {
            name: prop["x-dingtalk-context"] for name, prop in properties.items() if "x-dingtalk-context" in prop
        }
        assert contexts["sessionWebhook"] == {"property": "currentConversation", "format": "sessionWebhook"}
        # a parameter the action requires must be declared (and required) in tools.yaml
        action = bot.ACTIONS[path]
        for name, param in inspect.signature(action).parameters.items():
            if param.default is param.empty and param.kind is not param.VAR_KEYWORD:
                assert name in properties and name in required, f"{path}: {name}"
