//! The figures of `compare`, drawn with `plotters` as SVG: `loss.svg` (training and validation
//! loss per method) and `speed.svg` (training tokens/s per method); and of `plot-sweep`: one
//! value per method against the context length (`sweep-speed.svg`, `sweep-memory.svg`).
//!
//! SVG leaves the text to the viewer, so nothing here needs font files or system fonts. The
//! baseline (dense attention) is drawn last, thicker and in black, so it always shows on top of
//! the other curves.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::AppResult;

/// One method's curves.
#[derive(Debug, Clone)]
pub struct LossCurves {
    /// Legend text (`dense`, `moba+dense1`, ...).
    pub label: String,
    /// Training loss at steps 1, 2, ... (non-finite values are skipped).
    pub train: Vec<f32>,
    /// Validation loss as `(step, loss)`.
    pub val: Vec<(usize, f32)>,
}

/// One method's throughput.
#[derive(Debug, Clone)]
pub struct Speed {
    /// Legend text.
    pub label: String,
    /// Steady-state tokens/s (total time of the timed steps).
    pub tokens_per_sec: f64,
    /// Tokens/s of the median step; 0 when unknown.
    pub median_tokens_per_sec: f64,
}

/// The label drawn as the baseline.
pub const BASELINE: &str = "dense";

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];
const BASELINE_COLOR: RGBColor = RGBColor(17, 17, 17);
pub(crate) const FONT: &str = "sans-serif";

/// Colour and line width of each label: the baseline black and thick, the others from the
/// palette in order.
fn styles<'a>(labels: impl Iterator<Item = &'a str>) -> Vec<(RGBColor, u32)> {
    let mut next = 0;
    labels
        .map(|label| {
            if label == BASELINE {
                (BASELINE_COLOR, 4)
            } else {
                next += 1;
                (PALETTE[(next - 1) % PALETTE.len()], 2)
            }
        })
        .collect()
}

/// Centred moving average over `2 * half + 1` points (fewer at the ends), skipping non-finite
/// values: smooths noisy per-step losses without the lag of an exponential average.
pub fn smooth(values: &[f32], half: usize) -> Vec<f32> {
    (0..values.len())
        .map(|i| {
            let window = &values[i.saturating_sub(half)..(i + half + 1).min(values.len())];
            let finite: Vec<f32> = window.iter().copied().filter(|v| v.is_finite()).collect();
            if finite.is_empty() { f32::NAN } else { finite.iter().sum::<f32>() / finite.len() as f32 }
        })
        .collect()
}

