"""MSL front end: translate the supported Metal Shading Language subset to C++ for the cuda
(NVRTC) and cpu (C++17) targets.

Design: MSL is C++14 with address spaces, attributes and a standard library. Rather than parse
C++, we rewrite the preprocessed token stream: types and built-in functions are renamed onto the
prelude header (`prelude/pmn_prelude.h`), address spaces become plain C++, and each kernel becomes
an ordinary (inlinable) function plus a generated entry point per host name. The only structure we
recover is what the rewrite needs: top-level declarations, function bodies, kernel signatures and
the call graph (to know which kernels need fibers on the cpu). Anything outside the dialect is
rejected with the `.metal` file and line; everything else is left for the C++ compiler, whose
messages point back to the `.metal` line through `#line`. The contract with the prelude is
written down in docs/internals.md.

Layout: this module holds the translator and `translate_file`; the dialect's tables and the
kernel descriptions are in `msl_dialect.py` (re-exported here), the serializer and the generated
entry points in `msl_emit.py`, bracket matching in `tokens.py` (shared with the Metal check).
"""
from __future__ import annotations

import re
from typing import Callable

from .convergence import pin_simd_loops
from .errors import MSLError
from .lockstep import build as build_lockstep
from .msl_dialect import (
    _FLOAT_RE,
    ALLOWED_ATTRS,
    BUILTIN_TYPES,
    BUILTINS,
    GENERATED,
    KNOWN_FUNCS,
    MEMORY_ORDERS,
    PRELUDE_DEFINES,
    REJECT_IDS,
    SIMD_FUNCS,
    TEMPLATE_FUNCS,
    TILE_FUNCS,
    TYPE_MAP,
    KernelArg,
    KernelInfo,
    Translation,
)
from .msl_emit import PREAMBLE, _emit, _entry_points
from .preprocess import Preprocessor, Token
from .tokens import match_angle as _match_angle
from .tokens import match_bracket as _match
from .tokens import match_open
from .tokens import split_commas as _split_commas

# `#pragma unroll N`, `#pragma unroll(N)` (Metal and NVRTC read both)
_UNROLL_RE = re.compile(r"unroll(?:\s+(\d+)|\s*\(\s*(\d+)\s*\))")
# `#pragma clang loop vectorize(enable)`, as the preprocessor spaces its tokens
_VECTORIZE_RE = re.compile(r"clang\s+loop\s+vectorize\s*\(\s*enable\s*\)")


def _tok(text: str, kind: str = "id", like: Token | None = None) -> Token:
    if like is None:
        return Token(kind, text, GENERATED, 1, True)
    return Token(kind, text, like.file, like.line, True)


def _is_attr(toks: list[Token], i: int) -> bool:
    return i + 1 < len(toks) and toks[i].text == "[" and toks[i + 1].text == "["


def _int_value(toks: list[Token], where: Token) -> int:
    s = "".join(t.text for t in toks).rstrip("uU")
    try:
        return int(s, 0)
    except ValueError:
        raise MSLError(where.file, where.line, f"expected an integer constant, got {s!r}") from None


