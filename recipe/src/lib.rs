//! Recipes, schema version 1: one TOML file describes a whole two-stage run.
//!
//! Parsing is strict: unknown keys and wrong types are errors, every component validates its
//! own table, and every error names the file, line and column, the key path, what was
//! expected and, for closed sets, the valid choices. A loaded recipe can be written back with
//! every default filled in ([`LoadedRecipe::resolved_toml`]); that text is itself a valid recipe.
//!
//! ```toml
//! schema_version = 1
//! [run]        # name, output_dir, seed
//! [backend]    # device, dtype
//! [target]     # checkpoint, chat_template, max_length
//! [data]       # prompts, split between stages, sampling for generative sources
//! [[sources]]  # kind = "jsonl" | <plugin>, with the plugin's own keys
//! [reward]     # kind = "precomputed" | <plugin>
//! [weighting]  # kind = "softmax" | "best-only" | "uniform" | "rank" | <plugin>
//! [sft]        # training settings; [sft.objective] kind = "sft" | <plugin>
//! [po]         # training settings; [po.objective] kind = "dpo" | "simpo" | "rloo" | "wrpo" | <plugin>
//! [eval]       # evaluation prompts and settings
//! [export]     # format and path of the fused model
//! ```

use std::path::{Path, PathBuf};

use crate::location::Locator;
use fuserl_core::config::{ConfigError, KeyPath, check, parse_table};
use fuserl_core::error::{Error, Result};
use fuserl_core::extension::{PreferenceObjective, RewardModel, SourceAdapter, WeightingScheme};
use fuserl_core::registry::{BuildContext, BuildError, Built, PluginLoader, Registry, split_kind};

pub mod location;
mod schema;

pub use fuserl_core::backend::{BackendConfig, DType, Device, LogProbPath};
use schema::RawRecipe;
pub use schema::*;

/// The components a recipe names, built.
#[derive(Debug)]
pub struct Components {
    /// One per `[[sources]]`.
    pub sources: Vec<Box<dyn SourceAdapter>>,
    /// `[reward]`.
    pub reward: Box<dyn RewardModel>,
    /// `[weighting]`.
    pub weighting: Box<dyn WeightingScheme>,
    /// `[sft.objective]`.
    pub sft_objective: Box<dyn PreferenceObjective>,
    /// `[po.objective]`.
    pub po_objective: Box<dyn PreferenceObjective>,
    /// `[eval.reward]`, when the recipe has one.
    pub eval_reward: Option<Box<dyn RewardModel>>,
    /// `[eval.judge]`, when the recipe has one (a pairwise judge).
    pub eval_judge: Option<Box<dyn RewardModel>>,
}

/// A parsed, validated recipe and its built components.
#[derive(Debug)]
pub struct LoadedRecipe {
    /// The recipe file.
    pub file: PathBuf,
    /// The resolved recipe.
    pub recipe: Recipe,
    /// Its components.
    pub components: Components,
    /// Relative paths in the recipe are resolved against this folder.
    pub base_dir: PathBuf,
}

impl LoadedRecipe {
    /// The recipe without its components ([`ParsedRecipe`]).
    pub fn parsed(&self) -> ParsedRecipe {
        ParsedRecipe { file: self.file.clone(), recipe: self.recipe.clone(), base_dir: self.base_dir.clone() }
    }

    /// An error about the recipe's setting at `path` (`target.checkpoint`), at its line and
    /// column in the recipe file (the file is read again to find them; line 1 if it cannot be).
    pub fn error_at(&self, path: &KeyPath, message: impl Into<String>) -> Error {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        let (line, column) = Locator::new(&text).locate(path);
        Error::Recipe { file: self.file.clone(), line, column, path: path.to_string(), message: message.into() }
    }

    /// The resolved recipe as TOML text: a valid recipe with every default written out.
    pub fn resolved_toml(&self) -> Result<String> {
        toml::to_string(&self.recipe).map_err(|e| Error::Component {
            point: "recipe",
            name: self.file.display().to_string(),
            message: format!("cannot write the resolved recipe: {e}"),
        })
    }

