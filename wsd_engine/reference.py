"""The slow oracle: the paper's three offline stages, on Hugging Face transformers models.

1. the pilot drafts the whole answer greedily (up to draft_max_tokens, to its EOS);
2. the draft is mapped to base ids (unchanged for one tokenizer; else the stripped draft
   text re-encoded in one go), and ONE base forward over prompt + draft gives every p_i;
   the rule picks k;
3. the base `generate`s the rest from prompt + t_1..t_k (greedy), cut at EOS or a stop.

It shares only the prompt templates, the rule (`switch_index_logp`) and the final text
cut with the engine; every model computation is transformers'. Greedy only.

`generate` takes a text prompt (checkpoints with tokenizers). `generate_ids` is the same
pipeline on prompt token ids (identical tokenizers assumed), for models without
tokenizers, e.g. random weights at real shapes built on a GPU (`from_models`): the
benchmarks time it on the same card as the engine. It also takes the benchmark-only
`force_switch` / `ignore_eos` with the engine's meaning.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

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
    timings: dict = field(default_factory=dict)   # seconds: draft, score, continuation, total


def _eos_ids(model, tok) -> set[int]:
    ids = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        ids.update([e] if isinstance(e, int) else (e or []))
    if tok is not None:
        ids.update(tokenizer_eos_ids(tok))
    return ids


class ReferenceWSD:
    def __init__(self, pilot_path: str, base_path: str, base_template=None, device="cpu",
                 dtype=torch.float32):
        """Checkpoint folders (safetensors + tokenizer), loaded by transformers on `device`
        in `dtype` (fp32 on CPU is the oracle the tests compare the engine with)."""
        from transformers import AutoModelForCausalLM
        kw = dict(dtype=dtype, local_files_only=True, trust_remote_code=False)
        pilot = AutoModelForCausalLM.from_pretrained(os.fspath(pilot_path), **kw).to(device).eval()
        base = AutoModelForCausalLM.from_pretrained(os.fspath(base_path), **kw).to(device).eval()
        pilot_tok, base_tok = load_tokenizer(pilot_path), load_tokenizer(base_path)
        self._setup(pilot, base, pilot_tok, base_tok, base_template)

    @classmethod
    def from_models(cls, pilot, base, pilot_tok=None, base_tok=None,
                    base_template=None) -> "ReferenceWSD":
        """transformers models already built (e.g. random weights at real shapes on a GPU).
        Without tokenizers only `generate_ids` works (one vocabulary assumed)."""
        if (pilot_tok is None) != (base_tok is None):
            raise ValueError("give both tokenizers or neither")
        self = cls.__new__(cls)
        self._setup(pilot.eval(), base.eval(), pilot_tok, base_tok, base_template)
        return self

    def _setup(self, pilot, base, pilot_tok, base_tok, base_template):
        self.pilot, self.base = pilot, base
        self.pilot_tok, self.base_tok = pilot_tok, base_tok
        self.identity = pilot_tok is None or tokenizers_identical(pilot_tok, base_tok)
        self.pilot_eos = _eos_ids(pilot, pilot_tok)
        self.base_eos = _eos_ids(base, base_tok)
        self.base_template = base_template

    @staticmethod
    def _greedy(model, ids: list[int], max_new: int, eos: set[int]) -> tuple[list[int], bool]:
        """transformers greedy generate; returns (new ids without EOS, ended by EOS). With
        no EOS ids it runs exactly max_new steps (EOS tokens are then ordinary tokens)."""
        if max_new <= 0:
            return [], False
        dev = next(model.parameters()).device
        gc = copy.deepcopy(model.generation_config)
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
        # no EOS: an id the model cannot produce (with None, generate() would put the ids
        # of the model's own generation config back and stop at them)
        gc.eos_token_id = sorted(eos) if eos else [model.config.vocab_size]
        gc.pad_token_id = sorted(eos)[0] if eos else 0
        gc.max_new_tokens, gc.min_new_tokens = max_new, None
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=dev), generation_config=gc,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                           device=dev))
        new = out[0, len(ids):].tolist()
        for i, t in enumerate(new):
            if t in eos:
                return new[:i], True
        return new, False

    def generate(self, prompt, window=6, threshold=0.8, draft_max_tokens=512,
                 max_new_tokens=2048, stop=("[User]", "[System]", "[Assistant]")) -> ReferenceResult:
        """A text prompt (str or messages) through the three stages; greedy."""
        if self.pilot_tok is None:
            raise ValueError("these models have no tokenizers: use generate_ids")
        messages = normalize_messages(prompt)
        p_ids = apply_chat_template(self.pilot_tok, messages)
        b_ids = render_base_prompt(self.base_tok, messages, self.base_template)
        return self._stages(p_ids, b_ids, window, threshold, draft_max_tokens, max_new_tokens,
                            tuple(stop or ()), None, False)

    def generate_ids(self, pilot_prompt_ids, base_prompt_ids, window=6, threshold=0.8,
                     draft_max_tokens=512, max_new_tokens=2048, force_switch=None,
                     ignore_eos=False) -> ReferenceResult:
        """The three stages on prompt token ids (the pilot's with its chat template
        applied, the base's), draft ids passed to the base unchanged. force_switch: keep
        exactly that many draft tokens instead of applying the rule (0 = never);
        ignore_eos: both models run to their caps. Text fields are empty without tokenizers."""
        if not self.identity:
            raise ValueError("generate_ids needs one tokenizer for both models")
        return self._stages(list(pilot_prompt_ids), list(base_prompt_ids), window, threshold,
                            draft_max_tokens, max_new_tokens, (), force_switch, ignore_eos)

    def _sync(self):
        dev = next(self.base.parameters()).device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    def _stages(self, p_ids, b_ids, window, threshold, draft_max_tokens, max_new_tokens, stop,
                force_switch, ignore_eos) -> ReferenceResult:
        t = {}
        t0 = t_start = self._sync()
        # stage 1: the full draft
        draft, _ = self._greedy(self.pilot, p_ids, draft_max_tokens,
                                set() if ignore_eos else self.pilot_eos)
        t["draft"] = (t1 := self._sync()) - t0
        if self.identity:
            draft_b = list(draft)
        else:
            text = decode(self.pilot_tok, draft).strip()
            draft_b = self.base_tok.encode(text, add_special_tokens=False) if text else []
        draft_b = draft_b[:max_new_tokens]
        # stage 2: one base forward over prompt + draft, then the rule
        if draft_b:
            dev = next(self.base.parameters()).device
            with torch.no_grad():
                logits = self.base(torch.tensor([b_ids + draft_b], device=dev)).logits[0].float()
            rows = logits[len(b_ids) - 1:len(b_ids) - 1 + len(draft_b)]          # [n, V]
            ids = torch.tensor(draft_b, device=dev)[:, None]
            logp = torch.log_softmax(rows, -1).gather(1, ids)[:, 0].cpu()
            k, fired = switch_index_logp(logp, window, threshold)
        else:
            logp, k, fired = torch.zeros(0), 0, False
        if force_switch is not None:   # benchmarks: the engine's forced switch point
            fired = 0 < force_switch <= len(draft_b)
            k = force_switch if fired else len(draft_b)
        kept = draft_b[:k]
        t["score"] = (t2 := self._sync()) - t1
        # stage 3: the base continues
        cont, by_eos = self._greedy(self.base, b_ids + kept, max_new_tokens - k,
                                    set() if ignore_eos else self.base_eos)
        t["continuation"] = (t3 := self._sync()) - t2
        t["total"] = t3 - t_start
        if self.base_tok is not None:
            text, token_ids, stopped = finish_text(self.base_tok, kept, cont, stop)
        else:
            text, token_ids, stopped = "", kept + cont, False
        finish = "stop" if stopped else ("eos" if by_eos else "length")
        return ReferenceResult(text=text, token_ids=token_ids, switch_index=k, switched=fired,
                               finish_reason=finish, draft_ids=draft, draft_base_ids=draft_b,
                               logp=logp.tolist(), timings=t)
