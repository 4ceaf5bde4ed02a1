"""Lexer and C preprocessor for the MSL front end.

Why our own: the translator must see the code after macro expansion (MLX-style kernels generate
their template instantiations with macros), and every token must remember the `.metal` file and
line it came from so that errors, ours and the C++ compilers', point at the user's source. The
system preprocessor is not available everywhere (NVRTC has none we can call alone, and Windows
users may lack one), so this is a compact, standard-conforming-enough one: object- and
function-like macros with `#`, `##` and `__VA_ARGS__`, hide sets for rescanning, conditionals
with a full constant-expression evaluator, `#include "..."`, `#pragma` passthrough.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import MSLError

# --- lexer ----------------------------------------------------------------------------------

_PUNCT = sorted(
    """>>= <<= ... -> ++ -- << >> <= >= == != && || += -= *= /= %= &= |= ^= :: ##
    { } [ ] ( ) ; : , . ? ~ ! + - * / % ^ & | = < > #""".split(),
    key=len,
    reverse=True,
)
_TOKEN_RE = re.compile(
    r"""
    (?P<ws>[ \t\r\f\v]+)
  | (?P<nl>\n)
  | (?P<lc>//[^\n]*)
  | (?P<bc>/\*.*?\*/)
  | (?P<num>\.?[0-9](?:[eEpP][+-]|[0-9a-zA-Z_.])*)
  | (?P<id>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<str>"(?:\\.|[^"\\\n])*")
  | (?P<chr>'(?:\\.|[^'\\\n])+')
  | (?P<punct>"""
    + "|".join(re.escape(p) for p in _PUNCT)
    + r""")
  | (?P<bad>.)
    """,
    re.S | re.X,
)


@dataclass
class Token:
    kind: str  # id num str chr punct nl pragma
    text: str
    file: str
    line: int
    space: bool = False  # preceded by whitespace
    bol: bool = False  # first token on its line (for directives)
    hide: frozenset = field(default_factory=frozenset)

    def at(self, file: str, line: int, hide: frozenset | None = None) -> Token:
        return Token(self.kind, self.text, file, line, self.space, False,
                     self.hide if hide is None else hide)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<{self.kind} {self.text!r} {os.path.basename(self.file)}:{self.line}>"


def tokenize(text: str, file: str) -> list[Token]:
    """Split source text into tokens, keeping newlines (directives end at them)."""
    text = text.replace("\\\r\n", "").replace("\\\n", "")  # line splices; lines may shift by one
    toks: list[Token] = []
    line = 1
    space = False
    bol = True
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        s = m.group()
        if kind == "ws" or kind == "lc":
            space = True
            continue
        if kind == "bc":
            line += s.count("\n")
            space = True
            continue
        if kind == "nl":
            toks.append(Token("nl", "\n", file, line))
            line += 1
            space = False
            bol = True
            continue
        if kind == "bad":
            raise MSLError(file, line, f"unexpected character {s!r}")
        toks.append(Token(kind, s, file, line, space, bol))
        space = False
        bol = False
    toks.append(Token("nl", "\n", file, line))
    return toks


# --- preprocessor ---------------------------------------------------------------------------


@dataclass
class Macro:
    name: str
    params: list[str] | None  # None: object-like
    variadic: bool
    body: list[Token]


# metal_stdlib's constants, as macros so file-scope initializers can use them
METAL_CONSTANTS = {
    "INFINITY": "PMN_INFINITY", "NAN": "PMN_NAN", "MAXFLOAT": "3.402823466e+38f",
    "FLT_MAX": "3.402823466e+38f", "FLT_MIN": "1.175494351e-38f", "FLT_EPSILON": "1.192092896e-07f",
    "HALF_MAX": "pmn_half(65504.0f)", "HALF_MIN": "pmn_half(6.103515625e-05f)",
    "HALF_EPSILON": "pmn_half(0.0009765625f)",
    "M_PI_F": "3.14159265358979323846f", "M_PI_2_F": "1.57079632679489661923f",
    "M_E_F": "2.71828182845904523536f", "M_LN2_F": "0.693147180559945309417f",
    "M_LN10_F": "2.30258509299404568402f", "M_LOG2E_F": "1.44269504088896340736f",
    "M_LOG10E_F": "0.434294481903251827651f", "M_SQRT2_F": "1.41421356237309504880f",
    "M_SQRT1_2_F": "0.707106781186547524401f", "M_1_PI_F": "0.318309886183790671538f",
    "M_2_PI_F": "0.636619772367581343076f", "M_2_SQRTPI_F": "1.12837916709551257390f",
    "INT_MAX": "2147483647", "INT_MIN": "(-2147483647 - 1)", "UINT_MAX": "4294967295u",
    "SHRT_MAX": "32767", "SHRT_MIN": "(-32768)", "USHRT_MAX": "65535", "CHAR_MAX": "127",
    "CHAR_MIN": "(-128)", "UCHAR_MAX": "255",
    # <metal_stdlib>'s always-inlined helper: the front end makes it PMN_INLINE on cpu
    "METAL_FUNC": "PMN_METAL_FUNC", "METAL_INTERNAL": "",
}


def _define_from_text(name: str, value: str) -> Macro:
    body = [t for t in tokenize(str(value), "<define>") if t.kind != "nl"]
    return Macro(name, None, False, body)


