"""CUDA-graph-captured decode step, n-step greedy decode and chunk scoring: same tokens as
the eager run (GPU); on CPU the decoding paths they replay (n-step blocks, the one-ahead
token stream) equal token-by-token decoding, and capture fails with a clear error."""
import pytest
import torch

from wsd_engine import ConfigError, load_model
from wsd_engine.engine import WSD, WSDParams
from wsd_engine.synthetic import make_model, make_tokenizer, make_wsd_pair

from _graph_standins import eager_graphs


def _one_by_one(m, ids, n, eos=()):
    """Greedy decoding one token and one host read-back at a time (the plain loop)."""
    m.cache.reset()
    logits = m.prefill(torch.tensor(ids))
    out = []
    while len(out) < n:
        t = int(torch.argmax(logits))
        if t in eos:
            break
        out.append(t)
        if len(out) < n:
            logits = m.decode_one_token(torch.tensor([t]))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_model(str(tmp_path_factory.mktemp("m") / "m"), "llama", init_scale=5.0)
    return load_model(path)


def test_decode_steps_equals_one_by_one(tiny):
    ids = [5, 9, 2, 77, 31]
    want = _one_by_one(tiny, ids, 12)
    for n in (0, 1, 5, 11):
        tiny.cache.reset()
        first = torch.argmax(tiny.prefill(torch.tensor(ids)), dim=-1).reshape(1)
        out = tiny.decode_steps(first, n)
        assert out.shape == (n + 1,) and out.dtype == torch.int64
        assert out.tolist() == want[:n + 1]
        assert tiny.cache.length == len(ids) + n     # n tokens fed, the last chosen only


@pytest.mark.parametrize("n", [1, 2, 17])
def test_stream_greedy_equals_one_by_one(tiny, n):
    ids = [3, 4, 5, 6]
    want = _one_by_one(tiny, ids, n)
    tiny.cache.reset()
    first = torch.argmax(tiny.prefill(torch.tensor(ids)), dim=-1).reshape(1)
    assert list(tiny.stream_greedy(first, n)) == want
    assert tiny.cache.length == len(ids) + n - 1          # the last token is not fed
    assert tiny.generate(ids, n, stop_at_eos=False) == want


def test_generate_stops_at_eos(tiny):
    ids = [3, 4, 5, 6]
    free = _one_by_one(tiny, ids, 40)
    for cut in (0, 3, 21):                         # EOS first seen at these places
        eos = free[cut]
        want = free[:free.index(eos)]
        assert tiny.generate(ids, 40, eos_token_ids=[eos]) == want
        assert _one_by_one(tiny, ids, 40, eos=(eos,)) == want


def test_stream_with_one_step_in_flight_on_cpu(tmp_path, monkeypatch):
    """The CUDA ordering of `stream_greedy` (step i + 1 launched before token i is read
    through its own event) driven on CPU: same tokens as one-at-a-time decoding for every
    length, a consumer that stops at an EOS leaves exactly one step launched past it, and
    each read waits only for its own token's event."""
    from wsd_engine.runner import Model
    path = make_model(str(tmp_path / "m"), "llama", init_scale=5.0)
    ref, m = load_model(path), load_model(path)
    log = []

    class Event:
        def record(self):
            log.append("record")

        def synchronize(self):
            log.append("sync")
    monkeypatch.setattr(Model, "_steps_overlap", property(lambda self: True))
    monkeypatch.setattr(Model, "_host_tokens", lambda self, n: torch.empty(n, dtype=torch.int64))
    monkeypatch.setattr(Model, "_new_event", lambda self: Event())
    steps = []
    real_step = Model.decode_one_token
    monkeypatch.setattr(Model, "decode_one_token",
                        lambda self, tok: steps.append(1) or log.append("step")
                        or real_step(self, tok))
    ids = [5, 9, 13, 2, 7]
    for n in (1, 2, 7, 20):
        want = _one_by_one(ref, ids, n)
        steps.clear()
        log.clear()
        assert m.generate(ids, n, stop_at_eos=False) == want
        assert len(steps) == n - 1 and log.count("record") == n and log.count("sync") == n
        if n == 3:   # step i + 1 is launched (and its token staged) before token i is awaited
            assert log == ["record", "step", "record", "sync", "step", "record", "sync", "sync"]
    free = _one_by_one(ref, ids, 20)
    for e in (0, 3, 19):            # stop at the e-th token: e + 1 steps launched (<= 19)
        eos = free[e]
        cut = free.index(eos)
        steps.clear()
        assert m.generate(ids, 20, eos_token_ids=[eos]) == free[:cut]
        assert len(steps) == min(cut + 1, 19), (e, cut, len(steps))


