"""Tensor parallelism on CPU (gloo, fp32): a model split over N = 2 and 4 ranks (worker
processes) gives the logits of the whole model to reduction order (<= 1e-5), the same greedy
tokens and the same WSD outputs; faults (a killed worker, a dying caller, a bad checkpoint)
end in a specific error, never a hang, and leave no process behind."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from wsd_engine import (WSD, ConfigError, ModelLoadError, RequestError, TensorParallelError,
                        UnsupportedModelError, WSDError, WSDParams, load_model)
from wsd_engine.config import ModelConfig
from wsd_engine.sharding import ShardPlan
from wsd_engine.synthetic import make_model, make_tokenizer, make_wsd_pair
from _proc_helpers import wait_gone

LAYOUTS = {
    # name: (make_model overrides, tokenizer vocabulary, rank counts)
    "gqa_odd_vocab": (dict(family="llama"), 317, (2, 4)),          # 4 heads, 2 KV heads
    "mqa": (dict(family="llama", num_key_value_heads=1), 320, (2, 4)),
    "qwen2_qkv_bias": (dict(family="qwen2"), 320, (2,)),
    "llama_biases_tied": (dict(family="llama", attention_bias=True, mlp_bias=True,
                               tie_word_embeddings=True), 320, (2,)),
    "gemma2": (dict(family="gemma2"), 320, (2,)),
}
CASES = [(name, n) for name, (_, _, ns) in LAYOUTS.items() for n in ns]

pytestmark = pytest.mark.usefixtures("no_process_left")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for name, (kw, vocab, _) in LAYOUTS.items():
        kw = dict(kw)
        family = kw.pop("family")
        out[name] = make_model(str(root / name), family, seed=3, tokenizer=make_tokenizer(vocab),
                               init_scale=3.0, **kw)
    return out


def _ids(n, vocab, seed):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the split itself ---------------------------------------------------------------------
def _cfg(**kw) -> ModelConfig:
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1001,
                hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                max_position_embeddings=128)
    base.update(kw)
    return ModelConfig.from_dict(base)


def test_plan_covers_every_head_row_and_token_once():
    cfg = _cfg()
    for n in (1, 2, 4, 8):
        plans = [ShardPlan.make(cfg, n, r) for r in range(n)]
        assert [p.heads for p in plans] == [(r * 8 // n, (r + 1) * 8 // n) for r in range(n)]
        assert plans[0].vocab[0] == 0 and plans[-1].vocab[1] == 1001
        assert all(a.vocab[1] == b.vocab[0] for a, b in zip(plans, plans[1:]))
        assert sum(p.inter[1] - p.inter[0] for p in plans) == 96
        for p in plans:   # every query head's KV head is on its rank
            k0, k1 = p.kv_heads
            assert all(k0 <= h // 4 < k1 for h in range(*p.heads))
    # fewer KV heads than ranks: each KV head on the world / nkv ranks that read it
    assert [ShardPlan.make(cfg, 8, r).kv_heads for r in range(8)] == \
        [(0, 1)] * 4 + [(1, 2)] * 4
    mqa = _cfg(num_key_value_heads=1)
    assert {ShardPlan.make(mqa, 4, r).kv_heads for r in range(4)} == {(0, 1)}


def test_plan_parts_of_checkpoint_tensors():
    cfg = _cfg(attention_bias=True, mlp_bias=True)
    p = ShardPlan.make(cfg, 2, 1)
    hd = 8
    assert p.part("model.layers.0.self_attn.q_proj.weight") == (0, 4 * hd, 8 * hd)
    assert p.part("model.layers.0.self_attn.k_proj.bias") == (0, hd, 2 * hd)
    assert p.part("model.layers.1.self_attn.o_proj.weight") == (1, 4 * hd, 8 * hd)
    assert p.part("model.layers.1.mlp.down_proj.weight") == (1, 48, 96)
    assert p.part("model.layers.1.mlp.up_proj.bias") == (0, 48, 96)
    assert p.part("model.layers.0.self_attn.o_proj.bias") == "zeros"     # added once: rank 0
    assert ShardPlan.make(cfg, 2, 0).part("model.layers.0.mlp.down_proj.bias") is None
    assert p.part("model.embed_tokens.weight") == (0, 501, 1001)
    assert p.part("model.norm.weight") is None
    local = p.local_config(cfg)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size,
            local.vocab_size) == (4, 1, 48, 1001)


@pytest.mark.parametrize("kw,n,what", [
    (dict(num_attention_heads=6, hidden_size=48), 4, "6 attention heads"),
    (dict(num_key_value_heads=4), 8, None),       # 4 KV heads on 8 ranks: fine
    (dict(num_attention_heads=12, hidden_size=96, num_key_value_heads=3), 2,
     "3 key/value heads"),
    (dict(intermediate_size=90), 4, "intermediate size 90"),
])
def test_splits_that_do_not_divide_are_refused(kw, n, what):
    cfg = _cfg(**kw)
    if what is None:
        ShardPlan.make(cfg, n, 0)
        return
    with pytest.raises(UnsupportedModelError, match=what) as e:
        ShardPlan.make(cfg, n, 0)
    assert "sizes that work" in str(e.value)


@pytest.mark.parametrize("bad", [0, -2, 65, True, 2.0, "2", None])
def test_bad_tensor_parallel_values(checkpoints, bad):
    with pytest.raises(ConfigError, match="tensor_parallel"):
        load_model(checkpoints["mqa"], tensor_parallel=bad)


def test_refusals_come_before_any_worker_starts(checkpoints, tmp_path):
    with pytest.raises(UnsupportedModelError, match="cannot be split"):
        load_model(checkpoints["mqa"], tensor_parallel=3)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            load_model(checkpoints["mqa"], device="cuda", tensor_parallel=2)
    # a bad checkpoint: reported once, by rank 0, before any worker process exists
    import json
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(checkpoints["mqa"]):
        (bad / f).write_bytes(open(os.path.join(checkpoints["mqa"], f), "rb").read())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="num_hidden_layers = 3"):
        load_model(str(bad), tensor_parallel=2)
    assert multiprocessing.active_children() == []


# ---- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n", CASES)
def test_logits_and_greedy_tokens_equal_the_whole_model(checkpoints, name, n):
    path = checkpoints[name]
    whole = load_model(path)
    V = whole.config.vocab_size
    ids = _ids(13, V, n)
    ref = whole.score(ids)
    greedy = whole.generate(ids, 12, stop_at_eos=False)
    with load_model(path, tensor_parallel=n) as split:
        assert split.tensor_parallel == n and len(split.tp.worker_pids) == n - 1
        out = split.score(ids)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-5
        assert split.generate(ids, 12, stop_at_eos=False) == greedy
        # the rows phases and sharded switch scoring (four floats per token exchanged)
        h_ref = whole.forward(torch.tensor(ids), 0, return_hidden=True)
        h = split.forward(torch.tensor(ids), 0, return_hidden=True)
        assert (h - h_ref).abs().max().item() <= 1e-5
        assert (split.logits(h) - whole.logits(h)).abs().max().item() <= 1e-5
        counts = [5, 8]
        state = (torch.tensor([[-0.1, -0.2], [-0.3, -0.05]], dtype=torch.float64),
                 torch.tensor([2, 0]), torch.tensor([3, 3]),
                 torch.tensor([-1.5, -0.7], dtype=torch.float64))
        nxt = torch.tensor(ids[1:] + [ids[0]])
        lp_ref, first_ref = whole.score_switch(h, nxt, counts, *state)
        lp, first = split.score_switch(h, nxt, counts, *state)
        assert (lp - lp_ref).abs().max().item() <= 1e-5
        assert first.tolist() == first_ref.tolist()
    assert split.tp.closed


def test_batched_rows_equal_the_whole_model(checkpoints):
    path = checkpoints["gqa_odd_vocab"]
    whole = load_model(path, max_batch_size=3)
    V = whole.config.vocab_size
    prompts = [torch.tensor(_ids(n, V, 10 + n)) for n in (4, 9, 6)]
    with load_model(path, tensor_parallel=2, max_batch_size=3) as split:
        for m in (whole, split):
            m.reset_cache()
        a = whole.prefill_rows(prompts, [2, 0, 1])
        b = split.prefill_rows(prompts, [2, 0, 1])
        assert (a - b).abs().max().item() <= 1e-5
        tok = torch.argmax(a, -1)
        for _ in range(4):
            a = whole.decode_rows(tok, [2, 0, 1])
            b = split.decode_rows(tok, [2, 0, 1])
            assert (a - b).abs().max().item() <= 1e-5
            assert torch.equal(torch.argmax(b, -1), torch.argmax(a, -1))
            tok = torch.argmax(a, -1)
        split.truncate_slot(0, 5)
        whole.truncate_slot(0, 5)
        assert split.slot_length(0) == 5
        ha = whole.score_rows(prompts[1][:3], [0], [3])
        hb = split.score_rows(prompts[1][:3], [0], [3])
        assert (ha - hb).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def wsd_pair(tmp_path_factory):
    return make_wsd_pair(str(tmp_path_factory.mktemp("tp_wsd")), sharpen=100.0, damp=0.02,
                         perturb=0.05)


PROMPTS = ["Tell me a story about a cat.", "What is two plus two?", "Say hello."]


def _same(a, b):
    assert (a.text, a.token_ids, a.switch_index, a.switched, a.draft_tokens) == \
        (b.text, b.token_ids, b.switch_index, b.switched, b.draft_tokens)


@pytest.mark.parametrize("n", [2, 4])
def test_wsd_outputs_equal_the_whole_base(wsd_pair, n):
    pilot, base = wsd_pair
    params = [WSDParams(max_new_tokens=40, draft_max_tokens=24, chunk=c, threshold=t)
              for c, t in ((1, 0.8), (4, 0.999), (8, 0.5))]
    with WSD.from_pretrained(pilot, base, max_batch_size=3) as whole:
        ref = whole.generate(PROMPTS, params)
        ref_one = whole.generate(PROMPTS[0], params[2])
    with WSD.from_pretrained(pilot, base, max_batch_size=3, tensor_parallel=n) as split:
        assert split.base.tensor_parallel == n and split.pilot.tensor_parallel == 1
        for a, b in zip(ref, split.generate(PROMPTS, params)):
            _same(a, b)
        _same(ref_one, split.generate(PROMPTS[0], params[2]))
        pieces = list(split.stream(PROMPTS[0], params[2]))
        assert "".join(pieces) == ref_one.text
    assert any(r.switched for r in ref), "the pair should switch on some prompt"
    workers = split.base.tp.worker_pids
    assert wait_gone(workers) == []


def test_token_level_engine(wsd_pair, tmp_path):
    """Models without tokenizers (generate_ids), a batch of two, the base split."""
    from wsd_engine.synthetic import without_tokenizer
    pilot = without_tokenizer(wsd_pair[0], str(tmp_path / "p"))
    base = without_tokenizer(wsd_pair[1], str(tmp_path / "b"))
    p_ids, b_ids = [_ids(9, 300, 1), _ids(5, 300, 2)], [_ids(11, 300, 3), _ids(7, 300, 4)]
    params = WSDParams(max_new_tokens=24, draft_max_tokens=12, chunk=4)
    with WSD.from_pretrained(pilot, base, max_batch_size=2) as whole:
        want = whole.generate_ids(p_ids, b_ids, params)
    with WSD.from_pretrained(pilot, base, max_batch_size=2, tensor_parallel=2) as split:
        got = split.generate_ids(p_ids, b_ids, params)
    assert [(r.token_ids, r.switch_index) for r in got] == \
        [(r.token_ids, r.switch_index) for r in want]


def test_sampled_rows_and_a_split_pilot(wsd_pair):
    pilot, base = wsd_pair
    params = WSDParams(max_new_tokens=30, draft_max_tokens=20, temperature=0.8, top_p=0.9,
                       seed=7)
    with WSD.from_pretrained(pilot, base) as whole:
        ref = whole.generate(PROMPTS[1], params)
    with WSD.from_pretrained(pilot, base, tensor_parallel=2, pilot_tensor_parallel=2) as split:
        _same(ref, split.generate(PROMPTS[1], params))


# ---- threads, sharing, bad inputs ---------------------------------------------------------
def test_threads_and_parked_sequences(checkpoints, wsd_pair):
    path = checkpoints["mqa"]
    whole = load_model(path)
    V = whole.config.vocab_size
    prompts = [_ids(6 + i, V, 30 + i) for i in range(4)]
    want = [whole.generate(p, 10, stop_at_eos=False) for p in prompts]
    with load_model(path, tensor_parallel=2) as split:
        got = [None] * 4

        def run(i):
            got[i] = split.generate(prompts[i], 10, stop_at_eos=False)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == want
    # a suspended stream's rows are parked on every rank while the base serves another call
    pilot, base = wsd_pair
    params = WSDParams(max_new_tokens=30, draft_max_tokens=16)
    with WSD.from_pretrained(pilot, base) as ref_engine:
        ref = ref_engine.generate(PROMPTS[2], params)
    with WSD.from_pretrained(pilot, base, tensor_parallel=2) as split:
        stream = split.stream(PROMPTS[2], params)
        first = next(stream)
        split.base.score([5, 6, 7])                      # takes the base: parks the stream's rows
        assert split.base.cache_swaps >= 1
        assert first + "".join(stream) == ref.text


def test_bad_requests_leave_the_split_model_usable(checkpoints):
    path = checkpoints["gqa_odd_vocab"]
    whole = load_model(path, max_seq_len=32)
    ids = _ids(8, whole.config.vocab_size, 1)
    with load_model(path, tensor_parallel=2, max_seq_len=32) as split:
        with pytest.raises(RequestError):
            split.score([1, 2, 10 ** 6])
        with pytest.raises(RequestError):
            split.generate(ids, 40)                         # past the cache
        with pytest.raises(ValueError):
            split.truncate_slot(0, 999)                    # every rank raises, in step
        with pytest.raises(ValueError):
            split.forward(torch.tensor(ids), 5)            # start past the cache length
        assert split.generate(ids, 6, stop_at_eos=False) == \
            whole.generate(ids, 6, stop_at_eos=False)
        mem = split.rank_load_memory()
        assert len(mem) == 2 and all(m["peak"] >= m["rss"] > 0 for m in mem)
    with pytest.raises(TensorParallelError, match="closed"):
        split.score(ids)
    split.close()                                          # idempotent


# ---- faults --------------------------------------------------------------------------------
def test_a_killed_worker_makes_the_next_call_fail_then_reload_works(checkpoints):
    path = checkpoints["mqa"]
    split = load_model(path, tensor_parallel=4)
    ids = _ids(7, split.config.vocab_size, 2)
    want = split.generate(ids, 5, stop_at_eos=False)
    victim = split.tp.worker_pids[1]
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 2"):
        split.generate(ids, 5, stop_at_eos=False)
    assert time.monotonic() - t0 < 30
    with pytest.raises(TensorParallelError):             # and every call after
        split.score(ids)
    pids = split.tp.worker_pids
    split.close()
    assert wait_gone(pids) == []
    with load_model(path, tensor_parallel=4) as again:
        assert again.generate(ids, 5, stop_at_eos=False) == want


def test_a_worker_killed_during_a_call_breaks_it_off(checkpoints):
    path = checkpoints["gqa_odd_vocab"]
    split = load_model(path, tensor_parallel=2, max_seq_len=512)
    ids = _ids(5, split.config.vocab_size, 4)
    errors = []

    def run():
        try:
            for _ in range(200):
                split.generate(ids, 400, stop_at_eos=False)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    os.kill(split.tp.worker_pids[0], signal.SIGKILL)
    t.join(30)
    assert not t.is_alive(), "the call hung after its worker died"
    assert len(errors) == 1 and isinstance(errors[0], TensorParallelError)
    split.close()


def test_a_failed_base_ends_engine_requests_with_an_error(wsd_pair):
    pilot, base = wsd_pair
    with WSD.from_pretrained(pilot, base, tensor_parallel=2) as split:
        os.kill(split.base.tp.worker_pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WSDError):
            split.generate(PROMPTS[0], WSDParams(max_new_tokens=10))
        assert time.monotonic() - t0 < 30


_CALLER = textwrap.dedent("""
    import os, signal, sys
    from wsd_engine import load_model
    if __name__ == "__main__":          # workers are spawned: they import this file
        m = load_model(sys.argv[1], tensor_parallel=2)
        m.generate([5, 6, 7], 3, stop_at_eos=False)
        print(" ".join(map(str, m.tp.worker_pids)), flush=True)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        # "exit": leave without close(): the engine stops its workers at exit
