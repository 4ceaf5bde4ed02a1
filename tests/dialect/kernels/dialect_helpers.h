// Local header included by templates.metal: a helper template, a macro and a constant.
#pragma once

#define HELPER_OFFSET 1

template <typename T>
inline T helper_twice(T v) {
    return v + v;
}

constant int HELPER_TABLE[4] = {10, 20, 30, 40};