def test_generate_fills_the_cache_exactly(tmp_path):
    m = load_model(make_model(str(tmp_path / "m"), "llama", init_scale=5.0), max_seq_len=24)
    ids = [7, 8, 9, 10]                            # 4 + 21 - 1 = 24 positions: fits
    assert m.generate(ids, 21, stop_at_eos=False) == _one_by_one(m, ids, 21)


def test_capture_needs_cuda_and_triton(tmp_path):
    m = load_model(make_model(str(tmp_path / "m"), "llama"))
    with pytest.raises(ConfigError, match="device='cuda' and backend='triton'"):
        m.capture_decode()
    with pytest.raises(ConfigError, match="device='cuda' and backend='triton'"):
        m.capture_score(8)
    with pytest.raises(ConfigError, match="device='cuda' and backend='triton'"):
        m.capture_steps(8)
    with pytest.raises(ConfigError, match="n_steps must be an int >= 1"):
        m.capture_steps(0)
    with pytest.raises(ConfigError, match="device='cuda' and backend='triton'"):
        m.capture_prefill((16,))
    assert m._graphs == {}
    assert len(m.generate([3, 4, 5], max_new_tokens=4, stop_at_eos=False)) == 4


@pytest.mark.gpu
def test_prefill_graphs_on_the_gpu(tmp_path):
    """Captured bucket prefills (logits and hidden kinds) against eager prefills: same
    last-token outputs, same cache (the next decode step agrees), prompts from 1 token to
    past the largest bucket."""
    path = make_model(str(tmp_path / "m"), "qwen2", tokenizer=make_tokenizer(320),
                      init_scale=5.0)
    eager = load_model(path, device="cuda", backend="triton", max_seq_len=128)
    m = load_model(path, device="cuda", backend="triton", max_seq_len=128)
    m.capture_prefill((16, 64))
    m.capture_prefill((16, 64), hidden=True)
    g = torch.Generator().manual_seed(0)
    for n in (1, 9, 16, 40, 64, 90):
        ids = torch.randint(3, 320, (n,), generator=g).cuda()
        assert (m._prefill_graph(n, 0, False) is None) == (n > 64)
        for hidden in (False, True):
            eager.cache.reset()
            m.cache.reset()
            f = "prefill_hidden" if hidden else "prefill"
            want, got = getattr(eager, f)(ids), getattr(m, f)(ids)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert m.cache.length == n
        nxt = torch.tensor([5], device="cuda")
        torch.testing.assert_close(m.decode_one_token(nxt), eager.decode_one_token(nxt),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_graph_decode_matches_eager(tmp_path, family):
    path = make_model(str(tmp_path / family), family, tokenizer=make_tokenizer(320),
                      init_scale=5.0)
    eager = load_model(path, device="cuda", backend="triton")
    graphed = load_model(path, device="cuda", backend="triton")
    graphed.capture_decode()
    stepped = load_model(path, device="cuda", backend="triton")
    stepped.capture_steps(8)                     # decode_steps(., 8): one replay
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 320, (5 + 20 * seed,), generator=g).tolist()
        want = eager.generate(ids, 40, stop_at_eos=False)
        assert graphed.generate(ids, 40, stop_at_eos=False) == want     # one-ahead stream
        eos = want[17]                                                  # stop mid-stream
        assert graphed.generate(ids, 40, eos_token_ids=[eos]) == want[:want.index(eos)]
        assert graphed.generate(ids, 40, stop_at_eos=False) == want     # usable after
        first = torch.tensor([ids[-1]], device="cuda")
        for m in (eager, stepped):                 # the 8-step replay itself
            m.cache.reset()
            m.prefill(torch.tensor(ids[:-1], device="cuda"))
        a, b = eager.decode_steps(first, 8), stepped.decode_steps(first, 8)
        assert a.tolist() == b.tolist() and eager.cache.length == stepped.cache.length


