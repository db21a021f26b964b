"""`python -m tests.simulate` as a user runs it: --list, one call per display mode, failures, interactive mode,
--context, --repeat, --fake; and the simulator's own checks of what the bot did against the operation's
x-dingtalk-display-result. It runs on the sample skills (--tools/--actions), never on the demo ones in bot.py."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys

import dingtalk_stream
import pytest
import yaml
from aiohttp import web

import bot
from tests import simulate as sim
from tests.conftest import ROOT
from tests.fake_dingtalk import GraphResult, WebhookPost, bot_env
from tests.http_service import HttpService
from tests.samples import SAMPLE_ACTIONS, SAMPLE_TOOLS

WEATHER, RATE, ON_CALL = "/v1/actions/weather", "/v1/actions/exchange-rate", "/v1/actions/on-call"


SAMPLES = ["--tools", str(SAMPLE_TOOLS), "--actions", "tests.samples:SAMPLE_ACTIONS"]


def simulate(*args: str, path: str | None = WEATHER, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    where = ["--path", path] if path else []
    return subprocess.run(
        [sys.executable, "-m", "tests.simulate", *SAMPLES, *where, *args],
        cwd=ROOT, env=bot_env(), input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def section(out: str, heading: str) -> str:
    """The lines under a `── heading ──` of the simulator's output, up to the next blank line."""
    assert heading in out, out
    return out.split(heading, 1)[1].lstrip("\n").split("\n\n", 1)[0]


# ----- --list -----


def test_list_shows_each_operation_with_its_mode_without_starting_the_bot():
    result = simulate("--list", path=None)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "bot.py connected" not in out and "bot|" not in out and "▶" not in out  # it imports bot.py only
    blocks = {block.split("\n", 1)[0]: block for block in out.split("\n\n")}
    assert set(blocks) >= {
        f"{op.method} {op.path}" for op in sim.load_operations(SAMPLE_TOOLS, SAMPLE_ACTIONS).values()
    }

    weather = blocks[f"POST {WEATHER}"]
    assert "display: disabled — reply through sessionWebhook" in weather
    assert re.search(r"location +string, required\n", weather)
    assert re.search(r"date +string, optional\n", weather)
    context = weather.split("filled in by DingTalk:\n", 1)[1]
    assert re.search(r"sessionWebhook +currentConversation\.sessionWebhook", context)
    assert re.search(r"userId +currentUser\.userId", context) and "location" not in context

    rate = blocks[f"GET {RATE}"]
    assert "display: auto — data for the assistant's model" in rate
    assert "parameters (query string):" in rate
    assert re.search(r"currency +string, required, one of USD, EUR, JPY, HKD\n", rate)
    assert re.search(r"amount +number, optional, 0–1000000000$", rate)
    assert "filled in by DingTalk" not in rate

    on_call = blocks[f"POST {ON_CALL}"]
    assert "display: markdown — markdown shown as is" in on_call
    assert re.search(r"team +string, required\n", on_call)
    assert re.search(r"weeks +integer, optional, 1–8$", on_call)
    assert "filled in by DingTalk" not in on_call


# ----- one call per display mode -----


def test_disabled_mode_shows_the_card_posted_to_the_session_webhook():
    result = simulate("杭州", "明天")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "bot.py connected to the local DingTalk simulator" in out
    assert f'▶ POST {WEATHER}  body {{"location": "杭州", "date": "明天"}}' in out
    assert "+ filled in by DingTalk: userId," in out and out.count("sessionWebhook") >= 2
    card = section(out, "── reply in the chat (markdown card via sessionWebhook) ──")
    assert "杭州 · 明天" in card and "• 天气 / Weather: 晴 Sunny" in card
    assert "│ 演示数据" in out
    assert 'status 200  body {"success": true}' in out
    assert "round trip" in out
    assert "── result card" not in out and "── data for" not in out and "✗" not in out


