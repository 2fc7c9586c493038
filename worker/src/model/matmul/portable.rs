//! The tiles in plain Rust: the path on CPUs without AVX2 and the reference
//! the SIMD tiles are tested against. Each dot product is summed in order
//! over `k`, whatever the tile's shape.

use half::f16;

use super::{Tile, WBlocks, XBlocks};

pub fn f16_tile(x: &[f32], rows: usize, w: &[f16], cols: usize, k: usize) -> Tile {
    let mut tile = Tile::default();
    for (i, out) in tile.iter_mut().enumerate().take(rows) {
        let x = &x[i * k..(i + 1) * k];
        for (j, value) in out.iter_mut().enumerate().take(cols) {
            let w = &w[j * k..(j + 1) * k];
            *value = x
                .iter()
                .zip(w)
                .fold(0.0, |sum, (a, b)| a.mul_add(b.to_f32(), sum));
        }
    }
    tile
}

pub fn q8_tile(x: XBlocks<'_>, rows: usize, w: WBlocks<'_>, cols: usize) -> Tile {
    let mut tile = Tile::default();
    for (i, out) in tile.iter_mut().enumerate().take(rows) {
        let x = x.rows(i, 1);
        for (j, value) in out.iter_mut().enumerate().take(cols) {
            let w = w.rows(j, 1);
            let blocks = x.scales.iter().zip(x.quants).zip(w.blocks);
            *value = blocks.fold(0.0, |sum, ((x_scale, xq), block)| {
                let dot: i32 = xq
                    .iter()
                    .zip(&block.quants)
                    .map(|(a, b)| i32::from(*a) * i32::from(*b))
                    .sum();
                (f16::from_bits(block.scale_bits()).to_f32() * x_scale).mul_add(dot as f32, sum)
            });
        }
    }
    tile
}
