//! KV cache store and causal attention (decode and prefill kernels) against the CPU reference, for
//! MHA and GQA, all KV dtypes, awkward key counts, continued prefill, huge scores, bidirectional
//! attention within one sequence of a batch, sliding windows over a ring, and refusals.
mod common;
use common::*;
use wgllm::kernels::attention::{self, bytes_per_token, AttentionKernel, KvCache, KvDtype};
use wgllm::kernels::Tensor;
use wgllm::BufferClass::Activations;
use wgllm::Gpu;

/// Which attention entry point a case runs.
#[derive(Debug, Clone, Copy)]
enum Entry {
    Auto,
    Decode,
    Prefill,
    /// attention_sg.wgsl (CPU devices with 8-lane subgroups)
    Subgroup,
    /// attention_sg.wgsl with the keys split in this many parts and merged; 0: `attention_split`'s
    /// own choice.
    Split(usize),
    /// attention.wgsl's grouped decode kernel (GPUs) with the keys in this many parts (1: no
    /// merge), forced on any device.
    Grouped(usize),
}

fn tensor(gpu: &Gpu, label: &str, shape: &[usize], data: &[f32]) -> Tensor {
    gpu.tensor_from(label, Activations, shape, data).unwrap()
}

/// One attention comparison: `n_keys` random K/V rows are stored (in two chunks, so that the
/// second store starts at pos0 > 0), then the last `m` positions attend.
#[derive(Debug, Clone, Copy)]
struct Case {
    entry: Entry,
    dtype: KvDtype,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    n_keys: usize,
    m: usize,
    /// Standard deviation of q and k.
    mag: f32,
    /// A vector of this standard deviation added to every key: a large score common to all keys.
    k_shift: f32,
    tol: f64,
}

/// A decode case of `n_keys` keys.
fn case(
    entry: Entry,
    dtype: KvDtype,
    heads: (usize, usize),
    hd: usize,
    n_keys: usize,
    m: usize,
) -> Case {
    Case {
        entry,
        dtype,
        n_heads: heads.0,
        n_kv: heads.1,
        hd,
        n_keys,
        m,
        mag: 1.0,
        k_shift: 0.0,
        tol: NMSE_ATTN,
    }
}

/// Runs `c` and compares with the reference on the cache's dequantised contents.
fn check(gpu: &Gpu, c: Case) {
    let Case {
        n_heads,
        n_kv,
        hd,
        n_keys,
        m,
        ..
    } = c;
    let what = format!("{c:?}");
    let cache = KvCache::new(gpu, "kv", c.dtype, n_keys + 3, n_kv, hd).unwrap();
    let row = n_kv * hd;
    let shift = randn(row, 10, c.k_shift);
    let mut k = randn(n_keys * row, 11, c.mag);
    k.iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x += shift[i % row]);
    let v = randn(n_keys * row, 12, 1.0);
    let pos0 = n_keys - m;
    let mut rec = gpu.recorder();
    let mut keep = Vec::new();
    for (a, b) in [(0, pos0), (pos0, n_keys)] {
        if a == b {
            continue;
        }
        let kt = tensor(gpu, "k", &[b - a, n_kv, hd], &k[a * row..b * row]);
        let vt = tensor(gpu, "v", &[b - a, n_kv, hd], &v[a * row..b * row]);
        attention::store(&mut rec, &cache, &kt, &vt, a).unwrap();
        keep.push((kt, vt));
    }
    let q = randn(m * n_heads * hd, 13, c.mag);
    let qt = tensor(gpu, "q", &[m, n_heads, hd], &q);
    let out = gpu.tensor("out", Activations, &[m, n_heads, hd]).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();
    match c.entry {
        Entry::Auto => attention::attention(&mut rec, &qt, &cache, pos0, scale, &out),
        Entry::Decode => attention::attention_decode(&mut rec, &qt, &cache, pos0, scale, &out),
        Entry::Prefill => attention::attention_prefill(&mut rec, &qt, &cache, pos0, scale, &out),
        Entry::Subgroup => attention::attention_subgroup(&mut rec, &qt, &cache, pos0, scale, &out),
        Entry::Split(parts) => {
            let bytes = attention::partials_bytes(n_heads, hd) as usize * m;
            let part = gpu.tensor("partials", Activations, &[bytes / 4]).unwrap();
            keep.push((part.clone(), part.clone()));
            if parts == 0 {
                attention::attention_split(&mut rec, &qt, &cache, pos0, scale, &part, &out)
            } else {
                let (q, c) = (&qt, &cache);
                attention::attention_split_with(&mut rec, q, c, pos0, scale, &part, &out, parts)
            }
        }
        Entry::Grouped(parts) => {
            let bytes = attention::partials_bytes(n_heads, hd) as usize * m;
            let part = gpu.tensor("partials", Activations, &[bytes / 4]).unwrap();
            keep.push((part.clone(), part.clone()));
            let (q, c) = (&qt, &cache);
            attention::attention_grouped(&mut rec, q, c, pos0, scale, &part, &out, parts)
        }
    }
    .unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&out).unwrap();
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{what}: non-finite output"
    );
    let (kc, vc) = cache.read(gpu, n_keys).unwrap();
    let want = attention::reference(&q, &kc, &vc, m, n_heads, n_kv, hd, pos0, scale);
    assert_close(&what, &got, &want, c.tol);
}

/// Online softmax in f32 (GPU exp) against the f64 reference on the same cache contents; about
/// 1e-13 is measured on lavapipe.
const NMSE_ATTN: f64 = tol::NMSE_F32;
/// Scores of magnitude 1e3 and more: one f32 rounding of a logit (~1e-4 absolute) shifts its
/// weight by as much. The point of these cases is that nothing overflows to inf or NaN.
const NMSE_HUGE_SCORES: f64 = 1e-5;

