//! Images to predict on: PNG files, or images picked from an IDX file, as model inputs.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::ir::Shape;

/// Reads `path` (PNG, or IDX images when it is not a PNG) into model inputs: (label, pixels
/// in [0, 1], HWC). For IDX files, `indices` picks images (all when empty).
pub fn read_for_model(path: &Path, input: Shape, indices: &[usize]) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    let Shape::Hwc { h, w, c } = input else {
        bail!("this model's input is flat ({input}); predicting needs an image input such as 28x28x1");
    };
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        let pixels = png_pixels(&bytes, [h, w, c]).with_context(|| format!("`{}`", path.display()))?;
        return Ok(vec![(path.display().to_string(), pixels)]);
    }
    let images = super::idx::read_images(path)?;
    if images.rows != h || images.cols != w || c != 1 {
        bail!("`{}` holds {}x{} grayscale images; the model's input is {input}", path.display(), images.rows, images.cols);
    }
    let picked: Vec<usize> = if indices.is_empty() { (0..images.count).collect() } else { indices.to_vec() };
    picked
        .into_iter()
        .map(|i| {
            if i >= images.count {
                bail!("`{}` has {} images; there is no image {i}", path.display(), images.count);
            }
            let size = h * w;
            let pixels = images.pixels[i * size..(i + 1) * size].iter().map(|&p| f32::from(p) / 255.0).collect();
            Ok((format!("{}[{i}]", path.display()), pixels))
        })
        .collect()
}

/// Decodes a PNG of exactly `h x w` into `c` channels in [0, 1]: color is averaged into gray
/// for one channel, gray is repeated for three.
fn png_pixels(bytes: &[u8], [h, w, c]: [usize; 3]) -> anyhow::Result<Vec<f32>> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().context("not a readable PNG")?;
    let mut buffer = vec![0; reader.output_buffer_size().context("the PNG is too large")?];
    let frame = reader.next_frame(&mut buffer).context("the PNG's image data is corrupt")?;
    let (width, height) = (frame.width as usize, frame.height as usize);
    if (height, width) != (h, w) {
        bail!("the image is {width}x{height} (width x height); the model takes {w}x{h}");
    }
    let channels = frame.color_type.samples();
    let data = &buffer[..frame.buffer_size()];
    let mut out = Vec::with_capacity(h * w * c);
    for px in data.chunks_exact(channels) {
        // Alpha, when present, is the last sample; it is ignored.
        let color = if channels >= 3 { &px[..3] } else { &px[..1] };
        let gray = color.iter().map(|&v| f32::from(v)).sum::<f32>() / color.len() as f32 / 255.0;
        match (c, color.len()) {
            (3, 3) => out.extend(color.iter().map(|&v| f32::from(v) / 255.0)),
            _ => out.extend(std::iter::repeat_n(gray, c)),
        }
    }
    Ok(out)
}
