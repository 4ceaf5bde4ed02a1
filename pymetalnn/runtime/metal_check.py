"""Metal Shading Language 2.3 conformance check of kernel sources.

Why: the cpu and cuda backends compile our translation with a C++17 compiler, which accepts much
that Apple's Metal compiler refuses (metalcompute asks for MSL 2.3, fast math on). A kernel that
passes every test here could still fail to build on a Mac. This check reads the source as Metal
receives it (local includes inlined, variant defines prepended, `__METAL_VERSION__` = 230,
`__PYMETALNN__` undefined) through pymetalnn's own preprocessor, so every finding names the
`.metal` file and line, and reports what MSL 2.3 does not allow. The rules and their reasons are
listed in docs/dialect.md ("Metal 2.3 conformance"); each is a token-level check, exact for the
patterns it names, not a full C++ parser.

    violations = check_file("kernels/conv.metal")           # [] when conformant
    python tools/metal_check.py kernels examples            # the CLI, used by CI
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import MSLError
from .msl import _split_commas
from .preprocess import METAL_CONSTANTS, Preprocessor, Token

METAL_VERSION = 230  # MTLLanguageVersion.version2_3, what metalcompute 0.2.9 compiles with
# rules about running, not compiling: Metal builds the library and fails (threadgroup-memory) at
# pipeline creation, or runs with another threadgroup size (threadgroup-size)
NOT_COMPILER_RULES = frozenset({"threadgroup-memory", "threadgroup-size"})


@dataclass
class Violation:
    file: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: error: [{self.rule}] {self.message}"


# C++14 features MSL leaves out (MSL spec, "Restrictions"), as single keywords
RESTRICTED = {
    "goto": "MSL has no goto",
    "try": "MSL has no exception handling", "catch": "MSL has no exception handling",
    "throw": "MSL has no exception handling",
    "new": "MSL has no new/delete operators",
    "dynamic_cast": "MSL has no dynamic_cast", "typeid": "MSL has no type identification",
    "virtual": "MSL has no virtual functions", "register": "MSL has no register storage class",
    "thread_local": "MSL has no thread_local storage", "noexcept": "MSL has no noexcept",
    "double": "MSL has no double; use float",
}
# names from Metal versions after 2.3 (the version that introduced them)
NEWER = {
    "atomic_float": "3.0", "atomic_ulong": "2.4", "atomic_long": "2.4", "bfloat": "3.1",
    "simd_shuffle_and_fill_up": "2.4", "simd_shuffle_and_fill_down": "2.4",
    "quad_shuffle_and_fill_up": "2.4", "quad_shuffle_and_fill_down": "2.4",
    "mesh_grid_properties": "3.0", "os_log": "3.2", "memory_coherence": "3.2",
    "coherent": "3.2",
}
NEWER_ATTRS = {"stitchable": "2.4", "object": "3.0", "mesh": "3.0", "payload": "3.0",
               "max_total_threadgroups_per_mesh_grid": "3.0", "user_annotation": "3.2"}
ADDRESS_SPACES = {"device", "constant", "thread", "threadgroup", "threadgroup_imageblock",
                  "ray_data", "object_data"}
# Metal's overloaded math: one overload per type, so half with a float argument is ambiguous
OVERLOADED = {"min", "max", "clamp", "fmin", "fmax", "mix", "fma", "mad", "step", "smoothstep",
              "pow", "powr", "atan2", "fmod", "copysign", "select", "fdim"}
HALF_TYPES = {"half", "half2", "half3", "half4"}
KEYWORDS = {"return", "case", "else", "do", "goto", "if", "while", "for", "switch", "break",
            "continue", "sizeof", "alignof", "typedef", "using", "new", "delete", "throw",
            "default", "static_assert", "co_return"}
QUALIFIERS = {"threadgroup", "thread", "const", "constexpr", "static", "volatile", "constant",
              "device"}
MAX_THREADGROUP_MEMORY = 32768  # bytes; every Apple GPU family's limit


def _is_float_literal(t: Token) -> bool:
    """A floating literal that is float, not half, in MSL (no suffix, or f/F)."""
    if t.kind != "num" or t.text.lower().startswith("0x"):
        return False
    s = t.text
    if s[-1] in "hH":
        return False
    body = s[:-1] if s[-1] in "fF" else s
    return "." in body or "e" in body.lower()


def _match(toks: list[Token], i: int) -> int:
    """Index of the bracket closing toks[i]."""
    open_, close = toks[i].text, {"(": ")", "[": "]", "{": "}"}[toks[i].text]
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].text == open_:
            depth += 1
        elif toks[j].text == close:
            depth -= 1
            if depth == 0:
                return j
    return len(toks) - 1


def _match_angle(toks: list[Token], i: int) -> int:
    depth = 0
    for j in range(i, len(toks)):
        x = toks[j].text
        if x == "<":
            depth += 1
        elif x == ">":
            depth -= 1
        elif x == ">>":
            depth -= 2
        elif x in (";", "{"):
            return j
        if depth <= 0:
            return j
    return len(toks) - 1


@dataclass
class _Func:
    name: str
    tok: Token
    params: list[Token]
    body: list[Token]  # inside the braces
    is_kernel: bool
    template_params: list[str]


@dataclass
class KernelEntry:
    """A kernel the Metal library exports: its host name and the
    [[max_total_threads_per_threadgroup(N)]] it declares (None: none, so the pipeline's maximum;
    0: declared by an expression this scan does not evaluate)."""

    name: str
    max_threads: int | None
    file: str
    line: int
    impl: str = ""  # the kernel function (template) it instantiates
    targs: list[list[Token]] | None = None  # its template arguments, for an instantiation


class _Parser:
    """Top-level structure: function definitions (with bodies), kernels, file-scope variables."""

    def __init__(self, toks: list[Token]):
        self.toks = toks
        self.funcs: list[_Func] = []
        self.kernels: list[KernelEntry] = []
        self.file_vars: list[tuple[Token, list[Token]]] = []
        self.templates_tg: dict[str, int | None] = {}
        self._scope(0, len(toks), top=True)

    def _scope(self, i: int, end: int, top: bool) -> None:
        toks = self.toks
        start = i
        while i < end:
            t = toks[i]
            if t.text == "(" or t.text == "[":
                i = _match(toks, i) + 1
                continue
            if t.text == ";":
                self._decl(toks[start:i], None, top)
                i += 1
                start = i
                continue
            if t.text == "{":
                close = _match(toks, i)
                head = toks[start:i]
                words = [x.text for x in head]
                if words[:1] == ["namespace"] or (words[:1] == ["using"] and False):
                    self._scope(i + 1, close, top=True)
                elif any(w in ("struct", "class", "union") for w in words) and "(" not in words:
                    self._scope(i + 1, close, top=False)  # member functions
                elif "enum" in words or "=" in words:
                    pass  # an enum or an initializer: part of a declaration that ends with ';'
                else:
                    self._decl(head, (i, close), top)
                    i = close + 1
                    start = i
                    continue
                i = close + 1
                if "enum" in words or "=" in words or any(
                        w in ("struct", "class", "union") for w in words):
                    continue  # the declaration goes on to its ';'
                start = i
                continue
            i += 1

    def _decl(self, head: list[Token], body: tuple[int, int] | None, top: bool) -> None:
        if not head:
            return
        words = [t.text for t in head]
        tparams: list[str] = []
        h = 0
        explicit = False
        if words[0] == "template":
            if len(head) > 1 and head[1].text == "<":
                e = _match_angle(head, 1)
                for p in _split_commas(head[2:e]):
                    ids = [x.text for x in p if x.kind == "id"]
                    if "=" in [x.text for x in p]:
                        ids = [x.text for x in p[: [x.text for x in p].index("=")] if x.kind == "id"]
                    if ids:
                        tparams.append(ids[-1])
                h = e + 1
            else:
                explicit = True
                h = 1
        rest = head[h:]
        attrs: dict[str, list[Token]] = {}
        j = 0
        core: list[Token] = []
        while j < len(rest):
            if rest[j].text == "[" and j + 1 < len(rest) and rest[j + 1].text == "[":
                e = _match(rest, j)
                for part in _split_commas(rest[j + 2 : e - 1]):
                    attrs[part[0].text] = part
                j = e + 1
                continue
            if rest[j].text == "(":
                e = _match(rest, j)
                core.extend(rest[j : e + 1])
                j = e + 1
                continue
            core.append(rest[j])
            j += 1
        cwords = [t.text for t in core]
        is_kernel = "kernel" in attrs or "kernel" in cwords
        tg = None
        if "max_total_threads_per_threadgroup" in attrs:
            a = attrs["max_total_threads_per_threadgroup"]
            try:
                tg = int("".join(x.text for x in a[2:-1]).rstrip("uU"), 0)
            except ValueError:
                tg = 0  # declared, by an expression this scan does not evaluate
        host = None
        if "host_name" in attrs:
            host = "".join(x.text[1:-1] for x in attrs["host_name"] if x.kind == "str")
        # the declared name: the identifier before the first '(' (or '<' of a template-id)
        name_tok = None
        paren = None
        for k, t in enumerate(core):
            if t.text == "(":
                paren = k
                break
        if explicit and is_kernel:
            if "decltype" in cwords:
                d = cwords.index("decltype")
                after = core[d + 1 :]
                # decltype(f<T>) f<T>: the name after the parenthesis
                e = _match(after, 0) if after and after[0].text == "(" else -1
                cand = [x for x in after[e + 1 :] if x.kind == "id"]
                name_tok = cand[0] if cand else None
            elif paren is not None:
                ids = [x for x in core[:paren] if x.kind == "id"]
                lt = [k for k, x in enumerate(core[:paren]) if x.text == "<"]
                name_tok = core[lt[0] - 1] if lt else (ids[-1] if ids else None)
            if name_tok is not None and host:
                mt = tg if tg is not None else self.templates_tg.get(name_tok.text)
                targs: list[list[Token]] = []
                k = core.index(name_tok)
                if k + 1 < len(core) and core[k + 1].text == "<":
                    e = _match_angle(core, k + 1)
                    targs = _split_commas(core[k + 2 : e])
                self.kernels.append(KernelEntry(host, mt, name_tok.file, name_tok.line,
                                                name_tok.text, targs))
            return
        if paren is not None and paren > 0 and core[paren - 1].kind == "id":
            name_tok = core[paren - 1]
            if body is not None:
                params = core[paren + 1 : _match(core, paren)]
                b0, b1 = body
                self.funcs.append(_Func(name_tok.text, name_tok, params, self.toks[b0 + 1 : b1],
                                        is_kernel, tparams))
            if is_kernel:
                if tparams:
                    self.templates_tg[name_tok.text] = tg
                else:
                    self.kernels.append(KernelEntry(host or name_tok.text, tg, name_tok.file,
                                                    name_tok.line, name_tok.text))
            return
        if top and body is None and paren is None and not explicit:
            first = [w for w in cwords if w not in ("static",)]
            if first and first[0] not in ("typedef", "using", "struct", "class", "union", "enum",
                                          "namespace", "template", "static_assert", "extern"):
                self.file_vars.append((head[0], head))


def _collect_constants(toks: list[Token]) -> set[str]:
    """Names usable in a constant expression: constexpr and program-scope constant variables,
    constexpr functions, enumerators, template parameters, const variables initialized from
    constants (in source order)."""
    known: set[str] = set()
    n = len(toks)
    i = 0
    while i < n:
        t = toks[i]
        if t.text == "template" and i + 1 < n and toks[i + 1].text == "<":
            e = _match_angle(toks, i + 1)
            for p in _split_commas(toks[i + 2 : e]):
                ws = [x.text for x in p]
                ids = [x.text for x in (p[: ws.index("=")] if "=" in ws else p) if x.kind == "id"]
                if ids:
                    known.add(ids[-1])
            i = e + 1
            continue
        if t.text == "enum":
            j = i
            while j < n and toks[j].text not in ("{", ";"):
                j += 1
            if j < n and toks[j].text == "{":
                e = _match(toks, j)
                for p in _split_commas(toks[j + 1 : e]):
                    if p[0].kind == "id":
                        known.add(p[0].text)
                i = e + 1
                continue
        if t.text in ("constexpr", "constant", "const"):
            # the declared names of this declaration: ids followed by '=', '{', '[' or '('
            j = i + 1
            depth = 0
            while j < n and not (depth == 0 and toks[j].text in (";", "{", ")")):
                x = toks[j]
                if x.text in ("(", "["):
                    depth += 1
                elif x.text in (")", "]"):
                    depth -= 1
                elif depth == 0 and x.kind == "id" and j + 1 < n and toks[j + 1].text in (
                        "=", "{", "[", "(") and not (j + 1 < n and toks[j + 1].text == "(" and
                                                      t.text == "const"):
                    if t.text == "const":
                        # const T x = <init>: a constant only if <init> is
                        k = j + 2
                        d = 0
                        init = []
                        while k < n and not (d == 0 and toks[k].text in (";", ",")):
                            if toks[k].text in ("(", "[", "{"):
                                d += 1
                            elif toks[k].text in (")", "]", "}"):
                                d -= 1
                            init.append(toks[k])
                            k += 1
                        if toks[j + 1].text == "=" and _constant_expr(init, known) is None:
                            known.add(x.text)
                    else:
                        known.add(x.text)
                    if toks[j + 1].text == "(" and t.text == "constexpr":
                        break  # constexpr function: its parameters are not constants
                j += 1
        i += 1
    return known


def _constant_expr(expr: list[Token], known: set[str]) -> Token | None:
    """None when `expr` is a constant expression as far as tokens tell, else the first token
    that makes it run-time."""
    i = 0
    while i < len(expr):
        t = expr[i]
        if t.text in ("sizeof", "alignof"):
            if i + 1 < len(expr) and expr[i + 1].text == "(":
                i = _match(expr, i + 1) + 1
                continue
        if t.text in (".", "->"):
            return t
        if t.kind == "id":
            nxt = expr[i + 1].text if i + 1 < len(expr) else ""
            prv = expr[i - 1].text if i else ""
            if prv == "::" or nxt == "::":
                i += 1  # S::N: a member constant or a namespace-qualified one
                continue
            if t.text in known or t.text in ("true", "false", "uint", "int", "ushort", "short",
                                             "uchar", "char", "long", "ulong", "bool", "unsigned",
                                             "size_t", "float", "half"):
                i += 1
                continue
            return t
        i += 1
    return None


def _called(body: list[Token]) -> list[Token]:
    out = []
    for k in range(len(body) - 1):
        t = body[k]
        if t.kind == "id" and body[k + 1].text in ("(", "<") and (k == 0 or body[k - 1].text not in (
                ".", "->")):
            out.append(t)
    return out


def check_tokens(toks: list[Token]) -> list[Violation]:
    """Every finding in a preprocessed token stream."""
    out: list[Violation] = []

    def bad(t: Token, rule: str, msg: str) -> None:
        out.append(Violation(t.file, t.line, rule, msg))

    n = len(toks)
    for i, t in enumerate(toks):
        nxt = toks[i + 1].text if i + 1 < n else ""
        prv = toks[i - 1].text if i else ""
        if t.kind == "id":
            if t.text in RESTRICTED and not (t.text == "new" and prv == "operator"):
                bad(t, "restricted", f"'{t.text}': {RESTRICTED[t.text]}")
            elif t.text == "delete" and prv != "=":
                bad(t, "restricted", "'delete': MSL has no new/delete operators")
            elif t.text == "long" and nxt == "long":
                bad(t, "restricted", "'long long': MSL has no long long; use long")
            elif t.text == "std" and nxt == "::":
                bad(t, "std", f"'std::{toks[i + 2].text if i + 2 < n else ''}': the C++ standard "
                    "library is not available in Metal; use metal:: functions")
            elif t.text in NEWER and prv not in (".", "->"):
                bad(t, "version", f"'{t.text}' needs MSL {NEWER[t.text]}; metalcompute compiles "
                    "MSL 2.3")
            elif t.text.lower().startswith("pmn_"):
                bad(t, "prelude", f"'{t.text}' is a pymetalnn prelude name, unknown to Metal")
            elif t.text in ("struct", "class") and i + 2 < n and toks[i + 1].kind == "id":
                k = i + 2
                if toks[k].text == "final":
                    k += 1
                if k < n and toks[k].text == ":":
                    bad(toks[i + 1], "derived-class",
                        f"'{toks[i + 1].text}' derives from another class: MSL has no derived "
                        "classes; use a member or a template")
        elif t.text == "[" and nxt == "[":
            e = _match(toks, i)
            for part in _split_commas(toks[i + 2 : e - 1]):
                if part and part[0].text in NEWER_ATTRS:
                    bad(part[0], "version", f"[[{part[0].text}]] needs MSL "
                        f"{NEWER_ATTRS[part[0].text]}; metalcompute compiles MSL 2.3")
        elif t.text == "[" and prv != "[" and (i == 0 or prv in (
                "=", "(", ",", "{", ";", "return", "?", ":", "&&", "||", "!")):
            e = _match(toks, i)
            after = toks[e + 1].text if e + 1 < n else ""
            if after in ("(", "{", "mutable", "->"):
                bad(t, "lambda", "lambda expression: MSL has no lambdas; write a function")
        elif t.text == "(" and nxt in ("*", "&") and i + 2 < n:
            k = i + 2
            if toks[k].kind == "id":
                k += 1
            if k + 1 < n and toks[k].text == ")" and toks[k + 1].text == "(" and (
                    i == 0 or toks[i - 1].kind == "id" or prv in (">", "::")):
                bad(t, "function-pointer", "function pointer or reference type: MSL 2.3 has no "
                    "function pointers outside visible function tables")

    p = _Parser(toks)
    funcs_by_name: dict[str, list[_Func]] = {}
    for f in p.funcs:
        funcs_by_name.setdefault(f.name, []).append(f)
        if f.name == "main":
            bad(f.tok, "restricted", "a Metal function may not be named main")
    user = set(funcs_by_name)
    for i, t in enumerate(toks):  # &f where f is a function: its address
        if t.text == "&" and i + 1 < len(toks) and toks[i + 1].text in user and (
                i + 2 >= len(toks) or toks[i + 2].text not in ("(", "<")) and (
                i == 0 or toks[i - 1].text in ("=", "(", ",", "return")):
            bad(t, "function-pointer", f"'&{toks[i + 1].text}' takes a function's address: MSL "
                "2.3 has no function pointers")

    # recursion: a cycle in the call graph of user functions (overloads merged by name)
    graph: dict[str, list[Token]] = {}
    for f in p.funcs:
        graph.setdefault(f.name, []).extend(c for c in _called(f.body) if c.text in user)
    reported: set[tuple[str, int]] = set()
    for start in graph:
        stack = [(start, [start])]
        seen = {start}
        while stack:
            cur, path = stack.pop()
            for c in graph.get(cur, []):
                if c.text == start:
                    key = (c.file, c.line)
                    if key not in reported:
                        reported.add(key)
                        bad(c, "recursion", "recursive call (" + " -> ".join(path + [start])
                            + "): MSL has no recursion")
                elif c.text not in seen:
                    seen.add(c.text)
                    stack.append((c.text, path + [c.text]))

    # threadgroup memory sized for the threadgroup, with a size Metal does not know: without the
    # attribute, metalcompute dispatches the pipeline's maximum (up to 1024, depending on the
    # kernel's registers) while cuda and cpu dispatch 256
    for k in p.kernels:
        if k.max_threads is not None:
            continue
        for f in funcs_by_name.get(k.impl, []):
            if f.is_kernel:
                uses = [t for t in f.body if t.text in ("threadgroup", "threadgroup_barrier")]
                if uses:
                    key = (f.tok.file, f.tok.line)
                    if key not in reported:
                        reported.add(key)
                        bad(f.tok, "threadgroup-size", f"kernel '{k.name}' uses '{uses[0].text}' "
                            "but declares no [[max_total_threads_per_threadgroup(N)]]: Metal "
                            "would run it with the pipeline's maximum threadgroup size")
    _check_threadgroup_memory(p, funcs_by_name, bad)
    known = _collect_constants(toks)
    for f in p.funcs:
        _check_threadgroup_decls(f, bad)
        _check_params(f, bad)
        _check_arrays(f, known, bad)
        _check_half_calls(f, bad)
    for t, head in p.file_vars:
        words = {x.text for x in head}
        if not words & {"constant", "constexpr"}:
            bad(t, "program-scope", "a program-scope variable must be 'constant' (or constexpr) "
                "in MSL")
    return out


def _threadgroup_decls(f: _Func) -> list[tuple[Token, list[Token]]]:
    """(the 'threadgroup' token, the declaration up to ';') of every threadgroup variable
    declared in the body (pointers and references to threadgroup memory excluded)."""
    out = []
    body = f.body
    for i, t in enumerate(body):
        if t.text != "threadgroup" or (i and body[i - 1].text not in (";", "{", "}", "const")):
            continue
        j = i
        depth = 0
        while j < len(body) and not (depth == 0 and body[j].text == ";"):
            if body[j].text in ("(", "[", "{"):
                depth += 1
            elif body[j].text in (")", "]", "}"):
                depth -= 1
            j += 1
        decl = body[i:j]
        head = []
        for x in decl:
            if x.text in ("=", "[", "{"):
                break
            head.append(x.text)
        if "*" in head or "&" in head or "(" in head:
            continue
        out.append((t, decl))
    return out


def _check_threadgroup_decls(f: _Func, bad) -> None:
    for t, decl in _threadgroup_decls(f):
        words = [x.text for x in decl]
        if not f.is_kernel:
            bad(t, "threadgroup-scope", f"threadgroup variable in '{f.name}', not a kernel: MSL "
                "declares threadgroup memory in kernel functions only; pass a threadgroup pointer")
        if "=" in words or (words.count("{") and words.index("{") > 1):
            bad(t, "threadgroup-init", "a threadgroup variable cannot have an initializer in MSL; "
                "store its value after the declaration")


_BINARY = {"||": 1, "&&": 2, "|": 3, "^": 4, "&": 5, "==": 6, "!=": 6, "<": 7, ">": 7, "<=": 7,
           ">=": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10}
_INT_TYPES = {"int", "uint", "short", "ushort", "char", "uchar", "long", "ulong", "unsigned",
              "size_t", "bool", "int32_t", "uint32_t"}


def _eval(toks: list[Token], env: dict[str, object]) -> int | None:
    """An integer constant expression of literals, names bound in `env` (ints, or token lists
    for type parameters), sizeof(type) and integer casts; None if anything else appears."""
    pos = 0

    def atom() -> int:
        nonlocal pos
        t = toks[pos]
        pos += 1
        if t.text == "(":
            v = expr(0)
            pos += 1  # ')'
            return v
        if t.text in ("-", "+", "!", "~"):
            v = expr(11)
            return {"-": -v, "+": v, "!": int(not v), "~": ~v}[t.text]
        if t.kind == "num":
            return int(t.text.rstrip("uUlL"), 0)
        if t.text in ("true", "false"):
            return int(t.text == "true")
        if t.text in ("sizeof", "alignof"):
            e = _match(toks, pos)
            words = [x.text for x in _resolve_type(toks[pos + 1 : e], env,
                                                   env.get("\0prog"))]  # type: ignore[arg-type]
            pos = e + 1
            lay = _type_layout(words, {})
            if lay is None:
                raise ValueError
            return lay[0] if t.text == "sizeof" else lay[1]
        if t.text in _INT_TYPES and pos < len(toks) and toks[pos].text == "(":
            return atom()  # int(x): a conversion, integral here
        prog = env.get("\0prog")
        if prog is not None and t.text in prog.funcs and pos < len(toks) and \
                toks[pos].text in ("<", "("):  # a constexpr function template: f<args>()
            params, ret = prog.funcs[t.text]
            targs: list[list[Token]] = []
            if toks[pos].text == "<":
                e = _match_angle(toks, pos)
                targs = _split_commas(toks[pos + 1 : e])
                pos = e + 1
            if toks[pos].text != "(" or toks[pos + 1].text != ")" or len(targs) != len(params):
                raise ValueError
            pos += 2
            bind: dict[str, object] = {"\0prog": prog}
            for name, a in zip(params, targs):
                v = _eval(a, env)
                bind[name] = v if v is not None else _subst(a, env)
            r = _eval(ret, bind)
            if r is None:
                raise ValueError
            return r
        v = env.get(t.text)
        if isinstance(v, int):
            return v
        raise ValueError

    def expr(min_prec: int) -> int:
        nonlocal pos
        v = atom()
        while pos < len(toks):
            op = toks[pos].text
            if op == "?" and min_prec == 0:
                pos += 1
                a = expr(0)
                pos += 1  # ':'
                b = expr(0)
                v = a if v else b
                continue
            prec = _BINARY.get(op)
            if prec is None or prec < min_prec:
                break
            pos += 1
            w = expr(prec + 1)
            if op in ("/", "%") and w == 0:
                raise ValueError
            v = _apply_op(op, v, w)
        return v

    try:
        v = expr(0)
    except (ValueError, IndexError, KeyError):
        return None
    return v if pos == len(toks) else None


def _apply_op(op: str, v: int, w: int) -> int:
    if op in ("/", "%"):
        q = int(v / w)  # C: truncation toward zero
        return q if op == "/" else v - w * q
    table = {"||": int(bool(v or w)), "&&": int(bool(v and w)), "==": int(v == w),
             "!=": int(v != w), "<": int(v < w), ">": int(v > w), "<=": int(v <= w),
             ">=": int(v >= w), "+": v + w, "-": v - w, "*": v * w, "|": v | w, "^": v ^ w,
             "&": v & w}
    if op in table:
        return table[op]
    if w < 0 or w > 64:
        raise ValueError
    return v << w if op == "<<" else v >> w


def _subst(toks: list[Token], env: dict[str, object]) -> list[Token]:
    """Template type parameters replaced by their arguments' tokens."""
    out: list[Token] = []
    for t in toks:
        v = env.get(t.text) if t.kind == "id" else None
        if isinstance(v, list):
            out.extend(v)
        elif isinstance(v, int):
            out.append(Token("num", str(v), t.file, t.line))
        else:
            out.append(t)
    return out


