"""backend="triton" (kernels under the CPU interpreter here) against backend="torch"."""
import pytest
import torch

from wsd_engine import load_model
from wsd_engine.engine import WSD, WSDParams
from wsd_engine.synthetic import make_model, make_tokenizer, make_wsd_pair


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tb") / "m"), "qwen2",
                      tokenizer=make_tokenizer(320), init_scale=5.0)


def test_logits_and_greedy_match_torch_backend(ckpt):
    ref = load_model(ckpt, backend="torch")
    tri = load_model(ckpt, backend="triton")
    torch.manual_seed(0)
    ids = torch.randint(3, 320, (37,))
    torch.testing.assert_close(tri.score(ids), ref.score(ids), atol=2e-4, rtol=0)
    # chunk scoring at an offset, then single-token decode steps (the flash-decoding path)
    ref.cache.reset(), tri.cache.reset()
    for m in (ref, tri):
        m.prefill(ids[:20])
    torch.testing.assert_close(tri.forward(ids[20:27], 20), ref.forward(ids[20:27], 20),
                               atol=2e-4, rtol=0)
    assert tri.generate(ids[:12], max_new_tokens=10, stop_at_eos=False) == \
        ref.generate(ids[:12], max_new_tokens=10, stop_at_eos=False)


def test_wsd_triton_backend_matches_torch(tmp_path):
    pair = make_wsd_pair(str(tmp_path), damp=0.02, perturb=0.05, sharpen=100.0)
    params = WSDParams(draft_max_tokens=24, max_new_tokens=30, chunk=8)
    a = WSD.from_pretrained(*pair).generate("Tell me about the quick brown fox.", params)
    b = WSD.from_pretrained(*pair, backend="triton").generate(
        "Tell me about the quick brown fox.", params)
    assert a.switched and a.switch_index == b.switch_index
    assert a.token_ids == b.token_ids


def _decode_logits_match(ref, tri, ids):
    """Prefill ids[:5] into both, then one-token steps: the logits agree (fp32)."""
    for m in (ref, tri):
        m.cache.reset()
        m.prefill(ids[:5])
    for t in ids[5:]:
        torch.testing.assert_close(tri.decode_one_token(t.reshape(1)),
                                   ref.decode_one_token(t.reshape(1)), atol=2e-4, rtol=0)


@pytest.mark.parametrize("family,pdl", [("qwen2", False), ("llama", False), ("llama", True)])
def test_fused_gemv_decode_matches_torch_backend(tmp_path, family, pdl):
    """fused_gemv: one-token steps run the gemv kernel with the norms / SwiGLU / logits
    fused in (qwen2: qkv bias too); logits and greedy tokens as the torch backend. pdl: the
    PDL program layout (the wait itself needs an sm_90 GPU)."""
    path = make_model(str(tmp_path / family), family, init_scale=5.0)
    ref = load_model(path, backend="torch")
    tri = load_model(path, backend="triton")
    tri.ops.fused_gemv = True
    tri.ops.pdl = pdl
    calls = []
    gemv = tri.ops._gemv
    big = {"BLOCK_N": 128, "BLOCK_K": 512}        # few programs: the interpreter runs them serially
    pdls = set()
    tri.ops._gemv = lambda *a, **k: (calls.append(k.get("pre", "none")), pdls.add(k.get("pdl"))) \
        and gemv(*a, config=big, **k)
    torch.manual_seed(1)
    ids = torch.randint(3, 320, (9,))
    _decode_logits_match(ref, tri, ids)
    L = tri.config.num_layers
    # per step: (norm+qkv, o, norm+gate_up, swiglu+down) per layer + norm+lm_head
    assert calls.count("rmsnorm") >= 4 * (2 * L + 1) and calls.count("swiglu") >= 4 * L
    assert pdls == {pdl}                          # every one-token matmul asked for it
    assert tri.generate(ids[:6], max_new_tokens=12, stop_at_eos=False) == \
        ref.generate(ids[:6], max_new_tokens=12, stop_at_eos=False)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_fused_gemv_on_gpu_eager_and_graphs(tmp_path, pdl):
    """Compiled gemv path: fp32 logits as the torch backend; bf16 greedy tokens through the
    captured one-sequence decode graph, and the captured one-row batched decode step (the
    gemv path: one token), equal the eager run. pdl: the graphed model launches its
    one-token kernels with PDL, the eager one without: same tokens."""
    path = make_model(str(tmp_path / "m"), "qwen2", init_scale=5.0)
    ref = load_model(path, device="cuda", backend="torch")
    tri = load_model(path, device="cuda", backend="triton")
    tri.ops.fused_gemv = True
    tri.ops.pdl = pdl
    ids = torch.randint(3, 320, (9,), generator=torch.Generator().manual_seed(2)).cuda()
    _decode_logits_match(ref, tri, ids)
    kw = dict(device="cuda", dtype=torch.bfloat16, backend="triton", max_batch_size=2)
    eager, graphed = load_model(path, **kw), load_model(path, **kw)
    for m in (eager, graphed):
        m.ops.fused_gemv = True
    graphed.ops.pdl = pdl
    graphed.capture_decode()
    graphed.capture_decode_rows((1, 2))
    for n in (7, 8, 30):                         # the one-step graph, one step in flight
        assert graphed.generate(ids.tolist(), n, stop_at_eos=False) == \
            eager.generate(ids.tolist(), n, stop_at_eos=False)
    for m in (eager, graphed):                   # the batched step, 1 row then 2
        m.prefill_rows([ids[:5], ids[:3]], [0, 1])
    toks = {id(m): [ids[5:6]] for m in (eager, graphed)}
    for slots in ([1], [1], [0, 1], [0, 1]):
        for m in (eager, graphed):
            t = torch.cat([toks[id(m)][-1]] * len(slots))
            toks[id(m)].append(torch.argmax(m.decode_rows(t, slots), dim=-1)[-1:])
    assert [int(t) for t in toks[id(eager)]] == [int(t) for t in toks[id(graphed)]]


