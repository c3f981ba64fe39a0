"""Our forward against Hugging Face transformers on tiny random checkpoints (fp32)."""
import copy
import json
import os

import pytest
import torch

from wsd_engine import load_model
from wsd_engine.synthetic import make_model, make_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# Llama 3.1's real rope_scaling (with rope_theta 500000), except original_max_position_embeddings
# (8192 there): 64 here, so that a 150-token sequence runs well past it and each of the three
# bands (kept / interpolated / divided by `factor`) holds frequencies at head_dim 32.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CASES = {
    "llama_gqa_untied": ("llama", {}),
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", dict(rope_scaling=LLAMA3_ROPE)),
    "llama_linear_rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama_head_dim": ("llama", dict(head_dim=32)),   # explicit head_dim != hidden / heads
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=512)),
    # every case above uses rope_theta 10000: these two use real checkpoints' values
    "llama31_rope_theta": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA31_ROPE,
                                         head_dim=32)),
    "qwen2_rope_theta_1e6": ("qwen2", dict(rope_theta=1000000.0)),
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(320)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("ckpt")
    # deep copies: transformers' config classes write rope_theta into the rope_scaling
    # dict they are given, in place
    return {name: make_model(str(root / name), fam, seed=i, tokenizer=tok, init_scale=5.0,
                             **copy.deepcopy(kw))
            for i, (name, (fam, kw)) in enumerate(CASES.items())}


def _hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompt(tok, n=150):
    torch.manual_seed(n)
    return torch.randint(3, len(tok), (n,)).tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(ckpts, tok, name):
    m = load_model(ckpts[name], dtype=torch.float32)
    hf = _hf(ckpts[name])
    ids = _prompt(tok)
    ours = m.score(ids)                                             # [T, V]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == (len(ids), len(tok)) and ours.dtype == torch.float32
    assert ref.abs().max() > 1.0   # not a degenerate all-small model
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_bias_tied", "mistral", "llama3_rope",
                                  "llama31_rope_theta", "qwen2_rope_theta_1e6"])
def test_greedy_generate_matches_transformers(ckpts, tok, name):
    m = load_model(ckpts[name], dtype=torch.float32)
    hf = _hf(ckpts[name])
    ids = _prompt(tok, 40)
    ours = m.generate(ids, max_new_tokens=32, stop_at_eos=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours == ref
    assert len(set(ours)) > 1


@pytest.mark.parametrize("name,theta", [("llama31_rope_theta", 500000.0),
                                        ("qwen2_rope_theta_1e6", 1000000.0)])
def test_rope_theta_really_matters_on_these_sequences(ckpts, tok, tmp_path, name, theta):
    """The same weights with rope_theta 10000 give transformers logits far outside the
    1e-4 tolerance of test_logits_match_transformers on the same 150 tokens, so a forward
    that ignored rope_theta could not pass it."""
    fam, kw = CASES[name]
    assert kw["rope_theta"] == theta
    seed = list(CASES).index(name)
    other = make_model(str(tmp_path / "theta1e4"), fam, seed=seed, tokenizer=tok,
                       init_scale=5.0, **{**copy.deepcopy(kw), "rope_theta": 10000.0})
    ids = torch.tensor([_prompt(tok)])
    with torch.no_grad():
        a = _hf(ckpts[name])(ids).logits[0]
        b = _hf(other)(ids).logits[0]
    assert (a - b).abs().max() > 0.1
    assert load_model(ckpts[name], dtype=torch.float32).config.rope.theta == theta


def test_llama31_and_qwen25_inv_freq():
    """RoPE inverse frequencies at the real shapes (head_dim 128): Llama 3.1 (theta 500000,
    llama3 scaling, original_max 8192) and Qwen2.5 (theta 1e6, no scaling), against
    transformers' own tables and against closed forms written out here (float64)."""
    import math

    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from wsd_engine.config import ModelConfig
    rope31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    shape = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, num_hidden_layers=1, vocab_size=128256,
                 max_position_embeddings=131072)
    llama = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                                       rope_scaling=rope31, **shape))
    qwen = ModelConfig.from_dict(dict(architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0,
                                      **dict(shape, hidden_size=3584, num_attention_heads=28,
                                             num_key_value_heads=4)))
    ours_l, ours_q = llama.rope.inv_freq(128), qwen.rope.inv_freq(128)          # [64]
    hf_l = LlamaRotaryEmbedding(LlamaConfig(rope_theta=500000.0, rope_scaling=dict(rope31),
                                            **shape)).inv_freq
    hf_q = Qwen2RotaryEmbedding(Qwen2Config(rope_theta=1000000.0, **dict(
        shape, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4))).inv_freq
    torch.testing.assert_close(ours_l, hf_l.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours_q, hf_q.float(), rtol=1e-6, atol=0)

    # closed forms: base frequency theta^(-2i/128); Llama 3.1 keeps wavelengths < 8192/4,
    # divides those > 8192/1 by 8, and interpolates linearly in 8192/wavelength between
    def base(theta, i):
        return theta ** (-2 * i / 128)

    assert ours_q[0].item() == 1.0
    assert ours_q[63].item() == pytest.approx(base(1e6, 63), rel=1e-6)        # ~1.2e-6
    assert ours_q[20].item() == pytest.approx(1e6 ** (-40 / 128), rel=1e-6)   # ~1.33e-2
    assert ours_l[0].item() == 1.0                                           # kept
    assert ours_l[10].item() == pytest.approx(500000.0 ** (-20 / 128), rel=1e-6)  # kept
    assert ours_l[63].item() == pytest.approx(500000.0 ** (-126 / 128) / 8, rel=1e-6)
    assert ours_l[40].item() == pytest.approx(500000.0 ** (-80 / 128) / 8, rel=1e-6)
    for i in range(29, 35):        # the band between: wavelengths 2048..8192
        f = base(500000.0, i)
        wavelen = 2 * math.pi / f
        assert 2048 < wavelen < 8192
        s = (8192 / wavelen - 1) / (4 - 1)
        assert ours_l[i].item() == pytest.approx((1 - s) * f / 8 + s * f, rel=1e-5), i