def test_values_filled_in_from_the_examples_are_said_so_on_the_call_line():
    typed, untyped, none = simulate("杭州"), simulate(), simulate("{}")
    assert typed.returncode == untyped.returncode == 0, untyped.stdout + untyped.stderr
    assert "tools.yaml's examples" not in typed.stdout + none.stdout  # ({} is refused: location is required)
    [call] = [line for line in untyped.stdout.splitlines() if line.startswith("▶")]
    assert (
        call.startswith(f"▶ POST {WEATHER}  body {{")
        and "← tools.yaml's examples (nothing typed; {} sends none)" in call
    )


def test_auto_mode_shows_the_data_for_the_assistants_model_and_calls_no_webhook():
    result = simulate("USD", "100", path=RATE)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"▶ GET {RATE}  query currency=USD&amount=100" in out  # query values stay text; the bot converts them
    data_section = section(out, "── data for the assistant's model (x-dingtalk-display-result: auto) ──")
    data_json, note = data_section.rsplit("\n", 1)
    data = json.loads(data_json)
    assert data["currency"] == "USD" and data["amount"] == 100
    assert data["cny"] == 712.0  # the sample skill's made-up rate
    assert "the assistant's model turns this data into its answer" in note and "no sessionWebhook call" in note
    graph = section(out, "── Graph response (in the ack) ──")
    assert graph.startswith("    status 200  body {") and json.loads(graph.split("body ", 1)[1].split("\n")[0]) == data
    assert "── reply in the chat" not in out and "filled in by DingTalk" not in out and "✗" not in out


def test_markdown_mode_shows_the_markdown_result_card_and_calls_no_webhook():
    result = simulate("运维", "2", path=ON_CALL)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f'▶ POST {ON_CALL}  body {{"team": "运维", "weeks": 2}}' in out  # weeks converted to a JSON integer
    card = out.split("── result card (markdown shown as is) ──\n", 1)[1].split("\n── Graph response", 1)[0]
    assert "运维 值班表" in card and "**" not in card
    table = [line.strip() for line in card.splitlines() if "│" in line]
    assert re.fullmatch(r"周 Week +│ 值班 On call", table[0])
    assert [row.split("│")[0].strip() for row in table[1:]] == ["1", "2"]  # one row per week, columns aligned
    assert len({sim.display_width(line.split("│")[0]) for line in card.splitlines() if "│" in line}) == 1
    assert "(no sessionWebhook call: DingTalk shows this markdown in the assistant's result card)" in card
    assert '"content": "**运维** 值班表' in section(out, "── Graph response (in the ack) ──")
    assert "── reply in the chat" not in out and "✗" not in out


# ----- failures -----


def test_unknown_path_is_a_usage_error_naming_the_known_paths():
    result = simulate("x", path="/v1/actions/nope")
    assert result.returncode == 2
    assert "/v1/actions/nope is not in tools.yaml" in result.stderr  # (the simulator's word for any tools file)
    assert f"known paths: {WEATHER}, {RATE}, {ON_CALL}" in result.stderr
    assert "bot.py connected" not in result.stdout


def test_simulator_exits_1_when_the_bot_answers_non_200():
    result = simulate("date=明天")  # no location: the action's required parameter
    assert result.returncode == 1
    assert "status 400" in result.stdout
    assert "✗ the bot answered Graph status 400" in result.stdout
    assert "missing parameter(s): location" in result.stdout


def test_a_value_outside_the_declared_enum_is_left_to_the_bot_to_refuse():
    result = simulate("GBP", path=RATE)
    assert result.returncode == 1
    assert "parameter currency must be one of ['USD', 'EUR', 'JPY', 'HKD']" in result.stdout
    assert "✗ the bot answered Graph status 400" in result.stdout
    assert "── data for the assistant's model" not in result.stdout  # an error is not data for the model


def test_simulator_rejects_bad_arguments_with_exit_2():
    result = simulate("杭州", "明天", "多余")
    assert result.returncode == 2
    assert "too many values" in result.stderr


