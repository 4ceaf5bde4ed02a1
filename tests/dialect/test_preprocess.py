"""The front end's C preprocessor on its own (pymetalnn.runtime.preprocess)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymetalnn import MSLError
from pymetalnn.runtime.preprocess import Preprocessor


def pp(tmp_path: Path, src: str, defines: dict | None = None, name: str = "t.metal"):
    path = tmp_path / name
    path.write_text(src)
    return Preprocessor([], defines).run_file(str(path))


def text(toks) -> str:
    return " ".join(t.text for t in toks)


def test_if_elif_else_with_defined(tmp_path: Path) -> None:
    src = """
#define A 1
#if defined(B)
wrong1
#elif defined A && !defined(C)
right1
#else
wrong2
#endif
#ifdef A
right2
#endif
#ifndef A
wrong3
#else
right3
#endif
#if 0
#if 1
wrong4
#else
wrong5
#endif
#elif 1
right4
#endif
"""
    assert text(pp(tmp_path, src)) == "right1 right2 right3 right4"


# #if conditions that hold with N = 6, M = (N * 2 + 1): C's integer arithmetic, operators and
# literals (hex, octal, suffixed), truncating division, and an undefined name read as 0
IF_TRUE = [
    "M == 13 && (N / 4) == 1 && (N % 4) == 2 && (1 << 3) == 8 && -N < 0 && (N > 5 ? 1 : 0)",
    "(0x10 | 3) == 19 && (7 & ~2) == 5 && (5 ^ 1) == 4 && !0 && 010 == 8 && 3u == 3",
    "UNDEFINED_NAME == 0",
    "-7 / 2 == -3 && -7 % 2 == -1",
]


@pytest.mark.parametrize("cond", IF_TRUE)
def test_if_arithmetic(tmp_path: Path, cond: str) -> None:
    src = f"#define N 6\n#define M (N * 2 + 1)\n#if {cond}\nyes\n#endif\n#if !({cond})\nno\n#endif\n"
    assert text(pp(tmp_path, src)) == "yes"


def test_nested_macros_and_rescanning(tmp_path: Path) -> None:
    src = """
#define ONE 1
#define TWO (ONE + ONE)
#define ADD(a, b) ((a) + (b))
#define TWICE(x) ADD(x, x)
#define SELF SELF + 1
#define CALL(f, x) f(x)
int v = TWICE(TWO);
int s = SELF;
int c = CALL(TWICE, 3);
"""
    assert text(pp(tmp_path, src)) == (
        "int v = ( ( ( 1 + 1 ) ) + ( ( 1 + 1 ) ) ) ; int s = SELF + 1 ; "
        "int c = ( ( 3 ) + ( 3 ) ) ;")


def test_stringize_and_paste(tmp_path: Path) -> None:
    src = """
#define STR(x) #x
#define XSTR(x) STR(x)
#define VALUE 42
#define CAT(a, b) a ## b
#define KNAME(op, T) kernel_ ## op ## _ ## T
const char* s1 = STR(hello world);
const char* s2 = XSTR(VALUE);
int CAT(foo, 7) = CAT(0x, 1F);
void KNAME(add, float)();
"""
    assert text(pp(tmp_path, src)) == (
        'const char * s1 = "hello world" ; const char * s2 = "42" ; int foo7 = 0x1F ; '
        "void kernel_add_float ( ) ;")


def test_variadic_macros(tmp_path: Path) -> None:
    src = """
#define FIRST(a, ...) a
#define REST(a, ...) __VA_ARGS__
#define CALLV(f, ...) f(__VA_ARGS__)
int x = FIRST(1, 2, 3);
int y[] = {REST(1, 2, 3)};
int z = CALLV(max, 4, 5);
int w = CALLV(g);
"""
    assert text(pp(tmp_path, src)) == (
        "int x = 1 ; int y [ ] = { 2 , 3 } ; int z = max ( 4 , 5 ) ; int w = g ( ) ;")


def test_macro_output_keeps_invocation_line(tmp_path: Path) -> None:
    src = "#define PAIR(a, b) a b\n\n\nPAIR(first,\n  second)\nthird\n"
    toks = pp(tmp_path, src)
    assert [(t.text, t.line) for t in toks] == [("first", 4), ("second", 4), ("third", 6)]


def test_defines_from_python(tmp_path: Path) -> None:
    src = """
