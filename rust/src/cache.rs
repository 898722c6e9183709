//! The incremental Z-order KV cache for decoding.
//!
//! Per (batch, kv-head) group the cache keeps keys (f32, tiny: d_k ~ 3), values in the
//! cache's dtype (f32, f16 or bf16) and the same dyadic-run index as the parallel forward,
//! built incrementally: the chunk holding the newest token is the *tail* (searched
//! exhaustively); when a token starts a new chunk, the full tail becomes a sorted run of one
//! chunk and equal-sized runs merge like a binary counter. After `T` tokens the runs are
//! exactly the binary decomposition of the tail's chunk index, i.e. the runs the parallel
//! forward searches for the newest token, so decoding step by step gives the same candidates
//! and the same output as one parallel call (tested). `extend` costs amortised
//! O(log T) per token; `attend` for the newest token searches every run plus the tail.
//!
//! Queries that lie in an older chunk than the tail (a multi-token `attend` that spans
//! chunks, e.g. a prefill) need runs the counter has merged away; for those the cache
//! builds the full merge-sort tree over its keys for that call (O(T log T)).
use crate::error::{try_vec, Result, ZetaError};
use crate::index::{
    fence_of, gather_coords, merge_into, prefetch, sorted_entries, sq_dist, KeyIndex, Params,
    Probe, ProbeList, RunView, TopK,
};
use crate::quantize::{first_non_finite, Grid};
use half::{bf16, f16};
use rayon::prelude::*;
use std::io::{Read, Write};
use std::path::Path;

/// Storage of values.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Values {
    pub fn new(dtype: &str) -> Result<Values> {
        match dtype {
            "float32" => Ok(Values::F32(Vec::new())),
            "float16" => Ok(Values::F16(Vec::new())),
            "bfloat16" => Ok(Values::BF16(Vec::new())),
            _ => Err(ZetaError::value(
                "dtype",
                format!("must be 'float32', 'float16' or 'bfloat16', got {dtype:?}"),
            )),
        }
    }
    pub fn dtype(&self) -> &'static str {
        match self {
            Values::F32(_) => "float32",
            Values::F16(_) => "float16",
            Values::BF16(_) => "bfloat16",
        }
    }
    fn code(&self) -> u8 {
        match self {
            Values::F32(_) => 0,
            Values::F16(_) => 1,
            Values::BF16(_) => 2,
        }
    }
    fn from_code(c: u8) -> Result<Values> {
        match c {
            0 => Ok(Values::F32(Vec::new())),
            1 => Ok(Values::F16(Vec::new())),
            2 => Ok(Values::BF16(Vec::new())),
            _ => Err(ZetaError::Corrupt(format!("unknown value dtype code {c}"))),
        }
    }
    pub fn elem_size(&self) -> usize {
        match self {
            Values::F32(_) => 4,
            _ => 2,
        }
    }
    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
            Values::BF16(v) => v.len(),
        }
    }
    fn try_reserve(&mut self, n: usize) -> Result<()> {
        let r = match self {
            Values::F32(v) => v.try_reserve(n),
            Values::F16(v) => v.try_reserve(n),
            Values::BF16(v) => v.try_reserve(n),
        };
        r.map_err(|_| ZetaError::Memory(format!("KV cache values: {n} more elements")))
    }
    fn extend_from_f32(&mut self, src: &[f32]) {
        match self {
            Values::F32(v) => v.extend_from_slice(src),
            Values::F16(v) => v.extend(src.iter().map(|&x| f16::from_f32(x))),
            Values::BF16(v) => v.extend(src.iter().map(|&x| bf16::from_f32(x))),
        }
    }
    /// acc += s * row(pos)
    #[inline]
    fn axpy(&self, pos: usize, dv: usize, s: f32, acc: &mut [f32]) {
        match self {
            Values::F32(v) => {
                for (a, &x) in acc.iter_mut().zip(&v[pos * dv..(pos + 1) * dv]) {
                    *a += s * x;
                }
            }
            Values::F16(v) => {
                for (a, &x) in acc.iter_mut().zip(&v[pos * dv..(pos + 1) * dv]) {
                    *a += s * x.to_f32();
                }
            }
            Values::BF16(v) => {
                for (a, &x) in acc.iter_mut().zip(&v[pos * dv..(pos + 1) * dv]) {
                    *a += s * x.to_f32();
                }
            }
        }
    }
    /// Hints the CPU to load row `pos` (see [`prefetch`]).
    #[inline]
    fn prefetch_row(&self, pos: usize, dv: usize) {
        match self {
            Values::F32(v) => prefetch(&v[pos * dv..(pos + 1) * dv]),
            Values::F16(v) => prefetch(&v[pos * dv..(pos + 1) * dv]),
            Values::BF16(v) => prefetch(&v[pos * dv..(pos + 1) * dv]),
        }
    }
    fn get_f64(&self, i: usize) -> f64 {
        match self {
            Values::F32(v) => v[i] as f64,
            Values::F16(v) => v[i].to_f64(),
            Values::BF16(v) => v[i].to_f64(),
        }
    }
    fn write_le(&self, w: &mut Vec<u8>) {
        match self {
            Values::F32(v) => v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes())),
            Values::F16(v) => v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes())),
            Values::BF16(v) => v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes())),
        }
    }
    fn read_le(&mut self, b: &[u8]) {
        match self {
            Values::F32(v) => v.extend(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Values::F16(v) => v.extend(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]))),
            Values::BF16(v) => {
                v.extend(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])))
            }
        }
    }
}

