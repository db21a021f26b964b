"""Faults injected through the fake DingTalk: the bot keeps serving, loses nothing, never answers twice."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import signal
import time
from typing import Any

import dingtalk_stream
import pytest

import bot
from tests.conftest import healthz, settings_for, wait_health, wait_until
from tests.fake_dingtalk import GRAPH_TOPIC, ForwardProxy, GraphResult, bot_env, free_port, graph_request

WEATHER = "/v1/actions/weather"
PARAMS = {"location": "杭州", "date": "明天"}


def weather(fake, session: str | None = None) -> dict:
    return graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url(session))


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry every 0.2 s, for tests about noticing a fault rather than about the backoff itself."""
    monkeypatch.setattr(bot, "_reconnect_delay", lambda failures, longest=60.0: 0.2)


# ----- 1. wrong credentials at start -----


async def test_wrong_credentials_at_start_exit_2_with_one_clear_line(fake, bot_process):
    env = bot_env(fake, CLIENT_SECRET="Wr0ng-Secret-Value")
    process = await bot_process(env)
    assert await process.wait() == 2
    [line] = [line for line in process.lines if "ERROR" in line]
    assert "DingTalk rejected CLIENT_ID / CLIENT_SECRET (authFailed: 鉴权失败)" in line
    assert "凭证与基础信息 / Credentials & basic info" in line
    assert len(fake.open_requests) == 1  # no reconnect loop
    assert "Wr0ng-Secret-Value" not in process.output


async def test_whitespace_around_credentials_is_stripped(fake, remote, bot_process):
    process = await bot_process(bot_env(fake, CLIENT_SECRET=f"  {fake.client_secret}\n"))
    await remote(fake.wait_connected(1))
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
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
        await remote(fake.wait_for(lambda: len(fake.open_requests) >= 3))  # two refused reopen attempts
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
        fake.open_delay = 600  # far longer than the bound below
        await remote(fake.disconnect(first))
        await remote(fake.wait_for(lambda: fake.open_attempts >= 3))  # the reopen is now hanging
        started = time.monotonic()
        status, body = await healthz(port)
        await remote(fake.ping(second))
        # the loop is free while the open hangs: a generous bound, where an open that held the loop (the SDK's
        # blocking one, without a time limit) would hold it for the open's 600 s
        assert time.monotonic() - started < 30
        assert (status, body["connected"]) == (503, 1)
        await wait_until(lambda: "no answer within 1 s" in caplog.text)
        fake.open_delay = 0
        await wait_health(port, 200)


# ----- 4. connection open answers 200 without a usable endpoint -----


async def test_unusable_open_answers_are_retried_until_right(fake, remote, start_bot, caplog):
    fake.open_raw_body = "<html>gateway maintenance</html>"
    async with start_bot(connected=0):
        await remote(fake.wait_for(lambda: len(fake.open_requests) >= 1))
        fake.open_raw_body = '{"ticket": "no-endpoint"}'
        await remote(fake.wait_for(lambda: len(fake.open_requests) >= 2))
        fake.open_raw_body = None
        await remote(fake.wait_connected(1))
        assert (await remote(fake.invoke(weather(fake)))).status == 200
    assert "no endpoint and ticket in '<html>gateway maintenance</html>'" in caplog.text
    hint = "(never connected yet: check the network, or HTTPS_PROXY behind a proxy; see docs/troubleshooting.md#"
    hint += "never-connected)"
    assert hint in caplog.text
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
        await remote(fake.wait_for(lambda: fake.open_attempts >= attempts + 2))  # still retrying
        assert not running.task.done()
        fake.open_raw_body = None
        await remote(fake.wait_connected(1))
        assert (await remote(fake.invoke(weather(fake)))).status == 200


# ----- 5. disconnect, abrupt drop, silently dead connection -----


@pytest.mark.parametrize("fault", ["disconnect", "drop", "frozen"])
async def test_lost_connection_is_noticed_reflected_and_replaced(fake, remote, start_bot, fault, fast_retry):
    port = free_port()
    async with start_bot(health_port=port, keepalive_seconds=1.0):  # a frozen connection is noticed within 3 s
        [conn] = fake.live_connections()
        fake.reject_websocket = True  # hold the gap open long enough to see it
        if fault == "disconnect":
            await remote(fake.disconnect(conn))
        elif fault == "drop":
            await remote(fake.drop(conn))
        else:
            conn.frozen = True  # no pongs, no acks: the bot must notice by itself
        body = await wait_health(port, 503)
        assert body == {"status": "degraded", "instances": 1, "connected": 0}
        fake.reject_websocket = False
        await wait_health(port, 200)
        assert (await remote(fake.invoke(weather(fake)))).status == 200


