//! The run report: `runs/NAME/report/index.html` (one self-contained file: inline SVG plots and
//! CSS, no script, nothing fetched) and `report.md` (the same tables, the plots beside it in
//! `plots/`), built from what the run directory holds and nothing else, so that
//! `fuserl report RUN_DIR` rebuilds it at any time, and the run rebuilds it after every stage:
//!
//! - the recipe summary (`recipe.toml`, the resolved recipe) and which stages are done;
//! - the data (`data.json`, written by the scoring stage): prompts, answers and the reward
//!   distribution per source; the FuseSFT weight and the FusePO pairs each source contributed
//!   (`sft/examples.jsonl`, `po/examples.jsonl`); the share of prompts whose samples were all the
//!   same text (a source that does not sample);
//! - training curves per stage from `metrics.jsonl` (loss, gradient norm, learning rate, and the
//!   preference stage's implicit rewards, margins and accuracies);
//! - the evaluation (`eval/eval.json`): the table of measures with their intervals, the reward
//!   distribution per model and the fused model's win rates.
//!
//! Plots are drawn with `plotters` (its SVG backend). Every plot is a `<figure class="plot">`
//! whose `data-series` attribute lists its series with their colours, and every number of the
//! evaluation table carries the JSON pointer of its value in eval.json (`data-json-pointer`), so a
//! test can check that what the page shows is what the run measured.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fuserl_core::paths::Shown;
use fuserl_io::fs::write_atomic;
use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentedCoord;
use plotters::coord::types::{RangedCoordf64, RangedCoordi32};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{Value, json};

use fuserl_core::data::StageName;

use fuserl_core::data::ExampleSequence;
use fuserl_core::{Error, Result};
use fuserl_io::artifacts::{
    DataSummary, Estimate, EvalReport, MetricsLine, ModelEval, StageEvent, StageEventKind, StageExample,
};
use fuserl_io::run_dir::RunDir;
use fuserl_recipe::Recipe;

/// Where the report was written.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    /// `report/index.html`.
    pub html: PathBuf,
    /// `report/report.md`.
    pub markdown: PathBuf,
}

/// Series colours (Tableau 10): distinct from the black and greys of axes and grids.
const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// Each model's (and source's) colour, the same in every plot of the report: given in the order
/// names are first asked for.
#[derive(Default)]
struct Palette {
    names: std::cell::RefCell<Vec<String>>,
}

impl Palette {
    fn of(&self, name: &str) -> RGBColor {
        let mut names = self.names.borrow_mut();
        let i = names.iter().position(|n| n == name).unwrap_or_else(|| {
            names.push(name.to_owned());
            names.len() - 1
        });
        colour(i)
    }
}

fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// HTML text and attribute escaping (control characters from data files shown escaped).
fn esc(s: &str) -> String {
    let s = fuserl_core::text::printable(s);
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A Markdown table cell (pipes escaped, one line, control characters from data files shown
/// escaped: a name read from a file cannot break the table or reach a terminal raw).
fn md(s: &str) -> String {
    fuserl_core::text::printable(&s.replace('\n', " ")).replace('|', "\\|")
}

fn num(x: f64) -> String {
    if x.is_finite() { format!("{x:.3}") } else { "n/a".to_owned() }
}

/// An axis tick's label on an axis from `lo` to `hi`: as many digits as tell neighbouring ticks
/// apart (a learning-rate axis from 0 to 1e-4 is not "0.0001" five times), scientific notation
/// for very small or large magnitudes, and never "-0".
fn tick(v: f64, lo: f64, hi: f64) -> String {
    let step = ((hi - lo).abs() / 10.0).max(f64::MIN_POSITIVE);
    let v = if v.abs() < step * 1e-3 { 0.0 } else { v };
    if v == 0.0 {
        return "0".to_owned();
    }
    let big = lo.abs().max(hi.abs());
    if !(1e-3..1e6).contains(&big) {
        // Significant digits enough for ticks `step` apart: from the magnitude's first digit
        // down to the step's.
        let digits = (big.log10().floor() - step.log10().floor() + 1.0).clamp(1.0, 6.0) as usize;
        return format!("{v:.prec$e}", prec = digits - 1);
    }
    let decimals = (-step.log10()).ceil().clamp(0.0, 8.0) as usize;
    format!("{v:.decimals$}")
}

/// One plot: its file name (without `.svg`), caption, series (name, colour) and SVG text, and
/// where two values of its y axis were drawn (`[value, pixel]`: a test can map marks back to
/// values).
struct Plot {
    id: String,
    caption: String,
    series: Vec<(String, RGBColor)>,
    svg: String,
    y_axis: Option<[[f64; 2]; 2]>,
}

type DrawResult = std::result::Result<(), String>;

fn drawing_error<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

const SIZE: (u32, u32) = (560, 330);
/// Width of a line plot's legend, right of its plotting area (never over the lines).
const LEGEND_WIDTH: u32 = 150;
/// Font sizes as plotters takes them (its SVG writes about 0.8 of them: 15 gives 12 px labels).
const CAPTION_FONT: (&str, u32) = ("sans-serif", 19);
const LABEL_FONT: (&str, u32) = ("sans-serif", 15);

/// Draw onto a fresh SVG; `draw` gets the root area.
fn svg(draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult) -> std::result::Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(drawing_error)?;
        draw(&root)?;
        root.present().map_err(drawing_error)?;
    }
    Ok(out)
}

/// A range around `values` with a little room (a flat series gets a unit-wide range).
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.08 } else { 0.5_f64.max(lo.abs() * 0.1) };
    (lo - pad, hi + pad)
}

/// Lines over steps, one per series, with a legend beside the plotting area. Series are
/// measures of one model, coloured in their order.
fn line_plot(id: &str, caption: &str, y_desc: &str, series: &[(String, Vec<(f64, f64)>)]) -> Option<Plot> {
    let series: Vec<&(String, Vec<(f64, f64)>)> = series.iter().filter(|(_, pts)| !pts.is_empty()).collect();
    if series.is_empty() {
        return None;
    }
    let (x0, x1) = span(series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
    let (y0, y1) = span(series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    let named: Vec<(String, RGBColor)> = series.iter().enumerate().map(|(i, (n, _))| (n.clone(), colour(i))).collect();
    let mut y_axis = None;
    let text = svg(|root| {
        let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(caption, CAPTION_FONT)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(72)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_desc)
            .label_style(LABEL_FONT)
            .axis_desc_style(LABEL_FONT)
            .x_label_formatter(&|x| tick(*x, x0, x1))
            .y_label_formatter(&|y| tick(*y, y0, y1))
            .light_line_style(WHITE)
            .draw()
            .map_err(drawing_error)?;
        y_axis = Some(y_mapping(|y| chart.backend_coord(&(x0, y)), y0, y1));
        for ((_, pts), (_, c)) in series.iter().zip(&named) {
            let c = *c;
            if pts.len() == 1 {
                chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled()))).map_err(drawing_error)?;
            } else {
                chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2))).map_err(drawing_error)?;
            }
        }
        // The legend: its own area, right of the plot.
        let font = TextStyle::from(LABEL_FONT.into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        for (i, (name, c)) in named.iter().enumerate() {
            let y = 48 + 22 * i as i32;
            legend_area.draw(&PathElement::new(vec![(4, y), (24, y)], c.stroke_width(3))).map_err(drawing_error)?;
            legend_area.draw(&Text::new(name.as_str(), (30, y), font.clone())).map_err(drawing_error)?;
        }
        Ok(())
    });
    finish(id, caption, named, text, y_axis)
}

