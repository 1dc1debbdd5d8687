//! The IDX file format (MNIST's), plain or gzip-compressed.
//!
//! An IDX file is a big-endian header (magic number, then one u32 per dimension) followed by
//! the raw elements. cnnc needs two kinds: images (`0x00000803`: count, rows, cols, then
//! unsigned bytes) and labels (`0x00000801`: count, then unsigned bytes).
//!
//! This module turns bytes into counts, pixels and labels and says precisely what is wrong with
//! a bad file. It must not panic or allocate without bound on any input, and it knows nothing
//! of datasets: scaling, class counts and image shapes are checked by the caller.

use std::borrow::Cow;
use std::fmt;
use std::io::Read as _;
use std::path::Path;

pub const IMAGES_MAGIC: u32 = 0x0000_0803;
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The most element bytes a header may announce. Real MNIST holds 47 MB; a header that asks
/// for more than this is corrupt, and believing it would mean a huge allocation.
pub const MAX_ELEMENT_BYTES: u64 = 1_000_000_000;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// An image file's contents: `count` images of `rows` x `cols` bytes, row-major, one after the
/// other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Why some bytes are not the IDX file they should be. The file name is added by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdxError {
    CorruptGzip {
        reason: String,
    },
    /// Shorter than the header itself.
    NoHeader {
        kind: Kind,
        found: usize,
    },
    WrongMagic {
        kind: Kind,
        found: u32,
    },
    /// The header announces more data than any sane file holds, or more than fits in memory.
    AbsurdHeader {
        kind: Kind,
        dims: Vec<u32>,
    },
    Truncated {
        kind: Kind,
        expected: usize,
        found: usize,
    },
    TrailingBytes {
        kind: Kind,
        expected: usize,
        extra: usize,
    },
}

/// Which of the two IDX files cnnc reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Images,
    Labels,
}

impl Kind {
    pub fn magic(self) -> u32 {
        match self {
            Kind::Images => IMAGES_MAGIC,
            Kind::Labels => LABELS_MAGIC,
        }
    }

    /// Bytes before the elements: the magic number and one u32 per dimension.
    fn header_len(self) -> usize {
        match self {
            Kind::Images => 16,
            Kind::Labels => 8,
        }
    }

    fn file(self) -> &'static str {
        match self {
            Kind::Images => "image file",
            Kind::Labels => "label file",
        }
    }

    fn elements(self) -> &'static str {
        match self {
            Kind::Images => "pixels",
            Kind::Labels => "labels",
        }
    }
}

impl fmt::Display for IdxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdxError::CorruptGzip { reason } => write!(f, "corrupt gzip stream: {reason}"),
            IdxError::NoHeader { kind, found } => write!(
                f,
                "too short for an IDX {}: {found} bytes, but the header alone is {} bytes",
                kind.file(),
                kind.header_len()
            ),
            IdxError::WrongMagic { kind, found } => {
                write!(
                    f,
                    "wrong magic number 0x{found:08x}, expected 0x{:08x} (an IDX {})",
                    kind.magic(),
                    kind.file()
                )?;
                write!(f, "; {}", magic_hint(*found))
            }
            IdxError::AbsurdHeader { kind, dims } => {
                let dims: Vec<String> = dims.iter().map(u32::to_string).collect();
                write!(
                    f,
                    "absurd header: {} of {} announces more than {MAX_ELEMENT_BYTES} bytes of {}; \
                     the header is corrupt",
                    kind.file(),
                    dims.join("x"),
                    kind.elements()
                )
            }
            IdxError::Truncated { kind, expected, found } => write!(
                f,
                "truncated: expected {expected} bytes of {} after the {}-byte header, found {found}",
                kind.elements(),
                kind.header_len()
            ),
            IdxError::TrailingBytes { kind, expected, extra } => write!(
                f,
                "{extra} unexpected trailing bytes after the {expected} bytes of {} the header announces",
                kind.elements()
            ),
        }
    }
}

impl std::error::Error for IdxError {}

