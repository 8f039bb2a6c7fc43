//! Llama-family causal language models on Burn, generic over the backend.
//!
//! Where it sits: the trainer computes policy and reference log-probs with this crate, the
//! `fuserl logprobs` / `generate` / `convert` commands call it directly.
//!
//! - [`config`]: the resolved configuration of every family ([`config::LlamaConfig`]);
//! - [`hf_config`]: `config.json` in and out (Llama, Mistral, Qwen2, Qwen3; both RoPE config
//!   styles), [`gemma3`]: Gemma 3's dialect of it;
//! - [`llama`]: the model, top to bottom;
//! - [`checkpoint`]: Hugging Face safetensors in and out;
//! - [`classifier`]: `*ForSequenceClassification` reward models (the decoder and a score head);
//! - [`logprobs`]: per-token log-probs of (prompt, response) pairs;
//! - [`lora`]: LoRA adapters on the linear layers, PEFT's adapter folders in and out;
//! - [`gguf`], [`quant`]: llama.cpp's GGUF files read; [`gguf_export`], [`quantize`]: written.

pub mod chat;
pub mod checkpoint;
pub mod classifier;
pub mod config;
pub mod error;
pub mod gemma3;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod hf_config;
pub mod llama;
pub mod logprobs;
pub mod lora;
pub use fuserl_kernels::quant;
pub mod quantize;

pub use error::{ModelError, Result};

/// The CPU backend every build has.
pub type Cpu = burn::backend::Flex;