async def test_silently_dead_connection_is_replaced_within_20_s_on_default_settings(fake, remote, start_bot, caplog):
    caplog.set_level(logging.INFO, logger="bot")
    async with start_bot():  # KEEPALIVE_SECONDS and the backoff as shipped
        [conn] = fake.live_connections()
        conn.frozen = True  # a NAT or a laptop lid: no pongs, no acks, no close
        frozen_at = time.monotonic()
        replacement = await remote(fake.wait_for(lambda: fake.connections[1:] and fake.connections[1], 20))
        replaced_in = time.monotonic() - frozen_at
        assert (await remote(fake.invoke(weather(fake), conn=replacement))).status == 200
    assert "keepalive ping timeout" in caplog.text
    print(f"dead connection replaced in {replaced_in:.1f} s")  # shown with -s; the bound is the 20 s wait above


async def test_late_jittery_pongs_keep_a_healthy_connection(fake, remote, start_bot):
    # On a clock 5 times faster than the shipped one (KEEPALIVE_SECONDS=5 -> 1): pongs 4 to 8 s late. (Not faster:
    # the margin to the 2 s ping timeout, 0.4 s at the least, must hold on a busy machine too.)
    fake.pong_delay, fake.pong_jitter = 1.2, 0.4
    async with start_bot(keepalive_seconds=1.0):
        [conn] = fake.live_connections()
        await remote(fake.wait_for(lambda: conn.pings >= 8))  # about 10 s, every pong late
        assert (await remote(fake.ping(conn)))["code"] == 200
        assert fake.connections == [conn] and not conn.closed.is_set()


async def test_a_callback_on_a_lost_connection_still_finishes_before_shutdown(fake, remote, start_bot, caplog):
    caplog.set_level(logging.INFO, logger="bot")
    fake.webhook_latency = 1.0
    async with start_bot() as running:
        [conn] = fake.live_connections()
        message_id = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), conn=conn))
        await remote(fake.wait_for(lambda: fake.webhook_posts))  # the reply is in flight ...
        await remote(fake.drop(conn))  # ... when its connection is lost
        await wait_until(lambda: "connection lost" in caplog.text)  # and the bot has noticed
        running.stop.set()
        assert await asyncio.wait_for(asyncio.shield(running.task), 30) == 0
    assert f"callback {message_id} POST /v1/actions/weather -> 200" in caplog.text  # replied, in full
    assert f"ack for {message_id} not sent: the connection closed" in caplog.text
    assert "abandoned" not in caplog.text and "Session is closed" not in caplog.text


async def test_past_the_in_flight_limit_callbacks_are_answered_503_at_once_and_the_connection_lives(
    fake, remote, start_bot, monkeypatch, caplog
):
    monkeypatch.setattr(bot, "_MAX_CALLBACKS_IN_HAND", 3)
    fake.webhooks_held = True  # the replies of the three in hand hang until released, below
    async with start_bot(keepalive_seconds=1.0, webhook_timeout_seconds=60):
        [conn] = fake.live_connections()
        ids = [await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), conn=conn)) for _ in range(5)]
        busy = [GraphResult.from_ack(await remote(fake.wait_ack(m)), 0) for m in ids[3:]]
        assert not fake.acks.keys() & set(ids[:3])  # answered at once: before the three in hand can finish
        pings = conn.pings  # held longer than the keepalive: reading must not pause meanwhile (each ping is sent
        await remote(fake.wait_for(lambda: conn.pings >= pings + 3))  # only once the bot has read the last pong)
        await remote(fake.release_webhooks())
        served = [GraphResult.from_ack(await remote(fake.wait_ack(m)), 0) for m in ids[:3]]
        assert fake.live_connections() == [conn]  # still the first connection
    assert [r.status for r in served + busy] == [200, 200, 200, 503, 503]
    assert busy[0].body["error"] == "3 callbacks in hand: busy" and len(fake.webhook_posts) == 3
    assert f"callback {ids[3]} answered 503: 3 callbacks in hand" in caplog.text
    assert all(len(fake.acks[m]) == 1 for m in ids)


