//! The Python bindings: the only file that knows Python exists.
//!
//! Every function takes C-contiguous numpy arrays (the Python layer in `python/zeta` makes
//! them so, zero-copy when they already are), releases the GIL with `py.detach` and runs its
//! work in zeta's rayon pool. Errors map to Python exceptions in one place
//! (`From<ZetaError> for PyErr`); no panic crosses into Python (each entry point catches
//! unwinding and reports it as a `RuntimeError`).
use crate::attention::{self, AttnOpts, Shape};
use crate::cache::KvCache;
use crate::error::ZetaError;
use crate::index::Params;
use crate::{morton, pool, quantize, search, simd, sort};
use numpy::ndarray::{Array1, Array2, Array3, Array4};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray3, PyArray4, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArray3, PyReadonlyArray4, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

impl From<ZetaError> for PyErr {
    fn from(e: ZetaError) -> PyErr {
        let msg = e.to_string();
        match e {
            ZetaError::Value { .. } | ZetaError::Corrupt(_) => PyValueError::new_err(msg),
            ZetaError::Type { .. } => PyTypeError::new_err(msg),
            ZetaError::Memory(_) | ZetaError::Alloc { .. } => PyMemoryError::new_err(msg),
            ZetaError::Io(_) => PyOSError::new_err(msg),
            ZetaError::Internal(_) => PyRuntimeError::new_err(msg),
        }
    }
}

/// Runs `f`, turning a panic into [`ZetaError::Internal`].
fn catch<R>(f: impl FnOnce() -> Result<R, ZetaError>) -> Result<R, ZetaError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        if let Some(m) = p.downcast_ref::<crate::error::OutOfMemory>() {
            return Err(ZetaError::Alloc {
                what: m.what,
                n: m.n,
            });
        }
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(ZetaError::Internal(what))
    })
}

/// Runs `f` without the GIL, in zeta's pool, turning a panic into a Python `RuntimeError`.
pub(crate) fn run<R: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<R, ZetaError> + Send,
) -> PyResult<R> {
    Ok(py.detach(|| catch(|| pool::install(f)))?)
}

fn not_contiguous(arg: &'static str) -> ZetaError {
    ZetaError::value(arg, "must be C-contiguous")
}

fn dtype_err(arg: &'static str, a: &Bound<'_, PyAny>, want: &str) -> ZetaError {
    let got = a
        .getattr("dtype")
        .and_then(|d| d.str().map(|s| s.to_string()))
        .unwrap_or_else(|_| "?".into());
    ZetaError::type_(arg, format!("expected {want}, got dtype {got}"))
}

fn encode_impl<'py, C: morton::Coord + numpy::Element>(
    py: Python<'py>,
    a: PyReadonlyArray2<'py, C>,
    bits: u32,
    out64: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let d = a.shape()[1];
    let n = a.shape()[0];
    let coords = a.as_slice().map_err(|_| not_contiguous("coords"))?;
    let path = simd::selected();
    if out64 {
        let out = run(py, || {
            let mut o = crate::error::try_vec_par(0u64, n, "morton_encode output")?;
            morton::encode(coords, d, bits, &mut o, path)?;
            Ok(o)
        })?;
        Ok(Array1::from_vec(out).into_pyarray(py).into_any())
    } else {
        let out = run(py, || {
            let mut o = crate::error::try_vec_par(0u32, n, "morton_encode output")?;
            morton::encode(coords, d, bits, &mut o, path)?;
            Ok(o)
        })?;
        Ok(Array1::from_vec(out).into_pyarray(py).into_any())
    }
}

/// morton_encode(coords (n, d) uint8/16/32/64 C-contiguous, bits, out64) -> (n,) uint32/uint64
#[pyfunction]
fn morton_encode<'py>(
    py: Python<'py>,
    coords: &Bound<'py, PyAny>,
    bits: u32,
    out64: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(a) = coords.extract::<PyReadonlyArray2<u8>>() {
        return encode_impl(py, a, bits, out64);
    }
    if let Ok(a) = coords.extract::<PyReadonlyArray2<u16>>() {
        return encode_impl(py, a, bits, out64);
    }
    if let Ok(a) = coords.extract::<PyReadonlyArray2<u32>>() {
        return encode_impl(py, a, bits, out64);
    }
    if let Ok(a) = coords.extract::<PyReadonlyArray2<u64>>() {
        return encode_impl(py, a, bits, out64);
    }
    Err(dtype_err(
        "coords",
        coords,
        "a 2-D array of unsigned integers (uint8/16/32/64)",
    )
    .into())
}

fn decode_impl<'py, O: morton::Code + morton::Coord + numpy::Element>(
    py: Python<'py>,
    a: PyReadonlyArray1<'py, O>,
    dims: usize,
    bits: u32,
) -> PyResult<Bound<'py, PyAny>> {
    let n = a.shape()[0];
    let codes = a.as_slice().map_err(|_| not_contiguous("codes"))?;
    let path = simd::selected();
    let out = run(py, || {
        morton::check_dims("dims", dims)?;
        let total = n
            .checked_mul(dims)
            .ok_or_else(|| ZetaError::Memory("morton_decode output".into()))?;
        let mut o = crate::error::try_vec_par(O::default(), total, "morton_decode output")?;
        morton::decode(codes, dims, bits, &mut o, path)?;
        Ok(o)
    })?;
    let arr =
        Array2::from_shape_vec((n, dims), out).map_err(|e| ZetaError::Internal(e.to_string()))?;
    Ok(arr.into_pyarray(py).into_any())
}

/// morton_decode(codes (n,) uint32/uint64, dims, bits) -> (n, dims) of the codes' dtype
#[pyfunction]
fn morton_decode<'py>(
    py: Python<'py>,
    codes: &Bound<'py, PyAny>,
    dims: usize,
    bits: u32,
) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(a) = codes.extract::<PyReadonlyArray1<u32>>() {
        return decode_impl(py, a, dims, bits);
    }
    if let Ok(a) = codes.extract::<PyReadonlyArray1<u64>>() {
        return decode_impl(py, a, dims, bits);
    }
    Err(dtype_err("codes", codes, "a 1-D array of uint32 or uint64").into())
}

fn zorder_impl<'py, T: quantize::Real + numpy::Element>(
    py: Python<'py>,
    a: PyReadonlyArray2<'py, T>,
    bits: u32,
    shift: u32,
    scale: f64,
    out64: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let (n, d) = (a.shape()[0], a.shape()[1]);
    let x = a.as_slice().map_err(|_| not_contiguous("x"))?;
    let grid = quantize::Grid::new(d, bits, shift, scale)?;
    if out64 {
        let out = run(py, || {
            let mut o = crate::error::try_vec_par(0u64, n, "zorder output")?;
            quantize::zorder(x, &grid, &mut o)?;
            Ok(o)
        })?;
        Ok(Array1::from_vec(out).into_pyarray(py).into_any())
    } else {
        let out = run(py, || {
            let mut o = crate::error::try_vec_par(0u32, n, "zorder output")?;
            quantize::zorder(x, &grid, &mut o)?;
            Ok(o)
        })?;
        Ok(Array1::from_vec(out).into_pyarray(py).into_any())
    }
}

/// zorder(x (n, d) float32/float64, bits, shift, scale, out64) -> (n,) uint32/uint64
#[pyfunction]
fn zorder<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    bits: u32,
    shift: u32,
    scale: f64,
    out64: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(a) = x.extract::<PyReadonlyArray2<f32>>() {
        return zorder_impl(py, a, bits, shift, scale, out64);
    }
    if let Ok(a) = x.extract::<PyReadonlyArray2<f64>>() {
        return zorder_impl(py, a, bits, shift, scale, out64);
    }
    Err(dtype_err("x", x, "a 2-D array of float32 or float64").into())
}

fn argsort_impl<'py, K: morton::Code + numpy::Element>(
    py: Python<'py>,
    a: PyReadonlyArray2<'py, K>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let (rows, n) = (a.shape()[0], a.shape()[1]);
    let keys = a.as_slice().map_err(|_| not_contiguous("codes"))?;
    let out = run(py, || {
        let mut o = crate::error::try_vec_par(0i64, rows * n, "argsort output")?;
        sort::argsort_rows(keys, n, &mut o);
        Ok(o)
    })?;
    let arr =
        Array2::from_shape_vec((rows, n), out).map_err(|e| ZetaError::Internal(e.to_string()))?;
    Ok(arr.into_pyarray(py))
}

/// argsort(codes (rows, n) uint32/uint64) -> (rows, n) int64, stable
#[pyfunction]
fn argsort<'py>(py: Python<'py>, codes: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<i64>>> {
    if let Ok(a) = codes.extract::<PyReadonlyArray2<u32>>() {
        return argsort_impl(py, a);
    }
    if let Ok(a) = codes.extract::<PyReadonlyArray2<u64>>() {
        return argsort_impl(py, a);
    }
    Err(dtype_err("codes", codes, "uint32 or uint64 codes").into())
}

fn searchsorted_impl<'py, K: morton::Code + numpy::Element>(
    py: Python<'py>,
    s: PyReadonlyArray2<'py, K>,
    q: PyReadonlyArray2<'py, K>,
    right: bool,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let (rows, n) = (s.shape()[0], s.shape()[1]);
    let (qrows, m) = (q.shape()[0], q.shape()[1]);
    if rows != qrows {
        return Err(ZetaError::value(
            "queries",
            format!("leading shape must match sorted_codes' ({rows} rows vs {qrows})"),
        )
        .into());
    }
    let sorted = s.as_slice().map_err(|_| not_contiguous("sorted_codes"))?;
    let queries = q.as_slice().map_err(|_| not_contiguous("queries"))?;
    let out = run(py, || {
        let mut o = crate::error::try_vec_par(0i64, rows * m, "searchsorted output")?;
        search::searchsorted_rows(sorted, n, queries, m, right, &mut o);
        Ok(o)
    })?;
    let arr =
        Array2::from_shape_vec((rows, m), out).map_err(|e| ZetaError::Internal(e.to_string()))?;
    Ok(arr.into_pyarray(py))
}

/// searchsorted(sorted (rows, n), queries (rows, m), right) -> (rows, m) int64; same dtype both
#[pyfunction]
fn searchsorted<'py>(
    py: Python<'py>,
    sorted: &Bound<'py, PyAny>,
    queries: &Bound<'py, PyAny>,
    right: bool,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    if let (Ok(s), Ok(q)) = (
        sorted.extract::<PyReadonlyArray2<u32>>(),
        queries.extract::<PyReadonlyArray2<u32>>(),
    ) {
        return searchsorted_impl(py, s, q, right);
    }
    if let (Ok(s), Ok(q)) = (
        sorted.extract::<PyReadonlyArray2<u64>>(),
        queries.extract::<PyReadonlyArray2<u64>>(),
    ) {
        return searchsorted_impl(py, s, q, right);
    }
    Err(dtype_err(
        "sorted_codes",
        sorted,
        "uint32 or uint64 codes (queries of the same dtype)",
    )
    .into())
}

/// Index settings as passed from Python.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct PyParams {
    chunk: usize,
    window: usize,
    n_curves: usize,
    n_sink: usize,
    causal: bool,
    bits: u32,
    scale: f64,
    #[pyo3(default)]
    exact: bool,
}

impl PyParams {
    fn search(&self) -> attention::Search {
        if self.exact {
            attention::Search::Exact
        } else {
            attention::Search::Window
        }
    }

    fn get(&self) -> Params {
        Params {
            chunk: self.chunk,
            window: self.window,
            n_curves: self.n_curves,
            n_sink: self.n_sink,
            causal: self.causal,
            bits: self.bits,
            scale: self.scale,
        }
    }
}

fn slice4<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray4<'_, T>,
    name: &'static str,
) -> Result<&'a [T], ZetaError> {
    a.as_slice().map_err(|_| not_contiguous(name))
}

fn shape_of<T: numpy::Element, U: numpy::Element>(
    q: &PyReadonlyArray4<'_, T>,
    k: &PyReadonlyArray4<'_, T>,
    v: Option<&PyReadonlyArray4<'_, U>>,
) -> PyResult<Shape> {
    let (qs, ks) = (q.shape(), k.shape());
    if qs[0] != ks[0] {
        return Err(
            ZetaError::value("k", format!("batch {} does not match q's {}", ks[0], qs[0])).into(),
        );
    }
    if qs[3] != ks[3] {
        return Err(ZetaError::value(
            "k",
            format!("key_dim {} does not match q's {}", ks[3], qs[3]),
        )
        .into());
    }
    let dv = match v {
        Some(v) => {
            let vs = v.shape();
            if vs[0] != ks[0] || vs[1] != ks[1] || vs[2] != ks[2] {
                return Err(ZetaError::value(
                    "v",
                    format!("shape {vs:?} does not match k's {ks:?} in (B, H_kv, S)"),
                )
                .into());
            }
            vs[3]
        }
        None => 0,
    };
    Ok(Shape {
        b: qs[0],
        h: qs[1],
        hkv: ks[1],
        n: qs[2],
        s: ks[2],
        dk: qs[3],
        dv,
    })
}

