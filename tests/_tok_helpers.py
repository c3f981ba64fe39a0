"""Tiny byte-level BPE tokenizers for tests, trained in milliseconds on an in-memory corpus.

Different vocab sizes give different merges, i.e. a "different tokenizers" pilot/base pair.
"""
from __future__ import annotations

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Weak-to-strong decoding: a small aligned model writes the beginning of the answer.",
    "Then a strong base model checks it, token by token, and takes over when confident.",
    "Hello! How can I help you today? Here's a short answer, with details.",
    "Numbers like 1, 2, 3, 42 and 2025 appear; so do lists:\n- one\n- two\n",
    "def add(a, b):\n    return a + b\n\n# done",
    "Caf\u00e9, na\u00efve r\u00e9sum\u00e9, \u00fcber Stra\u00dfe; \u6f22\u5b57\u3068\u304b\u306a \U0001f600\U0001f44d.",
    "\"Quoted\" text (in parentheses) [and brackets] {braces} -- dashes... ellipses?",
    "[System]\n[User]\n[Assistant]\n",
] * 4

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def make_bpe_tokenizer(vocab_size: int, corpus=None, with_chat_template: bool = True,
                       split_words: bool = True):
    """A PreTrainedTokenizerFast (byte-level BPE, all 256 bytes in the vocab) with bos '<s>',
    eos '</s>', pad '<pad>' and, optionally, a small chat template for system/user/assistant.

    split_words=False drops the GPT-2 word-splitting regex, so merges may span spaces
    (like a sentencepiece model without whitespace splitting): a harder handoff target."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(corpus) if corpus is not None else CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    if with_chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast
