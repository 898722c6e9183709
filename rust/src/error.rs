//! One error type for the crate; `py.rs` maps it to Python exceptions in one place.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZetaError {
    /// A bad value for a named argument (maps to `ValueError`).
    Value { arg: &'static str, msg: String },
    /// A bad type/dtype for a named argument (maps to `TypeError`).
    Type { arg: &'static str, msg: String },
    /// An allocation that would not fit (maps to `MemoryError`).
    Memory(String),
    /// File-system failure (maps to `OSError`).
    Io(String),
    /// A file that is not a valid zeta file (maps to `ValueError`).
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, ZetaError>;

impl ZetaError {
    pub fn value(arg: &'static str, msg: impl Into<String>) -> Self {
        ZetaError::Value {
            arg,
            msg: msg.into(),
        }
    }
    pub fn type_(arg: &'static str, msg: impl Into<String>) -> Self {
        ZetaError::Type {
            arg,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for ZetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ZetaError::Value { arg, msg } | ZetaError::Type { arg, msg } => {
                write!(f, "{arg}: {msg}")
            }
            ZetaError::Memory(m) => write!(f, "out of memory: {m}"),
            ZetaError::Io(m) => write!(f, "{m}"),
            ZetaError::Corrupt(m) => write!(f, "corrupt zeta file: {m}"),
        }
    }
}

impl std::error::Error for ZetaError {}

impl From<std::io::Error> for ZetaError {
    fn from(e: std::io::Error) -> Self {
        ZetaError::Io(e.to_string())
    }
}

/// `vec![x; n]` that reports allocation failure instead of aborting the process.
pub fn try_vec<T: Clone>(x: T, n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| ZetaError::Memory(format!("{what}: {n} elements")))?;
    v.resize(n, x);
    Ok(v)
}
