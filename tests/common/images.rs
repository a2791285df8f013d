//! Images: PNG helpers and the base64 of OpenAI-shaped answers.

use base64::Engine as _;

use super::Resp;

pub const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// Width and height from the IHDR chunk (bytes 16..24); panics if not a PNG.
pub fn png_dims(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() >= 24, "image too short for a PNG: {} bytes", bytes.len());
    assert_eq!(bytes[..8], PNG_SIGNATURE, "not a PNG signature: {:02x?}", &bytes[..8]);
    assert_eq!(&bytes[12..16], b"IHDR", "first PNG chunk is not IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

pub fn b64_decode(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap_or_else(|e| panic!("b64_json is not valid base64: {e}"))
}

pub fn b64_encode(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Decodes every `data[].b64_json` of a 200 answer.
pub fn b64_images(resp: &Resp) -> Vec<Vec<u8>> {
    resp.assert_status(200);
    let v = resp.json();
    let data = v["data"].as_array().unwrap_or_else(|| panic!("no data array: {}", resp.describe()));
    data.iter()
        .map(|d| {
            let s = d["b64_json"].as_str().unwrap_or_else(|| panic!("data item without b64_json: {}", resp.describe()));
            b64_decode(s)
        })
        .collect()
}

/// A small valid RGB PNG of the given size and colour.
pub fn make_png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("png header");
        let data: Vec<u8> = (0..width * height).flat_map(|_| rgb).collect();
        w.write_image_data(&data).expect("png data");
    }
    out
}

/// `img` encoded as PNG.
pub fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A busy PNG that passes sanity; different seeds give different images.
pub fn noisy(w: u32, h: u32, seed: u32) -> Vec<u8> {
    png(&image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 13 + seed * 17) % 256) as u8,
            ((x ^ y ^ seed) % 256) as u8,
        ])
    }))
}

/// A uniform white PNG: fails sanity ("blank or near-uniform").
pub fn blank(w: u32, h: u32) -> Vec<u8> {
    png(&image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255])))
}

/// The only image of a 200 `b64_json` answer (panics unless there is exactly one).
pub fn b64_one(r: &Resp) -> Vec<u8> {
    let mut imgs = b64_images(r);
    assert_eq!(imgs.len(), 1, "{}", r.describe());
    imgs.remove(0)
}
