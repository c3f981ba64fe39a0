"""Batched WSD: every row of a batch gives what the same request gives alone (the engine
with one slot) and what the offline reference gives, token for token (fp32, CPU), whatever
the other rows do: early / late / never switches, pilot EOS, the draft cap, different
prompt lengths, windows, thresholds, chunk sizes and budgets per row, sampled rows, rows
admitted while others are half done, rows aborted mid-way, two tokenizers. Each test
checks that its mix really contains what it claims, so none passes vacuously."""
import pytest

from wsd_engine import ConfigError, RequestError, WSDError
from wsd_engine.engine import WSD, WSDParams
from wsd_engine.reference import ReferenceWSD
from wsd_engine.request import Request
from wsd_engine.loading import load_model
from wsd_engine.sampling import SamplingParams
from wsd_engine.synthetic import make_tokenizer, make_wsd_pair

PROMPTS = [
    "Tell me about the quick brown fox.",
    "Why is the sky blue?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    "A much longer question about lazy dogs, brown foxes, the weather, and what a "
    "careful writer would say about all of them together in one answer.",
    "Write a list.",
    "What is two plus two?",
    "Name a colour.",
]
# (window, threshold, chunk, draft_max_tokens, max_new_tokens) per row
MIX = [
    dict(),                                                   # the paper's rule
    dict(window=3, threshold=0.3, chunk=3),                   # an early switch
    dict(threshold=1.0, chunk=64),                            # never: the whole draft
    dict(window=1, threshold=0.9, chunk=1),
    dict(window=4, threshold=0.6, chunk=5, max_new_tokens=20),
    dict(draft_max_tokens=5, threshold=1.0),                  # the draft cap ends it
    dict(window=8, threshold=0.7, chunk=8, max_new_tokens=40),
]
DRAFT, NEW = 48, 64


def _params(kw) -> WSDParams:
    return WSDParams(**{"draft_max_tokens": DRAFT, "max_new_tokens": NEW, **kw})


def _key(r):
    return (r.token_ids, r.text, r.switch_index, r.switched, r.finish_reason, r.draft_tokens)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(320)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tok):
    return make_wsd_pair(str(tmp_path_factory.mktemp("batch")), sharpen=100.0, damp=0.02,
                         perturb=0.05, tokenizer=tok)


@pytest.fixture(scope="module")
def solo(pair):
    return WSD.from_pretrained(*pair)


def _engine(pair, n):
    return WSD(load_model(pair[0], max_batch_size=n), load_model(pair[1], max_batch_size=n))


def _reference(pair, prompt, kw):
    p = _params(kw)
    return ReferenceWSD(*pair).generate(prompt, window=p.window, threshold=p.threshold,
                                        draft_max_tokens=p.draft_max_tokens,
                                        max_new_tokens=p.max_new_tokens)


def test_batch_rows_equal_solo_and_reference(pair, solo):
    params = [_params(kw) for kw in MIX]
    alone = [solo.generate(p, q) for p, q in zip(PROMPTS, params)]
    refs = [_reference(pair, p, kw) for p, kw in zip(PROMPTS, MIX)]
    for a, ref in zip(alone, refs):
        assert (a.token_ids, a.switch_index, a.switched) == \
            (ref.token_ids, ref.switch_index, ref.switched)
    # the mix holds what it claims: early and late switches, never-switch rows, a cap
    ks = [(r.switched, r.switch_index) for r in alone]
    assert any(s and k <= 3 for s, k in ks) and any(s and k > 8 for s, k in ks), ks
    assert any(not s for s, _ in ks) and alone[5].switch_index == 5 and not alone[5].switched
    # 4 slots for 7 requests: three are admitted while others are half done
    wsd = _engine(pair, 4)
    together = wsd.generate(PROMPTS, params)
    assert [_key(r) for r in together] == [_key(r) for r in alone]
    # another order and another batch size give the same rows
    order = [6, 2, 0, 5, 3, 1, 4]
    shuffled = _engine(pair, 3).generate([PROMPTS[i] for i in order], [params[i] for i in order])
    assert [_key(r) for r in shuffled] == [_key(alone[i]) for i in order]
    assert wsd.num_running == wsd.num_waiting == 0


