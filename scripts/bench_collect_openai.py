"""The peer of `fuserl collect` in scripts/bench-collect.sh: a plain asyncio loop with the
official `openai` client, the same prompts, sampling settings, seeds (fuserl's, recomputed here)
and concurrency, against the same server. Prints one JSON line: completions, seconds, completions/s,
the completion tokens the server reported, the summed request latencies, and a digest of the answers (the sha256 of the lines
"prompt_id<TAB>sample_index<TAB>text" sorted), which bench-collect.sh compares with the same digest
of fuserl's store: equal digests mean both sides got the same answers, so the same server work.

    python bench_collect_openai.py BASE_URL PROMPTS.jsonl SAMPLES CONCURRENCY MAX_TOKENS
"""
import asyncio
import hashlib
import json
import sys
import time

from openai import AsyncOpenAI


def sample_seed(run_seed: int, prompt_id: str, sample_index: int) -> int:
    """fuserl_run::collect::sample_seed: the seed fuserl asks sample `sample_index` of a prompt
    with, so that both sides ask for the same answers (same lengths, same work)."""
    m = 2**64
    h = 0xCBF29CE484222325 ^ (run_seed * 0x9E3779B97F4A7C15 % m)
    for b in prompt_id.encode() + sample_index.to_bytes(4, "little"):
        h ^= b
        h = h * 0x100000001B3 % m
    return h % 2**31


async def main() -> None:
    base_url, prompts_file, samples, concurrency, max_tokens = sys.argv[1:6]
    samples, concurrency, max_tokens = int(samples), int(concurrency), int(max_tokens)
    rows = [json.loads(line) for line in open(prompts_file) if line.strip()]
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=5, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    done = 0
    tokens = 0
    latency = 0.0
    answers = []

    async def ask(prompt_id: str, sample: int, prompt: str, seed: int) -> None:
        nonlocal done, tokens, latency
        async with gate:
            t = time.perf_counter()
            r = await client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": prompt}],
                temperature=0.8,
                top_p=0.95,
                max_tokens=max_tokens,
                seed=seed,
            )
            latency += time.perf_counter() - t
            text = r.choices[0].message.content
            assert text is not None
            answers.append(f"{prompt_id}\t{sample}\t{text}")
            tokens += r.usage.completion_tokens
            done += 1

    t0 = time.perf_counter()
    # In fuserl's order: the samples of one prompt one after the other, with fuserl's seeds
    # (the bench recipe's run seed is the default, 42).
    await asyncio.gather(
        *(ask(r["id"], s, r["prompt"], sample_seed(42, r["id"], s)) for r in rows for s in range(samples))
    )
    secs = time.perf_counter() - t0
    digest = hashlib.sha256("\n".join(sorted(answers)).encode()).hexdigest()[:16]
    print(
        json.dumps(
            {
                "completions": done,
                "seconds": round(secs, 3),
                "per_s": round(done / secs, 3),
                "completion_tokens": tokens,
                "latency_s": round(latency, 3),
                "digest": digest,
            }
        )
    )


asyncio.run(main())
