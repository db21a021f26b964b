"""FORWARD_URL at its edges: what a callback's URI may not do, how it is encoded on the way, which answers the bot
takes, what never reaches the log, FORWARD_URL's own refusals, proxies, and `lifespan` and an author's part of
bot.py as `python bot.py` meets them.

Through the same fixtures as tests/test_forward.py (`forwarding` and `service`: bot.running() and the fake, a real
HTTP service on 127.0.0.1 that records what reaches it; `bot_process`: `python bot.py` itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml
from aiohttp import web

from tests import test_forward
from tests.conftest import wait_until
from tests.fake_dingtalk import ForwardProxy, LoopbackServer, bot_env, graph_request
from tests.http_service import HttpService
from tests.test_forward import (
    CARDS,
    DATA,
    NOTES,
    PATHS,
    TIME_LIMIT,
    WEBHOOK,
    body_operation,
    callback,
    json_answer,
    query_operation,
    raw_answer,
    roster_tools,
    text_answer,
)

forwarding, service = test_forward.forwarding, test_forward.service  # its fixtures, here too


def escapes_in_upper_case(target: str) -> str:
    """`target` with each %xx escape's hex digits in upper case: a new escape may be written either way."""
    return re.sub(r"%[0-9a-fA-F]{2}", lambda escape: escape[0].upper(), target)


def said(caplog: pytest.LogCaptureFixture) -> str:
    """Everything logged while the test ran: messages, and tracebacks with them."""
    return caplog.text + "\n".join(record.getMessage() for record in caplog.records)


class RawService(LoopbackServer):
    """A 'service' on 127.0.0.1 that answers each request with the bytes a test gives it, then hangs up: for
    answers no HTTP server library would write."""

    def __init__(self, answer: bytes) -> None:
        self.answer, self.requests = answer, []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(self.answer)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


# ----- 1. the callback's URI: only its path and query follow FORWARD_URL -----


async def test_a_uri_whose_path_does_not_start_with_a_slash_is_400_and_reaches_no_service(forwarding, service):
    other = await HttpService().start()  # where such a URI, appended to FORWARD_URL, would lead
    try:
        async with forwarding() as call:
            refused = [
                await call("GET", f"%2Fv1%2Fitems%2F@127.0.0.1:{other.port}"),  # http://127.0.0.1:P%2F...@127.0.0.1:Q
                await call("GET", "v1/items/1"),
            ]
            served = await call("GET", "/v1/items/1")
    finally:
        await other.close()
    assert [result.status for result in refused] == [400, 400], [result.body for result in refused]
    assert other.requests == []
    assert served.status == 200 and [seen.target for seen in service.requests] == ["/v1/items/1"]


# ----- 2. the path and query as sent, percent-encoded only where they must be -----


async def test_non_ascii_and_a_space_arrive_percent_encoded_the_rest_as_sent_and_control_characters_are_400(
    forwarding, service
):
    sent = {  # as DingTalk sent it: as the service receives it
        "/v1/items/天 x%7E-~!*'();,$?q=a b&tag=x%2By+z&t=é": (
            "/v1/items/%E5%A4%A9%20x%7E-~!*'();,$?q=a%20b&tag=x%2By+z&t=%C3%A9"
        ),
    }
    async with forwarding() as call:
        results = [await call("GET", uri) for uri in sent]
        refused = await call("GET", "/v1/items/a\r\nX-Injected: 1\tz")  # urlsplit would drop them: not as checked
    assert [result.status for result in results] == [200], [result.body for result in results]
    assert [escapes_in_upper_case(seen.target) for seen in service.requests] == list(sent.values())
    assert refused.status == 400 and len(service.requests) == 1, refused.body


@pytest.mark.parametrize("uri", ["/v1/items/..", "/v1/items/%2E%2E"])
async def test_a_dot_dot_segment_is_400_and_never_reaches_the_service(forwarding, service, uri):
    async with forwarding() as call:
        refused = await call("GET", uri)
        served = await call("GET", "/v1/items/1")
    assert refused.status == 400 and refused.body["success"] is False, refused.body
    assert served.status == 200 and [seen.target for seen in service.requests] == ["/v1/items/1"]


# ----- 3. what is checked is exactly what is forwarded: a parameter once, a GET's in its query -----


