"""W3's peer: the whole flow with aiohttp as one process, like `python -m fakegpt --url URL PROMPT`."""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import AiohttpClient


async def main(url: str, prompt: str) -> None:
    client = AiohttpClient(url)
    await client.login()
    print(await client.conversation(prompt))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
