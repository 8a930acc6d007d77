// 64-byte vectors (eight doubles, sixteen floats) that stay in registers at
// every x86-64 level, for tiles.cpp's leaves.
//
// GCC keeps a 64-byte generic vector in a register only where AVX-512 is
// enabled; elsewhere it gives the type no register mode and every such
// variable lives on the stack, so each multiply-add goes through memory.
// lanes64<E, B> is therefore the native vector where B = 64 and, where the
// widest native vector has B < 64 bytes, a Wide: an array of 64 / B native
// pieces with the same operators, lane by lane. Every lane sees the same
// operations in the same order at every width, so the AVX-512 and AVX2
// levels (both fuse multiply-adds) agree bit for bit; the baseline level
// rounds each product apart from its sum, so its last bits differ.
//
// A Wide stays in registers as long as it is only touched piece by piece
// with constant indices (after unrolling): load and store it through
// load_lanes / store_lanes, never by one memcpy of the whole.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "exp.hpp"

namespace mapa {

// A GCC vector of B bytes of E.
template <class E, int B>
struct VecOf {
    typedef E type __attribute__((vector_size(B)));
};
template <class E, int B>
using vec = typename VecOf<E, B>::type;

// P native vectors H acting as one vector of P times the lanes.
template <class H, int P>
struct Wide {
    H p[P];
};

template <class V>
struct LaneInfo {
    using lane = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;
    using piece = V;
    static constexpr int pieces = 1;
    static constexpr int lanes = sizeof(V) / sizeof(lane);
};
template <class H, int P>
struct LaneInfo<Wide<H, P>> {
    using lane = typename LaneInfo<H>::lane;
    using piece = H;
    static constexpr int pieces = P;
    static constexpr int lanes = P * LaneInfo<H>::lanes;
};
template <class V>
using lane_t = typename LaneInfo<V>::lane;
template <class V>
constexpr int lanes_of = LaneInfo<V>::lanes;
template <class V>
constexpr int pieces_of = LaneInfo<V>::pieces;

// Sixty-four bytes of E built from native vectors of B bytes.
template <class E, int B>
using lanes64 = std::conditional_t<B == 64, vec<E, 64>, Wide<vec<E, B>, 64 / B>>;

// Piece q of v (the vector itself when native).
template <class V>
[[gnu::always_inline]] inline auto& piece(V& v, [[maybe_unused]] int q) {
    if constexpr (pieces_of<V> == 1 && std::is_same_v<typename LaneInfo<V>::piece, V>) {
        return v;
    } else {
        return v.p[q];
    }
}
template <class V>
[[gnu::always_inline]] inline const auto& piece(const V& v, int q) {
    return piece(const_cast<V&>(v), q);
}

#define MAPA_WIDE_BINARY(op)                                                                        \
    template <class H, int P>                                                                       \
    [[gnu::always_inline]] inline Wide<H, P> operator op(Wide<H, P> a, const Wide<H, P>& b) {      \
        _Pragma("GCC unroll 8") for (int i = 0; i < P; ++i) a.p[i] = a.p[i] op b.p[i];              \
        return a;                                                                                   \
    }                                                                                               \
    template <class H, int P>                                                                       \
    [[gnu::always_inline]] inline Wide<H, P> operator op(Wide<H, P> a, lane_t<H> s) {               \
        _Pragma("GCC unroll 8") for (int i = 0; i < P; ++i) a.p[i] = a.p[i] op s;                   \
        return a;                                                                                   \
    }                                                                                               \
    template <class H, int P>                                                                       \
    [[gnu::always_inline]] inline Wide<H, P> operator op(lane_t<H> s, Wide<H, P> a) {               \
        _Pragma("GCC unroll 8") for (int i = 0; i < P; ++i) a.p[i] = s op a.p[i];                   \
        return a;                                                                                   \
    }                                                                                               \
    template <class H, int P>                                                                       \
    [[gnu::always_inline]] inline Wide<H, P>& operator op##=(Wide<H, P>& a, const Wide<H, P>& b) { \
        return a = a op b;                                                                          \
    }
MAPA_WIDE_BINARY(+)
MAPA_WIDE_BINARY(-)
MAPA_WIDE_BINARY(*)
MAPA_WIDE_BINARY(&)
MAPA_WIDE_BINARY(|)
#undef MAPA_WIDE_BINARY

// The lane masks comparisons give (all bits set where true).
template <class H>
using mask_of = decltype(std::declval<H>() < std::declval<H>());

#define MAPA_WIDE_COMPARE(op)                                                                           \
    template <class H, int P>                                                                           \
    [[gnu::always_inline]] inline Wide<mask_of<H>, P> operator op(const Wide<H, P>& a, const Wide<H, P>& b) { \
        Wide<mask_of<H>, P> m;                                                                          \
        _Pragma("GCC unroll 8") for (int i = 0; i < P; ++i) m.p[i] = a.p[i] op b.p[i];                  \
        return m;                                                                                       \
    }                                                                                                   \
    template <class H, int P>                                                                           \
    [[gnu::always_inline]] inline Wide<mask_of<H>, P> operator op(const Wide<H, P>& a, lane_t<H> s) {   \
        Wide<mask_of<H>, P> m;                                                                          \
        _Pragma("GCC unroll 8") for (int i = 0; i < P; ++i) m.p[i] = a.p[i] op s;                       \
        return m;                                                                                       \
    }
