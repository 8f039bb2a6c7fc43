//! Bad checkpoints are errors that name the file and the problem.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_model::Cpu;
use fuserl_model::checkpoint::{load, save};
use fuserl_model::logprobs::sequence_token_logprobs;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

/// A writable copy of a fixture.
fn copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

fn load_err(dir: &Path) -> String {
    load::<Cpu>(dir, &Default::default(), DType::F32).expect_err("should fail").to_string()
}

#[test]
fn missing_and_corrupt_safetensors() {
    let dir = copy("llama-tied");
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors: missing: the checkpoint has no such weights file"), "{err}");

    let dir = copy("llama-tied");
    std::fs::write(dir.path().join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").expect("write");
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors: not a valid safetensors file"), "{err}");

    let dir = copy("mistral-f16-sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).expect("rm");
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00002.safetensors: missing"), "{err}");

    let empty = tempfile::tempdir().expect("tmp");
    assert!(load_err(empty.path()).contains("not a Hugging Face checkpoint folder: it has no config.json"));
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = copy("llama-tied");
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("cfg")).expect("json");
    cfg["intermediate_size"] = 40.into();
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors: tensor `model.layers.0.mlp.gate_proj.weight` has shape [48, 32]; the config implies [40, 32]"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = copy("llama-tied");
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("cfg")).expect("json");
    cfg["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json: unsupported architecture `FalconForCausalLM`; supported: LlamaForCausalLM"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_too_big_for_the_model_is_refused() {
    // SmolLM2-sized tokenizers do not fit the 64-token test model: use a tiny tokenizer.json.
    let dir = copy("llama-tied");
    let vocab: serde_json::Map<String, serde_json::Value> = (0..100).map(|i| (format!("t{i}"), i.into())).collect();
    let tokenizer = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}});
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).expect("write");
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": "t2"}"#).expect("write");
    let tok = fuserl_model::chat::ChatTokenizer::load(dir.path(), None).expect("tokenizer");
    let err = tok.check_fits(64).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json: the tokenizer has token ids up to 99, but the model's vocab_size is 64"),
        "{err}"
    );
    assert!(tok.check_fits(100).is_ok());
}