def test_generate_stops_at_eos_and_excludes_it(ckpts, tok):
    m = load_model(ckpts["llama_gqa_untied"])
    ids = _prompt(tok, 20)
    free = m.generate(ids, max_new_tokens=16, stop_at_eos=False)
    eos = free[5]
    cut = m.generate(ids, max_new_tokens=16, eos_token_ids=[eos])
    assert cut == free[:free.index(eos)]
    assert eos not in cut


def test_eos_ids_from_config_generation_config_and_tokenizer(tmp_path, tok):
    p = make_model(str(tmp_path / "m"), "llama", tokenizer=tok)
    gen = json.load(open(os.path.join(p, "generation_config.json")))
    gen["eos_token_id"] = [2, 7]
    json.dump(gen, open(os.path.join(p, "generation_config.json"), "w"))
    m = load_model(p)
    assert set(m.eos_token_ids) == {2, 7, tok.eos_token_id}


def test_chunked_prefill_equals_one_shot(ckpts, tok):
    m = load_model(ckpts["llama3_rope"])
    ids = torch.tensor(_prompt(tok, 61))
    full = m.score(ids)
    m.cache.reset()
    parts = [m.forward(c, start) for c, start in
             ((ids[:20], 0), (ids[20:21], 20), (ids[21:], 21))]
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=0)
    assert m.cache.length == 61


def test_truncate_and_refeed_gives_same_logits(ckpts, tok):
    m = load_model(ckpts["qwen2_bias_tied"])
    ids = torch.tensor(_prompt(tok, 50))
    full = m.score(ids)
    other = torch.tensor(_prompt(tok, 13))
    m.forward(other, 50)              # something else written after position 50
    m.truncate(30)                        # roll back to position 30 (O(1))
    assert m.cache.length == 30
    again = m.forward(ids[30:], 30)
    torch.testing.assert_close(again, full[30:], atol=1e-5, rtol=0)