fn arr4<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    d: [usize; 4],
) -> PyResult<Bound<'py, PyArray4<T>>> {
    Ok(Array4::from_shape_vec((d[0], d[1], d[2], d[3]), v)
        .map_err(|e| ZetaError::Internal(e.to_string()))?
        .into_pyarray(py))
}

macro_rules! float_dispatch {
    ($q:expr, $f32:expr, $f64:expr) => {{
        if $q.extract::<PyReadonlyArray4<f32>>().is_ok() {
            $f32
        } else if $q.extract::<PyReadonlyArray4<f64>>().is_ok() {
            $f64
        } else {
            Err(dtype_err("q", $q, "a 4-D float32 or float64 array (B, H, N, key_dim)").into())
        }
    }};
}

#[allow(clippy::type_complexity)]
fn knn_impl<'py, T: numpy::Element + num_traits::Float + quantize::Real>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    topk: usize,
    prm: &PyParams,
) -> PyResult<(Bound<'py, PyArray4<i64>>, Bound<'py, PyArray4<T>>)> {
    let q: PyReadonlyArray4<T> = q.extract()?;
    let k: PyReadonlyArray4<T> = k
        .extract()
        .map_err(|_| dtype_err("k", k, "a 4-D array of q's dtype (B, H_kv, S, key_dim)"))?;
    let sh = shape_of::<T, T>(&q, &k, None)?;
    let (qs, ks) = (slice4(&q, "q")?, slice4(&k, "k")?);
    let p = prm.get();
    let (idx, d2) = run(py, || {
        attention::knn_with(&sh, &p, prm.search(), topk, qs, ks)
    })?;
    let dims = [sh.b, sh.h, sh.n, topk];
    Ok((arr4(py, idx, dims)?, arr4(py, d2, dims)?))
}

fn exact_impl<'py, T: numpy::Element + num_traits::Float + quantize::Real>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    topk: usize,
    causal: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let q: PyReadonlyArray4<T> = q.extract()?;
    let k: PyReadonlyArray4<T> = k
        .extract()
        .map_err(|_| dtype_err("k", k, "a 4-D array of q's dtype (B, H_kv, S, key_dim)"))?;
    let sh = shape_of::<T, T>(&q, &k, None)?;
    let (qs, ks) = (slice4(&q, "q")?, slice4(&k, "k")?);
    let (idx, d2) = run(py, || attention::exact_knn(&sh, causal, topk, qs, ks))?;
    let dims = [sh.b, sh.h, sh.n, topk];
    Ok((arr4(py, idx, dims)?, arr4(py, d2, dims)?)
        .into_pyobject(py)?
        .into_any())
}

/// exact_knn(q, k, topk, causal) -> (indices, sq_dists): brute force, no index
#[pyfunction]
fn exact_knn<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    topk: usize,
    causal: bool,
) -> PyResult<Bound<'py, PyAny>> {
    float_dispatch!(
        q,
        exact_impl::<f32>(py, q, k, topk, causal),
        exact_impl::<f64>(py, q, k, topk, causal)
    )
}

/// knn(q, k, topk, params) -> (indices int64 (B,H,N,topk), sq_dists (B,H,N,topk))
#[pyfunction]
fn knn<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    topk: usize,
    params: PyParams,
) -> PyResult<Bound<'py, PyAny>> {
    float_dispatch!(
        q,
        knn_impl::<f32>(py, q, k, topk, &params)
            .and_then(|t| t.into_pyobject(py).map(|o| o.into_any())),
        knn_impl::<f64>(py, q, k, topk, &params)
            .and_then(|t| t.into_pyobject(py).map(|o| o.into_any()))
    )
}

#[allow(clippy::too_many_arguments)]
fn fwd_impl<'py, T: numpy::Element + num_traits::Float + quantize::Real>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    gamma: PyReadonlyArray1<'py, f64>,
    topk: usize,
    mean_token: bool,
    prm: &PyParams,
    indices: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let q: PyReadonlyArray4<T> = q.extract()?;
    let k: PyReadonlyArray4<T> = k
        .extract()
        .map_err(|_| dtype_err("k", k, "a 4-D array of q's dtype (B, H_kv, S, key_dim)"))?;
    let v: PyReadonlyArray4<T> = v
        .extract()
        .map_err(|_| dtype_err("v", v, "a 4-D array of q's dtype (B, H_kv, S, value_dim)"))?;
    let sh = shape_of(&q, &k, Some(&v))?;
    let (qs, ks, vs) = (slice4(&q, "q")?, slice4(&k, "k")?, slice4(&v, "v")?);
    let gs = gamma.as_slice().map_err(|_| not_contiguous("gamma"))?;
    let p = prm.get();
    let opts = AttnOpts { topk, mean_token };
    let search = prm.search();
    let (out, idx) = run(py, || {
        attention::forward_opt(&sh, &p, search, &opts, qs, ks, vs, gs, indices)
    })?;
    out_and_indices(py, &sh, topk, out, idx, indices)
}

