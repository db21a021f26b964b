"""Faults injected through the fake DingTalk: the bot keeps serving, loses nothing, never answers twice."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time

import pytest

import bot
from tests.conftest import healthz, wait_health, wait_until
from tests.fake_dingtalk import GRAPH_TOPIC, bot_env, free_port, graph_request

WEATHER = "/v1/actions/weather"
PARAMS = {"location": "杭州", "date": "明天"}


def weather(fake, session: str | None = None) -> dict:
    return graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url(session))


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry every 0.2 s, for tests about noticing a fault rather than about the backoff itself."""
    monkeypatch.setattr(bot, "reconnect_delay", lambda failures: 0.2)


# ----- 1. wrong credentials at start -----


async def test_wrong_credentials_at_start_exit_2_with_one_clear_line(fake, bot_process):
    env = bot_env(fake, CLIENT_SECRET="Wr0ng-Secret-Value")
    process = await bot_process(env)
    assert await process.wait(10) == 2
    [line] = [line for line in process.lines if "ERROR" in line]
    assert "DingTalk rejected CLIENT_ID / CLIENT_SECRET (authFailed: 鉴权失败)" in line
    assert "凭证与基础信息 / Credentials & basic info" in line
    assert len(fake.open_requests) == 1  # no reconnect loop
    assert "Wr0ng-Secret-Value" not in process.output


async def test_whitespace_around_credentials_is_stripped_with_a_warning(fake, remote, bot_process):
    process = await bot_process(bot_env(fake, CLIENT_SECRET=f"  {fake.client_secret}\n"))
    await remote(fake.wait_connected(1, timeout=10))
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait(10) == 0
    assert "CLIENT_SECRET had surrounding whitespace; using it without" in process.output
    assert fake.client_secret not in process.output


# ----- 2. credentials rejected later; connection-open errors -----


@pytest.mark.parametrize("fault", ["credentials", "http-500"])
async def test_open_rejected_later_backs_off_reports_and_recovers(fake, remote, start_bot, caplog, fault):
    port = free_port()
    async with start_bot(health_port=port):
        secret = fake.client_secret
        if fault == "credentials":
            fake.client_secret = "rotated"
        else:
            fake.open_status = 500
        await remote(fake.disconnect(fake.live_connections()[0]))
        await remote(fake.wait_for(lambda: len(fake.open_requests) >= 3, 15))  # two refused reopen attempts
        assert (await healthz(port))[0] == 503
        refused = fake.open_requests[1:]
        gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(refused)]
        assert all(gap >= 0.9 for gap in gaps), gaps  # backoff, never a tight loop
        fake.client_secret, fake.open_status = secret, None
        await wait_health(port, 200)
        assert (await remote(fake.invoke(weather(fake)))).status == 200
    expected = (
        "DingTalk rejected CLIENT_ID / CLIENT_SECRET (authFailed: 鉴权失败)" if fault == "credentials" else "HTTP 500"
    )
    retry_lines = [r.getMessage() for r in caplog.records if expected in r.getMessage()]
    assert retry_lines and all("reconnecting in" in line for line in retry_lines)


# ----- 3. connection open hangs -----


async def test_hanging_open_keeps_the_bot_responsive_and_is_retried(fake, remote, start_bot, caplog, fast_retry):
    port = free_port()
    async with start_bot(instances=2, health_port=port, connect_timeout_seconds=1.0):
        first, second = fake.live_connections()
        fake.open_delay = 30
        await remote(fake.disconnect(first))
        await remote(fake.wait_for(lambda: fake.open_attempts >= 3, 5))  # the reopen is now hanging
        started = time.monotonic()
        status, body = await healthz(port)
        await remote(fake.ping(second, timeout=2))
        assert time.monotonic() - started < 1.0  # the loop is free while the open hangs
        assert (status, body["connected"]) == (503, 1)
        await wait_until(lambda: "no answer within 1 s" in caplog.text, 5)
        fake.open_delay = 0
        await wait_health(port, 200)


# ----- 4. connection open answers 200 without a usable endpoint -----


