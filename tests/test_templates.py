"""wsd_engine.templates: chat templates render exactly as transformers renders them, and a
hostile template ends in a TokenizerError within bounded time and memory, leaving the engine
usable."""
import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsd_engine.errors import RequestError, TokenizerError
from wsd_engine.templates import render_chat_template, render_for_tokenizer

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}")
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
TOJSON = """{%- for message in messages %}{{ message | tojson }}
{% endfor %}{{ messages | tojson(indent=2, sort_keys=True) }}
{%- if tools %}{{ tools | tojson(indent=4) }}{% endif %}
{%- if documents %}{{ documents | tojson(ensure_ascii=True) }}{% endif %}
{{ {'n': messages|length, 'pad': pad_token, 'think': enable_thinking is defined} | tojson(separators=(',', ':')) }}
{{ bos_token ~ '|' ~ eos_token ~ '|' ~ (unk_token is defined) ~ '|' ~ (sep_token is defined) }}"""
LOOP_CONTROLS = """{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if loop.index > 4 %}{% break %}{% endif %}
{{ loop.index }}:{{ message['role'] }}={{ message['content'] }}
{% endfor %}"""
GENERATION = """{% for message in messages %}
{% if message['role'] == 'assistant' %}
{% generation %}<a>{{ message['content'] }}</a>{% endgeneration %}
{% else %}
<{{ message['role'][0] }}>{{ message['content'] }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<a>{% endif %}"""
QWEN3 = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'
                + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "system" %}{{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""
# exercises every operator, method and filter that the renderer bounds
KITCHEN_SINK = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages[::-1] %}{%- set idx = (messages|length - 1) - loop.index0 %}
{%- if ns.last_user < 0 and m.role == 'user' %}{%- set ns.last_user = idx %}{%- endif %}{%- endfor %}
{%- macro box(s) %}[{{ s|replace('\n', ' ')|truncate(20) }}]{% endmacro %}
{%- for m in messages %}{{ '%-10s|%3d|%s' % (m.role, loop.index, m.content[:3]) }}{{ '{}:{:>4}'.format(m.role[:3], loop.length) }}
{{- box(m.content) }}{{ m.content|wordwrap(12)|indent(2) }}{{ (m.role ~ '!') * 2 }}{{ [m.role, m.content|length]|join(',') }}
{{- m.role.ljust(12, '.') }}{{ m.role|center(15) }}{{ m.content|upper|string|e }}{{ '-'.join(m.content[:4]) }}
{%- if loop.index0 == ns.last_user %} <last user>{% endif %}
{% endfor %}{{ messages|map(attribute='role')|join(' ') }} {{ messages|selectattr('role', 'equalto', 'user')|list|length }}
{{- 2 ** 10 }} {{ dict(a=1, b=[1, 2])|tojson }} {{ [1, 2] + [3] }} {{ messages[0] }} {{ range(3)|sum }} {{ 'x%sy'|format(7) }}
{{- messages[0].content.replace('a', 'AA').expandtabs(2) }} {{ ns }} {{ messages|map(attribute='content')|map('length')|list }}"""
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "mistral": MISTRAL, "zephyr": ZEPHYR, "gemma": GEMMA,
             "tojson": TOJSON, "loop_controls": LOOP_CONTROLS, "generation": GENERATION,
             "kitchen_sink": KITCHEN_SINK, "qwen3": QWEN3}
SIMPLE = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


@functools.lru_cache(maxsize=None)
def _tok(with_template=True):
    from wsd_engine.synthetic import make_tokenizer
    return make_tokenizer(320, chat_template=SIMPLE if with_template else None)


def _transformers(template, messages, **kwargs):
    """transformers' own rendering, or the exception it raises."""
    tok = _tok()
    tok.chat_template = template
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure must be a TokenizerError on our side
        return e
    finally:
        tok.chat_template = SIMPLE


def _ours(template, messages, **kwargs):
    try:
        return render_chat_template(template, messages, special_tokens=_tok().special_tokens_map, **kwargs)
    except TokenizerError as e:
        return e


def _assert_same(template, messages, **kwargs):
    kwargs.setdefault("add_generation_prompt", False)  # the defaults differ (ours: True)
    want, got = _transformers(template, messages, **kwargs), _ours(template, messages, **kwargs)
    if isinstance(want, Exception):
        assert isinstance(got, TokenizerError), (want, got)
    else:
        assert type(got) is str and got == want


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 6))
    if draw(st.booleans()):  # alternating, so that the strict templates render too
        roles = ["system"] * draw(st.booleans()) + [("user", "assistant")[i % 2] for i in range(n)]
    else:
        roles = draw(st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=n, max_size=n))
    contents = st.text(max_size=30) | st.sampled_from(
        ["<think>\nwhy\n</think>\n\nanswer", "<tool_response>42</tool_response>", "  padded \n", ""])
    return [{"role": r, "content": draw(contents)} for r in roles]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@settings(max_examples=40, deadline=None, database=None)