    /// The resolved recipe for people to read (`fuserl recipe show`): [`Self::resolved_toml`]
    /// without what this recipe cannot use: empty lists of its own tables (`sources = []`,
    /// `baselines = []`: those default to empty), and `[data.sampling]` when
    /// nothing samples with it (no source generates answers, no `[po] target_samples`). Still a
    /// valid recipe that resolves to the same one (what it leaves out is the default).
    pub fn shown_toml(&self) -> Result<String> {
        let failed = |e: &dyn std::fmt::Display| Error::Component {
            point: "recipe",
            name: self.file.display().to_string(),
            message: format!("cannot write the resolved recipe: {e}"),
        };
        let mut table = toml::Table::try_from(&self.recipe).map_err(|e| failed(&e))?;
        drop_empty_lists(&mut table);
        // What the recipe file itself writes: an empty list in a component's table is left out
        // only when the recipe does not write it.
        let written: Option<toml::Table> = std::fs::read_to_string(&self.file).ok().and_then(|t| t.parse().ok());
        drop_unwritten_component_lists(&mut table, written.as_ref());
        let samples = self.components.sources.iter().any(|s| s.generator().is_some())
            || (self.recipe.po.enabled && self.recipe.po.target_samples > 0);
        if !samples && let Some(toml::Value::Table(data)) = table.get_mut("data") {
            if self.recipe.data.sampling == default_sampling() {
                data.remove("sampling");
            }
            if self.recipe.data.samples_per_prompt == DataConfig::default().samples_per_prompt {
                data.remove("samples_per_prompt");
            }
        }
        toml::to_string(&table).map_err(|e| failed(&e))
    }

    /// A resolved recipe written by an earlier version of fuserl, with the settings added since
    /// filled in with their defaults (as this version would resolve it), so that a run directory
    /// made before a new setting existed is not taken for one made by another recipe. `None`
    /// when the text does not read as a recipe.
    pub fn with_current_defaults(text: &str) -> Option<String> {
        toml::from_str::<Recipe>(text).ok().and_then(|r| toml::to_string(&r).ok())
    }

    /// The run directory. Outputs (`[run] output_dir`, `[export] path`) are relative to the
    /// working folder, like TRL's `output_dir`; inputs (data, checkpoints) to the recipe's folder.
    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(self.recipe.run.output_dir.as_deref().unwrap_or("runs"))
    }

    /// The export folder (relative to the working folder, like [`LoadedRecipe::output_dir`]).
    pub fn export_dir(&self) -> PathBuf {
        self.recipe.export.path.as_deref().map_or_else(|| self.output_dir().join("export"), PathBuf::from)
    }
}

/// Remove the keys whose value is an empty list from the recipe's own tables (the top level,
/// `[run]`, `[backend]`, `[target]`, `[data]`, `[sft]`, `[po]`, `[eval]`, `[export]`), where every
/// list defaults to empty. Components' tables (sources, rewards, weightings, objectives) and
/// `extra` are left as they are: there an empty list can mean something (`extra = {samplers =
/// []}` turns a llama.cpp feature off, and a plugin's list may default to something else).
fn drop_empty_lists(table: &mut toml::Table) {
    fn drop_in(table: &mut toml::Table) {
        let empty: Vec<String> =
            table.iter().filter(|(_, v)| v.as_array().is_some_and(Vec::is_empty)).map(|(k, _)| k.clone()).collect();
        for key in empty {
            table.remove(&key);
        }
    }
    drop_in(table);
    for section in ["run", "backend", "target", "data", "sft", "po", "eval", "export"] {
        if let Some(t) = table.get_mut(section).and_then(toml::Value::as_table_mut) {
            drop_in(t);
        }
    }
}