def test_simulator_verbose_shows_frames_on_the_wire():
    result = simulate("--verbose", '{"location": "纽约"}')
    assert result.returncode == 0
    assert '→ frame {"specVersion": "1.0", "type": "CALLBACK"' in result.stdout
    assert '← ack {"code": 200' in result.stdout


def test_simulator_interactive_sends_each_line():
    result = simulate("-i", stdin="上海 后天\nlocation=广州\n\n")
    assert result.returncode == 0
    assert result.stdout.count("status 200") == 2
    assert "上海 · 后天" in result.stdout and "广州 · 今天" in result.stdout


def test_ctrl_c_in_interactive_mode_stops_the_bot_and_exits_130():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.simulate", *SAMPLES, "-i"],
        cwd=ROOT, env=bot_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait for the prompt's instructions: the bot is connected by then
            if "Ctrl+C quits" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130
        assert "Traceback" not in proc.stdout.read()
    finally:
        proc.kill()


# ----- in process: argument conversion and the checks against the display mode -----


def operation(path: str) -> bot.Operation:
    return sim.pick_operation(bot.load_operations(SAMPLE_TOOLS, SAMPLE_ACTIONS), path)  # not the demo skills


def test_typed_values_become_json_types_in_a_body_and_stay_text_in_a_query():
    assert sim.parse_args(operation(ON_CALL), ["运维", "2"]) == {"team": "运维", "weeks": 2}
    assert sim.parse_args(operation(ON_CALL), ["weeks=3", "team=前端"]) == {"weeks": 3, "team": "前端"}
    assert sim.parse_args(operation(RATE), ["EUR", "2.5"]) == {"currency": "EUR", "amount": "2.5"}
    assert sim.parse_args(operation(RATE), ['{"currency": "JPY", "amount": 7}']) == {"currency": "JPY", "amount": 7}
    with pytest.raises(sim.UsageError, match="weeks: 'two' is not an integer"):
        sim.parse_args(operation(ON_CALL), ["运维", "two"])
    with pytest.raises(sim.UsageError, match="amount: 'lots' is not a number"):
        sim.parse_args(operation(RATE), ["USD", "lots"])
    with pytest.raises(sim.UsageError, match=f"too many values: POST {ON_CALL} takes team, weeks"):
        sim.parse_args(operation(ON_CALL), ["运维", "2", "3"])


def test_the_callback_fills_the_context_parameters_and_the_webhook_only_where_declared():
    weather = sim.build_callback(operation(WEATHER), {"location": "杭州"}, "杭州天气", "http://127.0.0.1:1/agent/send")
    body = json.loads(weather["body"])
    assert body["sessionWebhook"] == "http://127.0.0.1:1/agent/send" and body["rawInput"] == "杭州天气"
    assert body["userId"] == "demo-user-0001" and body["location"] == "杭州"
    rate = sim.build_callback(operation(RATE), {"currency": "USD"}, "USD", "http://127.0.0.1:1/agent/send")
    assert rate["requestLine"] == {"method": "GET", "uri": f"{RATE}?currency=USD"}


def result(status: int, body: object) -> GraphResult:
    return GraphResult(ack={}, status=status, headers={}, body=body, elapsed=0.001)


def post(payload: object) -> WebhookPost:
    return WebhookPost(session="aswh_sim_test", host="127.0.0.1", payload=payload, received_at=0.0)


def test_a_webhook_post_from_an_auto_or_markdown_operation_is_a_failure(capsys: pytest.CaptureFixture[str]):
    template = dingtalk_stream.GraphHandler.MARKDOWN_TEMPLATE_ID
    markdown_card = post({"contentType": "ai_card", "content": {"templateId": template, "cardData": {"content": "hi"}}})
    auto = sim.Simulator(operation(RATE), verbose=False, timeout=1.0)
    problems = auto.show_result(result(200, {"cny": 1}), [markdown_card])
    assert problems == [
        "x-dingtalk-display-result is auto, but the bot also posted 1 message(s) to the sessionWebhook: "
        "the user would see the answer twice"
    ]
    assert "no sessionWebhook call" not in capsys.readouterr().out
    markdown = sim.Simulator(operation(ON_CALL), verbose=False, timeout=1.0)
    assert len(markdown.show_result(result(200, {"content": "x"}), [markdown_card])) == 1
    assert markdown.show_result(result(200, {"success": True}), []) == [
        'x-dingtalk-display-result is markdown, but the body is not {"content": "<markdown>"}'
    ]


