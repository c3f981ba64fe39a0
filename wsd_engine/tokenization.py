"""Tokenizers and prompt templates.

Tokenizers load through transformers' AutoTokenizer with `local_files_only=True` and
`trust_remote_code=False` (no download, no code from the folder), from a private copy of
the folder's tokenizer files: each is checked to be inside the checkpoint folder first, so
nothing outside it can be read, whatever its configs name.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from .config import describe_arg, read_json
from .errors import RequestError, TokenizerError
from .paths import inside

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# every file AutoTokenizer may read from a local folder (config.json names the model type)
_TOKENIZER_READS = _TOKENIZER_FILES + (
    "special_tokens_map.json", "added_tokens.json", "merges.txt", "vocab.txt", "spm.model",
    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "config.json")
_EXTRA_TEMPLATES = "additional_chat_templates"     # a folder of named *.jinja templates
_MAX_TOKENIZER_FILE = 128 << 20                     # the largest real ones are ~35 MB
# small JSON settings files: transformers copies their contents several times over (a 60 MB
# tokenizer_config.json of "{}"s cost 7 GB), so they get the config files' bounds
_SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.json", "config.json")
ROLES = ("system", "user", "assistant")


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def _copy_checked(folder: str, name: str, dst: str) -> None:
    real = inside(folder, name, TokenizerError)
    if not os.path.isfile(real):
        return
    if name in _SETTINGS_FILES:
        read_json(real, TokenizerError)       # size and structure bounded, valid JSON
    size = os.path.getsize(real)
    if size > _MAX_TOKENIZER_FILE:
        raise TokenizerError(f"{os.path.join(folder, name)!r} is {size >> 20} MiB, far larger "
                             "than any real tokenizer file; the checkpoint folder is broken")
    shutil.copyfile(real, os.path.join(dst, name))


def load_tokenizer(path: str):
    path = os.fspath(path)
    if not has_tokenizer(path):
        raise TokenizerError(
            f"no tokenizer files in {path!r} (looked for {', '.join(_TOKENIZER_FILES)}); copy the "
            "tokenizer of the checkpoint into the folder, or pass token ids instead of text")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory(prefix="wsd_engine_tok_") as tmp:
        for name in _TOKENIZER_READS:
            if os.path.lexists(os.path.join(path, name)):
                _copy_checked(path, name, tmp)
        extra = os.path.join(path, _EXTRA_TEMPLATES)
        if os.path.lexists(extra):
            real = inside(path, _EXTRA_TEMPLATES, TokenizerError)
            if os.path.isdir(real):
                os.mkdir(os.path.join(tmp, _EXTRA_TEMPLATES))
                for name in sorted(os.listdir(real))[:256]:
                    if name.endswith(".jinja"):
                        _copy_checked(real, name, os.path.join(tmp, _EXTRA_TEMPLATES))
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True,
                                                 trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise TokenizerError(f"cannot load the tokenizer in {path!r}: "
                                 f"{_shorten(str(e))}") from e


def _shorten(msg: str, n: int = 300) -> str:
    """A library's message about an untrusted file may quote megabytes of it."""
    return msg if len(msg) <= n else msg[:n] + f"… ({len(msg)} characters)"


def encode(tok, text: str) -> list[int]:
    """tok.encode without special tokens; a tokenizer that fails on it (its files are
    inconsistent, e.g. WordPiece without an [UNK] token) is a TokenizerError."""
    try:
        return tok.encode(text, add_special_tokens=False)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise TokenizerError(f"the tokenizer failed on this text: {_shorten(str(e))}; its "
                             "files are inconsistent (fix or replace the tokenizer)") from e


def tokenizer_eos_ids(tok) -> list[int]:
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def check_text(text: str, what: str) -> None:
    """Text must be valid Unicode (a lone surrogate cannot be encoded as UTF-8, and the
    tokenizers would fail on it deep inside)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"{what} is not valid Unicode text: a lone surrogate {text[e.start]!r} at "
            f"character {e.start} (typically bytes decoded with errors='surrogateescape'); "
            "decode the input with errors='replace' or fix its encoding") from None


def normalize_messages(prompt) -> list[dict]:
    """A prompt string or a list of {"role", "content"} dicts -> validated messages."""
    if isinstance(prompt, str):
        check_text(prompt, "the prompt")
        if not prompt.strip():
            raise RequestError("the prompt is empty; pass a non-empty string or messages")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RequestError("a prompt must be a non-empty string or a non-empty list of "
                           "{'role': ..., 'content': ...} messages, got " + describe_arg(prompt))
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RequestError(f"message {i} must be a dict with 'role' and 'content', got "
                               + describe_arg(m))
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise RequestError(f"message {i} has unknown role {describe_arg(m['role'])}; use one "
                               f"of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RequestError(f"message {i}: content must be a string, got "
                               + describe_arg(m["content"]))
        check_text(m["content"], f"message {i}'s content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out):
        raise RequestError("all messages are empty; give at least one non-empty message")
    return out


def is_prompt_list(obj) -> bool:
    """True for a list of prompts (each a string or a list of message dicts), False for
    one prompt (a string, or a list of message dicts)."""
    if not isinstance(obj, (list, tuple)) or not obj:
        return False
    if all(isinstance(m, dict) for m in obj):
        return False                                   # one conversation
    return all(isinstance(p, str) or (isinstance(p, (list, tuple)) and p
                                       and all(isinstance(m, dict) for m in p))
               for p in obj)


def apply_chat_template(tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The tokenizer's own chat template -> token ids (special tokens as the template has
    them). The template comes from the checkpoint: it is rendered sandboxed, bounded in
    time and size, and any failure is a TokenizerError."""
    if not getattr(tok, "chat_template", None):
        raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template'); an aligned chat model is expected as the pilot")
    text = render_chat_template(tok, messages, add_generation_prompt)
    ids = encode(tok, text)
    if not ids:
        raise TokenizerError("the chat template rendered these messages as empty text; the "
                             "checkpoint's chat template is broken (it must write the messages)")
    return ids