@dataclass
class _Program:
    """What integer and type evaluation needs from the whole source: constexpr functions
    (`template <...> constexpr int f() { return e; }`) and class templates' member typedefs,
    with their partial specializations."""

    funcs: dict[str, tuple[list[str], list[Token]]]
    types: dict[str, list[tuple[list[str], list[list[Token]] | None, dict[str, list[Token]]]]]


def _template_params(toks: list[Token], i: int) -> tuple[list[str], int]:
    """Names of `template < ... >` starting at toks[i] ('template'), and the index after '>'."""
    e = _match_angle(toks, i + 1)
    names = []
    for prm in _split_commas(toks[i + 2 : e]):
        ws = [x.text for x in prm]
        ids = [x.text for x in (prm[: ws.index("=")] if "=" in ws else prm) if x.kind == "id"]
        if ids:
            names.append(ids[-1])
    return names, e + 1


def _program(toks: list[Token]) -> _Program:
    prog = _Program({}, {})
    n = len(toks)
    for i, t in enumerate(toks):
        if t.text != "template" or i + 1 >= n or toks[i + 1].text != "<":
            continue
        params, j = _template_params(toks, i)
        if j + 2 < n and toks[j].text == "constexpr":
            k = j
            while k < n and toks[k].text not in ("(", "{", ";"):
                k += 1
            if k + 2 < n and toks[k].text == "(" and toks[k + 1].text == ")" and \
                    toks[k + 2].text == "{" and toks[k + 3].text == "return":
                e = _match(toks, k + 2)
                prog.funcs[toks[k - 1].text] = (params, toks[k + 4 : e - 1])  # up to ';'
        elif j + 1 < n and toks[j].text in ("struct", "class") and toks[j + 1].kind == "id":
            name = toks[j + 1].text
            k = j + 2
            pattern = None
            if k < n and toks[k].text == "<":
                e = _match_angle(toks, k)
                pattern = _split_commas(toks[k + 1 : e])
                k = e + 1
            if k >= n or toks[k].text != "{":
                continue
            e = _match(toks, k)
            members: dict[str, list[Token]] = {}
            body = toks[k + 1 : e]
            m = 0
            while m < len(body):
                if body[m].text in ("typedef", "using"):
                    q = m
                    while q < len(body) and body[q].text != ";":
                        q += 1
                    d = body[m + 1 : q]
                    if body[m].text == "typedef" and d:
                        members[d[-1].text] = d[:-1]
                    elif len(d) > 2 and d[1].text == "=":
                        members[d[0].text] = d[2:]
                    m = q
                m += 1
            prog.types.setdefault(name, []).append((params, pattern, members))
    return prog


