"""Tensor parallelism on torch.distributed: the rank processes, the command channel that
keeps them in step, and the collectives of a sharded forward.

One model is split over N ranks (`sharding` says which slices each holds). The caller's
process is rank 0 and drives: every public phase of a tensor-parallel `Model` (prefill,
decode, the batched rows, scoring, cache truncation, graph capture, ...) is *mirrored*:
rank 0 first broadcasts the call — its name and arguments, tensors included — and then
runs it; ranks 1..N-1 are worker processes (started with `spawn`, or by `torchrun`) that
wait for the next call and run the same phase on their shard. Inside a phase the ranks
meet in the forward's collectives: one all-reduce after each row-parallel matmul, one for
the vocabulary-parallel embedding, an all-gather of the vocabulary shards' logits, and for
WSD scoring an all-gather of a few floats per token (each shard's max, sum of
exponentials, best logit and the draft token's logit) — never the [tokens, V] logits.

Two process groups: a gloo "control" group for the commands (CPU; its long timeout lets
idle workers wait for hours) and a "compute" group for the collectives (NCCL on CUDA, gloo
on CPU). Commands are encoded as int64 tensors (a name, then tagged values) and tensors
travel as bytes: nothing is pickled.

Faults: a worker that dies is noticed at once (its process exits, gloo sees the closed
connection; on CUDA a monitor thread aborts the NCCL group) and the call in progress, or
the next one, raises TensorParallelError; the model must then be closed and loaded again.
A worker that fails a call with anything but a deterministic input error (which rank 0
raises at the same point) reports it and exits, which rank 0 turns into the same error.
Workers exit when rank 0 closes the model, when rank 0's process exits, and when it dies
(they watch their parent).
"""
from __future__ import annotations

import atexit
import datetime
import functools
import inspect
import multiprocessing as mp
import numbers
import os
import struct
import threading
import time
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import (ConfigError, ModelLoadError, RequestError, TensorParallelError,
                     UnsupportedModelError, WSDError)

# idle workers wait on the control group between calls: no timeout that an idle engine
# could reach
CONTROL_TIMEOUT = datetime.timedelta(days=365)
# one collective of a call: a safety net only (a dead peer is noticed at once)
COMPUTE_TIMEOUT = datetime.timedelta(seconds=600)
START_TIMEOUT_S = 180.0       # a worker process started, torch imported, connected
LOAD_TIMEOUT_S = 3600.0       # every rank's shard loaded (a 405B over 8 slow disks: minutes)
CLOSE_WAIT_S = 30.0           # close(): how long a call running in another thread may finish
HEADER = 64                   # int64 words of a command's first broadcast
_CLOSE, _DROP = "__close__", "__drop__"
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
# the errors a worker may report from loading, raised again by rank 0 with the same type
_LOAD_ERRORS = {c.__name__: c for c in (ModelLoadError, ConfigError, UnsupportedModelError)}

_COMMANDS: dict[str, object] = {}           # mirrored method names -> their functions