async def test_unusable_open_answers_are_retried_until_right(fake, remote, start_bot, caplog):
    fake.open_raw_body = "<html>gateway maintenance</html>"
    async with start_bot(connected=0):
        await remote(fake.wait_for(lambda: len(fake.open_requests) >= 1, 5))
        fake.open_raw_body = '{"ticket": "no-endpoint"}'
        await remote(fake.wait_for(lambda: len(fake.open_requests) >= 2, 5))
        fake.open_raw_body = None
        await remote(fake.wait_connected(1, 10))
        assert (await remote(fake.invoke(weather(fake)))).status == 200
    assert "no endpoint and ticket in '<html>gateway maintenance</html>'" in caplog.text
    assert 'no endpoint and ticket in \'{"ticket": "no-endpoint"}\'' in caplog.text


@pytest.mark.parametrize(
    "answer",
    [
        "<html>网关维护中</html>".encode("gbk"),  # not UTF-8, e.g. a proxy's error page
        b'{"endpoint": "ws://127.0.0.1:99999/connect", "ticket": "t"}',  # a port websockets refuses
    ],
    ids=["gbk-page", "bad-port"],
)
async def test_odd_open_answers_after_connecting_are_retried_not_fatal(fake, remote, start_bot, fast_retry, answer):
    async with start_bot() as running:
        fake.open_raw_body = answer
        await remote(fake.disconnect(fake.live_connections()[0]))
        attempts = fake.open_attempts
        await remote(fake.wait_for(lambda: fake.open_attempts >= attempts + 2, 5))  # still retrying
        assert not running.task.done()
        fake.open_raw_body = None
        await remote(fake.wait_connected(1, 10))
        assert (await remote(fake.invoke(weather(fake)))).status == 200


# ----- 5. disconnect, abrupt drop, silently dead connection -----


@pytest.mark.parametrize("fault", ["disconnect", "drop", "frozen"])
async def test_lost_connection_is_noticed_reflected_and_replaced(fake, remote, start_bot, fault, fast_retry):
    port = free_port()
    async with start_bot(health_port=port, keepalive_seconds=0.3):
        [conn] = fake.live_connections()
        fake.reject_websocket = True  # hold the gap open long enough to see it
        if fault == "disconnect":
            await remote(fake.disconnect(conn))
        elif fault == "drop":
            await remote(fake.drop(conn))
        else:
            conn.frozen = True  # no pongs, no acks: the bot must notice by itself
        body = await wait_health(port, 503, timeout=5)
        assert body == {"status": "degraded", "instances": 1, "connected": 0}
        fake.reject_websocket = False
        await wait_health(port, 200)
        assert (await remote(fake.invoke(weather(fake)))).status == 200


# ----- odd frames: every one is answered or skipped, none stops the bot -----


async def test_odd_frames_are_answered_and_the_bot_keeps_serving(fake, remote, start_bot, caplog):
    deep = "[" * 100_000 + "]" * 100_000  # parses only with more recursion than Python allows
    async with start_bot():
        [conn] = fake.live_connections()
        await remote(conn.ws.send_str(deep))  # a whole frame of it
        nested_data = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, deep))
        bad_system = await remote(fake.send_frame("SYSTEM", "ping", {"opaque": "x"}, headers={"time": "x"}))
        await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), headers={"messageId": ["x"]}))
        odd_id = json.dumps(["x"])  # how the fake files an ack whose messageId is not a string
        assert (await remote(fake.wait_ack(nested_data)))["code"] == 400
        assert (await remote(fake.wait_ack(bad_system)))["code"] == 400
        assert (await remote(fake.wait_ack(odd_id)))["code"] == 200
        assert (await remote(fake.invoke(weather(fake)))).status == 200
    assert "skipped a frame that is not a JSON object" in caplog.text
    assert "never retrieved" not in caplog.text


async def test_stray_cancellation_inside_an_action_is_a_500(fake, remote, start_bot, monkeypatch):
    async def cancelled_dependency(location: str) -> str:
        other = asyncio.ensure_future(asyncio.sleep(10))
        other.cancel()
        return await other  # raises CancelledError although our task is not being cancelled

    monkeypatch.setitem(bot.ACTIONS, "/v1/actions/cancelled", cancelled_dependency)
    async with start_bot():
        request = graph_request("/v1/actions/cancelled", PARAMS, session_webhook=fake.webhook_url())
        result = await remote(fake.invoke(request))
        assert (await remote(fake.invoke(weather(fake)))).status == 200
    assert result.status == 500 and result.body["error"] == "internal error in action"


# ----- 6. redelivery of the same messageId -----


