"""CUDA graphs (wsd_engine/graphs.py) and the one-token kernel tuning (wsd_engine/tuning.py).

CPU: the one-sequence decoding that the "decode" graph replays (the token stream with one
step in flight) equals token-by-token decoding; capture refuses without CUDA + triton;
with only the CUDA capture stood in for (tests/_graph_standins.py), the prefill buckets,
the batched decode graphs (bucket choice, padding, eager fall-back) and the whole batched
graph-mode engine give the eager results; tuning keeps / rejects candidates as it should.
GPU (`pytest -m gpu`): the same against real captures."""
import pytest
import torch

from wsd_engine import ConfigError, ContextOverflowError, load_model
from wsd_engine import graphs, tuning
from wsd_engine.engine import WSD, WSDParams
from wsd_engine.graphs import row_graph_sizes
from wsd_engine.synthetic import make_model, make_tokenizer, make_wsd_pair
from wsd_engine.tuning import tune_decode_kernels

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


def test_stream_refuses_to_overflow(tmp_path):
    m = load_model(make_model(str(tmp_path / "m"), "llama", init_scale=5.0), max_seq_len=12)
    m.prefill(torch.tensor([3, 4, 5, 6, 7, 8, 9, 10]))                 # 8 of 12 positions
    first = torch.tensor([11])
    with pytest.raises(ContextOverflowError, match="does not fit the KV cache"):
        list(m.stream_greedy(first, 6))                                # feeds 5
    assert m.cache.length == 8                                         # nothing written
    assert len(list(m.stream_greedy(first, 5))) == 5 and m.cache.length == 12  # exactly fits
    assert list(m.stream_greedy(first, 0)) == []


def test_capture_needs_cuda_and_triton(tmp_path):
    m = load_model(make_model(str(tmp_path / "m"), "llama"))
    for capture in (m.capture_decode, lambda: m.capture_prefill((16,)),
                    lambda: m.capture_decode_rows((1, 2))):
        with pytest.raises(ConfigError, match="device='cuda' and backend='triton'"):
            capture()
    assert m.graphs == {} and not m.has_graphs
    assert len(m.generate([3, 4, 5], max_new_tokens=4, stop_at_eos=False)) == 4


def test_capture_checks_its_sizes(tmp_path):
    m = load_model(make_model(str(tmp_path / "m"), "llama"), backend="triton")
    with pytest.raises(ConfigError, match="CUDA graphs need device='cuda'"):
        m.capture_prefill((16,))
    for bad in ((), [0], (16, "32"), 16, (True,)):
        with pytest.raises(ConfigError, match="prefill buckets must be"):
            m.capture_prefill(bad)
        with pytest.raises(ConfigError, match="graph batch sizes must be"):
            m.capture_decode_rows(bad)
        with pytest.raises(ConfigError, match="graph_batch_sizes must be"):
            WSD(load_model(m.path), load_model(m.path), graph_batch_sizes=bad)


def test_row_graph_sizes():
    """Buckets below the engine's rows, plus the rows themselves when they fall between two
    buckets (a full batch never pads past the slots); above every bucket: eager."""
    assert row_graph_sizes((1, 2, 4, 8, 16, 32), 32) == [1, 2, 4, 8, 16, 32]
    assert row_graph_sizes((1, 2, 4), 4) == [1, 2, 4]
    assert row_graph_sizes((4, 2, 1, 2), 3) == [1, 2, 3]
    assert row_graph_sizes((1, 2, 4), 5) == [1, 2, 4]            # 5 rows run eagerly
    assert row_graph_sizes((1, 2, 4), 1) == [1]
    assert row_graph_sizes((8,), 3) == [3]
    assert row_graph_sizes((2, 4), 1) == [1]


# ---- graph-mode logic on CPU: the CUDA capture stood in for by eager replays ------------