/// `[[y0, pixel of y0], [y1, pixel of y1]]` of a chart's y axis (`at` maps a value to backend
/// pixels).
fn y_mapping(at: impl Fn(f64) -> (i32, i32), y0: f64, y1: f64) -> [[f64; 2]; 2] {
    [[y0, f64::from(at(y0).1)], [y1, f64::from(at(y1).1)]]
}

fn finish(
    id: &str,
    caption: &str,
    series: Vec<(String, RGBColor)>,
    text: std::result::Result<String, String>,
    y_axis: Option<[[f64; 2]; 2]>,
) -> Option<Plot> {
    match text {
        Ok(svg) => Some(Plot { id: id.to_owned(), caption: caption.to_owned(), series, svg, y_axis }),
        Err(e) => {
            tracing::warn!(plot = id, error = %e, "a plot could not be drawn");
            None
        }
    }
}

/// The label of category `i` on a segmented axis.
fn category_label(names: &[String], v: &SegmentValue<i32>) -> String {
    match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
            usize::try_from(*i).ok().and_then(|i| names.get(i)).cloned().unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    }
}

/// A chart with one segment per category on x.
type CategoryChart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<SegmentedCoord<RangedCoordi32>, RangedCoordf64>>;

/// A plot with one category per name on x (each in its model's colour) over the y range `y0..y1`;
/// `draw` adds the marks, given each category's colour.
fn category_plot(
    id: &str,
    caption: &str,
    y_desc: &str,
    (names, palette): (&[String], &Palette),
    (y0, y1): (f64, f64),
    draw: impl FnOnce(&mut CategoryChart<'_, '_>, &[RGBColor]) -> DrawResult,
) -> Option<Plot> {
    if names.is_empty() {
        return None;
    }
    let colours: Vec<RGBColor> = names.iter().map(|n| palette.of(n)).collect();
    let mut y_axis = None;
    let text = svg(|root| {
        let n = i32::try_from(names.len()).map_err(drawing_error)?;
        let mut chart = ChartBuilder::on(root)
            .caption(caption, CAPTION_FONT)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(72)
            .build_cartesian_2d((0..n - 1).into_segmented(), y0..y1)
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .y_desc(y_desc)
            .label_style(LABEL_FONT)
            .axis_desc_style(LABEL_FONT)
            .x_labels(names.len())
            .x_label_formatter(&|v| category_label(names, v))
            .y_label_formatter(&|y| tick(*y, y0, y1))
            .draw()
            .map_err(drawing_error)?;
        y_axis = Some(y_mapping(|y| chart.backend_coord(&(SegmentValue::CenterOf(0), y)), y0, y1));
        draw(&mut chart, &colours)
    });
    finish(id, caption, names.iter().cloned().zip(colours.iter().copied()).collect(), text, y_axis)
}

/// A box plot's numbers: quartiles (linear interpolation between order statistics, numpy's
/// default), whiskers at the most extreme values within 1.5 interquartile ranges of the box
/// (Tukey's), and the values beyond them (outliers, drawn as points). Every number is within the
/// data's range.
#[derive(Debug, Clone, PartialEq)]
struct BoxStats {
    low: f64,
    q1: f64,
    median: f64,
    q3: f64,
    high: f64,
    outliers: Vec<f64>,
}

fn box_stats(values: &[f64]) -> Option<BoxStats> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let quantile = |p: f64| {
        let h = (v.len() - 1) as f64 * p;
        let (i, frac) = (h.floor() as usize, h - h.floor());
        if i + 1 < v.len() { v[i] + frac * (v[i + 1] - v[i]) } else { v[i] }
    };
    let (q1, median, q3) = (quantile(0.25), quantile(0.5), quantile(0.75));
    let reach = 1.5 * (q3 - q1);
    let inside = |x: &&f64| **x >= q1 - reach && **x <= q3 + reach;
    let low = v.iter().find(inside).copied().unwrap_or(q1).min(q1);
    let high = v.iter().rev().find(inside).copied().unwrap_or(q3).max(q3);
    let outliers = v.iter().copied().filter(|x| *x < low || *x > high).collect();
    Some(BoxStats { low, q1, median, q3, high, outliers })
}

/// A box plot per category (quartiles, whiskers within the data, outliers as points).
fn box_plot(id: &str, caption: &str, y_desc: &str, groups: &[(String, Vec<f64>)], palette: &Palette) -> Option<Plot> {
    let stats: Vec<(String, BoxStats)> = groups.iter().filter_map(|(n, v)| Some((n.clone(), box_stats(v)?))).collect();
    let names: Vec<String> = stats.iter().map(|(n, _)| n.clone()).collect();
    let y = span(groups.iter().flat_map(|(_, v)| v.iter().copied()));
    category_plot(id, caption, y_desc, (&names, palette), y, |chart, colours| {
        for (i, ((_, b), c)) in stats.iter().zip(colours).enumerate() {
            let i = i as i32;
            let style = c.stroke_width(2);
            // Boxes and caps span the category's segment less margins (pixels), so that their
            // width does not depend on the number of categories.
            let x = |k: i32| chart.backend_coord(&(SegmentValue::Exact(k), y.0)).0;
            let segment = x(i + 1) - x(i);
            let across = |y0: f64, y1: f64, half: i32, style: ShapeStyle| {
                let mut r = Rectangle::new([(SegmentValue::Exact(i), y0), (SegmentValue::Exact(i + 1), y1)], style);
                let m = u32::try_from((segment / 2 - half).max(0)).unwrap_or(0);
                r.set_margin(0, 0, m, m);
                r
            };
            let centre = |v: f64| (SegmentValue::CenterOf(i), v);
            chart
                .draw_series([
                    across(b.q1, b.q3, 16, style),
                    across(b.median, b.median, 16, c.stroke_width(3)),
                    across(b.low, b.low, 8, style),
                    across(b.high, b.high, 8, style),
                ])
                .map_err(drawing_error)?;
            chart
                .draw_series([
                    PathElement::new(vec![centre(b.q3), centre(b.high)], style),
                    PathElement::new(vec![centre(b.low), centre(b.q1)], style),
                ])
                .map_err(drawing_error)?;
            chart.draw_series(b.outliers.iter().map(|v| Circle::new(centre(*v), 3, style))).map_err(drawing_error)?;
        }
        Ok(())
    })
}