class Translator:
    def __init__(self, target: str, validate: bool = False):
        assert target in ("cuda", "cpu")
        self.target = target
        # validation mode (cpu): device/threadgroup pointers and threadgroup arrays become the
        # checked types of prelude/pmn_validate.h; nothing changes otherwise
        self.validate = validate and target == "cpu"
        self._vclose: set[int] = set()  # ids of '*' tokens that close a PMN_DPTR(
        self._vskip: set[int] = set()  # ids of cv-qualifier tokens inside a PMN_DPTR(
        self.site = 0
        self.templates: dict[str, tuple[list[str], list[list[Token]], Token, int]] = {}
        self.kernels: dict[str, KernelInfo] = {}
        self.user_funcs: set[str] = set()
        self.sync_funcs: set[str] = set()  # functions that synchronize, directly or by a call
        self.simd_funcs: set[str] = set()  # those that call a SIMD-group function, likewise

    # ---- entry
    def translate(self, toks: list[Token]) -> tuple[list[Token], dict[str, KernelInfo]]:
        for t in toks:
            if t.kind == "id" and t.text in REJECT_IDS:
                raise MSLError(t.file, t.line, f"'{t.text}': {REJECT_IDS[t.text]}")
        self._collect_user_funcs(toks)
        toks = self._extract_kernels(toks)
        out, bodies = self._rewrite(toks, top=True)
        self._mark_fibers(bodies)
        return out, self.kernels

    def _collect_user_funcs(self, toks: list[Token]) -> None:
        depth = 0
        for i, t in enumerate(toks):
            if t.text == "{":
                depth += 1
            elif t.text == "}":
                depth -= 1
            elif depth == 0 and t.kind == "id" and i + 1 < len(toks) and toks[i + 1].text == "(" \
                    and i > 0 and (toks[i - 1].kind == "id" or toks[i - 1].text in ("*", "&", ">")) \
                    and toks[i - 1].text not in ("return", "kernel"):
                if t.text in KNOWN_FUNCS:
                    self.user_funcs.add(t.text)

    # ---- kernels
    def _extract_kernels(self, toks: list[Token]) -> list[Token]:
        out: list[Token] = []
        i = 0
        decl_start = 0  # index in `out` where the current top-level declaration starts
        depth = 0
        paren = 0
        while i < len(toks):
            t = toks[i]
            if depth == 0 and paren == 0 and (
                (t.text == "kernel" and t.kind == "id")
                or (_is_attr(toks, i) and toks[i + 2].text == "kernel")
            ):
                # back up to the declaration's start (template <...> and attributes before 'kernel')
                head = out[decl_start:]
                del out[decl_start:]
                i = self._kernel_decl(head, toks, i, out)
                decl_start = len(out)
                continue
            if t.text in ("{", "}"):
                depth += 1 if t.text == "{" else -1
            elif t.text in ("(", ")"):
                paren += 1 if t.text == "(" else -1
            out.append(t)
            i += 1
            # a top-level declaration ends with its body's '}', a ';' or a pragma line
            if depth == 0 and (t.text == "}" or t.kind == "pragma" or (paren == 0 and t.text == ";")):
                decl_start = len(out)
        return out

    def _kernel_decl(self, head: list[Token], toks: list[Token], i: int, out: list[Token]) -> int:
        """Parse one kernel definition or explicit instantiation starting at toks[i]; append its
        rewritten form to `out`; return the index after it."""
        tparams: list[str] | None = None
        tparam_toks: list[Token] = []
        explicit = False
        h = 0
        if h < len(head) and head[h].text == "template":
            if h + 1 < len(head) and head[h + 1].text == "<":
                e = _match_angle(head, h + 1)
                tparam_toks = head[h : e + 1]
                tparams = []
                for p in _split_commas(head[h + 2 : e]):
                    names = [x for x in p if x.kind == "id"]
                    eq = [k for k, x in enumerate(p) if x.text == "="]
                    if eq:
                        names = [x for x in p[: eq[0]] if x.kind == "id"]
                    tparams.append(names[-1].text)
                h = e + 1
            else:
                explicit = True
                h += 1
        rest = head[h:] + toks[i:]
        attrs: dict[str, list[Token]] = {}
        j = 0
        while True:
            if _is_attr(rest, j):
                e = _match(rest, j)
                for part in _split_commas(rest[j + 2 : e - 1]):  # [[kernel, host_name("x")]]
                    attrs[part[0].text] = part
                j = e + 1
            elif rest[j].text == "kernel":
                j += 1
            else:
                break
        consumed_head = len(head) - h
        tg = 256
        if "max_total_threads_per_threadgroup" in attrs:
            a = attrs["max_total_threads_per_threadgroup"]
            tg = _int_value(a[2:-1], a[0])
            if tg <= 0 or tg > 1024 or tg % 32:
                raise MSLError(a[0].file, a[0].line, "max_total_threads_per_threadgroup must be a "
                               f"multiple of 32 between 32 and 1024, got {tg}")
        for k in attrs:
            if k not in ("kernel", "host_name", "max_total_threads_per_threadgroup"):
                a = attrs[k]
                raise MSLError(a[0].file, a[0].line, f"attribute [[{k}]] on a kernel is not supported")
        host_name = None
        if "host_name" in attrs:
            a = attrs["host_name"]
            strs = [x for x in a if x.kind == "str"]
            if not strs:
                raise MSLError(a[0].file, a[0].line, "[[host_name]] needs a string")
            host_name = "".join(x.text[1:-1] for x in strs)  # "a_" #T "_b" concatenates

        if explicit:
            # template [[host_name("n")]] [[kernel]] void f<T>(params);   or   decltype(f<T>) f<T>;
            if rest[j].text == "decltype":
                j = _match(rest, j + 1) + 1
            else:
                while not (rest[j].kind == "id" and rest[j + 1].text in ("<", "(")):
                    j += 1
            name_tok = rest[j]
            targs: list[list[Token]] = []
            j += 1
            if rest[j].text == "<":
                e = _match_angle(rest, j)
                targs = _split_commas(rest[j + 1 : e])
                j = e + 1
            if rest[j].text == "(":
                j = _match(rest, j) + 1
            if rest[j].text != ";":
                raise MSLError(rest[j].file, rest[j].line, "expected ';' after kernel instantiation")
            j += 1
            if host_name is None:
                raise MSLError(name_tok.file, name_tok.line,
                               "an explicit kernel instantiation needs [[host_name(\"...\")]]")
            if name_tok.text not in self.templates:
                raise MSLError(name_tok.file, name_tok.line,
                               f"'{name_tok.text}' is not a kernel template defined above")
            self._add_entry(host_name, name_tok, targs, tg)
            return i + (j - consumed_head)

        # definition: return type, name, params, body
        while not (rest[j].kind == "id" and rest[j + 1].text == "("):
            j += 1
        name_tok = rest[j]
        po = j + 1
        pc = _match(rest, po)
        params = _split_commas(rest[po + 1 : pc])
        if rest[pc + 1].text != "{":
            raise MSLError(name_tok.file, name_tok.line, "a kernel declaration needs a body")
        bc = _match(rest, pc + 1)
        impl_name = "pmn_kimpl_" + name_tok.text
        new: list[Token] = list(tparam_toks)
        new.append(_tok("PMN_KERNEL_IMPL", like=name_tok))
        new.extend(rest[j - 1 : j] if rest[j - 1].text == "void" else [_tok("void", like=name_tok)])
        new.append(_tok(impl_name, like=name_tok))
        new.append(rest[po])
        for k, p in enumerate(params):
            if k:
                new.append(_tok(",", "punct", like=p[0]))
            new.extend(self._strip_param_attr(p))
        new.extend(rest[pc : bc + 1])
        out.extend(new)
        self.templates[name_tok.text] = (tparams or [], params, name_tok, tg)
        if tparams is None:
            self._add_entry(host_name or name_tok.text, name_tok, [], tg)
        return i + (bc + 1 - consumed_head)

    @staticmethod
    def _strip_param_attr(p: list[Token]) -> list[Token]:
        out = []
        k = 0
        while k < len(p):
            if _is_attr(p, k):
                k = _match(p, k) + 1
                continue
            out.append(p[k])
            k += 1
        return out

    def _add_entry(self, host: str, name_tok: Token, targs: list[list[Token]], tg_inst: int) -> None:
        tparams, params, def_tok, tg_def = self.templates[name_tok.text]
        if host in self.kernels:
            raise MSLError(name_tok.file, name_tok.line, f"kernel name '{host}' defined twice")
        if len(targs) != len(tparams):
            raise MSLError(name_tok.file, name_tok.line,
                           f"'{name_tok.text}' has {len(tparams)} template parameters, "
                           f"{len(targs)} given")
        sub = dict(zip(tparams, targs))
        args: list[KernelArg] = []
        builtins: list[tuple[int, str]] = []
        order: list[tuple[str, int]] = []
        for pos, p in enumerate(params):
            attr = None
            body = []
            k = 0
            while k < len(p):
                if _is_attr(p, k):
                    e = _match(p, k)
                    attr = p[k + 2 : e - 1]
                    k = e + 1
                    continue
                body.append(p[k])
                k += 1
            where = p[0]
            if not attr:
                raise MSLError(where.file, where.line, "kernel argument needs [[buffer(i)]] or a "
                               "built-in attribute such as [[thread_position_in_grid]]")
            aname = attr[0].text
            body = [x for t in body for x in (sub.get(t.text, [t]) if t.kind == "id" else [t])]
            names = [t for t in body if t.kind == "id"]
            pname = names[-1].text if names else f"arg{pos}"
            tybody = body[:-1] if names and body[-1] is names[-1] else body
            if aname == "buffer":
                idx = _int_value(attr[2:-1], where)
                words = [t.text for t in tybody]
                is_ptr = "*" in words
                is_ref = "&" in words
                const = "const" in words or "constant" in words
                if not (is_ptr or is_ref):
                    raise MSLError(where.file, where.line, f"buffer argument '{pname}' must be a "
                                   "pointer or a constant reference")
                if is_ref and not const:
                    raise MSLError(where.file, where.line, f"reference argument '{pname}' must be "
                                   "'constant T&' (use a pointer for writable memory)")
                elem = [t for t in tybody if t.text not in
                        ("device", "constant", "const", "*", "&", "thread", "volatile")]
                if "threadgroup" in words:
                    raise MSLError(where.file, where.line, "threadgroup memory arguments are not "
                                   "in the dialect; declare threadgroup arrays in the kernel body")
                etype = " ".join(t.text for t in elem)
                kind = "buffer" if is_ptr else "value"
                ctoks, _ = self._rewrite(elem, top=False)
                ctype = " ".join(t.text for t in ctoks)
                if kind == "buffer":
                    ctype = ("const " if const else "") + ctype + "*"
                args.append(KernelArg(idx, pname, kind, etype, const, ctype,
                                      "device" in words and is_ptr))
                order.append(("arg", len(args) - 1))
            elif aname in BUILTINS:
                ty = " ".join(t.text for t in tybody if t.text != "const")
                if ty not in BUILTIN_TYPES:
                    raise MSLError(where.file, where.line, f"[[{aname}]] must be a scalar uint "
                                   f"(1-D grids only), got '{ty}'")
                builtins.append((pos, aname))
                order.append(("builtin", len(builtins) - 1))
            elif aname in ("threadgroup", "texture", "sampler", "stage_in"):
                raise MSLError(where.file, where.line, f"[[{aname}(...)]] kernel arguments are not "
                               "in the dialect (buffers and built-ins only)")
            else:
                raise MSLError(where.file, where.line, f"unsupported kernel argument attribute "
                               f"[[{aname}]]")
        idxs = sorted(a.index for a in args)
        if idxs != list(range(len(args))):
            raise MSLError(def_tok.file, def_tok.line, f"kernel '{host}': buffer indices must be "
                           f"0..{len(args) - 1} without gaps, got {idxs}")
        impl = "pmn_kimpl_" + name_tok.text
        if targs:
            ttoks, _ = self._rewrite([t for a in targs for t in a + [_tok(",", "punct")]][:-1],
                                     top=False)
            impl += "<" + " ".join(t.text for t in ttoks) + ">"
        tg = tg_inst if tg_inst != 256 else tg_def
        self.kernels[host] = KernelInfo(host, impl, args, builtins, order, tg, False,
                                        name_tok.file, name_tok.line, "pmn_kimpl_" + name_tok.text)

    # ---- the general rewrite
    def _rewrite(self, toks: list[Token], top: bool) -> tuple[list[Token], dict[str, dict]]:
        """Rewrite MSL tokens into C++ tokens. Returns the tokens and, per function body found,
        {'calls': set of called names, 'sync': uses a barrier or SIMD-group function}."""
        out: list[Token] = []
        bodies: dict[str, dict] = {}
        stack: list[str] = []  # brace kinds: func, block, other
        cur_func: list[str] = []
        paren = 0
        n = len(toks)
        i = 0

        def prev_sig(k: int = 1) -> Token | None:
            return out[-k] if len(out) >= k else None

        while i < n:
            t = toks[i]
            nxt = toks[i + 1] if i + 1 < n else None
            in_func = "func" in stack
            if t.kind == "pragma":
                body = t.text.strip()
                m = _UNROLL_RE.fullmatch(body) if self.target == "cpu" else None
                # g++ knows only its own spelling (and ignores the others silently); a loop over
                # a chunk array unrolled keeps the chunks in registers (add over 1M floats on
                # one cpu worker 0.75 -> 0.55 ns per element). A bare `#pragma unroll` stays
                # g++'s choice: as `GCC unroll 64`, conv.metal's nested ones took 42 -> 508 s
                # to compile.
                if m:
                    t = _tok(f"GCC unroll {m.group(1) or m.group(2)}", "pragma", like=t)
                elif _VECTORIZE_RE.fullmatch(body):
                    if self.target == "cuda":  # NVRTC knows no clang loop hints
                        i += 1
                        continue
                    # g++ unrolls a short element loop completely before its loop vectorizer
                    # runs, and the statements it leaves rarely pack into vectors; `omp simd`
                    # (-fopenmp-simd) keeps the loop for the vectorizer (relu over 1M floats on
                    # one cpu worker 0.86 -> 0.28 ns per element)
                    t = _tok("omp simd", "pragma", like=t)
                out.append(t)
                i += 1
                continue
            if t.kind == "punct":
                if t.text == "{":
                    if in_func:
                        stack.append("block")
                    else:
                        # a function body follows ')' (possibly ') const')
                        p = len(out) - 1
                        if p >= 0 and out[p].text == "const":
                            p -= 1
                        if p >= 0 and out[p].text == ")":
                            # find the function name before the matching '('
                            q = match_open(out, p)
                            fname = out[q - 1].text if q > 0 else "?"
                            stack.append("func")
                            cur_func.append(fname)
                            bodies.setdefault(fname, {"calls": set(), "sync": False, "simd": False})
                        else:
                            stack.append("other")
                    out.append(t)
                    i += 1
                    continue
                if t.text == "}":
                    if stack:
                        k = stack.pop()
                        if k == "func":
                            cur_func.pop()
                    out.append(t)
                    i += 1
                    continue
                if t.text == "(":
                    paren += 1
                elif t.text == ")":
                    paren -= 1
                elif t.text == "*" and self._vclose and id(t) in self._vclose:
                    out.append(_tok(")", "punct", like=t))
                    i += 1
                    continue
                if _is_attr(toks, i):
                    e = _match(toks, i)
                    inner = toks[i + 2 : e - 1]
                    name = inner[0].text if inner else ""
                    if name not in ALLOWED_ATTRS:
                        raise MSLError(t.file, t.line, f"attribute [[{name}]] is not supported here")
                    out.extend(toks[i : e + 1])
                    i = e + 1
                    continue
                out.append(t)
                i += 1
                continue
            if t.kind == "num":
                m = _FLOAT_RE.match(t.text)
                if m:
                    suffix = m.group(1)
                    if suffix in ("h", "H"):
                        out.extend([_tok("pmn_half", like=t), _tok("(", "punct", like=t),
                                    Token("num", t.text[:-1] + "f", t.file, t.line),
                                    _tok(")", "punct", like=t)])
                    elif suffix is None:
                        out.append(Token("num", t.text + "f", t.file, t.line, t.space))
                    else:
                        out.append(t)
                else:
                    out.append(t)
                i += 1
                continue
            if t.kind != "id":
                out.append(t)
                i += 1
                continue
            s = t.text
            if self._vskip and id(t) in self._vskip:
                i += 1
                continue
            # namespaces: metal::, precise::, fast::
            if s in ("metal", "precise", "fast") and nxt is not None and nxt.text == "::":
                j = i
                ns = []
                while j + 1 < n and toks[j].text in ("metal", "precise", "fast") \
                        and toks[j + 1].text == "::":
                    if toks[j].text != "metal":
                        ns.append(toks[j].text)
                    j += 2
                fn = toks[j]
                if fn.text in KNOWN_FUNCS or (not ns and fn.text in TYPE_MAP):
                    if not ns and fn.text in TYPE_MAP:
                        out.append(_tok(TYPE_MAP[fn.text], like=fn))
                        i = j + 1
                        continue
                    j2 = self._emit_func(toks, j, out, ns, bodies, cur_func)
                    paren += j2 - j - 1  # a SIMD call's '(' is consumed there
                    i = j2
                    continue
                raise MSLError(t.file, t.line, f"'{'::'.join(['metal', *ns, fn.text])}' is not in "
                               "the supported dialect (docs/dialect.md lists what is)")
            if s in TYPE_MAP:
                out.append(_tok(TYPE_MAP[s], like=t))
                i += 1
                continue
            if s == "PMN_METAL_FUNC":
                # METAL_FUNC (<metal_stdlib>: inline, always inlined). Honoured on cpu
                # (PMN_INLINE, msl_emit.PREAMBLE): past g++'s budget for a unit's growth, small
                # helpers (stream_store, ...) stayed calls inside the element loops, their
                # chunks passed through the stack (add over 1M floats on one cpu worker
                # 1.1-1.2 -> 0.75 ns per element). Plain `inline` stays g++'s choice: forced
                # on every helper, gemm.metal took 31.8 -> 70.6 s to compile (the run-time
                # effect was mixed: see docs/dialect.md).
                out.append(_tok("PMN_INLINE" if self.target == "cpu" else "inline", like=t))
                i += 1
                continue
            if s == "vec" and nxt is not None and nxt.text == "<":
                out.extend([_tok("pmn", like=t), _tok("::", "punct", like=t), _tok("vec", like=t)])
                i += 1
                continue
            if s == "using" and nxt is not None and nxt.text == "namespace" and i + 2 < n \
                    and toks[i + 2].text == "metal":
                i += 4 if i + 3 < n and toks[i + 3].text == ";" else 3
                continue
            if self.validate and s in ("device", "threadgroup") and self._vpointer(toks, i, out):
                i += 1
                continue
            if s in ("device", "thread"):
                i += 1
                continue
            if s == "constant":
                file_scope = not stack and paren == 0
                near_constexpr = (prev_sig() is not None and prev_sig().text == "constexpr") or \
                    (nxt is not None and nxt.text == "constexpr")
                if near_constexpr:
                    pass
                elif file_scope:
                    out.append(_tok("PMN_CONSTANT", like=t))
                else:
                    out.append(_tok("const", like=t))
                i += 1
                continue
            if s == "threadgroup":
                if nxt is not None and nxt.text == "(":
                    out.append(t)  # not the address space
                    i += 1
                    continue
                stmt_start = prev_sig() is None or prev_sig().text in ("{", ";", "}")
                if in_func and stmt_start and paren == 0:
                    # storage declaration unless the declarator is a pointer or reference
                    j = i + 1
                    ptr = False
                    while j < n and toks[j].text not in (";", "=", "["):
                        if toks[j].text in ("*", "&"):
                            ptr = True
                        j += 1
                    if not ptr:
                        out.append(_tok("PMN_THREADGROUP", like=t))
                        if self.validate:
                            i = self._vtgarray(toks, i, out)
                            continue
                i += 1
                continue
            if s == "kernel":
                raise MSLError(t.file, t.line, "kernels must be declared at file scope")
            if s in MEMORY_ORDERS:
                out.extend([_tok("pmn", like=t), _tok("::", "punct", like=t), t])
                i += 1
                continue
            if s == "mem_flags" and nxt is not None and nxt.text == "::":
                out.extend([_tok("pmn", like=t), _tok("::", "punct", like=t), t])
                i += 1
                continue
            p = prev_sig()
            member = p is not None and p.text in (".", "->", "::")
            if s in KNOWN_FUNCS and not member and s not in self.user_funcs and nxt is not None \
                    and (nxt.text == "(" or (nxt.text == "<" and s in TEMPLATE_FUNCS)):
                j2 = self._emit_func(toks, i, out, [], bodies, cur_func)
                paren += j2 - i - 1  # a SIMD call's '(' is consumed there
                i = j2
                continue
            if cur_func and nxt is not None and nxt.text in ("(", "<") and not member:
                # f(...) or f<T>(...): over-approximating calls only costs a fiber launch
                bodies[cur_func[-1]]["calls"].add(s)
            out.append(t)
            i += 1
        return out, bodies

    # ---- validation mode
    def _vpointer(self, toks: list[Token], i: int, out: list[Token]) -> bool:
        """At an address space keyword: if a pointer declarator follows (`device const T*`),
        emit `PMN_DPTR(` and mark the '*' that closes it; False when no pointer follows."""
        j, depth = i + 1, 0
        while j < len(toks):
            x = toks[j].text
            if x == "<":
                depth += 1
            elif x == ">":
                depth -= 1
            elif x == "*" and depth == 0:
                break
            elif not (toks[j].kind == "id" or x in ("::", ",") or depth > 0):
                return False
            j += 1
        else:
            return False
        if j == i + 1 or toks[j - 1].kind != "id" and toks[j - 1].text != ">":
            return False
        if any(toks[k].kind == "id" and toks[k].text not in ("const", "volatile")
               and k + 1 < j and toks[k + 1].kind == "id" and toks[k + 1].text not in
               ("const", "volatile") for k in range(i + 1, j)):
            return False  # `T name` before the '*': not a declarator's type
        # the element type loses its cv-qualifiers (`const device T*` -> PMN_DPTR(T)): template
        # argument deduction of a helper's `vptr<T>` parameter must accept any checked pointer,
        # as `const T*` accepts a `T*`; the normal build has checked the constness already
        while out and out[-1].text in ("const", "volatile"):
            out.pop()
        self._vskip.update(id(toks[k]) for k in range(i + 1, j)
                           if toks[k].text in ("const", "volatile"))
        out.extend([_tok("PMN_DPTR", like=toks[i]), _tok("(", "punct", like=toks[i])])
        self._vclose.add(id(toks[j]))
        return True

    def _vtgarray(self, toks: list[Token], i: int, out: list[Token]) -> int:
        """`threadgroup T name[N];` (after PMN_THREADGROUP) as `pmn::tgarr<T, (N)> name{"name"};`
        in validation mode; other forms are left as they are. Returns the next index."""
        j = i + 1
        while j + 1 < len(toks) and not (toks[j].kind == "id" and toks[j + 1].text == "["):
            if toks[j].text in (";", "=", "{", "("):
                return i + 1
            j += 1
        if j + 1 >= len(toks):
            return i + 1
        close = _match(toks, j + 1)
        if close + 1 >= len(toks) or toks[close + 1].text != ";":
            return i + 1  # several dimensions or an initializer: unchecked
        t = toks[i]
        ty, _ = self._rewrite(toks[i + 1 : j], top=False)
        dim, _ = self._rewrite(toks[j + 2 : close], top=False)
        out.extend([_tok("pmn", like=t), _tok("::", "punct", like=t), _tok("tgarr", like=t),
                    _tok("<", "punct", like=t), *ty, _tok(",", "punct", like=t),
                    _tok("(", "punct", like=t), *dim, _tok(")", "punct", like=t),
                    _tok(">", "punct", like=t), toks[j], _tok("{", "punct", like=t),
                    Token("str", f'"{toks[j].text}"', t.file, t.line, True),
                    _tok("}", "punct", like=t), toks[close + 1]])
        return close + 2

    def _emit_func(self, toks: list[Token], i: int, out: list[Token], ns: list[str],
                   bodies: dict[str, dict], cur_func: list[str]) -> int:
        """Emit pmn::[ns::]name for the known function at toks[i]; SIMD-group functions get their
        call-site id as a first argument. Returns the index of the next token to read."""
        t = toks[i]
        name = t.text
        out.extend([_tok("pmn", like=t), _tok("::", "punct", like=t)])
        if name in TILE_FUNCS:  # pmn::ext: out of the unqualified scope, where Metal's
            ns = ["ext", *ns]   # definitions (simdgroup_tile.h without __PYMETALNN__) live
        for s in ns:
            out.extend([_tok(s, like=t), _tok("::", "punct", like=t)])
        if self.validate and name == "threadgroup_barrier":  # counts barriers per thread
            t = Token(t.kind, "v_threadgroup_barrier", t.file, t.line, t.space)
        out.append(t)
        if cur_func and (name in SIMD_FUNCS or name == "threadgroup_barrier"):
            bodies[cur_func[-1]]["sync"] = True
            bodies[cur_func[-1]]["simd"] |= name in SIMD_FUNCS
        if name not in SIMD_FUNCS:
            return i + 1
        if i + 1 >= len(toks) or toks[i + 1].text != "(":
            raise MSLError(t.file, t.line, f"{name} must be called directly")
        self.site += 1
        out.append(toks[i + 1])
        out.append(Token("id", f"pmn::site_t{{{self.site}u}}", t.file, t.line, True))
        if i + 2 < len(toks) and toks[i + 2].text != ")":
            out.append(Token("punct", ",", t.file, t.line))
        return i + 2

    def _mark_fibers(self, bodies: dict[str, dict]) -> None:
        def closure(flag: str) -> Callable[[str], bool]:
            """Whether a function has `flag` itself or through a call (over the call graph)."""
            memo: dict[str, bool] = {}

            def has(fn: str, seen: frozenset = frozenset()) -> bool:
                if fn in memo:
                    return memo[fn]
                b = bodies.get(fn)
                if b is None or fn in seen:
                    return False
                r = b[flag] or any(has(c, seen | {fn}) for c in b["calls"])
                memo[fn] = r
                return r
            return has

        syncs, simds = closure("sync"), closure("simd")
        for k in self.kernels.values():
            k.needs_fibers = syncs(k.impl_name)
        self.sync_funcs = {fn for fn in bodies if syncs(fn)}
        self.simd_funcs = {fn for fn in bodies if simds(fn)}


