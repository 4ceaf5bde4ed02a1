"""What Metal will need of a kernel beyond compiling it: the bytes of threadgroup memory each
exported kernel declares (template arguments and constexpr helpers evaluated), and the byte size of
each `constant T&` argument in Metal's struct layout.

Why: Metal fails at pipeline creation past MAX_THREADGROUP_MEMORY, and metalcompute offers no
reflection, so the metal backend checks a value argument's byte count from these layouts before
dispatch as the other backends do. An expression this evaluation cannot read counts as unknown
(0 bytes, or the argument left unchecked), never as a guess.
"""
from __future__ import annotations

from dataclasses import dataclass

from .metal_scan import (
    KernelEntry,
    _Func,
    _match,
    _match_angle,
    _Parser,
    _preprocess,
    _threadgroup_decls,
)
from .preprocess import Token
from .tokens import split_commas

MAX_THREADGROUP_MEMORY = 32768  # bytes; every Apple GPU family's limit


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
                targs = split_commas(toks[pos + 1 : e])
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
    for prm in split_commas(toks[i + 2 : e]):
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
                pattern = split_commas(toks[k + 1 : e])
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
    args = split_commas(toks[2:e])
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
                for part in split_commas(decl[ids[0] + 1 :] if decl[ids[0]].text in _INT_TYPES
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
                parts = split_commas(decl)
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
