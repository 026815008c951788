//! dQ on register fragments (query-major, see [`super`]): per key tile `S = Q K^T` and
//! `dP = dO V^T`, `dS = P (dP - delta) scale` with `P = exp(S - lse)`, `dQ += dS K`.

use crate::row_walk::row_entries;
use super::rows::{lane_rows, next_tile, rows_fragments, stage_rows, stage_tile, wait_tile};
use super::{FragmentConfig, V2, V8, fast_exp, list_slot, masked_score, product_abt, product_pb, rows_cube, rows_cube_count, seek_entry, staged_score, tile_interior};
use crate::kernels::{NEG_BIG, cube_linear};
use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;
use crate::args::RowsArgs;

/// Query-major dQ: reads `lse` and `delta = rowsum(dO * O)`, writes `out = dQ` (in pairs of
/// elements). Same cube numbering, row groups and schedule walk as
/// `super::forward::fragment_forward_kernel`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn fragment_dq_kernel<F: Float>(
    q: &[Vector<F, V8>],
    k: &[Vector<F, V8>],
    v: &[Vector<F, V8>],
    bias: &[F],
    thr_v: &[f32],
    thr_i: &[i32],
    kpos: &[i32],
    sched: &[i32],
    inv_off: &[i32],
    inv_rows: &[i32],
    work_off: &[i32],
    d_o: &[Vector<F, V8>],
    delta: &[f32],
    lse: &[f32],
    out: &mut [Vector<F, V2>],
    part: &mut [Vector<f32, V2>],
    a: RowsArgs,
    #[comptime] cfg: FragmentConfig,
) {
    let off = a.off;
    let w = a.w;
    let scale = a.scale;
    let heads_q = a.heads_q as usize;
    let heads_kv = a.heads_kv as usize;
    let seq_q = a.seq_q as usize;
    let seq_k = a.seq_k as usize;
    let heads_b = a.heads_b as usize;
    let gh = a.group_heads as usize;
    let n_rb = a.n_row_blocks as usize;
    let cap = a.cap as usize;
    let key_block = a.key_block as usize;
    let n_gh = heads_q / gh;

    let planes = comptime!(cfg.planes);
    let head_dim = comptime!(cfg.head_dim);
    let tile_k = comptime!(cfg.tile);
    let bq = comptime!(planes * 16);
    let vr = comptime!(head_dim / 8);
    let sr = comptime!(head_dim / 8 + 1);
    let dk = comptime!(head_dim / 16);
    let dn = comptime!(head_dim / 8);
    let kn = comptime!(tile_k / 8);

    let lane = UNIT_POS_X as usize;
    let pl = UNIT_POS_Y as usize;
    let u = pl * 32 + lane;
    let cid = cube_linear();
    let n_cubes = rows_cube_count(&a, comptime!(cfg.walk()));

    let mut q_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(bq * sr, 16usize);
    let mut do_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(bq * sr, 16usize);
    // Two stages of K/V: the copies of the next tile run while this one is multiplied.
    let mut k_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(2 * tile_k * sr, 16usize);
    let mut v_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(2 * tile_k * sr, 16usize);
    // Staged gathered keys: the positions and biases of each stage's keys.
    let meta_len = comptime!(if cfg.staged_keys { 2 * tile_k } else { 1 });
    let mut kp_s = Shared::<[i32]>::new_slice(meta_len);
    let mut bias_s = Shared::<[f32]>::new_slice(meta_len);
    let bar0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);

    if cid < n_cubes {
        let c = rows_cube(cid, &a, work_off, inv_off, inv_rows, comptime!(cfg.walk()));
        let b = c.b;
        let g = c.g;
        let r = c.r;
        let n_group_rows = c.n_group_rows;
        let f0 = c.f0;
        let cq_lo = c.cq_lo;
        let cq_hi = c.cq_hi;
        let kbg = c.kbg;
        let klo = c.klo;
        let khi = c.khi;
        let hk = (g * gh) / (heads_q / heads_kv);
        let kv_base = (b * heads_kv + hk) * seq_k * vr;
        // Staged keys read one bias row: the bias has a head per kv head.
        let key_bias_base = (b * heads_b + hk) * seq_k;
        // Stage the cube's Q and dO rows; the two rows this lane holds.
        stage_rows::<F>(q, &mut q_s, &c, &a, inv_rows, u, cfg);
        stage_rows::<F>(d_o, &mut do_s, &c, &a, inv_rows, u, cfg);
        let tq = lane % 4;
        let lr = lane_rows(&c, &a, inv_rows, thr_v, thr_i, pl, lane, cfg);
        let row0 = (b * heads_q + lr.h0) * seq_q + lr.i0;
        let row1 = (b * heads_q + lr.h1) * seq_q + lr.i1;
        // Rows with no visible key (lse = -inf) get dQ = 0.
        let mut lse0 = comptime!(NEG_BIG).runtime();
        let mut lse1 = comptime!(NEG_BIG).runtime();
        let mut dl0 = 0.0f32;
        let mut dl1 = 0.0f32;
        if lr.ok0 {
            lse0 = lse[row0];
            dl0 = delta[row0];
        }
        if lr.ok1 {
            lse1 = lse[row1];
            dl1 = delta[row1];
        }
        let act0 = lr.ok0 && lse0 > NEG_BIG;
        let act1 = lr.ok1 && lse1 > NEG_BIG;
        sync_cube();
        let q_frag = rows_fragments::<F>(&q_s, pl, cfg);
        let do_frag = rows_fragments::<F>(&do_s, pl, cfg);

        let zero2 = Vector::<f32, V2>::cast_from(0.0f32);
        let mut o_acc = Array::<Vector<f32, V2>>::new(comptime!(2 * dn));
        #[unroll]
        for x in 0..comptime!(2 * dn) {
            o_acc[x] = zero2;
        }
        let mut s_acc = Array::<Vector<f32, V2>>::new(comptime!(2 * kn));
        let mut dp_acc = Array::<Vector<f32, V2>>::new(comptime!(2 * kn));

        let (n_entries, list_base) = row_entries(b, n_gh, g, n_rb, r, cap, cfg.blocks);
        // The same flattened, double-buffered walk as the forward.
        let (e_first, lo_first, hi_first) = seek_entry(sched, list_base, 0usize, n_entries, klo, khi, key_block, seq_k, cfg.blocks);
        let mut e = e_first;
        let mut hi = hi_first;
        let mut t0n = lo_first as usize;
        let mut ph0 = 0u32;
        let mut ph1 = 0u32;
        let mut st = 0usize;
        if e < n_entries {
            stage_tile::<F>(k, v, bias, kpos, &mut k_s, &mut v_s, &mut kp_s, &mut bias_s, &bar0, &bar1, kv_base, key_bias_base, t0n, min(t0n + tile_k, hi as usize), 0usize, u, cfg);
        }
        while e < n_entries {
            let t0 = t0n;
            let t1 = min(t0 + tile_k, hi as usize);
            // Advance to the next tile and start its copies into the other stage.
            let (e2, hi2, t2) = next_tile(sched, list_base, e, hi, t1, n_entries, klo, khi, key_block, seq_k, cfg.blocks);
            e = e2;
            hi = hi2;
            t0n = t2;
            if e < n_entries {
                stage_tile::<F>(k, v, bias, kpos, &mut k_s, &mut v_s, &mut kp_s, &mut bias_s, &bar0, &bar1, kv_base, key_bias_base, t0n, min(t0n + tile_k, hi as usize), 1 - st, u, cfg);
            }
            let (p0, p1) = wait_tile(&bar0, &bar1, st, ph0, ph1);
            ph0 = p0;
            ph1 = p1;
            // S = Q K^T and dP = dO V^T for this plane's 16 rows.
            product_abt::<F>(&q_frag, &k_s, st * tile_k, &mut s_acc, kn, dk, sr);
            product_abt::<F>(&do_frag, &v_s, st * tile_k, &mut dp_acc, kn, dk, sr);
            let interior = tile_interior(t0, t1, f0, n_group_rows, cq_lo, cq_hi, off, w, cfg);
            // dS = P (dP - delta) scale, in place of S.
            #[unroll]
            for n in 0..kn {
                let r0 = s_acc[2 * n];
                let r1 = s_acc[2 * n + 1];
                let d0 = dp_acc[2 * n];
                let d1 = dp_acc[2 * n + 1];
                let mut ds0 = zero2;
                let mut ds1 = zero2;
                #[unroll]
                for x in 0..2usize {
                    let j = t0 + n * 8 + tq * 2 + x;
                    let mut s0 = r0.extract(x) * scale;
                    let mut s1 = r1.extract(x) * scale;
                    if interior && act0 && act1 {
                        if cfg.has_bias {
                            s0 += f32::cast_from(bias[lr.bias_base0 + j]);
                            s1 += f32::cast_from(bias[lr.bias_base1 + j]);
                        }
                    } else if cfg.staged_keys {
                        let slot = st * tile_k + n * 8 + tq * 2 + x;
                        s0 = staged_score(r0.extract(x), act0, lr.i0, slot, j < t1, &kp_s, &bias_s, lr.thr0, lr.thr_i0, off, w, scale, cfg);
                        s1 = staged_score(r1.extract(x), act1, lr.i1, slot, j < t1, &kp_s, &bias_s, lr.thr1, lr.thr_i1, off, w, scale, cfg);
                    } else {
                        s0 = masked_score::<F>(r0.extract(x), act0, lr.i0, j, t1, bias, lr.bias_base0, kpos, kv_base / vr, lr.thr0, lr.thr_i0, off, w, scale, cfg);
                        s1 = masked_score::<F>(r1.extract(x), act1, lr.i1, j, t1, bias, lr.bias_base1, kpos, kv_base / vr, lr.thr1, lr.thr_i1, off, w, scale, cfg);
                    }
                    let mut g0 = 0.0f32;
                    let mut g1 = 0.0f32;
                    if s0 > NEG_BIG {
                        g0 = fast_exp(s0 - lse0) * (d0.extract(x) - dl0) * scale;
                    }
                    if s1 > NEG_BIG {
                        g1 = fast_exp(s1 - lse1) * (d1.extract(x) - dl1) * scale;
                    }
                    ds0.insert(x, g0);
                    ds1.insert(x, g1);
                }
                s_acc[2 * n] = ds0;
                s_acc[2 * n + 1] = ds1;
            }
            // dQ += dS K (K rows are the k dimension here).
            product_pb::<F>(&s_acc, &k_s, st * tile_k, &mut o_acc, kn, dn, sr);
            // Every plane is done with this stage before the next iteration refills it.
            sync_cube();
            st = 1 - st;
        }

        // Gathered: dQ of this block goes to its slot of each row's list, for the reduction.
        let mut at0 = row0;
        let mut at1 = row1;
        if cfg.gathered {
            let list0 = ((b * n_gh + g) * n_rb + lr.srow0) * cap;
            let list1 = ((b * n_gh + g) * n_rb + lr.srow1) * cap;
            at0 = row0 * cap + list_slot(sched, list0, cap, kbg);
            at1 = row1 * cap + list_slot(sched, list1, cap, kbg);
        }
        #[unroll]
        for n in 0..dn {
            let a0 = o_acc[2 * n];
            let a1 = o_acc[2 * n + 1];
            let mut w0 = Vector::<F, V2>::empty();
            let mut w1 = Vector::<F, V2>::empty();
            #[unroll]
            for x in 0..2usize {
                w0.insert(x, F::cast_from(a0.extract(x)));
                w1.insert(x, F::cast_from(a1.extract(x)));
            }
            // `out` and `part` are indexed in pairs of elements.
            if cfg.gathered {
                if lr.ok0 {
                    part[(at0 * head_dim + n * 8 + tq * 2) / 2] = a0;
                }
                if lr.ok1 {
                    part[(at1 * head_dim + n * 8 + tq * 2) / 2] = a1;
                }
            } else {
                if lr.ok0 {
                    out[(row0 * head_dim + n * 8 + tq * 2) / 2] = w0;
                }
                if lr.ok1 {
                    out[(row1 * head_dim + n * 8 + tq * 2) / 2] = w1;
                }
            }
        }
    }
}