def _resolve_type(toks: list[Token], env: dict[str, object], prog: _Program | None
                  ) -> list[Token]:
    """`toks` with template parameters substituted and NAME<args>::member resolved through the
    class template's matching specialization (else its primary template)."""
    toks = [t for t in _subst(toks, env) if t.text != "typename"]
    if prog is None or len(toks) < 4 or toks[0].text not in prog.types or toks[1].text != "<":
        return toks
    e = _match_angle(toks, 1)
    if e + 2 >= len(toks) or toks[e + 1].text != "::":
        return toks
    args = _split_commas(toks[2:e])
    member = toks[e + 2].text
    vals = [_eval(a, {}) for a in args]
    for params, pattern, members in sorted(prog.types[toks[0].text], key=lambda c: c[1] is None):
        if member not in members:
            continue
        bind: dict[str, object] = {}
        if pattern is None:
            if len(params) != len(args):
                continue
            bind = {p: (v if v is not None else a) for p, a, v in zip(params, args, vals)}
        else:
            if len(pattern) != len(args):
                continue
            ok = True
            for pat, a, v in zip(pattern, args, vals):
                if len(pat) == 1 and pat[0].text in params:
                    bind[pat[0].text] = v if v is not None else a
                elif _eval(pat, {}) is None or _eval(pat, {}) != v:
                    ok = False
                    break
            if not ok:
                continue
        return _resolve_type(members[member], bind, prog)
    return toks


