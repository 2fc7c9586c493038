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
//!   [`Q8Matrix`] (GGML's Q8_0 blocks, read where the GGUF file's mapping
//!   holds them) and the choice of instruction set.
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

use std::sync::{Arc, OnceLock};

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

/// Quantized activations of some rows, `per_row` blocks each: an f32
/// scale and 32 `i8` quants per block, in two arrays so that consecutive
/// blocks' quants are contiguous.
#[derive(Debug, Clone, Copy)]
pub struct XBlocks<'a> {
    pub scales: &'a [f32],
    pub quants: &'a [[i8; Q8_BLOCK]],
    pub per_row: usize,
}

impl XBlocks<'_> {
    /// Rows `first..first + count`.
    fn rows(&self, first: usize, count: usize) -> XBlocks<'_> {
        let range = first * self.per_row..(first + count) * self.per_row;
        XBlocks {
            scales: &self.scales[range.clone()],
            quants: &self.quants[range],
            per_row: self.per_row,
        }
    }
}

/// One Q8_0 block as GGML lays it out (and a GGUF file holds it): a
/// little-endian f16 scale, then 32 signed quants. 34 bytes, aligned to 1,
/// so a slice of them can be read straight out of the file's mapping.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GgmlBlock {
    pub scale: [u8; 2],
    pub quants: [i8; Q8_BLOCK],
}

impl GgmlBlock {
    /// The scale's f16 bits.
    pub fn scale_bits(&self) -> u16 {
        u16::from_le_bytes(self.scale)
    }

    /// `bytes` as blocks; `None` unless its length is a whole number of
    /// them.
    fn cast(bytes: &[u8]) -> Option<&[GgmlBlock]> {
        let size = std::mem::size_of::<GgmlBlock>();
        if !bytes.len().is_multiple_of(size) {
            return None;
        }
        // SAFETY: GgmlBlock is `repr(C)` of byte arrays: 34 bytes with no
        // padding, alignment 1, and every bit pattern valid; the length
        // was checked to be a whole number of blocks.
        #[allow(unsafe_code)]
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size) })
    }
}

/// Q8_0 weights of some rows, `per_row` blocks each, in GGML's layout.
#[derive(Debug, Clone, Copy)]
pub struct WBlocks<'a> {
    pub blocks: &'a [GgmlBlock],
    pub per_row: usize,
}

impl WBlocks<'_> {
    /// Rows `first..first + count`.
    fn rows(&self, first: usize, count: usize) -> WBlocks<'_> {
        WBlocks {
            blocks: &self.blocks[first * self.per_row..(first + count) * self.per_row],
            per_row: self.per_row,
        }
    }
}

/// A GGML Q8_0 matrix `[cols, k]`, its blocks read where they lie: in a
/// GGUF file's mapping (no copy, no repack: loading it costs only reading
/// the file) or, for weights made in memory, in a buffer of its own.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    bytes: Q8Bytes,
    cols: usize,
    k: usize,
}

#[derive(Debug, Clone)]
enum Q8Bytes {
    Owned(Vec<u8>),
    /// `len` bytes at `at` in a mapped file.
    Mapped {
        map: Arc<memmap2::Mmap>,
        at: usize,
        len: usize,
    },
}

impl Q8Matrix {
    /// A copy of GGML's bytes: per block a little-endian f16 scale then 32
    /// `i8`.
    pub fn from_ggml(bytes: &[u8], cols: usize, k: usize) -> Result<Q8Matrix, String> {
        Q8Matrix::checked(Q8Bytes::Owned(bytes.to_vec()), cols, k)
    }

    /// The `[cols, k]` Q8_0 matrix at byte `at` of a mapped GGUF file
    /// (`bytes_for(cols, k)` long), read in place.
    pub fn mapped(
        map: Arc<memmap2::Mmap>,
        at: usize,
        cols: usize,
        k: usize,
    ) -> Result<Q8Matrix, String> {
        let len = Q8Matrix::bytes_for(cols, k);
        if at.checked_add(len).is_none_or(|end| end > map.len()) {
            return Err(format!("Q8_0 [{cols}, {k}] runs past the file's end"));
        }
        Q8Matrix::checked(Q8Bytes::Mapped { map, at, len }, cols, k)
    }

    /// How many bytes a Q8_0 `[cols, k]` takes.
    pub fn bytes_for(cols: usize, k: usize) -> usize {
        cols * k / Q8_BLOCK * std::mem::size_of::<GgmlBlock>()
    }

    fn checked(bytes: Q8Bytes, cols: usize, k: usize) -> Result<Q8Matrix, String> {
        if !k.is_multiple_of(Q8_BLOCK) {
            return Err(format!("Q8_0 rows of {k} are not whole blocks of 32"));
        }
        let matrix = Q8Matrix { bytes, cols, k };
        let (need, has) = (Q8Matrix::bytes_for(cols, k), matrix.raw().len());
        if need != has {
            return Err(format!("Q8_0 [{cols}, {k}] needs {need} bytes, has {has}"));
        }
        Ok(matrix)
    }

    fn raw(&self) -> &[u8] {
        match &self.bytes {
            Q8Bytes::Owned(bytes) => bytes,
            Q8Bytes::Mapped { map, at, len } => &map[*at..*at + *len],
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `row` as f32 values appended to `out`: a lookup in a Q8_0
    /// embedding table, which is never dequantized whole.
    pub fn dequantize_row(&self, row: usize, out: &mut Vec<f32>) {
        for block in self.blocks().rows(row, 1).blocks {
            let scale = f16::from_bits(block.scale_bits()).to_f32();
            out.extend(block.quants.iter().map(|q| scale * f32::from(*q)));
        }
    }

    fn blocks(&self) -> WBlocks<'_> {
        WBlocks {
            blocks: GgmlBlock::cast(self.raw()).expect("checked to be whole blocks"),
            per_row: self.k / Q8_BLOCK,
        }
    }

    /// `[rows, k] x self^T`, the activations quantized to Q8_0 per block
    /// first (as llama.cpp does), so the inner loop is integer dot products.
    pub fn product(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.k, "activations are [rows, k]");
        let (x_scales, x_quants) = quantize(x);
        let x = XBlocks {
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