@given(messages=conversations(), add_generation_prompt=st.booleans())
def test_renders_like_transformers(name, messages, add_generation_prompt):
    _assert_same(TEMPLATES[name], messages, add_generation_prompt=add_generation_prompt)


def test_tools_documents_and_extra_variables_like_transformers():
    messages = [{"role": "user", "content": "weather in Paris? \u00e9\u6f22"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather \u2600",
                                               "parameters": {"type": "object", "properties": {}}}}]
    documents = [{"title": "Doc \u00e9", "text": "Some text"}]
    for kwargs in (dict(tools=tools), dict(documents=documents), dict(enable_thinking=False),
                   dict(tools=tools, documents=documents, add_generation_prompt=True)):
        _assert_same(TOJSON, messages, **kwargs)


def test_message_normalization_like_transformers():
    """None values dropped, reasoning under its three names, str subclasses made plain: what
    recent transformers does before rendering (older releases passed messages as they were)."""
    from transformers.utils import chat_template_utils
    if not hasattr(chat_template_utils, "_alias_reasoning_fields"):
        pytest.skip("this transformers release does not normalize messages")
    _assert_same(TOJSON, [{"role": "assistant", "content": "x", "tool_calls": None, "reasoning": "r"}])
    for kwargs in (dict(enable_thinking=False), dict(add_generation_prompt=True)):
        _assert_same(QWEN3, [{"role": "user", "content": type("Sub", (str,), {})("hi")},
                             {"role": "assistant", "content": "x", "reasoning_content": "because"},
                             {"role": "user", "content": "ok"}, {"role": "assistant", "content": "y", "thinking": "t"}],
                     **kwargs)


def test_render_for_tokenizer():
    tok = _tok()
    messages = [{"role": "user", "content": "hi"}]
    assert render_for_tokenizer(tok, messages) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True) == "<s><user>hi"
    with pytest.raises(TokenizerError, match="no chat template"):
        render_for_tokenizer(_tok(with_template=False), messages)
    tok.chat_template = {"default": CHATML, "tool_use": TOJSON}
    try:
        assert render_for_tokenizer(tok, messages) == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
        assert render_for_tokenizer(tok, messages, tools=[]) == tok.apply_chat_template(
            messages, tools=[], tokenize=False, add_generation_prompt=True)
    finally:
        tok.chat_template = SIMPLE
    with pytest.raises(RequestError):
        render_for_tokenizer(tok, [])


def _assert_usable():
    """A normal template still renders right after a hostile one, in the same process."""
    out = render_chat_template(LLAMA3, [{"role": "user", "content": "Hi"}], special_tokens={"bos_token": "<s>"})
    assert out == ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