def _threadgroup_bytes(f: _Func, env: dict[str, object]) -> int:
    """Bytes of the threadgroup arrays `f` declares with `env`'s template arguments (what cannot
    be evaluated counts 0), after the body's constexpr integers."""
    env = dict(env)
    body = f.body
    i = 0
    depth = 0
    while i < len(body):  # constexpr <int type> A = e, B = e; at the body's top level
        t = body[i]
        if t.text == "{":
            depth += 1
        elif t.text == "}":
            depth -= 1
        elif t.text in ("typedef", "using") and depth == 0:
            j = i
            while j < len(body) and body[j].text != ";":
                j += 1
            d = body[i + 1 : j]
            prog = env.get("\0prog")
            if t.text == "typedef" and len(d) > 1:
                env[d[-1].text] = _resolve_type(d[:-1], env, prog)  # type: ignore[arg-type]
            elif len(d) > 2 and d[1].text == "=":
                env[d[0].text] = _resolve_type(d[2:], env, prog)  # type: ignore[arg-type]
            i = j
        elif t.text == "constexpr" and depth == 0:
            j = i
            while j < len(body) and body[j].text != ";":
                j += 1
            decl = body[i + 1 : j]
            ids = [k for k, x in enumerate(decl) if x.kind == "id"]
            if ids:
                for part in _split_commas(decl[ids[0] + 1 :] if decl[ids[0]].text in _INT_TYPES
                                          else decl):
                    if len(part) > 2 and part[0].kind == "id" and part[1].text == "=":
                        v = _eval(part[2:], env)
                        if v is not None:
                            env[part[0].text] = v
            i = j
        i += 1
    total = 0
    for _, decl in _threadgroup_decls(f):
        words = [x.text for x in decl]
        lb = words.index("[") if "[" in words else len(words)
        tw = [x.text for x in _resolve_type(decl[1 : lb - 1], env,
                                            env.get("\0prog"))]  # type: ignore[arg-type]
        lay = _type_layout(tw, {})
        if lay is None:
            continue
        count = 1
        k = lb
        while k < len(decl) and decl[k].text == "[":
            e = _match(decl, k)
            v = _eval(decl[k + 1 : e], env)
            if v is None:
                count = 0
                break
            count *= v
            k = e + 1
        total += lay[0] * count
    return total