/// What a wrong magic number most likely means, so the message can say what to do.
fn magic_hint(found: u32) -> String {
    let [zero0, zero1, element_type, dims] = found.to_be_bytes();
    match found {
        IMAGES_MAGIC => "that is the magic number of IDX image files: is this an image file?".into(),
        LABELS_MAGIC => "that is the magic number of IDX label files: is this a label file?".into(),
        _ if [zero0, zero1] == GZIP_MAGIC => "this is still gzip-compressed after decompression".into(),
        _ if zero0 == 0 && zero1 == 0 => {
            format!("this is an IDX file of element type 0x{element_type:02x} with {dims} dimensions")
        }
        _ => "this is not an IDX file".into(),
    }
}

/// Reads an image file, plain or gzip-compressed. Errors name the file.
pub fn read_images(path: &Path) -> anyhow::Result<IdxImages> {
    let bytes = read_file(path)?;
    parse_images(&bytes).map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))
}

/// Reads a label file, plain or gzip-compressed. Errors name the file.
pub fn read_labels(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = read_file(path)?;
    parse_labels(&bytes).map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))
}

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read `{}`: {e}", path.display()))
}

/// Parses the bytes of an image file, plain or gzip-compressed.
pub fn parse_images(bytes: &[u8]) -> Result<IdxImages, IdxError> {
    let bytes = decompress(bytes, Kind::Images)?;
    let header = header(&bytes, Kind::Images)?;
    let [count, rows, cols] = [header[0], header[1], header[2]];
    let pixels = elements(&bytes, Kind::Images, &[count, rows, cols])?;
    // The three fit in usize: their product is at most MAX_ELEMENT_BYTES unless one is zero,
    // and u32 fits in usize on every platform cnnc runs on.
    let [count, rows, cols] = [count, rows, cols].map(|d| d as usize);
    Ok(IdxImages { count, rows, cols, pixels: pixels.to_vec() })
}

/// Parses the bytes of a label file, plain or gzip-compressed.
pub fn parse_labels(bytes: &[u8]) -> Result<Vec<u8>, IdxError> {
    let bytes = decompress(bytes, Kind::Labels)?;
    let header = header(&bytes, Kind::Labels)?;
    Ok(elements(&bytes, Kind::Labels, &[header[0]])?.to_vec())
}

/// Gunzips when the bytes start with gzip's magic, whatever the file is called. The output is
/// capped just past the largest legal file, so a gzip bomb costs a bounded allocation and then
/// fails the size checks like any other oversized file.
fn decompress(bytes: &[u8], kind: Kind) -> Result<Cow<'_, [u8]>, IdxError> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(Cow::Borrowed(bytes));
    }
    let cap = MAX_ELEMENT_BYTES + kind.header_len() as u64 + 1;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| IdxError::CorruptGzip { reason: e.to_string() })?;
    Ok(Cow::Owned(out))
}

/// Checks the magic number and returns the dimensions that follow it (3 for images, 1 for
/// labels).
fn header(bytes: &[u8], kind: Kind) -> Result<Vec<u32>, IdxError> {
    if bytes.len() < kind.header_len() {
        // Four bytes are enough to tell a wrong kind of file from a short one.
        if let Some(found) = be_u32(bytes, 0).filter(|&m| m != kind.magic()) {
            return Err(IdxError::WrongMagic { kind, found });
        }
        return Err(IdxError::NoHeader { kind, found: bytes.len() });
    }
    let words: Vec<u32> = (0..kind.header_len() / 4).filter_map(|i| be_u32(bytes, 4 * i)).collect();
    if words[0] != kind.magic() {
        return Err(IdxError::WrongMagic { kind, found: words[0] });
    }
    Ok(words[1..].to_vec())
}

