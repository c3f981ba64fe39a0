"""Attacks on tensor parallelism (CPU, gloo, N = 2): the command channel under odd and
hostile inputs, interrupts, garbage-collector re-entrancy, threads, two split models in one
process, a split base in a batched WSD engine with aborts, bf16 / fp16 through gloo.

Each guards a property the main tensor-parallel tests do not cover (several found bugs that
are fixed: the reason is in each test's docstring or comments)."""
from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest
import torch

from wsd_engine import WSD, RequestError, TensorParallelError, WSDError, WSDParams, load_model
from wsd_engine.config import ModelConfig
from wsd_engine.errors import UnsupportedModelError
from wsd_engine.parallel import TPGroup
from wsd_engine.runner import Model, _Parked
from wsd_engine.sharding import ShardPlan
from wsd_engine.synthetic import make_model, make_tokenizer, make_wsd_pair
from _proc_helpers import wait_gone

VOCAB = 317            # not divisible by 2: the last vocabulary shard is shorter

pytestmark = pytest.mark.usefixtures("no_process_left")


def _ids(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tpa") / "gqa"), "llama", seed=3,
                      tokenizer=make_tokenizer(VOCAB), init_scale=3.0)


@pytest.fixture(scope="module")
def whole(ckpt):
    return load_model(ckpt, max_seq_len=96, max_batch_size=2)


@pytest.fixture(scope="module")
def split(ckpt):
    """A shared split model: tests using it must leave it usable."""
    m = load_model(ckpt, tensor_parallel=2, max_seq_len=96, max_batch_size=2)
    yield m
    pids = m.tp.worker_pids
    m.close()
    assert wait_gone(pids) == []


def _fresh(ckpt):
    return load_model(ckpt, tensor_parallel=2, max_seq_len=96, max_batch_size=2)


def _close(m):
    pids = m.tp.worker_pids
    m.close()
    assert wait_gone(pids) == []


# ---- input errors must stay input errors ----------------------------------------------------
def test_huge_int_argument_is_an_input_error(ckpt, whole):
    ids = _ids(6, 1)
    want = whole.generate(ids, 4, stop_at_eos=False)
    with pytest.raises(ValueError):
        whole.truncate_slot(0, 2 ** 70)                   # the unsplit model: a ValueError
    m = _fresh(ckpt)
    try:
        with pytest.raises(ValueError):
            m.truncate_slot(0, 2 ** 70)
        assert m.generate(ids, 4, stop_at_eos=False) == want
    finally:
        _close(m)


def test_bad_slot_index_leaves_the_split_model_usable(ckpt, whole):
    ids = _ids(6, 2)
    want = whole.generate(ids, 4, stop_at_eos=False)
    with pytest.raises(ValueError, match="slot 7 does not exist"):
        whole.release_slot(7)
    assert whole.generate(ids, 4, stop_at_eos=False) == want
    m = _fresh(ckpt)
    try:
        with pytest.raises(ValueError, match="slot 7 does not exist"):
            m.release_slot(7)
        assert m.generate(ids, 4, stop_at_eos=False) == want
    finally:
        _close(m)


def test_unencodable_argument_is_refused_before_anything_is_sent(split, whole):
    """A slice (accepted by the whole model's forward) cannot go over the channel: refused
    on rank 0 before the broadcast, so the ranks stay in step."""
    ids = _ids(7, 3)
    with pytest.raises(RequestError, match="a slice cannot be sent"):
        split.forward(torch.tensor(ids), 0, rows=slice(0, 2))
    with pytest.raises(RequestError, match="torch.complex64 tensor cannot be sent"):
        split.logits(torch.zeros(2, 4, dtype=torch.complex64))
    assert split.generate(ids, 4, stop_at_eos=False) == whole.generate(ids, 4, stop_at_eos=False)


def test_odd_tensors_through_the_channel(split, whole):
    """Empty, non-contiguous and int32 token tensors arrive intact on the workers."""
    base = torch.tensor(_ids(16, 4))
    for m in (whole, split):
        m.reset_cache()
    assert split.forward(base[:0], 0).shape == whole.forward(base[:0], 0).shape == (0, VOCAB)
    odd = base[::2]                                      # a strided view
    assert not odd.is_contiguous()
    for m in (whole, split):
        m.reset_cache()
    a, b = whole.forward(odd, 0), split.forward(odd, 0)
    assert (a - b).abs().max().item() <= 1e-5
    for m in (whole, split):
        m.reset_cache()
    a, b = whole.forward(odd.to(torch.int32), 0), split.forward(odd.to(torch.int32), 0)
    assert (a - b).abs().max().item() <= 1e-5


# ---- calls that are not mirrored -------------------------------------------------------------
def test_forward_rows_outside_a_mirrored_call_does_not_hang(ckpt):
    from wsd_engine.rows import RowBatch
    m = _fresh(ckpt)
    out = []

    def run():
        try:
            out.append(m.forward_rows(torch.tensor([5, 6, 7]),
                                      RowBatch.build([0], [0], [3], m.device)))
        except BaseException as e:  # noqa: BLE001 - looked at below
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(4)
    hung = t.is_alive()
    _close(m)                     # the workers go: the lone all-reduce fails at once
    t.join(30)
    assert not hung, "forward_rows on a split model waited for workers that never come"
    assert isinstance(out[0], WSDError)


