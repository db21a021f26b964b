"""Skills whose work lives elsewhere: FORWARD_URL, x-action-timeout-seconds and `lifespan` (docs/forwarding.md).

Each operation of the tools file without an action is forwarded to a real HTTP service on 127.0.0.1
(tests/http_service.py), which records every request as it arrived: what it receives, what never reaches it,
how its answer is given in each display mode, and each way it can fail. Then the time limit per operation, for
actions and forwarded calls alike, and `lifespan`: the shared clients, entered before the first connection and left
after the last callback is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import dingtalk_stream
import pytest
import yaml
from aiohttp import web

import bot
from tests.conftest import ROOT, settings_for, wait_until
from tests.fake_dingtalk import GRAPH_TOPIC, ForwardProxy, GraphResult, bot_env, free_port, graph_request
from tests.http_service import HttpService
from tests.samples import SAMPLE_TOOLS
from tests.test_own_skills import ENGINE_1_0_0_PART, TOOLS_1_0_0, project_with

MARKDOWN_CARD = dingtalk_stream.GraphHandler.MARKDOWN_TEMPLATE_ID
ITEM, NOTES, CARDS, DATA = "/v1/items/{id}", "/v1/notes", "/v1/cards", "/v1/data"
USER_ID = {"type": "string", "x-dingtalk-context": {"property": "currentUser", "format": "userId"}}
WEBHOOK = {"type": "string", "x-dingtalk-context": {"property": "currentConversation", "format": "sessionWebhook"}}
TIME_LIMIT = "x-action-timeout-seconds"
OK = {"200": {"description": "OK"}}


def body_operation(display: str, properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict:
    """A POST operation, its parameters the properties of a JSON body."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    schema |= {"required": list(required)} if required else {}
    body = {"content": {"application/json": {"schema": schema}}}
    return {"x-dingtalk-display-result": display, "requestBody": body, "responses": OK} | extra


def query_operation(display: str, parameters: list[dict[str, Any]] | None = None, **extra: Any) -> dict:
    """A GET operation, its parameters in the path and the query string."""
    return {"x-dingtalk-display-result": display, "parameters": parameters or [], "responses": OK} | extra


PATHS: dict[str, dict[str, Any]] = {
    ITEM: {
        "get": query_operation(
            "auto",
            [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "q", "in": "query", "schema": {"type": "string", "maxLength": 20}},
                {"name": "tag", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10}},
                {"name": "t", "in": "query", "schema": {"type": "string"}},
            ],
        )
    },
    NOTES: {
        "post": body_operation(
            "markdown",
            {
                "team": {"type": "string", "maxLength": 10},
                "weeks": {"type": "integer", "minimum": 1, "maximum": 8, "default": 1},
                "userId": USER_ID,
            },
            required=("team",),
        )
    },
    CARDS: {
        "post": body_operation("disabled", {"location": {"type": "string"}, "sessionWebhook": WEBHOOK}, ("location",))
    },
    DATA: {"post": body_operation("auto", {"n": {"type": "integer"}})},
}


def spec(paths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"openapi": "3.0.1", "info": {"title": "t", "version": "1"}, "x-dingtalk-protocol": "stream", "paths": paths}


def callback(method: str, uri: str, body: Any = None) -> dict[str, Any]:
    """A Graph callback as DingTalk pushes it: the uri exactly as given, a POST's body text exactly as given."""
    text = body if isinstance(body, str) else json.dumps(body or {}, ensure_ascii=False)
    return {
        "requestLine": {"method": method, "uri": uri},
        "headers": {"content-type": "application/json"},
        "body": text,
    }


# ----- what the service answers -----


def json_answer(value: Any, status: int = 200) -> Callable[[web.Request], web.Response]:
    return lambda request: web.json_response(value, status=status)


def text_answer(text: str, kind: str = "text/markdown", status: int = 200) -> Callable[[web.Request], web.Response]:
    return lambda request: web.Response(text=text, content_type=kind, status=status)


def raw_answer(body: bytes, kind: str, status: int = 200) -> Callable[[web.Request], web.Response]:
    return lambda request: web.Response(body=body, status=status, headers={"Content-Type": kind})


def empty_answer(status: int) -> Callable[[web.Request], web.Response]:
    return lambda request: web.Response(status=status)


# ----- fixtures -----

Call = Callable[..., Coroutine[Any, Any, GraphResult]]


@pytest.fixture
async def service() -> AsyncIterator[HttpService]:
    running = await HttpService().start()
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
def forwarding(
    fake, remote, tmp_path: Path, service: HttpService
) -> Callable[..., contextlib.AbstractAsyncContextManager[Call]]:
    """`async with forwarding(paths, actions, **settings) as call:` serves the tools file of `paths` (default PATHS)
    with `actions` (default none) through bot.running() and the fake, with FORWARD_URL the service's (or the
    `forward_url` given); `await call("GET", "/v1/items/1?q=x")` pushes a callback of that uri (and a POST's body)
    and answers as DingTalk gets it."""
    files = itertools.count(1)

    @contextlib.asynccontextmanager
    async def serve(
        paths: dict[str, dict[str, Any]] = PATHS,
        actions: dict[str, Callable[..., Any]] | None = None,
        forward_url: str | None = None,
        **overrides: Any,
    ) -> AsyncIterator[Call]:
        tools = tmp_path / f"tools-{next(files)}.yaml"
        tools.write_text(json.dumps(spec(paths), ensure_ascii=False), encoding="utf-8")
        settings = settings_for(fake, forward_url=service.url if forward_url is None else forward_url, **overrides)

        async def call(method: str, uri: str, body: Any = None, message_id: str | None = None) -> GraphResult:
            return await remote(fake.invoke(callback(method, uri, body), message_id=message_id, timeout=60))

        async with bot.running(actions or {}, tools, settings=settings):
            yield call

    return serve


