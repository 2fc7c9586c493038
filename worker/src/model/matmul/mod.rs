//! `x W^T` on CPU for the few rows of a decode step, f16 and Q8_0 weights.
//!
//! candle's CPU matmul (the `gemm` crate) packs the right-hand side on every
//! call; for a step of 2-16 rows that repacks every weight every step and
//! ran slower at 8 rows than at 1. These kernels read each weight where it
//! lies: a tile of 2-8 weight rows ([`Isa::tile_cols`]) is loaded (and
//! converted) once and dotted with up to [`ROWS`] activation rows held in
//! registers, so a batch of 8 costs about one weight read; the next tile is
//! prefetched meanwhile, and threads (rayon's pool, which the forward step
//! runs on) split the output columns.
//!
//! Every output `(i, j)` is summed in the same order whatever the number of
//! rows beside it, so a sequence's logits are bit-identical batched and
//! alone (the batching tests compare tokens exactly).
//!
//! # Layout
//! - this module: the tiling and threading ([`product`]), [`f16_product`],
//!   [`Q8Matrix`] and the choice of instruction set.
//! - [`avx512`]: the x86-64 AVX-512 (F, BW, VNNI) tiles.
//! - [`avx2`]: the x86-64 AVX2 + FMA + F16C tiles.
//! - [`portable`]: the same tiles in plain Rust, for other CPUs and as the
//!   reference in tests.

/// Calls `$kernel::<I, J>($args)` for a tile of `$rows x $cols` and widens
/// its `[[f32; J]; I]` to a [`Tile`]. The shapes are those
/// [`Isa::tile_cols`] and the remainders of [`product`] ask for.
#[cfg(target_arch = "x86_64")]
macro_rules! by_shape {
    ($kernel:ident, $rows:expr, $cols:expr, $($arg:expr),*) => {
        // SAFETY: the caller checked lengths; `isa()` checked the features.
        unsafe {
            match ($rows, $cols) {
                (1, 1) => $crate::model::matmul::widen($kernel::<1, 1>($($arg),*)),
                (1, 2) => $crate::model::matmul::widen($kernel::<1, 2>($($arg),*)),
                (1, 4) => $crate::model::matmul::widen($kernel::<1, 4>($($arg),*)),
                (1, 8) => $crate::model::matmul::widen($kernel::<1, 8>($($arg),*)),
                (2, 1) => $crate::model::matmul::widen($kernel::<2, 1>($($arg),*)),
                (2, 2) => $crate::model::matmul::widen($kernel::<2, 2>($($arg),*)),
                (2, 4) => $crate::model::matmul::widen($kernel::<2, 4>($($arg),*)),
                (3, 1) => $crate::model::matmul::widen($kernel::<3, 1>($($arg),*)),
                (3, 2) => $crate::model::matmul::widen($kernel::<3, 2>($($arg),*)),
                (3, 4) => $crate::model::matmul::widen($kernel::<3, 4>($($arg),*)),
                (4, 1) => $crate::model::matmul::widen($kernel::<4, 1>($($arg),*)),
                (4, 2) => $crate::model::matmul::widen($kernel::<4, 2>($($arg),*)),
                (4, 4) => $crate::model::matmul::widen($kernel::<4, 4>($($arg),*)),
                (rows, cols) => unreachable!("no {rows}x{cols} tile"),
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

/// Activation rows one tile holds in registers.
pub const ROWS: usize = 4;
/// Weight rows (output columns) a batch tile loads at a time with AVX2's 16
/// registers (4 x 2 sums); AVX-512's 32 hold 4 x 4.
pub const COLS: usize = 2;
const AVX512_COLS: usize = 4;
/// Columns of a one-row tile: with a single activation row, eight
/// independent sums keep the FMA units busy while the weights stream in.
pub const WIDE_COLS: usize = 8;
/// Activation rows kept hot in L2 while a thread walks its columns: a long
/// prefill chunk is taken in slices of this many rows.
const ROW_SLICE: usize = 32;
/// Weights per Q8_0 block (GGML's layout: one f16 scale, 32 `i8`).
pub const Q8_BLOCK: usize = 32;

/// Up to `ROWS x WIDE_COLS` dot products; only the top-left `rows x cols`
/// are meaningful.
pub type Tile = [[f32; WIDE_COLS]; ROWS];

/// Instruction set the kernels use, chosen once per process so that every
/// step sums in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// The best instruction set this CPU has, or the one `EBB_MATMUL_ISA`
/// (`avx512`, `avx2`, `portable`) names if the CPU has it, to compare them.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let supported = supported();
        let wanted = std::env::var("EBB_MATMUL_ISA").ok();
        let named = supported.iter().find(|isa| Some(isa.name()) == wanted.as_deref());
        match (named, wanted) {
            (Some(isa), _) => *isa,
            (None, Some(wanted)) => {
                tracing::warn!(
                    wanted,
                    "EBB_MATMUL_ISA names an instruction set this CPU lacks (or none); using the best"
                );
                supported[0]
            }
            (None, None) => supported[0],
        }
    })
}

/// The instruction sets this CPU runs, best first.
fn supported() -> Vec<Isa> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("f16c") {
            found.push(Isa::Avx512);
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            found.push(Isa::Avx2);
        }
    }
    found.push(Isa::Portable);
    found
}

