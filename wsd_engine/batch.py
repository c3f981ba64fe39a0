"""The device side of a WSD step over many requests: what the two models run for the
rows of a step, and the buffers that carry each row's model state between steps.

Each running request owns one cache slot in each model (the same index) and, at that
index, three rows of buffers allocated once, at construction (no per-request device
memory):
    pilot_logits [slots, V_pilot] fp32   the pilot's logits after its last fed token
    base_logits  [slots, V_base]  fp32   the base's logits after its last fed token
    hidden       [slots, S + 1, d]       the base's final hidden states over the draft:
                                         hidden[s, i] predicts draft token i + 1 (0: the
                                         prompt's last), kept for every scored token so a
                                         rollback or the switch needs no recomputation

A step launches, back to back with no host sync: `decode_blocks` (the pilot's drafting
chunks and the base's continuation blocks, one forward per model per token position),
then one read-back; `score_and_feed` (one base forward over every drafting row's new
draft tokens and every continuing row's last token, log p and the rule on the device),
then one read-back.
"""
from __future__ import annotations

import torch

from .memory import check_buffers
from .request import Request, ScoreJob
from .rows import to_device
from .runner import Model


class BatchRunner:
    def __init__(self, pilot: Model, base: Model, n_slots: int):
        self.pilot, self.base = pilot, base
        dev = base.device
        d, S1 = base.config.hidden_size, base.max_seq_len + 1
        need = (n_slots * S1 * d * base.dtype.itemsize
                + n_slots * (pilot.config.vocab_size + base.config.vocab_size) * 4)
        check_buffers("the engine's per-slot buffers (the base's hidden states over the "
                      f"draft: {n_slots} slots x {S1} x {d}; both models' last logits)", need,
                      dev, "load the models with a smaller max_batch_size or max_seq_len")
        self.pilot_logits = torch.zeros(n_slots, pilot.config.vocab_size, dtype=torch.float32,
                                        device=dev)
        self.base_logits = torch.zeros(n_slots, base.config.vocab_size, dtype=torch.float32,
                                       device=dev)
        self.rows_per_slot = base.max_seq_len + 1
        self.hidden = torch.zeros(n_slots * self.rows_per_slot, base.config.hidden_size,
                                  dtype=base.dtype, device=dev)       # [slots * (S+1), d]

    # ---- new rows ---------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, reqs: list[Request]) -> None:
        """Both prompts of newly admitted rows, one forward per model."""
        dev, slots = self.base.device, [r.slot for r in reqs]
        logits = self.pilot.prefill_rows([to_device(r.p_ids, dev) for r in reqs], slots)
        self.pilot_logits[to_device(slots, dev)] = logits                            # [B, V]
        h = self.base.prefill_rows([to_device(r.b_ids, dev) for r in reqs], slots, hidden=True)
        self.hidden[to_device([s * self.rows_per_slot for s in slots], dev)] = h    # [B, d]

    # ---- the pilot's chunks and the base's blocks ---------------------------------------
    @torch.inference_mode()
    def decode_blocks(self, drafting: list[Request], continuing: list[Request]):
        """Each drafting row drafts `draft_budget()` pilot tokens, each continuing row
        decodes up to `chunk` base tokens (its budget permitting). Every pilot token is fed
        back except a row's last one when nothing follows it; a continuing row's last token
        is not fed here but after its booking, in the step's scoring forward
        (`score_and_feed`), and only if the row goes on. Tokens past an EOS or a stop
        inside a block are dropped with the row (the output is the same). Returns the
        tokens of each row as host lists (one read-back for all): (pilot chunks, base
        blocks)."""
        p_plan = [(r, r.draft_budget(), r.p_sampler) for r in drafting]
        p_feed = [r.feeds_last_draft_token(n) for r, n, _ in p_plan]
        b_plan = [(r, min(r.params.chunk, r.budget_left()), r.b_sampler) for r in continuing]
        b_feed = [False] * len(b_plan)
        p_tok = self._block(self.pilot, self.pilot_logits, p_plan, p_feed)
        b_tok = self._block(self.base, self.base_logits, b_plan, b_feed)
        p_host = p_tok.tolist() if p_tok is not None else []
        b_host = b_tok.tolist() if b_tok is not None else []
        return ([row[:n] for row, (_, n, _) in zip(p_host, p_plan)],
                [row[:n] for row, (_, n, _) in zip(b_host, b_plan)])

    def _block(self, model: Model, pool: torch.Tensor, plan, feed_last) -> torch.Tensor | None:
        """Tokens [rows, max n] (-1 past a row's n) chosen from `pool` and fed back. The
        common case, every row active at a position, builds no index at all."""
        if not plan:
            return None
        dev = model.device
        ns = [n for _, n, _ in plan]
        slots = [r.slot for r, _, _ in plan]
        samplers = [s for _, _, s in plan]
        slots_t = to_device(slots, dev)                                        # [rows]
        toks = torch.full((len(plan), max(ns)), -1, dtype=torch.int64, device=dev)
        for i in range(max(ns)):
            active = [j for j, n in enumerate(ns) if i < n]
            act_t = None if len(active) == len(plan) else to_device(active, dev)
            act_slots = slots_t if act_t is None else slots_t[act_t]
            chosen = self._choose(pool.index_select(0, act_slots), [samplers[j] for j in active])
            if act_t is None:
                toks[:, i] = chosen
            else:
                toks[act_t, i] = chosen
            fed = [a for a, j in enumerate(active) if i < ns[j] - 1 or feed_last[j]]
            if len(fed) == len(active):
                pool[act_slots] = model.decode_rows(chosen, [slots[j] for j in active])
            elif fed:
                fed_t = to_device(fed, dev)
                pool[act_slots[fed_t]] = model.decode_rows(chosen[fed_t],
                                                           [slots[active[a]] for a in fed])
        return toks

    @staticmethod
    def _choose(logits: torch.Tensor, samplers) -> torch.Tensor:
        """Next token of each row [B] from logits [B, V]: argmax for greedy rows (one
        launch for all), the row's own seeded generator for sampled ones."""
        out = torch.argmax(logits, dim=-1)
        for j, s in enumerate(samplers):
            if not s.params.greedy:
                out[j] = s.sample(logits[j])
        return out

    # ---- scoring ----------------------------------------------------------------------
    @torch.inference_mode()
    def score_and_feed(self, jobs: list[tuple[Request, ScoreJob]],
                       feeds: list[tuple[Request, int]]):
        """ONE base forward over every drafting row's new draft tokens (written into the
        base cache after the row's prompt + job.start tokens) and every continuing row's
        last booked token (`feeds`), then the draft tokens' log p and the rule on the
        device, and the continuing rows' next logits. Returns [(log p list, first passing
        index or -1)] per job (one read-back)."""
        dev, S1 = self.base.device, self.rows_per_slot
        if not jobs:
            if feeds:                # one token per row: a graph replay when captured
                slots = [r.slot for r, _ in feeds]
                self.base_logits[to_device(slots, dev)] = self.base.decode_rows(
                    to_device([t for _, t in feeds], dev), slots)
            return []
        for r, job in jobs:
            self.base.truncate_slot(r.slot, len(r.b_ids) + job.start)   # rollback: O(1)
        counts = [len(job.ids) for _, job in jobs]
        T = sum(counts)
        ids = to_device([t for _, job in jobs for t in job.ids] + [t for _, t in feeds], dev)
        h = self.base.score_rows(ids, [r.slot for r, _ in jobs] + [r.slot for r, _ in feeds],
                                 counts + [1] * len(feeds))                # [T + F, d]
        if feeds:
            feed_slots = to_device([r.slot for r, _ in feeds], dev)
            self.base_logits[feed_slots] = self.base.logits(h[T:])
        at = to_device([r.slot * S1 + job.start + j for r, job in jobs
                        for j in range(len(job.ids))], dev)                        # [T]
        self.hidden[at + 1] = h[:T]              # hidden[s, start + 1 + j]: after token j
        logp, first = self.base.score_switch(self.hidden[at], ids[:T], counts,
                                             *self._rule_rows([r for r, _ in jobs]))
        logp_host, first_host = logp.tolist(), first.tolist()
        out, t0 = [], 0
        for n, f in zip(counts, first_host):
            out.append((logp_host[t0:t0 + n], f))
            t0 += n
        return out

    def _rule_rows(self, reqs: list[Request]):
        """The rule's per-row inputs on the device: carry [B, W-1] float64 (right-aligned),
        n_prev [B], window [B], log_gamma [B] float64."""
        dev = self.base.device
        W1 = max(r.switch.window for r in reqs) - 1
        carry = [[0.0] * (W1 - len(c)) + c for c in (r.switch.carried for r in reqs)]
        flat = [x for c in carry for x in c]
        return (to_device(flat, dev, torch.float64).reshape(len(reqs), W1),
                to_device([r.switch.n_scored for r in reqs], dev),
                to_device([r.switch.window for r in reqs], dev),
                to_device([r.switch.log_gamma for r in reqs], dev, torch.float64))

    # ---- the switch -------------------------------------------------------------------
    @torch.inference_mode()
    def switch(self, reqs: list[Request]) -> None:
        """Rows whose switch point k is final: the base keeps prompt + k tokens (O(1)),
        its next logits come from hidden[k], and the pilot's slot is free."""
        dev = self.base.device
        for r in reqs:
            self.base.truncate_slot(r.slot, len(r.b_ids) + r.k)
            self.pilot.release_slot(r.slot)
        at = to_device([r.slot * self.rows_per_slot + r.k for r in reqs], dev)
        self.base_logits[to_device([r.slot for r in reqs], dev)] = self.base.logits(self.hidden[at])

    def release(self, req: Request) -> None:
        self.pilot.release_slot(req.slot)
        self.base.release_slot(req.slot)
