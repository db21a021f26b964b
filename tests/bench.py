"""Benchmark: `python bot.py` against the local fake DingTalk, next to reference handlers.

Run from the repository root:

    python -m tests.bench            # full run, about a minute
    python -m tests.bench --quick    # shorter rounds, fewer probes
    python -m tests.bench --json     # the same report as JSON

Every process under test (bot.py, or a reference handler started as `python -m tests.bench --serve
floor|ceiling|official`) gets a FakeDingTalk of its own, served from this script's event loop. The
script prints the machine, then one table row per measurement: ours, the reference, the target and
a verdict. Exit status: 0 when every scenario ran (whatever the verdicts), 1 when the harness failed.
Linux only: memory and CPU time are read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import dingtalk_stream

from tests.fake_dingtalk import GRAPH_TOPIC, FakeDingTalk, GraphResult, bot_env, free_port, graph_request

ROOT = Path(__file__).resolve().parent.parent
WEATHER = "/v1/actions/weather"
PARAMS = {"location": "杭州", "date": "明天"}
# bot.py's get_weather answer for PARAMS: the reference handlers post this same card.
REPLY_MARKDOWN = (
    "### 杭州 · 明天\n- 天气 / Weather: 晴 Sunny\n- 温度 / Temperature: 22°C\n\n"
    "> 演示数据，非真实天气 / Demo data, not a real forecast"
)
REFERENCES = ("floor", "ceiling", "official")
CONNECT_TIMEOUT = 15.0
EXIT_TIMEOUT = 10.0
DEADLINE_SECONDS = 115.0  # the whole run stays under two minutes
FAST_ACK_TIMEOUT = 5.0
MB = 1024 * 1024


class BenchError(Exception):
    """The harness could not measure (a process failed to start, connect or answer)."""


# ---------------------------------------------------------------------------------------------
# Reference handlers, served by `python -m tests.bench --serve KIND` in a process of their own
# ---------------------------------------------------------------------------------------------


def card_payload(markdown: str) -> dict[str, Any]:
    """The AI card bot.py and the SDK's reply_markdown post to the sessionWebhook."""
    template = dingtalk_stream.GraphHandler.MARKDOWN_TEMPLATE_ID
    return {"contentType": "ai_card", "content": {"templateId": template, "cardData": {"content": markdown}}}


def ok_response() -> dict[str, Any]:
    """A Graph 200 with a JSON body, shaped like bot.py's acks."""
    response = dingtalk_stream.GraphResponse()
    response.status_line.code = 200
    response.status_line.reason_phrase = "OK"
    response.headers["Content-Type"] = "application/json"
    response.body = json.dumps({"success": True})
    return response.to_dict()


class FloorHandler(dingtalk_stream.GraphHandler):
    """The least a correct handler does: parse, one POST with a shared session, ack. Nothing else."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        super().__init__()
        self.http = http

    async def process(self, callback: dingtalk_stream.CallbackMessage) -> tuple[int, dict[str, Any]]:
        request = dingtalk_stream.GraphRequest.from_dict(callback.data)
        webhook = json.loads(request.body)["sessionWebhook"]
        async with self.http.post(webhook, json=card_payload(REPLY_MARKDOWN)) as response:
            await response.read()
        return dingtalk_stream.AckMessage.STATUS_OK, ok_response()


class CeilingHandler(dingtalk_stream.GraphHandler):
    """Acks without replying: what the SDK and the websocket alone can carry."""

    async def process(self, callback: dingtalk_stream.CallbackMessage) -> tuple[int, dict[str, Any]]:
        return dingtalk_stream.AckMessage.STATUS_OK, ok_response()


class OfficialHandler(dingtalk_stream.GraphHandler):
    """The SDK example's way: await self.reply_markdown, which runs blocking http.client on the loop."""

    async def process(self, callback: dingtalk_stream.CallbackMessage) -> tuple[int, dict[str, Any]]:
        request = dingtalk_stream.GraphRequest.from_dict(callback.data)
        webhook = json.loads(request.body)["sessionWebhook"]
        await self.reply_markdown(webhook, REPLY_MARKDOWN)
        return dingtalk_stream.AckMessage.STATUS_OK, self.get_success_response({"success": True}).to_dict()


