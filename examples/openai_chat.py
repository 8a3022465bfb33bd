"""Chat with a kiln deployment through the official ``openai`` client, streamed.

    python examples/openai_chat.py BASE_URL MODEL "message"   (the key: $KILN_API_KEY)

Prints the answer as it streams, then the time to the first token, the tokens per
second and the usage kiln counted (``stream_options.include_usage``).
"""

import os
import sys
import time

from openai import OpenAI

base_url, model, message = sys.argv[1:4]
client = OpenAI(base_url=base_url, api_key=os.environ["KILN_API_KEY"])
started = time.perf_counter()
first = None
usage = None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": message}],
    max_tokens=64,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            first = first or time.perf_counter()
            print(choice.delta.content, end="", flush=True)
elapsed = time.perf_counter() - started
print()
if usage is not None and first is not None:
    rate = usage.completion_tokens / max(elapsed - (first - started), 1e-9)
    print(
        f"first token after {1000 * (first - started):.0f} ms, {rate:.0f} tokens/s; "
        f"usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
    )
