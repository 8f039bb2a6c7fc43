//! Structure-aware inputs (issue #33): the fuzzer's bytes are read as a sequence of choices
//! ([`arbitrary::Unstructured`]) that build a GGUF file, a tokenizer folder or a chat template
//! from their grammars, so that mutations land on deep metadata, hyperparameters, regexes,
//! normalizers and template programs instead of breaking the outer syntax on the first byte.
//! The byte-level targets of the same parsers stay; these reach what they did not (the 24
//! hostile files of issue #33: nesting, counts of 0 or 2^63, duplicate keys and tensors,
//! partial blocks, unbounded regexes and paddings, templates that double strings).
//!
//! Every choice reads from the input and falls back to the first option when the input runs
//! out, so an empty input builds the smallest well-formed file, which the parser accepts.

use arbitrary::Unstructured;
use fuserl_model::quant::GgmlType;
use serde_json::{Value, json};

/// The fuzzer's bytes as choices.
#[derive(Debug)]
pub struct Choices<'a>(Unstructured<'a>);

impl<'a> Choices<'a> {
    /// Choices read from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self(Unstructured::new(data))
    }

    /// A number in `0..n` (0 once the input is used up).
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 1 { 0 } else { self.0.int_in_range(0..=n - 1).unwrap_or(0) }
    }

    /// True with probability about 1 in `n` (false once the input is used up).
    pub fn one_in(&mut self, n: u32) -> bool {
        // (Not `Unstructured::ratio`, which is true once the input is used up.)
        n <= 1 || self.below(n as usize) == n as usize - 1
    }

    /// One of `options`.
    pub fn pick<T: Clone>(&mut self, options: &[T]) -> T {
        options[self.below(options.len())].clone()
    }

    /// A byte (0 once the input is used up).
    pub fn byte(&mut self) -> u8 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// Up to `n` raw bytes (fewer once the input runs out).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let take = n.min(self.0.len());
        self.0.bytes(take).map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// A count from `lo` to `hi`.
    pub fn count(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// An integer as hostile files hold them: mostly small, sometimes a boundary.
    pub fn int(&mut self, usual: i64) -> i64 {
        if !self.one_in(6) {
            return usual;
        }
        self.pick(&[
            0,
            -1,
            1,
            2,
            3,
            7,
            255,
            65_535,
            1 << 24,
            (1 << 24) + 1,
            1 << 31,
            i64::from(u32::MAX),
            1 << 40,
            i64::MAX,
            i64::MIN,
        ])
    }

    /// A short text from pieces that matter to tokenizers and templates (specials, byte-level
    /// marks, escapes, multi-byte and invisible characters), sometimes long.
    pub fn text(&mut self) -> String {
        const PIECES: &[&str] = &[
            "a",
            "b",
            "ab",
            " ",
            "\n",
            "\t",
            "Ġ",
            "Ċ",
            "▁",
            "<s>",
            "</s>",
            "<|im_start|>",
            "<|im_end|>",
            "<0x0A>",
            "<0xFF>",
            "##",
            "é",
            "日本",
            "🦀",
            "\u{200b}",
            "\u{1b}[2J",
            "\r",
            "'",
            "\"",
            "\\",
            "{{",
            "%}",
            "\u{fffd}",
            "\u{0}",
            "0",
            "12",
            "user",
            "assistant",
            "ÿ",
        ];
        let mut s = String::new();
        for _ in 0..self.count(1, 4) {
            s.push_str(self.pick(PIECES));
        }
        if self.one_in(24) {
            s = s.repeat(self.pick(&[64, 600, 1025, 5000]));
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// A metadata value as it is written.
enum Meta {
    U8(u8),
    I32(i32),
    U32(u32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    /// Element type code and the elements (written as the code says, whatever they are).
    Array(u32, Vec<Meta>),
    /// An array whose claimed length is not its true one.
    LyingArray(u32, u64, Vec<Meta>),
}

impl Meta {
    fn code(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::Array(..) | Self::LyingArray(..) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::U8(v) => out.push(*v),
            Self::I32(v) => out.extend(v.to_le_bytes()),
            Self::U32(v) => out.extend(v.to_le_bytes()),
            Self::U64(v) => out.extend(v.to_le_bytes()),
            Self::I64(v) => out.extend(v.to_le_bytes()),
            Self::F32(v) => out.extend(v.to_le_bytes()),
            Self::F64(v) => out.extend(v.to_le_bytes()),
            Self::Bool(v) => out.push(u8::from(*v)),
            Self::Str(s) => put_str(out, s),
            Self::Array(ty, items) => {
                out.extend(ty.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|i| i.write(out));
            }
            Self::LyingArray(ty, n, items) => {
                out.extend(ty.to_le_bytes());
                out.extend(n.to_le_bytes());
                items.iter().for_each(|i| i.write(out));
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A count as a file may hold it: the usual type, sometimes another one or a hostile value.
fn count_meta(c: &mut Choices, usual: usize) -> Meta {
    let v = c.int(usual as i64);
    match c.below(8) {
        0 => Meta::I32(v as i32),
        1 => Meta::U64(v as u64),
        2 => Meta::I64(v),
        3 if c.one_in(4) => Meta::Str(v.to_string()),
        4 if c.one_in(4) => Meta::F32(v as f32),
        5 if c.one_in(4) => Meta::Array(4, (0..c.below(3)).map(|_| Meta::U32(v as u32)).collect()),
        _ => Meta::U32(v as u32),
    }
}

/// Metadata nested `depth` levels (llama.cpp's reader recurses; fuserl's stops at 4).
fn nested(c: &mut Choices, depth: usize) -> Meta {
    if depth == 0 {
        return Meta::U8(c.byte());
    }
    let n = c.count(1, 2);
    Meta::Array(9, (0..n).map(|_| nested(c, depth - 1)).collect())
}

/// The ggml type of a tensor with rows of `cols` values: a type whose blocks fit the rows, as
/// llama.cpp's quantiser picks, sometimes one that does not, or an unknown code.
fn tensor_type(c: &mut Choices, cols: usize) -> u32 {
    const CODES: &[u32] = &[0, 1, 30, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 15];
    if c.one_in(32) {
        return c.pick(&[4, 5, 9, 16, 31, 99, u32::MAX]);
    }
    let code = c.pick(CODES);
    let fits = GgmlType::from_code(code).is_some_and(|t| cols.is_multiple_of(t.block().0));
    if fits || c.one_in(16) { code } else { 0 }
}

/// The bytes of `values` values of ggml type `code`: floats small and finite, blocks from the
/// input (their scales mostly small: an f16 scale's high byte kept under the exponent's top).
fn tensor_bytes(c: &mut Choices, code: u32, values: usize) -> Vec<u8> {
    let Some(ty) = GgmlType::from_code(code) else { return c.bytes(64) };
    let (block, bytes) = ty.block();
    let len = values / block * bytes;
    match code {
        0 => (0..values).flat_map(|_| (f32::from(c.byte() as i8) / 64.0).to_le_bytes()).collect(),
        1 => (0..values).flat_map(|_| half::f16::from_f32(f32::from(c.byte() as i8) / 64.0).to_le_bytes()).collect(),
        30 => (0..values).flat_map(|_| half::bf16::from_f32(f32::from(c.byte() as i8) / 64.0).to_le_bytes()).collect(),
        _ => {
            let mut raw = c.bytes(len);
            raw.resize(len, 0);
            if !c.one_in(8) {
                // Most f16 scales finite: clear the top exponent bit of every odd byte.
                raw.iter_mut().skip(1).step_by(2).for_each(|b| *b &= 0x3f);
            }
            raw
        }
    }
}

/// A GGUF file of a small model of one of the four families fuserl converts, built from
/// choices: hyperparameters (sometimes of the wrong type, 0, negative or huge, missing,
/// inconsistent), a byte-level vocabulary with merges, token types and ids, a chat template,
/// extra and nested metadata, duplicates, and a tensor table with every layer's tensors in
/// types whose blocks fit their rows (sometimes not), at offsets that are aligned (sometimes
/// not), with data from the input.
pub fn gguf(c: &mut Choices) -> Vec<u8> {
    let arch = if c.one_in(32) { c.text() } else { c.pick(&["llama", "qwen2", "qwen3", "gemma3"]).to_owned() };
    let gemma = arch == "gemma3";
    let head_dim = c.pick(&[8usize, 4, 16, 32, 64]);
    let heads = c.pick(&[2usize, 1, 4]);
    let kv = if c.one_in(2) { heads } else { 1 };
    let hidden = heads * head_dim;
    let ffn = c.pick(&[32usize, 64, 256]);
    let layers = c.pick(&[1usize, 2]);
    let n_tokens = c.count(4, 40);
    let key = |k: &str| format!("{arch}.{k}");

    let mut meta: Vec<(String, Meta)> = vec![("general.architecture".into(), Meta::Str(arch.clone()))];
    let mut hyper = vec![
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv),
        ("embedding_length", hidden),
        ("feed_forward_length", ffn),
        ("block_count", layers),
        ("context_length", 64),
    ];
    if gemma {
        hyper.push(("attention.sliding_window", 16));
        hyper.push(("attention.key_length", head_dim));
    }
    if c.one_in(8) {
        hyper.push(("vocab_size", n_tokens));
    }
    if c.one_in(8) {
        hyper.push(("rope.dimension_count", head_dim));
    }
    for (k, v) in hyper {
        if !c.one_in(24) {
            meta.push((key(k), count_meta(c, v)));
        }
    }
    if c.one_in(4) {
        let eps = c.pick(&[1e-6f32, 1e-5, 0.0, -1.0, f32::NAN, f32::INFINITY]);
        meta.push((key("attention.layer_norm_rms_epsilon"), Meta::F32(eps)));
    }
    if c.one_in(4) {
        let theta = c.pick(&[10_000.0, 1e6, 0.0, -5.0, f64::NAN]);
        let theta = if c.one_in(2) { Meta::F64(theta) } else { Meta::F32(theta as f32) };
        meta.push((key("rope.freq_base"), theta));
    }
    if c.one_in(8) {
        meta.push((key("rope.scaling.type"), Meta::Str(c.pick(&["linear", "none", "yarn", "llama3"]).into())));
        if c.one_in(2) {
            meta.push((key("rope.scaling.factor"), Meta::F32(c.pick(&[2.0, 0.0, -1.0, f32::INFINITY]))));
        }
    }

    // The vocabulary: byte-level pieces, each once (sometimes twice), merges of neighbours.
    let mut tokens: Vec<String> = Vec::new();
    for i in 0..n_tokens {
        let t = if i < 3 { ["<s>", "</s>", "<|im_end|>"][i].to_owned() } else { c.text() };
        tokens.push(if c.one_in(12) { t } else { format!("{t}{i}") });
    }
    meta.push(("tokenizer.ggml.model".into(), Meta::Str(c.pick(&["gpt2", "llama", "gemma", "bert", ""]).into())));
    if !c.one_in(32) {
        let items = tokens.iter().map(|t| Meta::Str(t.clone())).collect();
        meta.push(("tokenizer.ggml.tokens".into(), Meta::Array(8, items)));
    }
    if !c.one_in(4) {
        let n = c.below(tokens.len());
        let merges = (0..n)
            .map(|_| {
                let a = c.pick(&tokens);
                let b = if c.one_in(8) { c.text() } else { c.pick(&tokens) };
                let sep = if c.one_in(16) { "" } else { " " };
                Meta::Str(format!("{a}{sep}{b}"))
            })
            .collect();
        meta.push(("tokenizer.ggml.merges".into(), Meta::Array(8, merges)));
    }
    if c.one_in(2) {
        let types = (0..tokens.len() + c.below(3))
            .map(|i| Meta::I32(if i < 3 { 3 } else { c.pick(&[1, 1, 2, 3, 4, 5, 6, -1, 77]) }))
            .collect();
        meta.push(("tokenizer.ggml.token_type".into(), Meta::Array(5, types)));
    }
    if c.one_in(3) {
        let scores = (0..tokens.len()).map(|_| Meta::F32(f32::from(c.byte() as i8))).collect();
        meta.push(("tokenizer.ggml.scores".into(), Meta::Array(6, scores)));
    }
    for (k, usual) in
        [("tokenizer.ggml.bos_token_id", 0), ("tokenizer.ggml.eos_token_id", 1), ("tokenizer.ggml.padding_token_id", 2)]
    {
        if !c.one_in(4) {
            meta.push((k.into(), Meta::U32(c.int(usual) as u32)));
        }
    }
    if c.one_in(3) {
        meta.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(c.one_in(2))));
    }
    if !c.one_in(4) {
        meta.push(("tokenizer.chat_template".into(), Meta::Str(template(c))));
    }
    // Hostile extras: deep nesting, a length that lies, a key again.
    if c.one_in(8) {
        let depth = c.count(1, 8);
        meta.push(("general.nested".into(), nested(c, depth)));
    }
    if c.one_in(16) {
        let n = c.pick(&[2u64, 1 << 20, 1 << 40, u64::MAX]);
        meta.push(("general.lying".into(), Meta::LyingArray(0, n, vec![Meta::U8(1), Meta::U8(2)])));
    }
    if c.one_in(16) {
        let n = c.below(meta.len());
        let again = (meta[n].0.clone(), Meta::U32(1));
        meta.push(again);
    }
    if c.one_in(8) {
        meta.push(("general.alignment".into(), count_meta(c, 32)));
    }

    // The tensor table: every tensor the family has, `[cols, rows]` as ggml writes dims.
    let vocab = tokens.len();
    let q = heads * head_dim;
    let kvd = kv * head_dim;
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("token_embd.weight".into(), vec![hidden, vocab]), ("output_norm.weight".into(), vec![hidden])];
    if !gemma && c.one_in(2) {
        shapes.push(("output.weight".into(), vec![hidden, vocab]));
    }
    for l in 0..layers {
        let mut layer = vec![
            ("attn_q.weight", vec![hidden, q]),
            ("attn_k.weight", vec![hidden, kvd]),
            ("attn_v.weight", vec![hidden, kvd]),
            ("attn_output.weight", vec![q, hidden]),
            ("ffn_gate.weight", vec![hidden, ffn]),
            ("ffn_up.weight", vec![hidden, ffn]),
            ("ffn_down.weight", vec![ffn, hidden]),
            ("attn_norm.weight", vec![hidden]),
            ("ffn_norm.weight", vec![hidden]),
        ];
        if arch == "qwen2" {
            layer.extend([("attn_q.bias", vec![q]), ("attn_k.bias", vec![kvd]), ("attn_v.bias", vec![kvd])]);
        }
        if arch == "qwen3" || gemma {
            layer.extend([("attn_q_norm.weight", vec![head_dim]), ("attn_k_norm.weight", vec![head_dim])]);
        }
        if gemma {
            layer.extend([("post_attention_norm.weight", vec![hidden]), ("post_ffw_norm.weight", vec![hidden])]);
        }
        shapes.extend(layer.into_iter().map(|(n, d)| (format!("blk.{l}.{n}"), d)));
    }
    if c.one_in(16) {
        let n = c.below(shapes.len());
        shapes.remove(n);
    }
    if c.one_in(16) {
        let n = c.below(shapes.len());
        let again = shapes[n].clone();
        shapes.push(again);
    }
    if c.one_in(32) {
        shapes.push(("rope_freqs.weight".into(), vec![head_dim / 2]));
    }
    if c.one_in(16) {
        // A dimension off by one, or huge.
        let n = c.below(shapes.len());
        let d = c.below(shapes[n].1.len());
        shapes[n].1[d] = c.pick(&[shapes[n].1[d] + 1, 0, 1 << 31, usize::MAX / 2]);
    }
    let mut tensors = Vec::new();
    let mut data = Vec::new();
    for (name, dims) in shapes {
        let code = tensor_type(c, dims[0]);
        let values = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX);
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
        let mut offset = data.len() as u64;
        if c.one_in(32) {
            offset = c.pick(&[offset + 1, u64::MAX - 7, 1 << 40]);
        }
        if values <= 1 << 16 {
            data.extend(tensor_bytes(c, code, values));
        }
        tensors.push((name, dims, code, offset));
    }

    let mut out = b"GGUF".to_vec();
    out.extend(c.pick(&[3u32, 2, 1, 4]).to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut out, k);
        out.extend(v.code().to_le_bytes());
        v.write(&mut out);
    }
    for (name, dims, code, offset) in &tensors {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|&d| out.extend((d as u64).to_le_bytes()));
        out.extend(code.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(data);
    if c.one_in(16) {
        let cut = c.below(out.len());
        out.truncate(cut);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json and tokenizer_config.json

/// A regular expression for a `Split` pre-tokenizer or a `Replace` normaliser, from the pieces
/// real tokenizers use and the Oniguruma constructs that are costly or unusual (look-behind,
/// back-references, possessive and nested quantifiers, Unicode classes).
fn regex(c: &mut Choices) -> String {
    const ATOMS: &[&str] = &[
        r"\p{L}+",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s+(?!\S)",
        r"\s+",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        r"[^\r\n\p{L}\p{N}]?\p{L}+",
        r"'s",
        r"a",
        r"(?<=a)b",
        r"(?<!x)y",
        r"(a|b)\1",
        r"(?<n>x)\k<n>",
        r"(?>a+)",
        r"a*+",
        r"(a*)*",
        r"(a|aa)+",
        r"\X",
        r"[[:alpha:]]",
        r"\G",
        r"\K",
        r"\b",
        r".",
        r"[\u0000-\uFFFF]",
        r"\p{Han}",
        r"(?=a)",
        r"[",
        r"(",
        r"\",
        r"{",
        r"a{2,1}",
        r"a{99999}",
        r"(?i)",
        r"^",
        r"$",
        r"\h",
        r"\R",
        r"(?~a)",
    ];
    let mut s = String::new();
    for i in 0..c.count(1, 4) {
        if i > 0 {
            s.push('|');
        }
        s.push_str(c.pick(ATOMS));
        if c.one_in(4) {
            s.push_str(c.pick(&["*", "+", "?", "{1,3}", "*?", "++", "{0,}"]));
        }
    }
    s
}

fn normalizer(c: &mut Choices, depth: usize) -> Value {
    match c.below(if depth > 2 { 8 } else { 10 }) {
        0 => Value::Null,
        1 => json!({"type": c.pick(&["NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Nmt", "StripAccents"])}),
        2 => json!({"type": "Strip", "strip_left": c.one_in(2), "strip_right": c.one_in(2)}),
        3 => json!({"type": "Replace", "pattern": pattern(c), "content": c.text()}),
        4 => json!({"type": "Prepend", "prepend": c.text()}),
        5 => json!({"type": "BertNormalizer", "clean_text": c.one_in(2), "handle_chinese_chars": c.one_in(2),
                    "strip_accents": c.pick(&[Value::Null, json!(true), json!(false)]), "lowercase": c.one_in(2)}),
        6 => {
            // A SentencePiece charsmap: base64 of bytes from the input.
            use base64::Engine;
            let charsmap = base64::engine::general_purpose::STANDARD.encode(c.bytes(96));
            json!({"type": "Precompiled", "precompiled_charsmap": charsmap})
        }
        7 => json!({"type": "ByteLevel"}),
        _ => {
            let n = c.count(0, 3);
            json!({"type": "Sequence", "normalizers": (0..n).map(|_| normalizer(c, depth + 1)).collect::<Vec<_>>()})
        }
    }
}

fn pattern(c: &mut Choices) -> Value {
    if c.one_in(2) { json!({"Regex": regex(c)}) } else { json!({"String": c.text()}) }
}

fn pre_tokenizer(c: &mut Choices, depth: usize) -> Value {
    match c.below(if depth > 2 { 9 } else { 10 }) {
        0 => {
            json!({"type": "ByteLevel", "add_prefix_space": c.one_in(2), "trim_offsets": c.one_in(2), "use_regex": !c.one_in(4)})
        }
        1 => Value::Null,
        2 => {
            json!({"type": c.pick(&["Whitespace", "WhitespaceSplit", "BertPreTokenizer", "Punctuation", "UnicodeScripts"])})
        }
        3 => {
            json!({"type": "Metaspace", "replacement": c.pick(&["▁", "_", "Ġ"]), "prepend_scheme": c.pick(&["always", "first", "never"]), "split": c.one_in(2)})
        }
        4 | 5 => json!({"type": "Split", "pattern": pattern(c),
                        "behavior": c.pick(&["Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"]),
                        "invert": c.one_in(4)}),
        6 => json!({"type": "Digits", "individual_digits": c.one_in(2)}),
        7 => json!({"type": "CharDelimiterSplit", "delimiter": c.pick(&[" ", "a", "日"])}),
        8 => json!({"type": "Split", "pattern": {"Regex": regex(c)}, "behavior": "Isolated", "invert": false}),
        _ => {
            let n = c.count(0, 3);
            json!({"type": "Sequence", "pretokenizers": (0..n).map(|_| pre_tokenizer(c, depth + 1)).collect::<Vec<_>>()})
        }
    }
}

fn decoder(c: &mut Choices, depth: usize) -> Value {
    match c.below(if depth > 2 { 9 } else { 10 }) {
        0 => {
            json!({"type": "ByteLevel", "add_prefix_space": c.one_in(2), "trim_offsets": c.one_in(2), "use_regex": c.one_in(2)})
        }
        1 => Value::Null,
        2 => json!({"type": "Replace", "pattern": pattern(c), "content": c.text()}),
        3 => json!({"type": c.pick(&["ByteFallback", "Fuse"])}),
        4 => json!({"type": "Strip", "content": c.pick(&[" ", "a", "▁"]), "start": c.int(1), "stop": c.int(0)}),
        5 => json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}),
        6 => json!({"type": "WordPiece", "prefix": c.pick(&["##", "", "▁"]), "cleanup": c.one_in(2)}),
        7 => json!({"type": "BPEDecoder", "suffix": c.pick(&["</w>", ""])}),
        8 => json!({"type": "CTC", "pad_token": "<pad>", "word_delimiter_token": "|", "cleanup": true}),
        _ => {
            let n = c.count(0, 3);
            json!({"type": "Sequence", "decoders": (0..n).map(|_| decoder(c, depth + 1)).collect::<Vec<_>>()})
        }
    }
}

/// A tokenizer model over `vocab` (whose first entries are the special tokens).
fn model(c: &mut Choices, vocab: &[String]) -> Value {
    let ids: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(if c.one_in(64) { c.int(i as i64) } else { i as i64 })))
        .collect();
    match c.below(5) {
        0 | 1 => {
            let n = c.below(vocab.len());
            let merges: Vec<Value> = (0..n)
                .map(|_| {
                    let (a, b) = (c.pick(vocab), c.pick(vocab));
                    if c.one_in(3) { json!([a, b]) } else { json!(format!("{a} {b}")) }
                })
                .collect();
            json!({"type": "BPE", "dropout": c.pick(&[Value::Null, json!(0.5), json!(1.5)]), "unk_token": c.pick(&[Value::Null, json!("<unk>"), json!(vocab[0])]),
                   "continuing_subword_prefix": c.pick(&[Value::Null, json!("##")]), "end_of_word_suffix": c.pick(&[Value::Null, json!("</w>")]),
                   "fuse_unk": c.one_in(2), "byte_fallback": c.one_in(2), "ignore_merges": c.one_in(2), "vocab": ids, "merges": merges})
        }
        2 => json!({"type": "WordPiece", "unk_token": c.pick(&["<unk>", "a"]), "continuing_subword_prefix": "##",
                    "max_input_chars_per_word": c.int(100), "vocab": ids}),
        3 => {
            let pieces: Vec<Value> = vocab.iter().map(|t| json!([t, -f64::from(c.byte()) / 8.0])).collect();
            let unk = json!(c.int(0));
            json!({"type": "Unigram", "unk_id": c.pick(&[Value::Null, json!(0), unk]), "vocab": pieces, "byte_fallback": c.one_in(2)})
        }
        _ => json!({"type": "WordLevel", "unk_token": c.pick(&["<unk>", "a"]), "vocab": ids}),
    }
}

