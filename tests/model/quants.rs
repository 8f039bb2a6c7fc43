//! Every ggml type fuserl dequantises, block by block against the `gguf` Python package's own
//! dequantisation (llama.cpp's reference in Python) on real tensors of the two Q4_K_M models and
//! on random blocks: `fixtures/gguf/make_quants.py` wrote the fixture.

use std::collections::BTreeSet;
use std::path::Path;

use fuserl_model::gguf::Gguf;
use fuserl_model::quant::GgmlType;

#[test]
fn every_type_dequantises_as_gguf_py_does() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/gguf/quants.gguf");
    let g = Gguf::read(&file).expect("fixture");
    let mut types = BTreeSet::new();
    let mut real = BTreeSet::new();
    for t in g.tensors.iter().filter(|t| !t.name.ends_with(".expected")) {
        let expected = g.tensors.iter().find(|e| e.name == format!("{}.expected", t.name)).expect("expected values");
        let want = g.dequantize(expected).expect("f32");
        let got = g.dequantize(t).unwrap_or_else(|e| panic!("{}: {e}", t.name));
        assert_eq!(got.len(), want.len(), "{}", t.name);
        // Bit for bit: the same operations in the same order as ggml's C and gguf-py's numpy.
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "{} value {i}: fuserl {a}, gguf-py {b}", t.name);
        }
        let name = GgmlType::name_of(t.ggml_type);
        types.insert(name);
        if !t.name.starts_with("random.") {
            real.insert(name);
        }
    }
    let all = ["Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_K"];
    assert_eq!(types, all.into_iter().collect());
    assert_eq!(real, ["Q4_K", "Q5_0", "Q6_K", "Q8_0"].into_iter().collect());
}