#[test]
fn store_round_trips_every_dtype() {
    let Some(gpu) = gpu() else { return };
    for dtype in KvDtype::ALL {
        for (n_kv, hd) in [(3, 64), (2, 96), (1, 256)] {
            let (ctx, pos0, m) = (9, 3, 5);
            let cache = KvCache::new(gpu, "kv", dtype, ctx, n_kv, hd).unwrap();
            assert_eq!(cache.k.class(), wgllm::BufferClass::KvCache);
            assert_eq!(cache.bytes(), ctx as u64 * bytes_per_token(dtype, n_kv, hd));
            let k = randn(m * n_kv * hd, 1, 2.0);
            let v = randn(m * n_kv * hd, 2, 0.5);
            let kt = tensor(gpu, "k", &[m, n_kv, hd], &k);
            let vt = tensor(gpu, "v", &[m, n_kv, hd], &v);
            let mut rec = gpu.recorder();
            attention::store(&mut rec, &cache, &kt, &vt, pos0).unwrap();
            rec.submit().unwrap();
            let (kc, vc) = cache.read(gpu, ctx).unwrap();
            let row = n_kv * hd;
            for (name, all, src) in [("k", &kc, &k), ("v", &vc, &v)] {
                let what = format!("store {dtype} {name} n_kv {n_kv} hd {hd}");
                let held = &all[pos0 * row..(pos0 + m) * row];
                let enc = attention::encode(dtype, src, hd).unwrap();
                let cpu = attention::decode(dtype, &enc, hd).unwrap();
                // f32 and f16 are exact conversions; q8_0 may differ in a rare tie of 1/d rounding.
                let t = if dtype == KvDtype::Q8_0 {
                    tol::NMSE_QUANT
                } else {
                    0.0
                };
                assert_close(&what, held, &cpu, t);
                // Positions outside pos0..pos0+m stay untouched (zero).
                assert!(
                    all[..pos0 * row].iter().all(|&x| x == 0.0),
                    "{what}: prefix written"
                );
                assert!(
                    all[(pos0 + m) * row..].iter().all(|&x| x == 0.0),
                    "{what}: suffix written"
                );
                // And the stored value is close to the input: the dtype's own rounding only.
                let err = if dtype == KvDtype::F32 { 0.0 } else { 1e-4 };
                assert_close(&what, held, src, err);
            }
        }
    }
}

/// RoPE + store in one dispatch equals RoPE, then the store: queries rotated in place, keys rotated
/// into the cache (every dtype, both pair layouts, GQA, partial rotary), k itself untouched.
#[test]
fn rope_store_equals_rope_then_store() {
    use wgllm::kernels::rope::{self, RopeMode};
    let Some(gpu) = gpu() else { return };
    for dtype in KvDtype::ALL {
        for mode in [RopeMode::Interleaved, RopeMode::Half] {
            // SmolLM2's 9 query and 3 kv heads of 64; MHA; partial rotary at head_dim 96.
            for ((m, nh, nkv, hd), rot) in [
                ((5, 9, 3, 64), 64),
                ((1, 4, 4, 32), 32),
                ((3, 6, 2, 96), 48),
            ] {
                if dtype == KvDtype::Q8_0 && hd % 32 != 0 {
                    continue;
                }
                let (ctx, pos0) = (12, 4);
                let cache = KvCache::new(gpu, "kv", dtype, ctx, nkv, hd).unwrap();
                let q = randn(m * nh * hd, 70, 1.0);
                let (k, v) = (randn(m * nkv * hd, 71, 2.0), randn(m * nkv * hd, 72, 0.5));
                let (qt, kt, vt) = (
                    tensor(gpu, "q", &[m, nh, hd], &q),
                    tensor(gpu, "k", &[m, nkv, hd], &k),
                    tensor(gpu, "v", &[m, nkv, hd], &v),
                );
                let mut rec = gpu.recorder();
                attention::rope_store(&mut rec, &cache, &qt, &kt, &vt, pos0, 1e4, mode, rot)
                    .unwrap();
                assert_eq!(rec.len(), 1);
                rec.submit().unwrap();
                let what = format!("rope_store {dtype} {mode:?} {m}x{nh}/{nkv}x{hd} rot {rot}");
                let freqs = rope::rope_freqs(1e4, rot);
                let (q_rot, k_rot) = (
                    rope::rope_reference(&q, nh, hd, pos0 as u32, &freqs, mode),
                    rope::rope_reference(&k, nkv, hd, pos0 as u32, &freqs, mode),
                );
                assert_close(
                    &what,
                    &gpu.read(&qt).unwrap(),
                    &q_rot,
                    tol::NMSE_TRANSCENDENTAL,
                );
                assert_eq!(gpu.read(&kt).unwrap(), k, "{what}: k changed");
                let (kc, vc) = cache.read(gpu, ctx).unwrap();
                let row = nkv * hd;
                for (name, all, src) in [("k", &kc, &k_rot), ("v", &vc, &v)] {
                    let held = &all[pos0 * row..(pos0 + m) * row];
                    let enc = attention::encode(dtype, src, hd).unwrap();
                    let cpu = attention::decode(dtype, &enc, hd).unwrap();
                    let t = match dtype {
                        KvDtype::Q8_0 => tol::NMSE_QUANT,
                        _ => tol::NMSE_TRANSCENDENTAL,
                    };
                    assert_close(&format!("{what} {name}"), held, &cpu, t);
                    assert!(
                        all[..pos0 * row].iter().all(|&x| x == 0.0),
                        "{what}: prefix"
                    );
                    assert!(
                        all[(pos0 + m) * row..].iter().all(|&x| x == 0.0),
                        "{what}: suffix"
                    );
                }
            }
        }
    }
    // Shapes that disagree, positions past the cache, a bad rot_dim, or q in k's buffer: refused
    // before anything is recorded.
    let cache = KvCache::new(gpu, "kv", KvDtype::F16, 8, 2, 64).unwrap();
    let t = |shape: &[usize]| {
        gpu.tensor("t", wgllm::BufferClass::Activations, shape)
            .unwrap()
    };
    let (q, k) = (t(&[2, 4, 64]), t(&[2, 2, 64]));
    let il = RopeMode::Interleaved;
    let mut rec = gpu.recorder();
    assert!(
        attention::rope_store(&mut rec, &cache, &q, &t(&[2, 2, 32]), &k, 0, 1e4, il, 64).is_err()
    );
    assert!(
        attention::rope_store(&mut rec, &cache, &t(&[3, 4, 64]), &k, &k, 0, 1e4, il, 64).is_err()
    );
    assert!(attention::rope_store(&mut rec, &cache, &q, &k, &k, 7, 1e4, il, 64).is_err());
    assert!(attention::rope_store(&mut rec, &cache, &q, &k, &k, 0, 1e4, il, 66).is_err());
    assert!(attention::rope_store(&mut rec, &cache, &q, &k, &k, 0, f32::NAN, il, 64).is_err());
    assert!(attention::rope_store(&mut rec, &cache, &k, &k, &k, 0, 1e4, il, 64).is_err());
    assert!(rec.is_empty());
}

#[test]
fn bytes_per_token_is_exact() {
    assert_eq!(bytes_per_token(KvDtype::F32, 3, 64), 2 * 3 * 64 * 4);
    assert_eq!(bytes_per_token(KvDtype::F16, 3, 64), 2 * 3 * 64 * 2);
    // 34 bytes per 32 values when the block count per row is even; one padded scale half if odd.
    assert_eq!(bytes_per_token(KvDtype::Q8_0, 3, 64), 2 * 3 * 64 * 34 / 32);
    assert_eq!(
        bytes_per_token(KvDtype::Q8_0, 8, 128),
        2 * 8 * 128 * 34 / 32
    );
    assert_eq!(bytes_per_token(KvDtype::Q8_0, 1, 96), 2 * (96 + 8));
}