/// One bar per category.
fn bar_plot(id: &str, caption: &str, y_desc: &str, bars: &[(String, f64)], palette: &Palette) -> Option<Plot> {
    let names: Vec<String> = bars.iter().map(|(n, _)| n.clone()).collect();
    let top = bars.iter().map(|b| b.1).fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.1 } else { 1.0 };
    category_plot(id, caption, y_desc, (&names, palette), (0.0, top), |chart, colours| {
        for (i, ((_, value), c)) in bars.iter().zip(colours).enumerate() {
            let i = i as i32;
            let mut bar =
                Rectangle::new([(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *value)], c.filled());
            bar.set_margin(0, 0, 14, 14);
            chart.draw_series(std::iter::once(bar)).map_err(drawing_error)?;
        }
        Ok(())
    })
}

/// A point estimate with its interval per category, and a reference line (`at`).
fn interval_plot(
    id: &str,
    caption: &str,
    y_desc: &str,
    items: &[(String, [f64; 3])],
    at: f64,
    palette: &Palette,
) -> Option<Plot> {
    let names: Vec<String> = items.iter().map(|(n, _)| n.clone()).collect();
    category_plot(id, caption, y_desc, (&names, palette), (0.0, 1.0), |chart, colours| {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(SegmentValue::Exact(0), at), (SegmentValue::Last, at)],
                BLACK.mix(0.4).stroke_width(1),
            )))
            .map_err(drawing_error)?;
        for (i, ((_, [low, mean, high]), c)) in items.iter().zip(colours).enumerate() {
            let key = SegmentValue::CenterOf(i as i32);
            chart
                .draw_series([ErrorBar::new_vertical(key.clone(), *low, *mean, *high, c.stroke_width(2), 16)])
                .map_err(drawing_error)?;
            chart.draw_series([Circle::new((key, *mean), 5, c.filled())]).map_err(drawing_error)?;
        }
        Ok(())
    })
}

/// A file of the run directory read into its typed definition (`None` if it is not there).
fn read_typed<T: serde::de::DeserializeOwned>(file: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(file) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| Error::Path {
            file: file.to_path_buf(),
            message: format!("expected {}: {e}", what_file(file)),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(file, e)),
    }
}

fn what_file(file: &Path) -> &'static str {
    match file.file_name().and_then(|n| n.to_str()) {
        Some("data.json") => "the scoring stage's summary (per source: prompts, answers, unscored, rewards)",
        Some("eval.json") => "the evaluation's measures (models, comparisons, validation)",
        _ => "JSON",
    }
}

/// The lines of a JSONL file of the run directory, each read into its typed definition (none if
/// the file is not there). A torn last line (a run killed while writing it) is left out; a bad
/// line elsewhere is an error naming it.
fn read_jsonl<T: serde::de::DeserializeOwned>(file: &Path, what: &str) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(file, e)),
    };
    let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (k, (i, line)) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) if k + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => {
                return Err(Error::Data {
                    file: file.to_path_buf(),
                    line: *i as u64 + 1,
                    message: format!("expected {what}: {e}"),
                });
            }
        }
    }
    Ok(out)
}

/// Build the report of the run in `run_dir` (`report/index.html`, `report/report.md`,
/// `report/plots/*.svg`), each file written atomically.
pub fn write_report(run_dir: &Path) -> Result<ReportFiles> {
    if !run_dir.is_dir() {
        return Err(Error::Path { file: run_dir.to_path_buf(), message: "no such run directory".into() });
    }
    fuserl_core::paths::check_links_stay_inside(run_dir)?;
    let run = RunDir::new(run_dir);
    // A recipe this version cannot read (an older or damaged one) is named in its section.
    let recipe: std::result::Result<Option<Recipe>, String> = match std::fs::read_to_string(run.recipe()) {
        Ok(text) => toml::from_str(&text).map(Some).map_err(|e| {
            Error::Path { file: run.recipe(), message: format!("expected the resolved recipe: {e}") }.to_string()
        }),
        Err(_) => Ok(None),
    };
    // A file of an older format (or a damaged one) is named in its section, not the end of the
    // report: every other section is still worth having.
    let data: std::result::Result<Option<DataSummary>, String> =
        read_typed(&run.data_json()).map_err(|e| e.to_string());
    let example = "a training example (prompt_id, objective, weight, sequences, token_counts)";
    let sft_examples: Vec<StageExample> = read_jsonl(&run.stage(StageName::Sft).examples(), example)?;
    let po_examples: Vec<StageExample> = read_jsonl(&run.stage(StageName::Po).examples(), example)?;
    let metrics: Vec<MetricsLine> =
        read_jsonl(&run.metrics(), "a training step's measures (step, stage, loss, grad_norm, lr, ...)")?;
    let eval: std::result::Result<Option<EvalReport>, String> =
        read_typed(&run.eval().json()).map_err(|e| e.to_string());
    // The stage log's readable lines (a line torn by a killed process is skipped wherever it is:
    // the log only informs the report).
    let events: Vec<StageEvent> = std::fs::read_to_string(run.stages())
        .map(|text| text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default();

    let mut page = Page::default();
    let name = recipe
        .as_ref()
        .ok()
        .and_then(|r| r.as_ref()?.run.name.clone())
        .or_else(|| run_dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "run".to_owned());
    page.title = format!("fuserl run report: {name}");
    recipe_section(&mut page, recipe.as_ref().map(Option::as_ref), run_dir, &events);
    data_section(&mut page, data.as_ref().map(Option::as_ref), &sft_examples, &po_examples);
    training_section(&mut page, &metrics, run_dir, &events);
    eval_section(&mut page, eval.as_ref().map(Option::as_ref));
    card_section(&mut page, &run);

    let dir = run.report();
    let plots_dir = dir.plots();
    std::fs::create_dir_all(&plots_dir).map_err(|e| Error::io(&plots_dir, e))?;
    for plot in &page.plots {
        write_atomic(&plots_dir.join(format!("{}.svg", plot.id)), plot.svg.as_bytes())?;
    }
    let files = ReportFiles { html: dir.index(), markdown: dir.markdown() };
    write_atomic(&files.html, page.html().as_bytes())?;
    write_atomic(&files.markdown, page.markdown().as_bytes())?;
    Ok(files)
}

/// The report being built: each block is written both as HTML and as Markdown.
#[derive(Default)]
struct Page {
    title: String,
    html: String,
    md: String,
    plots: Vec<Plot>,
    palette: Palette,
}

/// A table cell: text, and the JSON pointer of its number in eval.json when it shows one.
struct Cell {
    text: String,
    pointer: Option<String>,
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Cell { text, pointer: None }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Cell { text: text.to_owned(), pointer: None }
    }
}

