//! The model card of an export: `README.md` in the Hugging Face model-card format, as TRL's
//! trainers write one: a YAML header (`base_model`, `library_name`, `tags`, `datasets`), then what
//! the model is, its sources, the training summary (each stage's objective, steps, learning rate,
//! first and last loss from `metrics.jsonl`), the evaluation table (`eval/eval.json`, once the
//! evaluation has run: the run writes the card again after it), the recipe as it was resolved, and
//! the versions. The report shows it too.

use std::fmt::Write as _;
use std::path::Path;

use fuserl_core::data::StageName;
use fuserl_io::artifacts::{EvalReport, MetricsLine};
use fuserl_io::fs::write_atomic;
use fuserl_io::run_dir::RunDir;
use fuserl_recipe::LoadedRecipe;

use crate::Result;

/// A YAML scalar: quoted, with `"` and `\` escaped and control characters as escapes, so that
/// names from files cannot break the header.
fn yaml(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The last path component of `p` as written (a checkpoint folder's name: `SmolLM2-135M-Instruct`).
fn base_name(p: &str) -> String {
    Path::new(p).file_name().map_or_else(|| p.to_owned(), |n| n.to_string_lossy().into_owned())
}

/// The card's text.
pub fn model_card(loaded: &LoadedRecipe) -> String {
    let recipe = &loaded.recipe;
    let run = RunDir::new(loaded.output_dir());
    let name = recipe.run.name.clone().unwrap_or_else(|| "fused-model".to_owned());
    let base = base_name(&recipe.target.checkpoint);
    let sources: Vec<String> = recipe
        .sources
        .iter()
        .map(|s| {
            let kind = s.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
            let what = ["model", "name", "path", "checkpoint"].iter().find_map(|k| s.get(*k).and_then(|v| v.as_str()));
            match what {
                Some(w) => format!("{kind}: {}", base_name(w)),
                None => kind.to_owned(),
            }
        })
        .collect();
    let datasets: Vec<String> = recipe
        .sources
        .iter()
        .filter_map(|s| s.get("path").and_then(|v| v.as_str()))
        .chain(recipe.data.prompts.iter().map(String::as_str))
        .map(base_name)
        .collect();
    let mut tags = vec!["fuserl".to_owned(), "model-fusion".to_owned()];
    let stages = [
        (StageName::Sft, &recipe.sft, &loaded.components.sft_objective),
        (StageName::Po, &recipe.po, &loaded.components.po_objective),
    ];
    for (_, config, objective) in &stages {
        if config.enabled && !tags.iter().any(|t| t == objective.name()) {
            tags.push(objective.name().to_owned());
        }
    }
    let gguf = (recipe.export.format == fuserl_recipe::ExportFormat::Gguf).then(|| {
        let ty = recipe.export.gguf_type.unwrap_or_default().as_str();
        let label = fuserl_model::gguf_export::GgufType::from_name(ty).map_or("F16", |t| t.label());
        format!("model-{label}.gguf")
    });
    if gguf.is_some() {
        tags.push("gguf".to_owned());
    }
    let mut s = String::new();
    s.push_str("---\n");
    let _ = writeln!(s, "base_model: {}", yaml(&base));
    s.push_str("library_name: transformers\n");
    s.push_str("tags:\n");
    for t in &tags {
        let _ = writeln!(s, "- {}", yaml(t));
    }
    if !datasets.is_empty() {
        s.push_str("datasets:\n");
        for d in &datasets {
            let _ = writeln!(s, "- {}", yaml(d));
        }
    }
    s.push_str("---\n\n");
    let p = |t: &str| fuserl_core::text::printable(t).into_owned();
    let _ = writeln!(s, "# {}\n", p(&name));
    let _ = writeln!(
        s,
        "This model is `{}` fused with fuserl by FuseRL ({}), from {} source{}:\n",
        p(&base),
        match (recipe.sft.enabled, recipe.po.enabled) {
            (true, true) =>
                "FuseSFT, weighted SFT on the sources' scored answers, then FusePO, weighted preference optimisation",
            (true, false) => "FuseSFT: weighted SFT on the sources' scored answers",
            (false, _) => "FusePO: weighted preference optimisation on the sources' scored answers",
        },
        sources.len(),
        if sources.len() == 1 { "" } else { "s" }
    );
    for src in &sources {
        let _ = writeln!(s, "- {}", p(src));
    }
    let reward = recipe.reward.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
    let weighting = recipe.weighting.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
    let _ = writeln!(s, "\nAnswers scored by the `{}` reward, weighted by `{}`.\n", p(reward), p(weighting));
    if let Some(file) = &gguf {
        let _ = writeln!(
            s,
            "The folder also holds `{file}`, the same weights for llama.cpp, Ollama and LM Studio \
             (`llama-server -m {file}`).\n"
        );
    }

    // Training: from metrics.jsonl.
    let lines: Vec<MetricsLine> = std::fs::read_to_string(run.metrics())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    s.push_str("## Training\n\n| stage | objective | steps | learning rate | first loss | last loss |\n|---|---|---|---|---|---|\n");
    for (stage, config, objective) in &stages {
        if !config.enabled {
            continue;
        }
        let of: Vec<&MetricsLine> = lines.iter().filter(|m| m.stage == *stage).collect();
        let loss = |m: Option<&&MetricsLine>| m.map_or_else(|| "n/a".to_owned(), |m| format!("{:.4}", m.loss));
        let lr = config.learning_rate.map_or_else(|| "default".to_owned(), |l| format!("{l:e}"));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {lr} | {} | {} |",
            stage.as_str(),
            p(objective.name()),
            of.last().map_or(0, |m| m.step),
            loss(of.first()),
            loss(of.last())
        );
    }
    let b = &recipe.backend;
    let _ = writeln!(
        s,
        "\nDevice `{}`, compute type `{}`, master weights `{}`.\n",
        as_written(&b.device),
        as_written(&b.dtype),
        as_written(&b.master_weights)
    );

    // Evaluation: eval.json, when the evaluation has run.
    // Only an evaluation made after the export (of these weights): an eval.json left from an
    // earlier model of the run is not shown.
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let current = match (modified(&run.eval().json()), modified(&run.export_record())) {
        (Some(eval), Some(export)) => eval >= export,
        _ => false,
    };
    let eval = if current { std::fs::read(run.eval().json()).ok() } else { None };
    if let Some(eval) = eval.and_then(|b| serde_json::from_slice::<EvalReport>(&b).ok()) {
        let _ = writeln!(
            s,
            "## Evaluation\n\n{} held-out prompts ({}), {} answer{} per prompt, scored by `{}`; means with {:.0}% intervals ({}).\n",
            eval.n_prompts,
            p(&eval.prompts),
            eval.samples,
            if eval.samples == 1 { "" } else { "s" },
            p(&eval.reward),
            eval.interval.level * 100.0,
            p(&eval.interval.method)
        );
        s.push_str("| model | mean reward | interval | mean length (tokens) |\n|---|---|---|---|\n");
        for m in &eval.models {
            let _ = writeln!(
                s,
                "| {} | {:.3} | {:.3} to {:.3} | {:.1} |",
                p(&m.name).replace('|', "\\|"),
                m.mean_reward.mean,
                m.mean_reward.low,
                m.mean_reward.high,
                m.mean_length_tokens.mean
            );
        }
        s.push('\n');
    }
    if let Ok(resolved) = loaded.resolved_toml() {
        let _ = writeln!(s, "## Recipe\n\n```toml\n{}```\n", resolved);
    }
    let _ = writeln!(s, "## Framework versions\n\n- fuserl {}", env!("CARGO_PKG_VERSION"));
    s
}

/// A setting as the recipe writes it (`"bf16"`, `"cpu"`).
fn as_written<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// Write the card into the export folder `to` (atomically).
pub fn write_card(loaded: &LoadedRecipe, to: &Path) -> Result<()> {
    let text = model_card(loaded);
    write_atomic(&to.join("README.md"), text.as_bytes())?;
    Ok(())
}

/// Write the card again where the run's finished export is (its `export.json`), if there is one:
/// after the evaluation, whose table it then shows.
pub fn refresh(loaded: &LoadedRecipe) -> Result<()> {
    let record = RunDir::new(loaded.output_dir()).export_record();
    let to = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::export::ExportRecord>(&b).ok())
        .filter(|r| !r.exported.is_empty())
        .map(|r| std::path::PathBuf::from(r.to));
    match to {
        Some(to) if fuserl_model::checkpoint::is_checkpoint(&to) => write_card(loaded, &to),
        _ => Ok(()),
    }
}
