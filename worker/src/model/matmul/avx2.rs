//! The tiles on x86-64 with AVX2, FMA and F16C (every x86-64 server CPU
//! since 2013), chosen at run time by [`super::isa`].
//!
//! Each tile is a const-generic `I x J` block so the accumulators live in
//! registers: `4 x 2` for batches (8 accumulators, 2 weight rows, 4 rows of
//! activations) and `1 x 8` for one row (8 independent FMA chains).
//! Every accumulator sums its 8 lanes over `k` in order and is then reduced
//! by [`sum_lanes`], the same for every tile shape. A core alone cannot
//! stream weights as fast as it multiplies them, so each tile prefetches
//! the next tile's weight rows (those after its own in memory) while it
//! computes, overlapping the two.

// Intrinsics on raw pointers; every entry point checks the slice lengths the
// pointers walk, and is only reached when the CPU has the features (see
// `super::isa`).
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use half::f16;

use super::{GgmlBlock, Q8_BLOCK, ROWS, Tile, WBlocks, WIDE_COLS, XBlocks};

/// `rows` activation rows of `x` dotted with `cols` f16 weight rows of `w`.
pub fn f16_tile(x: &[f32], rows: usize, w: &[f16], cols: usize, k: usize) -> Tile {
    assert!(rows <= ROWS && cols <= WIDE_COLS);
    assert!(x.len() >= rows * k && w.len() >= cols * k);
    by_shape!(
        f16_fixed,
        rows,
        cols,
        x.as_ptr(),
        w.as_ptr().cast::<u16>(),
        k
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_fixed<const I: usize, const J: usize>(
    x: *const f32,
    w: *const u16,
    k: usize,
) -> [[f32; J]; I] {
    let mut acc = [[_mm256_setzero_ps(); J]; I];
    let body = k - k % 8;
    let mut c = 0;
    while c < body {
        if c.is_multiple_of(32) {
            // The next tile's weight rows (one cache line each), so that
            // memory streams them in while this tile computes.
            for j in J..2 * J {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j * k + c).cast());
            }
        }
        let mut weights = [_mm256_setzero_ps(); J];
        for (j, weight) in weights.iter_mut().enumerate() {
            // SAFETY: c + 8 <= k and j < J: inside row j.
            *weight = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(w.add(j * k + c).cast()) });
        }
        for (i, sums) in acc.iter_mut().enumerate() {
            // SAFETY: inside row i.
            let xs = unsafe { _mm256_loadu_ps(x.add(i * k + c)) };
            for (sum, weight) in sums.iter_mut().zip(&weights) {
                *sum = _mm256_fmadd_ps(xs, *weight, *sum);
            }
        }
        c += 8;
    }
    let mut out = [[0.0; J]; I];
    for (i, (row, sums)) in out.iter_mut().zip(&acc).enumerate() {
        for (j, (value, sum)) in row.iter_mut().zip(sums).enumerate() {
            let mut total = sum_lanes(*sum);
            for t in body..k {
                // SAFETY: t < k, inside rows i and j.
                let (a, b) = unsafe { (*x.add(i * k + t), *w.add(j * k + t)) };
                total = a.mul_add(f16::from_bits(b).to_f32(), total);
            }
            *value = total;
        }
    }
    out
}

/// `rows` rows of quantized activations dotted with `cols` Q8_0 weight rows.
pub fn q8_tile(x: XBlocks<'_>, rows: usize, w: WBlocks<'_>, cols: usize) -> Tile {
    assert!(rows <= ROWS && cols <= WIDE_COLS && x.per_row == w.per_row);
    let per_row = x.per_row;
    assert!(x.scales.len() >= rows * per_row && x.quants.len() >= rows * per_row);
    assert!(w.blocks.len() >= cols * per_row);
    by_shape!(
        q8_fixed,
        rows,
        cols,
        x.scales.as_ptr(),
        x.quants.as_ptr(),
        w.blocks.as_ptr(),
        per_row
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_fixed<const I: usize, const J: usize>(
    x_scales: *const f32,
    x_quants: *const [i8; Q8_BLOCK],
    w: *const GgmlBlock,
    per_row: usize,
) -> [[f32; J]; I] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); J]; I];
    for b in 0..per_row {
        // The next tile's blocks: 34 bytes each, so a cache line or two.
        for j in J..2 * J {
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j * per_row + b).cast());
        }
        let mut signed = [_mm256_setzero_si256(); J];
        let mut magnitude = [_mm256_setzero_si256(); J];
        let mut scale = [0f32; J];
        for j in 0..J {
            // SAFETY: b < per_row and j < J: block b of weight row j.
            let block = unsafe { &*w.add(j * per_row + b) };
            let (q, bits) = unsafe {
                (
                    _mm256_loadu_si256(block.quants.as_ptr().cast()),
                    block.scale_bits(),
                )
            };
            signed[j] = q;
            magnitude[j] = _mm256_sign_epi8(q, q);
            scale[j] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))));
        }
        for (i, sums) in acc.iter_mut().enumerate() {
            // SAFETY: block b of activation row i.
            let (xq, x_scale) = unsafe {
                (
                    _mm256_loadu_si256(x_quants.add(i * per_row + b).cast()),
                    *x_scales.add(i * per_row + b),
                )
            };
            for j in 0..J {
                // |w| * (x * sign(w)) = w * x, in the unsigned x signed
                // form `maddubs` takes; |q| <= 127 keeps pairs in i16.
                let products = _mm256_maddubs_epi16(magnitude[j], _mm256_sign_epi8(xq, signed[j]));
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones));
                sums[j] = _mm256_fmadd_ps(_mm256_set1_ps(scale[j] * x_scale), dot, sums[j]);
            }
        }
    }
    let mut out = [[0.0; J]; I];
    for (row, sums) in out.iter_mut().zip(&acc) {
        for (value, sum) in row.iter_mut().zip(sums) {
            *value = sum_lanes(*sum);
        }
    }
    out
}

/// The 8 lanes' sum, always in the same order.
#[target_feature(enable = "avx2")]
fn sum_lanes(v: __m256) -> f32 {
    let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
}