/// Remove the empty lists of components' tables (`[[sources]]`, `[reward]`,
/// `[weighting]`, the stages' `objective`) that the recipe file does not write: they are the
/// component's default (a `jsonl` source's `sources = []`: every source of the file). One the
/// recipe writes is kept (it may mean something: `extra = {samplers = []}`).
fn drop_unwritten_component_lists(table: &mut toml::Table, written: Option<&toml::Table>) {
    fn drop_in(table: &mut toml::Table, written: Option<&toml::Table>) {
        let empty: Vec<String> = table
            .iter()
            .filter(|(k, v)| v.as_array().is_some_and(Vec::is_empty) && !written.is_some_and(|w| w.contains_key(*k)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in empty {
            table.remove(&key);
        }
    }
    let sub = |t: Option<&toml::Table>, key: &str| t.and_then(|t| t.get(key)).and_then(toml::Value::as_table).cloned();
    for key in ["sources"] {
        if let Some(toml::Value::Array(items)) = table.get_mut(key) {
            let originals = written.and_then(|w| w.get(key)).and_then(toml::Value::as_array);
            for (i, item) in items.iter_mut().enumerate() {
                let original = originals.and_then(|o| o.get(i)).and_then(toml::Value::as_table);
                if let Some(t) = item.as_table_mut() {
                    drop_in(t, original);
                }
            }
        }
    }
    for key in ["reward", "weighting"] {
        let original = sub(written, key);
        if let Some(t) = table.get_mut(key).and_then(toml::Value::as_table_mut) {
            drop_in(t, original.as_ref());
        }
    }
    for stage in ["sft", "po"] {
        let original = sub(sub(written, stage).as_ref(), "objective");
        if let Some(t) = table
            .get_mut(stage)
            .and_then(toml::Value::as_table_mut)
            .and_then(|s| s.get_mut("objective"))
            .and_then(toml::Value::as_table_mut)
        {
            drop_in(t, original.as_ref());
        }
    }
}

/// Read, parse, validate and build the recipe at `path`. A recipe that names plugins needs
/// [`load_recipe_with`].
pub fn load_recipe(path: &Path, registry: &Registry) -> Result<LoadedRecipe> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_recipe(&text, path, registry)
}

/// Every problem of the recipe at `path` at once ([`check_recipe_text`]).
pub fn check_recipe(path: &Path, registry: &mut Registry, loader: &dyn PluginLoader) -> RecipeCheck {
    match std::fs::read_to_string(path) {
        Ok(text) => check_recipe_text(&text, path, registry, Some(loader)),
        Err(e) => RecipeCheck { loaded: None, parsed: None, problems: vec![Error::io(path, e)] },
    }
}

/// Like [`load_recipe`], loading the recipe's plugins into `registry` with `loader` first.
pub fn load_recipe_with(path: &Path, registry: &mut Registry, loader: &dyn PluginLoader) -> Result<LoadedRecipe> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_recipe_with(&text, path, registry, Some(loader))
}

/// Parse, validate and build a recipe from `text`; `file` is used in messages and to resolve
/// relative paths.
pub fn parse_recipe(text: &str, file: &Path, registry: &Registry) -> Result<LoadedRecipe> {
    parse_recipe_with(text, file, &mut registry.clone(), None)
}

/// Parse, validate and build a recipe, loading the plugins it names with `loader`: the first
/// problem of [`check_recipe_text`], if any.
pub fn parse_recipe_with(
    text: &str,
    file: &Path,
    registry: &mut Registry,
    loader: Option<&dyn PluginLoader>,
) -> Result<LoadedRecipe> {
    let mut checked = check_recipe_text(text, file, registry, loader);
    match checked.loaded {
        Some(loaded) if checked.problems.is_empty() => Ok(loaded),
        _ => Err(if checked.problems.is_empty() {
            Error::Path { file: file.to_path_buf(), message: "the recipe could not be built".into() }
        } else {
            checked.problems.remove(0)
        }),
    }
}

/// A recipe that parsed and validated, with where it came from: what can be checked without its
/// components (its input files, its device), also when a component could not be built.
#[derive(Debug, Clone)]
pub struct ParsedRecipe {
    /// The recipe file.
    pub file: PathBuf,
    /// The resolved recipe (a component that could not be built keeps its table as written).
    pub recipe: Recipe,
    /// Relative paths in the recipe are resolved against this folder.
    pub base_dir: PathBuf,
}

impl ParsedRecipe {
    /// An error about the setting at `path`, at its line and column in the recipe file.
    pub fn error_at(&self, path: &KeyPath, message: impl Into<String>) -> Error {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        let (line, column) = Locator::new(&text).locate(path);
        Error::Recipe { file: self.file.clone(), line, column, path: path.to_string(), message: message.into() }
    }

    /// The run directory ([`LoadedRecipe::output_dir`]).
    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(self.recipe.run.output_dir.as_deref().unwrap_or("runs"))
    }

    /// The export folder ([`LoadedRecipe::export_dir`]).
    pub fn export_dir(&self) -> PathBuf {
        self.recipe.export.path.as_deref().map_or_else(|| self.output_dir().join("export"), PathBuf::from)
    }
}

/// Every problem of a recipe at once (`fuserl recipe check`), in the order loading meets them:
/// the built recipe when there is none; else what could be made of it.
#[derive(Debug)]
pub struct RecipeCheck {
    /// The recipe with its components, when every check passed.
    pub loaded: Option<LoadedRecipe>,
    /// The recipe without its components, when its settings parsed and validated (whatever
    /// the components did).
    pub parsed: Option<ParsedRecipe>,
    /// Every problem found, each at its place.
    pub problems: Vec<Error>,
}

