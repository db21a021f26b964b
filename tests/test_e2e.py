"""End to end through the real SDK: a frame from the fake gateway -> bot -> webhook reply -> ack."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import threading
import time

import dingtalk_stream
import pytest

import bot
from tests.conftest import healthz, wait_until
from tests.fake_dingtalk import GraphResult, free_port, graph_request
from tests.samples import SAMPLE_ACTIONS, SAMPLE_TOOLS

WEATHER = "/v1/actions/weather"
RATE = "/v1/actions/exchange-rate"
ON_CALL = "/v1/actions/on-call"
PARAMS = {"location": "杭州", "date": "明天"}


async def test_happy_path_replies_markdown_card_and_acks_200(fake, remote, start_bot):
    async with start_bot():
        webhook = fake.webhook_url("aswh_happy")
        result = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=webhook)))
    assert result.ack["code"] == 200
    assert result.status == 200 and result.body == {"success": True}
    assert result.headers["Content-Type"] == "application/json"
    [post] = fake.webhook_posts
    assert post.session == "aswh_happy"
    assert post.payload["contentType"] == "ai_card"
    assert post.payload["content"]["templateId"] == dingtalk_stream.GraphHandler.MARKDOWN_TEMPLATE_ID
    assert "杭州" in post.markdown and "明天" in post.markdown
    [open_request] = fake.open_requests
    assert open_request.body["subscriptions"] == [{"type": "CALLBACK", "topic": "/v1.0/graph/api/invoke"}]


# ----- the three display modes -----


async def test_auto_answers_with_the_actions_data_typed_from_the_query_string(fake, remote, start_bot):
    async with start_bot():
        request = graph_request(RATE, {"currency": "USD", "amount": "100"}, method="GET")
        assert "?" in request["requestLine"]["uri"] and request["body"] == "{}"
        result = await remote(fake.invoke(request))
    assert result.status == 200
    assert result.body == {"currency": "USD", "amount": 100, "cny": 712.0, "rate": 7.12, "demo": True}
    assert fake.webhook_posts == []  # the assistant's model presents the data: no webhook


async def test_markdown_answers_with_content_shown_as_is(fake, remote, start_bot):
    async with start_bot():
        result = await remote(fake.invoke(graph_request(ON_CALL, {"team": "运维", "weeks": 2})))
    assert result.status == 200
    assert set(result.body) == {"content"} and result.body["content"].startswith("**运维** 值班表")
    assert result.body["content"].count("\n| ") == 3  # header row and two weeks
    assert fake.webhook_posts == []


async def test_disabled_posts_a_card_of_your_own_template(fake, remote, start_bot, monkeypatch):
    async def weather_card(location: str) -> bot.Card:
        return bot.Card("my-template.schema", {"city": location, "temperature": 22})

    monkeypatch.setitem(bot.ACTIONS, WEATHER, weather_card)
    async with start_bot():
        result = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())))
    assert (result.status, result.body) == (200, {"success": True})
    [post] = fake.webhook_posts
    assert post.payload == {
        "contentType": "ai_card",
        "content": {"templateId": "my-template.schema", "cardData": {"city": "杭州", "temperature": 22}},
    }


@pytest.mark.parametrize(
    ("path", "wrong", "expected"),
    [
        (RATE, "some markdown", "expects data: a dict or list"),
        (ON_CALL, {"content": "a dict"}, "expects a str of markdown"),
        (WEATHER, ["a", "list"], "expects a str of markdown or a Card"),
    ],
    ids=["auto-got-str", "markdown-got-dict", "disabled-got-list"],
)
async def test_an_answer_of_the_wrong_kind_for_the_mode_is_a_500_saying_why(
    fake, remote, start_bot, monkeypatch, caplog, path, wrong, expected
):
    async def action(**params: object) -> object:
        return wrong

    monkeypatch.setitem(bot.ACTIONS, path, action)
    params = {"currency": "USD"} if path == RATE else {"team": "运维"} if path == ON_CALL else PARAMS
    async with start_bot():
        webhook = fake.webhook_url() if path == WEATHER else None
        request = graph_request(path, params, method="GET" if path == RATE else "POST", session_webhook=webhook)
        result = await remote(fake.invoke(request))
    assert (result.status, result.body["error"]) == (500, "internal error in action")
    assert f"action action returned {type(wrong).__name__}, but" in caplog.text and expected in caplog.text
    assert fake.webhook_posts == []


async def test_ping_is_acked_with_its_opaque(fake, remote, start_bot):
    async with start_bot():
        ack = await remote(fake.ping())
    assert ack["code"] == 200


async def test_the_handshake_offers_no_per_message_deflate_as_the_go_sdks(fake, remote, start_bot):
    # Frames are a few hundred bytes: compressing each costs more CPU than it saves (the Go SDK offers none either).
    async with start_bot():
        (conn,) = fake.live_connections()
        assert conn.handshake["Upgrade"].lower() == "websocket"
        assert "Sec-WebSocket-Extensions" not in conn.handshake
        assert (await remote(fake.ping()))["code"] == 200


def _bad(request: dict, **changes) -> dict:
    return {**request, **changes}


@pytest.mark.parametrize(
    ("make_request", "status", "reason"),
    [
        (lambda f: "[1, 2, 3]", 400, "callback data is not a JSON object"),
        (
            lambda f: _bad(graph_request(WEATHER, PARAMS, session_webhook=f.webhook_url()), body="{oops"),
            400,
            "body is not a JSON object",
        ),
        (lambda f: graph_request(WEATHER, PARAMS), 400, "missing sessionWebhook"),
        (lambda f: graph_request(WEATHER, {**PARAMS, "sessionWebhook": 12}), 400, "sessionWebhook must be string"),
        (lambda f: graph_request(WEATHER, PARAMS, session_webhook="not a url"), 400, "not a valid http(s) URL"),
        (lambda f: graph_request(WEATHER, {"date": "明天"}, session_webhook=f.webhook_url()), 400, "location"),
        (
            lambda f: graph_request("/v1/actions/nope", PARAMS, session_webhook=f.webhook_url()),
            404,
            "no action for POST /v1/actions/nope",
        ),
        (lambda f: graph_request(RATE, {"currency": "GBP"}, method="GET"), 400, "currency must be one of ['USD'"),
        (lambda f: graph_request(ON_CALL, {"team": "运维", "weeks": "two"}), 400, "weeks must be integer"),
        (lambda f: graph_request(RATE, {"currency": "USD"}), 404, "no action for POST /v1/actions/exchange-rate"),
        (lambda f: {"requestLine": {"method": "GET", "uri": "http://[::1/x"}, "body": "{}"}, 400, "not a valid URI"),
        (
            lambda f: _bad(
                graph_request(ON_CALL, {"team": "x"}), body='{"team": ' + "[" * 100_000 + "]" * 100_000 + "}"
            ),
            400,
            "body is not a JSON object",
        ),
    ],
    ids=[
        "data-not-object",
        "body-not-json",
        "no-webhook",
        "webhook-not-string",
        "webhook-not-url",
        "missing-parameter",
        "unknown-path",
        "not-in-enum",
        "wrong-type",
        "wrong-method",
        "bad-uri",
        "body-nested-too-deeply",
    ],
)
async def test_bad_callbacks_get_4xx_and_the_bot_keeps_serving(fake, remote, start_bot, make_request, status, reason):
    async with start_bot():
        result = await remote(fake.invoke(make_request(fake)))
        assert (result.status, result.body["success"]) == (status, False)
        assert reason in result.body["error"]
        assert fake.webhook_posts == []
        follow_up = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())))
    assert follow_up.status == 200
    assert len(fake.webhook_posts) == 1


async def test_refused_webhook_host_is_never_contacted(fake, remote, start_bot):
    # "localhost" reaches the same fake sink, but only "127.0.0.1:<port>" is allowed.
    async with start_bot():
        for url in (fake.webhook_url(host="localhost"), f"https://evil.invalid:{fake.port}/agent/send?session=x"):
            result = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=url)))
            assert result.status == 400 and "is not allowed" in result.body["error"]
    assert fake.webhook_posts == []


async def test_action_error_is_500_with_generic_message(fake, remote, start_bot, monkeypatch, caplog):
    async def broken(location: str) -> str:
        raise ValueError("secret internals")

    monkeypatch.setitem(bot.ACTIONS, "/v1/actions/broken", broken)
    async with start_bot():
        result = await remote(
            fake.invoke(graph_request("/v1/actions/broken", PARAMS, session_webhook=fake.webhook_url()))
        )
        assert result.status == 500 and result.body == {"success": False, "error": "internal error in action"}
        assert (
            await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())))
        ).status == 200
    assert "secret internals" in caplog.text  # traceback in the log, not in the answer
    assert len(fake.webhook_posts) == 1


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        ({"webhook_status": 500}, "HTTP 500"),
        ({"webhook_errcode": 300001}, "errcode 300001"),
        ({"webhook_latency": 60.0}, "timed out"),  # far past the time limit below
    ],
    ids=["http-500", "errcode", "timeout"],
)
async def test_webhook_failure_is_502_and_logged_redacted(fake, remote, start_bot, caplog, fault, logged):
    async with start_bot(webhook_timeout_seconds=3.0):  # time enough for the healthy reply after it
        for name, value in fault.items():
            setattr(fake, name, value)
        webhook = fake.webhook_url("aswh_topsecret")
        result = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=webhook)))
        assert result.status == 502 and result.body["success"] is False
        for name in fault:
            setattr(fake, name, type(getattr(fake, name))(200 if name == "webhook_status" else 0))
        assert (
            await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())))
        ).status == 200
    assert logged in caplog.text
    assert "session=***" in caplog.text and "aswh_topsecret" not in caplog.text


async def test_expired_session_is_502(fake, remote, start_bot):
    fake.expired_sessions.add("aswh_old")
    async with start_bot():
        result = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url("aswh_old"))))
    assert result.status == 502


async def test_slow_webhooks_are_served_concurrently(fake, remote, start_bot):
    fake.webhooks_held = True  # each reply hangs until released, below
    async with start_bot():
        requests = [graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url()) for _ in range(20)]
        calls = asyncio.ensure_future(remote(fake.invoke_many(requests)))
        # one at a time, the second reply would never be posted while the first hangs: all twenty are in flight at once
        await remote(fake.wait_for(lambda: len(fake.webhook_posts) == 20))
        await remote(fake.release_webhooks())
        results = await calls
    assert [r.status for r in results] == [200] * 20


async def test_two_instances_open_two_connections_and_both_serve(fake, remote, start_bot):
    async with start_bot(instances=2):
        conns = fake.live_connections()
        assert len(conns) == 2 and len(fake.open_requests) == 2
        for conn in conns:
            request = graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())
            assert (await remote(fake.invoke(request, conn=conn))).status == 200
    assert len(fake.webhook_posts) == 2


async def test_reconnects_after_gateway_disconnect(fake, remote, start_bot):
    fake.retire_close_after = 1.0
    async with start_bot():
        [first] = fake.live_connections()
        await remote(fake.disconnect(first))
        await remote(fake.wait_for(lambda: fake.live_connections() and fake.live_connections()[0] is not first))
        result = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())))
        await remote(fake.wait_for(first.closed.is_set))  # by the fake, as DingTalk does
    assert result.status == 200
    assert len(fake.open_requests) == 2  # a fresh ticket for the new connection


async def test_healthz_is_200_when_all_connected_and_503_while_one_is_down(fake, remote, start_bot):
    port = free_port()
    async with start_bot(instances=2, health_port=port):
        assert await healthz(port) == (200, {"status": "ok", "instances": 2, "connected": 2})
        fake.reject_websocket = True
        await remote(fake.disconnect(fake.live_connections()[0]))
        status, body = await healthz(port)
        assert (status, body["status"], body["connected"]) == (503, "degraded", 1)
        fake.reject_websocket = False
        await wait_until(lambda: len(fake.live_connections()) == 2)
        assert (await healthz(port))[0] == 200


async def test_stop_finishes_the_callbacks_in_hand_and_serves_those_that_still_come(fake, remote, start_bot, caplog):
    port = free_port()
    fake.webhook_latency = 1.0
    caplog.set_level(logging.INFO, logger="bot")
    async with start_bot(health_port=port) as running:
        message_id = await remote(
            fake.send_frame(
                "CALLBACK", "/v1.0/graph/api/invoke", graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())
            )
        )
        await remote(fake.wait_for(lambda: fake.webhook_posts))  # the reply is in flight
        running.stop.set()
        await wait_until(lambda: "waiting up to" in caplog.text)
        late = await remote(
            fake.send_frame(
                "CALLBACK", "/v1.0/graph/api/invoke", graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())
            )
        )
        await asyncio.wait_for(asyncio.shield(running.task), 30)
    # both got their reply and one ack: DingTalk documents no redelivery of a Graph call left unanswered
    assert running.task.result() == 0
    assert len(fake.webhook_posts) == 2
    for ack in (fake.acks[message_id], fake.acks[late]):
        assert len(ack) == 1 and json.loads(json.loads(ack[0]["data"])["response"]["body"]) == {"success": True}
    assert "waiting up to" in caplog.text and "abandoned" not in caplog.text


async def test_a_callback_still_running_when_the_grace_period_ends_is_answered_503(fake, remote, start_bot, caplog):
    started = asyncio.Event()

    async def get_weather(location: str, sessionWebhook: str) -> str:
        started.set()
        await asyncio.sleep(60)
        return "too late"

    bot.ACTIONS["/v1/actions/slow"] = get_weather
    async with start_bot(shutdown_grace_seconds=0.5) as running:
        request = graph_request("/v1/actions/slow", {"location": "杭州"}, session_webhook=fake.webhook_url())
        message_id = await remote(fake.send_frame("CALLBACK", "/v1.0/graph/api/invoke", request))
        await asyncio.wait_for(started.wait(), 30)
        running.stop.set()
        ack = await remote(fake.wait_ack(message_id))
    result = GraphResult.from_ack(ack, 0)
    assert (result.status, result.body["error"]) == (503, "the bot stopped before the action finished")
    assert len(fake.acks[message_id]) == 1 and f"callback {message_id} abandoned" in caplog.text


async def test_health_port_in_use_is_a_clear_error(fake, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = bot.Settings(client_id="a", client_secret="b", health_port=port)
        with pytest.raises(bot.ConfigError) as err:  # python bot.py prints it and exits 2
            async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings):
                pytest.fail("running() must not yield when HEALTH_PORT is busy")
    assert str(err.value).startswith(f"cannot serve HEALTH_PORT={port}: ")
    assert fake.open_requests == []


async def test_callbacks_without_message_id_are_each_served(fake, remote, start_bot):
    async with start_bot():
        for count in (1, 2):
            frame_id = await remote(
                fake.send_frame(
                    "CALLBACK",
                    "/v1.0/graph/api/invoke",
                    graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url()),
                    message_id="",
                )
            )
            await remote(fake.wait_ack(frame_id, count=count))
        assert len(fake.webhook_posts) == 2


@pytest.mark.parametrize(
    ("data", "headers"),
    [("{not json", {}), ('{"requestLine": {}}', {"time": "yesterday"})],
    ids=["data-not-json", "time-not-a-number"],
)
async def test_malformed_callback_frame_gets_a_400_ack_and_the_bot_keeps_serving(
    fake, remote, start_bot, data, headers
):
    async with start_bot():
        message_id = await remote(fake.send_frame("CALLBACK", "/v1.0/graph/api/invoke", data, headers=headers))
        ack = await remote(fake.wait_ack(message_id))
        response = json.loads(ack["data"])["response"]
        assert ack["code"] == 400 and response["statusLine"]["code"] == 400
        assert "malformed frame" in json.loads(response["body"])["error"]
        follow_up = await remote(fake.invoke(graph_request(WEATHER, PARAMS, session_webhook=fake.webhook_url())))
    assert follow_up.status == 200


async def test_callback_on_a_topic_without_handler_gets_404_ack(fake, remote, start_bot):
    async with start_bot():
        message_id = await remote(fake.send_frame("CALLBACK", "/v1.0/im/bot/messages/get", {"text": "hi"}))
        ack = await remote(fake.wait_ack(message_id))
    assert ack["code"] == 404
    assert json.loads(json.loads(ack["data"])["response"]["body"])["error"] == "topic not subscribed"


# ----- what a plugin author gets wrong is said, not swallowed -----


async def test_an_action_error_is_that_status_with_its_message_for_the_model(
    fake, remote, start_bot, monkeypatch, caplog
):
    async def rate_refuses(currency: str) -> dict:
        raise bot.ActionError("暂不支持该币种 / currency not offered", 422)

    monkeypatch.setitem(bot.ACTIONS, RATE, rate_refuses)
    async with start_bot():
        result = await remote(fake.invoke(graph_request(RATE, {"currency": "USD"}, method="GET")))
    assert (result.status, result.body) == (422, {"success": False, "error": "暂不支持该币种 / currency not offered"})
    assert "Traceback" not in caplog.text


async def test_a_blocking_call_in_an_async_action_is_named_in_one_warning(fake, remote, start_bot, monkeypatch, caplog):
    async def get_ticket(location: str) -> str:
        time.sleep(1.6)  # noqa: ASYNC251 -- the newcomer's requests.get: holds the whole loop
        return location

    monkeypatch.setitem(bot.ACTIONS, "/v1/actions/ticket", get_ticket)
    async with start_bot():
        request = graph_request("/v1/actions/ticket", PARAMS, session_webhook=fake.webhook_url())
        assert (await remote(fake.invoke(request))).status == 200
        await wait_until(lambda: "held the event loop" in caplog.text)
    [warning] = [r.getMessage() for r in caplog.records if "held the event loop" in r.getMessage()]
    assert warning.startswith("action get_ticket (POST /v1/actions/ticket) has held the event loop for over 1 s")
    assert "use an async client, or make the action a plain def" in warning


async def test_a_plain_def_action_does_not_hold_the_loop(fake, remote, start_bot, monkeypatch, caplog):
    started, release = threading.Event(), threading.Event()

    def get_ticket(location: str) -> str:
        started.set()
        time.sleep(1.6)  # in a worker thread: the loop goes on
        release.wait(120)  # and the action goes on until the ping below has been answered
        return location

    monkeypatch.setitem(bot.ACTIONS, "/v1/actions/ticket", get_ticket)
    async with start_bot():
        request = graph_request("/v1/actions/ticket", PARAMS, session_webhook=fake.webhook_url())
        slow = asyncio.ensure_future(remote(fake.invoke(request)))
        try:
            await wait_until(started.is_set)
            assert (await remote(fake.ping())) is not None
            assert not slow.done()  # answered while the action runs
        finally:
            release.set()
        assert (await slow).status == 200
    assert "held the event loop" not in caplog.text


def logged(function):  # a plain decorator two actions share: one code object for both wrappers
    @functools.wraps(function)
    async def wrapper(**params: object) -> object:
        return await function(**params)

    return wrapper


async def test_the_loop_warning_names_the_blocking_action_behind_a_shared_decorator(
    fake, remote, start_bot, monkeypatch, caplog
):
    @logged
    async def innocent(location: str) -> str:
        return location

    @logged
    async def blocker(location: str) -> str:
        time.sleep(1.6)  # noqa: ASYNC251 -- the mistake under test
        return location

    monkeypatch.setitem(bot.ACTIONS, "/v1/actions/innocent", innocent)
    monkeypatch.setitem(bot.ACTIONS, "/v1/actions/blocker", blocker)
    async with start_bot():
        request = graph_request("/v1/actions/blocker", PARAMS, session_webhook=fake.webhook_url())
        assert (await remote(fake.invoke(request))).status == 200
        await wait_until(lambda: "held the event loop" in caplog.text)
    assert "action blocker (POST /v1/actions/blocker) has held the event loop" in caplog.text
    assert "innocent" not in caplog.text


def made_by_a_factory(blocks: bool):  # one code object and one name for every action it makes
    async def action(location: str) -> str:
        if blocks:
            time.sleep(1.6)  # noqa: ASYNC251 -- the mistake under test
        return location

    return action


async def test_the_loop_warning_names_the_route_of_actions_a_factory_made(fake, remote, start_bot, monkeypatch, caplog):
    monkeypatch.setitem(bot.ACTIONS, "/v1/actions/first", made_by_a_factory(blocks=False))
    monkeypatch.setitem(bot.ACTIONS, "/v1/actions/second", made_by_a_factory(blocks=True))
    async with start_bot():
        request = graph_request("/v1/actions/second", PARAMS, session_webhook=fake.webhook_url())
        assert (await remote(fake.invoke(request))).status == 200
        await wait_until(lambda: "held the event loop" in caplog.text)
    assert "action action (POST /v1/actions/second) has held the event loop" in caplog.text


async def test_an_answer_too_large_to_ack_is_a_500_saying_so(fake, remote, start_bot, monkeypatch, caplog):
    async def rate_too_big(currency: str) -> dict:
        return {"rows": "值" * 40_000}  # 40,000 characters, about 280 KB as the ack sends them (\\uXXXX)

    monkeypatch.setitem(bot.ACTIONS, RATE, rate_too_big)
    fake.max_frame_bytes = 256 << 10  # as the Java SDK reads: a bigger frame is closed with 1009
    async with start_bot():
        result = await remote(fake.invoke(graph_request(RATE, {"currency": "USD"}, method="GET")))
        assert (await remote(fake.invoke(graph_request(ON_CALL, {"team": "运维"})))).status == 200  # still connected
    assert (result.status, result.body["error"]) == (500, "internal error in action: answer too large")
    assert len(fake.connections) == 1
    assert "answer too large: 28" in caplog.text and f"bytes as sent, over {256 << 10}" in caplog.text