/// `(out, indices)`, or `(out, None)` when the indices were not asked for.
fn out_and_indices<'py, T: numpy::Element>(
    py: Python<'py>,
    sh: &Shape,
    topk: usize,
    out: Vec<T>,
    idx: Vec<i32>,
    indices: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let o = arr4(py, out, [sh.b, sh.h, sh.n, sh.dv])?;
    if !indices {
        return Ok((o, py.None()).into_pyobject(py)?.into_any());
    }
    let i = arr4(py, idx, [sh.b, sh.h, sh.n, topk])?;
    Ok((o, i).into_pyobject(py)?.into_any())
}

/// attention_forward(q, k, v, gamma (H,) float64, topk, mean_token, params, indices=True) ->
/// (out, indices int32), or (out, None) with indices=False (no backward will follow).
#[pyfunction]
#[pyo3(signature = (q, k, v, gamma, topk, mean_token, params, indices = true))]
#[allow(clippy::too_many_arguments)]
fn attention_forward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    gamma: PyReadonlyArray1<'py, f64>,
    topk: usize,
    mean_token: bool,
    params: PyParams,
    indices: bool,
) -> PyResult<Bound<'py, PyAny>> {
    float_dispatch!(
        q,
        fwd_impl::<f32>(py, q, k, v, gamma, topk, mean_token, &params, indices),
        fwd_impl::<f64>(py, q, k, v, gamma, topk, mean_token, &params, indices)
    )
}

/// attention_forward_half(q float32, k float32, v uint16 (the bits of `v_dtype` values),
/// v_dtype "float16" | "bfloat16", gamma, topk, mean_token, params) -> (out float32, indices):
/// the forward reading half-precision values natively (half the bytes gathered);
/// indices=False: (out, None), as [`attention_forward`].
#[pyfunction]
#[pyo3(signature = (q, k, v, v_dtype, gamma, topk, mean_token, params, indices = true))]
#[allow(clippy::too_many_arguments)]
fn attention_forward_half<'py>(
    py: Python<'py>,
    q: PyReadonlyArray4<'py, f32>,
    k: PyReadonlyArray4<'py, f32>,
    v: PyReadonlyArray4<'py, u16>,
    v_dtype: &str,
    gamma: PyReadonlyArray1<'py, f64>,
    topk: usize,
    mean_token: bool,
    params: PyParams,
    indices: bool,
) -> PyResult<Bound<'py, PyAny>> {
    use half::slice::HalfBitsSliceExt;
    let sh = shape_of(&q, &k, Some(&v))?;
    let (qs, ks, bits) = (slice4(&q, "q")?, slice4(&k, "k")?, slice4(&v, "v")?);
    let gs = gamma.as_slice().map_err(|_| not_contiguous("gamma"))?;
    let p = params.get();
    let opts = AttnOpts { topk, mean_token };
    let search = params.search();
    let (out, idx) = match v_dtype {
        "float16" => {
            let vs: &[half::f16] = bits.reinterpret_cast();
            run(py, || {
                attention::forward_opt(&sh, &p, search, &opts, qs, ks, vs, gs, indices)
            })?
        }
        "bfloat16" => {
            let vs: &[half::bf16] = bits.reinterpret_cast();
            run(py, || {
                attention::forward_opt(&sh, &p, search, &opts, qs, ks, vs, gs, indices)
            })?
        }
        _ => {
            return Err(ZetaError::value(
                "v_dtype",
                format!("must be 'float16' or 'bfloat16', got {v_dtype:?}"),
            )
            .into())
        }
    };
    out_and_indices(py, &sh, topk, out, idx, indices)
}