/// Remove the setting at `path` from `table` (to look for the recipe's other problems past it);
/// false when there is none to remove.
fn remove_at(table: &mut toml::Table, path: &KeyPath) -> bool {
    use fuserl_core::config::PathSegment;
    let segments = &path.0;
    let Some((last, parents)) = segments.split_last() else { return false };
    let mut value: &mut toml::Value = match parents.first() {
        Some(PathSegment::Key(k)) => match table.get_mut(k) {
            Some(v) => v,
            None => return false,
        },
        Some(PathSegment::Index(_)) => return false,
        None => {
            return match last {
                PathSegment::Key(k) => table.remove(k).is_some(),
                PathSegment::Index(_) => false,
            };
        }
    };
    for seg in &parents[1..] {
        value = match (seg, value) {
            (PathSegment::Key(k), toml::Value::Table(t)) => match t.get_mut(k) {
                Some(v) => v,
                None => return false,
            },
            (PathSegment::Index(i), toml::Value::Array(a)) => match a.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, value) {
        (PathSegment::Key(k), toml::Value::Table(t)) => t.remove(k).is_some(),
        _ => false,
    }
}

/// Parse, validate and build a recipe, collecting every problem instead of stopping at the
/// first: a setting that does not parse is reported and left out so that the rest is read; every
/// validation runs; every component is built (one that cannot be is reported, the others still
/// are). `loaded` only when there is no problem.
pub fn check_recipe_text(
    text: &str,
    file: &Path,
    registry: &mut Registry,
    loader: Option<&dyn PluginLoader>,
) -> RecipeCheck {
    let locator = Locator::new(text);
    let at = |err: ConfigError| -> Error {
        let (line, column) = locator.locate(&err.path);
        Error::Recipe { file: file.to_path_buf(), line, column, path: err.path.to_string(), message: err.message }
    };
    let mut problems: Vec<Error> = Vec::new();
    let stop = |problems: Vec<Error>| RecipeCheck { loaded: None, parsed: None, problems };

    let mut table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let (line, column) = locator.line_col(e.span().map_or(0, |s| s.start));
            return stop(vec![Error::Recipe {
                file: file.to_path_buf(),
                line,
                column,
                path: String::new(),
                message: format!("invalid TOML: {}", e.message().trim()),
            }]);
        }
    };
    // Look at the version first: a newer recipe should say so, not list unknown keys.
    match table.get("schema_version") {
        Some(toml::Value::Integer(v)) if *v == i64::from(SCHEMA_VERSION) => {}
        Some(toml::Value::Integer(v)) => {
            return stop(vec![at(ConfigError::at(
                "schema_version",
                format!("unsupported schema version {v}; this fuserl reads version {SCHEMA_VERSION}"),
            ))]);
        }
        _ => {}
    }
    // Each setting that does not parse is reported and left out, and the recipe read again
    // (a required one cannot be left out: there the reading stops).
    let mut raw: Option<RawRecipe> = None;
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..64 {
        match parse_table::<RawRecipe>(&table) {
            Ok(r) => {
                raw = Some(r);
                break;
            }
            // A required key left out because its value was wrong: already reported.
            Err(e) if e.missing && removed.contains(&e.path.to_string()) => break,
            Err(e) => {
                let removable = !e.missing && remove_at(&mut table, &e.path);
                if removable {
                    removed.push(e.path.to_string());
                }
                problems.push(at(e));
                if !removable {
                    break;
                }
            }
        }
    }
    let Some(raw) = raw else { return stop(problems) };
    let read = problems.len();
    if raw.schema_version != SCHEMA_VERSION {
        problems.push(at(ConfigError::at(
            "schema_version",
            format!("unsupported schema version {}; this fuserl reads version {SCHEMA_VERSION}", raw.schema_version),
        )));
        return stop(problems);
    }

    let stem = file.file_stem().map_or_else(|| "run".to_owned(), |s| s.to_string_lossy().into_owned());
    let mut run = raw.run;
    let name = run.name.clone().unwrap_or(stem);
    if name.is_empty() || name.contains(['/', '\\']) {
        problems
            .push(at(ConfigError::new(KeyPath::keys(&["run", "name"]), "expected a non-empty name without slashes")));
    }
    run.name = Some(name.clone());
    let output_dir = run.output_dir.clone().unwrap_or_else(|| format!("runs/{name}"));
    run.output_dir = Some(output_dir.clone());

    // In the order the sections are documented; each problem reported, the others still checked.
    let prefixed = |e: ConfigError, key: &str| at(e.prefixed(&KeyPath::keys(&[key])));
    if let Err(e) = validate_backend(&raw.backend) {
        problems.push(prefixed(e, "backend"));
    }
    if let Err(e) = validate_target(&raw.target) {
        problems.push(prefixed(e, "target"));
    }
    let data = validate_data(raw.data).map_err(|e| problems.push(prefixed(e, "data"))).ok();
    let sft = resolve_stage(raw.sft, Stage::Sft).map_err(|e| problems.push(prefixed(e, "sft"))).ok();
    let po = resolve_stage(raw.po, Stage::Po).map_err(|e| problems.push(prefixed(e, "po"))).ok();
    if let Err(e) = validate_eval(&raw.eval) {
        problems.push(prefixed(e, "eval"));
    }
    if let Err(e) = validate_export(&raw.export) {
        problems.push(prefixed(e, "export"));
    }
    if raw.export.lora == LoraExport::Adapter && raw.target.lora.is_none() {
        problems.push(prefixed(
            ConfigError::at("lora", "lora = \"adapter\" exports LoRA adapters, and [target.lora] trains none"),
            "export",
        ));
    } else if raw.export.lora == LoraExport::Adapter && raw.export.format == ExportFormat::Gguf {
        problems.push(prefixed(
            ConfigError::at(
                "lora",
                "a GGUF export holds the whole model: use lora = \"merged\" with format = \"gguf\"",
            ),
            "export",
        ));
    }
    let settings_valid = problems.len() == read;
    let mut export = raw.export;
    export.path = Some(export.path.unwrap_or_else(|| format!("{output_dir}/export")));
    export.dtype = Some(export.dtype.unwrap_or(raw.backend.dtype));

    let base_dir = file.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let base_dir = if base_dir.as_os_str().is_empty() { PathBuf::from(".") } else { base_dir };
    let ctx = BuildContext::new(base_dir.clone(), run.seed, raw.backend.clone());

    for (i, spec) in raw.plugins.iter().enumerate() {
        let here = KeyPath::keys(&["plugins"]).index(i);
        match loader {
            None => problems.push(at(ConfigError::new(here, "this program cannot load plugin libraries"))),
            Some(loader) => {
                if let Err(message) = loader.load(spec, &base_dir, registry) {
                    problems.push(at(ConfigError::new(here, message)));
                }
            }
        }
    }
    let registry: &Registry = registry;

    // Every component built; one that cannot be is reported and keeps its table as written.
    if raw.sources.is_empty() {
        problems.push(at(ConfigError::at("sources", "expected at least one [[sources]] table")));
    }
    let mut sources = Vec::new();
    let mut resolved_sources = Vec::new();
    for (i, table) in raw.sources.iter().enumerate() {
        let prefix = KeyPath::keys(&["sources"]).index(i);
        match build_with(table, &prefix, |k, t| registry.build_source(k, t, &ctx)) {
            Ok((built, resolved)) => {
                sources.push(built);
                resolved_sources.push(resolved);
            }
            Err(e) => {
                problems.push(at(e));
                resolved_sources.push(table.clone());
            }
        }
    }
    // A pairwise judge compares two answers: it is [eval.judge], never a reward.
    let pairwise_only = |r: &dyn RewardModel, at_key: &[&str]| {
        if r.traits().pairwise {
            Err(ConfigError::new(
                KeyPath::keys(at_key).key("mode"),
                "a pairwise judge compares two answers and cannot score one: use it as [eval.judge]",
            ))
        } else {
            Ok(())
        }
    };
    let (reward, reward_table) =
        match build_with(&raw.reward, &KeyPath::keys(&["reward"]), |k, t| registry.build_reward(k, t, &ctx)) {
            Ok((built, resolved)) => {
                if let Err(e) = pairwise_only(built.as_ref(), &["reward"]) {
                    problems.push(at(e));
                }
                (Some(built), resolved)
            }
            Err(e) => {
                problems.push(at(e));
                (None, raw.reward.clone())
            }
        };
    let mut eval = raw.eval;
    let eval_reward = match eval.reward.take() {
        Some(table) => {
            match build_with(&table, &KeyPath::keys(&["eval", "reward"]), |k, t| registry.build_reward(k, t, &ctx)) {
                Ok((built, resolved)) => {
                    if let Err(e) = pairwise_only(built.as_ref(), &["eval", "reward"]) {
                        problems.push(at(e));
                    }
                    eval.reward = Some(resolved);
                    Some(built)
                }
                Err(e) => {
                    problems.push(at(e));
                    eval.reward = Some(table);
                    None
                }
            }
        }
        None => None,
    };
    let eval_judge = match eval.judge.take() {
        Some(table) => {
            let here = KeyPath::keys(&["eval", "judge"]);
            match build_with(&table, &here, |k, t| registry.build_reward(k, t, &ctx)) {
                Ok((built, resolved)) => {
                    if !built.traits().pairwise {
                        problems.push(at(ConfigError::new(
                            here.key("mode"),
                            "expected a pairwise judge (kind = \"judge\" with mode = \"pairwise\"); a reward that scores single answers is [eval.reward]",
                        )));
                    }
                    eval.judge = Some(resolved);
                    Some(built)
                }
                Err(e) => {
                    problems.push(at(e));
                    eval.judge = Some(table);
                    None
                }
            }
        }
        None => None,
    };
    let weighting_table = raw.weighting.unwrap_or_else(|| kind_table("softmax"));
    let (weighting, weighting_table) =
        match build_with(&weighting_table, &KeyPath::keys(&["weighting"]), |k, t| registry.build_weighting(k, t, &ctx))
        {
            Ok((built, resolved)) => (Some(built), resolved),
            Err(e) => {
                problems.push(at(e));
                (None, weighting_table)
            }
        };

    // The stages' objectives (when both stages' settings were read).
    let (Some(data), Some(sft), Some(mut po)) = (data, sft, po) else {
        return RecipeCheck { loaded: None, parsed: None, problems };
    };
    // The reference defaults to the model FusePO starts from, as TRL's `ref_model=None` does:
    // the FuseSFT checkpoint, or the target when FuseSFT is disabled.
    let explicit_reference = po.reference.is_some();
    po.reference =
        Some(po.reference.unwrap_or(if sft.enabled { ReferenceModel::SftCheckpoint } else { ReferenceModel::Target }));
    let mut stages = Vec::new();
    let sft_enabled = sft.enabled;
    for (stage, config) in [(Stage::Sft, sft), (Stage::Po, po)] {
        let mut config = config;
        let table = config.objective.take().unwrap_or_else(|| kind_table(stage.default_objective()));
        let prefix = KeyPath::keys(&[stage.key(), "objective"]);
        let objective = match build_with(&table, &prefix, |k, t| registry.build_objective(k, t, &ctx)) {
            Ok((objective, resolved)) => {
                config.objective = Some(resolved);
                Some(objective)
            }
            Err(e) => {
                problems.push(at(e));
                config.objective = Some(table);
                None
            }
        };
        if let Some(objective) = &objective {
            if stage == Stage::Sft && config.enabled && objective.needs_reference() {
                problems.push(at(ConfigError::new(
                    prefix.key("kind"),
                    format!(
                        "objective `{}` needs a reference model, which the SFT stage does not have; \
                         use it in [po] (with reference = \"target\" to skip SFT)",
                        objective.name()
                    ),
                )));
            }
            // Only an objective with a reference needs one that exists (SimPO has none).
            if stage == Stage::Po
                && config.enabled
                && objective.needs_reference()
                && explicit_reference
                && config.reference == Some(ReferenceModel::SftCheckpoint)
                && !sft_enabled
            {
                problems.push(at(ConfigError::new(
                    KeyPath::keys(&["po", "reference"]),
                    format!(
                        "objective `{}` compares against the FuseSFT checkpoint, but [sft] is disabled; \
                         set reference = \"target\" (or leave it out: it defaults to the model FusePO starts from)",
                        objective.name()
                    ),
                )));
            }
        }
        stages.push((config, objective));
    }
    let (po, po_objective) = stages.pop().expect("two stages");
    let (sft, sft_objective) = stages.pop().expect("two stages");

    let recipe = Recipe {
        schema_version: SCHEMA_VERSION,
        plugins: raw.plugins,
        run,
        backend: raw.backend,
        target: raw.target,
        data,
        sources: resolved_sources,
        reward: reward_table,
        weighting: weighting_table,
        sft,
        po,
        eval,
        export,
    };
    // What the inputs check reads is only given when the recipe's own settings are valid (their
    // problems are already reported: a missing [eval] prompts would be reported twice).
    let parsed = settings_valid.then(|| ParsedRecipe {
        file: file.to_path_buf(),
        recipe: recipe.clone(),
        base_dir: base_dir.clone(),
    });
    let loaded = match (reward, weighting, sft_objective, po_objective) {
        (Some(reward), Some(weighting), Some(sft_objective), Some(po_objective)) if problems.is_empty() => {
            Some(LoadedRecipe {
                file: file.to_path_buf(),
                recipe,
                components: Components {
                    sources,
                    reward,
                    weighting,
                    sft_objective,
                    po_objective,
                    eval_reward,
                    eval_judge,
                },
                base_dir,
            })
        }
        _ => None,
    };
    RecipeCheck { loaded, parsed, problems }
}

