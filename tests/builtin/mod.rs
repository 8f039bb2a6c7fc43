//! fuserl-builtin: the built-in plugins over their public API (servers, objectives' golden values,
//! pairwise rewards, the python-tests verifier).

mod http_reward;
mod objectives;
mod pairs;
mod python_tests;
