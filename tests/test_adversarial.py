"""What an outside adversarial review of engine 1.0.1 found (fixed in 1.0.2), each held by a test that fails without
its fix. The bot is reached as users reach it: `python bot.py`, `running()` or the in-process bot, and the fake."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import signal
import threading
import time
from pathlib import Path
from urllib.parse import quote

import bot
from tests.conftest import settings_for
from tests.fake_dingtalk import GRAPH_TOPIC, GraphResult, bot_env, graph_request
from tests.samples import ON_CALL, RATE, SAMPLE_ACTIONS, SAMPLE_TOOLS, WEATHER

PARAMS = {"location": "杭州", "date": "明天"}


def weather(fake) -> dict:
    return graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())


# ----- signals: nohup -----


async def test_a_sighup_ignored_at_start_stays_ignored_as_nohup_asks(fake, remote, bot_process):
    process = await bot_process(bot_env(fake), prelude="import signal\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)")
    await remote(fake.wait_connected(1, timeout=30))
    process.proc.send_signal(signal.SIGHUP)  # the terminal closes
    answered = await remote(fake.invoke(graph_request(RATE, {"currency": "USD"}, method="GET"), timeout=30))
    assert answered.status == 200  # served after the hangup, on the same connection
    assert len(fake.connections) == 1 and "SIGHUP" not in process.output
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait(30) == 0 and "SIGTERM received" in process.output


# ----- every callback read gets one ack, even as the bot stops -----


async def test_callbacks_read_just_as_the_grace_period_ends_each_get_one_ack(fake, remote):
    """Frames that arrive while an action holds the loop across the end of the grace period are read in the same
    step that the grace period ends in: their tasks exist but have not begun when stop() gives up on what is in hand."""
    fake.webhook_latency = 5.0  # a reply still in flight when the grace period ends
    began, holding = asyncio.Event(), threading.Event()

    async def holds_the_loop(currency: str) -> dict:
        began.set()
        await asyncio.sleep(0.2)
        holding.set()
        time.sleep(1.0)  # noqa: ASYNC251 (on purpose: the loop is held across the end of the grace period)
        return {"currency": currency}

    async def burst_while_held() -> list[str]:
        await asyncio.get_running_loop().run_in_executor(None, holding.wait, 30)
        await asyncio.sleep(0.1)
        on_call = graph_request(ON_CALL, {"team": "运维"})
        return [await fake.send_frame("CALLBACK", GRAPH_TOPIC, on_call) for _ in range(10)]

    actions = SAMPLE_ACTIONS | {RATE: holds_the_loop}
    async with bot.running(actions, SAMPLE_TOOLS, settings=settings_for(fake, shutdown_grace_seconds=0.5)):
        await remote(fake.wait_connected(1, timeout=30))
        await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), message_id="msg-in-flight"))
        await remote(fake.wait_for(lambda: fake.webhook_posts, 30))
        await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, graph_request(RATE, {"currency": "USD"}, method="GET")))
        burst = asyncio.run_coroutine_threadsafe(burst_while_held(), remote.loop)
        await asyncio.wait_for(began.wait(), 30)
    burst_ids = await asyncio.wait_for(asyncio.wrap_future(burst), 30)
    assert [len(fake.acks.get(message_id, [])) for message_id in burst_ids] == [1] * 10  # exactly one each
    statuses = {GraphResult.from_ack(fake.acks[message_id][0], 0).status for message_id in burst_ids}
    assert statuses <= {200, 503}  # 503 (the bot is stopping) unless a busy machine read them in time to serve
    assert GraphResult.from_ack(fake.acks["msg-in-flight"][0], 0).status == 503 and len(fake.acks["msg-in-flight"]) == 1


# ----- answers: what is acked is what is logged and remembered -----


async def test_an_answer_too_large_to_ack_is_remembered_as_the_500_it_was_and_the_rest_is_kept(
    fake, remote, start_bot, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="bot")
    calls = []

    async def rate_too_big(currency: str) -> dict:
        calls.append(currency)
        return {"rows": "x" * (33 << 20)}  # over the ledger's 32 MiB of answers, let alone an ack's 256 KiB

    monkeypatch.setitem(bot.ACTIONS, RATE, rate_too_big)
    async with start_bot():
        card = await remote(fake.invoke(weather(fake), message_id="msg-card"))
        big_call = graph_request(RATE, {"currency": "USD"}, method="GET")
        big = await remote(fake.invoke(big_call, message_id="msg-big", timeout=60))
        card_again = await remote(fake.invoke(weather(fake), message_id="msg-card"))  # redelivered
        big_again = await remote(fake.invoke(big_call, message_id="msg-big", timeout=60))  # redelivered
    assert (card.status, card_again.status, len(fake.webhook_posts)) == (200, 200, 1)  # no second card
    assert (big.status, big.body["error"]) == (500, "internal error in action: answer too large")
    assert (big_again.status, big_again.body, calls) == (500, big.body, ["USD"])  # the 500, remembered
    assert f"callback msg-big GET {RATE} -> 500" in caplog.text  # the status the assistant got


async def test_a_lone_surrogate_in_an_answer_is_answered_200(fake, remote, start_bot, caplog):
    caplog.set_level(logging.INFO, logger="bot")
    call = json.dumps(graph_request(ON_CALL, {"team": "运维\ud83d"}))  # half an emoji, as JSON may carry it
    async with start_bot():
        result = await remote(fake.invoke(call, message_id="msg-half"))
    assert result.status == 200 and result.body["content"].startswith("**运维\ud83d**")
    assert f"callback msg-half POST {ON_CALL} -> 200" in caplog.text
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text


ROSTER_REFUSES = """
from tests.samples import ON_CALL