def test_no_webhook_post_from_a_disabled_operation_is_a_failure():
    disabled = sim.Simulator(operation(WEATHER), verbose=False, timeout=1.0)
    assert disabled.show_result(result(200, {"success": True}), []) == [
        "x-dingtalk-display-result is disabled, but the bot posted nothing to the sessionWebhook"
    ]
    assert disabled.show_result(result(400, {"success": False}), []) == []  # an error posts nothing, rightly


def test_a_custom_ai_card_is_shown_with_its_template_id_and_card_data(capsys: pytest.CaptureFixture[str]):
    card = post({"contentType": "ai_card", "content": {"templateId": "tpl-123.schema", "cardData": {"城市": "杭州"}}})
    disabled = sim.Simulator(operation(WEATHER), verbose=False, timeout=1.0)
    assert disabled.show_result(result(200, {"success": True}), [card]) == []
    out = capsys.readouterr().out
    assert "── reply in the chat (AI card tpl-123.schema via sessionWebhook) ──" in out
    assert json.loads(out.split("──\n", 1)[1]) == {"城市": "杭州"}


# ----- --context, --list's rules, --repeat: on a skill of one's own module -----

LEAVE_SKILLS = """
async def get_leave(userId: str, code: str = "AL") -> dict:
    return {"user": userId, "code": code, "days": 5}


async def get_holidays(year: int = 2026) -> dict:
    return {"year": year}


ACTIONS = {"/v1/leave": get_leave, "/v1/holidays": get_holidays}
"""

LEAVE_TOOLS = """openapi: 3.0.1
info: {title: Leave, version: 1.0.0}
x-dingtalk-protocol: stream
paths:
  /v1/leave:
    get:
      x-dingtalk-display-result: auto
      parameters:
        - {name: code, in: query, schema: {type: string, pattern: "^[A-Z]{2}$", minLength: 2, maxLength: 2}}
        - {name: userId, in: query, schema: {type: string}, x-dingtalk-context: {property: currentUser, format: userId}}
      responses: {'200': {description: OK}}
  /v1/holidays:
    get:
      x-dingtalk-display-result: auto
      parameters:
        - {name: year, in: query, schema: {type: integer, minimum: 2000, maximum: 2100}}
        - {name: corpId, in: query, schema: {type: string}, x-dingtalk-context: {property: currentOrg, format: corpId}}
      responses: {'200': {description: OK}}
"""


def simulate_own(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "leave_skills.py").write_text(LEAVE_SKILLS, encoding="utf-8")
    (tmp_path / "leave_tools.yaml").write_text(LEAVE_TOOLS, encoding="utf-8")
    own = ["--tools", "leave_tools.yaml", "--actions", "leave_skills"]
    return subprocess.run(
        [sys.executable, "-m", "tests.simulate", *own, *args],
        cwd=tmp_path, env=bot_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_context_sets_a_value_dingtalk_fills_in_and_the_action_sees_it(tmp_path):
    result = simulate_own(tmp_path, "--path", "/v1/leave", "--context", "userId=manager-01", "SL")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "+ filled in by DingTalk: userId=manager-01" in result.stdout
    assert '"user": "manager-01"' in result.stdout and '"code": "SL"' in result.stdout


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--context", "userid=x"], "--context userid: GET /v1/leave declares no x-dingtalk-context parameter userid"),
        (["--path", "/v1/holidays", "--context", "corpId=c1"], "get_holidays() does not take corpId"),
        (["userId=x"], "userId is filled in by DingTalk (x-dingtalk-context): set it with --context userId=x"),
    ],
    ids=["not-declared", "not-taken", "given-as-a-value"],
)
def test_a_context_value_the_action_would_never_see_is_an_error_naming_it(tmp_path, args, problem):
    result = simulate_own(tmp_path, *(["--path", "/v1/leave"] if "--path" not in args else []), *args)
    assert result.returncode == 2 and problem in result.stderr, result.stdout + result.stderr
    assert "bot.py connected" not in result.stdout