def test_sampled_rows_equal_their_solo_runs(pair, solo):
    kws = [dict(temperature=0.9, seed=7), dict(), dict(temperature=0.7, top_k=20, seed=1),
           dict(pilot_sampling=SamplingParams(temperature=1.0, seed=3),
                base_sampling=SamplingParams(temperature=0.5, top_p=0.9, seed=4))]
    params = [_params(kw) for kw in kws]
    prompts = PROMPTS[:4]
    alone = [solo.generate(p, q) for p, q in zip(prompts, params)]
    together = _engine(pair, 4).generate(prompts, params)
    assert [_key(r) for r in together] == [_key(r) for r in alone]
    again = _engine(pair, 2).generate(prompts[::-1], params[::-1])
    assert [_key(r) for r in again] == [_key(r) for r in alone[::-1]]


def test_pilot_eos_rows_in_a_batch(pair, tmp_path):
    """A pilot whose EOS is a token it drafts for the first prompt: that row's draft ends
    there (no window passed), the other rows go on; each equals the reference."""
    from test_wsd import _pilot_with_eos     # its prompt is PROMPTS[0]
    eos_pair, pos = _pilot_with_eos(pair, tmp_path, 8, 30)
    kws = [dict(threshold=1.0), dict(), dict(window=3, threshold=0.3), dict(threshold=1.0)]
    refs = [_reference(eos_pair, p, kw) for p, kw in zip(PROMPTS[:4], kws)]
    assert refs[0].switch_index == pos and not refs[0].switched
    got = _engine(eos_pair, 4).generate(PROMPTS[:4], [_params(kw) for kw in kws])
    for r, ref in zip(got, refs):
        assert (r.token_ids, r.text, r.switch_index) == \
            (ref.token_ids, ref.text, ref.switch_index)


def test_two_tokenizers_in_a_batch(tmp_path_factory, tok):
    from test_wsd import _threshold_between
    pair = make_wsd_pair(str(tmp_path_factory.mktemp("xbatch")), sharpen=8.0, damp=0.02,
                         perturb=0.05, tokenizer=tok, pilot_tokenizer=make_tokenizer(420))
    probe = ReferenceWSD(*pair).generate(PROMPTS[0], threshold=0.999999, draft_max_tokens=DRAFT,
                                         max_new_tokens=160)
    assert probe.draft_base_ids != probe.draft_ids     # really re-tokenized
    gamma, k = _threshold_between(probe.logp, 4, 10)
    kws = [dict(chunk=1, window=4, threshold=gamma), dict(chunk=3, window=4, threshold=gamma),
           dict(chunk=8, threshold=0.999999), dict(chunk=64, window=4, threshold=gamma)]
    kws = [dict(kw, max_new_tokens=160) for kw in kws]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    refs = [_reference(pair, p, kw) for p, kw in zip(prompts, kws)]
    got = _engine(pair, 2).generate(prompts, [_params(kw) for kw in kws])
    for r, ref in zip(got, refs):
        assert (r.token_ids, r.text, r.switch_index, r.switched) == \
            (ref.token_ids, ref.text, ref.switch_index, ref.switched)
    assert [(r.switched, r.switch_index) for r in got[:2]] == [(True, k)] * 2
    assert not got[2].switched


def _drain(wsd, outs, max_steps=10_000):
    for _ in range(max_steps):
        if not wsd.has_unfinished_requests():
            return
        for o in wsd.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("requests did not finish")