#[allow(clippy::too_many_arguments)]
fn bwd_impl<'py, T: numpy::Element + num_traits::Float + quantize::Real>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    gamma: PyReadonlyArray1<'py, f64>,
    indices: PyReadonlyArray4<'py, i32>,
    grad_out: &Bound<'py, PyAny>,
    mean_token: bool,
    prm: &PyParams,
) -> PyResult<Bound<'py, PyAny>> {
    let q: PyReadonlyArray4<T> = q.extract()?;
    let k: PyReadonlyArray4<T> = k.extract().map_err(|_| dtype_err("k", k, "q's dtype"))?;
    let v: PyReadonlyArray4<T> = v.extract().map_err(|_| dtype_err("v", v, "q's dtype"))?;
    let go: PyReadonlyArray4<T> = grad_out
        .extract()
        .map_err(|_| dtype_err("grad_out", grad_out, "q's dtype"))?;
    let sh = shape_of(&q, &k, Some(&v))?;
    let topk = indices.shape()[3];
    let (qs, ks, vs, gos) = (
        slice4(&q, "q")?,
        slice4(&k, "k")?,
        slice4(&v, "v")?,
        slice4(&go, "grad_out")?,
    );
    let is = indices.as_slice().map_err(|_| not_contiguous("indices"))?;
    let gs = gamma.as_slice().map_err(|_| not_contiguous("gamma"))?;
    let p = prm.get();
    let opts = AttnOpts { topk, mean_token };
    let (dq, dk, dv, dg) = run(py, || {
        attention::backward(&sh, &p, &opts, qs, ks, vs, gs, is, gos)
    })?;
    let dq = arr4(py, dq, [sh.b, sh.h, sh.n, sh.dk])?;
    let dk = arr4(py, dk, [sh.b, sh.hkv, sh.s, sh.dk])?;
    let dv = arr4(py, dv, [sh.b, sh.hkv, sh.s, sh.dv])?;
    let dg: Bound<'py, PyArray1<f64>> = Array1::from_vec(dg).into_pyarray(py);
    Ok((dq, dk, dv, dg).into_pyobject(py)?.into_any())
}

/// attention_backward(q, k, v, gamma, indices, grad_out, mean_token, params) -> (dq, dk, dv, dgamma)
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn attention_backward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    gamma: PyReadonlyArray1<'py, f64>,
    indices: PyReadonlyArray4<'py, i32>,
    grad_out: &Bound<'py, PyAny>,
    mean_token: bool,
    params: PyParams,
) -> PyResult<Bound<'py, PyAny>> {
    float_dispatch!(
        q,
        bwd_impl::<f32>(py, q, k, v, gamma, indices, grad_out, mean_token, &params),
        bwd_impl::<f64>(py, q, k, v, gamma, indices, grad_out, mean_token, &params)
    )
}

/// The Rust KV cache (see `zeta.KVCache` for the documented front end).
///
/// One cache serves many Python threads: the state sits behind a `RwLock`; `attend`, `save`
/// and the accessors take it shared (concurrent attends), `extend` exclusive. Every wait for
/// the lock happens with the GIL released, and on the calling thread, never inside zeta's
/// rayon pool: a pool worker that blocked on the lock while it held the lock's reader's
/// stolen work would deadlock (rayon runs other jobs while it waits for a join).
#[pyclass(name = "KVCacheCore", module = "zeta._core", frozen)]
struct PyKvCache {
    /// (batch, kv_heads, key_dim, value_dim): fixed at construction, read without the lock.
    dims: [usize; 4],
    inner: RwLock<KvCache>,
}

impl PyKvCache {
    fn wrap(c: KvCache) -> Self {
        PyKvCache {
            dims: [c.batch, c.kv_heads, c.key_dim, c.value_dim],
            inner: RwLock::new(c),
        }
    }

    /// The state, shared. A poisoned lock (a panic while it was held) is taken anyway:
    /// writers change nothing until they cannot fail any more (see `KvCache::extend`).
    fn read(&self) -> RwLockReadGuard<'_, KvCache> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, KvCache> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `f` on the shared state, the GIL released before waiting. `f` runs on the calling
    /// thread: `KvCache` enters zeta's pool itself when a call is big enough to gain from
    /// it (a one-token decode call is not: waking the pool costs more than its work).
    fn with_read<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&KvCache) -> Result<R, ZetaError> + Send,
    ) -> PyResult<R> {
        Ok(py.detach(|| {
            let guard = self.read();
            let c: &KvCache = &guard;
            catch(|| f(c))
        })?)
    }

    /// Accessors: no pool, but still no GIL while waiting for an `extend` to finish.
    fn peek<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&KvCache) -> R + Send) -> R {
        py.detach(|| f(&self.read()))
    }
}