def mirrored(fn):
    """Decorator of a `Model` phase: on a tensor-parallel model rank 0 broadcasts the call
    to the other ranks before running it (calls made from inside another mirrored call are
    not broadcast: the workers make them too)."""
    sig = inspect.signature(fn)
    odd = [p.name for p in sig.parameters.values()
           if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if odd:      # the workers get the arguments by position
        raise TypeError(f"mirrored {fn.__name__}: parameters {odd} must be positional")
    _COMMANDS[fn.__name__] = fn

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        tp = self.tp
        if tp is None:
            return fn(self, *args, **kwargs)
        with tp.command(fn.__name__, sig, self, args, kwargs):
            return fn(self, *args, **kwargs)
    return call


# ---- the collectives of a sharded forward ----------------------------------------------
class Collectives:
    """One rank's collectives over the compute group, with its vocabulary range."""

    def __init__(self, pg, plan, vocab_size: int):
        self.pg, self.world = pg, plan.world
        self.v0, self.v1 = plan.vocab
        self.vocab_shard, self.vocab_size = plan.vocab_shard, vocab_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self.pg.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[N, *x.shape]: every rank's x, in rank order."""
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)]
        self.pg.allgather([out], [x]).wait()
        return torch.stack(out)

    def embed(self, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel embedding: rows of this rank's tokens, zeros for the others,
        summed over the ranks (one non-zero term per element: exact)."""
        local = tokens - self.v0
        inside = (local >= 0) & (local < weight.shape[0])
        e = F.embedding(torch.where(inside, local, torch.zeros_like(local)), weight)
        e = torch.where(inside[:, None], e, torch.zeros((), dtype=e.dtype, device=e.device))
        return self.all_reduce(e)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, V_r] logits of this rank's vocabulary rows -> [T, V] of all ranks."""
        n = logits.shape[-1]
        if n < self.vocab_shard:            # the last shard is shorter: pad, cut after
            logits = F.pad(logits, (0, self.vocab_shard - n))
        parts = self.all_gather(logits)                                  # [N, T, Vs]
        return torch.cat(list(parts.unbind(0)), dim=-1)[..., :self.vocab_size]


# ---- the command channel ------------------------------------------------------------------
def _encode(v, ints: list, tensors: list, device: torch.device) -> None:
    """Append value `v` to a command: tagged int64 words in `ints`, its tensors (to send
    after the words) in `tensors`. RequestError for what cannot be sent."""
    if v is None:
        ints.append(0)
    elif isinstance(v, bool):
        ints += [1, int(v)]
    elif isinstance(v, numbers.Integral):
        if not -2 ** 63 <= int(v) < 2 ** 63:
            raise RequestError(f"integer argument {v} does not fit in 64 bits")
        ints += [2, int(v)]
    elif isinstance(v, float):
        ints += [3, struct.unpack("<q", struct.pack("<d", v))[0]]
    elif isinstance(v, (list, tuple)):
        ints += [4, len(v)]
        for x in v:
            _encode(x, ints, tensors, device)
    elif isinstance(v, torch.Tensor):
        if v.dtype not in _DTYPES:
            raise RequestError(f"a {v.dtype} tensor cannot be sent to the other ranks; use "
                               "a float or integer tensor")
        if v.device.type != "cpu" and v.device != device:
            raise RequestError(f"a tensor on {v.device} was given to a model on {device}; "
                               f"move it to {device} (or the CPU)")
        ints += [5, _DTYPES.index(v.dtype), int(v.device.type == "cuda"), v.dim(), *v.shape]
        tensors.append(v)
    else:
        raise RequestError(f"a {type(v).__name__} cannot be sent to the other ranks of a "
                           "tensor-parallel model (a call takes tensors, numbers, None and "
                           "lists of those)")


class _Pending:
    """A decoded tensor argument whose bytes come in the next broadcasts."""

    __slots__ = ("dtype", "cuda", "shape", "tensor")

    def __init__(self, dtype, cuda, shape):
        self.dtype, self.cuda, self.shape, self.tensor = dtype, cuda, shape, None


def _decode(ints: list, i: int, specs: list):
    tag = ints[i]
    if tag == 0:
        return None, i + 1
    if tag == 1:
        return bool(ints[i + 1]), i + 2
    if tag == 2:
        return ints[i + 1], i + 2
    if tag == 3:
        return struct.unpack("<d", struct.pack("<q", ints[i + 1]))[0], i + 2
    if tag == 4:
        out, i = [], i + 2
        for _ in range(ints[i - 1]):
            x, i = _decode(ints, i, specs)
            out.append(x)
        return out, i
    if tag == 5:
        nd = ints[i + 3]
        holder = _Pending(_DTYPES[ints[i + 1]], bool(ints[i + 2]), tuple(ints[i + 4:i + 4 + nd]))
        specs.append(holder)
        return holder, i + 4 + nd
    raise TensorParallelError(f"corrupt command from rank 0 (tag {tag})")


class TPGroup:
    """This process's place in one tensor-parallel model: rank, groups, the collectives,
    and on rank 0 the worker processes and the channel that drives them."""

    def __init__(self, rank: int, world: int, plan, store, ctl, dev, device: torch.device,
                 vocab_size: int, procs=(), lock=None):
        self.rank, self.world, self.plan, self.device = rank, world, plan, device
        self._store, self._ctl, self._dev = store, ctl, dev
        self.comm = Collectives(dev, plan, vocab_size)
        self._procs = list(procs)
        # one call at a time, whole: the model's own lock (the one its cache's users hold),
        # so that no thread can hold one of the two and wait for the other
        self._lock = threading.RLock() if lock is None else lock
        self._failed: str | None = None
        self._closed = False
        self._next_key = 0
        self._drops: list[int] = []
        # re-entrant: a collected handle's finalizer may run inside _flush_drops
        self._drops_lock = threading.RLock()
        self._tls = threading.local()            # this thread's mirrored-call depth
        self._close_hooks: list = []
        self._monitor = None
        if rank == 0:
            _LIVE.add(self)
            if device.type == "cuda" and self._procs:
                self._monitor = threading.Thread(target=self._watch_workers, daemon=True,
                                                 name="wsd-tp-monitor")
                self._monitor.start()

    # ---- rank 0: driving ---------------------------------------------------------------
    @contextmanager
    def command(self, name: str, sig, model, args, kwargs):
        """Around a mirrored call: rank 0 (outermost call) broadcasts it first. The call is
        encoded before anything is sent (an argument that cannot be sent is a RequestError
        and nothing happened); once the first byte is out, anything that breaks the call
        off on rank 0 but an input check (a KeyboardInterrupt, a failed send) marks the
        model failed, because the workers are then out of step."""
        with self._lock:
            depth = self.call_depth
            lead = self.rank == 0 and depth == 0
            if lead:
                self._check_usable()
                bound = sig.bind(model, *args, **kwargs)
                bound.apply_defaults()
                msg = self._encode_call(name, list(bound.args[1:]))
            self._tls.depth = depth + 1
            try:
                if lead:
                    self._flush_drops()
                    self._send(*msg)
                yield
            except (WSDError, ValueError):
                raise        # an input check: every rank raised it at the same point
            except BaseException as e:
                if lead:
                    self._fail(e)
                raise
            finally:
                self._tls.depth = depth

    @property
    def call_depth(self) -> int:
        """How many mirrored calls this thread is inside (0: none)."""
        return getattr(self._tls, "depth", 0)

    def _encode_call(self, name: str, args: list) -> tuple[list, list]:
        ints: list[int] = []
        tensors: list[torch.Tensor] = []
        nb = name.encode()
        ints += [len(nb), *nb]
        _encode(args, ints, tensors, self.device)
        return ints, tensors

    def _send(self, ints: list, tensors: list) -> None:
        """Broadcast an encoded call; a failure half-way fails the model (`_fail`)."""
        try:
            self._post(ints, tensors)
        except BaseException as e:  # noqa: BLE001 - a worker is gone, or an interrupt
            self._fail(e)

    def _post(self, ints: list, tensors: list) -> None:
        """The broadcasts of one encoded call: its words (a fixed header, the rest if
        longer), then each tensor's bytes (on the compute group when on the GPU)."""
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0] = len(ints)
        head = ints[:HEADER - 1]
        header[1:1 + len(head)] = torch.tensor(head, dtype=torch.int64)
        self._ctl.broadcast(header, 0).wait()
        if len(ints) > HEADER - 1:
            self._ctl.broadcast(torch.tensor(ints[HEADER - 1:], dtype=torch.int64), 0).wait()
        for t in tensors:
            if t.numel():
                buf = t.detach().contiguous().reshape(-1).view(torch.uint8)
                (self._dev if buf.is_cuda else self._ctl).broadcast(buf, 0).wait()

    def _check_usable(self) -> None:
        if self._closed:
            raise TensorParallelError("this tensor-parallel model is closed; load it again")
        if self._failed is None:
            dead = self._dead_workers()
            if dead:
                self._failed = dead
                self._stop_workers(graceful=False)
        if self._failed is not None:
            raise TensorParallelError(self._failed)

    def _fail(self, e: BaseException):
        """The ranks are out of step (a worker died, or this call broke off half-way):
        no call can run any more. Stops the workers and raises TensorParallelError."""
        if self._failed is None:
            time.sleep(0.2)                  # let a dying worker's exit code land
            self._failed = self._dead_workers() or (
                f"a tensor-parallel call broke off half-way ({type(e).__name__}: "
                f"{str(e)[:300]}); the ranks are out of step")
            self._failed += "; close() this model and load it again"
            self._stop_workers(graceful=False)
        if not isinstance(e, Exception):
            raise e                          # an interrupt stays one (the model is failed)
        raise TensorParallelError(self._failed) from e

    def _dead_workers(self) -> str | None:
        for r, p in enumerate(self._procs, start=1):
            if p.exitcode is not None:
                why = self._reported(r)
                return (f"tensor-parallel rank {r} (process {p.pid}) exited with code "
                        f"{p.exitcode}" + (f": {why}" if why else ""))
        return None

    def _reported(self, rank: int) -> str | None:
        try:
            if self._store is not None and self._store.check([f"error/{rank}"]):
                return self._store.get(f"error/{rank}").decode(errors="replace")
        except Exception:  # noqa: BLE001 - the report is a nicety
            pass
        return None

    def _watch_workers(self) -> None:
        """CUDA: a dead worker leaves NCCL collectives waiting; abort them."""
        from multiprocessing.connection import wait
        wait([p.sentinel for p in self._procs])
        if not self._closed:
            abort = getattr(self._dev, "abort", None)
            if abort is not None:
                try:
                    abort()
                except Exception:  # noqa: BLE001
                    pass

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1 started here (empty on a worker)."""
        return [p.pid for p in self._procs]

    # ---- parked sequences (sharing.CacheResidency on a tensor-parallel model) ----------
    def new_key(self) -> int:
        self._next_key += 1
        return self._next_key

    def drop_later(self, key: int) -> None:
        """A parked copy's handle is gone: the ranks drop their copies with the next call
        (never from inside a garbage-collector callback)."""
        with self._drops_lock:
            self._drops.append(key)

    def _flush_drops(self) -> None:
        with self._drops_lock:
            keys, self._drops = self._drops, []
        if keys:
            self._send(*self._encode_call(_DROP, [keys]))

    # ---- closing -------------------------------------------------------------------------
    def on_close(self, hook) -> None:
        """Run `hook()` when the model closes (torchrun: its process groups go)."""
        self._close_hooks.append(hook)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, wait: float = CLOSE_WAIT_S) -> None:
        """Stop the workers (rank 0). Waits up to `wait` seconds for a call running in
        another thread to end; past that (a call that cannot end: a worker stuck), the
        workers are stopped without it. Idempotent."""
        got = self._lock.acquire(timeout=wait)
        try:
            if self._closed:
                return
            self._closed = True
            if self.rank == 0:
                if got and self._failed is None and self._dead_workers() is None:
                    try:
                        self._post(*self._encode_call(_CLOSE, []))
                    except Exception:  # noqa: BLE001 - stopped below anyway
                        pass
                self._stop_workers(graceful=got)
            if got:
                for hook in self._close_hooks:
                    hook()
                self._ctl = self._dev = self._store = None
            _LIVE.discard(self)
        finally:
            if got:
                self._lock.release()

    def _stop_workers(self, graceful: bool) -> None:
        stop_processes(self._procs, 10.0 if graceful else 0.0)

    # ---- workers: serving ----------------------------------------------------------------
    def _recv(self):
        header = torch.zeros(HEADER, dtype=torch.int64)
        self._ctl.broadcast(header, 0).wait()
        n = int(header[0])
        ints = header[1:1 + min(n, HEADER - 1)].tolist()
        if n > HEADER - 1:
            rest = torch.zeros(n - (HEADER - 1), dtype=torch.int64)
            self._ctl.broadcast(rest, 0).wait()
            ints += rest.tolist()
        ln = ints[0]
        name = bytes(ints[1:1 + ln]).decode()
        specs: list = []
        args, _ = _decode(ints, 1 + ln, specs)
        for h in specs:
            nbytes = h.dtype.itemsize * _numel(h.shape)
            buf = torch.empty(nbytes, dtype=torch.uint8,
                              device=self.device if h.cuda else torch.device("cpu"))
            if nbytes:
                (self._dev if buf.is_cuda else self._ctl).broadcast(buf, 0).wait()
            h.tensor = buf.view(h.dtype).reshape(h.shape)
        return name, _resolve(args)

    def serve(self, model) -> bool:
        """A worker's loop: run rank 0's calls until it closes the model or goes away
        (True), or a call fails on this rank alone (reported; False)."""
        while True:
            try:
                name, args = self._recv()
            except Exception:  # noqa: BLE001 - rank 0 is gone
                return True
            if name == _CLOSE:
                return True
            if name == _DROP:
                model.drop_parked(args[0])
                continue
            if name not in _COMMANDS:
                self._report(TensorParallelError(f"unknown command {name!r} from rank 0"))
                return False
            try:
                getattr(model, name)(*args)
            except (WSDError, ValueError):
                continue      # rank 0 raised the same at the same point
            except BaseException as e:  # noqa: BLE001 - out of step: report and exit
                self._report(e)
                return False
        return True

    def _report(self, e: BaseException) -> None:
        try:
            self._store.set(f"error/{self.rank}", f"{type(e).__name__}: {str(e)[:2000]}")
        except Exception:  # noqa: BLE001
            pass


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _resolve(v):
    """Decoded arguments with the received tensors in place of their placeholders."""
    if isinstance(v, _Pending):
        return v.tensor
    if isinstance(v, list):
        return [_resolve(x) for x in v]
    return v


def stop_processes(procs, grace: float) -> None:
    """Join each process for `grace` seconds, then terminate, then kill: none is left."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)