def test_request_level_engine_admits_midway_and_aborts(pair, solo):
    params = [_params(kw) for kw in MIX]
    alone = {i: solo.generate(PROMPTS[i], params[i]) for i in range(len(PROMPTS))}
    wsd = _engine(pair, 3)
    outs: dict = {}
    for i in (0, 1):
        wsd.add_request(f"r{i}", PROMPTS[i], params[i])
    for _ in range(3):
        for o in wsd.step():
            outs.setdefault(o.request_id, []).append(o)
    for i in range(2, 7):                       # r5 and r6 wait for a slot
        wsd.add_request(f"r{i}", PROMPTS[i], params[i])
    assert wsd.num_waiting >= 2
    for o in wsd.step():
        outs.setdefault(o.request_id, []).append(o)
    assert wsd.abort("r3") and wsd.abort("r6")  # one running, one still waiting
    assert not wsd.abort("r3") and not wsd.abort("nobody")
    _drain(wsd, outs)
    for i in range(7):
        seq = outs[f"r{i}"]
        last = seq[-1]
        assert last.finished and all(not o.finished for o in seq[:-1])
        if i in (3, 6):
            assert last.finish_reason == "abort" and last.result is None
            continue
        r = last.result
        assert _key(r) == _key(alone[i])
        assert "".join(o.text for o in seq) == r.text            # deltas add up
        ids = [t for o in seq for t in o.token_ids]
        assert ids[:len(r.token_ids)] == r.token_ids
    # ids are free again, the engine goes on
    wsd.add_request("r0", PROMPTS[0], params[0])
    outs = {}
    _drain(wsd, outs)
    assert _key(outs["r0"][-1].result) == _key(alone[0])


def test_request_ids_and_inputs_are_checked_before_queueing(pair):
    wsd = _engine(pair, 2)
    wsd.add_request("a", PROMPTS[0], _params({}))
    with pytest.raises(RequestError, match="already in use"):
        wsd.add_request("a", PROMPTS[1], _params({}))
    with pytest.raises(RequestError, match="hashable"):
        wsd.add_request(["x"], PROMPTS[1], _params({}))
    with pytest.raises(RequestError, match="WSDParams"):
        wsd.add_request("b", PROMPTS[1], {"window": 3})
    with pytest.raises(RequestError):
        wsd.add_request("c", "", _params({}))
    with pytest.raises(RequestError):
        wsd.add_request("d", ([1, 2, 10 ** 9], [1, 2]), _params({}))
    assert wsd.num_waiting == 1               # only "a"
    outs: dict = {}
    _drain(wsd, outs)
    assert outs["a"][-1].result is not None and set(outs) == {"a"}


@pytest.mark.parametrize("bad", [0, -1, True, "4", 2.0, 10 ** 9])
def test_max_batch_size_is_checked(pair, bad):
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_model(pair[0], max_batch_size=bad)


def test_one_failing_row_does_not_break_its_batch(pair, solo, monkeypatch):
    params = [_params(kw) for kw in MIX[:4]]
    alone = [solo.generate(p, q) for p, q in zip(PROMPTS[:4], params)]
    wsd = _engine(pair, 4)
    real = Request.after_chunk
    calls = {"n": 0}

    def flaky(self, chunk):
        if self.params.chunk == 64:           # MIX[2]'s row, on its first chunk
            calls["n"] += 1
            raise ValueError("boom in one row")
        return real(self, chunk)
    monkeypatch.setattr(Request, "after_chunk", flaky)
    for i, (p, q) in enumerate(zip(PROMPTS[:4], params)):
        wsd.add_request(i, p, q)
    outs: dict = {}
    _drain(wsd, outs)
    assert calls["n"] == 1
    assert outs[2][-1].finish_reason == "error" and "boom" in str(outs[2][-1].error)
    for i in (0, 1, 3):
        assert _key(outs[i][-1].result) == _key(alone[i])
    # generate() raises the row's error; the engine stays usable
    with pytest.raises(ValueError, match="boom"):
        wsd.generate(PROMPTS[2], params[2])
    monkeypatch.setattr(Request, "after_chunk", real)
    assert _key(wsd.generate(PROMPTS[2], params[2])) == _key(alone[2])


def test_a_failing_forward_ends_its_rows_and_the_engine_goes_on(pair, solo, monkeypatch):
    wsd = _engine(pair, 2)
    q = _params({})
    real = wsd.base.run_rows

    def broken(*a, **k):
        raise RuntimeError("device fault")
    monkeypatch.setattr(wsd.base, "run_rows", broken)
    with pytest.raises(WSDError, match="device fault"):
        wsd.generate(PROMPTS[:2], q)
    monkeypatch.setattr(wsd.base, "run_rows", real)
    assert wsd.num_running == wsd.num_waiting == 0
    assert _key(wsd.generate(PROMPTS[0], q)) == _key(solo.generate(PROMPTS[0], q))