# ---- interrupts ----------------------------------------------------------------------------
def test_interrupt_half_way_through_a_command_fails_the_model(ckpt):
    m = _fresh(ckpt)
    tp, real = m.tp, m.tp._ctl

    class InterruptAfterFirstBroadcast:
        armed = True

        def broadcast(self, t, root):
            work = real.broadcast(t, root)
            if self.armed:
                self.armed = False
                work.wait()
                raise KeyboardInterrupt      # a signal lands right after the header went
            return work

        def __getattr__(self, k):
            return getattr(real, k)
    tp._ctl = InterruptAfterFirstBroadcast()
    try:
        # 64 int64 tokens = 512 bytes: exactly the size of the next command's header
        with pytest.raises((KeyboardInterrupt, TensorParallelError)):
            m.forward(torch.tensor(_ids(64, 5)), 0)
        tp._ctl = real
        # the ranks are out of step now: every further call must refuse
        with pytest.raises(TensorParallelError):
            m.truncate(0)
    finally:
        tp._ctl = real
        for pid in tp.worker_pids:   # a worker may wait in a collective of a garbled call
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _close(m)


def test_keyboard_interrupt_mid_call_stays_a_keyboard_interrupt(ckpt):
    m = _fresh(ckpt)
    comm = m.tp.comm
    orig, n = comm.all_reduce, [0]

    def all_reduce(x):
        n[0] += 1
        if n[0] == 3:
            raise KeyboardInterrupt
        return orig(x)
    comm.all_reduce = all_reduce
    try:
        with pytest.raises(KeyboardInterrupt):
            m.score(_ids(5, 6))
    finally:
        comm.all_reduce = orig
        pids = m.tp.worker_pids
        # whatever the type, the half-done call must leave a failed model, workers stopped
        with pytest.raises(TensorParallelError):
            m.score(_ids(5, 6))
        assert wait_gone(pids) == []
        _close(m)


# ---- the garbage collector --------------------------------------------------------------------
class _CollectInside:
    """Wraps TPGroup._drops_lock: a collection runs right after the lock is taken, as the
    cyclic garbage collector may on any allocation (`[]` in _flush_drops)."""

    def __init__(self, inner):
        self.inner, self.armed = inner, False

    def __enter__(self):
        self.inner.__enter__()
        if self.armed:
            self.armed = False
            gc.collect()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


def test_gc_of_a_parked_handle_inside_flush_drops_does_not_deadlock():
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], model_type="llama",
                                     vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, rms_norm_eps=1e-6,
                                     max_position_embeddings=64))
    # a worker-side group (rank 1: no processes, no channel) is enough for the drop queue
    tp = TPGroup(1, 2, ShardPlan.make(cfg, 2, 1), None, None, None, torch.device("cpu"), 64)
    tp._send = lambda name, args: None
    tp.drop_later(1)
    tp._drops_lock = _CollectInside(tp._drops_lock)
    parked = {7: "copy"}
    done = []

    class Cycle:
        pass

    def run():
        was = gc.isenabled()
        gc.disable()                  # the handle dies in the collection we schedule
        try:
            c = Cycle()
            c.self, c.handle = c, _Parked(7)
            import weakref
            import types
            holder = types.SimpleNamespace(_tp_parked=parked, tp=tp)   # Model's two fields
            weakref.finalize(c.handle, Model.forget_parked, holder, 7)
            del c
            tp._drops_lock.armed = True
            tp._flush_drops()
            done.append(True)
        finally:
            if was:
                gc.enable()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(3)
    assert done, "rank 0 deadlocked: a parked handle was collected inside _flush_drops"
    assert 7 not in parked


# ---- protocol details ----------------------------------------------------------------------
def test_keyword_only_arguments_reach_the_workers(split):
    sent = []
    tp = split.tp
    orig = tp._encode_call

    def spy(name, args):
        sent.append((name, list(args)))
        return orig(name, args)
    tp._encode_call = spy
    try:
        split.set_decode_kernels(None, None, chosen=False)
    finally:
        del tp._encode_call
    assert sent == [("set_decode_kernels", [None, None, False])]


def test_every_vocabulary_shard_has_rows_or_the_split_is_refused():
    for V, N in ((9, 4), (57, 8), (3969, 64)):
        heads = max(N, 4)
        cfg = ModelConfig.from_dict(dict(
            architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V,
            hidden_size=8 * heads, intermediate_size=4 * N, num_hidden_layers=1,
            num_attention_heads=heads, num_key_value_heads=heads, rms_norm_eps=1e-6,
            max_position_embeddings=64))
        try:
            plans = [ShardPlan.make(cfg, N, r) for r in range(N)]
        except UnsupportedModelError:
            continue
        assert all(p.vocab[1] > p.vocab[0] for p in plans), (V, N, plans[-1].vocab)


