//! Host-side helpers to move f64 data to and from device buffers of an [`AttnDtype`]
//! (used by the tests and the bench; handy for callers without a tensor library).

use crate::{AttnDtype, Client, Handle};
use cubecl::prelude::CubeElement;
use half::{bf16, f16};

/// Round `x` to the precision of `dtype` (returned as f64).
pub fn round_to(dtype: AttnDtype, x: f64) -> f64 {
    match dtype {
        AttnDtype::F32 => x as f32 as f64,
        AttnDtype::F16 => f16::from_f64(x).to_f64(),
        AttnDtype::BF16 => bf16::from_f64(x).to_f64(),
    }
}

/// Upload `data` converted to `dtype`.
pub fn upload(client: &Client, dtype: AttnDtype, data: &[f64]) -> Handle {
    match dtype {
        AttnDtype::F32 => {
            let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
            client.create_from_slice(f32::as_bytes(&v))
        }
        AttnDtype::F16 => {
            let v: Vec<f16> = data.iter().map(|&x| f16::from_f64(x)).collect();
            client.create_from_slice(f16::as_bytes(&v))
        }
        AttnDtype::BF16 => {
            let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f64(x)).collect();
            client.create_from_slice(bf16::as_bytes(&v))
        }
    }
}

/// Upload f32 values.
pub fn upload_f32(client: &Client, data: &[f32]) -> Handle {
    client.create_from_slice(f32::as_bytes(data))
}

/// Upload i32 values.
pub fn upload_i32(client: &Client, data: &[i32]) -> Handle {
    client.create_from_slice(i32::as_bytes(data))
}

/// Read `handle` as `dtype` and convert to f64.
pub fn download(client: &Client, dtype: AttnDtype, handle: &Handle) -> Vec<f64> {
    let bytes = client.read_one(handle.clone()).expect("read device buffer");
    match dtype {
        AttnDtype::F32 => f32::from_bytes(&bytes).iter().map(|&x| x as f64).collect(),
        AttnDtype::F16 => f16::from_bytes(&bytes).iter().map(|x| x.to_f64()).collect(),
        AttnDtype::BF16 => bf16::from_bytes(&bytes).iter().map(|x| x.to_f64()).collect(),
    }
}

/// Read an f32 buffer as f64.
pub fn download_f32(client: &Client, handle: &Handle) -> Vec<f64> {
    download(client, AttnDtype::F32, handle)
}

/// The first `len` i32 values of a buffer (index lists and their like).
pub fn download_i32(client: &Client, handle: &Handle, len: usize) -> Vec<i32> {
    let bytes = client.read_one(handle.clone()).expect("read device buffer");
    bytes.chunks_exact(4).take(len).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A buffer of `n` elements of `dtype`, every one NaN (to catch unwritten outputs).
pub fn nan_buffer(client: &Client, dtype: AttnDtype, n: usize) -> Handle {
    upload(client, dtype, &vec![f64::NAN; n.max(1)])
}

/// The dtypes named by `SPARSE_ATTN_DTYPES` (comma-separated `f32`, `f16`, `bf16`; default
/// `f32`): the precisions a test binary checks on this run.
pub fn dtypes_from_env() -> Vec<AttnDtype> {
    let s = std::env::var("SPARSE_ATTN_DTYPES").unwrap_or_else(|_| "f32".into());
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| match x.trim() {
            "f32" => AttnDtype::F32,
            "f16" => AttnDtype::F16,
            "bf16" => AttnDtype::BF16,
            other => panic!("SPARSE_ATTN_DTYPES: unknown dtype {other}"),
        })
        .collect()
}

/// `n` deterministic pseudo-random values in `[-amplitude, amplitude)` from `seed`, rounded
/// to `dtype` (so a reference computed from them sees exactly what the device holds).
pub fn random_values(n: usize, seed: u64, dtype: AttnDtype, amplitude: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            round_to(dtype, ((s >> 11) as f64 / (1u64 << 53) as f64) * (2.0 * amplitude) - amplitude)
        })
        .collect()
}

/// Block until every queued launch on `client` is done.
pub fn sync(client: &Client) {
    cubecl::future::block_on(client.sync()).expect("device sync");
}

/// The device named by `SPARSE_ATTN_RUNTIME` (`cuda`, `wgpu` or `vulkan`, among the runtimes
/// compiled in), else CUDA when compiled in, else the default wgpu adapter. Tests and
/// benchmarks use it so one binary can run on several runtimes.
#[cfg(feature = "launch")]
pub fn device_from_env() -> cubecl::Device {
    let want = std::env::var("SPARSE_ATTN_RUNTIME").unwrap_or_default();
    let dev = match want.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => cubecl::Device::cuda(0),
        #[cfg(feature = "vulkan")]
        "vulkan" => cubecl::Device::vulkan(Default::default()),
        #[cfg(feature = "wgpu")]
        "wgpu" => cubecl::Device::wgpu(Default::default()),
        "" => {
            #[cfg(feature = "cuda")]
            let d = cubecl::Device::cuda(0);
            #[cfg(not(feature = "cuda"))]
            let d = cubecl::Device::wgpu(Default::default());
            d
        }
        other => panic!("SPARSE_ATTN_RUNTIME={other}: not a runtime compiled into this binary"),
    };
    dev.unwrap_or_else(|e| panic!("no device for SPARSE_ATTN_RUNTIME={want:?}: {e:?}"))
}
