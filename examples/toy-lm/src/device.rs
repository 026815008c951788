//! Run-time device selection among the backends compiled in (cargo features).

use burn::tensor::Device;

use crate::AppResult;

/// Backends compiled into this binary, in order of preference for the default.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "flex") {
        v.push("flex");
    }
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "metal") {
        v.push("metal");
    }
    if cfg!(feature = "vulkan") {
        v.push("vulkan");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    v
}

/// Float precision of a run (`--dtype`): every parameter, activation and attention call of
/// the model uses it. `f32` (default) multiplies in TF32 on CUDA tensor cores; `bf16` and
/// `f16` take the CUDA kernels' register-fragment path (and, for NSA and DMA, their fastest
/// kernels).
pub fn parse_dtype(name: Option<&str>) -> AppResult<burn::tensor::FloatDType> {
    use burn::tensor::FloatDType;
    Ok(match name.map(|s| s.to_ascii_lowercase()).as_deref() {
        None | Some("f32") => FloatDType::F32,
        Some("bf16") => FloatDType::BF16,
        Some("f16") => FloatDType::F16,
        Some(other) => return Err(format!("--dtype {other}: expected f32, bf16 or f16").into()),
    })
}

/// [`select_device`] with its float dtype set to `dtype` before any tensor exists on it;
/// a dtype the backend does not have is an error naming `--dtype`.
pub fn select_device_with(name: Option<&str>, dtype: burn::tensor::FloatDType) -> AppResult<(String, Device)> {
    let (backend, mut device) = select_device(name)?;
    if dtype != burn::tensor::FloatDType::F32 {
        device.configure(dtype).map_err(|e| format!("--dtype {dtype:?} on {backend}: {e}"))?;
    }
    Ok((backend, device))
}

/// The device named by `--device` (or the first compiled backend) and its name.
pub fn select_device(name: Option<&str>) -> AppResult<(String, Device)> {
    let compiled = compiled_backends();
    let name = match name {
        Some(n) => n.to_ascii_lowercase(),
        None => compiled.first().ok_or("no backend compiled in: enable a feature (flex, wgpu, vulkan, metal, cuda)")?.to_string(),
    };
    let device = match name.as_str() {
        #[cfg(feature = "flex")]
        "flex" | "cpu" => Device::flex(),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(Default::default()),
        #[cfg(feature = "vulkan")]
        "vulkan" => Device::vulkan(Default::default()),
        #[cfg(feature = "metal")]
        "metal" => Device::metal(Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(0),
        other => {
            return Err(format!(
                "--device {other} is not available in this build (compiled: {}); rebuild with `--features {other}`",
                compiled.join(", ")
            )
            .into());
        }
    };
    Ok((name.replace("cpu", "flex"), device))
}
