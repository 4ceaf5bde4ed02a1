"""Work-item loops, analyses: uniform values, names kept per thread, early returns.

Which variables hold one value for the whole threadgroup (a scalar instead of a per-thread
array; a branch or loop on them runs as plain C++), which arrays may be copied whole across a
barrier, what a statement may write, and the context the transform in lockstep.py carries
through a kernel (mask stack, per-thread scopes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .lockstep_parse import (
    CXX_TYPES,
    SIMD_NAMES,
    Decl,
    St,
    Token,
    _ids,
    _match,
    _split_top,
    _words,
    parse_decl,
    to_tokens,
)
from .tokens import match_open

if TYPE_CHECKING:
    from .lockstep import Lockstep

# ---- uniformity ------------------------------------------------------------------------------

MATH_FUNCS = set("""exp exp2 exp10 log log2 log10 sqrt rsqrt pow powr tanh sinh cosh sin cos tan asin
acos atan atan2 abs fabs min max fmin fmax clamp fma mad mix select floor ceil round rint trunc fract
fmod isnan isinf isfinite sign step smoothstep dot length normalize cross copysign saturate
as_type""".split())
ASSIGN_OPS = {"=", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<<=", ">>="}
# keywords and operators that look like calls and write none of their operands
NO_WRITE_CALLS = {"if", "while", "for", "switch", "return", "sizeof", "alignof", "decltype",
                  "static_cast", "reinterpret_cast", "const_cast", "bit_cast", "as_type"}
PURE_IDS = {"true", "false", "sizeof", "precise", "fast", "metal"}


class Uniformity:
    """Which variables of a function hold the same value in every thread of the threadgroup.

    Such a variable is one scalar instead of an array per thread, and an if or loop whose
    condition uses only uniform values runs as plain C++ control flow (no masks). A variable is
    uniform when every assignment to it -- its initializer included -- happens at the level of
    the synchronizing statements (not inside a thread loop's own control flow), under uniform
    control flow, from an expression of uniform names that reads no memory ('[', unary '*',
    '->') and calls only the prelude's math functions; and nothing writes it otherwise (a
    reference to non-const bound to it -- a helper's `thread T&` parameter, a local
    `thread T& r = x` --, its address taken, a member function called on it): such a write runs
    in a thread loop, once per thread, on the one scalar. Computed as a greatest fixed point:
    start from every candidate and drop those that break the rule until nothing changes."""

    def __init__(self, ls: Lockstep, base: set[str]):
        self.ls = ls
        self.U = set(base)
        self.base = set(base)  # pointers and constant references: element writes keep them

    def expr(self, toks: list[Token]) -> bool:
        U = self.U
        ls = self.ls
        for k, t in enumerate(toks):
            prev = toks[k - 1].text if k else ""
            nxt = toks[k + 1].text if k + 1 < len(toks) else ""
            if t.kind == "id":
                if prev in (".", "->", "::"):
                    continue
                if t.text == "pmn" and nxt == "::":
                    j = k + 2
                    while j + 1 < len(toks) and toks[j].text in ("precise", "fast") \
                            and toks[j + 1].text == "::":
                        j += 2
                    if j >= len(toks) or toks[j].text not in MATH_FUNCS:
                        return False
                    continue
                name = t.text
                is_type = name in CXX_TYPES or name in ls.type_names or name.startswith(("pmn_", "pmn::"))
                if nxt == "(" and not is_type:
                    return False
                if name in U or is_type or name in PURE_IDS or name.startswith("PMN_"):
                    continue
                return False
            if t.kind == "punct":
                if t.text in ("[", "->", "++", "--") or t.text in ASSIGN_OPS:
                    return False
                if t.text in ("*", "&") and (not prev or (toks[k - 1].kind == "punct"
                                                          and prev not in (")", "]"))):
                    return False  # dereference / address
        return True

    def run(self, stmts: list[St]) -> set[str]:
        cands: set[str] = set()
        self._collect(stmts, cands)
        self.U |= cands
        while True:
            before = len(self.U)
            self._walk(stmts, True)
            if len(self.U) == before:
                return self.U

    def _collect(self, stmts: list[St], cands: set[str]) -> None:
        for st in stmts:
            if st.kind == "simple":
                d = parse_decl(st.toks, self.ls.type_names)
                if d is not None:
                    for dc in d.decls:
                        cands.add(dc.name)
            elif st.sync and st.kind == "block":
                self._collect(st.body, cands)
            elif st.sync and st.kind == "if":
                self._collect(st.body, cands)
            elif st.sync and st.kind in ("for", "while", "do"):
                if st.kind == "for" and st.init:
                    d = parse_decl(st.init + [st.toks[2]], self.ls.type_names)
                    if d is not None:
                        for dc in d.decls:
                            cands.add(dc.name)
                self._collect(st.body, cands)

    def drop_assigned(self, toks: list[Token]) -> None:
        """Every variable assigned (or whose address is taken) in `toks` is not uniform."""
        for k, t in enumerate(toks):
            if t.kind != "id" or t.text not in self.U:
                continue
            prev = toks[k - 1].text if k else ""
            if prev in (".", "->", "::"):
                continue
            nxt = toks[k + 1].text if k + 1 < len(toks) else ""
            if nxt in ASSIGN_OPS or nxt in ("++", "--") or prev in ("++", "--", "&"):
                self.U.discard(t.text)
            elif prev in ("=", "{") and k >= 3 and toks[k - 2].kind == "id" and \
                    toks[k - 3].text in ("&", "&&"):
                # `thread T& r = x;`: writes through r write x
                self.U.discard(t.text)
            elif prev in ("(", ",") and self._call_arg_written(toks, k):
                # f(x) with `thread T& x`: the call writes x, and where it runs in a thread loop
                # each thread's call would write the one scalar
                self.U.discard(t.text)
            elif prev in ("?", ":") and self._call_arg_written(toks, k, whole=False):
                # f(c ? x : y) with `thread T& x`: either branch may be the lvalue written
                self.U.discard(t.text)
            elif nxt in ("[", ".") and t.text not in self.base:
                # x[i] = ..., x.f += ...: a write into the variable (array or struct) itself
                j = k + 1
                while j < len(toks) and toks[j].text in ("[", "."):
                    j = _match(toks, j) + 1 if toks[j].text == "[" else j + 2
                if prev in ("++", "--") or (j < len(toks) and (toks[j].text in ASSIGN_OPS or
                                                              toks[j].text in ("++", "--"))):
                    self.U.discard(t.text)
                elif j < len(toks) and toks[j].text == "(" and toks[j - 2].text == ".":
                    self.U.discard(t.text)  # x.f(...): a member function may modify x

    def _call_arg_written(self, toks: list[Token], k: int, whole: bool = True) -> bool:
        """Whether toks[k] (preceded by '(' or ',') starts an lvalue argument of a call --
        `f(x)`, `f(a, x.m)`, `f(x[i])` -- that the callee may write (Lockstep.writes_arg).
        whole=False: toks[k] is anywhere inside the argument (a branch of `c ? x : y`)."""
        while True:
            j = _match(toks, k) + 1 if toks[k].text == "(" else k + 1
            while j < len(toks) and toks[j].text in (".", "["):
                j = _match(toks, j) + 1 if toks[j].text == "[" else j + 2
            if whole and (j >= len(toks) or toks[j].text not in (",", ")")):
                return False
            # the call's '(' and the argument's position
            d, idx, q = 0, 0, k - 1
            while q >= 0:
                x = toks[q].text
                if x in (")", "]", "}"):
                    d += 1
                elif x in ("(", "[", "{"):
                    if d == 0:
                        break
                    d -= 1
                elif x == "," and d == 0:
                    idx += 1
                elif x == ";" and d == 0:
                    return False  # the statement began: not inside a call's arguments
                q -= 1
            if q < 1 or toks[q].text != "(":
                return False
            if q == k - 1 and toks[j].text == ")" and toks[q - 1].text in ("(", ","):
                k = q  # f((x)): the parenthesized lvalue is the argument
                continue
            break
        c = q - 1
        if toks[c].text == ">":  # f<T>(x): the name before the template arguments
            c = match_open(toks, c) - 1
            if c < 0:
                return True
        f = toks[c]
        if f.kind != "id":
            return False  # a parenthesized expression
        if f.text in NO_WRITE_CALLS or f.text in MATH_FUNCS or f.text in SIMD_NAMES or \
                f.text in CXX_TYPES or f.text in self.ls.type_names or f.text.startswith("pmn_"):
            return False  # by value: keywords, math and SIMD-group functions, casts
        if c and toks[c - 1].text in (".", "->"):
            return True  # a member function: its parameters are not known
        return self.ls.writes_arg(f.text, idx)

    def _stmt_ok(self, toks: list[Token], ctx_uni: bool) -> None:
        """A statement at the synchronizing level: `x op= e;`, `x++;` keep x uniform when the
        context and e are; other assignments drop their targets."""
        body = toks[:-1] if toks and toks[-1].text == ";" else toks
        if len(body) >= 2 and body[0].kind == "id" and body[0].text in self.U:
            if body[1].text in ASSIGN_OPS and ctx_uni and self.expr(body[2:]) and \
                    not any(x.text in ASSIGN_OPS for x in body[2:]):
                return
            if len(body) == 2 and body[1].text in ("++", "--") and ctx_uni:
                return
        if len(body) == 2 and body[0].text in ("++", "--") and body[1].text in self.U and ctx_uni:
            return
        self.drop_assigned(toks)

    def _decl_ok(self, d: Decl, ctx_uni: bool) -> None:
        # one declaration statement is emitted either as scalars or per thread as a whole
        # (Lockstep.uniform_stmt), so one declarator that is not uniform drops all of them:
        # `const uint C = q.len, off = o * C;` keeps C per thread, and so must what reads it
        every = True
        for dc in d.decls:
            ok = ctx_uni and dc.init is not None and not dc.dims and \
                not any(x.text == "&" for x in dc.prefix) and \
                not (d.base and d.base[0].text == "auto") and self.expr(dc.init)
            if d.quals & {"constexpr", "PMN_THREADGROUP"}:
                ok = True
            every = every and ok and dc.name in self.U
            if dc.init is not None:
                self.drop_assigned(dc.init)
        if not every:
            for dc in d.decls:
                self.U.discard(dc.name)

    def _walk(self, stmts: list[St], ctx_uni: bool) -> None:
        ls = self.ls
        for st in stmts:
            k = st.kind
            if k == "simple":
                d = parse_decl(st.toks, ls.type_names)
                if st.sync:
                    if d is not None:
                        for dc in d.decls:
                            self.U.discard(dc.name)
                    self.drop_assigned(st.toks)
                    for dc in (d.decls if d else []):
                        self.U.discard(dc.name)
                    # `x = f(...)` with a synchronizing f: the result is per thread
                    if st.toks and st.toks[0].kind == "id" and len(st.toks) > 1 and \
                            st.toks[1].text in ASSIGN_OPS:
                        self.U.discard(st.toks[0].text)
                elif d is not None:
                    self._decl_ok(d, ctx_uni)
                else:
                    self._stmt_ok(st.toks, ctx_uni)
            elif not st.sync:
                self.drop_assigned(to_tokens(st))
            elif k == "block":
                self._walk(st.body, ctx_uni)
            elif k == "if":
                cu = ctx_uni and self.expr(st.cond) and not ls.sync_toks(st.cond)
                self.drop_assigned(st.cond)
                self._walk(st.body, cu)
            elif k in ("for", "while", "do"):
                cu = self.loop_uniform(st, ctx_uni)
                if k == "for" and st.init:
                    d = parse_decl(st.init + [st.toks[2]], ls.type_names)
                    if d is not None:
                        self._decl_ok(d, cu)
                    else:
                        self._stmt_ok(st.init, cu)
                if k == "for" and st.inc:
                    for part in _split_top(st.inc, ","):
                        self._stmt_ok(part, cu)
                self.drop_assigned(st.cond)
                self._walk(st.body, cu)
            else:
                self.drop_assigned(to_tokens(st))

    def loop_uniform(self, st: St, ctx_uni: bool) -> bool:
        """A loop every thread runs the same number of times: plain C++."""
        if not ctx_uni or self.ls.sync_toks(st.cond) or not self.expr(st.cond):
            return False
        if _targets_loop(st.body[0]):
            return False
        if st.kind == "for":
            if st.init and parse_decl(st.init + [st.toks[2]], self.ls.type_names) is None \
                    and not self._is_uniform_assign(st.init):
                return False
            if st.init:
                d = parse_decl(st.init + [st.toks[2]], self.ls.type_names)
                if d is not None and any(dc.name not in self.U for dc in d.decls):
                    return False
            for part in _split_top(st.inc, ","):
                if part and not self._is_uniform_assign(part):
                    return False
        return True

    def _is_uniform_assign(self, toks: list[Token]) -> bool:
        body = [x for x in toks if x.text != ";"]
        if len(body) == 2 and ((body[0].text in self.U and body[1].text in ("++", "--")) or
                               (body[1].text in self.U and body[0].text in ("++", "--"))):
            return True
        return len(body) >= 3 and body[0].kind == "id" and body[0].text in self.U and \
            body[1].text in ASSIGN_OPS and self.expr(body[2:])


def _declared_names(stmts: list[St], type_names: set[str], acc: set[str]) -> None:
    for st in stmts:
        if st.kind == "simple":
            d = parse_decl(st.toks, type_names)
            if d is not None:
                acc.update(dc.name for dc in d.decls)
        elif st.kind == "for" and st.init:
            d = parse_decl(st.init + [st.toks[2]], type_names)
            if d is not None:
                acc.update(dc.name for dc in d.decls)
        elif st.kind == "opaque":
            acc.update(_ids(st.toks))  # conservative: a switch's names count as its own
        _declared_names(st.body, type_names, acc)


def _copy_info(stmts: list[St], toks: list[Token], type_names: set[str]) -> tuple[set, set]:
    """(names declared as arrays, names a pointer to which may be kept: `&x`, or an array used
    bare other than as a call argument -- `p = arr`, `T* p = arr + 1`)."""
    arrays: set[str] = set()

    def walk(sts: list[St]) -> None:
        for st in sts:
            d = None
            if st.kind == "simple":
                d = parse_decl(st.toks, type_names)
            elif st.kind == "for" and st.init:
                d = parse_decl(st.init + [st.toks[2]], type_names)
            if d is not None:
                arrays.update(dc.name for dc in d.decls if dc.dims)
            walk(st.body)

    walk(stmts)
    bad: set[str] = set()
    for k, t in enumerate(toks):
        if t.kind != "id":
            continue
        prev = toks[k - 1].text if k else ""
        nxt = toks[k + 1].text if k + 1 < len(toks) else ""
        if prev in (".", "->", "::"):
            continue
        if prev == "&" and (k < 2 or (toks[k - 2].kind == "punct" and
                                      toks[k - 2].text not in (")", "]"))):
            bad.add(t.text)
        elif t.text in arrays and nxt != "[" and not (prev in ("(", ",") and nxt in (",", ")")):
            bad.add(t.text)
    return arrays, bad


def _maybe_written(toks: list[Token], name: str) -> bool:
    """Whether `name` (a scalar or struct) may be modified by `toks`: assigned, incremented, a
    member assigned, passed to a call (a reference parameter) or bound to a reference."""
    for k, t in enumerate(toks):
        if t.kind == "id" and " " in t.text and name in _words(t.text):
            return True  # inside generated code: assume so
        if t.kind != "id" or t.text != name:
            continue
        prev = toks[k - 1].text if k else ""
        if prev in (".", "->", "::"):
            continue
        j = k + 1
        while j < len(toks) and toks[j].text in (".", "["):
            j = _match(toks, j) + 1 if toks[j].text == "[" else j + 2
        nxt = toks[j].text if j < len(toks) else ""
        if nxt in ASSIGN_OPS or nxt in ("++", "--") or prev in ("++", "--"):
            return True
        if prev in ("(", ",") and nxt in (",", ")"):
            return True
        if prev in ("=", "{") and k >= 3 and toks[k - 2].kind == "id" and \
                toks[k - 3].text in ("&", "&&"):
            return True  # `thread T& r = x;`: r may write x
        if nxt == "(" and j > k + 1:  # x.f(...): a member function may modify x
            return True
    return False


def _returns(stmts: list[St]) -> bool:
    """Whether a thread may return before the end of `stmts` (a return as the very last
    statement ends the function for everyone and does not count)."""
    def has(st: St) -> bool:
        if st.kind == "return":
            return True
        if st.kind == "opaque":
            return any(x.text == "return" for x in st.toks)
        return any(has(c) for c in st.body)
    body = stmts[:-1] if stmts and stmts[-1].kind == "return" else stmts
    return any(has(st) for st in body)


def _targets_loop(st: St, inner: int = 0) -> bool:
    """Whether a break/continue in `st` leaves or continues the loop whose body `st` is."""
    k = st.kind
    if k in ("break", "continue"):
        return inner == 0
    if k == "opaque":
        return inner == 0 and any(x.text == "continue" for x in st.toks)
    if k == "block" or k == "if":
        return any(_targets_loop(c, inner) for c in st.body)
    if k in ("for", "while", "do"):
        return any(_targets_loop(c, inner + 1) for c in st.body)
    return False


# ---- the transform ---------------------------------------------------------------------------

@dataclass
class Ctx:
    masks: list[str]  # this function's mask stack; masks[0] is the function's entry mask
    scope: list[list[tuple[str, str]]]  # frames of (name, per-thread array)
    lane_builtins: list[tuple[str, str, str]]  # (type, name, expression of pmn_l)
    ret: str | None  # per-thread return array of an inlined helper
    ret_void: bool
    loops: list[tuple[int, int]]  # (index of the loop mask, index of the body mask) in masks
    depth: int  # inlining depth
    uni: set[str] = field(default_factory=set)  # uniform names (Uniformity)
    uniform_ctx: bool = True  # every thread that has not returned executes here
    arrays: set[str] = field(default_factory=set)  # per-thread arrays (copied whole)
    no_copy: set[str] = field(default_factory=set)  # a pointer to them may outlive a loop
    full: bool = False  # masks[0] stays all ones (no thread of the group returns early)

    @property
    def mask(self) -> str:
        return self.masks[-1]

    def visible(self) -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        for fr in self.scope:
            for name, arr in fr:
                seen[name] = arr
        return list(seen.items())

