"""Soak: 2,000 sequential requests with random valid params on one engine. Memory does
not grow after warm-up, and a fixed request gives the identical output at the start and
at the end (no state leaks from one request into the next)."""
import gc
import os
import random

import pytest

from wsd_engine import WSD, WSDParams
from wsd_engine.synthetic import make_tokenizer, make_wsd_pair

PROMPTS = ["Tell me about the quick brown fox.", "Hello! How can I help?",
           "Numbers like 1, 2, 3.", [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"}]]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _random_params(rng: random.Random) -> WSDParams:
    return WSDParams(
        window=rng.randint(1, 8), threshold=rng.uniform(0.05, 1.0),
        draft_max_tokens=rng.randint(1, 16), max_new_tokens=rng.randint(1, 24),
        chunk=rng.choice((1, 2, 3, 8, 16)),
        temperature=rng.choice((0.0, 0.0, 0.7, 1.3)), top_p=rng.choice((1.0, 0.9, 0.5)),
        top_k=rng.choice((0, 0, 5, 50)), seed=rng.randrange(2**32),
        stop=rng.choice((None, ("e",), ("[User]", "[System]", "[Assistant]"), (" t", "an"))))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_soak_2000_requests(tmp_path):
    pair = make_wsd_pair(str(tmp_path), sharpen=100.0, damp=0.02, perturb=0.05,
                         tokenizer=make_tokenizer(320))
    wsd = WSD.from_pretrained(*pair)
    fixed = WSDParams(draft_max_tokens=16, max_new_tokens=24, chunk=3)
    first = wsd.generate(PROMPTS[0], fixed)
    rng = random.Random(1234)
    rss = None
    for i in range(2000):
        prompt = rng.choice(PROMPTS)
        params = _random_params(rng)
        if i % 10 == 0:
            r = None
            for piece in wsd.stream(prompt, params):
                assert piece
            r = wsd.last_result
        else:
            r = wsd.generate(prompt, params)
        assert len(r.token_ids) <= params.max_new_tokens
        if i == 300:                               # warmed up: allocator pools settled
            gc.collect()
            rss = _rss_bytes()
    gc.collect()
    growth = _rss_bytes() / rss - 1.0
    print(f"soak: RSS {rss / 2**20:.0f} MiB after warm-up, growth {growth:+.2%} over 1,700 "
          "requests")
    assert growth < 0.05, f"RSS grew by {growth:.1%} over 1,700 requests"
    last = wsd.generate(PROMPTS[0], fixed)
    assert (last.token_ids, last.text, last.switch_index) == \
        (first.token_ids, first.text, first.switch_index)
