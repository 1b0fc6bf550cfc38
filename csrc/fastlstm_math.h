/*
 * Vectorizable float32 tanh for the cell loops of fastlstm.c.
 *
 * libm's tanhf is a call per element and dominated the time of small cells (H = 4). These
 * functions use only arithmetic, bit copies and selects, so that GCC vectorizes the loops that call
 * them with the instruction set the file is compiled for, and no flag that changes NaN, Inf or
 * rounding semantics is needed.
 */
#ifndef FASTLSTM_MATH_H
#define FASTLSTM_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(y) for -87 <= y <= 18.02 (and NaN), written with plain arithmetic so that loops over it vectorize.
 * y = n ln2 + r with |r| <= ln2 / 2; exp(r) by its Taylor polynomial of degree 7 (truncation below
 * 1e-8 relative); 2^n built from the exponent bits. */
static inline __attribute__((always_inline)) float fl_exp_small_f32(float y)
{
    const float shift = 12582912.0f;                 /* 1.5 * 2^23: adding it rounds to an integer */
    const float k = y * 1.44269504088896341f + shift;
    const float n = k - shift;
    uint32_t k_bits, scale_bits;
    float scale;
    memcpy(&k_bits, &k, sizeof k_bits);
    /* 2^n: the low mantissa bits of k hold n. Unsigned, so that the NaN case wraps instead of
     * overflowing; its result is NaN anyway, through r. */
    scale_bits = (k_bits - 0x4B400000u + 127u) << 23;
    memcpy(&scale, &scale_bits, sizeof scale);
    /* r = y - n ln2, with ln2 split in two so that n * ln2_hi is exact. */
    const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.98412698e-4f;                        /* 1/7! .. 1/2!, 1, 1 */
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * scale;
}

/* Returns if_true where mask is all ones and if_false where it is zero, bit for bit. A C conditional
 * on floats would let the compiler keep branches: under the default -ftrapping-math it may not
 * evaluate both operands, and a branch stops the loop from vectorizing. */
