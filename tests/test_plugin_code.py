"""Plugin code cannot take the bot down: actions that exit, hang, hold the loop, ignore a stop, or return odd data."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import logging
import signal
import sys
import threading
import time
from typing import Any

import pytest

import bot
from tests.conftest import echoes, hangs_until, settings_for, wait_until
from tests.fake_dingtalk import GRAPH_TOPIC, ForwardProxy, bot_env, free_port, graph_request
from tests.samples import RATE, SAMPLE_ACTIONS, SAMPLE_TOOLS, WEATHER


def weather(fake: Any) -> dict[str, Any]:
    return graph_request(WEATHER, {"location": "杭州"}, session_webhook=fake.webhook_url())


def rate(currency: str = "USD") -> dict[str, Any]:
    return graph_request(RATE, {"currency": currency}, method="GET")


# ----- an action that exits ends its call, not the bot -----


async def exits_async(location: str) -> str:
    sys.exit(3)


def exits_plain(location: str) -> str:
    sys.exit(3)


async def interrupted(location: str) -> str:
    raise KeyboardInterrupt


@pytest.mark.parametrize("action", [exits_async, exits_plain, interrupted])
async def test_sys_exit_or_keyboard_interrupt_in_an_action_is_a_500_for_that_call(serve_actions, action, caplog):
    async with serve_actions({"/a": action}) as call:
        assert (await call("/a", location="杭州")).status == 500
        assert (await call("/a", location="杭州")).status == 500  # and the bot serves on
    assert f"action {action.__name__} failed" in caplog.text


EXITS = """
import sys, time, threading
import bot

async def get_weather(location: str) -> str:
    sys.exit(1)

def get_on_call(team: str) -> str:
    sys.exit(1)

bot.ACTIONS["/v1/actions/weather"] = get_weather
bot.ACTIONS["/v1/actions/on-call"] = get_on_call
"""


SUB_TASKS_EXIT = """
import asyncio, sys
import bot

async def leaves() -> None:
    sys.exit(1)

async def interrupts() -> None:
    raise KeyboardInterrupt

async def get_weather(location: str) -> str:
    await asyncio.gather(leaves())  # sys.exit() in a task the action starts
    return "never"

async def get_on_call(team: str) -> str:
    await asyncio.create_task(interrupts())
    return "never"

bot.ACTIONS["/v1/actions/weather"] = get_weather
bot.ACTIONS["/v1/actions/on-call"] = get_on_call
"""


RESULT_EXITS = """
import sys
import bot

class Exits(dict):
    def items(self):  # json calls it as the engine encodes the card: the action's code, run outside its task
        sys.exit(1)

async def get_weather(location: str) -> bot.Card:
    return bot.Card("own.schema", Exits(city=location))

async def get_on_call(team: str) -> str:
    raise GeneratorExit  # a BaseException that is neither an Exception nor an exit

bot.ACTIONS["/v1/actions/weather"] = get_weather
bot.ACTIONS["/v1/actions/on-call"] = get_on_call
"""


@pytest.mark.parametrize(
    ("prelude", "said"),
    [
        (EXITS, "SystemExit(1) raised in an action"),
        (SUB_TASKS_EXIT, "SystemExit(1) raised in an action"),
        (RESULT_EXITS, "SystemExit: 1"),
    ],
    ids=["in-the-action", "in-a-task-it-starts", "in-its-result-or-as-generator-exit"],
)
async def test_a_bot_whose_actions_call_sys_exit_keeps_serving(fake, remote, bot_process, prelude, said):
    process = await bot_process(bot_env(fake), prelude=prelude)
    await remote(fake.wait_connected(1))
    on_call = graph_request("/v1/actions/on-call", {"team": "运维"})
    results = await remote(fake.invoke_many([weather(fake), on_call, rate()]))
    assert [result.status for result in results] == [500, 500, 200]
    assert (await remote(fake.invoke(rate("EUR")))).status == 200  # still serving, on the same connection
    assert process.proc.returncode is None and len(fake.connections) == 1
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    assert said in process.output and "never retrieved" not in process.output


# ----- shutdown is bounded whatever actions do; a second signal exits at once -----

STUBBORN = """
import asyncio, time
import bot

