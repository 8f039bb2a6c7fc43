//! fuserl's plugin ABI: how a shared library (a Rust `cdylib`, or anything that speaks C)
//! extends fuserl without rebuilding it. The only crate of fuserl allowed `unsafe`; each block
//! says why it is sound.
//!
//! - [`types`]: the `#[repr(C)]` declaration and the ABI version record;
//! - [`plugin`]: the export side. A Rust author writes ordinary trait implementations and
//!   `PluginDescriptor`s, then calls [`export_plugin!`]; no `unsafe` in their code;
//! - `host` (feature `host`): loading with `libloading`, the version and size handshake, and
//!   proxies that implement the core traits so that plugin components run through the same code
//!   paths as built-ins;
//! - `testing` (feature `host`): helpers for plugin authors to evaluate their components
//!   through the ABI on given statistics.
//!
//! See docs/plugins.md for a walk-through.
#![allow(unsafe_code)] // The ABI crate; every block carries a SAFETY comment.

pub mod plugin;
pub mod types;

#[cfg(feature = "host")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "host")]
pub mod host;
#[cfg(feature = "host")]
pub mod testing;

pub use fuserl_core;
pub use types::{ABI_VERSION, HostApi, PluginDeclaration};