def test_prefill_graphs_pad_the_prompt_and_pick_its_last_row(tmp_path, monkeypatch):
    """A prompt of n tokens runs in the smallest bucket b >= n (padded with its last token):
    the logits of its last token and the cache after it equal an eager prefill's; the
    padding's K/V past the prompt are never read; too long, or a bucket that would overrun
    the cache, prefills eagerly."""
    replays = eager_graphs(monkeypatch)
    path = make_model(str(tmp_path / "m"), "llama", init_scale=5.0)
    eager = load_model(path, backend="triton", max_seq_len=80)
    m = load_model(path, backend="triton", max_seq_len=80)
    m.capture_prefill((32, 16, 64, 128))                    # 128 > max_seq_len: left out
    assert sorted(m.graphs) == [("prefill", 16), ("prefill", 32), ("prefill", 64)]
    gen = torch.Generator().manual_seed(0)
    for n, bucket in ((1, 16), (5, 16), (16, 16), (17, 32), (40, 64), (70, None)):
        ids = torch.randint(0, m.config.vocab_size, (n,), generator=gen)
        replays.clear()
        eager.cache.reset()
        m.cache.reset()
        want = eager.prefill(ids)
        got = m.prefill(ids)
        assert replays == ([("prefill", bucket)] if bucket else []), (n, replays)
        assert m.cache.length == eager.cache.length == n
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the cache holds what an eager prefill wrote; the padding past n is never read
        nxt = torch.tensor([int(torch.argmax(want))])
        torch.testing.assert_close(m.decode_one_token(nxt), eager.decode_one_token(nxt),
                                   rtol=1e-5, atol=1e-5)
    # a prompt continued from start > 0, and a bucket that would write past the cache:
    # 20 tokens at 50 need 32 positions (82 > 80), the 64 bucket no better: eager
    ids = torch.randint(0, m.config.vocab_size, (70,), generator=gen)
    for model in (m, eager):
        model.cache.reset()
        model.prefill(ids[:7])
    replays.clear()
    torch.testing.assert_close(m.prefill(ids[7:12], start=7), eager.prefill(ids[7:12], start=7),
                               rtol=1e-5, atol=1e-5)
    assert replays == [("prefill", 16)] and m.cache.length == 12
    for model in (m, eager):
        model.prefill(ids[12:50], start=12)
    replays.clear()
    torch.testing.assert_close(m.prefill(ids[50:70], start=50),
                               eager.prefill(ids[50:70], start=50), rtol=1e-5, atol=1e-5)
    assert replays == [] and m.cache.length == 70


def test_decode_rows_replays_the_smallest_bucket_and_falls_back(tmp_path, monkeypatch):
    """`decode_rows` of B rows replays the smallest captured size >= B, padded with copies
    of its last row: the logits, the slots' lengths and every slot's cache equal the eager
    step's; more rows than any graph, or no graphs, run eagerly; a row that does not fit
    its slot fails before anything is written."""
    replays = eager_graphs(monkeypatch)
    path = make_model(str(tmp_path / "m"), "llama", init_scale=5.0)
    eager = load_model(path, backend="triton", max_seq_len=24, max_batch_size=5)
    m = load_model(path, backend="triton", max_seq_len=24, max_batch_size=5)
    assert m.capture_decode_rows((1, 2, 4)) == [1, 2, 4]            # 5 rows: eager
    assert sorted(m.graphs) == [("rows", 1), ("rows", 2), ("rows", 4)]
    gen = torch.Generator().manual_seed(1)
    V = m.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=gen) for n in (3, 7, 1, 5, 2)]
    for model in (m, eager):
        model.prefill_rows(prompts, [0, 1, 2, 3, 4])
    for slots, bucket in (([3], 1), ([0, 4], 2), ([1, 2, 3], 4), ([4, 0, 2, 1], 4),
                          ([0, 1, 2, 3, 4], None), ([2, 4, 1], 4)):
        tokens = torch.randint(0, V, (len(slots),), generator=gen)
        replays.clear()
        got, want = m.decode_rows(tokens, slots), eager.decode_rows(tokens, slots)
        assert replays == ([("rows", bucket)] if bucket else []), (slots, replays)
        assert got.shape == (len(slots), V)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert m.cache.lengths == eager.cache.lengths
    for s, n in enumerate(eager.cache.lengths):     # the padding wrote nothing else
        torch.testing.assert_close(m.cache.k[:, s, :, :n], eager.cache.k[:, s, :, :n])
        torch.testing.assert_close(m.cache.v[:, s, :, :n], eager.cache.v[:, s, :, :n])
    m.truncate_slot(1, 5)
    m.cache.lengths[3] = 24                          # full
    with pytest.raises(ContextOverflowError, match="does not fit the KV cache"):
        m.decode_rows(torch.tensor([1, 2]), [1, 3])
    assert m.cache.lengths[1] == 5                   # nothing written
    replays.clear()
    m.clear_graphs()
    assert not m.has_graphs and m.decode_rows(torch.tensor([7]), [1]).shape == (1, V)
    assert replays == [] and m.cache.lengths[1] == 6


