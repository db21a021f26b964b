"""Tests of bot.py's own actions, called directly: the demo skills now, yours once you replace them.

Keep one test for the happy path and one for a failure path per action. The engine's tests (the other files)
run against the sample skills in tests/samples.py, so they do not depend on what you put here.
"""

from __future__ import annotations

import pytest

import bot


async def test_get_weather_echoes_place_and_day_as_demo_data():
    markdown = await bot.get_weather(location="杭州", date="明天")
    assert "杭州" in markdown and "明天" in markdown
    assert "演示数据" in markdown and "Demo data" in markdown


async def test_get_weather_defaults_to_today():
    assert "今天" in await bot.get_weather(location="北京")


async def test_get_exchange_rate_returns_data_for_the_assistant():
    data = await bot.get_exchange_rate(currency="USD", amount=100)
    assert data == {"currency": "USD", "amount": 100, "cny": 712.0, "rate": 7.12, "demo": True}


async def test_get_exchange_rate_of_an_unknown_currency_fails_loudly():
    with pytest.raises(KeyError):  # tools.yaml's enum keeps other currencies out: reaching here is a bug
        await bot.get_exchange_rate(currency="GBP")


async def test_get_on_call_is_a_markdown_table_with_one_row_a_week():
    markdown = await bot.get_on_call(team="运维", weeks=3)
    assert markdown.startswith("**运维**") and "演示数据 / demo data" in markdown
    assert [line.split("|")[1].strip() for line in markdown.splitlines()[-3:]] == ["1", "2", "3"]