/// The element bytes after the header, exactly as many as the dimensions announce.
fn elements<'a>(bytes: &'a [u8], kind: Kind, dims: &[u32]) -> Result<&'a [u8], IdxError> {
    // u128 cannot overflow for three u32 factors.
    let announced: u128 = dims.iter().map(|&d| u128::from(d)).product();
    let expected = match usize::try_from(announced) {
        Ok(n) if announced <= u128::from(MAX_ELEMENT_BYTES) => n,
        _ => return Err(IdxError::AbsurdHeader { kind, dims: dims.to_vec() }),
    };
    let found = bytes.len() - kind.header_len();
    if found < expected {
        return Err(IdxError::Truncated { kind, expected, found });
    }
    if found > expected {
        return Err(IdxError::TrailingBytes { kind, expected, extra: found - expected });
    }
    Ok(&bytes[kind.header_len()..])
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(word))
}

/// The bytes of an image file, for tests and fixtures. Callers keep `pixels.len()` equal to
/// `count * rows * cols`.
pub fn encode_images(images: &IdxImages) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + images.pixels.len());
    for word in [IMAGES_MAGIC, images.count as u32, images.rows as u32, images.cols as u32] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(&images.pixels);
    out
}

/// The bytes of a label file, for tests and fixtures.
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(count: u32, rows: u32, cols: u32, pixels: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for word in [IMAGES_MAGIC, count, rows, cols] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out.extend((0..pixels).map(|i| i as u8));
        out
    }

    #[test]
    fn images_parse_into_count_rows_cols_and_pixels() {
        let parsed = parse_images(&images(2, 3, 4, 24)).unwrap();
        assert_eq!((parsed.count, parsed.rows, parsed.cols), (2, 3, 4));
        assert_eq!(parsed.pixels, (0..24).collect::<Vec<u8>>());
    }

    #[test]
    fn header_errors() {
        // (bytes, expected error)
        let cases: Vec<(Vec<u8>, IdxError)> = vec![
            (vec![], IdxError::NoHeader { kind: Kind::Images, found: 0 }),
            (vec![0, 0, 8, 3, 0], IdxError::NoHeader { kind: Kind::Images, found: 5 }),
            (vec![0, 0, 8, 1, 0], IdxError::WrongMagic { kind: Kind::Images, found: LABELS_MAGIC }),
            (
                images(u32::MAX, u32::MAX, u32::MAX, 0),
                IdxError::AbsurdHeader { kind: Kind::Images, dims: vec![u32::MAX; 3] },
            ),
            (
                images(1000, 1000, 1001, 0),
                IdxError::AbsurdHeader { kind: Kind::Images, dims: vec![1000, 1000, 1001] },
            ),
            (images(2, 3, 4, 23), IdxError::Truncated { kind: Kind::Images, expected: 24, found: 23 }),
            (images(2, 3, 4, 27), IdxError::TrailingBytes { kind: Kind::Images, expected: 24, extra: 3 }),
        ];
        for (bytes, expected) in cases {
            assert_eq!(parse_images(&bytes), Err(expected), "{bytes:?}");
        }
    }

    #[test]
    fn exactly_the_largest_legal_size_is_not_absurd() {
        // 1000 * 1000 * 1000 = MAX_ELEMENT_BYTES: allowed by the header check, then truncated.
        let err = parse_images(&images(1000, 1000, 1000, 0)).unwrap_err();
        assert_eq!(err, IdxError::Truncated { kind: Kind::Images, expected: 1_000_000_000, found: 0 });
    }

    #[test]
    fn magic_hints() {
        let cases = [
            (IMAGES_MAGIC, "is this an image file"),
            (LABELS_MAGIC, "is this a label file"),
            (0x1f8b_0800, "still gzip-compressed"),
            (0x0000_0d02, "element type 0x0d with 2 dimensions"),
            (0x3c21_444f, "not an IDX file"),
        ];
        for (magic, hint) in cases {
            assert!(magic_hint(magic).contains(hint), "{magic:08x}: {}", magic_hint(magic));
        }
    }

    #[test]
    fn encoding_round_trips() {
        let original = IdxImages { count: 2, rows: 1, cols: 3, pixels: vec![1, 2, 3, 4, 5, 6] };
        assert_eq!(parse_images(&encode_images(&original)).unwrap(), original);
        assert_eq!(parse_labels(&encode_labels(&[7, 0, 9])).unwrap(), vec![7, 0, 9]);
    }
}
