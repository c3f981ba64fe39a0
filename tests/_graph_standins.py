"""CUDA graphs stood in for on CPU: the graph-mode logic of the engine and the benchmark
suite runs in the tests, only the CUDA capture itself is left to the GPU tests."""
import torch


def eager_graphs(monkeypatch) -> list:
    """Every Model._capture returns a stand-in whose replay() runs the captured body again
    on the same static buffers and copies the result into the same output buffer: static
    buffers, device positions, padding, row picks and cache lengths behave as with a real
    graph. The triton backend counts as able to capture. Returns the list of replayed
    graph sizes (n_tokens), appended at each replay."""
    from wsd_engine.runner import Model
    replays = []

    def capture(self, n_tokens, body, n_cache=None):
        self.cache.check_fits(0, n_tokens if n_cache is None else n_cache)
        tok = torch.zeros(n_tokens, dtype=torch.int64, device=self.device)
        pos = torch.zeros(1, dtype=torch.int64, device=self.device)
        g = {"token": tok, "pos": pos, "out": body(tok, pos).clone()}

        class Replay:
            def replay(self_):
                replays.append(n_tokens)
                g["out"].copy_(body(tok, pos))
        g["graph"] = Replay()
        self.cache.reset()
        return g
    monkeypatch.setattr(Model, "_capture", capture)
    monkeypatch.setattr(Model, "can_capture", property(lambda self: self.backend == "triton"))
    return replays


def stub_decode_timing(monkeypatch, ms=lambda m: 1.0 - 0.1 * m.ops.fused_gemv) -> None:
    """Model._time_decode_step without CUDA events: the decode step captured (a stand-in)
    and replayed once after a prefill, as the real one does; the time from `ms(model)`."""
    from wsd_engine.runner import Model

    def timing(self, context, replays):
        self.capture_decode()
        ids = torch.randint(0, self.config.vocab_size, (context,),
                            generator=torch.Generator().manual_seed(0)).to(self.device)
        if context > 1:
            self.forward(ids[:-1], 0)
        logits = self._replay(self._graphs["decode"], ids[-1:], context - 1).float().clone()
        return ms(self), logits
    monkeypatch.setattr(Model, "_time_decode_step", timing)