async def test_a_routine_disconnect_soon_after_an_outage_is_replaced_within_seconds(fake, remote, start_bot, caplog):
    caplog.set_level(logging.INFO, logger="bot")
    fake.open_status = 500  # an outage: three failed opens, 1 + 2 s of backoff
    async with start_bot(connected=0):
        await remote(fake.wait_for(lambda: fake.open_attempts >= 3))
        fake.open_status = None
        [conn] = await remote(fake.wait_connected(1))
        await remote(fake.disconnect(conn))  # a disconnect, not a failure: no 8 s backoff
        await remote(fake.wait_for(lambda: len(fake.connections) == 2))
    # within seconds: the wait the bot chose, by its own clock, rather than a stopwatch on a busy machine
    [delay] = re.findall(r"DingTalk retired the connection \(disconnect\); reconnecting in ([\d.]+) s", caplog.text)
    assert float(delay) <= 4 + 1  # 4 s at most (RETIRED_MAX_DELAY_SECONDS), + jitter: not the 8 s of the outage's


async def test_a_cancelled_client_start_closes_its_connection(fake, remote):
    settings = settings_for(fake)
    credential = dingtalk_stream.Credential(settings.client_id, settings.client_secret)
    client = bot._StreamClient(credential, settings)
    client.register_callback_handler(dingtalk_stream.GraphMessage.TOPIC, dingtalk_stream.GraphHandler())
    started = asyncio.create_task(client.start())
    [conn] = await remote(fake.wait_connected(1))
    await wait_until(lambda: client.connected)  # serving it, not still opening it
    started.cancel()  # as a TaskGroup or the SDK's start_forever() would, instead of stop()
    with pytest.raises(asyncio.CancelledError):
        await started
    await remote(fake.wait_for(lambda: conn.closed.is_set()))


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
            await remote(fake.wait_for(lambda: fake.webhook_posts))
        else:
            await remote(fake.wait_ack("dup-1"))
        # DingTalk may redeliver on another of the app's connections
        await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, request, message_id="dup-1", conn=second))
        acks = [await remote(fake.wait_ack("dup-1", count=n)) for n in (1, 2)]
    assert len(fake.webhook_posts) == 1
    assert [json.loads(json.loads(a["data"])["response"]["body"]) for a in acks] == [{"success": True}] * 2


# ----- 7. webhook faults -----


@pytest.mark.parametrize("fault", ["hang", "cut-off"])
async def test_webhook_fault_is_502_while_others_are_served(fake, remote, start_bot, caplog, fault):
    async with start_bot(webhook_timeout_seconds=5.0):  # time enough for the healthy reply, while the other hangs
        if fault == "hang":
            fake.slow_sessions["aswh_stuck"] = 600
        else:
            fake.webhook_cut_off = True
        stuck = asyncio.ensure_future(remote(fake.invoke(weather(fake, "aswh_stuck"))))
        await remote(fake.wait_for(lambda: fake.webhook_posts))
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
    async with start_bot(action_timeout_seconds=5.0):  # time enough for the other two, while the bad one hangs
        bad = asyncio.ensure_future(
            remote(fake.invoke(graph_request("/v1/actions/flaky", PARAMS, session_webhook=fake.webhook_url())))
        )
        others = await remote(fake.invoke_many([weather(fake), weather(fake)]))
        assert not bad.done() or behaviour == "raises"  # the other two answered while the bad one hangs
        results = [await bad, *others]
    assert [r.status for r in results] == [status, 200, 200]
    assert len(fake.webhook_posts) == 2


# ----- 9. SIGTERM during a burst -----


@pytest.mark.parametrize("grace", ["within", "past"])
async def test_sigterm_during_a_burst_of_20(fake, remote, bot_process, grace):
    fake.webhook_latency = 1.0 if grace == "within" else 5.0
    process = await bot_process(bot_env(fake, SHUTDOWN_GRACE_SECONDS="10" if grace == "within" else "0.5"))
    await remote(fake.wait_connected(1))
    ids = [await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake))) for _ in range(20)]
    await remote(fake.wait_for(lambda: len(fake.webhook_posts) == 20))  # all 20 in flight
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    if grace == "within":
        assert all(len(fake.acks.get(i, [])) == 1 for i in ids)
        assert "abandoned" not in process.output
    else:
        for message_id in ids:
            assert f"callback {message_id} abandoned" in process.output