@pytest.mark.parametrize("rows,fused", [(2, False), (1, True)])
def test_row_graph_body_launches_only_the_layers(tmp_path, monkeypatch, rows, fused):
    """What a batched decode graph replays, counted on an eager run of its body: per layer
    2 norms, 4 matmuls, 1 attention and 1 SwiGLU (one row with fused_gemv: 4 gemvs and 1
    attention), the final norm and lm_head, the embedding; nothing else: the rows' slots
    and positions are read in the attention kernel only (no per-step index arithmetic)."""
    from test_triton_backend import _count_launches
    eager_graphs(monkeypatch)
    m = load_model(make_model(str(tmp_path / "m"), "llama"), backend="triton",
                   max_batch_size=2)
    m.set_decode_kernels(fused_gemv=fused)
    m.capture_decode_rows((rows,))
    g = m.graphs[("rows", rows)]
    got = _count_launches(lambda: m.forward_rows(g["token"], g["batch"]))
    for op in ("aten.reshape.default", "aten.to.dtype"):     # views; fp32 -> fp32: no-ops
        got.pop(op, None)
    L = m.config.num_layers
    want = ({"triton:_gemv_kernel": 4 * L + 1} if fused else
            {"triton:_rms_norm_kernel": 2 * L + 1, "aten.linear.default": 4 * L + 1,
             "triton:_swiglu_kernel": L})
    want.update({"triton:_decode_attention_kernel": L, "aten.embedding.default": 1})
    assert got == want


def test_batched_wsd_in_graph_mode_matches_eager_on_cpu(tmp_path, monkeypatch):
    """The batched engine with CUDA graphs (the batched decode graphs per batch size,
    replayed eagerly here) gives exactly the eager batched engine's rows: several prompts,
    different windows / thresholds / chunks, greedy and sampled; 3 rows replay the 4-row
    graph (padded), and as rows finish the smaller ones."""
    pair = make_wsd_pair(str(tmp_path), damp=0.02, perturb=0.05, sharpen=100.0)
    prompts = ["Tell me about the quick brown fox.", "Why is the sky blue?", "Hi there"]
    qs = [WSDParams(draft_max_tokens=10, max_new_tokens=14, chunk=3, window=4, threshold=0.8),
          WSDParams(draft_max_tokens=6, max_new_tokens=10, chunk=4, window=2, threshold=0.95,
                    temperature=0.8, top_p=0.9, seed=3),
          WSDParams(draft_max_tokens=8, max_new_tokens=6, chunk=5, window=3, threshold=0.3)]

    def engine(**kw):
        return WSD(load_model(pair[0], backend="triton", max_batch_size=4),
                   load_model(pair[1], backend="triton", max_batch_size=4), **kw)
    want = engine().generate(prompts, qs)
    replays = eager_graphs(monkeypatch)
    calls = []                                       # (model, rows, replayed)
    real = graphs.replay_rows

    def replay_rows(model, tokens, slots, starts):
        out = real(model, tokens, slots, starts)
        calls.append((model, len(slots), out is not None))
        return out
    monkeypatch.setattr(graphs, "replay_rows", replay_rows)
    graphed = engine(cuda_graphs=True, graph_batch_sizes=(1, 2, 4), tune_kernels=False)
    for m in (graphed.pilot, graphed.base):
        assert sorted(m.graphs) == [("rows", 1), ("rows", 2), ("rows", 4)]
    before = {id(g["graph"]) for m in (graphed.pilot, graphed.base) for g in m.graphs.values()}
    got = graphed.generate(prompts, qs)
    assert [(r.token_ids, r.switch_index, r.text) for r in got] == \
        [(r.token_ids, r.switch_index, r.text) for r in want]
    assert any(r.switched for r in want) and len({r.switch_index for r in want}) > 1
    assert calls and all(replayed for _, _, replayed in calls)   # every step replayed
    rows = {name: {n for model, n, _ in calls if model is m}
            for name, m in (("pilot", graphed.pilot), ("base", graphed.base))}
    assert 3 in rows["pilot"] and rows["base"], rows     # 3 drafting rows: padded to 4
    assert ("rows", 4) in replays and {("rows", 1), ("rows", 2)} & set(replays)
    assert len(replays) == len(calls)
    # requests replay the graphs captured with the engine: none captured again
    assert {id(g["graph"]) for m in (graphed.pilot, graphed.base)
            for g in m.graphs.values()} == before


