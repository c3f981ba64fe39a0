"""Our forward against Hugging Face transformers on tiny random checkpoints (fp32)."""
import json
import os

import pytest
import torch

from wsd_engine import load_model
from wsd_engine.synthetic import make_model, make_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "llama_gqa_untied": ("llama", {}),
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", dict(rope_scaling=LLAMA3_ROPE)),
    "llama_linear_rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama_head_dim": ("llama", dict(head_dim=32)),   # explicit head_dim != hidden / heads
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=512)),
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(320)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_model(str(root / name), fam, seed=i, tokenizer=tok, init_scale=5.0, **kw)
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


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_bias_tied", "mistral", "llama3_rope"])
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
    parts = [m.score_chunk(c, start) for c, start in
             ((ids[:20], 0), (ids[20:21], 20), (ids[21:], 21))]
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=0)
    assert m.cache.length == 61


def test_truncate_and_refeed_gives_same_logits(ckpts, tok):
    m = load_model(ckpts["qwen2_bias_tied"])
    ids = torch.tensor(_prompt(tok, 50))
    full = m.score(ids)
    other = torch.tensor(_prompt(tok, 13))
    m.score_chunk(other, 50)              # something else written after position 50
    m.truncate(30)                        # roll back to position 30 (O(1))
    assert m.cache.length == 30
    again = m.score_chunk(ids[30:], 30)
    torch.testing.assert_close(again, full[30:], atol=1e-5, rtol=0)


def test_final_hidden_states_on_request(ckpts, tok):
    m = load_model(ckpts["llama_gqa_untied"])
    ids = torch.tensor(_prompt(tok, 9))
    logits = m.score(ids)
    m.cache.reset()
    h = m.score_chunk(ids, 0, return_hidden=True)                    # [T, d]
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


def test_bf16_checkpoint_as_fp32_and_bf16(tmp_path, tok):
    p = make_model(str(tmp_path / "bf16"), "llama", tokenizer=tok, init_scale=5.0,
                   dtype=torch.bfloat16)
    m32 = load_model(p, dtype=torch.float32)
    m16 = load_model(p)                                  # keeps the checkpoint's bf16
    assert m16.dtype == torch.bfloat16
    assert m16.weights["layers.0.qkv"].dtype == torch.bfloat16
    hf = _hf(p)                                          # bf16 weights upcast: exact in fp32
    ids = _prompt(tok, 40)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(m32.score(ids), ref, atol=1e-4, rtol=0)
    l16 = m16.score(ids)
    assert l16.dtype == torch.float32
    # bf16 activations: agree with the fp32 run to bf16 precision, same argmax mostly
    assert (l16 - ref).abs().max() < 0.1 * ref.abs().max()
    assert (l16.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_fp16_load(tmp_path, tok):
    p = make_model(str(tmp_path / "fp16src"), "qwen2", tokenizer=tok)
    m = load_model(p, dtype="float16")
    assert m.weights["embed"].dtype == torch.float16
    assert torch.isfinite(m.score(_prompt(tok, 10))).all()


def test_tokenizer_and_chat_template(ckpts):
    m = load_model(ckpts["llama_gqa_untied"])
    from wsd_engine.tokenization import apply_chat_template
    ids = apply_chat_template(m.tokenizer, [{"role": "user", "content": "Hello!"}])
    assert ids[0] == m.tokenizer.bos_token_id
    text = m.tokenizer.decode(ids)
    assert "<|user|>" in text and text.endswith("<|assistant|>\n")
    new = m.generate(ids, max_new_tokens=5, stop_at_eos=False)
    assert len(new) == 5