/// Runs of consecutive finite points of `values` (x = 1, 2, ...), as separate polylines.
fn finite_runs(values: &[f32]) -> Vec<Vec<(f64, f64)>> {
    let mut runs = vec![Vec::new()];
    for (i, v) in values.iter().enumerate() {
        if v.is_finite() {
            runs.last_mut().expect("never empty").push((i as f64 + 1.0, *v as f64));
        } else if !runs.last().expect("never empty").is_empty() {
            runs.push(Vec::new());
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

pub(crate) fn draw_err<E: std::fmt::Debug>(e: E) -> String {
    format!("drawing the figure: {e:?}")
}

/// Renders `draw` on an SVG canvas of `size` and writes it to `path`.
pub(crate) fn write_svg(path: &Path, size: (u32, u32), draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<(), String>) -> AppResult<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw(&root)?;
        root.present().map_err(draw_err)?;
    }
    std::fs::write(path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}

/// Loss curves: per method, the training loss per step (faint), its moving average (solid) and
/// the validation loss (dots joined by dashes), on one pair of axes; the baseline last.
pub fn loss_chart(path: &Path, title: &str, curves: &[LossCurves]) -> AppResult<()> {
    let steps = curves.iter().map(|c| c.train.len()).chain(curves.iter().flat_map(|c| c.val.iter().map(|p| p.0))).max().unwrap_or(0).max(2);
    let values = curves.iter().flat_map(|c| c.train.iter().copied().chain(c.val.iter().map(|p| p.1)));
    let (mut lo, mut hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v as f64), b.max(v as f64)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (lo, hi) = ((lo - pad).max(0.0), hi + pad);
    let styles = styles(curves.iter().map(|c| c.label.as_str()));
    // The baseline after every other method, so that nothing covers it.
    let mut order: Vec<usize> = (0..curves.len()).collect();
    order.sort_by_key(|&i| curves[i].label == BASELINE);

    write_svg(path, (960, 600), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(1f64..steps as f64, lo..hi)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            // Whole steps only: no more labels than steps.
            .x_labels(steps.min(10))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .max_light_lines(4)
            .draw()
            .map_err(draw_err)?;
        // Legend entries first, in the methods' order (the series themselves are unlabelled).
        for (c, &(color, width)) in curves.iter().zip(&styles) {
            chart.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>()).map_err(draw_err)?.label(c.label.clone()).legend(
                move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (22, 0)], color.stroke_width(width))
                        + Circle::new((11, 0), 4, color.filled())
                },
            );
        }
        let grey = RGBColor(110, 110, 110);
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
            .map_err(draw_err)?
            .label("train loss (smoothed; faint: each step)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], grey.stroke_width(2)));
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
            .map_err(draw_err)?
            .label("validation loss")
            .legend(move |(x, y)| EmptyElement::at((x, y)) + Circle::new((11, 0), 4, grey.filled()));

        for &i in &order {
            let (c, (color, width)) = (&curves[i], styles[i]);
            for run in finite_runs(&c.train) {
                chart.draw_series(LineSeries::new(run, color.mix(0.22).stroke_width(1))).map_err(draw_err)?;
            }
            for run in finite_runs(&smooth(&c.train, (c.train.len() / 40).max(1))) {
                chart.draw_series(LineSeries::new(run, color.stroke_width(width))).map_err(draw_err)?;
            }
            let val: Vec<(f64, f64)> = c.val.iter().filter(|p| p.1.is_finite()).map(|&(s, l)| (s as f64, l as f64)).collect();
            if val.len() > 1 {
                chart.draw_series(DashedLineSeries::new(val.clone(), 6, 4, color.stroke_width(width.div_ceil(2)))).map_err(draw_err)?;
            }
            let radius = if c.label == BASELINE { 6 } else { 4 };
            chart
                .draw_series(
                    val.iter().map(|&p| Circle::new(p, radius, ShapeStyle { color: color.to_rgba(), filled: true, stroke_width: 1 })),
                )
                .map_err(draw_err)?;
            chart.draw_series(val.iter().map(|&p| Circle::new(p, radius, WHITE.stroke_width(1)))).map_err(draw_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(180, 180, 180))
            .draw()
            .map_err(draw_err)
    })
}

