"""cpu target: kernels with barriers or SIMD-group functions as work-item loops, without fibers.

Design (the work-item-loop approach of OpenCL CPU runtimes such as POCL, done on our token
stream): for each kernel that needs synchronization we emit, next to the fiber version, one
function that runs a whole threadgroup on one OS thread:

* The kernel body is parsed into statements. A statement is *sync* when it contains a barrier, a
  SIMD-group function or a call of a helper function that does. Maximal runs of non-sync
  statements of one block ("regions") become one loop over the threadgroup's threads
  (`for (pmn_l ...)`), so the C++ compiler sees plain, vectorizable loops.
* A variable declared at the level of the sync statements and named again after its region is
  kept per thread: an array `T pmn_pN_x[PMN_TG]`, bound inside each loop by `auto& x =
  pmn_pN_x[pmn_l];`, so the original code is emitted unchanged (C++ scoping does shadowing).
* Control flow that contains sync statements (if/else, for, while, do, early return, break,
  continue) runs in lockstep: one byte per thread says whether the thread executes (mask); a
  branch runs when any thread takes it, a loop iterates while any thread is inside; `return`,
  `break` and `continue` clear the thread's bytes in the masks they leave.
* A SIMD-group function becomes: each active thread stores its operand (`pmn::grp::<name>`),
  `pmn::grp::exec` combines each simdgroup's active threads with the same function the fiber
  runtime uses (bit-identical results), and the next loop reads the result. Barriers only end a
  region. Helper functions with sync are inlined (parameters and the return value per thread,
  template arguments recovered by overload resolution on a declaration with the same
  parameters).

What does not fit (goto/labels, switch around a sync statement, a sync call in `&&`/`||` or in
`?:` other than `x = c ? f(...) : g(...)`, references or `auto` kept across a sync point,
recursion) raises Unsupported: the kernel keeps its fiber version, and the reason is reported
(`KernelInfo.fiber_reason`, PYMETALNN_CPU_REPORT=1).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .preprocess import Token

SIMD_NAMES = set("""simd_sum simd_product simd_max simd_min simd_prefix_exclusive_sum
simd_prefix_inclusive_sum simd_prefix_exclusive_product simd_prefix_inclusive_product simd_shuffle
simd_shuffle_xor simd_shuffle_up simd_shuffle_down simd_broadcast simd_broadcast_first simd_all
simd_any simd_ballot simd_is_first simd_and simd_or simd_xor simdgroup_barrier""".split())
BARRIER = "threadgroup_barrier"
# reading a SIMD-group function's result (default: pmn::grp::res<decltype(original call)>)
RESULT_READERS = {"simd_ballot": "pmn::grp::ballot_res", "simd_all": "pmn::grp::all_res",
                  "simd_any": "pmn::grp::any_res"}
CXX_TYPES = {"int", "unsigned", "signed", "float", "bool", "char", "short", "long", "void",
             "size_t", "uint32_t", "int32_t", "uint16_t", "int16_t", "uint8_t", "int8_t",
             "uint64_t", "int64_t", "typename", "auto"}
QUALS = {"const", "volatile", "constexpr", "static", "PMN_THREADGROUP"}
LANE_BUILTINS = {
    "thread_position_in_grid": "(pmn_tgid * PMN_TG + pmn_l)",
    "thread_position_in_threadgroup": "pmn_l",
    "thread_index_in_threadgroup": "pmn_l",
    "thread_index_in_simdgroup": "(pmn_l & 31u)",
    "simdgroup_index_in_threadgroup": "(pmn_l >> 5)",
}
UNIFORM_BUILTINS = {
    "threadgroup_position_in_grid": "pmn_tgid",
    "threads_per_threadgroup": "PMN_TG",
    "threadgroups_per_grid": "pmn_ngroups",
    "threads_per_simdgroup": "32u",
    "simdgroups_per_threadgroup": "((PMN_TG + 31u) >> 5)",
}


# PYMETALNN_CPU_SIMD=0 leaves the thread loops to the compiler's own vectorizer (comparisons)
OMP_SIMD = os.environ.get("PYMETALNN_CPU_SIMD", "1") not in ("0", "")


class Unsupported(Exception):
    """The kernel's structure does not fit the work-item loops; it keeps fibers."""


# ---- token helpers ---------------------------------------------------------------------------

def _match(toks: list[Token], i: int) -> int:
    pairs = {"(": ")", "[": "]", "{": "}"}
    o, c = toks[i].text, pairs[toks[i].text]
    d = 0
    for j in range(i, len(toks)):
        if toks[j].kind != "punct":
            continue
        if toks[j].text == o:
            d += 1
        elif toks[j].text == c:
            d -= 1
            if d == 0:
                return j
    raise Unsupported(f"unbalanced '{o}'")


def _match_angle(toks: list[Token], i: int) -> int:
    d = 0
    for j in range(i, len(toks)):
        t = toks[j].text
        if t in ("(", "[", "{"):
            return -1
        if t == "<":
            d += 1
        elif t == ">":
            d -= 1
        elif t == ">>":
            d -= 2
        if d <= 0 and t in (">", ">>"):
            return j
        if t == ";":
            return -1
    return -1


def _split_top(toks: list[Token], sep: str) -> list[list[Token]]:
    parts: list[list[Token]] = [[]]
    d = 0
    for t in toks:
        if t.text in ("(", "[", "{"):
            d += 1
        elif t.text in (")", "]", "}"):
            d -= 1
        if t.text == sep and d == 0:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


def _split_args(toks: list[Token]) -> list[list[Token]]:
    """Split on top-level commas, template angle brackets included."""
    parts: list[list[Token]] = [[]]
    d = 0
    for t in toks:
        if t.text in ("(", "[", "{", "<"):
            d += 1
        elif t.text in (")", "]", "}", ">"):
            d -= 1
        elif t.text == ">>":
            d -= 2
        if t.text == "," and d == 0:
            parts.append([])
        else:
            parts[-1].append(t)
    return [p for p in parts if p]


def _split_call_args(toks: list[Token]) -> list[list[Token]]:
    """Split call arguments on commas at paren depth 0 (a '<' there is a comparison unless it
    closes before the next comma)."""
    return [p for p in _split_top(toks, ",") if p]


def _words(text: str) -> set[str]:
    """Identifiers inside a generated multi-word token."""
    return set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text))


def _ids(toks: list[Token]) -> set[str]:
    out = set()
    for k, t in enumerate(toks):
        if t.kind == "id" and not (k and toks[k - 1].text in (".", "->")):
            out.add(t.text)
    return out


# ---- statements ------------------------------------------------------------------------------