/// The export's model card (its `README.md`, where `export.json` says the export went), headings
/// moved two levels down to sit under the section's; rendered to HTML by comrak (CommonMark with
/// GitHub's tables; the YAML header left out; raw HTML in it is not passed through).
fn card_section(page: &mut Page, run: &RunDir) {
    let Some(to) = std::fs::read(run.export_record())
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("to").and_then(Value::as_str).map(PathBuf::from))
    else {
        return;
    };
    let Ok(card) = fuserl_core::paths::read_regular_string(&to.join("README.md")) else { return };
    // The body after the YAML header.
    let body =
        card.strip_prefix("---\n").and_then(|rest| rest.split_once("\n---\n").map(|(_, body)| body)).unwrap_or(&card);
    let mut fenced = false;
    let shifted: Vec<String> = body
        .lines()
        .map(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
            }
            if !fenced && l.starts_with('#') { format!("##{l}") } else { l.to_owned() }
        })
        .collect();
    let shifted = shifted.join("\n");
    page.heading(2, "Model card");
    page.para(&format!("The export's README.md ({}).", Shown(&to.join("README.md"))));
    let mut options = comrak::Options::default();
    options.extension.table = true;
    let _ = writeln!(page.html, "<div class=\"card\">{}</div>", comrak::markdown_to_html(&shifted, &options));
    let _ = writeln!(page.md, "{}\n", fuserl_core::text::printable_lines(&shifted));
}

impl Page {
    fn heading(&mut self, level: usize, text: &str) {
        let _ = writeln!(self.html, "<h{level}>{}</h{level}>", esc(text));
        let _ = writeln!(self.md, "\n{} {}\n", "#".repeat(level), fuserl_core::text::printable_lines(text));
    }

    fn para(&mut self, text: &str) {
        let _ = writeln!(self.html, "<p>{}</p>", esc(text));
        let _ = writeln!(self.md, "{}\n", fuserl_core::text::printable_lines(text));
    }

    /// A table; a row's cells may hold several numbers (`Vec<Cell>` per column).
    fn table(&mut self, header: &[&str], rows: &[Vec<Vec<Cell>>]) {
        self.html.push_str("<table>\n<thead><tr>");
        for h in header {
            let _ = write!(self.html, "<th>{}</th>", esc(h));
        }
        self.html.push_str("</tr></thead>\n<tbody>\n");
        let _ = writeln!(self.md, "| {} |", header.iter().map(|h| md(h)).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(self.md, "|{}", " --- |".repeat(header.len()));
        for row in rows {
            self.html.push_str("<tr>");
            let mut md_cells = Vec::new();
            for cell in row {
                self.html.push_str("<td>");
                let mut md_text = String::new();
                for part in cell {
                    match &part.pointer {
                        Some(p) => {
                            let _ =
                                write!(self.html, "<span data-json-pointer=\"{}\">{}</span>", esc(p), esc(&part.text));
                        }
                        None => self.html.push_str(&esc(&part.text)),
                    }
                    md_text.push_str(&part.text);
                }
                self.html.push_str("</td>");
                md_cells.push(md(&md_text));
            }
            self.html.push_str("</tr>\n");
            let _ = writeln!(self.md, "| {} |", md_cells.join(" | "));
        }
        self.html.push_str("</tbody>\n</table>\n");
        self.md.push('\n');
    }

    fn plot(&mut self, plot: Option<Plot>) {
        let Some(plot) = plot else { return };
        let series: Vec<Value> = plot.series.iter().map(|(n, c)| json!({"name": n, "color": hex(*c)})).collect();
        let y_axis =
            plot.y_axis.map(|a| format!(" data-y-axis=\"{}\"", esc(&json!(a).to_string()))).unwrap_or_default();
        let _ = writeln!(
            self.html,
            "<figure class=\"plot\" id=\"plot-{}\" data-series=\"{}\"{y_axis} aria-label=\"{}\">\n{}\n</figure>",
            esc(&plot.id),
            esc(&Value::Array(series).to_string()),
            esc(&plot.caption),
            plot.svg,
        );
        let _ = writeln!(self.md, "![{}](plots/{}.svg)\n", plot.caption, plot.id);
        self.plots.push(plot);
    }

    fn html(&self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n{}</body>\n</html>\n",
            esc(&self.title),
            esc(&self.title),
            self.html
        )
    }

    fn markdown(&self) -> String {
        format!("# {}\n{}", fuserl_core::text::printable(&self.title), self.md)
    }
}

const STYLE: &str = "body { font-family: sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; white-space: pre-wrap; }
details summary { cursor: pointer; margin: 0.5em 0; }
th { background: #f3f3f3; }
figure.plot { display: inline-block; margin: 0.5em; }
";

/// An optional setting, `-` when unset.
fn opt(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A setting as a recipe writes it (`cpu`, `bf16`).
fn as_written<T: serde::Serialize>(v: &T) -> String {
    toml::Value::try_from(v).map_or_else(|_| "-".to_owned(), |v| shown(Some(&v)))
}

fn shown(v: Option<&toml::Value>) -> String {
    match v {
        Some(toml::Value::String(s)) => s.clone(),
        Some(toml::Value::Array(a)) => a.iter().map(|x| shown(Some(x))).collect::<Vec<_>>().join(", "),
        Some(v) => v.to_string(),
        None => "-".to_owned(),
    }
}

/// A date of the stage log, in UTC.
fn date(at: f64) -> String {
    chrono::DateTime::from_timestamp(at as i64, 0)
        .map_or_else(|| "-".to_owned(), |d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// A duration: seconds, minutes or hours.
fn duration(seconds: f64) -> String {
    if seconds < 59.95 {
        return format!("{seconds:.1} s");
    }
    // Whole seconds (or minutes) first: no "1 min 60 s".
    let s = seconds.round() as u64;
    if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        let minutes = (s + 30) / 60;
        format!("{} h {} min", minutes / 60, minutes % 60)
    }
}

/// A number of bytes in GB (10^9).
fn gigabytes(bytes: f64) -> String {
    format!("{:.2} GB", bytes / 1e9)
}

/// One stage's rows of the stage log, summed up.
#[derive(Default)]
struct StageTimes {
    first_start: Option<f64>,
    last_end: Option<f64>,
    /// Seconds of the attempts that ended (finished or failed).
    seconds: f64,
    /// The last event and its error.
    last: Option<(StageEventKind, Option<String>)>,
}

fn stage_times(events: &[StageEvent]) -> BTreeMap<String, StageTimes> {
    let mut out: BTreeMap<String, StageTimes> = BTreeMap::new();
    let mut open: BTreeMap<String, f64> = BTreeMap::new();
    for e in events {
        let t = out.entry(e.stage.clone()).or_default();
        match e.event {
            StageEventKind::Started => {
                t.first_start.get_or_insert(e.at);
                open.insert(e.stage.clone(), e.at);
            }
            StageEventKind::Finished | StageEventKind::Failed => {
                if let Some(start) = open.remove(&e.stage) {
                    t.seconds += (e.at - start).max(0.0);
                }
                t.last_end = Some(e.at);
            }
        }
        t.last = Some((e.event, e.error.clone()));
    }
    out
}

/// The training stages' settings as a sentence: objective with its parameters, schedule,
/// batch, lengths.
fn stage_settings(stage: &fuserl_recipe::StageConfig, max_length: u32) -> String {
    let objective = stage.objective.as_ref();
    let params: Vec<String> = objective
        .map(|o| {
            o.iter()
                .filter(|(k, v)| k.as_str() != "kind" && !v.is_table())
                .map(|(k, v)| format!("{k} {}", shown(Some(v))))
                .collect()
        })
        .unwrap_or_default();
    let length = match (stage.epochs, stage.max_steps) {
        (_, Some(steps)) => format!("{steps} steps"),
        (Some(e), None) => format!("{e} epochs"),
        (None, None) => "-".to_owned(),
    };
    let warmup = match (stage.warmup_steps, stage.warmup_ratio) {
        (Some(s), _) => format!(", warmup {s} steps"),
        (None, Some(r)) if r > 0.0 => format!(", warmup {r}"),
        _ => String::new(),
    };
    format!(
        "{}{}: {length}, learning rate {} {}{warmup}, batch {} x {} accumulated, max_length {max_length}, gradient checkpointing {}",
        shown(objective.and_then(|o| o.get("kind"))),
        if params.is_empty() { String::new() } else { format!(" ({})", params.join(", ")) },
        opt(stage.learning_rate.map(toml::Value::Float)),
        as_written(&stage.schedule),
        stage.batch_size,
        stage.grad_accum,
        if stage.gradient_checkpointing { "on" } else { "off" },
    )
}

/// Every setting of a TOML table, flattened to dotted keys.
fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, String)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            toml::Value::Array(items) if items.iter().all(toml::Value::is_table) && !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(t) = item.as_table() {
                        flatten(&format!("{key}[{i}]"), t, out);
                    }
                }
            }
            other => out.push((key, other.to_string())),
        }
    }
}

