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

/// One entry of `--devices`: a backend and a device index (`cuda:1`; `cuda` is `cuda:0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Backend name as `--device` takes it (`cpu` reads as `flex`).
    pub backend: String,
    /// Device index among the backend's devices.
    pub index: usize,
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.backend, self.index)
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    /// `NAME` or `NAME:INDEX`; the name is not checked against the build here.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        let (name, index) = match s.split_once(':') {
            Some((name, index)) => {
                let index = index.parse().map_err(|_| format!("`{s}`: expected BACKEND or BACKEND:INDEX, e.g. cuda:1"))?;
                (name, index)
            }
            None => (s.as_str(), 0),
        };
        if name.is_empty() {
            return Err(format!("`{s}`: expected BACKEND or BACKEND:INDEX, e.g. cuda:1"));
        }
        Ok(Self { backend: name.replace("cpu", "flex"), index })
    }
}

/// Checks a `--devices` list against `--device` and `--batch` without opening a device: one
/// backend (the one `--device` names, if given), no device twice, a batch that splits evenly,
/// and several devices only on CUDA (Burn's collectives run on NCCL; no other backend has
/// them). Errors name the flags.
pub fn check_device_list(device: Option<&str>, devices: &[DeviceSpec], batch: usize) -> Result<(), String> {
    let list = devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
    let Some(first) = devices.first() else {
        return Err("--devices: expected at least one device, e.g. --devices cuda:0,cuda:1".into());
    };
    if let Some(other) = devices.iter().find(|d| d.backend != first.backend) {
        return Err(format!(
            "--devices {list} mixes backends ({} and {}): the devices of one run are of one backend",
            first.backend, other.backend
        ));
    }
    if let Some(device) = device {
        let device = device.to_ascii_lowercase().replace("cpu", "flex");
        if device != first.backend {
            return Err(format!("--devices {list} are {} devices but --device is {device}: give one backend (or leave --device out)", first.backend));
        }
    }
    for (i, d) in devices.iter().enumerate() {
        if devices[..i].contains(d) {
            return Err(format!("--devices {list} names {d} twice: one replica per device"));
        }
    }
    let n = devices.len();
    if n > 1 && batch % n != 0 {
        return Err(format!(
            "--batch {batch} does not split over the {n} devices of --devices {list}: the global batch must be a multiple of the device count"
        ));
    }
    if n > 1 && first.backend != "cuda" {
        return Err(format!(
            "--devices {list}: data-parallel training on several devices needs CUDA devices (it uses Burn's collective \
             all-reduce, which runs on NCCL and exists for the cuda backend only)"
        ));
    }
    Ok(())
}

/// The devices of a `--devices` list checked by [`check_device_list`], their float dtype set to
/// `dtype`, and the backend name. A CUDA index past the devices this machine has, and (for
/// several devices) a missing NCCL library, are errors naming `--devices`.
pub fn select_devices(devices: &[DeviceSpec], dtype: burn::tensor::FloatDType) -> Result<(String, Vec<Device>), String> {
    let backend = devices.first().ok_or("--devices: expected at least one device")?.backend.clone();
    let mut out = Vec::with_capacity(devices.len());
    for spec in devices {
        let mut device = match spec.backend.as_str() {
            #[cfg(feature = "cuda")]
            "cuda" => {
                let present = Device::enumerate(burn::tensor::DeviceType::Cuda).len();
                if spec.index >= present {
                    return Err(match present {
                        0 => format!("--devices {spec}: no CUDA device found on this machine (no NVIDIA driver?)"),
                        n => format!("--devices {spec}: no such device; this machine has {n} CUDA device(s): cuda:0..cuda:{}", n - 1),
                    });
                }
                Device::cuda(spec.index)
            }
            _ if spec.index != 0 => {
                return Err(format!("--devices {spec}: no such device; only cuda devices are picked by index here (use {})", spec.backend));
            }
            _ => select_device(Some(&spec.backend)).map_err(|e| format!("--devices {spec}: {e}"))?.1,
        };
        if dtype != burn::tensor::FloatDType::F32 {
            device.configure(dtype).map_err(|e| format!("--dtype {dtype:?} on {spec}: {e}"))?;
        }
        out.push(device);
    }
    if out.len() > 1 {
        check_nccl()?;
    }
    Ok((backend, out))
}

/// Whether the NCCL library that CUDA collectives load at run time can be found; the error
/// says which names were looked for and how to provide one.
pub fn check_nccl() -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to `dlopen` each candidate name (cudarc's own lookup, the one
        // its NCCL calls use).
        if unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Ok(());
        }
        let names = cudarc::get_lib_name_candidates("nccl");
        Err(format!(
            "--devices: data-parallel training needs NCCL, and none of {names:?} was found on the library path. \
             NCCL installs as libnccl.so.2 (e.g. PyPI's nvidia-nccl-cu12/cu13 under site-packages/nvidia/nccl/lib, or \
             the libnccl2 package), a name not among these: link it as libnccl.so in a folder listed in LD_LIBRARY_PATH \
             (see examples/toy-lm/README.md)"
        ))
    }
    #[cfg(not(feature = "cuda"))]
    Err("--devices: data-parallel training needs the cuda backend (rebuild with `--features cuda`)".into())
}
