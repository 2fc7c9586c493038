//! The tiles in plain Rust: the path on CPUs without AVX2 and the reference
//! the SIMD tiles are tested against. Each dot product is summed in order
//! over `k`, whatever the tile's shape.

use half::f16;

use super::{Q8_BLOCK, Tile, XBlock};

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

pub fn q8_tile(
    x: &[XBlock],
    rows: usize,
    scales: &[u16],
    quants: &[[i8; Q8_BLOCK]],
    cols: usize,
    per_row: usize,
) -> Tile {
    let mut tile = Tile::default();
    for (i, out) in tile.iter_mut().enumerate().take(rows) {
        let x = &x[i * per_row..(i + 1) * per_row];
        for (j, value) in out.iter_mut().enumerate().take(cols) {
            let blocks = j * per_row..(j + 1) * per_row;
            *value = x
                .iter()
                .zip(&scales[blocks.clone()])
                .zip(&quants[blocks])
                .fold(0.0, |sum, ((xb, bits), q)| {
                    let dot: i32 = xb
                        .quants
                        .iter()
                        .zip(q)
                        .map(|(a, b)| i32::from(*a) * i32::from(*b))
                        .sum();
                    (f16::from_bits(*bits).to_f32() * xb.scale).mul_add(dot as f32, sum)
                });
        }
    }
    tile
}
