//! The tensor-core path: the same two passes as [`crate::kernels`] (query-major forward and
//! dQ, key-major dK/dV/dbias), with every product of a tile done by cooperative matrices
//! (`cmma`, 16 x 16 x `mk` fragments owned by one plane).
//!
//! Layout of a cube: `planes` planes of `CUBE_DIM_X` lanes (the device's plane size, read
//! from its properties on the host); plane `p` owns 16 consecutive rows of the cube's tile
//! (query rows in the query-major kernel, keys in the key-major kernel). Operands are staged
//! in shared memory in the operand type `M` (f16, bf16, or tf32 for f32 inputs); scores and
//! accumulators are f32. Fragments never hold state across tiles: the running output (or
//! gradient) lives in shared memory and is loaded into an accumulator fragment, multiplied
//! into, and stored back, so the per-row rescaling of the online softmax is plain shared-memory
//! arithmetic and no fragment layout is assumed (the same code runs on CUDA `wmma` and on
//! Vulkan cooperative matrices).
//!
//! Masking, bias, the dynamic-mask threshold and the softmax itself are scalar code between
//! the two matrix products of a tile: row `16 p + r` of plane `p` belongs to the `lpr =
//! plane / 16` lanes `l` with `l % 16 == r`, which split its columns and combine their row
//! maxima and sums through shared memory (no plane ops needed). Row strides in shared memory
//! are padded by 16 bytes so neither the fragment loads nor these loops hit one bank. Tile skipping and schedule walking are the same as the portable
//! kernels', so both paths visit exactly the same tiles.

use crate::fragment::{RowsWalk, flat_row, list_slot, rows_cube, rows_cube_count};
use crate::kernels::{NEG_BIG, cube_linear, entry_keys, key_kept, pair_visible};
use crate::key_pieces::{head_walk, key_tile};
use crate::row_walk::{entry_tiles, row_entries, row_stats};
use crate::key_walk::{any_in_cube, chunk_rows, chunk_slots, key_cube, stage_chunk_rows};
use cubecl::cmma::{self, MatrixIdent, MatrixLayout};
use cubecl::prelude::*;
use crate::args::{KeysArgs, RowsArgs};

/// `x` in the operand type. With `rne_bf16`, rounded to nearest-even bf16 first, so the
/// conversion is exact whatever rounding the target's f32 -> bf16 conversion uses (Vulkan
/// drivers may truncate, which biases P and doubles the output error). Finite `x` only.
#[cube]
fn to_operand<M: Float>(x: f32, #[comptime] rne_bf16: bool) -> M {
    if rne_bf16 {
        let bits = u32::reinterpret(x);
        let rounded = (bits + 0x7fffu32 + ((bits >> 16u32) & 1u32)) & 0xffff0000u32;
        M::cast_from(f32::reinterpret(rounded))
    } else {
        M::cast_from(x)
    }
}