_LIVE: "weakref.WeakSet[TPGroup]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for g in list(_LIVE):
        try:
            g.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


# ---- starting the ranks -----------------------------------------------------------------
def _groups(store, rank: int, world: int, device: torch.device):
    """(control group, compute group): gloo for commands; NCCL (CUDA) or gloo (CPU)."""
    ctl = dist.ProcessGroupGloo(dist.PrefixStore("wsd/ctl", store), rank, world, CONTROL_TIMEOUT)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = COMPUTE_TIMEOUT
        dev = dist.ProcessGroupNCCL(dist.PrefixStore("wsd/dev", store), rank, world, opts)
    else:
        dev = dist.ProcessGroupGloo(dist.PrefixStore("wsd/dev", store), rank, world,
                                    COMPUTE_TIMEOUT)
    return ctl, dev


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """A rank's device: cuda:<its rank on this node>, or the CPU."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else torch.device("cpu")


def check_devices(device: torch.device, world: int) -> None:
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise ConfigError(f"tensor parallelism puts rank r on cuda:r; give device='cuda' "
                              f"(got {device})")
        n = torch.cuda.device_count()
        if n < world:
            raise ConfigError(f"tensor_parallel={world} needs {world} CUDA devices, this "
                              f"machine has {n}; use tensor_parallel <= {n}, or device='cpu' "
                              "(gloo)")


def launch(world: int, device: torch.device, spec: dict, build, start_timeout=START_TIMEOUT_S,
           load_timeout: float | None = LOAD_TIMEOUT_S):
    """Rank 0: start ranks 1..world-1 (spawned processes running `_worker_main` with
    `spec`), connect the groups, build rank 0's shard with `build(group_args)` while the
    workers build theirs, and wait until every rank is ready. Any failure stops every
    worker and raises here once (a worker's load error as its own type)."""
    host = "127.0.0.1"
    store = dist.TCPStore(host, 0, world, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=start_timeout))
    ctx = mp.get_context("spawn")
    procs = []
    try:
        for r in range(1, world):
            p = ctx.Process(target=_worker_main, args=(r, world, host, store.port, spec),
                            daemon=True, name=f"wsd-tp-rank{r}")
            p.start()
            procs.append(p)
        _wait_ranks(store, procs, "hello", start_timeout)
        ctl, dev = _groups(store, 0, world, device)
        model = build(dict(rank=0, world=world, store=store, ctl=ctl, dev=dev, procs=procs))
        try:
            _wait_ranks(store, procs, "ready", load_timeout)
        except BaseException:
            model.tp.close()
            raise
        return model
    except BaseException:
        stop_processes(procs, 0.0)
        raise


