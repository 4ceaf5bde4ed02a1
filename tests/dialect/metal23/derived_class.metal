#include <metal_stdlib>
using namespace metal;

struct Base { float a; };
struct Derived : Base {  // expect: derived-class
    float b;
};
struct Bits {
    uint lo : 16;  // a bit-field, not a base class
    uint hi : 16;
};