def test_a_full_batch_never_deadlocks_on_suspended_streams(pair, solo):
    """Two streams hold both slots and are suspended; a third request still finishes
    (whoever steps advances every row), and so do the streams, exactly."""
    wsd = _engine(pair, 2)
    q = _params({})
    a, b = wsd.stream(PROMPTS[0], q), wsd.stream(PROMPTS[1], q)
    first = [next(a), next(b)]
    assert wsd.num_running == 2
    r = wsd.generate(PROMPTS[2], q)
    assert _key(r) == _key(solo.generate(PROMPTS[2], q))
    for s, piece, p in ((a, first[0], PROMPTS[0]), (b, first[1], PROMPTS[1])):
        pieces = [piece]
        try:
            while True:
                pieces.append(next(s))
        except StopIteration as done:
            res = done.value
        assert "".join(pieces) == res.text and _key(res) == _key(solo.generate(p, q))


def test_a_closed_stream_frees_its_slot(pair):
    wsd = _engine(pair, 1)
    s = wsd.stream(PROMPTS[0], _params({}))
    next(s)
    assert wsd.num_running == 1
    s.close()
    assert wsd.num_running == 0 and not wsd.has_unfinished_requests()
    assert wsd.generate(PROMPTS[1], _params({})).token_ids


def test_generate_ids_batches(tmp_path_factory, tok):
    from wsd_engine.synthetic import without_tokenizer
    pair = make_wsd_pair(str(tmp_path_factory.mktemp("ids")), sharpen=100.0, damp=0.02,
                         perturb=0.05, tokenizer=tok)
    bare = tuple(without_tokenizer(p, str(tmp_path_factory.mktemp(f"bare{i}")))
                 for i, p in enumerate(pair))
    p_ids = [[1, 5, 9, 33, 2], [7, 7, 8], [12, 40, 41, 42, 43, 44, 45]]
    b_ids = [[3, 4, 5], [9, 10, 11, 12], [30]]
    kws = [dict(force_switch=5, ignore_eos=True), dict(), dict(threshold=1.0, chunk=3)]
    params = [_params(kw) for kw in kws]
    one = WSD.from_pretrained(*bare)
    alone = [one.generate_ids(p, b, q) for p, b, q in zip(p_ids, b_ids, params)]
    ref = ReferenceWSD(*pair)                  # same weights, with tokenizers
    for a, p, b, q in zip(alone, p_ids, b_ids, params):
        r = ref.generate_ids(p, b, window=q.window, threshold=q.threshold,
                             draft_max_tokens=q.draft_max_tokens, max_new_tokens=q.max_new_tokens,
                             force_switch=q.force_switch, ignore_eos=q.ignore_eos)
        assert (a.token_ids, a.switch_index) == (r.token_ids, r.switch_index)
    got = _engine(bare, 3).generate_ids(p_ids, b_ids, params)
    assert [_key(r) for r in got] == [_key(r) for r in alone]
    assert alone[0].switch_index == 5
    with pytest.raises(RequestError, match="same length"):
        one.generate_ids(p_ids, b_ids[:2])


def test_a_stream_dropped_inside_a_step_is_aborted_after_it(pair, solo, monkeypatch):
    """A stream finalized while this thread is inside a step (the garbage collector can
    run anywhere): its request ends when the step is over, never in the middle of it, and
    the other row is exact."""
    q = _params({})
    wsd = _engine(pair, 2)
    a, b = wsd.stream(PROMPTS[0], q), wsd.stream(PROMPTS[1], q)
    first = [next(a), next(b)]
    from wsd_engine.batch import BatchRunner
    real, dropped = BatchRunner.decode_blocks, []

    def drop_b(self, drafting, continuing):
        if not dropped:
            dropped.append(len(drafting) + len(continuing))
            b.close()                          # runs b's finally: abort inside the step
            assert wsd.num_running == 2        # not yet
        return real(self, drafting, continuing)
    monkeypatch.setattr(BatchRunner, "decode_blocks", drop_b)
    pieces = [first[0]]
    try:
        while True:
            pieces.append(next(a))
    except StopIteration as done:
        r = done.value
    assert dropped == [2] and "".join(pieces) == r.text and _key(r) == _key(solo.generate(PROMPTS[0], q))
    assert wsd.num_running == 0 and not wsd.has_unfinished_requests()


