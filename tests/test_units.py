"""The pieces of bot.py called directly: actions, request parsing, webhook policy, settings, redaction."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest

import bot
from tests import authoring, samples
from tests.conftest import echoes, hangs_until, settings_for
from tests.fake_dingtalk import GraphResult, graph_request
from tests.samples import SAMPLE_ACTIONS, SAMPLE_TOOLS

# ----- running an action -----


async def test_an_action_gets_only_the_parameters_it_names(serve_actions):
    seen = {}

    async def action(location: str) -> str:
        seen["location"] = location
        return "ok"

    async with serve_actions({"/a": action}, declared=("userId", "sessionWebhook")) as call:
        answered = await call("/a", location="上海", sessionWebhook="x", userId="u")
    assert (answered.status, answered.body, seen) == (200, {"content": "ok"}, {"location": "上海"})


async def test_an_action_with_kwargs_gets_every_parameter(serve_actions):
    async def action(**params: str) -> str:
        return ",".join(sorted(params))

    async with serve_actions({"/a": action}, declared=("a", "b")) as call:
        assert (await call("/a", b="1", a="2")).body == {"content": "a,b"}


async def test_a_missing_parameter_is_400_without_calling_the_action(serve_actions):
    called = []

    async def action(location: str, date: str = "今天") -> str:
        called.append(location)
        return location

    async with serve_actions({"/a": action}) as call:
        refused = await call("/a", date="明天")
    assert refused.status == 400 and "location" in refused.body["error"] and called == []


async def test_a_failing_action_is_500_with_its_traceback_in_the_log_only(serve_actions, caplog):
    async def broken(location: str) -> str:
        raise RuntimeError("database password is hunter2")

    async with serve_actions({"/a": broken}) as call:
        failed = await call("/a", location="杭州")
    assert failed.status == 500
    assert "hunter2" not in str(failed.body)  # the caller gets a generic message
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == ["action broken failed"]
    assert "hunter2" in caplog.text and "Traceback" in caplog.text


async def test_timeout_inside_the_action_is_its_failure_not_ours(serve_actions, caplog):
    async def slow_dependency(location: str) -> str:
        raise TimeoutError("database did not answer")

    async with serve_actions({"/a": slow_dependency}) as call:
        assert (await call("/a", location="杭州")).status == 500
    assert "action slow_dependency failed" in caplog.text and "database did not answer" in caplog.text


async def test_an_action_that_hangs_times_out_with_504(serve_actions, caplog):
    async def hangs(location: str) -> str:
        await asyncio.Event().wait()
        return ""

    async with serve_actions({"/a": hangs}, action_timeout_seconds=0.1) as call:
        assert (await call("/a", location="杭州")).status == 504
    assert "action hangs (POST /a) timed out" in caplog.text


# ----- Graph request parsing -----


async def echo(**params: Any) -> str:
    return json.dumps(params, ensure_ascii=False, sort_keys=True)


@pytest.mark.parametrize("method", ["post", "get"])
async def test_a_post_body_and_a_get_query_reach_the_action_as_its_parameters(serve_actions, fake, remote, method):
    if method == "post":
        data = {"requestLine": {"method": "POST", "uri": "/echo"}, "body": '{"location": "杭州", "n": 1}'}
        expected = {"location": "杭州", "n": 1}
    else:  # query text stays text (the schema allows any type); an empty value is a value
        data = {"requestLine": {"method": "GET", "uri": "/echo?location=%E6%9D%AD%E5%B7%9E&n="}, "body": "{}"}
        expected = {"location": "杭州", "n": ""}
    async with serve_actions({"/echo": echo}, declared=("location", "n"), method=method):
        answered = await remote(fake.invoke(data))
    assert json.loads(answered.body["content"]) == expected


MALFORMED = [
    ([1, 2], "callback data is not a JSON object"),
    ({"requestLine": "GET /"}, "requestLine is not a JSON object"),
    ({"requestLine": {"method": "DELETE", "uri": "/x"}}, "unsupported method"),
    ({"requestLine": {"method": "POST", "uri": 7}}, "uri is not a string"),
    ({"requestLine": {"method": "POST", "uri": "/x"}, "body": "not json"}, "body is not a JSON object"),
    ({"requestLine": {"method": "POST", "uri": "/x"}, "body": "[1]"}, "body is not a JSON object"),
    ({"requestLine": {"method": "POST", "uri": "/x"}, "body": 5}, "body is not a JSON object"),
    *(
        ({"requestLine": {"method": "POST", "uri": "/x"}, "body": f'{{"amount": {number}}}'}, "body is not a JSON")
        for number in ("NaN", "Infinity", "-Infinity", "1e400")  # numbers JSON does not have
    ),
]


async def test_malformed_requests_are_400_and_the_bot_serves_on(serve_actions, fake, remote):
    async with serve_actions({"/echo": echo}, declared=("location",)) as call:
        for data, reason in MALFORMED:
            refused = await remote(fake.invoke(data))
            assert refused.status == 400 and reason in refused.body["error"], (data, refused.body)
        assert (await call("/echo", location="杭州")).status == 200


# ----- one table of settings: .env.example and the README list exactly the declared ones -----

ROOT = Path(__file__).resolve().parent.parent
DECLARED = {f.name.upper(): f for f in dataclasses.fields(bot.Settings)}


def documented_default(key: str, text: str) -> object:
    """A default as the docs write it, read the way load_settings() reads the variable."""
    text = text.strip().strip("`")
    if DECLARED[key].default is dataclasses.MISSING:
        return "required" if text in ("", "— (required)") else text
    if text in ("", "unset", "empty"):
        return DECLARED[key].default
    return getattr(bot.load_settings({"CLIENT_ID": "id", "CLIENT_SECRET": "secret", key: text}), key.lower())


def declared_defaults() -> dict[str, object]:
    return {key: "required" if f.default is dataclasses.MISSING else f.default for key, f in DECLARED.items()}


def test_env_example_lists_exactly_the_declared_settings_with_their_defaults():
    lines = (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    found = dict(
        re.fullmatch(r"#? ?([A-Z][A-Z_]+)=(.*)", line).groups()
        for line in lines
        if re.fullmatch(r"#? ?[A-Z][A-Z_]+=.*", line)
    )
    assert {key: documented_default(key, text) for key, text in found.items()} == declared_defaults()


def test_the_configuration_doc_lists_exactly_the_declared_settings_with_their_defaults():
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = doc.split('<a id="settings"></a>\n## 配置项 / Settings')[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([A-Z][A-Z_]+)` \| ([^|]*) \|", section, flags=re.MULTILINE)
    assert {key: documented_default(key, text) for key, text in rows} == declared_defaults()
    assert len(rows) == len(DECLARED)  # each once


def test_every_setting_is_read_from_its_variable():
    env = {**CREDENTIALS, "KEEPALIVE_SECONDS": "7.5", "DINGTALK_OPENAPI_ENDPOINT": "http://127.0.0.1:1/"}
    settings = bot.load_settings(env)
    assert (settings.keepalive_seconds, settings.dingtalk_openapi_endpoint) == (7.5, "http://127.0.0.1:1")


# ----- parameters checked and typed from tools.yaml -----

OPERATIONS = bot.load_operations(SAMPLE_TOOLS, SAMPLE_ACTIONS)
RATE = OPERATIONS["GET /v1/actions/exchange-rate"]
ON_CALL = OPERATIONS["POST /v1/actions/on-call"]


def test_query_strings_are_converted_to_the_declared_types():
    assert RATE.check({"currency": "USD", "amount": "100"}) == {"currency": "USD", "amount": 100}
    assert RATE.check({"currency": "EUR", "amount": "2.5"})["amount"] == 2.5


def test_body_values_keep_their_json_types_and_null_means_not_given():
    assert ON_CALL.check({"team": "运维", "weeks": 2}) == {"team": "运维", "weeks": 2}
    assert ON_CALL.check({"team": "运维", "weeks": 2.0})["weeks"] == 2  # the JSON number 2.0
    assert ON_CALL.check({"team": "运维", "weeks": None}) == {"team": "运维"}


@pytest.mark.parametrize(
    ("operation", "params", "reason"),
    [
        (RATE, {}, "missing parameter(s): currency"),
        (RATE, {"currency": "GBP"}, "parameter currency must be one of ['USD', 'EUR', 'JPY', 'HKD'], got 'GBP'"),
        (RATE, {"currency": "USD", "amount": "abc"}, "parameter amount must be number, got 'abc'"),
        (
            RATE,
            {"currency": "USD", "amount": "-1"},
            "parameter amount must be bigger than or equal to 0, got -1",
        ),
        (ON_CALL, {"weeks": 1}, "missing parameter(s): team"),
        (ON_CALL, {"team": "运维", "weeks": "2"}, "parameter weeks must be integer, got '2'"),  # body: no conversion
        (ON_CALL, {"team": "运维", "weeks": True}, "parameter weeks must be integer, got true"),
        (ON_CALL, {"team": "运维", "weeks": 9}, "parameter weeks must be smaller than or equal to 8, got 9"),
        (
            ON_CALL,
            {"team": "运维", "weeks": 10**400},
            "parameter weeks must be smaller than or equal to 8, got 1000000",
        ),
        (RATE, {"currency": "USD", "amount": "1e400"}, "parameter amount must be number, got '1e400'"),
        (ON_CALL, {"team": ["运维"]}, 'parameter team must be string, got ["运维"]'),
    ],
)
def test_parameters_that_do_not_fit_are_400_naming_the_parameter(operation, params, reason):
    with pytest.raises(bot.ActionError) as err:
        operation.check(params)
    assert err.value.status == 400 and str(err.value).startswith(reason), str(err.value)


# ----- tools.yaml read at start -----

TOOLS = SAMPLE_TOOLS.read_text(encoding="utf-8")


def load(tmp_path: Path, text: str, actions: dict | None = None) -> dict:
    path = tmp_path / "tools.yaml"
    path.write_text(text, encoding="utf-8")
    return authoring.check_file(path, SAMPLE_ACTIONS if actions is None else actions)  # at start, and as you write


def test_tools_yaml_gives_each_operation_its_mode_and_parameters():
    modes = {key: op.display for key, op in OPERATIONS.items()}
    assert modes == {
        "POST /v1/actions/weather": "disabled",
        "GET /v1/actions/exchange-rate": "auto",
        "POST /v1/actions/on-call": "markdown",
    }
    weather = OPERATIONS["POST /v1/actions/weather"]
    assert weather.webhook == "sessionWebhook"
    user = [name for name, prop in weather.schema["properties"].items() if "x-dingtalk-context" not in prop]
    assert (user, weather.schema["required"]) == (["location", "date"], ["location"])  # the schema behind its $ref
    assert RATE.query == {"currency", "amount"} and RATE.schema["required"] == ["currency"]
    assert RATE.schema["properties"]["currency"] == {
        "type": "string",
        "enum": ["USD", "EUR", "JPY", "HKD"],
        "example": "USD",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.replace("  /v1/actions/on-call:", "  /v1/actions/new:"), "tools.yaml declares /v1/actions/new, "),
        (lambda t: t.replace("x-dingtalk-display-result: markdown", "x-dingtalk-display-result: card"), "must be one"),
        (
            lambda t: t.replace("    get:\n      operationId: GetExchangeRate", "    put:\n      operationId: X"),
            "'put' is not an operation DingTalk calls (get or post)",
        ),
        (lambda t: t.replace("openapi: 3.0.1", "swagger: '2.0'"), "tools.yaml is not an OpenAPI 3 description"),
        (lambda t: t + "\n  bad: [unclosed\n", "tools.yaml is not valid YAML"),
        (lambda t: t + "\npaths:\n  /v1/actions/stock:\n    post: {}\n", "'paths' appears twice in one mapping"),
        (
            lambda t: t.replace(
                "      parameters:\n        - name: currency",
                "      parameters: 5\n      x-p:\n        - name: currency",
            ),
            "parameters must be a list",
        ),
        (
            lambda t: t.replace("required: [location]", "required: true"),
            "POST /v1/actions/weather: required must be an array",
        ),
        (lambda t: t.replace("minimum: 1\n", "minimum: '1'\n"), "parameter weeks: minimum must be a number"),
        (lambda t: t.replace("enum: [USD, EUR, JPY, HKD]", "enum: USD"), "parameter currency: enum must be an array"),
        (lambda t: t.replace("openapi: 3.0.1", "openapi: 3.0.1\nx-deep: " + "[" * 5000 + "]" * 5000), "tools.yaml is"),
        (lambda t: t.replace("#/components/schemas/WeatherRequest", "#/components/schemas/Nothing"), "names nothing"),
        (
            lambda t: t.replace("format: sessionWebhook", "format: runId"),
            "declares no parameter with x-dingtalk-context",
        ),
        (lambda t: t.replace("required: [location]", "required: []").replace("location:\n", "place:\n"), "'location'"),
    ],
    ids=[
        "path-without-action",
        "bad-mode",
        "put",
        "swagger-2",
        "not-yaml",
        "second-paths",
        "parameters-not-a-list",
        "required-true",
        "minimum-quoted",
        "enum-scalar",
        "nested-too-deeply",
        "dangling-ref",
        "no-webhook",
        "undeclared",
    ],
)
def test_tools_yaml_mismatch_is_a_one_line_config_error(tmp_path, change, message):
    with pytest.raises(bot.ConfigError) as err:
        load(tmp_path, change(TOOLS))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_action_without_an_operation_is_a_config_error(tmp_path):
    with pytest.raises(bot.ConfigError) as err:
        load(tmp_path, TOOLS, {**SAMPLE_ACTIONS, "/v1/actions/extra": samples.get_weather})
    assert str(err.value) == "ACTIONS in bot.py has /v1/actions/extra, but tools.yaml does not declare it"


async def test_a_plain_def_action_runs_in_a_worker_thread(serve_actions):
    def blocking(location: str) -> str:
        return f"{location} in {threading.current_thread().name}"

    async with serve_actions({"/a": blocking}) as call:
        answered = await call("/a", location="杭州")
    assert answered.body["content"].startswith("杭州 in bot-action-")  # a worker's


def test_a_plain_def_action_is_accepted_at_start(tmp_path):
    def get_weather(location: str) -> str:
        return location

    assert load(tmp_path, TOOLS, {**SAMPLE_ACTIONS, samples.WEATHER: get_weather})


async def test_a_plain_def_action_that_blocks_times_out_with_504_naming_the_setting(serve_actions, caplog):
    release = threading.Event()

    def slow(location: str) -> str:
        release.wait(120)
        return location

    try:
        async with serve_actions({"/a": slow}, action_timeout_seconds=0.1) as call:
            assert (await call("/a", location="杭州")).status == 504
    finally:
        release.set()
    assert "action slow (POST /a) timed out after 0.1 s (ACTION_TIMEOUT_SECONDS)" in caplog.text


@pytest.mark.parametrize(
    ("status", "expected"), [(None, 400), (404, 404), (409, 409)], ids=["default", "not-found", "conflict"]
)
async def test_an_action_refuses_with_action_error_and_its_message_no_traceback(
    serve_actions, caplog, status, expected
):
    async def get_ticket(ticket: str) -> str:
        raise bot.ActionError("工单号格式不对", *([status] if status else []))

    async with serve_actions({"/a": get_ticket}) as call:
        refused = await call("/a", ticket="x")
    assert (refused.status, refused.body["error"]) == (expected, "工单号格式不对")
    assert "Traceback" not in caplog.text


def test_action_error_is_a_4xx():
    for status in (500, 399, 499, True):  # 499 is no code of HTTP's: the Graph status line has no phrase for it
        with pytest.raises(ValueError, match=f"ActionError's status is one of HTTP's 4xx codes, not {status!r}"):
            bot.ActionError("no", status)


async def leave_balance(user_id: str = "") -> str:
    return f"Leave balance ({user_id})"


async def on_call_weeks_as_text(team: str, weeks: str = "1") -> str:
    return team


async def on_call_typed_loosely(team: Literal["运维", "前端"] | None = None, weeks: int | None = 1, **rest: Any) -> str:
    return str(team)


def test_an_optional_parameter_named_unlike_tools_yaml_is_an_error_naming_the_code(tmp_path):
    team = "                team:\n"  # the on-call body's first property
    tools = TOOLS.replace(team, "                userId:\n                  type: string\n" + team, 1)
    with pytest.raises(bot.ConfigError) as err:
        load(tmp_path, tools, {**SAMPLE_ACTIONS, samples.ON_CALL: leave_balance})
    assert str(err.value).startswith("leave_balance() (test_units.py:")
    assert str(err.value).endswith(
        "takes 'user_id', but tools.yaml: POST /v1/actions/on-call does not declare it (did you mean userId?)"
    )


def test_an_annotation_that_disagrees_with_the_declared_type_is_an_error(tmp_path):
    with pytest.raises(bot.ConfigError) as err:
        load(tmp_path, TOOLS, {**SAMPLE_ACTIONS, samples.ON_CALL: on_call_weeks_as_text})
    assert "on_call_weeks_as_text() (test_units.py:" in str(err.value)
    assert str(err.value).endswith("takes 'weeks' as string, but tools.yaml: POST /v1/actions/on-call declares integer")


def test_literal_optional_and_kwargs_annotations_that_agree_are_accepted(tmp_path):
    assert load(tmp_path, TOOLS, {**SAMPLE_ACTIONS, samples.ON_CALL: on_call_typed_loosely})


def test_a_path_on_one_side_only_names_the_nearest_on_the_other(tmp_path):
    with pytest.raises(bot.ConfigError) as err:
        load(tmp_path, TOOLS, {**SAMPLE_ACTIONS, "/v1/actions/on-calls": samples.get_on_call})
    assert str(err.value) == (
        "ACTIONS in bot.py has /v1/actions/on-calls, but tools.yaml does not declare it"
        " (did you mean /v1/actions/on-call?)"
    )


def test_a_missing_tools_yaml_is_a_config_error_naming_the_file(tmp_path):
    with pytest.raises(bot.ConfigError) as err:
        bot.load_operations(tmp_path / "tools.yaml", SAMPLE_ACTIONS)
    assert str(err.value).startswith(f"tools.yaml: cannot read {tmp_path / 'tools.yaml'}")


# ----- webhook host policy -----


@pytest.mark.parametrize(
    "url",
    [
        "https://api.dingtalk.com/agent/send?session=aswh_1",
        "https://oapi.dingtalk.com/robot/sendBySession?session=x",
        "https://API.DingTalk.com:443/agent/send?session=aswh_1",
    ],
)
def test_dingtalk_https_webhooks_are_allowed(url):
    assert bot._check_webhook(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://api.dingtalk.com/agent/send",  # plain http to DingTalk
        "https://api.dingtalk.com:8443/agent/send",  # other port
        "https://api.dingtalk.com.evil.example/agent/send",  # suffix trick
        "https://evil.example/?x=api.dingtalk.com",
        "https://user:pw@api.dingtalk.com/agent/send",  # credentials in URL
        "https://sub.api.dingtalk.com/agent/send",  # subdomains are not DingTalk's webhook hosts
        "ftp://api.dingtalk.com/x",
        "http://127.0.0.1:8080/agent/send",  # loopback only when allowed
        "https://[::1/",  # unparsable
    ],
)
def test_other_webhooks_are_refused(url):
    with pytest.raises(bot._GraphError) as err:
        bot._check_webhook(url)
    assert err.value.status == 400


@pytest.mark.parametrize("value", [None, "", 42, ["https://api.dingtalk.com/"]])
def test_missing_or_non_string_webhook_is_400(value):
    with pytest.raises(bot._GraphError) as err:
        bot._check_webhook(value)
    assert err.value.status == 400


def test_allowed_hosts_add_http_by_host_or_host_and_port():
    assert bot._check_webhook("http://127.0.0.1:9/a", frozenset({"127.0.0.1"}))
    assert bot._check_webhook("http://localhost:8080/a", frozenset({"localhost:8080"}))
    with pytest.raises(bot._GraphError):
        bot._check_webhook("http://localhost:8081/a", frozenset({"localhost:8080"}))


# ----- settings -----

CREDENTIALS = {"CLIENT_ID": "id", "CLIENT_SECRET": "secret"}


def test_settings_defaults():
    settings = bot.load_settings(CREDENTIALS)
    assert (settings.instances, settings.health_port, settings.log_level) == (1, None, "INFO")
    assert settings.webhook_allowed_hosts == frozenset()


def test_settings_from_env():
    settings = bot.load_settings(
        {
            **CREDENTIALS,
            "INSTANCES": "3",
            "HEALTH_PORT": "8080",
            "LOG_LEVEL": "debug",
            "WEBHOOK_ALLOWED_HOSTS": " 127.0.0.1:9000, Localhost ",
            "SHUTDOWN_GRACE_SECONDS": "2.5",
        }
    )
    assert settings.instances == 3 and settings.health_port == 8080 and settings.log_level == "DEBUG"
    assert settings.webhook_allowed_hosts == frozenset({"127.0.0.1:9000", "localhost"})
    assert settings.shutdown_grace_seconds == 2.5


@pytest.mark.parametrize("missing", ["CLIENT_ID", "CLIENT_SECRET"])
@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_credential_names_the_key(missing, value):
    env = dict(CREDENTIALS)
    if value is None:
        del env[missing]
    else:
        env[missing] = value
    with pytest.raises(bot.ConfigError, match=f"^{missing} is not set.*\\.env\\.example"):
        bot.load_settings(env)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("INSTANCES", "zero"),
        ("INSTANCES", "0"),
        ("HEALTH_PORT", "70000"),
        ("LOG_LEVEL", "LOUD"),
        ("WEBHOOK_TIMEOUT_SECONDS", "soon"),
        ("SHUTDOWN_GRACE_SECONDS", "-1"),
        ("DINGTALK_OPENAPI_ENDPOINT", "api.dingtalk.com"),
    ],
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(bot.ConfigError, match=key):
        bot.load_settings({**CREDENTIALS, key: value})


# ----- redaction -----


@contextlib.asynccontextmanager
async def logging_as_embedded(fake: Any, remote: Any, secret: str) -> AsyncIterator[logging.Logger]:
    """The bot's logger while running() serves with CLIENT_SECRET `secret`: its lines, as the app sees them."""
    settings = settings_for(fake, client_secret=secret)
    fake.client_secret = secret
    async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings):
        yield logging.getLogger("bot")


