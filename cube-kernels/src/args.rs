//! The runtime arguments of the attention passes, grouped: [`RowsArgs`] for the query-major
//! passes (forward and dQ) and [`KeysArgs`] for the key-major one (dK, dV, dbias), the same
//! on every path (portable, cooperative matrices, register fragments). The host fills a
//! `RowsShape` or `KeysShape` by field name and turns it into the launch argument; the
//! kernels read the fields (`a.seq_q`), so no launch spells out positional scalars.

use cubecl::prelude::*;

/// Runtime arguments of the query-major passes.
#[derive(CubeLaunch, CubeType)]
pub struct RowsArgs {
    /// Batch size.
    pub n_batch: u32,
    /// Query heads.
    pub heads_q: u32,
    /// Key/value heads.
    pub heads_kv: u32,
    /// Query rows per head.
    pub seq_q: u32,
    /// Keys per head.
    pub seq_k: u32,
    /// Heads of the bias (and of the keep threshold).
    pub heads_b: u32,
    /// Query heads sharing one schedule list (`heads_q / sel_heads`; 1 without a schedule).
    pub group_heads: u32,
    /// Queries per schedule row (the dense paths: rows per cube).
    pub query_block: u32,
    /// Schedule rows per head (dense: row groups per head).
    pub n_row_blocks: u32,
    /// Cubes per row group (gathered fragment passes: tiles per list).
    pub n_chunks: u32,
    /// Entries per schedule list.
    pub cap: u32,
    /// Keys per schedule block.
    pub key_block: u32,
    /// Key blocks per head (gathered fragment passes; 1 otherwise).
    pub n_kb: u32,
    /// Causal offset `seq_k - seq_q`.
    pub off: i32,
    /// Window length (0 without a window).
    pub w: i32,
    /// Softmax scale.
    pub scale: f32,
    /// `-inf`, passed in rather than spelled as a kernel constant.
    pub neg_inf: f32,
    /// The kernel's comptime head dim and key tile, again at run time: the bounds of its
    /// per-unit loops on software devices (see `crate::kernels::loop_bound`).
    pub loop_dim: u32,
    pub loop_tile: u32,
}

/// Runtime arguments of the key-major pass.
#[derive(CubeLaunch, CubeType)]
pub struct KeysArgs {
    /// Batch size.
    pub n_batch: u32,
    /// Query heads.
    pub heads_q: u32,
    /// Key/value heads.
    pub heads_kv: u32,
    /// Query rows per head.
    pub seq_q: u32,
    /// Keys per head.
    pub seq_k: u32,
    /// Heads of the bias.
    pub heads_b: u32,
    /// Heads of the schedule (`heads_q` without one).
    pub heads_s: u32,
    /// Queries per schedule row (1 without a schedule).
    pub query_block: u32,
    /// Schedule rows per head (`seq_q` without a schedule).
    pub n_row_blocks: u32,
    /// Entries per schedule list.
    pub cap: u32,
    /// Keys per schedule block (dense: keys per cube).
    pub key_block: u32,
    /// Key tiles per schedule block.
    pub n_sub: u32,
    /// Key tiles per (batch, kv head).
    pub n_key_tiles: u32,
    /// Cubes per key tile, each taking a share of its query rows (1 on the fragment path,
    /// whose walks are cut by [`crate::key_pieces`] instead).
    pub n_split: u32,
    /// Causal offset `seq_k - seq_q`.
    pub off: i32,
    /// Window length (0 without a window).
    pub w: i32,
    /// Softmax scale.
    pub scale: f32,
    /// The kernel's comptime head dim and query tile, again at run time: the bounds of its
    /// per-unit loops on software devices (see `crate::kernels::loop_bound`).
    pub loop_dim: u32,
    pub loop_tile: u32,
}

/// The host's [`RowsArgs`], by name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowsShape {
    pub(crate) n_batch: usize,
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) seq_q: usize,
    pub(crate) seq_k: usize,
    pub(crate) heads_b: usize,
    pub(crate) group_heads: usize,
    pub(crate) query_block: usize,
    pub(crate) n_row_blocks: usize,
    pub(crate) n_chunks: usize,
    pub(crate) cap: usize,
    pub(crate) key_block: usize,
    pub(crate) n_kb: usize,
    pub(crate) off: i32,
    pub(crate) w: i32,
    pub(crate) scale: f32,
}

impl RowsShape {
    /// The launch argument of the tensor-core kernels, whose loops are all comptime.
    pub(crate) fn arg(&self) -> RowsArgsLaunch {
        self.portable_arg(0, 0)
    }

    /// The launch argument of the portable kernel, with its head dim and key tile.
    pub(crate) fn portable_arg(&self, dim: usize, tile: usize) -> RowsArgsLaunch {
        RowsArgsLaunch::new(
            self.n_batch as u32,
            self.heads_q as u32,
            self.heads_kv as u32,
            self.seq_q as u32,
            self.seq_k as u32,
            self.heads_b as u32,
            self.group_heads as u32,
            self.query_block as u32,
            self.n_row_blocks as u32,
            self.n_chunks as u32,
            self.cap as u32,
            self.key_block as u32,
            self.n_kb as u32,
            self.off,
            self.w,
            self.scale,
            f32::NEG_INFINITY,
            dim as u32,
            tile as u32,
        )
    }
}

/// The host's [`KeysArgs`], by name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeysShape {
    pub(crate) n_batch: usize,
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) seq_q: usize,
    pub(crate) seq_k: usize,
    pub(crate) heads_b: usize,
    pub(crate) heads_s: usize,
    pub(crate) query_block: usize,
    pub(crate) n_row_blocks: usize,
    pub(crate) cap: usize,
    pub(crate) key_block: usize,
    pub(crate) n_sub: usize,
    pub(crate) n_key_tiles: usize,
    pub(crate) n_split: usize,
    pub(crate) off: i32,
    pub(crate) w: i32,
    pub(crate) scale: f32,
}

impl KeysShape {
    /// The launch argument of the tensor-core kernels, whose loops are all comptime.
    pub(crate) fn arg(&self) -> KeysArgsLaunch {
        self.portable_arg(0, 0)
    }

    /// The launch argument of the portable kernel, with its head dim and query tile.
    pub(crate) fn portable_arg(&self, dim: usize, tile: usize) -> KeysArgsLaunch {
        KeysArgsLaunch::new(
            self.n_batch as u32,
            self.heads_q as u32,
            self.heads_kv as u32,
            self.seq_q as u32,
            self.seq_k as u32,
            self.heads_b as u32,
            self.heads_s as u32,
            self.query_block as u32,
            self.n_row_blocks as u32,
            self.cap as u32,
            self.key_block as u32,
            self.n_sub as u32,
            self.n_key_tiles as u32,
            self.n_split as u32,
            self.off,
            self.w,
            self.scale,
            dim as u32,
            tile as u32,
        )
    }
}