fn kind_table(kind: &str) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("kind".into(), toml::Value::String(kind.into()));
    t
}

/// Build one component from its table: split off `kind`, build, and return the component with
/// its resolved table (`kind` first). Errors carry the full key path from the recipe's root.
fn build_with<T: ?Sized>(
    table: &toml::Table,
    prefix: &KeyPath,
    build: impl FnOnce(&str, &toml::Table) -> Result<Built<T>, BuildError>,
) -> Result<(Box<T>, toml::Table), ConfigError> {
    let (kind, rest) = split_kind(table).map_err(|e| e.prefixed(prefix))?;
    match build(&kind, &rest) {
        Ok(built) => {
            let mut resolved = kind_table(&kind);
            resolved.extend(built.resolved);
            Ok((built.component, resolved))
        }
        Err(unknown @ BuildError::UnknownKind { .. }) => {
            Err(ConfigError::new(prefix.clone().key("kind"), unknown.to_string()))
        }
        Err(BuildError::Config(e)) => Err(e.prefixed(prefix)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Sft,
    Po,
}

impl Stage {
    fn key(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Po => "po",
        }
    }
    fn default_objective(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Po => "dpo",
        }
    }
}

fn validate_backend(b: &BackendConfig) -> Result<(), ConfigError> {
    use fuserl_core::backend::{DType, MasterWeights};
    if b.master_weights == MasterWeights::Bf16 && b.dtype != DType::Bf16 {
        let dtype = match b.dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        };
        return Err(ConfigError::at(
            "master_weights",
            format!("\"bf16\" master weights need dtype = \"bf16\" (the compute type), found dtype = \"{dtype}\""),
        ));
    }
    Ok(())
}