class Preprocessor:
    """Expands one `.metal` file (and its includes) into a flat token list without newlines."""

    def __init__(self, include_dirs: list[str], defines: dict[str, object] | None = None):
        self.include_dirs = include_dirs
        self.macros: dict[str, Macro] = {}
        self.once: set[str] = set()
        self.files: list[str] = []  # every file read, for cache keys
        self.macros["__METAL_VERSION__"] = _define_from_text("__METAL_VERSION__", "300")
        self.macros["__PYMETALNN__"] = _define_from_text("__PYMETALNN__", "1")
        for k, v in METAL_CONSTANTS.items():
            self.macros[k] = _define_from_text(k, v)
        for k, v in (defines or {}).items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", k):
                raise ValueError(f"defines: {k!r} is not a macro name")
            self.macros[k] = _define_from_text(k, "1" if v is True else str(v))

    # ---- files
    def run_file(self, path: str) -> list[Token]:
        path = os.path.abspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.files.append(path)
        return self._process(tokenize(text, path), depth=0)

    def _resolve_include(self, name: str, cur_file: str, line: int) -> str:
        for d in [os.path.dirname(cur_file), *self.include_dirs]:
            p = os.path.join(d, name)
            if os.path.isfile(p):
                return os.path.abspath(p)
        raise MSLError(cur_file, line, f'#include "{name}": file not found')

    # ---- main loop
    def _process(self, toks: list[Token], depth: int) -> list[Token]:
        if depth > 64:
            raise MSLError(toks[0].file, toks[0].line, "#include nested too deeply")
        out: list[Token] = []
        # conditional stack entries: [active_now, some_branch_taken, parent_active]; opened_at
        # keeps each #if's token so an unterminated one is reported where it starts
        cond: list[list[bool]] = []
        opened_at: list[Token] = []
        active = True
        i = 0
        n = len(toks)
        pending: list[Token] = []  # ordinary tokens awaiting macro expansion
        remap: tuple[str, int, int, str] | None = None  # the last #line: (file, line, N, name)

        def flush() -> None:
            if pending:
                out.extend(self._expand(pending))
                pending.clear()

        while i < n:
            t = toks[i]
            if t.kind == "punct" and t.text == "#" and t.bol:
                j = i + 1
                while toks[j].kind != "nl":
                    j += 1
                line = toks[i + 1 : j]
                i = j + 1
                flush()
                if not line:
                    continue
                d = line[0].text
                args = line[1:]
                if d in ("if", "ifdef", "ifndef"):
                    if active:
                        if d == "if":
                            val = self._eval_if(args, t)
                        else:
                            if not args or args[0].kind != "id":
                                raise MSLError(t.file, t.line, f"#{d} needs a macro name")
                            val = (args[0].text in self.macros) == (d == "ifdef")
                    else:
                        val = False
                    cond.append([val, val, active])
                    opened_at.append(t)
                    active = active and val
                elif d in ("elif", "else"):
                    if not cond:
                        raise MSLError(t.file, t.line, f"#{d} without #if")
                    top = cond[-1]
                    if top[1] or not top[2]:
                        top[0] = False
                    else:
                        top[0] = True if d == "else" else self._eval_if(args, t)
                        top[1] = top[0]
                    active = top[2] and top[0]
                elif d == "endif":
                    if not cond:
                        raise MSLError(t.file, t.line, "#endif without #if")
                    active = cond.pop()[2]
                    opened_at.pop()
                elif not active:
                    pass
                elif d == "define":
                    self._define(args, t)
                elif d == "undef":
                    if args:
                        self.macros.pop(args[0].text, None)
                elif d == "include":
                    out.extend(self._include(args, t, depth))
                elif d == "pragma":
                    if args and args[0].text == "once":
                        self.once.add(t.file)
                    else:
                        body = " ".join(a.text for a in args)
                        out.append(Token("pragma", body, t.file, t.line))
                elif d == "error":
                    raise MSLError(t.file, t.line, "#error " + " ".join(a.text for a in args))
                elif d == "line":
                    # '#line N "file"' (the metal backend's inlined sources carry them): later
                    # tokens of this text count from N, in "file"
                    if not args or args[0].kind != "num":
                        raise MSLError(t.file, t.line, "#line needs a line number")
                    fname = args[1].text[1:-1] if len(args) > 1 and args[1].kind == "str" else (
                        remap[3] if remap and remap[0] == t.file else t.file)
                    remap = (t.file, t.line, int(args[0].text), fname)
                elif d == "warning":
                    pass
                else:
                    raise MSLError(t.file, t.line, f"unsupported preprocessor directive #{d}")
                continue
            if active and t.kind != "nl":
                if remap is not None and t.file == remap[0]:
                    t = t.at(remap[3], remap[2] + t.line - remap[1] - 1)
                pending.append(t)  # expanded in one piece: macro calls may span lines
            i += 1
        flush()
        if cond:
            raise MSLError(opened_at[-1].file, opened_at[-1].line, "unterminated #if")
        return out

    def _include(self, args: list[Token], t: Token, depth: int) -> list[Token]:
        if args and args[0].kind == "str":
            name = args[0].text[1:-1]
        elif args and args[0].text == "<":
            name = "".join(a.text for a in args[1:-1])
            if name.startswith("metal_") or name in ("simd/simd.h",):
                return []  # Metal's own headers: the prelude provides their content
            raise MSLError(t.file, t.line, f"#include <{name}>: only Metal's own headers and "
                           'local #include "file" are supported')
        else:
            raise MSLError(t.file, t.line, "malformed #include")
        path = self._resolve_include(name, t.file, t.line)
        if path in self.once:
            return []
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.files.append(path)
        return self._process(tokenize(text, path), depth + 1)

    def _define(self, args: list[Token], t: Token) -> None:
        if not args or args[0].kind != "id":
            raise MSLError(t.file, t.line, "#define needs a macro name")
        name = args[0].text
        if len(args) > 1 and args[1].text == "(" and not args[1].space:
            params: list[str] = []
            variadic = False
            k = 2
            while args[k].text != ")":
                a = args[k]
                if a.text == "...":
                    variadic = True
                    params.append("__VA_ARGS__")
                elif a.kind == "id":
                    params.append(a.text)
                elif a.text != ",":
                    raise MSLError(t.file, t.line, f"bad macro parameter list for {name}")
                k += 1
            self.macros[name] = Macro(name, params, variadic, args[k + 1 :])
        else:
            self.macros[name] = Macro(name, None, False, args[1:])

    # ---- expansion
    def _expand(self, toks: list[Token]) -> list[Token]:
        out: list[Token] = []
        stack = list(reversed(toks))
        while stack:
            t = stack.pop()
            if t.kind == "nl":
                continue
            m = self.macros.get(t.text) if t.kind == "id" else None
            if m is None or t.text in t.hide:
                if t.kind == "id" and t.text == "__LINE__":
                    t = Token("num", str(t.line), t.file, t.line, t.space)
                elif t.kind == "id" and t.text == "__FILE__":
                    t = Token("str", '"' + os.path.basename(t.file) + '"', t.file, t.line, t.space)
                out.append(t)
                continue
            if m.params is None:
                repl = self._subst(m, [], t.hide | {m.name}, t)
                stack.extend(reversed(repl))
                continue
            # function-like: needs a '(' next (skipping newlines)
            k = len(stack) - 1
            while k >= 0 and stack[k].kind == "nl":
                k -= 1
            if k < 0 or stack[k].text != "(":
                out.append(t)
                continue
            del stack[k:]
            args: list[list[Token]] = [[]]
            depth = 0
            while True:
                if not stack:
                    raise MSLError(t.file, t.line, f"unterminated call of macro {m.name}")
                a = stack.pop()
                if a.kind == "nl":
                    continue
                if a.text == "(":
                    depth += 1
                elif a.text == ")":
                    if depth == 0:
                        rparen = a
                        break
                    depth -= 1
                elif a.text == "," and depth == 0 and not (
                    m.variadic and len(args) >= len(m.params)
                ):
                    args.append([])
                    continue
                args[-1].append(a)
            if len(args) == 1 and not args[0] and len(m.params) == 0:
                args = []
            if len(args) != len(m.params):
                if m.variadic and len(args) == len(m.params) - 1:
                    args.append([])
                else:
                    raise MSLError(t.file, t.line, f"macro {m.name} takes {len(m.params)} "
                                   f"arguments, {len(args)} given")
            hide = (t.hide & rparen.hide) | {m.name}
            repl = self._subst(m, args, hide, t)
            stack.extend(reversed(repl))
        return out

    def _subst(self, m: Macro, args: list[list[Token]], hide: frozenset, at: Token) -> list[Token]:
        params = {p: i for i, p in enumerate(m.params or [])}
        body = m.body
        out: list[Token] = []
        i = 0
        while i < len(body):
            b = body[i]
            if b.text == "#" and m.params is not None and i + 1 < len(body) \
                    and body[i + 1].text in params:
                arg = args[params[body[i + 1].text]]
                s = " ".join(a.text for a in arg).replace("\\", "\\\\").replace('"', '\\"')
                out.append(Token("str", f'"{s}"', at.file, at.line, b.space, hide=hide))
                i += 2
                continue
            if b.text == "##" and out and i + 1 < len(body):
                nxt = body[i + 1]
                rhs = list(args[params[nxt.text]]) if nxt.text in params else [nxt]
                lhs = out.pop()
                if rhs:
                    pasted = tokenize(lhs.text + rhs[0].text, at.file)
                    pasted = [p for p in pasted if p.kind != "nl"]
                    if len(pasted) != 1:
                        raise MSLError(at.file, at.line,
                                       f"## of {lhs.text!r} and {rhs[0].text!r} is not a token")
                    out.append(Token(pasted[0].kind, pasted[0].text, at.file, at.line, lhs.space,
                                     hide=hide))
                    out.extend(r.at(at.file, at.line, hide | r.hide) for r in rhs[1:])
                else:
                    out.append(lhs)
                i += 2
                continue
            if b.text in params:
                arg = args[params[b.text]]
                next_is_paste = i + 1 < len(body) and body[i + 1].text == "##"
                exp = arg if next_is_paste else self._expand(list(arg))
                first = True
                for a in exp:
                    nt = a.at(at.file, at.line, a.hide | hide if not next_is_paste else hide)
                    if first:
                        nt.space = b.space
                        first = False
                    out.append(nt)
                i += 1
                continue
            out.append(Token(b.kind, b.text, at.file, at.line, b.space, hide=hide | b.hide))
            i += 1
        if out:
            out[0].space = at.space
        return out

    # ---- #if expressions
    def _eval_if(self, args: list[Token], t: Token) -> bool:
        toks: list[Token] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a.text == "defined":
                if i + 1 < len(args) and args[i + 1].text == "(":
                    name = args[i + 2].text
                    i += 4
                else:
                    name = args[i + 1].text
                    i += 2
                toks.append(Token("num", "1" if name in self.macros else "0", t.file, t.line))
                continue
            toks.append(a)
            i += 1
        toks = self._expand(toks)
        vals = []
        for a in toks:
            if a.kind == "id":
                vals.append(("num", 1 if a.text == "true" else 0))
            elif a.kind == "num":
                s = a.text.rstrip("uUlL")
                try:
                    vals.append(("num", int(s, 0) if not re.fullmatch(r"0[0-7]+", s) else int(s, 8)))
                except ValueError:
                    raise MSLError(t.file, t.line, f"#if: bad number {a.text}") from None
            elif a.kind == "chr":
                vals.append(("num", ord(a.text[1])))
            else:
                vals.append(("op", a.text))
        try:
            v, pos = _ExprParser(vals).parse(0)
            if pos != len(vals):
                raise ValueError
        except (ValueError, IndexError, ZeroDivisionError):
            raise MSLError(t.file, t.line, "#if: cannot evaluate expression "
                           + " ".join(a.text for a in args)) from None
        return v != 0