def test_list_shows_every_rule_a_parameter_carries(tmp_path):
    result = simulate_own(tmp_path, "--list")
    assert result.returncode == 0, result.stderr
    assert re.search(r"code +string, optional, length 2, pattern \^\[A-Z\]\{2\}\$\n", result.stdout)
    assert re.search(r"year +integer, optional, 2000–2100", result.stdout)


def test_repeat_sends_calls_side_by_side_and_prints_statuses_and_latencies(tmp_path):
    result = simulate_own(tmp_path, "--path", "/v1/holidays", "--repeat", "20", "--concurrency", "5", "2030")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "▶ 20 × GET /v1/holidays, 5 at a time" in result.stdout
    assert "statuses: 200 × 20" in result.stdout
    assert re.search(r"latency ms: p50 \d+, p90 \d+, p99 \d+, max \d+", result.stdout)
    refused = simulate_own(tmp_path, "--path", "/v1/holidays", "--repeat", "4", "--concurrency", "2", "1999")
    assert refused.returncode == 1 and "statuses: 400 × 4" in refused.stdout


SHARED_CLIENT_SKILLS = """
import contextlib

SHARED = {}


@contextlib.asynccontextmanager
async def lifespan():
    SHARED["balances"] = {"manager-01": 5}  # stands for a client made once: an HTTP session, a database pool
    yield
    SHARED.clear()


async def get_leave(userId: str, code: str = "AL") -> dict:
    return {"user": userId, "code": code, "days": SHARED["balances"][userId]}


async def get_holidays(year: int = 2026) -> dict:
    return {"year": year}


ACTIONS = {"/v1/leave": get_leave, "/v1/holidays": get_holidays}
"""


def test_the_lifespan_of_the_actions_module_is_entered_as_python_bot_py_enters_its_own(tmp_path):
    args = ("--path", "/v1/leave", "--context", "userId=manager-01", "SL")
    result = run_own(tmp_path, *args, skills=SHARED_CLIENT_SKILLS, tools=LEAVE_TOOLS)  # via tests/serve_skills.py
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"days": 5' in result.stdout and "KeyError" not in result.stdout


def test_a_context_value_in_a_json_object_or_concurrency_without_repeat_is_refused(tmp_path):
    as_json = simulate_own(tmp_path, "--path", "/v1/leave", '{"code": "SL", "userId": "bob"}')
    assert as_json.returncode == 2 and "userId is filled in by DingTalk (x-dingtalk-context)" in as_json.stderr
    alone = simulate_own(tmp_path, "--path", "/v1/holidays", "--concurrency", "5", "2030")
    assert alone.returncode == 2 and "--concurrency goes with --repeat N" in alone.stderr


# ----- time limits, and FORWARD_URL: the operations without an action, served by an HTTP service of one's own -----

FORWARDED_SKILLS = """
async def get_leave(userId: str, code: str = "AL") -> dict:
    return {"user": userId, "code": code, "days": 5}


ACTIONS = {"/v1/leave": get_leave}
"""

FORWARDED_TOOLS = (
    LEAVE_TOOLS.split("  /v1/holidays:")[0]
    + """  /v1/tickets/{ticket}:
    get:
      x-dingtalk-display-result: auto
      x-action-timeout-seconds: 12
      parameters:
        - {name: ticket, in: path, required: true, schema: {type: string, pattern: "^[A-Z]+-[0-9]+$", example: OPS-1}}
      responses: {'200': {description: OK}}
  /v1/notes:
    post:
      x-dingtalk-display-result: markdown
      requestBody:
        content:
          application/json:
            schema:
              type: object
              required: [team]
              properties:
                team: {type: string}
                userId: {type: string, x-dingtalk-context: {property: currentUser, format: userId}}
      responses: {'200': {description: OK}}
"""
)


