"""bot.py as an engine inside your own service: bot.running() with actions and a tools file of your own, a start that
fails at start, and docs/embedding.md's FastAPI and aiohttp examples saved as app.py and run as written."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

import bot
from tests.conftest import ROOT, settings_for, wait_until
from tests.fake_dingtalk import GRAPH_TOPIC, bot_env, free_port, graph_request
from tests.samples import PRELUDE, SAMPLE_ACTIONS, SAMPLE_TOOLS, WEATHER

PARAMS = {"location": "杭州", "date": "明天"}
SECTION = (ROOT / "docs" / "embedding.md").read_text(encoding="utf-8")
OFFLINE = (ROOT / "docs" / "offline.md").read_text(encoding="utf-8")  # the fake on its own, for an app of your own
EXAMPLES = {
    "fastapi": next(b for b in re.findall(r"```python\n(.*?)```", SECTION, re.DOTALL) if "FastAPI(" in b),
    "aiohttp": next(b for b in re.findall(r"```python\n(.*?)```", SECTION, re.DOTALL) if "cleanup_ctx" in b),
}


async def test_running_serves_actions_and_a_tools_file_of_the_callers_own(fake, remote):
    async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings_for(fake)) as clients:
        assert [client.connected for client in clients] == [True]  # it returns once connected
        result = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())))
    assert result.status == 200
    assert fake.webhook_posts[0].markdown.startswith("### 杭州 · 明天")  # tests/samples.py's action, not bot.py's demo


async def test_running_raises_the_one_line_reason_at_once_when_credentials_are_refused(fake):
    started = time.monotonic()
    with pytest.raises(bot.ConfigError) as err:
        settings = settings_for(fake, client_secret="wrong")
        async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings, connected_within=600):
            pytest.fail("running() must not yield when the credentials are refused")
    assert time.monotonic() - started < 60  # at once: a generous bound, far below connected_within's 600 s
    assert str(err.value) == (
        "DingTalk rejected CLIENT_ID / CLIENT_SECRET (authFailed: 鉴权失败): check both in the developer console, "
        "your app → 凭证与基础信息 / Credentials & basic info"
    )
    assert len(fake.open_requests) == 1  # no retry loop


async def test_running_checks_the_actions_it_is_given(fake):
    async def get_weather(place: str) -> str:
        return place

    with pytest.raises(
        bot.ConfigError, match=re.escape("takes 'place', but sample_tools.yaml: POST /v1/actions/weather")
    ):
        async with bot.running({**SAMPLE_ACTIONS, WEATHER: get_weather}, SAMPLE_TOOLS, settings=settings_for(fake)):
            pytest.fail("running() must not yield with an action out of step with tools.yaml")
    assert fake.open_attempts == 0  # before any network


async def test_running_says_so_when_it_is_not_connected_in_time_and_goes_on(fake, remote, caplog):
    fake.open_status = 503
    async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings_for(fake), connected_within=0.5) as clients:
        assert not clients[0].connected
        fake.open_status = None
        await remote(fake.wait_connected(1))  # it kept trying
    assert "stream-1 not connected yet: going on; it keeps trying in the background" in caplog.text


async def launch(kind: str, env: dict[str, str], workdir: Path, port: int) -> asyncio.subprocess.Process:
    """docs/embedding.md's example saved as app.py beside an unchanged bot.py, run as it says; the skills are the
    samples (tools.yaml and, through PRELUDE, ACTIONS), whatever the author has put in bot.py."""
    shutil.copy(ROOT / "bot.py", workdir / "bot.py")
    shutil.copy(SAMPLE_TOOLS, workdir / "tools.yaml")
    (workdir / "app.py").write_text(PRELUDE + EXAMPLES[kind], encoding="utf-8")
    command = ["-m", "uvicorn", "app:app", "--port", str(port)] if kind == "fastapi" else ["app.py"]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        cwd=workdir,
        env=env | {"PORT": str(port)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def hello(port: int) -> tuple[int, dict]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(f"http://127.0.0.1:{port}/hello") as response:
        return response.status, await response.json()


@pytest.mark.parametrize("kind", EXAMPLES)
async def test_the_readme_example_serves_the_skill_and_its_own_route_and_drains_on_stop(fake, remote, tmp_path, kind):
    port = free_port()
    app = await launch(kind, bot_env(fake), tmp_path, port)
    try:
        await remote(fake.wait_connected(1))
        await until_serving(port)
        fake.webhook_latency = 1.5  # a reply in flight ...
        request = graph_request("/v1/actions/weather", PARAMS, session_webhook=fake.webhook_url())
        message_id = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, request))
        await remote(fake.wait_for(lambda: fake.webhook_posts))
        assert await hello(port) == (200, {"hello": "world"})  # ... while the route answers
        app.send_signal(signal.SIGTERM if kind == "fastapi" else signal.SIGINT)
        output = (await asyncio.wait_for(app.communicate(), 30))[0].decode()
        # uvicorn re-raises SIGTERM once it has shut down, so that its exit status names the signal
        assert app.returncode == (-signal.SIGTERM if kind == "fastapi" else 0), output
        # the lines `python bot.py` prints, under uvicorn's logging defaults or none at all
        assert "INFO    bot: stream-1: connected" in output, output
        assert f"INFO    bot: callback {message_id} POST /v1/actions/weather -> 200 in" in output
        ack = await remote(fake.wait_ack(message_id))  # drained: the reply and its ack
        assert '\\"success\\": true' in ack["data"]
    finally:
        if app.returncode is None:
            app.kill()


async def app_healthz(port: int) -> tuple[int, dict]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(f"http://127.0.0.1:{port}/healthz") as response:
        return response.status, await response.json()


async def until_healthz(port: int, expected: tuple[int, dict], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (answer := await app_healthz(port)) != expected:
        assert time.monotonic() < deadline, f"the app's /healthz still answers {answer}, not {expected}"
        await asyncio.sleep(0.05)


async def test_the_fastapi_example_reports_the_skills_connection_state_on_the_apps_own_port(fake, remote, tmp_path):
    port = free_port()
    app = await launch("fastapi", bot_env(fake), tmp_path, port)
    try:
        [connection] = await remote(fake.wait_connected(1))
        await until_serving(port)
        assert await app_healthz(port) == (200, {"instances": 1, "connected": 1})
        fake.open_status = 503  # the connection drops, and no new one opens ...
        await remote(fake.drop(connection))
        await until_healthz(port, (503, {"instances": 1, "connected": 0}))
        fake.open_status = None  # ... until DingTalk answers again
        await until_healthz(port, (200, {"instances": 1, "connected": 1}))
    finally:
        app.send_signal(signal.SIGTERM)
        await asyncio.wait_for(app.communicate(), 30)


async def until_serving(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await hello(port)
            return
        except aiohttp.ClientError:
            assert time.monotonic() < deadline, f"nothing serves port {port}"
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", EXAMPLES)
async def test_the_readme_example_fails_its_start_up_when_credentials_are_refused(fake, tmp_path, kind):
    app = await launch(kind, bot_env(fake, CLIENT_SECRET="Wr0ng-Secret"), tmp_path, free_port())
    output = (await asyncio.wait_for(app.communicate(), 30))[0].decode()
    assert app.returncode != 0, output
    assert "DingTalk rejected CLIENT_ID / CLIENT_SECRET (authFailed: 鉴权失败)" in output
    assert "Wr0ng-Secret" not in output


async def test_the_readme_example_reads_dotenv_as_python_bot_py_does(fake, remote, tmp_path):
    (tmp_path / ".env").write_text(f"CLIENT_SECRET={fake.client_secret}\nCLIENT_ID=from-dotenv\n", encoding="utf-8")
    env = bot_env(fake)
    del env["CLIENT_SECRET"]  # from .env beside bot.py; CLIENT_ID from the real environment, which wins
    app = await launch("fastapi", env, tmp_path, free_port())
    try:
        await remote(fake.wait_connected(1))
        assert {request.body["clientId"] for request in fake.open_requests} == {fake.client_id}
    finally:
        app.send_signal(signal.SIGTERM)
        await asyncio.wait_for(app.communicate(), 30)


async def test_cancelled_again_while_draining_running_still_closes_its_connection(fake, remote, caplog):
    caplog.set_level(logging.INFO, logger="bot")
    fake.webhook_latency = 3.0

    async def app() -> None:
        async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings_for(fake)):
            await asyncio.Event().wait()

    serving = asyncio.create_task(app())
    await remote(fake.wait_connected(1))
    await remote(
        fake.send_frame("CALLBACK", GRAPH_TOPIC, graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url()))
    )
    await remote(fake.wait_for(lambda: fake.webhook_posts))
    serving.cancel()  # shutdown: the drain begins ...
    await wait_until(lambda: "stopping: waiting up to" in caplog.text)
    serving.cancel()  # ... and is cut short
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(serving, 30)
    await remote(fake.wait_for(lambda: not fake.live_connections()))  # nothing left open


async def test_embedded_the_bots_lines_show_under_the_apps_basic_config(fake, remote):
    root, stream = logging.getLogger(), io.StringIO()
    saved = root.handlers[:], root.level
    root.handlers[:] = [logging.StreamHandler(stream)]  # what logging.basicConfig() leaves: WARNING, one handler
    root.setLevel(logging.WARNING)
    try:
        async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings_for(fake)) as clients:
            result = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())))
            logging.getLogger("bot").warning("a line with the secret %s in it", clients[0].credential.client_secret)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert result.status == 200
    lines = stream.getvalue()
    assert "stream-1: connected" in lines and f"POST {WEATHER} -> 200" in lines and "stopped" in lines
    assert "a line with the secret *** in it" in lines and fake.client_secret not in lines  # as python bot.py does


async def test_without_a_network_an_apps_start_up_is_not_held(caplog):
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: as a network that is down answers
    settings = bot.Settings(client_id="id", client_secret="secret", dingtalk_openapi_endpoint=nowhere)
    started = time.monotonic()
    async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings, connected_within=600) as clients:
        waited = time.monotonic() - started
        assert not clients[0].connected
    # not connected_within's 600 s: the app's own routes answer at once (a generous bound, far below it)
    assert waited < 60
    assert "stream-1 not connected yet: going on; it keeps trying in the background" in caplog.text


def readme_block(language: str, containing: str) -> str:
    [found] = [b for b in re.findall(rf"```{language}\n(.*?)```", SECTION + OFFLINE, re.DOTALL) if containing in b]
    return found


async def test_the_offline_loop_for_an_app_of_your_own_runs_as_the_readme_shows(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".env"))
    (project / "my_skills.py").write_text(readme_block("python", "# my_skills.py"), encoding="utf-8")
    (project / "my_tools.yaml").write_text(readme_block("yaml", "# my_tools.yaml"), encoding="utf-8")
    own = 'bot.running(my_skills.ACTIONS, "my_tools.yaml")'  # as the example's comment says
    app = re.sub(r"bot\.running\(bot\.ACTIONS\)", own, EXAMPLES["fastapi"])
    app = app.replace("import bot\n", "import bot\nimport my_skills\n")
    (project / "app.py").write_text(app, encoding="utf-8")
    fake_line, app_line, simulate_line = readme_block("bash", "tests.fake_dingtalk").strip().splitlines()
    fake_port, app_port = free_port(), free_port()

    def command(line: str) -> list[str]:
        words = line.split("#")[0].split()
        words = [str(fake_port) if word == "8765" else str(app_port) if word == "8000" else word for word in words]
        words = [word.replace(":8765", f":{fake_port}") for word in words]
        return [sys.executable, *words[1:]] if words[0] == "python" else [sys.executable, "-m", *words]

    def start(line: str, env: dict[str, str]) -> asyncio.Future:
        return asyncio.create_subprocess_exec(
            *command(line), cwd=project, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )

    fake = await start(fake_line, bot_env())
    app_process = None
    try:
        exports = {}
        while not (line := (await asyncio.wait_for(fake.stdout.readline(), 30)).decode()).startswith("# Ctrl+C"):
            if match := re.fullmatch(r"export (\w+)=(.*)\n", line):
                exports[match[1]] = match[2]
        app_process = await start(app_line, bot_env() | exports)  # "after pasting those export lines"
        while "# connected: 1 connection(s) open" not in (await asyncio.wait_for(fake.stdout.readline(), 30)).decode():
            pass
        answered = await start(simulate_line, bot_env())
        answer = (await asyncio.wait_for(answered.communicate(), 120))[0].decode()
        refused = await start(simulate_line.replace("OPS-1", "not-a-ticket"), bot_env())
        refusal = (await asyncio.wait_for(refused.communicate(), 120))[0].decode()
    finally:
        for process in (app_process, fake):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.communicate(), 30)
    assert answered.returncode == 0, answer
    assert '"ticket": "OPS-1"' in answer and '"status": "open"' in answer
    assert refused.returncode == 1 and "parameter ticket must match pattern" in refusal


async def test_credentials_refused_after_a_first_failed_open_are_said_not_silent(fake, remote, caplog, monkeypatch):
    monkeypatch.setattr(bot, "_reconnect_delay", lambda failures, longest=60.0: 0.2)
    fake.open_status = 503  # the first open fails (a network not ready yet): running() returns
    async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings_for(fake)) as clients:
        fake.client_secret, fake.open_status = "rotated", None  # the next one is refused
        await wait_until(lambda: clients[0].stopping.is_set() or "rejected" in caplog.text)
    assert "stream-1: DingTalk rejected CLIENT_ID / CLIENT_SECRET" in caplog.text
