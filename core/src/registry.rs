//! The plugin registry: every component (built-in or dynamically loaded) is an entry with its
//! extension point, kebab-case name, one-line summary, origin and a constructor from the
//! component's own TOML table. Built-ins register themselves with [`inventory`] through a
//! [`PluginDescriptor`]; a name registered twice for one extension point is an error that names
//! both origins.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ConfigError, KeyPath, parse_table, to_table};
use crate::error::{Error, Result};
use crate::extension::{PreferenceObjective, RewardModel, SourceAdapter, WeightingScheme};

/// The four extension points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExtensionPoint {
    /// [`SourceAdapter`]: `[[sources]]` in a recipe.
    Source,
    /// [`RewardModel`]: `[reward]`.
    Reward,
    /// [`WeightingScheme`]: `[weighting]`.
    Weighting,
    /// [`PreferenceObjective`]: `[sft.objective]` and `[po.objective]`.
    Objective,
}

impl ExtensionPoint {
    /// All extension points, in data-flow order.
    pub const ALL: [ExtensionPoint; 4] = [Self::Source, Self::Reward, Self::Weighting, Self::Objective];

    /// The short name used on the command line: `source`, `reward`, `weighting`, `objective`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Reward => "reward",
            Self::Weighting => "weighting",
            Self::Objective => "objective",
        }
    }

    /// The name used in messages: `source adapter`, `reward model`, ….
    pub fn noun(self) -> &'static str {
        match self {
            Self::Source => "source adapter",
            Self::Reward => "reward model",
            Self::Weighting => "weighting scheme",
            Self::Objective => "preference objective",
        }
    }
}

impl fmt::Display for ExtensionPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a component constructor may use besides its own table.
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// Relative paths in a recipe are resolved against this folder (the recipe's own).
    pub base_dir: PathBuf,
    /// The run's seed.
    pub seed: u64,
    /// The recipe's `[backend]` (where a component that runs a model runs it by default).
    pub backend: crate::backend::BackendConfig,
    /// The registry building the component, set by its build methods: a composite (`combine`)
    /// builds its parts through it ([`BuildContext::registry`]).
    pub registry: Option<Arc<Registry>>,
}

impl Default for BuildContext {
    fn default() -> Self {
        Self::new(".", 0, crate::backend::BackendConfig::default())
    }
}

impl BuildContext {
    /// A context for building a recipe's components.
    pub fn new(base_dir: impl Into<PathBuf>, seed: u64, backend: crate::backend::BackendConfig) -> Self {
        Self { base_dir: base_dir.into(), seed, backend, registry: None }
    }

    /// The registry the component is being built from (none outside [`Registry`]'s build
    /// methods): for components made of components.
    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_deref()
    }

    /// Resolve a path from a recipe against [`BuildContext::base_dir`].
    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = PathBuf::from(path);
        if p.is_absolute() { p } else { self.base_dir.join(p) }
    }
}

/// Loads the plugin libraries a recipe names in `plugins = [...]` (implemented by the plugin ABI
/// crate, which the core cannot depend on).
pub trait PluginLoader {
    /// Load the plugin `spec` (a path relative to `base_dir`, or a bare library name) into
    /// `registry`; a message on failure.
    fn load(&self, spec: &str, base_dir: &std::path::Path, registry: &mut Registry) -> std::result::Result<(), String>;
}

/// A constructed component and its configuration with every default filled in.
#[derive(Debug)]
pub struct Built<T: ?Sized> {
    /// The component.
    pub component: Box<T>,
    /// The resolved configuration (without `kind`).
    pub resolved: toml::Table,
}

/// Parse `table` into the config `C`, let `make` validate it and build the component, and keep
/// the resolved configuration. The usual body of a plugin constructor.
pub fn build_component<C, T: ?Sized>(
    table: &toml::Table,
    ctx: &BuildContext,
    make: impl FnOnce(C, &BuildContext) -> Result<Box<T>, ConfigError>,
) -> Result<Built<T>, ConfigError>
where
    C: DeserializeOwned + Serialize,
{
    let config: C = parse_table(table)?;
    let resolved = to_table(&config)?;
    let component = make(config, ctx)?;
    Ok(Built { component, resolved })
}