def posts_to(fake, webhook: str) -> list[Any]:
    return [post for post in fake.webhook_posts if webhook.endswith(f"session={post.session}")]


# ----- what the service receives -----


async def test_a_get_reaches_the_service_with_its_path_and_query_exactly_as_sent_and_the_headers(forwarding, service):
    uri = "/v1/items/%e5%a4%a9%20x?q=a%20b&tag=x%2By&limit=3&t=%7E"  # as DingTalk wrote it: nothing re-encoded
    service.answer("/v1/items/天 x", json_answer({"item": "天 x"}))
    async with forwarding() as call:
        answered = await call("GET", uri, message_id="msg-forwarded-get")
    assert (answered.status, answered.body) == (200, {"item": "天 x"})
    [seen] = service.requests
    assert (seen.method, seen.target, seen.body) == ("GET", uri, b"")
    assert seen.headers["X-DingTalk-Message-Id"] == "msg-forwarded-get"
    assert seen.headers["Accept"] == "application/json, text/markdown, text/plain"


async def test_a_post_reaches_the_service_with_its_body_as_sent_in_utf8_context_fields_and_all(forwarding, service):
    body = '{"team":"运维",  "weeks": 2.0, "userId": "manager-01"}'  # its spacing, its 2.0: as sent, not re-encoded
    service.answer(NOTES, text_answer("**运维** 值班 / on call"))
    async with forwarding() as call:
        answered = await call("POST", NOTES, body, message_id="msg-forwarded-post")
        no_weeks = await call("POST", NOTES, {"team": "前端"})  # its default is not filled in: the body as sent
    assert (answered.status, answered.body) == (200, {"content": "**运维** 值班 / on call"})
    assert no_weeks.status == 200
    first, second = service.requests
    assert (first.method, first.target, first.body) == ("POST", NOTES, body.encode("utf-8"))
    assert first.headers["Content-Type"] == "application/json; charset=utf-8"
    assert first.headers["X-DingTalk-Message-Id"] == "msg-forwarded-post"
    assert first.headers["Accept"] == "application/json, text/markdown, text/plain"
    assert json.loads(second.body) == {"team": "前端"}


async def test_undeclared_methods_and_paths_are_404_and_never_reach_the_service(forwarding, service):
    async with forwarding() as call:
        refused = [
            await call("POST", "/v1/items/1", {}),  # a declared path, another method
            await call("GET", "/v1/nowhere"),
            await call("GET", NOTES),
            await call("POST", "/v1/items/1/more", {}),
        ]
        assert service.requests == []
        served = await call("GET", "/v1/items/1")  # what is declared does reach it
    assert [result.status for result in refused] == [404] * 4
    assert all(result.body["success"] is False for result in refused)
    assert served.status == 200 and [seen.target for seen in service.requests] == ["/v1/items/1"]


@pytest.mark.parametrize(
    ("method", "uri", "body", "reason"),
    [
        ("GET", "/v1/items/1?limit=11", None, "parameter limit must be smaller than or equal to 10"),
        ("GET", "/v1/items/1?limit=many", None, "parameter limit must be integer"),
        ("GET", "/v1/items/1?q=" + "x" * 21, None, "parameter q must be shorter than or equal to 20 characters"),
        ("POST", NOTES, {"weeks": 2}, "missing parameter(s): team"),
        ("POST", NOTES, {"team": "运维", "weeks": 9}, "parameter weeks must be smaller than or equal to 8"),
        ("POST", NOTES, '["not", "an", "object"]', "body is not a JSON object"),
        ("POST", CARDS, {"location": "杭州", "sessionWebhook": "https://evil.example/send"}, "is not allowed"),
    ],
    ids=["above-maximum", "not-an-integer", "too-long", "missing", "body-above-maximum", "not-an-object", "webhook"],
)
async def test_a_call_breaking_the_schema_is_400_and_never_reaches_the_service(
    forwarding, service, method, uri, body, reason
):
    async with forwarding() as call:
        refused = await call(method, uri, body)
    assert refused.status == 400 and reason in refused.body["error"], refused.body
    assert service.requests == []


async def test_a_redelivered_callback_is_forwarded_once_and_answered_alike(forwarding, service, fake, remote):
    async with forwarding() as call:
        assert (await call("POST", DATA, {"n": 1})).status == 200
        for _ in range(2):  # the same messageId twice, as DingTalk redelivers an unacked callback
            await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, callback("POST", DATA, {"n": 2}), message_id="m-2"))
        first, again = await remote(fake.wait_ack("m-2", count=1)), await remote(fake.wait_ack("m-2", count=2))
    assert first["data"] == again["data"]
    assert [json.loads(seen.body)["n"] for seen in service.requests] == [1, 2]


