//! dK, dV and dbias on register fragments (key-major, see [`super`]). A cube owns
//! `16 * planes` keys of one kv head; for each query head of the group it walks the query
//! rows that can see those keys (dense: a contiguous range; blocks: the inverted schedule),
//! `tile` rows at a time, and per tile computes `S^T = K Q^T`, `P^T = exp(S^T - lse)`,
//! `dV += P^T dO`, `dP^T = V dO^T`, `dS^T = P^T (dP^T - delta)`, `dK += scale dS^T Q`, with
//! dK and dV in registers for the whole walk. The walks are cut into pieces of similar
//! length ([`crate::key_pieces`]): a cube takes one piece of one tile's walk and writes f32
//! partial sums for that tile, which a second kernel adds up.

use super::{FragmentConfig, V2, V8, copy_vec_async, fast_exp, product_abt_staged, product_pb, quad_sum};
use crate::key_pieces::{head_walk, key_tile, walk_chunks};
use crate::kernels::{NEG_BIG, cube_linear, key_kept, pair_visible, slot_query};
use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;
use crate::args::KeysArgs;

/// Key-major backward. Cube `cid` is piece `cid` of the pass (`tile_of`, `first`: see
/// [`crate::key_pieces`]); it walks its share of the query rows of its key tile as
/// [`fn@crate::mma::mma_keys_kernel`] walks a whole tile, and writes f32 partials
/// `dk`, `dv` `[piece, 16 * planes, D]` and `dbias` `[piece, Hb / Hkv, 16 * planes]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn fragment_dkdv_kernel<F: Float>(
    q: &[Vector<F, V8>],
    k: &[Vector<F, V8>],
    v: &[Vector<F, V8>],
    bias: &[F],
    thr_v: &[f32],
    thr_i: &[i32],
    kpos: &[i32],
    inv_off: &[i32],
    inv_rows: &[i32],
    first: &[i32],
    tile_of: &[i32],
    d_o: &[Vector<F, V8>],
    lse: &[f32],
    delta: &[f32],
    dk: &mut [Vector<f32, V2>],
    dv: &mut [Vector<f32, V2>],
    dbias: &mut [f32],
    dk_out: &mut [Vector<F, V2>],
    dv_out: &mut [Vector<F, V2>],
    db_out: &mut [F],
    a: KeysArgs,
    #[comptime] cfg: FragmentConfig,
) {
    let off = a.off;
    let w = a.w;
    let scale = a.scale;
    let n_batch = a.n_batch as usize;
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

    let planes = comptime!(cfg.planes);
    let head_dim = comptime!(cfg.head_dim);
    let tile_q = comptime!(cfg.tile);
    let bk = comptime!(planes * 16);
    let nu = comptime!(planes * 32);
    let vr = comptime!(head_dim / 8);
    let sr = comptime!(head_dim / 8 + 1);
    let dk_steps = comptime!(head_dim / 16);
    let dn = comptime!(head_dim / 8);
    let qn = comptime!(tile_q / 8);

    let lane = UNIT_POS_X as usize;
    let pl = UNIT_POS_Y as usize;
    let u = pl * 32 + lane;
    let cid = cube_linear();

    let mut k_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(bk * sr, 16usize);
    let mut v_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(bk * sr, 16usize);
    // Two stages of query rows (Q, dO and their per-row data): the copies of the next chunk
    // run while this one is multiplied.
    let mut q_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(2 * tile_q * sr, 16usize);
    let mut do_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(2 * tile_q * sr, 16usize);
    let mut qi_s = Shared::<[i32]>::new_slice(2 * tile_q);
    let mut lse_s = Shared::<[f32]>::new_slice(2 * tile_q);
    let mut dl_s = Shared::<[f32]>::new_slice(2 * tile_q);
    let mut tv_s = Shared::<[f32]>::new_slice(2 * tile_q);
    let mut ti_s = Shared::<[i32]>::new_slice(2 * tile_q);
    let bar0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);

    let n_items = n_batch * heads_kv * n_kt;
    if cid < first[n_items] as usize {
        let item = tile_of[cid] as usize;
        let z = cid - first[item] as usize;
        let n_pieces = first[item + 1] as usize - first[item] as usize;
        let single = n_pieces == 1;
        let t = item % n_kt;
        let hk = (item / n_kt) % heads_kv;
        let b = item / (n_kt * heads_kv);
        let group = heads_q / heads_kv;
        let g_sel = heads_q / heads_s;
        let g_b = heads_q / heads_b;
        let nbh = heads_b / heads_kv;
        let (kb, t0, t1) = key_tile(t, n_sub, bk, key_block, seq_k, cfg.blocks);
        let mut spc = tile_q.runtime();
        if cfg.blocks && qb <= tile_q {
            spc = (tile_q / qb) * qb;
        }
        // This piece's share of the tile's walk: chunks `c_lo..c_hi` of the walks of the
        // group's heads, concatenated in head order.
        let n_kb = n_kt / n_sub;
        let n_chunks = walk_chunks(inv_off, inv_rows, &a, b, hk, kb, t0, t1, spc, cfg.blocks, cfg.causal, cfg.windowed);
        let c_lo = n_chunks * z / n_pieces;
        let c_hi = n_chunks * (z + 1) / n_pieces;
        let mut c_base = 0usize;
        let kv_base = (b * heads_kv + hk) * seq_k;
        let zero8 = Vector::<F, V8>::cast_from(F::from_int(0));

        #[unroll]
        for it in 0..comptime!((bk * vr).div_ceil(nu)) {
            let idx = it * nu + u;
            if idx < bk * vr {
                let kr = idx / vr;
                let c = idx % vr;
                let mut kv = zero8;
                let mut vv = zero8;
                if t0 + kr < t1 {
                    // Gathered keys: slot `t0 + kr` holds key row `kpos[..]`.
                    let mut row = t0 + kr;
                    if cfg.key_pos {
                        row = kpos[kv_base + t0 + kr] as usize;
                    }
                    kv = k[(kv_base + row) * vr + c];
                    vv = v[(kv_base + row) * vr + c];
                }
                k_s[kr * sr + c] = kv;
                v_s[kr * sr + c] = vv;
            }
        }

        // The two keys this lane holds: rows `quad` and `quad + 8` of the plane's 16.
        let quad = lane / 4;
        let tq = lane % 4;
        let j0 = t0 + pl * 16 + quad;
        let j1 = j0 + 8;
        let kok0 = j0 < t1;
        let kok1 = j1 < t1;
        // Sequence positions of the two keys (gathered keys: from `kpos`).
        let mut jp0 = j0;
        let mut jp1 = j1;
        if cfg.key_pos {
            if kok0 {
                jp0 = kpos[kv_base + j0] as usize;
            }
            if kok1 {
                jp1 = kpos[kv_base + j1] as usize;
            }
        }

        let zero2 = Vector::<f32, V2>::cast_from(0.0f32);
        let mut dk_acc = Array::<Vector<f32, V2>>::new(comptime!(2 * dn));
        let mut dv_acc = Array::<Vector<f32, V2>>::new(comptime!(2 * dn));
        #[unroll]
        for x in 0..comptime!(2 * dn) {
            dk_acc[x] = zero2;
            dv_acc[x] = zero2;
        }
        let mut st = Array::<Vector<f32, V2>>::new(comptime!(2 * qn));
        let mut dpt = Array::<Vector<f32, V2>>::new(comptime!(2 * qn));
        let mut db0 = 0.0f32;
        let mut db1 = 0.0f32;
        let mut ph0 = 0u32;
        let mut ph1 = 0u32;
        sync_cube();

        for hh in 0..group {
            let h = hk * group + hh;
            let hb = h / g_b;
            let bias_base = (b * heads_b + hb) * seq_k;
            let mut bias0 = 0.0f32;
            let mut bias1 = 0.0f32;
            if cfg.has_bias {
                if kok0 {
                    bias0 = f32::cast_from(bias[bias_base + jp0]);
                }
                if kok1 {
                    bias1 = f32::cast_from(bias[bias_base + jp1]);
                }
            }
            let bs = b * heads_s + h / g_sel;
            let (rows_base, qa, n_slots) =
                head_walk(inv_off, inv_rows, bs, kb, n_kb, n_rb, cap, qb, t0, t1, seq_q, off, w, cfg.blocks, cfg.causal, cfg.windowed);
            let n_ch = n_slots.div_ceil(spc);
            // This head's chunks inside the piece's range.
            let mut ch = min(n_ch, select(c_lo > c_base, c_lo - c_base, 0usize));
            let ch_end = min(n_ch, select(c_hi > c_base, c_hi - c_base, 0usize));
            c_base += n_ch;
            let mut stg = 0usize;
            if ch < ch_end {
                stage_rows::<F>(
                    q, d_o, lse, delta, thr_v, thr_i, inv_rows, &mut q_s, &mut do_s, &mut qi_s, &mut lse_s, &mut dl_s, &mut tv_s,
                    &mut ti_s, ch, 0usize, spc, n_slots, rows_base, qb, qa, b, h, hb, heads_q, heads_b, seq_q, u, cfg,
                );
                bar0.commit_copy_async();
                let _ = bar0.arrive();
            }
            while ch < ch_end {
                let chn = ch + 1;
                if chn < ch_end {
                    stage_rows::<F>(
                        q,
                        d_o,
                        lse,
                        delta,
                        thr_v,
                        thr_i,
                        inv_rows,
                        &mut q_s,
                        &mut do_s,
                        &mut qi_s,
                        &mut lse_s,
                        &mut dl_s,
                        &mut tv_s,
                        &mut ti_s,
                        chn,
                        1 - stg,
                        spc,
                        n_slots,
                        rows_base,
                        qb,
                        qa,
                        b,
                        h,
                        hb,
                        heads_q,
                        heads_b,
                        seq_q,
                        u,
                        cfg,
                    );
                    if stg == 0 {
                        bar1.commit_copy_async();
                        let _ = bar1.arrive();
                    } else {
                        bar0.commit_copy_async();
                        let _ = bar0.arrive();
                    }
                }
                if stg == 0 {
                    bar0.wait_parity(ph0);
                    ph0 ^= 1u32;
                } else {
                    bar1.wait_parity(ph1);
                    ph1 ^= 1u32;
                }
                // S^T = K Q^T and dP^T = V dO^T for this plane's 16 keys.
                product_abt_staged::<F>(&k_s, pl * 16, &q_s, stg * tile_q, &mut st, qn, dk_steps, sr);
                product_abt_staged::<F>(&v_s, pl * 16, &do_s, stg * tile_q, &mut dpt, qn, dk_steps, sr);

                // P^T in `st`, dS^T in `dpt`.
                #[unroll]
                for n in 0..qn {
                    let s0v = st[2 * n];
                    let s1v = st[2 * n + 1];
                    let d0v = dpt[2 * n];
                    let d1v = dpt[2 * n + 1];
                    let mut p0 = zero2;
                    let mut p1 = zero2;
                    let mut g0 = zero2;
                    let mut g1 = zero2;
                    #[unroll]
                    for x in 0..2usize {
                        let col = stg * tile_q + n * 8 + tq * 2 + x;
                        let qi = qi_s[col];
                        let lse_i = lse_s[col];
                        let dl_i = dl_s[col];
                        let mut row_ok = qi >= 0 && lse_i > NEG_BIG;
                        let mut thr = comptime!(NEG_BIG).runtime();
                        let mut thr_idx = 0i32;
                        if cfg.has_thr {
                            thr = tv_s[col];
                            thr_idx = ti_s[col];
                        }
                        let qq = max(qi, 0i32) as usize;
                        let mut keep0 = row_ok && kok0 && pair_visible(qq, jp0, off, w, cfg.causal || cfg.pos_causal, cfg.windowed);
                        let mut keep1 = row_ok && kok1 && pair_visible(qq, jp1, off, w, cfg.causal || cfg.pos_causal, cfg.windowed);
                        if cfg.has_thr {
                            keep0 = keep0 && key_kept(bias0, jp0, thr, thr_idx);
                            keep1 = keep1 && key_kept(bias1, jp1, thr, thr_idx);
                        }
                        row_ok = keep0 || keep1;
                        let mut pp0 = 0.0f32;
                        let mut pp1 = 0.0f32;
                        let mut gg0 = 0.0f32;
                        let mut gg1 = 0.0f32;
                        if row_ok {
                            if keep0 {
                                pp0 = fast_exp(s0v.extract(x) * scale + bias0 - lse_i);
                                gg0 = pp0 * (d0v.extract(x) - dl_i);
                            }
                            if keep1 {
                                pp1 = fast_exp(s1v.extract(x) * scale + bias1 - lse_i);
                                gg1 = pp1 * (d1v.extract(x) - dl_i);
                            }
                        }
                        db0 += gg0;
                        db1 += gg1;
                        p0.insert(x, pp0);
                        p1.insert(x, pp1);
                        g0.insert(x, gg0 * scale);
                        g1.insert(x, gg1 * scale);
                    }
                    st[2 * n] = p0;
                    st[2 * n + 1] = p1;
                    dpt[2 * n] = g0;
                    dpt[2 * n + 1] = g1;
                }
                // dV += P^T dO and dK += dS^T Q (query rows are the k dimension).
                product_pb::<F>(&st, &do_s, stg * tile_q, &mut dv_acc, qn, dn, sr);
                product_pb::<F>(&dpt, &q_s, stg * tile_q, &mut dk_acc, qn, dn, sr);
                // Every plane is done with this stage before the next iteration refills it.
                sync_cube();
                ch = chn;
                stg = 1 - stg;
            }
            if cfg.has_bias && (h + 1) % g_b == 0 {
                let s0 = quad_sum(db0);
                let s1 = quad_sum(db1);
                let db_base = (cid * nbh + hb - hk * nbh) * bk + pl * 16 + quad;
                if tq == 0 {
                    if single {
                        let out_base = (b * heads_b + hb) * seq_k;
                        if kok0 {
                            db_out[out_base + jp0] = F::cast_from(s0);
                        }
                        if kok1 {
                            db_out[out_base + jp1] = F::cast_from(s1);
                        }
                    } else {
                        if kok0 {
                            dbias[db_base] = s0;
                        }
                        if kok1 {
                            dbias[db_base + 8] = s1;
                        }
                    }
                }
                db0 = 0.0f32;
                db1 = 0.0f32;
            }
        }

        if single {
            // The tile's only piece: its sums are the gradients (the summing kernel skips
            // such tiles), written to the key's row in pairs of elements.
            let row0 = (kv_base + jp0) * head_dim;
            let row1 = (kv_base + jp1) * head_dim;
            #[unroll]
            for n in 0..dn {
                let c = n * 8 + tq * 2;
                if kok0 {
                    dk_out[(row0 + c) / 2] = to_storage::<F>(dk_acc[2 * n]);
                    dv_out[(row0 + c) / 2] = to_storage::<F>(dv_acc[2 * n]);
                }
                if kok1 {
                    dk_out[(row1 + c) / 2] = to_storage::<F>(dk_acc[2 * n + 1]);
                    dv_out[(row1 + c) / 2] = to_storage::<F>(dv_acc[2 * n + 1]);
                }
            }
        } else {
            // f32 partial sums of this piece, by key slot, in pairs of elements.
            let part_base = (cid * bk + pl * 16 + quad) * head_dim;
            #[unroll]
            for n in 0..dn {
                let c = n * 8 + tq * 2;
                if kok0 {
                    let at = (part_base + c) / 2;
                    dk[at] = dk_acc[2 * n];
                    dv[at] = dv_acc[2 * n];
                }
                if kok1 {
                    let at = (part_base + 8 * head_dim + c) / 2;
                    dk[at] = dk_acc[2 * n + 1];
                    dv[at] = dv_acc[2 * n + 1];
                }
            }
        }
    }
}