def own_command(tmp_path, skills: str, tools: str) -> list[str]:
    (tmp_path / "own_skills.py").write_text(skills, encoding="utf-8")
    (tmp_path / "own_tools.yaml").write_text(tools, encoding="utf-8")
    return [sys.executable, "-m", "tests.simulate", "--tools", "own_tools.yaml", "--actions", "own_skills"]


def own_env(**settings: str) -> dict[str, str]:
    """FORWARD_URL and ACTION_TIMEOUT_SECONDS set outright (empty: unset), so that a developer's .env beside bot.py
    cannot change them."""
    return bot_env(PYTHONPATH=str(ROOT), **({"FORWARD_URL": "", "ACTION_TIMEOUT_SECONDS": ""} | settings))


def run_own(
    tmp_path, *args: str, skills: str = FORWARDED_SKILLS, tools: str = FORWARDED_TOOLS, **settings: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*own_command(tmp_path, skills, tools), *args],
        cwd=tmp_path, env=own_env(**settings), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def blocks_of(out: str) -> dict[str, str]:
    return {block.split("\n", 1)[0]: block for block in out.split("\n\n")}


def test_list_shows_each_operations_time_limit(tmp_path):
    default = run_own(tmp_path, "--list", skills=LEAVE_SKILLS, tools=LEAVE_TOOLS)
    assert default.returncode == 0, default.stderr
    for route in ("GET /v1/leave", "GET /v1/holidays"):
        assert "    time limit: 10 s (ACTION_TIMEOUT_SECONDS)\n" in blocks_of(default.stdout)[route]
    assert "forwarded" not in default.stdout
    own = run_own(tmp_path, "--list", FORWARD_URL="http://127.0.0.1:9", ACTION_TIMEOUT_SECONDS="7.5")
    assert own.returncode == 0, own.stderr
    blocks = blocks_of(own.stdout)
    assert "    time limit: 7.5 s (ACTION_TIMEOUT_SECONDS)\n" in blocks["GET /v1/leave"]
    assert "    time limit: 12 s (x-action-timeout-seconds)\n" in blocks["GET /v1/tickets/{ticket}"]
    assert "    time limit: 7.5 s (ACTION_TIMEOUT_SECONDS)\n" in blocks["POST /v1/notes"]


def test_list_with_forward_url_says_which_operations_are_forwarded_and_where(tmp_path):
    result = run_own(tmp_path, "--list", FORWARD_URL="http://127.0.0.1:9/api/")  # nothing needs to listen for --list
    assert result.returncode == 0, result.stderr
    assert "own_tools.yaml declares 3 operation(s); 2 forwarded to http://127.0.0.1:9/api" in result.stdout
    blocks = blocks_of(result.stdout)
    assert "    forwarded to http://127.0.0.1:9/api/v1/tickets/{ticket}\n" in blocks["GET /v1/tickets/{ticket}"]
    assert "    parameters (path):\n      ticket" in blocks["GET /v1/tickets/{ticket}"]  # not in the query string
    assert "query string" not in blocks["GET /v1/tickets/{ticket}"]
    assert "    forwarded to http://127.0.0.1:9/api/v1/notes\n" in blocks["POST /v1/notes"]
    assert "forwarded" not in blocks["GET /v1/leave"]  # it has an action
    unset = run_own(tmp_path, "--list")
    assert unset.returncode == 2 and unset.stdout == ""
    assert "declares /v1/notes, but ACTIONS in bot.py has no action for it" in unset.stderr


def test_a_forward_url_bot_py_would_refuse_stops_the_simulator_with_one_line(tmp_path):
    result = run_own(tmp_path, "--list", FORWARD_URL="ftp://127.0.0.1:9")
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "FORWARD_URL" in line