/// Tokens/s per method as horizontal bars (steady state) with a dot at the median step's
/// rate, each labelled with its rate relative to the baseline; methods top to bottom.
pub fn speed_chart(path: &Path, title: &str, speeds: &[Speed]) -> AppResult<()> {
    let n = speeds.len().max(1);
    let max = speeds.iter().flat_map(|s| [s.tokens_per_sec, s.median_tokens_per_sec]).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let max = if max > 0.0 { max } else { 1.0 };
    let baseline = speeds.iter().find(|s| s.label == BASELINE).map(|s| s.tokens_per_sec).filter(|v| *v > 0.0);
    let styles = styles(speeds.iter().map(|s| s.label.as_str()));
    let height = 110 + 46 * n as u32;
    write_svg(path, (760, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(8)
            .build_cartesian_2d(0f64..max * 1.55, 0f64..n as f64)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("training tokens/s (bar: steady state; dot: median step)")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(215, 215, 215))
            .max_light_lines(4)
            .x_label_formatter(&|x| if *x >= 1e3 { format!("{:.0}k", x / 1e3) } else { format!("{x:.0}") })
            .draw()
            .map_err(draw_err)?;
        for (i, (s, &(color, _))) in speeds.iter().zip(&styles).enumerate() {
            let y = (n - 1 - i) as f64;
            let (y0, y1) = (y + 0.2, y + 0.8);
            let fill = if s.label == BASELINE { color.filled() } else { color.mix(0.85).filled() };
            chart.draw_series(std::iter::once(Rectangle::new([(0.0, y0), (s.tokens_per_sec.max(0.0), y1)], fill))).map_err(draw_err)?;
            if s.median_tokens_per_sec > 0.0 {
                let dot = (s.median_tokens_per_sec, y + 0.5);
                chart.draw_series([Circle::new(dot, 5, WHITE.filled()), Circle::new(dot, 5, BLACK.stroke_width(2))]).map_err(draw_err)?;
            }
            let rate = if s.tokens_per_sec >= 1e4 { format!("{:.1}k", s.tokens_per_sec / 1e3) } else { format!("{:.0}", s.tokens_per_sec) };
            let relative = match baseline {
                Some(b) if s.label != BASELINE => format!(", {:.2}x {BASELINE}", s.tokens_per_sec / b),
                _ => String::new(),
            };
            let x = s.tokens_per_sec.max(s.median_tokens_per_sec).max(0.0) + max * 0.03;
            let text = Text::new(
                format!("{}: {rate} tok/s{relative}", s.label),
                (x, y + 0.5),
                (FONT, 15).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
            );
            chart.draw_series(std::iter::once(text)).map_err(draw_err)?;
        }
        Ok(())
    })
}

/// One method's values against the context length (a sweep).
#[derive(Debug, Clone)]
pub struct SweepSeries {
    /// Legend text.
    pub label: String,
    /// `(context, value)`, any order; non-finite or non-positive values are skipped.
    pub points: Vec<(usize, f64)>,
}

/// The tokens/s and peak-memory sweeps of one session from result rows (JSON lines with at
/// least `session`, `method`, `seq`, `median_tokens_per_s` or `steady_tokens_per_s`, and
/// `peak_mib`, as in `docs/results/*.jsonl`): `(speed, memory)`, methods in first-seen order.
/// Rows of other sessions are ignored; an error names the line that is not such a row, or
/// the session when it has no rows.
pub fn sweep_from_rows(text: &str, session: &str) -> AppResult<(Vec<SweepSeries>, Vec<SweepSeries>)> {
    let mut speed: Vec<SweepSeries> = Vec::new();
    let mut memory: Vec<SweepSeries> = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("line {}: not a JSON object: {e}", n + 1))?;
        if row.get("session").and_then(|v| v.as_str()) != Some(session) {
            continue;
        }
        let field = |k: &str| row.get(k).and_then(|v| v.as_f64());
        let (Some(method), Some(seq)) = (row.get("method").and_then(|v| v.as_str()), field("seq")) else {
            return Err(format!("line {}: a row of session `{session}` needs `method` and `seq`", n + 1).into());
        };
        let rate = field("median_tokens_per_s").or_else(|| field("steady_tokens_per_s"));
        for (out, value) in [(&mut speed, rate), (&mut memory, field("peak_mib"))] {
            let Some(value) = value else { continue };
            match out.iter_mut().find(|s| s.label == method) {
                Some(s) => s.points.push((seq as usize, value)),
                None => out.push(SweepSeries { label: method.to_string(), points: vec![(seq as usize, value)] }),
            }
        }
    }
    if speed.is_empty() && memory.is_empty() {
        return Err(format!("no rows of session `{session}` (--session)").into());
    }
    Ok((speed, memory))
}