/// A tokenizer folder's two files (`tokenizer.json`, `tokenizer_config.json`) from choices: a
/// model of each kind over a small vocabulary, normalisers, pre-tokenisers (regex splits),
/// decoders, post-processors, added tokens, `truncation` and `padding`, special-token fields
/// of every shape, a chat template.
pub fn tokenizer(c: &mut Choices) -> (Vec<u8>, Vec<u8>) {
    let mut vocab: Vec<String> = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"].map(String::from).to_vec();
    for i in 0..c.count(3, 60) {
        let t = c.text();
        vocab.push(if c.one_in(16) { t } else { format!("{t}{i}") });
    }
    // Byte-level vocabularies hold every byte's character; the others may not.
    if c.one_in(2) {
        vocab.extend(('!'..='~').map(String::from));
        vocab.extend(["Ġ", "Ċ"].map(String::from));
    }
    let added: Vec<Value> = (0..3)
        .map(|i| {
            let content = if c.one_in(16) { c.text() } else { vocab[i].clone() };
            json!({"id": if c.one_in(16) { c.int(i as i64) } else { i as i64 }, "content": content, "single_word": c.one_in(4),
                   "lstrip": c.one_in(4), "rstrip": c.one_in(4), "normalized": c.one_in(4), "special": !c.one_in(4)})
        })
        .collect();
    let truncation = if c.one_in(4) {
        json!({"direction": "Right", "max_length": c.int(8), "strategy": "LongestFirst", "stride": c.int(0)})
    } else {
        Value::Null
    };
    let padding = if c.one_in(4) {
        let multiple = json!(c.int(0));
        json!({"strategy": if c.one_in(2) { json!("BatchLongest") } else { json!({"Fixed": c.int(16)}) }, "direction": "Right",
               "pad_to_multiple_of": c.pick(&[Value::Null, json!(8), multiple]), "pad_id": 2, "pad_type_id": 0, "pad_token": "<|endoftext|>"})
    } else {
        Value::Null
    };
    let post = match c.below(4) {
        0 => {
            json!({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                     "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                     "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [c.int(0)], "tokens": ["<|im_start|>"]}}})
        }
        1 => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": c.one_in(2), "use_regex": true}),
        _ => Value::Null,
    };
    let tj = json!({
        "version": "1.0", "truncation": truncation, "padding": padding, "added_tokens": added,
        "normalizer": normalizer(c, 0), "pre_tokenizer": pre_tokenizer(c, 0), "post_processor": post,
        "decoder": decoder(c, 0), "model": model(c, &vocab),
    });
    let special = |c: &mut Choices, usual: &str| -> Value {
        match c.below(8) {
            0 => {
                json!({"content": usual, "lstrip": false, "rstrip": false, "normalized": false, "single_word": false, "special": true, "__type": "AddedToken"})
            }
            1 if c.one_in(2) => Value::Null,
            2 if c.one_in(2) => json!(c.text()),
            3 if c.one_in(4) => json!(7),
            _ => json!(usual),
        }
    };
    let mut config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special(c, "<|im_start|>"),
        "eos_token": special(c, "<|im_end|>"), "pad_token": special(c, "<|endoftext|>"), "add_bos_token": c.one_in(3),
        "add_eos_token": c.one_in(8), "model_max_length": c.int(512), "clean_up_tokenization_spaces": c.one_in(2)});
    if !c.one_in(8) {
        config["chat_template"] = json!(template(c));
    }
    (serde_json::to_vec(&tj).expect("JSON"), serde_json::to_vec(&config).expect("JSON"))
}