@pytest.mark.gpu
def test_wsd_with_graph_decode_matches_eager(tmp_path):
    pair = make_wsd_pair(str(tmp_path), damp=0.02, perturb=0.05, sharpen=100.0)
    eager = WSD.from_pretrained(*pair, device="cuda", backend="triton")
    # the same kernels as the eager engine (no tuning: graphs vs eager is the question)
    graphed = WSD.from_pretrained(*pair, device="cuda", backend="triton", cuda_graphs=True,
                                  graph_chunks=(8, 3), tune_kernels=False)
    one_step = WSD.from_pretrained(*pair, device="cuda", backend="triton", cuda_graphs=True,
                                   graph_chunks=(8,), step_graphs=False, tune_kernels=False)
    assert graphed.kernel_tuning == {} and not graphed.base.ops.fused_gemv
    assert ("score", 8) in graphed.base._graphs and "decode" in graphed.pilot._graphs
    assert ("steps", 8) in graphed.pilot._graphs and ("steps", 3) in graphed.pilot._graphs
    assert not any(k[0] == "steps" for k in one_step.pilot._graphs if isinstance(k, tuple))
    before_base = {k: g["graph"] for k, g in graphed.base._graphs.items()}
    before_pilot = {k: g["graph"] for k, g in graphed.pilot._graphs.items()}
    for prompt in ("Tell me about the quick brown fox.", "Hello!", "Numbers like 42?"):
        for chunk in (8, 3, 5):      # 5: no graph of that size, eager scoring
            p = WSDParams(draft_max_tokens=48, max_new_tokens=64, chunk=chunk)
            a, b, c = eager.generate(prompt, p), graphed.generate(prompt, p), \
                one_step.generate(prompt, p)
            assert (a.switch_index, a.token_ids) == (b.switch_index, b.token_ids)
            assert (a.switch_index, a.token_ids) == (c.switch_index, c.token_ids)
            assert a.switched
        # sampling runs the one-step graphs (the generator stays outside the graph)
        p = WSDParams(draft_max_tokens=48, max_new_tokens=64, chunk=8, temperature=0.8,
                      top_p=0.9, seed=3)
        a, b = eager.generate(prompt, p), graphed.generate(prompt, p)
        assert (a.switch_index, a.token_ids) == (b.switch_index, b.token_ids)
    # every request replayed the graphs captured when the engine was built: none re-captured
    assert {k: g["graph"] for k, g in graphed.base._graphs.items()} == before_base
    assert {k: g["graph"] for k, g in graphed.pilot._graphs.items()} == before_pilot


def test_graphs_are_captured_once_per_engine_not_per_request(tmp_path, monkeypatch):
    """On CPU with the captures counted (no-ops here): building the engine captures each
    graph once; requests of any chunk size, greedy or sampled, capture nothing more."""
    from wsd_engine.runner import Model
    counts = {}
    for name in ("capture_decode", "capture_score", "capture_steps", "capture_prefill"):
        monkeypatch.setattr(Model, name, lambda self, *a, _n=name, **kw:
                            counts.__setitem__(_n, counts.get(_n, 0) + 1))
    pair = make_wsd_pair(str(tmp_path), damp=0.02, perturb=0.05, sharpen=100.0)
    w = WSD.from_pretrained(*pair, cuda_graphs=True, graph_chunks=(8, 3))
    assert counts == {"capture_decode": 2, "capture_score": 2, "capture_steps": 2,
                      "capture_prefill": 2}
    for chunk in (8, 3, 5):
        w.generate("Hello!", WSDParams(draft_max_tokens=24, max_new_tokens=32, chunk=chunk))
    w.generate("Hello!", WSDParams(draft_max_tokens=24, max_new_tokens=32, temperature=0.7,
                                   seed=1))
    w.generate_ids([5, 6, 7], [5, 6, 7], WSDParams(draft_max_tokens=16, max_new_tokens=16))
    list(w.stream("Hi", WSDParams(draft_max_tokens=16, max_new_tokens=16)))
    assert counts == {"capture_decode": 2, "capture_score": 2, "capture_steps": 2,
                      "capture_prefill": 2}


