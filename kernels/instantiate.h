// instantiate.h -- the one macro that names a kernel template's instance for the host:
// INSTANTIATE("<op>_<fwd|bwd>[_variant]_<dtype>", fn, template arguments...) makes fn<args...>
// the library's kernel of that name (Metal's [[host_name]]; the cuda and cpu back ends read the
// same attribute). A family's own macros expand into it per tile, precision or dtype.
#pragma once

#define INSTANTIATE(HOST, FN, ...) \
    template [[host_name(HOST)]] [[kernel]] decltype(FN<__VA_ARGS__>) FN<__VA_ARGS__>;
