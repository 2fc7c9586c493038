use half::f16;

use super::*;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn reference(x: &[f32], rows: usize, w: &[f32], cols: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[i * cols + j] = (0..k)
                .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                .sum();
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f64], tolerance: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (at, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= tolerance * (1.0 + w.abs()),
            "{what}: element {at}: {g} vs {w}"
        );
    }
}

const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 8),
    (1, 37, 64),
    (2, 3, 13),
    (3, 17, 96),
    (5, 8, 40),
    (8, 40, 64),
    (17, 9, 32),
    (40, 70, 64),
];

#[test]
fn f16_product_matches_the_reference_at_every_tile_shape() {
    for (seed, &(rows, cols, k)) in SHAPES.iter().enumerate() {
        let x = values(rows * k, seed as u64);
        let w: Vec<f16> = values(cols * k, 100 + seed as u64)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let got = f16_product(&x, rows, &w, cols, k);
        assert_close(
            &got,
            &reference(&x, rows, &wide, cols, k),
            1e-5,
            &format!("{rows}x{cols}x{k}"),
        );
    }
}

#[test]
fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
    let (cols, k) = (70, 96);
    let w: Vec<f16> = values(cols * k, 7).into_iter().map(f16::from_f32).collect();
    let q = q8_matrix(&values(cols * k, 8), cols, k);
    let x = values(9 * k, 9);
    for rows in [2, 3, 4, 5, 9] {
        let batched = f16_product(&x[..rows * k], rows, &w, cols, k);
        let batched_q8 = q.product(&x[..rows * k], rows);
        for i in 0..rows {
            let row = &x[i * k..(i + 1) * k];
            assert_eq!(
                f16_product(row, 1, &w, cols, k),
                batched[i * cols..(i + 1) * cols],
                "f16 row {i} of {rows}"
            );
            assert_eq!(
                q.product(row, 1),
                batched_q8[i * cols..(i + 1) * cols],
                "q8_0 row {i} of {rows}"
            );
        }
    }
}

/// GGML bytes for `w` quantized to Q8_0, and the values they stand for.
fn q8_bytes(w: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut dequantized = Vec::new();
    for block in w.chunks_exact(Q8_BLOCK) {
        let (scales, quants) = quantize(block);
        let (scale, quants) = (f16::from_f32(scales[0]), quants[0]);
        bytes.extend_from_slice(&scale.to_bits().to_le_bytes());
        bytes.extend(quants.iter().map(|q| *q as u8));
        dequantized.extend(quants.iter().map(|q| scale.to_f32() * f32::from(*q)));
    }
    (bytes, dequantized)
}

fn q8_matrix(w: &[f32], cols: usize, k: usize) -> Q8Matrix {
    Q8Matrix::from_ggml(&q8_bytes(w).0, cols, k).expect("q8_0")
}

#[test]
fn q8_product_is_the_dot_of_the_quantized_values() {
    for (seed, &(rows, cols, k)) in SHAPES.iter().enumerate() {
        if k % Q8_BLOCK != 0 {
            continue;
        }
        let x = values(rows * k, seed as u64);
        let (bytes, w) = q8_bytes(&values(cols * k, 50 + seed as u64));
        let matrix = Q8Matrix::from_ggml(&bytes, cols, k).expect("q8_0");
        let (x_scales, x_quants) = quantize(&x);
        let xq: Vec<f32> = x_scales
            .iter()
            .zip(&x_quants)
            .flat_map(|(scale, quants)| quants.map(|q| scale * f32::from(q)))
            .collect();
        let got = matrix.product(&x, rows);
        let what = format!("{rows}x{cols}x{k}");
        assert_close(&got, &reference(&xq, rows, &w, cols, k), 1e-5, &what);
        // And within quantization error of the unquantized product.
        assert_close(&got, &reference(&x, rows, &w, cols, k), 0.05, &what);
    }
}

