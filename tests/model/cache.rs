//! The KV cache's buffer operations against the same columns built by concatenation: appends
//! that grow it, a row's prefill written in place, masked columns added before, leading
//! columns dropped. Pure copies, so equal to the bit (both the CPU's in-place writes and Burn's
//! `slice_assign`, which `Autodiff<Cpu>` uses).

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor};
use fuserl_kernels::LogProbBackend;
use fuserl_model::Cpu;
use fuserl_model::llama::LayerCache;

fn same<B: LogProbBackend>(cache: &LayerCache<B>, keys: &Tensor<B, 4>, what: &str) {
    assert_eq!(cache.len(), keys.dims()[2], "{what}: length");
    assert_eq!(cache.keys().dims(), keys.dims(), "{what}: key shape");
    let got: Vec<f32> = cache.keys().into_data().iter::<f32>().collect();
    let want: Vec<f32> = keys.clone().into_data().iter::<f32>().collect();
    assert!(got == want, "{what}: keys differ");
    // Values are the keys times -2 throughout.
    let got: Vec<f32> = cache.values().into_data().iter::<f32>().collect();
    let want: Vec<f32> = keys.clone().mul_scalar(-2.0).into_data().iter::<f32>().collect();
    assert!(got == want, "{what}: values differ");
}

fn cache_ops<B: LogProbBackend>(device: &B::Device) {
    let random = |t: usize, rows: usize| Tensor::<B, 4>::random([rows, 2, t, 4], Distribution::Default, device);
    let mut cache = LayerCache::new(random(0, 3), random(0, 3));
    let mut want = random(5, 3);
    cache.append(want.clone(), want.clone().mul_scalar(-2.0));
    same(&cache, &want, "prefill");
    for step in 0..40 {
        let k = random(1, 3);
        let (keys, _) = cache.append(k.clone(), k.clone().mul_scalar(-2.0));
        want = Tensor::cat(vec![want, k], 2);
        assert_eq!(keys.dims(), want.dims(), "step {step}: the append returns every key");
        same(&cache, &want, &format!("decoding step {step}"));
    }
    // A new prompt of 7 columns into row 1, ending where the cache ends.
    let block = random(7, 1);
    cache.write_row(1, block.clone(), block.clone().mul_scalar(-2.0));
    let n = want.dims()[2];
    want = want.slice_assign([1..2, 0..2, n - 7..n, 0..4], block);
    same(&cache, &want, "a row's prefill");
    // Written in place: the next append still holds every column.
    let k = random(1, 3);
    cache.append(k.clone(), k.clone().mul_scalar(-2.0));
    want = Tensor::cat(vec![want, k], 2);
    same(&cache, &want, "append after a row's prefill");
    cache.widen(3);
    want = Tensor::cat(vec![Tensor::zeros([3, 2, 3, 4], device), want], 2);
    same(&cache, &want, "widened");
    cache.compact(10);
    let n = want.dims()[2];
    want = want.narrow(2, 10, n - 10);
    same(&cache, &want, "compacted");
    assert!(!cache.is_full(), "room after compacting");
    for step in 0..50 {
        let k = random(1, 3);
        cache.append(k.clone(), k.clone().mul_scalar(-2.0));
        want = Tensor::cat(vec![want, k], 2);
        same(&cache, &want, &format!("after compacting, step {step}"));
    }
}

#[test]
fn kv_cache_writes_rows_widens_and_compacts_as_concatenation_does() {
    cache_ops::<Cpu>(&Default::default());
    cache_ops::<Autodiff<Cpu>>(&Default::default());
}
