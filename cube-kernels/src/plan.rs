//! Tile shapes and grids: chosen from the device's shared memory, plane size and the path,
//! and read by the launches.

use crate::*;
use cubecl::prelude::*;
use crate::caps::MmaSpec;
use crate::launch::BiasArgs;

// ---------------------------------------------------------------------------------------
// Planning
// ---------------------------------------------------------------------------------------

/// Tile sizes and cube widths picked from the device properties.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    /// Units (query rows) per cube of the query-major kernel.
    pub(crate) rows_units: usize,
    /// Keys per staged K/V tile in the query-major kernel.
    pub(crate) tile_k: usize,
    /// Units (keys) per cube of the key-major kernel.
    pub(crate) keys_units: usize,
    /// Query rows per staged Q/dO tile in the key-major kernel.
    pub(crate) tile_q: usize,
}

/// Storage buffers bound by the largest kernel (`attn_keys_kernel`), metadata included.
pub(crate) const KERNEL_BINDINGS: usize = 15;

pub(crate) const TILE_CHOICES: [usize; 6] = [32, 16, 8, 4, 2, 1];

pub(crate) fn plan(client: &Client, p: &AttnProblem, sched: Option<&BlockSchedule>) -> Result<Plan, KernelError> {
    let hw = &client.properties().hardware;
    // The key-major kernel binds 14 storage buffers (+1 for CubeCL's metadata); WebGPU's
    // default limit is 8, native adapters report 16-31.
    if (hw.max_bindings as usize) < KERNEL_BINDINGS {
        return Err(unsupported(
            "client",
            format!("the device allows {} storage buffers per kernel, these kernels need {KERNEL_BINDINGS}", hw.max_bindings),
        ));
    }
    let max_units = (hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
    // Leave a margin: some compilers add a few shared variables of their own.
    let smem = hw.max_shared_memory_size.saturating_sub(512);
    let d = p.head_dim;
    let rows_units = match sched {
        None => 64.min(max_units),
        Some(s) => (p.heads_q / s.sel_heads * s.query_block).clamp(1, 64).min(max_units),
    };
    let keys_units = match sched {
        None => 32.min(max_units),
        Some(s) => s.key_block.clamp(1, 32).min(max_units),
    };
    let max_tile_k = match sched {
        None => 32,
        Some(s) => s.key_block.next_power_of_two().min(32),
    };
    let tile_k = TILE_CHOICES
        .into_iter()
        .filter(|&t| t <= max_tile_k)
        .find(|&t| 2 * t * d * 4 + rows_units * 4 <= smem)
        .ok_or_else(|| unsupported("problem.head_dim", format!("{d} does not fit in {smem} B of shared memory")))?;
    let tile_q = TILE_CHOICES
        .into_iter()
        .find(|&t| 2 * t * d * 4 + t * 5 * 4 + keys_units * 4 <= smem)
        .ok_or_else(|| unsupported("problem.head_dim", format!("{d} does not fit in {smem} B of shared memory")))?;
    Ok(Plan { rows_units, tile_k, keys_units, tile_q })
}

/// Tile shape of a tensor-core kernel: `planes` planes of 16 rows each, and the depth of the
/// staged tile on the other side (`tile_k` keys or `tile_q` query rows).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MmaPlan {
    pub(crate) planes: usize,
    pub(crate) tile: usize,
}

/// Shared memory a tensor-core cube may use: at most half of a large SM, so two cubes fit.
pub(crate) const MMA_SMEM_BUDGET: usize = 112 * 1024;
/// Slack for the alignment padding of the shared arrays.
pub(crate) const MMA_SMEM_SLACK: usize = 32 * 12;

pub(crate) fn mma_smem_limit(client: &Client) -> usize {
    client.properties().hardware.max_shared_memory_size.saturating_sub(1024).min(MMA_SMEM_BUDGET)
}

pub(crate) fn mma_max_planes(client: &Client, spec: &MmaSpec) -> usize {
    let hw = &client.properties().hardware;
    (hw.max_units_per_cube as usize / spec.plane).min(hw.max_cube_dim.1 as usize).clamp(0, 4)
}