// ---------------------------------------------------------------------------------------------
// chat templates

/// An expression of Jinja as chat templates write them, `depth` levels deep at most.
fn expr(c: &mut Choices, depth: usize) -> String {
    const LEAVES: &[&str] = &[
        "message['content']",
        "message.role",
        "messages[0]['content']",
        "messages[-1].role",
        "messages|length",
        "loop.index",
        "loop.first",
        "loop.last",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "ns.s",
        "ns.n",
        "s",
        "'<|im_start|>'",
        "'\\n'",
        "'a'",
        "''",
        "0",
        "1",
        "40",
        "1000000",
        "-1",
        "[1, 2, 3]",
        "{'a': 1}",
        "none",
        "true",
        "messages",
        "tools",
        "x",
        "undefined_name",
        "range(3)",
        "'{{ x }}'",
    ];
    if depth == 0 || c.one_in(3) {
        return c.pick(LEAVES).to_owned();
    }
    let a = expr(c, depth - 1);
    match c.below(14) {
        0 => format!("{a} ~ {}", expr(c, depth - 1)),
        1 => format!("{a} + {}", expr(c, depth - 1)),
        2 => format!("{a} * {}", c.pick(&["2", "3", "1000", "1000000", "-1", "ns.n"])),
        3 => format!(
            "({a}) | {}",
            c.pick(&[
                "trim",
                "upper",
                "length",
                "tojson",
                "list",
                "reverse",
                "first",
                "last",
                "string",
                "int",
                "items",
                "join(', ')",
                "replace('a', 'aaaa')",
                "default('d')",
                "indent(4)",
                "center(100000)",
                "map(attribute='role')",
                "selectattr('role', 'equalto', 'user')",
                "sort",
                "unique",
                "batch(2)",
                "safe",
                "escape",
                "title",
                "wordcount",
            ])
        ),
        4 => format!("{a} if {} else {}", expr(c, depth - 1), expr(c, depth - 1)),
        5 => format!("{a} is {}", c.pick(&["defined", "string", "none", "mapping", "iterable", "divisibleby(0)"])),
        6 => format!("{a} in {}", expr(c, depth - 1)),
        7 => format!("({a})[{}]", c.pick(&["0", "-1", "1:", "::-1", "'role'", "x", "1000000"])),
        8 => format!(
            "({a}).{}",
            c.pick(&["startswith('a')", "split('a')", "strip()", "upper()", "items()", "replace('a', 'bb')"])
        ),
        9 => format!("range({})", c.pick(&["3", "ns.n", "1000000", "-1", "messages|length"])),
        10 => format!("m({a})"),
        11 => format!("{a} == {}", expr(c, depth - 1)),
        12 => format!("raise_exception({a})"),
        _ => format!("[{a}, {}]", expr(c, depth - 1)),
    }
}

