"""Tests of bot.py's own actions: the demo skills now, yours once you replace them.

Keep one test for the happy path and one for a failure path per action. Through the `skill` fixture
(tests/conftest.py) a call goes through the bot as the assistant's do, so it meets what tools.yaml declares: the
schema's rules, the types, the display mode; a function called directly meets none of that. The engine's tests (the
other files) run against the sample skills in tests/samples.py, so they do not depend on what you put here.
"""

from __future__ import annotations

import bot


async def test_get_weather_posts_a_card_of_place_and_day(skill):
    answer = await skill("/v1/actions/weather", location="杭州", date="明天")
    assert (answer.status, answer.body) == (200, {"success": True})  # disabled: delivered to the chat
    assert answer.card.startswith("### 杭州 · 明天") and "Demo data, not a real forecast" in answer.card


async def test_get_weather_defaults_to_today():  # a function's own logic can be tested directly too
    assert "今天" in await bot.get_weather(location="北京")


async def test_get_exchange_rate_returns_data_for_the_assistant(skill):
    answer = await skill("/v1/actions/exchange-rate", currency="USD", amount=100)
    assert answer.status == 200
    assert answer.body == {"currency": "USD", "amount": 100, "cny": 712.0, "rate": 7.12, "demo": True}


async def test_get_exchange_rate_refuses_a_currency_tools_yaml_does_not_list(skill):
    answer = await skill("/v1/actions/exchange-rate", currency="GBP")  # tools.yaml's enum keeps it from the action
    assert answer.status == 400
    assert answer.body["error"] == "parameter currency must be one of ['USD', 'EUR', 'JPY', 'HKD'], got 'GBP'"


async def test_get_on_call_is_a_markdown_table_with_one_row_a_week(skill):
    answer = await skill("/v1/actions/on-call", team="运维", weeks=3)
    assert answer.status == 200 and answer.card is None  # markdown: shown by the assistant, no webhook
    markdown = answer.body["content"]
    assert markdown.startswith("**运维**") and "演示数据 / demo data" in markdown
    assert [line.split("|")[1].strip() for line in markdown.splitlines()[-3:]] == ["1", "2", "3"]


async def test_get_on_call_refuses_more_weeks_than_tools_yaml_allows(skill):
    answer = await skill("/v1/actions/on-call", team="运维", weeks=99)
    assert answer.status == 400
    assert answer.body["error"] == "parameter weeks must be smaller than or equal to 8, got 99"
