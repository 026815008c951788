//! Selection heat maps: which (query, key) pairs each layer of a trained model attends on a
//! validation sequence, counted per block pair by the library
//! (`AttentionMethod::block_coverage`) and drawn as one triangle per layer in
//! `selection.svg`. Dense attention fills every triangle; a sparse method shows where its
//! routing or selection looks (the diagonal band of local keys, the first blocks, scattered
//! far blocks).

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_sparse_attn::BlockCoverage;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::AppResult;
use crate::data::DataSource;
use crate::model::ToyLm;
use crate::plot::{FONT, draw_err, write_svg};

/// The heat map's file name in a run's directory.
pub const SELECTION_FIGURE: &str = "selection.svg";

/// Cells per side of a map at most: keeps the SVG small at any context.
const MAX_CELLS: usize = 32;

/// The cell size for a `seq`-token map: a power of two giving at most `MAX_CELLS` cells.
pub fn map_block(seq: usize) -> usize {
    seq.div_ceil(MAX_CELLS).max(1).next_power_of_two()
}

/// Each layer's coverage on the first sequence of the first validation batch.
pub fn selection_maps(model: &ToyLm, data: &DataSource, device: &Device) -> AppResult<Vec<BlockCoverage>> {
    let batch = data.val_batch(0);
    let tokens: Tensor<2, Int> = Tensor::from_data(TensorData::new(batch.inputs[..batch.seq].to_vec(), [1, batch.seq]), device);
    model.valid().block_coverage(tokens, map_block(batch.seq))
}

/// White (nothing attended) to dark blue (every causal pair attended).
fn shade(fraction: f32) -> RGBColor {
    let f = fraction.clamp(0.0, 1.0) as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    RGBColor(mix(255, 8), mix(255, 48), mix(255, 107))
}

/// Draws one triangle per layer (heads averaged; queries down, keys across), titled with
/// the share of causal pairs each layer attends.
pub fn selection_chart(path: &Path, title: &str, maps: &[BlockCoverage]) -> AppResult<()> {
    let cols = maps.len().clamp(1, 4);
    let rows = maps.len().div_ceil(cols).max(1);
    let (panel, header) = (220u32, 56u32);
    let size = ((panel * cols as u32 + 20).max(720), header + (panel + 24) * rows as u32 + 10);
    write_svg(path, size, |root| {
        let (top, body) = root.split_vertically(header);
        top.draw(&Text::new(title.to_string(), (10, 10), (FONT, 17).into_font()))
            .and_then(|_| top.draw(&Text::new("share of each block pair's causal (query, key) pairs attended, heads averaged (rows: queries, columns: keys)".to_string(), (10, 34), (FONT, 12).into_font().color(&RGBColor(90, 90, 90)))))
            .map_err(draw_err)?;
        let (body, _) = body.split_horizontally(panel * cols as u32 + 20);
        let panels = body.margin(0, 10, 10, 10).split_evenly((rows, cols));
        for (i, (map, area)) in maps.iter().zip(panels).enumerate() {
            let (label, grid) = area.split_vertically(22);
            let text = format!("layer {}: {:.1}% of pairs (cells of {})", i + 1, 100.0 * map.attended, map.block);
            label.draw(&Text::new(text, (4, 4), (FONT, 13).into_font())).map_err(draw_err)?;
            let n = map.q_blocks.max(1);
            let (w, h) = grid.dim_in_pixel();
            let side = w.min(h).saturating_sub(8) as f64 / n as f64;
            let mean = map.mean_over_heads();
            for q in 0..map.q_blocks {
                for k in 0..=q.min(map.k_blocks.saturating_sub(1)) {
                    let f = mean[q * map.k_blocks + k];
                    if f.is_nan() {
                        continue;
                    }
                    let at = |c: usize| (c as f64 * side).round() as i32;
                    grid.draw(&Rectangle::new([(at(k), at(q)), (at(k + 1), at(q + 1))], shade(f).filled())).map_err(draw_err)?;
                }
            }
            let edge = (n as f64 * side).round() as i32;
            grid.draw(&PathElement::new(vec![(0, 0), (0, edge), (edge, edge), (0, 0)], RGBColor(160, 160, 160))).map_err(draw_err)?;
            let pos = Pos::new(HPos::Right, VPos::Top);
            grid.draw(&Text::new(format!("{} tokens", map.block * n), (edge, 2), (FONT, 11).into_font().color(&RGBColor(120, 120, 120)).pos(pos)))
                .map_err(draw_err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fraction: Vec<f32>, n: usize, attended: f64) -> BlockCoverage {
        BlockCoverage { block: 4, heads: 1, q_blocks: n, k_blocks: n, fraction, attended }
    }

    #[test]
    fn cells_stay_few_at_any_context() {
        assert_eq!(map_block(16), 1);
        assert_eq!(map_block(256), 8);
        assert_eq!(map_block(8192), 256);
        assert_eq!(map_block(8192 + 1), 512);
        for seq in [1usize, 7, 100, 4096, 65536, 100_000] {
            assert!(seq.div_ceil(map_block(seq)) <= MAX_CELLS, "{seq}");
        }
    }

    #[test]
    fn chart_draws_the_lower_triangle_of_each_layer_with_its_share() {
        let dir = std::env::temp_dir().join(format!("toy-lm-selection-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("selection.svg");
        let nan = f32::NAN;
        let maps = [map(vec![1.0, nan, 0.5, 1.0], 2, 0.8), map(vec![0.0, nan, 0.25, 0.0], 2, 0.1)];
        selection_chart(&path, "moba, context 8", &maps).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("layer 1: 80.0% of pairs") && svg.contains("layer 2: 10.0% of pairs"), "{svg}");
        // Three lower-triangle cells per layer, none above the diagonal.
        assert_eq!(svg.matches("<rect").count() - 1, 6, "{svg}");
        // A full cell is the darkest shade, an empty one white.
        assert!(svg.contains("#08306B") || svg.contains("#08306b"), "{svg}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
