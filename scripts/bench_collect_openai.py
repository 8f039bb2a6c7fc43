"""The peer of `fuserl collect` in scripts/bench-collect.sh: a plain asyncio loop with the
official `openai` client, the same prompts, sampling settings, seeds and concurrency, against the
same server. Prints one JSON line: completions, seconds, completions/s.

    python bench_collect_openai.py BASE_URL PROMPTS.jsonl SAMPLES CONCURRENCY MAX_TOKENS
"""
import asyncio
import json
import sys
import time

from openai import AsyncOpenAI


async def main() -> None:
    base_url, prompts_file, samples, concurrency, max_tokens = sys.argv[1:6]
    samples, concurrency, max_tokens = int(samples), int(concurrency), int(max_tokens)
    prompts = [json.loads(line)["prompt"] for line in open(prompts_file) if line.strip()]
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=5, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def ask(prompt: str, seed: int) -> None:
        nonlocal done
        async with gate:
            r = await client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": prompt}],
                temperature=0.8,
                top_p=0.95,
                max_tokens=max_tokens,
                seed=seed,
            )
            assert r.choices[0].message.content is not None
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(ask(p, i * 1000 + s) for i, p in enumerate(prompts) for s in range(samples)))
    secs = time.perf_counter() - t0
    print(json.dumps({"completions": done, "seconds": round(secs, 3), "per_s": round(done / secs, 3)}))


asyncio.run(main())