@dataclass
class St:
    kind: str  # simple block if for while do return break continue opaque empty
    toks: list[Token] = field(default_factory=list)  # simple/return/opaque: the statement's tokens
    cond: list[Token] = field(default_factory=list)
    init: list[Token] = field(default_factory=list)
    inc: list[Token] = field(default_factory=list)
    body: list[St] = field(default_factory=list)  # block children; if: [then, else?]; loops: [body]
    pragmas: list[Token] = field(default_factory=list)
    sync: bool = False

    @property
    def first(self) -> Token:
        for t in self.all_tokens():
            return t
        raise Unsupported("empty statement")

    def all_tokens(self) -> list[Token]:
        return to_tokens(self)


def to_tokens(st: St) -> list[Token]:
    """The statement back as tokens (pragmas first)."""
    out = list(st.pragmas)
    k = st.kind
    if k in ("simple", "opaque", "return", "break", "continue", "empty"):
        out += st.toks
    elif k == "block":
        out += st.toks[:1]
        for c in st.body:
            out += to_tokens(c)
        out += st.toks[1:]
    elif k == "if":
        out += st.toks[:2] + st.cond + [st.toks[2]] + to_tokens(st.body[0])
        if len(st.body) > 1:
            out += [st.toks[3]] + to_tokens(st.body[1])
    elif k == "for":
        out += st.toks[:2] + st.init + [st.toks[2]] + st.cond + [st.toks[3]] + st.inc + \
            [st.toks[4]] + to_tokens(st.body[0])
    elif k == "while":
        out += st.toks[:2] + st.cond + [st.toks[2]] + to_tokens(st.body[0])
    elif k == "do":
        out += st.toks[:1] + to_tokens(st.body[0]) + st.toks[1:3] + st.cond + st.toks[3:]
    return out


class Parser:
    def __init__(self, toks: list[Token], is_sync_call):
        self.t = toks
        self.is_sync_call = is_sync_call

    def sync_toks(self, toks: list[Token]) -> bool:
        return any(self.is_sync_call(toks, k) for k in range(len(toks)))

    def block(self, i: int, end: int) -> list[St]:
        out: list[St] = []
        while i < end:
            st, i = self.stmt(i, end)
            out.append(st)
        return out

    def stmt(self, i: int, end: int) -> tuple[St, int]:
        t = self.t
        prag: list[Token] = []
        while i < end and t[i].kind == "pragma":
            prag.append(t[i])
            i += 1
        if i >= end:
            return St("empty", [], pragmas=prag), i
        s = t[i].text
        if t[i].kind == "punct" and s == "{":
            e = _match(t, i)
            st = St("block", [t[i], t[e]], body=self.block(i + 1, e), pragmas=prag)
            st.sync = any(c.sync for c in st.body)
            return st, e + 1
        if t[i].kind == "id" and s == "if":
            pc = _match(t, i + 1)
            then, j = self.stmt(pc + 1, end)
            toks = [t[i], t[i + 1], t[pc]]
            body = [then]
            if j < end and t[j].text == "else":
                toks.append(t[j])
                els, j = self.stmt(j + 1, end)
                body.append(els)
            cond = t[i + 2 : pc]
            st = St("if", toks, cond=cond, body=body, pragmas=prag)
            st.sync = self.sync_toks(cond) or any(b.sync for b in body)
            return st, j
        if t[i].kind == "id" and s == "for":
            pc = _match(t, i + 1)
            parts = _split_top(t[i + 2 : pc], ";")
            if len(parts) != 3:
                raise Unsupported("range-based for")
            # the two top-level ';' of the header
            d = 0
            semis = []
            for x in t[i + 2 : pc]:
                if x.text in ("(", "[", "{"):
                    d += 1
                elif x.text in (")", "]", "}"):
                    d -= 1
                elif x.text == ";" and d == 0:
                    semis.append(x)
            body, j = self.stmt(pc + 1, end)
            st = St("for", [t[i], t[i + 1], semis[0], semis[1], t[pc]], init=parts[0],
                    cond=parts[1], inc=parts[2], body=[body], pragmas=prag)
            st.sync = body.sync or self.sync_toks(t[i + 2 : pc])
            return st, j
        if t[i].kind == "id" and s == "while":
            pc = _match(t, i + 1)
            body, j = self.stmt(pc + 1, end)
            st = St("while", [t[i], t[i + 1], t[pc]], cond=t[i + 2 : pc], body=[body],
                    pragmas=prag)
            st.sync = body.sync or self.sync_toks(st.cond)
            return st, j
        if t[i].kind == "id" and s == "do":
            body, j = self.stmt(i + 1, end)
            if j >= end or t[j].text != "while":
                raise Unsupported("do without while")
            pc = _match(t, j + 1)
            if pc + 1 >= len(t) or t[pc + 1].text != ";":
                raise Unsupported("do-while without ';'")
            st = St("do", [t[i], t[j], t[j + 1], t[pc], t[pc + 1]], cond=t[j + 2 : pc],
                    body=[body], pragmas=prag)
            st.sync = body.sync or self.sync_toks(st.cond)
            return st, pc + 2
        if t[i].kind == "id" and s == "switch":
            pc = _match(t, i + 1)
            if t[pc + 1].text != "{":
                raise Unsupported("switch without a block")
            e = _match(t, pc + 1)
            st = St("opaque", t[i : e + 1], pragmas=prag)
            st.sync = self.sync_toks(st.toks)
            return st, e + 1
        if t[i].kind == "id" and s in ("goto", "case", "default"):
            raise Unsupported(f"'{s}' outside a switch")
        if t[i].kind == "id" and i + 1 < end and t[i + 1].text == ":" and s not in ("public",):
            raise Unsupported("labels")
        # simple statement (or return/break/continue/empty): up to ';' at depth 0
        j = i
        d = 0
        while j < end:
            x = t[j]
            if x.kind == "punct":
                if x.text in ("(", "[", "{"):
                    d += 1
                elif x.text in (")", "]", "}"):
                    d -= 1
                elif x.text == ";" and d == 0:
                    break
            j += 1
        if j >= end:
            raise Unsupported("statement without ';'")
        toks = t[i : j + 1]
        kind = "simple"
        if s == "return" and t[i].kind == "id":
            kind = "return"
        elif s in ("break", "continue") and t[i].kind == "id":
            kind = s
        elif s == ";":
            kind = "empty"
        st = St(kind, toks, pragmas=prag)
        st.sync = self.sync_toks(toks)
        return st, j + 1


# ---- declarations ----------------------------------------------------------------------------

@dataclass
class Declarator:
    name: str
    prefix: list[Token]  # '*' / '&' before the name
    dims: list[Token]  # '[..]...' after the name
    init: list[Token] | None  # tokens after '=' (None: no initializer)
    name_tok: Token


@dataclass
class Decl:
    quals: set[str]
    base: list[Token]  # type tokens (qualifiers other than const removed)
    decls: list[Declarator]


