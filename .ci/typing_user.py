"""A user's code, checked with mypy --strict against an installed fakegpt (see .ci/run)."""

import asyncio

import fakegpt


async def ask(prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    async with fakegpt.FakeGpt.stream("", messages, profile="backend-api", access_token="t") as reply:
        async for event in reply:
            print(event.delta, end="")
    title: "str | None" = reply.title
    await fakegpt.FakeGpt.aclose()
    return reply.text + (title or "")


def main() -> None:
    limits: fakegpt.Limits = fakegpt.Limits(max_event_size=1 << 20)
    timeouts = fakegpt.Timeouts(connect=5.0)
    print(limits, timeouts, asyncio.run(ask("Hi")))