fn recipe_section(
    page: &mut Page,
    recipe: std::result::Result<Option<&Recipe>, &String>,
    run_dir: &Path,
    events: &[StageEvent],
) {
    page.heading(2, "Run");
    let recipe = match recipe {
        Ok(r) => r,
        Err(problem) => {
            page.para(&format!("Not shown: {problem}."));
            None
        }
    };
    // Where and with what it ran: the last stage start's record.
    if let Some(env) = events.iter().rev().find_map(|e| e.environment.as_ref()) {
        let memory = env.memory_bytes.map_or_else(String::new, |b| format!(", {}", gigabytes(b as f64)));
        page.para(&format!(
            "fuserl {} on {} ({} cores{memory}), {}; device {}.",
            env.fuserl, env.cpu, env.cores, env.os, env.device
        ));
    }
    if let (Some(first), Some(last)) = (events.first(), events.last()) {
        page.para(&format!("From {} to {}.", date(first.at), date(last.at)));
    }
    // Each stage's state, dates and time spent (all its attempts: a resumed stage ran more than once).
    let times = stage_times(events);
    let marker = |p: &str| run_dir.join(p).exists();
    let mut rows = Vec::new();
    for (stage, label, done) in [
        ("collect", "collect", None),
        ("score", "scoring", Some("data.json")),
        ("sft", "FuseSFT", Some("sft/DONE")),
        ("po", "FusePO", Some("po/DONE")),
        ("export", "export", Some("export.json")),
        ("eval", "evaluation", Some("eval/eval.json")),
    ] {
        let t = times.get(stage);
        let finished = done.map(marker);
        let state = match t.and_then(|t| t.last.as_ref()) {
            Some((StageEventKind::Failed, error)) => {
                let again = if finished == Some(true) { " (what it shows is from an earlier run)" } else { "" };
                format!("failed{again}: {}", error.as_deref().unwrap_or("-"))
            }
            Some((StageEventKind::Started, _)) if finished == Some(true) => {
                "interrupted (or running); what it shows is from an earlier run".to_owned()
            }
            Some((StageEventKind::Started, _)) => "interrupted (or running)".to_owned(),
            Some(_) => "done".to_owned(),
            None if finished == Some(true) => "done".to_owned(),
            None if stage == "collect" => continue,
            None => "not yet".to_owned(),
        };
        rows.push(vec![
            vec![label.into()],
            vec![state.into()],
            vec![t.and_then(|t| t.first_start).map_or_else(|| "-".to_owned(), date).into()],
            vec![t.and_then(|t| t.last_end).map_or_else(|| "-".to_owned(), date).into()],
            vec![t.filter(|t| t.last_end.is_some()).map_or_else(|| "-".to_owned(), |t| duration(t.seconds)).into()],
        ]);
    }
    page.table(&["stage", "state", "first started", "last ended", "time spent"], &rows);
    match recipe {
        Some(r) => {
            // Sampling settings matter only where something sampled: a collect stage (generative
            // sources) or FusePO's own samples.
            let sampled = times.contains_key("collect") || (r.po.enabled && r.po.target_samples > 0);
            settings_tables(page, r, run_dir, sampled)
        }
        None => {
            page.para("No resolved recipe in the run directory (recipe.toml): the training stages have not started.")
        }
    }
}

/// The recipe's main settings, and every setting of the resolved recipe (folded).
fn settings_tables(page: &mut Page, r: &Recipe, run_dir: &Path, sampled: bool) {
    let mut rows: Vec<Vec<Vec<Cell>>> = Vec::new();
    let mut row = |k: &str, v: String| rows.push(vec![vec![k.into()], vec![v.into()]]);
    row("run", format!("{}, seed {}", opt(r.run.name.as_ref()), r.run.seed));
    row(
        "backend",
        format!(
            "{} ({}, master weights {})",
            as_written(&r.backend.device),
            as_written(&r.backend.dtype),
            as_written(&r.backend.master_weights)
        ),
    );
    row("target", format!("{}, max_length {}", r.target.checkpoint, r.target.max_length));
    // A component's table is its plugin's own: these keys are the ones sources name themselves by.
    for s in &r.sources {
        let what = ["name", "model", "path", "checkpoint"]
            .iter()
            .filter_map(|k| s.get(*k).map(|v| format!("{k} {}", shown(Some(v)))))
            .collect::<Vec<_>>()
            .join(", ");
        row("source", format!("{} ({what})", shown(s.get("kind"))));
    }
    let sampling = &r.data.sampling;
    if sampled {
        row(
            "sampling",
            format!(
                "{} samples a prompt, temperature {}, top_p {}, max_new_tokens {}",
                r.data.samples_per_prompt,
                opt(sampling.temperature),
                opt(sampling.top_p),
                opt(sampling.max_new_tokens)
            ),
        );
    }
    row("reward", shown(r.reward.get("kind")));
    row("weighting", {
        let params: Vec<String> = r
            .weighting
            .iter()
            .filter(|(k, _)| k.as_str() != "kind")
            .map(|(k, v)| format!("{k} {}", shown(Some(v))))
            .collect();
        format!("{} ({})", shown(r.weighting.get("kind")), params.join(", "))
    });
    for (stage, label) in [(&r.sft, "FuseSFT"), (&r.po, "FusePO")] {
        row(label, if stage.enabled { stage_settings(stage, r.target.max_length) } else { "disabled".to_owned() });
    }
    row(
        "eval",
        if r.eval.enabled {
            format!(
                "prompts {}, baselines {}, temperature {}, max_new_tokens {}, {} sample(s)",
                r.eval.prompts.as_deref().unwrap_or("-"),
                r.eval.baselines.join(", "),
                r.eval.temperature,
                r.eval.max_new_tokens,
                r.eval.samples
            )
        } else {
            "not enabled in the recipe (`fuserl eval` runs it)".to_owned()
        },
    );
    page.table(&["", "setting"], &rows);
    // Every setting, as the run resolved it (defaults included).
    let Ok(text) = std::fs::read_to_string(RunDir::new(run_dir).recipe()) else { return };
    let Ok(table) = text.parse::<toml::Table>() else { return };
    let mut all = Vec::new();
    flatten("", &table, &mut all);
    let rows: Vec<Vec<Vec<Cell>>> = all.into_iter().map(|(k, v)| vec![vec![k.into()], vec![v.into()]]).collect();
    let _ = writeln!(
        page.html,
        "<details id=\"all-settings\"><summary>All settings (recipe.toml, defaults included)</summary>"
    );
    page.md.push_str("All settings (recipe.toml, defaults included):\n\n");
    page.table(&["setting", "value"], &rows);
    page.html.push_str("</details>\n");
}

