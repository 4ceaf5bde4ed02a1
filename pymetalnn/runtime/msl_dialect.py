"""The MSL dialect's tables: what the front end (`msl.py`) renames onto the prelude, which built-in
functions and attributes it knows, what it refuses and why, and the kernel descriptions it hands
to the backends.

Why apart from the translator: the tables are the dialect's definition (docs/dialect.md lists
the same things for users), read by the translator and by the entry-point emitter
(`msl_emit.py`); the kernel descriptions (`KernelArg`, `KernelInfo`) are what `core.py` and every
backend dispatch against.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

SCALAR_MAP = {
    "half": "pmn_half", "uint": "pmn_uint", "uchar": "pmn_uchar", "ushort": "pmn_ushort",
    "long": "pmn_long", "ulong": "pmn_ulong",
}
TYPE_MAP = dict(SCALAR_MAP)
for _b in ("bool", "char", "uchar", "short", "ushort", "int", "uint", "half", "float"):
    for _n in (2, 3, 4):
        TYPE_MAP[f"{_b}{_n}"] = f"pmn_{_b}{_n}"
for _b in ("long", "ulong"):
    for _n in (2, 3, 4):
        TYPE_MAP[f"{_b}{_n}"] = f"pmn_{_b}{_n}"
for _a in ("atomic_int", "atomic_uint", "atomic_float", "simdgroup_float8x8", "simdgroup_half8x8"):
    TYPE_MAP[_a] = "pmn_" + _a
TYPE_MAP["simdgroup_matrix"] = "pmn::simdgroup_matrix"

MATH_FUNCS = set("""exp exp2 exp10 log log2 log10 sqrt rsqrt pow powr tanh sinh cosh sin cos tan asin
acos atan atan2 abs fabs min max fmin fmax clamp fma mad mix select floor ceil round rint trunc fract
fmod isnan isinf isfinite sign step smoothstep dot length normalize cross copysign saturate
as_type""".split())
SIMD_FUNCS = set("""simd_sum simd_product simd_max simd_min simd_prefix_exclusive_sum
simd_prefix_inclusive_sum simd_prefix_exclusive_product simd_prefix_inclusive_product simd_shuffle
simd_shuffle_xor simd_shuffle_up simd_shuffle_down simd_broadcast simd_broadcast_first simd_all
simd_any simd_ballot simd_is_first simd_and simd_or simd_xor simdgroup_barrier""".split())
ATOMIC_FUNCS = set("""atomic_load_explicit atomic_store_explicit atomic_exchange_explicit
atomic_compare_exchange_weak_explicit atomic_fetch_add_explicit atomic_fetch_sub_explicit
atomic_fetch_min_explicit atomic_fetch_max_explicit atomic_fetch_and_explicit
atomic_fetch_or_explicit atomic_fetch_xor_explicit""".split())
# simdgroup matrices: collective in Metal, but no lane exchange on cpu (every lane holds the whole
# matrix, see the prelude), so they need no call-site id and no fiber.
MATRIX_FUNCS = set("""make_filled_simdgroup_matrix simdgroup_load simdgroup_store simdgroup_multiply
simdgroup_multiply_accumulate""".split())
# tiles of simdgroup matrices: pymetalnn's extension, plain MSL in kernels/simdgroup_tile.h for
# Metal (where __PYMETALNN__ is undefined), the prelude's fused versions here
TILE_FUNCS = {"simdgroup_load_tile", "simdgroup_multiply_accumulate_tile"}
MATRIX_FUNCS |= TILE_FUNCS
TEMPLATE_FUNCS = {"as_type", "make_filled_simdgroup_matrix"} | TILE_FUNCS  # called as f<...>(...)
# library defines that configure the prelude: PMN_MATRIX_TF32 lets float simdgroup matrices use
# TF32 tensor cores on cuda (an explicit opt-in; see docs/dialect.md)
PRELUDE_DEFINES = {"PMN_MATRIX_TF32"}
KNOWN_FUNCS = MATH_FUNCS | SIMD_FUNCS | ATOMIC_FUNCS | MATRIX_FUNCS | {"threadgroup_barrier"}
MEMORY_ORDERS = {"memory_order_relaxed", "memory_order_acquire", "memory_order_release",
                 "memory_order_acq_rel", "memory_order_seq_cst"}

BUILTINS = {
    "thread_position_in_grid": ("(blockIdx.x * blockDim.x + threadIdx.x)", "ti.gid"),
    "thread_position_in_threadgroup": ("threadIdx.x", "ti.lid"),
    "thread_index_in_threadgroup": ("threadIdx.x", "ti.lid"),
    "threadgroup_position_in_grid": ("blockIdx.x", "ti.tgid"),
    "threads_per_threadgroup": ("blockDim.x", "ti.tg_size"),
    "threadgroups_per_grid": ("gridDim.x", "ti.n_groups"),
    "thread_index_in_simdgroup": ("(threadIdx.x & 31u)", "ti.lane"),
    "simdgroup_index_in_threadgroup": ("(threadIdx.x >> 5)", "ti.simd_id"),
    "threads_per_simdgroup": ("32u", "32u"),
    "simdgroups_per_threadgroup": ("((blockDim.x + 31u) >> 5)", "ti.n_simd"),
}
BUILTIN_TYPES = {"uint", "ushort", "uint32_t", "uint16_t", "unsigned", "int"}

# Metal features outside the dialect, with the reason given to the user.
_TEX = "textures and samplers are not in the dialect (buffers only)"
REJECT_IDS: dict[str, str] = {
    "double": "Metal has no double; use float",
    "vertex": "only compute kernels are supported", "fragment": "only compute kernels are supported",
    "sampler": _TEX, "imageblock": "imageblocks are not in the dialect",
    "bfloat": "bfloat is not in the dialect", "acceleration_structure": "ray tracing is not supported",
    "visible_function_table": "function tables are not supported",
    "intersection_function_table": "function tables are not supported",
    "raster_order_group": "not a compute feature",
}
for _p in ("texture1d", "texture1d_array", "texture2d", "texture2d_array", "texture3d", "texturecube",
           "texturecube_array", "texture2d_ms", "texture2d_ms_array", "texture_buffer", "depth2d",
           "depth2d_array", "depthcube", "depthcube_array", "depth2d_ms", "depth2d_ms_array"):
    REJECT_IDS[_p] = _TEX
for _b in ("float", "half"):
    for _r in (2, 3, 4):
        for _c in (2, 3, 4):
            REJECT_IDS[f"{_b}{_r}x{_c}"] = "matrix types are not in the dialect"
for _b in ("float", "half", "int", "uint", "short", "ushort", "char", "uchar"):
    for _n in (2, 3, 4):
        REJECT_IDS[f"packed_{_b}{_n}"] = "packed vector types are not in the dialect; use scalars"
for _q in ("quad_sum", "quad_shuffle", "quad_broadcast", "quad_max", "quad_min", "quad_all",
           "quad_any", "quad_shuffle_xor", "quad_shuffle_up", "quad_shuffle_down", "quad_ballot"):
    REJECT_IDS[_q] = "quad-group functions are not in the dialect; use simd_* functions"
ALLOWED_ATTRS = {"maybe_unused", "likely", "unlikely", "fallthrough", "nodiscard"}
_FLOAT_RE = re.compile(r"^(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][+-]?\d+)?([fFhH])?$")
GENERATED = "<pymetalnn generated>"


@dataclass
class KernelArg:
    """One `[[buffer(i)]]` argument of a kernel entry point."""

    index: int
    name: str
    kind: str  # "buffer" (pointer) or "value" (constant T&, passed by value)
    type: str  # MSL element type as written (after template substitution), e.g. "float"
    const: bool
    ctype: str = ""  # translated C++ type used in the entry point
    device: bool = False  # a `device T*` (checked in validation mode)


@dataclass
class KernelInfo:
    name: str  # host name
    impl: str  # C++ expression naming the implementation, e.g. pmn_kimpl_f<float>
    args: list[KernelArg]
    builtins: list[tuple[int, str]]  # (parameter position, attribute) in declaration order
    params_order: list[tuple[str, int]]  # ("arg", i) or ("builtin", j) per declared parameter
    threadgroup_size: int
    needs_fibers: bool = False
    file: str = ""
    line: int = 0
    impl_name: str = ""
    lockstep: bool = False  # cpu: runs as work-item loops (lockstep.py) instead of fibers
    fiber_reason: str = ""  # cpu: why a kernel that synchronizes still needs fibers


@dataclass
class Translation:
    cuda_or_cpu: str
    source: str  # head + every kernel's entry points
    kernels: dict[str, KernelInfo]
    files: list[str] = field(default_factory=list)
    head: str = ""  # the source without the entry points (no kernel instantiated)