async def test_a_parameter_given_twice_or_a_get_with_parameters_in_its_body_is_400_and_never_forwarded(
    forwarding, service
):
    service.answer(NOTES, text_answer("**运维** 值班"))
    async with forwarding() as call:
        refused = {
            "twice in the query": await call("GET", "/v1/items/1?limit=3&limit=4"),
            "twice in the query, alike": await call("GET", "/v1/items/1?q=a&q=a"),
            "a GET's body": await call("GET", "/v1/items/1", {"q": "short"}),
            "a GET's query and body": await call("GET", "/v1/items/1?q=" + "x" * 50, {"q": "short"}),
            "a POST's query and body": await call("POST", f"{NOTES}?team=运维", {"team": "运维"}),
        }
        assert service.requests == []
        get, post = await call("GET", "/v1/items/1?q=a"), await call("POST", NOTES, {"team": "运维"})
    assert {what: result.status for what, result in refused.items()} == dict.fromkeys(refused, 400)
    assert (get.status, post.status) == (200, 200), (get.body, post.body)
    assert [(seen.method, seen.target) for seen in service.requests] == [("GET", "/v1/items/1?q=a"), ("POST", NOTES)]


# ----- 4. a session token never reaches the log, nor a 502 the service's URL -----

GET_CARDS = "/v1/get-cards"
GET_CARDS_OPERATION = query_operation(
    "disabled",
    [
        {"name": "sessionWebhook", "in": "query", "schema": WEBHOOK},
        {"name": "q", "in": "query", "schema": {"type": "string"}},
    ],
)


