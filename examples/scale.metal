// A first kernel: y = a * x, instantiated for float and half storage.
#include <metal_stdlib>
using namespace metal;

struct ScaleParams { uint n; float a; };

template <typename T>
[[kernel]] void scale(device T* x [[buffer(0)]], constant ScaleParams& p [[buffer(1)]],
                      uint gid [[thread_position_in_grid]]) {
  if (gid >= p.n) return;  // the grid is rounded up to whole threadgroups
  x[gid] = T(float(x[gid]) * p.a);
}
template [[host_name("scale_float")]] [[kernel]] decltype(scale<float>) scale<float>;
template [[host_name("scale_half")]] [[kernel]] decltype(scale<half>) scale<half>;