def test_device_position_paths_match_int_positions(ckpt):
    """The one-sequence graph bodies' forward (`Model.forward_at`), run eagerly: positions
    as a [1] device tensor (read only in the kernels: decode attention adds the 1 to get
    the length) give the same logits as host-int positions."""
    ref = load_model(ckpt, backend="torch")
    tri = load_model(ckpt, backend="triton")
    torch.manual_seed(3)
    ids = torch.randint(3, 320, (14,))
    for m in (ref, tri):
        m.cache.reset()
        m.prefill(ids[:9])
    pos = torch.tensor([9])
    got = tri.forward_at(ids[9:10], pos)                                 # one token
    torch.testing.assert_close(got[0], ref.decode_one_token(ids[9:10]), atol=2e-4, rtol=0)
    tri.cache.length = 10
    pos.fill_(10)
    got = tri.forward_at(ids[10:13], pos)                                # a 3-token chunk
    torch.testing.assert_close(got, ref.forward(ids[10:13], 10), atol=2e-4, rtol=0)


# ops that launch no kernel: allocation, views and metadata
_NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.select.int",
              "aten.split_with_sizes.default", "aten.t.default", "aten.unsqueeze.default",
              "aten.view.default", "aten._unsafe_view.default", "aten.slice.Tensor",
              "aten.expand.default", "aten.as_strided.default", "aten.alias.default",
              "aten.detach.default"}