def _wait_ranks(store, procs, what: str, timeout: float | None, world: int | None = None) -> None:
    """Until every worker set `what/r`; a worker's error report is raised as its type.
    `procs`: the workers' processes (their exit is noticed), or empty with `world`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(range(1, (world or len(procs) + 1)))
    while pending:
        for r in sorted(pending):
            if store.check([f"error/{r}"]):
                raise _worker_error(store.get(f"error/{r}").decode(errors="replace"))
            if store.check([f"{what}/{r}"]):
                pending.discard(r)
                continue
            p = procs[r - 1] if procs else None
            if p is not None and p.exitcode is not None:
                raise TensorParallelError(f"tensor-parallel rank {r} (process {p.pid}) exited "
                                          f"with code {p.exitcode} while starting")
        if pending:
            if deadline is not None and time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks {sorted(pending)} did not "
                                          f"start within {timeout:.0f} s")
            time.sleep(0.02)


def _worker_error(report: str) -> Exception:
    kind, _, msg = report.partition(": ")
    cls = _LOAD_ERRORS.get(kind)
    return cls(msg) if cls is not None else TensorParallelError(
        f"a tensor-parallel rank failed while loading: {report}")


def _watch_parent() -> None:
    """A worker exits as soon as the process that started it is gone."""
    parent = os.getppid()

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)
    threading.Thread(target=watch, daemon=True, name="wsd-tp-parent").start()


def _worker_main(rank: int, world: int, host: str, port: int, spec: dict) -> None:
    _watch_parent()
    try:
        store = dist.TCPStore(host, port, world, False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    except Exception:  # noqa: BLE001 - rank 0 is gone already
        os._exit(2)
    try:
        device = rank_device(torch.device(spec["device"]), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        store.set(f"hello/{rank}", "1")
        ctl, dev = _groups(store, rank, world, device)
        from .loading import load_shard
        model = load_shard(spec, dict(rank=rank, world=world, store=store, ctl=ctl, dev=dev,
                                      procs=()))
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which raises it
        store.set(f"error/{rank}", f"{type(e).__name__}: {str(e)[:4000]}")
        os._exit(1)
    store.set(f"ready/{rank}", "1")
    os._exit(0 if model.tp.serve(model) else 1)


# ---- started by torchrun (several nodes) ---------------------------------------------------
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_torchrun_models = 0          # split models made in this job: each gets its own store keys
_own_default_group = False    # the default group was initialised here (not by the script)


def _leave_default_group() -> None:
    """Destroy the default process group if `join_torchrun` initialised it. Left to the
    interpreter's exit, gloo's threads may still be running when the process tears down,
    and the process aborts (SIGABRT) after the script has finished."""
    global _own_default_group
    if _own_default_group and dist.is_initialized():
        dist.destroy_process_group()
    _own_default_group = False


def torchrun_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (env:// variables set)."""
    if all(k in os.environ for k in _TORCHRUN_VARS):
        return int(os.environ["WORLD_SIZE"])
    return None


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def torchrun_device(device: torch.device) -> torch.device:
    """A torchrun rank's device: on CUDA, cuda:LOCAL_RANK, made the current device before
    anything touches a GPU (a memory check on plain 'cuda' would otherwise open a context on
    GPU 0 in every process of the node, and check the wrong GPU). The CPU stays the CPU."""
    if device.type != "cuda":
        return device
    local = _local_rank()
    if local >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local} has no CUDA device (this node has "
                          f"{torch.cuda.device_count()}); start one process per GPU")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def torchrun_rank() -> int | None:
    """This process's RANK in a torchrun job (None outside one)."""
    return None if torchrun_world() is None else int(os.environ["RANK"])


