//! Images to predict on: PNG files, or images picked from an IDX file, as model inputs.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::ir::Shape;

/// Reads `path` (PNG, or IDX images when it is not a PNG) into model inputs: (label, pixels
/// in [0, 1], HWC). For IDX files, `indices` picks images (all when empty).
pub fn read_for_model(
    path: &Path,
    input: Shape,
    indices: &[usize],
) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
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
        bail!(
            "`{}` holds {}x{} grayscale images; the model's input is {input}",
            path.display(),
            images.rows,
            images.cols
        );
    }
    let picked: Vec<usize> = if indices.is_empty() { (0..images.count).collect() } else { indices.to_vec() };
    picked
        .into_iter()
        .map(|i| {
            if i >= images.count {
                bail!("`{}` has {} images; there is no image {i}", path.display(), images.count);
            }
            let size = h * w;
            let pixels =
                images.pixels[i * size..(i + 1) * size].iter().map(|&p| f32::from(p) / 255.0).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header().unwrap().write_image_data(data).unwrap();
        bytes
    }

    #[test]
    fn grayscale_and_color_pngs_become_model_inputs() {
        let gray = png(2, 1, png::ColorType::Grayscale, &[0, 255]);
        assert_eq!(png_pixels(&gray, [1, 2, 1]).unwrap(), vec![0.0, 1.0]);
        // RGBA: color averaged to gray, alpha ignored
        let rgba = png(1, 1, png::ColorType::Rgba, &[255, 0, 0, 7]);
        let px = png_pixels(&rgba, [1, 1, 1]).unwrap();
        assert!((px[0] - 1.0 / 3.0).abs() < 1e-6, "{px:?}");
        // gray into a three-channel model: repeated
        assert_eq!(png_pixels(&gray, [1, 2, 3]).unwrap(), vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn a_png_of_the_wrong_size_or_a_broken_png_is_an_error() {
        let gray = png(2, 1, png::ColorType::Grayscale, &[0, 255]);
        let error = png_pixels(&gray, [28, 28, 1]).unwrap_err().to_string();
        assert_eq!(error, "the image is 2x1 (width x height); the model takes 28x28");
        assert!(png_pixels(&gray[..gray.len() - 20], [1, 2, 1]).is_err());
    }
}
