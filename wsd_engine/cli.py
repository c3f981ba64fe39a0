"""`wsd-engine generate | demo | bench` (also `python -m wsd_engine`).

Every error ends the command with ONE line on stderr, `wsd-engine: ErrorType: message`,
and exit status 1 (2 for a usage error: an unknown option, a number that is not one). An
operating-system error (a folder that cannot be written, a full disk, a closed or full
standard output) is `wsd-engine: OSError: <reason>: <path>`. An unexpected exception (a
bug) prints `wsd-engine: internal error: ...` the same way; `WSD_ENGINE_DEBUG=1` in the
environment shows the traceback of any error instead (and the libraries' own warnings,
which the CLI otherwise silences so that they cannot add lines of their own).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import warnings

from .errors import ConfigError, RequestError, TokenizerError, WSDError

DEMO_PROMPT = "Tell me about the quick brown fox."
# written last into a --dir folder, next to pilot/ and base/: what the demo wrote there
# (the recipe and a SHA-256 of every file); a folder without it is never loaded or replaced
DEMO_MARKER = "wsd_engine_demo.json"
DEBUG_ENV = "WSD_ENGINE_DEBUG"
# The demo pair's files are well under 1 MB each (the largest, model.safetensors, ~0.5 MB)
# and a folder holds 6. Before a --dir folder is trusted its files are hashed: anything
# bigger than this, or more files than this, cannot be the demo's, and is refused unread
# (a forged marker next to a huge or endless file must not cost memory or time).
DEMO_MAX_FILE_BYTES = 16 << 20
DEMO_MAX_FILES = 64
_HASH_CHUNK = 1 << 20


# ------------------------------------------------------------------------- arguments

class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {s!r}")
    return v


def _params(a):
    from .engine import WSDParams
    kw = dict(window=a.window, threshold=a.threshold, draft_max_tokens=a.draft_max_tokens,
              max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
              top_k=a.top_k, seed=a.seed, chunk=a.chunk)
    if a.stop is not None:
        kw["stop"] = tuple(a.stop)
    return WSDParams(**kw)


def _add_common(p):
    p.add_argument("--window", type=int, default=6, metavar="W",
                   help="w: the switch rule's window, in draft tokens (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.8, metavar="GAMMA",
                   help="gamma in (0, 1]: the base takes over at the first window whose "
                        "geometric-mean probability reaches it (default: %(default)s)")
    p.add_argument("--draft-max-tokens", type=int, default=512, metavar="N",
                   help="most tokens the pilot drafts (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=2048, metavar="N",
                   help="most answer tokens, in base tokens, counting the kept draft "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature of both models; 0 = greedy "
                        "(default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling mass in (0, 1]; 1 = off (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the K most likely tokens; 0 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed; the same seed gives the same answer "
                        "(default: %(default)s)")
    p.add_argument("--chunk", type=int, default=8, metavar="C",
                   help="pilot tokens the base scores per forward; changes speed only, "
                        "never the output (default: %(default)s)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="a stop string of the base's continuation, repeatable "
                        "(default: [User] [System] [Assistant])")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--max-seq-len", type=_positive_int, default=None, metavar="N",
                   help="KV cache length of each model: a request needs prompt + "
                        "--draft-max-tokens <= the pilot's and prompt + --max-new-tokens <= "
                        "the base's (default: min(max_position_embeddings, 4096))")
    p.add_argument("--tensor-parallel", type=_positive_int, default=1, metavar="N",
                   help="split the base (or --model) over N ranks: N GPUs cuda:0..N-1 with "
                        "--device cuda, N processes with --device cpu (default: %(default)s)")
    p.add_argument("--backend", default="torch", choices=["torch", "triton"],
                   help="torch (runs anywhere) or triton (the fused kernels; for a GPU) "
                        "(default: %(default)s)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture both models' batched decode step as CUDA graphs (one per "
                        "batch-size bucket) once, replay them per token; needs --device cuda "
                        "--backend triton (default: off)")
    p.add_argument("--fused-gemv", action="store_true",
                   help="triton backend: one-token matmuls through the gemv kernel with the "
                        "norm / SwiGLU fused in (default: off)")
    p.add_argument("--pdl", action="store_true",
                   help="triton backend: launch the one-token kernels with programmatic "
                        "dependent launch, sm_90+ GPUs (default: off)")
    p.add_argument("--no-tune", action="store_true",
                   help="with --cuda-graphs and neither --fused-gemv nor --pdl, the one-token "
                        "kernels are timed on the GPU and the fastest kept (expected: a few "
                        "seconds per model); this keeps the default kernels instead "
                        "(default: off, i.e. tune)")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (default: text with the kept draft marked)")


def _not_utf8(text: str):
    """None if text is valid UTF-8 text; else (the offending bytes, their position).
    Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return text[e.start:e.end].encode("utf-8", "surrogateescape"), e.start
    return None