/// Query/kv head counts: MHA, SmolLM2's 9/3, and 4/1.
const HEADS: [(usize, usize); 3] = [(4, 4), (9, 3), (4, 1)];

#[test]
fn decode_matches_reference_mha_and_gqa() {
    let Some(gpu) = gpu() else { return };
    for heads in HEADS {
        // Key counts below, between and above multiples of the 64-thread workgroup.
        for n_keys in [1, 37, 300] {
            check(gpu, case(Entry::Auto, KvDtype::F32, heads, 64, n_keys, 1));
        }
    }
}

#[test]
fn decode_matches_reference_every_dtype_and_head_dim() {
    let Some(gpu) = gpu() else { return };
    for dtype in KvDtype::ALL {
        // 96: an odd number of q8_0 blocks per row; 256: the largest head_dim.
        for (hd, n_keys) in [(64, 70), (96, 129), (256, 65)] {
            check(gpu, case(Entry::Decode, dtype, (6, 2), hd, n_keys, 1));
        }
    }
}

#[test]
fn prefill_matches_reference_from_empty_and_continued_cache() {
    let Some(gpu) = gpu() else { return };
    for entry in [Entry::Auto, Entry::Prefill, Entry::Decode] {
        for heads in HEADS {
            // From position 0 (37 tokens: two 16-token tiles and a ragged one), and continuing a
            // cache that already holds 20, 5 and 3 positions.
            for (n_keys, m) in [(37, 37), (37, 17), (6, 1), (40, 35), (5, 2)] {
                check(gpu, case(entry, KvDtype::F32, heads, 64, n_keys, m));
            }
        }
    }
}

#[test]
fn prefill_matches_reference_every_dtype() {
    let Some(gpu) = gpu() else { return };
    for dtype in KvDtype::ALL {
        for (hd, n_keys, m) in [(32, 50, 19), (128, 33, 33)] {
            check(gpu, case(Entry::Prefill, dtype, (4, 2), hd, n_keys, m));
        }
        // head_dim over the tiled kernel's limit: attention() falls back to the decode kernel.
        check(gpu, case(Entry::Auto, dtype, (2, 1), 256, 20, 9));
    }
}

/// Whether the test device runs attention_sg.wgsl (else a printed skip).
fn subgroup_device(gpu: &Gpu) -> bool {
    let ok = wgllm::kernels::matmul::subgroup_matvec_ok(gpu);
    if !ok {
        eprintln!("SKIPPED: {} runs no subgroup attention", gpu.describe());
    }
    ok
}

#[test]
fn subgroup_kernel_matches_reference() {
    let Some(gpu) = gpu() else { return };
    if !subgroup_device(gpu) {
        return;
    }
    // Groups of 1 (MHA), 3 (SmolLM2) and 8 (the most it takes); every head_dim it takes.
    for (heads, hd) in [
        ((4, 4), 64),
        ((9, 3), 64),
        ((16, 2), 32),
        ((2, 1), 128),
        ((3, 1), 96),
    ] {
        for (n_keys, m) in [(1, 1), (37, 1), (300, 1), (37, 37), (40, 35), (6, 2)] {
            check(
                gpu,
                case(Entry::Subgroup, KvDtype::F32, heads, hd, n_keys, m),
            );
        }
    }
    for dtype in KvDtype::ALL {
        for (hd, n_keys, m) in [(32, 50, 19), (64, 70, 1), (96, 129, 3), (128, 33, 33)] {
            check(gpu, case(Entry::Subgroup, dtype, (6, 2), hd, n_keys, m));
        }
    }
    // What it does not take is refused before dispatch: head_dim 48 and 256, groups of 9.
    for (heads, hd) in [((2, 1), 48), ((2, 1), 256), ((9, 1), 64)] {
        let cache = KvCache::new(gpu, "kv", KvDtype::F32, 8, heads.1, hd).unwrap();
        let q = gpu.tensor("q", Activations, &[1, heads.0, hd]).unwrap();
        let out = gpu.tensor("out", Activations, &[1, heads.0, hd]).unwrap();
        let mut rec = gpu.recorder();
        let e = attention::attention_subgroup(&mut rec, &q, &cache, 0, 1.0, &out).unwrap_err();
        assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
        assert!(rec.is_empty());
    }
}

/// Split keys (decode over long contexts): every part count, parts empty or of one key, every
/// dtype, groups of 1 to 8, and the automatic choice; huge scores stay finite across parts.
#[test]
fn split_keys_match_reference() {
    let Some(gpu) = gpu() else { return };
    if !subgroup_device(gpu) {
        return;
    }
    for (heads, hd) in [((9, 3), 64), ((4, 4), 32), ((16, 2), 128)] {
        for (n_keys, parts) in [(1, 2), (5, 8), (37, 2), (37, 3), (300, 16), (129, 5)] {
            check(
                gpu,
                case(Entry::Split(parts), KvDtype::F32, heads, hd, n_keys, 1),
            );
        }
    }
    for dtype in KvDtype::ALL {
        check(gpu, case(Entry::Split(4), dtype, (6, 2), 64, 200, 1));
        // The automatic choice: one part below 2 * KEYS_PER_SPLIT keys, then several.
        for n_keys in [300, 1100] {
            check(gpu, case(Entry::Split(0), dtype, (9, 3), 64, n_keys, 1));
        }
    }
    let huge = Case {
        mag: 30.0,
        k_shift: 30.0,
        tol: NMSE_HUGE_SCORES,
        ..case(Entry::Split(7), KvDtype::F32, (4, 2), 64, 90, 1)
    };
    check(gpu, huge);
    // Too little scratch, or scratch that is the output, is refused before dispatch.
    let cache = KvCache::new(gpu, "kv", KvDtype::F32, 8, 1, 64).unwrap();
    let q = gpu.tensor("q", Activations, &[1, 2, 64]).unwrap();
    let out = gpu.tensor("out", Activations, &[1, 2, 64]).unwrap();
    let small = gpu.tensor("partials", Activations, &[100]).unwrap();
    let mut rec = gpu.recorder();
    assert!(
        attention::attention_split_with(&mut rec, &q, &cache, 4, 1.0, &small, &out, 2).is_err()
    );
    assert!(attention::attention_split_with(&mut rec, &q, &cache, 4, 1.0, &out, &out, 1).is_err());
    assert!(attention::attention_split_with(&mut rec, &q, &cache, 4, 1.0, &out, &q, 0).is_err());
    assert!(rec.is_empty());
    let per = attention::KEYS_PER_SPLIT;
    assert_eq!(attention::key_splits(true, 1, 2 * per - 1), 1);
    assert_eq!(attention::key_splits(true, 1, 2 * per), 2);
    let most = attention::key_splits(true, 1, 1 << 20);
    assert!((2..=attention::MAX_KEY_SPLITS).contains(&most), "{most}");
    assert_eq!(attention::key_splits(true, 2, 1 << 20), 1);
    // The grouped workgroup kernel (GPUs): a part per KEYS_PER_SPLIT keys, up to the most.
    assert_eq!(attention::key_splits(false, 1, 2 * per - 1), 1);
    assert_eq!(attention::key_splits(false, 1, 5 * per), 5);
    let most = attention::key_splits(false, 1, 1 << 20);
    assert_eq!(most, attention::MAX_KEY_SPLITS);
    assert_eq!(attention::key_splits(false, 2, 1 << 20), 1);
}