/// Each method's value against the context length, both axes logarithmic (contexts are
/// powers of two apart), markers on the measured points; the baseline drawn last.
pub fn sweep_chart(path: &Path, title: &str, y_desc: &str, series: &[SweepSeries]) -> AppResult<()> {
    let valid = |v: f64| v.is_finite() && v > 0.0;
    let xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().filter(|p| valid(p.1)).map(|p| p.0 as f64)).collect();
    let ys: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.1).filter(|v| valid(*v))).collect();
    let range = |v: &[f64], pad: f64| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0f64, f64::max);
        if lo.is_finite() && hi > 0.0 { (lo / pad, hi * pad) } else { (1.0, 10.0) }
    };
    let (x0, x1) = range(&xs, 1.15);
    let (y0, y1) = range(&ys, 1.3);
    // Ticks at the measured contexts.
    let mut contexts = xs.clone();
    contexts.sort_by(f64::total_cmp);
    contexts.dedup();
    let styles = styles(series.iter().map(|s| s.label.as_str()));
    // The baseline last, so it shows on top.
    let mut order: Vec<usize> = (0..series.len()).collect();
    order.sort_by_key(|&i| series[i].label == BASELINE);
    write_svg(path, (760, 480), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(14)
            .x_label_area_size(42)
            .y_label_area_size(70)
            .build_cartesian_2d((x0..x1).log_scale().with_key_points(contexts.clone()), (y0..y1).log_scale())
            .map_err(draw_err)?;
        let si = |v: &f64| match *v {
            v if v >= 1e6 => format!("{:.1}M", v / 1e6),
            v if v >= 1e3 => format!("{:.0}k", v / 1e3),
            v => format!("{v:.0}"),
        };
        chart
            .configure_mesh()
            .x_desc("context (tokens)")
            .y_desc(y_desc)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(215, 215, 215))
            .x_label_formatter(&|x| if *x >= 1024.0 { format!("{:.0}k", x / 1024.0) } else { format!("{x:.0}") })
            .y_label_formatter(&si)
            .draw()
            .map_err(draw_err)?;
        for &i in &order {
            let s = &series[i];
            let (color, width) = styles[i];
            let mut pts: Vec<(f64, f64)> = s.points.iter().filter(|p| valid(p.1)).map(|p| (p.0 as f64, p.1)).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(width)))
                .map_err(draw_err)?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(width)));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3 + width / 2, color.filled()))).map_err(draw_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(draw_err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("toy-lm-plot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn curve(label: &str, scale: f32) -> LossCurves {
        let train: Vec<f32> = (0..60).map(|i| scale * 5.0 / (1.0 + i as f32 * 0.1)).collect();
        LossCurves { label: label.into(), val: vec![(30, train[29] + 0.1), (60, train[59] + 0.1)], train }
    }

    #[test]
    fn loss_chart_is_an_svg_with_every_label_and_the_baseline_last() {
        let dir = tmp("loss");
        let path = dir.join("loss.svg");
        let mut gappy = curve("moba", 1.1);
        gappy.train[10] = f32::NAN;
        loss_chart(&path, "training loss", &[curve("dense", 1.0), curve("nsa", 0.9), gappy]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{}", &svg[..100.min(svg.len())]);
        for needle in ["training loss", "dense", "nsa", "moba", "validation loss", "step"] {
            assert!(svg.contains(needle), "`{needle}` missing");
        }
        // The data lines (legend samples and ticks have two points) in drawing order: the
        // baseline's (#111111) come after every other method's.
        let strokes: Vec<&str> = svg
            .split("<polyline")
            .skip(1)
            .filter(|p| p.split("points=\"").nth(1).is_some_and(|pts| pts.split('"').next().unwrap_or("").split_whitespace().count() > 5))
            .filter_map(|p| p.split("stroke=\"").nth(1).and_then(|s| s.get(..7)))
            .collect();
        let first_black = strokes.iter().position(|s| *s == "#111111").expect("baseline drawn");
        assert!(first_black > 0 && strokes[first_black..].iter().all(|s| *s == "#111111"), "{strokes:?}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn speed_chart_labels_each_method_relative_to_dense() {
        let dir = tmp("speed");
        let path = dir.join("speed.svg");
        let speeds = [
            Speed { label: "dense".into(), tokens_per_sec: 20000.0, median_tokens_per_sec: 21000.0 },
            Speed { label: "moba".into(), tokens_per_sec: 30000.0, median_tokens_per_sec: 0.0 },
        ];
        speed_chart(&path, "speed", &speeds).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("dense: 20.0k tok/s") && svg.contains("moba: 30.0k tok/s, 1.50x dense"), "{svg}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn sweep_chart_draws_every_method_and_the_baseline_last() {
        let dir = tmp("sweep");
        let path = dir.join("sweep.svg");
        let line = |label: &str, f: f64| SweepSeries { label: label.into(), points: [4096usize, 16384, 65536].iter().map(|&s| (s, f * 1e6 / s as f64)).collect() };
        sweep_chart(&path, "tokens/s against context", "tokens/s", &[line("dense", 1.0), line("moba", 2.0), line("nsa", 1.5)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for needle in ["tokens/s against context", "context (tokens)", "dense", "moba", "nsa"] {
            assert!(svg.contains(needle), "`{needle}` missing");
        }
        let strokes: Vec<&str> = svg
            .split("<polyline")
            .skip(1)
            .filter(|p| p.split("points=\"").nth(1).is_some_and(|pts| pts.split('"').next().unwrap_or("").split_whitespace().count() == 3))
            .filter_map(|p| p.split("stroke=\"").nth(1).and_then(|s| s.get(..7)))
            .collect();
        assert_eq!(strokes.len(), 3, "{strokes:?}");
        assert_eq!(strokes[2], "#111111", "baseline last: {strokes:?}");
        sweep_chart(&dir.join("empty.svg"), "none", "x", &[]).unwrap();
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn sweep_rows_group_by_method_and_name_bad_lines() {
        let rows = concat!(
            r#"{"session": "s1", "method": "dense", "seq": 4096, "median_tokens_per_s": 100.0, "peak_mib": 10}"#, "\n",
            r#"{"session": "s2", "method": "dense", "seq": 4096, "median_tokens_per_s": 999.0}"#, "\n",
            r#"{"session": "s1", "method": "moba", "seq": 4096, "steady_tokens_per_s": 150.0, "peak_mib": 12}"#, "\n",
            r#"{"session": "s1", "method": "dense", "seq": 8192, "median_tokens_per_s": 90.0, "peak_mib": 20}"#, "\n",
        );
        let (speed, memory) = sweep_from_rows(rows, "s1").unwrap();
        assert_eq!(speed.len(), 2);
        assert_eq!(speed[0].label, "dense");
        assert_eq!(speed[0].points, vec![(4096, 100.0), (8192, 90.0)]);
        assert_eq!(speed[1].points, vec![(4096, 150.0)]);
        assert_eq!(memory[0].points, vec![(4096, 10.0), (8192, 20.0)]);
        assert!(sweep_from_rows(rows, "s3").unwrap_err().to_string().contains("--session"));
        let bad = sweep_from_rows("{\"session\": \"s1\"}\nnot json", "s1").unwrap_err().to_string();
        assert!(bad.contains("line 1"), "{bad}");
    }

    #[test]
    fn empty_and_degenerate_inputs_still_draw() {
        let dir = tmp("empty");
        loss_chart(&dir.join("a.svg"), "none", &[]).unwrap();
        loss_chart(&dir.join("b.svg"), "one", &[LossCurves { label: "dense".into(), train: vec![f32::NAN], val: vec![] }]).unwrap();
        speed_chart(&dir.join("c.svg"), "none", &[]).unwrap();
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn smoothing_keeps_length_and_skips_gaps() {
        let s = smooth(&[1.0, f32::NAN, 3.0, 5.0], 1);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[1], 2.0);
        assert_eq!(finite_runs(&[1.0, f32::NAN, 2.0, 3.0]).len(), 2);
    }
}