def test_final_hidden_states_on_request(ckpts, tok):
    m = load_model(ckpts["llama_gqa_untied"])
    ids = torch.tensor(_prompt(tok, 9))
    logits = m.score(ids)
    m.cache.reset()
    h = m.forward(ids, 0, return_hidden=True)                    # [T, d]
    assert h.shape == (9, 64)
    torch.testing.assert_close(h @ m.weights["lm_head"].T, logits, atol=1e-5, rtol=0)


def test_sharded_checkpoint(tmp_path, tok):
    p = make_model(str(tmp_path / "sharded"), "llama", tokenizer=tok, init_scale=5.0,
                   max_shard_size="40KB")
    assert os.path.isfile(os.path.join(p, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(p) if f.endswith(".safetensors")]) > 2
    m, hf = load_model(p), _hf(p)
    ids = _prompt(tok, 30)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(m.score(ids), ref, atol=1e-4, rtol=0)


def _hf_in(path, dtype):
    """transformers in `dtype`, SDPA attention (its default; the eager path's softmax
    rounds differently in bf16: 0.037 / 0.054 max abs logit difference measured)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                attn_implementation="sdpa").eval()


def test_bf16_checkpoint_as_fp32_and_bf16(tmp_path, tok):
    p = make_model(str(tmp_path / "bf16"), "llama", tokenizer=tok, init_scale=5.0,
                   dtype=torch.bfloat16)
    m32 = load_model(p, dtype=torch.float32)
    m16 = load_model(p)                                  # keeps the checkpoint's bf16
    assert m16.dtype == torch.bfloat16
    assert m16.weights["layers.0.qkv"].dtype == torch.bfloat16
    hf = _hf(p)                                          # bf16 weights upcast: exact in fp32
    ids = _prompt(tok, 150)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        ref16 = _hf_in(p, torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(m32.score(ids), ref, atol=1e-4, rtol=0)
    l16 = m16.score(ids)
    assert l16.dtype == torch.float32
    # Our bf16 forward rounds exactly where transformers' does (RMSNorm in fp32 then cast,
    # RoPE tables in fp32 cast to bf16, fp32 softmax): measured max |ours - transformers|
    # = 0.0 in bf16 on 40 and 150 tokens (torch 2.13 CPU, transformers 5.24), while a
    # rounding step moved shows up at bf16 precision (RMSNorm without its fp32 upcast: 0.077).
    torch.testing.assert_close(l16, ref16, atol=0, rtol=0)
    # and bf16 vs the fp32 run: bf16 precision (measured max |diff| 0.048, max |logit| 4.15)
    assert (l16 - ref).abs().max() < 0.05 * ref.abs().max()
    assert (l16.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_fp16_load(tmp_path, tok):
    p = make_model(str(tmp_path / "fp16src"), "qwen2", tokenizer=tok, init_scale=5.0)
    m = load_model(p, dtype="float16")
    assert m.weights["embed"].dtype == torch.float16
    ids = _prompt(tok, 150)
    out = m.score(ids)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with torch.no_grad():
        ref16 = _hf_in(p, torch.float16)(torch.tensor([ids])).logits[0].float()
        ref32 = _hf(p)(torch.tensor([ids])).logits[0]
    assert ref16.abs().max() > 1.0
    # measured max |ours - transformers| in fp16 = 0.0 on 10, 40 and 150 tokens (max |logit|
    # 3.4-4.0; with the eager attention 4.9e-4): the same roundings, so exact
    torch.testing.assert_close(out, ref16, atol=0, rtol=0)
    # fp16 vs fp32: measured 0.0058-0.0085 max abs on these lengths
    assert (out - ref32).abs().max() < 0.03


def test_tokenizer_and_chat_template(ckpts):
    m = load_model(ckpts["llama_gqa_untied"])
    from wsd_engine.tokenization import apply_chat_template
    ids = apply_chat_template(m.tokenizer, [{"role": "user", "content": "Hello!"}])
    assert ids[0] == m.tokenizer.bos_token_id
    text = m.tokenizer.decode(ids)
    assert "<|user|>" in text and text.endswith("<|assistant|>\n")
    new = m.generate(ids, max_new_tokens=5, stop_at_eos=False)
    assert len(new) == 5
