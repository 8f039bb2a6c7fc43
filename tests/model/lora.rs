//! PEFT adapter folders of a multimodal Gemma 3 base (issue #31): what `target_modules` fuserl
//! writes, what it reads back, and which modules PEFT wraps with it.

use crate::common::repo;
use fuserl_model::lora::{LoraSpec, exported_target_modules, read_adapter_config};

/// A multimodal base's adapter export names its modules by a regular expression over the text
/// model's paths: fuserl reads it back as the same modules, and PEFT wraps with it the text
/// model's seven linear layers of every layer and none of the vision tower's q/k/v_proj (which
/// the bare names also reach: 3 more modules, with adapters the file does not hold). Regular
/// expressions of PEFT users are read too; one that selects nothing, or does not compile, is
/// refused with the file named.
#[test]
fn multimodal_adapters_name_the_text_models_modules_only() {
    let all = LoraSpec::targets_from(&["all-linear".to_owned()]).expect("all-linear");
    let dir = tempfile::tempdir().expect("tmp");
    let write = |target_modules: serde_json::Value| {
        let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": target_modules,
            "base_model_name_or_path": repo().join("fixtures/models/gemma3").display().to_string()});
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).expect("write");
    };
    let exported = exported_target_modules(&all, true);
    assert!(exported.is_string(), "{exported}");
    write(exported.clone());
    assert_eq!(read_adapter_config(dir.path()).expect("read back").spec.targets, all);
    for (pattern, want) in [
        (r".*\.(q_proj|v_proj)", vec!["q_proj", "v_proj"]),
        (r".*language_model.*\.mlp\..*", vec!["gate_proj", "up_proj", "down_proj"]),
    ] {
        write(serde_json::json!(pattern));
        assert_eq!(read_adapter_config(dir.path()).expect(pattern).spec.targets, want, "{pattern}");
    }
    // The layout of transformers 4.50 and 4.51 (`language_model.model.layers`), and a verbose
    // pattern whose comment runs to its end.
    for (pattern, want) in [
        (r"language_model\.model\.layers\.\d+\.self_attn\.(q|v)_proj", vec!["q_proj", "v_proj"]),
        ("(?x) .*\\.o_proj  # the output projections", vec!["o_proj"]),
    ] {
        write(serde_json::json!(pattern));
        assert_eq!(read_adapter_config(dir.path()).expect(pattern).spec.targets, want, "{pattern}");
    }
    // Unbalanced, it would have compiled inside the anchors (`^(?:a)|(b)$`).
    for (pattern, why) in [
        (r".*vision_tower.*", "selects none"),
        (r"(q_proj", "nor a regular expression"),
        (r".*q_proj)|(.*v_proj", "nor a regular expression"),
    ] {
        write(serde_json::json!(pattern));
        let err = read_adapter_config(dir.path()).expect_err(pattern).to_string();
        assert!(err.contains("adapter_config.json") && err.contains(why), "{err}");
    }

    let python =
        std::path::PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/fuserl-oracle/venv/bin/python");
    let has_peft =
        std::process::Command::new(&python).args(["-c", "import peft"]).output().is_ok_and(|o| o.status.success());
    if !has_peft {
        #[allow(clippy::print_stderr)] // the skipped part is the test's message to whoever runs it
        {
            eprintln!("target_modules not checked in peft: no oracle environment with peft (docs/oracle.md)");
        }
        return;
    }
    let wrapped = |target_modules: serde_json::Value| -> Vec<String> {
        write(target_modules);
        let out = std::process::Command::new(&python)
            .arg(repo().join("scripts/check_peft_targets.py"))
            .arg(dir.path().join("adapter_config.json"))
            .output()
            .expect("python");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("a JSON list")
    };
    let ours = wrapped(exported);
    assert_eq!(ours.len(), 2 * 7, "{ours:?}");
    assert!(ours.iter().all(|m| m.starts_with("model.language_model.layers.")), "{ours:?}");
    let bare = wrapped(serde_json::json!(all));
    assert_eq!(bare.iter().filter(|m| m.contains("vision_tower")).count(), 3, "{bare:?}");
}

/// LoRA dropout's masks: about `keep` of the values kept; a value's bit depends on its sequence's
/// place in the micro-batch and its position, not on how the rows are cut into shards (the masks
/// of two sequences at once are those of each alone); another key or site gives others; and
/// (with the `wgpu` feature) the GPU's 32-bit integer ops give the CPU's 64-bit bits, on the
/// plain cubecl backend and through Burn's fusion.
#[test]
fn dropout_masks_are_a_function_of_each_values_place() {
    use burn::tensor::Tensor;
    use fuserl_model::lora::{DropoutKey, dropout_mask};
    type Cpu = fuserl_model::Cpu;
    let device = Default::default();
    let key = DropoutKey { key: 0x5eed, first_sequence: 3 };
    let host = |t: Tensor<Cpu, 2>| -> Vec<f32> { t.into_data().iter::<f32>().collect() };
    // Two sequences of 50 positions, 300 columns each.
    let both = host(dropout_mask::<Cpu>(key, 11, [100, 300], 2, 0.7, &device));
    let kept = both.iter().filter(|&&v| v == 1.0).count() as f64 / both.len() as f64;
    assert!((kept - 0.7).abs() < 0.01, "{kept}");
    assert!(both.iter().all(|&v| v == 0.0 || v == 1.0));
    let first = host(dropout_mask::<Cpu>(key, 11, [50, 300], 1, 0.7, &device));
    let second = host(dropout_mask::<Cpu>(DropoutKey { first_sequence: 4, ..key }, 11, [50, 300], 1, 0.7, &device));
    assert_eq!(both[..15_000], first[..], "the first sequence alone");
    assert_eq!(both[15_000..], second[..], "the second sequence alone");
    assert_ne!(first, second);
    assert_ne!(first, host(dropout_mask::<Cpu>(key, 12, [50, 300], 1, 0.7, &device)), "another site");
    assert_ne!(first, host(dropout_mask::<Cpu>(DropoutKey { key: 1, ..key }, 11, [50, 300], 1, 0.7, &device)));

    #[cfg(feature = "wgpu")]
    {
        fn on<B: burn::tensor::backend::Backend<Device = burn::backend::wgpu::WgpuDevice>>(
            key: DropoutKey,
        ) -> Vec<f32> {
            let device = burn::backend::wgpu::WgpuDevice::default();
            dropout_mask::<B>(key, 11, [100, 300], 2, 0.7, &device).into_data().convert::<f32>().iter::<f32>().collect()
        }
        assert_eq!(on::<fuserl_kernels::backends::PlainWgpu>(key), both, "plain wgpu");
        #[cfg(feature = "fusion")]
        assert_eq!(on::<fuserl_kernels::backends::FusedWgpu>(key), both, "fused wgpu");
    }
}
