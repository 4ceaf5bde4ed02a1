"""The Metal check's reader: a `.metal` source as Apple's compiler receives it, and its top-level
structure (functions with bodies, the kernels a library exports, file-scope variables, the names
usable in constant expressions).

Why apart from the rules (`metal_check.py`): the threadgroup-memory and argument-layout
evaluation (`metal_memory.py`) and the metal backend read the same structure. Token-level, exact
for the patterns it names, not a full C++ parser.
"""
from __future__ import annotations

from dataclasses import dataclass

from .preprocess import METAL_CONSTANTS, Preprocessor, Token
from .tokens import match_angle, match_bracket, split_commas

METAL_VERSION = 230  # MTLLanguageVersion.version2_3, what metalcompute 0.2.9 compiles with


# lenient: the check reads on past an unbalanced source (the front end reports it)
def _match(toks: list[Token], i: int) -> int:
    return match_bracket(toks, i, strict=False)


def _match_angle(toks: list[Token], i: int) -> int:
    return match_angle(toks, i, strict=False)


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
                for p in split_commas(head[2:e]):
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
                for part in split_commas(rest[j + 2 : e - 1]):
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
                    targs = split_commas(core[k + 2 : e])
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
            for p in split_commas(toks[i + 2 : e]):
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
                for p in split_commas(toks[j + 1 : e]):
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

