//! The tiles on x86-64 with AVX-512 F, BW and VNNI (Intel since Ice Lake,
//! AMD since Zen 4), chosen at run time by [`super::isa`]: the shapes and
//! prefetching of [`super::avx2`] at twice the width, and Q8_0 dot products
//! on two blocks at once with `vpdpbusd` (one instruction for the
//! multiply-and-add of 64 quant pairs).

// Intrinsics on raw pointers; every entry point checks the slice lengths the
// pointers walk, and is only reached when the CPU has the features (see
// `super::isa`).
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use half::f16;

use super::{Blocks, COLS, Q8_BLOCK, ROWS, Tile, WIDE_COLS};

/// Calls `$kernel::<I, J>` for the tile's shape and widens its result.
macro_rules! by_shape {
    ($kernel:ident, $rows:expr, $cols:expr, $($arg:expr),*) => {
        // SAFETY: the caller checked lengths; `isa()` checked the features.
        unsafe {
            match ($rows, $cols) {
                (1, 1) => widen($kernel::<1, 1>($($arg),*)),
                (1, 2) => widen($kernel::<1, 2>($($arg),*)),
                (1, WIDE_COLS) => widen($kernel::<1, WIDE_COLS>($($arg),*)),
                (2, 1) => widen($kernel::<2, 1>($($arg),*)),
                (2, 2) => widen($kernel::<2, 2>($($arg),*)),
                (3, 1) => widen($kernel::<3, 1>($($arg),*)),
                (3, 2) => widen($kernel::<3, 2>($($arg),*)),
                (4, 1) => widen($kernel::<4, 1>($($arg),*)),
                (4, 2) => widen($kernel::<4, 2>($($arg),*)),
                (rows, cols) => unreachable!("no {rows}x{cols} tile"),
            }
        }
    };
}

fn widen<const I: usize, const J: usize>(fixed: [[f32; J]; I]) -> Tile {
    let mut tile = [[0.0; WIDE_COLS]; ROWS];
    for (row, values) in tile.iter_mut().zip(fixed) {
        row[..J].copy_from_slice(&values);
    }
    tile
}

