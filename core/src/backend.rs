//! `[backend]`: where tensors live and in which float type. In the core because every
//! component that runs a model (sources, reward models) is built knowing it.

use serde::{Deserialize, Serialize};

/// Where the tensors live. Which of these a build can use depends on its cargo features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Device {
    /// The CPU (Burn's flex backend), always available.
    #[default]
    Cpu,
    /// wgpu with its default adapter (Vulkan, Metal, DX12 or WebGPU).
    Wgpu,
    /// wgpu on Vulkan with cubecl's SPIR-V compiler.
    Vulkan,
    /// wgpu on Metal.
    Metal,
    /// WebGPU.
    Webgpu,
    /// NVIDIA CUDA.
    Cuda,
    /// AMD ROCm (HIP).
    Rocm,
}

/// Floating-point type of the weights and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DType {
    /// 32-bit float.
    #[default]
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
}

/// `[backend] master_weights`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MasterWeights {
    /// f32 master weights, gradients and moments (mixed precision when `dtype` is 16-bit).
    #[default]
    F32,
    /// bf16 weights, gradients and moments; each update computed in f32 and stochastically
    /// rounded to bf16, so that updates far below a bf16 rounding step still move the weights
    /// on average.
    Bf16,
}

/// `[backend]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The device kind.
    #[serde(default)]
    pub device: Device,
    /// Which device of that kind (0 for the first).
    #[serde(default)]
    pub device_index: u32,
    /// The compute type: of frozen models (reference, sources, rewards) and of the activations.
    /// In training, `f16`/`bf16` is mixed precision: the trained weights, their gradients and
    /// AdamW's moments stay in `master_weights`' type and each use casts a weight to this one.
    #[serde(default)]
    pub dtype: DType,
    /// The type the trainer keeps the trained weights, their gradients and AdamW's moments in:
    /// `f32` (default, 16 bytes a parameter) or `bf16` (the lean option: 8 bytes a parameter,
    /// every update stochastically rounded; needs `dtype = "bf16"`).
    #[serde(default)]
    pub master_weights: MasterWeights,
    /// How training computes per-token log-probs.
    #[serde(default)]
    pub logprobs: LogProbPath,
    /// On a GPU device, Burn's fusion backend (`Fusion<CubeBackend>`: chains of element-wise
    /// operations compiled into one kernel) in a build with the `fusion` feature (the default);
    /// `false` runs the plain cubecl backend (every operation its own kernel), to compare. The
    /// CPU ignores it, and so does ROCm (always fused in a build with the feature).
    #[serde(default = "yes")]
    pub fusion: bool,
    /// How attention runs on a GPU device (process-wide, as PyTorch's
    /// `torch.backends.cuda.enable_flash_sdp`); the CPU always runs the tiles.
    #[serde(default)]
    pub attention: AttentionPath,
}

fn yes() -> bool {
    true
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            device: Device::default(),
            device_index: 0,
            dtype: DType::default(),
            master_weights: MasterWeights::default(),
            logprobs: LogProbPath::default(),
            fusion: true,
            attention: AttentionPath::default(),
        }
    }
}

/// `[backend] attention`: causal attention on GPU devices. Both never hold the `[seq, seq]`
/// scores of a whole sequence and keep only each row's statistics for the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionPath {
    /// fuserl's cubecl kernels (FlashAttention's online softmax, every score in a unit's
    /// registers, keys and values staged in shared memory; no tensor cores).
    #[default]
    Kernel,
    /// Tiles of query rows in Burn's operations: `[rows, keys]` scores a tile, in Burn's tuned
    /// matmuls (tensor cores where the device has them).
    Tiles,
}

/// `[backend] logprobs`: the path from hidden states to per-token log-probs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogProbPath {
    /// The LM-head projection fused with the log-prob, in vocabulary chunks with an online
    /// log-sum-exp: never holds the `[tokens, vocab]` logits (cubecl kernels on GPU backends).
    #[default]
    Fused,
    /// Full logits, `log_softmax` and `gather` through Burn's autodiff (for comparison).
    Naive,
}