@pytest.mark.parametrize("when", ["in-flight", "after-ack"])
async def test_redelivered_callback_gets_exactly_one_reply(fake, remote, start_bot, when):
    fake.webhook_latency = 0.3
    async with start_bot(instances=2):
        first, second = fake.live_connections()
        request = weather(fake)
        await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, request, message_id="dup-1", conn=first))
        if when == "in-flight":
            await remote(fake.wait_for(lambda: fake.webhook_posts, 5))
        else:
            await remote(fake.wait_ack("dup-1"))
        # DingTalk may redeliver on another of the app's connections
        await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, request, message_id="dup-1", conn=second))
        acks = [await remote(fake.wait_ack("dup-1", count=n)) for n in (1, 2)]
    assert len(fake.webhook_posts) == 1
    assert [json.loads(json.loads(a["data"])["response"]["body"]) for a in acks] == [{"success": True}] * 2


def test_ledger_memory_is_bounded():
    async def scenario() -> bot.CallbackLedger:
        ledger = bot.CallbackLedger(capacity=3)
        for n in range(5):
            assert ledger.claim(f"m{n}")[0]
        assert not ledger.claim("m4")[0]
        return ledger

    ledger = asyncio.run(scenario())
    assert list(ledger.results) == ["m2", "m3", "m4"]


# ----- 7. webhook faults -----


@pytest.mark.parametrize("fault", ["hang", "cut-off"])
async def test_webhook_fault_is_502_while_others_are_served(fake, remote, start_bot, caplog, fault):
    async with start_bot(webhook_timeout_seconds=1.0):
        if fault == "hang":
            fake.slow_sessions["aswh_stuck"] = 60
        else:
            fake.webhook_cut_off = True
        stuck = asyncio.ensure_future(remote(fake.invoke(weather(fake, "aswh_stuck"))))
        await remote(fake.wait_for(lambda: fake.webhook_posts, 5))
        if fault == "hang":
            fine = await remote(fake.invoke(weather(fake)))  # served while the other one hangs
            assert fine.status == 200 and not stuck.done()
        result = await stuck
    assert result.status == 502
    assert "webhook http://127.0.0.1" in caplog.text and "session=***" in caplog.text
    assert "aswh_stuck" not in caplog.text


# ----- 8. an action raises or hangs -----


@pytest.mark.parametrize(("behaviour", "status"), [("raises", 500), ("hangs", 504)])
async def test_failing_action_affects_only_its_own_call(fake, remote, start_bot, monkeypatch, behaviour, status):
    async def flaky(location: str) -> str:
        if behaviour == "raises":
            raise RuntimeError("boom")
        await asyncio.Event().wait()
        return ""

    monkeypatch.setitem(bot.ACTIONS, "/v1/actions/flaky", flaky)
    async with start_bot(action_timeout_seconds=1.0):
        bad = graph_request("/v1/actions/flaky", PARAMS, session_webhook=fake.webhook_url())
        results = await remote(fake.invoke_many([bad, weather(fake), weather(fake)]))
    assert [r.status for r in results] == [status, 200, 200]
    assert max(r.elapsed for r in results[1:]) < results[0].elapsed or behaviour == "raises"
    assert len(fake.webhook_posts) == 2


# ----- 9. SIGTERM during a burst -----


@pytest.mark.parametrize("grace", ["within", "past"])
async def test_sigterm_during_a_burst_of_20(fake, remote, bot_process, grace):
    fake.webhook_latency = 1.0 if grace == "within" else 5.0
    process = await bot_process(bot_env(fake, SHUTDOWN_GRACE_SECONDS="10" if grace == "within" else "0.5"))
    await remote(fake.wait_connected(1, timeout=10))
    ids = [await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake))) for _ in range(20)]
    await remote(fake.wait_for(lambda: len(fake.webhook_posts) == 20, 5))  # all 20 in flight
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait(15) == 0
    if grace == "within":
        assert all(len(fake.acks.get(i, [])) == 1 for i in ids)
        assert "abandoned" not in process.output
    else:
        for message_id in ids:
            assert f"callback {message_id} abandoned" in process.output


def test_cancelled_first_delivery_lets_a_redelivery_start_afresh():
    async def scenario() -> None:
        ledger = bot.CallbackLedger()
        first, result = ledger.claim("m1")
        assert first
        ledger.forget("m1")  # what the handler does when the first delivery is cancelled
        assert result.cancelled()  # anyone waiting on it stops waiting
        assert ledger.claim("m1")[0]

    asyncio.run(scenario())