/// The grouped decode kernel of GPUs (split-K, the G query heads of a GQA group sharing each K/V
/// load), forced on this device and on one without subgroups: every part count (parts empty or
/// of one key), groups of 1 to 8, every dtype, head_dim up to 256, huge scores.
#[test]
fn grouped_decode_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let portable = Gpu::new(&wgllm::GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    for g in [gpu, &portable] {
        for (heads, hd) in [
            ((9, 3), 64),
            ((4, 4), 32),
            ((16, 2), 128),
            ((8, 1), 256),
            ((3, 1), 96),
        ] {
            for (n_keys, parts) in [
                (1, 1),
                (37, 1),
                (300, 1),
                (5, 8),
                (37, 3),
                (300, 16),
                (129, 5),
            ] {
                check(
                    g,
                    case(Entry::Grouped(parts), KvDtype::F32, heads, hd, n_keys, 1),
                );
            }
        }
        for dtype in KvDtype::ALL {
            check(g, case(Entry::Grouped(4), dtype, (6, 2), 64, 700, 1));
            check(g, case(Entry::Grouped(1), dtype, (6, 2), 64, 70, 1));
        }
        let huge = Case {
            mag: 30.0,
            k_shift: 30.0,
            tol: NMSE_HUGE_SCORES,
            ..case(Entry::Grouped(7), KvDtype::F32, (4, 2), 64, 90, 1)
        };
        check(g, huge);
        // The automatic choice on a device without subgroups: the grouped kernel, split from
        // 2 * KEYS_PER_SPLIT keys.
        if !wgllm::kernels::matmul::subgroup_matvec_ok(g) {
            for n_keys in [300, 1100] {
                check(
                    g,
                    case(Entry::Split(0), KvDtype::F32, (9, 3), 64, n_keys, 1),
                );
            }
        }
    }
    // Groups past 8 are refused before dispatch.
    let cache = KvCache::new(gpu, "kv", KvDtype::F32, 8, 1, 64).unwrap();
    let q = gpu.tensor("q", Activations, &[1, 9, 64]).unwrap();
    let out = gpu.tensor("out", Activations, &[1, 9, 64]).unwrap();
    let part = gpu.tensor("partials", Activations, &[1 << 16]).unwrap();
    let mut rec = gpu.recorder();
    let e = attention::attention_grouped(&mut rec, &q, &cache, 4, 1.0, &part, &out, 2).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    assert!(rec.is_empty());
}

#[test]
fn huge_scores_stay_finite() {
    let Some(gpu) = gpu() else { return };
    let subgroup = subgroup_device(gpu).then_some(Entry::Subgroup);
    for entry in [Entry::Decode, Entry::Prefill].into_iter().chain(subgroup) {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let base = Case {
                tol: NMSE_HUGE_SCORES,
                ..case(entry, dtype, (4, 2), 64, 100, 20)
            };
            // q, k ~ N(0, 30^2): scores ~1e3, exp overflows f32 without the running max; and 1e3:
            // scores ~1e6, a nearly one-hot softmax.
            check(gpu, Case { mag: 30.0, ..base });
            check(gpu, Case { mag: 1e3, ..base });
            // A shift common to all keys: every score ~1e3 with differences ~1, so the weights
            // stay spread out and only subtracting the maximum keeps exp finite.
            check(
                gpu,
                Case {
                    k_shift: 1e3,
                    ..base
                },
            );
        }
    }
}

#[test]
fn refusals_happen_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let cache = KvCache::new(gpu, "kv", KvDtype::F16, 8, 2, 64).unwrap();
    let kv = |m: usize| gpu.tensor("kv-in", Activations, &[m, 2, 64]).unwrap();
    let q = |shape: &[usize]| gpu.tensor("q", Activations, shape).unwrap();
    let mut rec = gpu.recorder();
    let invalid =
        |e: wgllm::Error| assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    let shape = |e: wgllm::Error| assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");

    // Past the context: store and attention.
    invalid(attention::store(&mut rec, &cache, &kv(3), &kv(3), 6).unwrap_err());
    invalid(
        attention::attention(&mut rec, &q(&[3, 4, 64]), &cache, 6, 1.0, &q(&[3, 4, 64]))
            .unwrap_err(),
    );
    invalid(
        attention::attention_decode(&mut rec, &q(&[1, 4, 64]), &cache, 8, 1.0, &q(&[1, 4, 64]))
            .unwrap_err(),
    );
    // Heads not a multiple of kv heads.
    invalid(
        attention::attention(&mut rec, &q(&[1, 3, 64]), &cache, 0, 1.0, &q(&[1, 3, 64]))
            .unwrap_err(),
    );
    // Wrong shapes: head_dim, rank, K vs V, out vs q, kv heads of the input.
    shape(
        attention::attention(&mut rec, &q(&[1, 4, 32]), &cache, 0, 1.0, &q(&[1, 4, 32]))
            .unwrap_err(),
    );
    shape(attention::attention(&mut rec, &q(&[4, 64]), &cache, 0, 1.0, &q(&[4, 64])).unwrap_err());
    shape(
        attention::attention(&mut rec, &q(&[2, 4, 64]), &cache, 0, 1.0, &q(&[1, 4, 64]))
            .unwrap_err(),
    );
    shape(attention::store(&mut rec, &cache, &kv(2), &kv(3), 0).unwrap_err());
    let k3 = gpu.tensor("k", Activations, &[1, 3, 64]).unwrap();
    shape(attention::store(&mut rec, &cache, &k3, &k3, 0).unwrap_err());
    // out aliasing q.
    let qq = q(&[1, 4, 64]);
    invalid(attention::attention(&mut rec, &qq, &cache, 0, 1.0, &qq).unwrap_err());
    assert!(rec.is_empty(), "nothing may be recorded");

    // Cache shapes each dtype cannot hold.
    invalid(KvCache::new(gpu, "kv", KvDtype::Q8_0, 8, 2, 48).unwrap_err());
    invalid(KvCache::new(gpu, "kv", KvDtype::F16, 8, 2, 6).unwrap_err());
    invalid(KvCache::new(gpu, "kv", KvDtype::F32, 8, 2, 512).unwrap_err());
    invalid(KvCache::new(gpu, "kv", KvDtype::F32, 0, 2, 64).unwrap_err());
    invalid(
        attention::attention_prefill(
            &mut rec,
            &q(&[2, 1, 256]),
            &KvCache::new(gpu, "kv", KvDtype::F32, 4, 1, 256).unwrap(),
            0,
            1.0,
            &q(&[2, 1, 256]),
        )
        .unwrap_err(),
    );
}