async def test_a_session_token_in_a_gets_query_is_not_logged_when_the_service_answers_a_malformed_header(
    forwarding, fake, caplog
):
    caplog.set_level(logging.DEBUG, logger="bot")
    token = "SESSIONTOKEN123456"
    raw = await RawService(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n").start()
    uri = f"{GET_CARDS}?" + urlencode({"sessionWebhook": fake.webhook_url(session=token), "q": "x"})
    try:
        async with forwarding(PATHS | {GET_CARDS: {"get": GET_CARDS_OPERATION}}, forward_url=raw.url) as call:
            result = await call("GET", uri)
    finally:
        await raw.close()
    assert len(raw.requests) == 1  # it reached the service, which answered nonsense
    assert result.status == 502 and result.body["success"] is False, result.body
    assert token not in said(caplog), said(caplog)
    assert token not in result.ack["data"]
    assert raw.url not in result.ack["data"] and "/get-cards" not in result.ack["data"], result.body
    assert fake.webhook_posts == []


async def test_a_session_token_the_service_echoes_back_gson_escaped_is_not_logged(forwarding, service, fake, caplog):
    caplog.set_level(logging.DEBUG, logger="bot")
    token = "SESSIONTOKEN654321"

    async def echoes(request: web.Request) -> web.Response:  # as a Java service with Gson's HTML-safe escaping
        escaped = (await request.text()).replace("=", "\\u003d")
        text = '{"error": "bad request", "input": ' + escaped + "}"
        return web.Response(status=400, text=text, content_type="application/json")

    service.answer(CARDS, echoes)
    async with forwarding() as call:
        result = await call("POST", CARDS, {"location": "杭州", "sessionWebhook": fake.webhook_url(session=token)})
    assert result.status == 400 and result.body["error"] == "bad request", result.body  # passed on, as the service's
    assert token not in said(caplog), said(caplog)


# ----- 5. the ack's limit is the ack as sent -----


async def test_an_answer_over_the_ack_as_sent_is_502_too_large_to_ack_one_well_within_is_200(forwarding, service):
    over = {"t": "天" * 50_000}  # 150 KB of UTF-8, under 256 KiB; as sent in the ack, escaped twice, 350 KB
    within = {"t": "天" * 20_000}  # 60 KB
    for path, value in (("/v1/over", over), ("/v1/within", within)):
        service.answer(path, raw_answer(json.dumps(value, ensure_ascii=False).encode(), "application/json"))
    paths = {path: {"get": query_operation("auto")} for path in ("/v1/over", "/v1/within")}
    async with forwarding(paths) as call:
        refused, passed = await call("GET", "/v1/over"), await call("GET", "/v1/within")
    assert refused.status == 502 and "answer too large to ack" in refused.body["error"], refused.body
    assert (passed.status, passed.body) == (200, within)


# ----- 6. statuses: any 2xx is success, every 4xx and 5xx is passed on -----


async def test_statuses_python_has_no_name_for_are_passed_on_and_any_2xx_is_success(forwarding, service):
    answers = [
        (499, json_answer({"why": "client closed"}, 499)),
        (599, json_answer({"why": "network timeout"}, 599)),
        (599, text_answer("upstream timed out", "text/plain", 599)),
        (201, json_answer({"id": 1}, 201)),
        (299, json_answer({"id": 2}, 299)),
    ]
    results = []
    async with forwarding() as call:
        for _, answer in answers:
            service.answer(DATA, answer)
            results.append(await call("POST", DATA, {"n": 1}))
    assert [(result.status, result.body) for result in results] == [
        (499, {"why": "client closed"}),
        (599, {"why": "network timeout"}),
        (599, {"success": False, "error": "upstream timed out"}),
        (200, {"id": 1}),
        (200, {"id": 2}),
    ]


# ----- 7. an answer DingTalk could not read is 502 -----


async def test_nan_in_json_or_a_markdown_content_that_is_not_text_is_502(forwarding, service):
    results = {}
    async with forwarding() as call:
        for name, answer in {
            "NaN": raw_answer(b'{"x": NaN}', "application/json"),
            "Infinity": raw_answer(b'{"x": [1, -Infinity]}', "application/json"),
        }.items():
            service.answer(DATA, answer)
            results[name] = await call("POST", DATA, {"n": 1})
        service.answer(NOTES, json_answer({"content": {"a": 1}}))
        results["content not text"] = await call("POST", NOTES, {"team": "运维"})
    assert {name: result.status for name, result in results.items()} == dict.fromkeys(results, 502), {
        name: result.body for name, result in results.items()
    }


# ----- 8. a lone surrogate in a POST's body -----


async def test_a_lone_surrogate_in_a_posts_body_is_forwarded_escaped_in_valid_utf8(forwarding, service, fake, remote):
    service.answer(NOTES, text_answer("**运维** 值班"))
    body = '{"team":  "运维\ud800"}'  # its spacing as sent; a lone surrogate, which UTF-8 cannot carry
    frame = json.dumps(callback("POST", NOTES, body))  # the frame's JSON escapes it: the callback's body holds it
    async with forwarding():
        result = await remote(fake.invoke(frame, timeout=60))
    assert (result.status, result.body) == (200, {"content": "**运维** 值班"}), result.body
    [seen] = service.requests
    text = seen.body.decode("utf-8")  # valid UTF-8
    assert json.loads(text) == {"team": "运维\ud800"}
    assert text.replace("\\uD800", "\\ud800") == '{"team":  "运维\\ud800"}'  # escaped; the rest as sent


# ----- 9. FORWARD_URL's own refusals -----


async def exits_or_connects(process: Any, fake: Any) -> int | None:
    """The exit code of a `python bot.py` expected to exit, or None once it connected (it started, and runs on)."""
    await wait_until(lambda: process.proc.returncode is not None or fake.open_attempts, 60)
    return None if process.proc.returncode is None else await process.wait(60)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/api?", "http://127.0.0.1:8000#"], ids=["empty-query", "hash"])
async def test_python_bot_py_with_an_empty_query_or_fragment_in_forward_url_exits_2_with_one_line(
    fake, bot_process, url
):
    process = await bot_process(bot_env(fake, FORWARD_URL=url))
    assert await exits_or_connects(process, fake) == 2, process.output
    [line] = process.lines
    assert line.startswith("error: FORWARD_URL"), line
    assert fake.open_attempts == 0


async def test_a_password_with_a_slash_in_forward_url_is_refused_and_never_shown(fake, bot_process):
    process = await bot_process(bot_env(fake, FORWARD_URL="http://user:pa/ss@127.0.0.1:8000"))
    assert await exits_or_connects(process, fake) == 2, process.output
    [line] = process.lines
    assert line.startswith("error: FORWARD_URL"), line
    assert "pa/ss" not in process.output, process.output


# ----- 10. only loopback skips the proxy -----


async def test_a_host_name_that_starts_with_127_goes_through_the_proxy_loopback_does_not(
    forwarding, service, remote, monkeypatch
):
    proxy = await remote(ForwardProxy().start())
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "")
    port = re.compile(rf":{service.port}(?!\d)")
    try:
        async with forwarding(forward_url=f"http://127.example.com:{service.port}", action_timeout_seconds=20) as call:
            await call("POST", DATA, {"n": 1})  # the proxy cannot reach it either: what matters is that it was asked
        proxied = [request for request in proxy.requests if port.search(request)]
        for host in ("127.0.0.1", "localhost"):
            async with forwarding(forward_url=f"http://{host}:{service.port}") as call:
                assert (await call("POST", DATA, {"n": 2})).status == 200
    finally:
        await remote(proxy.close())
    assert [request.split(" ", 1)[1] for request in proxied] == [f"http://127.example.com:{service.port}/v1/data"]
    assert [request for request in proxy.requests if port.search(request)] == proxied  # none for loopback
    assert len(service.requests) == 2


