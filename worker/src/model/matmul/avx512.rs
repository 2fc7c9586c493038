//! The tiles on x86-64 with AVX-512 F, BW and VNNI (Intel since Ice Lake,
//! AMD since Zen 4), chosen at run time by [`super::isa`]: the prefetching
//! of [`super::avx2`] at twice the width, batch tiles of `4 x 4` (32
//! registers hold 16 accumulators: half the activation reloads of `4 x 2`,
//! which bound prefill), and Q8_0 dot products on two blocks at once with
//! `vpdpbusd` (one instruction for the multiply-and-add of 64 quant pairs,
//! fed the weights biased to unsigned in a register).

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
        if c.is_multiple_of(32) {
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
pub fn q8_tile(x: XBlocks<'_>, rows: usize, w: WBlocks<'_>, cols: usize) -> Tile {
    assert!(rows <= ROWS && cols <= WIDE_COLS && x.per_row == w.per_row);
    let per_row = x.per_row;
    assert!(x.scales.len() >= rows * per_row && x.quants.len() >= rows * per_row);
    assert!(w.blocks.len() >= cols * per_row);
    let at = Q8Pointers {
        x_scales: x.scales.as_ptr(),
        x_quants: x.quants.as_ptr(),
        w: w.blocks.as_ptr(),
        per_row,
    };
    by_shape!(q8_fixed, rows, cols, at)
}

/// Where a Q8_0 tile reads: rows of `per_row` blocks from each start.
#[derive(Clone, Copy)]
struct Q8Pointers {
    x_scales: *const f32,
    x_quants: *const [i8; Q8_BLOCK],
    w: *const GgmlBlock,
    per_row: usize,
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q8_fixed<const I: usize, const J: usize>(at: Q8Pointers) -> [[f32; J]; I] {
    let mut acc = [[_mm512_setzero_ps(); J]; I];
    let pairs = at.per_row / 2;
    for pair in 0..pairs {
        // SAFETY: blocks 2 * pair and 2 * pair + 1 < per_row.
        unsafe { q8_blocks::<I, J, true>(&mut acc, at, 2 * pair) };
    }
    if at.per_row % 2 == 1 {
        // SAFETY: the last block.
        unsafe { q8_blocks::<I, J, false>(&mut acc, at, at.per_row - 1) };
    }
    let mut out = [[0.0; J]; I];
    for (row, sums) in out.iter_mut().zip(&acc) {
        for (value, sum) in row.iter_mut().zip(sums) {
            *value = _mm512_reduce_add_ps(*sum);
        }
    }
    out
}

/// Adds blocks `b` and `b + 1` (`PAIR`) or block `b` alone to every sum:
/// lanes 0-7 hold block `b`, lanes 8-15 block `b + 1` (zeros, with a zero
/// scale, when alone, so they add exactly 0).
///
/// The weights are biased in a register (`w + 128`, unsigned: one `xor`),
/// so `vpdpbusd` multiplies them with the signed activations: `sum (w +
/// 128) x` started from `-128 sum x` (one more `vpdpbusd` per activation
/// block) is `sum w x`.
///
/// # Safety
/// The blocks must exist in every row the tile reads.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q8_blocks<const I: usize, const J: usize, const PAIR: bool>(
    acc: &mut [[__m512; J]; I],
    at: Q8Pointers,
    b: usize,
) {
    // Lanes 0-7 from element 0, lanes 8-15 from element 1.
    let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let bias = _mm512_set1_epi8(-128);
    // SAFETY (all reads below): the caller's contract.
    let load = |q: *const u8| unsafe {
        match PAIR {
            true => _mm512_loadu_si512(q.cast()),
            false => _mm512_zextsi256_si512(_mm256_loadu_si256(q.cast())),
        }
    };
    let mut weights = [_mm512_setzero_si512(); J];
    let mut w_scale = [_mm512_setzero_ps(); J];
    for j in 0..J {
        let at_block = j * at.per_row + b;
        // The next tile's two blocks, 68 bytes: the line after them is the
        // next pair's first.
        let next = at.w.wrapping_add(J * at.per_row + at_block);
        _mm_prefetch::<_MM_HINT_T0>(next.cast());
        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(1).cast());
        // SAFETY: the caller's contract: block b (and b + 1) of row j.
        let (first, bits) = unsafe {
            let first = &*at.w.add(at_block);
            let bits = match PAIR {
                true => {
                    let second = &*at.w.add(at_block + 1);
                    u32::from(first.scale_bits()) | u32::from(second.scale_bits()) << 16
                }
                false => u32::from(first.scale_bits()),
            };
            (first, bits)
        };
        let quants = match PAIR {
            // SAFETY: as above; the second block's quants lie 34 bytes on.
            true => unsafe {
                let low = _mm256_loadu_si256(first.quants.as_ptr().cast());
                let high = _mm256_loadu_si256((*at.w.add(at_block + 1)).quants.as_ptr().cast());
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
            },
            false => {
                _mm512_zextsi256_si512(unsafe { _mm256_loadu_si256(first.quants.as_ptr().cast()) })
            }
        };
        // Signed to unsigned: `w + 128` is `w` with its top bit flipped.
        // A lone block's upper lanes become 128 too, against activations
        // and a scale of zero.
        weights[j] = _mm512_xor_si512(quants, bias);
        let pair = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
        w_scale[j] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(pair));
    }
    for (i, sums) in acc.iter_mut().enumerate() {
        let block = i * at.per_row + b;
        let xq = load(at.x_quants.wrapping_add(block).cast());
        // -128 * (sum of each lane's 4 activations); `bias` read unsigned is
        // +128, so negate.
        let unbias = _mm512_sub_epi32(
            _mm512_setzero_si512(),
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, xq),
        );
        let pair = unsafe {
            match PAIR {
                true => _mm_castpd_ps(_mm_load_sd(at.x_scales.add(block).cast())),
                false => _mm_load_ss(at.x_scales.add(block)),
            }
        };
        let x_scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(pair));
        for j in 0..J {
            let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(unbias, weights[j], xq));
            sums[j] = _mm512_fmadd_ps(_mm512_mul_ps(w_scale[j], x_scale), dot, sums[j]);
        }
    }
}
