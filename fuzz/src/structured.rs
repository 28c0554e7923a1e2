//! The structure-aware GGUF target's generator: fuzz bytes are a recipe (read through
//! `arbitrary::Unstructured`) for a GGUF file that is valid in its layout, with the values a
//! parser trusts at its peril mutated: the header's counts, string and array lengths that lie
//! about what follows, value types that do not match a key, nested arrays, tensor dimension
//! counts, dimensions near the overflow boundaries, unknown and mismatched ggml types, data offsets
//! and truncated data; keys and tensor names are mostly the ones wgllm reads, so the config,
//! tokenizer and decoding paths behind the parser are reached too.

use arbitrary::{Result, Unstructured};

const ARCHES: &[&str] = &["llama", "mistral", "qwen2", "gemma3", "gpt2", "bert", "x"];

/// Keys under `<arch>.` and their GGUF value types.
const ARCH_KEYS: &[(&str, u32)] = &[
    ("context_length", 4),
    ("embedding_length", 4),
    ("block_count", 4),
    ("feed_forward_length", 4),
    ("attention.head_count", 4),
    ("attention.head_count_kv", 4),
    ("attention.key_length", 4),
    ("attention.value_length", 4),
    ("attention.layer_norm_rms_epsilon", 6),
    ("attention.sliding_window", 4),
    ("rope.freq_base", 6),
    ("rope.dimension_count", 4),
    ("rope.scaling.factor", 6),
    ("vocab_size", 4),
];

/// Other keys and their value types (9: an array, of the element type given second).
const KEYS: &[(&str, u32, u32)] = &[
    ("general.alignment", 4, 0),
    ("general.name", 8, 0),
    ("tokenizer.ggml.model", 8, 0),
    ("tokenizer.ggml.pre", 8, 0),
    ("tokenizer.ggml.tokens", 9, 8),
    ("tokenizer.ggml.scores", 9, 6),
    ("tokenizer.ggml.token_type", 9, 5),
    ("tokenizer.ggml.merges", 9, 8),
    ("tokenizer.ggml.bos_token_id", 4, 0),
    ("tokenizer.ggml.eos_token_id", 4, 0),
    ("tokenizer.ggml.unknown_token_id", 4, 0),
    ("tokenizer.ggml.add_bos_token", 7, 0),
    ("tokenizer.ggml.add_eos_token", 7, 0),
    ("tokenizer.ggml.add_space_prefix", 7, 0),
    ("tokenizer.chat_template", 8, 0),
];

const MODELS: &[&str] = &["llama", "gpt2", "bert", "t5", ""];
const PRES: &[&str] = &[
    "default",
    "smollm",
    "llama-bpe",
    "qwen2",
    "gpt-2",
    "jina-v2-de",
    "?",
];

/// Token strings that have broken tokenizers elsewhere: byte tokens (and malformed ones), control
/// characters, the SentencePiece space, empty and special-looking strings.
const TOKENS: &[&str] = &[
    "<s>",
    "</s>",
    "<unk>",
    "<0x41>",
    "<0x0A>",
    "<0xZZ>",
    "<0x>",
    "\u{2581}",
    "\u{2581}a",
    "a",
    "ab",
    "",
    "\0",
    "\u{1b}[31m",
    "\r\n",
    "\u{fffd}",
    "<|im_start|>",
    "<|im_end|>",
    "\u{0120}",
    "\u{0120}\u{0120}",
    "<start_of_turn>",
    "<mask>",
    " ",
    "\u{10ffff}",
];

const TENSORS: &[&str] = &[
    "token_embd.weight",
    "output_norm.weight",
    "output.weight",
    "blk.0.attn_norm.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.0.attn_v.weight",
    "blk.0.attn_output.weight",
    "blk.0.ffn_norm.weight",
    "blk.0.ffn_gate.weight",
    "blk.0.ffn_up.weight",
    "blk.0.ffn_down.weight",
];

/// ggml type ids wgllm knows, and some it does not.
const TYPE_IDS: &[u32] = &[
    0,
    1,
    2,
    3,
    6,
    7,
    8,
    9,
    10,
    11,
    12,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    26,
    27,
    28,
    29,
    30,
    34,
    35,
    39,
    4,
    5,
    31,
    40,
    u32::MAX,
];

/// (weights per block, bytes per block) of the known ids; None for the rest.
fn block(id: u32) -> Option<(u64, u64)> {
    Some(match id {
        0 | 26 => (1, 4),
        1 | 25 | 30 => (1, 2),
        24 => (1, 1),
        27 | 28 => (1, 8),
        2 | 20 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 36),
        39 => (32, 17),
        10 => (256, 84),
        11 | 21 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        16 | 35 => (256, 66),
        17 => (256, 74),
        18 => (256, 98),
        19 => (256, 50),
        22 => (256, 82),
        23 => (256, 136),
        29 => (256, 56),
        34 => (256, 54),
        _ => return None,
    })
}

