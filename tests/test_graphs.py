"""CUDA-graph-captured decode step: same tokens as the eager run (GPU), clear error on CPU."""
import pytest
import torch

from wsd_engine import ConfigError, load_model
from wsd_engine.engine import WSD, WSDParams
from wsd_engine.synthetic import make_model, make_tokenizer, make_wsd_pair


def test_capture_needs_cuda_and_triton(tmp_path):
    m = load_model(make_model(str(tmp_path / "m"), "llama"))
    with pytest.raises(ConfigError, match="device='cuda' and backend='triton'"):
        m.capture_decode()
    with pytest.raises(ConfigError, match="device='cuda' and backend='triton'"):
        m.capture_score(8)
    assert len(m.generate([3, 4, 5], max_new_tokens=4, stop_at_eos=False)) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_graph_decode_matches_eager(tmp_path, family):
    path = make_model(str(tmp_path / family), family, tokenizer=make_tokenizer(320),
                      init_scale=5.0)
    eager = load_model(path, device="cuda", backend="triton")
    graphed = load_model(path, device="cuda", backend="triton")
    graphed.capture_decode()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 320, (5 + 20 * seed,), generator=g).tolist()
        assert graphed.generate(ids, 40, stop_at_eos=False) == \
            eager.generate(ids, 40, stop_at_eos=False)


@pytest.mark.gpu
def test_wsd_with_graph_decode_matches_eager(tmp_path):
    pair = make_wsd_pair(str(tmp_path), damp=0.02, perturb=0.05, sharpen=100.0)
    eager = WSD.from_pretrained(*pair, device="cuda", backend="triton")
    graphed = WSD.from_pretrained(*pair, device="cuda", backend="triton", cuda_graphs=True,
                                  graph_chunks=(8, 3))
    assert ("score", 8) in graphed.base._graphs and "decode" in graphed.pilot._graphs
    for prompt in ("Tell me about the quick brown fox.", "Hello!", "Numbers like 42?"):
        for chunk in (8, 3, 5):      # 5: no graph of that size, eager scoring
            p = WSDParams(draft_max_tokens=48, max_new_tokens=64, chunk=chunk)
            a, b = eager.generate(prompt, p), graphed.generate(prompt, p)
            assert (a.switch_index, a.token_ids) == (b.switch_index, b.token_ids)
            assert a.switched
