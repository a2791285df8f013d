//! `sanity`: the artifact decodes (within limits, see `decode`), has the size the client asked
//! for, is in the `output_format` the provider was asked for, and is not blank or
//! near-uniform.

use super::{Evaluator, Outcome, Subject, Verdict};

/// Luma standard deviation (0-255 scale) below which an image counts as blank. A flat colour
/// has 0; JPEG noise on a flat colour stays below 2; any real picture is far above.
pub const MIN_LUMA_STDDEV: f64 = 3.0;

pub struct Sanity;

impl Evaluator for Sanity {
    fn name(&self) -> &'static str {
        "sanity"
    }

    fn evaluate(&self, s: &Subject<'_>) -> Verdict {
        let size = s.image.size();
        if let Some(want) = s.expected_format {
            let got = format_name(s.image.format);
            if got != want.name() {
                return fail(format!("image is {got}, the request asked for output_format {}", want.name()));
            }
        }
        if let Some(want) = s.expected_size {
            if want != size {
                return fail(format!("image is {size}, the request asked for {want}"));
            }
        }
        let sd = luma_stddev(&s.image.rgb);
        if sd < MIN_LUMA_STDDEV {
            return Verdict {
                evaluator: "sanity",
                score: (sd / MIN_LUMA_STDDEV / 2.0) as f32,
                verdict: Outcome::Fail,
                reason: format!("image is blank or near-uniform (luma std dev {sd:.2} < {MIN_LUMA_STDDEV})"),
            };
        }
        Verdict {
            evaluator: "sanity",
            score: 1.0,
            verdict: Outcome::Pass,
            reason: format!("{:?} {size}, luma std dev {sd:.1}", s.image.format),
        }
    }
}

/// The `output_format` name of a decoded format (`decode` takes PNG, JPEG and WebP only).
fn format_name(f: image::ImageFormat) -> &'static str {
    match f {
        image::ImageFormat::Png => "png",
        image::ImageFormat::Jpeg => "jpeg",
        image::ImageFormat::WebP => "webp",
        _ => "another format",
    }
}

fn fail(reason: String) -> Verdict {
    Verdict { evaluator: "sanity", score: 0.0, verdict: Outcome::Fail, reason }
}

