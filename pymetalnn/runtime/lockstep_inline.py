"""Work-item loops: helper functions that synchronize, inlined into the kernel's lanes.

A call of a helper that contains a barrier or a SIMD-group function cannot stay a call inside
a thread loop; its body is inlined at the call site, with its parameters and return value kept
per thread, and its template arguments recovered by overload resolution on a declaration with
the same parameters (emitted once before the kernels).
"""
from __future__ import annotations

from . import lockstep_parse as lp
from .lockstep_parse import Func, Parser, St, Token, Unsupported, parse_decl
from .lockstep_uniform import Ctx, Uniformity, _copy_info, _declared_names, _returns


class InlineHelpers:
    """Mixin of Lockstep: inlining of the helpers that synchronize."""

    def inline_call(self, toks: list[Token], k: int, ctx: Ctx, out: list[Token]) -> list[Token] | None:
        name = toks[k].text
        overloads = self.helpers.get(name)
        if not overloads:
            raise Unsupported(f"helper '{name}' not found")
        f = overloads[0]
        if len(overloads) > 1 and any([x.text for x in g.ret] != ["void"] for g in overloads):
            raise Unsupported(f"overloaded helper '{name}' with a result")
        if ctx.depth > 8:
            raise Unsupported("recursive helper")
        like = toks[k]
        T = lambda s: self.tk(s, like)  # noqa: E731
        j = k + 1
        targs: list[Token] = []
        if toks[j].text == "<":
            e = lp._match_angle(toks, j)
            targs = toks[j : e + 1]
            j = e + 1
        pc = lp._match(toks, j)
        args = lp._split_call_args(toks[j + 1 : pc])
        if any(len(args) != len(g.params) for g in overloads):
            raise Unsupported(f"call of '{name}' with default arguments")
        void = [x.text for x in f.ret] == ["void"]
        start = k
        whole = start == 0 and pc == len(toks) - 2  # `f(...);`
        if void and not whole:
            raise Unsupported(f"void helper '{name}' used in an expression")
        out.append(T("{"))
        ret_ty = " ".join(x.text for x in f.ret)
        if f.tparams or len(overloads) > 1:
            for n_, g in enumerate(overloads):
                self._deduce_decl(g, n_)
            # names visible to overload resolution: the per-thread values it needs, of thread 0
            used = set().union(*(lp._ids(a) for a in args)) if args else set()
            binds = [f"auto& {n} = {a}[0]; (void){n};" for n, a in ctx.visible() if n in used]
            binds += [f"const {ty} {n} = 0; (void){n};" for ty, n, _ in ctx.lane_builtins
                      if n in used]
            out += [T(b) for b in binds]
            ta = self.uid("ta")
            call = [T(f"pmn_deduce_{name}")] + targs + [T("(")]
            for a_i, a in enumerate(args):
                call += ([T(",")] if a_i else []) + a
            out += [T(f"using {ta} = decltype(")] + call + [T("));")]
            ret_ty = f"typename {ta}::pmn_ret"
        else:
            ta = ""
        if len(overloads) > 1:
            # overload resolution picks the body: one `if constexpr` branch per overload
            for n_, g in enumerate(overloads):
                out.append(T(f"if constexpr ({ta}::pmn_which == {n_}) {{"))
                self._inline_body(g, args, ta, ctx, out, like, None, True)
                out.append(T("}"))
            out.append(T("}"))
            return None
        ret = None
        if not void:
            ret = self.uid("r")
            out.append(T(f"{ret_ty} {ret}[PMN_TG];"))
        self._inline_body(f, args, ta, ctx, out, like, ret, void)
        if whole:
            out.append(T("}"))
            return None
        # the rest of the caller's statement, inside the block (the result array lives here)
        rest = toks[:start] + [T(f"{ret}[pmn_l]")] + toks[pc + 1 :]
        self._continue(rest, St("simple", rest), ctx, out, [])
        out.append(T("}"))
        return None

    def _inline_body(self, f: Func, args: list[list[Token]], ta: str, ctx: Ctx, out: list[Token],
                     like: Token, ret: str | None, void: bool) -> None:
        """Parameters and body of helper `f` inlined at a call with `args`; `ta` names its
        template arguments (pmn_ta_*), `ret` the per-thread result array."""
        T = lambda s: self.tk(s, like)  # noqa: E731
        name = f.name
        sub: dict[str, list[Token]] = {}
        for idx, (kind, tn, _) in enumerate(f.tparams):
            sub[tn] = [T(ta), Token("punct", "::", like.file, like.line), T(f"pmn_t{idx}")]
            if kind == "type":
                sub[tn].insert(0, T("typename"))
        # parameters: a uniform argument is one scalar (evaluated here, named in the inner
        # block so that it cannot hide a caller name used by a later argument); the others are
        # per-thread arrays assigned from the arguments in the caller's loop
        pframe: list[tuple[str, str]] = []
        assigns: list[Token] = []
        uni_params: list[str] = []
        uni_names: set[str] = set()
        caller_u = Uniformity(self, ctx.uni)
        aliased: set[str] = set()
        for p, a in zip(f.params, args):
            p = self._subst(p, sub)
            amp = [i for i, x in enumerate(p) if x.text == "&"]
            if amp:
                # a reference: the caller's variable itself (its per-thread array, or the
                # uniform object); the argument must be a plain name
                pn = [x for x in p[amp[0] + 1:] if x.kind == "id"]
                if not pn:
                    continue  # unnamed
                if len(a) != 1 or a[0].kind != "id":
                    raise Unsupported(f"reference parameter of '{name}' bound to an expression")
                per = dict(ctx.visible())
                if a[0].text in per:
                    pframe.append((pn[0].text, per[a[0].text]))
                    aliased.add(pn[0].text)
                elif Uniformity(self, ctx.uni).expr(a):
                    uni_params.append(f"auto& {pn[0].text} = {a[0].text}; (void){pn[0].text};")
                    uni_names.add(pn[0].text)
                else:
                    raise Unsupported(f"reference parameter of '{name}'")
                continue
            if p[-1].text in ("*", ">", "]") or p[-1].kind != "id" or len(p) == 1:
                continue  # unnamed parameter
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
        clash = (lp._ids(body) - declared) & caller
        if clash:
            raise Unsupported(f"helper '{name}' uses '{sorted(clash)[0]}', also a local of the caller")
        fctx.uni = Uniformity(self, uni_names).run(stmts)
        fctx.arrays, fctx.no_copy = _copy_info(stmts, body, self.type_names)
        fctx.no_copy |= aliased
        fctx.full = ctx.full and ctx.uniform_ctx and mask_is_ctx and not _returns(stmts)
        self.stmts(stmts, fctx, out)
        out.append(T("}"))

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

    def _deduce_decl(self, f: Func, which: int = 0) -> None:
        key = f"{f.name}#{which}"
        if key in self.deduce:
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
        sname = f"pmn_ta_{f.name}_{which}"
        toks = list(f.theader) + [T(f"struct {sname} {{ using pmn_ret = {ret}; "
                                    f"static constexpr int pmn_which = {which}; "
                                    + " ".join(members) + " };")]
        toks += list(f.theader) + [T(f"{sname}" + (f"<{names}>" if names else "") +
                                     f" pmn_deduce_{f.name}(")]
        for i, p in enumerate(f.params):
            toks += ([T(",")] if i else []) + p
        toks.append(T(");"))
        self.deduce[key] = toks