async def test_forwarded_calls_share_one_pooled_connection(forwarding, service):
    peers: list[Any] = []

    def from_where(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response({})

    service.answer(DATA, from_where)
    async with forwarding() as call:
        for n in range(3):
            assert (await call("POST", DATA, {"n": n})).status == 200
    assert len(peers) == 3 and len(set(peers)) == 1, peers  # one keep-alive connection, not one per call


# ----- the answer, by display mode -----


@pytest.mark.parametrize(
    ("display", "answer", "status", "body", "card"),
    [
        pytest.param(
            "auto",
            json_answer({"价格": 1.5, "items": [1, 2]}),
            200,
            {"价格": 1.5, "items": [1, 2]},
            None,
            id="auto-object",
        ),
        pytest.param("auto", json_answer([{"id": 1}, {"id": 2}]), 200, [{"id": 1}, {"id": 2}], None, id="auto-list"),
        pytest.param("auto", text_answer("晴 Sunny", "text/plain"), 502, None, None, id="auto-text"),
        pytest.param("auto", text_answer("# 晴"), 502, None, None, id="auto-markdown"),
        pytest.param("auto", raw_answer(b'{"not": json', "application/json"), 502, None, None, id="auto-broken-json"),
        pytest.param("auto", empty_answer(204), 502, None, None, id="auto-204"),
        pytest.param(
            "markdown", text_answer("**运维** 值班"), 200, {"content": "**运维** 值班"}, None, id="markdown-markdown"
        ),
        pytest.param(
            "markdown",
            text_answer("值班 / on call", "text/plain"),
            200,
            {"content": "值班 / on call"},
            None,
            id="markdown-plain",
        ),
        pytest.param(
            "markdown", json_answer({"content": "**x**"}), 200, {"content": "**x**"}, None, id="markdown-content"
        ),
        pytest.param("markdown", json_answer({"text": "x"}), 502, None, None, id="markdown-other-json"),
        pytest.param("markdown", text_answer("<b>x</b>", "text/html"), 502, None, None, id="markdown-html"),
        pytest.param("markdown", empty_answer(204), 502, None, None, id="markdown-204"),
        pytest.param(
            "disabled",
            text_answer("### 杭州\n- 晴 Sunny"),
            200,
            {"success": True},
            "### 杭州\n- 晴 Sunny",
            id="disabled-markdown",
        ),
        pytest.param(
            "disabled", text_answer("杭州 晴", "text/plain"), 200, {"success": True}, "杭州 晴", id="disabled-plain"
        ),
        pytest.param("disabled", empty_answer(204), 200, {"success": True}, None, id="disabled-204-replied-itself"),
        pytest.param("disabled", json_answer({"content": "x"}), 502, None, None, id="disabled-json"),
        pytest.param("disabled", text_answer("<b>x</b>", "text/html"), 502, None, None, id="disabled-html"),
    ],
)
async def test_each_display_mode_takes_its_own_kind_of_answer(
    forwarding, service, fake, display, answer, status, body, card
):
    webhook = {"sessionWebhook": WEBHOOK} if display == "disabled" else {}
    paths = {"/v1/answer": {"post": body_operation(display, {"location": {"type": "string"}, **webhook})}}
    service.answer("/v1/answer", answer)
    url = fake.webhook_url()
    async with forwarding(paths) as call:
        result = await call("POST", "/v1/answer", {"location": "杭州", **({"sessionWebhook": url} if webhook else {})})
    assert result.status == status, result.body
    if body is None:
        assert result.body["success"] is False and result.body["error"]
    else:
        assert result.body == body
    posts = posts_to(fake, url)
    if card is None:
        assert posts == []  # 204: the service replied itself; a failure posts nothing
    else:
        [post] = posts
        assert post.payload["content"]["templateId"] == MARKDOWN_CARD and post.markdown == card
    [seen] = service.requests
    if webhook:  # the context fields in the body, sessionWebhook too: the service may reply itself
        assert json.loads(seen.body)["sessionWebhook"] == url


async def test_an_auto_answer_is_the_graph_body_as_the_service_wrote_it(forwarding, service):
    written = '{"价格":1.50,  "when": "明天"}'
    service.answer(DATA, raw_answer(written.encode(), "application/json; charset=utf-8"))
    async with forwarding() as call:
        result = await call("POST", DATA, {"n": 1})
    assert result.status == 200
    assert json.loads(result.ack["data"])["response"]["body"] == written


async def test_a_disabled_answer_the_webhook_refuses_is_502(forwarding, service, fake):
    fake.webhook_status = 500
    service.answer(CARDS, text_answer("### 杭州"))
    async with forwarding() as call:
        result = await call("POST", CARDS, {"location": "杭州", "sessionWebhook": fake.webhook_url()})
    assert result.status == 502 and len(fake.webhook_posts) == 1


# ----- the service's own failures, passed on -----


@pytest.mark.parametrize(
    ("display", "answer", "status", "body"),
    [
        (
            "auto",
            json_answer({"detail": "没有这个工单 / no such ticket"}, 404),
            404,
            {"detail": "没有这个工单 / no such ticket"},
        ),
        ("markdown", json_answer(["a", "list"], 409), 409, ["a", "list"]),
        (
            "markdown",
            text_answer("team 不认识 / unknown team", "text/plain", 422),
            422,
            {"success": False, "error": "team 不认识 / unknown team"},
        ),
        (
            "auto",
            text_answer("<h1>Bad Gateway</h1>", "text/html", 502),
            502,
            {"success": False, "error": "<h1>Bad Gateway</h1>"},
        ),
        ("auto", text_answer("x" * 3000, "text/plain", 503), 503, {"success": False, "error": "x" * 1000}),
        ("disabled", empty_answer(500), 500, {"success": False, "error": "Internal Server Error"}),
        ("auto", empty_answer(404), 404, {"success": False, "error": "Not Found"}),
    ],
    ids=["json-404", "json-409", "text-422", "html-502", "long-text-503", "empty-500", "empty-404"],
)
async def test_the_services_4xx_and_5xx_are_passed_on_with_their_status(
    forwarding, service, fake, display, answer, status, body
):
    webhook = {"sessionWebhook": WEBHOOK} if display == "disabled" else {}
    paths = {"/v1/fails": {"post": body_operation(display, {"n": {"type": "integer"}, **webhook})}}
    service.answer("/v1/fails", answer)
    async with forwarding(paths) as call:
        result = await call(
            "POST", "/v1/fails", {"n": 1, **({"sessionWebhook": fake.webhook_url()} if webhook else {})}
        )
    assert (result.status, result.body) == (status, body)
    assert fake.webhook_posts == []


async def test_a_service_not_listening_is_502_naming_its_host_and_port_and_the_bot_serves_on(forwarding):
    port = free_port()  # nothing listens there yet
    async with forwarding(forward_url=f"http://127.0.0.1:{port}") as call:
        refused = await call("POST", DATA, {"n": 1})
        late = await HttpService().start(port)  # the service comes up
        try:
            answered = await call("POST", DATA, {"n": 2})
        finally:
            await late.close()
    assert refused.status == 502 and f"127.0.0.1:{port}" in refused.body["error"], refused.body
    assert answered.status == 200 and [json.loads(seen.body) for seen in late.requests] == [{"n": 2}]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_502_and_not_followed(forwarding, service, status):
    service.answer(DATA, lambda request: web.Response(status=status, headers={"Location": "/v1/elsewhere"}))
    async with forwarding() as call:
        result = await call("POST", DATA, {"n": 1})
    assert result.status == 502 and result.body["success"] is False
    assert [seen.target for seen in service.requests] == [DATA]


async def test_the_service_hanging_up_mid_answer_is_502(forwarding, service):
    async def cut_off(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "64"})
        await response.prepare(request)
        await response.write(b'{"half": ')
        request.transport.abort()
        return response

    service.answer(DATA, cut_off)
    async with forwarding() as call:
        result = await call("POST", DATA, {"n": 1})
    assert result.status == 502