class _ExprParser:
    """Precedence climbing over (kind, value) pairs for #if expressions."""

    _BIN = {
        "||": 1, "&&": 2, "|": 3, "^": 4, "&": 5, "==": 6, "!=": 6,
        "<": 7, ">": 7, "<=": 7, ">=": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10,
    }

    def __init__(self, vals: list[tuple[str, object]]):
        self.v = vals

    def parse(self, pos: int, min_prec: int = 0) -> tuple[int, int]:
        lhs, pos = self.unary(pos)
        while pos < len(self.v):
            kind, op = self.v[pos]
            if kind == "op" and op == "?" and min_prec == 0:
                a, pos = self.parse(pos + 1)
                if self.v[pos] != ("op", ":"):
                    raise ValueError
                b, pos = self.parse(pos + 1)
                lhs = a if lhs else b
                continue
            if kind != "op" or op not in self._BIN or self._BIN[op] < min_prec:
                break
            prec = self._BIN[op]
            rhs, pos = self.parse(pos + 1, prec + 1)
            lhs = _apply(op, lhs, rhs)
        return lhs, pos

    def unary(self, pos: int) -> tuple[int, int]:
        kind, val = self.v[pos]
        if kind == "num":
            return int(val), pos + 1
        if val == "(":
            x, pos = self.parse(pos + 1)
            if self.v[pos] != ("op", ")"):
                raise ValueError
            return x, pos + 1
        if val in ("!", "-", "+", "~"):
            x, pos = self.unary(pos + 1)
            return {"!": int(not x), "-": -x, "+": x, "~": ~x}[val], pos
        raise ValueError


