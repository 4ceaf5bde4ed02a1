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

Layout: this module holds the rules and the driver; `metal_scan.py` reads a source as Metal does
and finds its functions and kernels; `metal_memory.py` evaluates threadgroup memory and the byte
layout of value arguments (also read by the metal backend). Names of both are re-exported here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import MSLError
from .metal_memory import (
    MAX_THREADGROUP_MEMORY,
    kernel_threadgroup_memory,
    source_layouts,
    struct_layouts,
    threadgroup_memory,
    value_arg_sizes,
)
from .metal_scan import (
    KernelEntry,
    _called,
    _collect_constants,
    _constant_expr,
    _Func,
    _match,
    _Parser,
    _preprocess,
    _threadgroup_decls,
)
from .preprocess import Token
from .tokens import split_commas

# the check's public surface, including what the reader and the memory evaluation define
__all__ = ["MAX_THREADGROUP_MEMORY", "KernelEntry", "Violation", "check_file", "check_tokens",
           "compiler_findings", "metal_sources", "scan_kernels", "source_layouts", "struct_layouts",
           "threadgroup_memory", "value_arg_sizes"]

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


def _is_float_literal(t: Token) -> bool:
    """A floating literal that is float, not half, in MSL (no suffix, or f/F)."""
    if t.kind != "num" or t.text.lower().startswith("0x"):
        return False
    s = t.text
    if s[-1] in "hH":
        return False
    body = s[:-1] if s[-1] in "fF" else s
    return "." in body or "e" in body.lower()



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
            for part in split_commas(toks[i + 2 : e - 1]):
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


def _check_threadgroup_decls(f: _Func, bad) -> None:
    for t, decl in _threadgroup_decls(f):
        words = [x.text for x in decl]
        if not f.is_kernel:
            bad(t, "threadgroup-scope", f"threadgroup variable in '{f.name}', not a kernel: MSL "
                "declares threadgroup memory in kernel functions only; pass a threadgroup pointer")
        if "=" in words or (words.count("{") and words.index("{") > 1):
            bad(t, "threadgroup-init", "a threadgroup variable cannot have an initializer in MSL; "
                "store its value after the declaration")



def _check_threadgroup_memory(p: _Parser, funcs: dict[str, list[_Func]], bad) -> None:
    for k, f, total in kernel_threadgroup_memory(p, funcs):
        if total > MAX_THREADGROUP_MEMORY:
            bad(f.tok, "threadgroup-memory", f"kernel '{k.name}' declares {total} bytes of "
                f"threadgroup memory; Apple GPUs allow {MAX_THREADGROUP_MEMORY} (pipeline "
                "creation fails)")


def _check_params(f: _Func, bad) -> None:
    for prm in split_commas(f.params):
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
    for prm in split_commas(f.params):
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
            args = split_commas(body[i + 2 : e])
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