# ----- sizes: what an ack can carry -----


async def test_an_answer_over_the_ack_limit_is_502_and_one_well_under_it_passes(forwarding, service):
    under, over = {"data": "x" * (100 << 10)}, {"data": "x" * (300 << 10)}  # the limit: 256 KiB
    service.answer("/v1/under", json_answer(under))
    service.answer("/v1/over", json_answer(over))
    paths = {path: {"get": query_operation("auto")} for path in ("/v1/under", "/v1/over")}
    async with forwarding(paths) as call:
        passed, refused = await call("GET", "/v1/under"), await call("GET", "/v1/over")
    assert (passed.status, passed.body) == (200, under)
    assert refused.status == 502 and refused.body["success"] is False


async def test_an_endless_answer_is_502_within_the_time_limit_and_the_bot_stops_reading_it(forwarding, service):
    written, finished = [0], asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            while True:  # 6.4 MB a second, until the bot hangs up
                await response.write(b" " * 65536)
                written[0] += 65536
                await asyncio.sleep(0.01)
        except ConnectionError:
            pass
        finally:
            finished.set()
        return response

    service.answer("/v1/endless", endless)
    paths = {"/v1/endless": {"get": query_operation("auto", **{TIME_LIMIT: 20})}}
    async with forwarding(paths) as call:
        result = await call("GET", "/v1/endless")
        await asyncio.wait_for(finished.wait(), 30)  # the bot hung up
    assert result.status == 502, result.body  # not 504: it did not read on until the time limit
    assert written[0] < 32 << 20, written  # 20 s of it would be 128 MB


# ----- proxies, and a path prefix -----


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_loopback_forward_url_never_goes_through_a_proxy(forwarding, service, remote, monkeypatch, host):
    proxy = await remote(ForwardProxy().start())
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("http_proxy", proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "")
    try:
        async with forwarding(forward_url=f"http://{host}:{service.port}") as call:
            answered = await call("POST", DATA, {"n": 1})
    finally:
        await remote(proxy.close())
    assert answered.status == 200 and len(service.requests) == 1
    assert any("/v1.0/gateway/connections/open" in request for request in proxy.requests)  # the proxy is in use ...
    assert not [r for r in proxy.requests if re.search(rf":{service.port}(?!\d)", r)]  # ... but not for the service


async def test_a_forward_url_with_a_path_prefix_keeps_it_before_each_calls_path_and_query(forwarding, service):
    async with forwarding(forward_url=f"{service.url}/api") as call:
        answered = await call("GET", "/v1/items/7?q=a%20b")
        posted = await call("POST", DATA, {"n": 1})
    assert answered.status == posted.status == 200
    assert [seen.target for seen in service.requests] == ["/api/v1/items/7?q=a%20b", "/api/v1/data"]


# ----- which operations are forwarded -----


async def test_with_forward_url_and_no_actions_every_operation_is_served_by_the_service(forwarding, service, fake):
    service.answer(NOTES, text_answer("**值班**"))
    service.answer(CARDS, text_answer("### 杭州"))
    async with forwarding(actions={}) as call:
        results = [
            await call("GET", "/v1/items/1"),
            await call("POST", NOTES, {"team": "运维"}),
            await call("POST", CARDS, {"location": "杭州", "sessionWebhook": fake.webhook_url()}),
            await call("POST", DATA, {"n": 1}),
        ]
    assert [result.status for result in results] == [200] * 4, [result.body for result in results]
    assert [seen.target for seen in service.requests] == ["/v1/items/1", NOTES, CARDS, DATA]
    assert [post.markdown for post in fake.webhook_posts] == ["### 杭州"]


async def test_without_forward_url_a_path_without_an_action_stops_the_start_as_before(fake, tmp_path):
    tools = tmp_path / "tools.yaml"
    tools.write_text(json.dumps(spec(PATHS)), encoding="utf-8")
    with pytest.raises(bot.ConfigError, match=r"declares /v1/\S+, but ACTIONS in bot.py has no action for it"):
        async with bot.running({}, tools, settings=settings_for(fake)):
            pytest.fail("running() must not yield with a path that nothing serves")
    assert fake.open_attempts == 0


