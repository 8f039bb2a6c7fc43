//! The host's declaration check on declarations built from untrusted bytes: what a broken or
//! hostile plugin library could hand over (the fuzz target `plugin-declaration`, `fuzz/`).
//!
//! The bytes decide everything the check reads: the ABI version, the declared struct and
//! component sizes, the plugin name, and per component its extension point, name, summary and
//! which functions it provides (dummies that refuse every call: registration calls none).

use std::mem::{MaybeUninit, size_of};

use fuserl_core::registry::Registry;

use crate::host::register_declaration;
use crate::types::{
    BatchC, COMPONENT_SIZE_V1, ComponentDecl, Components, GroupC, Handle, Out, PluginDeclaration, STATUS_ERROR, Slice,
    Str,
};

extern "C" fn create(_: u64, _: Str<'_>, _: Str<'_>, _: u64, _: *mut Out, _: *mut Handle) -> i32 {
    STATUS_ERROR
}
extern "C" fn destroy(_: Handle) {}
extern "C" fn collect(_: Handle, _: Str<'_>, _: *mut Out) -> i32 {
    STATUS_ERROR
}
extern "C" fn score(_: Handle, _: Str<'_>, _: *mut f64, _: u64, _: *mut Out) -> i32 {
    STATUS_ERROR
}
extern "C" fn scorer_id(_: Handle, _: *mut Out) -> i32 {
    STATUS_ERROR
}
extern "C" fn weigh(_: Handle, _: *const GroupC<'_>, _: *mut f64, _: u64, _: *mut Out) -> i32 {
    STATUS_ERROR
}
extern "C" fn needs_reference(_: Handle) -> u8 {
    0
}
extern "C" fn build_examples(_: Handle, _: *const GroupC<'_>, _: *mut Out) -> i32 {
    STATUS_ERROR
}
extern "C" fn loss(_: Handle, _: *const BatchC<'_>, _: *mut f64, _: *mut f64, _: u64, _: *mut Out) -> i32 {
    STATUS_ERROR
}
extern "C" fn generator_info(_: Handle, _: Str<'_>, _: *mut Out) -> i32 {
    STATUS_ERROR
}
extern "C" fn generate(_: Handle, _: Str<'_>, _: Str<'_>, _: *mut Out) -> i32 {
    STATUS_ERROR
}

/// What a declaration built from fuzz input points into: owned here and freed after the
/// registry that refers to it (a leak per input added up past the harness's memory cap).
#[derive(Default)]
struct Arena {
    bytes: Vec<Box<[u8]>>,
}

impl Arena {
    /// A copy of `bytes` that lives as long as the arena, as the `'static` string a plugin's
    /// declaration holds.
    fn str(&mut self, bytes: &[u8]) -> Str<'static> {
        let copy: Box<[u8]> = bytes.into();
        // SAFETY: the bytes are owned by the arena, which outlives every declaration and
        // registry made from it. The `'static` is the declaration field's type, not a promise
        // kept by this value: it is valid only while the arena lives, which this harness
        // ensures by dropping the registry before the arena.
        #[allow(unsafe_code)]
        let s = Str { bytes: unsafe { Slice::from_raw_parts(copy.as_ptr(), copy.len()) } };
        self.bytes.push(copy);
        s
    }
}

