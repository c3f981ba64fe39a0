"""Gemma-2 in the engine's own forward (torch backend) against transformers'
Gemma2ForCausalLM (eager attention, fp32): logits, greedy generation past the sliding
window, the batched rows, the published config spelling, sharded bf16 files, and WSD with
a Gemma-2 base (a Gemma-2 pilot, and a Llama pilot with its own tokenizer) against the
offline reference. The weights are scaled so that both soft-caps change the logits."""
import json
import os

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from wsd_engine import UnsupportedModelError, WSD, WSDParams, load_model
from wsd_engine.reference import ReferenceWSD
from wsd_engine.synthetic import make_model, make_tokenizer, make_wsd_pair

WINDOW = 8


def _hf(attn_cap=2.0, final_cap=4.0, kv_heads=2, seed=1, head_dim=24, **kw):
    cfg = Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=kv_heads,
                       head_dim=head_dim, query_pre_attn_scalar=20, sliding_window=WINDOW,
                       max_position_embeddings=128, attn_logit_softcapping=attn_cap,
                       final_logit_softcapping=final_cap, attn_implementation="eager", **kw)
    torch.manual_seed(0)
    m = Gemma2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.15))
    return m


IDS = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))   # > WINDOW


def _logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids[None]).logits[0].float()


def _save(m, path, **kw):
    m.save_pretrained(str(path), safe_serialization=True, **kw)
    return str(path)


@pytest.mark.parametrize("kv_heads", [2, 1])            # GQA and MQA
def test_logits_equal_transformers_with_both_caps(tmp_path, kv_heads):
    plain = _logits(_hf(None, None, kv_heads))
    assert (plain - _logits(_hf(2.0, None, kv_heads))).abs().max() > 0.1    # each cap matters
    assert (plain - _logits(_hf(None, 4.0, kv_heads))).abs().max() > 0.1
    m = _hf(kv_heads=kv_heads)
    ours = load_model(_save(m, tmp_path), dtype=torch.float32, max_seq_len=128)
    assert ours.config.layer_windows == (WINDOW, None, WINDOW)
    assert ours.config.head_dim == 24 != 64 // 4
    assert (ours.score(IDS.tolist()) - _logits(m)).abs().max() <= 1e-4