def kernel_threadgroup_memory(p: _Parser, funcs: dict[str, list[_Func]]
                              ) -> list[tuple[KernelEntry, _Func, int]]:
    """(kernel, its definition, bytes of threadgroup memory it declares) per exported kernel."""
    out = []
    prog = _program(p.toks)
    for k in p.kernels:
        for f in funcs.get(k.impl, []):
            if not f.is_kernel:
                continue
            env: dict[str, object] = {"\0prog": prog}
            if f.template_params:
                if not k.targs or len(k.targs) != len(f.template_params):
                    continue
                for name, a in zip(f.template_params, k.targs):
                    v = _eval(a, env)
                    env[name] = v if v is not None else a
            out.append((k, f, _threadgroup_bytes(f, env)))
    return out


def threadgroup_memory(path: str, defines: dict | None = None,
                       include_dirs: list[str] | None = None) -> dict[str, int]:
    """Kernel host name -> bytes of threadgroup memory it declares (what evaluates), as Metal
    reads `path` with `defines`."""
    from .core import KERNEL_DIR

    toks, _ = _preprocess(path, defines, [KERNEL_DIR, *(include_dirs or [])], True)
    p = _Parser(toks)
    funcs: dict[str, list[_Func]] = {}
    for f in p.funcs:
        funcs.setdefault(f.name, []).append(f)
    return {k.name: n for k, _, n in kernel_threadgroup_memory(p, funcs)}