async def test_cancelled_first_delivery_lets_a_redelivery_start_afresh():
    ledger = bot._CallbackLedger()
    started = asyncio.Event()

    async def hangs() -> tuple[int, str]:
        started.set()
        await asyncio.Event().wait()
        return 200, "{}"

    first = asyncio.create_task(ledger.answer_once("m1", hangs))
    await asyncio.wait_for(started.wait(), 30)
    redelivery = asyncio.create_task(ledger.answer_once("m1", hangs))  # waits for the first one's answer
    first.cancel()  # what shutdown does to a delivery still running
    for task in (first, redelivery):  # anyone waiting on it stops waiting
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)

    async def answers() -> tuple[int, str]:
        return 200, '{"again": true}'

    assert await ledger.answer_once("m1", answers) == (200, '{"again": true}')  # afresh


# ----- proxies: one per destination, the same for the open, the websocket and the webhook -----


async def test_http_proxy_carries_the_open_the_websocket_and_the_webhook(fake, remote, bot_process):
    proxy = await remote(ForwardProxy().start())
    try:  # the fake speaks plain http and ws: HTTP_PROXY, read by aiohttp and websockets themselves
        process = await bot_process(bot_env(fake, HTTP_PROXY=proxy.url, NO_PROXY="", no_proxy=""))
        await remote(fake.wait_connected(1))
        assert (await remote(fake.invoke(weather(fake)))).status == 200
        process.proc.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    finally:
        await remote(proxy.close())
    base = fake.base_url
    assert proxy.requests[:2] == [f"POST {base}/v1.0/gateway/connections/open", f"CONNECT {fake.host}:{fake.port}"]
    assert [r for r in proxy.requests if r.startswith(f"POST {base}/agent/send?session=")]


# ----- long outages: the backoff stays bounded for ever, and a flapping gateway gets no storm -----


def test_backoff_stays_bounded_after_any_number_of_failures():
    # 1,025 failures in a row (about 17 h of a 60 s backoff) once overflowed 2.0 ** (failures - 1)
    for failures in (0, 1, 2, 7, 1_025, 10**6, 10**12):
        delay = bot._reconnect_delay(failures)
        assert 0 < delay <= 60 + 1  # RECONNECT_MAX_DELAY_SECONDS, + jitter
    assert bot._reconnect_delay(1_025) >= 60
    assert len({bot._reconnect_delay(0) for _ in range(20)}) > 1  # always jittered, even right after a healthy link


async def test_gateway_that_disconnects_every_connection_gets_backoff_not_a_storm(fake, remote, start_bot):
    fake.disconnect_at_once = True
    async with start_bot(connected=0):
        await remote(fake.wait_for(lambda: len(fake.connections) >= 3))  # each one retired as it opened
        opens = [r.received_at for r in fake.open_requests[:3]]
    gaps = [b - a for a, b in itertools.pairwise(opens)]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # 1, 2 s (+ jitter) and on: no tight loop


# ----- DingTalk's routine disconnect with callbacks in flight -----


async def test_disconnect_with_callbacks_in_flight_loses_no_ack(fake, remote, start_bot, caplog, monkeypatch):
    monkeypatch.setattr(bot, "_HEALTHY_AFTER_SECONDS", 0.0)  # as if the connection had been up for hours
    caplog.set_level(logging.INFO, logger="bot")
    fake.webhooks_held = True  # the replies hang until released, below
    async with start_bot():
        [old] = fake.live_connections()
        ids = [await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), conn=old)) for _ in range(5)]
        await remote(fake.wait_for(lambda: len(fake.webhook_posts) == 5))  # all five in flight
        disconnecting = asyncio.ensure_future(remote(fake.disconnect(old)))
        await remote(fake.wait_for(lambda: len(fake.connections) == 2))  # the replacement opens at once ...
        new = fake.connections[1]
        # ... while the retired one still finishes its work: its five replies cannot end before the release
        assert not old.closed.is_set() and not fake.acks.keys() & set(ids)
        late = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), conn=old))
        await disconnecting
        await remote(fake.release_webhooks())
        assert (await remote(fake.invoke(weather(fake), conn=new))).status == 200
        await remote(fake.wait_ack(late))  # served on the retired connection, before DingTalk closes it
    acks = {message_id: fake.acks.get(message_id, []) for message_id in [*ids, late]}
    assert all(len(a) == 1 and GraphResult.from_ack(a[0], 0).status == 200 for a in acks.values()), acks
    assert not fake.misrouted_acks and "ack for" not in caplog.text  # each on the connection its frame came on