def test_greedy_generation_past_the_window_equals_transformers(tmp_path):
    m = _hf()
    ours = load_model(_save(m, tmp_path), dtype=torch.float32, max_seq_len=128)
    with torch.no_grad():
        want = m.generate(IDS[None, :5], max_new_tokens=3 * WINDOW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert ours.generate(IDS[:5].tolist(), max_new_tokens=3 * WINDOW, stop_at_eos=False) == want


def test_batched_rows_equal_one_sequence(tmp_path):
    """Rows of different lengths in one forward (the batched engine's path), windows and
    caps included, give each sequence's own logits."""
    m = _hf()
    path = _save(m, tmp_path)
    one = load_model(path, dtype=torch.float32, max_seq_len=128)
    rows = load_model(path, dtype=torch.float32, max_seq_len=128, max_batch_size=3)
    prompts = [IDS[:30], IDS[5:9], IDS[10:31]]
    last = rows.prefill_rows(list(prompts), [2, 0, 1])                  # [3, V]
    for p, got in zip(prompts, last):
        assert (got - one.score(p.tolist())[-1]).abs().max() <= 1e-4
    nxt = torch.tensor([7, 8, 9])
    step = rows.decode_rows(nxt, [2, 0, 1])
    for p, t, got in zip(prompts, nxt.tolist(), step):
        assert (got - one.score(p.tolist() + [t])[-1]).abs().max() <= 1e-4


def test_published_config_spelling_loads(tmp_path):
    """Hub Gemma-2 configs: no layer_types, the window also as sliding_window_size,
    cache_implementation "hybrid", hidden_act and hidden_activation."""
    m = _hf()
    path = _save(m, tmp_path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("layer_types", None)
    cfg.update(sliding_window_size=WINDOW, cache_implementation="hybrid",
               hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh")
    json.dump(cfg, open(cfg_path, "w"))
    ours = load_model(path, dtype=torch.float32, max_seq_len=128)
    assert ours.config.layer_windows == (WINDOW, None, WINDOW)
    assert (ours.score(IDS.tolist()) - _logits(m)).abs().max() <= 1e-4
    cfg.pop("sliding_window")                          # only the published spelling
    json.dump(cfg, open(cfg_path, "w"))
    assert load_model(path, dtype=torch.float32, max_seq_len=128).config.layer_windows == \
        (WINDOW, None, WINDOW)


def test_sharded_bf16_checkpoint(tmp_path):
    m = _hf().to(torch.bfloat16)
    path = _save(m, tmp_path, max_shard_size="100KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    ours = load_model(path, dtype=torch.float32, max_seq_len=128)
    # transformers reading the same files in fp32 (a cast of the bf16 module would round
    # its RoPE frequencies too)
    ref = Gemma2ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                            attn_implementation="eager").eval()
    assert (ours.score(IDS.tolist()) - _logits(ref)).abs().max() <= 1e-4


def test_what_is_not_supported_is_a_clear_error(tmp_path):
    path = _save(_hf(), tmp_path)
    with pytest.raises(UnsupportedModelError, match="max_position_embeddings"):
        load_model(path, max_seq_len=256)
    with pytest.raises(UnsupportedModelError, match="backend='torch'"):
        load_model(path, backend="triton", max_seq_len=128)


# ---- WSD with a Gemma-2 base ------------------------------------------------------------
PROMPT = "Tell me about the quick brown fox."


def _check_wsd(pair, kws, chunks=(1, 3, 8), prompt=PROMPT):
    """Engine (one slot and a batch) == reference for each setting; returns the refs."""
    refs = [ReferenceWSD(*pair).generate(prompt, **kw) for kw in kws]
    one = WSD.from_pretrained(*pair, max_seq_len=256)
    for kw, ref in zip(kws, refs):
        for c in chunks:
            r = one.generate(prompt, WSDParams(chunk=c, **kw))
            assert (r.token_ids, r.text, r.switch_index, r.switched) == \
                (ref.token_ids, ref.text, ref.switch_index, ref.switched), (kw, c)
    batch = WSD.from_pretrained(*pair, max_seq_len=256, max_batch_size=3)
    for r, ref in zip(batch.generate([prompt] * len(kws), [WSDParams(**kw) for kw in kws]), refs):
        assert (r.token_ids, r.switch_index) == (ref.token_ids, ref.switch_index)
    return refs


def test_wsd_with_a_gemma2_pilot_and_base(tmp_path):
    from test_wsd import _threshold_between
    tok = make_tokenizer(320)
    pair = make_wsd_pair(str(tmp_path), sharpen=8.0, damp=0.02, perturb=0.05, tokenizer=tok,
                         family="gemma2")
    base = dict(draft_max_tokens=40, max_new_tokens=56)
    prompt = "Hi there"                    # its draft has a late window to target
    probe = ReferenceWSD(*pair).generate(prompt, threshold=0.999999, **base)
    gamma, k = _threshold_between(probe.logp, 3, 10)
    refs = _check_wsd(pair, [dict(base), dict(base, window=3, threshold=gamma),
                             dict(base, threshold=0.999999)], prompt=prompt)
    assert refs[0].switched and refs[0].switch_index <= 8                 # early
    assert refs[1].switched and refs[1].switch_index == k >= 10           # late
    assert not refs[2].switched and refs[2].switch_index == len(refs[2].draft_base_ids)


def test_wsd_with_a_llama_pilot_and_a_gemma2_base(tmp_path):
    """Different tokenizers: the draft crosses as text, as in the paper's Llama-3.2 pilot
    with a Gemma-2 base."""
    from test_wsd import _threshold_between
    pilot_tok, base_tok = make_tokenizer(420), make_tokenizer(320)
    base = make_wsd_pair(str(tmp_path / "g"), sharpen=8.0, damp=0.02, perturb=0.05,
                         tokenizer=base_tok, family="gemma2")[1]
    pilot = make_model(str(tmp_path / "pilot"), "llama", seed=3, tokenizer=pilot_tok,
                       init_scale=5.0)
    pair = (pilot, base)
    kw0 = dict(draft_max_tokens=32, max_new_tokens=72)
    probe = ReferenceWSD(*pair).generate(PROMPT, threshold=0.999999, **kw0)
    assert probe.draft_base_ids != probe.draft_ids                       # re-tokenized
    g_early, k_early = _threshold_between(probe.logp, 3, 2)
    g_late, k_late = _threshold_between(probe.logp, 3, 10)
    refs = _check_wsd(pair, [dict(kw0, window=3, threshold=g_early),
                             dict(kw0, window=3, threshold=g_late),
                             dict(kw0, threshold=0.999999)], chunks=(1, 8))
    assert refs[0].switched and refs[0].switch_index == k_early <= 4      # early
    assert refs[1].switched and refs[1].switch_index == k_late >= 10      # late
    assert not refs[2].switched                                          # never


@pytest.mark.parametrize("key,value,err", [
    ("layer_types", ["sliding_attention"], "layer_types"),                 # wrong length
    ("layer_types", ["local", "global", "local"], "layer_types"),
    ("attn_logit_softcapping", -1.0, "attn_logit_softcapping"),
    ("final_logit_softcapping", 1e12, "final_logit_softcapping"),
    ("query_pre_attn_scalar", 0, "query_pre_attn_scalar"),
    ("sliding_window", 0, "sliding_window"),
])
def test_bad_gemma2_configs_are_refused(tmp_path, key, value, err):
    from wsd_engine import ConfigError
    path = _save(_hf(), tmp_path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg[key] = value
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises((ConfigError, UnsupportedModelError), match=err):
        load_model(path, max_seq_len=128)


def test_caps_can_be_off_and_the_activation_is_checked(tmp_path):
    m = _hf(None, None)
    path = _save(m, tmp_path)
    ours = load_model(path, dtype=torch.float32, max_seq_len=128)
    assert ours.config.attn_softcap is None and ours.config.final_softcap is None
    assert (ours.score(IDS.tolist()) - _logits(m)).abs().max() <= 1e-4
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["hidden_activation"] = "silu"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedModelError, match="gelu_pytorch_tanh"):
        load_model(path, max_seq_len=128)


def test_gemma2_presets_have_the_published_shapes():
    """The benchmark presets (random weights on a GPU): 9.2B and 27.2B parameters, the
    published windows, scales and caps."""
    from wsd_engine.config import preset_config
    from wsd_engine.memory import weight_elements
    for name, params, scalar in (("gemma2-9b", 9.24e9, 256), ("gemma2-27b", 27.23e9, 144)):
        c = preset_config(name)
        assert abs(weight_elements(c) - params) < 0.01e9
        assert c.attn_scale == scalar ** -0.5 and c.attn_softcap == 50 and c.final_softcap == 30
        assert c.layer_windows[:2] == (4096, None) and len(c.layer_windows) == c.num_layers


# ---- the triton backend (kernels under the interpreter) ---------------------------------
def test_triton_backend_equals_torch_backend(tmp_path):
    path = _save(_hf(head_dim=32), tmp_path)       # a power-of-two head: the kernels' tiles
    ref = load_model(path, dtype=torch.float32, max_seq_len=64)
    tri = load_model(path, dtype=torch.float32, max_seq_len=64, backend="triton")
    assert tri.backend == "triton" and tri.config.layer_windows == (WINDOW, None, WINDOW)
    ids = IDS[:20].tolist()                                             # > WINDOW
    assert (tri.score(ids) - ref.score(ids)).abs().max() <= 1e-4
    n = 2 * WINDOW + 2                                                  # decode past the window
    assert tri.generate(ids[:3], max_new_tokens=n, stop_at_eos=False) == \
        ref.generate(ids[:3], max_new_tokens=n, stop_at_eos=False)
    # a head size the kernels cannot tile is refused at load, not mid-forward
    with pytest.raises(UnsupportedModelError, match="head_dim"):
        load_model(_save(_hf(), tmp_path / "hd24"), backend="triton", max_seq_len=64)


def test_triton_backend_batched_wsd_equals_torch(tmp_path):
    """A Gemma-2 pair (both caps, window 16, head_dim 32) in a batch of two: the triton
    engine (attention with caps and windows, switch scoring with the final cap in the
    switch_score_rows kernel) gives the torch engine's tokens and switch points."""
    pair = make_wsd_pair(str(tmp_path), sharpen=8.0, damp=0.02, perturb=0.05,
                         family="gemma2", head_dim=32, final_logit_softcapping=4.0)
    kw = dict(draft_max_tokens=12, max_new_tokens=20)
    prompts = ["Hi there", PROMPT]
    params = [WSDParams(chunk=4, **kw), WSDParams(chunk=3, window=2, threshold=0.2, **kw)]
    got = WSD.from_pretrained(*pair, max_seq_len=96, max_batch_size=2,
                              backend="triton").generate(prompts, params)
    want = WSD.from_pretrained(*pair, max_seq_len=96, max_batch_size=2).generate(prompts, params)
    for g, w in zip(got, want):
        assert (g.token_ids, g.switch_index, g.switched) == \
            (w.token_ids, w.switch_index, w.switched)