/// Per source: the sum of a quantity over the examples' sequences (`pick` chooses which).
fn per_source(
    examples: &[StageExample],
    pick: impl Fn(&[ExampleSequence]) -> Vec<(&ExampleSequence, f64)>,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for e in examples {
        for (seq, amount) in pick(&e.example.sequences) {
            *out.entry(seq.completion.source.clone()).or_insert(0.0) += amount;
        }
    }
    out
}

fn data_section(
    page: &mut Page,
    data: std::result::Result<Option<&DataSummary>, &String>,
    sft: &[StageExample],
    po: &[StageExample],
) {
    page.heading(2, "Data");
    let data = match data {
        Ok(d) => d,
        Err(problem) => {
            page.para(&format!("Not shown: {problem} (`fuserl score` writes it anew)."));
            return;
        }
    };
    let Some(data) = data else {
        page.para("Not scored yet (data.json is written by the scoring stage).");
        return;
    };
    let sources = &data.sources;
    // FuseSFT: the examples' weights per source; FusePO: chosen and rejected answers per source
    // (first and last sequence of each example).
    let mut sft_weight = BTreeMap::new();
    for e in sft {
        if let Some(first) = e.example.sequences.first() {
            *sft_weight.entry(first.completion.source.clone()).or_insert(0.0) += e.example.weight;
        }
    }
    let total_weight: f64 = sft_weight.values().sum();
    let chosen = per_source(po, |seqs| seqs.first().map(|s| (s, 1.0)).into_iter().collect());
    let rejected =
        per_source(
            po,
            |seqs| if seqs.len() > 1 { seqs.last().map(|s| (s, 1.0)).into_iter().collect() } else { Vec::new() },
        );
    let mut rows = Vec::new();
    let mut groups = Vec::new();
    for s in sources {
        let name = s.name.clone();
        let rewards = s.rewards.clone();
        let mean = rewards.iter().sum::<f64>() / rewards.len().max(1) as f64;
        let weight = sft_weight.get(&name).copied().unwrap_or(0.0);
        rows.push(vec![
            vec![name.clone().into()],
            vec![s.prompts.to_string().into()],
            vec![s.answers.to_string().into()],
            vec![s.unscored.to_string().into()],
            vec![if rewards.is_empty() { "-".into() } else { num(mean).into() }],
            vec![
                if total_weight > 0.0 {
                    format!("{} ({:.0}%)", num(weight), 100.0 * weight / total_weight)
                } else {
                    "-".to_owned()
                }
                .into(),
            ],
            vec![
                format!(
                    "{:.0} / {:.0}",
                    chosen.get(&name).copied().unwrap_or(0.0),
                    rejected.get(&name).copied().unwrap_or(0.0)
                )
                .into(),
            ],
            vec![
                if s.sampled_prompts == 0 {
                    "-".to_owned()
                } else {
                    format!(
                        "{} of {} ({:.0}%)",
                        s.identical_samples,
                        s.sampled_prompts,
                        100.0 * s.identical_samples as f64 / s.sampled_prompts as f64
                    )
                }
                .into(),
            ],
        ]);
        groups.push((name, rewards));
    }
    page.para(&format!(
        "{} prompts; {} answers scored by {}.",
        data.prompts,
        sources.iter().map(|s| s.answers).sum::<usize>(),
        data.reward
    ));
    page.table(
        &[
            "source",
            "prompts",
            "answers",
            "unscored",
            "mean reward",
            "FuseSFT weight",
            "FusePO chosen / rejected",
            "prompts with identical samples",
        ],
        &rows,
    );
    if sources.iter().any(|s| s.sampled_prompts > 0 && 2 * s.identical_samples > s.sampled_prompts) {
        page.para(
            "A source whose samples of a prompt are mostly the same text is not sampling: its server likely \
             decodes greedily whatever the recipe's temperature and seeds (`transformers serve` does unless the \
             model's generation_config.json sets do_sample).",
        );
    }
    page.plot(box_plot("data-rewards", "Reward per source (training data)", "reward", &groups, &page.palette));
    let bars = |m: &BTreeMap<String, f64>| {
        groups.iter().map(|(n, _)| (n.clone(), m.get(n).copied().unwrap_or(0.0))).collect::<Vec<_>>()
    };
    if !sft.is_empty() {
        page.plot(bar_plot(
            "data-sft-weight",
            "FuseSFT weight per source",
            "summed example weight",
            &bars(&sft_weight),
            &page.palette,
        ));
    }
    if !po.is_empty() {
        page.plot(bar_plot(
            "data-po-chosen",
            "FusePO chosen answers per source",
            "examples",
            &bars(&chosen),
            &page.palette,
        ));
    }
}