async def test_secrets_session_tokens_and_tracebacks_are_redacted(fake, remote, caplog):
    async with logging_as_embedded(fake, remote, "s3cr3t") as log:
        log.info('POST https://api.dingtalk.com/agent/send?session=aswh_abc&x=1 "clientSecret": "s3cr3t"')
        try:
            raise ValueError("s3cr3t in exception")
        except ValueError:
            log.exception("secret %s at %s", "s3cr3t", "?session=tok")
    assert "s3cr3t" not in caplog.text and "aswh_abc" not in caplog.text and "session=tok" not in caplog.text
    assert 'send?session=***&x=1 "clientSecret": "***"' in caplog.text
    assert "secret *** at ?session=***" in caplog.text and "ValueError: *** in exception" in caplog.text


async def test_a_dummy_one_letter_secret_does_not_mask_every_word(fake, remote, caplog):
    async with logging_as_embedded(fake, remote, "y") as log:
        log.info("never connected yet: check the proxy")
    assert "never connected yet: check the proxy" in caplog.text


async def test_a_malformed_log_call_is_logged_redacted_not_raised(fake, remote, caplog, monkeypatch):
    monkeypatch.setattr(logging, "raiseExceptions", True)  # a logging error would raise here
    async with logging_as_embedded(fake, remote, "s3cr3t") as log:
        log.error("unknown exception", ValueError("s3cr3t"))  # as dingtalk-stream 0.24.3 logs
    assert "unknown exception (ValueError('***'),)" in caplog.text


