"""Fuzzing: random Graph callbacks through the real SDK against one running `python bot.py`.

Invariants: every well-formed frame is acked, the Graph status is one the bot documents, no webhook
POST reaches a host outside the policy, and the process stays alive. FUZZ_EXAMPLES sets the count
(default 200; e.g. FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py for a long run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bot
from tests.conftest import ROOT, FakeThread
from tests.fake_dingtalk import GRAPH_TOPIC, FakeDingTalk, bot_env, graph_request
from tests.samples import ON_CALL, PRELUDE, RATE, SAMPLE_ACTIONS, SAMPLE_TOOLS, WEATHER

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
DOCUMENTED_STATUSES = {200, 400, 404, 500, 502}


class RunningBot:
    def __init__(self, remote: FakeThread, workdir: Path) -> None:
        self.remote, self.fake = remote, remote.fake
        shutil.copy(ROOT / "bot.py", workdir / "bot.py")
        shutil.copy(SAMPLE_TOOLS, workdir / "tools.yaml")
        (workdir / "run_bot.py").write_text(f"{PRELUDE}\nraise SystemExit(bot.main(bot.ACTIONS))\n")
        env = bot_env(self.fake, WEBHOOK_TIMEOUT_SECONDS="10", LOG_LEVEL="WARNING")  # generous, for a busy machine
        self.proc = subprocess.Popen(
            [sys.executable, "run_bot.py"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        # keep reading so a chatty log can never fill the pipe and stall the bot
        self.output = bytearray()
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout.read()), daemon=True).start()  # type: ignore[union-attr]
        remote.sync(self.fake.wait_connected(1))


@pytest.fixture(scope="module")
def running_bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBot]:
    with FakeThread() as remote:
        running = RunningBot(remote, tmp_path_factory.mktemp("fuzz"))
        yield running
        running.proc.terminate()
        assert running.proc.wait(30) == 0


def webhooks(fake: FakeDingTalk) -> st.SearchStrategy[Any]:
    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=50)
    return st.one_of(
        st.builds(lambda s: fake.webhook_url(f"aswh_{s.encode().hex()[:40]}"), text),  # allowed: the fake's sink
        st.just(fake.webhook_url(host="localhost")),  # same sink under a name the policy refuses
        st.builds(lambda s: f"https://evil.invalid/agent/send?session={s}", text),
        st.just(f"https://api.dingtalk.com:{fake.port}/agent/send"),  # DingTalk's host, wrong port
        text,
        json_values(),
    )


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=3000),
    )  # fmt: skip
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


def graph_callbacks(fake: FakeDingTalk) -> st.SearchStrategy[Any]:
    paths = st.sampled_from([WEATHER, RATE, ON_CALL, "/v1/actions/nope", "/", ""]) | st.text(max_size=40)
    declared = ("location", "date", "currency", "amount", "team", "weeks")
    params = st.fixed_dictionaries(
        {}, optional={**dict.fromkeys(declared, json_values()), "sessionWebhook": webhooks(fake)}
    )
    methods = st.sampled_from(["POST", "GET", "post", "PUT"]) | json_values()

    def build(path: str, method: Any, values: dict, query: bool, body_kind: str, extra: Any) -> Any:
        query_string = "&".join(f"{k}={v}" for k, v in values.items()) if query else ""
        uri = f"{path}?{query_string}" if query_string else path
        body: Any = {"json": json.dumps(values, ensure_ascii=False), "raw": values, "junk": extra}[body_kind]
        return {"requestLine": {"method": method, "uri": uri}, "headers": {}, "body": body}

    well_shaped = st.builds(
        build, paths, methods, params, st.booleans(), st.sampled_from(["json", "json", "raw", "junk"]), json_values()
    )
    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=3000)
    deliverable = st.builds(
        lambda location, date: graph_request(
            WEATHER, {"location": location, "date": date}, session_webhook=fake.webhook_url()
        ),
        text,
        text,
    )
    malformed = json_values() | st.fixed_dictionaries({"requestLine": json_values(), "body": json_values()})
    return deliverable | well_shaped | malformed


def test_random_callbacks_keep_the_invariants(running_bot: RunningBot) -> None:
    fake, remote = running_bot.fake, running_bot.remote
    allowed_host = f"{fake.host}:{fake.port}"

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=graph_callbacks(fake))
    def check(data: Any) -> None:
        frame_data = json.dumps(data, ensure_ascii=False)
        message_id = remote.sync(fake.send_frame("CALLBACK", GRAPH_TOPIC, frame_data))
        ack = remote.sync(fake.wait_ack(message_id))
        response = json.loads(ack["data"])["response"]
        assert ack["code"] == 200
        assert response["statusLine"]["code"] in DOCUMENTED_STATUSES, response
        assert {post.host for post in fake.webhook_posts} <= {allowed_host}
        assert running_bot.proc.poll() is None

    check()
    # and afterwards it still answers a normal call with a delivered reply
    posts = len(fake.webhook_posts)
    request = graph_request(WEATHER, {"location": "杭州"}, session_webhook=fake.webhook_url())
    assert remote.sync(fake.invoke(request)).status == 200
    assert len(fake.webhook_posts) == posts + 1


# ----- the parameter checks alone: any value for a declared parameter is accepted or a 400, never a crash -----

OPERATIONS = list(bot.load_operations(SAMPLE_TOOLS, SAMPLE_ACTIONS).values())


def query_text() -> st.SearchStrategy[str]:
    numeric = st.from_regex(r"[+-]?[0-9]{0,60}(\.[0-9]*)?([eE][+-]?[0-9]{1,4})?", fullmatch=True)
    words = st.sampled_from(["true", "FALSE", "nan", "inf", "-Infinity", "1_000", " 3", "3 ", "", "USD", "usd"])
    return numeric | words | st.text(max_size=50)


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(operation=st.sampled_from(OPERATIONS), data=st.data())
def test_parameter_checks_never_crash_and_never_answer_5xx(operation: bot.Operation, data: st.DataObject) -> None:
    properties = operation.schema["properties"]
    params = {
        name: data.draw(query_text() if name in operation.query else json_values(), label=name)
        for name in properties
        if data.draw(st.booleans(), label=f"give {name}")
    }
    try:
        checked = operation.check(params)
    except bot.ActionError as err:
        assert err.status == 400 and str(err)
        return
    for name, declared in properties.items():  # what passes is what tools.yaml declares
        value = checked.get(name)
        if value is None:
            assert name not in operation.schema.get("required", [])
        elif declared.get("type") in ("integer", "number"):
            assert isinstance(value, int | float) and not isinstance(value, bool)
            assert value >= declared.get("minimum", value) and value <= declared.get("maximum", value)
        elif declared.get("type") == "string":
            assert isinstance(value, str)
        if value is not None and "enum" in declared:
            assert value in declared["enum"]
    json.dumps(checked)  # and it can be handed on as JSON
