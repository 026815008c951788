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
