// C++14 features MSL leaves out. Each line marked `expect: RULE` must be reported there.
#include <metal_stdlib>
using namespace metal;

struct Box { float v; };

inline float f_goto(float x) {
    if (x > 0.0f) goto done;  // expect: restricted
    x = -x;
done:
    return x;
}

inline float f_try(float x) {
    try {  // expect: restricted
        return x;
    } catch (int e) {  // expect: restricted
        throw 1;  // expect: restricted
    }
}

inline void f_new() {
    thread Box* b = new Box();  // expect: restricted
    delete b;  // expect: restricted
}

inline float f_double(float x) {
    double d = x;  // expect: restricted
    long long big = 1;  // expect: restricted
    return float(d) + float(big);
}

inline float f_misc(float x) noexcept {  // expect: restricted
    register float r = x;  // expect: restricted
    return r;
}

struct Shape {
    virtual float area() { return 0.0f; }  // expect: restricted
};

inline uint f_typeid(float x) {
    return uint(typeid(x).hash_code());  // expect: restricted
}

inline int main() {  // expect: restricted
    return 0;
}

struct NoCopy {
    NoCopy(const thread NoCopy&) = delete;  // '= delete' is not the operator: allowed
};

kernel void k(device float* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
    x[gid] = f_goto(x[gid]) + f_try(x[gid]) + f_double(x[gid]) + f_misc(x[gid]) + float(f_typeid(1.0f));
}