static inline __attribute__((always_inline)) float fl_select_f32(uint32_t mask, float if_true,
                                                                float if_false)
{
    uint32_t true_bits, false_bits, bits;
    float result;
    memcpy(&true_bits, &if_true, sizeof true_bits);
    memcpy(&false_bits, &if_false, sizeof false_bits);
    bits = (true_bits & mask) | (false_bits & ~mask);
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* tanh for float32 in plain arithmetic (no calls, only selects), so that the cell loops vectorize.
 * For |x| < 0.55 it is |x| + |x|^3 P(x^2), a least-squares fit with relative error below 4e-9;
 * above, 1 - 2 / (exp(2|x|) + 1); the sign of x is copied onto the result. Beyond |x| = 9.01, where
 * the exact tanh rounds to 1 in float32, it returns exactly 1, so saturated gates are exactly 0 or 1.
 * NaN propagates and +-inf give +-1. Measured against double tanh over every float32 in [0, 10]:
 * at most 1.6 ulp.
 *
 * The range tests compare the bits of |x| as integers and blend with masks: a float comparison may
 * raise an exception on NaN, and either would stop the loops around it from vectorizing. */
static inline __attribute__((always_inline)) float fl_tanh_f32(float x)
{
    const uint32_t small_limit_bits = 0x3F0CCCCDu;   /* 0.55f */
    const uint32_t saturation_bits = 0x411028F6u;    /* 9.01f */
    const uint32_t infinity_bits = 0x7F800000u;
    const float a = fabsf(x);
    uint32_t a_bits;
    memcpy(&a_bits, &a, sizeof a_bits);
    const uint32_t is_small = 0u - (uint32_t)(a_bits < small_limit_bits);
    const uint32_t saturated = 0u - (uint32_t)((a_bits > saturation_bits) & (a_bits <= infinity_bits));

    /* The polynomial gets 0 outside its range, so that squaring a huge |x| cannot raise the
     * overflow flag for a value that the blend would discard. */
    const float a_small = fl_select_f32(is_small, a, 0.0f);
    const float a2 = a_small * a_small;
    float p = -6.356587167829275e-3f;
    p = p * a2 + 2.1127300336956978e-2f;
    p = p * a2 - 5.3865090012550354e-2f;
    p = p * a2 + 1.3332699239253998e-1f;
    p = p * a2 - 3.3333319425582886e-1f;
    const float small = a_small + a_small * (a2 * p);

    const float clamped = fl_select_f32(saturated, 9.01f, a);   /* NaN stays NaN */
    const float e = fl_exp_small_f32(2.0f * clamped);
    const float medium = 1.0f - 2.0f / (e + 1.0f);

    const float magnitude = fl_select_f32(is_small, small, fl_select_f32(saturated, 1.0f, medium));
    return copysignf(magnitude, x);
}

/* The logistic sigmoid 1 / (1 + exp(-x)) for float32, vectorizable like fl_tanh_f32: one exp and
 * one division, where 0.5 * tanh(x / 2) + 0.5 costs a tanh (an exp, a polynomial and a division).
 * Below x = -18.02 it returns exactly 0, as that formula does where the tanh saturates, so that a
 * closed gate stays 0 and its products cannot reach the subnormal range, which is slow on x86.
 * Above 87, exp(-x) is clamped at exp(-87), so 1 + exp(-x) rounds to 1 and the result is exactly
 * 1 (it already is from 16.64). NaN propagates, +inf gives 1 and -inf gives 0. Measured against
 * double sigmoid: at most 2 ulp (tests/test_core.py).
 * NOTE: it is not monotonic at the last bit: in 861 places among the floats in [0, 16.7] the next
 * larger input gives a result 1 ulp lower (the tanh form had none). */
static inline __attribute__((always_inline)) float fl_sigmoid_f32(float x)
{
    const uint32_t low_bits = 0x419028F6u;           /* 18.02f */
    const uint32_t high_bits = 0x42AE0000u;          /* 87.0f */
    const uint32_t infinity_bits = 0x7F800000u;
    const float a = fabsf(x);
    uint32_t x_bits, a_bits;
    memcpy(&x_bits, &x, sizeof x_bits);
    memcpy(&a_bits, &a, sizeof a_bits);
    const uint32_t negative = 0u - (uint32_t)(x_bits > 0x7FFFFFFFu);   /* sign bit set */
    const uint32_t not_nan = 0u - (uint32_t)(a_bits <= infinity_bits);
    /* Masks of the inputs whose result is exactly 0 (a closed gate) and exactly 1 (an open one). */
    const uint32_t closed_gate = negative & not_nan & (0u - (uint32_t)(a_bits > low_bits));
    const uint32_t open_gate = ~negative & not_nan & (0u - (uint32_t)(a_bits > high_bits));

    /* exp gets an argument in its range everywhere, so that no value that the blend discards
     * raises the overflow or invalid flag. */
    const float y = fl_select_f32(closed_gate, 0.0f, fl_select_f32(open_gate, -87.0f, -x));
    const float sigmoid = 1.0f / (1.0f + fl_exp_small_f32(y));
    return fl_select_f32(closed_gate, 0.0f, sigmoid);
}

/* exp(x) for x <= 0, the softmax's exp(logit - max logit), vectorizable like fl_tanh_f32. Below
 * -87, where exp(x) < 1.7e-38 needs the subnormal range, it returns 0; -inf gives 0 and NaN stays
 * NaN. */
static inline __attribute__((always_inline)) float fl_exp_negative_f32(float x)
{
    const uint32_t limit_bits = 0x42AE0000u;         /* 87.0f */
    const uint32_t infinity_bits = 0x7F800000u;
    const float a = fabsf(x);
    uint32_t a_bits;
    memcpy(&a_bits, &a, sizeof a_bits);
    const uint32_t underflow = 0u - (uint32_t)((a_bits > limit_bits) & (a_bits <= infinity_bits));
    /* The polynomial gets 0 where the result is discarded, so that it raises no flag there. */
    const float y = fl_select_f32(underflow, 0.0f, x);
    return fl_select_f32(underflow, 0.0f, fl_exp_small_f32(y));
}

#endif /* FASTLSTM_MATH_H */
