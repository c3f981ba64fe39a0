"""Tokenizers and prompt templates.

Tokenizers load from the checkpoint folder through transformers' AutoTokenizer with
`local_files_only=True` and `trust_remote_code=False`: no download, no code from the folder.
"""
from __future__ import annotations

import os

from .errors import RequestError, TokenizerError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
ROLES = ("system", "user", "assistant")


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def load_tokenizer(path: str):
    path = os.fspath(path)
    if not has_tokenizer(path):
        raise TokenizerError(
            f"no tokenizer files in {path!r} (looked for {', '.join(_TOKENIZER_FILES)}); copy the "
            "tokenizer of the checkpoint into the folder, or pass token ids instead of text")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise TokenizerError(f"cannot load the tokenizer in {path!r}: {e}") from e


def tokenizer_eos_ids(tok) -> list[int]:
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def normalize_messages(prompt) -> list[dict]:
    """A prompt string or a list of {"role", "content"} dicts -> validated messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RequestError("the prompt is empty; pass a non-empty string or messages")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RequestError("a prompt must be a non-empty string or a non-empty list of "
                           "{'role': ..., 'content': ...} messages")
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RequestError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise RequestError(f"message {i} has unknown role {m['role']!r}; use one of "
                               f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RequestError(f"message {i}: content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out):
        raise RequestError("all messages are empty; give at least one non-empty message")
    return out


def apply_chat_template(tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The tokenizer's own chat template -> token ids (special tokens as the template has them)."""
    if not getattr(tok, "chat_template", None):
        raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template'); an aligned chat model is expected as the pilot")
    text = tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)
    return tok.encode(text, add_special_tokens=False)