def _check_threadgroup_memory(p: _Parser, funcs: dict[str, list[_Func]], bad) -> None:
    for k, f, total in kernel_threadgroup_memory(p, funcs):
        if total > MAX_THREADGROUP_MEMORY:
            bad(f.tok, "threadgroup-memory", f"kernel '{k.name}' declares {total} bytes of "
                f"threadgroup memory; Apple GPUs allow {MAX_THREADGROUP_MEMORY} (pipeline "
                "creation fails)")


def _check_params(f: _Func, bad) -> None:
    for prm in _split_commas(f.params):
        # strip attributes
        words = []
        k = 0
        while k < len(prm):
            if prm[k].text == "[" and k + 1 < len(prm) and prm[k + 1].text == "[":
                k = _match(prm, k) + 1
                continue
            words.append(prm[k])
            k += 1
        texts = {w.text for w in words}
        if "(" in texts:
            continue  # a function pointer: its own rule
        if ("*" in texts or "&" in texts) and not texts & ADDRESS_SPACES:
            what = "pointer" if "*" in texts else "reference"
            bad(words[0], "address-space", f"{what} parameter '{' '.join(w.text for w in words)}' "
                f"of '{f.name}' needs an address space (device, constant, thread or threadgroup)")


def _check_arrays(f: _Func, known: set[str], bad) -> None:
    """Local arrays whose size is not a constant expression (variable-length arrays)."""
    body = f.body
    local_known = set(known) | set(f.template_params)
    n = len(body)
    for i in range(n):
        t = body[i]
        if t.text != "[" or i < 2 or body[i - 1].kind != "id":
            continue
        if body[i + 1].text == "[" or body[i - 2].text == "[":
            continue
        # a declaration: <type> <name> [ ... ] with <type> ending in an identifier, '>' or '*'
        typ = body[i - 2]
        if not (typ.kind == "id" and typ.text not in KEYWORDS or typ.text == ">"):
            continue
        # the statement must start at (qualifiers) type: walk back to ; { } or (
        k = i - 2
        while k >= 0 and body[k].text not in (";", "{", "}", ")", "(", ",", "=", "?", ":"):
            k -= 1
        if k >= 0 and body[k].text in ("(", ",", "=", "?", ":"):
            continue
        e = _match(body, i)
        off = _constant_expr(body[i + 1 : e], local_known)
        if off is not None:
            space = "threadgroup" if any(body[m].text == "threadgroup" for m in range(k + 1, i)) \
                else "thread"
            bad(off, "vla", f"{space} array '{body[i - 1].text}' sized by '{off.text}', not a "
                "constant expression: Metal needs array sizes known at compile time")