def parse_decl(toks: list[Token], type_names: set[str]) -> Decl | None:
    """`toks` (a simple statement, ';' included) as a declaration, or None when it is not one."""
    toks = toks[:-1] if toks and toks[-1].text == ";" else toks
    i = 0
    quals: set[str] = set()
    while i < len(toks) and toks[i].text in QUALS:
        quals.add(toks[i].text)
        i += 1
    if i >= len(toks):
        return None
    t0 = toks[i]
    if t0.kind != "id":
        return None
    is_type = t0.text in CXX_TYPES or t0.text in type_names or t0.text.startswith("pmn_") or \
        t0.text.startswith("pmn::") or \
        (t0.text == "pmn" and i + 1 < len(toks) and toks[i + 1].text == "::")
    if not is_type:
        return None
    # the type: ids, '::', '<...>', const/volatile; then the first declarator
    base_start = i
    j = i
    last_id = None
    while j < len(toks):
        x = toks[j]
        if x.text == "<":
            e = _match_angle(toks, j)
            if e < 0:
                return None
            j = e + 1
            continue
        if x.text == "::" or x.text in ("const", "volatile"):
            j += 1
            continue
        if x.kind == "id":
            nxt = toks[j + 1].text if j + 1 < len(toks) else ";"
            if last_id is not None and nxt in ("=", ",", "[", ";") and toks[j - 1].text != "::":
                break
            if last_id is not None and nxt == "(" and toks[j - 1].text != "::":
                raise Unsupported("declaration with a parenthesized initializer")
            last_id = x
            j += 1
            continue
        if x.text in ("*", "&"):
            break
        return None
    if last_id is None:
        return None
    base = [x for x in toks[base_start:j]]
    decls: list[Declarator] = []
    parts = _split_top(toks[j:], ",")
    for p in parts:
        k = 0
        prefix = []
        while k < len(p) and p[k].text in ("*", "&", "const"):
            prefix.append(p[k])
            k += 1
        if k >= len(p) or p[k].kind != "id":
            return None
        name_tok = p[k]
        k += 1
        dims: list[Token] = []
        while k < len(p) and p[k].text == "[":
            e = _match(p, k)
            dims += p[k : e + 1]
            k = e + 1
        init = None
        if k < len(p):
            if p[k].text != "=":
                return None
            init = p[k + 1 :]
        decls.append(Declarator(name_tok.text, prefix, dims, init, name_tok))
    return Decl(quals, base, decls)


# ---- functions in the translated stream -------------------------------------------------------

@dataclass
class Func:
    name: str
    tparams: list[tuple[str, str, list[Token]]]  # (kind 'type'|'value', name, declaration tokens)
    theader: list[Token]  # 'template < ... >' or []
    ret: list[Token]
    params: list[list[Token]]
    body: list[Token]  # between the braces
    origin: Token


def find_functions(toks: list[Token], names: set[str]) -> dict[str, Func]:
    """Definitions at file scope of the functions in `names`."""
    found: dict[str, Func] = {}
    i, n = 0, len(toks)
    start = 0
    d = 0
    while i < n:
        t = toks[i]
        if t.kind == "pragma" and d == 0:
            start = i + 1
            i += 1
            continue
        if t.text == "{" and t.kind == "punct":
            if d == 0:
                p = i - 1
                if p >= 0 and toks[p].text == "const":
                    p -= 1
                e = _match(toks, i)
                if p >= 0 and toks[p].text == ")":
                    dd = 0
                    q = p
                    while q >= start:
                        if toks[q].text == ")":
                            dd += 1
                        elif toks[q].text == "(":
                            dd -= 1
                            if dd == 0:
                                break
                        q -= 1
                    name = toks[q - 1].text if q > start else ""
                    if name in names:
                        if name in found:
                            found[name] = None  # overloaded: not inlined
                        else:
                            found[name] = _make_func(toks[start:q - 1], toks[q - 1], toks[q + 1:p],
                                                     toks[i + 1:e])
                i = e + 1
                if i < n and toks[i].text == ";":
                    i += 1
                start = i
                continue
            d += 1
        elif t.text == "}" and t.kind == "punct":
            d -= 1
        elif t.text == ";" and d == 0:
            start = i + 1
        i += 1
    return {k: v for k, v in found.items() if v is not None}


def _make_func(head: list[Token], name_tok: Token, params: list[Token], body: list[Token]) -> Func:
    theader: list[Token] = []
    tparams: list[tuple[str, str, list[Token]]] = []
    h = 0
    if head and head[0].text == "template" and len(head) > 1 and head[1].text == "<":
        e = _match_angle(head, 1)
        theader = head[: e + 1]
        for p in _split_args(head[2:e]):
            eq = [k for k, x in enumerate(p) if x.text == "="]
            decl = p[: eq[0]] if eq else p
            ids = [x for x in decl if x.kind == "id"]
            kind = "type" if decl[0].text in ("typename", "class") else "value"
            tparams.append((kind, ids[-1].text, decl))
        h = e + 1
    ret = [x for x in head[h:] if x.text not in ("inline", "static", "PMN_KERNEL_IMPL",
                                                 "constexpr", "__attribute__")]
    return Func(name_tok.text, tparams, theader, ret, _split_args(params) if params else [], body,
                name_tok)


# ---- uniformity ------------------------------------------------------------------------------