/// `acc[16 x 16 at acc_off, stride acc_stride] += A[16 x kdim] * B[kdim x 16]`, where `A` is
/// row-major at `a_off` (stride `a_stride`) and `B` is read at `b_off` with stride `b_stride`,
/// column-major when `b_col_major` (i.e. `B = X^T` for a row-major `X`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mma_tile<M: Float>(
    a: &[M],
    a_off: usize,
    a_stride: u32,
    b: &[M],
    b_off: usize,
    b_stride: u32,
    acc: &mut [f32],
    acc_off: usize,
    acc_stride: u32,
    #[comptime] kdim: usize,
    #[comptime] mk: usize,
    #[comptime] b_col_major: bool,
    #[comptime] accumulate: bool,
) {
    let mut c = unsafe {
        cmma::Matrix::<f32>::uninitialized(MatrixIdent::Accumulator, 16usize, 16usize, mk, MatrixLayout::Undefined)
    };
    if accumulate {
        cmma::load_with_layout(&mut c, &acc[acc_off..acc_off + 256], acc_stride, MatrixLayout::RowMajor);
    } else {
        cmma::fill(&mut c, 0.0f32);
    }
    for kk in 0..kdim / mk {
        let a_start = a_off + kk * mk;
        let am = cmma::Matrix::<M>::from_slice(
            MatrixIdent::A,
            16usize,
            16usize,
            mk,
            MatrixLayout::RowMajor,
            &a[a_start..a_start + 16 * mk],
            a_stride,
        );
        if b_col_major {
            let b_start = b_off + kk * mk;
            let bm = cmma::Matrix::<M>::from_slice(
                MatrixIdent::B,
                16usize,
                16usize,
                mk,
                MatrixLayout::ColMajor,
                &b[b_start..b_start + 16 * mk],
                b_stride,
            );
            cmma::execute(&am, &bm, &c, &c);
        } else {
            let b_start = b_off + kk * mk * (b_stride as usize);
            let bm = cmma::Matrix::<M>::from_slice(
                MatrixIdent::B,
                16usize,
                16usize,
                mk,
                MatrixLayout::RowMajor,
                &b[b_start..b_start + 16 * mk],
                b_stride,
            );
            cmma::execute(&am, &bm, &c, &c);
        }
    }
    cmma::store(&mut acc[acc_off..acc_off + 256], &c, acc_stride, MatrixLayout::RowMajor);
}

