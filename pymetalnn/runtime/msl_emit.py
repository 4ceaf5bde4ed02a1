"""The MSL front end's output: the rewritten token stream serialized with `#line` directives (so
the C++ compiler's messages name the `.metal` line), the per-target preamble, and the generated
entry points through which the backends launch each kernel (a `__global__` function and its
argument sizes on cuda; per-thread bodies, a threadgroup loop and argument sizes on the cpu).
"""
from __future__ import annotations

import re

from .msl_dialect import BUILTINS, KernelInfo
from .preprocess import Token


def _emit(toks: list[Token]) -> str:
    """Serialize tokens line by line, with #line whenever the origin jumps, so that the C++
    compiler's line numbers are the `.metal` file's."""
    lines: list[str] = []
    cur: list[str] = []
    cur_file: str | None = None
    cur_line = 0
    for t in toks:
        if t.kind == "pragma":
            lines.append(" ".join(cur))
            cur = []
            lines.append(f'#line {t.line} "{t.file}"')
            lines.append("#pragma " + t.text)
            cur_file = None  # force a #line before the next token
            continue
        if t.file != cur_file or t.line < cur_line or t.line > cur_line + 8:
            lines.append(" ".join(cur))
            cur = []
            lines.append(f'#line {t.line} "{t.file}"')
            cur_file, cur_line = t.file, t.line
        while cur_line < t.line:
            lines.append(" ".join(cur))
            cur = []
            cur_line += 1
        cur.append(t.text)
    lines.append(" ".join(cur))
    return "\n".join(lines) + "\n"


def _arg_sizes(byidx: list) -> str:
    return ", ".join("0u" if a.kind == "buffer" else f"(unsigned)sizeof({a.ctype})" for a in byidx) \
        or "0u"


def cuda_entry(k: KernelInfo) -> tuple[str, str]:
    """A kernel's two cuda lines: its extern "C" __global__ wrapper (the one instantiation of its
    template), and its argument-size table pmn_argsizes_<name> (bytes of each constant argument,
    0 for buffers). Apart because backend_cuda compiles the tables of a whole library at once
    (cheap: no kernel code) and each wrapper into a module of its own on first use."""
    call_args = []
    for kind, j in k.params_order:
        if kind == "arg":
            call_args.append(f"a{k.args[j].index}")
        else:
            call_args.append(BUILTINS[k.builtins[j][1]][0])
    byidx = sorted(k.args, key=lambda a: a.index)
    params = ", ".join(f"{a.ctype} a{a.index}" for a in byidx)
    return (f'extern "C" __global__ void __launch_bounds__({k.threadgroup_size}) '
            f"{k.name}({params}) {{ {k.impl}({', '.join(call_args)}); }}\n",
            f'extern "C" __device__ unsigned pmn_argsizes_{k.name}[] = {{{_arg_sizes(byidx)}}};\n')


def _entry_points(k: KernelInfo, target: str, validate: bool = False) -> str:
    byidx = sorted(k.args, key=lambda a: a.index)
    sizes = _arg_sizes(byidx)
    if target == "cuda":
        return "".join(cuda_entry(k))
    unpack = []
    for a in byidx:
        if a.kind == "buffer" and validate and a.device:
            fname = k.file.replace("\\", "/").replace('"', "")
            elem = re.sub(r"\b(const|volatile)\b", "", a.ctype[:-1]).strip()
            unpack.append(f"pmn::vptr<{elem}>(({elem}*)args[{a.index}], "
                          f'pmn_v_sizes[{a.index}], "{a.name}", "{fname}", {k.line})')
        elif a.kind == "buffer":
            unpack.append(f"({a.ctype})args[{a.index}]")
        else:
            unpack.append(f"*(const {a.ctype}*)args[{a.index}]")
    call = []
    for kind, j in k.params_order:
        if kind == "arg":
            call.append(unpack[k.args[j].index])
        else:
            call.append(BUILTINS[k.builtins[j][1]][1])
    body = f"{k.impl}({', '.join(call)});"
    if validate and k.needs_fibers:  # divergent barriers: see prelude/pmn_validate.h
        body = f"pmn::v_thread_begin(ti); {body} pmn::v_thread_end(ti);"
    loop = (f"for (uint32_t l = 0; l < tg_size; ++l) {{ ti.lid = l; ti.gid = tgid * tg_size + l; "
            f"ti.lane = l & 31u; ti.simd_id = l >> 5; pmn_body_{k.name}(args, ti); }}")
    if k.lockstep:
        # one call per threadgroup: the work-item loops are inside (lockstep.py)
        grp = "pmn_kgrp_" + k.impl[len("pmn_kimpl_"):]
        grp = grp.replace("<", f"<{k.threadgroup_size}u, ", 1) if "<" in grp else \
            grp + f"<{k.threadgroup_size}u>"
        gargs = [unpack[k.args[j].index] for kind, j in k.params_order if kind == "arg"]
        loop = f"(void)ti; {grp}({', '.join(gargs + ['tgid', 'n_groups'])});"
    # the fiber entry only where the kernel runs on fibers: an unused second copy of every
    # inlined body counts against g++'s budget for the library's growth, past which it leaves
    # small helpers (stream_store, ...) as calls inside the element loops (arith's library
    # 347 -> 236 KB without it; some helpers still miss that budget)
    fiber = "" if k.lockstep else (
        f"static inline __attribute__((always_inline)) void pmn_body_{k.name}(void* const* args, "
        f"const pmn_tinfo& ti) {{ (void)args; (void)ti; {body} }}\n" + (
            f'extern "C" void pmn_thread_{k.name}(void* const* args, const pmn_tinfo* ti) '
            f"{{ pmn_body_{k.name}(args, *ti); }}\n" if k.needs_fibers else ""))
    return (
        fiber +
        f'extern "C" void pmn_loop_{k.name}(void* const* args, uint32_t tgid, uint32_t tg_size, '
        f"uint32_t n_groups) {{ pmn_tinfo ti; ti.tgid = tgid; ti.tg_size = tg_size; "
        f"ti.n_groups = n_groups; ti.n_simd = (tg_size + 31u) >> 5; {loop} }}\n"
        f'extern "C" unsigned pmn_argsize_{k.name}(unsigned i) {{ static const unsigned s[] = '
        f"{{{sizes}}}; return s[i]; }}\n"
    )


PREAMBLE = {
    "cuda": "#define PMN_CUDA 1\n#define PMN_KERNEL_IMPL static __forceinline__\n"
            "#define PMN_INFINITY __int_as_float(0x7f800000)\n"
            "#define PMN_NAN __int_as_float(0x7fffffff)\n",
    "cpu": "#define PMN_CPU 1\n#define PMN_KERNEL_IMPL static inline __attribute__((always_inline))\n"
           "#define PMN_INLINE inline __attribute__((always_inline))\n"
           "#define PMN_INFINITY __builtin_inff()\n#define PMN_NAN __builtin_nanf(\"\")\n",
}