def test_graphs_are_captured_once_per_engine_not_per_request(tmp_path, monkeypatch):
    """On CPU with the captures counted (no-ops here): building the engine captures both
    models' batched decode graphs once, for its batch sizes; requests capture nothing."""
    from wsd_engine.runner import Model
    calls = []
    monkeypatch.setattr(Model, "capture_decode_rows",
                        lambda self, *a, **kw: calls.append((self, a, kw)))
    for name in ("capture_decode", "capture_prefill"):
        monkeypatch.setattr(Model, name, lambda self, *a, **kw: calls.append(name))
    pair = make_wsd_pair(str(tmp_path), damp=0.02, perturb=0.05, sharpen=100.0)
    w = WSD.from_pretrained(*pair, cuda_graphs=True, graph_batch_sizes=(1, 4),
                            max_batch_size=2)
    assert calls == [(w.pilot, ((1, 4),), {"max_rows": 2}), (w.base, ((1, 4),), {"max_rows": 2})]
    w.generate("Hello!", WSDParams(draft_max_tokens=16, max_new_tokens=16, chunk=3))
    w.generate(["Hello!", "Hi"], WSDParams(draft_max_tokens=16, max_new_tokens=16,
                                           temperature=0.7, seed=1))
    list(w.stream("Hi", WSDParams(draft_max_tokens=16, max_new_tokens=16)))
    assert len(calls) == 2
    assert WSD.from_pretrained(*pair).pilot.graphs == {}            # no cuda_graphs: none


# ---- on the GPU: real captures ----------------------------------------------------------