/// Constructor of a source adapter from its table.
pub type SourceFactory = fn(&toml::Table, &BuildContext) -> Result<Built<dyn SourceAdapter>, ConfigError>;
/// Constructor of a reward model from its table.
pub type RewardFactory = fn(&toml::Table, &BuildContext) -> Result<Built<dyn RewardModel>, ConfigError>;
/// Constructor of a weighting scheme from its table.
pub type WeightingFactory = fn(&toml::Table, &BuildContext) -> Result<Built<dyn WeightingScheme>, ConfigError>;
/// Constructor of a preference objective from its table.
pub type ObjectiveFactory = fn(&toml::Table, &BuildContext) -> Result<Built<dyn PreferenceObjective>, ConfigError>;

type DynFactory<T> = Arc<dyn Fn(&toml::Table, &BuildContext) -> Result<Built<T>, ConfigError> + Send + Sync>;

/// A constructor, tagged with its extension point.
#[derive(Clone)]
pub enum Factory {
    /// Builds a [`SourceAdapter`].
    Source(DynFactory<dyn SourceAdapter>),
    /// Builds a [`RewardModel`].
    Reward(DynFactory<dyn RewardModel>),
    /// Builds a [`WeightingScheme`].
    Weighting(DynFactory<dyn WeightingScheme>),
    /// Builds a [`PreferenceObjective`].
    Objective(DynFactory<dyn PreferenceObjective>),
}

impl Factory {
    /// The extension point this constructor serves.
    pub fn point(&self) -> ExtensionPoint {
        match self {
            Self::Source(_) => ExtensionPoint::Source,
            Self::Reward(_) => ExtensionPoint::Reward,
            Self::Weighting(_) => ExtensionPoint::Weighting,
            Self::Objective(_) => ExtensionPoint::Objective,
        }
    }
}

impl fmt::Debug for Factory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Factory({})", self.point())
    }
}

/// A constructor of a built-in, as registered with `inventory` (plain function pointers, so
/// that it can be built in a `static`).
#[derive(Clone, Copy, Debug)]
pub enum StaticFactory {
    /// Builds a [`SourceAdapter`].
    Source(SourceFactory),
    /// Builds a [`RewardModel`].
    Reward(RewardFactory),
    /// Builds a [`WeightingScheme`].
    Weighting(WeightingFactory),
    /// Builds a [`PreferenceObjective`].
    Objective(ObjectiveFactory),
}

/// How a built-in announces itself: `inventory::submit! { PluginDescriptor { … } }`.
#[derive(Debug)]
pub struct PluginDescriptor {
    /// Kebab-case name, unique per extension point.
    pub name: &'static str,
    /// One line that says what it does.
    pub summary: &'static str,
    /// Where it comes from: the crate name for built-ins.
    pub origin: &'static str,
    /// Its constructor.
    pub factory: StaticFactory,
}

inventory::collect!(PluginDescriptor);

impl PluginDescriptor {
    fn entry(&self) -> Entry {
        let factory = match self.factory {
            StaticFactory::Source(f) => Factory::Source(Arc::new(f)),
            StaticFactory::Reward(f) => Factory::Reward(Arc::new(f)),
            StaticFactory::Weighting(f) => Factory::Weighting(Arc::new(f)),
            StaticFactory::Objective(f) => Factory::Objective(Arc::new(f)),
        };
        Entry {
            name: self.name.to_owned(),
            summary: self.summary.to_owned(),
            origin: format!("built-in ({})", self.origin),
            factory,
        }
    }
}

/// One registered component.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Kebab-case name.
    pub name: String,
    /// One-line summary.
    pub summary: String,
    /// Where it comes from: `built-in (crate)` or the plugin library's file.
    pub origin: String,
    /// Its constructor.
    pub factory: Factory,
}

impl Entry {
    /// The extension point it serves.
    pub fn point(&self) -> ExtensionPoint {
        self.factory.point()
    }
}

/// Why a component could not be built from a recipe table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// No component of that name is registered for the extension point.
    UnknownKind {
        /// The extension point.
        point: ExtensionPoint,
        /// The name asked for.
        kind: String,
        /// The registered names.
        choices: Vec<String>,
    },
    /// The component refused its table.
    Config(ConfigError),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKind { point, kind, choices } => {
                let list = choices.join(", ");
                let hint = crate::config::did_you_mean(kind, &list);
                write!(f, "unknown {} `{kind}`{hint}; expected one of: {list}", point.noun())
            }
            Self::Config(e) => write!(f, "{e}"),
        }
    }
}