def _check_request(a) -> None:
    """What the CLI can check before loading anything: the device, the prompt and the
    folder names."""
    import torch
    try:
        kind = torch.device(a.device).type
    except (RuntimeError, ValueError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {a.device!r}; use cpu, cuda or cuda:N")
    bad = _not_utf8(a.prompt)
    if bad:
        raise RequestError(f"--prompt is not valid UTF-8 (bytes {bad[0]!r} at character "
                           f"{bad[1]}); pass the prompt as UTF-8 text")
    if not a.prompt.strip():
        raise RequestError("the prompt is empty; pass a non-empty --prompt")
    for opt in ("pilot", "base", "model", "dir"):
        path = getattr(a, opt, None)
        bad = _not_utf8(path) if path else None
        if bad:
            raise ConfigError(f"--{opt} {_show_path(path)} is not valid UTF-8 (bytes "
                              f"{bad[0]!r} at character {bad[1]}); the checkpoint libraries "
                              "need UTF-8 file names: use a folder whose name is UTF-8")


# ------------------------------------------------------------------------- output

def _show_path(path) -> str:
    """A file name as one printable line: bytes that are not UTF-8 as \\xNN, and a name with
    control characters (a newline, ...) quoted."""
    try:
        text = os.fsencode(path).decode("utf-8", "backslashreplace")
    except (TypeError, ValueError):
        text = str(path)
    return text if text.isprintable() else repr(text)


class _OutputError(OSError):
    """Writing the command's output failed (a full disk, a closed or unwritable stream):
    reported as an OSError, and whatever is left in the stream's buffer is thrown away so
    that the flush at exit does not fail (and print a traceback) again."""


@contextlib.contextmanager
def _writing(stream: str):
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise _OutputError(e.errno, e.strerror or str(e), stream) from None


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null: what is still buffered goes nowhere."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(fd, sys.stdout.fileno())
        finally:
            os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def _result_dict(r) -> dict:
    return {"text": r.text, "token_ids": r.token_ids, "switch_index": r.switch_index,
            "switched": r.switched, "finish_reason": r.finish_reason,
            "draft_tokens": r.draft_tokens, "base_tokens": r.base_tokens,
            "prompt_tokens": r.prompt_tokens, "timings": r.timings,
            "tokens_per_second": r.tokens_per_second, "rollbacks": r.rollbacks}


def _show(r, as_json: bool, out=None):
    with _writing("standard output"):
        _write_result(r, as_json, out or sys.stdout)


def _write_result(r, as_json: bool, out):
    if as_json:
        json.dump(_result_dict(r), out, indent=1)
        out.write("\n")
        return
    color = out.isatty()
    mark = ("\033[1;36m", "\033[0m") if color else ("\u00ab", "\u00bb")
    n = len(r.draft_text)
    drafted, rest = (r.text[:n], r.text[n:]) if r.text.startswith(r.draft_text) else ("", r.text)
    out.write(f"{mark[0]}{drafted}{mark[1]}{rest}\n\n")
    how = "switched" if r.switched else "no window passed; whole draft kept"
    out.write(f"k = {r.switch_index} draft tokens kept ({how}); pilot drafted {r.draft_tokens}, "
              f"base wrote {r.base_tokens}; finish: {r.finish_reason}\n")
    t = r.timings
    out.write("timings (s): " + ", ".join(f"{k} {v:.4f}" for k, v in t.items())
              + f"; {r.tokens_per_second:.1f} tok/s\n")
    if not color:
        out.write("(\u00ab\u00bb marks the pilot's kept draft)\n")


# ------------------------------------------------------------------------- generate

def cmd_generate(a):
    if a.model and (a.pilot or a.base):
        print("wsd-engine generate: error: give either --model DIR (plain decoding with one "
              "model) or --pilot DIR and --base DIR (WSD), not both", file=sys.stderr)
        return 2
    if not a.model and not (a.pilot and a.base):
        print("wsd-engine generate: error: give --pilot DIR and --base DIR (or --model DIR for "
              "plain decoding with one model)", file=sys.stderr)
        return 2
    _check_request(a)
    from .engine import WSD
    from .loading import load_model
    # a bad value fails before any loading; with --model the WSD-only options are unused,
    # but every value given is still checked (a --threshold of 5 is an error either way)
    params = _params(a)
    if a.model:
        with load_model(a.model, device=a.device, dtype=a.dtype, max_seq_len=a.max_seq_len,
                        backend=a.backend, tensor_parallel=a.tensor_parallel) as m:
            return _generate_one(m, a, params)
    with WSD.from_pretrained(a.pilot, a.base, device=a.device, dtype=a.dtype,
                             max_seq_len=a.max_seq_len, backend=a.backend,
                             cuda_graphs=a.cuda_graphs,
                             fused_gemv=a.fused_gemv or None, pdl=a.pdl or None,
                             tune_kernels=False if a.no_tune else None,
                             tensor_parallel=a.tensor_parallel) as wsd:
        _show(wsd.generate(a.prompt, params), a.json)
    return 0


def _generate_one(m, a, params) -> int:
    """Plain decoding with one model (--model)."""
    m.set_decode_kernels(fused_gemv=a.fused_gemv or None, pdl=a.pdl or None)
    if a.cuda_graphs:
        if (m.can_capture and m.tensor_parallel == 1
                and not (a.no_tune or m.decode_kernels_chosen)):
            from .tuning import tune_decode_kernels
            tune_decode_kernels(m)
        m.capture_decode()
    try:
        ids = m.tokenizer.encode(a.prompt)          # with the tokenizer's BOS, if any
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise TokenizerError(f"the tokenizer failed on the prompt: {str(e)[:300]}; its files "
                             "are inconsistent (fix or replace the tokenizer)") from e
    new = m.generate(ids, max_new_tokens=params.max_new_tokens)
    text = m.tokenizer.decode(new, skip_special_tokens=True)
    with _writing("standard output"):
        print(json.dumps({"text": text, "token_ids": new}) if a.json else text)
    return 0


# ------------------------------------------------------------------------- demo

def _recipe() -> dict:
    from .synthetic import DEMO_PAIR
    return {"what": "wsd-engine demo pair", "format": 1, "recipe": DEMO_PAIR}


def _open_plain(path: str) -> int:
    """A read-only descriptor of the plain file at path: never through a symbolic link, and
    never blocking (a FIFO swapped in after a check would hang an open without O_NONBLOCK).
    Raises ConfigError for anything that is not a plain file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path} is not a plain file")
    return fd


def _hash_files(root: str) -> dict:
    """{"pilot/config.json": sha256, ...} of every file under root/pilot and root/base.
    Raises ConfigError for anything that is not a plain file (a link, a folder, ...), a
    file larger than DEMO_MAX_FILE_BYTES (refused before it is read) or more than
    DEMO_MAX_FILES files; a file is read in 1 MiB pieces, never whole."""
    out = {}
    for sub in ("pilot", "base"):
        d = os.path.join(root, sub)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{d} is not a folder")
        names = []
        with os.scandir(d) as it:
            for entry in it:
                names.append(entry.name)
                if len(names) > DEMO_MAX_FILES:
                    raise ConfigError(f"{d} holds more than {DEMO_MAX_FILES} files")
        for name in sorted(names):
            p = os.path.join(d, name)
            if not stat.S_ISREG(os.lstat(p).st_mode):
                raise ConfigError(f"{p} is not a plain file")
            fd = _open_plain(p)
            with os.fdopen(fd, "rb") as f:
                if os.fstat(fd).st_size > DEMO_MAX_FILE_BYTES:
                    raise ConfigError(f"{p} is larger than any file the demo writes")
                h, size = hashlib.sha256(), 0
                while chunk := f.read(_HASH_CHUNK):
                    size += len(chunk)
                    if size > DEMO_MAX_FILE_BYTES:       # it grew while being read
                        raise ConfigError(f"{p} is larger than any file the demo writes")
                    h.update(chunk)
                out[f"{sub}/{name}"] = h.hexdigest()
    return out


def _demo_pair_state(root: str) -> str | None:
    """None if root holds exactly the demo pair this version writes (the marker and every
    hash agree); "stale" if it holds a demo pair written with another recipe; else why not."""
    marker = os.path.join(root, DEMO_MARKER)
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return f"{DEMO_MARKER} is not a plain file"
        with os.fdopen(_open_plain(marker), "rb") as f:
            m = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        return f"no {DEMO_MARKER} marker"
    except ConfigError:
        return f"{DEMO_MARKER} is not a plain file"
    except (OSError, ValueError):
        return f"an unreadable {DEMO_MARKER}"
    if not isinstance(m, dict) or m.get("what") != _recipe()["what"]:
        return f"a {DEMO_MARKER} the demo did not write"
    try:
        files = _hash_files(root)
    except (OSError, ConfigError) as e:
        return str(e)
    if files != m.get("files"):
        return "files that differ from the ones the demo wrote"
    return None if {k: m.get(k) for k in ("format", "recipe")} == {
        k: _recipe()[k] for k in ("format", "recipe")} else "stale"


def _write_demo_pair(root: str) -> None:
    """Make the pair in a fresh private folder inside root, move pilot/ and base/ into
    place (a rename never follows a link, and fails rather than replace a non-empty
    folder or a file), then write the marker last."""
    from .synthetic import make_demo_pair
    try:
        tmp = tempfile.mkdtemp(prefix=".wsd_engine_demo_", dir=root)
    except OSError as e:            # e.g. /proc, /sys/kernel, a read-only folder
        raise OSError(e.errno, f"{e.strerror or e} (the demo cannot write into this --dir)",
                      root) from None
    try:
        make_demo_pair(tmp)
        marker = dict(_recipe(), files=_hash_files(tmp))
        for sub in ("pilot", "base"):
            try:
                os.rename(os.path.join(tmp, sub), os.path.join(root, sub))
            except OSError as e:
                raise ConfigError(f"cannot put the demo's {sub}/ into {root}: {e.strerror} "
                                  "(did something appear there meanwhile?)") from None
        with open(os.path.join(tmp, DEMO_MARKER), "w") as f:
            json.dump(marker, f, indent=1)
        os.replace(os.path.join(tmp, DEMO_MARKER), os.path.join(root, DEMO_MARKER))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prefixes(path: str):
    """/a, /a/b, /a/b/c for /a/b/c (an absolute, normalized path)."""
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        yield os.sep.join(parts[:i]) or os.sep


def demo_pair(root) -> tuple[str, str]:
    """The built-in demo pair in the user-chosen folder `root` (root/pilot, root/base):
    created if absent, reused only if the marker proves it is the demo pair. Never follows
    a symbolic link (root, root/pilot, root/base or the marker being one is an error), and
    never loads or replaces a folder it did not write (ConfigError). No part of the path
    may be a symbolic link either (an intermediate one, as in link/sub, is followed by every
    file operation): such a path is refused with the real path to give instead."""
    root = os.fsdecode(os.fspath(root))
    if not root:
        raise ConfigError("--dir is empty; give a folder (without --dir the demo uses a "
                          "temporary one)")
    bad = _not_utf8(root)
    if bad:
        raise ConfigError(f"--dir {_show_path(root)} is not valid UTF-8 (bytes {bad[0]!r} at "
                          f"character {bad[1]}); the checkpoint libraries need UTF-8 file "
                          "names: use a folder whose name is UTF-8")
    root = os.path.abspath(root)
    shown = _show_path(root)
    real = os.path.realpath(root)
    if real != root:
        link = next((p for p in _prefixes(root) if os.path.islink(p)), root)
        raise ConfigError(f"--dir {shown} goes through a symbolic link ({_show_path(link)}); "
                          f"the demo never follows one: pass the real path "
                          f"({_show_path(real)}) if that is the folder you mean")
    if os.path.lexists(root) and not os.path.isdir(root):
        raise ConfigError(f"--dir {shown} exists and is not a folder")
    os.makedirs(root, exist_ok=True)
    paths = {n: os.path.join(root, n) for n in ("pilot", "base", DEMO_MARKER)}
    for p in paths.values():
        if os.path.islink(p):
            raise ConfigError(f"{_show_path(p)} is a symbolic link; the demo never follows "
                              "one: remove it or choose another --dir")
    present = [p for n, p in paths.items() if n != DEMO_MARKER and os.path.lexists(p)]
    if present:
        state = _demo_pair_state(root)
        if state is None:
            return paths["pilot"], paths["base"]
        if state != "stale":
            raise ConfigError(
                f"--dir {shown} holds something other than the demo pair ({state}); the demo "
                f"neither loads nor overwrites it: choose a new or empty folder, or remove "
                f"{' and '.join(map(_show_path, present))}")
        for p in present:              # a verified demo pair of another recipe: ours
            shutil.rmtree(p)
    _write_demo_pair(root)
    return paths["pilot"], paths["base"]


def cmd_demo(a):
    _check_request(a)
    _params(a)                                   # a bad value fails before the pair is made
    if a.dir is not None:
        pilot, base = demo_pair(a.dir)
        return _run_demo(a, pilot, base, "")
    # a fresh private folder (mode 0700, unpredictable name), removed when the demo ends
    from .synthetic import make_demo_pair
    root = tempfile.mkdtemp(prefix="wsd_engine_demo_")
    try:
        pilot, base = make_demo_pair(root)
        return _run_demo(a, pilot, base, " (made in a temporary folder, removed when the demo "
                                         "ends; --dir DIR keeps them)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_demo(a, pilot: str, base: str, where: str) -> int:
    import torch
    from .engine import WSD
    with _writing("standard error" if a.json else "standard output"):
        print(f"tiny synthetic pilot and base (random 2-layer Llama models): {pilot}, {base}"
              f"{where}\nprompt: {a.prompt!r}\n", file=sys.stderr if a.json else sys.stdout)
    threads = torch.get_num_threads()
    if torch.device(a.device).type == "cpu":
        # 64-wide models: one CPU thread does each op fastest, and on a busy machine more
        # threads make the 2048-token default answer ~10x slower (they wait on each other)
        torch.set_num_threads(1)
    try:
        with WSD.from_pretrained(pilot, base, device=a.device, dtype=a.dtype,
                                 max_seq_len=a.max_seq_len, backend=a.backend,
                                 cuda_graphs=a.cuda_graphs,
                                 fused_gemv=a.fused_gemv or None, pdl=a.pdl or None,
                                 tune_kernels=False if a.no_tune else None,
                                 tensor_parallel=a.tensor_parallel) as wsd:
            _show(wsd.generate(a.prompt, _params(a)), a.json)
    finally:
        torch.set_num_threads(threads)
    return 0


# ------------------------------------------------------------------------- bench

def cmd_bench(argv) -> int:
    """`wsd-engine bench ARGS` = `python -m benchmarks.run ARGS`: the benchmark suite lives in
    the source checkout (benchmarks/ next to this package), not in an installed wheel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
        print("wsd-engine bench: benchmarks/ is not part of the installed package; run from a "
              "source checkout (`pip install -e .` there, or `python -m benchmarks.run` in it)",
              file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.run import main as bench_main
    return bench_main(list(argv))


# ------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="wsd-engine", description="Weak-to-Strong Decoding engine: a small "
                 "aligned pilot drafts the start of the answer, a base model takes over once "
                 "confident. Errors print one line; WSD_ENGINE_DEBUG=1 shows tracebacks.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{generate,demo,bench}")
    g = sub.add_parser("generate", help="WSD with a pilot and a base checkpoint folder",
                       description="WSD with a pilot and a base checkpoint folder (or plain "
                       "greedy decoding with one model: --model).")
    g.add_argument("--pilot", metavar="DIR",
                   help="the pilot: a small aligned chat model's checkpoint folder (no "
                        "default; give --pilot and --base, or --model)")
    g.add_argument("--base", metavar="DIR",
                   help="the base model's checkpoint folder (no default)")
    g.add_argument("--model", metavar="DIR",
                   help="plain greedy decoding with this one model instead of WSD; uses "
                        "--max-new-tokens (no default)")
    g.add_argument("--prompt", required=True, help="the user message (required)")
    _add_common(g)
    g.set_defaults(fn=cmd_generate)
    d = sub.add_parser("demo", help="WSD on a built-in tiny synthetic pair (no download)",
                       description="WSD on a built-in tiny synthetic pilot/base pair, made "
                       "locally (no download), with the paper's defaults unless told "
                       "otherwise.")
    d.add_argument("--prompt", default=DEMO_PROMPT, help="the user message "
                   "(default: %(default)r)")
    d.add_argument("--dir", default=None, metavar="DIR",
                   help="write the pair to DIR/pilot and DIR/base and keep it (created if "
                        "missing; a DIR holding anything else there is refused, and so is a "
                        "path through a symbolic link). Use a folder you own: the marker file "
                        "the demo writes there guards against loading an unrelated folder by "
                        "mistake, not against someone who can write into DIR "
                        "(default: a temporary folder, removed at the end)")
    _add_common(d)
    d.set_defaults(fn=cmd_demo)
    sub.add_parser("bench", help="the benchmark suite, from a source checkout "
                   "(`wsd-engine bench --help`; = python -m benchmarks.run)")
    return ap


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _say(line: str) -> None:
    """One line on stderr, if there is a stderr that can take it (never a traceback)."""
    if sys.stderr is None:
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _os_error_line(e: OSError) -> str:
    reason = e.strerror or _one_line(e) or errno.errorcode.get(e.errno or 0, "")
    line = f"wsd-engine: OSError: {_one_line(reason)}"
    if e.filename is not None:
        line += f": {_show_path(e.filename)}"
        if e.filename2 is not None:
            line += f" -> {_show_path(e.filename2)}"
    return line


@contextlib.contextmanager
def _quiet_libraries():
    """For the CLI process only (restored after): no warnings, log records or progress bars
    from the libraries underneath (transformers, tokenizers, huggingface_hub, torch). Their
    text can come from a checkpoint's files, and it would add lines to the one-line error
    the CLI promises. WSD_ENGINE_DEBUG=1 leaves them on."""
    was_disabled = logging.root.manager.disable
    hf_logging = was_verbosity = was_bars = hub_bars = None
    try:
        from transformers.utils import logging as hf_logging
        was_verbosity = hf_logging.get_verbosity()
        was_bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - without transformers there is nothing to quiet
        hf_logging = None
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
        hub_bars = not are_progress_bars_disabled()
        disable_progress_bars()
    except Exception:  # noqa: BLE001
        hub_bars = None
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(was_disabled)
        if hf_logging is not None:
            hf_logging.set_verbosity(was_verbosity)
            if was_bars:
                hf_logging.enable_progress_bar()
        if hub_bars:
            from huggingface_hub.utils import enable_progress_bars
            enable_progress_bars()


def _dispatch(argv: list, debug: bool) -> int:
    if argv and argv[0] == "bench":          # its own argument parser: forward everything
        return cmd_bench(argv[1:])
    a = build_parser().parse_args(argv)
    with contextlib.nullcontext() if debug else _quiet_libraries():
        return a.fn(a)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if sys.stdout is None:                   # started with standard output closed (>&-)
        _say("wsd-engine: OSError: Bad file descriptor: standard output (it is closed; the "
             "command has nowhere to write its answer)")
        return 1
    try:
        rc = _dispatch(argv, debug)
        with _writing("standard output"):
            sys.stdout.flush()              # a full disk fails here, not at exit
        return rc
    except WSDError as e:
        if debug:
            raise
        msg = _one_line(e)
        _say(f"wsd-engine: {type(e).__name__}" + (f": {msg}" if msg else ""))
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        _say("wsd-engine: interrupted")
        return 130
    except BrokenPipeError:                  # e.g. `wsd-engine demo | head`: quietly
        _discard_stdout()
        return 1
    except OSError as e:                     # a folder that cannot be written, a full disk...
        if isinstance(e, _OutputError) and e.filename == "standard output":
            _discard_stdout()
        if debug:
            raise
        _say(_os_error_line(e))
        return 1
    except UnicodeEncodeError as e:          # a name that is not UTF-8 (bytes as surrogates)
        if debug:
            raise
        if not (isinstance(e.object, str) and "surrogates" in str(e.reason)):
            return _internal_error(e)
        _say(f"wsd-engine: OSError: a name is not valid UTF-8 (bytes "
             f"{e.object[e.start:e.end].encode('utf-8', 'surrogateescape')!r}): "
             f"{_show_path(e.object[:200])}")
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        if debug:
            raise
        return _internal_error(e)


def _internal_error(e: BaseException) -> int:
    msg = _one_line(e)
    _say(f"wsd-engine: internal error: {type(e).__name__}" + (f": {msg}" if msg else "")
         + f" (set {DEBUG_ENV}=1 for the traceback)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