const DIMS: &[u64] = &[
    0,
    1,
    2,
    4,
    8,
    31,
    32,
    64,
    256,
    257,
    512,
    1 << 31,
    1 << 32,
    (1 << 32) + 256,
    1 << 40,
    1 << 62,
    u64::MAX,
    u64::MAX - 255,
];

/// A count or length as written: mostly the truth, sometimes off by a little, sometimes absurd.
fn declared(u: &mut Unstructured, real: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=15u8)? {
        0 => real.wrapping_add(1),
        1 => real.wrapping_sub(1),
        2 => *u.choose(&[u64::MAX, 1 << 32, 1 << 62, (1 << 61) + 1, u32::MAX as u64])?,
        3 => u.arbitrary()?,
        _ => real,
    })
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_str(u: &mut Unstructured, b: &mut Vec<u8>, s: &[u8]) -> Result<()> {
    put_u64(b, declared(u, s.len() as u64)?);
    b.extend_from_slice(s);
    Ok(())
}

/// A string: from `pool` mostly, else arbitrary bytes (not always UTF-8), or one long run.
fn some_string(u: &mut Unstructured, pool: &[&str]) -> Result<Vec<u8>> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 => u.arbitrary::<&[u8]>()?.to_vec(),
        1 => vec![*u.choose(b"a\xe2\x80\x81 <")?; u.int_in_range(0..=4096usize)?],
        _ => u.choose(pool)?.as_bytes().to_vec(),
    })
}

/// One value of GGUF type `ty` (arrays: of `elem`, or arbitrary when `elem` is 0 and a coin says).
fn put_value(
    u: &mut Unstructured,
    b: &mut Vec<u8>,
    ty: u32,
    elem: u32,
    depth: u32,
    pool: &[&str],
) -> Result<()> {
    match ty {
        0 | 1 | 7 => b.push(u.arbitrary()?),
        2 | 3 => b.extend_from_slice(&u.arbitrary::<[u8; 2]>()?),
        4 | 5 => {
            let v: u32 = match u.int_in_range(0..=3u8)? {
                0 => u.arbitrary()?,
                1 => *u.choose(&[0, u32::MAX, i32::MAX as u32, 1 << 16])?,
                _ => u.int_in_range(0..=300)?,
            };
            put_u32(b, v)
        }
        6 => b.extend_from_slice(
            &u.choose(&[
                1.0f32,
                0.0,
                -1.0,
                1e-5,
                f32::NAN,
                f32::INFINITY,
                1e30,
                10000.0,
            ])?
            .to_le_bytes(),
        ),
        8 => {
            let s = some_string(u, pool)?;
            put_str(u, b, &s)?
        }
        9 => {
            let elem = if elem == 0 || u.ratio(1, 8u8)? {
                u.int_in_range(0..=13u32)?
            } else {
                elem
            };
            let elem = if elem == 9 && depth >= 6 { 4 } else { elem };
            let n: u64 = match u.int_in_range(0..=7u8)? {
                0 => u.int_in_range(0..=4096)?,
                _ => u.int_in_range(0..=40)?,
            };
            put_u32(b, elem);
            put_u64(b, declared(u, n)?);
            for _ in 0..n {
                if u.is_empty() {
                    break;
                }
                put_value(u, b, elem, 0, depth + 1, pool)?;
            }
        }
        10..=12 => b.extend_from_slice(&u.arbitrary::<[u8; 8]>()?),
        _ => {} // an unknown type: nothing the parser could read
    }
    Ok(())
}

struct Tensor {
    name: Vec<u8>,
    dims: Vec<u64>,
    ty: u32,
    offset: Option<u64>,
    data: Vec<u8>,
}