def test_decode_steps_and_stream_refuse_to_overflow(tmp_path):
    from wsd_engine import ContextOverflowError
    m = load_model(make_model(str(tmp_path / "m"), "llama", init_scale=5.0), max_seq_len=12)
    m.prefill(torch.tensor([3, 4, 5, 6, 7, 8, 9, 10]))                 # 8 of 12 positions
    first = torch.tensor([11])
    with pytest.raises(ContextOverflowError, match="does not fit the KV cache"):
        m.decode_steps(first, 5)
    with pytest.raises(ContextOverflowError, match="does not fit the KV cache"):
        list(m.stream_greedy(first, 6))                                # feeds 5
    assert m.cache.length == 8                                         # nothing written
    assert len(m.decode_steps(first, 4)) == 5 and m.cache.length == 12  # exactly fits
    assert list(m.stream_greedy(first, 0)) == []


# ---- tuning the one-token kernels (Model.tune_decode_kernels) ---------------------------

_LOGITS = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))


def _fake_cuda(m, monkeypatch, times, logits=None):
    """m as if on a GPU for the tuning loop: the timing of each (fused_gemv, pdl) from
    `times` (a number, or an exception to raise) and its logits from `logits` (default:
    the same for all), no capture."""
    monkeypatch.setattr(m, "device", torch.device("cuda"))
    calls = []

    def timing(context, replays):
        key = (m.ops.fused_gemv, m.ops.pdl)
        calls.append((key, context, replays))
        t = times[key]
        if isinstance(t, Exception):
            raise t
        return t, (logits or {}).get(key, _LOGITS)
    monkeypatch.setattr(m, "_time_decode_step", timing)
    return calls


@pytest.fixture
def tiny_triton(tmp_path):
    return load_model(make_model(str(tmp_path / "m"), "llama"), backend="triton")


@pytest.mark.parametrize("fused_ms,chosen", [(9.0, True),     # 10% faster: taken
                                            (9.8, False),    # within 3%: the plain path
                                            (10.5, False)])
def test_tuning_keeps_the_fastest_beyond_the_margin(tiny_triton, monkeypatch, fused_ms, chosen):
    m = tiny_triton
    calls = _fake_cuda(m, monkeypatch, {(False, False): 10.0, (True, False): fused_ms})
    assert not m.decode_kernels_chosen
    rec = m.tune_decode_kernels(context=40, replays=7)
    assert [c[0] for c in calls] == [(False, False), (True, False)]   # no PDL off sm_90
    assert all(c[1:] == (40, 7) for c in calls)
    assert rec["chosen"] == {"fused_gemv": chosen, "pdl": False} and m.ops.fused_gemv is chosen
    assert rec["ms"] == (fused_ms if chosen else 10.0) and len(rec["rows"]) == 2
    assert m.decode_tuning is rec and m.decode_kernels_chosen and m._graphs == {}


def test_tuning_skips_a_failing_candidate_and_fails_cleanly(tiny_triton, monkeypatch):
    m = tiny_triton
    _fake_cuda(m, monkeypatch, {(False, False): RuntimeError("capture failed"),
                                (True, False): 8.0, (True, True): 7.0})
    rec = m.tune_decode_kernels(candidates=[dict(fused_gemv=False, pdl=False),
                                            dict(fused_gemv=True, pdl=False),
                                            dict(fused_gemv=True, pdl=True)])
    assert "capture failed" in rec["rows"][0]["error"]
    assert rec["chosen"] == {"fused_gemv": True, "pdl": True}   # the first that ran is the base
    m2 = load_model(m.path, backend="triton")
    _fake_cuda(m2, monkeypatch, {(False, False): RuntimeError("a"), (True, False): ValueError("b")})
    with pytest.raises(RuntimeError, match="every decode kernel candidate failed"):
        m2.tune_decode_kernels()
    assert (m2.ops.fused_gemv, m2.ops.pdl) == (False, False) and not m2.decode_kernels_chosen


