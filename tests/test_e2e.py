"""End to end through the real SDK: fake gateway frame -> bot -> webhook reply -> ack."""

from __future__ import annotations

from tests.fake_dingtalk import graph_request

WEATHER = "/v1/actions/weather"


async def test_happy_path_replies_markdown_card_and_acks_200(fake, remote, start_bot):
    async with start_bot():
        webhook = fake.webhook_url("aswh_happy")
        result = await remote(fake.invoke(graph_request(WEATHER, {"location": "杭州", "date": "明天"}, session_webhook=webhook)))
    assert result.status == 200
    assert result.body == {"success": True}
    assert result.ack["code"] == 200
    [post] = fake.webhook_posts
    assert post.session == "aswh_happy"
    assert post.payload["contentType"] == "ai_card"
    assert "杭州" in post.markdown and "明天" in post.markdown