def _check_half_calls(f: _Func, bad) -> None:
    """min/max/clamp/... with a half argument and a float literal: ambiguous in Metal."""
    body = f.body
    halfs: set[str] = set()
    for prm in _split_commas(f.params):
        ws = [x.text for x in prm if x.text not in ("[", "]")]
        if ws and any(w in HALF_TYPES for w in ws) and "*" not in ws and "&" not in ws:
            ids = [x.text for x in prm if x.kind == "id"]
            if ids:
                halfs.add(ids[-1])
    n = len(body)
    for i in range(n - 1):
        t = body[i]
        if t.text in HALF_TYPES and body[i + 1].kind == "id":
            halfs.add(body[i + 1].text)  # half x = ...; half4 v(...)
        if t.kind == "id" and t.text in OVERLOADED and body[i + 1].text == "(" and (
                i == 0 or body[i - 1].text not in (".", "->")):
            e = _match(body, i + 1)
            args = _split_commas(body[i + 2 : e])
            if len(args) < 2:
                continue

            def kind(a: list[Token]) -> str:
                a = a[1:] if a and a[0].text in ("-", "+") else a
                if len(a) == 1 and _is_float_literal(a[0]):
                    return "float-literal"
                if len(a) == 1 and a[0].kind == "num" and a[0].text[-1] in "hH":
                    return "half"
                if len(a) == 1 and a[0].text in halfs:
                    return "half"
                if a and a[0].text in HALF_TYPES and len(a) > 1 and a[1].text == "(" and \
                        _match(a, 1) == len(a) - 1:
                    return "half"
                return "?"

            kinds = [kind(a) for a in args]
            if "half" in kinds and "float-literal" in kinds:
                lit = args[kinds.index("float-literal")]
                bad(lit[-1], "half-literal", f"{t.text}() mixes a half argument with the float "
                    f"literal {lit[-1].text}: ambiguous in Metal; write {lit[-1].text.rstrip('fF')}h")


def _preprocess(path: str, defines: dict | None, include_dirs: list[str] | None,
                metal_defines: bool) -> tuple[list[Token], Preprocessor]:
    pp = Preprocessor(include_dirs or [], defines)
    for k in METAL_CONSTANTS:  # metal_stdlib's own, not the prelude's spellings
        if k not in (defines or {}):
            pp.macros.pop(k, None)
    if metal_defines:  # the predefined macros as Apple's compiler has them
        pp.macros.pop("__PYMETALNN__", None)
        pp.macros["__METAL_VERSION__"] = Preprocessor([], {"_": METAL_VERSION}).macros["_"]
    return pp.run_file(path), pp


def compiler_findings(violations: list[Violation]) -> list[Violation]:
    """The findings Apple's compiler itself would stop at (not the pipeline or dispatch rules)."""
    return [v for v in violations if v.rule not in NOT_COMPILER_RULES]


def check_file(path: str, defines: dict | None = None, include_dirs: list[str] | None = None,
               metal_defines: bool = True) -> list[Violation]:
    """Findings for `path` compiled with `defines` (as dev.library would hand it to Metal).
    A source our front end cannot read at all is reported as one finding."""
    from .core import KERNEL_DIR

    try:
        toks, _ = _preprocess(path, defines, [KERNEL_DIR, *(include_dirs or [])], metal_defines)
    except MSLError as e:
        return [Violation(e.file, e.line, "front-end", e.message)]
    return check_tokens(toks)


