"""`tokenization.decode` (the Rust decoder called directly) gives exactly transformers'
decode with special tokens skipped and no clean-up, on random ids of the test tokenizers,
special tokens and incomplete UTF-8 sequences included."""
import random

import pytest

from wsd_engine.synthetic import make_tokenizer
from wsd_engine.tokenization import IncrementalDetokenizer, decode


@pytest.mark.parametrize("vocab", [320, 420])
def test_fast_decode_equals_transformers(vocab):
    tok = make_tokenizer(vocab)
    assert getattr(tok, "backend_tokenizer", None) is not None     # the fast path runs
    rng = random.Random(vocab)
    n = len(tok)
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randint(0, 40))]
        want = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert decode(tok, ids) == want
        assert decode(tok, tuple(ids)) == want
        detok = IncrementalDetokenizer(tok)
        for i in range(0, len(ids), 3):
            detok.push(ids[i:i + 3])
        assert want.startswith(detok.text)