def test_batch_edge_inputs(pair):
    wsd = _engine(pair, 2)
    q = _params({})
    assert wsd.step() == [] and not wsd.abort("nobody")
    with pytest.raises(RequestError, match="non-empty"):
        wsd.generate([], q)                               # not an empty batch: a mistake
    with pytest.raises(RequestError, match="token_ids must be"):
        wsd.add_request("y", ([1, 2], "abc"), q)         # a pair is ids, checked as ids
    with pytest.raises(RequestError, match="2 prompts but 1 params"):
        wsd.generate(PROMPTS[:2], [q])
    with pytest.raises(RequestError, match="params must be a WSDParams"):
        wsd.generate(PROMPTS[:2], [q, 3])                 # nothing queued: all checked first
    assert wsd.num_waiting == wsd.num_running == 0


def test_engine_buffers_are_checked_against_memory(pair, monkeypatch):
    """The engine's per-slot buffers are weighed before they are made."""
    from wsd_engine import memory
    pilot, base = load_model(pair[0], max_batch_size=2), load_model(pair[1], max_batch_size=2)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    with pytest.raises(ConfigError, match="per-slot buffers.*smaller max_batch_size"):
        WSD(pilot, base)
    monkeypatch.undo()
    assert WSD(pilot, base).generate(PROMPTS[0], _params({})).token_ids


def test_random_arrivals_and_aborts_give_each_row_its_solo_output(pair, solo):
    """Requests with random params arrive at random steps, some are aborted at random
    steps, 3 slots: every request that finishes gives its solo result, deltas add up."""
    import random
    rng = random.Random(13)
    reqs = []
    for i in range(9):
        kw = dict(MIX[rng.randrange(len(MIX))])
        kw["chunk"] = rng.choice([1, 2, 5, 8])
        if rng.random() < 0.3:
            kw.update(temperature=0.8, seed=rng.randrange(100))
        reqs.append((i, PROMPTS[rng.randrange(len(PROMPTS))], _params(kw),
                     rng.randrange(0, 12), rng.random() < 0.25))
    wsd = _engine(pair, 3)
    outs: dict = {}
    pending = list(reqs)
    step = 0
    while pending or wsd.has_unfinished_requests():
        for r in [r for r in pending if r[3] <= step]:
            wsd.add_request(r[0], r[1], r[2])
            pending.remove(r)
        for i, _, _, at, abort in reqs:
            if abort and step == at + 2:
                wsd.abort(i)
        for o in wsd.step():
            outs.setdefault(o.request_id, []).append(o)
        step += 1
        assert step < 2000
    assert set(outs) == {r[0] for r in reqs}
    finished = aborted = 0
    for i, prompt, q, _, abort in reqs:
        last = outs[i][-1]
        if last.finish_reason == "abort":
            assert abort
            aborted += 1
            continue
        finished += 1
        assert _key(last.result) == _key(solo.generate(prompt, q))
        assert "".join(o.text for o in outs[i]) == last.result.text
    assert finished >= 5 and aborted >= 1


def test_a_serving_loop_and_generate_callers_share_the_engine(pair, solo):
    """One thread drives add_request / step() (a server's loop) while two others call
    generate: every request is exact, no output is lost to the wrong driver."""
    import threading
    q = _params({})
    wsd = _engine(pair, 3)
    served, errors, got = {}, [], {}

    def server():
        try:
            for i in range(3):
                wsd.add_request(f"s{i}", PROMPTS[i], q)
            for _ in range(10_000):
                if not wsd.has_unfinished_requests():
                    return
                for o in wsd.step():
                    served.setdefault(o.request_id, []).append(o)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def caller(j):
        try:
            got[j] = wsd.generate(PROMPTS[3 + j], q)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=server)] + \
        [threading.Thread(target=caller, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    for i in range(3):
        r = served[f"s{i}"][-1].result
        assert _key(r) == _key(solo.generate(PROMPTS[i], q))
        assert "".join(o.text for o in served[f"s{i}"]) == r.text
    for j in range(2):
        assert _key(got[j]) == _key(solo.generate(PROMPTS[3 + j], q))