fn validate_target(t: &TargetConfig) -> Result<(), ConfigError> {
    if t.checkpoint.trim().is_empty() {
        return Err(ConfigError::at("checkpoint", "expected the path of a Hugging Face checkpoint folder"));
    }
    if t.max_length == 0 {
        return Err(ConfigError::at("max_length", "expected a positive number of tokens"));
    }
    if let Some(p) = t.max_prompt_length
        && (p == 0 || p >= t.max_length)
    {
        return Err(ConfigError::at(
            "max_prompt_length",
            format!("expected a number of tokens in [1, max_length = {}), found {p}", t.max_length),
        ));
    }
    if let Some(l) = &t.lora {
        let at = |key: &str, message: String| ConfigError::new(KeyPath::keys(&["lora", key]), message);
        if l.r == 0 {
            return Err(at("r", "expected a positive rank".into()));
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            return Err(at("alpha", format!("expected a positive number, found {}", l.alpha)));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err(at("dropout", format!("expected a probability in [0, 1), found {}", l.dropout)));
        }
        let modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        let all = l.target_modules.len() == 1 && l.target_modules[0] == "all-linear";
        if l.target_modules.is_empty() {
            return Err(at("target_modules", format!("expected some of {} or \"all-linear\"", modules.join(", "))));
        }
        if !all && let Some(bad) = l.target_modules.iter().find(|m| !modules.contains(&m.as_str())) {
            return Err(at(
                "target_modules",
                format!("unknown module `{bad}`; expected some of {} or \"all-linear\"", modules.join(", ")),
            ));
        }
    }
    Ok(())
}

