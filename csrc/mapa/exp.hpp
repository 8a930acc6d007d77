// Vectorisable exp for non-positive arguments (log-sum-exp terms x - max <= 0).
//
// Cody-Waite reduction x = k ln2 + r with |r| <= ln2/2, a Taylor polynomial
// for exp(r), and 2^k built directly in the exponent bits. Written without
// calls or branches, once for a scalar or a GCC vector of any width (V, with
// I the integer type of the same shape), so that loops over the scalar form
// vectorise for whatever ISA the translation unit is compiled for and the
// vector forms give, lane by lane, the scalar's bits.
#pragma once

#include <cstdint>
#include <cstring>

namespace mapa {

// Double precision: a degree-12 polynomial (truncation error < 2e-16
// relative). Arguments below -708 (including -inf) give exactly 0.
template <class V, class I>
[[gnu::always_inline]] inline V exp_nonpos_f64(V x) {
    constexpr double kLog2e = 1.4426950408889634074;
    constexpr double kLn2Hi = 6.93147180369123816490e-01;  // exact in 32 bits
    constexpr double kLn2Lo = 1.90821492927058770002e-10;
    constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52: rounds to integer
    constexpr double kLowest = -708.0;             // 2^k stays a normal number
    const V xc = x < kLowest ? V{} + kLowest : x;
    const V t = xc * kLog2e + kShift;
    const V kf = t - kShift;  // round(xc / ln2), as a double
    V r = xc - kf * kLn2Hi;
    r = r - kf * kLn2Lo;
    // Horner form of sum_{n<=12} r^n / n!
    V p = V{} + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // The low bits of t hold k in two's complement; 2^k = (k + 1023) << 52.
    I tb;
    std::memcpy(&tb, &t, sizeof tb);
    const I bits = (tb - std::int64_t(0x4338000000000000) + 1023) << 52;
    V scale;
    std::memcpy(&scale, &bits, sizeof scale);
    const V y = p * scale;
    return x < kLowest ? V{} : y;
}

// Single precision, for float32 problems: |r| <= ln2/2 and a degree-6
// polynomial (truncation error ~1.2e-7 relative, about one float ulp).
// Arguments below -87 (including -inf) give exactly 0.
template <class V, class I>
[[gnu::always_inline]] inline V exp_nonpos_f32(V x) {
    constexpr float kLog2e = 1.44269504f;
    constexpr float kLn2Hi = 0.693359375f;  // few significant bits: k * kLn2Hi is exact
    constexpr float kLn2Lo = -2.12194440e-4f;
    constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
    constexpr float kLowest = -87.0f;
    const V xc = x < kLowest ? V{} + kLowest : x;
    const V t = xc * kLog2e + kShift;
    const V kf = t - kShift;
    V r = xc - kf * kLn2Hi;
    r = r - kf * kLn2Lo;
    V p = V{} + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    I tb;
    std::memcpy(&tb, &t, sizeof tb);
    const I bits = (tb - std::int32_t(0x4B400000) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof scale);
    const V y = p * scale;
    return x < kLowest ? V{} : y;
}

[[gnu::always_inline]] inline double exp_nonpos(double x) { return exp_nonpos_f64<double, std::int64_t>(x); }
[[gnu::always_inline]] inline float exp_nonpos(float x) { return exp_nonpos_f32<float, std::int32_t>(x); }

}  // namespace mapa