def _count_launches(fn):
    """Run fn and count what it launches: each Triton kernel (by name) and each torch op
    that runs a kernel (views and allocations left out; the interpreter's own tensor work
    during a Triton launch is not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction
    counts, inside = {}, [0]
    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        name = "triton:" + self.fn.__name__
        counts[name] = counts.get(name, 0) + 1
        inside[0] += 1
        try:
            return real_run(self, *args, **kwargs)
        finally:
            inside[0] -= 1

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and str(func) not in _NO_KERNEL:
                counts[str(func)] = counts.get(str(func), 0) + 1
            return func(*args, **(kwargs or {}))

    InterpretedFunction.run = run
    try:
        with Count():
            fn()
    finally:
        InterpretedFunction.run = real_run
    mm = counts.pop("aten.mm.default", 0) + counts.pop("aten.addmm.default", 0)  # cuBLAS
    if mm:
        counts["matmul"] = mm
    return counts


@pytest.mark.parametrize("fused", [True, False])
def test_decode_step_launch_count(ckpt, fused):
    """What a graph-captured greedy step launches, counted on the eager run of the graph
    body: with fused_gemv, 4 gemvs + 1 attention per layer and the lm_head gemv, plus the
    embedding and the argmax; nothing else (no per-layer length or position arithmetic).
    Without it: 2 norms, 4 matmuls, 1 attention, 1 SwiGLU per layer + final norm + lm_head."""
    tri = load_model(ckpt, backend="triton")
    tri.ops.fused_gemv = fused
    L = tri.config.num_layers
    tri.prefill(torch.tensor([3, 4, 5, 6]))
    tok, pos = torch.tensor([7]), torch.tensor([4])
    tri.forward_at(tok, pos)                                # warm-up: one-time allocations
    got = _count_launches(lambda: torch.argmax(tri.forward_at(tok, pos), dim=-1))
    if fused:
        want = {"triton:_gemv_kernel": 4 * L + 1, "triton:_decode_attention_kernel": L}
    else:
        want = {"triton:_rms_norm_kernel": 2 * L + 1, "matmul": 4 * L + 1,
                "triton:_decode_attention_kernel": L, "triton:_swiglu_kernel": L}
    want.update({"aten.embedding.default": 1, "aten.argmax.default": 1})
    assert got == want


def test_set_decode_kernels(ckpt):
    """Model.set_decode_kernels: triton only, not after a capture, None keeps a setting;
    WSD(fused_gemv=, pdl=) sets both models before capturing."""
    from wsd_engine.errors import ConfigError
    tri = load_model(ckpt, backend="triton")
    tri.set_decode_kernels(fused_gemv=True)
    assert tri.ops.fused_gemv and not tri.ops.pdl
    tri.set_decode_kernels(pdl=True)
    assert tri.ops.fused_gemv and tri.ops.pdl
    with pytest.raises(ConfigError, match="True, False or None"):
        tri.set_decode_kernels(pdl="on")
    tri.graphs["decode"] = {}                        # as if a graph had been captured
    with pytest.raises(ConfigError, match="clear_graphs"):
        tri.set_decode_kernels(fused_gemv=False)
    tri.set_decode_kernels(fused_gemv=True)          # no change: allowed
    tri.clear_graphs()
    tri.set_decode_kernels(fused_gemv=False)
    assert not tri.ops.fused_gemv
    ref = load_model(ckpt, backend="torch")
    ref.set_decode_kernels(fused_gemv=False, pdl=False)    # nothing to do: fine
    with pytest.raises(ConfigError, match="pdl needs backend='triton'"):
        ref.set_decode_kernels(pdl=True)
    w = WSD(load_model(ckpt, backend="triton"), load_model(ckpt, backend="triton"),
            fused_gemv=True, pdl=True)
    assert all(m.ops.fused_gemv and m.ops.pdl for m in (w.pilot, w.base))


def test_batched_wsd_on_the_triton_kernels_equals_torch(tmp_path):
    """The batched engine on the triton backend (per-row decode / varlen prefill attention,
    the per-row switch_score kernel with the float64 rule) gives the torch engine's rows."""
    from wsd_engine import load_model
    from wsd_engine.synthetic import make_wsd_pair
    pair = make_wsd_pair(str(tmp_path), sharpen=100.0, damp=0.02, perturb=0.05)
    prompts = ["Tell me about the quick brown fox.", "Why is the sky blue?", "Hi there"]
    qs = [WSDParams(draft_max_tokens=12, max_new_tokens=16, chunk=c, window=w, threshold=t)
          for c, w, t in ((3, 4, 0.8), (5, 3, 0.3), (4, 2, 0.95))]
    tri = WSD(load_model(pair[0], backend="triton", max_batch_size=2),
              load_model(pair[1], backend="triton", max_batch_size=2))
    got = tri.generate(prompts, qs)
    want = [WSD.from_pretrained(*pair).generate(p, q) for p, q in zip(prompts, qs)]
    assert [(r.token_ids, r.switch_index) for r in got] == \
        [(r.token_ids, r.switch_index) for r in want]
    assert any(r.switched for r in want)