# ----- 11. lifespan: an exit on entry, an exception on exit -----

EXITS_ON_ENTRY = '''"""A lifespan that calls sys.exit() as it is entered."""

from __future__ import annotations

import contextlib
import sys


@contextlib.asynccontextmanager
async def lifespan():
    sys.exit(3)
    yield


async def get_roster(team: str) -> str:
    return team


ACTIONS = {"/v1/roster": get_roster}


'''
LEAVES = '''"""A lifespan that fails as it is left."""

from __future__ import annotations

import contextlib
import sys


@contextlib.asynccontextmanager
async def lifespan():
    yield
    {fails}


async def get_roster(team: str) -> str:
    return team


ACTIONS = {{"/v1/roster": get_roster}}


'''


async def test_a_lifespan_calling_sys_exit_on_entry_exits_1_with_its_traceback(fake, bot_process):
    tools = yaml.safe_dump(roster_tools())
    process = await bot_process(bot_env(fake), tools=tools, above_the_fence=EXITS_ON_ENTRY)
    assert await exits_or_connects(process, fake) == 1, process.output
    assert "Traceback (most recent call last)" in process.output and "SystemExit" in process.output, process.output
    assert fake.open_attempts == 0


@pytest.mark.parametrize(
    ("fails", "said"),
    [('raise RuntimeError("pool close failed")', "RuntimeError: pool close failed"), ("sys.exit(4)", "SystemExit")],
    ids=["raises", "sys-exit"],
)
async def test_a_lifespan_failing_on_exit_after_sigterm_exits_1_with_its_traceback(
    fake, remote, bot_process, fails, said
):
    tools = yaml.safe_dump(roster_tools())
    process = await bot_process(bot_env(fake), tools=tools, above_the_fence=LEAVES.format(fails=fails))
    await remote(fake.wait_connected(1))
    await process.wait_for_output("stream-1: connected", 60)
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait(60) == 1, process.output
    assert "Traceback (most recent call last)" in process.output, process.output
    assert re.search(rf"^{re.escape(said)}\b", process.output, re.MULTILINE), process.output


# ----- 12. an author's part without `from __future__ import annotations` -----

NO_FUTURE_IMPORT = '''"""An author's part of bot.py as a newcomer writes it: no `from __future__ import annotations`."""

import contextlib


async def get_roster(team: str) -> str:
    return f"**{team}** 值班"


ACTIONS = {"/v1/roster": get_roster}


'''


async def test_python_bot_py_whose_part_lacks_the_future_import_starts_and_serves(fake, remote, bot_process):
    tools = yaml.safe_dump(roster_tools())
    process = await bot_process(bot_env(fake), tools=tools, above_the_fence=NO_FUTURE_IMPORT)
    assert await exits_or_connects(process, fake) is None, process.output  # it started
    await remote(fake.wait_connected(1, 60))
    result = await remote(fake.invoke(graph_request("/v1/roster", {"team": "运维"}), timeout=60))
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait(60) == 0, process.output
    assert (result.status, result.body) == (200, {"content": "**运维** 值班"})


# ----- 13. a forwarded call past its time limit is named in the log -----


async def test_a_forwarded_call_past_its_time_limit_logs_the_operation_and_the_setting(forwarding, service, caplog):
    async def hangs(request: web.Request) -> web.Response:
        await service.release.wait()
        return web.json_response({})

    for path in ("/v1/hangs", "/v1/hangs-too"):
        service.answer(path, hangs)
    paths = {
        "/v1/hangs": {"post": body_operation("auto", {}, **{TIME_LIMIT: 0.5})},
        "/v1/hangs-too": {"get": query_operation("auto")},  # ACTION_TIMEOUT_SECONDS
    }
    async with forwarding(paths, action_timeout_seconds=0.5) as call:
        results = [await call("POST", "/v1/hangs", {}), await call("GET", "/v1/hangs-too")]
    assert [result.status for result in results] == [504, 504]
    lines = [record.getMessage() for record in caplog.records]
    assert [line for line in lines if "POST /v1/hangs" in line and TIME_LIMIT in line], lines
    assert [line for line in lines if "GET /v1/hangs-too" in line and "ACTION_TIMEOUT_SECONDS" in line], lines
