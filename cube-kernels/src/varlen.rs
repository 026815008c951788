//! Packed variable-length sequences (FlashAttention's varlen convention) as intervals.
//!
//! Sequences are concatenated along the token axis: sequence `s` holds the query rows
//! `[cu_q[s], cu_q[s + 1])` and the keys `[cu_k[s], cu_k[s + 1])`. A row sees keys of its
//! own sequence only, under that sequence's causal mask (bottom-right aligned, so the
//! offset is `len_k - len_q` of the sequence, not of the whole pack) and window.
//!
//! Under these rules the keys a row sees form one interval, and so do the rows that see a
//! key; both interval lists are nondecreasing in both ends (rows of a later sequence see
//! later keys). That is what the kernels need: a tile of rows walks the keys from its first
//! row's `lo` to its last row's `hi`, a tile of keys the rows from its first key's `lo` to
//! its last key's `hi`, and inside a tile each pair is checked against its row's interval.
//! The intervals are computed here on the host (`O(seq)`, from the `O(sequences)`
//! boundaries the caller has on the host anyway) and uploaded once per call.

use crate::{Client, Handle, KernelError, invalid};

/// The visibility of a packed batch as per-row and per-key intervals (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VarlenBounds {
    /// `[seq_q, 2]` flattened: row `i` sees keys `[row_keys[2i], row_keys[2i + 1])`
    /// (an empty interval for a row that sees nothing).
    pub row_keys: Vec<i32>,
    /// `[seq_k, 2]` flattened: key `j` is seen by rows `[key_rows[2j], key_rows[2j + 1])`.
    pub key_rows: Vec<i32>,
}

/// [`VarlenBounds`] on the device, as the attention passes bind them
/// ([`crate::AttnInputs::segments`]): one i32 buffer, `row_keys` then `key_rows`
/// (`2 * (seq_q + seq_k)` values), so both passes bind the same buffer.
#[derive(Clone, Debug)]
pub struct SegmentBounds {
    /// `[row_keys | key_rows]`, i32.
    pub bounds: Handle,
    /// Query rows per head of the packed batch.
    pub seq_q: usize,
    /// Keys per head of the packed batch.
    pub seq_k: usize,
}

impl SegmentBounds {
    /// Uploads `bounds`.
    pub fn upload(client: &Client, bounds: &VarlenBounds) -> Self {
        Self {
            bounds: crate::host::upload_i32(client, &bounds.packed()),
            seq_q: bounds.row_keys.len() / 2,
            seq_k: bounds.key_rows.len() / 2,
        }
    }
}

impl VarlenBounds {
    /// `row_keys` followed by `key_rows`: the layout of [`SegmentBounds::bounds`].
    pub fn packed(&self) -> Vec<i32> {
        [self.row_keys.as_slice(), self.key_rows.as_slice()].concat()
    }
}

/// Checks one `cu_seqlens` list: starts at 0, never decreases, at least one sequence.
pub fn check_cu_seqlens(arg: &'static str, cu: &[usize]) -> Result<(), KernelError> {
    if cu.len() < 2 {
        return Err(invalid(arg, format!("needs at least two entries (one sequence), got {}", cu.len())));
    }
    if cu[0] != 0 {
        return Err(invalid(arg, format!("must start at 0, got {}", cu[0])));
    }
    if let Some(s) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(invalid(arg, format!("must not decrease: entry {} is {} after {}", s + 1, cu[s + 1], cu[s])));
    }
    if cu[cu.len() - 1] > i32::MAX as usize {
        return Err(invalid(arg, "total length exceeds i32::MAX"));
    }
    Ok(())
}