/// Bidirectional attention: `n_keys + 3` random K/V rows are stored, every one of `m` queries
/// attends the first `n_keys` (the 3 extra rows must stay invisible). With `over_tensors` the K/V
/// tensors themselves are the cache ([`KvCache::from_f32`]) instead of a store into one.
fn check_bidirectional(
    gpu: &Gpu,
    dtype: KvDtype,
    (n_heads, n_kv): (usize, usize),
    hd: usize,
    (n_keys, m): (usize, usize),
    over_tensors: bool,
    kernel: Option<AttentionKernel>,
) {
    let what = format!(
        "bidirectional {dtype} heads {n_heads}/{n_kv} hd {hd} keys {n_keys} m {m} over_tensors \
         {over_tensors}"
    );
    let ctx = n_keys + 3;
    let row = n_kv * hd;
    let k = randn(ctx * row, 21, 1.0);
    let v = randn(ctx * row, 22, 1.0);
    let kt = tensor(gpu, "k", &[ctx, n_kv, hd], &k);
    let vt = tensor(gpu, "v", &[ctx, n_kv, hd], &v);
    let mut rec = gpu.recorder();
    let cache = if over_tensors {
        KvCache::from_f32(&kt, &vt).unwrap()
    } else {
        let c = KvCache::new(gpu, "kv", dtype, ctx, n_kv, hd).unwrap();
        attention::store(&mut rec, &c, &kt, &vt, 0).unwrap();
        c
    };
    let q = randn(m * n_heads * hd, 23, 1.0);
    let qt = tensor(gpu, "q", &[m, n_heads, hd], &q);
    let out = gpu.tensor("out", Activations, &[m, n_heads, hd]).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();
    attention::attention_bidirectional_with(&mut rec, &qt, &cache, n_keys, scale, &out, kernel)
        .unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&out).unwrap();
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{what}: non-finite output"
    );
    let (kc, vc) = cache.read(gpu, n_keys).unwrap();
    let want =
        attention::reference_bidirectional(&q, &kc, &vc, m, n_heads, n_kv, hd, n_keys, scale);
    assert_close(&what, &got, &want, NMSE_ATTN);
}

#[test]
fn bidirectional_matches_reference_every_kernel() {
    let Some(gpu) = gpu() else { return };
    let mut kernels = vec![
        None,
        Some(AttentionKernel::Rows),
        Some(AttentionKernel::Tiled),
    ];
    if wgllm::kernels::matmul::subgroup_matvec_ok(gpu) {
        kernels.push(Some(AttentionKernel::Subgroup));
    }
    for kernel in kernels {
        for heads in HEADS {
            // (n_keys, m): keys past the decode kernel's 64-key tile, ragged 16-query tiles, more
            // queries than keys and more keys than queries.
            for shape in [
                (1, 1),
                (5, 5),
                (70, 3),
                (20, 20),
                (37, 37),
                (9, 17),
                (100, 8),
            ] {
                check_bidirectional(gpu, KvDtype::F32, heads, 32, shape, false, kernel);
            }
        }
        for dtype in KvDtype::ALL {
            check_bidirectional(gpu, dtype, (4, 2), 64, (33, 19), false, kernel);
            check_bidirectional(gpu, dtype, (4, 2), 64, (33, 3), false, kernel);
        }
    }
    // head_dim over the tiled and subgroup kernels' limits: the decode kernel at any m.
    check_bidirectional(gpu, KvDtype::F32, (2, 1), 256, (20, 9), false, None);
}

#[test]
fn bidirectional_over_projection_tensors() {
    let Some(gpu) = gpu() else { return };
    // MiniLM's shape (12 heads of 32) and a GQA one, with the K/V tensors as the cache.
    for (heads, shape) in [((12, 12), (8, 8)), ((12, 12), (14, 14)), ((6, 2), (3, 3))] {
        check_bidirectional(gpu, KvDtype::F32, heads, 32, shape, true, None);
    }
}

#[test]
fn bidirectional_refusals_happen_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let cache = KvCache::new(gpu, "kv", KvDtype::F32, 8, 2, 32).unwrap();
    let t = |shape: &[usize]| gpu.tensor("t", Activations, shape).unwrap();
    let mut rec = gpu.recorder();
    let invalid =
        |e: wgllm::Error| assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    let shape = |e: wgllm::Error| assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");
    let (q, out) = (t(&[3, 4, 32]), t(&[3, 4, 32]));
    // No keys, and more keys than the cache holds.
    invalid(attention::attention_bidirectional(&mut rec, &q, &cache, 0, 1.0, &out).unwrap_err());
    invalid(attention::attention_bidirectional(&mut rec, &q, &cache, 9, 1.0, &out).unwrap_err());
    // Wrong head_dim, out vs q, aliasing.
    shape(
        attention::attention_bidirectional(&mut rec, &t(&[3, 4, 16]), &cache, 4, 1.0, &out)
            .unwrap_err(),
    );
    shape(
        attention::attention_bidirectional(&mut rec, &q, &cache, 4, 1.0, &t(&[2, 4, 32]))
            .unwrap_err(),
    );
    invalid(attention::attention_bidirectional(&mut rec, &q, &cache, 4, 1.0, &q).unwrap_err());
    assert!(rec.is_empty(), "nothing may be recorded");
    // A cache over tensors: rank 3, K and V alike and separate, a usable head_dim.
    shape(KvCache::from_f32(&t(&[8, 64]), &t(&[8, 64])).unwrap_err());
    shape(KvCache::from_f32(&t(&[8, 2, 32]), &t(&[7, 2, 32])).unwrap_err());
    let k = t(&[8, 2, 32]);
    invalid(KvCache::from_f32(&k, &k).unwrap_err());
    invalid(KvCache::from_f32(&t(&[8, 2, 6]), &t(&[8, 2, 6])).unwrap_err());
    invalid(KvCache::from_f32(&t(&[0, 2, 32]), &t(&[0, 2, 32])).unwrap_err());
}

