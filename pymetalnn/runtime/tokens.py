"""Bracket matching and comma splitting over a preprocessed token stream.

Why one module: the MSL front end (`msl.py`, `convergence.py`) and the Metal 2.3 check
(`metal_scan.py`) walk the same token lists. The front end must refuse an unbalanced source with
its file and line (`strict`, the default); the check reads sources the front end may reject and
keeps going, so a lenient match stops at the end of the stream (or, for '<', at the ';' or '{'
that ends the declaration; the front end lets a '{' stand inside template arguments).
"""
from __future__ import annotations

from .errors import MSLError
from .preprocess import Token

_CLOSE = {"(": ")", "[": "]", "{": "}"}


def match_bracket(toks: list[Token], i: int, strict: bool = True) -> int:
    """Index of the bracket closing toks[i] ('(', '[' or '{')."""
    open_, close = toks[i].text, _CLOSE[toks[i].text]
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].kind != "punct":
            continue
        if toks[j].text == open_:
            depth += 1
        elif toks[j].text == close:
            depth -= 1
            if depth == 0:
                return j
    if strict:
        raise MSLError(toks[i].file, toks[i].line, f"unbalanced '{open_}'")
    return len(toks) - 1


_OPENER = {")": "(", "]": "[", "}": "{", ">": "<"}


def match_open(toks: list[Token], i: int, lo: int = 0) -> int:
    """Index of the bracket opening the ')' (or ']', '}', '>') at toks[i], searching backwards
    no further than toks[lo]; -1 if there is none."""
    close = toks[i].text
    open_ = _OPENER[close]
    depth = 0
    for q in range(i, lo - 1, -1):
        if toks[q].text == close:
            depth += 1
        elif toks[q].text == open_:
            depth -= 1
            if depth == 0:
                return q
    return -1


def match_angle(toks: list[Token], i: int, strict: bool = True, probe: bool = False) -> int:
    """Index of the '>' closing the template bracket toks[i] == '<' ('>>' closes two).

    probe: the '<' may be a comparison (the work-item-loop parser asks): -1 where a '(', '[',
    '{' or ';' or the end of the stream comes before a close, in place of the strict or lenient
    answer."""
    depth = 0
    for j in range(i, len(toks)):
        t = toks[j].text
        if t == "<":
            depth += 1
        elif t == ">":
            depth -= 1
        elif t == ">>":
            depth -= 2
        elif probe and t in ("(", "[", "{", ";"):
            return -1
        elif t == ";":
            if strict:
                break
            return j
        elif t == "{" and not strict:
            return j  # a body begins: the check reads on from there
        if depth <= 0 and t in (">", ">>"):
            return j
    if probe:
        return -1
    if strict:
        raise MSLError(toks[i].file, toks[i].line, "unbalanced '<'")
    return len(toks) - 1


def split_commas(toks: list[Token]) -> list[list[Token]]:
    """The comma-separated parts of `toks` at bracket depth 0 (empty parts dropped)."""
    parts: list[list[Token]] = [[]]
    depth = 0
    for t in toks:
        if t.text in ("(", "[", "{", "<"):
            depth += 1
        elif t.text in (")", "]", "}", ">"):
            depth -= 1
        elif t.text == ">>":
            depth -= 2
        if t.text == "," and depth == 0:
            parts.append([])
        else:
            parts[-1].append(t)
    return [p for p in parts if p] if any(parts) else []