async def get_weather(location: str) -> str:
    print("action started", flush=True)
    while True:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # swallowed: the task never ends

bot.ACTIONS["/v1/actions/weather"] = get_weather
"""


async def test_an_action_that_swallows_cancellation_neither_loses_its_ack_nor_holds_the_exit(fake, remote, bot_process):
    process = await bot_process(bot_env(fake, SHUTDOWN_GRACE_SECONDS="1"), prelude=STUBBORN)
    await remote(fake.wait_connected(1))
    message_id = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake)))
    await process.wait_for_output("action started")
    process.proc.send_signal(signal.SIGTERM)
    # not for ever: the task never ends, so an exit that waited for it would never come on its own; and exit 0 is
    # not the forced exit (128 + SIGTERM) 11 s after the signal, so the bot left the task behind after the grace
    assert await process.wait() == 0
    ack = await remote(fake.wait_ack(message_id))
    assert "the bot stopped before the action finished" in ack["message"]
    assert "exiting with 0 thread(s) still running, and 1 task(s)" in process.output


HOLDS_THE_LOOP = """
import time
import bot

async def get_weather(location: str) -> str:
    print("action started", flush=True)
    time.sleep(600)  # a blocking call in an async def: the event loop is held (far longer than any test waits)
    return "late"

bot.ACTIONS["/v1/actions/weather"] = get_weather
"""


async def test_a_second_signal_exits_at_once_even_while_an_action_holds_the_loop(fake, remote, bot_process):
    process = await bot_process(bot_env(fake, SHUTDOWN_GRACE_SECONDS="600"), prelude=HOLDS_THE_LOOP)
    await remote(fake.wait_connected(1))
    await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake)))
    await process.wait_for_output("action started")
    process.proc.send_signal(signal.SIGINT)
    await process.wait_for_output("SIGINT received")  # said at once, though the loop is held
    process.proc.send_signal(signal.SIGINT)
    # at once: a generous bound, far below the 600 s the call holds the loop and the forced exit 610 s after the
    # first signal; and the second signal is what ended it
    assert await process.wait(60) == 128 + signal.SIGINT
    assert "second SIGINT: exiting without waiting" in process.output


# ----- what an action returns, and how long it takes -----


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (float("nan"), "Out of range float values are not JSON compliant"),  # json.dumps would write NaN
        (datetime.date(2026, 1, 1), "Object of type date is not JSON serializable"),
    ],
    ids=["nan", "date"],
)
async def test_auto_data_that_is_not_json_is_a_500_naming_the_action_and_the_type(
    fake, remote, start_bot, caplog, value, said
):
    async def not_json(currency: str) -> dict:
        return {"rate": value}

    bot.ACTIONS[RATE] = not_json
    async with start_bot():
        result = await remote(fake.invoke(rate()))
    assert (result.status, result.body) == (500, {"success": False, "error": "internal error in action"})
    assert f"action not_json returned data that is not JSON: {said}" in caplog.text


async def test_a_blocking_async_def_past_its_time_limit_is_a_504_like_any_other(serve_actions, caplog):
    async def blocks(location: str) -> str:
        time.sleep(0.3)  # noqa: ASYNC251 (it holds the loop: the time limit cannot interrupt it)
        return location

    async with serve_actions({"/a": blocks}, action_timeout_seconds=0.1) as call:
        assert (await call("/a", location="杭州")).status == 504
    assert "action blocks (POST /a) timed out after 0.1 s (ACTION_TIMEOUT_SECONDS)" in caplog.text


# ----- one ledger per process: a redelivery is never replied to twice -----


@pytest.mark.parametrize("together", [False, True], ids=["one-after-the-other", "open-at-once"])
async def test_a_redelivery_across_two_running_blocks_is_not_replied_to_twice(fake, remote, together):
    settings = settings_for(fake)
    first = bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings)
    async with first:
        connection = (await remote(fake.wait_connected(1)))[0]
        message_id = await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), conn=connection))
        await remote(fake.wait_ack(message_id))
        if together:
            async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings):
                second = await remote(fake.wait_for(lambda: fake.live_connections()[1:] and fake.live_connections()[1]))
                await remote(
                    fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), message_id=message_id, conn=second)
                )
                await remote(fake.wait_ack(message_id, count=2))
    if not together:
        async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings):
            connection = await remote(fake.wait_for(lambda: fake.live_connections() and fake.live_connections()[0]))
            await remote(
                fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake), message_id=message_id, conn=connection)
            )
            await remote(fake.wait_ack(message_id, count=2))
    assert len(fake.webhook_posts) == 1


# ----- plain-def actions: a bounded pool that neither piles up threads nor lets CPU-bound calls starve the loop -----

CPU_BOUND = """
import time
import bot