fn validate_data(mut d: DataConfig) -> Result<DataConfig, ConfigError> {
    match (d.split, d.po_fraction) {
        (Split::Shared, Some(_)) => {
            return Err(ConfigError::at("po_fraction", "only meaningful with split = \"disjoint\""));
        }
        (Split::Disjoint, f) => {
            let f = f.unwrap_or(0.5);
            if !(f > 0.0 && f < 1.0) {
                return Err(ConfigError::at("po_fraction", format!("expected a fraction in (0, 1), found {f}")));
            }
            d.po_fraction = Some(f);
        }
        (Split::Shared, None) => {}
    }
    if d.samples_per_prompt == 0 {
        return Err(ConfigError::at("samples_per_prompt", "expected at least 1"));
    }
    if d.score_batch_size == 0 {
        return Err(ConfigError::at("score_batch_size", "expected at least 1"));
    }
    if let Some(t) = d.sampling.temperature {
        check::non_negative("temperature", t).map_err(|e| e.prefixed(&KeyPath::keys(&["sampling"])))?;
    }
    if let Some(p) = d.sampling.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ConfigError::new(
            KeyPath::keys(&["sampling", "top_p"]),
            format!("expected a number in (0, 1], found {p}"),
        ));
    }
    Ok(d)
}

fn resolve_stage(mut s: StageConfig, stage: Stage) -> Result<StageConfig, ConfigError> {
    let (epochs, lr) = match stage {
        Stage::Sft => (3, 5e-6),
        Stage::Po => (1, 8e-7),
    };
    s.epochs = Some(s.epochs.unwrap_or(epochs));
    if s.epochs == Some(0) {
        return Err(ConfigError::at("epochs", "expected at least 1"));
    }
    if s.max_steps == Some(0) {
        return Err(ConfigError::at("max_steps", "expected at least 1"));
    }
    let lr = s.learning_rate.unwrap_or(lr);
    check::positive("learning_rate", lr)?;
    s.learning_rate = Some(lr);
    match (s.warmup_ratio, s.warmup_steps) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::at("warmup_steps", "give either warmup_ratio or warmup_steps, not both"));
        }
        (Some(r), None) => check::in_half_open("warmup_ratio", r, 0.0, 1.0)?,
        (None, Some(_)) => {}
        (None, None) => s.warmup_ratio = Some(0.1),
    }
    if s.batch_size == 0 {
        return Err(ConfigError::at("batch_size", "expected at least 1"));
    }
    if s.grad_accum == 0 {
        return Err(ConfigError::at("grad_accum", "expected at least 1"));
    }
    check::positive("max_grad_norm", s.max_grad_norm)?;
    check::non_negative("weight_decay", s.weight_decay)?;
    check::in_half_open("adam_beta1", s.adam_beta1, 0.0, 1.0)?;
    check::in_half_open("adam_beta2", s.adam_beta2, 0.0, 1.0)?;
    check::positive("adam_eps", s.adam_eps)?;
    if s.checkpoint_every == 0 {
        return Err(ConfigError::at("checkpoint_every", "expected at least 1"));
    }
    if s.log_every == 0 {
        return Err(ConfigError::at("log_every", "expected at least 1"));
    }
    match stage {
        Stage::Sft if s.reference.is_some() => {
            return Err(ConfigError::at("reference", "only [po] has a reference model"));
        }
        Stage::Sft if s.target_samples > 0 => {
            return Err(ConfigError::at("target_samples", "only [po] generates target samples"));
        }
        Stage::Po | Stage::Sft => {}
    }
    Ok(s)
}