def test_tuning_rejects_a_candidate_whose_logits_disagree(tiny_triton, monkeypatch):
    """A faster candidate with wrong logits (a kernel broken on this card) is never chosen:
    bf16-rounding-sized differences pass, NaN or large differences are rejected."""
    m = tiny_triton
    cands = [dict(fused_gemv=False, pdl=False), dict(fused_gemv=True, pdl=False),
             dict(fused_gemv=True, pdl=True), dict(fused_gemv=False, pdl=True)]
    noise = torch.randn(_LOGITS.shape, generator=torch.Generator().manual_seed(4))
    rounding = _LOGITS + 0.01 * _LOGITS.norm() / _LOGITS.numel() ** 0.5 * noise  # 1% RMS
    # 6% RMS: over four times what bf16 rounding explains (1.3%), so rejected
    wrong = _LOGITS + 0.06 * _LOGITS.norm() / _LOGITS.numel() ** 0.5 * noise
    nan = _LOGITS.clone()
    nan[0, 7] = float("nan")
    _fake_cuda(m, monkeypatch, {(False, False): 10.0, (True, False): 5.0, (True, True): 4.0,
                                (False, True): 8.0},
               logits={(True, False): wrong, (True, True): nan, (False, True): rounding})
    rec = m.tune_decode_kernels(candidates=cands)
    rows = {(r["fused_gemv"], r["pdl"]): r for r in rec["rows"]}
    assert "logits disagree" in rows[(True, False)]["error"]
    assert rows[(True, False)]["ms_rejected"] == 5.0 and "ms" not in rows[(True, False)]
    assert rows[(True, True)]["error"] == "rejected: non-finite logits"
    assert rows[(False, True)]["ms"] == 8.0 and "error" not in rows[(False, True)]
    assert rec["chosen"] == {"fused_gemv": False, "pdl": True}     # the fastest that agrees
    # a first candidate with NaN logits is not the reference: the next one is
    m2 = load_model(m.path, backend="triton")
    _fake_cuda(m2, monkeypatch, {(False, False): 10.0, (True, False): 9.0},
               logits={(False, False): nan})
    rec = m2.tune_decode_kernels()
    assert rec["rows"][0]["error"] == "rejected: non-finite logits"
    assert rec["chosen"] == {"fused_gemv": True, "pdl": False}


def test_tuning_refuses_bad_input(tiny_triton, tmp_path, monkeypatch):
    cpu = load_model(make_model(str(tmp_path / "c"), "llama"))
    with pytest.raises(ConfigError, match="needs device='cuda' and backend='triton'"):
        cpu.tune_decode_kernels()
    m = tiny_triton
    _fake_cuda(m, monkeypatch, {(False, False): 1.0, (True, False): 1.0})
    for kw, msg in ((dict(context=0), "context must be"), (dict(context=10**6), "context must be"),
                    (dict(replays=0), "replays must be"), (dict(candidates=[]), "candidates"),
                    (dict(candidates=[dict(fused_gemv=1, pdl=False)]), "candidates"),
                    (dict(candidates=[dict(fused=True)]), "candidates")):
        with pytest.raises(ConfigError, match=msg):
            m.tune_decode_kernels(**kw)
    m._graphs["decode"] = {}                       # as if captured
    with pytest.raises(ConfigError, match="tune before capturing"):
        m.tune_decode_kernels()
    m._graphs.clear()
    assert not m.decode_kernels_chosen
    m.tune_decode_kernels()                        # still usable