/// Shape of the query-major tensor-core kernel (`backward`: the dQ pass; `gathered`: cubes
/// fill their rows from the inverted schedule, so a list's row count does not bound them),
/// largest first.
pub(crate) fn mma_rows_plan(
    client: &Client,
    p: &AttnProblem,
    sched: Option<&BlockSchedule>,
    spec: &MmaSpec,
    backward: bool,
    gathered: bool,
) -> Option<MmaPlan> {
    let d = p.head_dim;
    let rows = match sched {
        Some(s) if !gathered => p.heads_q / s.sel_heads * s.query_block,
        _ => 64,
    };
    let max_planes = rows.div_ceil(16).clamp(1, 4).min(mma_max_planes(client, spec));
    let max_tile = sched.map_or(64, |s| s.key_block.next_multiple_of(16).clamp(16, 64));
    let limit = mma_smem_limit(client);
    let op = spec.op_size;
    for planes in [4, 2, 1].into_iter().filter(|&x| x <= max_planes) {
        for tile in [64, 32, 16].into_iter().filter(|&t| t <= max_tile) {
            let bq = 16 * planes;
            let (ld, lacc, ls, lp) = (d + 8, d + 4, tile + 4, tile + 8);
            let do_len = if backward { bq * ld } else { 32 };
            let dp_len = if backward { bq * ls } else { 32 };
            let bytes = op * (bq * ld + do_len + 2 * tile * ld + bq * lp)
                + 4 * (bq * lacc + bq * ls + dp_len)
                + 4 * bq
                + 8 * bq * (spec.plane / 16)
                + MMA_SMEM_SLACK;
            if bytes <= limit {
                return Some(MmaPlan { planes, tile });
            }
        }
    }
    None
}

/// Shape of the key-major tensor-core kernel, largest first.
pub(crate) fn mma_keys_plan(client: &Client, p: &AttnProblem, sched: Option<&BlockSchedule>, spec: &MmaSpec) -> Option<MmaPlan> {
    let d = p.head_dim;
    let max_planes = sched
        .map_or(4, |s| s.key_block.div_ceil(16).clamp(1, 4))
        .min(mma_max_planes(client, spec));
    let limit = mma_smem_limit(client);
    let op = spec.op_size;
    for planes in [4, 2, 1].into_iter().filter(|&x| x <= max_planes) {
        for tile in [64, 32, 16] {
            let bk = 16 * planes;
            let (ld, lacc, ls, lp) = (d + 8, d + 4, tile + 4, tile + 8);
            let bytes = op * (2 * bk * ld + 2 * tile * ld + bk * lp)
                + 4 * (2 * bk * lacc + 2 * bk * ls)
                + 20 * tile
                + 8 * bk * (spec.plane / 16)
                + MMA_SMEM_SLACK;
            if bytes <= limit {
                return Some(MmaPlan { planes, tile });
            }
        }
    }
    None
}

/// A grid of `n` cubes, folded into 2-D when `n` exceeds the per-dimension limit.
pub(crate) fn grid(client: &Client, n: usize) -> CubeCount {
    let lim = (client.properties().hardware.max_cube_count.0 as usize).clamp(1, 65535);
    let n = n.max(1);
    let x = n.min(lim);
    let y = n.div_ceil(x);
    CubeCount::Static(x as u32, y as u32, 1)
}

