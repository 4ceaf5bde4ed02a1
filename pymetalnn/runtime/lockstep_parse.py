"""Work-item loops, front half: the token stream as statements, declarations and functions.

The kernel bodies of the translated C++ token stream are parsed here just deeply enough for the
transform in lockstep.py: statements with their control flow (which of them synchronize),
declarations (type, declarators, initializers) and file-scope function definitions (templates
included). What the parser cannot represent raises Unsupported, and the kernel keeps fibers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import MSLError
from .preprocess import Token
from .tokens import match_angle, match_bracket, match_open, split_commas

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
    """tokens.match_bracket, an unbalanced bracket raising Unsupported (the kernel keeps fibers)."""
    try:
        return match_bracket(toks, i)
    except MSLError as e:
        raise Unsupported(f"unbalanced '{toks[i].text}'") from e


def _match_angle(toks: list[Token], i: int) -> int:
    """The '>' closing toks[i] == '<' if it is a template bracket, -1 where it is a comparison."""
    return match_angle(toks, i, probe=True)


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


_IDENT_RE = re.compile(r"[A-Za-z_]\w*(::[A-Za-z_]\w*)*$")


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
    if t0.kind != "id" or not _IDENT_RE.match(t0.text):
        # not a name: generated code held in one token (the inliner's `pmn_r13[pmn_l]`, whose
        # pmn_ prefix would otherwise pass for a type)
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
    parts = _split_decls(toks[j:])
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


def _split_decls(toks: list[Token]) -> list[list[Token]]:
    """Declarators split at top-level commas; `f<A, B>(...)` in an initializer is one piece."""
    parts: list[list[Token]] = [[]]
    d = 0
    k = 0
    while k < len(toks):
        t = toks[k]
        if t.text == "<" and k and toks[k - 1].kind == "id":
            e = _match_angle(toks, k)
            if e > 0:
                parts[-1].extend(toks[k : e + 1])
                k = e + 1
                continue
        if t.text in ("(", "[", "{"):
            d += 1
        elif t.text in (")", "]", "}"):
            d -= 1
        if t.text == "," and d == 0:
            parts.append([])
        else:
            parts[-1].append(t)
        k += 1
    return parts


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


def find_functions(toks: list[Token], names: set[str]) -> dict[str, list[Func]]:
    """Definitions at file scope of the functions in `names` (every overload, in order)."""
    found: dict[str, list[Func]] = {}
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
                    q = match_open(toks, p, start)
                    q = q if q >= 0 else start - 1
                    name = toks[q - 1].text if q > start else ""
                    if name in names:
                        found.setdefault(name, []).append(
                            _make_func(toks[start:q - 1], toks[q - 1], toks[q + 1:p],
                                       toks[i + 1:e]))
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
    return found


def _make_func(head: list[Token], name_tok: Token, params: list[Token], body: list[Token]) -> Func:
    theader: list[Token] = []
    tparams: list[tuple[str, str, list[Token]]] = []
    h = 0
    if head and head[0].text == "template" and len(head) > 1 and head[1].text == "<":
        e = _match_angle(head, 1)
        theader = head[: e + 1]
        for p in split_commas(head[2:e]):
            eq = [k for k, x in enumerate(p) if x.text == "="]
            decl = p[: eq[0]] if eq else p
            ids = [x for x in decl if x.kind == "id"]
            kind = "type" if decl[0].text in ("typename", "class") else "value"
            tparams.append((kind, ids[-1].text, decl))
        h = e + 1
    ret = [x for x in head[h:] if x.text not in ("inline", "PMN_INLINE", "static", "PMN_KERNEL_IMPL",
                                                 "constexpr", "__attribute__")]
    return Func(name_tok.text, tparams, theader, ret, split_commas(params) if params else [], body,
                name_tok)


# ---- uniformity ------------------------------------------------------------------------------


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