impl Isa {
    /// Weight rows per tile for a product of `rows` activation rows. More
    /// columns per tile mean fewer reloads of the activations, which for a
    /// prefill chunk come from L2 and bound the speed.
    fn tile_cols(self, rows: usize) -> usize {
        match (rows, self) {
            (1, _) => WIDE_COLS,
            (_, Isa::Avx512) => AVX512_COLS,
            _ => COLS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// `[rows, k] x [cols, k]^T` for f16 weights: `x` is row-major f32, `w`
/// row-major f16 with one row per output column.
pub fn f16_product(x: &[f32], rows: usize, w: &[f16], cols: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "activations are [rows, k]");
    assert_eq!(w.len(), cols * k, "weights are [cols, k]");
    let isa = isa();
    product(rows, cols, isa.tile_cols(rows), |i, ni, j, nj| {
        let x = &x[i * k..(i + ni) * k];
        let w = &w[j * k..(j + nj) * k];
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::f16_tile(x, ni, w, nj, k),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::f16_tile(x, ni, w, nj, k),
            _ => portable::f16_tile(x, ni, w, nj, k),
        }
    })
}

/// Q8_0 blocks of some rows, `per_row` each: a scale and 32 quants per
/// block, in two arrays so that consecutive blocks' quants are contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Blocks<'a, S, Q> {
    pub scales: &'a [S],
    pub quants: &'a [[Q; Q8_BLOCK]],
    pub per_row: usize,
}

/// Activations: f32 scales, `i8` quants.
pub type XBlocks<'a> = Blocks<'a, f32, i8>;
/// Weights: f16 scales (raw bits, as in the file) and quants stored biased,
/// `q + 128` as `u8`: the unsigned operand `vpdpbusd` multiplies with the
/// activations' signed one (the bias is taken back out per activation
/// block, see `avx512`).
pub type WBlocks<'a> = Blocks<'a, u16, u8>;

/// A weight quant back from its biased form.
pub fn unbias(q: u8) -> i8 {
    (q ^ 0x80) as i8
}

impl<S, Q> Blocks<'_, S, Q> {
    /// Rows `first..first + count`.
    fn rows(&self, first: usize, count: usize) -> Blocks<'_, S, Q> {
        let range = first * self.per_row..(first + count) * self.per_row;
        Blocks {
            scales: &self.scales[range.clone()],
            quants: &self.quants[range],
            per_row: self.per_row,
        }
    }
}

/// A GGML Q8_0 matrix `[cols, k]`.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    /// One f16 scale per block, as raw bits, `[cols, k / 32]`.
    scales: Vec<u16>,
    /// Biased (see [`WBlocks`]).
    quants: Vec<[u8; Q8_BLOCK]>,
    cols: usize,
    k: usize,
}

impl Q8Matrix {
    /// From GGML's bytes: per block a little-endian f16 scale then 32 `i8`.
    pub fn from_ggml(bytes: &[u8], cols: usize, k: usize) -> Result<Q8Matrix, String> {
        if !k.is_multiple_of(Q8_BLOCK) {
            return Err(format!("Q8_0 rows of {k} are not whole blocks of 32"));
        }
        let blocks = cols * k / Q8_BLOCK;
        if bytes.len() != blocks * (2 + Q8_BLOCK) {
            return Err(format!(
                "Q8_0 [{cols}, {k}] needs {} bytes, has {}",
                blocks * (2 + Q8_BLOCK),
                bytes.len()
            ));
        }
        // Repacking is most of a GGUF model's load time once the file is
        // read: spread it over the pool, in runs long enough to amortize a
        // task and short enough to balance.
        const RUN: usize = 16 * 1024;
        let mut scales = vec![0u16; blocks];
        let mut quants = vec![[0u8; Q8_BLOCK]; blocks];
        scales
            .par_chunks_mut(RUN)
            .zip(quants.par_chunks_mut(RUN))
            .zip(bytes.par_chunks(RUN * (2 + Q8_BLOCK)))
            .for_each(|((scales, quants), bytes)| {
                let blocks = bytes.chunks_exact(2 + Q8_BLOCK);
                for ((scale, quant), block) in scales.iter_mut().zip(quants).zip(blocks) {
                    *scale = u16::from_le_bytes([block[0], block[1]]);
                    *quant = std::array::from_fn(|q| block[2 + q] ^ 0x80);
                }
            });
        Ok(Q8Matrix {
            scales,
            quants,
            cols,
            k,
        })
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `row` as f32 values appended to `out`: a lookup in a Q8_0
    /// embedding table, which is never dequantized whole.
    pub fn dequantize_row(&self, row: usize, out: &mut Vec<f32>) {
        let per_row = self.k / Q8_BLOCK;
        for block in row * per_row..(row + 1) * per_row {
            let scale = f16::from_bits(self.scales[block]).to_f32();
            out.extend(
                self.quants[block]
                    .iter()
                    .map(|q| scale * f32::from(unbias(*q))),
            );
        }
    }

    fn blocks(&self) -> WBlocks<'_> {
        Blocks {
            scales: &self.scales,
            quants: &self.quants,
            per_row: self.k / Q8_BLOCK,
        }
    }