async def get_on_call(team: str, weeks: int = 1) -> str:
    error = ValueError(f"no roster for team {team}")  # a traceback with the caller's words in it ...
    for depth in range(12):  # ... deep in a chain of causes ...
        error, error.__cause__ = ValueError(f"level {depth}"), error
    error.add_note(f"while reading the roster of {team}")  # ... and in a note
    raise error

bot.ACTIONS[ON_CALL] = get_on_call
"""


async def test_a_value_cannot_forge_a_log_line_through_a_path_or_a_traceback(fake, remote, bot_process):
    process = await bot_process(bot_env(fake), prelude=ROSTER_REFUSES)
    await remote(fake.wait_connected(1, timeout=30))
    forged = "2026-12-06 17:00:00 ERROR   bot: DingTalk rejected CLIENT_ID / CLIENT_SECRET"
    result = await remote(fake.invoke(graph_request(f"/v1/items/1%0A{quote(forged)}", {}), message_id="msg-forge"))
    assert result.status == 404
    failed = await remote(fake.invoke(graph_request(ON_CALL, {"team": f"ops\n{forged}"}), message_id="msg-trace"))
    assert failed.status == 500
    await process.wait_for_output("callback msg-trace POST", 30)
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait(30) == 0
    assert not [line for line in process.lines if line.startswith(forged[:20])]
    said = [line for line in process.lines if "msg-forge" in line]
    assert len(said) == 2 and all(f"/v1/items/1\\n{forged}" in line for line in said), said  # 404, then the line
    assert f"ValueError: no roster for team ops\\n{forged}" in process.output  # escaped, where it is
    assert f"while reading the roster of ops\\n{forged}" in process.output


# ----- plain defs: runaway CPU-bound calls neither stall nor get blamed on others -----

TOOLS = """
openapi: 3.0.1
info: {title: plain defs, version: "1"}
paths:
  /v1/burn:
    get: {x-dingtalk-display-result: auto}
  /v1/quick:
    get: {x-dingtalk-display-result: auto}
  /v1/reports/{id}:
    get:
      x-dingtalk-display-result: auto
      parameters: [{name: id, in: path, required: true, schema: {type: string}}]