# ----- proxies -----


# ----- every schema rule of tools.yaml enforced (by fastjsonschema), none silently ignored -----

TICKET_SCHEMA = {
    "type": "object",
    "required": ["ticket"],
    "properties": {
        "ticket": {"type": "string", "pattern": "^[A-Z]+-[0-9]+$"},
        "title": {"type": "string", "minLength": 2, "maxLength": 5},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["bug", "ops"]}},
        "owner": {"$ref": "#/components/schemas/Owner"},
        "hours": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
        "note": {"type": "string", "nullable": True},
        "due": {"type": "string", "format": "date"},
    },
}


async def ticket_action(ticket: str, **params: object) -> dict:
    return {"ticket": ticket, **params}


def ticket_operations(schema: dict | None = None, query: list | None = None) -> dict[str, bot.Operation]:
    body = {"content": {"application/json": {"schema": schema or TICKET_SCHEMA}}}
    spec = {
        "openapi": "3.0.1",
        "paths": {
            "/t": {"post": {"requestBody": body}},
            "/q": {"get": {"parameters": query or [{"name": "n", "in": "query", "schema": {"type": "integer"}}]}},
        },
        "components": {
            "schemas": {"Owner": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}}
        },
    }
    return authoring.check_spec(spec, {"/t": query_action if schema else ticket_action, "/q": query_action})