/// A block of template statements, `depth` levels of nesting at most.
fn block(c: &mut Choices, depth: usize) -> String {
    let mut s = String::new();
    for _ in 0..c.count(1, 3) {
        let ws = if c.one_in(3) { "-" } else { "" };
        let stmt = match c.below(if depth == 0 { 4 } else { 11 }) {
            0 => c.text(),
            1 => format!("{{{{{ws} {} {ws}}}}}", expr(c, 2)),
            2 => format!("{{%{ws} set s = {} {ws}%}}", expr(c, 2)),
            3 => format!("{{% set ns.s = ns.s ~ {} %}}{{% set ns.n = ns.n + 1 %}}", expr(c, 1)),
            4 => format!(
                "{{% for message in {} %}}{}{{% endfor %}}",
                c.pick(&["messages", "messages[1:]", "range(ns.n)", "messages|reverse"]),
                block(c, depth - 1)
            ),
            5 => format!(
                "{{% for i in range({}) %}}{}{{% endfor %}}",
                c.pick(&["2", "40", "100000"]),
                block(c, depth - 1)
            ),
            6 => format!(
                "{{% if {} %}}{}{{% elif {} %}}{}{{% else %}}{}{{% endif %}}",
                expr(c, 2),
                block(c, depth - 1),
                expr(c, 1),
                block(c, depth - 1),
                block(c, depth - 1)
            ),
            7 => format!("{{% macro m(a) %}}{}{{% endmacro %}}", block(c, depth - 1)),
            8 => format!("{{% filter upper %}}{}{{% endfilter %}}", block(c, depth - 1)),
            9 => format!("{{% raw %}}{}{{% endraw %}}", c.text()),
            _ => format!("{{% set ns.s = ns.s ~ ns.s %}}{}", block(c, depth - 1)),
        };
        s.push_str(&stmt);
    }
    s
}

/// A chat template from choices: loops over the messages and ranges, conditions, a namespace
/// that accumulates strings (and doubles them), macros that call themselves, filters, tests,
/// slices, method calls, exceptions, whitespace control.
pub fn template(c: &mut Choices) -> String {
    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let mut t = String::from("{% set ns = namespace(s='', n=1) %}");
    if c.one_in(3) {
        t.push_str(
            "{% macro m(a) %}{{ a }}{% if ns.n < 50 %}{% set ns.n = ns.n + 1 %}{{ m(a ~ a) }}{% endif %}{% endmacro %}",
        );
    } else {
        t.push_str("{% macro m(a) %}{{ a }}{% endmacro %}");
    }
    if !c.one_in(4) {
        t.push_str(CHATML);
    }
    let depth = c.count(1, 3);
    t.push_str(&block(c, depth));
    t
}