def translate_file(path: str, target: str, defines: dict | None = None,
                   include_dirs: list[str] | None = None, prelude: str | None = None,
                   validate: bool = False, lockstep: bool = True) -> Translation:
    """Translate one `.metal` file for `target` ("cuda" or "cpu").

    `prelude`: text to paste in place of `#include "pmn_prelude.h"` (NVRTC gets everything in one
    string); None emits the #include. `validate` (cpu): validation mode, checked pointers and
    barriers (prelude/pmn_validate.h). `lockstep` (cpu, not with `validate`): kernels that
    synchronize also get a work-item-loop version (lockstep.py), used instead of fibers where it
    could be built.
    """
    pp = Preprocessor(include_dirs or [], defines)
    toks = pp.run_file(path)
    tr = Translator(target, validate)
    out, kernels = tr.translate(toks)
    if not kernels:
        raise MSLError(path, 1, "no kernel functions found")
    parts = [PREAMBLE[target]]
    # switches read by the prelude itself (not by the .metal source) go before it
    for name in sorted(PRELUDE_DEFINES & set(defines or {})):
        parts.append(f"#define {name} {(defines or {})[name]}\n")
    parts.append(prelude if prelude is not None else '#include "pmn_prelude.h"\n')
    if tr.validate:
        parts.append('#include "pmn_validate.h"\n')
    # validation builds keep fibers: their barrier counting (pmn_validate.h) and checked
    # pointers live in the per-thread code that the work-item loops would restructure
    if target == "cpu" and lockstep and not tr.validate:
        extra = build_lockstep(out, kernels, tr.sync_funcs)
        if extra:
            parts.append('#include "pmn_lockstep.h"\n')
            out = out + extra
        for k in kernels.values():
            if k.lockstep:
                k.needs_fibers = False
    elif target == "cpu":
        for k in kernels.values():
            if k.needs_fibers:
                k.fiber_reason = "validation mode" if tr.validate else "work-item loops turned off"
    if target == "cuda":  # see convergence.py: one program point per SIMD-group call
        out, _ = pin_simd_loops(out, SIMD_FUNCS | tr.simd_funcs)
    parts.append(_emit(out))
    parts.append(f'#line 1 "{GENERATED}"\n')
    head = "".join(parts)
    entries = "".join(_entry_points(k, target, tr.validate) for k in kernels.values())
    return Translation(target, head + entries, kernels, pp.files, head)