async def query_action(**params: object) -> dict:
    return params


TICKET = ticket_operations()["POST /t"]


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"ticket": "abc-1"}, "parameter ticket must match pattern ^[A-Z]+-[0-9]+$, got 'abc-1'"),
        ({"ticket": "OPS-1", "title": "x"}, "parameter title must be longer than or equal to 2 characters, got 'x'"),
        ({"ticket": "OPS-1", "title": "too long"}, "parameter title must be shorter than or equal to 5 characters"),
        ({"ticket": "OPS-1", "tags": ["bug", "nope"]}, "parameter tags[1] must be one of ['bug', 'ops'], got 'nope'"),
        ({"ticket": "OPS-1", "owner": {"name": "x"}}, "parameter owner must contain ['id'] properties"),
        ({"ticket": "OPS-1", "hours": 0}, "parameter hours must be bigger than 0, got 0"),
        ({"ticket": "OPS-1", "owner": None, "note": 5}, "parameter note must be string or null, got 5"),
        ({"ticket": "OPS-1", "due": "tomorrow"}, "parameter due must be date, got 'tomorrow'"),
    ],
)
def test_every_schema_rule_is_enforced_naming_the_parameter_and_the_rule(params, reason):
    with pytest.raises(bot.ActionError) as err:
        TICKET.check(params)
    assert err.value.status == 400 and str(err.value).startswith(reason), str(err.value)


