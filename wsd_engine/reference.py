"""The slow oracle: the paper's three offline stages, on Hugging Face transformers models.

1. the pilot drafts the whole answer greedily (up to draft_max_tokens, to its EOS);
2. the draft is mapped to base ids (unchanged for one tokenizer; else the stripped draft
   text re-encoded in one go), and ONE base forward over prompt + draft gives every p_i;
   the rule picks k;
3. the base `generate`s the rest from prompt + t_1..t_k (greedy), cut at EOS or a stop.

It shares only the prompt templates, the rule (`switch_index_logp`) and the final text
cut with the engine; every model computation is transformers'. Greedy only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .handoff import tokenizers_identical
from .switch import switch_index_logp
from .tokenization import (apply_chat_template, decode, finish_text, load_tokenizer,
                           normalize_messages, render_base_prompt, tokenizer_eos_ids)


@dataclass
class ReferenceResult:
    text: str
    token_ids: list[int]
    switch_index: int
    switched: bool
    finish_reason: str
    draft_ids: list[int]        # the full pilot draft (pilot ids, no EOS)
    draft_base_ids: list[int]   # the full draft in base ids
    logp: list[float]           # log p_i of each draft base token


def _eos_ids(path: str, model, tok) -> set[int]:
    ids = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        ids.update([e] if isinstance(e, int) else (e or []))
    ids.update(tokenizer_eos_ids(tok))
    return ids


class ReferenceWSD:
    def __init__(self, pilot_path: str, base_path: str, base_template=None):
        from transformers import AutoModelForCausalLM
        kw = dict(dtype=torch.float32, local_files_only=True, trust_remote_code=False)
        self.pilot = AutoModelForCausalLM.from_pretrained(os.fspath(pilot_path), **kw).eval()
        self.base = AutoModelForCausalLM.from_pretrained(os.fspath(base_path), **kw).eval()
        self.pilot_tok = load_tokenizer(pilot_path)
        self.base_tok = load_tokenizer(base_path)
        self.identity = tokenizers_identical(self.pilot_tok, self.base_tok)
        self.pilot_eos = _eos_ids(pilot_path, self.pilot, self.pilot_tok)
        self.base_eos = _eos_ids(base_path, self.base, self.base_tok)
        self.base_template = base_template

    @staticmethod
    def _greedy(model, ids: list[int], max_new: int, eos: set[int]) -> tuple[list[int], bool]:
        """transformers greedy generate; returns (new ids without EOS, ended by EOS)."""
        if max_new <= 0:
            return [], False
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0],
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        new = out[0, len(ids):].tolist()
        for i, t in enumerate(new):
            if t in eos:
                return new[:i], True
        return new, False

    def generate(self, prompt, window=6, threshold=0.8, draft_max_tokens=512,
                 max_new_tokens=2048, stop=("[User]", "[System]", "[Assistant]")) -> ReferenceResult:
        messages = normalize_messages(prompt)
        p_ids = apply_chat_template(self.pilot_tok, messages)
        b_ids = render_base_prompt(self.base_tok, messages, self.base_template)
        # stage 1: the full draft
        draft, _ = self._greedy(self.pilot, p_ids, draft_max_tokens, self.pilot_eos)
        if self.identity:
            draft_b = list(draft)
        else:
            text = decode(self.pilot_tok, draft).strip()
            draft_b = self.base_tok.encode(text, add_special_tokens=False) if text else []
        draft_b = draft_b[:max_new_tokens]
        # stage 2: one base forward over prompt + draft, then the rule
        if draft_b:
            with torch.no_grad():
                logits = self.base(torch.tensor([b_ids + draft_b])).logits[0].float()
            rows = logits[len(b_ids) - 1:len(b_ids) - 1 + len(draft_b)]          # [n, V]
            logp = torch.log_softmax(rows, -1).gather(1, torch.tensor(draft_b)[:, None])[:, 0]
            k, fired = switch_index_logp(logp, window, threshold)
        else:
            logp, k, fired = torch.zeros(0), 0, False
        kept = draft_b[:k]
        # stage 3: the base continues
        cont, by_eos = self._greedy(self.base, b_ids + kept, max_new_tokens - k, self.base_eos)
        text, token_ids, stopped = finish_text(self.base_tok, kept, cont, tuple(stop or ()))
        finish = "stop" if stopped else ("eos" if by_eos else "length")
        return ReferenceResult(text=text, token_ids=token_ids, switch_index=k, switched=fired,
                               finish_reason=finish, draft_ids=draft, draft_base_ids=draft_b,
                               logp=logp.tolist())