def render_chat_template(tok, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat template's text for `messages` (sandboxed, bounded; TokenizerError)."""
    from .templates import render_for_tokenizer
    # the memory bound is process-wide (RSS): 1 GiB leaves room for other threads'
    # allocations during a render; the size checks stop single huge results long before
    return render_for_tokenizer(tok, messages, add_generation_prompt=add_generation_prompt,
                                max_memory=1 << 30)


def max_token_chars(tok) -> int:
    """An upper bound on the characters one token can stand for: the longest entry of the
    vocabulary (byte-level and SentencePiece entries are at least as long as their text)."""
    return max((len(t) for t in tok.get_vocab()), default=1)


def check_ids_in_vocab(ids: list[int], vocab_size: int, who: str) -> None:
    """Token ids from a tokenizer must exist in the model's embedding."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise TokenizerError(
            f"the {who} tokenizer produced token id {bad}, but the {who} model's vocabulary "
            f"has {vocab_size} entries: the tokenizer files do not belong to this checkpoint "
            "(copy the checkpoint's own tokenizer into its folder)")


# ---- base prompt (the paper's template) and stop strings --------------------------
DEFAULT_STOP = ("[User]", "[System]", "[Assistant]")
_ROLE_HEADERS = {"system": "\n\n[System]\n", "user": "\n\n[User]\n", "assistant": "\n\n[Assistant]\n"}


def paper_base_template(messages: list[dict]) -> str:
    """`[System]` / `[User]` / `[Assistant]` blocks, then the `[Assistant]` header."""
    return "".join(_ROLE_HEADERS[m["role"]] + m["content"].strip() for m in messages) \
        + _ROLE_HEADERS["assistant"]


def render_base_prompt(tok, messages: list[dict], template=None, add_bos: bool = True) -> list[int]:
    """Base prompt ids: bos (if the tokenizer has one) + the rendered template.

    template: None (the paper's), a callable(messages) -> str, or a format string with
    `{prompt}` (the last user message) and optionally `{system}` (the system message, or "").
    """
    if template is None:
        text = paper_base_template(messages)
    elif callable(template):
        text = template(messages)
        if not isinstance(text, str):
            raise RequestError("base_template callable must return a string")
    elif isinstance(template, str):
        users = [m["content"] for m in messages if m["role"] == "user"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        try:
            text = template.format(prompt=(users[-1] if users else "").strip(),
                                   system=system.strip())
        except (KeyError, IndexError, AttributeError) as e:
            raise RequestError(f"base_template format string has an unknown field {e}; "
                               "use {prompt} and {system}") from None
        except ValueError as e:
            raise RequestError(f"base_template is not a valid format string: {e}") from None
    else:
        raise RequestError("base_template must be None, a format string or a callable")
    check_text(text, "the base prompt (base_template's output)")
    ids = encode(tok, text)
    bos = getattr(tok, "bos_token_id", None)
    if add_bos and bos is not None:
        ids = [bos] + ids
    return ids


def find_stop(text: str, stops, start: int = 0) -> int:
    """Index of the earliest stop string in text[start:] (absolute), or -1."""
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def decode(tok, ids) -> str:
    """Text of ids, special tokens skipped, no clean-up: for a fast tokenizer the Rust
    decoder straight away (what transformers' decode calls, without its per-call Python
    conversions: they were half the host time of a batched step in text mode)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode(ids if isinstance(ids, list) else list(ids),
                              skip_special_tokens=True)
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def finish_text(tok, draft_ids: list[int], cont_ids: list[int], stops) -> tuple[str, list[int], bool]:
    """The answer text from kept draft + continuation, cut before the first stop string
    found in the continuation's text (trailing whitespace before it removed).

    Returns (text, token_ids, stopped); when stopped, token_ids ends at the shortest
    continuation prefix whose text reaches the cut. Engine and reference share this."""
    ids = draft_ids + cont_ids
    full = decode(tok, ids)
    if not stops or not cont_ids:
        return full, ids, False
    draft_len = len(decode(tok, draft_ids)) if draft_ids else 0
    pos = find_stop(full, stops, draft_len)
    if pos == -1:
        return full, ids, False
    text = full[:pos].rstrip()
    return text, ids[:_shortest_prefix(tok, ids, len(draft_ids), len(text))], True


def _shortest_prefix(tok, ids: list[int], lo: int, n_chars: int) -> int:
    """The smallest j >= lo with len(decode(ids[:j])) >= n_chars (len(ids) if none).

    The text length of a prefix grows with it, so this is a binary search (log n decodes
    instead of one per token: a 8,000-token answer cut at a stop took 5.5 s linearly);
    the walk back afterwards keeps the answer exact should a decoder ever shorten a text
    locally (an incomplete character at the end)."""
    def reaches(j: int) -> bool:
        return len(decode(tok, ids[:j])) >= n_chars
    hi = len(ids)
    if not reaches(hi):
        return hi
    a, b = lo, hi                       # reaches(b) holds
    while a < b:
        mid = (a + b) // 2
        if reaches(mid):
            b = mid
        else:
            a = mid + 1
    while a > lo and reaches(a - 1):
        a -= 1
    return a


class IncrementalDetokenizer:
    """Text of a growing id list, piece by piece, never emitting a half UTF-8 character
    (the prefix/read-offset method): amortised O(new tokens) per call."""

    def __init__(self, tok):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def push(self, new_ids) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix = decode(self.tok, self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.tok, self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            piece = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += piece
            return piece
        return ""
