//! What the device reports, and the kernel path chosen from it.

use crate::*;
use cubecl::prelude::*;

pub(crate) fn has_elem(client: &Client, e: ElemType) -> bool {
    client.properties().features.types.elem.contains_key(&e)
}

/// `Ok` when `dtype` can be used on this client's device.
pub fn supports(client: &Client, dtype: AttnDtype) -> Result<(), KernelError> {
    use cubecl::ir::FloatKind;
    let (kind, name) = match dtype {
        AttnDtype::F32 => return Ok(()),
        AttnDtype::F16 => (FloatKind::F16, "f16"),
        AttnDtype::BF16 => (FloatKind::BF16, "bf16"),
    };
    if has_elem(client, ElemType::Float(kind)) {
        Ok(())
    } else {
        Err(unsupported(
            "dtype",
            format!("{name} is not supported by runtime `{}` on device '{}'", client.name(), client.properties().identity.name),
        ))
    }
}

/// Which kernel path [`attention_forward`] / [`attention_backward`] use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Portable: no plane ops, no tensor cores, no atomics; f32 arithmetic throughout.
    Portable,
    /// Tensor cores (`cmma`, 16 x 16 fragments, one plane each): products of f16 / bf16
    /// operands, or TF32 for f32 inputs (10-bit mantissa, as cuBLAS and Burn's f32 matmul
    /// on CUDA), accumulated in f32; softmax, masks and bias in f32.
    TensorCore,
    /// Register fragments (CUDA `mma.sync` m16n8k16 + `ldmatrix`, f16/bf16, head dims that
    /// are multiples of 16 up to 128): FlashAttention-2's recipe, with Q, S, P and O (dQ, dK,
    /// dV in the backward) in registers for a whole pass. See [`fragment`].
    Fragment,
}

/// Environment variable that forces a path: `portable`, `tensor-core` or `fragment` (the
/// latter two still fall back when the device cannot run them). Unset: the best path the
/// device supports.
pub const KERNEL_PATH_ENV: &str = "SPARSE_ATTN_KERNEL_PATH";

/// The operand type and fragment depth of the tensor-core path for `dtype`, when the device
/// reports a matching 16 x 16 x k cooperative-matrix configuration with f32 accumulation
/// and a fixed plane size of at least 16 lanes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MmaSpec {
    /// Fragment depth `k` (16 for f16/bf16, 8 for tf32).
    pub(crate) mk: usize,
    /// Bytes per staged operand.
    pub(crate) op_size: usize,
    /// Lanes per plane.
    pub(crate) plane: usize,
}

pub(crate) fn mma_spec(client: &Client, dtype: AttnDtype, head_dim: usize) -> Option<MmaSpec> {
    use cubecl::ir::FloatKind;
    use cubecl::ir::features::MmaConfig;
    match std::env::var(KERNEL_PATH_ENV).as_deref() {
        Ok("portable") => return None,
        Ok("") | Ok("tensor-core") | Ok("fragment") | Err(_) => {}
        Ok(other) => panic!("{KERNEL_PATH_ENV}={other}: expected `portable`, `tensor-core` or `fragment`"),
    }
    if !head_dim.is_multiple_of(16) {
        return None;
    }
    let p = client.properties();
    let plane = p.hardware.plane_size_max as usize;
    if p.hardware.plane_size_min as usize != plane || !(16..=64).contains(&plane) {
        return None;
    }
    let (kind, mk, op_size) = match dtype {
        AttnDtype::F16 => (FloatKind::F16, 16, 2),
        AttnDtype::BF16 => (FloatKind::BF16, 16, 2),
        AttnDtype::F32 => (FloatKind::TF32, 8, 4),
    };
    let cfg = MmaConfig {
        a_type: ElemType::Float(kind),
        b_type: ElemType::Float(kind),
        cd_type: ElemType::Float(FloatKind::F32),
        m: 16,
        n: 16,
        k: mk as u32,
    };
    p.features.matmul.cmma.contains(&cfg).then_some(MmaSpec { mk, op_size, plane })
}

