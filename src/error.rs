//! Library error type.
//!
//! Every fallible library function returns [`Result`]. Variants carry the offending file or
//! tensor so the CLI can print an actionable message; the CLI adds hints with `anyhow`.

use std::path::PathBuf;

/// All errors the lopper library reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file whose bytes are not what its format says (bad magic, truncated, corrupt).
    #[error("{path}: invalid {format} file: {msg}")]
    Format {
        path: PathBuf,
        format: &'static str,
        msg: String,
    },
    /// A tensor's shape disagrees with the model configuration.
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?} from the config")]
    Shape {
        path: PathBuf,
        tensor: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A tensor the architecture needs is not in the file.
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    /// A model architecture lopper does not implement.
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArch {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    /// A tensor dtype / quantization lopper cannot read.
    #[error("{path}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// Bad or missing configuration values.
    #[error("{path}: bad config: {msg}")]
    Config { path: PathBuf, msg: String },
    /// Tokenizer missing or unusable.
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// Text input that cannot serve the requested protocol (empty, too short, not UTF-8).
    #[error("{path}: {msg}")]
    Text { path: PathBuf, msg: String },
    /// A request that cannot be satisfied (bad argument values).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Fetching a cached asset failed.
    #[error("fetching {what}: {msg}")]
    Fetch { what: String, msg: String },
    /// Numerical failure (NaN/Inf) at a named place.
    #[error("numerical failure: {0}")]
    Numeric(String),
    /// Output could not be written.
    #[error("{path}: cannot write output: {msg}")]
    Output { path: PathBuf, msg: String },
    /// The weights' scratch file ([`crate::model::spill`]) in directory `path` failed.
    #[error("{path}: the weights' scratch file: {msg}")]
    Scratch { path: PathBuf, msg: String },
    /// The training graph failed (a candle error, see [`crate::train`]).
    #[error("training: {0}")]
    Train(String),
}

/// Library result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an `std::io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, format: &'static str, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            format,
            msg: msg.into(),
        }
    }

    /// A shape error: tensor `tensor` of `path` is `got`, the config expects `expected`.
    pub fn shape(
        path: impl Into<PathBuf>,
        tensor: &str,
        got: &[usize],
        expected: &[usize],
    ) -> Self {
        Error::Shape {
            path: path.into(),
            tensor: tensor.to_string(),
            got: got.to_vec(),
            expected: expected.to_vec(),
        }
    }

    /// A config error for `path`.
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