def test_nullable_adds_null_to_a_list_of_types():
    schema = {"type": "object", "properties": {"n": {"type": ["integer"], "nullable": True}}}
    assert ticket_operations(schema)["POST /t"].check({"n": None}) == {"n": None}


def test_values_that_keep_the_rules_pass_nullable_ones_as_none():
    params = {"ticket": "OPS-7", "title": "disk", "tags": ["ops"], "owner": {"id": "u1"}, "hours": 0.5, "note": None}
    assert TICKET.check({**params, "due": "2026-12-01"}) == {**params, "due": "2026-12-01"}


def test_a_41_digit_integer_in_a_query_string_is_an_integer():
    digits = "9" * 41
    assert ticket_operations()["GET /q"].check({"n": digits}) == {"n": int(digits)}


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "object", "properties": {"x": {"type": "string", "discriminator": "y"}}}, "'discriminator' is not"),
        ({"type": "object", "properties": {"x": {"type": "string", "format": "uuid"}}}, "format 'uuid' is not one"),
        ({"type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}, "parameter x:"),
        ({"type": "string"}, "the body schema must be type: object with properties"),
        ({"type": "object", "properties": {"x": {"type": "string", "pattern": 123}}}, "parameter x:"),
        ({"type": "object", "properties": {"x": {"type": "object", "properties": ["a"]}}}, "parameter x:"),
        ({"type": "object", "properties": {"x": {"oneOf": None}}}, "parameter x:"),
        ({"type": "object", "properties": {"x": {"allOf": {"type": "string"}}}}, "parameter x:"),
        ({"type": "object", "properties": {"x": {"type": "string", "format": ["x"]}}}, "format ['x'] is not one"),
        ({"type": "object", "properties": {1: {"type": "string"}}}, "POST /t"),
        ({"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0}}}, "multipleOf must be greater"),
        (
            {"type": "object", "properties": {"x": {"$ref": "#/components/schemas/Owner", "maxLength": 3}}},
            "x: maxLength beside a $ref is ignored: move it into #/components/schemas/Owner",
        ),
        (
            {"type": "object", "properties": {"x": {"type": "integer", "maximum": 30, "default": 99}}},
            "x: its default 99 breaks its own schema: must be smaller than or equal to 30",
        ),
    ],
    ids=[
        "unknown-keyword",
        "unchecked-format",
        "bad-pattern",
        "body-not-object",
        "pattern-not-text",
        "properties-a-list",
        "oneOf-empty",
        "allOf-a-mapping",
        "format-a-list",
        "property-named-by-a-number",
        "multipleOf-zero",
        "beside-a-ref",
        "default-out-of-range",
    ],
)
def test_a_rule_the_validator_cannot_enforce_stops_the_start_with_one_line(schema, problem):
    with pytest.raises(bot.ConfigError) as err:
        ticket_operations(schema)
    assert problem in str(err.value) and str(err.value).startswith("tools.yaml: POST /t")
    assert "\n" not in str(err.value)


def test_header_parameters_are_a_config_error_not_ignored():
    with pytest.raises(bot.ConfigError, match="only query and path parameters"):
        ticket_operations(query=[{"name": "X-Token", "in": "header", "schema": {"type": "string"}}])


# ----- templated paths: routed, their parameters checked like the others -----


async def item_action(id: int, view: str = "short") -> dict:
    return {"id": id, "view": view}


def item_operations(parameters: list) -> dict[str, bot.Operation]:
    spec = {"openapi": "3.0.1", "paths": {"/items/{id}": {"get": {"parameters": parameters}}}}
    return authoring.check_spec(spec, {"/items/{id}": item_action})  # at start, and as you write


ITEM_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}


async def test_a_templated_path_is_routed_and_its_segment_checked_like_any_parameter(fake, remote, tmp_path):
    view = {"name": "view", "in": "query", "schema": {"type": "string"}}
    spec = {"openapi": "3.0.1", "paths": {"/items/{id}": {"get": {"parameters": [ITEM_ID, view]}}}}
    (tools := tmp_path / "tools.yaml").write_text(json.dumps(spec), encoding="utf-8")

    async def get(path: str, **params: str) -> GraphResult:
        return await remote(fake.invoke(graph_request(path, params, method="GET")))

    async with bot.running({"/items/{id}": item_action}, tools, settings=settings_for(fake)):
        found, low, own_text = await get("/items/42", view="full"), await get("/items/0"), await get("/items/{id}")
        elsewhere = [await get(path) for path in ("/items/42/more", "/items/")]
        posted = await remote(fake.invoke(graph_request("/items/42", {})))
    assert (found.status, found.body) == (200, {"id": 42, "view": "full"})
    assert (low.status, low.body["error"]) == (400, "parameter id must be bigger than or equal to 1, got 0")
    assert own_text.status == 400  # a template's own text is a path of it: its value "{id}" is then checked
    assert [result.status for result in [*elsewhere, posted]] == [404, 404, 404]


async def test_a_percent_encoded_path_routes_as_its_decoded_form(serve_actions, fake, remote):
    async with serve_actions({"/v1/actions/weather": echo}, declared=("x",)):
        data = {"requestLine": {"method": "POST", "uri": "/v1/actions/%77eather?x=1"}, "body": "{}"}
        answered = await remote(fake.invoke(data))
    assert json.loads(answered.body["content"]) == {"x": "1"}


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        ([], "the path's {id} needs a parameter with in: path"),
        ([{**ITEM_ID, "name": "other"}], "parameter other is in: path exactly when the path has {other}"),
    ],
)
def test_a_templated_path_without_its_parameter_is_a_config_error(parameters, problem):
    with pytest.raises(bot.ConfigError) as err:
        item_operations(parameters)
    assert str(err.value) == f"tools.yaml: GET /items/{{id}}: {problem}"