async def test_an_action_beside_forwarded_operations_runs_as_before(forwarding, service):
    async def get_notes(team: str, weeks: int = 1) -> str:
        return f"{team} × {weeks}"

    async with forwarding(actions={NOTES: get_notes}) as call:
        acted = await call("POST", NOTES, {"team": "运维"})
        refused = await call("POST", NOTES, {"team": "运维", "weeks": 9})
        forwarded = await call("GET", "/v1/items/1")
    assert (acted.status, acted.body) == (200, {"content": "运维 × 1"})  # typed, its default filled in
    assert refused.status == 400
    assert forwarded.status == 200 and [seen.target for seen in service.requests] == ["/v1/items/1"]


def test_load_operations_forwards_a_path_without_an_action_only_when_told():
    async def get_notes(team: str, weeks: int = 1) -> str:
        return team

    operations = bot.load_operations(spec(PATHS), {NOTES: get_notes}, forwarding=True)
    assert {key: op.action for key, op in operations.items()} == {
        f"GET {ITEM}": None,
        f"POST {NOTES}": get_notes,
        f"POST {CARDS}": None,
        f"POST {DATA}": None,
    }
    with pytest.raises(bot.ConfigError, match=r"declares /v1/\S+, but ACTIONS in bot.py has no action for it"):
        bot.load_operations(spec(PATHS), {NOTES: get_notes})
    with pytest.raises(
        bot.ConfigError, match=re.escape("ACTIONS in bot.py has /v1/gone, but tools.yaml does not declare it")
    ):
        bot.load_operations(spec(PATHS), {"/v1/gone": get_notes}, forwarding=True)  # an action needs its path still


# ----- the time limit of an operation -----


async def test_an_operations_time_limit_beats_a_longer_action_timeout_seconds(forwarding, service):
    async def hang(request: web.Request) -> web.Response:
        await service.release.wait()
        return web.json_response({})

    async def hangs() -> dict:
        await asyncio.Event().wait()
        return {}

    service.answer("/v1/hangs", hang)
    paths = {
        "/v1/hangs": {"get": query_operation("auto", **{TIME_LIMIT: 0.5})},
        "/v1/action-hangs": {"post": body_operation("auto", {}, **{TIME_LIMIT: 0.5})},
    }
    async with forwarding(paths, actions={"/v1/action-hangs": hangs}, action_timeout_seconds=60) as call:
        forwarded, acted = await call("GET", "/v1/hangs"), await call("POST", "/v1/action-hangs", {})
    assert forwarded.status == acted.status == 504
    assert forwarded.elapsed < 30 and acted.elapsed < 30  # its 0.5 s, not ACTION_TIMEOUT_SECONDS' 60 (a generous bound)
    assert [seen.target for seen in service.requests] == ["/v1/hangs"]  # it reached the service, which took too long


async def test_an_operations_time_limit_beats_a_shorter_action_timeout_seconds(forwarding, service):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)  # the service is slow: longer than ACTION_TIMEOUT_SECONDS below
        return web.json_response({"slow": True})

    async def slow_action() -> dict:
        await asyncio.sleep(1.0)
        return {"slow": True}

    for path in ("/v1/patient", "/v1/hasty"):
        service.answer(path, slow)
    paths = {
        "/v1/patient": {"get": query_operation("auto", **{TIME_LIMIT: 30})},
        "/v1/hasty": {"get": query_operation("auto")},  # no limit of its own: ACTION_TIMEOUT_SECONDS
        "/v1/action-patient": {"post": body_operation("auto", {}, **{TIME_LIMIT: 30})},
    }
    async with forwarding(paths, actions={"/v1/action-patient": slow_action}, action_timeout_seconds=0.5) as call:
        patient, hasty = await call("GET", "/v1/patient"), await call("GET", "/v1/hasty")
        acted = await call("POST", "/v1/action-patient", {})
    assert (patient.status, patient.body) == (200, {"slow": True})
    assert (acted.status, acted.body) == (200, {"slow": True})
    assert hasty.status == 504


def test_an_operations_time_limit_is_read_from_x_action_timeout_seconds():
    paths = {
        f"/v1/t{n}": {"get": query_operation("auto", **({TIME_LIMIT: value} if value is not None else {}))}
        for n, value in enumerate([12, 0.1, 3600, 2.5, None])
    }
    operations = bot.load_operations(spec(paths), {}, forwarding=True)
    assert [op.time_limit for op in operations.values()] == [12, 0.1, 3600, 2.5, None]


@pytest.mark.parametrize("value", ["soon", "12", 0, 0.05, 3601, True, None, [12]], ids=repr)
def test_a_time_limit_that_is_not_a_number_of_seconds_in_range_names_the_operation(value):
    paths = {DATA: {"post": body_operation("auto", {"n": {"type": "integer"}}) | {TIME_LIMIT: value}}}
    with pytest.raises(bot.ConfigError, match=f"POST {DATA}") as err:
        bot.load_operations(spec(paths), {}, forwarding=True)
    assert TIME_LIMIT in str(err.value) and "\n" not in str(err.value)


# ----- settings -----

CREDENTIALS = {"CLIENT_ID": "id", "CLIENT_SECRET": "secret"}


@pytest.mark.parametrize(
    ("given", "read"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/api/", "http://127.0.0.1:8000/api"),
        ("https://skills.internal.example/v2", "https://skills.internal.example/v2"),
    ],
)
def test_forward_url_is_read_with_its_trailing_slash_dropped(given, read):
    assert bot.load_settings(CREDENTIALS | {"FORWARD_URL": given}).forward_url == read
    assert bot.load_settings(CREDENTIALS).forward_url is None


BAD_FORWARD_URLS = [
    "ftp://127.0.0.1:8000",
    "127.0.0.1:8000",
    "http://",
    "http://127.0.0.1:99999",
    "http://127.0.0.1:8000/api?key=1",
    "http://127.0.0.1:8000/#top",
]