fn validate_eval(e: &EvalConfig) -> Result<(), ConfigError> {
    if e.enabled && e.prompts.is_none() {
        return Err(ConfigError {
            path: KeyPath::keys(&["prompts"]),
            message: "missing required key `prompts` (eval is enabled)".into(),
            missing: true,
        });
    }
    check::non_negative("temperature", e.temperature)?;
    if e.max_new_tokens == 0 {
        return Err(ConfigError::at("max_new_tokens", "expected at least 1"));
    }
    if e.samples == 0 {
        return Err(ConfigError::at("samples", "expected at least 1"));
    }
    if e.batch_size == 0 {
        return Err(ConfigError::at("batch_size", "expected at least 1"));
    }
    if e.samples > 1 && e.temperature == 0.0 {
        return Err(ConfigError::at(
            "samples",
            format!(
                "{} answers per prompt at temperature 0 would all be the same greedy answer; set [eval] temperature above 0",
                e.samples
            ),
        ));
    }
    Ok(())
}

fn validate_export(e: &ExportConfig) -> Result<(), ConfigError> {
    if let Some(t) = e.gguf_type
        && e.format != ExportFormat::Gguf
    {
        return Err(ConfigError::at(
            "gguf_type",
            format!("gguf_type = \"{}\" needs format = \"gguf\" (no GGUF file is written otherwise)", t.as_str()),
        ));
    }
    if e.max_shard_size_mb == 0 {
        return Err(ConfigError::at("max_shard_size_mb", "expected at least 1"));
    }
    if let Some(p) = &e.path
        && p.trim().is_empty()
    {
        return Err(ConfigError::at("path", "expected a folder path"));
    }
    Ok(())
}
