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

Modules: lockstep_parse.py (statements, declarations, functions of the token stream),
lockstep_uniform.py (uniform values and the other analyses, the transform's context),
lockstep_inline.py (helpers that synchronize, inlined), this file (the transform and `build`).
"""
from __future__ import annotations

from .lockstep_inline import InlineHelpers
from .lockstep_parse import (
    BARRIER,
    LANE_BUILTINS,
    OMP_SIMD,
    RESULT_READERS,
    SIMD_NAMES,
    UNIFORM_BUILTINS,
    Decl,
    Func,
    Parser,
    St,
    Token,
    Unsupported,
    _ids,
    _match,
    _match_angle,
    _split_call_args,
    _split_top,
    _words,
    collect_type_names,
    find_functions,
    parse_decl,
    to_tokens,
)
from .lockstep_uniform import ASSIGN_OPS, Ctx, Uniformity, _copy_info, _maybe_written, _returns

# the prelude's functions (not in the translation's tokens) that write an argument through a
# reference to non-const: which arguments
PRELUDE_REF_PARAMS: dict[str, set[int]] = {
    "simdgroup_load": {0}, "simdgroup_store": set(), "simdgroup_multiply_accumulate": {0},
    "simdgroup_multiply": {0}, "simdgroup_load_tile": set(),
    "simdgroup_multiply_accumulate_tile": set(), "ldsm_ok": {2},
}


class Lockstep(InlineHelpers):
    """Builds the work-item-loop version of the kernels of one translation unit."""

    def __init__(self, toks: list[Token], sync_funcs: set[str], type_names: set[str]):
        self.toks = toks
        self.n = 0
        self.helpers = find_functions(toks, sync_funcs)
        self.sync_funcs = sync_funcs
        self.type_names = type_names
        self.deduce: dict[str, list[Token]] = {}  # helper -> declarations emitted before use
        self._ref_params: dict[str, set[int] | None] = {}

    def writes_arg(self, fname: str, idx: int) -> bool:
        """Whether a call of `fname` may write its argument number `idx` (a parameter that is a
        reference to non-const in some overload); True for a function not defined in this
        translation (a struct's member, the prelude), whose parameters are not known."""
        if fname not in self._ref_params:
            overloads = find_functions(self.toks, {fname}).get(fname)
            refs: set[int] | None = PRELUDE_REF_PARAMS.get(fname)
            if overloads:
                refs = set()
                for f in overloads:
                    for i, p in enumerate(f.params):
                        amp = [j for j, x in enumerate(p) if x.text in ("&", "&&")]
                        if amp and not any(x.text == "const" for x in p[:amp[0]]):
                            refs.add(i)
            self._ref_params[fname] = refs
        refs = self._ref_params[fname]
        return refs is None or idx in refs

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
        if st.kind == "simple" and st.toks and (
                st.toks[0].text in ("typedef", "using", "static_assert", "constexpr",
                                    "PMN_THREADGROUP") or
                [x.text for x in st.toks[:2]] == ["static", "constexpr"]):
            return True  # compile-time, or the group's memory: in the function's scope
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


def build(toks: list[Token], kernels: dict, sync_funcs: set[str]) -> list[Token]:
    """Work-item-loop functions for the fiber kernels of one translation; sets each kernel's
    `lockstep` (True) or `fiber_reason`. Returns tokens to append after the translation."""
    impls = {k.impl_name for k in kernels.values() if k.needs_fibers}
    if not impls:
        return []
    ls = Lockstep(toks, sync_funcs - impls, collect_type_names(toks))
    funcs = {k: v[0] for k, v in find_functions(toks, impls).items() if len(v) == 1}
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
