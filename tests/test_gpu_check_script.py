"""`benchmarks/gpu_check.sh` is what a GPU session runs, once, with minutes of device time:
a flag typo or a renamed test there would cost the whole session. This checks on CPU that
the script is valid bash, that its default step list and its step lines agree, that every
Python command's arguments parse with the benchmark's own parser (as on a CUDA machine),
and that every test file / test it names exists and carries the gpu mark."""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import subprocess
import sys

import pytest
from _script_helpers import budget, check_bash_syntax, default_steps, read, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _text():
    return read(SCRIPT)


def _steps():
    """[(name, timeout, argv)] of the script's `step NAME TIMEOUT CMD...` lines."""
    return steps(_text(), "/tmp/gpu_out")


def test_script_is_valid_bash():
    check_bash_syntax(SCRIPT)


def test_default_steps_and_step_lines_agree():
    names = [n for n, _, _ in _steps()]
    assert len(names) == len(set(names)), f"a step name is used twice: {names}"
    assert sorted(names) == sorted(default_steps(_text())), (
        "the default STEPS list and the step lines differ: a step would never run "
        f"(or the default names one that does not exist): {names} vs {default_steps(_text())}")
    assert all(0 < t <= budget(_text()) for _, t, _ in _steps())


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch, main, argv):
    """Run a benchmark's main(argv) up to its argument parsing, and no further."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        main(argv)


@pytest.mark.parametrize("name", [n for n, _, a in _steps() if a[:2] != ["python", "-m"]
                                  or a[2] != "pytest"])
def test_benchmark_commands_parse(name, monkeypatch):
    argv = next(a for n, _, a in _steps() if n == name)
    assert argv[0] == "python", f"step {name}: expected a python command, got {argv}"
    if argv[1] == "-m":
        module, args = argv[2], argv[3:]
    else:
        assert argv[1].startswith("benchmarks/") and argv[1].endswith(".py"), argv
        assert os.path.exists(os.path.join(ROOT, argv[1])), f"step {name}: no {argv[1]}"
        module, args = argv[1][:-3].replace("/", "."), argv[2:]
    if module == "benchmarks.run":
        # its own validation too (presets, pairs, ks against the response length), as on
        # a CUDA machine: without one it would switch to the smoke's tiny defaults
        import torch

        from benchmarks import run
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        a = run.parse_args(args)
        assert not a.cpu_smoke
    else:
        mod = importlib.import_module(module)
        _parse_only(monkeypatch, mod.main, args)


def _gpu_tests(path):
    """Names of the test functions in `path` that carry @pytest.mark.gpu (directly, or all
    of them through a module-level pytestmark)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    src = ast.get_source_segment
    text = open(path).read()
    module_gpu = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                                         for t in n.targets)
                     and "gpu" in src(text, n.value) for n in tree.body)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            found[node.name] = module_gpu or any("mark.gpu" in src(text, d)
                                                 for d in node.decorator_list)
    return found


def test_pytest_steps_name_existing_gpu_tests():
    pytest_steps = [(n, a) for n, _, a in _steps() if a[:3] == ["python", "-m", "pytest"]]
    assert pytest_steps, "gpu_check.sh runs no GPU tests"
    for name, argv in pytest_steps:
        assert "-m" in argv[3:] and argv[argv.index("-m", 3) + 1] == "gpu", (
            f"step {name} must select the gpu-marked tests: {argv}")
        targets = [a for a in argv[3:] if a.startswith("tests/")]
        for target in targets:
            path, _, test = target.partition("::")
            full = os.path.join(ROOT, path)
            assert os.path.exists(full), f"step {name}: no {path}"
            tests = _gpu_tests(full)
            assert any(tests.values()), f"step {name}: {path} has no gpu-marked test"
            if test:
                assert tests.get(test), f"step {name}: {target} is not a gpu-marked test"


def test_script_ends_with_the_targets_table():
    """The last thing the session prints: one table of every speed target, read from $OUT."""
    lines = [ln.strip() for ln in _text().splitlines() if ln.strip()]
    call = [ln for ln in lines if "benchmarks.targets" in ln]
    assert call == ['python -m benchmarks.targets "$OUT" --json "$OUT/targets.json"'], call
    assert lines.index(call[0]) > max(i for i, ln in enumerate(lines) if ln.startswith("step "))


def test_pytest_steps_collect_tests():
    """Each pytest step's selection (files, node ids, -m gpu, -k) collects at least one test,
    and the pdl / not-pdl split of the new tests covers them all."""
    counts = {}
    for name, _, argv in _steps():
        if argv[:3] != ["python", "-m", "pytest"]:
            continue
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                            *[a for a in argv[3:] if a != "-q"]],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        ids = [ln for ln in r.stdout.splitlines() if "::" in ln]
        assert r.returncode == 0 and ids, (name, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        counts[name] = set(ids)
    assert counts["pdl"] and all("pdl" in i for i in counts["pdl"])
    assert not counts["pdl"] & counts["pytest_new"]