/// Fills stage `stg` with chunk `ch` of the walk: each row's query index, LSE, delta and
/// threshold (plain stores), and the asynchronous copies of its Q and dO rows (rows with no
/// query are zeroed). Each unit computes the query of the rows it copies itself, so no
/// barrier is needed between the two.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_rows<F: Float>(
    q: &[Vector<F, V8>],
    d_o: &[Vector<F, V8>],
    lse: &[f32],
    delta: &[f32],
    thr_v: &[f32],
    thr_i: &[i32],
    inv_rows: &[i32],
    q_s: &mut [Vector<F, V8>],
    do_s: &mut [Vector<F, V8>],
    qi_s: &mut [i32],
    lse_s: &mut [f32],
    dl_s: &mut [f32],
    tv_s: &mut [f32],
    ti_s: &mut [i32],
    ch: usize,
    stg: usize,
    spc: usize,
    n_slots: usize,
    rows_base: usize,
    qb: usize,
    qa: usize,
    b: usize,
    h: usize,
    hb: usize,
    heads_q: usize,
    heads_b: usize,
    seq_q: usize,
    u: usize,
    #[comptime] cfg: FragmentConfig,
) {
    let tile_q = comptime!(cfg.tile);
    let vr = comptime!(cfg.head_dim / 8);
    let sr = comptime!(cfg.head_dim / 8 + 1);
    let nu = comptime!(cfg.planes * 32);
    let mut x = u;
    while x < tile_q {
        let slot = ch * spc + x;
        let mut qi = comptime!(-1i32).runtime();
        if x < spc && slot < n_slots {
            qi = slot_query(inv_rows, rows_base, slot, qb, qa, seq_q, cfg.blocks);
        }
        let at = stg * tile_q + x;
        qi_s[at] = qi;
        lse_s[at] = comptime!(NEG_BIG).runtime();
        dl_s[at] = 0.0f32;
        if qi >= 0 {
            let row = (b * heads_q + h) * seq_q + qi as usize;
            lse_s[at] = lse[row];
            dl_s[at] = delta[row];
            if cfg.has_thr {
                tv_s[at] = thr_v[(b * heads_b + hb) * seq_q + qi as usize];
                ti_s[at] = thr_i[(b * heads_b + hb) * seq_q + qi as usize];
            }
        }
        x += nu;
    }
    #[unroll]
    for it in 0..comptime!((tile_q * vr).div_ceil(nu)) {
        let idx = it * nu + u;
        if idx < tile_q * vr {
            let rr = idx / vr;
            let c = idx % vr;
            let slot = ch * spc + rr;
            let mut qi = comptime!(-1i32).runtime();
            if rr < spc && slot < n_slots {
                qi = slot_query(inv_rows, rows_base, slot, qb, qa, seq_q, cfg.blocks);
            }
            let valid = qi >= 0;
            let mut gi = 0usize;
            if valid {
                gi = ((b * heads_q + h) * seq_q + qi as usize) * vr + c;
            }
            let at = (stg * tile_q + rr) * sr + c;
            copy_vec_async::<F>(q, gi, q_s, at, valid);
            copy_vec_async::<F>(d_o, gi, do_s, at, valid);
        }
    }
}

/// Two f32 accumulators as two storage elements.
#[cube]
fn to_storage<F: Float>(x: Vector<f32, V2>) -> Vector<F, V2> {
    let mut o = Vector::<F, V2>::empty();
    #[unroll]
    for i in 0..2usize {
        o.insert(i, F::cast_from(x.extract(i)));
    }
    o
}