# ----- plain def actions: a thread each, so a burst or a hung one starves nobody -----


async def test_a_burst_of_slow_plain_def_actions_is_not_misreported_as_timeouts(serve_actions):
    side_by_side = threading.Barrier(30, timeout=120)

    def slow(location: str) -> str:
        side_by_side.wait()  # returns once all 30 are running at the same time
        return location

    # side by side, each within its time limit: six at a time (asyncio.to_thread's pool on 2 cores) would never
    # fill the barrier, and every call would be a 504 when its 30 s ran out
    async with serve_actions({"/slow": slow}, action_timeout_seconds=60) as call:
        results = await asyncio.gather(*(call("/slow", location=str(n)) for n in range(30)))
    assert [result.body for result in results] == [{"content": str(n)} for n in range(30)]


async def test_hung_plain_def_actions_do_not_starve_the_ones_after_them(serve_actions):
    release = threading.Event()
    actions = {"/hangs": hangs_until(release), "/quick": echoes}
    try:
        async with serve_actions(actions, action_timeout_seconds=0.5) as call:
            for _ in range(8):  # more than asyncio.to_thread's pool holds on 2 cores
                assert (await call("/hangs", location="x")).status == 504
            # not starved: it cannot wait for a hung thread (they hang until the release below) and be served
            assert (await call("/quick", location="fine")).body == {"content": "fine"}
    finally:
        release.set()


def nap(seconds: float) -> None:
    time.sleep(seconds)


class AsyncCallable:
    async def __call__(self, location: str) -> str:
        return f"awaited {location}"


async def test_odd_callables_are_run_and_named(serve_actions, caplog):
    actions = {"/callable": AsyncCallable(), "/partial": functools.partial(nap, 1)}
    async with serve_actions(actions, action_timeout_seconds=0.2) as call:
        assert (await call("/callable", location="杭州")).body == {"content": "awaited 杭州"}  # its coroutine awaited
        assert (await call("/partial")).status == 504  # not a 500 from a missing __name__
    assert "action nap (POST /partial) timed out" in caplog.text


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("async def f(team, /): ...", "f() (<string>:1) takes 'team' by position (before /): the bot passes names"),
        ("async def f(team: 'NoSuchType', weeks: str): ...", "takes 'weeks' as string, but tools.yaml: POST"),
    ],
    ids=["positional-only", "one-annotation-unresolved"],
)
def test_action_signatures_the_bot_cannot_call_rightly_are_start_up_errors(tmp_path, source, problem):
    scope: dict = {}
    exec(compile(source, "<string>", "exec"), scope)  # a function defined in a file of its own
    with pytest.raises(bot.ConfigError) as err:
        load(tmp_path, TOOLS, {**SAMPLE_ACTIONS, samples.ON_CALL: scope["f"]})
    assert problem in str(err.value)


async def odd_annotation(team: [str], weeks: int = 1) -> str:  # [str] is not a type: not ours to judge
    return team


def test_an_annotation_that_is_not_a_type_is_left_alone(tmp_path):
    assert load(tmp_path, TOOLS, {**SAMPLE_ACTIONS, samples.ON_CALL: odd_annotation})


# ----- parameter rules: query text typed only where the schema allows no string; every rule enforced -----

CODE = {"type": "string", "maxLength": 8}


def query_operation(schema: dict, **entry: Any) -> bot.Operation:
    parameter = {"name": "code", "in": "query", "schema": schema} | entry
    spec = {"openapi": "3.0.1", "paths": {"/q": {"get": {"parameters": [parameter]}}}}
    spec["components"] = {"schemas": {"Code": CODE}}
    return bot.load_operations(spec, {"/q": query_action})["GET /q"]