def _apply(op: str, a: int, b: int) -> int:
    if op == "/":
        return int(a / b)
    if op == "%":
        return a - int(a / b) * b
    return int({
        "||": lambda: bool(a or b), "&&": lambda: bool(a and b), "|": lambda: a | b,
        "^": lambda: a ^ b, "&": lambda: a & b, "==": lambda: a == b, "!=": lambda: a != b,
        "<": lambda: a < b, ">": lambda: a > b, "<=": lambda: a <= b, ">=": lambda: a >= b,
        "<<": lambda: a << b, ">>": lambda: a >> b, "+": lambda: a + b, "-": lambda: a - b,
        "*": lambda: a * b,
    }[op]())


def inline_includes(path: str, include_dirs: list[str], seen: set[str] | None = None) -> str:
    """Source for the metal backend: local includes inlined textually, nothing else touched."""
    path = os.path.abspath(path)
    seen = set() if seen is None else seen
    if path in seen:
        return ""
    seen.add(path)
    # '#line' at the start of every file's text and after every include: Apple's compiler then
    # names the .metal file and line in its messages, not a line of the concatenation
    out = [f'#line 1 "{os.path.basename(path)}"']
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for no, line in enumerate(lines, 1):
        m = re.match(r'\s*#\s*include\s*"([^"]+)"', line)
        if m:
            for d in [os.path.dirname(path), *include_dirs]:
                p = os.path.join(d, m.group(1))
                if os.path.isfile(p):
                    out.append(inline_includes(p, include_dirs, seen))
                    out.append(f'#line {no + 1} "{os.path.basename(path)}"')
                    break
            else:
                raise MSLError(path, no, f'#include "{m.group(1)}": file not found')
        elif re.match(r"\s*#\s*pragma\s+once\b", line):
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)
