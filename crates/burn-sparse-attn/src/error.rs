//! Errors returned by every public op and module of this crate.

use core::fmt;

/// An invalid argument or an unsupported configuration.
///
/// Every variant names the offending argument so that a caller can tell which input to fix;
/// ops validate on the host before any tensor work, so a bad call never reaches a kernel.
#[derive(Debug, Clone, PartialEq)]
pub enum SparseAttnError {
    /// A tensor has the wrong rank or a dimension that does not match the others.
    Shape {
        /// Name of the argument (for example `"k"` or `"selection.indices"`).
        arg: &'static str,
        /// What was expected and what was found.
        detail: String,
    },
    /// A scalar hyper-parameter is out of its valid range (a block size of zero, a top-k of 0, ...).
    Param {
        /// Name of the parameter (for example `"block_size"`).
        arg: &'static str,
        /// Why the value is rejected.
        detail: String,
    },
    /// The requested dtype or kernel path is not available on this device.
    Unsupported {
        /// The argument whose value is unsupported (for example `"q.dtype"`).
        arg: &'static str,
        /// What the device lacks.
        detail: String,
    },
}

impl fmt::Display for SparseAttnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SparseAttnError::Shape { arg, detail } => write!(f, "invalid shape for `{arg}`: {detail}"),
            SparseAttnError::Param { arg, detail } => write!(f, "invalid value for `{arg}`: {detail}"),
            SparseAttnError::Unsupported { arg, detail } => write!(f, "unsupported `{arg}`: {detail}"),
        }
    }
}

impl std::error::Error for SparseAttnError {}

/// Result alias used throughout the crate.
pub type Result<T> = core::result::Result<T, SparseAttnError>;

pub(crate) fn shape_err<T>(arg: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(SparseAttnError::Shape { arg, detail: detail.into() })
}

pub(crate) fn param_err<T>(arg: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(SparseAttnError::Param { arg, detail: detail.into() })
}

/// Rejects zero for a size-like parameter.
pub(crate) fn check_positive(arg: &'static str, value: usize) -> Result<()> {
    if value == 0 { param_err(arg, "must be at least 1, got 0") } else { Ok(()) }
}