@pytest.mark.parametrize("url", BAD_FORWARD_URLS)
def test_a_forward_url_the_bot_cannot_use_is_a_config_error(url):
    with pytest.raises(bot.ConfigError, match="FORWARD_URL") as err:
        bot.load_settings(CREDENTIALS | {"FORWARD_URL": url})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("url", [*BAD_FORWARD_URLS[:1], BAD_FORWARD_URLS[4]])
async def test_python_bot_py_with_a_bad_forward_url_exits_2_with_one_line(fake, bot_process, url):
    process = await bot_process(bot_env(fake, FORWARD_URL=url))
    assert await process.wait() == 2
    [line] = process.lines
    assert line.startswith("error: FORWARD_URL"), line
    assert fake.open_attempts == 0


async def test_a_forward_url_with_user_and_password_is_refused_without_showing_the_password(fake, bot_process):
    process = await bot_process(bot_env(fake, FORWARD_URL="http://admin:S3cret-4711@127.0.0.1:8000"))
    assert await process.wait() == 2
    [line] = process.lines
    assert line.startswith("error: FORWARD_URL") and "S3cret-4711" not in line, line
    assert fake.open_attempts == 0


def with_time_limit(value: str) -> str:
    """The sample tools file, with POST /v1/actions/on-call given x-action-timeout-seconds: `value`."""
    tools = SAMPLE_TOOLS.read_text(encoding="utf-8")
    marker = "      x-dingtalk-display-result: markdown\n"
    assert tools.count(marker) == 1
    return tools.replace(marker, f"{marker}      {TIME_LIMIT}: {value}\n")


@pytest.mark.parametrize("value", ["soon", "0", "3601"])
async def test_python_bot_py_with_a_bad_time_limit_exits_2_with_one_line_naming_the_operation(fake, bot_process, value):
    process = await bot_process(bot_env(fake), tools=with_time_limit(value))
    assert await process.wait() == 2
    [line] = process.lines
    assert line.startswith("error: ") and "POST /v1/actions/on-call" in line and TIME_LIMIT in line, line
    assert fake.open_attempts == 0


@pytest.mark.parametrize(("value", "warned"), [("20", True), ("16", False)])
async def test_a_time_limit_over_16_s_gets_the_redelivery_warning_naming_the_operation(
    fake, remote, bot_process, value, warned
):
    process = await bot_process(bot_env(fake), tools=with_time_limit(value))
    await remote(fake.wait_connected(1))
    await process.wait_for_output("stream-1: connected")
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    said = [line.split("bot: ", 1)[-1] for line in process.lines if "WARNING" in line]
    naming = [message for message in said if "/v1/actions/on-call" in message and "16" in message]
    assert len(naming) == warned, said


# ----- python bot.py with FORWARD_URL -----


async def test_python_bot_py_says_what_it_forwards_at_start_and_forwards_it(fake, remote, bot_process, service):
    paths = {
        "/v1/a": {"get": query_operation("auto", [{"name": "q", "in": "query", "schema": {"type": "string"}}])},
        "/v1/b": {"post": body_operation("auto", {"n": {"type": "integer"}})},
        "/v1/c": {"post": body_operation("markdown", {"team": {"type": "string"}})},
    }
    prelude = (
        'async def get_c(team: str) -> str:\n    return team\n\nbot.ACTIONS.clear()\nbot.ACTIONS["/v1/c"] = get_c\n'
    )
    env = bot_env(fake, FORWARD_URL=f"{service.url}/api/")
    process = await bot_process(env, prelude=prelude, tools=json.dumps(spec(paths)))
    await remote(fake.wait_connected(1))
    result = await remote(fake.invoke(callback("GET", "/v1/a?q=%E4%BD%A0"), message_id="msg-from-bot-py"))
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    said = [line for line in process.lines if " forwarding " in line]
    assert [line.split("bot: ", 1)[1] for line in said] == [
        f"forwarding 2 operation(s) to {service.url}/api: GET /v1/a, POST /v1/b"
    ], process.output
    assert result.status == 200
    [seen] = service.requests
    assert (seen.target, seen.headers["X-DingTalk-Message-Id"]) == ("/api/v1/a?q=%E4%BD%A0", "msg-from-bot-py")


# ----- lifespan: shared clients -----


def roster_tools(path: str = "/v1/roster") -> dict[str, Any]:
    return spec({path: {"post": body_operation("markdown", {"team": {"type": "string"}}, ("team",))}})


async def test_lifespan_is_entered_before_the_first_connection_and_left_after_the_last_callback_is_answered(
    fake, remote, service, tmp_path
):
    events: list[tuple[str, Any]] = []
    shared: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        events.append(("entered", fake.open_attempts))
        async with aiohttp.ClientSession() as session:
            shared["http"] = session
            yield
        events.append(("left", session.closed))

    async def get_roster(team: str) -> str:
        events.append(("called", team))
        async with shared["http"].get(f"{service.url}/roster", params={"team": team}) as response:
            answer = await response.text()
        events.append(("answered", team))
        return answer

    async def held(request: web.Request) -> web.Response:
        await service.release.wait()  # until the bot is stopping: the callback is in hand through the drain
        return web.Response(text=f"**{request.query['team']}** 值班", content_type="text/plain")

    service.answer("/roster", held)
    tools = tmp_path / "tools.yaml"
    tools.write_text(json.dumps(roster_tools()), encoding="utf-8")
    settings = settings_for(fake)
    async with bot.running({"/v1/roster": get_roster}, tools, settings=settings, lifespan=lifespan) as clients:
        assert events == [("entered", 0)]  # before the first connection opened
        request = graph_request("/v1/roster", {"team": "运维"})
        message_id = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, request))
        await wait_until(lambda: service.requests)

        async def release_once_stopping() -> None:
            await clients[0].stopping.wait()
            service.release.set()

        releasing = asyncio.create_task(release_once_stopping())
    await releasing
    ack = await remote(fake.wait_ack(message_id))
    response = json.loads(ack["data"])["response"]
    assert response["statusLine"]["code"] == 200, response  # the shared session was still open through the drain
    assert json.loads(response["body"]) == {"content": "**运维** 值班"}
    assert events == [("entered", 0), ("called", "运维"), ("answered", "运维"), ("left", True)]