#if FLAG
acc_t_is ACC_T
#endif
#if LEVEL >= 2
level_high
#endif
"""
    assert text(pp(tmp_path, src, {"FLAG": True, "ACC_T": "half", "LEVEL": 3})) == \
        "acc_t_is half level_high"
    assert text(pp(tmp_path, src, {"LEVEL": 1})) == ""


def test_undef_line_file_and_metal_constants(tmp_path: Path) -> None:
    src = "#define A 1\n#undef A\n#ifdef A\nwrong\n#endif\nint l = __LINE__;\nx __FILE__\n" \
          "#if __METAL_VERSION__ >= 200 && defined(__PYMETALNN__)\nmetal\n#endif\n"
    assert text(pp(tmp_path, src, name="f.metal")) == 'int l = 6 ; x "f.metal" metal'


def test_include_inlines_and_remembers_origin(tmp_path: Path) -> None:
    (tmp_path / "inc.h").write_text("#pragma once\n#define FROM_HEADER 5\nint h = FROM_HEADER;\n")
    src = '#include <metal_stdlib>\n#include "inc.h"\n#include "inc.h"\nint m = FROM_HEADER;\n'
    toks = pp(tmp_path, src)
    assert text(toks) == "int h = 5 ; int m = 5 ;"
    assert Path(toks[0].file).name == "inc.h" and toks[0].line == 3
    assert Path(toks[-1].file).name == "t.metal" and toks[-1].line == 4


def test_include_guard(tmp_path: Path) -> None:
    (tmp_path / "g.h").write_text("#ifndef G_H\n#define G_H\nint g;\n#endif\n")
    assert text(pp(tmp_path, '#include "g.h"\n#include "g.h"\n')) == "int g ;"


def test_error_directive_reports_line(tmp_path: Path) -> None:
    src = "\n\n#if 1\n#error unsupported configuration\n#endif\n"
    with pytest.raises(MSLError) as ei:
        pp(tmp_path, src, name="err.metal")
    assert ei.value.line == 4
    assert str(ei.value).startswith("err.metal:4: error: #error")
    assert "unsupported" in str(ei.value)


def test_error_directive_skipped_when_inactive(tmp_path: Path) -> None:
    assert text(pp(tmp_path, "#if 0\n#error no\n#endif\nok\n")) == "ok"


@pytest.mark.parametrize("src,line", [
    ("\n\n#endif\n", 3),                      # #endif without #if
    ("\n#else\n", 2),
    ("#define F(a, b) a\nF(1)\n", 2),        # wrong argument count
    ("\n#if 1 +\n#endif\n", 2),               # bad expression
    ("\n\n#frobnicate\n", 3),                 # unknown directive
])
def test_preprocessor_errors(tmp_path: Path, src: str, line: int) -> None:
    with pytest.raises(MSLError) as ei:
        pp(tmp_path, src)
    assert ei.value.line == line, str(ei.value)


def test_unterminated_if(tmp_path: Path) -> None:
    with pytest.raises(MSLError) as ei:
        pp(tmp_path, "\n#if 1\nx\n", name="unterminated.metal")
    assert str(ei.value).startswith("unterminated.metal:2:")  # the line of the #if
    assert "unterminated #if" in str(ei.value)


def _c_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


_OPS = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": _c_div, "%": lambda a, b: a - _c_div(a, b) * b,
    "<": lambda a, b: int(a < b), "==": lambda a, b: int(a == b), "&": lambda a, b: a & b,
    "|": lambda a, b: a | b, "^": lambda a, b: a ^ b,
}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(a=st.integers(-1000, 1000), b=st.integers(-1000, 1000).filter(bool),
       c=st.integers(-50, 50), op1=st.sampled_from(sorted(_OPS)), op2=st.sampled_from(sorted(_OPS)))
def test_if_expression_matches_c(tmp_path_factory, a, b, c, op1, op2) -> None:
    if op2 in "/%" and c == 0:
        c = 3
    value = _OPS[op2](_OPS[op1](a, b), c)
    tmp = tmp_path_factory.mktemp("pp")
    src = f"#define A ({a})\n#define B ({b})\n#if ((A {op1} B) {op2} ({c})) == ({value})\nok\n#endif\n"
    assert text(pp(tmp, src)) == "ok", src