/// Query-major pass on tensor cores: forward (`backward = false`: `out = O`, `lse`) or dQ
/// (`backward = true`: reads `lse`, `delta`, `d_o`; `out = dQ`). Same arguments, row groups,
/// cube numbering and tile walk as [`fn@crate::kernels::attn_rows_kernel`], with `16 * planes`
/// rows per cube.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn mma_rows_kernel<F: Float, M: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    bias: &[F],
    thr_v: &[f32],
    thr_i: &[i32],
    sched: &[i32],
    inv_off: &[i32],
    inv_rows: &[i32],
    work_off: &[i32],
    d_o: &[F],
    delta: &[f32],
    lse: &mut [f32],
    out: &mut [F],
    part: &mut [f32],
    part_lse: &mut [f32],
    a: RowsArgs,
    #[comptime] planes: usize,
    #[comptime] lpr: usize,
    #[comptime] head_dim: usize,
    #[comptime] tile_k: usize,
    #[comptime] mk: usize,
    #[comptime] rne_bf16: bool,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_thr: bool,
    #[comptime] blocks: bool,
    #[comptime] gathered: bool,
    #[comptime] backward: bool,
) {
    let off = a.off;
    let w = a.w;
    let scale = a.scale;
    let neg_inf = a.neg_inf;
    let heads_q = a.heads_q as usize;
    let heads_kv = a.heads_kv as usize;
    let seq_q = a.seq_q as usize;
    let seq_k = a.seq_k as usize;
    let heads_b = a.heads_b as usize;
    let gh = a.group_heads as usize;
    let qb = a.query_block as usize;
    let n_rb = a.n_row_blocks as usize;
    let cap = a.cap as usize;
    let key_block = a.key_block as usize;
    let n_gh = heads_q / gh;
    let bq = comptime!(planes * 16);
    // The cube decode and row mapping are the fragment path's (same numbering, same
    // gathering); only the planes and the mask flags matter to them.
    let walk = comptime!(RowsWalk { planes, causal, windowed, gathered });
    // Padded row strides (operands +16 B, f32 +16 B) keep fragment loads and the per-row
    // scalar loops off a single shared-memory bank.
    let ld = comptime!(head_dim + 8);
    let lacc = comptime!(head_dim + 4);
    let ls = comptime!(tile_k + 4);
    let lp = comptime!(tile_k + 8);
    let do_len = comptime!(if backward { planes * 16 * (head_dim + 8) } else { 32 });
    let dp_len = comptime!(if backward { planes * 16 * (tile_k + 4) } else { 32 });

    let lane = UNIT_POS_X as usize;
    let pl = UNIT_POS_Y as usize;
    let u = UNIT_POS as usize;
    let nu = CUBE_DIM as usize;
    let cid = cube_linear();
    let n_cubes = rows_cube_count(&a, walk);

    let mut q_s = Shared::<[M]>::new_aligned_slice(bq * ld, 32usize);
    let mut do_s = Shared::<[M]>::new_aligned_slice(do_len, 32usize);
    let mut k_s = Shared::<[M]>::new_aligned_slice(tile_k * ld, 32usize);
    let mut v_s = Shared::<[M]>::new_aligned_slice(tile_k * ld, 32usize);
    let mut p_s = Shared::<[M]>::new_aligned_slice(bq * lp, 32usize);
    let mut acc_s = Shared::<[f32]>::new_aligned_slice(bq * lacc, 32usize);
    let mut s_s = Shared::<[f32]>::new_aligned_slice(bq * ls, 32usize);
    let mut dp_s = Shared::<[f32]>::new_aligned_slice(dp_len, 32usize);
    let mut row_s = Shared::<[f32]>::new_slice(bq);
    let mut red_s = Shared::<[f32]>::new_slice(bq * lpr);
    let mut flag_s = Shared::<[u32]>::new_slice(bq * lpr);

    if cid < n_cubes {
        let c = rows_cube(cid, &a, work_off, inv_off, inv_rows, walk);
        let b = c.b;
        let g = c.g;
        let r = c.r;
        let q0 = c.q0;
        let nq = c.nq;
        let n_group_rows = c.n_group_rows;
        let f0 = c.f0;
        let rows_base = c.rows_base;
        let kbg = c.kbg;
        let klo = c.klo;
        let khi = c.khi;
        // Every row of a group reads the same kv head (group heads never straddle a GQA group).
        let hk = (g * gh) / (heads_q / heads_kv);
        let kv_base = (b * heads_kv + hk) * seq_k * head_dim;

        // Stage the cube's q (and dO) rows; zero the accumulators.
        let mut idx = u;
        while idx < bq * head_dim {
            let flat = f0 + idx / head_dim;
            let d = idx % head_dim;
            let mut qv = 0.0f32;
            let mut dov = 0.0f32;
            let (okr, h, i, _) = flat_row(inv_rows, flat, n_group_rows, g, gh, q0, nq, r, rows_base, qb, seq_q, gathered);
            if okr {
                let g_idx = ((b * heads_q + h) * seq_q + i) * head_dim + d;
                qv = f32::cast_from(q[g_idx]);
                if backward {
                    dov = f32::cast_from(d_o[g_idx]);
                }
            }
            let rr = idx / head_dim;
            q_s[rr * ld + d] = M::cast_from(qv);
            if backward {
                do_s[rr * ld + d] = M::cast_from(dov);
            }
            acc_s[rr * lacc + d] = 0.0f32;
            idx += nu;
        }

        // Row owners: the `lpr` lanes `l` with `l % 16 == rho % 16` share row `rho` of the cube,
        // lane `l` taking the columns `c` with `c % lpr == l / 16`.
        let sub = lane / 16;
        let rho = pl * 16 + lane % 16;
        let (row_valid, h, i, srow) = flat_row(inv_rows, f0 + rho, n_group_rows, g, gh, q0, nq, r, rows_base, qb, seq_q, gathered);
        let hb = h / (heads_q / heads_b);
        let row = (b * heads_q + h) * seq_q + i;
        let bias_base = (b * heads_b + hb) * seq_k;
        let mut m_run = comptime!(NEG_BIG).runtime();
        let mut l_run = 0.0f32;
        let st = row_stats(thr_v, thr_i, lse, delta, (b * heads_b + hb) * seq_q + i, row, row_valid, has_thr, backward);
        let (row_thr, row_thr_i, lse_row, delta_row, row_active) = (st.thr, st.thr_i, st.lse, st.delta, st.active);
        sync_cube();

        let (n_entries, list_base) = row_entries(b, n_gh, g, n_rb, r, cap, blocks);
        for e in 0..n_entries {
            let (e_lo, e_hi) = entry_keys(sched, list_base, e, klo, khi, key_block, seq_k, blocks);
            let n_tiles = entry_tiles(e_lo, e_hi, tile_k);
            for t in 0..n_tiles {
                let t0 = e_lo as usize + t * tile_k;
                let t1 = min(t0 + tile_k, e_hi as usize);
                let mut cube_any = true;
                if has_thr {
                    // Skip tiles where the threshold drops every visible key of every row.
                    let mut any = false;
                    if row_active {
                        for kc in 0..tile_k / lpr {
                            let j = t0 + kc * lpr + sub;
                            if j < t1 && pair_visible(i, j, off, w, causal, windowed) {
                                let bj = f32::cast_from(bias[bias_base + j]);
                                if key_kept(bj, j, row_thr, row_thr_i) {
                                    any = true;
                                }
                            }
                        }
                    }
                    cube_any = any_in_cube(&mut flag_s, any, u, comptime!(bq * lpr));
                    sync_cube();
                }
                if cube_any {
                    let mut idx2 = u;
                    while idx2 < tile_k * head_dim {
                        let kk = idx2 / head_dim;
                        let mut kv = 0.0f32;
                        let mut vv = 0.0f32;
                        if t0 + kk < t1 {
                            let g_idx = kv_base + t0 * head_dim + idx2;
                            kv = f32::cast_from(k[g_idx]);
                            vv = f32::cast_from(v[g_idx]);
                        }
                        k_s[kk * ld + idx2 % head_dim] = M::cast_from(kv);
                        v_s[kk * ld + idx2 % head_dim] = M::cast_from(vv);
                        idx2 += nu;
                    }
                    sync_cube();
                    // S = Q K^T (and dP = dO V^T) for this plane's 16 rows.
                    for n in 0..tile_k / 16 {
                        mma_tile::<M>(
                            &q_s,
                            pl * 16 * ld,
                            ld as u32,
                            &k_s,
                            n * 16 * ld,
                            ld as u32,
                            &mut s_s,
                            pl * 16 * ls + n * 16,
                            ls as u32,
                            head_dim,
                            mk,
                            true,
                            false,
                        );
                        if backward {
                            mma_tile::<M>(
                                &do_s,
                                pl * 16 * ld,
                                ld as u32,
                                &v_s,
                                n * 16 * ld,
                                ld as u32,
                                &mut dp_s,
                                pl * 16 * ls + n * 16,
                                ls as u32,
                                head_dim,
                                mk,
                                true,
                                false,
                            );
                        }
                    }
                    sync_cube();
                    let sb = rho * ls;
                    let pb = rho * lp;
                    if backward {
                        for kc in 0..tile_k / lpr {
                            let kk = kc * lpr + sub;
                            let j = t0 + kk;
                            let mut ds = 0.0f32;
                            if row_active && j < t1 && pair_visible(i, j, off, w, causal, windowed) {
                                let mut keep = true;
                                let mut s = s_s[sb + kk] * scale;
                                if has_bias {
                                    let bj = f32::cast_from(bias[bias_base + j]);
                                    s += bj;
                                    if has_thr {
                                        keep = key_kept(bj, j, row_thr, row_thr_i);
                                    }
                                }
                                if keep {
                                    let p = (s - lse_row).exp();
                                    ds = p * (dp_s[sb + kk] - delta_row) * scale;
                                }
                            }
                            p_s[pb + kk] = to_operand::<M>(ds, rne_bf16);
                        }
                    } else {
                        let mut t_max = comptime!(NEG_BIG).runtime();
                        for kc in 0..tile_k / lpr {
                            let kk = kc * lpr + sub;
                            let j = t0 + kk;
                            let mut s = comptime!(NEG_BIG).runtime();
                            if row_valid && j < t1 && pair_visible(i, j, off, w, causal, windowed) {
                                let mut keep = true;
                                let mut sv = s_s[sb + kk] * scale;
                                if has_bias {
                                    let bj = f32::cast_from(bias[bias_base + j]);
                                    sv += bj;
                                    if has_thr {
                                        keep = key_kept(bj, j, row_thr, row_thr_i);
                                    }
                                }
                                if keep {
                                    s = sv;
                                }
                            }
                            s_s[sb + kk] = s;
                            t_max = max(t_max, s);
                        }
                        red_s[rho * lpr + sub] = t_max;
                        sync_cube();
                        for x in 0..lpr {
                            t_max = max(t_max, red_s[rho * lpr + x]);
                        }
                        // Every lane of a row computes the same m_new and corr; each keeps
                        // the partial sum of its own columns.
                        let m_new = max(m_run, t_max);
                        let corr = (m_run - m_new).exp();
                        l_run *= corr;
                        for kc in 0..tile_k / lpr {
                            let kk = kc * lpr + sub;
                            let s = s_s[sb + kk];
                            let mut p = 0.0f32;
                            if s > NEG_BIG {
                                p = (s - m_new).exp();
                            }
                            l_run += p;
                            p_s[pb + kk] = to_operand::<M>(p, rne_bf16);
                        }
                        m_run = m_new;
                        if sub == 0 {
                            row_s[rho] = corr;
                        }
                    }
                    sync_cube();
                    if !backward {
                        let mut idx3 = u;
                        while idx3 < bq * head_dim {
                            acc_s[(idx3 / head_dim) * lacc + idx3 % head_dim] *= row_s[idx3 / head_dim];
                            idx3 += nu;
                        }
                        sync_cube();
                    }
                    // acc += P V (forward) or dS K (dQ).
                    for dn in 0..head_dim / 16 {
                        if backward {
                            mma_tile::<M>(
                                &p_s,
                                pl * 16 * lp,
                                lp as u32,
                                &k_s,
                                dn * 16,
                                ld as u32,
                                &mut acc_s,
                                pl * 16 * lacc + dn * 16,
                                lacc as u32,
                                tile_k,
                                mk,
                                false,
                                true,
                            );
                        } else {
                            mma_tile::<M>(
                                &p_s,
                                pl * 16 * lp,
                                lp as u32,
                                &v_s,
                                dn * 16,
                                ld as u32,
                                &mut acc_s,
                                pl * 16 * lacc + dn * 16,
                                lacc as u32,
                                tile_k,
                                mk,
                                false,
                                true,
                            );
                        }
                    }
                    sync_cube();
                }
            }
        }

        // Finish: the row's lanes add their partial sums; lane 0 of the row publishes 1/l,
        // writes the LSE and, gathered, where the row's results go: this block's slot of the
        // row's list (`flag_s` is free after the walk); everyone writes the rows.
        if !backward {
            red_s[rho * lpr + sub] = l_run;
        }
        sync_cube();
        if sub == 0 {
            let mut at = row;
            if gathered {
                at = row * cap + list_slot(sched, ((b * n_gh + g) * n_rb + srow) * cap, cap, kbg);
                flag_s[rho] = at as u32;
            }
            if backward {
                row_s[rho] = 1.0f32;
            } else {
                let mut l_tot = 0.0f32;
                for x in 0..lpr {
                    l_tot += red_s[rho * lpr + x];
                }
                let mut lv = neg_inf;
                row_s[rho] = 0.0f32;
                if l_tot > 0.0f32 {
                    row_s[rho] = 1.0f32 / l_tot;
                    lv = m_run + l_tot.ln();
                }
                if row_valid {
                    if gathered {
                        part_lse[at] = lv;
                    } else {
                        lse[row] = lv;
                    }
                }
            }
        }
        sync_cube();
        let mut idx4 = u;
        while idx4 < bq * head_dim {
            let rr = idx4 / head_dim;
            let col = idx4 % head_dim;
            let (okw, hh, ii, _) = flat_row(inv_rows, f0 + rr, n_group_rows, g, gh, q0, nq, r, rows_base, qb, seq_q, gathered);
            if okw {
                let val = acc_s[rr * lacc + col] * row_s[rr];
                if gathered {
                    part[flag_s[rr] as usize * head_dim + col] = val;
                } else {
                    out[((b * heads_q + hh) * seq_q + ii) * head_dim + col] = F::cast_from(val);
                }
            }
            idx4 += nu;
        }
    }
}