/// A sorted run of whole chunks: per curve, packed entries and their coordinates.
#[derive(Clone, Debug)]
struct Run {
    n_chunks: usize,
    /// Per curve: sorted entries, their coordinates, the entries' fence.
    curves: Vec<(Vec<u64>, Vec<f32>, Vec<u32>)>,
}

#[derive(Clone, Debug)]
struct Group {
    keys: Vec<f32>,
    values: Values,
    /// Codes of every key, per curve (u32; the index packs them with positions).
    codes: Vec<Vec<u32>>,
    runs: Vec<Run>,
    /// Chunks already in runs.
    indexed_chunks: usize,
    ksum: Vec<f64>,
    vsum: Vec<f64>,
}

/// The KV cache: `batch * kv_heads` groups, all of the same length.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub batch: usize,
    pub kv_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub params: Params,
    grids: Vec<Grid>,
    len: usize,
    groups: Vec<Group>,
}

const MAGIC: &[u8; 8] = b"ZETAKV\0\0";
const VERSION: u32 = 1;

impl KvCache {
    pub fn new(
        batch: usize,
        kv_heads: usize,
        key_dim: usize,
        value_dim: usize,
        params: Params,
        dtype: &str,
    ) -> Result<KvCache> {
        if batch == 0 {
            return Err(ZetaError::value("batch", "must be >= 1"));
        }
        if kv_heads == 0 {
            return Err(ZetaError::value("num_kv_heads", "must be >= 1"));
        }
        if key_dim == 0 || key_dim > crate::morton::MAX_DIMS {
            return Err(ZetaError::value(
                "key_dim",
                format!("must be 1..=8, got {key_dim}"),
            ));
        }
        if value_dim == 0 {
            return Err(ZetaError::value("value_dim", "must be >= 1"));
        }
        if !params.causal {
            return Err(ZetaError::value("causal", "a KV cache is causal"));
        }
        // window 0 = "unset": each attend passes one (the runs do not depend on it).
        Params {
            window: params.window.max(1),
            ..params
        }
        .check(key_dim)?;
        let values = Values::new(dtype)?;
        let grids = params.grids(key_dim)?;
        let g = Group {
            keys: Vec::new(),
            values,
            codes: vec![Vec::new(); params.n_curves],
            runs: Vec::new(),
            indexed_chunks: 0,
            ksum: vec![0.0; key_dim],
            vsum: vec![0.0; value_dim],
        };
        Ok(KvCache {
            batch,
            kv_heads,
            key_dim,
            value_dim,
            params,
            grids,
            len: 0,
            groups: vec![g; batch * kv_heads],
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> &'static str {
        self.groups[0].values.dtype()
    }

    /// Bytes held: keys, values, codes, run entries and coordinates, sums.
    pub fn nbytes(&self) -> usize {
        let mut n = std::mem::size_of::<Self>();
        for g in &self.groups {
            n += g.keys.capacity() * 4 + g.values.len() * g.values.elem_size();
            n += g.codes.iter().map(|c| c.capacity() * 4).sum::<usize>();
            for r in &g.runs {
                for (e, c, fe) in &r.curves {
                    n += e.capacity() * 8 + c.capacity() * 4 + fe.capacity() * 4;
                }
            }
            n += (g.ksum.len() + g.vsum.len()) * 8;
        }
        n
    }

    /// Appends T tokens: k (B, H_kv, T, key_dim), v (B, H_kv, T, value_dim), row-major f32.
    /// Checks everything before changing anything.
    pub fn extend(&mut self, k: &[f32], v: &[f32], t: usize) -> Result<()> {
        let (dk, dv) = (self.key_dim, self.value_dim);
        let ng = self.groups.len();
        if k.len() != ng * t * dk {
            return Err(ZetaError::value(
                "k",
                format!(
                    "has {} elements, expected B*H_kv*T*key_dim = {}",
                    k.len(),
                    ng * t * dk
                ),
            ));
        }
        if v.len() != ng * t * dv {
            return Err(ZetaError::value(
                "v",
                format!(
                    "has {} elements, expected B*H_kv*T*value_dim = {}",
                    v.len(),
                    ng * t * dv
                ),
            ));
        }
        if t == 0 {
            return Ok(());
        }
        if let Some(p) = first_non_finite(k) {
            return Err(ZetaError::value(
                "k",
                format!("contains NaN or inf (flat index {p})"),
            ));
        }
        if let Some(p) = first_non_finite(v) {
            return Err(ZetaError::value(
                "v",
                format!("contains NaN or inf (flat index {p})"),
            ));
        }
        let new_len = self
            .len
            .checked_add(t)
            .filter(|&n| n <= u32::MAX as usize)
            .ok_or_else(|| ZetaError::value("k", "the cache would exceed 2^32 tokens"))?;
        for g in self.groups.iter_mut() {
            g.keys
                .try_reserve(t * dk)
                .map_err(|_| ZetaError::Memory("KV cache keys".into()))?;
            g.values.try_reserve(t * dv)?;
            for c in g.codes.iter_mut() {
                c.try_reserve(t)
                    .map_err(|_| ZetaError::Memory("KV cache codes".into()))?;
            }
        }
        let (grids, params, len) = (&self.grids, &self.params, self.len);
        self.groups.par_iter_mut().enumerate().for_each(|(gi, g)| {
            let kk = &k[gi * t * dk..(gi + 1) * t * dk];
            let vv = &v[gi * t * dv..(gi + 1) * t * dv];
            g.keys.extend_from_slice(kk);
            g.values.extend_from_f32(vv);
            for (c, grid) in g.codes.iter_mut().zip(grids) {
                c.extend(kk.chunks_exact(dk).map(|x| grid.code(x) as u32));
            }
            for row in kk.chunks_exact(dk) {
                for (x, &y) in g.ksum.iter_mut().zip(row) {
                    *x += y as f64;
                }
            }
            // Sum what is stored (f16/bf16 rounding included), as `from_bytes` does.
            let base = g.values.len() - t * dv;
            for r in 0..t {
                for (j, x) in g.vsum.iter_mut().enumerate() {
                    *x += g.values.get_f64(base + r * dv + j);
                }
            }
            g.advance_index(new_len, params, dk);
        });
        let _ = len;
        self.len = new_len;
        Ok(())
    }

    /// Attends T_q queries (the last T_q positions): q (B, H, T_q, key_dim) f32 row-major,
    /// H % H_kv == 0, gamma (H,). Returns (B, H, T_q, value_dim) f32.
    /// `window` overrides the cache's window for this call (the runs do not depend on it).
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: &[f32],
        h: usize,
        tq: usize,
        topk: usize,
        gamma: &[f64],
        mean_token: bool,
        window: Option<usize>,
    ) -> Result<Vec<f32>> {
        let (dk, dv, s) = (self.key_dim, self.value_dim, self.len);
        if s == 0 {
            return Err(ZetaError::value(
                "q",
                "the cache is empty: extend it before attend",
            ));
        }
        if h == 0 || h % self.kv_heads != 0 {
            return Err(ZetaError::value(
                "q",
                format!(
                    "query heads ({h}) must be a multiple of the cache's kv heads ({})",
                    self.kv_heads
                ),
            ));
        }
        if tq == 0 || tq > s {
            return Err(ZetaError::value(
                "q",
                format!("T_q must be 1..=len(cache) = {s}, got {tq}"),
            ));
        }
        if q.len() != self.batch * h * tq * dk {
            return Err(ZetaError::value(
                "q",
                format!(
                    "has {} elements, expected B*H*T_q*key_dim = {}",
                    q.len(),
                    self.batch * h * tq * dk
                ),
            ));
        }
        if topk == 0 {
            return Err(ZetaError::value("topk", "must be >= 1"));
        }
        if gamma.len() != h || gamma.iter().any(|g| !(g.is_finite() && *g > 0.0)) {
            return Err(ZetaError::value(
                "gamma",
                format!("must be {h} finite values > 0 (one per query head)"),
            ));
        }
        if let Some(p) = first_non_finite(q) {
            return Err(ZetaError::value(
                "q",
                format!("contains NaN or inf (flat index {p})"),
            ));
        }
        let grp = h / self.kv_heads;
        let mut out = try_vec(0.0f32, self.batch * h * tq * dv, "attend output")?;
        let chunk = self.params.chunk;
        let mut prm = self.params;
        if let Some(w) = window {
            if w == 0 {
                return Err(ZetaError::value("window", "must be >= 1"));
            }
            prm.window = w;
        }
        if prm.window == 0 {
            return Err(ZetaError::value(
                "window",
                "this cache has no window set: pass one to attend",
            ));
        }
        let prm = &prm;
        out.par_chunks_mut(grp * tq * dv).enumerate().try_for_each(
            |(gi, out_g)| -> Result<()> {
                let g = &self.groups[gi];
                let (b, hkv) = (gi / self.kv_heads, gi % self.kv_heads);
                let first = s - tq;
                // Fast path: every query in the tail chunk sees exactly the counter's runs.
                let full = if first / chunk >= g.indexed_chunks {
                    None
                } else {
                    Some(KeyIndex::build(&g.keys, dk, prm)?)
                };
                // Means at positions >= first: total minus the keys after p.
                let (kbar, vbar) = if mean_token {
                    g.suffix_means(first, s, dk, dv)
                } else {
                    (Vec::new(), Vec::new())
                };
                let init = || (TopK::new(topk, prm.multiplicity()), Vec::new());
                out_g.par_chunks_mut(dv).enumerate().for_each_init(
                    init,
                    |(tk, cands): &mut (TopK<f32>, Vec<(f32, u32)>), (qi, o)| {
                        let (hl, i) = (qi / tq, qi % tq);
                        let hq = hkv * grp + hl;
                        let qr = &q[((b * h + hq) * tq + i) * dk..][..dk];
                        let p = first + i;
                        tk.clear();
                        let push = |pos: u32, d2: f32| tk.push(pos, d2);
                        match &full {
                            Some(ix) => ix.for_each_candidate(qr, p, &g.keys, push),
                            None => g.for_each_candidate(&self.grids, prm, qr, p, push),
                        }
                        tk.drain_sorted(cands);
                        let g2 = (gamma[hq] * gamma[hq]) as f32;
                        let mut z = 0.0f32;
                        // The rows are scattered: ask for all of them before the first use.
                        for &(_, pos) in cands.iter() {
                            g.values.prefetch_row(pos as usize, dv);
                        }
                        for &(d2, pos) in cands.iter() {
                            let sc = 1.0 / (d2 + g2);
                            z += sc;
                            g.values.axpy(pos as usize, dv, sc, o);
                        }
                        if mean_token {
                            let kb = &kbar[i * dk..(i + 1) * dk];
                            let sc = 1.0 / (sq_dist(qr, kb) + g2);
                            z += sc;
                            for (a, &x) in o.iter_mut().zip(&vbar[i * dv..(i + 1) * dv]) {
                                *a += sc * x;
                            }
                        }
                        let inv = 1.0 / z;
                        o.iter_mut().for_each(|a| *a *= inv);
                    },
                );
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Serialises to bytes: header, keys and values per group, CRC32 of all that.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&VERSION.to_le_bytes());
        for x in [
            self.batch,
            self.kv_heads,
            self.key_dim,
            self.value_dim,
            self.params.chunk,
            self.params.window,
            self.params.n_curves,
            self.params.n_sink,
            self.params.bits as usize,
            self.len,
        ] {
            w.extend_from_slice(&(x as u64).to_le_bytes());
        }
        w.extend_from_slice(&self.params.scale.to_le_bytes());
        w.push(self.groups[0].values.code());
        for g in &self.groups {
            g.keys
                .iter()
                .for_each(|x| w.extend_from_slice(&x.to_le_bytes()));
            g.values.write_le(&mut w);
        }
        let crc = crc32fast::hash(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        w
    }

    /// Parses [`to_bytes`]' format; rebuilds the index (deterministic, so the result equals
    /// the saved cache bit for bit).
    pub fn from_bytes(b: &[u8]) -> Result<KvCache> {
        let head = 8 + 4 + 10 * 8 + 8 + 1;
        if b.len() < 8 || &b[..8] != MAGIC {
            return Err(ZetaError::Corrupt(
                "not a zeta KV cache file (bad magic)".into(),
            ));
        }
        if b.len() < head + 4 {
            return Err(ZetaError::Corrupt("truncated header".into()));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(ZetaError::Corrupt(format!(
                "unsupported version {version} (this zeta reads version {VERSION})"
            )));
        }
        let u = |i: usize| u64::from_le_bytes(b[12 + 8 * i..20 + 8 * i].try_into().unwrap());
        let fields: Vec<u64> = (0..10).map(u).collect();
        let scale = f64::from_le_bytes(b[92..100].try_into().unwrap());
        let dcode = b[100];
        let to_usize = |x: u64, what: &str| -> Result<usize> {
            if x > (1u64 << 40) {
                return Err(ZetaError::Corrupt(format!("implausible {what} {x}")));
            }
            Ok(x as usize)
        };
        let batch = to_usize(fields[0], "batch")?;
        let kvh = to_usize(fields[1], "kv heads")?;
        let dk = to_usize(fields[2], "key_dim")?;
        let dv = to_usize(fields[3], "value_dim")?;
        let len = to_usize(fields[9], "length")?;
        let params = Params {
            chunk: to_usize(fields[4], "chunk")?,
            window: to_usize(fields[5], "window")?,
            n_curves: to_usize(fields[6], "n_curves")?,
            n_sink: to_usize(fields[7], "n_sink")?,
            causal: true,
            bits: u32::try_from(fields[8]).map_err(|_| ZetaError::Corrupt("bits".into()))?,
            scale,
        };
        let values = Values::from_code(dcode)?;
        let esz = values.elem_size();
        let per_group = len
            .checked_mul(dk * 4 + dv * esz)
            .ok_or_else(|| ZetaError::Corrupt("sizes overflow".into()))?;
        let body = batch
            .checked_mul(kvh)
            .and_then(|g| g.checked_mul(per_group))
            .ok_or_else(|| ZetaError::Corrupt("sizes overflow".into()))?;
        if b.len() != head + body + 4 {
            return Err(ZetaError::Corrupt(format!(
                "truncated or padded: {} bytes, expected {}",
                b.len(),
                head + body + 4
            )));
        }
        let crc = u32::from_le_bytes(b[b.len() - 4..].try_into().unwrap());
        if crc32fast::hash(&b[..b.len() - 4]) != crc {
            return Err(ZetaError::Corrupt("checksum mismatch".into()));
        }
        let dtype = values.dtype();
        let mut cache = KvCache::new(batch, kvh, dk, dv, params, dtype)
            .map_err(|e| ZetaError::Corrupt(format!("bad header: {e}")))?;
        let mut off = head;
        let mut ks = Vec::with_capacity(batch * kvh * len * dk);
        let mut vs_raw: Vec<&[u8]> = Vec::new();
        for _ in 0..batch * kvh {
            let kb = &b[off..off + len * dk * 4];
            ks.extend(
                kb.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            off += len * dk * 4;
            vs_raw.push(&b[off..off + len * dv * esz]);
            off += len * dv * esz;
        }
        if first_non_finite(&ks).is_some() {
            return Err(ZetaError::Corrupt("non-finite keys".into()));
        }
        let grids = cache.grids.clone();
        let prm = cache.params;
        cache
            .groups
            .par_iter_mut()
            .zip(vs_raw.par_iter())
            .enumerate()
            .for_each(|(gi, (g, vb))| {
                let kk = &ks[gi * len * dk..(gi + 1) * len * dk];
                g.keys.extend_from_slice(kk);
                g.values.read_le(vb);
                for (c, grid) in g.codes.iter_mut().zip(&grids) {
                    c.extend(kk.chunks_exact(dk).map(|x| grid.code(x) as u32));
                }
                for p in 0..len {
                    for j in 0..dk {
                        g.ksum[j] += kk[p * dk + j] as f64;
                    }
                    for j in 0..dv {
                        g.vsum[j] += g.values.get_f64(p * dv + j);
                    }
                }
                g.advance_index(len, &prm, dk);
            });
        cache.len = len;
        Ok(cache)
    }

    /// Atomic save: write a temporary file beside `path`, fsync, rename over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| ZetaError::value("path", "has no file name"))?;
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let res = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(ZetaError::Io(format!(
                "saving KV cache to {}: {e}",
                path.display()
            )));
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<KvCache> {
        let mut b = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut b))
            .map_err(|e| ZetaError::Io(format!("loading KV cache from {}: {e}", path.display())))?;
        KvCache::from_bytes(&b)
    }

    /// Exact equality of contents (keys, values, settings, index).
    pub fn same_contents(&self, other: &KvCache) -> bool {
        self.to_bytes() == other.to_bytes()
            && self.groups.iter().zip(&other.groups).all(|(a, b)| {
                a.runs.len() == b.runs.len()
                    && a.runs
                        .iter()
                        .zip(&b.runs)
                        .all(|(x, y)| x.curves == y.curves)
            })
    }
}

impl Group {
    /// Indexes every chunk before the newest token's chunk (binary-counter merges).
    fn advance_index(&mut self, len: usize, prm: &Params, dk: usize) {
        let chunk = prm.chunk;
        let target = if len == 0 { 0 } else { (len - 1) / chunk };
        while self.indexed_chunks < target {
            let c = self.indexed_chunks;
            let curves = self
                .codes
                .iter()
                .map(|codes| {
                    let e = sorted_entries(codes, c * chunk, (c + 1) * chunk);
                    let mut co = vec![0.0f32; e.len() * dk];
                    gather_coords(&e, &self.keys, dk, &mut co);
                    let fe = fence_of(&e);
                    (e, co, fe)
                })
                .collect();
            self.runs.push(Run {
                n_chunks: 1,
                curves,
            });
            self.indexed_chunks += 1;
            while self.runs.len() >= 2
                && self.runs[self.runs.len() - 1].n_chunks
                    == self.runs[self.runs.len() - 2].n_chunks
            {
                let b = self.runs.pop().unwrap();
                let a = self.runs.pop().unwrap();
                let curves = a
                    .curves
                    .iter()
                    .zip(&b.curves)
                    .map(|((ea, _, _), (eb, _, _))| {
                        let mut e = vec![0u64; ea.len() + eb.len()];
                        merge_into(ea, eb, &mut e);
                        let mut co = vec![0.0f32; e.len() * dk];
                        gather_coords(&e, &self.keys, dk, &mut co);
                        let fe = fence_of(&e);
                        (e, co, fe)
                    })
                    .collect();
                self.runs.push(Run {
                    n_chunks: a.n_chunks * 2,
                    curves,
                });
            }
        }
    }

    /// Candidates of a query at position `p` in the tail chunk (same set as the parallel
    /// index: the counter's runs are the binary decomposition of the tail's chunk index).
    fn for_each_candidate(
        &self,
        grids: &[Grid],
        prm: &Params,
        q: &[f32],
        p: usize,
        mut f: impl FnMut(u32, f32),
    ) {
        let dk = q.len();
        let mut probes = ProbeList::new();
        for (ci, g) in grids.iter().enumerate() {
            let qcode = g.code(q) as u32;
            for r in &self.runs {
                let (e, c, fe) = &r.curves[ci];
                let run = RunView {
                    entries: e,
                    coords: c,
                    fence: fe,
                };
                probes.push(Probe { run, qcode }, q, prm.window, &mut f);
            }
        }
        probes.flush(q, prm.window, &mut f);
        for j in self.indexed_chunks * prm.chunk..=p {
            f(j as u32, sq_dist(q, &self.keys[j * dk..(j + 1) * dk]));
        }
        for j in 0..prm.n_sink.min(p + 1) {
            f(j as u32, sq_dist(q, &self.keys[j * dk..(j + 1) * dk]));
        }
    }

    /// Means of keys and values over positions 0..=p for p in first..s, rows (p - first).
    fn suffix_means(&self, first: usize, s: usize, dk: usize, dv: usize) -> (Vec<f32>, Vec<f32>) {
        let n = s - first;
        let mut kb = vec![0.0f32; n * dk];
        let mut vb = vec![0.0f32; n * dv];
        let mut ks = self.ksum.clone();
        let mut vs = self.vsum.clone();
        for p in (first..s).rev() {
            let i = p - first;
            let inv = 1.0 / (p + 1) as f64;
            for j in 0..dk {
                kb[i * dk + j] = (ks[j] * inv) as f32;
                ks[j] -= self.keys[p * dk + j] as f64;
            }
            for j in 0..dv {
                vb[i * dv + j] = (vs[j] * inv) as f32;
                vs[j] -= self.values.get_f64(p * dv + j);
            }
        }
        (kb, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{forward, AttnOpts, Shape};

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn decode_equals_parallel_forward() {
        let (hkv, h, s, dk, dv, topk) = (2usize, 4usize, 300usize, 3usize, 5usize, 6usize);
        let prm = Params {
            chunk: 8,
            window: 3,
            n_curves: 2,
            n_sink: 2,
            causal: true,
            bits: 10,
            scale: 1.0,
        };
        let (q, k, v) = (
            data(h * s * dk, 1),
            data(hkv * s * dk, 2),
            data(hkv * s * dv, 3),
        );
        let gamma = vec![0.5, 0.7, 1.0, 1.3];
        for mean_token in [false, true] {
            let sh = Shape {
                b: 1,
                h,
                hkv,
                n: s,
                s,
                dk,
                dv,
            };
            let (want, _) = forward(
                &sh,
                &prm,
                &AttnOpts { topk, mean_token },
                &q,
                &k,
                &v,
                &gamma,
            )
            .unwrap();
            let mut c = KvCache::new(1, hkv, dk, dv, prm, "float32").unwrap();
            for t in 0..s {
                let kt: Vec<f32> = (0..hkv)
                    .flat_map(|g| k[(g * s + t) * dk..(g * s + t + 1) * dk].to_vec())
                    .collect();
                let vt: Vec<f32> = (0..hkv)
                    .flat_map(|g| v[(g * s + t) * dv..(g * s + t + 1) * dv].to_vec())
                    .collect();
                c.extend(&kt, &vt, 1).unwrap();
                let qt: Vec<f32> = (0..h)
                    .flat_map(|hh| q[(hh * s + t) * dk..(hh * s + t + 1) * dk].to_vec())
                    .collect();
                let got = c.attend(&qt, h, 1, topk, &gamma, mean_token, None).unwrap();
                for hh in 0..h {
                    let w = &want[(hh * s + t) * dv..(hh * s + t + 1) * dv];
                    let g = &got[hh * dv..(hh + 1) * dv];
                    for (a, b) in w.iter().zip(g) {
                        assert!((a - b).abs() <= 1e-6, "t={t} h={hh}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn bytes_round_trip_and_corruption() {
        let prm = Params {
            chunk: 4,
            window: 2,
            n_curves: 1,
            n_sink: 0,
            causal: true,
            bits: 10,
            scale: 1.0,
        };
        let mut c = KvCache::new(1, 1, 3, 2, prm, "float16").unwrap();
        c.extend(&data(30 * 3, 4), &data(30 * 2, 5), 30).unwrap();
        let b = c.to_bytes();
        let d = KvCache::from_bytes(&b).unwrap();
        assert!(d.same_contents(&c));
        let mut bad = b.clone();
        bad[120] ^= 1;
        assert!(matches!(
            KvCache::from_bytes(&bad),
            Err(ZetaError::Corrupt(_))
        ));
        assert!(KvCache::from_bytes(&b[..b.len() - 1]).is_err());
        assert!(KvCache::from_bytes(b"nonsense").is_err());
    }

    #[test]
    fn failed_extend_changes_nothing() {
        let prm = Params {
            chunk: 4,
            window: 2,
            n_curves: 1,
            n_sink: 0,
            causal: true,
            bits: 10,
            scale: 1.0,
        };
        let mut c = KvCache::new(1, 1, 3, 2, prm, "float32").unwrap();
        c.extend(&data(9, 1), &data(6, 2), 3).unwrap();
        let before = c.to_bytes();
        let mut k = data(9, 3);
        k[4] = f32::NAN;
        assert!(c.extend(&k, &data(6, 4), 3).is_err());
        assert!(c.extend(&data(8, 3), &data(6, 4), 3).is_err());
        assert_eq!(c.to_bytes(), before);
    }
}
