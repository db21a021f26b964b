"""The pieces of bot.py called directly: actions, request parsing, webhook policy, settings, redaction."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from pathlib import Path

import pytest

import bot
from tests import samples
from tests.samples import SAMPLE_ACTIONS, SAMPLE_TOOLS

# ----- running an action -----


async def test_run_action_passes_only_declared_parameters():
    seen = {}

    async def action(location: str) -> str:
        seen["location"] = location
        return "ok"

    assert await bot.run_action(action, {"location": "上海", "sessionWebhook": "x", "userId": "u"}, 1) == "ok"
    assert seen == {"location": "上海"}


async def test_run_action_with_kwargs_gets_every_parameter():
    async def action(**params: str) -> str:
        return ",".join(sorted(params))

    assert await bot.run_action(action, {"b": "1", "a": "2"}, 1) == "a,b"


async def test_run_action_missing_parameter_is_400_without_calling_it():
    with pytest.raises(bot.GraphError) as err:
        await bot.run_action(samples.get_weather, {"date": "明天"}, 1)
    assert err.value.status == 400
    assert "location" in err.value.reason


async def test_run_action_failure_is_500_with_traceback_in_log_only(caplog):
    async def broken(location: str) -> str:
        raise RuntimeError("database password is hunter2")

    with caplog.at_level(logging.ERROR, logger="bot"), pytest.raises(bot.GraphError) as err:
        await bot.run_action(broken, {"location": "杭州"}, 1)
    assert err.value.status == 500
    assert "hunter2" not in err.value.reason  # the caller gets a generic message
    [record] = caplog.records
    assert record.getMessage() == "action broken failed"
    assert "hunter2" in caplog.text and "Traceback" in caplog.text


async def test_timeout_inside_the_action_is_its_failure_not_ours(caplog):
    async def slow_dependency(location: str) -> str:
        raise TimeoutError("database did not answer")

    with caplog.at_level(logging.ERROR, logger="bot"), pytest.raises(bot.GraphError) as err:
        await bot.run_action(slow_dependency, {"location": "杭州"}, 30)
    assert err.value.status == 500
    assert "action slow_dependency failed" in caplog.text and "database did not answer" in caplog.text


async def test_run_action_that_hangs_times_out_with_504(caplog):
    async def hangs(location: str) -> str:
        await asyncio.Event().wait()
        return ""

    with caplog.at_level(logging.ERROR, logger="bot"), pytest.raises(bot.GraphError) as err:
        await bot.run_action(hangs, {"location": "杭州"}, 0.05)
    assert err.value.status == 504
    assert "timed out" in caplog.text


# ----- Graph request parsing -----


def test_parse_post_body():
    call = bot.parse_graph_request(
        {"requestLine": {"method": "POST", "uri": "/v1/actions/weather"}, "body": '{"location": "杭州", "n": 1}'}
    )
    assert call == bot.GraphCall("POST", "/v1/actions/weather", {"location": "杭州", "n": 1})


def test_parse_get_query_string():
    call = bot.parse_graph_request(
        {"requestLine": {"method": "GET", "uri": "/v1/actions/weather?location=%E6%9D%AD%E5%B7%9E&date="}, "body": "{}"}
    )
    assert call == bot.GraphCall("GET", "/v1/actions/weather", {"location": "杭州", "date": ""})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ([1, 2], "callback data is not a JSON object"),
        ({"requestLine": "GET /"}, "requestLine is not a JSON object"),
        ({"requestLine": {"method": "DELETE", "uri": "/x"}}, "unsupported method"),
        ({"requestLine": {"method": "POST", "uri": 7}}, "uri is not a string"),
        ({"requestLine": {"method": "POST", "uri": "/x"}, "body": "not json"}, "body is not a JSON object"),
        ({"requestLine": {"method": "POST", "uri": "/x"}, "body": "[1]"}, "body is not a JSON object"),
        ({"requestLine": {"method": "POST", "uri": "/x"}, "body": 5}, "body is not a JSON object"),
    ],
)
def test_parse_rejects_malformed_requests_with_400(data, reason):
    with pytest.raises(bot.GraphError) as err:
        bot.parse_graph_request(data)
    assert err.value.status == 400
    assert reason in err.value.reason


# ----- one table of settings: .env.example and the README list exactly the declared ones -----

ROOT = Path(__file__).resolve().parent.parent
DECLARED = {f.name.upper(): f for f in dataclasses.fields(bot.Settings) if "meaning" in f.metadata}


def documented_default(key: str, text: str) -> object:
    """A default as the docs write it, read the way load_settings() reads the variable."""
    text = text.strip().strip("`")
    if DECLARED[key].metadata["required"]:
        return "required" if text in ("", "— (required)") else text
    if text in ("", "unset", "empty"):
        return bot.Settings.__dataclass_fields__[key.lower()].default
    row = DECLARED[key]
    return bot.setting_value(key, text, row.metadata, type(row.default))


def declared_defaults() -> dict[str, object]:
    return {key: "required" if f.metadata["required"] else f.default for key, f in DECLARED.items()}


def test_env_example_lists_exactly_the_declared_settings_with_their_defaults():
    lines = (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    found = dict(
        re.fullmatch(r"#? ?([A-Z][A-Z_]+)=(.*)", line).groups()
        for line in lines
        if re.fullmatch(r"#? ?[A-Z][A-Z_]+=.*", line)
    )
    assert {key: documented_default(key, text) for key, text in found.items()} == declared_defaults()


def test_readme_configuration_table_lists_exactly_the_declared_settings_with_their_defaults():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## 8. 配置 / Configuration")[1].split("\n## ")[0]
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
    assert bot.check_parameters(RATE, {"currency": "USD", "amount": "100"}) == {"currency": "USD", "amount": 100}
    assert bot.check_parameters(RATE, {"currency": "EUR", "amount": "2.5"})["amount"] == 2.5


def test_body_values_keep_their_json_types_and_null_means_not_given():
    assert bot.check_parameters(ON_CALL, {"team": "运维", "weeks": 2}) == {"team": "运维", "weeks": 2}
    assert bot.check_parameters(ON_CALL, {"team": "运维", "weeks": 2.0})["weeks"] == 2  # the JSON number 2.0
    assert bot.check_parameters(ON_CALL, {"team": "运维", "weeks": None}) == {"team": "运维"}


@pytest.mark.parametrize(
    ("operation", "params", "reason"),
    [
        (RATE, {}, "missing parameter(s): currency"),
        (RATE, {"currency": "GBP"}, "parameter currency must be one of USD, EUR, JPY, HKD, got 'GBP'"),
        (RATE, {"currency": "USD", "amount": "abc"}, "parameter amount must be a number, got 'abc'"),
        (
            RATE,
            {"currency": "USD", "amount": "-1"},
            "parameter amount must be at least 0 and at most 1000000000, got -1",
        ),
        (ON_CALL, {"weeks": 1}, "missing parameter(s): team"),
        (ON_CALL, {"team": "运维", "weeks": "2"}, "parameter weeks must be an integer, got '2'"),  # body: no conversion
        (ON_CALL, {"team": "运维", "weeks": True}, "parameter weeks must be an integer, got true"),
        (ON_CALL, {"team": "运维", "weeks": 9}, "parameter weeks must be at least 1 and at most 8, got 9"),
        (ON_CALL, {"team": "运维", "weeks": 10**400}, "parameter weeks must be at least 1 and at most 8, got 1000000"),
        (RATE, {"currency": "USD", "amount": "1e400"}, "parameter amount must be a number, got '1e400'"),
        (ON_CALL, {"team": ["运维"]}, 'parameter team must be a string, got ["运维"]'),
    ],
)
def test_parameters_that_do_not_fit_are_400_naming_the_parameter(operation, params, reason):
    with pytest.raises(bot.GraphError) as err:
        bot.check_parameters(operation, params)
    assert err.value.status == 400 and err.value.reason.startswith(reason), err.value.reason


# ----- tools.yaml read at start -----

TOOLS = SAMPLE_TOOLS.read_text(encoding="utf-8")


def load(tmp_path: Path, text: str, actions: dict | None = None) -> dict:
    path = tmp_path / "tools.yaml"
    path.write_text(text, encoding="utf-8")
    return bot.load_operations(path, SAMPLE_ACTIONS if actions is None else actions)


def test_tools_yaml_gives_each_operation_its_mode_and_parameters():
    modes = {key: op.display for key, op in OPERATIONS.items()}
    assert modes == {
        "POST /v1/actions/weather": "disabled",
        "GET /v1/actions/exchange-rate": "auto",
        "POST /v1/actions/on-call": "markdown",
    }
    weather = OPERATIONS["POST /v1/actions/weather"]
    assert weather.webhook == "sessionWebhook"
    assert [(p.name, p.required) for p in weather.parameters if p.context is None] == [
        ("location", True),
        ("date", False),
    ]  # the body schema behind its $ref
    assert [(p.name, p.location, p.type, p.enum) for p in RATE.parameters] == [
        ("currency", "query", "string", ("USD", "EUR", "JPY", "HKD")),
        ("amount", "query", "number", None),
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.replace("  /v1/actions/on-call:", "  /v1/actions/new:"), "tools.yaml declares /v1/actions/new, "),
        (lambda t: t.replace("x-dingtalk-display-result: markdown", "x-dingtalk-display-result: card"), "must be one"),
        (
            lambda t: t.replace("    get:\n      operationId: GetExchangeRate", "    put:\n      operationId: X"),
            "only GET",
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
            "the body schema's required (names, e.g. [location]) must be a list",
        ),
        (lambda t: t.replace("minimum: 1\n", "minimum: '1'\n"), "weeks's minimum must be a number, not '1'"),
        (lambda t: t.replace("enum: [USD, EUR, JPY, HKD]", "enum: USD"), "currency's enum must be a list"),
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


def test_an_action_that_is_not_async_is_a_config_error(tmp_path):
    def get_weather(location: str) -> str:
        return location

    with pytest.raises(bot.ConfigError) as err:
        load(tmp_path, TOOLS, {**SAMPLE_ACTIONS, "/v1/actions/weather": get_weather})
    assert "its action get_weather() must be an async def" in str(err.value)


def test_a_missing_tools_yaml_is_a_config_error_naming_the_file(tmp_path):
    with pytest.raises(bot.ConfigError) as err:
        bot.load_operations(tmp_path / "tools.yaml")
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
    assert bot.check_webhook(url) == url


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
    with pytest.raises(bot.GraphError) as err:
        bot.check_webhook(url)
    assert err.value.status == 400


@pytest.mark.parametrize("value", [None, "", 42, ["https://api.dingtalk.com/"]])
def test_missing_or_non_string_webhook_is_400(value):
    with pytest.raises(bot.GraphError) as err:
        bot.check_webhook(value)
    assert err.value.status == 400


def test_allowed_hosts_add_http_by_host_or_host_and_port():
    assert bot.check_webhook("http://127.0.0.1:9/a", frozenset({"127.0.0.1"}))
    assert bot.check_webhook("http://localhost:8080/a", frozenset({"localhost:8080"}))
    with pytest.raises(bot.GraphError):
        bot.check_webhook("http://localhost:8081/a", frozenset({"localhost:8080"}))


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


def test_redact_hides_session_tokens_and_secrets():
    line = 'POST https://api.dingtalk.com/agent/send?session=aswh_abc&x=1 "clientSecret": "s3cr3t"'
    assert (
        bot.redact(line, ("s3cr3t",))
        == 'POST https://api.dingtalk.com/agent/send?session=***&x=1 "clientSecret": "***"'
    )


def test_redacting_filter_covers_args_and_tracebacks():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "secret %s at %s", ("s3cr3t", "?session=tok"), None)
    try:
        raise ValueError("s3cr3t in exception")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    bot.RedactingFilter(("s3cr3t",)).filter(record)
    text = logging.Formatter().format(record)
    assert "s3cr3t" not in text and "tok" not in text
    assert "secret *** at ?session=***" in text and "ValueError" in text


def test_redacting_filter_survives_malformed_log_calls():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "unknown exception", (ValueError("s3cr3t"),), None)
    assert bot.RedactingFilter(("s3cr3t",)).filter(record)
    assert record.getMessage() == "unknown exception (ValueError('***'),)"


# ----- proxies -----


def test_proxy_per_destination_comes_from_the_environment_and_no_proxy_wins():
    proxies = bot.load_settings({**CREDENTIALS, "HTTPS_PROXY": "proxy.corp:3128", "NO_PROXY": "internal.corp"}).proxies
    assert proxies.for_url("https://api.dingtalk.com/v1.0/gateway/connections/open") == "http://proxy.corp:3128"
    assert proxies.for_url("wss://wss-open-connection.dingtalk.com/connect?ticket=t") == "http://proxy.corp:3128"
    assert proxies.for_url("https://internal.corp/agent/send") is None
    assert proxies.for_url("http://api.dingtalk.com/") is None  # no HTTP_PROXY or ALL_PROXY set


def test_lower_case_proxy_names_win_and_all_proxy_is_the_fallback():
    env = {**CREDENTIALS, "https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:1", "ALL_PROXY": "http://all:1"}
    proxies = bot.load_settings(env).proxies
    assert (proxies.https, proxies.http) == ("http://lower:1", "http://all:1")


@pytest.mark.parametrize("key", ["ALL_PROXY", "HTTPS_PROXY", "http_proxy"])
def test_socks_proxy_is_a_config_error_naming_the_variable(key):
    with pytest.raises(bot.ConfigError) as err:
        bot.load_settings({**CREDENTIALS, key: "socks5://user:pw@127.0.0.1:1080"})
    assert str(err.value).startswith(f"{key}='socks5://***@127.0.0.1:1080' is a SOCKS proxy")
    assert "pw" not in str(err.value)


@pytest.mark.parametrize(
    "value",
    [
        "http://alice:S3c/retPW@proxy:3128/corp",  # a path: websockets refuses it
        "http://proxy:3128/?x=1",
        "http://proxy:3128/#frag",
        "http://alice@proxy:3128",  # a user without a password
        "alice:S3cretPW@proxy:abc",  # not a port
        "http://:0",
        "wss://proxy:443",
    ],
)
def test_unusable_proxy_urls_are_a_config_error_without_the_password(value):
    with pytest.raises(bot.ConfigError) as err:
        bot.load_settings({**CREDENTIALS, "HTTPS_PROXY": value})
    assert "is not a proxy URL like http://[user:password@]host:port" in str(err.value)
    assert "S3c" not in str(err.value)


def test_proxy_passwords_are_kept_out_of_the_log():
    proxies = bot.load_settings({**CREDENTIALS, "HTTPS_PROXY": "http://alice:p%40ss@proxy:3128"}).proxies
    assert proxies.passwords() == ("p@ss",)


@pytest.mark.parametrize("entry", ["https://hooks.example.com", "*.example.com", "hooks.example.com.", "a/b"])
def test_allowed_hosts_that_are_not_hosts_are_a_config_error(entry):
    with pytest.raises(bot.ConfigError) as err:
        bot.load_settings({**CREDENTIALS, "WEBHOOK_ALLOWED_HOSTS": entry})
    assert str(err.value).startswith(f"WEBHOOK_ALLOWED_HOSTS={entry!r} has an entry that is not a host or host:port")


def test_allowed_hosts_match_the_default_port_and_ipv6():
    allowed = bot.load_settings({**CREDENTIALS, "WEBHOOK_ALLOWED_HOSTS": "hooks.corp:443, [::1]:8080, fe80::1"})
    hosts = allowed.webhook_allowed_hosts
    assert bot.check_webhook("https://hooks.corp/agent/send", hosts)  # 443 is https's own port
    assert bot.check_webhook("http://[::1]:8080/agent/send", hosts)
    assert bot.check_webhook("http://[fe80::1]:9/agent/send", hosts)  # no port given: any port
    for refused in ("http://hooks.corp/agent/send", "http://[::1]:8081/agent/send"):
        with pytest.raises(bot.GraphError):
            bot.check_webhook(refused, hosts)
