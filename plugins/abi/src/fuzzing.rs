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
    BatchC, COMPONENT_SIZE_V1, ComponentDecl, GroupC, Handle, Out, PluginDeclaration, STATUS_ERROR, Slice, Str,
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

fn leak_str(bytes: &[u8]) -> Str<'static> {
    Str { bytes: Slice::new(Box::leak(bytes.to_vec().into_boxed_slice())) }
}

/// Build a declaration from `data` and run the host's check and registration on it, into a
/// registry of its own. Layout: byte 0 the ABI version; bytes 1 and 2 XOR-ed into the declared
/// struct and component sizes (0: the right size); then NUL-separated fields: the plugin name,
/// and per component a field whose first byte is the point and second a bit mask of the
/// functions it has, the rest its name, then its summary. Everything built is leaked (a
/// declaration lives as long as the process), a few hundred bytes per call.
pub fn register_bytes(data: &[u8]) -> Result<usize, String> {
    let [version, struct_xor, component_xor, rest @ ..] = data else { return Err("too short".into()) };
    let version = u32::from(*version);
    let stride = if version == 1 { COMPONENT_SIZE_V1 } else { size_of::<ComponentDecl>() };
    let mut fields = rest.split(|b| *b == 0);
    let plugin_name = leak_str(fields.next().unwrap_or_default());
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
            name: leak_str(name),
            summary: leak_str(summary),
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
    let storage: &'static [ComponentDecl] = Box::leak(components.into_boxed_slice());
    let ptr: *const ComponentDecl = if stride == size_of::<ComponentDecl>() {
        storage.as_ptr()
    } else {
        let slots = (len * stride).div_ceil(size_of::<ComponentDecl>()).max(1);
        let packed: &'static mut [MaybeUninit<ComponentDecl>] =
            Box::leak(vec![MaybeUninit::zeroed(); slots].into_boxed_slice());
        let dst = packed.as_mut_ptr().cast::<u8>();
        for (i, c) in storage.iter().enumerate() {
            // SAFETY: `packed` is `slots` components long, at least `len * stride` bytes; each
            // copy writes the first `stride` bytes of a component at `i * stride`, inside it;
            // source and destination are distinct allocations.
            unsafe {
                std::ptr::copy_nonoverlapping(std::ptr::from_ref(c).cast::<u8>(), dst.add(i * stride), stride);
            }
        }
        packed.as_ptr().cast()
    };
    let declaration: &'static PluginDeclaration = Box::leak(Box::new(PluginDeclaration {
        abi_version: version,
        struct_size: size_of::<PluginDeclaration>() as u32 ^ u32::from(*struct_xor),
        component_size: stride as u32 ^ u32::from(*component_xor),
        fuserl_version: Str::new(env!("CARGO_PKG_VERSION")),
        plugin_name,
        components: Slice::from_raw_parts(ptr, len),
    }));
    let mut registry = Registry::empty();
    // SAFETY: a declaration that starts with its version and size and lives as long as the
    // process (leaked); its components are `len` of `stride` bytes each (laid out above) when
    // the declared sizes are the right ones, which the check verifies before reading them.
    unsafe { register_declaration(declaration, "(fuzz input)", &mut registry) }
}