@pytest.mark.gpu
def test_prefill_graphs_on_the_gpu(tmp_path):
    """Captured bucket prefills against eager prefills: same last-token logits, same cache
    (the next decode step agrees), prompts from 1 token to past the largest bucket."""
    path = make_model(str(tmp_path / "m"), "qwen2", tokenizer=make_tokenizer(320),
                      init_scale=5.0)
    eager = load_model(path, device="cuda", backend="triton", max_seq_len=128)
    m = load_model(path, device="cuda", backend="triton", max_seq_len=128)
    m.capture_prefill((16, 64))
    g = torch.Generator().manual_seed(0)
    for n in (1, 9, 16, 40, 64, 90):
        ids = torch.randint(3, 320, (n,), generator=g).cuda()
        eager.cache.reset()
        m.cache.reset()
        torch.testing.assert_close(m.prefill(ids), eager.prefill(ids), rtol=1e-4, atol=1e-4)
        assert m.cache.length == n
        nxt = torch.tensor([5], device="cuda")
        torch.testing.assert_close(m.decode_one_token(nxt), eager.decode_one_token(nxt),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_graph_decode_matches_eager(tmp_path, family):
    """The one-sequence decode graph (`generate`'s steps, one in flight): eager's tokens."""
    path = make_model(str(tmp_path / family), family, tokenizer=make_tokenizer(320),
                      init_scale=5.0)
    eager = load_model(path, device="cuda", backend="triton")
    graphed = load_model(path, device="cuda", backend="triton")
    graphed.capture_decode()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 320, (5 + 20 * seed,), generator=g).tolist()
        want = eager.generate(ids, 40, stop_at_eos=False)
        assert graphed.generate(ids, 40, stop_at_eos=False) == want     # one-ahead stream
        eos = want[17]                                                  # stop mid-stream
        assert graphed.generate(ids, 40, eos_token_ids=[eos]) == want[:want.index(eos)]
        assert graphed.generate(ids, 40, stop_at_eos=False) == want     # usable after


@pytest.mark.gpu
@pytest.mark.parametrize("fused_gemv", [False, True], ids=["plain", "fused"])
def test_row_graphs_on_the_gpu(tmp_path, fused_gemv):
    """Captured batched decode steps (sizes 1, 2, 4 of 5 slots) against eager ones: every
    batch size 1..5 (padded, or eager for 5), rows at different lengths, 6 steps each:
    same logits, lengths and cache."""
    path = make_model(str(tmp_path / "m"), "llama", init_scale=5.0)
    eager = load_model(path, device="cuda", backend="triton", max_seq_len=96,
                       max_batch_size=5)
    m = load_model(path, device="cuda", backend="triton", max_seq_len=96, max_batch_size=5)
    for model in (m, eager):
        model.set_decode_kernels(fused_gemv=fused_gemv)
    assert m.capture_decode_rows((1, 2, 4)) == [1, 2, 4]
    g = torch.Generator().manual_seed(0)
    V = m.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=g).cuda() for n in (3, 17, 1, 40, 8)]
    for model in (m, eager):
        model.prefill_rows(prompts, [0, 1, 2, 3, 4])
    for slots in ([2], [4, 0], [1, 3, 2], [0, 1, 2, 3], [4, 3, 2, 1, 0]):
        for _ in range(6):
            tokens = torch.randint(0, V, (len(slots),), generator=g).cuda()
            got = m.decode_rows(tokens, slots).clone()
            torch.testing.assert_close(got, eager.decode_rows(tokens, slots), rtol=1e-4,
                                       atol=1e-4)
    assert m.cache.lengths == eager.cache.lengths
    for s, n in enumerate(m.cache.lengths):
        torch.testing.assert_close(m.cache.k[:, s, :, :n], eager.cache.k[:, s, :, :n])


@pytest.mark.gpu
def test_wsd_with_graph_decode_matches_eager(tmp_path):
    """The batched engine with its decode graphs (sizes 1, 2, 4; 3 rows padded into 4)
    gives the eager engine's rows, greedy and sampled, and replays the graphs it captured
    when built."""
    pair = make_wsd_pair(str(tmp_path), damp=0.02, perturb=0.05, sharpen=100.0)
    kw = dict(device="cuda", backend="triton", max_batch_size=4)
    eager = WSD.from_pretrained(*pair, **kw)
    # the same kernels as the eager engine (no tuning: graphs vs eager is the question)
    graphed = WSD.from_pretrained(*pair, **kw, cuda_graphs=True, graph_batch_sizes=(1, 2, 4),
                                  tune_kernels=False)
    assert graphed.kernel_tuning == {} and not graphed.base.ops.fused_gemv
    for m in (graphed.pilot, graphed.base):
        assert sorted(m.graphs) == [("rows", 1), ("rows", 2), ("rows", 4)]
    before = {id(g["graph"]) for m in (graphed.pilot, graphed.base) for g in m.graphs.values()}
    prompts = ["Tell me about the quick brown fox.", "Hello!", "Numbers like 42?"]
    for chunk in (8, 3):
        qs = [WSDParams(draft_max_tokens=48, max_new_tokens=64, chunk=chunk),
              WSDParams(draft_max_tokens=48, max_new_tokens=64, chunk=chunk, temperature=0.8,
                        top_p=0.9, seed=3),
              WSDParams(draft_max_tokens=24, max_new_tokens=40, chunk=chunk, window=3,
                        threshold=0.5)]
        a, b = eager.generate(prompts, qs), graphed.generate(prompts, qs)
        assert [(r.switch_index, r.token_ids) for r in a] == \
            [(r.switch_index, r.token_ids) for r in b]
        assert any(r.switched for r in a)
        for p, q in zip(prompts, qs):                  # one row alone: the 1-row graph
            a, b = eager.generate(p, q), graphed.generate(p, q)
            assert (a.switch_index, a.token_ids) == (b.switch_index, b.token_ids)
    assert {id(g["graph"]) for m in (graphed.pilot, graphed.base)
            for g in m.graphs.values()} == before