# ----- shutdown: no new connection while stopping; threads do not hold the exit -----


@pytest.mark.parametrize("order", ["disconnect-then-stop", "stop-then-disconnect"])
async def test_disconnect_around_shutdown_still_acks_everything_in_hand(fake, remote, start_bot, monkeypatch, order):
    monkeypatch.setattr(bot, "_HEALTHY_AFTER_SECONDS", 0.0)
    fake.webhook_latency = 1.0
    async with start_bot() as running:
        [conn] = fake.live_connections()
        ids = [await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), conn=conn)) for _ in range(3)]
        await remote(fake.wait_for(lambda: len(fake.webhook_posts) == 3))
        if order == "disconnect-then-stop":
            await remote(fake.send_frame("SYSTEM", "disconnect", {"reason": "connection is expired"}, conn=conn))
            running.stop.set()
        else:
            running.stop.set()
            await remote(fake.send_frame("SYSTEM", "disconnect", {"reason": "connection is expired"}, conn=conn))
        assert await asyncio.wait_for(asyncio.shield(running.task), 30) == 0
    for message_id in ids:  # sent before the bot closed the connection; the fake's thread may still be reading them
        await remote(fake.wait_ack(message_id))
    assert all(len(fake.acks.get(message_id, [])) == 1 for message_id in ids), fake.acks


async def test_no_connection_opens_once_stopping_has_begun(fake, remote, bot_process):
    fake.webhook_latency = 4.0  # keeps the drain busy past the moment the other instance's open answers
    process = await bot_process(bot_env(fake, INSTANCES="2", SHUTDOWN_GRACE_SECONDS="10", WEBHOOK_TIMEOUT_SECONDS="10"))
    first, second = await remote(fake.wait_connected(2))
    in_flight = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), conn=first))
    await remote(fake.wait_for(lambda: fake.webhook_posts))
    fake.open_delay = 1.0
    attempts = fake.open_attempts
    await remote(fake.drop(second))
    await remote(fake.wait_for(lambda: fake.open_attempts > attempts))  # that open is now hanging
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    assert len(fake.connections) == 2  # the open answered during the drain, and no connection followed it
    assert len(fake.acks[in_flight]) == 1


THREADS = {
    # a blocking call run the way README section 4 recommends
    "to_thread": "await asyncio.to_thread(time.sleep, 600)",
    # a thread of the action's own, not a daemon
    "plain-thread": "threading.Thread(target=time.sleep, args=(600,)).start(); await asyncio.Event().wait()",
}


@pytest.mark.parametrize("thread", THREADS)
async def test_shutdown_is_not_held_up_by_an_action_thread(fake, remote, bot_process, thread):
    prelude = f"""
import asyncio, threading, time
import bot

async def get_weather(location: str) -> str:
    print("action started", flush=True)
    {THREADS[thread]}
    return "too late"

bot.ACTIONS["/v1/actions/weather"] = get_weather
"""
    process = await bot_process(bot_env(fake, SHUTDOWN_GRACE_SECONDS="0.5"), prelude=prelude)
    await remote(fake.wait_connected(1))
    message_id = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake)))
    await process.wait_for_output("action started")
    process.proc.send_signal(signal.SIGTERM)
    # not the thread's 600 s: a generous bound far below it; and exit 0, not the forced exit 10 s after the grace
    assert await process.wait(60) == 0
    assert f"callback {message_id} abandoned" in process.output
    assert "exiting with 1 thread(s) still running" in process.output


# ----- the redelivery ledger forgets by time, never what is in flight -----


def answering(status: int, body: str):
    async def answer() -> tuple[int, str]:
        return status, body

    return answer


async def test_ledger_keeps_finished_results_for_its_ttl_then_forgets_them():
    now = [0.0]
    ledger = bot._CallbackLedger(ttl=300, capacity=1_000, clock=lambda: now[0])
    assert await ledger.answer_once("m1", answering(200, "first")) == (200, "first")
    now[0] = 299.0
    assert await ledger.answer_once("m1", answering(200, "second")) == (200, "first")
    now[0] = 301.0
    assert await ledger.answer_once("m1", answering(200, "third")) == (200, "third")  # past the TTL: a new delivery