async def serve_reference(kind: str) -> None:
    """One stream client with the `kind` handler, until SIGTERM (default action: the process ends)."""
    logging.basicConfig(level=logging.WARNING)  # as bot.py runs in the benchmark: LOG_LEVEL=WARNING
    credential = dingtalk_stream.Credential(os.environ["CLIENT_ID"], os.environ["CLIENT_SECRET"])
    client = dingtalk_stream.DingTalkStreamClient(credential, logger=logging.getLogger("dingtalk_stream.client"))
    async with aiohttp.ClientSession(trust_env=False) as http:
        handlers: dict[str, Callable[[], dingtalk_stream.GraphHandler]] = {
            "floor": lambda: FloorHandler(http),
            "ceiling": CeilingHandler,
            "official": OfficialHandler,
        }
        client.register_callback_handler(dingtalk_stream.GraphMessage.TOPIC, handlers[kind]())
        await client.start()


# ---------------------------------------------------------------------------------------------
# Harness: processes under test, each with its own fake, and the probes we send them
# ---------------------------------------------------------------------------------------------

_message_ids = itertools.count(1)


class AckWatcher:
    """Resolves one future per messageId the moment the fake reads that ack.

    FakeDingTalk.wait_ack wakes every waiter on every frame the fake sees: with 50 callbacks in
    flight that costs more than the bot does, so the load generator would be what we measure.
    The fake's trace hook sees each ack exactly once.
    """

    def __init__(self, fake: FakeDingTalk) -> None:
        self._pending: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        fake.trace = self._on_frame

    def expect(self, message_id: str) -> asyncio.Future[tuple[float, dict[str, Any]]]:
        future: asyncio.Future[tuple[float, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        return future

    def forget(self, message_id: str) -> None:
        self._pending.pop(message_id, None)

    def _on_frame(self, direction: str, frame: dict[str, Any]) -> None:
        if direction != "<":
            return
        future = self._pending.pop(frame.get("headers", {}).get("messageId", ""), None)
        if future is not None and not future.done():
            future.set_result((time.perf_counter(), frame))


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid`, from /proc/<pid>/stat (fields after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drain(stream: asyncio.StreamReader, tail: bytearray) -> None:
    """Read the child's output as it comes so its pipe never fills; keep the last few KB for errors."""
    while chunk := await stream.read(65536):
        tail.extend(chunk)
        del tail[:-4096]


@dataclass
class Target:
    """One process under test (bot.py or a reference handler) and the fake it is connected to."""

    name: str
    fake: FakeDingTalk
    watcher: AckWatcher
    process: asyncio.subprocess.Process
    reader: asyncio.Task[None]
    tail: bytearray
    start_seconds: float
    rss_connected: float
    health_port: int | None = None
    callbacks: int = 0  # acks received
    failures: int = 0  # acks that were not a Graph 200
    request: str = field(init=False)  # the callback we push, serialized once

    def __post_init__(self) -> None:
        webhook = self.fake.webhook_url("aswh_bench")
        self.request = json.dumps(graph_request(WEATHER, PARAMS, session_webhook=webhook), ensure_ascii=False)

    @property
    def last_output(self) -> str:
        return self.tail.decode(errors="replace").strip()[-600:]

    async def _roundtrip(self, type_: str, topic: str, data: str, timeout: float) -> tuple[float, dict[str, Any]]:
        message_id = f"bench-{next(_message_ids)}"
        future = self.watcher.expect(message_id)
        sent_at = time.perf_counter()
        try:
            await self.fake.send_frame(type_, topic, data, message_id=message_id)
            acked_at, ack = await asyncio.wait_for(future, timeout)
        finally:
            self.watcher.forget(message_id)
        return acked_at - sent_at, ack

    async def invoke(self, timeout: float = FAST_ACK_TIMEOUT) -> float:
        """Push one weather callback, wait for its ack; return the ack latency in seconds."""
        latency, ack = await self._roundtrip("CALLBACK", GRAPH_TOPIC, self.request, timeout)
        self.callbacks += 1
        if ack.get("code") != 200 or GraphResult.from_ack(ack, latency).status != 200:
            self.failures += 1
        return latency

    async def ping(self, timeout: float = FAST_ACK_TIMEOUT) -> float:
        """A SYSTEM ping like fake.ping(), timed from push to the moment its ack is read."""
        opaque = f"opaque-{next(_message_ids)}"
        latency, ack = await self._roundtrip("SYSTEM", "ping", json.dumps({"opaque": opaque}), timeout)
        if json.loads(ack["data"]).get("opaque") != opaque:
            raise BenchError(f"{self.name}: ping ack lost its opaque")
        return latency

    async def burst(self, count: int, timeout: float) -> float | None:
        """Push `count` callbacks at once; seconds until the last ack, or None past `timeout`."""
        started = time.perf_counter()
        try:
            await asyncio.gather(*(self.invoke(timeout) for _ in range(count)))
        except TimeoutError:
            return None
        return time.perf_counter() - started

    def rss(self) -> float:
        return rss_mb(self.process.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    async def stop(self) -> str | None:
        """SIGTERM, then check the process ends as it should; return a problem, if any."""
        expected = 0 if self.name.startswith("ours") else -signal.SIGTERM  # references keep the default action
        problem = None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT)
            if code != expected:
                problem = f"{self.name} exited {code} on SIGTERM, expected {expected}: {self.last_output}"
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            problem = f"{self.name} still running {EXIT_TIMEOUT:.0f} s after SIGTERM (killed)"
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.reader, EXIT_TIMEOUT)
        await self.fake.close()
        return problem


async def launch(name: str, workdir: Path, *, instances: int = 1, health: bool = False) -> Target:
    """Start `name` ("ours", "ours-2" or a reference) against a new fake; return once all connected."""
    fake = await FakeDingTalk().start()
    watcher = AckWatcher(fake)
    health_port = free_port() if health else None
    extra = {"INSTANCES": str(instances)}
    if health_port:
        extra["HEALTH_PORT"] = str(health_port)
    if name.startswith("ours"):  # bot.py from a copy of its own, so no developer's .env is read
        argv, cwd = [sys.executable, "bot.py"], workdir
    else:
        argv, cwd = [sys.executable, "-m", "tests.bench", "--serve", name], ROOT
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=bot_env(fake, LOG_LEVEL="WARNING", **extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    tail = bytearray()
    assert process.stdout is not None
    reader = asyncio.create_task(drain(process.stdout, tail))
    try:
        await connected_or_exited(fake, process, instances)
        start_seconds = time.perf_counter() - started
        target = Target(name, fake, watcher, process, reader, tail, start_seconds, rss_mb(process.pid), health_port)
        await target.invoke()  # warm up: the first reply opens the webhook connection
    except (TimeoutError, OSError, BenchError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        await fake.close()
        output = tail.decode(errors="replace")[-600:]
        raise BenchError(f"{name} did not connect and answer (exit status {process.returncode}): {output}") from None
    return target


async def connected_or_exited(fake: FakeDingTalk, process: asyncio.subprocess.Process, count: int) -> None:
    """Wait for `count` connections; fail at once if the process ends first, else after CONNECT_TIMEOUT."""
    connected = asyncio.create_task(fake.wait_connected(count, timeout=CONNECT_TIMEOUT))
    exited = asyncio.create_task(process.wait())
    try:
        await asyncio.wait({connected, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if not connected.done():
        connected.cancel()
        raise BenchError("exited before connecting")
    connected.result()  # raises asyncio.TimeoutError past CONNECT_TIMEOUT


@contextlib.asynccontextmanager
async def running(name: str, workdir: Path, problems: list[str], **options: Any) -> AsyncIterator[Target]:
    """`async with running(...) as target:` one process for one scenario, stopped with SIGTERM after."""
    target = await launch(name, workdir, **options)
    try:
        yield target
    finally:
        problem = await target.stop()
        if problem:
            problems.append(problem)
        if target.failures:
            problems.append(f"{target.name}: {target.failures} of {target.callbacks} acks were not a Graph 200")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..1), as numpy's default."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def probe_schedule(
    probe: Callable[[], Awaitable[float]], count: int, interval: float, offset: float
) -> list[float | None]:
    """Fire `probe` every `interval` s regardless of earlier answers (open loop, so a stalled loop
    shows as long probes instead of fewer probes); return latencies, None for a probe that failed."""

    async def one(delay: float) -> float | None:
        await asyncio.sleep(delay)
        try:
            return await probe()
        except (TimeoutError, aiohttp.ClientError, BenchError):
            return None

    return await asyncio.gather(*(one(offset + i * interval) for i in range(count)))


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    quick: bool = False
    webhook_latency: float = 0.2  # L for the concurrency rows
    bursts: tuple[int, ...] = (1, 10, 50, 100)
    official_bursts: tuple[int, ...] = (1, 10, 50)  # serial: N=100 would take ~20 s
    slow_webhook: float = 3.0  # responsiveness: callbacks held this long on the webhook
    slow_callbacks: int = 50
    probes: int = 20
    probe_interval: float = 0.1
    official_slow_webhook: float = 0.3  # official blocks its loop per callback: keep the total ~3 s
    official_slow_callbacks: int = 10
    official_probes: int = 10
    official_probe_interval: float = 0.25
    rounds: int = 3
    round_seconds: float = 1.5
    workers: int = 50

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        if not quick:
            return cls()
        return cls(
            quick=True,
            official_bursts=(1, 10),
            probes=10,
            official_slow_callbacks=5,
            official_probes=5,
            rounds=2,
            round_seconds=0.75,
        )


@dataclass
class Loop:
    """Closed-loop throughput of one handler, summed over its rounds."""

    acks: int = 0
    seconds: float = 0.0
    bot_cpu: float = 0.0
    bench_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.acks / self.seconds if self.seconds else 0.0


@dataclass
class Measurements:
    bursts: dict[str, dict[int, float | None]] = field(default_factory=dict)  # handler -> N -> wall s
    ping: dict[str, list[float | None]] = field(default_factory=dict)  # handler -> latencies s
    healthz: list[float | None] = field(default_factory=list)
    overlapped: dict[str, bool] = field(default_factory=dict)  # probes all ran while callbacks waited
    loops: dict[str, Loop] = field(default_factory=dict)  # ours, ours-2, floor, ceiling
    starts: dict[str, list[float]] = field(default_factory=dict)  # handler -> start seconds per launch
    rss_connected: dict[str, float] = field(default_factory=dict)
    rss_after: dict[str, float] = field(default_factory=dict)
    callbacks: dict[str, int] = field(default_factory=dict)  # handler -> callbacks served in throughput
    problems: list[str] = field(default_factory=list)

    def record_start(self, target: Target) -> None:
        self.starts.setdefault(target.name, []).append(target.start_seconds)
        self.rss_connected[target.name] = target.rss_connected  # the last launch: the one measured after


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def measure_bursts(target: Target, sizes: Sequence[int], latency: float) -> dict[int, float | None]:
    """Wall time of N simultaneous callbacks, each held `latency` s by the webhook."""
    target.fake.webhook_latency = latency
    walls: dict[int, float | None] = {}
    for size in sizes:
        # A serial handler needs N x L; give it that with room, and nobody more than that.
        walls[size] = await target.burst(size, timeout=2.0 + 1.5 * size * latency)
        if walls[size] is None:
            break  # the handler is still busy with this burst: later ones would measure the backlog
        await asyncio.sleep(0.1)
    target.fake.webhook_latency = 0.0
    return walls


async def healthz_probe(http: aiohttp.ClientSession, port: int) -> float:
    started = time.perf_counter()
    async with http.get(f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as response:
        await response.read()
        if response.status != 200:
            raise BenchError(f"/healthz answered {response.status}")
    return time.perf_counter() - started


async def still_pending(future: asyncio.Future[Any], delay: float) -> bool:
    await asyncio.sleep(delay)
    return not future.done()


async def measure_responsiveness(
    m: Measurements, target: Target, *, callbacks: int, latency: float, probes: int, interval: float, waiting: int
) -> None:
    """Ping (and /healthz, if served) latencies while `callbacks` replies wait `latency` s on the webhook.

    Probing starts once `waiting` of them have reached the webhook: all for a concurrent handler,
    one for a serial handler (it is then inside its first, blocking, POST).
    """
    fake = target.fake
    async with aiohttp.ClientSession() as http:
        health = target.health_port
        if health:
            await healthz_probe(http, health)  # warm up the keep-alive connection
        await target.ping()
        fake.webhook_latency = latency
        posts = len(fake.webhook_posts)
        load = asyncio.gather(*(target.invoke(timeout=callbacks * latency + 10) for _ in range(callbacks)))
        try:
            await fake.wait_for(lambda: len(fake.webhook_posts) >= posts + waiting, timeout=10)
            overlapped = asyncio.create_task(still_pending(load, probes * interval))  # after the last send
            pings = probe_schedule(lambda: target.ping(timeout=callbacks * latency + 5), probes, interval, 0.0)
            if health:
                checks = probe_schedule(lambda: healthz_probe(http, health), probes, interval, interval / 2)
                m.ping[target.name], m.healthz = await asyncio.gather(pings, checks)
            else:
                m.ping[target.name] = await pings
            m.overlapped[target.name] = await overlapped
            await asyncio.wait_for(load, callbacks * latency + 15)
        finally:
            fake.webhook_latency = 0.0
            load.cancel()  # a no-op once the callbacks are done


async def closed_loop(target: Target, seconds: float, workers: int, into: Loop) -> None:
    """`workers` callers each invoke, await the ack and repeat, for `seconds`."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            latencies.append(await target.invoke())

    bot_cpu, bench_cpu, started = target.cpu(), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    into.seconds += time.perf_counter() - started
    into.bot_cpu += target.cpu() - bot_cpu
    into.bench_cpu += time.process_time() - bench_cpu
    into.acks += len(latencies)
    into.latencies.extend(latencies)


async def scenario_concurrency(m: Measurements, plan: Plan, workdir: Path) -> None:
    progress("concurrency (ours)")
    async with running("ours", workdir, m.problems) as ours:
        m.record_start(ours)
        m.bursts["ours"] = await measure_bursts(ours, plan.bursts, plan.webhook_latency)


async def scenario_responsiveness(m: Measurements, plan: Plan, workdir: Path) -> None:
    progress("loop responsiveness (ours)")
    async with running("ours", workdir, m.problems, health=True) as ours:
        m.record_start(ours)
        await measure_responsiveness(
            m,
            ours,
            callbacks=plan.slow_callbacks,
            latency=plan.slow_webhook,
            probes=plan.probes,
            interval=plan.probe_interval,
            waiting=plan.slow_callbacks,
        )


async def scenario_official(m: Measurements, plan: Plan, workdir: Path) -> None:
    progress("concurrency and responsiveness (official example's approach)")
    async with running("official", workdir, m.problems) as official:
        m.record_start(official)
        m.bursts["official"] = await measure_bursts(official, plan.official_bursts, plan.webhook_latency)
        await measure_responsiveness(
            m,
            official,
            callbacks=plan.official_slow_callbacks,
            latency=plan.official_slow_webhook,
            probes=plan.official_probes,
            interval=plan.official_probe_interval,
            waiting=1,
        )


async def scenario_throughput(m: Measurements, plan: Plan, workdir: Path) -> None:
    """All four handlers up at once, measured in alternating short rounds so noise hits all alike."""
    progress("throughput and footprint (ours x1, ours x2, floor, ceiling)")
    async with contextlib.AsyncExitStack() as stack:
        targets = []
        for name, instances in (("ours", 1), ("ours-2", 2), ("floor", 1), ("ceiling", 1)):
            # One at a time, so each start time is measured on an otherwise idle machine.
            target = await stack.enter_async_context(running(name, workdir, m.problems, instances=instances))
            m.record_start(target)
            targets.append(target)
        for target in targets:
            await closed_loop(target, 0.3, plan.workers, Loop())  # warm-up, not counted
        m.loops = {target.name: Loop() for target in targets}
        for round_ in range(plan.rounds):
            for target in targets[round_:] + targets[:round_]:  # rotate who follows whom
                await closed_loop(target, plan.round_seconds, plan.workers, m.loops[target.name])
        for target in targets:
            m.rss_after[target.name] = target.rss()
            m.callbacks[target.name] = target.callbacks


async def run_benchmark(plan: Plan) -> Measurements:
    m = Measurements()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        for name in ("bot.py", "tools.yaml"):
            shutil.copy(ROOT / name, workdir / name)
        for scenario in (scenario_concurrency, scenario_responsiveness, scenario_throughput, scenario_official):
            try:
                await scenario(m, plan, workdir)
            except TimeoutError:  # an ack or probe past its own timeout, not the overall deadline
                raise BenchError(f"{scenario.__name__}: no answer within the wait's timeout") from None
    return m


async def run_within_deadline(plan: Plan) -> Measurements:
    try:
        return await asyncio.wait_for(run_benchmark(plan), DEADLINE_SECONDS)
    except TimeoutError:
        raise BenchError(f"not finished within {DEADLINE_SECONDS:.0f} s") from None


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str  # stable identifier, for --json consumers
    scenario: str
    ours: str
    reference: str
    target: str
    verdict: str  # PASS, FAIL, or "-" where there is no target
    values: dict[str, Any]


def verdict(value: float | None, limit: float | None, *, at_least: bool = False) -> str:
    if limit is None:
        return "-"
    if value is None:
        return "FAIL"
    return "PASS" if (value >= limit if at_least else value <= limit) else "FAIL"


def ms(values: Sequence[float | None]) -> tuple[str, float | None, float | None]:
    """'p50 / p99 ms' of the probes; p99 is None (no pass) when any probe went unanswered."""
    answered = [v for v in values if v is not None]
    if not answered:
        return "no answer", None, None
    p50, p99 = percentile(answered, 0.5), percentile(answered, 0.99)
    lost = len(values) - len(answered)
    if lost:
        return f"{p50 * 1000:.1f} ms p50, {lost} of {len(values)} unanswered", p50, None
    return f"{p50 * 1000:.1f} / {p99 * 1000:.1f} ms", p50, p99


def burst_rows(m: Measurements, plan: Plan) -> list[Row]:
    limits = {50: 1.5, 100: 2.5}
    latency = plan.webhook_latency
    rows = []
    for size in plan.bursts:
        cells, values = [], {}
        for handler in ("ours", "official"):
            wall = m.bursts.get(handler, {}).get(size)
            ratio = None if wall is None else wall / latency
            values[handler] = {"seconds": wall, "ratio_to_latency": ratio}
            if wall is not None:
                cells.append(f"{wall:.3f} s = {ratio:.2f} x L")
            elif size in m.bursts.get(handler, {}):
                cells.append(f"timeout (> {2.0 + 1.5 * size * latency:.0f} s)")
            elif handler == "official" and size not in plan.official_bursts:
                cells.append(f"not run (serial: ~{size * latency:.0f} s)")
            else:
                cells.append("not run")
        limit = limits.get(size)
        rows.append(
            Row(
                f"concurrency.n{size}",
                f"concurrency: N={size} callbacks at once, webhook L={latency * 1000:.0f} ms, until all acks",
                cells[0],
                f"official: {cells[1]}",
                f"<= {limit} x L" if limit else "-",
                verdict(values["ours"]["ratio_to_latency"], limit),
                values,
            )
        )
    return rows


def responsiveness_rows(m: Measurements, plan: Plan) -> list[Row]:
    ours_ping, p50, p99 = ms(m.ping.get("ours", []))
    official_ping, o50, o99 = ms(m.ping.get("official", []))
    health, h50, h99 = ms(m.healthz)
    during = f"{plan.slow_callbacks} callbacks on a {plan.slow_webhook:.0f} s webhook"
    return [
        Row(
            "responsiveness.ping",
            f"responsiveness: SYSTEM ping ack p50 / p99 ({during})",
            ours_ping,
            f"official: {official_ping}",
            "p99 <= 50 ms",
            verdict(p99, 0.050),
            {"ours": {"p50": p50, "p99": p99}, "official": {"p50": o50, "p99": o99}},
        ),
        Row(
            "responsiveness.healthz",
            f"responsiveness: GET /healthz p50 / p99 ({during})",
            health,
            "official: n/a (no health endpoint)",
            "p99 <= 50 ms",
            verdict(h99, 0.050),
            {"ours": {"p50": h50, "p99": h99}, "official": None},
        ),
    ]


def loop_values(loop: Loop | None) -> dict[str, float | None]:
    if loop is None or not loop.latencies:
        return dict.fromkeys(("per_second", "p50", "p99", "cpu_us_per_callback", "bot_cpu", "bench_cpu"))
    return {
        "per_second": loop.rate,
        "p50": percentile(loop.latencies, 0.5),
        "p99": percentile(loop.latencies, 0.99),
        # CPU time per callback tracks the handler's own cost more steadily than the rate, which
        # also depends on how the two cores are shared with the load generator.
        "cpu_us_per_callback": loop.bot_cpu / loop.acks * 1e6,
        "bot_cpu": loop.bot_cpu / loop.seconds,
        "bench_cpu": loop.bench_cpu / loop.seconds,
    }


def rate_text(values: dict[str, float | None], ratio: float | None = None) -> str:
    if values["per_second"] is None:
        return "not measured"
    versus = f" = {ratio:.3f} x floor" if ratio else ""
    return f"{values['per_second']:,.0f} cb/s{versus} (CPU {values['cpu_us_per_callback']:.0f} us/cb)"


def latency_text(values: dict[str, float | None]) -> str:
    if values["p50"] is None or values["p99"] is None:
        return "not measured"
    return f"{values['p50'] * 1000:.1f} / {values['p99'] * 1000:.1f} ms"


def throughput_rows(m: Measurements, plan: Plan) -> list[Row]:
    floor = loop_values(m.loops.get("floor"))
    ceiling = loop_values(m.loops.get("ceiling"))
    window = f"{plan.workers} in flight, instant webhook, {plan.rounds} x {plan.round_seconds} s"
    rows = []
    for name, instances in (("ours", 1), ("ours-2", 2)):
        ours = loop_values(m.loops.get(name))
        ratio = ours["per_second"] / floor["per_second"] if ours["per_second"] and floor["per_second"] else None
        rows.append(
            Row(
                f"throughput.instances{instances}",
                f"throughput: INSTANCES={instances} ({window})",
                rate_text(ours, ratio),
                f"floor: {rate_text(floor)}",
                ">= 0.85 x floor" if instances == 1 else "-",
                verdict(ratio, 0.85, at_least=True) if instances == 1 else "-",
                {"ours": ours, "floor": floor, "ratio_to_floor": ratio},
            )
        )
        if instances == 1:
            cpu, floor_cpu = ours["cpu_us_per_callback"], floor["cpu_us_per_callback"]
            cpu_ratio = cpu / floor_cpu if cpu and floor_cpu else None
            rows.append(
                Row(
                    "throughput.instances1.cpu",
                    "CPU per callback: INSTANCES=1 (the throughput run)",
                    f"{cpu:.0f} us = {cpu_ratio:.2f} x floor" if cpu_ratio else "not measured",
                    f"floor: {floor_cpu:.0f} us" if floor_cpu else "floor: not measured",
                    "<= 1.3 x floor",
                    verdict(cpu_ratio, 1.3),
                    {"ours_us": cpu, "floor_us": floor_cpu, "ratio_to_floor": cpu_ratio},
                )
            )
        rows.append(
            Row(
                f"throughput.instances{instances}.latency",
                f"ack latency p50 / p99: INSTANCES={instances}",
                latency_text(ours),
                f"floor: {latency_text(floor)}",
                "-",
                "-",
                {"ours": ours, "floor": floor},
            )
        )
    rows.append(
        Row(
            "throughput.ceiling",
            "throughput: SDK ceiling (handler acks only, no webhook)",
            "-",
            f"ceiling: {rate_text(ceiling)}, {latency_text(ceiling)}",
            "-",
            "-",
            {"ceiling": ceiling},
        )
    )
    return rows


def footprint_rows(m: Measurements) -> list[Row]:
    starts = m.starts.get("ours", [])
    start = statistics.median(starts) if starts else None
    floor_start = (m.starts.get("floor") or [None])[0]
    rss = m.rss_connected.get("ours")
    floor_rss = m.rss_connected.get("floor")

    def after(name: str) -> tuple[str, float | None, float | None]:
        now, then = m.rss_after.get(name), m.rss_connected.get(name)
        if now is None or then is None:
            return "not measured", None, None
        acks = m.callbacks.get(name, 0)
        return f"{now:.1f} MB (+{now - then:.1f} MB after {acks:,} callbacks)", now, now - then

    ours_after, ours_now, ours_growth = after("ours")
    floor_after, floor_now, floor_growth = after("floor")
    return [
        Row(
            "start.first_connection",
            f"start: process start -> first connection (median of {len(starts)} launches)",
            f"{start:.2f} s" if start is not None else "not measured",
            f"floor: {floor_start:.2f} s" if floor_start is not None else "floor: not measured",
            "<= 1.0 s",
            verdict(start, 1.0),
            {"ours": start, "ours_launches": starts, "floor": floor_start},
        ),
        Row(
            "memory.connected",
            "memory: RSS once connected",
            f"{rss:.1f} MB" if rss is not None else "not measured",
            f"floor: {floor_rss:.1f} MB" if floor_rss is not None else "floor: not measured",
            "<= 50 MB",
            verdict(rss, 50.0),
            {"ours_mb": rss, "floor_mb": floor_rss},
        ),
        Row(
            "memory.after_throughput",
            "memory: RSS after the throughput run",
            ours_after,
            f"floor: {floor_after}",
            "report",
            "-",
            {
                "ours_mb": ours_now,
                "ours_growth_mb": ours_growth,
                "floor_mb": floor_now,
                "floor_growth_mb": floor_growth,
            },
        ),
    ]


def notes(m: Measurements, plan: Plan) -> list[str]:
    lines = [
        f"official responsiveness: {plan.official_slow_callbacks} callbacks on a {plan.official_slow_webhook} s "
        f"webhook (it blocks its loop for each reply, so 50 x 3 s would take minutes); ping probes only",
        "probes are sent on a fixed schedule whatever earlier ones took; latencies run from push to ack",
        "CPU in throughput cells: the handler process's CPU time per callback",
    ]
    ours_growth = m.rss_after.get("ours", 0.0) - m.rss_connected.get("ours", 0.0)
    lines.append(
        "memory: bot.py keeps each messageId's result 300 s (at most 100,000) to answer redeliveries without a "
        "second reply, "
        f"so RSS follows recent traffic; ours grew "
        f"{ours_growth:+.1f} MB over {m.callbacks.get('ours', 0):,} callbacks"
    )
    cache = getattr(dingtalk_stream.DingTalkStreamClient, "MAX_CACHED_MESSAGE_RESULTS", None)
    if cache:  # the reference handlers run the SDK's own start(), which caches acks in this version
        lines.append(
            f"memory: the reference handlers use the SDK's start(), which in this version also caches the ack of "
            f"every messageId (LRU of {cache:,} per client)"
        )
    if "ours-2" in m.rss_after:
        lines.append(
            f"memory: ours with INSTANCES=2 (one SDK client per instance): {m.rss_after['ours-2']:.1f} MB "
            f"after {m.callbacks.get('ours-2', 0):,} callbacks ({m.rss_connected['ours-2']:.1f} MB once connected)"
        )
    for name, overlapped in m.overlapped.items():
        if not overlapped:
            lines.append(
                f"warning: {name}'s callbacks finished before the last probe was sent; responsiveness understated"
            )
    for name, loop in m.loops.items():
        if loop.seconds and loop.bench_cpu / loop.seconds > 0.9:
            lines.append(f"warning: load generator near 100% CPU while driving {name}; its throughput is a lower bound")
    return lines + [f"problem: {p}" for p in m.problems]


def machine() -> dict[str, Any]:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "dingtalk-stream": version("dingtalk-stream"),
        "websockets": version("websockets"),
        "aiohttp": version("aiohttp"),
        "bot_py_sha256": hashlib.sha256((ROOT / "bot.py").read_bytes()).hexdigest()[:12],  # which bot was measured
        # Other work on the machine skews every row; the interleaved throughput rounds share it fairly.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def table(rows: Sequence[Row]) -> str:
    header = ("scenario", "ours", "reference", "target", "verdict")
    cells = [header, *((r.scenario, r.ours, r.reference, r.target, r.verdict) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells[1:])])


def report(host: dict[str, Any], m: Measurements, plan: Plan, seconds: float) -> dict[str, Any]:
    rows = burst_rows(m, plan) + responsiveness_rows(m, plan) + throughput_rows(m, plan) + footprint_rows(m)
    return {
        "machine": host,
        "plan": asdict(plan),
        "rows": [asdict(row) for row in rows],
        "notes": notes(m, plan),
        "wall_seconds": round(seconds, 1),
    }


def render(data: dict[str, Any]) -> str:
    host = data["machine"]
    rows = [Row(**row) for row in data["rows"]]
    lines = [
        f"machine: {host['cores']} cores, Python {host['python']}, dingtalk-stream {host['dingtalk-stream']}, "
        f"websockets {host['websockets']}, aiohttp {host['aiohttp']}, load average {host['load_average_1min']}, "
        f"bot.py sha256 {host['bot_py_sha256']}" + ("  (--quick)" if data["plan"]["quick"] else ""),
        "",
        table(rows),
        "",
        *(f"note: {n}" for n in data["notes"]),
        f"total wall time: {data['wall_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quick", action="store_true", help="shorter rounds and fewer probes")
    parser.add_argument("--serve", choices=REFERENCES, help="run one reference handler until SIGTERM")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        asyncio.run(serve_reference(args.serve))
        return 0
    plan = Plan.for_run(args.quick)
    host = machine()  # before the run, so the load average is the machine's, not ours
    started = time.perf_counter()
    try:
        measurements = asyncio.run(run_within_deadline(plan))
    except BenchError as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    data = report(host, measurements, plan, time.perf_counter() - started)
    print(json.dumps(data, ensure_ascii=False, indent=2) if args.json else render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
