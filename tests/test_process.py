"""`python bot.py` as a subprocess: configuration errors, signals with work in flight, secrets in output."""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import sys

import pytest
import trustme
from dingtalk_stream.version import VERSION_STRING as SDK_VERSION

import bot
from tests.conftest import ROOT, FakeThread
from tests.fake_dingtalk import bot_env, graph_request
from tests.samples import SAMPLE_TOOLS

WEATHER = "/v1/actions/weather"
PARAMS = {"location": "杭州", "date": "明天"}


@pytest.mark.parametrize("missing", ["CLIENT_ID", "CLIENT_SECRET"])
async def test_missing_credential_exits_2_with_one_line_and_no_network(fake, bot_process, missing):
    env = bot_env(fake)
    del env[missing]
    process = await bot_process(env)
    assert await process.wait() == 2
    assert process.lines == [
        f"error: {missing} is not set: copy .env.example to .env and fill in your app's credentials"
        " (or try the bot offline first: python -m tests.simulate)"
    ]
    assert fake.open_requests == []


async def test_bad_setting_exits_2_naming_it(fake, bot_process):
    process = await bot_process(bot_env(fake, INSTANCES="zero"))
    assert await process.wait() == 2
    assert process.lines == ["error: INSTANCES='zero' is not a valid int"]
    assert fake.open_requests == []


async def test_tools_yaml_path_without_action_exits_2_naming_it_before_any_network_call(fake, bot_process):
    tools = SAMPLE_TOOLS.read_text(encoding="utf-8")
    extra = (
        "  /v1/actions/no-such-action:\n    post:\n      operationId: Nothing\n      x-dingtalk-display-result: auto\n"
    )
    process = await bot_process(bot_env(fake), tools=tools.replace("paths:\n", f"paths:\n{extra}"))
    assert await process.wait() == 2
    assert process.lines == [
        "error: tools.yaml declares /v1/actions/no-such-action, but ACTIONS in bot.py has no action for it"
        " (and FORWARD_URL is not set)"
    ]
    assert fake.open_attempts == 0


async def test_missing_tools_yaml_exits_2_naming_the_file(fake, bot_process):
    process = await bot_process(bot_env(fake), tools="")
    assert await process.wait() == 2
    [line] = process.lines
    assert line.startswith("error: tools.yaml: cannot read ") and "No such file or directory" in line
    assert fake.open_attempts == 0


async def test_dotenv_file_is_read_and_real_environment_wins(fake, remote, bot_process, tmp_path):
    (tmp_path / ".env").write_text(f"CLIENT_ID=from-dotenv\nCLIENT_SECRET={fake.client_secret}\nINSTANCES=2\n")
    env = bot_env(fake)
    del env["CLIENT_SECRET"]  # comes from .env
    env["INSTANCES"] = "1"  # real environment beats .env
    process = await bot_process(env)
    try:
        await remote(fake.wait_connected(1))
    finally:
        process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    assert {r.body["clientId"] for r in fake.open_requests} == {fake.client_id}
    assert len(fake.open_requests) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
async def test_signal_with_callback_in_flight_finishes_it_and_exits_0(fake, remote, bot_process, signum):
    fake.webhook_latency = 1.0
    process = await bot_process(bot_env(fake))
    await remote(fake.wait_connected(1))
    request = graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())
    message_id = await remote(fake.send_frame("CALLBACK", "/v1.0/graph/api/invoke", request))
    await remote(fake.wait_for(lambda: fake.webhook_posts))  # the reply is now in flight
    process.proc.send_signal(signum)
    assert await process.wait() == 0
    ack = await remote(fake.wait_ack(message_id))  # sent before the exit: the fake's thread may still be reading it
    assert '\\"success\\": true' in ack["data"]
    assert f"{signal.Signals(signum).name} received" in process.output
    assert "stopped" in process.lines[-1]


async def test_sigterm_when_idle_exits_0(fake, remote, bot_process):
    process = await bot_process(bot_env(fake))
    await remote(fake.wait_connected(1))
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0


async def test_secret_and_session_tokens_never_in_output(fake, remote, bot_process):
    fake.client_secret = "S3cr3t-Value-4711"
    fake.webhook_status = 500  # the failure path logs the webhook URL
    process = await bot_process(bot_env(fake, LOG_LEVEL="DEBUG"))
    await remote(fake.wait_connected(1))
    for session in ("aswh_token_one", "aswh_token_two"):
        request = graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url(session))
        await remote(fake.invoke(request))
        fake.webhook_status = 200
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    assert "webhook http://127.0.0.1" in process.output and "session=***" in process.output
    assert "S3cr3t-Value-4711" not in process.output
    assert "aswh_token" not in process.output