async def test_ledger_never_evicts_a_callback_in_flight():
    now = [0.0]
    ledger = bot._CallbackLedger(ttl=10, capacity=2, clock=lambda: now[0])
    release = asyncio.Event()

    async def slow() -> tuple[int, str]:
        await release.wait()
        return 200, "slow"

    first = asyncio.create_task(ledger.answer_once("slow", slow))
    await wait_until(lambda: "slow" in ledger.in_flight)
    for n in range(50):  # far past the cap and the TTL
        now[0] += 1
        assert await ledger.answer_once(f"m{n}", answering(200, f"m{n}")) == (200, f"m{n}")
    redelivery = asyncio.create_task(ledger.answer_once("slow", answering(200, "again")))  # waits for the first
    release.set()
    assert await asyncio.wait_for(redelivery, 5) == (200, "slow") == await first
    assert list(ledger.finished) == ["m49", "slow"]  # finished ones: the newest `capacity`, exactly


# ----- a second adversarial probe: bursts, endless answers, endpoints with a query, big frames -----


async def test_a_burst_beyond_aiohttps_default_pool_is_all_delivered_and_acked_200(fake, remote, start_bot):
    fake.webhooks_held = True  # 300 replies that hang until all 300 are in flight: a pool of 100 would queue 200
    async with start_bot(webhook_timeout_seconds=120):
        requests = [weather(fake) for _ in range(300)]
        calls = asyncio.ensure_future(remote(fake.invoke_many(requests, timeout=120)))
        await remote(fake.wait_for(lambda: len(fake.webhook_posts) == 300, 60))
        await remote(fake.release_webhooks())
        results = await calls
    assert [r.status for r in results] == [200] * 300
    assert len(fake.webhook_posts) == 300  # one POST each


@pytest.mark.parametrize("chunk_every", [0.2, 0.0], ids=["trickling", "flooding"])
async def test_an_endless_webhook_answer_is_502_within_its_limits(fake, remote, start_bot, caplog, chunk_every):
    fake.webhook_endless = chunk_every  # 200, then a body that never ends
    async with start_bot(webhook_timeout_seconds=1.0):
        result = await remote(fake.invoke(weather(fake)))  # the body never ends: answered at all is within limits
    assert result.status == 502
    if chunk_every:  # the time limit holds while data keeps coming
        assert "timed out after 1.0 s" in caplog.text
    else:
        assert f"answer larger than {1 << 20} bytes" in caplog.text


async def test_the_ticket_is_a_query_parameter_of_its_own_whatever_the_endpoint_carries(fake, remote, start_bot):
    fake.endpoint_query = "region=cn&x=1"
    async with start_bot():
        assert (await remote(fake.invoke(weather(fake)))).status == 200


async def test_a_frame_over_websockets_default_1_mib_is_read_and_answered(fake, remote, start_bot):
    async with start_bot():
        padding = "明" * 700_000  # a parameter the action does not take: the frame is about 2 MiB, the reply small
        big = graph_request(WEATHER, {**PARAMS, "padding": padding}, session_webhook=fake.webhook_url())
        result = await remote(fake.invoke(big))
        assert result.status == 200
        assert len(fake.live_connections()) == 1 and len(fake.connections) == 1  # the same connection


async def test_ledger_keeps_at_most_max_bytes_of_answers():
    ledger = bot._CallbackLedger(ttl=300, capacity=1_000, max_bytes=10)
    for n in range(4):
        await ledger.answer_once(f"m{n}", answering(200, "abcd"))  # 4 characters each
    assert list(ledger.finished) == ["m2", "m3"] and ledger.size == 8


async def test_a_second_disconnect_is_only_acked(fake, remote, start_bot, caplog):
    async def disconnect_twice(conn: Any) -> list[str]:  # back to back: both arrive before the bot answers either
        send = fake.send_frame
        return [await send("SYSTEM", "disconnect", {"reason": "connection is expired"}, conn=conn) for _ in "12"]

    caplog.set_level(logging.INFO, logger="bot")
    async with start_bot():
        [conn] = fake.live_connections()
        ids = await remote(disconnect_twice(conn))
        await remote(fake.wait_for(lambda: len(fake.connections) == 2))
        await remote(fake.wait_for(lambda: all(m in fake.acks for m in ids)))
        assert [len(fake.acks[m]) for m in ids] == [1, 1]
    assert len(fake.connections) == 2 and caplog.text.count("DingTalk retired the connection") == 1