MATH_FUNCS = set("""exp exp2 exp10 log log2 log10 sqrt rsqrt pow powr tanh sinh cosh sin cos tan asin
acos atan atan2 abs fabs min max fmin fmax clamp fma mad mix select floor ceil round rint trunc fract
fmod isnan isinf isfinite sign step smoothstep dot length normalize cross copysign saturate
as_type""".split())
ASSIGN_OPS = {"=", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<<=", ">>="}
PURE_IDS = {"true", "false", "sizeof", "precise", "fast", "metal"}


class Uniformity:
    """Which variables of a function hold the same value in every thread of the threadgroup.

    Such a variable is one scalar instead of an array per thread, and an if or loop whose
    condition uses only uniform values runs as plain C++ control flow (no masks). A variable is
    uniform when every assignment to it -- its initializer included -- happens at the level of
    the synchronizing statements (not inside a thread loop's own control flow), under uniform
    control flow, from an expression of uniform names that reads no memory ('[', unary '*',
    '->') and calls only the prelude's math functions. Computed as a greatest fixed point:
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
            elif nxt in ("[", ".") and t.text not in self.base:
                # x[i] = ..., x.f += ...: a write into the variable (array or struct) itself
                j = k + 1
                while j < len(toks) and toks[j].text in ("[", "."):
                    j = _match(toks, j) + 1 if toks[j].text == "[" else j + 2
                if prev in ("++", "--") or (j < len(toks) and (toks[j].text in ASSIGN_OPS or
                                                              toks[j].text in ("++", "--"))):
                    self.U.discard(t.text)

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
        for dc in d.decls:
            ok = ctx_uni and dc.init is not None and not dc.dims and \
                not any(x.text == "&" for x in dc.prefix) and \
                not (d.base and d.base[0].text == "auto") and self.expr(dc.init)
            if d.quals & {"constexpr", "PMN_THREADGROUP"}:
                ok = True
            if not ok:
                self.U.discard(dc.name)
            if dc.init is not None:
                self.drop_assigned(dc.init)

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
    member assigned, or passed to a call (a reference parameter)."""
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


class Lockstep:
    """Builds the work-item-loop version of the kernels of one translation unit."""

    def __init__(self, toks: list[Token], sync_funcs: set[str], type_names: set[str]):
        self.toks = toks
        self.n = 0
        self.helpers = find_functions(toks, sync_funcs)
        self.sync_funcs = sync_funcs
        self.type_names = type_names
        self.deduce: dict[str, list[Token]] = {}  # helper -> declarations emitted before use

    # -- small emitters
    def uid(self, base: str) -> str:
        self.n += 1
        return f"pmn_{base}{self.n}"

    @staticmethod
    def tk(text: str, like: Token) -> Token:
        return Token("id", text, like.file, like.line, True)

    def is_sync_call(self, toks: list[Token], k: int) -> bool:
        t = toks[k]
        if t.kind != "id":
            return False
        if t.text in SIMD_NAMES or t.text == BARRIER:
            return k >= 2 and toks[k - 1].text == "::" and toks[k - 2].text == "pmn"
        if t.text in self.sync_funcs:
            prev = toks[k - 1].text if k else ""
            nxt = toks[k + 1].text if k + 1 < len(toks) else ""
            return prev not in (".", "->", "::") and nxt in ("(", "<")
        return False

    # -- kernels
    def build_kernel(self, func: Func, info, out: list[Token]) -> None:
        """Append `pmn_kgrp_<impl>` for kernel `info` (its impl `func`) to out."""
        o = func.origin
        T = lambda s: self.tk(s, o)  # noqa: E731
        # parameters: buffers stay, built-ins become per-lane expressions or uniform values
        bpos = {pos: attr for pos, attr in info.builtins}
        params: list[list[Token]] = []
        lane_b: list[tuple[str, str, str]] = []
        uni_b: list[str] = []
        for pos, p in enumerate(func.params):
            if pos in bpos:
                attr = bpos[pos]
                ids = [x for x in p if x.kind == "id"]
                name = ids[-1].text
                ty = " ".join(x.text for x in p[:-1] if x.text != "const") or "unsigned"
                if attr in LANE_BUILTINS:
                    lane_b.append((ty, name, LANE_BUILTINS[attr]))
                else:
                    uni_b.append(f"const {ty} {name} = ({ty}){UNIFORM_BUILTINS[attr]};")
            else:
                params.append(p)
        theader = [T("template"), T("<"), T("unsigned PMN_TG")]
        if func.theader:
            theader += [T(",")] + func.theader[2:]
        else:
            theader.append(T(">"))
        out += theader
        out += [T("static void"), T("pmn_kgrp_" + func.name[len("pmn_kimpl_"):]), T("(")]
        for p in params:
            out += p + [T(",")]
        out += [T("unsigned pmn_tgid, unsigned pmn_ngroups) {")]
        out += [T(s) for s in uni_b]
        out += [T("(void)pmn_ngroups; pmn::grp::mask_t pmn_m0[PMN_TG]; pmn::grp::fill(pmn_m0, PMN_TG);")]
        ctx = Ctx(["pmn_m0"], [[]], lane_b, None, True, [], 0)
        body = Parser(func.body, self.is_sync_call).block(0, len(func.body))
        base = {n for p in params for n in [[x for x in p if x.kind == "id"][-1].text]}
        base |= {ln.split()[2] for ln in uni_b} | {tp[1] for tp in func.tparams}
        ctx.uni = Uniformity(self, base).run(body)
        ctx.full = not _returns(body)
        ctx.arrays, ctx.no_copy = _copy_info(body, func.body, self.type_names)
        self.stmts(body, ctx, out)
        out.append(T("}"))

    # -- statement lists
    def stmts(self, stmts: list[St], ctx: Ctx, out: list[Token]) -> None:
        pending: list[St] = []
        for k, st in enumerate(stmts):
            uni = not st.sync and self.uniform_stmt(st, ctx)
            if not st.sync and not uni:
                pending.append(st)
                continue
            if pending:
                self.region(pending, ctx, out, stmts[k:])
                pending = []
            if uni:  # one scalar for the whole threadgroup, computed once
                out += [x for x in to_tokens(st) if x.text != "PMN_THREADGROUP"]
            else:
                self.sync_stmt(st, ctx, out, stmts[k + 1:])
        if pending:
            self.region(pending, ctx, out, [])

    def uniform_stmt(self, st: St, ctx: Ctx) -> bool:
        """A declaration of uniform variables or an assignment to one (Uniformity made sure
        that its value is the same in every thread)."""
        if st.kind != "simple" or not ctx.uniform_ctx:
            return False
        d = parse_decl(st.toks, self.type_names)
        if d is not None:
            return all(dc.name in ctx.uni for dc in d.decls)
        b = st.toks
        if len(b) >= 3 and b[0].kind == "id" and b[0].text in ctx.uni and \
                (b[1].text in ASSIGN_OPS or (b[1].text in ("++", "--") and len(b) == 3)):
            return Uniformity(self, ctx.uni).expr(b[2:-1]) if b[1].text in ASSIGN_OPS else True
        return len(b) == 3 and b[0].text in ("++", "--") and b[1].text in ctx.uni

    # -- one loop over the threads
    def lane_loop(self, ctx: Ctx, mask: str, body: list[Token], like: Token, out: list[Token],
                  label: str | None = None) -> None:
        T = lambda s: self.tk(s, like)  # noqa: E731
        used = _ids(body) | {w for x in body if x.kind == "id" and " " in x.text
                             for w in _words(x.text)}
        # per-thread values: a local copy (written back at the end of the thread's turn) where no
        # pointer to the value can outlive the loop -- a local the compiler can keep in
        # registers, which a reference into the arrays (aliased by every float* store) is not;
        # else a reference
        binds, outs = [], []
        for n, a in ctx.visible():
            if n not in used:
                continue
            if n in ctx.no_copy:
                binds.append(f"auto& {n} = {a}[pmn_l];")
            elif n in ctx.arrays:
                binds.append(f"__typeof__({a}[0]) {n}; __builtin_memcpy(&{n}, &{a}[pmn_l], "
                             f"sizeof {n});")
                outs.append(f"__builtin_memcpy(&{a}[pmn_l], &{n}, sizeof {n});")
            else:
                binds.append(f"auto {n} = {a}[pmn_l];")
                if _maybe_written(body, n):
                    outs.append(f"{a}[pmn_l] = {n};")
        binds += [f"const {ty} {n} = ({ty}){e};" for ty, n, e in ctx.lane_builtins if n in used]
        # every thread runs: no mask test, so that the compiler may vectorize the loop
        full = ctx.full and ctx.uniform_ctx and mask == ctx.masks[0]
        test = "" if full else f"if (!{mask}[pmn_l]) continue; "
        # the threads of a region are independent (anything else would need a barrier), which
        # `omp simd` tells the compiler: it may then run the loop across vector lanes
        if OMP_SIMD:
            out.append(Token("pragma", "omp simd", like.file, like.line))
        out.append(T(f"for (unsigned pmn_l = 0; pmn_l < PMN_TG; ++pmn_l) {{ {test}{{"))
        out += [T(b) for b in binds]
        out.append(T("{"))
        out += body
        out.append(T("}"))
        end = body[-1] if body else like
        out.append(self.tk((f"{label}: ;" if label else "") + " ".join(outs) + " } }", end))

    def region(self, stmts: list[St], ctx: Ctx, out: list[Token], later: list[St]) -> None:
        later_ids: set[str] = set()
        for s in later:
            later_ids |= _ids(to_tokens(s))
        label = self.uid("next")
        body: list[Token] = []
        hoisted: list[Token] = []
        frame = ctx.scope[-1]
        used_goto = [False]
        for st in stmts:
            if st.kind == "simple":
                d = parse_decl(st.toks, self.type_names)
                if d is not None:
                    if d.quals & {"constexpr", "PMN_THREADGROUP"} or \
                            (d.quals & {"static"}):
                        if "static" in d.quals and not d.quals & {"constexpr", "PMN_THREADGROUP"}:
                            raise Unsupported("static local variable")
                        # threadgroup memory: one array of the group's function (a plain
                        # local: no thread_local lookup on every access)
                        hoisted += [x for x in to_tokens(st) if x.text != "PMN_THREADGROUP"]
                        continue
                    keep = [x for x in d.decls if x.name in later_ids and x.name not in ctx.uni]
                    if keep:
                        body += self.privatize(d, st, ctx, frame, hoisted)
                        continue
            body += self.rewrite(st, ctx, label, 0, used_goto)
        out += hoisted
        if body:
            self.lane_loop(ctx, ctx.mask, body, stmts[0].first, out, label if used_goto[0] else None)

    def privatize(self, d: Decl, st: St, ctx: Ctx, frame: list, hoisted: list[Token]) -> list[Token]:
        """Per-thread arrays for the declarators of `d` (declared into `hoisted`); returns the
        initializing assignments for the region."""
        like = st.first
        base = [x for x in d.base]
        if "const" in d.quals:
            pass  # dropped: the arrays are assigned in the loop
        if base and base[0].text == "auto":
            raise Unsupported("'auto' variable kept across a synchronization point")
        assigns: list[Token] = list(st.pragmas)
        for dc in d.decls:
            if any(x.text == "&" for x in dc.prefix):
                raise Unsupported(f"reference '{dc.name}' kept across a synchronization point")
            if dc.dims and dc.init is not None:
                raise Unsupported(f"initialized array '{dc.name}' kept across a synchronization point")
            arr = self.uid("p") + "_" + dc.name
            ty = " ".join(x.text for x in base + [p for p in dc.prefix if p.text != "const"])
            if "const" in d.quals and any(p.text == "*" for p in dc.prefix):
                ty = "const " + ty
            dims = " ".join(x.text for x in dc.dims)
            hoisted.append(self.tk(f"{ty} {arr}[PMN_TG] {dims};", like))
            frame.append((dc.name, arr))
            if dc.init is not None:
                assigns += [self.tk(dc.name, dc.name_tok), self.tk("=", dc.name_tok)] + dc.init + \
                    [self.tk(";", like)]
        return assigns

    def clear(self, masks: list[str]) -> str:
        return " = ".join(f"{m}[pmn_l]" for m in masks) + " = 0;"

    def rewrite(self, st: St, ctx: Ctx, label: str, inner: int, used_goto: list[bool],
                in_switch: int = 0) -> list[Token]:
        """A non-sync statement inside a thread loop: return/break/continue that leave the loop
        clear the thread's mask bytes and go to the loop's end."""
        k = st.kind
        like = st.first if k != "empty" or st.toks else None
        if k == "return":
            used_goto[0] = True
            expr = st.toks[1:-1]
            out = list(st.pragmas) + [self.tk("{", like)]
            if ctx.ret is not None and expr:
                out += [self.tk(f"{ctx.ret}[pmn_l] = (", like)] + expr + [self.tk(");", like)]
            out.append(self.tk(self.clear(ctx.masks) + f" goto {label}; }}", like))
            return out
        if k in ("break", "continue"):
            if inner or (k == "break" and in_switch):
                return to_tokens(st)
            if not ctx.loops:
                raise Unsupported(f"'{k}' outside a loop")
            lm, bm = ctx.loops[-1]
            used_goto[0] = True
            masks = ctx.masks[lm:] if k == "break" else ctx.masks[bm:]
            return list(st.pragmas) + [self.tk(f"{{ {self.clear(masks)} goto {label}; }}", like)]
        if k == "block":
            out = list(st.pragmas) + st.toks[:1]
            for c in st.body:
                out += self.rewrite(c, ctx, label, inner, used_goto, in_switch)
            return out + st.toks[1:]
        if k == "if":
            out = list(st.pragmas) + st.toks[:2] + st.cond + [st.toks[2]]
            out += self.rewrite(st.body[0], ctx, label, inner, used_goto, in_switch)
            if len(st.body) > 1:
                out += [st.toks[3]] + self.rewrite(st.body[1], ctx, label, inner, used_goto,
                                                   in_switch)
            return out
        if k == "for":
            return list(st.pragmas) + st.toks[:2] + st.init + [st.toks[2]] + st.cond + \
                [st.toks[3]] + st.inc + [st.toks[4]] + \
                self.rewrite(st.body[0], ctx, label, inner + 1, used_goto, 0)
        if k == "while":
            return list(st.pragmas) + st.toks[:2] + st.cond + [st.toks[2]] + \
                self.rewrite(st.body[0], ctx, label, inner + 1, used_goto, 0)
        if k == "do":
            return list(st.pragmas) + st.toks[:1] + \
                self.rewrite(st.body[0], ctx, label, inner + 1, used_goto, 0) + \
                st.toks[1:3] + st.cond + st.toks[3:]
        if k == "opaque":
            if any(x.text == "return" for x in st.toks) or (
                    not inner and any(x.text == "continue" for x in st.toks)):
                raise Unsupported("return/continue inside a switch")
            return to_tokens(st)
        return to_tokens(st)

    # -- statements that synchronize
    def sync_stmt(self, st: St, ctx: Ctx, out: list[Token], later: list[St]) -> None:
        k = st.kind
        like = st.first
        T = lambda s: self.tk(s, like)  # noqa: E731
        if k == "block":
            ctx.scope.append([])
            out.append(st.toks[0])
            self.stmts(st.body, ctx, out)
            out.append(st.toks[1])
            ctx.scope.pop()
            return
        if k == "return":
            if ctx.ret is None:
                raise Unsupported("synchronization inside a return statement of a void function")
            a = St("simple", [T(f"{ctx.ret}[pmn_l]"), T("=")] + st.toks[1:-1] + [T(";")])
            a.sync = True
            self.sync_simple(a, ctx, out, later)
            self.region([St("return", [st.toks[0], T(";")])], ctx, out, later)
            return
        if k == "if":
            if parse_decl(st.cond + [T(";")], self.type_names) is not None:
                raise Unsupported("declaration in an if condition")
            if ctx.uniform_ctx and not self.sync_toks(st.cond) and \
                    Uniformity(self, ctx.uni).expr(st.cond):
                out += st.toks[:2] + st.cond + [st.toks[2], T("{")]
                for n, branch in enumerate(st.body):
                    if n:
                        out += [T("} else {")]
                    ctx.scope.append([])
                    self.stmts([branch], ctx, out)
                    ctx.scope.pop()
                out.append(T("}"))
                return
            mt, me = self.uid("mt"), self.uid("me")
            out.append(T(f"{{ pmn::grp::mask_t {mt}[PMN_TG], {me}[PMN_TG]; "
                         f"pmn::grp::zero({mt}, PMN_TG); pmn::grp::zero({me}, PMN_TG);"))
            ctx.scope.append([])
            cond = self.sync_cond(st.cond, ctx, out, like)
            body = [T("const bool pmn_c = ("), *cond, T(f"); {mt}[pmn_l] = pmn_c; "
                                                       f"{me}[pmn_l] = !pmn_c;")]
            self.lane_loop(ctx, ctx.mask, body, like, out)
            was = ctx.uniform_ctx
            ctx.uniform_ctx = False
            for branch, m in zip(st.body, (mt, me)):
                out.append(T(f"if (pmn::grp::any({m}, PMN_TG)) {{"))
                ctx.masks.append(m)
                ctx.scope.append([])
                self.stmts([branch], ctx, out)
                ctx.scope.pop()
                ctx.masks.pop()
                out.append(T("}"))
            ctx.uniform_ctx = was
            ctx.scope.pop()
            out.append(T("}"))
            return
        if k in ("for", "while", "do"):
            if self.sync_toks(st.init) or self.sync_toks(st.inc):
                raise Unsupported("synchronization inside a for loop's init or increment")
            if Uniformity(self, ctx.uni).loop_uniform(st, ctx.uniform_ctx):
                # every thread iterates alike: the loop itself stays, no masks
                ctx.scope.append([])
                if k == "do":
                    out += [T("do {")]
                    self.stmts(st.body, ctx, out)
                    out += [T("} while (")] + st.cond + [T(");")]
                else:
                    out += st.toks[:2]
                    if k == "for":
                        out += st.init + [st.toks[2]] + st.cond + [st.toks[3]] + st.inc
                    else:
                        out += st.cond
                    out += [T(") {")]
                    self.stmts(st.body, ctx, out)
                    out.append(T("}"))
                ctx.scope.pop()
                return
            was_uniform = ctx.uniform_ctx
            ctx.uniform_ctx = False
            lm, bm = self.uid("ml"), self.uid("mb")
            out.append(T("{"))
            ctx.scope.append([])
            if k == "for" and st.init:
                init = St("simple", st.init + [T(";")])
                d = parse_decl(init.toks, self.type_names)
                hoisted: list[Token] = []
                if d is not None:
                    body = self.privatize(d, init, ctx, ctx.scope[-1], hoisted)
                else:
                    body = init.toks
                out += hoisted
                if body:
                    self.lane_loop(ctx, ctx.mask, body, like, out)
            out.append(T(f"pmn::grp::mask_t {lm}[PMN_TG]; pmn::grp::copy({lm}, {ctx.mask}, PMN_TG);"
                         " for (;;) {"))
            ctx.masks.append(lm)

            def cond_check() -> None:
                if st.cond:
                    ctx.masks.append(lm)  # the condition runs for the threads still looping
                    cond = self.sync_cond(st.cond, ctx, out, like)
                    ctx.masks.pop()
                    self.lane_loop(ctx, lm, [T("if (!("), *cond, T(f")) {lm}[pmn_l] = 0;")],
                                   like, out)
                out.append(T(f"if (!pmn::grp::any({lm}, PMN_TG)) break;"))

            if k != "do":
                cond_check()
            out.append(T(f"{{ pmn::grp::mask_t {bm}[PMN_TG]; pmn::grp::copy({bm}, {lm}, PMN_TG);"))
            ctx.masks.append(bm)
            ctx.loops.append((len(ctx.masks) - 2, len(ctx.masks) - 1))
            ctx.scope.append([])
            self.stmts(st.body, ctx, out)
            ctx.scope.pop()
            ctx.loops.pop()
            ctx.masks.pop()
            out.append(T("}"))
            if k == "for" and st.inc:
                self.lane_loop(ctx, lm, st.inc + [T(";")], like, out)
            if k == "do":
                cond_check()
            ctx.masks.pop()
            ctx.scope.pop()
            ctx.uniform_ctx = was_uniform
            out.append(T("} }"))
            return
        if k == "simple":
            self.sync_simple(st, ctx, out, later)
            return
        raise Unsupported("synchronization inside a switch statement" if k == "opaque" else
                          f"synchronization inside a {k} statement")

    def sync_toks(self, toks: list[Token]) -> bool:
        return any(self.is_sync_call(toks, k) for k in range(len(toks)))

    def sync_cond(self, cond: list[Token], ctx: Ctx, out: list[Token], like: Token) -> list[Token]:
        """A condition that synchronizes is computed first into a per-thread bool (declared in
        the current frame); returns the tokens to test."""
        if not self.sync_toks(cond):
            return cond
        name = self.uid("c")
        arr = name + "_v"
        out.append(self.tk(f"bool {arr}[PMN_TG];", like))
        ctx.scope[-1].append((name, arr))
        a = St("simple", [self.tk(name, like), Token("punct", "=", like.file, like.line),
                          Token("punct", "(", like.file, like.line)] + cond +
               [Token("punct", ")", like.file, like.line), Token("punct", ";", like.file, like.line)])
        a.sync = True
        self.sync_simple(a, ctx, out, [])
        return [self.tk(name, like)]

    @staticmethod
    def _conditional(toks: list[Token], k: int) -> bool:
        """Whether toks[k] sits in a ?: branch or a right operand of && / || (evaluated only
        for some threads), as opposed to always being evaluated."""
        flags = [False]
        for x in toks[:k]:
            if x.text in ("(", "[", "{"):
                flags.append(False)
            elif x.text in (")", "]", "}"):
                flags.pop()
            elif x.text in ("?", ":", "&&", "||"):
                flags[-1] = True
        return any(flags)

    def sync_simple(self, st: St, ctx: Ctx, out: list[Token], later: list[St]) -> None:
        toks = st.toks
        like = st.first
        T = lambda s: self.tk(s, like)  # noqa: E731
        # a declaration: per-thread arrays first, then an assignment that synchronizes
        d = parse_decl(toks, self.type_names)
        if d is not None:
            hoisted: list[Token] = []
            frame = ctx.scope[-1]
            assigns = self.privatize(d, st, ctx, frame, hoisted)
            out += hoisted
            if not assigns:
                return
            # one statement per declarator
            stmts = [St("simple", a + [T(";")]) for a in _split_top(assigns[:-1], ";") if a]
            for s in stmts:
                s.sync = self.sync_toks(s.toks)
            self.stmts(stmts, ctx, out)
            return
        # a barrier alone (threadgroup or simdgroup): the end of a region, nothing to run
        if len(toks) >= 3 and toks[0].text == "pmn" and \
                toks[2].text in (BARRIER, "simdgroup_barrier"):
            e = _match(toks, 3)
            if e == len(toks) - 2:
                return
        # the first call with no synchronization inside its arguments
        k = self._innermost_call(toks)
        # x = c ? f(...) : g(...);  ->  if (c) x = f(...); else x = g(...);
        q = self._ternary(toks) if self._conditional(toks, k) else None
        if q is not None:
            lhs, cond, a, b = q
            ifst = St("if", [T("if"), T("("), T(")"), T("else")], cond=cond,
                      body=[St("simple", lhs + a + [T(";")]), St("simple", lhs + b + [T(";")])])
            for s in ifst.body:
                s.sync = self.sync_toks(s.toks)
            ifst.sync = True
            self.sync_stmt(ifst, ctx, out, later)
            return
        if self._conditional(toks, k):
            raise Unsupported("synchronization inside a conditional expression")
        name = toks[k].text
        if name in SIMD_NAMES:
            start = k - 2
            po = k + 1
            pc = _match(toks, po)
            args = _split_call_args(toks[po + 1 : pc])
            vals = args[1:]  # args[0]: the call-site id
            slot, fn = self.uid("sl"), self.uid("fn")
            out.append(T(f"pmn_simd_slot {slot}[PMN_TG]; pmn_simd_fn {fn} = nullptr;"))
            put = [T(f"pmn::grp::{name}({slot}[pmn_l], {fn}")]
            for v in vals:
                put += [T(",")] + v
            put.append(T(");"))
            self.lane_loop(ctx, ctx.mask, put, like, out)
            out.append(T(f"pmn::grp::exec({slot}, {ctx.mask}, PMN_TG, {fn});"))
            if name in RESULT_READERS:
                rd = [T(f"{RESULT_READERS[name]}({slot}[pmn_l])")]
            else:
                # one token: the original call in decltype is not a synchronization point
                call = " ".join(x.text for x in toks[start : pc + 1])
                rd = [T(f"pmn::grp::res<decltype({call})>({slot}[pmn_l])")]
            rest = toks[:start] + rd + toks[pc + 1 :]
        else:
            rest = self.inline_call(toks, k, ctx, out)
            if rest is None:
                return
        self._continue(rest, st, ctx, out, later)

    def _continue(self, rest: list[Token], st: St, ctx: Ctx, out: list[Token],
                  later: list[St]) -> None:
        nst = St("simple", rest, pragmas=[])
        nst.sync = self.sync_toks(rest)
        if nst.sync:
            self.sync_simple(nst, ctx, out, later)
        elif len(rest) > 1:
            self.region([nst], ctx, out, later)

    @staticmethod
    def _ternary(toks: list[Token]):
        """(lhs tokens incl. '=', cond, a, b) for `lhs = cond ? a : b;` at depth 0, else None."""
        d = 0
        eq = q = c = -1
        for k, x in enumerate(toks):
            if x.text in ("(", "[", "{"):
                d += 1
            elif x.text in (")", "]", "}"):
                d -= 1
            elif d == 0:
                if x.text in ("=", "+=", "-=", "*=", "/=") and eq < 0:
                    eq = k
                elif x.text == "?" and q < 0:
                    q = k
                elif x.text == ":" and q >= 0 and c < 0:
                    c = k
                elif x.text == "?" and q >= 0:
                    return None
        if eq < 0 or q < 0 or c < 0:
            return None
        return toks[: eq + 1], toks[eq + 1 : q], toks[q + 1 : c], toks[c + 1 : -1]

    def _innermost_call(self, toks: list[Token]) -> int:
        for k in range(len(toks)):
            if not self.is_sync_call(toks, k):
                continue
            j = k + 1
            if toks[j].text == "<":
                j = _match_angle(toks, j) + 1
            pc = _match(toks, j)
            if not self.sync_toks(toks[j + 1 : pc]):
                return k
        raise Unsupported("synchronization call not found")

    # -- helpers with synchronization: inlined
    def inline_call(self, toks: list[Token], k: int, ctx: Ctx, out: list[Token]) -> list[Token] | None:
        name = toks[k].text
        f = self.helpers.get(name)
        if f is None:
            raise Unsupported(f"helper '{name}' (overloaded or not found)")
        if ctx.depth > 8:
            raise Unsupported("recursive helper")
        like = toks[k]
        T = lambda s: self.tk(s, like)  # noqa: E731
        j = k + 1
        targs: list[Token] = []
        if toks[j].text == "<":
            e = _match_angle(toks, j)
            targs = toks[j : e + 1]
            j = e + 1
        pc = _match(toks, j)
        args = _split_call_args(toks[j + 1 : pc])
        if len(args) != len(f.params):
            raise Unsupported(f"call of '{name}' with default arguments")
        void = [x.text for x in f.ret] == ["void"]
        start = k
        whole = start == 0 and pc == len(toks) - 2  # `f(...);`
        if void and not whole:
            raise Unsupported(f"void helper '{name}' used in an expression")
        out.append(T("{"))
        sub: dict[str, list[Token]] = {}
        ret_ty = " ".join(x.text for x in f.ret)
        if f.tparams:
            self._deduce_decl(f)
            # names visible to overload resolution: the per-thread values it needs, of thread 0
            used = set().union(*(_ids(a) for a in args)) if args else set()
            binds = [f"auto& {n} = {a}[0]; (void){n};" for n, a in ctx.visible() if n in used]
            binds += [f"const {ty} {n} = 0; (void){n};" for ty, n, _ in ctx.lane_builtins
                      if n in used]
            out += [T(b) for b in binds]
            ta = self.uid("ta")
            call = [T(f"pmn_deduce_{name}")] + targs + [T("(")]
            for a_i, a in enumerate(args):
                call += ([T(",")] if a_i else []) + a
            out += [T(f"using {ta} = decltype(")] + call + [T("));")]
            for idx, (kind, tn, _) in enumerate(f.tparams):
                sub[tn] = [T(ta), Token("punct", "::", like.file, like.line), T(f"pmn_t{idx}")]
                if kind == "type":
                    sub[tn].insert(0, T("typename"))
            ret_ty = f"typename {ta}::pmn_ret"
        ret = None
        if not void:
            ret = self.uid("r")
            out.append(T(f"{ret_ty} {ret}[PMN_TG];"))
        # parameters: a uniform argument is one scalar (evaluated here, named in the inner
        # block so that it cannot hide a caller name used by a later argument); the others are
        # per-thread arrays assigned from the arguments in the caller's loop
        pframe: list[tuple[str, str]] = []
        assigns: list[Token] = []
        uni_params: list[str] = []
        uni_names: set[str] = set()
        caller_u = Uniformity(self, ctx.uni)
        for p, a in zip(f.params, args):
            p = self._subst(p, sub)
            d = parse_decl(p + [T(";")], self.type_names | {x[1] for x in f.tparams})
            if d is None or len(d.decls) != 1:
                raise Unsupported(f"parameter of '{name}'")
            dc = d.decls[0]
            if any(x.text == "&" for x in dc.prefix) or dc.dims:
                raise Unsupported(f"reference or array parameter of '{name}'")
            arr = self.uid("a") + "_" + dc.name
            ty = " ".join(x.text for x in d.base + dc.prefix)
            if "const" in d.quals and any(x.text == "*" for x in dc.prefix):
                ty = "const " + ty
            if caller_u.expr(a):
                out += [T(f"{ty} {arr} = (")] + a + [T(");")]
                uni_params.append(f"{ty} {dc.name} = {arr}; (void){dc.name};")
                uni_names.add(dc.name)
                continue
            out.append(T(f"{ty} {arr}[PMN_TG];"))
            pframe.append((dc.name, arr))
            assigns += [T(f"{arr}[pmn_l] = (")] + a + [T(");")]
        if assigns:
            self.lane_loop(ctx, ctx.mask, assigns, like, out)
        mask_is_ctx = ctx.mask == ctx.masks[0]
        fm = self.uid("mf")
        out.append(T(f"{{ pmn::grp::mask_t {fm}[PMN_TG]; pmn::grp::copy({fm}, {ctx.mask}, PMN_TG);"))
        out += [T(u) for u in uni_params]
        fctx = Ctx([fm], [pframe], [], ret, void, [], ctx.depth + 1)
        body = self._subst(f.body, sub)
        stmts = Parser(body, self.is_sync_call).block(0, len(body))
        # the caller's scalars stay in C++ scope inside the inlined body: a name the helper uses
        # without declaring it (a global) must not be one of them
        declared = {n for n, _ in pframe} | uni_names
        _declared_names(stmts, self.type_names, declared)
        caller = set(ctx.uni) | {n for _, n, _ in ctx.lane_builtins} | {n for n, _ in ctx.visible()}
        clash = (_ids(body) - declared) & caller
        if clash:
            raise Unsupported(f"helper '{name}' uses '{sorted(clash)[0]}', also a local of the caller")
        fctx.uni = Uniformity(self, uni_names).run(stmts)
        fctx.arrays, fctx.no_copy = _copy_info(stmts, body, self.type_names)
        fctx.full = ctx.full and ctx.uniform_ctx and mask_is_ctx and not _returns(stmts)
        self.stmts(stmts, fctx, out)
        out.append(T("}"))
        if whole:
            out.append(T("}"))
            return None
        # the rest of the caller's statement, inside the block (the result array lives here)
        rest = toks[:start] + [T(f"{ret}[pmn_l]")] + toks[pc + 1 :]
        self._continue(rest, St("simple", rest), ctx, out, [])
        out.append(T("}"))
        return None

    @staticmethod
    def _subst(toks: list[Token], sub: dict[str, list[Token]]) -> list[Token]:
        if not sub:
            return toks
        out: list[Token] = []
        for k, t in enumerate(toks):
            if t.kind == "id" and t.text in sub and not (k and toks[k - 1].text in (".", "->", "::")):
                out += [Token("id", x.text, t.file, t.line, True) for x in sub[t.text]]
            else:
                out.append(t)
        return out

    def _deduce_decl(self, f: Func) -> None:
        if f.name in self.deduce:
            return
        o = f.origin
        T = lambda s: self.tk(s, o)  # noqa: E731
        members = []
        for idx, (kind, tn, decl) in enumerate(f.tparams):
            if kind == "type":
                members.append(f"using pmn_t{idx} = {tn};")
            else:
                ty = " ".join(x.text for x in decl[:-1])
                members.append(f"static constexpr {ty} pmn_t{idx} = {tn};")
        ret = " ".join(x.text for x in f.ret)
        names = ", ".join(tn for _, tn, _ in f.tparams)
        toks = list(f.theader) + [T(f"struct pmn_ta_{f.name} {{ using pmn_ret = {ret}; "
                                    + " ".join(members) + " };")]
        toks += list(f.theader) + [T(f"pmn_ta_{f.name}<{names}> pmn_deduce_{f.name}(")]
        for i, p in enumerate(f.params):
            toks += ([T(",")] if i else []) + p
        toks.append(T(");"))
        self.deduce[f.name] = toks


def collect_type_names(toks: list[Token]) -> set[str]:
    """struct/class/typedef/using names declared anywhere in the translation."""
    names: set[str] = set()
    for k, t in enumerate(toks):
        if t.kind != "id":
            continue
        if t.text in ("struct", "class", "union", "enum") and k + 1 < len(toks) \
                and toks[k + 1].kind == "id":
            names.add(toks[k + 1].text)
        elif t.text == "using" and k + 2 < len(toks) and toks[k + 2].text == "=":
            names.add(toks[k + 1].text)
        elif t.text == "typedef":
            j = k
            while j < len(toks) and toks[j].text != ";":
                j += 1
            if toks[j - 1].kind == "id":
                names.add(toks[j - 1].text)
        elif t.text in ("typename", "class") and k + 1 < len(toks) and toks[k + 1].kind == "id":
            names.add(toks[k + 1].text)  # template type parameters
    return names


def build(toks: list[Token], kernels: dict, sync_funcs: set[str]) -> list[Token]:
    """Work-item-loop functions for the fiber kernels of one translation; sets each kernel's
    `lockstep` (True) or `fiber_reason`. Returns tokens to append after the translation."""
    impls = {k.impl_name for k in kernels.values() if k.needs_fibers}
    if not impls:
        return []
    ls = Lockstep(toks, sync_funcs - impls, collect_type_names(toks))
    funcs = find_functions(toks, impls)
    out: list[Token] = []
    done: dict[str, str | None] = {}
    for k in kernels.values():
        if not k.needs_fibers:
            continue
        if k.impl_name not in done:
            f = funcs.get(k.impl_name)
            if f is None:
                done[k.impl_name] = "kernel definition not found"
            else:
                part: list[Token] = []
                try:
                    ls.build_kernel(f, k, part)
                    done[k.impl_name] = None
                    out += part
                except Unsupported as e:
                    done[k.impl_name] = str(e)
        reason = done[k.impl_name]
        if reason is None:
            k.lockstep = True
        else:
            k.fiber_reason = reason
    pre: list[Token] = []
    for d in ls.deduce.values():
        pre += d
    return pre + out