DOUBLING = ("{% set ns = namespace(s='A') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s|length }}")
HOSTILE = {  # name: (template, what the TokenizerError says)
    "nested_range_loops": (NESTED_LOOPS, "max_seconds"),
    "nested_loops_with_output": (NESTED_LOOPS.replace("{% endfor %}", "x" * 100 + "{% endfor %}", 1), "rendered text"),
    "str_times_4e9": ("{{ 'A' * 4000000000 }}", "result of '\\*'"),
    "str_times_1e12": ("{{ 'A' * 10**12 }}", "result of '\\*'"),
    "list_repetition": ("{{ [1, 2, 3] * 1000000000 }}", "result of '\\*'"),
    "list_of_big_strings": ("{% set x = ['A' * 1000000] * 1000 %}{{ x }}", "result of '\\*'"),
    "printing_many_references": ("{% set a = 'A' * 900000 %}{{ [a, a] }}", "printed value"),
    "many_references_kept": ("{{ dict.fromkeys(range(1000), 'A' * 1000000)|length }}", "result of a call weighs"),
    "huge_int_power": ("{{ 10 ** (10 ** 10) }}", "bits from '\\*\\*'"),
    "percent_width": ("{{ '%2000000000d' % 1 }}", "result of '%'"),
    "percent_many_fields": ("{{ ('%(a)s' * 100000) % {'a': 'A' * 100000} }}", "result of '%'"),
    "format_width": ("{{ '{:>2000000000}'.format(1) }}", "str.format"),
    "format_nested_width": ("{{ '{:>{}}'.format(1, 2000000000) }}", "str.format"),
    "markup_format_width": ("{{ ('{:>2000000000}'|safe).format(1) }}", "str.format"),
    "ljust": ("{{ 'a'.ljust(10**10) }}", "str.ljust"),
    "replace_empty": ("{{ ('a' * 100000).replace('', 'b' * 100) }}", "str.replace"),
    "join_method": ("{{ ('A' * 100000).join(range(1000)|map('string')) }}", "str.join"),
    "zfill": ("{{ '1'.zfill(10**10) }}", "str.zfill"),
    "expandtabs": ("{{ ('\t' * 100000).expandtabs(1000) }}", "str.expandtabs"),
    "markup_repetition": ("{{ ('A'|safe) * 10**10 }}", "result of '\\*'"),
    "center_filter": ("{{ 'x'|center(10**10) }}", "filter 'center'"),
    "wordwrap_filter": ("{{ ('a ' * 1000)|wordwrap(1, wrapstring='b' * 100000) }}", "filter 'wordwrap'"),
    "include": ("{% include 'other.jinja' %}", "no loader"),
    "indent_filter": ("{{ ('a\n' * 100000)|indent(1000) }}", "filter 'indent'"),
    "join_filter": ("{{ range(100000)|join('A' * 100000) }}", "filter 'join'"),
    "tojson_indent": ("{{ messages|tojson(indent=10**9) }}", "tojson"),
    "sum_of_lists": ("{{ ([[1]] * 100000)|sum(start=[]) }}", "filter 'sum'"),
    "tilde_doubling": (DOUBLING, "'~' concatenation"),
    "macro_output_doubling": ("{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s }}{% endif %}"
                              "{% endmacro %}{{ d('A', 40) }}", "'~' concatenation"),
    "range_1e9": ("{{ range(10**9)|list }}", "Range too big"),
    "recursive_macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed"),
    "dunder_mro": ("{{ ''.__class__.__mro__ }}", "SecurityError"),
    "namespace_underscore": ("{% set ns = namespace(_x=1) %}", "SecurityError"),
    "raise_exception": ("{{ raise_exception('bad') }}", "refused these messages: bad"),
    "syntax_error": ("{% for %}", "TemplateSyntaxError"),
    "undefined_attribute_call": ("{{ foo.bar() }}", "UndefinedError"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_a_tokenizer_error(name):
    template, message = HOSTILE[name]
    start = time.monotonic()
    with pytest.raises(TokenizerError, match=message) as info:
        render_chat_template(template, [{"role": "user", "content": "hi"}], max_seconds=1.0)
    assert time.monotonic() - start < 4.0
    if "raise_exception" not in name:
        assert "chat template is broken or hostile" in str(info.value)
    _assert_usable()


def test_time_bound_from_another_thread_and_tracer_restored():
    def tracer(frame, event, arg):
        return None
    result = {}

    def worker():
        sys.settrace(tracer)
        start = time.monotonic()
        try:
            render_chat_template(NESTED_LOOPS, [{"role": "user", "content": "hi"}], max_seconds=0.5)
        except TokenizerError as e:
            result["error"] = str(e)
        result["seconds"], result["tracer"] = time.monotonic() - start, sys.gettrace()
        sys.settrace(None)
    before = sys.gettrace()
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert "max_seconds" in result["error"] and result["seconds"] < 3.0
    assert result["tracer"] is tracer and sys.gettrace() is before
    _assert_usable()


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    from wsd_engine.errors import TokenizerError
    from wsd_engine.templates import render_chat_template

    def peak_kib():  # VmHWM can be reset (so imports' peak does not hide ours); ru_maxrss cannot
        try:
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    cases = json.loads(sys.argv[1])
    msgs = [{"role": "user", "content": "hi"}]
    render_chat_template("{{ messages }}", msgs)
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    before, report = peak_kib(), {}
    for name, (template, max_memory) in cases.items():
        start = time.monotonic()
        try:
            render_chat_template(template, msgs, max_seconds=5.0, max_memory=max_memory)
            report[name] = "rendered"
        except TokenizerError as e:
            report[name] = str(e)
        report[name + " seconds"] = time.monotonic() - start
    report["growth_mib"] = (peak_kib() - before) / 1024
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def memory_report():
    """One subprocess (a fresh peak RSS) renders every big-allocation case: {name: (template,
    max_memory)}; None turns the RSS check off, to show that the size checks alone suffice."""
    big = ["str_times_4e9", "str_times_1e12", "list_repetition", "list_of_big_strings", "printing_many_references",
           "many_references_kept", "percent_width", "percent_many_fields", "format_width", "ljust",
           "replace_empty", "join_method", "center_filter", "indent_filter", "join_filter", "tojson_indent",
           "tilde_doubling", "macro_output_doubling", "nested_loops_with_output"]
    cases = {name: (HOSTILE[name][0], None) for name in big}
    # many strings, each small enough for the size checks, all kept: only the RSS budget sees them
    cases["kept_small_strings"] = ("{% set x = range(100000)|map('string')|map('center', 600)|list %}", 8 << 20)
    cases["kept_1mb_strings"] = ("{{ range(100000)|map('string')|map('center', 10**6)|list|length }}", 64 << 20)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return big, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM and /proc are Linux's")
def test_big_allocations_stay_bounded(memory_report):
    big, report = memory_report
    for name in big:
        assert "broken or hostile" in report[name], (name, report[name])
        assert report[name + " seconds"] < 4.0, (name, report)
    assert "max_memory=8 MiB" in report["kept_small_strings"], report
    assert "max_memory=64 MiB" in report["kept_1mb_strings"], report
    assert report["growth_mib"] < 100, report


# A list, tuple or dict that holds one value twice, n times over, is a tree of 2**n leaves built
# in n cheap steps; ==, in, sort, hash and str walk all of it inside C, where the tracer cannot
# stop them (the render never returned). Every way of building one is refused within ~20 steps.
def _doubling(step, start="[0]"):
    """Two equal, separately built values a and b, each doubled 60 times by `step` ({x})."""
    return ("{% set ns = namespace(a=" + start + ", b=" + start + ") %}{% for i in range(60) %}"
            "{% set ns.a = " + step.format(x="ns.a") + " %}{% set ns.b = " + step.format(x="ns.b") + " %}"
            "{% endfor %}{% set a, b = ns.a, ns.b %}")


DAGS = {
    "namespace_list": _doubling("[{x}, {x}]"),
    "namespace_tuple": _doubling("({x}, {x})", "(0,)"),
    "dict_literal": _doubling("{{'l': {x}, 'r': {x}}}", "{'l': 0}"),
    "dict_global": _doubling("dict(l={x}, r={x})", "dict(l=0)"),
    "namespace_global_values": _doubling("namespace(v=[{x}, {x}]).v"),
    "filter_batch": _doubling("range(1)|batch(3, fill_with={x})|first"),
    "filter_map_list": _doubling("range(2)|map(attribute='missing', default={x})|list"),
    "filter_map_reverse": _doubling("range(2)|map(attribute='missing', default={x})|reverse"),
    "filter_dictsort": _doubling("dict(l={x}, r={x})|dictsort"),
    "filter_items": _doubling("dict(l={x}, r={x})|items|list"),
    "filter_groupby": _doubling("range(2)|map(attribute='missing', default={x})|groupby(0)"),
    "filter_sum": _doubling("[[{x}], [{x}]]|sum(start=[])"),
    "call_fromkeys": _doubling("dict.fromkeys('lr', {x})"),
    "macro_varargs": "{% macro pair(x) %}{% set ns.v = varargs %}{% endmacro %}" + _doubling(
        "ns.v if pair(0, {x}, {x}) is string else 0"),
    # no namespace, no loop: 120 plain assignments
    "set_statements": "{% set a = [0] %}{% set b = [0] %}" + "{% set a = [a, a] %}{% set b = [b, b] %}" * 60,
}
TRIGGERS = {
    "eq": "{{ a == b }}", "ne": "{{ a != b }}", "lt": "{{ a < b }}", "in": "{{ a in [b] }}",
    "not_in": "{{ a not in [b, 1] }}", "sort": "{{ [a, b]|sort|length }}", "min": "{{ [a, b]|min|length }}",
    "hash_dict_key": "{{ {a: 1, b: 2}|length }}", "hash_subscript": "{{ {}[a] }}",
    "unique": "{{ [a, b]|unique|list|length }}", "groupby": "{{ [a, b]|groupby(0)|length }}",
    "equalto": "{{ [a]|select('equalto', b)|list|length }}", "count": "{{ [a, b].count(b) }}",
    "tojson": "{{ a|tojson|length }}", "string": "{{ a|string|length }}", "print": "{{ a }}",
    "tilde": "{{ (a ~ '')|length }}", "format": "{{ '%s'|format(a)|length }}",
}


@pytest.mark.parametrize("dag", sorted(DAGS))
def test_shared_structure_is_refused_for_every_trigger(dag):
    for trigger, expr in TRIGGERS.items():
        start = time.monotonic()
        with pytest.raises(TokenizerError, match="weighs more than|exceeds max_chars") as info:
            render_chat_template(DAGS[dag] + expr, [{"role": "user", "content": "hi"}], max_seconds=1.0)
        assert time.monotonic() - start < 3.0, (dag, trigger)
        assert "broken or hostile" in str(info.value)
    _assert_usable()


def test_shared_namespaces_are_compared_by_identity():
    """namespace(l=x, r=x) doubled: C compares and hashes namespaces by identity, and printing one
    is measured, so every trigger ends at once (an answer or a TokenizerError)."""
    template = _doubling("namespace(l={x}, r={x})", "namespace(l=0)")
    for trigger, expr in TRIGGERS.items():
        start = time.monotonic()
        try:
            out = render_chat_template(template + expr, [{"role": "user", "content": "hi"}], max_seconds=1.0,
                                       max_chars=10_000)
            assert len(out) < 100, (trigger, out[:100])
        except TokenizerError:
            pass
        assert time.monotonic() - start < 3.0, trigger
    _assert_usable()


# Values that no check made: the rows a filter yields to a for loop ([x] + 100,000 references to
# a value of ~720k, under the limit). Each operation that walks them inside C checks them first.
_ROWS = (_doubling("[{x}, {x}]").replace("range(60)", "range(16)") +
         "{% for row in [b]|batch(100000, fill_with=a) %}{% for row2 in [a]|batch(100000, fill_with=b) %}{X}"
         "{% endfor %}{% endfor %}")
UNCHECKED = {
    "compare": ("{{ row == row2 }}", "operand of a comparison"),
    "in": ("{{ row2 in row }}", "operand of a comparison"),
    "method_owner": ("{{ row.count(b) }}", "arguments of a call"),
    "method_argument": ("{{ [1].count(row) }}", "arguments of a call"),
    "loop_changed": ("{{ loop.changed(row) }}", "arguments of a call"),
    "macro": ("{% macro m(x) %}{% endmacro %}{{ m(row) }}", "arguments of a call"),
    "test": ("{{ row is equalto(row2) }}", "input of test 'equalto'"),
    "test_lower": ("{{ row is lower }}", "input of test 'lower'"),
    "sort_filter": ("{{ row|sort|length }}", "input of filter 'sort'"),
    "unique_filter": ("{{ row|unique|list|length }}", "input of filter 'unique'"),
    "namespace": ("{% set ns.r = row %}", "stored in a namespace"),
    "subscript": ("{{ {}[row] }}", "subscript"),
    "dict_key": ("{{ {row: 1} }}", "dict key"),
    "literal": ("{{ [row]|length }}", "template built"),
    "string": ("{{ row|string|length }}", "input of filter 'string'"),
    "print": ("{{ row }}", "printed value"),
}


@pytest.mark.parametrize("name", sorted(UNCHECKED))
def test_unchecked_heavy_value_is_checked_where_c_would_walk_it(name):
    expr, message = UNCHECKED[name]
    start = time.monotonic()
    with pytest.raises(TokenizerError, match=message):
        render_chat_template(_ROWS.replace("{X}", expr), [{"role": "user", "content": "hi"}], max_seconds=2.0)
    assert time.monotonic() - start < 4.0
    _assert_usable()


def test_generator_is_measured_before_a_filter_sorts_it():
    """sorted() of fresh, equal lists compares them element by element inside C: the items a
    generator yields to sort are collected and weighed first."""
    with pytest.raises(TokenizerError, match="input of filter 'sort'"):
        render_chat_template("{{ range(60)|map('string')|map('center', 20000)|map('list')|sort|length }}",
                             [{"role": "user", "content": "hi"}], max_seconds=2.0)
    _assert_usable()


def test_deep_nesting_is_refused():
    """(x,) wrapped 100,000 times is light, but C hashes it recursively (no recursion check)."""
    template = ("{% set ns = namespace(x=0) %}{% for i in range(100000) %}{% set ns.x = (ns.x,) %}"
                "{% endfor %}{{ {ns.x: 1}|length }}")
    with pytest.raises(TokenizerError, match="nested more than"):
        render_chat_template(template, [{"role": "user", "content": "hi"}], max_seconds=2.0)
    _assert_usable()


def test_values_as_heavy_as_the_inputs_are_allowed():
    """The limit is twice max_chars, or twice the inputs when heavier: a template may keep the
    messages (and a copy of them) around even when they outweigh max_chars."""
    messages = [{"role": "user", "content": "x" * 1000}, {"role": "assistant", "content": "y" * 1000}] * 3
    template = ("{% set ns = namespace(all=messages, copy=messages|list) %}{% set both = [ns.all, ns.copy] %}"
                "{{ both|length }} {{ ns.all == ns.copy }} {{ messages[0] in ns.copy }} {{ (messages|last).role }}")
    assert render_chat_template(template, messages, max_chars=1000) == "2 True True assistant"
    with pytest.raises(TokenizerError, match="weighs more than"):
        render_chat_template("{% set x = [messages, messages, messages] %}", messages, max_chars=1000)