/// The intervals of a packed batch: sequence `s` has query rows `cu_q[s]..cu_q[s + 1]` and
/// keys `cu_k[s]..cu_k[s + 1]`; `causal` and `window` (a row sees the `window` most recent
/// key positions up to its own) apply within each sequence, as in [`crate::AttnProblem`].
pub fn varlen_bounds(cu_q: &[usize], cu_k: &[usize], causal: bool, window: Option<usize>) -> Result<VarlenBounds, KernelError> {
    check_cu_seqlens("cu_seqlens_q", cu_q)?;
    check_cu_seqlens("cu_seqlens_k", cu_k)?;
    if cu_q.len() != cu_k.len() {
        return Err(invalid(
            "cu_seqlens_k",
            format!("has {} sequences, cu_seqlens_q has {}", cu_k.len() - 1, cu_q.len() - 1),
        ));
    }
    if window == Some(0) {
        return Err(invalid("window", "must be at least 1"));
    }
    let seq_q = cu_q[cu_q.len() - 1];
    let seq_k = cu_k[cu_k.len() - 1];
    let mut row_keys = vec![0i32; 2 * seq_q];
    let mut key_rows = vec![0i32; 2 * seq_k];
    for s in 0..cu_q.len() - 1 {
        let (qs, qe, ks, ke) = (cu_q[s] as i64, cu_q[s + 1] as i64, cu_k[s] as i64, cu_k[s + 1] as i64);
        let (lq, lk) = (qe - qs, ke - ks);
        let off = lk - lq;
        // A window longer than the sequence is no window (and `usize::MAX` must not wrap).
        let window = window.map(|w| w.min((lq + lk + 1) as usize));
        // Row t of the sequence sits at key position t + off: keys r <= t + off (causal),
        // r > t + off - w (window), 0 <= r < lk.
        for t in 0..lq {
            let pos = t + off;
            let lo = window.map_or(0, |w| (pos - w as i64 + 1).max(0)).min(lk);
            let hi = if causal { (pos + 1).clamp(0, lk) } else { lk }.max(lo);
            let i = (qs + t) as usize;
            row_keys[2 * i] = (ks + lo) as i32;
            row_keys[2 * i + 1] = (ks + hi) as i32;
        }
        // Key r is seen by rows t >= r - off (causal) and t <= r - off + w - 1 (window).
        for r in 0..lk {
            let lo = if causal { (r - off).max(0) } else { 0 }.min(lq);
            let hi = window.map_or(lq, |w| (r - off + w as i64).clamp(0, lq)).max(lo);
            let j = (ks + r) as usize;
            key_rows[2 * j] = (qs + lo) as i32;
            key_rows[2 * j + 1] = (qs + hi) as i32;
        }
    }
    Ok(VarlenBounds { row_keys, key_rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (row, key) pair against the rule spelled out pair by pair, and both interval
    /// lists nondecreasing.
    #[test]
    fn intervals_match_pairwise_rule() {
        let cases: [(&[usize], &[usize]); 4] = [
            (&[0, 3, 3, 8, 9], &[0, 3, 3, 8, 9]),
            (&[0, 2, 7], &[0, 5, 9]),
            (&[0, 4, 5], &[0, 1, 7]),
            (&[0, 0, 6], &[0, 3, 3]),
        ];
        for (cu_q, cu_k) in cases {
            for (causal, window) in [(true, None), (false, None), (true, Some(2)), (false, Some(3))] {
                let b = varlen_bounds(cu_q, cu_k, causal, window).unwrap();
                let (sq, sk) = (b.row_keys.len() / 2, b.key_rows.len() / 2);
                for i in 0..sq {
                    for j in 0..sk {
                        let s = (0..cu_q.len() - 1).find(|&s| cu_q[s] <= i && i < cu_q[s + 1]).unwrap();
                        let same = cu_k[s] <= j && j < cu_k[s + 1];
                        let pos = (i - cu_q[s]) as i64 + (cu_k[s + 1] - cu_k[s]) as i64 - (cu_q[s + 1] - cu_q[s]) as i64;
                        let r = (j as i64) - cu_k[s] as i64;
                        let want = same && (!causal || r <= pos) && window.is_none_or(|w| r > pos - w as i64);
                        let by_row = (b.row_keys[2 * i] as usize..b.row_keys[2 * i + 1] as usize).contains(&j);
                        let by_key = (b.key_rows[2 * j] as usize..b.key_rows[2 * j + 1] as usize).contains(&i);
                        assert_eq!(by_row, want, "row view {cu_q:?} {cu_k:?} causal={causal} w={window:?} ({i},{j})");
                        assert_eq!(by_key, want, "key view {cu_q:?} {cu_k:?} causal={causal} w={window:?} ({i},{j})");
                    }
                }
                for v in [&b.row_keys, &b.key_rows] {
                    for x in 0..v.len() / 2 - 1 {
                        assert!(v[2 * x] <= v[2 * x + 2] && v[2 * x + 1] <= v[2 * x + 3], "not monotone: {v:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_boundaries() {
        let e = varlen_bounds(&[1, 4], &[0, 4], true, None).unwrap_err();
        assert!(e.to_string().contains("cu_seqlens_q"), "{e}");
        let e = varlen_bounds(&[0, 4, 3], &[0, 4, 5], true, None).unwrap_err();
        assert!(e.to_string().contains("must not decrease"), "{e}");
        let e = varlen_bounds(&[0, 4], &[0, 2, 4], true, None).unwrap_err();
        assert!(e.to_string().contains("cu_seqlens_k"), "{e}");
        let e = varlen_bounds(&[0], &[0], true, None).unwrap_err();
        assert!(e.to_string().contains("at least two"), "{e}");
    }
}