# ---- dtypes through gloo -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_split_matches_the_whole_model(ckpt, dtype):
    ids = _ids(9, 7)
    w = load_model(ckpt, dtype=dtype, max_seq_len=32)
    with load_model(ckpt, tensor_parallel=2, dtype=dtype, max_seq_len=32) as m:
        assert m.dtype == dtype
        assert (m.score(ids) - w.score(ids)).abs().max().item() <= 0.1
        # greedy tokens may differ from the whole model's (bf16 sums in another order);
        # the split model must stay in step with itself
        a = m.generate(ids, 5, stop_at_eos=False)
        assert m.generate(ids, 5, stop_at_eos=False) == a and len(a) == 5
        assert len(m.rank_load_memory()) == 2


# ---- lifetime: dropping, closing from threads, two split models -----------------------------
def test_a_dropped_split_model_does_not_keep_its_workers(ckpt):
    m = _fresh(ckpt)
    pids = m.tp.worker_pids
    del m
    gc.collect()
    assert wait_gone(pids) == [], "workers of a garbage-collected split model live on"


def test_close_from_another_thread_during_generation(ckpt, whole):
    ids = _ids(5, 8)
    m = _fresh(ckpt)
    pids = m.tp.worker_pids
    got = []

    def run():
        try:
            got.append(m.generate(ids, 80, stop_at_eos=False))
        except BaseException as e:  # noqa: BLE001 - looked at below
            got.append(e)
    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    closers = [threading.Thread(target=m.close) for _ in range(2)]   # close twice at once
    for c in closers:
        c.start()
    for c in closers:
        c.join(30)
    t.join(30)
    assert not t.is_alive() and not any(c.is_alive() for c in closers)
    assert wait_gone(pids) == []
    r = got[0]
    if isinstance(r, list):           # it may have finished before close took the lock
        assert r == whole.generate(ids, 80, stop_at_eos=False)
    else:
        assert isinstance(r, TensorParallelError) and "closed" in str(r)
    with pytest.raises(TensorParallelError, match="closed"):
        m.score(ids)
    m.close()


def test_two_split_models_in_one_process_from_two_threads(ckpt, whole, tmp_path):
    other = make_model(str(tmp_path / "mqa"), "llama", seed=5,
                       tokenizer=make_tokenizer(VOCAB + 3), init_scale=3.0,
                       num_key_value_heads=1)
    whole2 = load_model(other, max_seq_len=96)
    a, b = _fresh(ckpt), load_model(other, tensor_parallel=2, max_seq_len=96)
    try:
        assert set(a.tp.worker_pids).isdisjoint(b.tp.worker_pids)
        prompts = [_ids(5 + i, 20 + i) for i in range(3)]
        want = {("a", i): whole.generate(p, 8, stop_at_eos=False) for i, p in enumerate(prompts)}
        want.update({("b", i): whole2.generate(p, 8, stop_at_eos=False)
                     for i, p in enumerate(prompts)})
        got = {}

        def run(name, m):
            for i, p in enumerate(prompts):
                got[(name, i)] = m.generate(p, 8, stop_at_eos=False)
        ts = [threading.Thread(target=run, args=("a", a)), threading.Thread(target=run, args=("b", b))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert got == want
    finally:
        _close(a)
        _close(b)


# ---- a split base in a batched engine, with aborts ---------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_wsd_pair(str(tmp_path_factory.mktemp("tpa_wsd")), sharpen=100.0, damp=0.02,
                         perturb=0.05)


PROMPTS = ["Tell me a story about a cat.", "What is two plus two?", "Say hello.",
           "Numbers like 1, 2, 3."]


def _drive(engine, params, abort_at):
    """Three requests, the second aborted after `abort_at` steps, a fourth added then (it
    takes the freed slot); returns each request's final outputs."""
    for i in range(3):
        engine.add_request(i, PROMPTS[i], params)
    finals, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = (out.finish_reason, out.result.token_ids
                                          if out.result is not None else None)
        steps += 1
        if steps == abort_at:
            assert engine.abort(1)
            engine.add_request(3, PROMPTS[3], params)
        assert steps < 500
    return finals


def test_split_base_in_a_batched_engine_with_aborts(pair):
    pilot, base = pair
    params = WSDParams(max_new_tokens=24, draft_max_tokens=12, chunk=4, threshold=0.9)
    with WSD.from_pretrained(pilot, base, max_batch_size=3) as ref_engine:
        want = _drive(ref_engine, params, abort_at=2)
    with WSD.from_pretrained(pilot, base, max_batch_size=3, tensor_parallel=2) as engine:
        got = _drive(engine, params, abort_at=2)
        assert got == want
        assert got[1][0] == "abort"
        # the engine's base is still in step: a whole request after the batch
        one = engine.generate(PROMPTS[0], params)
    with WSD.from_pretrained(pilot, base) as ref_engine:
        assert one.token_ids == ref_engine.generate(PROMPTS[0], params).token_ids
    # a closed engine's split base refuses at once, and the engine with it
    with pytest.raises(TensorParallelError, match="closed"):
        engine.base.score([5, 6, 7])
    with pytest.raises(WSDError):
        engine.generate(PROMPTS[0], params)
