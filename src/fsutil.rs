//! Writing files so that a reader never sees half of one: a temporary file beside the target,
//! fsynced, then renamed over it. Checkpoints, metrics, plots and fetched datasets all go
//! through here.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;

/// Makes each temp name unique within the process, so two saves never share a temp file.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to a temp file beside `path`, makes it durable, then renames it over `path`.
/// On failure the temp file is removed and `path` is as it was.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let file_name = path.file_name().context("the path names no file")?;
    // A bare file name lives in the current directory; its parent is "".
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // Same directory, so the rename stays on one filesystem and is atomic; hidden, so a crash
    // leaves no file that looks like a checkpoint.
    let mut temp_name = OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".tmp-{}-{}", std::process::id(), TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
    let temp = dir.join(temp_name);

    // `create_new`: never truncate a file someone else made, and only clean up our own.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .with_context(|| format!("cannot create temporary file `{}`", temp.display()))?;
    let written = write_durably(file, bytes)
        .with_context(|| format!("cannot write temporary file `{}`", temp.display()))
        .and_then(|()| {
            fs::rename(&temp, path)
                .with_context(|| format!("cannot rename `{}` to `{}`", temp.display(), path.display()))
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    sync_dir(dir);
    Ok(())
}

/// Writes and fsyncs, so the rename can never expose a file whose data is not on disk yet.
fn write_durably(mut file: File, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes the rename itself durable. Best effort: the new checkpoint is already in place, so
/// reporting a failure here would wrongly suggest the old one still is.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}