async def test_a_forwarded_operation_is_simulated_against_the_service_the_bot_it_starts_forwards_to(tmp_path):
    service = await HttpService().start()
    service.answer("/v1/tickets/OPS-1", lambda request: web.json_response({"ticket": "OPS-1", "status": "open"}))
    service.answer("/v1/notes", lambda request: web.Response(text="**运维** 值班", content_type="text/markdown"))
    command, env = own_command(tmp_path, FORWARDED_SKILLS, FORWARDED_TOOLS), own_env(FORWARD_URL=service.url)

    async def simulate_async(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *command, *args, cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output = (await asyncio.wait_for(process.communicate(), 120))[0].decode()
        return process.returncode, output

    try:
        ticket = await simulate_async("--path", "/v1/tickets/{ticket}", "OPS-1")
        refused = await simulate_async("--path", "/v1/tickets/{ticket}", "ops-1")
        notes = await simulate_async("--path", "/v1/notes", "运维")
    finally:
        await service.close()
    code, out = ticket
    assert code == 0, out
    assert "▶ GET /v1/tickets/OPS-1  query (none)\n" in out  # the path as sent, the value in it
    assert f"→ forwarded by the bot to {service.url}/v1/tickets/OPS-1 (no action in ACTIONS)" in out
    assert json.loads(
        section(out, "── data for the assistant's model (x-dingtalk-display-result: auto) ──").rsplit("\n", 1)[0]
    ) == {"ticket": "OPS-1", "status": "open"}
    code, out = refused
    assert code == 1 and "parameter ticket must match pattern ^[A-Z]+-[0-9]+$" in out, out
    code, out = notes
    assert code == 0 and "运维 值班" in section(out, "── result card (markdown shown as is) ──"), out
    first, second = service.requests  # the refused call never reached it
    assert (first.method, first.target) == ("GET", "/v1/tickets/OPS-1")
    assert (second.method, second.target) == ("POST", "/v1/notes")
    assert json.loads(second.body) == {"team": "运维", "userId": "demo-user-0001"}
    assert first.headers["X-DingTalk-Message-Id"] and second.headers["X-DingTalk-Message-Id"]


def test_a_path_parameter_goes_in_the_path_of_the_callback():
    operations = bot.load_operations(yaml.safe_load(FORWARDED_TOOLS), {}, forwarding=True)
    ticket = sim.build_callback(operations["GET /v1/tickets/{ticket}"], {"ticket": "OPS 1/2"}, "", "http://x/send")
    assert ticket["requestLine"] == {"method": "GET", "uri": "/v1/tickets/OPS%201%2F2"}


ITEM_SKILLS = """
async def get_item(id: str, q: str = "") -> dict:
    return {"id": id, "q": q}


ACTIONS = {"/v1/items/{id}": get_item}
"""
ITEM_TOOLS = """openapi: 3.0.1
info: {title: Items, version: 1.0.0}
x-dingtalk-protocol: stream
paths:
  /v1/items/{id}:
    get:
      x-dingtalk-display-result: auto
      parameters:
        - {name: id, in: path, required: true, schema: {type: string}}
        - {name: q, in: query, schema: {type: string, maxLength: 5}}
      responses: {'200': {description: OK}}
"""


def test_path_parameters_are_listed_and_shown_in_the_path_as_sent_not_the_query(tmp_path):
    listed = run_own(tmp_path, "--list", skills=ITEM_SKILLS, tools=ITEM_TOOLS)
    assert listed.returncode == 0, listed.stderr
    block = blocks_of(listed.stdout)["GET /v1/items/{id}"]
    assert re.search(r"    parameters \(path\):\n      id +string, required\n", block), block
    assert re.search(r"    parameters \(query string\):\n      q +string, optional, length 0–5$", block), block
    called = run_own(tmp_path, "--path", "/v1/items/{id}", "A 1", "q=x", skills=ITEM_SKILLS, tools=ITEM_TOOLS)
    assert called.returncode == 0, called.stdout + called.stderr
    assert "▶ GET /v1/items/A%201  query q=x\n" in called.stdout
    assert '"id": "A 1"' in called.stdout
