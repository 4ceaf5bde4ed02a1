"""Keep Metal's SIMD-group semantics through the CUDA compiler's loop transformations.

MSL defines a SIMD-group function over the threads that are active at the call: in a loop whose
trip count differs between lanes, iteration i's call sees exactly the lanes still looping. The
cuda prelude takes the active set from `__activemask()`, i.e. from the lanes that are converged
at that instruction. That is Metal's set as long as each call stays one program point; but NVVM
partially unrolls loops with a runtime trip count (a 4x unrolled body plus a remainder loop), and
then lanes in the same iteration execute different copies of the call and each copy sees only
part of the group: silently wrong sums, maxima and shuffles (found by
tests/dialect/test_lockstep.py's divergent-loop kernel).

So, on cuda, every loop whose body calls a SIMD-group function (directly or through a helper that
does, by the translator's call graph: Translator.simd_funcs) is emitted with `#pragma unroll 1`,
unless the source already has an unroll pragma in front of it: an explicit `#pragma unroll` asks
for full unrolling of a constant trip count, which keeps one copy of the call per iteration and
is therefore safe; partial unrolling is what splits them.
"""
from __future__ import annotations

from .preprocess import Token
from .tokens import match_bracket

LOOP_WORDS = ("for", "while", "do")


def _match(toks: list[Token], i: int) -> int:
    """Index of the token closing the bracket at toks[i]; the last token where there is none
    (the C++ compiler then reports the source)."""
    if i >= len(toks) or toks[i].text not in ("(", "[", "{"):
        return len(toks) - 1
    return match_bracket(toks, i, strict=False)


def _statement_end(toks: list[Token], i: int) -> int:
    """Index of the last token of the statement starting at toks[i]."""
    while i < len(toks) and toks[i].kind == "pragma":
        i += 1
    if i >= len(toks):
        return len(toks) - 1
    t = toks[i].text
    if t == "{":
        return _match(toks, i)
    if t in ("for", "while", "if", "switch") and i + 1 < len(toks) and toks[i + 1].text == "(":
        j = _statement_end(toks, _match(toks, i + 1) + 1)
        if t == "if" and j + 1 < len(toks) and toks[j + 1].text == "else":
            j = _statement_end(toks, j + 2)
        return j
    if t == "do":
        j = _statement_end(toks, i + 1)  # the body, then `while (...) ;`
        j = _match(toks, j + 2)
        return j + 1
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].text in ("(", "[", "{"):
            depth += 1
        elif toks[j].text in (")", "]", "}"):
            depth -= 1
        elif toks[j].text == ";" and depth == 0:
            return j
    return len(toks) - 1


def pin_simd_loops(toks: list[Token], simd_names: set[str]) -> tuple[list[Token], int]:
    """`toks` with `#pragma unroll 1` before every loop whose body mentions one of `simd_names`
    and that has no unroll pragma of its own; also returns how many loops were pinned."""
    marks: set[int] = set()
    for i, t in enumerate(toks):
        if t.kind != "id" or t.text not in LOOP_WORDS:
            continue
        if t.text != "do" and (i + 1 >= len(toks) or toks[i + 1].text != "("):
            continue
        if t.text == "while" and i > 0 and toks[i - 1].text == "}":
            # `} while (...)` closing a do loop: the do handled it (a while statement right after a
            # block would be misread here, which only costs an unroll hint)
            continue
        if i > 0 and toks[i - 1].kind == "pragma" and "unroll" in toks[i - 1].text:
            continue
        end = _statement_end(toks, i)
        if any(x.kind == "id" and x.text in simd_names for x in toks[i:end + 1]):
            marks.add(i)
    if not marks:
        return toks, 0
    out: list[Token] = []
    for i, t in enumerate(toks):
        if i in marks:
            out.append(Token("pragma", "unroll 1", t.file, t.line))
        out.append(t)
    return out, len(marks)