/// Build a declaration from `data` and run the host's check and registration on it, into a
/// registry of its own. Layout: byte 0 the ABI version; bytes 1 and 2 XOR-ed into the declared
/// struct and component sizes (0: the right size); then NUL-separated fields: the plugin name,
/// and per component a field whose first byte is the point and second a bit mask of the
/// functions it has, the rest its name, then its summary. Everything built is freed before
/// returning, after the registry that refers to it.
pub fn register_bytes(data: &[u8]) -> Result<usize, String> {
    let [version, struct_xor, component_xor, rest @ ..] = data else { return Err("too short".into()) };
    let version = u32::from(*version);
    let stride = if version == 1 { COMPONENT_SIZE_V1 } else { size_of::<ComponentDecl>() };
    let mut arena = Arena::default();
    let mut fields = rest.split(|b| *b == 0);
    let plugin_name = arena.str(fields.next().unwrap_or_default());
    let mut components = Vec::new();
    while let Some(head) = fields.next() {
        let summary = fields.next().unwrap_or_default();
        let (point, mask, name) = match head {
            [p, m, name @ ..] => (u32::from(*p), *m, name),
            [p] => (u32::from(*p), 0xff, &[][..]),
            [] => (0, 0xff, &[][..]),
        };
        let has = |bit: u8| mask & (1 << bit) != 0;
        components.push(ComponentDecl {
            point,
            name: arena.str(name),
            summary: arena.str(summary),
            create,
            destroy,
            collect: has(0).then_some(collect as _),
            score: has(1).then_some(score as _),
            scorer_id: has(2).then_some(scorer_id as _),
            weigh: has(3).then_some(weigh as _),
            needs_reference: has(4).then_some(needs_reference as _),
            build_examples: has(5).then_some(build_examples as _),
            loss: has(6).then_some(loss as _),
            generator_info: has(7).then_some(generator_info as _),
            generate: has(7).then_some(generate as _),
        });
    }
    // Lay the components out with the stride of the declared version, as that plugin's own
    // build would have (a version-1 plugin's components are shorter).
    let len = components.len();
    let mut packed: Vec<MaybeUninit<ComponentDecl>> = Vec::new();
    let ptr: *const ComponentDecl = if stride == size_of::<ComponentDecl>() {
        components.as_ptr()
    } else {
        let slots = (len * stride).div_ceil(size_of::<ComponentDecl>()).max(1);
        packed = vec![MaybeUninit::zeroed(); slots];
        let dst = packed.as_mut_ptr().cast::<u8>();
        for (i, c) in components.iter().enumerate() {
            // SAFETY: `packed` is `slots` components long, at least `len * stride` bytes; each
            // copy writes the first `stride` bytes of a component at `i * stride`, inside it;
            // source and destination are distinct allocations.
            unsafe {
                std::ptr::copy_nonoverlapping(std::ptr::from_ref(c).cast::<u8>(), dst.add(i * stride), stride);
            }
        }
        packed.as_ptr().cast()
    };
    // SAFETY: `ptr` holds `len` components of `stride` bytes, aligned (laid out above in
    // `ComponentDecl`-typed storage) and kept alive until the registry made from this declaration
    // is dropped.
    #[allow(unsafe_code)]
    let declared = unsafe { Components::from_raw_parts(ptr, len) };
    let declaration = Box::new(PluginDeclaration {
        abi_version: version,
        struct_size: size_of::<PluginDeclaration>() as u32 ^ u32::from(*struct_xor),
        component_size: stride as u32 ^ u32::from(*component_xor),
        fuserl_version: Str::new(env!("CARGO_PKG_VERSION")),
        plugin_name,
        components: declared,
    });
    let mut registry = Registry::empty();
    // SAFETY: a declaration that starts with its version and size; its components are `len` of
    // `stride` bytes each (laid out above) when the declared sizes are the right ones, which the
    // check verifies before reading them. It is not `'static` as the contract asks, but nothing
    // outlives it: the registry (the only holder of what registration built) is dropped below,
    // before the declaration and what it points into.
    let result = unsafe { register_declaration(&raw const *declaration, "(fuzz input)", &mut registry) };
    drop(registry);
    drop((declaration, packed, components, arena));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` reward components named c0, c1, ... declared for ABI `version`.
    fn declaration(version: u8, count: usize) -> Vec<u8> {
        let mut bytes = vec![version, 0, 0];
        bytes.extend_from_slice(b"many");
        for i in 0..count {
            // Point 1 (reward; 0 is the separator), functions: score (bit 1).
            bytes.extend_from_slice(&[0, crate::types::POINT_REWARD as u8, 1 << 1]);
            bytes.extend_from_slice(format!("c{i}\0a reward").as_bytes());
        }
        bytes
    }

    /// Issue #13: a declaration's component count is bounded before anything is built for it,
    /// in both layouts (version 1's shorter components are copied, not leaked, per component).
    #[test]
    fn component_count_is_bounded() {
        for version in [1, 2] {
            assert_eq!(register_bytes(&declaration(version, crate::host::MAX_COMPONENTS)), Ok(4096), "v{version}");
            let err = register_bytes(&declaration(version, crate::host::MAX_COMPONENTS + 1)).expect_err("too many");
            assert_eq!(
                err,
                "(fuzz input): plugin `many` declares 4097 components; fuserl loads at most 4096 from one plugin"
            );
        }
    }
}