/// Standard deviation of luma over a grid of at most ~64k sampled pixels.
pub fn luma_stddev(img: &image::RgbImage) -> f64 {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return 0.0;
    }
    let step = ((w as u64 * h as u64) / 65_536).max(1);
    let step = (step as f64).sqrt().ceil() as u32;
    let (mut n, mut sum, mut sum2) = (0f64, 0f64, 0f64);
    for y in (0..h).step_by(step as usize) {
        for x in (0..w).step_by(step as usize) {
            let p = img.get_pixel(x, y).0;
            let l = 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64;
            n += 1.0;
            sum += l;
            sum2 += l * l;
        }
    }
    let mean = sum / n;
    (sum2 / n - mean * mean).max(0.0).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{decode, evaluate};
    use crate::request::Size;
    use std::sync::Arc;

    fn png(img: &image::RgbImage) -> bytes::Bytes {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        bytes::Bytes::from(out.into_inner())
    }

    fn noisy(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 % 256) as u8, (y * 13 % 256) as u8, ((x + y) % 256) as u8])
        })
    }

    #[test]
    fn verdicts() {
        let evs: Vec<Arc<dyn crate::eval::Evaluator>> = vec![Arc::new(Sanity)];
        let size = |w, h| Some(Size { width: w, height: h });
        let ok = evaluate(&png(&noisy(64, 48)), size(64, 48), &Default::default(), None, "", &evs);
        assert_eq!(ok.verdicts[0].verdict, Outcome::Pass, "{:?}", ok.verdicts);
        let wrong = evaluate(&png(&noisy(64, 48)), size(64, 64), &Default::default(), None, "", &evs);
        assert_eq!(wrong.verdicts[0].reason, "image is 64x48, the request asked for 64x64");
        let blank = evaluate(
            &png(&image::RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]))),
            None,
            &Default::default(),
            None,
            "",
            &evs,
        );
        assert_eq!(blank.verdicts[0].verdict, Outcome::Fail);
        assert!(blank.verdicts[0].reason.contains("near-uniform"), "{}", blank.verdicts[0].reason);
        let broken =
            evaluate(&bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\nnope"), None, &Default::default(), None, "", &evs);
        assert_eq!(broken.verdicts[0].verdict, Outcome::Fail);
        assert!(broken.verdicts[0].reason.starts_with("artifact does not decode"), "{}", broken.verdicts[0].reason);
    }

    fn encoded(img: &image::RgbImage, format: image::ImageFormat) -> bytes::Bytes {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        bytes::Bytes::from(out.into_inner())
    }

    /// JPEG and WebP artifacts are decoded and evaluated like PNG ones, and one in another
    /// format than the `output_format` asked for fails.
    #[test]
    fn jpeg_and_webp_are_evaluated_and_must_match_output_format() {
        use crate::eval::evaluate_as;
        use crate::request::OutputFormat;
        let evs: Vec<Arc<dyn crate::eval::Evaluator>> = vec![Arc::new(Sanity)];
        let size = Some(Size { width: 64, height: 48 });
        let img = noisy(64, 48);
        let cases = [
            (image::ImageFormat::Jpeg, OutputFormat::Jpeg, "Jpeg 64x48"),
            (image::ImageFormat::WebP, OutputFormat::Webp, "WebP 64x48"),
            (image::ImageFormat::Png, OutputFormat::Png, "Png 64x48"),
        ];
        for (format, asked, reason) in cases {
            let bytes = encoded(&img, format);
            let r = evaluate_as(&bytes, size, Some(asked), &Default::default(), None, "", &evs);
            assert_eq!((r.verdicts[0].verdict, r.verdicts[0].reason.split(',').next()), (Outcome::Pass, Some(reason)));
            // Without output_format, any of the three passes.
            let r = evaluate_as(&bytes, size, None, &Default::default(), None, "", &evs);
            assert_eq!(r.verdicts[0].verdict, Outcome::Pass, "{:?}", r.verdicts);
        }
        let r = evaluate_as(&png(&img), size, Some(OutputFormat::Jpeg), &Default::default(), None, "", &evs);
        assert_eq!(
            (r.verdicts[0].verdict, r.verdicts[0].reason.as_str()),
            (Outcome::Fail, "image is png, the request asked for output_format jpeg")
        );
        let r = evaluate_as(
            &encoded(&img, image::ImageFormat::Jpeg),
            size,
            Some(OutputFormat::Webp),
            &Default::default(),
            None,
            "",
            &evs,
        );
        assert_eq!(r.verdicts[0].reason, "image is jpeg, the request asked for output_format webp");
        // The right format at the wrong size still fails on its size.
        let r = evaluate_as(
            &encoded(&img, image::ImageFormat::WebP),
            Some(Size { width: 64, height: 64 }),
            Some(OutputFormat::Webp),
            &Default::default(),
            None,
            "",
            &evs,
        );
        assert_eq!(r.verdicts[0].reason, "image is 64x48, the request asked for 64x64");
    }

    #[test]
    fn decompression_bombs_are_refused_before_allocation() {
        // A 20000x20000 PNG header: refused on its declared size, whatever follows.
        let img = image::GrayImage::new(1, 1);
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        let mut b = out.into_inner();
        b[16..20].copy_from_slice(&20000u32.to_be_bytes());
        b[20..24].copy_from_slice(&20000u32.to_be_bytes());
        let e = decode(&b).err().unwrap();
        assert!(e.contains("does not decode"), "{e}");
        assert!(decode(b"GIF89a....").is_err());
    }
    #[test]
    fn an_image_of_another_size_is_judged_on_its_header_without_decoding() {
        // 8000x8000 declared, and pixel data that would not decode: the verdict can only come
        // from the header.
        let img = image::GrayImage::new(1, 1);
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        let mut b = out.into_inner();
        b[16..20].copy_from_slice(&8000u32.to_be_bytes());
        b[20..24].copy_from_slice(&8000u32.to_be_bytes());
        // The IHDR chunk's CRC-32 (ISO 3309, as PNG specifies) over its type and data.
        let crc = b[12..29].iter().fold(!0u32, |mut c, &byte| {
            c ^= u32::from(byte);
            for _ in 0..8 {
                c = if c & 1 == 1 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
            }
            c
        });
        b[29..33].copy_from_slice(&(!crc).to_be_bytes());
        let evs: Vec<Arc<dyn Evaluator>> = vec![Arc::new(Sanity), Arc::new(Sanity2)];
        let r = crate::eval::evaluate_as(
            &bytes::Bytes::from(b.clone()),
            Some(Size { width: 256, height: 256 }),
            None,
            &Default::default(),
            None,
            "",
            &evs,
        );
        assert_eq!(r.verdicts[0].reason, "image is 8000x8000, the request asked for 256x256");
        assert_eq!(r.verdicts[1].reason, "not examined: image is 8000x8000, the request asked for 256x256");
        assert!(r.verdicts.iter().all(|v| v.verdict == Outcome::Fail));
        // Asked for that size, it is decoded (and this one's pixels are broken).
        let r = crate::eval::evaluate_as(&bytes::Bytes::from(b), None, None, &Default::default(), None, "", &evs[..1]);
        assert!(r.verdicts[0].reason.starts_with("artifact does not decode"), "{}", r.verdicts[0].reason);
    }

    /// A route without `sanity` did not ask for the size to be checked: an image of another
    /// size than the request's is examined by its evaluators, not failed unseen.
    #[test]
    fn without_sanity_an_image_of_another_size_is_examined() {
        let img = image::RgbImage::from_fn(60, 40, |x, y| image::Rgb([(x * 4) as u8, (y * 6) as u8, 90]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let png = bytes::Bytes::from(png);
        let asked = Some(Size { width: 256, height: 256 });
        let r = crate::eval::evaluate_as(&png, asked, None, &Default::default(), None, "", &[Arc::new(Looks)]);
        assert_eq!((r.verdicts[0].verdict, r.verdicts[0].reason.as_str()), (Outcome::Pass, "examined 60x40"));
        // With sanity, the size fails it and the other evaluator does not look.
        let evs: Vec<Arc<dyn Evaluator>> = vec![Arc::new(Sanity), Arc::new(Looks)];
        let r = crate::eval::evaluate_as(&png, asked, None, &Default::default(), None, "", &evs);
        assert_eq!(r.verdicts[1].reason, "not examined: image is 60x40, the request asked for 256x256");
    }

    /// An evaluator that passes every image it is shown, saying its size.
    struct Looks;

    impl Evaluator for Looks {
        fn name(&self) -> &'static str {
            "looks"
        }

        fn evaluate(&self, s: &Subject<'_>) -> Verdict {
            Verdict {
                evaluator: "looks",
                score: 1.0,
                verdict: Outcome::Pass,
                reason: format!("examined {}", s.image.size()),
            }
        }
    }

    /// Another evaluator, as the route would list it beside sanity.
    struct Sanity2;

    impl Evaluator for Sanity2 {
        fn name(&self) -> &'static str {
            "other"
        }

        fn evaluate(&self, _: &Subject<'_>) -> Verdict {
            unreachable!("not called on an image of the wrong size")
        }
    }
}