MAPA_WIDE_COMPARE(<)
MAPA_WIDE_COMPARE(>)
MAPA_WIDE_COMPARE(<=)
MAPA_WIDE_COMPARE(>=)
MAPA_WIDE_COMPARE(==)
#undef MAPA_WIDE_COMPARE

// m ? a : b, lane by lane.
template <class M, class V>
[[gnu::always_inline]] inline V select(const M& m, const V& a, const V& b) {
    return m ? a : b;
}
template <class M, class H, int P>
[[gnu::always_inline]] inline Wide<H, P> select(const Wide<M, P>& m, Wide<H, P> a, const Wide<H, P>& b) {
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i) a.p[i] = m.p[i] ? a.p[i] : b.p[i];
    return a;
}

// Lane i of v.
template <class V>
[[gnu::always_inline]] inline lane_t<V> lane(const V& v, int i) {
    constexpr int L = lanes_of<typename LaneInfo<V>::piece>;
    return piece(v, i / L)[i % L];
}

// Every lane x.
template <class V>
[[gnu::always_inline]] inline V splat(lane_t<V> x) {
    V v;
#pragma GCC unroll 8
    for (int q = 0; q < pieces_of<V>; ++q) piece(v, q) = typename LaneInfo<V>::piece{} + x;
    return v;
}

// Lane i holds i.
template <class V>
[[gnu::always_inline]] inline V lane_index() {
    V v;
    for (int i = 0; i < lanes_of<V>; ++i) {
        constexpr int L = lanes_of<typename LaneInfo<V>::piece>;
        piece(v, i / L)[i % L] = static_cast<lane_t<V>>(i);
    }
    return v;
}

// Unaligned loads and stores of lanes_of<V> values, piece by piece.
template <class V, class E>
[[gnu::always_inline]] inline V load_lanes(const E* p) {
    using H = typename LaneInfo<V>::piece;
    static_assert(std::is_same_v<lane_t<V>, E>, "lanes of the stored type");
    V v;
#pragma GCC unroll 8
    for (int q = 0; q < pieces_of<V>; ++q) std::memcpy(&piece(v, q), p + q * lanes_of<H>, sizeof(H));
    return v;
}
template <class V, class E>
[[gnu::always_inline]] inline void store_lanes(E* p, const V& v) {
    using H = typename LaneInfo<V>::piece;
    static_assert(std::is_same_v<lane_t<V>, E>, "lanes of the stored type");
#pragma GCC unroll 8
    for (int q = 0; q < pieces_of<V>; ++q) std::memcpy(p + q * lanes_of<H>, &piece(v, q), sizeof(H));
}

// Whether any lane of the mask is set.
template <class M>
[[gnu::always_inline]] inline bool any_lane(const M& m) {
    auto a = piece(m, 0);
#pragma GCC unroll 8
    for (int q = 1; q < pieces_of<M>; ++q) a |= piece(m, q);
    lane_t<M> s = 0;
    for (int i = 0; i < lanes_of<decltype(a)>; ++i) s |= a[i];
    return s != 0;
}

// Largest and least lane.
template <class V>
[[gnu::always_inline]] inline lane_t<V> lane_max(const V& v) {
    lane_t<V> m = lane(v, 0);
    for (int i = 1; i < lanes_of<V>; ++i) m = lane(v, i) > m ? lane(v, i) : m;
    return m;
}
template <class V>
[[gnu::always_inline]] inline lane_t<V> lane_min(const V& v) {
    lane_t<V> m = lane(v, 0);
    for (int i = 1; i < lanes_of<V>; ++i) m = lane(v, i) < m ? lane(v, i) : m;
    return m;
}

// exp_nonpos (exp.hpp) on every lane: lane by lane the scalar's bits.
template <class V>
[[gnu::always_inline]] inline V exp_lanes(V x) {
    using H = typename LaneInfo<V>::piece;
    using E = lane_t<V>;
#pragma GCC unroll 8
    for (int q = 0; q < pieces_of<V>; ++q) {
        if constexpr (std::is_same_v<E, double>) {
            piece(x, q) = exp_nonpos_f64<H, vec<std::int64_t, sizeof(H)>>(piece(x, q));
        } else {
            piece(x, q) = exp_nonpos_f32<H, vec<std::int32_t, sizeof(H)>>(piece(x, q));
        }
    }
    return x;
}

// The low and high eight lanes of sixteen floats, widened to double.
template <int B>
[[gnu::always_inline]] inline void widen(const lanes64<float, B>& x, lanes64<double, B>& lo, lanes64<double, B>& hi) {
    using Half = vec<float, B / 2>;
    using HD = vec<double, B>;
    constexpr int P = 64 / B;
    // double piece k of (lo, hi) is half k % 2 of float piece k / 2
#pragma GCC unroll 8
    for (int k = 0; k < 2 * P; ++k) {
        const auto f = piece(x, k / 2);
        Half h;
        std::memcpy(&h, reinterpret_cast<const char*>(&f) + (k % 2) * (B / 2), sizeof h);
        const HD w = __builtin_convertvector(h, HD);
        if (k < P) {
            piece(lo, k) = w;
        } else {
            piece(hi, k - P) = w;
        }
    }
}

}  // namespace mapa
