"""The command line: demo on the built-in pair, generate with --pilot/--base and --model."""
import json

from wsd_engine.cli import demo_pair, main


def test_demo_switch_fires(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["switched"] and 6 <= out["switch_index"] < out["draft_tokens"] + 1
    assert out["text"] and out["base_tokens"] > 0


def test_generate_text_output_marks_the_draft(tmp_path, capsys):
    pilot, base = demo_pair(str(tmp_path))
    rc = main(["generate", "--pilot", pilot, "--base", base, "--prompt", "Hello there",
               "--draft-max-tokens", "32", "--max-new-tokens", "40", "--chunk", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "\u00ab" in text and "k = " in text and "timings (s)" in text


def test_generate_single_model_and_errors(tmp_path, capsys):
    pilot, base = demo_pair(str(tmp_path))
    assert main(["generate", "--model", base, "--prompt", "Hi", "--max-new-tokens", "5",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 5
    assert main(["generate", "--pilot", pilot, "--base", base, "--prompt", "Hi",
                 "--threshold", "1.5", "--draft-max-tokens", "8", "--max-new-tokens", "8"]) == 1
    assert "threshold" in capsys.readouterr().err
    assert main(["generate", "--pilot", pilot, "--prompt", "Hi"]) == 2


def test_cuda_graphs_flag_needs_cuda_and_triton(tmp_path, capsys):
    pilot, base = demo_pair(str(tmp_path))
    assert main(["generate", "--model", base, "--prompt", "Hi", "--cuda-graphs"]) == 1
    assert "CUDA graphs need device='cuda' and backend='triton'" in capsys.readouterr().err
    assert main(["demo", "--dir", str(tmp_path), "--cuda-graphs"]) == 1
    assert "ConfigError" in capsys.readouterr().err
    assert main(["generate", "--model", base, "--prompt", "Hi", "--cuda-graphs",
                 "--no-tune"]) == 1
    assert "CUDA graphs need device='cuda' and backend='triton'" in capsys.readouterr().err


def test_decode_kernel_flags(tmp_path, capsys):
    """--fused-gemv / --pdl: the triton backend's one-token kernels; a clear error on the
    torch backend. The triton run gives the same text as the torch one."""
    pilot, base = demo_pair(str(tmp_path))
    args = ["generate", "--pilot", pilot, "--base", base, "--prompt", "Hi", "--json",
            "--draft-max-tokens", "12", "--max-new-tokens", "16"]
    assert main(args + ["--fused-gemv"]) == 1
    assert "fused_gemv needs backend='triton'" in capsys.readouterr().err
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(args + ["--backend", "triton", "--fused-gemv", "--pdl"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == want["token_ids"] and got["switch_index"] == want["switch_index"]


# ---------------------------------------------------------------- the demo: defaults, folders

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

from wsd_engine import cli  # noqa: E402
from wsd_engine.synthetic import make_demo_pair  # noqa: E402

SMALL = ["--draft-max-tokens", "16", "--max-new-tokens", "24"]


def _tree(path) -> dict:
    """{relative path: bytes or ('link', target)} of everything under path (links not
    followed): to show that a folder was left exactly as it was."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, path)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder (the demo's default place) moved to an empty folder of our own."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture
def victim(tmp_path):
    """Someone else's folder, which a planted symlink points to."""
    v = tmp_path / "victim"
    for sub in ("pilot", "base"):
        (v / sub).mkdir(parents=True)
        (v / sub / "config.json").write_text('{"not": "yours"}')
    return v


def test_demo_uses_the_papers_defaults_and_leaves_nothing_behind(private_tmp, capsys):
    """No cap on the lengths (the base writes up to max_new_tokens = 2048 with the kept
    draft), the pair fits the default cache, and the private folder is gone afterwards."""
    assert main(["demo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["switched"] and out["switch_index"] >= 6
    assert out["finish_reason"] == "length"
    assert out["switch_index"] + out["base_tokens"] == 2048
    assert os.listdir(private_tmp) == []


def test_demo_never_follows_a_planted_link_at_the_old_fixed_path(private_tmp, victim, capsys):
    """The demo used <tmp>/wsd_engine_demo: a symlink planted there pointed it at another
    folder (overwritten or loaded). Now that path is never used."""
    os.symlink(victim, private_tmp / "wsd_engine_demo")
    before = _tree(victim)
    assert main(["demo", "--json"] + SMALL) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["text"]
    assert _tree(victim) == before
    assert os.listdir(private_tmp) == ["wsd_engine_demo"]
    assert os.readlink(private_tmp / "wsd_engine_demo") == str(victim)


def test_demo_ignores_a_planted_checkpoint_at_the_old_fixed_path(private_tmp, capsys):
    planted = private_tmp / "wsd_engine_demo"
    for sub in ("pilot", "base"):
        (planted / sub).mkdir(parents=True)
        (planted / sub / "config.json").write_text("{ not a config")
    assert main(["demo", "--json"] + SMALL) == 0, capsys.readouterr().err
    assert (planted / "pilot" / "config.json").read_text() == "{ not a config"
    assert sorted(os.listdir(private_tmp)) == ["wsd_engine_demo"]


@pytest.mark.parametrize("link", ["pilot", "base", "dir"])
def test_demo_dir_refuses_symlinks(tmp_path, victim, capsys, link):
    d = tmp_path / "d"
    if link == "dir":
        os.symlink(victim, d)
    else:
        d.mkdir()
        os.symlink(victim / link, d / link)
    before = _tree(victim)
    assert main(["demo", "--dir", str(d)] + SMALL) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wsd-engine: ConfigError: ")
    assert "symbolic link" in err
    assert _tree(victim) == before


def test_demo_dir_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    """A pair planted in --dir without the marker is neither loaded nor overwritten, nor
    is a demo pair whose files were changed after the marker was written."""
    d = tmp_path / "d"
    make_demo_pair(str(d))                         # a real pair, but not written by the demo
    before = _tree(d)
    assert main(["demo", "--dir", str(d)] + SMALL) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds something other than the demo pair" in err
    assert _tree(d) == before

    e = tmp_path / "e"
    assert main(["demo", "--dir", str(e), "--json"] + SMALL) == 0   # written by the demo
    first = json.loads(capsys.readouterr().out)
    marker = e / cli.DEMO_MARKER
    assert marker.is_file() and set(os.listdir(e)) == {"pilot", "base", cli.DEMO_MARKER}
    stamp = marker.stat().st_mtime_ns
    assert main(["demo", "--dir", str(e), "--json"] + SMALL) == 0   # reused, not rewritten
    assert json.loads(capsys.readouterr().out)["token_ids"] == first["token_ids"]
    assert marker.stat().st_mtime_ns == stamp
    with open(e / "base" / "config.json", "a") as f:
        f.write(" ")                                                 # tampered with
    before = _tree(e)
    assert main(["demo", "--dir", str(e)] + SMALL) == 1
    assert "holds something other than the demo pair" in capsys.readouterr().err
    assert _tree(e) == before


def test_demo_pair_made_quickly_with_room_for_the_defaults(tmp_path):
    import time
    from wsd_engine.config import ModelConfig
    make_demo_pair(str(tmp_path / "warm"))                          # imports
    t = time.perf_counter()
    pilot, base = make_demo_pair(str(tmp_path / "pair"))
    assert time.perf_counter() - t < 5.0                            # ~0.05 s when idle
    for p in (pilot, base):
        assert ModelConfig.from_pretrained(p).max_position_embeddings == 4096


# ---------------------------------------------------------------- errors: one line each

def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_demo_pair(str(tmp_path_factory.mktemp("pair")))


def _gen(pair, *extra):
    pilot, base = pair
    return ["generate", "--pilot", pilot, "--base", base, "--prompt", "Hi", *SMALL, *extra]


@pytest.mark.parametrize("extra, rc, pattern", [
    (["--device", "foo"], 1, r"^wsd-engine: ConfigError: unknown device 'foo'"),
    (["--max-seq-len", "1e12"], 2, r"^wsd-engine generate: error: argument --max-seq-len: "
                                    r"expected a whole number >= 1, got '1e12'"),
    (["--max-seq-len", "0"], 2, r"argument --max-seq-len: expected a whole number >= 1"),
    # cannot be allocated: whatever the loader raises, one line
    (["--max-seq-len", "1000000000000"], 1, r"^wsd-engine: "),
    (["--threshold", "abc"], 2, r"^wsd-engine generate: error: argument --threshold: "
                                r"invalid float value: 'abc' \(see `wsd-engine generate --help`\)"),
    (["--threshold", "1.5"], 1, r"^wsd-engine: RequestError: threshold must be in \(0, 1\]"),
    (["--dtype", "int3"], 1, r"^wsd-engine: ConfigError: "),
    (["--no-such-option"], 2, r"^wsd-engine: error: unrecognized arguments: --no-such"),
])
def test_errors_are_one_line(pair, capsys, extra, rc, pattern):
    with pytest.raises(SystemExit) if rc == 2 else _nothing() as ex:
        got = main(_gen(pair, *extra))
    got = ex.value.code if rc == 2 else got
    assert got == rc
    assert re.search(pattern, _one_line(capsys.readouterr().err))


class _nothing:
    value = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_missing_folder_is_one_line(tmp_path, pair, capsys):
    assert main(["generate", "--pilot", str(tmp_path / "nope"), "--base", pair[1],
                 "--prompt", "Hi"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert re.match(r"wsd-engine: (ConfigError|ModelLoadError): ", line) and "nope" in line
    assert main(["demo", "--dir", str(tmp_path / "new" / "sub")] + SMALL) == 0   # created
    capsys.readouterr()
    (tmp_path / "plain").write_text("x")
    assert main(["demo", "--dir", str(tmp_path / "plain")] + SMALL) == 1
    assert "not a folder" in _one_line(capsys.readouterr().err)


def test_broken_chat_template_is_one_line(tmp_path, pair, capsys):
    pilot = tmp_path / "pilot"
    shutil.copytree(pair[0], pilot)
    (pilot / "chat_template.jinja").write_text("{% for m in %}")
    assert main(["generate", "--pilot", str(pilot), "--base", pair[1], "--prompt", "Hi",
                 *SMALL]) == 1
    assert _one_line(capsys.readouterr().err).startswith("wsd-engine: TokenizerError: ")


def test_invalid_utf8_prompt_is_one_line(pair, capsys):
    """Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)."""
    args = _gen(pair)
    args[args.index("--prompt") + 1] = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    assert main(args) == 1
    assert _one_line(capsys.readouterr().err).startswith("wsd-engine: RequestError: ")


def test_invalid_utf8_prompt_console_script(pair):
    """The same through the installed console script, the prompt given as raw bytes."""
    exe = shutil.which("wsd-engine", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "wsd_engine"]
    pilot, base = pair
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop(cli.DEBUG_ENV, None)
    p = subprocess.run(cmd + ["generate", "--pilot", pilot, "--base", base,
                              "--prompt", b"caf\xe9 \xff\xfe"] + SMALL,
                       capture_output=True, env=env, timeout=300)
    err = p.stderr.decode("utf-8", "backslashreplace")
    assert p.returncode == 1 and p.stdout == b""
    assert _one_line(err).startswith("wsd-engine: RequestError: ")


def test_internal_error_is_one_line_unless_debugging(pair, capsys, monkeypatch):
    def boom(a):
        raise ZeroDivisionError("boom\nsecond line")
    monkeypatch.setattr(cli, "_check_request", boom)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(_gen(pair)) == 1
    assert _one_line(capsys.readouterr().err) == (
        "wsd-engine: internal error: ZeroDivisionError: boom second line "
        "(set WSD_ENGINE_DEBUG=1 for the traceback)")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ZeroDivisionError):
        main(_gen(pair))


def test_every_option_has_help_with_its_default(capsys):
    ap = cli.build_parser()
    subs = next(a for a in ap._actions if isinstance(a, cli.argparse._SubParsersAction))
    for name in ("generate", "demo"):
        p = subs.choices[name]
        for act in p._actions:
            if not act.option_strings or act.dest == "help":
                continue
            assert act.help, (name, act.option_strings)
            assert "default" in act.help or act.required, (name, act.option_strings, act.help)
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: 6)" in text and "(default: 2048)" in text
        assert "DESIGN" not in text


# ---------------------------------------------------------------- `wsd-engine bench` wording

def _smoke_results(speedup_base_only, speedup_ref, tok_s):
    runs = [{"k": 8, "label": "k=8", "switch_index": 8, "total_s": 1.0, "ideal_s": 0.5,
             "measured_over_ideal": 2.0, "speedup_vs_base_only": speedup_base_only,
             "timings": {p: 0.1 for p in ("pilot_prefill", "base_prefill", "drafting",
                                           "scoring", "continuation")}}]
    return {
        "meta": {"device": "CPU", "versions": {"torch": "x"}, "date": "d", "dtype": "float32",
                 "backend": "torch", "cuda_graphs": False, "cpu_smoke": True,
                 "settings": {"decode_steps": 8, "prompt_len": 16}},
        "copy_gbps": 10.0, "models": {},
        "decode": {"llama3.1-8b": {"floor_ms_per_token": 1.0, "floor_tok_s": 1000.0,
                                   "systems": {"hf_eager": {"decode_ms_per_token": 1.0,
                                                            "tok_s": 100.0, "frac_of_floor": 1,
                                                            "e2e_tok_s": 1.0},
                                               "engine_torch_eager": {
                                                   "decode_ms_per_token": 1.0, "tok_s": tok_s,
                                                   "frac_of_floor": 1, "e2e_tok_s": 1.0}}}},
        "wsd": {"llama3.2-1b + llama3.1-8b": {
            "runs": runs, "base_only": {"total_s": 1.0, "ideal_s": 0.5,
                                        "measured_over_ideal": 2.0},
            "reference": {"total_s": 2.0, "switch_index": 8, "k": 8,
                          "timings": {"draft": 1, "score": 1, "continuation": 1},
                          "speedup_of_engine": speedup_ref}}},
        "kernels": {}, "skipped": [], "errors": []}


def test_bench_report_labels_smoke_rows_and_says_slower():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.report import render_md, speed
    assert speed(0.8) == "1.25\u00d7 slower" and speed(1.25) == "1.25\u00d7 faster"
    assert speed(1.0) == "1.00\u00d7 (same)"
    md = render_md(_smoke_results(0.8, 0.8, 80.0))
    assert "0.80\u00d7" not in md and not re.search(r"0\.\d+\u00d7 faster", md)
    assert "1.25\u00d7 slower" in md                     # the engine row, the WSD run
    assert "this engine is 1.2\u00d7 slower than `wsd_engine.reference`" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "llama" in ln]
    assert rows and all("tiny (CPU smoke)" in ln for ln in rows), rows
    assert "### tiny (CPU smoke), as llama3.2-1b + llama3.1-8b" in md
    md = render_md(_smoke_results(2.0, 12.0, 200.0))
    assert "2.00\u00d7 faster" in md and "this engine is 12.0\u00d7 faster than" in md
    real = _smoke_results(2.0, 12.0, 200.0)
    real["meta"]["cpu_smoke"] = False
    assert "tiny" not in render_md(real) and "| llama3.1-8b |" in render_md(real)


# ---------------------------------------------------------------- the demo's --dir, hardened

def _forged(d, big_name="model.safetensors"):
    """A --dir with a marker that claims to be the demo's, and empty pilot/ and base/."""
    for sub in ("pilot", "base"):
        (d / sub).mkdir(parents=True)
    (d / cli.DEMO_MARKER).write_text('{"what": "wsd-engine demo pair"}')
    return d


class _Reader:
    """A file object that records the size of every read asked of it and what came back."""

    def __init__(self, f, log):
        self.f, self.log = f, log

    def read(self, n=-1):
        data = self.f.read(n)
        self.log.append((n, len(data)))
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _spy_reads(monkeypatch):
    log = []
    real = os.fdopen
    monkeypatch.setattr(cli.os, "fdopen", lambda fd, mode: _Reader(real(fd, mode), log))
    return log


def test_demo_dir_refuses_a_huge_file_unread(tmp_path, capsys, monkeypatch):
    """A forged marker next to a 4 GiB (sparse) file: refused from its size, before any of
    it is read (it used to be read whole into memory to be hashed)."""
    import time
    d = _forged(tmp_path / "d")
    with open(d / "pilot" / "model.safetensors", "wb") as f:
        f.truncate(4 << 30)
    log = _spy_reads(monkeypatch)
    t = time.perf_counter()
    assert main(["demo", "--dir", str(d)] + SMALL) == 1
    assert time.perf_counter() - t < 10
    err = _one_line(capsys.readouterr().err)
    assert "holds something other than the demo pair" in err
    assert "larger than any file the demo writes" in err
    assert sum(got for _, got in log) < 1 << 20            # the marker only
    assert os.listdir(d / "pilot") == ["model.safetensors"]
    assert os.path.getsize(d / "pilot" / "model.safetensors") == 4 << 30


def test_demo_dir_hashes_in_pieces_and_caps_the_file_count(tmp_path, monkeypatch):
    import hashlib
    d = _forged(tmp_path / "d")
    data = os.urandom(3 * cli._HASH_CHUNK + 123)           # several pieces
    (d / "pilot" / "w.bin").write_bytes(data)
    log = _spy_reads(monkeypatch)
    assert cli._hash_files(str(d)) == {"pilot/w.bin": hashlib.sha256(data).hexdigest()}
    assert len(log) == 5 and all(n == cli._HASH_CHUNK for n, _ in log), log
    for i in range(cli.DEMO_MAX_FILES + 1):
        (d / "base" / f"f{i}").write_text("x")
    with pytest.raises(cli.ConfigError, match="more than"):
        cli._hash_files(str(d))


def test_demo_dir_refuses_a_path_through_a_symlink(tmp_path, victim, capsys, monkeypatch):
    """--dir link/sub: the intermediate link would be followed by every file operation."""
    link = tmp_path / "link"
    os.symlink(victim, link)
    before = _tree(victim)
    monkeypatch.chdir(tmp_path)
    for given in (str(link / "sub"), "link/sub", "link"):
        assert main(["demo", "--dir", given] + SMALL) == 1
        err = _one_line(capsys.readouterr().err)
        assert err.startswith("wsd-engine: ConfigError: ") and "symbolic link" in err
        assert "pass the real path" in err and str(victim) in err
    assert _tree(victim) == before


def test_demo_dir_empty_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--dir", ""] + SMALL) == 1
    assert _one_line(capsys.readouterr().err) == (
        "wsd-engine: ConfigError: --dir is empty; give a folder (without --dir the demo uses "
        "a temporary one)")
    assert os.listdir(tmp_path) == []


def test_demo_dir_help_says_to_use_a_folder_you_own(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Use a folder you own" in text and "not against someone who can write into DIR" in text


# ---------------------------------------------------------------- OS errors: one line each

@pytest.mark.parametrize("case", ["under_a_file", "too_long", "proc"])
def test_os_errors_are_one_line(tmp_path, capsys, case):
    if case == "under_a_file":
        (tmp_path / "plain").write_text("x")
        d, want = str(tmp_path / "plain" / "sub"), "Not a directory"
    elif case == "too_long":
        d, want = str(tmp_path / ("a" * 300)), "File name too long"
    else:
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
        d, want = "/proc", "(the demo cannot write into this --dir): /proc"
    assert main(["demo", "--dir", d] + SMALL) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("wsd-engine: OSError: ") and want in line, line
    assert "internal error" not in line and "Errno" not in line


def test_non_utf8_dir_is_one_line(tmp_path, capsys):
    d = os.fsdecode(os.fsencode(str(tmp_path)) + b"/d\xff")
    assert main(["demo", "--dir", d] + SMALL) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("wsd-engine: ConfigError: --dir ") and "not valid UTF-8" in line
    assert "\\xff" in line
    assert os.listdir(tmp_path) == []                      # nothing made
    with pytest.raises(cli.ConfigError, match="not valid UTF-8"):
        demo_pair(d)
    assert os.listdir(tmp_path) == []


def test_os_error_line_format():
    e = FileNotFoundError(2, "No such file or directory", "/x/a\nb")
    assert cli._os_error_line(e) == "wsd-engine: OSError: No such file or directory: '/x/a\\nb'"
    e = OSError(18, "Invalid cross-device link", "/a", None, "/b")
    assert cli._os_error_line(e) == "wsd-engine: OSError: Invalid cross-device link: /a -> /b"


def test_a_non_utf8_name_deep_inside_is_one_line(pair, capsys, monkeypatch):
    """A UnicodeEncodeError on a name given as bytes that are not UTF-8 (which the checks
    up front should catch first) is an OSError line, not an internal error."""
    def deep(a):
        os.fsdecode(b"/x/d\xff").encode("utf-8")
    monkeypatch.setattr(cli, "_check_request", deep)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(_gen(pair)) == 1
    assert _one_line(capsys.readouterr().err) == (
        "wsd-engine: OSError: a name is not valid UTF-8 (bytes b'\\xff'): /x/d\\xff")


def _cli_cmd():
    exe = shutil.which("wsd-engine", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "wsd_engine"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop(cli.DEBUG_ENV, None)
    return env


def test_closed_stdout_is_one_line():
    p = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh"] + _cli_cmd() + ["demo"] + SMALL,
                       capture_output=False, stderr=subprocess.PIPE, env=_env(), timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 1
    assert _one_line(err).startswith("wsd-engine: OSError: Bad file descriptor: standard "
                                     "output")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_full_stdout_is_one_line():
    with open("/dev/full", "w") as full:
        p = subprocess.run(_cli_cmd() + ["demo"] + SMALL, stdout=full, stderr=subprocess.PIPE,
                           env=_env(), timeout=300)
    assert p.returncode == 1
    assert _one_line(p.stderr.decode()) == (
        "wsd-engine: OSError: No space left on device: standard output")


def test_broken_pipe_is_quiet():
    """`wsd-engine demo | head -1`: the reader goes away; no traceback, exit status not 0."""
    p = subprocess.Popen(_cli_cmd() + ["demo"] + SMALL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env())
    p.stdout.close()                                      # before it writes anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) != 0
    assert "Traceback" not in err and "Exception ignored" not in err and err.count("\n") <= 1


# ---------------------------------------------------------------- the libraries stay quiet

def test_library_warnings_do_not_add_lines(pair, capfd, monkeypatch):
    """Warnings, log records and progress bars of the libraries underneath (whose text a
    checkpoint can choose) never reach stderr next to the error line; restored after."""
    import logging
    import warnings
    from transformers.utils import logging as hf_logging
    seen = {}
    real = cli._params

    def noisy(a):
        warnings.warn("a library warning")
        logging.getLogger("transformers.something").warning("a transformers warning")
        logging.getLogger("huggingface_hub").warning("a hub warning")
        logging.getLogger("anything").warning("another warning")
        hf_logging.get_logger("transformers.x").warning("via transformers' logger")
        seen["bars"] = hf_logging.is_progress_bar_enabled()
        return real(a)
    monkeypatch.setattr(cli, "_params", noisy)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    verbosity, filters = hf_logging.get_verbosity(), list(warnings.filters)
    assert main(_gen(pair, "--threshold", "5")) == 1
    assert _one_line(capfd.readouterr().err).startswith("wsd-engine: RequestError: threshold")
    assert seen["bars"] is False
    assert hf_logging.get_verbosity() == verbosity and warnings.filters == filters
    assert logging.root.manager.disable == 0


def test_checkpoint_driven_transformers_warnings_stay_off(tmp_path, pair, capfd):
    """The attacker's recipe: config values that make transformers log warnings, then an
    error; stderr holds the error line only."""
    pilot = tmp_path / "pilot"
    shutil.copytree(pair[0], pilot)
    c = json.loads((pilot / "config.json").read_text())
    c["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4,
                            "high_freq_factor": 1, "original_max_position_embeddings": 8192}
    (pilot / "config.json").write_text(json.dumps(c))
    t = json.loads((pilot / "tokenizer_config.json").read_text())
    t["tokenizer_class"] = "LlamaTokenizer"
    (pilot / "tokenizer_config.json").write_text(json.dumps(t))
    (pilot / "chat_template.jinja").write_text("{{ raise_exception('nope') }}")
    assert main(["generate", "--pilot", str(pilot), "--base", pair[1], "--prompt", "Hi",
                 *SMALL]) == 1
    assert _one_line(capfd.readouterr().err).startswith("wsd-engine: ")


# ---------------------------------------------------------------- --model checks the request

@pytest.mark.parametrize("extra, pattern", [
    (["--threshold", "5"], r"^wsd-engine: RequestError: threshold must be in \(0, 1\]"),
    (["--max-new-tokens", "0"], r"^wsd-engine: RequestError: max_new_tokens"),
    (["--prompt", "   "], r"^wsd-engine: RequestError: the prompt is empty"),
    (["--device", "meta"], r"^wsd-engine: ConfigError: unknown device 'meta'"),
])
def test_model_mode_checks_the_request(pair, capsys, extra, pattern):
    args = ["generate", "--model", pair[1], "--prompt", "Hi", *SMALL, *extra]
    assert main(args) == 1
    assert re.search(pattern, _one_line(capsys.readouterr().err))


def test_demo_refuses_a_blank_prompt(tmp_path, capsys, private_tmp):
    assert main(["demo", "--prompt", " \n "] + SMALL) == 1
    assert _one_line(capsys.readouterr().err).startswith("wsd-engine: RequestError: the "
                                                         "prompt is empty")
    assert os.listdir(private_tmp) == []