@pytest.mark.gpu
def test_tuning_on_the_gpu_picks_a_working_path(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=make_tokenizer(320),
                      init_scale=5.0)
    eager = load_model(path, device="cuda", backend="triton")
    m = load_model(path, device="cuda", backend="triton")
    rec = tune_decode_kernels(m, context=64, replays=5)
    assert all("ms" in r and r["ms"] > 0 for r in rec["rows"]), rec
    assert len(rec["rows"]) == len(tuning.tuning_candidates(m)) >= 2
    assert (m.ops.fused_gemv, m.ops.pdl) == tuple(rec["chosen"].values())
    assert m.graphs == {} and m.cache.length == 0
    m.capture_decode()
    eager.set_decode_kernels(**rec["chosen"])          # tuned graph vs eager, same kernels
    ids = list(range(5, 30))
    assert m.generate(ids, 24, stop_at_eos=False) == eager.generate(ids, 24, stop_at_eos=False)


# ---- tuning the one-token kernels (tuning.tune_decode_kernels) --------------------------

_LOGITS = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))


def _fake_cuda(m, monkeypatch, times, logits=None):
    """m as if on a GPU for the tuning loop: the timing of each (fused_gemv, pdl) from
    `times` (a number, or an exception to raise) and its logits from `logits` (default:
    the same for all), no capture."""
    monkeypatch.setattr(m, "device", torch.device("cuda"))
    calls = []

    def timing(model, context, replays):
        assert model is m
        key = (m.ops.fused_gemv, m.ops.pdl)
        calls.append((key, context, replays))
        t = times[key]
        if isinstance(t, Exception):
            raise t
        return t, (logits or {}).get(key, _LOGITS)
    monkeypatch.setattr(tuning, "_time_decode_step", timing)
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
    rec = tune_decode_kernels(m, context=40, replays=7)
    assert [c[0] for c in calls] == [(False, False), (True, False)]   # no PDL off sm_90
    assert all(c[1:] == (40, 7) for c in calls)
    assert rec["chosen"] == {"fused_gemv": chosen, "pdl": False} and m.ops.fused_gemv is chosen
    assert rec["ms"] == (fused_ms if chosen else 10.0) and len(rec["rows"]) == 2
    assert m.decode_tuning is rec and m.decode_kernels_chosen and m.graphs == {}


