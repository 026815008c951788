//! The loop budget of software devices.
//!
//! Mesa's llvmpipe (lavapipe, the Vulkan driver CI runs on) counts the loop iterations of
//! each shader invocation, all loops together, and once 65 535 have run it leaves every
//! loop early without an error: a walk past that budget returns wrong numbers. On a software
//! device the portable kernels therefore take runtime loop bounds and four head dims per
//! iteration (`kernels::loop_bound`, `kernels::dim_step`), the key-major pass spreads a
//! long walk over more cubes (its `n_split` partial sums), and a query-major walk still too
//! long for one invocation is refused with an error that names the argument.

use crate::kernels::dim_step;
use crate::*;

/// Iterations an invocation may run on a software device: the driver's 65 535 less a
/// margin for the loops the estimates below leave out (prologues, list lookups).
const SOFTWARE_LOOP_BUDGET: usize = 60_000;

/// Loop iterations per staged tile of the portable query-major kernel with `tile_k` keys:
/// the mask, the cube-wide flag, the staging, the scores and the dQ loop (the forward's
/// value loop and rescale take fewer). With one dim per iteration this gives 4 352 per tile
/// of the forward at head dim 64, i.e. a walk of 15 tiles over the limit: the walks seen to
/// fail on lavapipe before `dim_step` (docs/testing.md §5).
fn rows_tile_iterations(head_dim: usize, tile_k: usize, units: usize) -> usize {
    let n_d = head_dim.div_ceil(dim_step(head_dim, true));
    tile_k * (3 + 3 * n_d) + n_d + units + (tile_k * head_dim).div_ceil(units)
}

/// Loop iterations per chunk of `tile_q` query rows of the portable key-major kernel: the
/// row metadata, the flags, the staging and the gradient loops.
fn keys_chunk_iterations(head_dim: usize, tile_q: usize, units: usize) -> usize {
    let n_d = head_dim.div_ceil(dim_step(head_dim, true));
    tile_q.div_ceil(units) + tile_q + units + (tile_q * head_dim).div_ceil(units) + tile_q * (1 + 2 * n_d) + 2
}

/// Checks, on a software device, that the longest walk of the portable query-major kernel
/// fits the driver's loop budget: `tiles` staged key tiles of `tile_k` keys.
pub(crate) fn check_rows_walk(p: &AttnProblem, tiles: usize, tile_k: usize, units: usize) -> Result<(), KernelError> {
    let iterations = tiles * rows_tile_iterations(p.head_dim, tile_k, units);
    if iterations <= SOFTWARE_LOOP_BUDGET {
        return Ok(());
    }
    Err(unsupported(
        "problem.seq_k",
        format!(
            "on a software device (a CPU Vulkan driver such as lavapipe) a query walks at most {} key tiles of {tile_k} \
             at head dim {} within the driver's 65 535 loop iterations per invocation, and this problem needs {tiles}: \
             use shorter sequences, a window or a block schedule there, or a GPU",
            SOFTWARE_LOOP_BUDGET / rows_tile_iterations(p.head_dim, tile_k, units),
            p.head_dim,
        ),
    ))
}

/// The key-major pass's split on a software device: the smallest `n_split >= at_least`
/// with which each cube's walk (`group` query heads of `n_chunks` chunks of `tile_q` rows,
/// every `n_split`-th chunk per cube) fits the driver's loop budget.
pub(crate) fn keys_split(
    p: &AttnProblem,
    group: usize,
    n_chunks: usize,
    tile_q: usize,
    units: usize,
    at_least: usize,
) -> Result<usize, KernelError> {
    let per_chunk = keys_chunk_iterations(p.head_dim, tile_q, units);
    let chunks_per_head = SOFTWARE_LOOP_BUDGET / (group * per_chunk);
    if chunks_per_head == 0 {
        return Err(unsupported(
            "problem.heads_q",
            format!(
                "on a software device (a CPU Vulkan driver such as lavapipe) a key's gradient walk over {group} query heads \
                 per kv head at head dim {} exceeds the driver's 65 535 loop iterations per invocation: use fewer query \
                 heads per kv head there, or a GPU",
                p.head_dim
            ),
        ));
    }
    Ok(at_least.max(n_chunks.div_ceil(chunks_per_head)))
}