def scan_kernels(path: str, defines: dict | None = None,
                 include_dirs: list[str] | None = None) -> list[KernelEntry]:
    """The kernels of `path` with their declared max_total_threads_per_threadgroup."""
    from .core import KERNEL_DIR

    toks, _ = _preprocess(path, defines, [KERNEL_DIR, *(include_dirs or [])], False)
    return _Parser(toks).kernels


def metal_sources(paths: list[str]) -> list[str]:
    """The `.metal` files under `paths` (files or folders), sorted."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                out += [os.path.join(root, f) for f in files if f.endswith(".metal")]
        elif p.endswith(".metal"):
            out.append(p)
    return sorted(out)


# ---- sizes of `constant T&` arguments, Metal's layout ------------------------------------------
# (the metal backend checks a value argument's byte count before dispatch as the others do; Metal
# offers no reflection through metalcompute, so the layout is computed from the source)
_SCALAR_SIZES = {"bool": 1, "char": 1, "uchar": 1, "int8_t": 1, "uint8_t": 1, "short": 2,
                 "ushort": 2, "int16_t": 2, "uint16_t": 2, "half": 2, "int": 4, "uint": 4,
                 "unsigned": 4, "int32_t": 4, "uint32_t": 4, "float": 4, "long": 8, "ulong": 8,
                 "int64_t": 8, "uint64_t": 8}


def _type_layout(words: list[str], structs: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    """(size, alignment) of an MSL type named by `words` (qualifiers dropped), or None."""
    words = [w for w in words if w not in ("const", "constant", "device", "thread", "volatile",
                                           "struct", "metal", "::", "unsigned")] or ["uint"]
    if len(words) == 6 and words[0] == "vec" and words[1] == "<" and words[3] == "," and \
            words[5] == ">":
        words = [words[2] + words[4]]  # vec<float, 4> is float4
    if len(words) != 1:
        return None
    w = words[0]
    if w in _SCALAR_SIZES:
        s = _SCALAR_SIZES[w]
        return s, s
    if w in structs:
        return structs[w]
    for base, s in _SCALAR_SIZES.items():
        if w.startswith(base) and w[len(base):] in ("2", "3", "4"):
            n = int(w[len(base):])
            size = s * (4 if n == 3 else n)  # a 3-vector is laid out as a 4-vector
            return size, size
    return None


def struct_layouts(toks: list[Token]) -> dict[str, tuple[int, int]]:
    """(size, alignment) of every struct defined at file scope whose fields all have a known
    layout (scalars, vectors, such structs, arrays of constant length)."""
    out: dict[str, tuple[int, int]] = {}
    n = len(toks)
    i = 0
    while i < n:
        if toks[i].text == "struct" and i + 2 < n and toks[i + 1].kind == "id" and \
                toks[i + 2].text == "{":
            name = toks[i + 1].text
            e = _match(toks, i + 2)
            fields = toks[i + 3 : e]
            size = 0
            align = 1
            ok = True
            start = 0
            for k, t in enumerate(fields + [Token("punct", ";", "", 0)]):
                if t.text != ";":
                    continue
                decl = fields[start:k]
                start = k + 1
                if not decl:
                    continue
                if "(" in [x.text for x in decl] or decl[0].text in ("static", "using", "typedef"):
                    continue  # member functions and static members take no space
                # <type> a, b[N], c;
                if any(x.text in ("{", "}") for x in decl):
                    ok = False  # a member function body or a nested type: not laid out here
                    break
                parts = _split_commas(decl)
                tw = [x.text for x in parts[0]]
                names_at = [j for j, x in enumerate(parts[0]) if x.kind == "id"]
                if len(names_at) < 2:
                    ok = False
                    break
                name_pos = names_at[-1]
                lb = [j for j, x in enumerate(parts[0]) if x.text == "["]
                if lb:
                    before = [j for j in names_at if j < lb[0]]
                    if len(before) < 2:
                        ok = False
                        break
                    name_pos = before[-1]
                lay = _type_layout(tw[:name_pos], out)
                if lay is None:
                    ok = False
                    break
                for pi, part in enumerate(parts):
                    ptoks = part if pi else part[name_pos:]
                    count = 1
                    b = 0
                    while b < len(ptoks):
                        if ptoks[b].text == "[":
                            c = _match(ptoks, b)
                            expr = ptoks[b + 1 : c]
                            if len(expr) == 1 and expr[0].kind == "num":
                                count *= int(expr[0].text.rstrip("uU"), 0)
                            else:
                                ok = False
                            b = c
                        b += 1
                    fsize, falign = lay
                    size = -(-size // falign) * falign + fsize * count
                    align = max(align, falign)
                if not ok:
                    break
            if ok:
                out[name] = (-(-size // align) * align, align)
            i = e + 1
            continue
        i += 1
    return out


def source_layouts(path: str, defines: dict | None, include_dirs: list[str]
                   ) -> dict[str, tuple[int, int]]:
    """struct_layouts() of `path` as Metal reads it with `defines`."""
    toks, _ = _preprocess(path, defines, include_dirs, True)
    return struct_layouts(toks)


def value_arg_sizes(args: list, structs: dict[str, tuple[int, int]]) -> list[int]:
    """Per kernel argument (KernelArg list, by index): sizeof its `constant T&` type in Metal's
    layout, 0 for pointers and for types this cannot lay out (then left unchecked)."""
    sizes = [0] * len(args)
    for a in args:
        if a.kind == "value":
            lay = _type_layout(a.type.split(), structs)
            sizes[a.index] = lay[0] if lay else 0
    return sizes