def test_tuning_skips_a_failing_candidate_and_fails_cleanly(tiny_triton, monkeypatch):
    m = tiny_triton
    _fake_cuda(m, monkeypatch, {(False, False): RuntimeError("capture failed"),
                                (True, False): 8.0, (True, True): 7.0})
    rec = tune_decode_kernels(m, candidates=[dict(fused_gemv=False, pdl=False),
                                             dict(fused_gemv=True, pdl=False),
                                             dict(fused_gemv=True, pdl=True)])
    assert "capture failed" in rec["rows"][0]["error"]
    assert rec["chosen"] == {"fused_gemv": True, "pdl": True}   # the first that ran is the base
    m2 = load_model(m.path, backend="triton")
    _fake_cuda(m2, monkeypatch, {(False, False): RuntimeError("a"), (True, False): ValueError("b")})
    with pytest.raises(RuntimeError, match="every decode kernel candidate failed"):
        tune_decode_kernels(m2)
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
    rec = tune_decode_kernels(m, candidates=cands)
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
    rec = tune_decode_kernels(m2)
    assert rec["rows"][0]["error"] == "rejected: non-finite logits"
    assert rec["chosen"] == {"fused_gemv": True, "pdl": False}


def test_tuning_refuses_bad_input(tiny_triton, tmp_path, monkeypatch):
    cpu = load_model(make_model(str(tmp_path / "c"), "llama"))
    with pytest.raises(ConfigError, match="needs device='cuda' and backend='triton'"):
        tune_decode_kernels(cpu)
    m = tiny_triton
    _fake_cuda(m, monkeypatch, {(False, False): 1.0, (True, False): 1.0})
    for kw, msg in ((dict(context=0), "context must be"), (dict(context=10**6), "context must be"),
                    (dict(replays=0), "replays must be"), (dict(candidates=[]), "candidates"),
                    (dict(candidates=[dict(fused_gemv=1, pdl=False)]), "candidates"),
                    (dict(candidates=[dict(fused=True)]), "candidates")):
        with pytest.raises(ConfigError, match=msg):
            tune_decode_kernels(m, **kw)
    m.graphs["decode"] = {}                       # as if captured
    with pytest.raises(ConfigError, match="tune before capturing"):
        tune_decode_kernels(m)
    m.graphs.clear()
    assert not m.decode_kernels_chosen
    tune_decode_kernels(m)                        # still usable


def test_wsd_tunes_only_models_nobody_set(tmp_path, monkeypatch):
    from wsd_engine.runner import Model
    path = make_model(str(tmp_path / "m"), "llama")
    tuned = []
    monkeypatch.setattr(tuning, "tune_decode_kernels",
                        lambda m: tuned.append(m) or {"chosen": "x"})
    monkeypatch.setattr(Model, "capture_decode_rows", lambda self, *a, **kw: None)
    monkeypatch.setattr(Model, "can_capture", property(lambda self: True))   # as on a GPU
    pilot, base = load_model(path, backend="triton"), load_model(path, backend="triton")
    pilot.set_decode_kernels(fused_gemv=False)       # chosen by hand: kept
    w = WSD(pilot, base, cuda_graphs=True)
    assert tuned == [base] and w.kernel_tuning == {"base": {"chosen": "x"}}
    tuned.clear()
    captured = load_model(path, backend="triton")
    captured.graphs["decode"] = {}                    # graphs of its own: left as it is
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
    with pytest.raises(ConfigError, match="needs device='cuda'"):   # the real one, on CPU
        monkeypatch.undo()
        WSD(load_model(path, backend="triton"), load_model(path, backend="triton"),
            tune_kernels=True)


def test_tuning_trials_leave_the_choice_flag_alone(tiny_triton, monkeypatch):
    """A trial setting (chosen=False) is not a choice; a model whose kernels were set by
    hand keeps its setting and its flag when every candidate fails."""
    m = tiny_triton
    m.set_decode_kernels(fused_gemv=True, chosen=False)
    assert m.ops.fused_gemv and not m.decode_kernels_chosen
    assert m.decode_kernels == {"fused_gemv": True, "pdl": False}
    m.set_decode_kernels(pdl=False)
    assert m.decode_kernels_chosen
    _fake_cuda(m, monkeypatch, {(False, False): RuntimeError("a"), (True, False): ValueError("b")})
    with pytest.raises(RuntimeError, match="every decode kernel candidate failed"):
        tune_decode_kernels(m)
    assert m.decode_kernels == {"fused_gemv": True, "pdl": False} and m.decode_kernels_chosen