@pytest.mark.parametrize(
    ("schema", "text", "expected"),
    [
        ({"allOf": [{"$ref": "#/components/schemas/Code"}]}, "1234", "1234"),
        ({"enum": ["1", "2", "3"]}, "2", "2"),
        ({"pattern": r"^\d{6}$"}, "123456", "123456"),
        ({"allOf": [{"type": "integer"}], "maximum": 9}, "7", 7),
        ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", True),
        ({"type": "number", "enum": [1, 2, 3]}, "2", 2),  # an integer is a number
        ({"$ref": "#/components/schemas/Code", "default": "AB"}, None, "AB"),  # a default beside a $ref is filled in
    ],
    ids=[
        "allOf-ref-string",
        "enum-of-text",
        "pattern-only",
        "allOf-integer",
        "anyOf-no-string",
        "number-enum",
        "default",
    ],
)
def test_query_text_is_converted_only_where_the_schema_allows_no_string(schema, text, expected):
    assert query_operation(schema).check({} if text is None else {"code": text}) == {"code": expected}


@pytest.mark.parametrize(
    ("schema", "entry", "text", "rule"),
    [
        ({"$ref": "#/components/schemas/Code", "maxLength": 3}, {}, "1234", "shorter than or equal to 3"),
        ({"pattern": r"^\d{6}$"}, {}, "１２３４５６", r"must match pattern ^\d{6}$"),  # full-width digits; as written
        ({"pattern": r"^\S+$"}, {}, "张\u3000伟", "must match pattern"),  # an ideographic space is a space (ECMA)
        ({}, {"content": {"application/json": {"schema": {"type": "integer", "maximum": 5}}}}, "9", "smaller than"),
    ],
    ids=["maxLength-beside-ref", "ascii-digits", "unicode-spaces", "content-not-schema"],
)
def test_every_rule_a_parameter_carries_is_enforced(schema, entry, text, rule):
    operation = query_operation(schema, **entry)
    with pytest.raises(bot.ActionError) as err:
        operation.check({"code": text})
    assert err.value.status == 400 and rule in str(err.value), str(err.value)


def test_digits_in_a_character_class_are_ascii_and_an_unclosed_class_stops_the_start():
    operation = query_operation({"type": "string", "pattern": r"^[\d\]-]+$"})
    assert operation.check({"code": "12]-3"}) == {"code": "12]-3"}
    with pytest.raises(bot.ActionError, match="must match pattern"):
        operation.check({"code": "１２"})  # full-width digits: not \d in JSON Schema (ECMA 262)
    with pytest.raises(bot.ConfigError):
        query_operation({"type": "string", "pattern": r"^[\d$"})  # a `[` never closed: not a pattern


@pytest.mark.parametrize(
    ("pattern", "accepted", "refused"),
    [
        (r"^[$¥€][0-9]+$", ["$12", "¥3"], ["12", "$12\n"]),  # $ in a class is a character; at the end, the end only
        (r"^\w+$", ["abc_1"], ["杭州", "１２３"]),  # \w is ASCII in ECMA 262
        (r"^[\w.-]+@x$", ["a.b-c@x"], ["杭@x"]),  # in a class too
        (r"^.+$", ["a b"], ["a\u2028b", "a\rb", "a\nb"]),  # . is not a line end
        (r"^\S+$", ["张伟"], ["张\u3000伟", "a\ufeffb", "a\u00a0b"]),  # ECMA's spaces, \ufeff among them
        (r"^\s$", ["\ufeff"], ["\x1c"]),  # Python's \s differs from ECMA's both ways
        (r"\bfoo\b", ["杭foo杭"], ["afoo"]),  # a word boundary between ASCII word characters and others
        (r"^[^]$", ["a", "\n"], ["ab"]),  # [^] is any character
        (r"^[+-\d]$", ["+", "-", "5"], [",", ".", "/"]),  # a - beside \d is a character, not a range
        (r"^[\s\S]+$", ["a\nb"], [""]),  # any character: \S inside [...] too
        (r"^[^\W_]+$", ["abc1"], ["a_b", "杭州"]),  # letters and digits, ASCII
        (r"^a{,3}$", ["a{,3}"], ["aa"]),  # {,3} is no quantifier in ECMA 262: characters
        (r"^[\u4e00-\u9fa5]{2,4}$", ["张伟", "張偉"], ["张", "ab", "张伟\n"]),  # a Chinese name
        (r"^[\S^a]$", ["b", "^"], [" "]),  # a ^ the class lists is a character
        (r"^[^^\Wa]$", ["b"], ["a", "^", " "]),
        (r"^(a)?\1$", ["", "aa"], ["a"]),  # a group that took no part: its backreference matches empty
        (r"^\uD83D\uDE00$", ["😀"], ["x"]),  # a surrogate pair is one character
        (r"^[&&]$", ["&"], ["a"]),  # no set operation: characters
    ],
)
def test_a_pattern_is_enforced_as_ecma_262_reads_it(pattern, accepted, refused):
    operation = query_operation({"type": "string", "pattern": pattern})
    for text in accepted:
        assert operation.check({"code": text}) == {"code": text}
    for text in refused:
        with pytest.raises(bot.ActionError) as err:
            operation.check({"code": text})
        assert f"must match pattern {pattern}, got" in str(err.value)  # the pattern as written


@pytest.mark.parametrize(
    ("pattern", "said"),
    [
        (r"^a\Z", r"pattern '^a\\Z': \Z is Python's, not ECMA 262's: write it in the syntax ECMA 262 and Python share"),
        (r"(?i)^ab$", "pattern '(?i)^ab$': (?i is Python's, not ECMA 262's"),
        (r"^a++$", "pattern '^a++$': ++ is Python's, not ECMA 262's"),
        (r"\uD83D[\uDE00-\uDE4F]", r"pattern '\\uD83D[\\uDE00-\\uDE4F]': \uD83D is half a character: write its pair"),
        (r"a{4294967296}", "pattern 'a{4294967296}' cannot be enforced here (the repetition number is too large)"),
        (r"^(?<y>[0-9]{4})$", "pattern '^(?<y>[0-9]{4})$' cannot be enforced here (unknown extension ?<y): write"),
        (r"^\p{L}+$", r"pattern '^\\p{L}+$' cannot be enforced here (bad escape \p): write it in the syntax"),
    ],
)
def test_a_pattern_that_cannot_be_enforced_stops_the_start_naming_it(pattern, said):
    with pytest.raises(bot.ConfigError) as err:
        query_operation({"type": "string", "pattern": pattern})
    assert said in str(err.value) and "\n" not in str(err.value)


