//! QR codes for pool invite codes: rendering (qrcode) and reading one back from a
//! picture (rqrr), so a device can join by scanning another's screen.

/// Reading a QR code from a picture failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QrError {
    /// The bytes are not a PNG or JPEG picture.
    #[error("not a PNG or JPEG picture: {0}")]
    Image(String),
    /// No readable QR code in the picture.
    #[error("no readable QR code in the picture")]
    NotFound,
    /// The text is too long for a QR code.
    #[error("the text is too long for a QR code")]
    TooLong,
}

/// `text` as an SVG QR code (black on white, with the standard quiet zone).
pub fn svg(text: &str) -> Result<String, QrError> {
    let code = qrcode::QrCode::new(text.as_bytes()).map_err(|_| QrError::TooLong)?;
    Ok(code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(200, 200)
        .dark_color(qrcode::render::svg::Color("#000000"))
        .light_color(qrcode::render::svg::Color("#ffffff"))
        .build())
}

/// The text of the first QR code found in a PNG or JPEG picture.
pub fn decode(picture: &[u8]) -> Result<String, QrError> {
    let image = image::load_from_memory(picture)
        .map_err(|e| QrError::Image(e.to_string()))?
        .to_luma8();
    let mut prepared = rqrr::PreparedImage::prepare(image);
    prepared
        .detect_grids()
        .into_iter()
        .find_map(|grid| grid.decode().ok().map(|(_, text)| text))
        .ok_or(QrError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_code_reads_back() {
        // Render to pixels the same way a screenshot of the SVG would look.
        let code = qrcode::QrCode::new(b"A3F7K2M9").expect("qr");
        let (width, scale, quiet) = (code.width() as u32, 6u32, 4u32);
        let colors = code.to_colors();
        let side = (width + 2 * quiet) * scale;
        let img = image::GrayImage::from_fn(side, side, |x, y| {
            let (mx, my) = (x / scale, y / scale);
            let dark = mx >= quiet
                && my >= quiet
                && mx < width + quiet
                && my < width + quiet
                && colors[((my - quiet) * width + (mx - quiet)) as usize] == qrcode::Color::Dark;
            image::Luma([if dark { 0 } else { 255 }])
        });
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("png");
        assert_eq!(decode(&png).expect("decoded"), "A3F7K2M9");
        assert!(svg("A3F7K2M9").expect("svg").starts_with("<?xml"));
        assert!(matches!(decode(b"nope"), Err(QrError::Image(_))));
    }
}
