"""Tiny synthetic checkpoints made locally in milliseconds: random Llama / Qwen2 / Mistral
models saved with transformers' `save_pretrained(safe_serialization=True)`, and tiny
byte-level BPE tokenizers trained with `tokenizers`. Used by the tests, the demo and the
CPU smoke benchmarks; nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Weak-to-strong decoding lets a small aligned model start the answer.",
    "A strong base model continues once it is confident about the beginning.",
    "Alignment is hard mostly at the start of a response.",
    "Hello! How can I help you today? Here is a short answer with some details.",
    "Numbers like 1, 2, 3 and 42 appear in text; so do questions, lists and code.",
    "def add(a, b):\n    return a + b\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u6f22\u5b57 \U0001f600 \u00fcber stra\u00dfe.",
    "[System]\n[User]\n[Assistant]\n",
] * 4

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_FAMILIES = ("llama", "qwen2", "mistral", "gemma2")


def make_tokenizer(vocab_size: int = 320, corpus=None, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE PreTrainedTokenizerFast with bos '<s>', eos '</s>', pad '<pad>'.

    Different vocab sizes give different merges (a "different tokenizer" pair)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


@contextlib.contextmanager
def _quiet_progress():
    """transformers' progress bars off for the duration (restored after)."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def tiny_config(family: str = "llama", vocab_size: int = 320, **overrides):
    """A transformers config for a 2-layer, 64-wide model of the given family; keyword
    `overrides` replace any field (e.g. `max_position_embeddings=4096`)."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {_FAMILIES}")
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "gemma2":   # its own head size and scale, a short window, tied embeddings
        kw.update(head_dim=24, query_pre_attn_scalar=20, sliding_window=16,
                  tie_word_embeddings=True, attn_implementation="eager")
    kw.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig,
           "gemma2": Gemma2Config}[family]
    return cls(**kw)


def make_model(out_dir: str, family: str = "llama", seed: int = 0, tokenizer=None,
               dtype: torch.dtype = torch.float32, max_shard_size=None, init_scale: float = 1.0,
               transform=None, **overrides) -> str:
    """Save a random tiny model (+ tokenizer) to out_dir; returns out_dir.

    init_scale multiplies every weight matrix's init (random models at std 0.02 are nearly
    uniform; larger scales give peakier, more interesting distributions). `transform(model)`
    may edit the torch model before it is saved (e.g. sharpen the lm_head).
    """
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(family, **({"vocab_size": len(tokenizer)} if tokenizer is not None else {}),
                      **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(init_scale)
            elif "norm" in name:   # norms start at 1: make them random too
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        if transform is not None:
            transform(model)
    model = model.to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    with _quiet_progress():          # no "Writing model shards" bar for a tiny model
        model.save_pretrained(out_dir, safe_serialization=True, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def bigram_transform(damp: float, sharpen: float):
    """A `make_model` transform: attention outputs damped and the lm_head sharpened, a
    nearly bigram model with clear argmax winners (so batched or chunked rounding does not
    flip tokens), its EOS logit ~0 (drafts and answers run to their caps unless a test names
    another EOS id in generation_config.json)."""
    def fn(model):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(damp)
            model.lm_head.weight.mul_(sharpen)
            model.lm_head.weight[model.config.eos_token_id].zero_()
    return fn


def make_wsd_pair(root: str, perturb: float = 0.5, sharpen: float = 100.0, damp: float = 0.3,
                  seed: int = 0, tokenizer=None, pilot_tokenizer=None, family: str = "llama",
                  readable: bool = False, **overrides) -> tuple[str, str]:
    """A (pilot_dir, base_dir) pair on which the WSD switch really fires.

    The pilot and base see different prompts (chat template vs the [User] template), so
    two copies of one random model would still disagree. Damping every layer's attention
    output (o_proj x damp) and sharpening the lm_head (x sharpen) makes the model nearly a
    bigram model, whose next token depends mostly on the current one; the pilot is that
    base with Gaussian noise of relative size `perturb` added to its lm_head, so `perturb`
    moves the switch from k = w (small) to "never" (large). With `pilot_tokenizer` (a
    different tokenizer) the pilot is an independent random model of that vocabulary.
    `readable` zeroes the lm_head rows of tokens that are not letters, spaces or simple
    punctuation, so the random text at least prints cleanly (the demo uses it).
    """
    tok = tokenizer or make_tokenizer(320)
    ok = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'"
    unreadable = [i for i in range(len(tok))
                  if not (s := tok.decode([i])).strip() or any(ch not in ok for ch in s)]

    def sharpen_fn(noise_seed=None):
        def fn(model):
            bigram_transform(damp, sharpen)(model)
            with torch.no_grad():
                if noise_seed is not None:
                    g = torch.Generator().manual_seed(noise_seed)
                    w = model.lm_head.weight
                    w.add_(perturb * w.std() * torch.randn(w.shape, generator=g))
                if readable and model.config.vocab_size == len(tok):
                    model.lm_head.weight[unreadable] = 0.0
        return fn

    base = make_model(os.path.join(root, "base"), family, seed=seed, tokenizer=tok,
                      init_scale=5.0, transform=sharpen_fn(), **overrides)
    if pilot_tokenizer is None:
        pilot = make_model(os.path.join(root, "pilot"), family, seed=seed, tokenizer=tok,
                           init_scale=5.0, transform=sharpen_fn(seed + 1000), **overrides)
    else:
        pilot = make_model(os.path.join(root, "pilot"), family, seed=seed + 1,
                           tokenizer=pilot_tokenizer, init_scale=5.0,
                           transform=sharpen_fn(seed + 1000), **overrides)
    return pilot, base


def without_tokenizer(src: str, dst: str) -> str:
    """A copy of checkpoint folder `src` in `dst` with the weights and configs only (no
    tokenizer files): a token-level model (`WSD.generate_ids`)."""
    import shutil
    os.makedirs(dst, exist_ok=True)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        if os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)
    return dst


# The demo pair (`wsd-engine demo`): tuned so the switch visibly fires with the paper's
# defaults, and with room for them: the KV cache (max_seq_len, default
# min(max_position_embeddings, 4096)) must hold prompt + draft_max_tokens (512) for the
# pilot and prompt + max_new_tokens (2048) for the base.
DEMO_PAIR = dict(perturb=0.15, damp=0.02, sharpen=100.0, seed=2, readable=True,
                 max_position_embeddings=4096)


def make_demo_pair(root: str) -> tuple[str, str]:
    """The built-in demo pair in root/pilot and root/base (tiny random 2-layer Llama
    models with a 320-token tokenizer; well under a second); returns (pilot, base)."""
    return make_wsd_pair(root, **DEMO_PAIR)