""")


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_no_orphan_workers_when_the_caller_goes(checkpoints, tmp_path, how):
    script = tmp_path / "caller.py"
    script.write_text(_CALLER)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(script), checkpoints["mqa"], how],
                       capture_output=True, text=True, timeout=120, env=env)
    pids = [int(x) for x in r.stdout.split()]
    assert len(pids) == 1, r.stderr[-2000:]
    assert wait_gone(pids) == [], f"worker {pids} outlived its caller ({how})"


def test_triton_backend_split(checkpoints, wsd_pair):
    """The triton backend on every rank (CPU interpreter): logits, greedy tokens, the
    sharded switch-scoring kernels (each rank's partials, one merge) and WSD."""
    path = checkpoints["gqa_odd_vocab"]
    whole = load_model(path)
    ids = _ids(12, whole.config.vocab_size, 5)
    ref = whole.score(ids)
    h = whole.forward(torch.tensor(ids), 0, return_hidden=True)
    nxt = torch.tensor(ids[1:] + [ids[0]])
    logp = torch.log_softmax(whole.logits(h), -1).gather(1, nxt[:, None])[:, 0]
    # thresholds just below / above a window's mean: the first row fires, the second not
    gamma = torch.tensor([float(logp[0:3].double().mean()) - 1e-3, 0.0], dtype=torch.float64)
    state = (torch.zeros(2, 2, dtype=torch.float64), torch.tensor([0, 0]),
             torch.tensor([3, 3]), gamma)
    lp_ref, first_ref = whole.score_switch(h, nxt, [5, 7], *state)
    assert first_ref.tolist() == [2, -1]
    with load_model(path, tensor_parallel=2, backend="triton") as split:
        assert (split.score(ids) - ref).abs().max().item() <= 1e-5
        assert split.generate(ids, 6, stop_at_eos=False) == \
            whole.generate(ids, 6, stop_at_eos=False)
        lp, first = split.score_switch(h, nxt, [5, 7], *state)
        assert (lp - lp_ref).abs().max().item() <= 1e-5
        assert first.tolist() == [2, -1]
    pilot, base = wsd_pair
    params = WSDParams(max_new_tokens=16, draft_max_tokens=10, chunk=4)
    with WSD.from_pretrained(pilot, base) as ref_engine:
        want = ref_engine.generate(PROMPTS[1], params)
    with WSD.from_pretrained(pilot, base, backend="triton", tensor_parallel=2) as split:
        _same(want, split.generate(PROMPTS[1], params))


_TORCHRUN_SCRIPT = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from wsd_engine import load_model
    if __name__ == "__main__":
        m = load_model(sys.argv[1], tensor_parallel=2)
        print("TOKENS", m.generate([5, 6, 7, 8], 6, stop_at_eos=False), flush=True)
        m.close()
        # the engine made the default group, so it takes it down (left to the
        # interpreter's exit, gloo's threads can abort the process after the script ends)
        print("DEFAULT GROUP", dist.is_initialized(), flush=True)
""")


def test_the_same_script_under_torchrun(checkpoints, tmp_path):
    """Multi-node runs start the script on every node with torchrun (env://): here two
    processes on one node. Rank 0 drives and prints; rank 1 serves and leaves the script
    when rank 0 closes the model. A bad checkpoint is reported once, by rank 0."""
    path = checkpoints["mqa"]
    want = load_model(path).generate([5, 6, 7, 8], 6, stop_at_eos=False)
    script = tmp_path / "job.py"
    script.write_text(_TORCHRUN_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(script)]
    r = subprocess.run(cmd + [path], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("TOKENS") == 1 and f"TOKENS {want}" in r.stdout
    assert "DEFAULT GROUP False" in r.stdout
    import json
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(path):
        (bad / f).write_bytes(open(os.path.join(path, f), "rb").read())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode != 0
    assert (r.stdout + r.stderr).count("num_hidden_layers = 3") == 1


_TORCHRUN_WSD_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from wsd_engine import WSD, WSDParams
    if __name__ == "__main__":
        pilot, base, pilot_tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
        if os.environ["RANK"] != "0":
            pilot = os.path.join(pilot, "not-here")   # a rank above 0 must not load a pilot
        params = WSDParams(max_new_tokens=30, draft_max_tokens=16, chunk=4, threshold=0.8)
        with WSD.from_pretrained(pilot, base, tensor_parallel=2,
                                 pilot_tensor_parallel=pilot_tp) as w:
            r = w.generate("Tell me a story about a cat.", params)
            print("RESULT", json.dumps([r.text, r.switch_index]), flush=True)
""")


def test_wsd_under_torchrun(wsd_pair, tmp_path):
    """`WSD.from_pretrained` under torchrun: only rank 0 loads the pilot (the other ranks go
    straight to the split base and serve it), the answer equals the whole base's, and a
    split pilot, which a torchrun rank cannot serve next to the base, is refused once."""
    import json
    pilot, base = wsd_pair
    params = WSDParams(max_new_tokens=30, draft_max_tokens=16, chunk=4, threshold=0.8)
    with WSD.from_pretrained(pilot, base) as whole:
        ref = whole.generate("Tell me a story about a cat.", params)
    script = tmp_path / "wsd_job.py"
    script.write_text(_TORCHRUN_WSD_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(script), pilot, base]
    r = subprocess.run(cmd + ["1"], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("RESULT") == 1
    assert f"RESULT {json.dumps([ref.text, ref.switch_index])}" in r.stdout
    r = subprocess.run(cmd + ["2"], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode != 0 and "RESULT" not in r.stdout
    assert (r.stdout + r.stderr).count("give pilot_tensor_parallel=1") == 1


def test_torchrun_rank_takes_its_own_gpu_before_touching_one(monkeypatch):
    """Under torchrun each process makes cuda:LOCAL_RANK current before the load's memory
    check, so that no process opens a context on GPU 0 (checked without a GPU: the CUDA
    calls are recorded)."""
    from wsd_engine import parallel
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert parallel.torchrun_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert parallel.torchrun_device(torch.device("cuda", 0)) == torch.device("cuda", 3)
    assert calls == [3, 3]
    assert parallel.torchrun_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ConfigError, match="LOCAL_RANK 5 has no CUDA device"):
        parallel.torchrun_device(torch.device("cuda"))
    assert calls == [3, 3]


def _json_docs(text: str) -> list:
    """The JSON documents printed one after another, without their timings."""
    import json
    dec, docs, i = json.JSONDecoder(), [], 0
    while text[i:].strip():
        i += len(text[i:]) - len(text[i:].lstrip())
        doc, i = dec.raw_decode(text, i)
        doc.pop("timings", None)
        doc.pop("tokens_per_second", None)
        docs.append(doc)
    return docs


def test_command_line_tensor_parallel(wsd_pair, capsys):
    from wsd_engine.cli import main
    pilot, base = wsd_pair
    common = ["--prompt", "Say hello.", "--max-new-tokens", "20", "--draft-max-tokens", "12",
              "--json"]
    outs = []
    for tp in ("1", "2"):
        assert main(["generate", "--pilot", pilot, "--base", base, "--tensor-parallel", tp]
                    + common) == 0
        assert main(["generate", "--model", base, "--tensor-parallel", tp] + common) == 0
        outs.append(_json_docs(capsys.readouterr().out))
    assert len(outs[0]) == 2 and outs[0] == outs[1]
    assert main(["generate", "--model", base, "--tensor-parallel", "3"] + common) == 1
    assert "cannot be split" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_split_with_nccl_and_cuda_graphs(checkpoints, wsd_pair):
    """On a machine with >= 2 GPUs: NCCL between cuda:0 and cuda:1, the triton backend on
    each rank, the all-reduces inside captured CUDA graphs; the same tokens as one GPU."""
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"NCCL tensor parallelism needs one GPU per rank; this machine has {n}")
    path = checkpoints["gqa_odd_vocab"]
    whole = load_model(path, device="cuda", backend="triton")
    ids = _ids(11, whole.config.vocab_size, 9)
    ref = whole.score(ids)
    want = whole.generate(ids, 24, stop_at_eos=False)
    with load_model(path, device="cuda", backend="triton", tensor_parallel=2) as split:
        assert (split.score(ids) - ref).abs().max().item() <= 1e-4
        assert split.generate(ids, 24, stop_at_eos=False) == want
        split.capture_decode()
        assert split.generate(ids, 24, stop_at_eos=False) == want
    pilot, base = wsd_pair
    params = WSDParams(max_new_tokens=40, draft_max_tokens=24)
    with WSD.from_pretrained(pilot, base, device="cuda", backend="triton",
                             cuda_graphs=True, max_batch_size=2) as one:
        ref_r = one.generate(PROMPTS[:2], params)
    with WSD.from_pretrained(pilot, base, device="cuda", backend="triton", cuda_graphs=True,
                             max_batch_size=2, tensor_parallel=2) as split:
        for a, b in zip(ref_r, split.generate(PROMPTS[:2], params)):
            _same(a, b)