/// One sequence of a batch laid out row after row (`attention_bidirectional_rows`): three
/// sequences of 5, 11 and 8 tokens in slots of `sequence_slot` rows share q, K, V and out; each
/// attends over its own keys only, as the reference over that sequence alone, and rows of other
/// sequences and padding stay untouched. On the device's own kernel and on one without subgroups.
#[test]
fn bidirectional_rows_attend_within_their_sequence() {
    let Some(gpu) = gpu() else { return };
    let plain = Gpu::new(&wgllm::GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    let (n_heads, n_kv, hd) = (4, 4, 32);
    let lens = [5usize, 11, 8];
    let slot = wgllm::plan::bert::sequence_slot(11, n_heads * hd);
    let rows = lens.len() * slot;
    let q = randn(rows * n_heads * hd, 31, 1.0);
    let k = randn(rows * n_kv * hd, 32, 1.0);
    let v = randn(rows * n_kv * hd, 33, 1.0);
    for dev in [gpu, &plain] {
        let qt = tensor(dev, "q", &[rows, n_heads, hd], &q);
        let kt = tensor(dev, "k", &[rows, n_kv, hd], &k);
        let vt = tensor(dev, "v", &[rows, n_kv, hd], &v);
        let cache = KvCache::from_f32(&kt, &vt).unwrap();
        let out = dev
            .tensor("out", Activations, &[rows, n_heads, hd])
            .unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut rec = dev.recorder();
        for (b, &n) in lens.iter().enumerate() {
            let (qb, ob) = (
                qt.view(&[n, n_heads, hd]).unwrap(),
                out.view(&[n, n_heads, hd]).unwrap(),
            );
            attention::attention_bidirectional_rows(&mut rec, &qb, &cache, b * slot, n, scale, &ob)
                .unwrap();
        }
        rec.submit().unwrap();
        let got = dev.read(&out).unwrap();
        let (qr, kr) = (n_heads * hd, n_kv * hd);
        for (b, &n) in lens.iter().enumerate() {
            let r0 = b * slot;
            let want = attention::reference_bidirectional(
                &q[r0 * qr..(r0 + n) * qr],
                &k[r0 * kr..(r0 + n) * kr],
                &v[r0 * kr..(r0 + n) * kr],
                n,
                n_heads,
                n_kv,
                hd,
                n,
                scale,
            );
            let what = format!("sequence {b} at row {r0}");
            assert_close(&what, &got[r0 * qr..(r0 + n) * qr], &want, NMSE_ATTN);
            let pad = &got[(r0 + n) * qr..(r0 + slot) * qr];
            assert!(pad.iter().all(|&x| x == 0.0), "{what}: padding written");
        }
        // Keys past the batch, and no keys: refused before anything is recorded.
        let mut rec = dev.recorder();
        let q1 = qt.view(&[1, n_heads, hd]).unwrap();
        let o1 = out.view(&[1, n_heads, hd]).unwrap();
        let e =
            attention::attention_bidirectional_rows(&mut rec, &q1, &cache, rows - 1, 2, 1.0, &o1);
        assert!(
            matches!(e, Err(wgllm::Error::InvalidArgument { .. })),
            "{e:?}"
        );
        let e = attention::attention_bidirectional_rows(&mut rec, &q1, &cache, 0, 0, 1.0, &o1);
        assert!(
            matches!(e, Err(wgllm::Error::InvalidArgument { .. })),
            "{e:?}"
        );
        assert!(rec.is_empty(), "nothing may be recorded");
    }
}

/// One sliding-window run: a layer of window `w` whose cache is a ring for chunks of `chunk`
/// tokens over `ctx` positions, filled chunk by chunk (the plain store, or RoPE + store with
/// `fused`), each chunk attending with `entry` right after its store, as a model does.
#[derive(Debug, Clone, Copy)]
struct WindowCase {
    entry: Entry,
    dtype: KvDtype,
    heads: (usize, usize),
    hd: usize,
    w: usize,
    chunk: usize,
    ctx: usize,
    fused: bool,
}

/// Runs `c`: every chunk's output against full attention masked to the window over all the keys
/// stored so far (read back from the ring right after their store, so the reference sees the
/// cache's own rounding). Returns how many outputs the window changed: the keys that fell out of
/// it mattered.
fn check_windowed(gpu: &Gpu, c: WindowCase) -> usize {
    use wgllm::kernels::rope::RopeMode;
    let WindowCase { w, chunk, ctx, .. } = c;
    let (n_heads, n_kv) = c.heads;
    let hd = c.hd;
    let what = format!("{c:?}");
    let cache = KvCache::windowed(gpu, "kv", c.dtype, ctx, n_kv, hd, Some(w), chunk).unwrap();
    let slots = attention::ring_slots(ctx, Some(w), chunk);
    assert_eq!(cache.slots, slots, "{what}");
    assert_eq!(
        cache.bytes(),
        slots as u64 * bytes_per_token(c.dtype, n_kv, hd)
    );
    let (row, qrow) = (n_kv * hd, n_heads * hd);
    let k = randn(ctx * row, 81, 1.0);
    let v = randn(ctx * row, 82, 1.0);
    let q_all = randn(ctx * qrow, 83, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let (mut kc, mut vc) = (Vec::new(), Vec::new());
    let mut changed = 0;
    let mut pos0 = 0;
    while pos0 < ctx {
        let m = chunk.min(ctx - pos0);
        let kt = tensor(gpu, "k", &[m, n_kv, hd], &k[pos0 * row..(pos0 + m) * row]);
        let vt = tensor(gpu, "v", &[m, n_kv, hd], &v[pos0 * row..(pos0 + m) * row]);
        let qt = tensor(
            gpu,
            "q",
            &[m, n_heads, hd],
            &q_all[pos0 * qrow..][..m * qrow],
        );
        let out = gpu.tensor("out", Activations, &[m, n_heads, hd]).unwrap();
        let part = gpu
            .tensor(
                "partials",
                Activations,
                &[attention::partials_bytes(n_heads, hd) as usize / 4 * m],
            )
            .unwrap();
        let mut rec = gpu.recorder();
        if c.fused {
            let mode = RopeMode::Half;
            attention::rope_store(&mut rec, &cache, &qt, &kt, &vt, pos0, 1e4, mode, hd).unwrap();
        } else {
            attention::store(&mut rec, &cache, &kt, &vt, pos0).unwrap();
        }
        let (r, cc) = (&mut rec, &cache);
        match c.entry {
            Entry::Auto => attention::attention(r, &qt, cc, pos0, scale, &out),
            Entry::Decode => attention::attention_decode(r, &qt, cc, pos0, scale, &out),
            Entry::Prefill => attention::attention_prefill(r, &qt, cc, pos0, scale, &out),
            Entry::Subgroup => attention::attention_subgroup(r, &qt, cc, pos0, scale, &out),
            Entry::Split(0) => attention::attention_split(r, &qt, cc, pos0, scale, &part, &out),
            Entry::Split(n) => {
                attention::attention_split_with(r, &qt, cc, pos0, scale, &part, &out, n)
            }
            Entry::Grouped(n) => {
                attention::attention_grouped(r, &qt, cc, pos0, scale, &part, &out, n)
            }
        }
        .unwrap();
        rec.submit().unwrap();
        let got = gpu.read(&out).unwrap();
        // The chunk's own keys as the ring holds them (rotated, with fused), and the queries as
        // attention saw them (rotated in place, with fused).
        let (kn, vn) = cache.read_positions(gpu, pos0, m).unwrap();
        // The store put them in their slots: V (and unrotated K) as the CPU encodes them.
        let src = |x: &[f32]| {
            let rows = &x[pos0 * row..(pos0 + m) * row];
            attention::decode(c.dtype, &attention::encode(c.dtype, rows, hd).unwrap(), hd).unwrap()
        };
        let t_store = if c.dtype == KvDtype::Q8_0 {
            tol::NMSE_QUANT
        } else {
            0.0
        };
        assert_close(&format!("{what} v@{pos0}"), &vn, &src(&v), t_store);
        if !c.fused {
            assert_close(&format!("{what} k@{pos0}"), &kn, &src(&k), t_store);
        }
        kc.extend(kn);
        vc.extend(vn);
        let q = gpu.read(&qt).unwrap();
        let shape = (m, n_heads, n_kv, hd);
        let want = attention::reference_windowed(&q, &kc, &vc, shape, pos0, Some(w), scale);
        let full = attention::reference_windowed(&q, &kc, &vc, shape, pos0, None, scale);
        changed += want.iter().zip(&full).filter(|(a, b)| a != b).count();
        let t = match c.dtype {
            KvDtype::F32 => NMSE_ATTN,
            _ => tol::NMSE_QUANT,
        };
        assert_close(&format!("{what} @{pos0}+{m}"), &got, &want, t);
        pos0 += m;
    }
    // Everything the window still covers is still in the ring: the last `min(slots, ctx)` keys.
    let n = slots.min(ctx);
    let (kr, vr) = cache.read_positions(gpu, ctx - n, n).unwrap();
    assert_eq!(kr, kc[(ctx - n) * row..], "{what}: ring K");
    assert_eq!(vr, vc[(ctx - n) * row..], "{what}: ring V");
    changed
}

/// Sliding-window attention over a ring, every kernel and KV dtype: windows of 8 and 16, contexts
/// of 3 to 5 windows (the ring wraps several times), chunks of 1, 3, w - 1 and w tokens (crossing
/// the window's end and the ring's wrap at every offset); equal to full attention masked to the
/// window.
#[test]
fn windowed_attention_matches_masked_reference() {
    let Some(gpu) = gpu() else { return };
    let sg = subgroup_device(gpu);
    let mut entries = vec![
        Entry::Decode,
        Entry::Prefill,
        Entry::Auto,
        Entry::Grouped(1),
        Entry::Grouped(3),
    ];
    if sg {
        entries.extend([Entry::Subgroup, Entry::Split(3), Entry::Split(0)]);
    }
    for entry in entries {
        for dtype in KvDtype::ALL {
            for (w, ctx) in [(8, 40), (16, 53)] {
                for chunk in [1, 3, w - 1, w] {
                    let c = WindowCase {
                        entry,
                        dtype,
                        heads: (6, 2),
                        hd: 64,
                        w,
                        chunk,
                        ctx,
                        fused: chunk == 3,
                    };
                    let changed = check_windowed(gpu, c);
                    assert!(changed > 0, "{c:?}: the window masked nothing");
                }
            }
        }
    }
    // Gemma 3's shape (one kv head of 256, the decode kernel's largest); MHA; a window longer
    // than the context (no ring: the mask alone), and one equal to the ring.
    let base = WindowCase {
        entry: Entry::Decode,
        dtype: KvDtype::F16,
        heads: (4, 1),
        hd: 256,
        w: 8,
        chunk: 5,
        ctx: 37,
        fused: true,
    };
    for c in [
        base,
        WindowCase {
            entry: Entry::Auto,
            heads: (4, 4),
            hd: 32,
            dtype: KvDtype::F32,
            ..base
        },
        WindowCase {
            w: 64,
            ctx: 20,
            ..base
        },
        WindowCase {
            w: 12,
            chunk: 1,
            ctx: 12,
            ..base
        },
    ] {
        check_windowed(gpu, c);
    }
}

/// A chunk longer than its ring was made for, reads past the ring, bidirectional attention over a
/// ring, and a window of 0: refused before anything is recorded.
#[test]
fn windowed_refusals_happen_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let (w, chunk, ctx) = (8, 3, 40);
    let cache = KvCache::windowed(gpu, "kv", KvDtype::F32, ctx, 1, 32, Some(w), chunk).unwrap();
    assert_eq!(cache.slots, 10);
    let t = |shape: &[usize]| gpu.tensor("t", Activations, shape).unwrap();
    let invalid =
        |e: wgllm::Error| assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    let mut rec = gpu.recorder();
    let (kv4, q4) = (t(&[4, 1, 32]), t(&[4, 2, 32]));
    invalid(attention::store(&mut rec, &cache, &kv4, &kv4, 20).unwrap_err());
    invalid(
        attention::attention_decode(&mut rec, &q4, &cache, 20, 1.0, &t(&[4, 2, 32])).unwrap_err(),
    );
    let out = t(&[4, 2, 32]);
    invalid(attention::attention_bidirectional(&mut rec, &q4, &cache, 4, 1.0, &out).unwrap_err());
    assert!(rec.is_empty());
    // A chunk of 3 fits, at any position, including the ring's wrap.
    let kv3 = t(&[3, 1, 32]);
    attention::store(&mut rec, &cache, &kv3, &kv3, 9).unwrap();
    invalid(cache.read_positions(gpu, 0, 11).unwrap_err());
    invalid(cache.read_positions(gpu, 35, 6).unwrap_err());
    invalid(KvCache::windowed(gpu, "kv", KvDtype::F32, 8, 1, 32, Some(0), 1).unwrap_err());
    // A global cache is the whole context; a window past the context keeps every position.
    let g = KvCache::windowed(gpu, "kv", KvDtype::F32, ctx, 1, 32, None, 64).unwrap();
    assert_eq!(
        (g.slots, g.bytes()),
        (
            ctx,
            KvCache::new(gpu, "kv", KvDtype::F32, ctx, 1, 32)
                .unwrap()
                .bytes()
        )
    );
    assert_eq!(attention::ring_slots(ctx, Some(512), 64), ctx);
    assert_eq!(attention::ring_slots(4096, Some(512), 64), 575);
    assert_eq!(attention::ring_slots(4096, Some(512), 1), 512);
}

/// Decode rows of several sequences in slot-major caches (`KvCache::slots_major`): one RoPE/store
/// and one attention dispatch (plus the merge where a row splits its keys) for all rows, each
/// row's q, stored keys and output bit for bit those of the row alone through `rope_store_scaled`
/// and `attention_split`, and within the reference's tolerance. Rows short and long (one part,
/// several), global and sliding-window rings past the window, every dtype; on the device's own
/// kernels, on one without subgroups (the workgroup kernels GPUs run) and on the GL backend where
/// there is one. And with the slots split
/// over several buffers (as where all would pass one storage binding): the rows ordered by buffer,
/// one dispatch per buffer's run of rows.
#[test]
fn decode_rows_equal_each_row_alone() {
    let Some(gpu) = gpu() else { return };
    let portable = Gpu::new(&wgllm::GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    // The GL backend (`--device 1` here), where there is one: the portable kernels on another
    // shader compiler.
    let gl = gl_device();
    for g in [gpu, &portable].into_iter().chain(gl.as_ref()) {
        for (dtype, window) in [
            (KvDtype::F32, None),
            (KvDtype::F16, Some(300)),
            (KvDtype::Q8_0, None),
            (KvDtype::F32, Some(600)),
        ] {
            check_rows(g, dtype, window, 5);
        }
        check_rows(g, KvDtype::F16, Some(300), 2);
    }
}

fn check_rows(gpu: &Gpu, dtype: KvDtype, window: Option<usize>, per_buffer: usize) {
    use wgllm::kernels::rope::RopeMode;
    let (nh, nkv, hd, ctx, chunk) = (9, 3, 64, 1500, 8);
    // Slot of each row and its position; slot 2 has no row.
    let mut rows: [(usize, usize); 4] = [(3, 1400), (0, 5), (1, 700), (4, 1100)];
    rows.sort_by_key(|r| r.0 / per_buffer);
    let what = format!(
        "{dtype:?}, window {window:?}, {per_buffer} slots a buffer, {}",
        gpu.describe()
    );
    let caches =
        KvCache::slots_major(gpu, "kv", dtype, ctx, nkv, hd, window, chunk, 5, per_buffer).unwrap();
    let buffers = caches.iter().filter(|c| c.slot_index == 0).count();
    assert_eq!(buffers, 5usize.div_ceil(per_buffer), "{what}");
    let row = nkv * hd;
    let mut rec = gpu.recorder();
    let mut keep = Vec::new();
    // Each slot's keys before its row's position: the ring's last positions, in chunks.
    for (i, &(slot, pos)) in rows.iter().enumerate() {
        let first = pos.saturating_sub(caches[slot].slots - chunk);
        for a in (first..pos).step_by(chunk) {
            let b = (a + chunk).min(pos);
            let k = randn((b - a) * row, 100 + (i * 7919 + a) as u64, 1.0);
            let v = randn((b - a) * row, 200 + (i * 7919 + a) as u64, 1.0);
            let kt = tensor(gpu, "k", &[b - a, nkv, hd], &k);
            let vt = tensor(gpu, "v", &[b - a, nkv, hd], &v);
            attention::store(&mut rec, &caches[slot], &kt, &vt, a).unwrap();
            keep.push((kt, vt));
        }
    }
    rec.submit().unwrap();
    let n = rows.len();
    let q = randn(n * nh * hd, 31, 1.0);
    let k = randn(n * row, 32, 1.0);
    let v = randn(n * row, 33, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let (theta, mode) = (10000.0, RopeMode::Half);
    let parts = attention::partials_bytes(nh, hd) as usize / 4;
    let partials = gpu.tensor("partials", Activations, &[n * parts]).unwrap();
    // All rows at once.
    let kvs: Vec<(&KvCache, usize)> = rows.iter().map(|&(s, p)| (&caches[s], p)).collect();
    let table_words = attention::row_table(&kvs).unwrap();
    let table = gpu.tensor("rows", Activations, &[2 * n]).unwrap();
    gpu.write(&table.buf, 0, bytemuck::cast_slice(&table_words))
        .unwrap();
    let qt = tensor(gpu, "q", &[n, nh, hd], &q);
    let kt = tensor(gpu, "k", &[n, nkv, hd], &k);
    let vt = tensor(gpu, "v", &[n, nkv, hd], &v);
    let out = gpu.tensor("out", Activations, &[n, nh, hd]).unwrap();
    let mut rec = gpu.recorder();
    let t = &table.buf;
    // Runs of rows whose slots share buffers.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (kv, _)) in kvs.iter().enumerate() {
        match runs.last_mut() {
            Some((r0, n)) if kvs[*r0].0.shares_buffers(kv) => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    assert_eq!(runs.len(), buffers.min(rows.len()), "{what}");
    for &(r0, n) in &runs {
        let kr = &kvs[r0..r0 + n];
        attention::rope_store_rows(&mut rec, kr, t, r0, &qt, &kt, &vt, theta, 1.0, mode, hd)
            .unwrap();
    }
    for &(r0, n) in &runs {
        let kr = &kvs[r0..r0 + n];
        attention::attention_rows(&mut rec, kr, t, r0, &qt, scale, &partials, &out).unwrap();
    }
    assert!(
        rec.len() <= 3 * runs.len(),
        "{what}: {} dispatches",
        rec.len()
    );
    // Rows of different buffers in one dispatch are refused before recording.
    if runs.len() > 1 {
        let mut r = gpu.recorder();
        let e = attention::attention_rows(&mut r, &kvs, t, 0, &qt, scale, &partials, &out);
        assert!(
            e.is_err() && r.is_empty(),
            "{what}: mixed buffers were not refused"
        );
    }
    rec.submit().unwrap();
    let (got_q, got) = (gpu.read(&qt).unwrap(), gpu.read(&out).unwrap());
    // Each row alone, over the same cache (its store rewrites the same rows).
    for (i, &(kv, pos)) in kvs.iter().enumerate() {
        let qi = tensor(gpu, "qi", &[1, nh, hd], &q[i * nh * hd..][..nh * hd]);
        let ki = tensor(gpu, "ki", &[1, nkv, hd], &k[i * row..][..row]);
        let vi = tensor(gpu, "vi", &[1, nkv, hd], &v[i * row..][..row]);
        let oi = gpu.tensor("oi", Activations, &[1, nh, hd]).unwrap();
        let mut rec = gpu.recorder();
        attention::rope_store_scaled(&mut rec, kv, &qi, &ki, &vi, pos, theta, 1.0, mode, hd)
            .unwrap();
        attention::attention_split(&mut rec, &qi, kv, pos, scale, &partials, &oi).unwrap();
        rec.submit().unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let (alone_q, alone) = (gpu.read(&qi).unwrap(), gpu.read(&oi).unwrap());
        let rq = &got_q[i * nh * hd..][..nh * hd];
        assert_eq!(bits(rq), bits(&alone_q), "{what}: row {i}'s rotated q");
        let ro = &got[i * nh * hd..][..nh * hd];
        assert_eq!(bits(ro), bits(&alone), "{what}: row {i} (position {pos})");
        // And the reference over the keys the row sees, as the cache holds them.
        let n_keys = (pos + 1).min(window.unwrap_or(usize::MAX));
        let (kc, vc) = kv.read_positions(gpu, pos + 1 - n_keys, n_keys).unwrap();
        let shape = (1, nh, nkv, hd);
        let want = attention::reference_windowed(rq, &kc, &vc, shape, n_keys - 1, None, scale);
        assert_close(&format!("{what}: row {i}"), ro, &want, NMSE_ATTN);
    }
}