#[test]
fn saved_checkpoints_reload_with_the_same_logprobs() {
    for (name, shard) in
        [("qwen2-bf16", 1 << 30), ("llama3-rope-head-dim", 40_000), ("qwen3", 1 << 30), ("gemma3", 1 << 30)]
    {
        let model = load::<Cpu>(&fixture(name), &Default::default(), DType::F32).expect("load");
        let out = tempfile::tempdir().expect("tmp");
        save(&model, out.path(), shard, Some(&fixture(name))).expect("save");
        if shard < 1 << 20 {
            assert!(out.path().join("model.safetensors.index.json").is_file(), "{name} should be sharded");
        }
        let again = load::<Cpu>(out.path(), &Default::default(), DType::F32).expect("reload");
        assert_eq!(again.config, model.config);
        let seqs = vec![vec![1, 5, 9, 33, 2, 7], vec![4, 4, 60]];
        let a = sequence_token_logprobs(&model, &seqs).expect("a");
        let b = sequence_token_logprobs(&again, &seqs).expect("b");
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn saving_in_half_precision_writes_half_precision() {
    let model = load::<Cpu>(&fixture("llama-tied"), &Default::default(), DType::F32).expect("load");
    let out = tempfile::tempdir().expect("tmp");
    fuserl_model::checkpoint::save_as(&model, out.path(), 1 << 30, None, DType::BF16).expect("save");
    let bytes = std::fs::read(out.path().join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    assert!(st.tensors().iter().all(|(_, v)| v.dtype() == safetensors::Dtype::BF16));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let again = load::<Cpu>(out.path(), &Default::default(), DType::F32).expect("reload");
    let seqs = vec![vec![1, 5, 9, 33, 2, 7]];
    let a = sequence_token_logprobs(&model, &seqs).expect("a");
    let b = sequence_token_logprobs(&again, &seqs).expect("b");
    assert!(a[0].iter().zip(&b[0]).all(|(x, y)| (x - y).abs() < 0.3), "{a:?} vs {b:?}");
}

#[test]
fn half_precision_dtypes_load_and_run() {
    let dir = fixture("llama-tied");
    let seqs = vec![vec![1, 5, 9, 33, 2, 7, 11, 40]];
    let full =
        sequence_token_logprobs(&load::<Cpu>(&dir, &Default::default(), DType::F32).expect("f32"), &seqs).expect("f32");
    for dtype in [DType::F16, DType::BF16] {
        let model = load::<Cpu>(&dir, &Default::default(), dtype).expect("load");
        assert_eq!(model.weights.embed_tokens.val().dtype(), dtype);
        let half = sequence_token_logprobs(&model, &seqs).expect("logprobs");
        let worst = half[0].iter().zip(&full[0]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        // A check that half dtypes load and run close to f32 (exactness is checked in f32): f16
        // keeps 11 bits of mantissa, bf16 8, and this model's logits are large (std-0.35 weights).
        let tol = if dtype == DType::F16 { 0.03 } else { 0.3 };
        eprintln!("{dtype:?}: worst per-token difference from f32 {worst}");
        assert!(worst < tol, "{dtype:?}: {worst}");
    }
}

/// A chat template that loops or recurses without end is stopped with an error naming the file,
/// not a hang or a stack overflow.
#[test]
fn a_template_that_never_ends_is_stopped() {
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../checkpoints/tiny-chat");
    for (what, template) in [
        ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
        ("a loop of a billion", "{% for i in range(1000000000) %}{{ i }}{% endfor %}"),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
            std::fs::copy(tokenizer.join(f), dir.path().join(f)).expect("copy");
        }
        std::fs::write(dir.path().join("chat_template.jinja"), template).expect("write");
        let tok = fuserl_model::chat::ChatTokenizer::load(dir.path(), None).expect("load");
        let t0 = std::time::Instant::now();
        let err = tok.render(&[fuserl_core::data::ChatMessage::user("hi")], true).expect_err(what).to_string();
        assert!(err.contains("chat_template.jinja: chat template:"), "{what}: {err}");
        assert!(t0.elapsed().as_secs() < 60, "{what}: took {:?}", t0.elapsed());
    }
}

/// A GGUF v3 file: no metadata, one tensor entry per `(name, dims, ggml type)` at offset 0, the
/// header claiming `n_tensors` entries, then `data` bytes after 32-byte alignment.
fn gguf(n_tensors: u64, tensors: &[(&str, &[u64], u32)], data: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    for (name, dims, ty) in tensors {
        b.extend((name.len() as u64).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32 + data, 0);
    b
}

/// #13: hostile GGUF headers are refused with a named error before anything is allocated.
#[test]
fn a_gguf_claiming_2_pow_60_values_or_tensors_is_refused_before_allocating() {
    use fuserl_model::gguf::Gguf;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("hostile.gguf");
    // 2^30 x 2^30 f32 values (4 EiB) behind 64 bytes of data.
    std::fs::write(&file, gguf(1, &[("w", &[1 << 30, 1 << 30], 0)], 64)).expect("write");
    let g = Gguf::read(&file).expect("the header itself is well formed");
    let err = g.dequantize(&g.tensors[0]).expect_err("refused").to_string();
    assert!(
        err.contains("hostile.gguf")
            && err.contains("tensor `w` (1152921504606846976 values of F32) runs past the end of the file"),
        "{err}"
    );
    // Dims whose product overflows.
    std::fs::write(&file, gguf(1, &[("w", &[1 << 40, 1 << 40], 0)], 64)).expect("write");
    let g = Gguf::read(&file).expect("header");
    let err = g.dequantize(&g.tensors[0]).expect_err("refused").to_string();
    assert!(err.contains("claim more values than any file can hold"), "{err}");
    // 2^60 tensor entries in a file that holds one.
    std::fs::write(&file, gguf(1 << 60, &[("w", &[4], 0)], 16)).expect("write");
    let err = Gguf::read(&file).expect_err("refused").to_string();
    assert!(err.contains("hostile.gguf") && err.contains("truncated"), "{err}");
    // A name claiming 2^60 bytes.
    let mut b = gguf(1, &[], 0);
    b.truncate(24);
    b.extend((1u64 << 60).to_le_bytes());
    std::fs::write(&file, b).expect("write");
    let err = Gguf::read(&file).expect_err("refused").to_string();
    assert!(err.contains("truncated: needs 1152921504606846976 bytes"), "{err}");
}

/// A safetensors file: an 8-byte header length, the header, then the data.
fn safetensors(header_len: u64, header: &str, data: usize) -> Vec<u8> {
    let mut b = header_len.to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.resize(b.len() + data, 0);
    b
}

/// #13: a safetensors header of 10 GB declared length, overlapping tensors and a tensor past the
/// end are refused with a named error (the file stays small: nothing is allocated for the claim).
#[test]
fn hostile_safetensors_headers_are_refused() {
    let cases = [
        ("10 GB header", safetensors(10_000_000_000, "{}", 0)),
        ("overlapping", {
            let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
            safetensors(h.len() as u64, h, 12)
        }),
        ("past the end", {
            let h = r#"{"a":{"dtype":"F32","shape":[200],"data_offsets":[0,800]}}"#;
            safetensors(h.len() as u64, h, 8)
        }),
    ];
    for (what, bytes) in cases {
        let dir = copy("llama-tied");
        std::fs::write(dir.path().join("model.safetensors"), bytes).expect("write");
        let err = load_err(dir.path());
        assert!(err.contains("model.safetensors: not a valid safetensors file"), "{what}: {err}");
    }
}

/// Issue #33: a safetensors index naming files outside its folder (absolute, `../`), a weights
/// file that is a FIFO (it would block), and weights that are not finite are refused, each with
/// the file and what is wrong; nothing outside the folder is read.
#[test]
fn index_paths_fifos_and_non_finite_weights_are_refused() {
    for bad in ["/etc/passwd", "../model-00001-of-00002.safetensors", ".hidden"] {
        let dir = copy("mistral-f16-sharded");
        let index = dir.path().join("model.safetensors.index.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).expect("index")).expect("json");
        let map = v["weight_map"].as_object_mut().expect("map");
        let first = map.keys().next().expect("a tensor").clone();
        map.insert(first.clone(), bad.into());
        std::fs::write(&index, v.to_string()).expect("write");
        let err = load_err(dir.path());
        assert!(
            err.contains("model.safetensors.index.json") && err.contains(&format!("weight_map: `{first}`")),
            "{bad}: {err}"
        );
        assert!(err.contains("cannot name a file"), "{bad}: {err}");
    }

    let dir = copy("llama-tied");
    let weights = dir.path().join("model.safetensors");
    std::fs::remove_file(&weights).expect("rm");
    let made = std::process::Command::new("mkfifo").arg(&weights).status().expect("mkfifo");
    assert!(made.success());
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors: not a regular file"), "{err}");

    // One weight set to NaN in an f32 file: the tensor is named.
    let dir = copy("llama-tied");
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let (name, view) = st.tensors().into_iter().find(|(_, v)| v.dtype() == safetensors::Dtype::F32).expect("f32");
    // The view borrows `bytes`: its data's address gives its offset in the file.
    let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
    let mut damaged = bytes.clone();
    damaged[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&weights, damaged).expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains(&format!("tensor `{name}`")) && err.contains("not finite"),
        "{err}"
    );
}

/// Issue #33: a sequence longer than the model's positions is refused by the log-prob and
/// generation paths before anything is allocated (a long enough text asked for about 100 GB).
#[test]
fn sequences_past_the_models_positions_are_refused_before_allocating() {
    let model = load::<Cpu>(&fixture("llama-tied"), &Default::default(), DType::F32).expect("model");
    let positions = model.config.max_position_embeddings;
    let long: Vec<u32> = (0..positions as u32 + 1).map(|i| i % 60 + 1).collect();
    let err = sequence_token_logprobs(&model, std::slice::from_ref(&long)).expect_err("too long").to_string();
    assert!(
        err.contains(&format!("of {} tokens is longer than the model's {positions} positions", long.len())),
        "{err}"
    );
    let ok: Vec<u32> = long[..positions].to_vec();
    assert!(sequence_token_logprobs(&model, &[ok]).is_ok());
}

/// A GGUF v3 file with the given raw metadata entries (key, then type and value bytes) and the
/// given tensors.
fn gguf_with_meta(meta: &[(&str, Vec<u8>)], tensors: &[(&str, &[u64], u32)], data: usize) -> Vec<u8> {
    let mut b = gguf(tensors.len() as u64, &[], 0);
    b.truncate(16);
    b.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(value);
    }
    let rest = gguf(tensors.len() as u64, tensors, data);
    b.extend(&rest[24..]);
    b
}

/// Issue #33: GGUF metadata arrays nested deep (a stack overflow before), arrays past the
/// metadata budget, duplicate keys and tensors, and quantised rows that are not whole blocks are
/// refused with the file and place named.
#[test]
fn gguf_nesting_budgets_duplicates_and_partial_blocks_are_refused() {
    use fuserl_model::gguf::Gguf;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("hostile.gguf");
    let read = |bytes: Vec<u8>| {
        std::fs::write(&file, bytes).expect("write");
        Gguf::read(&file).map(|_| ()).expect_err("refused").to_string()
    };
    // An array of arrays of ... 100,000 deep (type 9 = array; each level: its element type,
    // array again, and one element).
    let mut nested = 9u32.to_le_bytes().to_vec();
    for _ in 0..100_000 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    let err = read(gguf_with_meta(&[("deep", nested)], &[], 0));
    assert!(err.contains("hostile.gguf") && err.contains("nested deeper than 4 levels"), "{err}");
    // A u8 array of 2^23 values (over the metadata budget), claimed before it is read.
    let mut big = 9u32.to_le_bytes().to_vec();
    big.extend(0u32.to_le_bytes());
    big.extend((1u64 << 23).to_le_bytes());
    let err = read(gguf_with_meta(&[("big", big)], &[], 0));
    assert!(err.contains("claims 8388608 values") && err.contains("at most 4194304"), "{err}");
    // The same key twice (type 4 = u32).
    let value = [4u32.to_le_bytes(), 7u32.to_le_bytes()].concat();
    let err = read(gguf_with_meta(&[("general.alignment", value.clone()), ("general.alignment", value)], &[], 0));
    assert!(err.contains("metadata key `general.alignment` appears twice"), "{err}");
    // The same tensor twice.
    let err = read(gguf(2, &[("w", &[32], 0), ("w", &[32], 0)], 128));
    assert!(err.contains("tensor `w` appears twice"), "{err}");
    // Q8_0 (type 8, 32-value blocks): rows of 48 values, 96 values in all (whole blocks overall).
    std::fs::write(&file, gguf(1, &[("w", &[48, 2], 8)], 256)).expect("write");
    let g = Gguf::read(&file).expect("header");
    let err = g.dequantize(&g.tensors[0]).expect_err("refused").to_string();
    assert!(err.contains("rows of 48 values") && err.contains("32-value blocks"), "{err}");
    // A key with an escape sequence is shown escaped.
    let err = read(gguf_with_meta(
        &[
            ("evil\u{1b}[2J", [4u32.to_le_bytes(), 1u32.to_le_bytes()].concat()),
            ("evil\u{1b}[2J", [4u32.to_le_bytes(), 1u32.to_le_bytes()].concat()),
        ],
        &[],
        0,
    ));
    assert!(err.contains("evil\\u{1b}[2J") && !err.contains('\u{1b}'), "{err}");
}

/// Issue #33: `truncation` and `padding` in tokenizer.json are ignored (as transformers does):
/// a fixed padding of 2^40 tokens aborted on allocation, a truncation to 3 tokens cut every
/// prompt silently.
#[test]
fn tokenizer_truncation_and_padding_are_ignored() {
    use fuserl_core::data::ChatMessage;
    use fuserl_model::chat::ChatTokenizer;
    let dir = copy("../../checkpoints/tiny-chat");
    let file = dir.path().join("tokenizer.json");
    let mut tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    tj["truncation"] =
        serde_json::json!({"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0});
    tj["padding"] = serde_json::json!({"strategy": {"Fixed": 1u64 << 40}, "direction": "Right", "pad_to_multiple_of": null,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"});
    std::fs::write(&file, tj.to_string()).expect("write");
    let message = [ChatMessage::user("What is the capital of France? Tell me in a long sentence.")];
    let plain = ChatTokenizer::load(&fixture("../../checkpoints/tiny-chat"), None).expect("tokenizer");
    let hostile = ChatTokenizer::load(dir.path(), None).expect("tokenizer");
    let ids = plain.prompt_ids(&message, usize::MAX).expect("ids").0;
    assert!(ids.len() > 3);
    assert_eq!(hostile.prompt_ids(&message, usize::MAX).expect("ids").0, ids);
}

/// Issue #33: optional config.json keys of the wrong type are refused with the key named, not
/// replaced by their defaults.
#[test]
fn config_keys_of_the_wrong_type_are_refused() {
    for (key, value, expected) in [
        (
            "tie_word_embeddings",
            serde_json::json!("yes"),
            "`tie_word_embeddings`: expected true or false, found a string",
        ),
        ("rms_norm_eps", serde_json::json!("1e-5"), "`rms_norm_eps`: expected a number, found a string"),
        (
            "eos_token_id",
            serde_json::json!(["</s>"]),
            "`eos_token_id`: expected a token id or a list of token ids, found a list",
        ),
        (
            "max_position_embeddings",
            serde_json::json!(-1),
            "`max_position_embeddings`: expected a non-negative integer",
        ),
        ("rope_theta", serde_json::json!(0), "`rope_theta`: expected a positive number"),
        ("head_dim", serde_json::json!("16"), "`head_dim`: expected a non-negative integer, found a string"),
        ("attention_bias", serde_json::json!(1), "`attention_bias`: expected true or false, found a number"),
    ] {
        let dir = copy("llama-tied");
        let file = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
        config.as_object_mut().expect("object").remove("rope_parameters");
        config[key] = value;
        std::fs::write(&file, config.to_string()).expect("write");
        let err = load_err(dir.path());
        assert!(err.contains("config.json") && err.contains(expected), "{key}: {err}");
    }
}

/// Issue #33: `convert gguf` reads the hyperparameters through the checks config.json gets: a
/// head count of 0 (a division by zero before), a negative block count (wrapped to 2^64 - 1), a
/// block count of 2^40 (terabytes) and heads that are no multiple of the key/value heads are
/// refused with the key named, before anything is sized by them.
#[test]
fn gguf_hyperparameters_are_checked_as_config_json_is() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("hostile.gguf");
    let string = |s: &str| {
        [8u32.to_le_bytes().to_vec(), (s.len() as u64).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat()
    };
    let u32v = |v: u32| [4u32.to_le_bytes(), v.to_le_bytes()].concat();
    let i32v = |v: i32| [5u32.to_le_bytes(), v.to_le_bytes()].concat();
    let u64v = |v: u64| [10u32.to_le_bytes().to_vec(), v.to_le_bytes().to_vec()].concat();
    let tokens = {
        let mut b = 9u32.to_le_bytes().to_vec();
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        for t in ["a", "b"] {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        }
        b
    };
    let case = |heads: Vec<u8>, kv: Vec<u8>, blocks: Vec<u8>, tokens: &Vec<u8>| {
        let meta = vec![
            ("general.architecture", string("llama")),
            ("llama.attention.head_count", heads),
            ("llama.attention.head_count_kv", kv),
            ("llama.embedding_length", u32v(64)),
            ("llama.feed_forward_length", u32v(128)),
            ("llama.block_count", blocks),
            ("tokenizer.ggml.model", string("gpt2")),
            ("tokenizer.ggml.tokens", tokens.clone()),
        ];
        std::fs::create_dir_all(dir.path().join("out")).expect("mkdir");
        std::fs::write(&file, gguf_with_meta(&meta, &[], 0)).expect("write");
        let t0 = std::time::Instant::now();
        let err = fuserl_model::gguf::convert(&file, &dir.path().join("out")).expect_err("refused").to_string();
        assert!(t0.elapsed().as_secs() < 10, "{err}");
        assert!(err.starts_with(&file.display().to_string()), "{err}");
        err
    };
    let err = case(u32v(0), u32v(1), u32v(2), &tokens);
    assert!(
        err.contains("metadata `llama.attention.head_count`: expected a count from 1 to 16777216, found 0"),
        "{err}"
    );
    let err = case(u32v(4), u32v(2), i32v(-1), &tokens);
    assert!(err.contains("metadata `llama.block_count`: expected a count from 1 to 4096, found -1"), "{err}");
    let err = case(u32v(4), u32v(2), u64v(1 << 40), &tokens);
    assert!(err.contains("`llama.block_count`") && err.contains("found 1099511627776"), "{err}");
    let err = case(u32v(3), u32v(2), u32v(2), &tokens);
    assert!(
        err.contains("impossible model") && err.contains("must be a positive multiple of num_key_value_heads (2)"),
        "{err}"
    );
    // A vocabulary entry of a million characters (hours of work deriving merges before).
    let mut long = 9u32.to_le_bytes().to_vec();
    long.extend(8u32.to_le_bytes());
    long.extend(2u64.to_le_bytes());
    for t in ["a".repeat(1_000_000), "b".into()] {
        long.extend((t.len() as u64).to_le_bytes());
        long.extend(t.as_bytes());
    }
    let err = case(u32v(4), u32v(2), u32v(2), &long);
    assert!(err.contains("tokenizer.ggml.tokens: entry 0 has 1000000 characters; at most 1024"), "{err}");
}