def join_torchrun(world: int, device: torch.device, check, build):
    """Every process of a torchrun job runs the same script; this is its `load_model`.
    The default process group is initialised from env:// (gloo: the control group) and a
    compute group made (NCCL on CUDA: `device` is already cuda:LOCAL_RANK, made current by
    `torchrun_device`). Rank 0 runs `check()`
    (the checkpoint's headers) alone and reports a failure once; the other ranks then exit
    quietly (SystemExit 1). Rank 0 returns its shard of the model and drives; every other
    rank serves rank 0's calls here and leaves the script (SystemExit 0) when rank 0 closes
    the model."""
    global _own_default_group
    rank, local = int(os.environ["RANK"]), _local_rank()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=CONTROL_TIMEOUT)
        _own_default_group = True
    try:
        return _join(rank, local, world, device, check, build)
    except BaseException:
        _leave_default_group()
        raise


def _join(rank: int, local: int, world: int, device: torch.device, check, build):
    global _torchrun_models
    _torchrun_models += 1
    store = dist.PrefixStore(f"wsd/tp{_torchrun_models}",
                             dist.distributed_c10d._get_default_store())
    ctl = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    dev = dist.new_group(backend="nccl" if device.type == "cuda" else "gloo",
                         timeout=COMPUTE_TIMEOUT)
    if rank == 0:
        try:
            check()
        except BaseException as e:
            store.set("error/0", f"{type(e).__name__}: {str(e)[:4000]}")
            raise
        store.set("go", "1")
    else:
        while not store.check(["go"]):
            if store.check(["error/0"]):
                raise SystemExit(1)              # rank 0 reports it
            time.sleep(0.05)
    group = dict(rank=rank, world=world, store=store, ctl=ctl, dev=dev, procs=(),
                 local_rank=local)
    try:
        model = build(group)
    except BaseException as e:
        store.set(f"error/{rank}", f"{type(e).__name__}: {str(e)[:4000]}")
        if rank:
            raise SystemExit(1) from None
        raise
    if rank == 0:
        model.tp.on_close(lambda: _leave_groups(ctl, dev))
        try:
            _wait_ranks(store, (), "ready", LOAD_TIMEOUT_S, world)
        except BaseException:
            model.tp.close()
            raise
        return model
    store.set(f"ready/{rank}", "1")
    ok = model.tp.serve(model)
    _leave_groups(ctl, dev)
    raise SystemExit(0 if ok else 1)


def _leave_groups(ctl, dev) -> None:
    """A torchrun model's groups, then the default group if this module made it."""
    for g in (ctl, dev):
        dist.destroy_process_group(g)
    _leave_default_group()