async def test_running_raises_what_lifespan_raises_and_connects_nothing(fake, tmp_path):
    entered = []

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        entered.append(True)
        raise RuntimeError("the database is not there")
        yield

    async def get_roster(team: str) -> str:
        return team

    tools = tmp_path / "tools.yaml"
    tools.write_text(json.dumps(roster_tools()), encoding="utf-8")
    with pytest.raises(RuntimeError, match="the database is not there"):
        async with bot.running({"/v1/roster": get_roster}, tools, settings=settings_for(fake), lifespan=lifespan):
            pytest.fail("running() must not yield when lifespan fails")
    assert entered == [True] and fake.open_attempts == 0


SHARED_CLIENT_PART = '''"""Skills whose client is shared: made once by lifespan, used by every call."""

from __future__ import annotations

import contextlib
import os

import aiohttp

SHARED = {}


@contextlib.asynccontextmanager
async def lifespan():
    print("lifespan: entering", flush=True)
    async with aiohttp.ClientSession() as session:
        SHARED["http"] = session
        yield
    print("lifespan: left", flush=True)


async def get_roster(team: str) -> str:
    async with SHARED["http"].get(os.environ["ROSTER_URL"], params={"team": team}) as response:
        return await response.text()


ACTIONS = {"/v1/roster": get_roster}


'''
FAILING_PART = '''"""A lifespan that fails as it is entered."""

from __future__ import annotations

import contextlib


@contextlib.asynccontextmanager
async def lifespan():
    raise RuntimeError("the database is not there")
    yield


async def get_roster(team: str) -> str:
    return team


ACTIONS = {"/v1/roster": get_roster}


'''


async def test_python_bot_py_enters_the_lifespan_of_its_own_part_first_and_leaves_it_last(
    fake, remote, bot_process, service
):
    async def held(request: web.Request) -> web.Response:
        await service.release.wait()
        return web.Response(text=f"**{request.query['team']}** 值班", content_type="text/markdown")

    service.answer("/roster", held)
    env = bot_env(fake, ROSTER_URL=f"{service.url}/roster")
    process = await bot_process(env, tools=yaml.safe_dump(roster_tools()), above_the_fence=SHARED_CLIENT_PART)
    await remote(fake.wait_connected(1))
    message_id = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, graph_request("/v1/roster", {"team": "运维"})))
    await wait_until(lambda: service.requests)
    process.proc.send_signal(signal.SIGTERM)  # with the callback in hand
    await process.wait_for_output("SIGTERM received")
    service.release.set()
    assert await process.wait() == 0, process.output
    ack = await remote(fake.wait_ack(message_id))
    assert json.loads(json.loads(ack["data"])["response"]["body"]) == {"content": "**运维** 值班"}
    lines = process.lines

    def where(text: str) -> int:
        [index] = [n for n, line in enumerate(lines) if text in line]
        return index

    assert where("lifespan: entering") < where("stream-1: connected")
    assert where(f"callback {message_id} POST /v1/roster -> 200") < where("lifespan: left"), process.output


async def test_python_bot_py_whose_lifespan_fails_at_entry_logs_its_traceback_and_exits_1(fake, bot_process):
    process = await bot_process(bot_env(fake), tools=yaml.safe_dump(roster_tools()), above_the_fence=FAILING_PART)
    assert await process.wait() == 1, process.output
    assert "Traceback (most recent call last)" in process.output
    assert re.search(r"^RuntimeError: the database is not there$", process.output, re.MULTILINE), process.output
    assert fake.open_attempts == 0


# ----- the docs' examples, run as written -----

FORWARDING_DOC = (ROOT / "docs" / "forwarding.md").read_text(encoding="utf-8")
SKILLS_DOC = (ROOT / "docs" / "skills.md").read_text(encoding="utf-8")


def doc_block(text: str, language: str, containing: str) -> str:
    [found] = [block for block in re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL) if containing in block]
    return found


async def until_listening(url: str, timeout: float = 60.0) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def answers() -> bool:
            try:
                async with http.get(url) as response:
                    return response.status < 500
            except aiohttp.ClientError:
                return False

        deadline = time.monotonic() + timeout
        while not await answers():
            assert time.monotonic() < deadline, f"nothing answers at {url}"
            await asyncio.sleep(0.1)


# What each line of the recipe's `python -m tests.simulate ...` shows: its exit code and text in its output.
RECIPE_OUTCOMES = {
    "--list": (0, ["forwarded to {url}/v1/tickets/{{ticket}}", "parameters (path):", "time limit: 5 s (x-action-"]),
    "--path /v1/tickets/{ticket} OPS-1": (0, ['"status": "open"', "→ forwarded by the bot to {url}/v1/tickets/OPS-1"]),
    "--path /v1/tickets/{ticket} OPS-2": (1, ["status 404", "no such ticket: OPS-2"]),
    "--path /v1/tickets/{ticket} ops-1": (1, ["status 400", "parameter ticket must match pattern"]),
    "--path /v1/on-call 运维 2": (0, ["运维 值班 / on call", "── result card (markdown shown as is) ──"]),
    "--path /v1/weather 杭州 明天": (0, ["── reply in the chat (markdown card via sessionWebhook) ──", "杭州 · 明天"]),
    "--fake http://127.0.0.1:8765 --path /v1/tickets/{ticket} OPS-1": (
        0,
        ["sending calls to the 1 connection(s) of the fake DingTalk", '"status": "open"'],
    ),
}
RECIPE_TESTS = ["test_actions.py", "test_tools_yaml.py", "test_authoring.py"]  # the files that read your skills