#[test]
fn q8_rejects_partial_blocks_and_short_data() {
    assert!(Q8Matrix::from_ggml(&[0; 34], 1, 16).is_err());
    assert!(Q8Matrix::from_ggml(&[0; 33], 1, 32).is_err());
    assert!(Q8Matrix::from_ggml(&[0; 68], 2, 32).is_ok());
}

#[test]
fn the_simd_tiles_agree_with_the_portable_ones() {
    // 3 blocks per row: AVX-512's pairs of blocks end on an odd one.
    let k = 96;
    let x = values(4 * k, 1);
    let w: Vec<f16> = values(8 * k, 2).into_iter().map(f16::from_f32).collect();
    let q = q8_matrix(&values(8 * k, 3), 8, k);
    let (x_scales, x_quants) = quantize(&x);
    let xq = XBlocks {
        scales: &x_scales,
        quants: &x_quants,
        per_row: k / Q8_BLOCK,
    };
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
    let mut checked = 0;
    for (rows, cols) in [
        (1, 1),
        (1, 2),
        (1, 8),
        (2, 2),
        (3, 1),
        (4, 2),
        (3, 4),
        (4, 4),
    ] {
        let want_f16 = portable::f16_tile(&x, rows, &w, cols, k);
        let want_q8 = portable::q8_tile(xq, rows, q.blocks(), cols);
        let mut simd: Vec<(&str, Tile, Tile)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            // A CPU with AVX-512 has AVX2 too: both are checked there.
            if matches!(isa(), Isa::Avx2 | Isa::Avx512) {
                simd.push((
                    "avx2",
                    avx2::f16_tile(&x, rows, &w, cols, k),
                    avx2::q8_tile(xq, rows, q.blocks(), cols),
                ));
            }
            if isa() == Isa::Avx512 {
                simd.push((
                    "avx512",
                    avx512::f16_tile(&x, rows, &w, cols, k),
                    avx512::q8_tile(xq, rows, q.blocks(), cols),
                ));
            }
        }
        for (isa, got_f16, got_q8) in simd {
            for i in 0..rows {
                for j in 0..cols {
                    assert!(close(got_f16[i][j], want_f16[i][j]), "{isa} f16 {i},{j}");
                    assert!(close(got_q8[i][j], want_q8[i][j]), "{isa} q8 {i},{j}");
                    checked += 1;
                }
            }
        }
    }
    println!(
        "{checked} SIMD dot products checked (instruction set {:?})",
        isa()
    );
}

#[test]
fn a_mapped_matrix_reads_the_files_blocks_in_place() {
    let (cols, k) = (8, 96);
    let (bytes, _) = q8_bytes(&values(cols * k, 9));
    // Behind a header, as in a GGUF file.
    let mut file_bytes = vec![7u8; 13];
    file_bytes.extend_from_slice(&bytes);
    let path = std::env::temp_dir().join(format!("ebb-q8-{}.bin", std::process::id()));
    std::fs::write(&path, &file_bytes).expect("write");
    let file = std::fs::File::open(&path).expect("open");
    // SAFETY: a private temporary file nothing else writes.
    #[allow(unsafe_code)]
    let map = std::sync::Arc::new(unsafe { memmap2::Mmap::map(&file) }.expect("map"));
    std::fs::remove_file(&path).expect("remove");
    let mapped = Q8Matrix::mapped(map.clone(), 13, cols, k).expect("in the file");
    let owned = Q8Matrix::from_ggml(&bytes, cols, k).expect("q8_0");
    let x = values(3 * k, 10);
    assert_eq!(mapped.product(&x, 3), owned.product(&x, 3));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    mapped.dequantize_row(5, &mut a);
    owned.dequantize_row(5, &mut b);
    assert_eq!(a, b);
    assert!(
        Q8Matrix::mapped(map, 14, cols, k).is_err(),
        "one byte past the end"
    );
}