/// Key-major backward on tensor cores: dK, dV and dbias. Same arguments, cube numbering and
/// query-row walk as [`fn@crate::kernels::attn_keys_kernel`], with `16 * planes` keys per cube
/// and query rows staged in chunks of `tile_q` (a multiple of 16).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn mma_keys_kernel<F: Float, M: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    bias: &[F],
    thr_v: &[f32],
    thr_i: &[i32],
    inv_off: &[i32],
    inv_rows: &[i32],
    d_o: &[F],
    lse: &[f32],
    delta: &[f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dbias: &mut [f32],
    a: KeysArgs,
    #[comptime] planes: usize,
    #[comptime] lpr: usize,
    #[comptime] head_dim: usize,
    #[comptime] tile_q: usize,
    #[comptime] mk: usize,
    #[comptime] rne_bf16: bool,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_thr: bool,
    #[comptime] blocks: bool,
) {
    let off = a.off;
    let w = a.w;
    let scale = a.scale;
    let heads_q = a.heads_q as usize;
    let heads_kv = a.heads_kv as usize;
    let seq_q = a.seq_q as usize;
    let seq_k = a.seq_k as usize;
    let heads_b = a.heads_b as usize;
    let heads_s = a.heads_s as usize;
    let qb = a.query_block as usize;
    let n_rb = a.n_row_blocks as usize;
    let cap = a.cap as usize;
    let key_block = a.key_block as usize;
    let n_sub = a.n_sub as usize;
    let n_kt = a.n_key_tiles as usize;
    let n_split = a.n_split as usize;
    let bk = comptime!(planes * 16);
    let ld = comptime!(head_dim + 8);
    let lacc = comptime!(head_dim + 4);
    let ls = comptime!(tile_q + 4);
    let lp = comptime!(tile_q + 8);

    let lane = UNIT_POS_X as usize;
    let pl = UNIT_POS_Y as usize;
    let u = UNIT_POS as usize;
    let nu = CUBE_DIM as usize;
    let cid = cube_linear();

    let mut k_s = Shared::<[M]>::new_aligned_slice(bk * ld, 32usize);
    let mut v_s = Shared::<[M]>::new_aligned_slice(bk * ld, 32usize);
    let mut q_s = Shared::<[M]>::new_aligned_slice(tile_q * ld, 32usize);
    let mut do_s = Shared::<[M]>::new_aligned_slice(tile_q * ld, 32usize);
    let mut pt_s = Shared::<[M]>::new_aligned_slice(bk * lp, 32usize);
    let mut dk_s = Shared::<[f32]>::new_aligned_slice(bk * lacc, 32usize);
    let mut dv_s = Shared::<[f32]>::new_aligned_slice(bk * lacc, 32usize);
    let mut st_s = Shared::<[f32]>::new_aligned_slice(bk * ls, 32usize);
    let mut dpt_s = Shared::<[f32]>::new_aligned_slice(bk * ls, 32usize);
    let mut red_s = Shared::<[f32]>::new_slice(bk * lpr);
    let mut qi_s = Shared::<[i32]>::new_slice(tile_q);
    let mut lse_s = Shared::<[f32]>::new_slice(tile_q);
    let mut dl_s = Shared::<[f32]>::new_slice(tile_q);
    let mut tv_s = Shared::<[f32]>::new_slice(tile_q);
    let mut ti_s = Shared::<[i32]>::new_slice(tile_q);
    let mut flag_s = Shared::<[u32]>::new_slice(bk * lpr);

    let kc = key_cube(&a, cid, head_dim);
    if kc.valid {
        let (z, t, hk, b) = (kc.z, kc.t, kc.hk, kc.b);
        let (kv_out, bias_out, group, g_sel, g_b) = (kc.kv_out, kc.bias_out, kc.group, kc.g_sel, kc.g_b);

        let (kb, t0, t1) = key_tile(t, n_sub, bk, key_block, seq_k, blocks);
        let kv_base = (b * heads_kv + hk) * seq_k * head_dim;

        let mut idx = u;
        while idx < bk * head_dim {
            let mut kv = 0.0f32;
            let mut vv = 0.0f32;
            if t0 + idx / head_dim < t1 {
                kv = f32::cast_from(k[kv_base + t0 * head_dim + idx]);
                vv = f32::cast_from(v[kv_base + t0 * head_dim + idx]);
            }
            let rr = idx / head_dim;
            let d = idx % head_dim;
            k_s[rr * ld + d] = M::cast_from(kv);
            v_s[rr * ld + d] = M::cast_from(vv);
            dk_s[rr * lacc + d] = 0.0f32;
            dv_s[rr * lacc + d] = 0.0f32;
            idx += nu;
        }

        // Key owners: the `lpr` lanes with `l % 16 == kr % 16` share key `j` (row `kr` of the
        // cube's keys), lane `l` taking the query rows `x` with `x % lpr == l / 16`.
        let sub = lane / 16;
        let kr = pl * 16 + lane % 16;
        let j = t0 + kr;
        let key_valid = j < t1;
        let mut db_acc = 0.0f32;
        sync_cube();

        for hh in 0..group {
            let h = hk * group + hh;
            let hb = h / g_b;
            let bias_base = (b * heads_b + hb) * seq_k;
            let mut bias_j = 0.0f32;
            if has_bias && key_valid {
                bias_j = f32::cast_from(bias[bias_base + j]);
            }
            let spc = chunk_slots(qb, tile_q, blocks);
            let bs = b * heads_s + h / g_sel;
            let (rows_base, qa, n_slots) =
                head_walk(inv_off, inv_rows, bs, kb, n_kt / n_sub, n_rb, cap, qb, t0, t1, seq_q, off, w, blocks, causal, windowed);
            let n_ch = n_slots.div_ceil(spc);
            let rows = chunk_rows(rows_base, qa, n_slots, spc, qb, seq_q, (b * heads_q + h) * seq_q, (b * heads_b + hb) * seq_q);
            let mut ch = z;
            while ch < n_ch {
                stage_chunk_rows(
                    inv_rows, lse, delta, thr_v, thr_i, &mut qi_s, &mut lse_s, &mut dl_s, &mut tv_s, &mut ti_s, &rows, ch, u,
                    nu, tile_q, has_thr, blocks,
                );
                let mut any = false;
                if key_valid {
                    for xc in 0..tile_q / lpr {
                        let x2 = xc * lpr + sub;
                        let qi = qi_s[x2];
                        if qi >= 0 && lse_s[x2] > NEG_BIG {
                            let mut keep = pair_visible(qi as usize, j, off, w, causal, windowed);
                            if has_thr && keep {
                                keep = key_kept(bias_j, j, tv_s[x2], ti_s[x2]);
                            }
                            if keep {
                                any = true;
                            }
                        }
                    }
                }
                if any_in_cube(&mut flag_s, any, u, comptime!(bk * lpr)) {
                    let mut idx2 = u;
                    while idx2 < tile_q * head_dim {
                        let qi = qi_s[idx2 / head_dim];
                        let mut qv = 0.0f32;
                        let mut dov = 0.0f32;
                        if qi >= 0 {
                            let g_idx = ((b * heads_q + h) * seq_q + qi as usize) * head_dim + idx2 % head_dim;
                            qv = f32::cast_from(q[g_idx]);
                            dov = f32::cast_from(d_o[g_idx]);
                        }
                        q_s[(idx2 / head_dim) * ld + idx2 % head_dim] = M::cast_from(qv);
                        do_s[(idx2 / head_dim) * ld + idx2 % head_dim] = M::cast_from(dov);
                        idx2 += nu;
                    }
                    sync_cube();
                    // S^T = K Q^T and dP^T = V dO^T for this plane's 16 keys.
                    for n in 0..tile_q / 16 {
                        mma_tile::<M>(
                            &k_s,
                            pl * 16 * ld,
                            ld as u32,
                            &q_s,
                            n * 16 * ld,
                            ld as u32,
                            &mut st_s,
                            pl * 16 * ls + n * 16,
                            ls as u32,
                            head_dim,
                            mk,
                            true,
                            false,
                        );
                        mma_tile::<M>(
                            &v_s,
                            pl * 16 * ld,
                            ld as u32,
                            &do_s,
                            n * 16 * ld,
                            ld as u32,
                            &mut dpt_s,
                            pl * 16 * ls + n * 16,
                            ls as u32,
                            head_dim,
                            mk,
                            true,
                            false,
                        );
                    }
                    sync_cube();
                    {
                        let sb = kr * ls;
                        let pb = kr * lp;
                        for xc4 in 0..tile_q / lpr {
                            let x4 = xc4 * lpr + sub;
                            let qi = qi_s[x4];
                            let mut p = 0.0f32;
                            let mut ds = 0.0f32;
                            if key_valid && qi >= 0 {
                                let lse_i = lse_s[x4];
                                let mut keep = lse_i > NEG_BIG;
                                keep = keep && pair_visible(qi as usize, j, off, w, causal, windowed);
                                if has_thr && keep {
                                    keep = key_kept(bias_j, j, tv_s[x4], ti_s[x4]);
                                }
                                if keep {
                                    let mut s = st_s[sb + x4] * scale;
                                    if has_bias {
                                        s += bias_j;
                                    }
                                    p = (s - lse_i).exp();
                                    ds = p * (dpt_s[sb + x4] - dl_s[x4]);
                                    db_acc += ds;
                                }
                            }
                            pt_s[pb + x4] = to_operand::<M>(p, rne_bf16);
                            st_s[sb + x4] = ds * scale;
                        }
                    }
                    sync_cube();
                    // dV += P^T dO.
                    for dn in 0..head_dim / 16 {
                        mma_tile::<M>(
                            &pt_s,
                            pl * 16 * lp,
                            lp as u32,
                            &do_s,
                            dn * 16,
                            ld as u32,
                            &mut dv_s,
                            pl * 16 * lacc + dn * 16,
                            lacc as u32,
                            tile_q,
                            mk,
                            false,
                            true,
                        );
                    }
                    sync_cube();
                    for xc5 in 0..tile_q / lpr {
                        let x5 = xc5 * lpr + sub;
                        pt_s[kr * lp + x5] = to_operand::<M>(st_s[kr * ls + x5], rne_bf16);
                    }
                    sync_cube();
                    // dK += dS^T Q.
                    for dn in 0..head_dim / 16 {
                        mma_tile::<M>(
                            &pt_s,
                            pl * 16 * lp,
                            lp as u32,
                            &q_s,
                            dn * 16,
                            ld as u32,
                            &mut dk_s,
                            pl * 16 * lacc + dn * 16,
                            lacc as u32,
                            tile_q,
                            mk,
                            false,
                            true,
                        );
                    }
                }
                sync_cube();
                ch += n_split;
            }
            if has_bias && (h + 1) % g_b == 0 {
                red_s[kr * lpr + sub] = db_acc;
                sync_cube();
                if key_valid && sub == 0 {
                    let mut db = 0.0f32;
                    for x in 0..lpr {
                        db += red_s[kr * lpr + x];
                    }
                    dbias[bias_out + bias_base + j] = db;
                }
                sync_cube();
                db_acc = 0.0f32;
            }
        }

        let mut idx5 = u;
        while idx5 < bk * head_dim {
            if t0 + idx5 / head_dim < t1 {
                let a5 = (idx5 / head_dim) * lacc + idx5 % head_dim;
                dk[kv_out + kv_base + t0 * head_dim + idx5] = dk_s[a5];
                dv[kv_out + kv_base + t0 * head_dim + idx5] = dv_s[a5];
            }
            idx5 += nu;
        }
    }
}