def test_wsd_tunes_only_models_nobody_set(tmp_path, monkeypatch):
    from wsd_engine.runner import Model
    path = make_model(str(tmp_path / "m"), "llama")
    tuned = []
    monkeypatch.setattr(Model, "tune_decode_kernels",
                        lambda self: tuned.append(self) or {"chosen": "x"})
    for name in ("capture_decode", "capture_score", "capture_steps", "capture_prefill"):
        monkeypatch.setattr(Model, name, lambda self, *a, **kw: None)
    monkeypatch.setattr(Model, "can_capture", property(lambda self: True))   # as on a GPU
    pilot, base = load_model(path, backend="triton"), load_model(path, backend="triton")
    pilot.set_decode_kernels(fused_gemv=False)       # chosen by hand: kept
    w = WSD(pilot, base, cuda_graphs=True)
    assert tuned == [base] and w.kernel_tuning == {"base": {"chosen": "x"}}
    tuned.clear()
    captured = load_model(path, backend="triton")
    captured._graphs["decode"] = {}                   # graphs of its own: left as it is
    assert WSD(pilot, captured, cuda_graphs=True).kernel_tuning == {} and tuned == []
    assert WSD(load_model(path), load_model(path)).kernel_tuning == {}   # no graphs: no tuning
    WSD(load_model(path, backend="triton"), base, cuda_graphs=True, fused_gemv=True)
    assert tuned == []                                # settings given: no tuning
    WSD(pilot, base, tune_kernels=True)               # forced, graphs or not
    assert tuned == [pilot, base]
    with pytest.raises(ConfigError, match="not both"):
        WSD(pilot, base, tune_kernels=True, pdl=True)
    with pytest.raises(ConfigError, match="tune_kernels must be"):
        WSD(pilot, base, tune_kernels="yes")
    with pytest.raises(ConfigError, match="needs device='cuda'"):   # the real method, on CPU
        monkeypatch.undo()
        WSD(load_model(path, backend="triton"), load_model(path, backend="triton"),
            tune_kernels=True)


@pytest.mark.gpu
def test_tuning_on_the_gpu_picks_a_working_path(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=make_tokenizer(320),
                      init_scale=5.0)
    eager = load_model(path, device="cuda", backend="triton")
    m = load_model(path, device="cuda", backend="triton")
    rec = m.tune_decode_kernels(context=64, replays=5)
    assert all("ms" in r and r["ms"] > 0 for r in rec["rows"]), rec
    assert len(rec["rows"]) == len(m.tuning_candidates()) >= 2
    assert (m.ops.fused_gemv, m.ops.pdl) == tuple(rec["chosen"].values())
    assert m._graphs == {} and m.cache.length == 0
    m.capture_decode()
    eager.set_decode_kernels(**rec["chosen"])          # tuned graph vs eager, same kernels
    ids = list(range(5, 30))
    assert m.generate(ids, 24, stop_at_eos=False) == eager.generate(ids, 24, stop_at_eos=False)


# ---- graph-mode logic on CPU: CUDA graphs stood in for by eager replays ----------------

