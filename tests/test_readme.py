"""The README's examples run as written, in order, on a CPU-only machine.

Every fenced ```python and ```bash block of README.md is run in document order in a fresh
temporary working directory, the way a reader would paste them:

* python blocks go, one after another, to ONE Python process (the interpreter running
  these tests), so names defined in one block are there in the next;
* bash blocks run with `bash -e`, with this interpreter's bin folder (the `wsd-engine`
  console script) first on PATH;
* both with HF_HUB_OFFLINE=1, OMP_NUM_THREADS=1 (the models are tiny; the output is the
  same, a busy machine just slows down less) and a timeout.

A block that cannot run here is marked by an HTML comment on the line before its fence,

    <!-- readme-test: skip (why: e.g. needs a CUDA GPU; the CPU form above runs) -->

and every skip must give its reason. The two set-up commands at the top are skipped (they
install into a fresh virtual environment) but checked: the test command must be what
.ci/run runs, the demo command must install the same way and end in `wsd-engine demo`,
which is then run here. At least MIN_BLOCKS_RUN blocks must run, so the test cannot pass
by skipping everything.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CI_RUN = os.path.join(ROOT, ".ci", "run")
MIN_BLOCKS_RUN = 10
BLOCK_TIMEOUT_S = 120
RUN_LANGS = ("python", "bash")
OTHER_LANGS = ("", "text")            # fenced blocks that are not run (plain text)

_FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
_MARK = re.compile(r"^<!--\s*readme-test:\s*(?P<what>[\w-]+)\s*(?:\((?P<why>.*)\))?\s*-->\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int                         # 1-based line of the opening fence
    skip: str | None = None           # the reason, for a skipped block

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def parse_readme(text: str) -> tuple[list[Block], list[str]]:
    """(fenced blocks in order, problems with the readme-test markers)."""
    blocks, problems = [], []
    lines = text.splitlines()
    pending = None                    # (reason, line) of a marker awaiting its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _MARK.match(line.strip())
        if m:
            if pending is not None:
                problems.append(f"line {pending[1]}: marker not followed by a fence")
            if m["what"] != "skip":
                problems.append(f"line {i + 1}: unknown readme-test directive {m['what']!r}")
            why = (m["why"] or "").strip()
            if not why:
                problems.append(f"line {i + 1}: a readme-test skip must give its reason: "
                                "<!-- readme-test: skip (why) -->")
            pending = (why, i + 1)
            i += 1
            continue
        if "readme-test" in line:
            problems.append(f"line {i + 1}: malformed readme-test marker: {line.strip()!r}")
        f = _FENCE.match(line)
        if f:
            start = i
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                problems.append(f"line {start + 1}: unclosed fence")
            blocks.append(Block(f[1], "\n".join(body) + "\n", start + 1,
                                pending[0] if pending else None))
            pending = None
            i += 1
            continue
        if line.strip() and pending is not None:
            problems.append(f"line {pending[1]}: marker not directly before a fence")
            pending = None
        i += 1
    if pending is not None:
        problems.append(f"line {pending[1]}: marker not followed by a fence")
    return blocks, problems


def _blocks() -> list[Block]:
    with open(README, encoding="utf-8") as f:
        blocks, problems = parse_readme(f.read())
    assert not problems, problems
    return blocks


# ------------------------------------------------------------------------- set-up commands

def _norm(cmd: str) -> list[str]:
    """One shell command as words, with the spellings that mean the same here made equal:
    the venv folder's name, `source` / `.`, and pip's quiet flag."""
    words = shlex.split(cmd)
    pip = "pip" in words
    out = []
    for w in words:
        if pip and w in ("-q", "--quiet"):
            continue
        w = {"source": "."}.get(w, w)
        out.append(w.replace(".ci-venv", ".venv"))
    return out


def ci_commands() -> list[list[str]]:
    """The commands .ci/run runs, one per line (shell settings, cd and exports left out)."""
    cmds = []
    with open(CI_RUN) as f:
        for line in f:
            s = line.strip()
            if not s or s.startswith(("#", "set ", "cd ", "export ")):
                continue
            cmds.append(_norm(s))
    return cmds


def _steps(block: Block) -> list[list[str]]:
    code = " ".join(block.code.split())
    return [_norm(part) for part in code.split("&&")]


def _setup_blocks(blocks):
    test = [b for b in blocks if b.lang == "bash" and b.skip and "pytest" in b.code]
    demo = [b for b in blocks if b.lang == "bash" and b.skip and "pip install" in b.code
            and "pytest" not in b.code]
    assert len(test) == 1 and len(demo) == 1, (test, demo)
    return test[0], demo[0]


def test_markers_and_languages():
    blocks = _blocks()
    for b in blocks:
        assert b.lang in RUN_LANGS + OTHER_LANGS, (
            f"{b.name}: fence language {b.lang!r}; write ```python or ```bash so the block is "
            "run by this test (or ```text for output)")
        if b.lang in OTHER_LANGS:
            assert "wsd_engine" not in b.code and "wsd-engine" not in b.code, (
                f"{b.name}: code in an untested block")
    skipped = [b for b in blocks if b.skip]
    assert all(b.skip.strip() for b in skipped)
    assert len([b for b in blocks if b.lang in RUN_LANGS and not b.skip]) >= MIN_BLOCKS_RUN


def test_setup_commands_match_ci():
    """The README's test command is what .ci/run runs; its demo command installs the same
    way (without the test extra) and then runs `wsd-engine demo`."""
    test_b, demo_b = _setup_blocks(_blocks())
    ci = ci_commands()
    assert ci and ci[-1] == ["python", "-m", "pytest", "-q"], ci
    readme = _steps(test_b)
    assert readme[0][:3] == ["python3", "-m", "venv"] and readme[1][0] == "."
    assert readme == ci, f"README test command {readme}\n.ci/run runs             {ci}"
    demo = _steps(demo_b)
    assert demo[-1] == ["wsd-engine", "demo"], demo
    install = [[w if w != ".[test]" else "." for w in c] for c in ci[:-1]]
    assert demo[:-1] == install, f"README demo set-up {demo[:-1]}\n.ci/run installs {install}"


# ------------------------------------------------------------------------- running them

DRIVER = r'''
import json, os, sys, traceback
# guarded like any script that splits a model (tensor_parallel): the worker processes are
# spawned and import this file
if __name__ == "__main__":
    proto = os.fdopen(os.dup(1), "w", buffering=1)     # the protocol: one JSON line per block
    os.dup2(2, 1)                                      # the blocks' own output goes to stderr
    g = {"__name__": "__main__"}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            exec(compile(req["code"], req["name"], "exec"), g)
            status = {"ok": True}
        except BaseException:
            status = {"ok": False, "error": traceback.format_exc()}
        sys.stdout.flush()
        sys.stderr.flush()
        proto.write(json.dumps(status) + "\n")
'''


class _Python:
    """One Python process that runs blocks in a shared namespace."""

    def __init__(self, cwd: str, env: dict, log_path: str):
        driver = os.path.join(cwd, ".readme_driver.py")
        with open(driver, "w") as f:
            f.write(DRIVER)
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-u", driver], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, block: Block, timeout: float) -> None:
        self.proc.stdin.write(json.dumps({"code": block.code, "name": block.name}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            out = self.tail()
            self.close()
            pytest.fail(f"{block.name} did not finish in {timeout:.0f} s\n{out}")
        if line is None:
            pytest.fail(f"{block.name}: the Python process died\n{self.tail()}")
        status = json.loads(line)
        if not status["ok"]:
            pytest.fail(f"{block.name} failed:\n{status['error']}\noutput:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.pop("WSD_ENGINE_DEBUG", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # one CPU thread per process: the examples' models are tiny, and on a shared machine
    # torch's thread pool waiting on busy cores makes them many times slower (same output)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    bindir = os.path.dirname(sys.executable)
    path = [bindir]
    if not os.path.isfile(os.path.join(bindir, "wsd-engine")):
        # not installed as a console script here (e.g. the tests run from a bare
        # checkout): an equivalent stand-in, so the shell examples still run
        shim = tmp_path / "shim-bin"
        shim.mkdir()
        (shim / "wsd-engine").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m wsd_engine "$@"\n')
        (shim / "wsd-engine").chmod(0o755)
        path.insert(0, str(shim))
    env["PATH"] = os.pathsep.join(path + [env.get("PATH", "")])
    return env


def _bash(code: str, name: str, cwd: str, env: dict, timeout: float) -> None:
    try:
        p = subprocess.run(["bash", "-e", "-c", code], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{name} did not finish in {timeout:.0f} s\n{e.stdout}\n{e.stderr}")
    assert p.returncode == 0, (f"{name} exited with {p.returncode}\n--- stdout\n"
                               f"{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")


def test_readme_examples_run(tmp_path):
    blocks = _blocks()
    _, demo_setup = _setup_blocks(blocks)
    work = tmp_path / "reader"
    work.mkdir()
    env = _env(tmp_path)
    py = None
    ran, t0 = [], time.perf_counter()
    try:
        for b in blocks:
            if b.lang not in RUN_LANGS:
                continue
            if b is demo_setup:
                # the install steps are .ci/run's (test_setup_commands_match_ci); its last
                # step is the first thing a reader runs: the demo with the defaults
                t = time.perf_counter()
                _bash("wsd-engine demo\n", f"{b.name}, last step", str(work), env,
                      BLOCK_TIMEOUT_S)
                ran.append(b)
                print(f"{b.name} (its last step): {time.perf_counter() - t:.1f} s")
                continue
            if b.skip:
                continue
            t = time.perf_counter()
            if b.lang == "bash":
                _bash(b.code, b.name, str(work), env, BLOCK_TIMEOUT_S)
            else:
                if py is None:
                    py = _Python(str(work), env, str(tmp_path / "python_blocks.log"))
                py.run(b, BLOCK_TIMEOUT_S)
            ran.append(b)
            print(f"{b.name}: {time.perf_counter() - t:.1f} s")
    finally:
        if py is not None:
            py.close()
    assert len(ran) >= MIN_BLOCKS_RUN, [b.name for b in ran]
    assert any(b.lang == "python" and "WSDParams()" in b.code for b in ran), \
        "no example that ran uses the default WSDParams()"
    print(f"ran {len(ran)} README blocks in {time.perf_counter() - t0:.1f} s")