pub(crate) fn per_unit_launch(client: &Client, n_items: usize) -> (CubeCount, CubeDim) {
    let hw = &client.properties().hardware;
    let units = 64.min(hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
    (grid(client, n_items.div_ceil(units)), CubeDim::new_1d(units as u32))
}

/// Launch of a kernel where `lanes` units share each of `n_rows` rows of `row_len` elements
/// (a power of two, at most 32 and at most `row_len`); returns the count, the cube and `lanes`.
pub(crate) fn row_lanes_launch(client: &Client, n_rows: usize, row_len: usize) -> (CubeCount, CubeDim, usize) {
    let hw = &client.properties().hardware;
    let units = 256.min(hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
    let lanes = 1usize << 32.min(row_len).min(units).max(1).ilog2();
    let units = units / lanes * lanes;
    (grid(client, n_rows.div_ceil(units / lanes)), CubeDim::new_1d(units as u32), lanes)
}

pub(crate) fn mask_params(p: &AttnProblem) -> (i32, i32, bool) {
    let off = p.seq_k as i32 - p.seq_q as i32;
    match p.window {
        Some(w) => (off, w.min(i32::MAX as usize / 4) as i32, true),
        None => (off, 0, false),
    }
}


/// Keys per K/V tile of a one-plane cube (a per-token list shared by a GQA group of at most
/// 16 heads). Its two K and two V stages bound how many such cubes an SM holds: at head dim
/// 128, 64-key stages take 70 KiB for one plane (3 planes per SM), 16-key stages 17 KiB.
/// Measured on the H200 (bf16, Hq 64 / Hkv 4, d 128, NSA's
/// 16 x 64 schedule, `docs/results/engine-h200.md`): forward 11.2 / 8.3 / 5.9 ms at 16k for
/// tiles of 64 / 32 / 16. [`ONE_PLANE_TILE_ENV`] (16, 32 or 64) overrides it for measurements.
pub(crate) const ONE_PLANE_TILE: usize = 16;

/// Environment variable that overrides [`ONE_PLANE_TILE`] (16, 32 or 64; other values are
/// ignored), for A/B measurements with one binary.
pub const ONE_PLANE_TILE_ENV: &str = "SPARSE_ATTN_ONE_PLANE_TILE";

fn one_plane_tile() -> usize {
    match std::env::var(ONE_PLANE_TILE_ENV).ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(t @ (16 | 32 | 64)) => t,
        _ => ONE_PLANE_TILE,
    }
}

/// Tile shape of the fragment query-major passes: 4 planes (64 query rows) sharing each K/V
/// tile, fewer planes when a schedule row group is smaller (a per-token list shared by a GQA
/// group of 16 fills one plane); 64-key tiles (32 for dQ above head dim 64, which holds Q, dO,
/// dQ, S and dP fragments at once), no longer than the schedule's key block.
pub(crate) fn fragment_rows_config(p: &AttnProblem, inputs: &AttnInputs, bias: &BiasArgs, backward: bool) -> fragment::FragmentConfig {
    let max_tile = if backward && p.head_dim > 64 { 32 } else { 64 };
    let (planes, tile) = match inputs.schedule {
        None => (4, max_tile),
        Some(s) => {
            let rows = p.heads_q / s.sel_heads * s.query_block;
            let planes = rows.div_ceil(16).clamp(1, 4);
            let max_tile = if planes == 1 { one_plane_tile().min(max_tile) } else { max_tile };
            (planes, s.key_block.next_multiple_of(16).clamp(16, max_tile))
        }
    };
    fragment::FragmentConfig {
        planes,
        head_dim: p.head_dim,
        tile,
        causal: p.causal,
        windowed: p.window.is_some(),
        has_bias: bias.has_bias,
        has_thr: bias.has_thr,
        blocks: inputs.schedule.is_some(),
        gathered: false,
        key_pos: inputs.key_positions.is_some(),
        pos_causal: false,
        // One bias row per cube: rows of a cube share a kv head, so a bias per kv head.
        staged_keys: inputs.key_positions.is_some() && (!bias.has_bias || bias.heads == p.heads_kv),
    }
}

/// Tile shape of the fragment key-major pass: 4 planes (64 keys), fewer for smaller key
/// blocks; query tiles of 32 rows above head dim 64 (dK and dV fragments stay in registers),
/// 64 otherwise.
pub(crate) fn fragment_keys_config(p: &AttnProblem, inputs: &AttnInputs, bias: &BiasArgs) -> fragment::FragmentConfig {
    let planes = inputs.schedule.map_or(4, |s| s.key_block.div_ceil(16).clamp(1, 4));
    fragment::FragmentConfig {
        planes,
        head_dim: p.head_dim,
        tile: if p.head_dim > 64 { 32 } else { 64 },
        causal: p.causal,
        windowed: p.window.is_some(),
        has_bias: bias.has_bias,
        has_thr: bias.has_thr,
        blocks: inputs.schedule.is_some(),
        gathered: false,
        key_pos: inputs.key_positions.is_some(),
        pos_causal: false,
        staged_keys: false,
    }
}

/// How many cubes share the query rows of each key tile in the key-major pass. Enough to
/// fill a large GPU (about 1024 cubes) when there are few key tiles (short sequences, few kv
/// heads, long GQA groups), at least 8 with a block schedule, where a few blocks (NSA's
/// forced first block, the local ones) are selected by every query; at most 16, at most the
/// number of row chunks, and at most 256 MiB of f32 partial sums.
pub(crate) fn key_splits(n_cubes: usize, kv_len: usize, max_chunks: usize, blocks: bool) -> usize {
    let mut z = 1024usize.div_ceil(n_cubes.max(1));
    if blocks {
        z = z.max(8);
    }
    let mem_cap = ((256usize << 20) / (8 * kv_len.max(1))).max(1);
    z.clamp(1, 16).min(max_chunks.max(1)).min(mem_cap)
}