def get_on_call(team: str) -> str:
    print("burning", flush=True)
    end = time.thread_time() + 3
    while time.thread_time() < end:  # 3 s of CPU, as a report or an image might take
        pass
    return "done"

bot.ACTIONS["/v1/actions/on-call"] = get_on_call
"""


async def test_a_burst_of_cpu_bound_plain_def_calls_leaves_the_loop_answering(fake, remote, bot_process):
    process = await bot_process(bot_env(fake, ACTION_TIMEOUT_SECONDS="4"), prelude=CPU_BOUND)
    await remote(fake.wait_connected(1))
    burst = [graph_request("/v1/actions/on-call", {"team": f"team {n}"}) for n in range(60)]
    calls = asyncio.ensure_future(remote(fake.invoke_many(burst)))
    await process.wait_for_output("burning")
    started = time.monotonic()
    await remote(fake.ping())  # answered while the burst burns CPU
    pinged = time.monotonic() - started
    fast = await remote(fake.invoke(rate()))  # an async def action, beside the burst
    results = await calls
    print(f"ping answered in {pinged:.3f} s, a fast action in {fast.elapsed:.3f} s")  # shown with -s
    assert fast.status == 200 and {result.status for result in results} <= {200, 503, 504}  # 503: never started
    assert process.output.count("action get_on_call (POST /v1/actions/on-call) is CPU-bound") == 1  # one, with advice
    assert "run such work in a process pool (docs/skills.md#cpu-bound-work)" in process.output
    assert len(fake.connections) == 1  # keepalive never gave up on it
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0


async def test_hung_plain_def_calls_take_at_most_the_pool_then_503_at_once_with_one_warning(
    serve_actions, monkeypatch, caplog
):
    monkeypatch.setattr(bot, "_ACTION_THREADS", bot._ActionThreads(4))  # a pool of four, to fill it quickly
    release = threading.Event()
    actions = {"/hangs": hangs_until(release), "/quick": echoes, "/async": samples_weather}
    before = set(threading.enumerate())  # whatever other tests left running is not counted below
    try:
        async with serve_actions(actions, action_timeout_seconds=0.5) as call:
            for _ in range(4):
                assert (await call("/hangs", location="x")).status == 504
            for _ in range(50):  # more calls to the hung backend: refused at once, no thread more
                refused = await call("/hangs", location="x")
                # at once: a call that waited for one of the hung threads would say it got none in its time limit
                assert (refused.status, refused.body["error"]) == (503, "all 4 action threads are busy")
            started = [t for t in threading.enumerate() if t not in before and t.name.startswith("bot-action-")]
            assert len(started) == 4  # the pool's own threads, all still hung
            assert caplog.text.count("all 4 action threads are taken, 4 by calls past their time limit") == 1
            assert (await call("/async", location="杭州")).status == 200  # an async def is not affected
            release.set()
            deadline = time.monotonic() + 60
            while (await call("/quick", location="fine")).body != {"content": "fine"}:  # served again
                assert time.monotonic() < deadline, "plain defs were not served again once the hung calls returned"
    finally:
        release.set()


async def test_plain_def_calls_waiting_for_their_turn_are_served_in_the_order_they_came(serve_actions, monkeypatch):
    monkeypatch.setattr(bot, "_ACTION_THREADS", bot._ActionThreads(8))
    started: list[int] = []

    def burns(location: str) -> str:
        end = time.thread_time() + 0.2
        while time.thread_time() < end:  # two of these take every turn: the calls below wait
            pass
        return location

    def quick(location: str) -> str:
        started.append(int(location))
        time.sleep(0.005)  # waits as on I/O; in its first 20 ms it counts as burning CPU, so two run at once
        return location

    async with serve_actions({"/burns": burns, "/quick": quick}, action_timeout_seconds=60) as call:
        calls = [asyncio.ensure_future(call("/burns", location="x")) for _ in range(2)]
        arrivals = iter(range(40))

        def arrive(_: object = None) -> None:  # each call that ends brings a new one, as steady traffic does
            if (n := next(arrivals, None)) is not None:
                calls.append(asyncio.ensure_future(call("/quick", location=str(n))))
                calls[-1].add_done_callback(arrive)

        for _ in range(10):
            arrive()
        await wait_until(lambda: len(calls) == 42 and all(call.done() for call in calls), timeout=60)
    assert [call.result().body for call in calls[2:]] == [{"content": str(n)} for n in range(40)]  # every one served
    assert max(abs(place - n) for place, n in enumerate(started)) <= 2, started  # a newcomer never jumps the queue


async def samples_weather(location: str) -> str:
    return location


async def test_the_bots_lookups_do_not_wait_behind_actions_threads():
    loop, release = asyncio.get_running_loop(), threading.Event()
    hung = [loop.run_in_executor(None, release.wait, 120) for _ in range(40)]  # actions' asyncio.to_thread calls
    try:  # generous bounds: behind those threads, a lookup would wait until they are released, below
        assert await asyncio.wait_for(bot._lookup("localhost", 80), 30)
        [first, *_] = await asyncio.wait_for(bot._Resolver().resolve("localhost", 80), 30)
        assert first["hostname"] == "localhost" and first["port"] == 80
    finally:
        release.set()
        await asyncio.gather(*hung)


HUNG_THREADS = """
import asyncio, threading
import bot