fn training_section(page: &mut Page, metrics: &[MetricsLine], run_dir: &Path, events: &[StageEvent]) {
    page.heading(2, "Training");
    if metrics.is_empty() {
        page.para("No training step logged yet (metrics.jsonl).");
        return;
    }
    // Per stage: steps, final loss, throughput, time and memory.
    let times = stage_times(events);
    let mut rows = Vec::new();
    for (name, label) in [(StageName::Sft, "FuseSFT"), (StageName::Po, "FusePO")] {
        let lines: Vec<&MetricsLine> = metrics.iter().filter(|m| m.stage == name).collect();
        let Some(last) = lines.last() else { continue };
        let memory: Option<Value> = std::fs::read(run_dir.join(name.as_str()).join("memory.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let bytes = |key: &str| memory.as_ref().and_then(|m| m[key].as_f64()).map_or_else(|| "-".to_owned(), gigabytes);
        rows.push(vec![
            vec![label.into()],
            vec![last.step.to_string().into()],
            vec![num(last.loss).into()],
            vec![
                if last.tokens_per_s.is_finite() { format!("{:.0}", last.tokens_per_s) } else { "-".to_owned() }.into(),
            ],
            vec![
                times
                    .get(name.as_str())
                    .filter(|t| t.last_end.is_some())
                    .map_or_else(|| "-".to_owned(), |t| duration(t.seconds))
                    .into(),
            ],
            vec![bytes("measured_peak_bytes").into()],
            vec![bytes("planned_peak_bytes").into()],
        ]);
    }
    page.table(
        &["stage", "last step", "final loss", "tokens/s (last attempt)", "time spent", "peak memory", "planned peak"],
        &rows,
    );
    for (name, label) in [(StageName::Sft, "FuseSFT"), (StageName::Po, "FusePO")] {
        let stage = name.as_str();
        let lines: Vec<&MetricsLine> = metrics.iter().filter(|m| m.stage == name).collect();
        if lines.is_empty() {
            continue;
        }
        page.heading(3, label);
        let curve = |key: &str| -> Vec<(f64, f64)> {
            lines.iter().filter_map(|m| Some((m.step as f64, m.get(key)?))).collect()
        };
        let last = lines.last().map_or(0, |m| m.step);
        let final_loss = lines.last().map_or(f64::NAN, |m| m.loss);
        page.para(&format!("{} logged steps, last step {last}, final loss {}.", lines.len(), num(final_loss)));
        let mut plots = vec![
            (format!("{stage}-loss"), format!("{label}: loss"), "loss", vec!["loss"]),
            (format!("{stage}-grad-norm"), format!("{label}: gradient norm"), "gradient norm", vec!["grad_norm"]),
            (format!("{stage}-lr"), format!("{label}: learning rate"), "learning rate", vec!["lr"]),
        ];
        let has = |k: &str| lines.iter().any(|m| m.objective.contains_key(k));
        if has("rewards/chosen") {
            plots.push((
                format!("{stage}-rewards"),
                format!("{label}: implicit rewards"),
                "reward",
                vec!["rewards/chosen", "rewards/rejected"],
            ));
        }
        for (key, what) in [("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy")] {
            if has(key) {
                plots.push((format!("{stage}-{}", key.replace('/', "-")), format!("{label}: {what}"), what, vec![key]));
            }
        }
        if has("logps/chosen") {
            plots.push((
                format!("{stage}-logps"),
                format!("{label}: policy log-probs"),
                "log-prob (summed over tokens)",
                vec!["logps/chosen", "logps/rejected"],
            ));
        }
        for (id, caption, y, keys) in plots {
            let series: Vec<(String, Vec<(f64, f64)>)> = keys.iter().map(|k| ((*k).to_owned(), curve(k))).collect();
            page.plot(line_plot(&id, &caption, y, &series));
        }
    }
}

/// A number of eval.json with its JSON pointer (NaN, written `null`, shows as n/a).
fn cell_at(value: f64, pointer: String) -> Cell {
    let text = if value.is_nan() { "n/a".to_owned() } else { num(value) };
    Cell { text, pointer: Some(pointer) }
}

/// `mean [low, high]` of an estimate of eval.json, each number with its pointer (`at`).
fn estimate_cells(e: Option<&Estimate>, at: &str) -> Vec<Cell> {
    let Some(e) = e else { return vec!["-".into()] };
    vec![
        cell_at(e.mean, format!("{at}/mean")),
        " [".into(),
        cell_at(e.low, format!("{at}/low")),
        ", ".into(),
        cell_at(e.high, format!("{at}/high")),
        "]".into(),
    ]
}

fn eval_section(page: &mut Page, eval: std::result::Result<Option<&EvalReport>, &String>) {
    page.heading(2, "Evaluation");
    let eval = match eval {
        Ok(e) => e,
        Err(problem) => {
            page.para(&format!("Not shown: {problem} (`fuserl eval` writes it anew)."));
            return;
        }
    };
    let Some(eval) = eval else {
        page.para("Not evaluated yet (`fuserl eval`, or [eval] enabled in the recipe).");
        return;
    };
    let models = &eval.models;
    page.para(&format!(
        "{} held-out prompts ({}), {} answer(s) per prompt and model, scored by {}. Intervals: {} ({:.0}% level).",
        eval.n_prompts,
        eval.prompts,
        eval.samples,
        eval.reward,
        eval.interval.method,
        eval.interval.level * 100.0,
    ));
    // pass@k columns: the ones every model has (the first model's).
    let ks: Vec<u64> = models.first().map(|m| m.passes().iter().map(|p| p.0).collect()).unwrap_or_default();
    let mut header = vec!["model".to_owned(), "answers".to_owned(), "mean reward [95% CI]".to_owned()];
    header.extend(ks.iter().map(|k| format!("pass@{k} [95% CI]")));
    header.push("mean length in tokens [95% CI]".to_owned());
    let mut rows = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let mut row = vec![
            vec![m.name.as_str().into()],
            vec![m.answers.to_string().into()],
            estimate_cells(Some(&m.mean_reward), &format!("/models/{i}/mean_reward")),
        ];
        for k in &ks {
            let key = ModelEval::pass_key(*k);
            row.push(estimate_cells(m.pass_at.get(&key), &format!("/models/{i}/{key}")));
        }
        row.push(estimate_cells(Some(&m.mean_length_tokens), &format!("/models/{i}/mean_length_tokens")));
        rows.push(row);
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    page.table(&header, &rows);

    if !eval.comparisons.is_empty() {
        let mut rows = Vec::new();
        let mut items = Vec::new();
        for (i, c) in eval.comparisons.iter().enumerate() {
            let baseline = c.baseline.clone();
            let lc = estimate_cells(
                c.length_controlled_win_rate.as_ref(),
                &format!("/comparisons/{i}/length_controlled_win_rate"),
            );
            rows.push(vec![
                vec![format!("{} vs {baseline}", c.model).into()],
                vec![c.by.as_str().into()],
                estimate_cells(c.win_rate.as_ref(), &format!("/comparisons/{i}/win_rate")),
                lc,
                vec![c.win_rate.map_or(0, |w| w.n).to_string().into()],
            ]);
            if let Some(w) = c.win_rate.filter(|w| !(w.mean.is_nan() || w.low.is_nan() || w.high.is_nan())) {
                let by_reward = c.by == "reward";
                items
                    .push((if by_reward { baseline } else { format!("{baseline} by judge") }, [w.low, w.mean, w.high]));
            }
        }
        page.table(
            &["comparison", "judged by", "win rate [95% CI]", "length-controlled win rate [95% CI]", "prompts"],
            &rows,
        );
        page.plot(interval_plot(
            "eval-win-rates",
            "Win rate of the fused model against each baseline",
            "win rate",
            &items,
            0.5,
            &page.palette,
        ));
    }
    if let Some(v) = &eval.validation {
        page.para(&format!(
            "Validation ({} prompts, {}, scored by the training reward {}): the fused model alone, for choosing settings without the test prompts.",
            v.n_prompts, v.prompts, v.reward
        ));
        let mut row = vec![vec!["fused".into()], estimate_cells(Some(&v.mean_reward), "/validation/mean_reward")];
        let mut header = vec!["model", "mean reward [95% CI]"];
        if let Some(p) = &v.pass_at_1 {
            row.push(estimate_cells(Some(p), "/validation/pass_at_1"));
            header.push("pass@1 [95% CI]");
        }
        page.table(&header, &[row]);
    }
    let groups: Vec<(String, Vec<f64>)> = models.iter().map(|m| (m.name.clone(), m.rewards.clone())).collect();
    page.plot(box_plot("eval-rewards", "Reward per model (held-out prompts)", "reward", &groups, &page.palette));
    if !eval.examples.is_empty() {
        page.heading(3, "Sample answers");
        page.para(&format!(
            "The first {} held-out prompts, each model's first answer side by side (cut at {} characters).",
            eval.examples.len(),
            fuserl_io::artifacts::EvalExample::MAX_CHARS
        ));
        for (i, ex) in eval.examples.iter().enumerate() {
            let _ = writeln!(page.html, "<div class=\"example\" id=\"example-{i}\">");
            page.para(&format!("Prompt `{}`: {}", ex.prompt_id, ex.prompt));
            let rows: Vec<Vec<Vec<Cell>>> = ex
                .answers
                .iter()
                .map(|a| {
                    vec![
                        vec![a.model.as_str().into()],
                        vec![a.reward.map_or_else(|| "not scored".to_owned(), num).into()],
                        vec![a.text.as_str().into()],
                    ]
                })
                .collect();
            page.table(&["model", "reward", "answer"], &rows);
            page.html.push_str("</div>\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plot_kind_draws_its_series_in_their_colours() {
        let line =
            line_plot("l", "loss", "loss", &[("loss".into(), vec![(1.0, 2.0), (2.0, 1.5), (3.0, 1.2)])]).expect("line");
        let palette = Palette::default();
        let boxes = box_plot(
            "b",
            "rewards",
            "reward",
            &[("a".into(), vec![0.1, 0.5, 0.9]), ("b".into(), vec![0.2, 0.3])],
            &palette,
        )
        .expect("box");
        let bars = bar_plot("w", "weights", "weight", &[("b".into(), 2.0), ("a".into(), 1.0)], &palette).expect("bars");
        let intervals =
            interval_plot("i", "win", "win rate", &[("t".into(), [0.4, 0.6, 0.8])], 0.5, &palette).expect("intervals");
        // A name has one colour in every plot, whatever its place in each.
        let colour_in = |p: &Plot, name: &str| p.series.iter().find(|(n, _)| n == name).map(|(_, c)| *c);
        assert_eq!(colour_in(&boxes, "a"), colour_in(&bars, "a"));
        assert_eq!(colour_in(&boxes, "b"), colour_in(&bars, "b"));
        assert_ne!(colour_in(&boxes, "a"), colour_in(&boxes, "b"));
        for plot in [line, boxes, bars, intervals] {
            assert!(plot.svg.starts_with("<svg"), "{}", plot.svg);
            for (name, c) in &plot.series {
                assert!(
                    plot.svg.contains(&format!(">{name}<")) || plot.svg.contains(name.as_str()),
                    "{name} in {}",
                    plot.svg
                );
                assert!(plot.svg.contains(&hex(*c)), "colour of {name} in {}", plot.svg);
            }
        }
        assert!(line_plot("e", "empty", "y", &[("x".into(), Vec::new())]).is_none());
    }

    #[test]
    fn box_plots_keep_whiskers_within_the_data_and_draw_outliers() {
        // numpy.percentile([1, 2, 3, 4, 100], [25, 50, 75]) = [2, 3, 4]; fences at 2 - 3 and
        // 4 + 3: the whiskers end at the last values inside them (1 and 4), 100 is an outlier.
        let b = box_stats(&[4.0, 100.0, 1.0, 3.0, 2.0]).expect("stats");
        assert_eq!(b, BoxStats { low: 1.0, q1: 2.0, median: 3.0, q3: 4.0, high: 4.0, outliers: vec![100.0] });
        // numpy.percentile([0.9, 0.95, 1.0, 1.0], [25, 50, 75]) = [0.9375, 0.975, 1.0]: the upper
        // whisker is the data's maximum (1.0), not the fence (1.09375): rewards never drawn past 1.
        let b = box_stats(&[1.0, 0.95, 0.9, 1.0]).expect("stats");
        assert!((b.q1 - 0.9375).abs() < 1e-12 && (b.median - 0.975).abs() < 1e-12 && b.q3 == 1.0, "{b:?}");
        assert_eq!((b.low, b.high, b.outliers.len()), (0.9, 1.0, 0));
        let one = box_stats(&[0.5]).expect("stats");
        assert_eq!((one.low, one.q1, one.median, one.q3, one.high), (0.5, 0.5, 0.5, 0.5, 0.5));
        assert!(box_stats(&[f64::NAN]).is_none());
    }

    #[test]
    fn durations_round_to_whole_units() {
        assert_eq!(duration(2.31), "2.3 s");
        assert_eq!(duration(119.6), "2 min 0 s");
        assert_eq!(duration(3599.6), "1 h 0 min");
        assert_eq!(duration(7199.0), "2 h 0 min");
    }

    #[test]
    fn tick_labels_tell_ticks_apart_and_never_show_minus_zero() {
        // A learning-rate axis: 0 to 1e-4 in steps of 2e-5 (it showed "0.0001" five times).
        let lr: Vec<String> = (0..=5).map(|i| tick(f64::from(i) * 2e-5, 0.0, 1e-4)).collect();
        assert_eq!(lr, ["0", "2.0e-5", "4.0e-5", "6.0e-5", "8.0e-5", "1.0e-4"]);
        let fine: Vec<String> = (0..=4).map(|i| tick(1e-4 + f64::from(i) * 5e-6, 1e-4, 1.2e-4)).collect();
        let mut distinct = fine.clone();
        distinct.dedup();
        assert_eq!(distinct, fine, "{fine:?}");
        // A margin axis around zero: "0", not "-0.0".
        assert_eq!(tick(-1e-17, -0.5, 0.5), "0");
        assert_eq!(tick(-0.1, -0.5, 0.5), "-0.1");
        assert_eq!(tick(0.35, 0.3, 0.9), "0.35");
        assert_eq!(tick(150.0, 0.0, 150.0), "150");
    }

    #[test]
    fn a_torn_last_line_is_left_out_and_a_bad_line_elsewhere_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("metrics.jsonl");
        std::fs::write(&f, "{\"step\":1}\n{\"step\":2}\n{\"st").expect("write");
        assert_eq!(read_jsonl::<Value>(&f, "a JSON object").expect("read").len(), 2);
        std::fs::write(&f, "{\"step\":1}\nnot json\n{\"step\":3}\n").expect("write");
        let err = read_jsonl::<Value>(&f, "a JSON object").expect_err("bad line").to_string();
        assert!(err.contains("metrics.jsonl:2:"), "{err}");
    }

    #[test]
    fn text_is_escaped_in_html() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(md("a|b\nc"), "a\\|b c");
    }
}
