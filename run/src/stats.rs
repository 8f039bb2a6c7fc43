//! The statistics of evaluation (the building blocks of `fuserl eval`, issue #16): pass@k with
//! the unbiased estimator of the HumanEval paper, percentile-bootstrap confidence intervals of a
//! mean over prompts (seeded [`fuserl_core::maths::SplitMix64`] resampling), and a length-controlled win
//! rate in the spirit of AlpacaEval 2.
//!
//! Checked against numpy and statsmodels on fixed data (fixtures/stats/make_stats.py).

/// pass@k from `n` samples of which `c` passed: `1 - C(n-c, k) / C(n, k)` (Chen et al. 2021,
/// computed as their numerically stable product). `k` must be at most `n`.
pub fn pass_at_k(n: u64, c: u64, k: u64) -> f64 {
    assert!(k >= 1 && k <= n && c <= n, "pass@k needs 1 <= k <= n and c <= n (n={n}, c={c}, k={k})");
    if n - c < k {
        return 1.0;
    }
    // 1 - prod_{i = n-c+1}^{n} (1 - k / i)
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

pub use fuserl_io::artifacts::Estimate;

/// The `q`-quantile of sorted values, by linear interpolation between order statistics (numpy's
/// default `linear` method).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The mean of `values` (one per prompt) with a percentile-bootstrap interval at `level` (for
/// example 0.95) from `resamples` resamples drawn with `seed`.
pub fn bootstrap_mean(values: &[f64], resamples: usize, level: f64, seed: u64) -> Estimate {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n.max(1) as f64;
    if n == 0 || resamples == 0 {
        return Estimate { mean, low: mean, high: mean, n };
    }
    let mut rng = fuserl_core::maths::SplitMix64::new(seed);
    let mut means: Vec<f64> =
        (0..resamples).map(|_| (0..n).map(|_| values[rng.below(n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Estimate { mean, low: quantile(&means, tail), high: quantile(&means, 1.0 - tail), n }
}

/// Any statistic of prompts with a percentile-bootstrap interval: `statistic` gets the indices of
/// the prompts in a sample (all of them for the estimate; `resamples` samples drawn with
/// replacement with `seed` for the interval, those where it is `None` left out). `None` when the
/// statistic of all the prompts is `None`.
pub fn bootstrap(
    n: usize,
    statistic: impl Fn(&[usize]) -> Option<f64>,
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<Estimate> {
    let all: Vec<usize> = (0..n).collect();
    let mean = statistic(&all)?;
    let mut rng = fuserl_core::maths::SplitMix64::new(seed);
    let mut draws: Vec<f64> = (0..resamples)
        .filter_map(|_| {
            let sample: Vec<usize> = (0..n).map(|_| rng.below(n)).collect();
            statistic(&sample)
        })
        .collect();
    if draws.is_empty() {
        return Some(Estimate { mean, low: mean, high: mean, n });
    }
    draws.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Some(Estimate { mean, low: quantile(&draws, tail), high: quantile(&draws, 1.0 - tail), n })
}

/// A length-controlled win rate: a logistic regression of each comparison's outcome (1 win, 0.5
/// tie, 0 loss: a fractional binomial response) on the answers' length difference (standardised
/// by its standard deviation), read at zero length difference: `sigmoid(intercept)`. Fitted by
/// Newton's method (iteratively reweighted least squares) on the two parameters. `None` when it
/// does not converge (for example every comparison won).
pub fn length_controlled_win_rate(outcomes: &[f64], length_difference: &[f64]) -> Option<f64> {
    assert_eq!(outcomes.len(), length_difference.len(), "one length difference per outcome");
    let n = outcomes.len();
    if n < 2 {
        return None;
    }
    let mean_d = length_difference.iter().sum::<f64>() / n as f64;
    let sd = (length_difference.iter().map(|d| (d - mean_d).powi(2)).sum::<f64>() / n as f64).sqrt();
    let x: Vec<f64> = length_difference.iter().map(|d| if sd > 0.0 { d / sd } else { 0.0 }).collect();
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for _ in 0..100 {
        // Gradient and Hessian of the log-likelihood in (a, b).
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (y, xi) in outcomes.iter().zip(&x) {
            let p = fuserl_core::maths::sigmoid(a + b * xi);
            let w = p * (1.0 - p);
            ga += y - p;
            gb += (y - p) * xi;
            haa += w;
            hab += w * xi;
            hbb += w * xi * xi;
        }
        let det = haa * hbb - hab * hab;
        if det.abs() < 1e-300 {
            return None;
        }
        let (da, db) = ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det);
        a += da;
        b += db;
        if !(a.is_finite() && b.is_finite()) || a.abs() > 50.0 {
            return None;
        }
        if da.abs().max(db.abs()) < 1e-12 {
            return Some(fuserl_core::maths::sigmoid(a));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_matches_the_definition_on_known_cases() {
        assert_eq!(pass_at_k(10, 0, 1), 0.0);
        assert_eq!(pass_at_k(10, 10, 5), 1.0);
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-15);
        // 1 - C(7,2)/C(10,2) = 1 - 21/45
        assert!((pass_at_k(10, 3, 2) - (1.0 - 21.0 / 45.0)).abs() < 1e-15);
        assert_eq!(pass_at_k(5, 3, 3), 1.0, "fewer failures than k: certain");
    }

    #[test]
    fn the_general_bootstrap_of_a_mean_is_the_mean_bootstrap() {
        let v: Vec<f64> = (0..40).map(|i| f64::from(i % 5)).collect();
        let mean = |idx: &[usize]| Some(idx.iter().map(|&i| v[i]).sum::<f64>() / idx.len() as f64);
        // The same draws from the same seed: the same interval.
        assert_eq!(bootstrap(v.len(), mean, 500, 0.95, 3), Some(bootstrap_mean(&v, 500, 0.95, 3)));
        assert_eq!(bootstrap(3, |_| None, 10, 0.95, 1), None);
    }

    #[test]
    fn the_bootstrap_is_reproducible_and_brackets_the_mean() {
        let v: Vec<f64> = (0..50).map(|i| f64::from(i % 7) / 6.0).collect();
        let a = bootstrap_mean(&v, 2000, 0.95, 1);
        assert_eq!(a, bootstrap_mean(&v, 2000, 0.95, 1));
        assert!(a.low < a.mean && a.mean < a.high && a.n == 50, "{a:?}");
    }
}
