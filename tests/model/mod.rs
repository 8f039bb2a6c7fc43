//! fuserl-model: the families against transformers' fixtures, errors on bad files, GGUF and the quants.

mod cache;
mod classifier;
mod errors;
mod frozen;
mod gguf_qwen3;
mod lora;
mod oracle;
mod qlora;
mod quants;