    /// `[rows, k] x self^T`, the activations quantized to Q8_0 per block
    /// first (as llama.cpp does), so the inner loop is integer dot products.
    pub fn product(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.k, "activations are [rows, k]");
        let (x_scales, x_quants) = quantize(x);
        let x = Blocks {
            scales: &x_scales,
            quants: &x_quants,
            per_row: self.k / Q8_BLOCK,
        };
        let w = self.blocks();
        let isa = isa();
        product(rows, self.cols, isa.tile_cols(rows), |i, ni, j, nj| {
            let (x, w) = (x.rows(i, ni), w.rows(j, nj));
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => avx512::q8_tile(x, ni, w, nj),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => avx2::q8_tile(x, ni, w, nj),
                _ => portable::q8_tile(x, ni, w, nj),
            }
        })
    }
}

/// Symmetric 8-bit quantization per block of 32: `x ~ scale * q`.
fn quantize(x: &[f32]) -> (Vec<f32>, Vec<[i8; Q8_BLOCK]>) {
    x.chunks_exact(Q8_BLOCK)
        .map(|block| {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let quants = std::array::from_fn(|q| (block[q] * inverse).round() as i8);
            (scale, quants)
        })
        .unzip()
}

/// The output `[rows, cols]` of `tile(i, rows, j, cols)` over every tile,
/// `wide` columns a tile where they remain.
///
/// Threads take contiguous chunks of columns (weight rows), so each weight
/// is read by one thread; within a chunk, a tile's weight rows stay in L1
/// while every activation row of the slice passes them.
fn product(
    rows: usize,
    cols: usize,
    wide: usize,
    tile: impl Fn(usize, usize, usize, usize) -> Tile + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    let threads = rayon::current_num_threads().max(1);
    // A few chunks per thread balance uneven progress; each a whole number
    // of tiles.
    let chunk = cols
        .div_ceil(threads * 4)
        .next_multiple_of(WIDE_COLS)
        .max(16);
    let target = OutputColumns::new(&mut out, cols);
    (0..cols.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let (first, end) = (c * chunk, ((c + 1) * chunk).min(cols));
        for slice in (0..rows).step_by(ROW_SLICE) {
            let slice_end = (slice + ROW_SLICE).min(rows);
            let mut j = first;
            while j < end {
                let nj = match end - j {
                    left if left >= wide => wide,
                    left if left >= COLS => COLS,
                    _ => 1,
                };
                for i in (slice..slice_end).step_by(ROWS) {
                    let ni = (slice_end - i).min(ROWS);
                    target.write(i, ni, j, nj, &tile(i, ni, j, nj));
                }
                j += nj;
            }
        }
    });
    out
}

#[cfg(target_arch = "x86_64")]
fn widen<const I: usize, const J: usize>(fixed: [[f32; J]; I]) -> Tile {
    let mut tile = [[0.0; WIDE_COLS]; ROWS];
    for (row, values) in tile.iter_mut().zip(fixed) {
        row[..J].copy_from_slice(&values);
    }
    tile
}

/// `[rows, cols]` output that threads fill in disjoint column ranges.
struct OutputColumns {
    ptr: *mut f32,
    len: usize,
    cols: usize,
}

// SAFETY: `product` hands each column range to exactly one task, so no two
// threads ever write the same element, and `out` outlives the parallel loop.
#[allow(unsafe_code)]
unsafe impl Sync for OutputColumns {}

impl OutputColumns {
    fn new(out: &mut [f32], cols: usize) -> OutputColumns {
        OutputColumns {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            cols,
        }
    }

    fn write(&self, i: usize, ni: usize, j: usize, nj: usize, tile: &Tile) {
        for (a, row) in tile.iter().enumerate().take(ni) {
            for (b, value) in row.iter().enumerate().take(nj) {
                let at = (i + a) * self.cols + j + b;
                assert!(at < self.len);
                // SAFETY: in bounds (checked above) and written by this
                // task only (see `Sync`).
                #[allow(unsafe_code)]
                unsafe {
                    self.ptr.add(at).write(*value)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests;