/// The path [`attention_forward`] and [`attention_backward`] take for `dtype` and
/// `head_dim` on this client (tensor cores need a head dim that is a multiple of 16).
pub fn kernel_path(client: &Client, dtype: AttnDtype, head_dim: usize) -> KernelPath {
    match mma_spec(client, dtype, head_dim) {
        Some(_) if fragment_supported(client, dtype, head_dim) => KernelPath::Fragment,
        Some(_) => KernelPath::TensorCore,
        None => KernelPath::Portable,
    }
}

/// The fragment path reads q, k, v (and dO) as 16-byte vectors: every handle must start on a
/// 16-byte boundary (true of fresh allocations; a view at an odd offset takes another path).
pub(crate) fn vector_aligned(handles: &[&Handle]) -> bool {
    handles.iter().all(|h| h.offset_start.unwrap_or(0).is_multiple_of(16))
}

/// Whether the register-fragment path can run `dtype` / `head_dim` here: CUDA (whose PTX
/// fragment layout the kernels rely on), a plane of 32, f16/bf16 m16n8k16 `mma` with f32
/// accumulators and `ldmatrix`, `head_dim` a multiple of 16 up to 128 (register budget).
pub(crate) fn fragment_supported(client: &Client, dtype: AttnDtype, head_dim: usize) -> bool {
    use cubecl::ir::FloatKind;
    use cubecl::ir::features::MmaConfig;
    if matches!(std::env::var(KERNEL_PATH_ENV).as_deref(), Ok("portable") | Ok("tensor-core")) {
        return false;
    }
    let kind = match dtype {
        AttnDtype::F16 => FloatKind::F16,
        AttnDtype::BF16 => FloatKind::BF16,
        AttnDtype::F32 => return false,
    };
    let p = client.properties();
    let cfg = MmaConfig {
        a_type: ElemType::Float(kind),
        b_type: ElemType::Float(kind),
        cd_type: ElemType::Float(FloatKind::F32),
        m: 16,
        n: 8,
        k: 16,
    };
    client.name().to_ascii_lowercase().contains("cuda")
        && p.hardware.plane_size_min == 32
        && p.hardware.plane_size_max == 32
        && head_dim.is_multiple_of(16)
        && head_dim <= 128
        && p.features.matmul.mma.contains(&cfg)
        && p.features.matmul.ldmatrix.contains(&ElemType::Float(kind))
}

/// One-line capability summary of the client's device, and the chosen path.
pub fn describe(client: &Client) -> String {
    use cubecl::ir::FloatKind;
    let p = client.properties();
    let f = &p.features;
    format!(
        "runtime={} device='{}' fingerprint='{}' plane={:?} plane_size={}..{} f16={} bf16={} cmma_configs={} \
         max_units_per_cube={} max_shared_mem={}B max_bindings={} path(f32,f16,bf16; d=64)={:?},{:?},{:?}",
        client.name(),
        p.identity.name,
        p.identity.fingerprint,
        f.plane,
        p.hardware.plane_size_min,
        p.hardware.plane_size_max,
        has_elem(client, ElemType::Float(FloatKind::F16)),
        has_elem(client, ElemType::Float(FloatKind::BF16)),
        f.matmul.cmma.len(),
        p.hardware.max_units_per_cube,
        p.hardware.max_shared_memory_size,
        p.hardware.max_bindings,
        kernel_path(client, AttnDtype::F32, 64),
        kernel_path(client, AttnDtype::F16, 64),
        kernel_path(client, AttnDtype::BF16, 64),
    )
}

/// Whether the device is software (a CPU behind a GPU API: Mesa's llvmpipe, SwiftShader),
/// whose shader compiler unrolls the portable kernels' constant per-unit loops at great
/// cost: there they take runtime bounds (see `kernels::loop_bound`).
pub(crate) fn software_device(client: &Client) -> bool {
    client.properties().identity.physical.is_none()
}