@pytest.mark.parametrize(
    ("encoding", "problem"), [("utf-16", "invalid start byte"), ("gbk", "invalid continuation byte")]
)  # PowerShell 5's `>` writes UTF-16; Notepad's "ANSI" on Chinese Windows writes GBK
async def test_a_dotenv_file_not_in_utf8_is_one_line_and_exit_2(fake, bot_process, tmp_path, encoding, problem):
    (tmp_path / ".env").write_bytes(f"# 注释 / a comment\nCLIENT_ID={fake.client_id}\n".encode(encoding))
    process = await bot_process(bot_env(fake))
    assert await process.wait() == 2
    assert process.lines == [f"error: {tmp_path / '.env'} is not UTF-8 ({problem}): save it as UTF-8"]
    assert fake.open_attempts == 0


async def test_an_action_timeout_past_dingtalks_redelivery_gets_a_warning_at_start(fake, remote, bot_process):
    process = await bot_process(bot_env(fake, ACTION_TIMEOUT_SECONDS="30"))
    await remote(fake.wait_connected(1))
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    assert "ACTION_TIMEOUT_SECONDS=30: DingTalk has been seen to redeliver a callback not acked within about 16 s" in (
        process.output
    )


async def test_wss_with_a_certificate_from_a_ca_trusted_through_ssl_cert_file(tmp_path, bot_process):
    """The real gateway is TLS, and behind a TLS-inspecting corporate proxy its certificate comes from the company's
    CA: the open, the websocket and the webhook all verify against the CA file SSL_CERT_FILE names."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.cert_pem.write_to_path(str(tmp_path / "company-ca.pem"))
    with FakeThread(tls=server) as remote:
        fake = remote.fake
        assert fake.base_url.startswith("https://")
        untrusting = await bot_process(bot_env(fake))  # the system's CAs only
        await untrusting.wait_for_output("CERTIFICATE_VERIFY_FAILED")
        untrusting.kill()
        process = await bot_process(bot_env(fake, SSL_CERT_FILE=str(tmp_path / "company-ca.pem")))
        await remote(fake.wait_connected(1))
        request = graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())
        result = await remote(fake.invoke(request))
        process.proc.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    assert result.status == 200 and fake.webhook_posts[0].markdown.startswith("### 杭州")
    assert fake.webhook_posts[0].host == f"127.0.0.1:{fake.port}"  # over https, as the open and wss:// were


# ----- the engine's version -----


def test_version_flag_prints_the_engines_and_the_sdks_versions_and_exits_0():
    result = subprocess.run(
        [sys.executable, "bot.py", "--version"], cwd=ROOT, env=bot_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(f"dingtalk-skill-bot {bot.VERSION} (dingtalk-stream {SDK_VERSION}, Python ")
    assert re.fullmatch(r"\d+\.\d+\.\d+", bot.VERSION)
    assert f"## {bot.VERSION} — " in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")  # says what changed


async def test_the_first_log_line_names_the_engines_and_the_sdks_versions(fake, remote, bot_process):
    process = await bot_process(bot_env(fake))
    await remote(fake.wait_connected(1))
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    assert f"bot: dingtalk-skill-bot {bot.VERSION} (dingtalk-stream {SDK_VERSION}): serving 3 operation(s)" in (
        process.output
    )


@pytest.mark.parametrize(("args", "code"), [(["--help"], 0), (["-V"], 2), (["--port", "8000"], 2)])
def test_other_arguments_print_the_usage_not_a_credentials_error(args, code):
    result = subprocess.run(
        [sys.executable, "bot.py", *args], cwd=ROOT, env=bot_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == code and result.stdout == ""
    assert result.stderr.startswith("usage: python bot.py [--version]") and "CLIENT_ID" not in result.stderr


async def test_a_tools_yaml_mistake_is_said_before_missing_credentials(fake, bot_process):
    env = bot_env(fake)
    del env["CLIENT_ID"], env["CLIENT_SECRET"]
    tools = SAMPLE_TOOLS.read_text(encoding="utf-8").replace("  /v1/actions/on-call:", "  /v1/actions/on-calls:")
    process = await bot_process(env, tools=tools)
    assert await process.wait() == 2
    [line] = process.lines
    assert line.startswith(
        "error: tools.yaml declares /v1/actions/on-calls, but ACTIONS in bot.py has no action for it"
    )
