"""Render a checkpoint's chat template, which is untrusted Jinja code, within bounds.

The output equals transformers' `tok.apply_chat_template(messages, tokenize=False)`: the same
immutable sandbox, options, extensions, filters, globals and context variables. On top of that,
sizes are checked *before* anything big is built, a tracer on the rendering thread stops template
code at a deadline or when the process RSS grows past a budget, and the output is bounded.

The tracer only sees Python code, so no single C-level operation may run long: every list, tuple
and dict a template makes (literals, filter and call results, namespace attributes) and every
operand of a comparison, filter, test, call or subscript is weighed as the tree it stands for
(shared items counted each time they occur), against a per-render budget. `x = [x, x]` repeated
is cheap to build but would make `==`, `in`, sort or hash walk 2**n paths inside C: it is
refused after about 20 doublings instead.
"""
from __future__ import annotations

import contextvars
import functools
import json
import math
import os
import re
import string
import sys
import time
import types
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, operators, optimizeconst
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from markupsafe import Markup

from .errors import RequestError, TokenizerError

MAX_INT_BITS = 100_000   # ~30k digits; str() refuses ints past 4300 digits anyway
MAX_JSON_INDENT = 1_000  # tojson writes indent * depth per line, so the width itself is capped
MAX_NESTING = 256        # C hashes nested tuples recursively, without a recursion check
_TEMPLATE_FILE = "<template>"  # co_filename of the code Environment.from_string compiles
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?([-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?)[hlL]?([a-zA-Z%])")
_max_chars = contextvars.ContextVar("wsd_template_max_chars", default=1_000_000)
_sizes = contextvars.ContextVar("wsd_template_sizes", default=None)  # the render's _Sizes


class _LimitHit(BaseException):
    """A bound was hit. A BaseException, so that no `except Exception` in Jinja swallows it."""


class _TemplateRaised(jinja2.TemplateError):
    """The template called raise_exception() (transformers raises a TemplateError too)."""


def _limit(size: int, what: str) -> None:
    if size > _max_chars.get():
        raise _LimitHit(f"{what} ({size:,}) exceeds max_chars={_max_chars.get():,}")


def _weight(x, budget: int | None = None) -> int:
    """About len(str(x)), counted no further than `budget`. Containers are walked: a list of a
    million references to one big string is cheap to build, not to print."""
    budget = _max_chars.get() if budget is None else budget
    if isinstance(x, str):
        return len(x)
    if isinstance(x, int):
        return x.bit_length() // 3 + 1
    sizes = _sizes.get()
    known = sizes.known.get(id(x)) if sizes is not None else None
    if known is not None:  # weighed already, as a tree (_Sizes)
        return known[1]
    if isinstance(x, Namespace):
        x = x._Namespace__attrs  # printed as its dict
    if isinstance(x, dict):
        x = x.items()
    elif not isinstance(x, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
        return 16  # None, floats, Undefined, macros...: short reprs
    total = 2
    for item in x:
        total += 2 + (len(item) if type(item) is str else _weight(item, budget - total))
        if total > budget:
            break
    return total


class _Over(Exception):
    """A value weighs more than the budget (internal to _Sizes)."""


# values that no C operation walks: checked with one set lookup (subclasses take the slow path);
# namespaces are added below (compared and hashed by identity; printing them is measured)
_LEAF_TYPES = {str, int, bool, float, type(None), Markup, jinja2.Undefined, Namespace}
_VIEW_TYPES = (type({}.keys()), type({}.values()), type({}.items()))
_SMALL = 64  # lighter containers are walked again rather than remembered
_KNOWN_ROOM = 1 << 20  # references that remembered containers may hold (they are kept alive
                      # until the render ends): past it, walks are only repeated


class _Sizes:
    """The weights, as trees, of the containers one render touches. `x = [x, x]` builds a tree of
    2**n leaves in n cheap steps; ==, in, sort, hash and str walk all of it inside C, where the
    tracer cannot stop them. So every container a template makes or hands to such an operation
    is weighed here first, and none may weigh more than `limit`: twice max_chars, or twice the
    render's inputs when those are heavier (a template may keep a copy of the messages).

    Weights are about len(str(x)), counting a shared item every time it occurs, and a walk stops
    as soon as it passes the limit, so a check costs at most limit/2 steps of Python (which the
    tracer sees). Weights are also remembered by id (the objects are kept, so ids are not reused;
    the sandbox cannot change a list, tuple or dict once built), so that `[x, x]` usually costs
    two look-ups, not a walk of x. A namespace counts as a leaf: C operations compare and hash
    it by identity, and printing it is measured by _weight. Nesting is bounded too (MAX_NESTING):
    C hashes and compares nested values recursively."""

    def __init__(self, max_chars: int, inputs=None):
        self.limit = 2 * max_chars
        self.inputs = inputs  # weighed once, the first time a value passes the limit
        self.known: dict[int, tuple] = {}  # id -> (container, weight, nesting)
        self.room = _KNOWN_ROOM

    def check(self, value, what: str) -> None:
        try:
            self._weigh(value)
        except _Over:
            if self.inputs is None:
                raise _LimitHit(f"{what} weighs more than {self.limit:,} characters (as a tree: a "
                                "list, tuple or dict counts each item every time it occurs)") from None
            inputs, self.inputs, limit = self.inputs, None, self.limit
            self.limit = math.inf  # the inputs are trees (_plain built them): a linear walk
            try:
                weight = self._weigh(inputs)[0]
            finally:
                self.limit = limit
            self.limit = max(limit, 2 * weight)
            self.check(value, what)

    def _weigh(self, x) -> tuple[int, int]:
        """(weight, nesting) of x; _Over as soon as the weight passes the limit."""
        t = type(x)
        if t in _LEAF_TYPES:  # isinstance() would ask a namespace for its __class__ (Python code)
            return (len(x) if t is str or t is Markup else x.bit_length() // 3 + 1 if t is int else 16), 0
        known = self.known.get(id(x))
        if known is not None:
            return known[1], known[2]
        if isinstance(x, str):
            return len(x), 0
        if isinstance(x, int):
            return x.bit_length() // 3 + 1, 0
        if isinstance(x, dict):
            items = x.items()
        elif isinstance(x, _VIEW_TYPES[2]):  # an items view: its dict's pairs, not fresh tuples
            items = x.mapping.items()
        elif isinstance(x, (list, tuple, set, frozenset, *_VIEW_TYPES)):
            items = None
        else:
            return 16, 0  # None, floats, Undefined, namespaces, macros, generators, ranges...
        total, nesting, limit = 2, 0, self.limit
        for item in (x if items is None else (v for pair in items for v in pair)):
            if type(item) is str:
                total += 2 + len(item)
            else:
                weight, depth = self._weigh(item)
                total += 2 + weight
                if depth > nesting:
                    nesting = depth
            if total > limit:
                raise _Over
        nesting += 1
        if nesting > MAX_NESTING:
            raise _LimitHit(f"a list, tuple or dict is nested more than {MAX_NESTING} levels deep")
        if total > _SMALL and self.room > 0:
            self.room -= 8 + len(x)
            self.known[id(x)] = (x, total, nesting)
        return total, nesting


def _bounded(value, what: str = "a list, tuple or dict the template built"):
    """value, once its weight as a tree is known to be within the render's budget."""
    if type(value) not in _LEAF_TYPES:
        sizes = _sizes.get()
        (sizes or _Sizes(_max_chars.get())).check(value, what)
    return value


def _bounded_args(args, kwargs, what: str, owner=None) -> None:
    """The arguments of one call, together, within the budget (a macro's varargs is a tuple of
    them; list.count(x) walks its list): the common all-strings case costs a few type checks."""
    if type(owner) in _LEAF_TYPES:
        for v in args:
            if type(v) not in _LEAF_TYPES:
                break
        else:
            for k, v in kwargs.items():
                if type(v) not in _LEAF_TYPES and k not in _INTERNAL_KWARGS:
                    break
            else:
                return
    heavy = [v for v in (owner, *args, *(v for k, v in kwargs.items() if k not in _INTERNAL_KWARGS))
             if type(v) not in _LEAF_TYPES]
    _bounded(heavy[0] if len(heavy) == 1 else heavy, what)


_INTERNAL_KWARGS = frozenset({"_loop_vars", "_block_vars"})  # Jinja's own, popped by Context.call


def _replace_size(s: str, old: str, new: str, count=-1) -> int:
    n = s.count(old) if old else len(s) + 1
    return len(s) + (n if count is None or count < 0 else min(n, count)) * (len(new) - len(old))


def _format_size(fmt: str, specs: list[str], values) -> int:
    """Bound of len(fmt % values) or len(fmt.format(*values)): each field may print the longest
    value padded to the widest width; a width taken from the arguments may be any int of them."""
    values, specs_text = list(values), " ".join(specs)
    width = max(map(int, re.findall(r"\d+", specs_text)), default=0)
    if "*" in specs_text or "{" in specs_text:
        width = max([width] + [abs(v) for v in values if isinstance(v, int)])
    return len(fmt) + len(specs) * (max(map(_weight, values), default=0) + width)


def _percent_size(fmt: str, right) -> int:
    values = right.values() if isinstance(right, Mapping) else right if isinstance(right, tuple) else [right]
    return _format_size(fmt, [spec for spec, conv in _PERCENT_FIELD.findall(fmt) if conv != "%"], values)


def _binop_size(op: str, left, right) -> int:
    """Size of the result of an intercepted operator, from the operands alone."""
    seq = (str, list, tuple)
    if op == "*" and isinstance(left, int) and isinstance(right, seq):
        left, right = right, left
    if op == "*" and isinstance(left, seq) and isinstance(right, int):
        return _weight(left) * max(right, 0)
    bits = 0
    if op == "*" and isinstance(left, int) and isinstance(right, int):
        bits = left.bit_length() + right.bit_length()
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        bits = left.bit_length() * right
    if bits > MAX_INT_BITS:
        raise _LimitHit(f"an integer of {bits:,} bits from {op!r} exceeds {MAX_INT_BITS:,} bits")
    if op == "+" and isinstance(left, seq) and isinstance(right, seq):
        return _weight(left) + _weight(right)
    return _percent_size(left, right) if op == "%" and isinstance(left, str) else 0


def _str_method_size(s: str, name: str, args, kwargs) -> int:
    """Size of the result of `s.name(*args, **kwargs)`, for the str methods that can grow much."""
    if name in ("ljust", "rjust", "center", "zfill"):
        return max([len(s)] + list(args[:1]))
    if name == "expandtabs":
        return len(s) + s.count("\t") * max(0, args[0] if args else kwargs.get("tabsize", 8))
    if name == "replace":
        return _replace_size(s, *args, **kwargs)
    if name == "join":
        return sum(map(_weight, args[0])) + len(s) * len(args[0])
    if name in ("format", "format_map"):
        values = args[0].values() if name == "format_map" and isinstance(args[0], Mapping) else args
        specs = [spec or "" for _, field, spec, _ in string.Formatter().parse(s) if field is not None]
        return _format_size(s, specs, [*values, *kwargs.values()])
    return len(s) * (1 + _weight(args[0])) if name == "translate" else 0


def _bounded_concat(parts, what: str = "the rendered text") -> str:
    """"".join that stops at max_chars; Jinja's environment.concat (output, macros, blocks)."""
    out, total, cap = [], 0, _max_chars.get()
    for part in parts:
        total += len(part)
        if total > cap:
            _limit(total, what)
        out.append(part)
    return "".join(out)


def _bounded_join(join):
    """`a ~ b` compiles to str_join((a, b)), which the sandbox cannot intercept as an operator."""
    def bounded(seq):
        seq = tuple(seq)
        _limit(sum(map(_weight, seq)), "a '~' concatenation")
        return join(seq)
    return bounded


def _finalize(value):
    """Every `{{ expr }}` passes here before str(): refuse to print a huge structure."""
    if not isinstance(value, str):
        _limit(_weight(value), "a printed value")
    return value


# Filters that never turn their whole input into one string; the others get their input measured.
_STRUCTURAL_FILTERS = frozenset(
    "abs attr batch count d default dictsort first float groupby int items last length list map max "
    "min random reject rejectattr reverse round select selectattr slice sort sum tojson unique".split())
_FILTER_GROWTH = {  # bounds of the output size, from the filter's arguments
    "indent": lambda s, width=4, first=False, blank=False:
        len(str(s)) + (str(s).count("\n") + 1) * (len(width) if isinstance(width, str) else width),
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True:
        len(str(s)) * (1 + len(wrapstring or "\n")),
    "replace": lambda s, old, new, count=None: _replace_size(str(s), str(old), str(new), count),
    "join": lambda value, d="", attribute=None: _weight(value) + len(str(d)) * len(value),
    "format": lambda value, *args, **kwargs: _percent_size(str(value), tuple(kwargs.values()) or args),
    # sum(start=[]) copies the running list at every step: quadratic time inside C, unseen by the tracer
    "sum": lambda it, attribute=None, start=0: 0 if isinstance(start, (int, float))
        else len(it) * _weight(it, _max_chars.get() // max(len(it), 1)),
    "urlize": lambda value, *args, **kwargs: len(str(value)) * (60 + _weight([*args, *kwargs.values()])),
}


def _guard_filter(name: str, fn):
    skip = 1 if getattr(fn, "jinja_pass_arg", None) else 0  # its context/environment argument
    growth = _FILTER_GROWTH.get(name)

    @functools.wraps(fn)  # keeps jinja_pass_arg
    def guarded(*args, **kwargs):
        head, args = args[:skip], list(args[skip:])
        if (name == "join" or name in _COMPARING_FILTERS) and args and isinstance(args[0], Iterator):
            args[0] = list(args[0])  # measure the items, then pass the same items on
        numbers = [abs(v) for v in [*args[1:], *kwargs.values()] if isinstance(v, int)]  # widths, counts
        _limit(max(numbers, default=0), f"a number given to filter {name!r}")
        if name not in _STRUCTURAL_FILTERS:
            _limit(sum(map(_weight, [*args, *kwargs.values()])), f"the input of filter {name!r}")
        if growth is not None:
            _limit(growth(*args, **kwargs), f"the output of filter {name!r}")
        if name in _COMPARING_FILTERS:
            _bounded_args(args, kwargs, f"the input of filter {name!r}")
        elif len(args) > 1 or kwargs:  # keys and values it may hash or compare (map(attribute=...))
            _bounded_args(args[1:], kwargs, f"an argument of filter {name!r}")
        return _bounded(fn(*head, *args, **kwargs), f"the output of filter {name!r}")
    return guarded


# Filters that compare, hash or add their input's items inside C (the others copy references,
# call Python code per item, or have their input measured above); tests that compare or print
_COMPARING_FILTERS = frozenset("dictsort groupby max min sort sum unique".split())
_SHALLOW_TESTS = frozenset("boolean callable defined divisibleby escaped even false float integer iterable "
                           "mapping none number odd sameas sequence string true undefined".split())


def _guard_test(name: str, fn):
    if name in _SHALLOW_TESTS:
        return fn
    skip = 1 if getattr(fn, "jinja_pass_arg", None) else 0

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        _bounded_args(args[skip:], kwargs, f"the input of test {name!r}")
        return fn(*args, **kwargs)
    return guarded


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson (no HTML escaping, more options), encoded chunk by chunk within max_chars
    if (len(indent) if isinstance(indent, str) else indent or 0) > MAX_JSON_INDENT:
        raise _LimitHit(f"tojson indent {indent!r:.20} exceeds {MAX_JSON_INDENT}")
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return _bounded_concat(encoder.iterencode(x), "the output of filter 'tojson'")


def _raise_exception(message):
    raise _TemplateRaised(message)


class _TemplateDict:
    """As in transformers: `dict` without the type's own attributes (no type-hackery)."""
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """As in transformers: a namespace that refuses underscore-prefixed attribute names."""
    def __init__(*args, **kwargs):  # Jinja's signature trick: `namespace(self=...)` works
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        _bounded_args((), attrs, "the values given to namespace()")
        Namespace.__init__(args[0], attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, _bounded(value, "a value stored in a namespace"))

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute.")


_LEAF_TYPES.add(_TemplateNamespace)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; the body
    renders unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with list, tuple and dict literals and the operands of comparisons
    passed through _bounded (as `environment.bounded(...)`): no template-made container, and no
    comparison, can make C walk more than the render's budget."""

    def _visit_bounded(self, node, frame, what=None):
        if isinstance(node, nodes.Const):  # from the template's source: as small as its text
            return self.visit(node, frame)
        self.write("environment.bounded(")
        self.visit(node, frame)
        self.write(f", {what!r})" if what else ")")

    @staticmethod
    def _scalar(node):
        return isinstance(node, nodes.Const) and type(node.value) in (str, int, bool, float, type(None))

    def visit_Tuple(self, node, frame):
        if node.ctx != "load":  # an assignment target
            return super().visit_Tuple(node, frame)
        self.write("environment.bounded(")
        super().visit_Tuple(node, frame)
        self.write(")")

    def visit_List(self, node, frame):
        self.write("environment.bounded(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node, frame):
        self.write("environment.bounded({")  # keys are checked before the dict hashes them
        for idx, item in enumerate(node.items):
            if idx:
                self.write(", ")
            self._visit_bounded(item.key, frame, "a dict key")
            self.write(": ")
            self.visit(item.value, frame)
        self.write("})")

    @optimizeconst
    def visit_Getitem(self, node, frame):
        if isinstance(node.arg, (nodes.Const, nodes.Slice)):  # x['role'], x[1:]: nothing to hash
            return super().visit_Getitem(node, frame)
        self.write("environment.getitem(")  # a key is hashed and compared inside C
        self.visit(node.node, frame)
        self.write(", ")
        self._visit_bounded(node.arg, frame, "a subscript")
        self.write(")")

    @optimizeconst
    def visit_Compare(self, node, frame):
        # `x == 'user'`, `n > 0`, `'<think>' in s`: next to a str or number from the source, no
        # operand is walked deeper than its top level (list == str is NotImplemented at once)
        plain = len(node.ops) == 1 and (self._scalar(node.expr) or self._scalar(node.ops[0].expr))
        visit = self.visit if plain else functools.partial(self._visit_bounded, what="an operand of a comparison")
        self.write("(")
        visit(node.expr, frame)
        for op in node.ops:
            self.write(f" {operators[op.op]} ")
            visit(op.expr, frame)
        self.write(")")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "+", "%", "**"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                         extensions=[_GenerationTag, loopcontrols])
        self.bounded = _bounded  # what the generated code calls (an instance attribute: found fastest)
        self.concat = _bounded_concat
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, fn) for name, fn in self.filters.items()}
        self.tests = {name: _guard_test(name, fn) for name, fn in self.tests.items()}
        self.globals.update(raise_exception=_raise_exception, dict=_TemplateDict(), namespace=_TemplateNamespace,
                            strftime_now=lambda format: datetime.now().strftime(format))

    def call_binop(self, context, operator, left, right):
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept cheap
            size = len(left) + len(right)
        else:
            size = _binop_size(operator, left, right)
        if size > _max_chars.get():
            _limit(size, f"the result of {operator!r}")
        return self.binop_table[operator](left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's names: no clash with kwargs)
        # the sandbox hands str.format out wrapped; markupsafe's Markup methods are Python methods
        method = getattr(__obj, "__wrapped__", __obj) if isinstance(__obj, types.FunctionType) else __obj
        if isinstance(getattr(method, "__self__", None), str) and isinstance(
                method, (types.BuiltinMethodType, types.MethodType)):
            if method.__name__ == "join" and args and isinstance(args[0], Iterator):
                args = (list(args[0]),) + args[1:]
            size = _str_method_size(method.__self__, method.__name__, args, kwargs)
            _limit(size, f"the result of str.{method.__name__}()")
        # list.count(x), dict.get(k)...: the method's own object is walked too
        _bounded_args(args, kwargs, "the arguments of a call",
                      method.__self__ if isinstance(method, types.BuiltinMethodType) else None)
        return _bounded(super().call(__context, __obj, *args, **kwargs), "the result of a call")


_ENV = _BoundedEnvironment()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    compiled = _ENV.from_string(template)
    namespace = compiled.root_render_func.__globals__  # shared by the template's blocks and macros
    for name in ("str_join", "markup_join"):
        if name in namespace:
            namespace[name] = _bounded_join(namespace[name])
    return compiled


def _rss() -> int | None:
    """Resident memory in bytes (Linux /proc); None elsewhere, where only the size checks apply."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _Guard:
    """The rendering thread's sys.settrace tracer (no signals: any thread may render). Every line of
    template code and every 16th other Python call check the deadline, and the RSS every 2 ms."""

    def __init__(self, max_seconds: float, max_memory: int | None):
        self.max_seconds, self.max_memory = max_seconds, max_memory
        self.deadline, self.calls = time.monotonic() + max_seconds, 0
        start = _rss() if max_memory is not None else None
        self.rss_limit = math.inf if start is None else start + max_memory
        self.next_rss = math.inf if start is None else 0.0  # when to read the RSS next

    def on_call(self, frame, event, arg):  # called for every new Python frame: kept cheap
        if frame.f_code.co_filename == _TEMPLATE_FILE:
            self._check()
            return self._on_line
        self.calls += 1
        if not self.calls % 16:  # long loops in other Python code (a filter, json) stop too
            self._check()
        return None

    def _on_line(self, frame, event, arg):
        if event == "line":
            self._check()
        return self._on_line

    def _check(self):
        now = time.monotonic()
        if now > self.deadline:
            raise _LimitHit(f"rendering took longer than max_seconds={self.max_seconds}")
        if now >= self.next_rss:
            self.next_rss = now + 0.002
            if (_rss() or 0) > self.rss_limit:
                raise _LimitHit(f"the process memory grew by more than max_memory={self.max_memory // 2**20} MiB")


def _plain(value):
    """Template inputs rebuilt from JSON types, as transformers does: the sandbox does not know
    which methods of other objects (or of str/int subclasses) are dangerous."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages) -> list[dict]:
    """As transformers: plain dicts, keys whose value is None dropped, reasoning under its names."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for message in map(_plain, messages):
        if not isinstance(message, dict):
            raise RequestError(f"chat messages must be dicts, got {message!r:.80}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _broken(detail: str) -> TokenizerError:
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    return TokenizerError(f"the checkpoint's chat template is broken or hostile: {detail}")


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                         tools: list[dict] | None = None, documents: list[dict] | None = None,
                         special_tokens: dict | None = None, max_seconds: float = 2.0,
                         max_chars: int = 1_000_000, max_memory: int | None = 256 << 20, **extra) -> str:
    """Render like `tok.apply_chat_template(messages, tokenize=False, ...)`.

    The template sees messages, tools, documents, add_generation_prompt, the special tokens
    (a tokenizer's `special_tokens_map`: bos_token, eos_token, ...) and `extra` (which overrides
    them). TokenizerError when the template fails or calls raise_exception(), runs past
    max_seconds, builds or outputs more than max_chars characters, or grows the process RSS by
    more than max_memory bytes (None: no RSS check). RequestError for malformed messages."""
    if not isinstance(template, str) or not template:
        raise TokenizerError("there is no chat template to render (empty or not a string)")
    context = dict(messages=_prepare_messages(messages), tools=_plain(tools), documents=_plain(documents),
                   add_generation_prompt=add_generation_prompt,
                   **{**_plain(dict(special_tokens or {})), **_plain(extra)})
    token, guard, previous = _max_chars.set(max_chars), _Guard(max_seconds, max_memory), sys.gettrace()
    sizes_token = _sizes.set(_Sizes(max_chars, list(context.values())))
    try:
        sys.settrace(guard.on_call)  # this thread only
        try:
            return _ENV.concat(_compile(template).generate(context))
        finally:  # first thing, before any Python call could trip the tracer; restores e.g. coverage's
            sys.settrace(previous)
    except _LimitHit as e:
        raise _broken(f"it hit a limit: {e}") from None
    except _TemplateRaised as e:
        raise TokenizerError(f"the chat template refused these messages: {str(e)[:300]}") from None
    except RecursionError:
        raise _broken("it recursed too deeply (a recursive macro?)") from None
    except Exception as e:  # SecurityError, TemplateSyntaxError, UndefinedError, TypeError, MemoryError...
        raise _broken(f"{type(e).__name__}: {e}") from e
    finally:
        _max_chars.reset(token)
        _sizes.reset(sizes_token)


def render_for_tokenizer(tok, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
    """render_chat_template with a transformers tokenizer's own template and special tokens;
    kwargs: tools, documents, the limits, extra template variables."""
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # named templates: transformers picks one of these two
        use_tools = kwargs.get("tools") is not None and "tool_use" in template
        template = template.get("tool_use" if use_tools else "default")
    if not template:
        raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja)")
    return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                special_tokens=getattr(tok, "special_tokens_map", None), **kwargs)
