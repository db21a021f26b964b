"""The sample skills the engine's tests run against, in place of the demo ones in bot.py and tools.yaml.

Replace the demos with your own actions and the engine's tests keep working; the tests of bot.py's own
actions live in tests/test_actions.py. In-process tests get these through the `start_bot` fixture;
`python bot.py` subprocesses through PRELUDE (see tests/conftest.py, BotProcess).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SAMPLE_TOOLS = Path(__file__).with_name("sample_tools.yaml")
WEATHER = "/v1/actions/weather"  # disabled: replies through sessionWebhook
RATE = "/v1/actions/exchange-rate"  # auto: returns data
ON_CALL = "/v1/actions/on-call"  # markdown: returns markdown


async def get_weather(location: str, date: str = "今天") -> str:
    return f"### {location} · {date}\n- 天气 / Weather: 晴 Sunny\n\n> 演示数据 / Demo data"


async def get_exchange_rate(currency: str, amount: float = 1) -> dict[str, Any]:
    rate = {"USD": 7.12, "EUR": 7.71, "JPY": 0.047, "HKD": 0.91}[currency]
    return {"currency": currency, "amount": amount, "cny": round(amount * rate, 2), "rate": rate, "demo": True}


async def get_on_call(team: str, weeks: int = 1) -> str:
    rows = "".join(f"\n| {week + 1} | person {week + 1} |" for week in range(weeks))
    return f"**{team}** 值班表 / on-call\n\n| 周 Week | 值班 On call |\n|---|---|{rows}"


SAMPLE_ACTIONS = {WEATHER: get_weather, RATE: get_exchange_rate, ON_CALL: get_on_call}
ACTIONS = SAMPLE_ACTIONS  # for --actions tests.samples

# What a `python bot.py` subprocess runs first (as run_bot.py beside a copy of bot.py and SAMPLE_TOOLS).
PRELUDE = f"""
import sys
sys.path.append({str(Path(__file__).resolve().parent.parent)!r})  # after the folder of the bot.py copy
import bot
from tests.samples import SAMPLE_ACTIONS
bot.ACTIONS.clear()
bot.ACTIONS.update(SAMPLE_ACTIONS)
"""
