"""One engine shared between threads, and streams suspended and interleaved: every
request gives exactly the output it gives alone; abandoned streams leave nothing behind."""
import gc
import random
import threading

import pytest

from wsd_engine import WSD, WSDParams, load_model
from wsd_engine.synthetic import make_tokenizer, make_wsd_pair

PROMPTS = ["Tell me about the quick brown fox.", "Hello! How can I help?",
           "Numbers like 1, 2, 3.", "Alignment is hard at the start.",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_wsd_pair(str(tmp_path_factory.mktemp("conc")), sharpen=100.0, damp=0.02,
                         perturb=0.05, tokenizer=make_tokenizer(320))


@pytest.fixture(scope="module")
def wsd(pair):
    return WSD.from_pretrained(*pair, max_batch_size=4)   # threads and streams share batches


def _requests(n, seed):
    """n (prompt, params) with different prompts, lengths, chunks, sampling and stops."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sampled = rng.random() < 0.4
        out.append((rng.choice(PROMPTS), WSDParams(
            draft_max_tokens=rng.randint(4, 20), max_new_tokens=rng.randint(8, 28),
            chunk=rng.choice((1, 3, 8)), window=rng.choice((2, 4, 6)),
            threshold=rng.choice((0.5, 0.8)),
            temperature=0.9 if sampled else 0.0, seed=rng.randrange(1000),
            stop=rng.choice((None, ("e",), ("[User]",))))))
    return out


def _key(r):
    return (r.token_ids, r.text, r.switch_index, r.switched, r.finish_reason)


def test_threads_each_get_their_solo_output(wsd):
    """8 threads x 25 requests on one engine, half of them streamed; each result equals
    the same request run alone."""
    reqs = [_requests(25, seed) for seed in range(8)]
    solo = [[_key(wsd.generate(p, q)) for p, q in rs] for rs in reqs]
    got = [[None] * 25 for _ in range(8)]
    errors = []

    def worker(i):
        try:
            for j, (p, q) in enumerate(reqs[i]):
                if (i + j) % 2:
                    gen = wsd.stream(p, q)
                    pieces = []
                    while True:
                        try:
                            pieces.append(next(gen))
                        except StopIteration as done:
                            r = done.value
                            break
                    assert "".join(pieces) == r.text
                else:
                    r = wsd.generate(p, q)
                got[i][j] = _key(r)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert got == solo


def test_interleaved_streams_in_one_thread(wsd):
    """Several streams advanced in turn from one thread (as an event loop would), with
    plain requests in between: each stream's text and result are its solo ones."""
    reqs = _requests(4, seed=11)
    solo = [wsd.generate(p, q) for p, q in reqs]
    gens = [wsd.stream(p, q) for p, q in reqs]
    pieces = [[] for _ in reqs]
    results = [None] * len(reqs)
    live = set(range(len(reqs)))
    rng = random.Random(3)
    while live:
        i = rng.choice(sorted(live))
        try:
            pieces[i].append(next(gens[i]))
        except StopIteration as done:
            results[i] = done.value
            live.discard(i)
        if rng.random() < 0.2:                  # a whole request while streams are open
            p, q = reqs[0]
            assert _key(wsd.generate(p, q)) == _key(solo[0])
    for i, r in enumerate(results):
        assert _key(r) == _key(solo[i])
        assert "".join(pieces[i]) == solo[i].text


def test_suspended_stream_survives_another_thread(wsd):
    """A stream paused mid-answer while another thread runs full requests resumes to
    exactly its solo output."""
    p, q = PROMPTS[0], WSDParams(draft_max_tokens=20, max_new_tokens=40, chunk=3, stop=())
    solo = wsd.generate(p, q)
    gen = wsd.stream(p, q)
    first = [next(gen), next(gen)]
    other = threading.Thread(target=lambda: [wsd.generate(x, q) for x in PROMPTS[1:]])
    other.start()
    other.join(timeout=300)
    rest = list(gen)
    assert "".join(first + rest) == solo.text
    assert wsd.last_result.token_ids == solo.token_ids


def test_abandoned_streams_leave_nothing_behind(wsd):
    """Streams dropped half-way (closed, or simply forgotten) keep no parked state and do
    not disturb later requests."""
    p, q = PROMPTS[1], WSDParams(draft_max_tokens=20, max_new_tokens=40, chunk=2, stop=())
    solo = _key(wsd.generate(p, q))
    for _ in range(5):
        g1, g2 = wsd.stream(p, q), wsd.stream(PROMPTS[2], q)
        next(g1), next(g2), next(g1)          # g1 parked by g2, then restored
        g1.close()
        del g2                                  # never closed explicitly
        gc.collect()
        assert _key(wsd.generate(p, q)) == solo
    assert wsd.pilot.parked_sequences == 0 and wsd.base.parked_sequences == 0


def test_model_generate_from_threads(pair):
    """Model.generate / score on one model from several threads: serialized, exact."""
    m = load_model(pair[1])
    prompts = [[5 + i, 9, 13 + i] for i in range(6)]
    want = [m.generate(x, max_new_tokens=12, stop_at_eos=False) for x in prompts]
    got = [None] * len(prompts)

    def worker(i):
        for _ in range(3):
            got[i] = m.generate(prompts[i], max_new_tokens=12, stop_at_eos=False)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == want


def _collect(gen):
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            return pieces, done.value


def test_failed_parking_releases_both_models_and_fails_loudly(wsd, monkeypatch):
    """Copying the engine's suspended rows aside fails (out of memory) while another
    thread's `Model.generate` takes the base: that call fails, neither model stays locked,
    the suspended stream gets a WSDError instead of running on a cache that is not its own,
    and later requests are exact."""
    from wsd_engine import WSDError
    from wsd_engine.cache import StaticKVCache
    p, q = PROMPTS[0], WSDParams(draft_max_tokens=12, max_new_tokens=20, chunk=3, stop=())
    solo = _key(wsd.generate(p, q))
    a = wsd.stream(p, q)
    next(a)

    def failing(self):
        raise MemoryError("simulated out of memory while parking")

    monkeypatch.setattr(StaticKVCache, "snapshot", failing)
    result = []
    ids = wsd.base.tokenizer.encode("hello")
    t = threading.Thread(target=lambda: result.append(_safe(wsd.base.generate, ids, 4)))
    t.start()
    t.join(timeout=60)
    monkeypatch.undo()
    assert isinstance(result[0], MemoryError)
    with pytest.raises(WSDError, match="cached sequence was lost"):
        list(a)
    done = []
    t = threading.Thread(target=lambda: done.append(_key(wsd.generate(p, q))))
    t.start()
    t.join(timeout=60)
    assert done == [solo]                          # no lock left held, the answer exact


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - returned to the test
        return e


def test_interrupted_restore_never_leaves_a_stream_on_a_wrong_cache(wsd, monkeypatch):
    """An interrupt lands while the engine's parked rows are being put back (keys copied,
    values not): the streams running then end (with an error, never on a wrong cache), and
    the engine's next requests are exact."""
    from wsd_engine import WSDError
    from wsd_engine.cache import StaticKVCache
    q = WSDParams(draft_max_tokens=16, max_new_tokens=30, chunk=3, stop=())
    solo = [_key(wsd.generate(p, q)) for p in PROMPTS[:2]]
    a, b = wsd.stream(PROMPTS[0], q), wsd.stream(PROMPTS[1], q)
    next(a), next(b)
    wsd.base.generate(wsd.base.tokenizer.encode("hello"), 4)     # parks the engine's rows
    assert wsd.base.parked_sequences == 1
    real = StaticKVCache.restore

    def interrupted(self, snap):
        lengths, parts = snap
        s = next(i for i, part in enumerate(parts) if part is not None)
        self.k[:, s, :, :lengths[s]].copy_(parts[s][0])
        raise KeyboardInterrupt

    monkeypatch.setattr(StaticKVCache, "restore", interrupted)
    with pytest.raises(KeyboardInterrupt):
        next(b)                                # fails putting the rows back
    monkeypatch.setattr(StaticKVCache, "restore", real)
    with pytest.raises(WSDError, match="interrupted"):
        list(a)                                # text that was final, then the error
    assert wsd.num_running == 0
    assert [_key(r) for r in wsd.generate(PROMPTS[:2], q)] == solo


def test_streams_ended_by_an_exception_keep_no_copies(wsd):
    """Streams parked and then ended by an exception thrown into them (a client that went
    away), with the exceptions kept alive: no parked copy stays behind."""
    q = WSDParams(draft_max_tokens=24, max_new_tokens=40, chunk=3)
    kept = []
    for _ in range(5):
        a = wsd.stream(PROMPTS[0], q)
        next(a)
        b = wsd.stream(PROMPTS[1], q)
        next(b)                                  # a parked
        with pytest.raises(ConnectionResetError) as e:
            a.throw(ConnectionResetError("client went away"))
        kept.append(e.value)
        _collect(b)
    assert wsd.pilot.parked_sequences == 0 and wsd.base.parked_sequences == 0