/// A GGUF file from the recipe `u`.
pub fn gguf_from_recipe(u: &mut Unstructured) -> Result<Vec<u8>> {
    let arch = *u.choose(ARCHES)?;
    let align: u64 = if u.ratio(1, 8u8)? {
        *u.choose(&[1, 8, 64, 3, 0, 1 << 31])?
    } else {
        32
    };

    // Metadata.
    let mut kv = Vec::new();
    let n_kv = u.int_in_range(0..=24u32)?;
    let mut wrote_align = false;
    for _ in 0..n_kv {
        if u.is_empty() {
            break;
        }
        let (key, ty, elem, pool): (Vec<u8>, u32, u32, &[&str]) = match u.int_in_range(0..=9u8)? {
            0..=3 => {
                let (k, ty) = *u.choose(ARCH_KEYS)?;
                (format!("{arch}.{k}").into_bytes(), ty, 0, TOKENS)
            }
            4..=8 => {
                let (k, ty, elem) = *u.choose(KEYS)?;
                let pool: &[&str] = match k {
                    "tokenizer.ggml.model" => MODELS,
                    "tokenizer.ggml.pre" => PRES,
                    "general.architecture" => ARCHES,
                    _ => TOKENS,
                };
                (k.as_bytes().to_vec(), ty, elem, pool)
            }
            _ => (
                some_string(u, TOKENS)?,
                u.int_in_range(0..=13u32)?,
                0,
                TOKENS,
            ),
        };
        // Mostly the key's own type; sometimes any.
        let ty = if u.ratio(1, 10u8)? {
            u.int_in_range(0..=13u32)?
        } else {
            ty
        };
        if key == b"general.alignment" {
            if wrote_align {
                continue;
            }
            wrote_align = true;
            put_str(u, &mut kv, &key)?;
            put_u32(&mut kv, 4);
            put_u32(&mut kv, align as u32);
            continue;
        }
        put_str(u, &mut kv, &key)?;
        put_u32(&mut kv, ty);
        put_value(u, &mut kv, ty, elem, 0, pool)?;
    }
    let mut n_kv_written = n_kv;
    // general.architecture, mostly.
    if u.ratio(7, 8u8)? {
        put_str(u, &mut kv, b"general.architecture")?;
        put_u32(&mut kv, 8);
        put_str(u, &mut kv, arch.as_bytes())?;
        n_kv_written += 1;
    }
    let align = if wrote_align { align } else { 32 };

    // Tensors.
    let mut tensors = Vec::new();
    for _ in 0..u.int_in_range(0..=8u8)? {
        if u.is_empty() {
            break;
        }
        let name = if u.ratio(7, 8u8)? {
            u.choose(TENSORS)?.as_bytes().to_vec()
        } else {
            some_string(u, TENSORS)?
        };
        let n_dims = *u.choose(&[1usize, 1, 2, 2, 2, 0, 3, 4, 5])?;
        let ty = *u.choose(TYPE_IDS)?;
        let mut dims = Vec::new();
        for i in 0..n_dims {
            dims.push(if u.ratio(3, 4u8)? {
                // Row lengths that are whole blocks, small row counts.
                match (i, block(ty)) {
                    (0, Some((bl, _))) => bl * u.int_in_range(1..=4u64)?,
                    _ => u.int_in_range(1..=8u64)?,
                }
            } else {
                *u.choose(DIMS)?
            });
        }
        let real = block(ty).and_then(|(bl, bb)| {
            let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
            (n / bl).checked_mul(bb).filter(|&s| s <= 1 << 16)
        });
        let len = match real {
            Some(s) if u.ratio(7, 8u8)? => s,
            _ => u.int_in_range(0..=512u64)?,
        };
        // Bytes below 0x3c: every f16 scale finite; else the recipe's own bytes.
        let fill = u.int_in_range(0..=0x3bu8)?;
        let mut data = vec![fill; len as usize];
        if u.ratio(1, 4u8)? {
            let raw: &[u8] = u.arbitrary()?;
            for (d, r) in data.iter_mut().zip(raw) {
                *d = *r;
            }
        }
        let offset = match u.int_in_range(0..=15u8)? {
            0 => Some(u.arbitrary()?),
            1 => Some(0),
            _ => None,
        };
        tensors.push(Tensor {
            name,
            dims,
            ty,
            offset,
            data,
        });
    }

    // The file.
    let mut b = b"GGUF".to_vec();
    let version = if u.ratio(1, 16u8)? {
        u.arbitrary()?
    } else {
        *u.choose(&[3u32, 3, 3, 2])?
    };
    put_u32(&mut b, version);
    put_u64(&mut b, declared(u, tensors.len() as u64)?);
    put_u64(&mut b, declared(u, u64::from(n_kv_written))?);
    b.extend_from_slice(&kv);
    // The layout follows the alignment the file claims where that is sane; an absurd one (the
    // parser refuses it) is written with the default, not padded to gigabytes.
    let step = if (1..=4096).contains(&align) {
        align as usize
    } else {
        32
    };
    let mut data = Vec::new();
    for t in &tensors {
        data.resize(data.len().next_multiple_of(step), 0);
        put_str(u, &mut b, &t.name)?;
        put_u32(&mut b, declared(u, t.dims.len() as u64)? as u32);
        for &d in &t.dims {
            put_u64(&mut b, d);
        }
        put_u32(&mut b, t.ty);
        put_u64(&mut b, t.offset.unwrap_or(data.len() as u64));
        data.extend_from_slice(&t.data);
    }
    b.resize(b.len().next_multiple_of(step), 0);
    b.extend_from_slice(&data);
    if u.ratio(1, 16u8)? {
        let keep = u.int_in_range(0..=b.len())?;
        b.truncate(keep);
    }
    Ok(b)
}