#[pymethods]
impl PyKvCache {
    #[new]
    fn new(
        py: Python<'_>,
        batch: usize,
        kv_heads: usize,
        key_dim: usize,
        value_dim: usize,
        params: PyParams,
        dtype: &str,
    ) -> PyResult<Self> {
        let p = params.get();
        let c =
            py.detach(|| catch(|| KvCache::new(batch, kv_heads, key_dim, value_dim, p, dtype)))?;
        Ok(PyKvCache::wrap(c))
    }

    /// extend(k (B, H_kv, T, key_dim) f32, v (B, H_kv, T, value_dim) f32)
    fn extend(
        &self,
        py: Python<'_>,
        k: PyReadonlyArray4<'_, f32>,
        v: PyReadonlyArray4<'_, f32>,
    ) -> PyResult<()> {
        let [b, hkv, dk, dv] = self.dims;
        let (ks, vs) = (k.shape(), v.shape());
        if ks[0] != b || ks[1] != hkv || ks[3] != dk {
            return Err(ZetaError::value(
                "k",
                format!("expected shape ({b}, {hkv}, T, {dk}), got {ks:?}"),
            )
            .into());
        }
        if vs[0] != b || vs[1] != hkv || vs[2] != ks[2] || vs[3] != dv {
            return Err(ZetaError::value(
                "v",
                format!("expected shape ({b}, {hkv}, {}, {dv}), got {vs:?}", ks[2]),
            )
            .into());
        }
        let t = ks[2];
        let kk = slice4(&k, "k")?;
        let vv = slice4(&v, "v")?;
        Ok(py.detach(|| {
            let mut guard = self.write();
            let c: &mut KvCache = &mut guard;
            catch(|| c.extend(kk, vv, t))
        })?)
    }

    /// attend(q (B, H, T_q, key_dim) f32, topk, gamma (H,) f64, mean_token, window=None, exact=False) -> (B, H, T_q, value_dim) f32
    #[pyo3(signature = (q, topk, gamma, mean_token, window=None, exact=false))]
    #[allow(clippy::too_many_arguments)]
    fn attend<'py>(
        &self,
        py: Python<'py>,
        q: PyReadonlyArray4<'py, f32>,
        topk: usize,
        gamma: PyReadonlyArray1<'py, f64>,
        mean_token: bool,
        window: Option<usize>,
        exact: bool,
    ) -> PyResult<Bound<'py, PyArray4<f32>>> {
        let [b, _, dk, dv] = self.dims;
        let qs = q.shape();
        if qs[0] != b || qs[3] != dk {
            return Err(ZetaError::value(
                "q",
                format!("expected shape ({b}, H, T_q, {dk}), got {qs:?}"),
            )
            .into());
        }
        let (h, tq) = (qs[1], qs[2]);
        let qq = slice4(&q, "q")?;
        let gs = gamma.as_slice().map_err(|_| not_contiguous("gamma"))?;
        let out = self.with_read(py, |c| {
            c.attend(qq, h, tq, topk, gs, mean_token, window, exact)
        })?;
        arr4(py, out, [b, h, tq, dv])
    }

    /// decode_packed(qkv (B, T, H*key_dim + H_kv*(key_dim + value_dim)) f32, num_heads, topk,
    /// gamma (H,) f64, mean_token, window=None, exact=False) -> (B, T, H*value_dim) f32:
    /// extend with the rows' keys/values, then attend their queries (`KvCache::decode_packed`).
    #[pyo3(signature = (qkv, num_heads, topk, gamma, mean_token, window=None, exact=false))]
    #[allow(clippy::too_many_arguments)]
    fn decode_packed<'py>(
        &self,
        py: Python<'py>,
        qkv: PyReadonlyArray3<'py, f32>,
        num_heads: usize,
        topk: usize,
        gamma: PyReadonlyArray1<'py, f64>,
        mean_token: bool,
        window: Option<usize>,
        exact: bool,
    ) -> PyResult<Bound<'py, PyArray3<f32>>> {
        let [b, _, _, dv] = self.dims;
        let sh = qkv.shape();
        if sh[0] != b {
            return Err(ZetaError::value(
                "qkv",
                format!("expected batch {b} (axis 0), got shape {sh:?}"),
            )
            .into());
        }
        let t = sh[1];
        let x = qkv.as_slice().map_err(|_| not_contiguous("qkv"))?;
        let gs = gamma.as_slice().map_err(|_| not_contiguous("gamma"))?;
        let out = py.detach(|| {
            let mut guard = self.write();
            let c: &mut KvCache = &mut guard;
            catch(|| c.decode_packed(x, t, num_heads, topk, gs, mean_token, window, exact))
        })?;
        let hd = num_heads * dv;
        Ok(Array3::from_shape_vec((b, t, hd), out)
            .map_err(|e| ZetaError::Internal(e.to_string()))?
            .into_pyarray(py))
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        self.peek(py, |c| c.len())
    }
    #[getter]
    fn nbytes(&self, py: Python<'_>) -> usize {
        self.peek(py, |c| c.nbytes())
    }
    #[getter]
    fn dtype(&self, py: Python<'_>) -> &'static str {
        self.peek(py, |c| c.dtype())
    }
    /// (batch, kv_heads, key_dim, value_dim, params as a dict)
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let p = self.peek(py, |c| c.params);
        let [b, hkv, dk, dv] = self.dims;
        let d = PyDict::new(py);
        d.set_item("chunk", p.chunk)?;
        d.set_item("window", p.window)?;
        d.set_item("n_curves", p.n_curves)?;
        d.set_item("n_sink", p.n_sink)?;
        d.set_item("causal", p.causal)?;
        d.set_item("bits", p.bits)?;
        d.set_item("scale", p.scale)?;
        Ok((b, hkv, dk, dv, d).into_pyobject(py)?.into_any())
    }
    fn save(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        self.with_read(py, |c| c.save(&path))
    }
    #[staticmethod]
    fn load(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        Ok(PyKvCache::wrap(run(py, || KvCache::load(&path))?))
    }
    fn same_contents(&self, py: Python<'_>, other: &PyKvCache) -> PyResult<bool> {
        if std::ptr::eq(self, other) {
            return Ok(true);
        }
        // Two read locks, always in address order: no lock-order cycle with another
        // `same_contents` (std's RwLock queues new readers behind a waiting writer).
        let (x, y) = if (self as *const Self) < (other as *const Self) {
            (self, other)
        } else {
            (other, self)
        };
        Ok(py.detach(|| {
            let (a, b) = (x.read(), y.read());
            catch(|| a.same_contents(&b))
        })?)
    }
}