def test_a_parameter_described_by_content_is_typed_by_its_schema():
    content = {"application/json": {"schema": {"type": "integer", "maximum": 5}}}
    assert query_operation({}, content=content).check({"code": "3"}) == {"code": 3}


@pytest.mark.parametrize("step", [0, -1, float("nan"), float("inf")])
def test_multiple_of_zero_stops_the_start_instead_of_failing_every_call(step):
    with pytest.raises(bot.ConfigError, match=f"code: multipleOf must be greater than 0, not {step}"):
        query_operation({"type": "number", "multipleOf": step})


@pytest.mark.parametrize(
    ("env", "url", "proxy"),
    [
        ({"HTTPS_PROXY": "http://p:1"}, "https://api.dingtalk.com/x", "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.dingtalk.com:443"}, "https://api.dingtalk.com:443/x", None),
        ({"ALL_PROXY": "socks5://p:1"}, "https://api.dingtalk.com/x", None),  # neither library read ALL_PROXY
        ({"HTTPS_PROXY": "socks5://p:1"}, "https://api.dingtalk.com/x", None),  # aiohttp speaks no SOCKS
        ({"HTTPS_PROXY": "socks5://p:1"}, "wss://wss-open-connection.dingtalk.com/x", "socks5://p:1"),
        ({"WSS_PROXY": "http://w:1", "HTTPS_PROXY": "http://p:1"}, "wss://gw/x", "http://w:1"),
    ],
)
def test_the_proxy_for_each_request_follows_the_standard_variables(monkeypatch, env, url, proxy):
    for name in ("https_proxy", "http_proxy", "all_proxy", "wss_proxy", "ws_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert bot._proxy_for(url) == proxy


async def test_a_lookup_of_a_name_that_does_not_encode_fails_instead_of_never_answering():
    with pytest.raises(ValueError):
        await asyncio.wait_for(bot._lookup("a" * 64 + ".example.com", 443), 30)  # a generous bound on "never"


class SwallowsItsCancellation:
    def __init__(self) -> None:
        self.release, self.finished = asyncio.Event(), False

    async def __call__(self, location: str) -> str:  # not an async def function: run through a worker thread first
        for _ in range(3):
            try:
                await self.release.wait()
            except BaseException:
                pass
        self.finished = True
        return location


async def test_an_awaitable_action_that_ignores_its_time_limit_is_answered_504_on_time(serve_actions):
    action = SwallowsItsCancellation()
    try:
        async with serve_actions({"/a": action}, action_timeout_seconds=0.3) as call:
            answered = await call("/a", location="杭州")
            # on time: answered while the call still runs (it cannot end before the release below)
            assert answered.status == 504 and not action.finished
    finally:
        action.release.set()


# ----- the likeliest tools.yaml mistakes, said in tools.yaml's terms -----

TICKET_BLOCK = """  /v1/actions/ticket:
    get:
      x-dingtalk-display-result: auto
      parameters:
        - {name: ticket, in: query, schema: {type: string}}
      responses: {'200': {description: OK}}
"""


async def get_ticket(ticket: str) -> dict:
    return {"ticket": ticket}


@pytest.mark.parametrize(
    ("tools", "actions", "message"),
    [
        (
            TOOLS.replace("paths:\n", "paths:\n" + TICKET_BLOCK),
            {**SAMPLE_ACTIONS, "/v1/actions/tickets": get_ticket},
            "tools.yaml declares /v1/actions/ticket and ACTIONS in bot.py has /v1/actions/tickets: make them one path",
        ),
        (
            TOOLS + "\n" + TICKET_BLOCK.replace("\n  ", "\n").removeprefix("  "),  # pasted at column 0
            {**SAMPLE_ACTIONS, "/v1/actions/ticket": get_ticket},
            "does not declare it (it is at the top level: indent it two spaces, under paths:)",
        ),
        (
            TOOLS.replace("\ncomponents:", "\n  " + TICKET_BLOCK.replace("\n", "\n  ").rstrip(" ") + "components:"),
            {**SAMPLE_ACTIONS, "/v1/actions/ticket": get_ticket},
            "does not declare it (it is indented under /v1/actions/on-call: indent it as much as the other paths)",
        ),
    ],
    ids=["spelled-two-ways", "at-the-top-level", "indented-too-far"],
)
def test_a_path_pasted_or_spelled_wrong_is_said_where_it_is(tmp_path, tools, actions, message):
    path = tmp_path / "tools.yaml"
    path.write_text(tools, encoding="utf-8")
    with pytest.raises(bot.ConfigError) as err:
        authoring.check_file(path, actions)  # the authoring check (python -m pytest, the simulator) says where it is
    assert message in str(err.value)


def test_a_context_field_whose_property_and_format_lost_their_indent_stops_the_start(tmp_path):
    indented = "x-dingtalk-context:\n            property: currentUser\n            format: userId"
    tools = TOOLS.replace(indented, "x-dingtalk-context:\n          property: currentUser\n          format: userId", 1)
    assert tools != TOOLS
    with pytest.raises(bot.ConfigError, match="indent property and format under its x-dingtalk-context"):
        bot.load_operations(write(tmp_path, tools), SAMPLE_ACTIONS)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    with pytest.raises(bot.ConfigError) as err:
        bot.load_operations(
            write(tmp_path, TOOLS.replace("  /v1/actions/on-call:", "  /v1/actions/on-call: x:")), SAMPLE_ACTIONS
        )
    assert str(err.value).startswith("tools.yaml is not valid YAML: ") and "in tools.yaml, line" in str(err.value)


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "tools.yaml").write_text(text, encoding="utf-8")
    return tmp_path / "tools.yaml"
