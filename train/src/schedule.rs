//! Learning-rate schedules as transformers defines them (`get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup`): the rate of optimiser
//! step `step` (0-based) rises linearly from 0 over `warmup` steps, then stays, falls linearly, or
//! follows half a cosine to 0 at `total`.

use fuserl_recipe::Schedule;

/// The learning rate of step `step` of `total`.
pub fn learning_rate(schedule: Schedule, peak: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress).max(0.0),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(learning_rate(Schedule::Cosine, 1.0, 0, 2, 10), 0.0);
        assert_eq!(learning_rate(Schedule::Cosine, 1.0, 1, 2, 10), 0.5);
        assert_eq!(learning_rate(Schedule::Cosine, 1.0, 2, 2, 10), 1.0);
        assert!((learning_rate(Schedule::Cosine, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((learning_rate(Schedule::Linear, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 3.0, 9, 2, 10), 3.0);
        assert_eq!(learning_rate(Schedule::Constant, 3.0, 0, 0, 10), 3.0);
    }
}