/// The SIMD path in use now ("portable", "avx2" or "bmi2"); `ZETA_SIMD` overrides.
#[pyfunction]
fn simd_path() -> &'static str {
    simd::selected().name()
}

/// CPU features zeta looks at, and the paths this CPU can run.
#[pyfunction]
fn cpu_features<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let f = simd::features();
    let d = PyDict::new(py);
    d.set_item("avx2", f.avx2)?;
    d.set_item("bmi2", f.bmi2)?;
    d.set_item("slow_pdep", f.slow_pdep)?;
    d.set_item("avx512f", f.avx512f)?;
    d.set_item("f16c", f.f16c)?;
    d.set_item("popcnt", f.popcnt)?;
    d.set_item(
        "paths",
        simd::available_paths()
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>(),
    )?;
    // The vector kernels (distance scans, value sums) this CPU can run, and the one in use
    // (fixed for the process at its first use).
    d.set_item(
        "vectors",
        simd::available_vectors()
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>(),
    )?;
    d.set_item("scan", simd::vector().name())?;
    Ok(d)
}

/// The allocator of zeta's Rust code: "mimalloc", or "system" (`ZETA_ALLOCATOR=system` at
/// import).
#[pyfunction]
fn allocator() -> &'static str {
    crate::alloc::name()
}

/// Threads in zeta's pool (`ZETA_NUM_THREADS`, else the CPU count).
#[pyfunction]
fn num_threads() -> usize {
    pool::current_threads()
}

/// Registered with `os.register_at_fork(after_in_child=...)`.
#[pyfunction]
fn _after_fork_in_child() {
    pool::forget_after_fork();
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(morton_encode, m)?)?;
    m.add_function(wrap_pyfunction!(morton_decode, m)?)?;
    m.add_function(wrap_pyfunction!(zorder, m)?)?;
    m.add_function(wrap_pyfunction!(argsort, m)?)?;
    m.add_function(wrap_pyfunction!(searchsorted, m)?)?;
    m.add_function(wrap_pyfunction!(knn, m)?)?;
    m.add_function(wrap_pyfunction!(exact_knn, m)?)?;
    m.add_function(wrap_pyfunction!(attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(simd_path, m)?)?;
    m.add_class::<PyKvCache>()?;
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(allocator, m)?)?;
    m.add_function(wrap_pyfunction!(attention_forward_half, m)?)?;
    m.add_function(wrap_pyfunction!(_after_fork_in_child, m)?)?;
    Ok(())
}