"""


async def test_runaway_cpu_bound_calls_neither_stall_nor_are_blamed_on_other_plain_defs(
    fake, remote, tmp_path: Path, caplog
):
    """Whether a thread burns CPU is measured (its CPU time against the clock): on a machine busy enough to starve
    this process, the burners may not look CPU-bound, and then the innocent call simply runs. Either way it is never
    queued behind them until its time limit, nor blamed for their time."""
    caplog.set_level(logging.INFO, logger="bot")
    release, ran = threading.Event(), []

    def burn() -> dict:
        while not release.is_set():  # CPU-bound, past any time limit, until the test ends
            pass
        return {}

    def quick() -> dict:
        ran.append(1)
        time.sleep(0.05)  # I/O: it would hold no CPU
        return {"ok": True}

    def get_report(id: str) -> dict:
        end = time.thread_time() + 0.1
        while time.thread_time() < end:
            pass
        return {"id": id}

    actions = {"/v1/burn": burn, "/v1/quick": quick, "/v1/reports/{id}": get_report}
    (tools := tmp_path / "tools.yaml").write_text(TOOLS, encoding="utf-8")

    def call(path: str) -> dict:
        return graph_request(path, {}, method="GET")

    def ran_or_refused(result: GraphResult, reason: str) -> bool:
        return (result.status, result.body.get("error")) == (503, reason) if result.status == 503 else bool(ran)

    settings = settings_for(fake, action_timeout_seconds=1.0)
    try:
        async with bot.running(actions, tools, settings=settings):
            # Two CPU-bound calls take both CPU places; one that comes next waits, and never gets a thread.
            *burns, waited = await remote(fake.invoke_many([call("/v1/burn")] * 2 + [call("/v1/quick")], timeout=30))
            assert [burn.status for burn in burns] == [504, 504]  # they ran: their own time limit
            assert ran_or_refused(waited, "busy: no thread for the action within its time limit"), waited
            # Now both run past their time limit: a call is refused at once, saying why, not queued behind them.
            refused = await remote(fake.invoke(call("/v1/quick"), timeout=30))
            assert ran_or_refused(refused, "busy: CPU-bound actions past their time limit are still running"), refused
            release.set()
            deadline = time.monotonic() + 30
            while (await remote(fake.invoke(call("/v1/quick"), timeout=30))).status != 200:  # the burners return
                assert time.monotonic() < deadline, "plain defs were not served again once the burners returned"
            reports = [call(f"/v1/reports/{n}") for n in range(6)]  # a CPU-bound action, six path values
            await remote(fake.invoke_many(reports, timeout=30))
    finally:
        release.set()
    if waited.status == 503:
        text = "action quick (GET /v1/quick) did not start within 1 s: CPU-bound calls held the CPU: burn"
        assert text in caplog.text
    if refused.status == 503:
        text = "CPU-bound calls past their time limit hold the CPU: burn (GET /v1/burn), burn (GET /v1/burn)"
        assert text in caplog.text
    assert "action quick (GET /v1/quick) timed out" not in caplog.text or ran  # never blamed for time it did not run
    assert caplog.text.count("action burn (GET /v1/burn) timed out") == 2
    assert caplog.text.count("action burn (GET /v1/burn) is CPU-bound") <= 1  # once per action ...
    assert len(re.findall(r"action get_report \(GET /v1/reports/\d\) is CPU-bound", caplog.text)) <= 1  # any {id}


# ----- a dead network with acks still queued -----

BIG_TOOLS = """
openapi: 3.0.1
info: {title: big answers, version: "1"}
paths:
  /v1/big:
    get: {x-dingtalk-display-result: auto}
"""


async def test_a_dead_connection_with_acks_stuck_in_its_send_buffer_is_replaced_and_the_bot_still_stops(
    fake, remote, tmp_path: Path, caplog
):
    caplog.set_level(logging.INFO, logger="bot")

    async def big() -> dict:
        await asyncio.sleep(0.05)  # in hand as the network goes silent; the acks fill the buffers before the next ping
        return {"rows": secrets.token_urlsafe(180_000)}  # 240 KB that do not compress

    (tools := tmp_path / "tools.yaml").write_text(BIG_TOOLS, encoding="utf-8")
    serving = bot.running({"/v1/big": big}, tools, settings=settings_for(fake, keepalive_seconds=1.0))
    await serving.__aenter__()
    try:
        [conn] = await remote(fake.wait_connected(1, timeout=30))
        for _ in range(60):  # about 14 MB of acks: more than the sockets on both sides hold
            await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, graph_request("/v1/big", {}, method="GET")))
        conn.frozen = True  # no pongs ...
        remote.loop.call_soon_threadsafe(conn.transport.pause_reading)  # ... and nothing read: a network gone silent
        await remote(fake.wait_for(lambda: len(fake.connections) >= 2, 30))  # replaced, not waited on
    finally:
        await asyncio.wait_for(serving.__aexit__(None, None, None), 30)  # and the bot stops
    assert "connection lost: keepalive ping timeout" in caplog.text
