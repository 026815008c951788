//! A minimal line chart rendered to PNG (training-loss curves of `compare`).
//!
//! Drawn by hand on an RGB buffer with a built-in 5x7 font, so the example needs no font
//! files and no plotting dependency; only the `png` encoder.

use std::path::Path;

use crate::AppResult;

/// One curve: a label and its y value at x = 1, 2, ...
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Values (non-finite ones are skipped).
    pub values: Vec<f32>,
}

const PALETTE: [[u8; 3]; 8] =
    [[31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14], [148, 103, 189], [140, 86, 75], [227, 119, 194], [23, 190, 207]];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self { w, h, px: vec![255; w * h * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }

    /// Bresenham line of the given thickness.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), thick: i64, c: [u8; 3]) {
        let (mut x, mut y) = (x0.round() as i64, y0.round() as i64);
        let (xe, ye) = (x1.round() as i64, y1.round() as i64);
        let (dx, dy) = ((xe - x).abs(), -(ye - y).abs());
        let (sx, sy) = (if x < xe { 1 } else { -1 }, if y < ye { 1 } else { -1 });
        let mut err = dx + dy;
        let r = thick / 2;
        loop {
            self.rect(x - r, y - r, x - r + thick - 1, y - r + thick - 1, c);
            if x == xe && y == ye {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with the 5x7 font scaled by `s`; returns the width drawn.
    fn text(&mut self, x: i64, y: i64, s: i64, text: &str, c: [u8; 3]) -> i64 {
        let mut cx = x;
        for ch in text.chars() {
            let rows = glyph(ch);
            for (ry, bits) in rows.iter().enumerate() {
                for rx in 0..5 {
                    if bits & (0x10 >> rx) != 0 {
                        self.rect(cx + rx * s, y + ry as i64 * s, cx + rx * s + s - 1, y + ry as i64 * s + s - 1, c);
                    }
                }
            }
            cx += 6 * s;
        }
        cx - x
    }

    fn save_png(&self, path: &Path) -> AppResult<()> {
        let file = std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(&self.px).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn text_width(text: &str, s: i64) -> i64 {
    text.chars().count() as i64 * 6 * s
}

/// "Nice" tick values covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= target as f64).unwrap_or(10.0 * mag);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + step * 1e-6 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Centred moving average over `2 * half + 1` points (shorter at the ends): smooths noisy
/// per-step losses without the lag of an exponential average.
pub fn smooth(values: &[f32], half: usize) -> Vec<f32> {
    (0..values.len())
        .map(|i| {
            let window = &values[i.saturating_sub(half)..(i + half + 1).min(values.len())];
            let finite: Vec<f32> = window.iter().copied().filter(|v| v.is_finite()).collect();
            if finite.is_empty() { f32::NAN } else { finite.iter().sum::<f32>() / finite.len() as f32 }
        })
        .collect()
}

/// Draws the curves (raw values thin and light, a smoothed copy bold) with axes, grid and a
/// legend, and writes a PNG.
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> AppResult<()> {
    let (w, h) = (960usize, 600usize);
    let (left, right, top, bottom) = (90i64, 190i64, 50i64, 70i64);
    let (pw, ph) = (w as i64 - left - right, h as i64 - top - bottom);
    let mut c = Canvas::new(w, h);
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(0).max(2);
    let finite = series.iter().flat_map(|s| s.values.iter().copied()).filter(|v| v.is_finite());
    let (mut lo, mut hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v as f64), b.max(v as f64)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (lo, hi) = ((lo - pad).max(0.0), hi + pad);
    let map = |i: f64, v: f64| -> (f64, f64) {
        (left as f64 + (i - 1.0) / (n as f64 - 1.0) * pw as f64, top as f64 + (hi - v) / (hi - lo) * ph as f64)
    };
    let (grid, axis, ink) = ([225, 225, 225], [60, 60, 60], [20, 20, 20]);
    let yt = ticks(lo, hi, 8);
    let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
    for v in &yt {
        let (_, y) = map(1.0, *v);
        c.line((left as f64, y), ((left + pw) as f64, y), 1, grid);
        let label = fmt_tick(*v, ystep);
        c.text(left - 10 - text_width(&label, 2), y as i64 - 7, 2, &label, ink);
    }
    let xt = ticks(1.0, n as f64, 8);
    for v in &xt {
        let (x, _) = map(*v, lo);
        c.line((x, top as f64), (x, (top + ph) as f64), 1, grid);
        let label = format!("{v:.0}");
        c.text(x as i64 - text_width(&label, 2) / 2, top + ph + 10, 2, &label, ink);
    }
    c.line((left as f64, top as f64), (left as f64, (top + ph) as f64), 2, axis);
    c.line((left as f64, (top + ph) as f64), ((left + pw) as f64, (top + ph) as f64), 2, axis);
    c.text(left + (pw - text_width(title, 2)) / 2, 16, 2, title, ink);
    c.text(left + (pw - text_width(x_label, 2)) / 2, h as i64 - 28, 2, x_label, ink);
    c.text(8, top - 30, 2, y_label, ink);
    for (si, s) in series.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        let light = color.map(|v| (v as u16 + 2 * 255).div_ceil(3) as u8);
        let smooth = smooth(&s.values, (s.values.len() / 40).max(1));
        for (vals, thick, col) in [(&s.values, 1, light), (&smooth, 3, color)] {
            let mut prev: Option<(f64, f64)> = None;
            for (i, v) in vals.iter().enumerate() {
                if !v.is_finite() {
                    prev = None;
                    continue;
                }
                let p = map(i as f64 + 1.0, *v as f64);
                if let Some(q) = prev {
                    c.line(q, p, thick, col);
                }
                prev = Some(p);
            }
        }
        let ly = top + 10 + si as i64 * 26;
        let lx = left + pw + 16;
        c.rect(lx, ly + 5, lx + 24, ly + 8, color);
        c.text(lx + 32, ly, 2, &s.label, ink);
    }
    c.save_png(path)
}

/// Rows of a 5x7 glyph (bit 4 is the leftmost column). Lower case is drawn as upper case.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        ' ' => [0; 7],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = ticks(1.3, 5.6, 6);
        assert!(t.first().unwrap() >= &1.3 && t.last().unwrap() <= &5.6);
        assert!(t.len() >= 3 && t.len() <= 7, "{t:?}");
        let step = t[1] - t[0];
        assert!([0.5, 1.0].contains(&step), "{t:?}");
    }

    #[test]
    fn chart_is_a_png() {
        let dir = std::env::temp_dir().join(format!("toy-lm-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.png");
        let s = Series { label: "dense".into(), values: (0..50).map(|i| 5.0 / (1.0 + i as f32 * 0.1)).collect() };
        line_chart(&path, "loss", "step", "loss", &[s]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_dir_all(dir).ok();
    }
}