class Started:
    """A command of the recipe left running, as in a terminal of its own; its output collected as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process, self.lines = process, []
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), 30)
        finally:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reader, 10)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def test_the_forwarding_recipe_runs_as_written(tmp_path):
    project = project_with(tmp_path, ENGINE_1_0_0_PART.read_text(encoding="utf-8"))  # the starter as shipped ...
    shutil.copy(TOOLS_1_0_0, project / "tools.yaml")  # ... with its demo skills, whatever this project's are now
    (project / "service.py").write_text(doc_block(FORWARDING_DOC, "python", "FastAPI("), encoding="utf-8")  # 1
    (project / "tools.yaml").write_text(doc_block(FORWARDING_DOC, "yaml", "x-dingtalk-protocol"), encoding="utf-8")  # 2
    source = (project / "bot.py").read_text(encoding="utf-8")
    source, replaced = re.subn(r"^ACTIONS\b[^=\n]*= \{\n.*?^\}\n", "ACTIONS = {}\n", source, flags=re.M | re.S)
    assert replaced == 1  # step 3: ACTIONS = {}
    (project / "bot.py").write_text(source, encoding="utf-8")
    port, fake_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    [env_line] = re.findall(r"^FORWARD_URL=\S+$", FORWARDING_DOC, re.MULTILINE)  # step 4, in .env
    (project / ".env").write_text(env_line.replace(":8000", f":{port}") + "\n", encoding="utf-8")
    tests = doc_block(FORWARDING_DOC, "python", "(skill)")  # step 6: the demo actions' tests replaced with these
    (project / "tests" / "test_actions.py").write_text(tests, encoding="utf-8")
    commands = [line.split(" # ")[0].split() for line in doc_block(FORWARDING_DOC, "bash", "uvicorn").splitlines()]
    plain = {key: value for key, value in bot_env().items() if key != "FORWARD_URL"}  # it comes from .env

    def words_here(words: list[str]) -> list[str]:  # the ports free here for the recipe's 8000 and 8765
        return [word.replace("8000", str(port)).replace("8765", str(fake_port)) for word in words]

    async def start(words: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
        words = words_here(words)
        command = [sys.executable, *words[1:]] if words[0] == "python" else [sys.executable, "-m", *words]
        return await asyncio.create_subprocess_exec(
            *command, cwd=project, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )

    running: dict[str, Started] = {}
    exports: dict[str, str] = {}
    try:
        for words in commands:
            line = " ".join(words)
            if words[0] == "uvicorn":  # terminal 1: the service, left running
                running["service"] = Started(await start(words, plain))
                await until_listening(f"{url}/docs")
            elif words[:3] == ["python", "-m", "tests.fake_dingtalk"]:  # terminal 3: it prints export lines
                running["fake"] = Started(await start(words, plain))
                await wait_until(lambda: "# Ctrl+C stops the fake." in running["fake"].output, 60)
                printed = [text.removeprefix("export ") for text in running["fake"].lines if text.startswith("export ")]
                exports = dict(text.split("=", 1) for text in printed)
                assert {"CLIENT_ID", "CLIENT_SECRET", "DINGTALK_OPENAPI_ENDPOINT"} <= exports.keys(), printed
            elif words == ["python", "bot.py"]:  # terminal 4: those lines pasted, then python bot.py
                running["bot.py"] = Started(await start(words, plain | exports))
                await wait_until(lambda: "stream-1: connected" in running["bot.py"].output, 60)
            else:  # terminal 2: the simulator
                assert words[:3] == ["python", "-m", "tests.simulate"], line
                simulated = await start(words, plain)
                output = (await asyncio.wait_for(simulated.communicate(), 120))[0].decode()
                code, shown = RECIPE_OUTCOMES[" ".join(words[3:])]
                assert simulated.returncode == code, output
                for text in shown:
                    assert text.format(url=url) in output, output
        assert list(running) == ["service", "fake", "bot.py"]
        tested = await asyncio.create_subprocess_exec(  # step 6, with the service running
            *(sys.executable, "-m", "pytest", "-rA", "-n0", "-p", "no:cacheprovider"),
            *(f"tests/{name}" for name in RECIPE_TESTS),
            cwd=project, env=plain, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        report = (await asyncio.wait_for(tested.communicate(), 300))[0].decode()
        bot_py = await running["bot.py"].stop()
    finally:
        for process in running.values():
            process.kill()
        for process in running.values():
            with contextlib.suppress(Exception):
                await process.stop()
    assert tested.returncode == 0, report[-4000:]
    for name in re.findall(r"^async def (test_\w+)\(skill\)", tests, re.MULTILINE):
        assert f"PASSED tests/test_actions.py::{name}" in report, report[-4000:]
    assert bot_py == 0, running["bot.py"].output
    forwarded = "GET /v1/tickets/{ticket}, POST /v1/on-call, POST /v1/weather"
    assert f"INFO    bot: forwarding 3 operation(s) to {url}: {forwarded}" in running["bot.py"].output


async def test_the_shared_clients_example_makes_one_session_for_every_call_while_entered():
    example: dict[str, Any] = {}
    exec(compile(doc_block(SKILLS_DOC, "python", "async def lifespan"), "docs/skills.md", "exec"), example)
    async with example["lifespan"]():
        session = example["SHARED"]["http"]
        assert isinstance(session, aiohttp.ClientSession) and not session.closed
    assert session.closed
    assert list(inspect.signature(example["get_quote"]).parameters) == ["symbol"]
