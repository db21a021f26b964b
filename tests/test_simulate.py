"""`python -m tests.simulate` as a user runs it: the demo reply, a failure, interactive mode."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.conftest import ROOT
from tests.fake_dingtalk import bot_env


def simulate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.simulate", "--path", "/v1/actions/weather", *args],
        cwd=ROOT, env=bot_env(), input=stdin, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_simulator_prints_the_markdown_reply_and_status_200():
    result = simulate("杭州", "明天")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "bot.py connected to the local DingTalk simulator" in out
    assert "▶ POST /v1/actions/weather" in out
    assert "杭州 · 明天" in out and "• 天气 / Weather: 晴 Sunny" in out and "│ 演示数据" in out
    assert 'status 200  body {"success": true}' in out
    assert "round trip" in out


def test_simulator_exits_1_when_the_bot_answers_non_200():
    result = simulate("date=明天")  # no location: the action's required parameter
    assert result.returncode == 1
    assert "status 400" in result.stdout
    assert "✗ the bot answered Graph status 400" in result.stdout
    assert "missing parameter(s): location" in result.stdout


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
        [sys.executable, "-m", "tests.simulate", "-i"],
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