async def test_a_retired_connection_the_gateway_never_closes_is_closed_after_the_window(
    fake, remote, start_bot, monkeypatch
):
    monkeypatch.setattr(bot, "_RETIRE_WINDOW_SECONDS", 0.5)
    fake.retire_close_after = 600  # far past the wait below: the bot closes it
    async with start_bot():
        [conn] = fake.live_connections()
        await remote(fake.disconnect(conn))
        await remote(fake.wait_for(conn.closed.is_set))
        await remote(fake.wait_connected(1))  # its replacement


async def test_a_retired_connection_that_drops_leaves_no_unretrieved_error(fake, remote, start_bot, caplog):
    caplog.set_level(logging.INFO, logger="bot")
    fake.webhook_latency = 0.5
    async with start_bot():
        [conn] = fake.live_connections()
        await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), conn=conn))
        await remote(fake.send_frame("SYSTEM", "disconnect", {"reason": "connection is expired"}, conn=conn))
        await remote(fake.drop(conn))
        await remote(fake.wait_for(lambda: len(fake.connections) == 2))
        await wait_until(lambda: "callback" in caplog.text and "-> 200" in caplog.text)
    assert "never retrieved" not in caplog.text


# ----- what the real gateway may do: the fake's stricter habits -----


async def test_the_open_asks_for_json_and_names_the_bot_as_the_sdk_does(fake, remote, start_bot):
    assert fake.xml_without_accept  # the fake answers XML to an open without Accept: application/json
    async with start_bot():
        headers = fake.open_requests[0].headers
    assert headers["Accept"] == "application/json" and headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith(f"DingTalkStream/1.0 SDK/{dingtalk_stream.version.VERSION_STRING} Python/")
    assert headers["User-Agent"].endswith(f" dingtalk-skill-bot/{bot.VERSION}")


async def test_system_chatter_and_callbacks_without_a_message_id_are_each_acked_once(fake, remote, start_bot):
    fake.chatter = True  # CONNECTED, REGISTERED and KEEPALIVE on every new connection
    async with start_bot():
        await remote(fake.wait_for(lambda: len(fake.acks) >= 3))
        await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), message_id=""))
        ack = await remote(fake.wait_ack(""))
        assert (await remote(fake.invoke(weather(fake)))).status == 200
    topics = [f["headers"]["topic"] for f in fake.frames_out if f["type"] == "SYSTEM"]
    assert topics == ["CONNECTED", "REGISTERED", "KEEPALIVE"]
    assert all(len(acks) == 1 for acks in fake.acks.values()) and len(fake.acks) == 5
    assert GraphResult.from_ack(ack, 0).status == 200 and len(fake.connections) == 1


async def test_webhook_answering_success_false_without_errcode_is_502(fake, remote, start_bot, caplog):
    fake.webhook_answer = {"success": False, "code": "invalidParameter", "message": "cardData 不合法"}
    async with start_bot():
        result = await remote(fake.invoke(weather(fake)))
    assert (result.status, result.body["error"]) == (502, "reply webhook failed")
    assert "success: false" in caplog.text and "invalidParameter" in caplog.text


def test_the_https_host_of_the_openapi_endpoint_is_a_webhook_host():
    settings = bot.Settings(client_id="id", client_secret="secret", dingtalk_openapi_endpoint="https://api.dingtalk.io")
    handler = bot._ActionHandler(settings, {}, None, bot._CallbackLedger())
    url = "https://api.dingtalk.io/v1.0/me/agent/send?session=s"
    assert bot._check_webhook(url, settings.webhook_allowed_hosts, handler.dingtalk_hosts) == url
    with pytest.raises(bot._GraphError, match="not allowed"):
        bot._check_webhook(url)  # not on the default endpoint's hosts
    settings = bot.Settings("id", "secret", dingtalk_openapi_endpoint="http://api.dingtalk.io")
    plain = bot._ActionHandler(settings, {}, None, bot._CallbackLedger())
    assert "api.dingtalk.io" not in plain.dingtalk_hosts  # only an https endpoint's host
