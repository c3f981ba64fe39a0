"""CUDA graphs stood in for on CPU: the graph-mode logic of the engine and the benchmark
suite runs in the tests, only the CUDA capture itself is left to the GPU tests."""
import torch


def eager_graphs(monkeypatch) -> list:
    """`graphs._record` (the one CUDA-only step of a capture) returns a stand-in whose
    replay() runs the captured body again on the same static buffers and copies the result
    into the same output buffer; everything else of capture and replay is the real code:
    static buffers, device positions, padding, row picks, bucket choice and cache lengths
    behave as with a real graph. The triton backend counts as able to capture. Returns the
    list of replayed graph kinds ("decode", ("prefill", b), ("rows", b)), appended at each
    replay."""
    from wsd_engine import graphs
    from wsd_engine.runner import Model
    replays, capturing = [], [None]

    def record(body):
        key, out = capturing[0], body().clone()

        class Replay:
            def replay(self_):
                replays.append(key)
                with torch.inference_mode():
                    out.copy_(body())
        return Replay(), out

    real_capture = graphs._capture

    def capture(model, key, g, body):
        capturing[0] = key
        real_capture(model, key, g, body)
    monkeypatch.setattr(graphs, "_record", record)
    monkeypatch.setattr(graphs, "_capture", capture)
    monkeypatch.setattr(Model, "can_capture", property(lambda self: self.backend == "triton"))
    return replays


def stub_decode_timing(monkeypatch, ms=lambda m: 1.0 - 0.1 * m.ops.fused_gemv) -> None:
    """tuning._time_decode_step without CUDA events: the decode step captured (a stand-in)
    and replayed once after a prefill, as the real one does; the time from `ms(model)`."""
    from wsd_engine import graphs, tuning

    def timing(model, context, replays):
        graphs.capture_decode(model)
        ids = torch.randint(0, model.config.vocab_size, (context,),
                            generator=torch.Generator().manual_seed(0)).to(model.device)
        if context > 1:
            model.forward(ids[:-1], 0)
        logits = graphs.replay_decode(model, ids[-1:], context - 1).float().clone()
        return ms(model), logits
    monkeypatch.setattr(tuning, "_time_decode_step", timing)