def test_prefill_graphs_pad_the_prompt_and_pick_its_last_row(tmp_path, monkeypatch):
    """A prompt of n tokens runs in the smallest bucket b >= n (padded with its last token):
    the logits / hidden state of its last token and the cache after it equal an eager
    prefill's; the padding's K/V past the prompt are never read; too long, or a bucket
    that would overrun the cache, prefills eagerly."""
    replays = eager_graphs(monkeypatch)
    path = make_model(str(tmp_path / "m"), "llama", init_scale=5.0)
    eager = load_model(path, backend="triton", max_seq_len=80)
    m = load_model(path, backend="triton", max_seq_len=80)
    m.capture_prefill((32, 16, 64))
    m.capture_prefill((16, 32), hidden=True)
    assert sorted(k for k in m._graphs) == [("prefill", 16, False), ("prefill", 16, True),
                                            ("prefill", 32, False), ("prefill", 32, True),
                                            ("prefill", 64, False)]
    gen = torch.Generator().manual_seed(0)
    for n, bucket in ((1, 16), (5, 16), (16, 16), (17, 32), (40, 64), (70, None)):
        ids = torch.randint(0, m.config.vocab_size, (n,), generator=gen)
        replays.clear()
        eager.cache.reset()
        m.cache.reset()
        want = eager.prefill(ids)
        got = m.prefill(ids)
        assert replays == ([bucket] if bucket else []), (n, replays)
        assert m.cache.length == eager.cache.length == n
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the cache holds what an eager prefill wrote; the padding past n is never read
        nxt = torch.tensor([int(torch.argmax(want))])
        torch.testing.assert_close(m.decode_one_token(nxt), eager.decode_one_token(nxt),
                                   rtol=1e-5, atol=1e-5)
    # the hidden kind (the WSD base), and a prompt continued from start > 0
    ids = torch.randint(0, m.config.vocab_size, (12,), generator=gen)
    eager.cache.reset()
    m.cache.reset()
    want = eager.forward(ids, 0, return_hidden=True)[-1]
    torch.testing.assert_close(m.prefill_hidden(ids[:7]), eager.forward(ids[:7], 0, return_hidden=True)[-1],
                               rtol=1e-5, atol=1e-5)
    replays.clear()
    torch.testing.assert_close(m.prefill_hidden(ids[7:], start=7), want, rtol=1e-5, atol=1e-5)
    assert replays == [16] and m.cache.length == 12
    # a bucket that would write past the cache is passed over: 20 tokens at 50 need 32
    # positions (82 > 80), so the 64-token logits bucket is no better: eager
    base = torch.randint(0, m.config.vocab_size, (50,), generator=gen)
    m.cache.reset()
    eager.cache.reset()
    eager.prefill(base)
    m.prefill(base)
    replays.clear()
    ids = torch.randint(0, m.config.vocab_size, (20,), generator=gen)
    torch.testing.assert_close(m.prefill(ids, start=50), eager.prefill(ids, start=50),
                               rtol=1e-5, atol=1e-5)
    assert replays == [] and m.cache.length == 70


def test_capture_prefill_checks_its_input(tmp_path):
    m = load_model(make_model(str(tmp_path / "m"), "llama"), backend="triton")
    with pytest.raises(ConfigError, match="CUDA graphs need device='cuda'"):
        m.capture_prefill((16,))
    for bad in ((), [0], (16, "32"), 16, (True,)):
        with pytest.raises(ConfigError, match="buckets"):
            m.capture_prefill(bad)
    pair = make_wsd_pair(str(tmp_path / "p"), damp=0.02, perturb=0.05, sharpen=100.0)
    with pytest.raises(ConfigError, match="prefill buckets must be"):
        WSD.from_pretrained(*pair, prefill_buckets=(16, -1))


def test_wsd_in_graph_mode_matches_eager_on_cpu(tmp_path, monkeypatch):
    """The whole graph-mode engine (decode, n-step drafting, chunk scoring and prefill
    graphs, replayed eagerly here) gives the eager engine's tokens: several prompts, chunk
    sizes with and without a graph, greedy and sampled."""
    pair = make_wsd_pair(str(tmp_path), damp=0.02, perturb=0.05, sharpen=100.0)
    eager = WSD.from_pretrained(*pair, backend="triton")
    replays = eager_graphs(monkeypatch)
    graphed = WSD.from_pretrained(*pair, backend="triton", cuda_graphs=True,
                                  graph_chunks=(3,), tune_kernels=False,
                                  prefill_buckets=(16, 64))
    keys = set(graphed.pilot._graphs) | set(graphed.base._graphs)
    assert {("prefill", 64, False), ("prefill", 64, True), ("score", 3), ("steps", 3),
            "decode"} <= keys
    prompt = "Tell me about the quick brown fox."
    for chunk in (3, 5):                 # 5: no graph of that size, eager drafting / scoring
        p = WSDParams(draft_max_tokens=15, max_new_tokens=24, chunk=chunk)
        replays.clear()
        a, b = eager.generate(prompt, p), graphed.generate(prompt, p)
        assert (a.switch_index, a.token_ids, a.text) == (b.switch_index, b.token_ids, b.text)
        assert a.switched and 64 in replays and (3 in replays) == (chunk == 3)
    p = WSDParams(draft_max_tokens=15, max_new_tokens=24, chunk=3, temperature=0.8,
                  top_p=0.9, seed=3)
    a, b = eager.generate(prompt, p), graphed.generate(prompt, p)
    assert (a.switch_index, a.token_ids) == (b.switch_index, b.token_ids)