/// All registered components.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    entries: Vec<Entry>,
    loaded: Vec<PathBuf>,
}

impl Registry {
    /// A registry with nothing in it.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A registry with every built-in that was linked into the program (through `inventory`).
    pub fn with_builtins() -> Result<Self> {
        let mut registry = Self::empty();
        let mut descriptors: Vec<&PluginDescriptor> = inventory::iter::<PluginDescriptor>().collect();
        // inventory's order depends on the linker: sort so that errors are reproducible.
        descriptors.sort_by_key(|d| (d.origin, d.name));
        for d in descriptors {
            registry.register(d.entry())?;
        }
        Ok(registry)
    }

    /// Add a component. A name already registered for the same extension point is an error
    /// that names both origins; the registry is left unchanged.
    pub fn register(&mut self, entry: Entry) -> Result<()> {
        if let Some(existing) = self.entries.iter().find(|e| e.point() == entry.point() && e.name == entry.name) {
            return Err(Error::DuplicatePlugin {
                point: entry.point().noun(),
                name: entry.name,
                first: existing.origin.clone(),
                second: entry.origin,
            });
        }
        if !is_kebab_case(&entry.name) {
            return Err(Error::Component {
                point: entry.point().noun(),
                name: entry.name.clone(),
                message: format!(
                    "registered by {}: names must be kebab-case (lowercase letters, digits and '-')",
                    entry.origin
                ),
            });
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Remember that the plugin library `file` was loaded; `false` when it already was.
    pub fn note_loaded(&mut self, file: &std::path::Path) -> bool {
        if self.loaded.iter().any(|f| f == file) {
            return false;
        }
        self.loaded.push(file.to_path_buf());
        true
    }

    /// Every entry, sorted by extension point then name.
    pub fn entries(&self) -> Vec<&Entry> {
        let mut all: Vec<&Entry> = self.entries.iter().collect();
        all.sort_by(|a, b| (a.point(), &a.name).cmp(&(b.point(), &b.name)));
        all
    }

    /// The names registered for `point`, sorted.
    pub fn names(&self, point: ExtensionPoint) -> Vec<String> {
        let mut names: Vec<String> =
            self.entries.iter().filter(|e| e.point() == point).map(|e| e.name.clone()).collect();
        names.sort();
        names
    }

    /// The entry for `point` and `name`.
    pub fn get(&self, point: ExtensionPoint, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.point() == point && e.name == name)
    }

    /// `ctx` with this registry in it, for composites.
    fn context(&self, ctx: &BuildContext) -> BuildContext {
        BuildContext { registry: Some(Arc::new(self.clone())), ..ctx.clone() }
    }

    fn lookup(&self, point: ExtensionPoint, kind: &str) -> Result<&Factory, BuildError> {
        self.get(point, kind).map(|e| &e.factory).ok_or_else(|| BuildError::UnknownKind {
            point,
            kind: kind.to_owned(),
            choices: self.names(point),
        })
    }

    /// Build the source adapter `kind` from its table.
    pub fn build_source(
        &self,
        kind: &str,
        table: &toml::Table,
        ctx: &BuildContext,
    ) -> Result<Built<dyn SourceAdapter>, BuildError> {
        match self.lookup(ExtensionPoint::Source, kind)? {
            Factory::Source(f) => f(table, &self.context(ctx)).map_err(BuildError::Config),
            _ => unreachable!("lookup filters by extension point"),
        }
    }

    /// Build the reward model `kind` from its table.
    pub fn build_reward(
        &self,
        kind: &str,
        table: &toml::Table,
        ctx: &BuildContext,
    ) -> Result<Built<dyn RewardModel>, BuildError> {
        match self.lookup(ExtensionPoint::Reward, kind)? {
            Factory::Reward(f) => f(table, &self.context(ctx)).map_err(BuildError::Config),
            _ => unreachable!("lookup filters by extension point"),
        }
    }

    /// Build the weighting scheme `kind` from its table.
    pub fn build_weighting(
        &self,
        kind: &str,
        table: &toml::Table,
        ctx: &BuildContext,
    ) -> Result<Built<dyn WeightingScheme>, BuildError> {
        match self.lookup(ExtensionPoint::Weighting, kind)? {
            Factory::Weighting(f) => f(table, &self.context(ctx)).map_err(BuildError::Config),
            _ => unreachable!("lookup filters by extension point"),
        }
    }

    /// Build the preference objective `kind` from its table.
    pub fn build_objective(
        &self,
        kind: &str,
        table: &toml::Table,
        ctx: &BuildContext,
    ) -> Result<Built<dyn PreferenceObjective>, BuildError> {
        match self.lookup(ExtensionPoint::Objective, kind)? {
            Factory::Objective(f) => f(table, &self.context(ctx)).map_err(BuildError::Config),
            _ => unreachable!("lookup filters by extension point"),
        }
    }

    /// Build a component from a table that names it with `kind = "..."` (outside a recipe,
    /// for tests and tools). Errors carry the key path from the table.
    pub fn build_weighting_from(
        &self,
        table: &toml::Table,
        ctx: &BuildContext,
    ) -> Result<Built<dyn WeightingScheme>, BuildError> {
        let (kind, rest) = split_kind(table).map_err(BuildError::Config)?;
        self.build_weighting(&kind, &rest, ctx)
    }

    /// Like [`Registry::build_weighting_from`], for objectives.
    pub fn build_objective_from(
        &self,
        table: &toml::Table,
        ctx: &BuildContext,
    ) -> Result<Built<dyn PreferenceObjective>, BuildError> {
        let (kind, rest) = split_kind(table).map_err(BuildError::Config)?;
        self.build_objective(&kind, &rest, ctx)
    }
}

/// Split a component table into its `kind` and the rest.
pub fn split_kind(table: &toml::Table) -> Result<(String, toml::Table), ConfigError> {
    let mut rest = table.clone();
    match rest.remove("kind") {
        Some(toml::Value::String(kind)) => Ok((kind, rest)),
        Some(other) => Err(ConfigError::new(
            KeyPath::keys(&["kind"]),
            format!("expected a string (a plugin name), found {}", other.type_str()),
        )),
        None => Err(ConfigError {
            path: KeyPath::keys(&["kind"]),
            message: "missing required key `kind` (the plugin's name)".into(),
            missing: true,
        }),
    }
}

fn is_kebab_case(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extension::GroupView;

    #[derive(Debug)]
    struct Flat;
    impl WeightingScheme for Flat {
        fn name(&self) -> &str {
            "flat"
        }
        fn weigh(&self, group: &GroupView<'_>) -> Result<Vec<f64>> {
            Ok(vec![1.0 / group.len() as f64; group.len()])
        }
    }

    fn entry(name: &str, origin: &str) -> Entry {
        Entry {
            name: name.into(),
            summary: "test".into(),
            origin: origin.into(),
            factory: Factory::Weighting(Arc::new(|_t: &toml::Table, _c: &BuildContext| {
                Ok(Built { component: Box::new(Flat) as Box<dyn WeightingScheme>, resolved: toml::Table::new() })
            })),
        }
    }

    #[test]
    fn duplicate_name_names_both_origins() {
        let mut r = Registry::empty();
        r.register(entry("flat", "libone.so")).unwrap();
        let err = r.register(entry("flat", "libtwo.so")).unwrap_err().to_string();
        assert!(err.contains("libone.so") && err.contains("libtwo.so"), "{err}");
        assert!(err.contains("weighting scheme `flat`"), "{err}");
        assert_eq!(r.entries().len(), 1);
    }

    #[test]
    fn names_must_be_kebab_case() {
        let mut r = Registry::empty();
        assert!(r.register(entry("Flat_Scheme", "x")).is_err());
        assert!(r.register(entry("flat-scheme-2", "x")).is_ok());
    }

    #[test]
    fn unknown_kind_lists_choices() {
        let mut r = Registry::empty();
        r.register(entry("flat", "x")).unwrap();
        let ctx = BuildContext::default();
        let err = r.build_weighting("flta", &toml::Table::new(), &ctx).unwrap_err();
        assert_eq!(err.to_string(), "unknown weighting scheme `flta` (did you mean `flat`?); expected one of: flat");
    }
}
