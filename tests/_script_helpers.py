"""The GPU shell scripts (benchmarks/gpu_check.sh, benchmarks/gpu_tp.sh) read on CPU: their
`step NAME TIMEOUT CMD...` lines with the variables expanded, the default STEPS list, the
BUDGET, and a bash syntax check."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest


def read(script: str) -> str:
    with open(script) as f:
        return f.read()


def expand(text: str, line: str, out: str, values: dict | None = None) -> str:
    """`line` of the script `text` as bash would run it with nothing set: ${VAR:-default} ->
    default; the script's NAME="..." variables and `values` {NAME: value} -> their value;
    $OUT / ${OUT} -> `out`."""
    line = re.sub(r"\$\{[A-Z_0-9]+:-([^}]*)\}", r"\1", line)
    names = re.findall(r'^([A-Z_][A-Z_0-9]*)="([^"$]*)"$', text, re.M)
    for name, value in names + list((values or {}).items()):
        line = re.sub(r"\$\{?" + name + r"\b\}?", value, line)
    return line.replace("${OUT}", out).replace("$OUT", out)


def steps(text: str, out: str, values: dict | None = None) -> list:
    """[(name, timeout, argv)] of the script's `step NAME TIMEOUT CMD...` lines."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("step ") and not line.startswith("step()"):
            words = shlex.split(expand(text, line, out, values))
            found.append((words[1], int(words[2]), words[3:]))
    return found


def default_steps(text: str) -> list:
    m = re.search(r'STEPS=\$\{STEPS:-"([^"]*)"\}', text)
    assert m, "the script no longer sets its default STEPS list"
    return m.group(1).split()


def budget(text: str) -> int:
    return int(re.search(r"BUDGET=\$\{BUDGET:-(\d+)\}", text).group(1))


def check_bash_syntax(script: str) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed here")
    r = subprocess.run([bash, "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
