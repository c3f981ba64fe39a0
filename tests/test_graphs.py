"""CUDA-graph-captured decode step, n-step greedy decode and chunk scoring: same tokens as
the eager run (GPU); on CPU the decoding paths they replay (n-step blocks, the one-ahead
token stream) equal token-by-token decoding, and capture fails with a clear error."""
import pytest
import torch

from wsd_engine import ConfigError, load_model
from wsd_engine.engine import WSD, WSDParams
from wsd_engine.synthetic import make_model, make_tokenizer, make_wsd_pair


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
    assert m._graphs == {}
    assert len(m.generate([3, 4, 5], max_new_tokens=4, stop_at_eos=False)) == 4


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
    graphed = WSD.from_pretrained(*pair, device="cuda", backend="triton", cuda_graphs=True,
                                  graph_chunks=(8, 3))
    one_step = WSD.from_pretrained(*pair, device="cuda", backend="triton", cuda_graphs=True,
                                   graph_chunks=(8,), step_graphs=False)
    assert ("score", 8) in graphed.base._graphs and "decode" in graphed.pilot._graphs
    assert ("steps", 8) in graphed.pilot._graphs and ("steps", 3) in graphed.pilot._graphs
    assert not any(k[0] == "steps" for k in one_step.pilot._graphs if isinstance(k, tuple))
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