release = threading.Event()

async def get_on_call(team: str) -> str:
    await asyncio.to_thread(release.wait, 60)  # hangs a thread of the loop's default pool
    return "late"

bot.ACTIONS["/v1/actions/on-call"] = get_on_call
"""


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "through-a-proxy"])
async def test_replies_and_reconnects_need_no_thread_of_the_loops_default_pool(fake, remote, bot_process, proxied):
    local = f"localhost:{fake.port}"  # a name to look up, where 127.0.0.1 would need none
    env = bot_env(fake, DINGTALK_OPENAPI_ENDPOINT=f"http://{local}", WEBHOOK_ALLOWED_HOSTS=local)
    proxy = await remote(ForwardProxy().start()) if proxied else None
    if proxy:  # aiohttp's trust_env would read the proxy variables, and netrc, in the loop's default pool
        env |= {"HTTP_PROXY": proxy.url, "NO_PROXY": "", "no_proxy": ""}
    process = await bot_process(env, prelude=HUNG_THREADS)
    [connection] = await remote(fake.wait_connected(1))
    for n in range(8):  # more than the default pool's workers (6 on 2 cores)
        await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, graph_request("/v1/actions/on-call", {"team": str(n)})))
    webhook = fake.webhook_url().replace(f"127.0.0.1:{fake.port}", local)
    reply = await remote(fake.invoke(graph_request(WEATHER, {"location": "杭州"}, session_webhook=webhook)))
    assert reply.status == 200 and len(fake.webhook_posts) == 1
    await remote(fake.drop(connection))
    await remote(
        fake.wait_for(lambda: len(fake.live_connections()) == 1 and fake.live_connections()[0] is not connection)
    )
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    if proxy:
        await remote(proxy.close())
        assert any(request.startswith("CONNECT") for request in proxy.requests)  # it did go through the proxy


# ----- no password from a proxy URL reaches a log line, as written or decoded -----

PASSWORD, ENCODED = "p@ss:w0rd/x", "p%40ss%3Aw0rd%2Fx"


async def test_a_proxys_password_never_reaches_the_log_of_python_bot_py(fake, remote, bot_process):
    proxy = await remote(ForwardProxy(require_auth=True).start())
    try:
        proxied = {"HTTP_PROXY": f"http://bot:{ENCODED}@127.0.0.1:{proxy.port}", "NO_PROXY": "localhost"}
        env = (
            bot_env(fake, DINGTALK_OPENAPI_ENDPOINT=f"http://localhost:{fake.port}")
            | proxied
            | {"no_proxy": "localhost"}
        )
        process = await bot_process(env | {"LOG_LEVEL": "DEBUG"})  # the open direct, the websocket through the proxy
        await process.wait_for_output("reconnecting in")
        process.proc.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    finally:
        await remote(proxy.close())
    assert "proxy rejected connection: HTTP 407" in process.output
    assert PASSWORD not in process.output and ENCODED not in process.output


async def test_a_proxys_password_never_reaches_the_apps_log_when_embedded(fake, remote, monkeypatch, caplog):
    proxy = await remote(ForwardProxy(require_auth=True).start())
    monkeypatch.setenv("HTTP_PROXY", f"http://bot:{ENCODED}@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    try:
        with caplog.at_level(logging.DEBUG):  # as an app's own logging set-up would see the bot's lines
            async with bot.running(SAMPLE_ACTIONS, SAMPLE_TOOLS, settings=settings_for(fake)):
                logging.getLogger("bot").info("an action's own line with %s and %s", PASSWORD, ENCODED)
                await wait_until(lambda: "reconnecting in" in caplog.text)
    finally:
        await remote(proxy.close())
    assert proxy.requests and "***" in caplog.text
    assert PASSWORD not in caplog.text and ENCODED not in caplog.text


def test_the_redaction_hides_a_proxys_password_in_library_error_text(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", f"http://bot:{ENCODED}@proxy.example:3128")
    settings = bot.Settings(client_id="id", client_secret="client-secret")
    texts = [
        f"407, message='Proxy Authentication Required', url=URL('http://bot:{ENCODED}@proxy.example:3128')",
        f"Cannot connect to proxy with BasicAuth(login='bot', password='{PASSWORD}', encoding='latin1')",
    ]
    for text in texts:
        record = logging.LogRecord("aiohttp", logging.ERROR, __file__, 1, "%s", (text,), None)
        assert bot._RedactingFilter(bot._secrets_of(settings)).filter(record)
        assert PASSWORD not in record.getMessage() and ENCODED not in record.getMessage()


# ----- from an outside adversarial review -----


async def test_an_async_def_that_ignores_its_time_limit_is_answered_504_on_time(serve_actions):
    release, finished = asyncio.Event(), []

    async def retries(location: str) -> str:
        for _ in range(3):  # a retry loop with a bare except: swallows the cancellation
            try:
                await release.wait()
            except BaseException:
                pass
        finished.append(location)
        return location

    try:
        async with serve_actions({"/a": retries}, action_timeout_seconds=0.2) as call:
            answered = await call("/a", location="杭州")
            # not held: answered while the call still runs (it cannot end before the release below); left behind
            assert answered.status == 504 and not finished
    finally:
        release.set()


def test_a_proxy_url_without_a_scheme_has_its_password_redacted_too(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", f"bot:{ENCODED}@127.0.0.1:3128")  # websockets: "isn't a valid proxy"
    secrets = bot._secrets_of(bot.Settings(client_id="id", client_secret="client-secret"))
    assert ENCODED in secrets and PASSWORD in secrets


async def test_the_full_pool_warning_is_given_once_while_hung_calls_remain(serve_actions, monkeypatch, caplog):
    monkeypatch.setattr(bot, "_ACTION_THREADS", bot._ActionThreads(4))
    release = threading.Event()

    def quick(location: str) -> str:
        time.sleep(0.05)
        return location

    try:
        async with serve_actions({"/hangs": hangs_until(release), "/quick": quick}, action_timeout_seconds=0.5) as call:
            for _ in range(3):
                assert (await call("/hangs", location="x")).status == 504
            for _ in range(5):  # two at once on the one free thread: one is refused, the other returns
                outcomes = await asyncio.gather(*(call("/quick", location="y") for _ in range(2)))
                said = sorted(str(outcome.body.get("error", outcome.body.get("content"))) for outcome in outcomes)
                assert said == ["all 4 action threads are busy", "y"]
    finally:
        release.set()
    assert caplog.text.count("all 4 action threads are taken, 3 by calls past their time limit") == 1


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (float("nan"), "Out of range float values are not JSON compliant"),
        (datetime.date(2026, 12, 6), "Object of type date is not JSON serializable"),
        (decimal.Decimal("9.5"), "Object of type Decimal is not JSON serializable"),
    ],
    ids=["nan", "date", "decimal"],
)
async def test_card_data_that_is_not_json_is_a_500_naming_the_action_and_nothing_is_posted(
    fake, remote, start_bot, caplog, value, said
):
    async def bad_card(location: str) -> bot.Card:
        return bot.Card("tpl.schema", {"value": value})

    bot.ACTIONS[WEATHER] = bad_card
    async with start_bot():
        result = await remote(fake.invoke(weather(fake)))
    assert result.status == 500 and fake.webhook_posts == []  # not 502: the webhook was never contacted
    [line] = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert line == f"action bad_card returned a Card whose data is not JSON: {said}"
    assert "Traceback" not in caplog.text and "webhook" not in caplog.text


async def test_one_sigterm_while_an_action_holds_the_loop_exits_after_the_grace_period_and_a_few_seconds(
    fake, remote, bot_process
):
    process = await bot_process(bot_env(fake, SHUTDOWN_GRACE_SECONDS="1"), prelude=HOLDS_THE_LOOP)
    await remote(fake.wait_connected(1))
    await remote(fake.send_frame("CALLBACK", GRAPH_TOPIC, weather(fake)))
    await process.wait_for_output("action started")
    process.proc.send_signal(signal.SIGTERM)
    # a generous bound, far below the 600 s the action holds the loop; the line below says the bot's own clock
    # ended it 1 s of grace and 10 more after the signal
    assert await process.wait(60) == 128 + signal.SIGTERM
    assert "still running 11 s after SIGTERM: exiting without waiting" in process.output


@pytest.mark.parametrize("proxy", ["http://127.0.0.1:{port}", "socks5://127.0.0.1:{port}"], ids=["http", "socks"])
async def test_a_websocket_proxy_that_fails_fails_a_connection_not_the_bot(fake, remote, bot_process, proxy):
    proxied = {"WS_PROXY": proxy.format(port=free_port()), "NO_PROXY": "", "no_proxy": ""}  # the websocket's only
    process = await bot_process(bot_env(fake) | proxied)
    await process.wait_for_output("reconnecting in")  # said, and retried
    assert process.proc.returncode is None and "Traceback" not in process.output
    assert fake.open_requests  # the open went direct; the websocket tried the proxy
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