/// `rows` activation rows of `x` dotted with `cols` f16 weight rows of `w`.
pub fn f16_tile(x: &[f32], rows: usize, w: &[f16], cols: usize, k: usize) -> Tile {
    assert!(rows <= ROWS && cols <= WIDE_COLS.max(COLS));
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

#[target_feature(enable = "avx512f")]
unsafe fn f16_fixed<const I: usize, const J: usize>(
    x: *const f32,
    w: *const u16,
    k: usize,
) -> [[f32; J]; I] {
    let mut acc = [[_mm512_setzero_ps(); J]; I];
    let body = k - k % 16;
    let mut c = 0;
    while c < body {
        if c % 32 == 0 {
            // The next tile's weight rows, one cache line each.
            for j in J..2 * J {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j * k + c).cast());
            }
        }
        let mut weights = [_mm512_setzero_ps(); J];
        for (j, weight) in weights.iter_mut().enumerate() {
            // SAFETY: c + 16 <= k and j < J: inside row j.
            *weight = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(w.add(j * k + c).cast()) });
        }
        for (i, sums) in acc.iter_mut().enumerate() {
            // SAFETY: inside row i.
            let xs = unsafe { _mm512_loadu_ps(x.add(i * k + c)) };
            for (sum, weight) in sums.iter_mut().zip(&weights) {
                *sum = _mm512_fmadd_ps(xs, *weight, *sum);
            }
        }
        c += 16;
    }
    let mut out = [[0.0; J]; I];
    for (i, (row, sums)) in out.iter_mut().zip(&acc).enumerate() {
        for (j, (value, sum)) in row.iter_mut().zip(sums).enumerate() {
            let mut total = _mm512_reduce_add_ps(*sum);
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
pub fn q8_tile(x: Blocks<'_, f32>, rows: usize, w: Blocks<'_, u16>, cols: usize) -> Tile {
    assert!(rows <= ROWS && cols <= WIDE_COLS.max(COLS) && x.per_row == w.per_row);
    let per_row = x.per_row;
    assert!(x.scales.len() >= rows * per_row && x.quants.len() >= rows * per_row);
    assert!(w.scales.len() >= cols * per_row && w.quants.len() >= cols * per_row);
    by_shape!(
        q8_fixed,
        rows,
        cols,
        x.scales.as_ptr(),
        x.quants.as_ptr(),
        w.scales.as_ptr(),
        w.quants.as_ptr(),
        per_row
    )
}

/// Lanes 0-7 `low`, lanes 8-15 `high`: the scales of a pair of blocks. An
/// odd last block (`count` 1) gets 0 for its missing partner, whose zero
/// quants then add exactly 0.
#[target_feature(enable = "avx512f")]
fn scales(low: f32, high: f32, count: usize) -> __m512 {
    let high = if count == 2 { high } else { 0.0 };
    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(low), _mm512_set1_ps(high))
}

#[target_feature(enable = "f16c")]
fn f16_bits_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Two consecutive blocks' quants (64 bytes), or one and zeros for an odd
/// last block.
///
/// # Safety
/// `at` must point at `count` (1 or 2) readable blocks.
#[target_feature(enable = "avx512f")]
unsafe fn load_pair(at: *const [i8; Q8_BLOCK], count: usize) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        match count {
            2 => _mm512_loadu_si512(at.cast()),
            _ => _mm512_zextsi256_si512(_mm256_loadu_si256(at.cast())),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q8_fixed<const I: usize, const J: usize>(
    x_scales: *const f32,
    x_quants: *const [i8; Q8_BLOCK],
    w_scales: *const u16,
    w_quants: *const [i8; Q8_BLOCK],
    per_row: usize,
) -> [[f32; J]; I] {
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); J]; I];
    let mut b = 0;
    while b < per_row {
        let count = (per_row - b).min(2);
        let mut negative = [0u64; J];
        let mut magnitude = [zero; J];
        let mut w_scale = [_mm512_setzero_ps(); J];
        for j in 0..J {
            let row = j * per_row;
            _mm_prefetch::<_MM_HINT_T0>(w_quants.wrapping_add(J * per_row + row + b).cast());
            // SAFETY: blocks b..b + count of weight row j.
            let q = unsafe { load_pair(w_quants.add(row + b), count) };
            negative[j] = _mm512_movepi8_mask(q);
            magnitude[j] = _mm512_abs_epi8(q);
            // SAFETY: the same blocks' scales.
            let (low, high) =
                unsafe { (*w_scales.add(row + b), *w_scales.add(row + b + count - 1)) };
            w_scale[j] = scales(f16_bits_to_f32(low), f16_bits_to_f32(high), count);
        }
        for (i, sums) in acc.iter_mut().enumerate() {
            let row = i * per_row;
            // SAFETY: blocks b..b + count of activation row i.
            let xq = unsafe { load_pair(x_quants.add(row + b), count) };
            // SAFETY: the same blocks' scales.
            let (low, high) =
                unsafe { (*x_scales.add(row + b), *x_scales.add(row + b + count - 1)) };
            let x_scale = scales(low, high, count);
            for j in 0..J {
                // |w| * (x * sign(w)) = w * x, in the unsigned x signed
                // form `vpdpbusd` takes.
                let signed = _mm512_mask_sub_epi8(xq, negative[j], zero, xq);
                let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, magnitude[j], signed));
                let scale = _mm512_mul_ps(w_scale[j], x_scale);
                sums[j] = _mm512_fmadd_ps(scale, dot, sums[j]);
            }
        }
        b += count;
    }
    let mut out = [[0.0; J]; I];
    for (row, sums) in out.iter_mut().zip(&acc) {
        for (value, sum) in row.iter_mut().zip(sums) {
            *value = _mm512_reduce_add_ps(*sum);
        }
    }
    out
}
