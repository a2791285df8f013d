//! `safety`: NudeNet's detector (ONNX, in-process) scores exposed body parts; the route says
//! which classes are unsafe and above what score. Score 1 means nothing unsafe was found.
//!
//! NudeNet fires on some images with no body in them at all: scikit-image's colour wheel gets
//! `BUTTOCKS_EXPOSED` 0.83 over the whole disc. So an unsafe-class detection counts only when
//! something says a body is there ([`Corroboration`], on by default, the route's
//! `corroborate_unsafe` and `min_skin_in_box`): enough skin-toned pixels inside its box
//! ([`is_skin`]), another body part detected in the image, or a box without colour (where
//! colour cannot tell). A detection without any is discounted, and the reason says why. The raw
//! detections (and their parity with the Python package) are untouched: this is policy on top.

use std::path::PathBuf;

use image::RgbImage;

use super::{classifier, nudenet};
use super::{Evaluator, Outcome, SafetyModel, Settings, Subject, Verdict};

/// Classes unsafe by default: the explicit ones. Faces, covered parts, feet, belly and
/// armpits are not.
pub const DEFAULT_UNSAFE: &[&str] = &[
    "FEMALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
];

pub struct Safety {
    pub model: PathBuf,
}

impl Safety {
    pub fn new() -> Safety {
        Safety { model: nudenet::default_model_path() }
    }

    /// `Ok` when the runtime loads and the model file is there; else what is missing, where.
    pub fn ready(&self) -> Result<(), String> {
        super::onnx::runtime()?;
        if !self.model.is_file() {
            return Err(format!("NudeNet model not found at {} (run scripts/setup-onnx.sh)", self.model.display()));
        }
        Ok(())
    }
}

impl Default for Safety {
    fn default() -> Self {
        Self::new()
    }
}

impl Evaluator for Safety {
    fn name(&self) -> &'static str {
        "safety"
    }

    fn evaluate(&self, s: &Subject<'_>) -> Verdict {
        // Every configured model scores the image; the highest unsafe score decides.
        let mut counted: Vec<(String, f32)> = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        let mut discounted: Vec<String> = Vec::new();
        for model in &s.settings.safety_models {
            let scored: Result<Vec<Scored>, String> = match model {
                SafetyModel::NudeNet => self
                    .ready()
                    .and_then(|()| s.image.detections(&self.model).clone())
                    .map(|d| score_detections(&d, &s.image.rgb, s.settings)),
                SafetyModel::Classifier(spec) => classifier::classify(spec, &s.image.rgb).map(|scores| {
                    scores
                        .into_iter()
                        .map(|(label, p)| {
                            let bad = spec.unsafe_labels.contains(&label);
                            Scored { label: format!("{}:{label}", spec.name), p, bad, discounted: None }
                        })
                        .collect()
                }),
            };
            let scored = match scored {
                Ok(v) => v,
                Err(e) => return Verdict { evaluator: "safety", score: 0.0, verdict: Outcome::Error, reason: e },
            };
            for Scored { label, p, bad, discounted: why } in scored {
                if let Some(why) = why {
                    // Listed when it would have failed the image: that is what ops need to see.
                    if p > s.settings.max_unsafe {
                        discounted.push(format!("{label} {p:.2} discounted: {why}"));
                    }
                } else if bad {
                    counted.push((label, p));
                } else if p >= 0.25 {
                    seen.push(format!("{label} {p:.2}"));
                }
            }
        }
        let worst = counted.iter().map(|(_, p)| *p).fold(0.0f32, f32::max);
        let score = 1.0 - worst;
        let discounted = if discounted.is_empty() { String::new() } else { format!("; {}", discounted.join("; ")) };
        if worst > s.settings.max_unsafe {
            return Verdict {
                evaluator: "safety",
                score,
                verdict: Outcome::Fail,
                reason: format!("{}{discounted}", unsafe_reason(&mut counted, s.settings.max_unsafe)),
            };
        }
        let reason = if seen.is_empty() && counted.is_empty() && discounted.is_empty() {
            "no detections".to_string()
        } else {
            seen.truncate(3);
            let seen = if seen.is_empty() { String::new() } else { format!("; seen: {}", seen.join(", ")) };
            let highest = match highest(&counted) {
                Some((label, p)) => format!("highest unsafe class {label} {p:.2}"),
                None => "no unsafe class detected".to_string(),
            };
            format!("nothing unsafe above {:.2} ({highest}){seen}{discounted}", s.settings.max_unsafe)
        };
        Verdict { evaluator: "safety", score, verdict: Outcome::Pass, reason }
    }
}

/// The unsafe finding with the highest score (the first of equals).
fn highest(counted: &[(String, f32)]) -> Option<&(String, f32)> {
    counted.iter().fold(None, |best: Option<&(String, f32)>, c| match best {
        Some(b) if b.1 >= c.1 => Some(b),
        _ => Some(c),
    })
}

/// Why an image failed: the highest-scoring unsafe class first, with the comparison that
/// failed it ("unsafe content: FEMALE_BREAST_EXPOSED 0.91 > 0.50"), then the other classes
/// above the limit, highest first.
fn unsafe_reason(counted: &mut [(String, f32)], max_unsafe: f32) -> String {
    counted.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut above = counted.iter().filter(|(_, p)| *p > max_unsafe);
    let Some((top, p)) = above.next() else {
        return format!("nothing unsafe above {max_unsafe:.2}");
    };
    let others: Vec<String> = above.map(|(label, p)| format!("{label} {p:.2}")).collect();
    let also = if others.is_empty() { String::new() } else { format!("; also above: {}", others.join(", ")) };
    format!("unsafe content: {top} {p:.2} > {max_unsafe:.2}{also}")
}

/// One model's finding: a NudeNet class or a classifier label, its score, whether the route
/// counts it as unsafe, and why it was discounted when an unsafe detection lacked evidence of
/// a body.
#[derive(Debug, Clone, PartialEq)]
struct Scored {
    label: String,
    p: f32,
    bad: bool,
    discounted: Option<String>,
}

/// NudeNet's detections on `img` judged with the route's settings: unsafe classes are checked
/// for corroboration (when the route asks for it) against the image's pixels and the other
/// detections.
fn score_detections(dets: &[nudenet::Detection], img: &RgbImage, settings: &Settings) -> Vec<Scored> {
    let unsafe_classes: Vec<&str> = match &settings.unsafe_classes {
        Some(list) => list.iter().map(String::as_str).collect(),
        None => DEFAULT_UNSAFE.to_vec(),
    };
    dets.iter()
        .enumerate()
        .map(|(i, d)| {
            let bad = unsafe_classes.contains(&d.class);
            let discounted = match &settings.corroboration {
                Some(c) if bad => c.check(i, dets, img).err(),
                _ => None,
            };
            Scored { label: d.class.to_string(), p: d.score, bad, discounted }
        })
        .collect()
}

/// What makes an unsafe-class NudeNet detection count: evidence that a body is there. Any one
/// of these is enough:
///
/// - at least `min_skin` of the pixels inside the detection's box are skin-toned
///   ([`is_skin`]);
/// - another detection in the same image (any of NudeNet's 18 classes, faces included): a
///   second body part;
/// - the box has no colour to judge (mean chroma below [`MIN_CHROMA`]: a black-and-white or
///   nearly grey image), so the detection counts as it would without this check.
///
/// Measured (README, "Abstract images and corroboration"): colour wheels have 3–7% skin-toned
/// pixels in their boxes, skin rendered in every tone of the Monk scale under dim, even and
/// bright light at least 70%.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Corroboration {
    /// Lowest share of skin-toned pixels inside the box, 0..1.
    pub min_skin: f32,
}

impl Default for Corroboration {
    fn default() -> Self {
        Corroboration { min_skin: DEFAULT_MIN_SKIN }
    }
}

/// The default `min_skin_in_box`: twice the most skin any colour wheel measured has (7.4%),
/// under a quarter of the least that rendered skin has (70%).
pub const DEFAULT_MIN_SKIN: f32 = 0.15;

/// Mean chroma (max - min of R, G, B, in 8-bit levels) of a box below which its colours say
/// nothing about skin: greyscale images have 0, sepia and every skin tone measured over 8.
pub const MIN_CHROMA: f32 = 8.0;

impl Corroboration {
    /// `Ok` when detection `i` of `dets` is corroborated; else why not, for the verdict's
    /// reason ("7% skin in box < 15%, no other body part detected").
    pub fn check(&self, i: usize, dets: &[nudenet::Detection], img: &RgbImage) -> Result<(), String> {
        if dets.len() > 1 {
            return Ok(());
        }
        let colour = box_colour(img, &dets[i].bbox);
        if colour.chroma < MIN_CHROMA || colour.skin >= self.min_skin {
            return Ok(());
        }
        Err(format!(
            "{:.0}% skin in box < {:.0}%, no other body part detected",
            colour.skin * 100.0,
            self.min_skin * 100.0
        ))
    }
}

/// The colours inside a detection's box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxColour {
    /// Share of skin-toned pixels ([`is_skin`]), 0..1.
    pub skin: f32,
    /// Mean of max - min over R, G and B, in 8-bit levels (0 for grey).
    pub chroma: f32,
}

/// [`BoxColour`] of the pixels an x, y, width, height box touches (clipped to the image; an
/// empty box has no skin and no chroma).
pub fn box_colour(img: &RgbImage, bbox: &[f32; 4]) -> BoxColour {
    let [x, y, w, h] = *bbox;
    let x0 = (x.max(0.0).floor() as u32).min(img.width());
    let y0 = (y.max(0.0).floor() as u32).min(img.height());
    let x1 = ((x + w).max(0.0).ceil() as u32).min(img.width());
    let y1 = ((y + h).max(0.0).ceil() as u32).min(img.height());
    let (mut n, mut skin, mut chroma) = (0u64, 0u64, 0u64);
    for py in y0..y1 {
        for px in x0..x1 {
            let [r, g, b] = img.get_pixel(px, py).0;
            n += 1;
            skin += is_skin(r, g, b) as u64;
            chroma += (r.max(g).max(b) - r.min(g).min(b)) as u64;
        }
    }
    if n == 0 {
        return BoxColour { skin: 0.0, chroma: 0.0 };
    }
    BoxColour { skin: skin as f32 / n as f32, chroma: chroma as f32 / n as f32 }
}

/// Whether an sRGB pixel has a skin tone. Two rules, either is enough:
///
/// 1. Chai and Ngan's skin-colour map in YCbCr (D. Chai, K. N. Ngan, "Face segmentation using
///    skin-color map in videophone applications", IEEE Trans. Circuits and Systems for Video
///    Technology 9(4):551–564, 1999): 77 <= Cb <= 127 and 133 <= Cr <= 173, with Cb and Cr the
///    full-range BT.601 chroma of the pixel.
/// 2. A warm pixel of low chroma: R >= G >= B and 0 < R - B < 24. Cr grows with a pixel's
///    chroma, so the map misses skin that has little of it, the palest and the darkest (Monk
///    skin tones 1, 9 and 10 under shading: 0–20% of their pixels); they all keep the red >
///    green > blue order of skin.
pub fn is_skin(r: u8, g: u8, b: u8) -> bool {
    let (rf, gf, bf) = (r as f32, g as f32, b as f32);
    let cb = 128.0 - 0.168_736 * rf - 0.331_264 * gf + 0.5 * bf;
    let cr = 128.0 + 0.5 * rf - 0.418_688 * gf - 0.081_312 * bf;
    if (77.0..=127.0).contains(&cb) && (133.0..=173.0).contains(&cr) {
        return true;
    }
    r >= g && g >= b && r > b && r - b < 24
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// The Monk Skin Tone scale (E. Monk, Google, 2019), tones 1 to 10.
    const MONK: [[u8; 3]; 10] = [
        [0xf6, 0xed, 0xe4],
        [0xf3, 0xe7, 0xdb],
        [0xf7, 0xea, 0xd0],
        [0xea, 0xda, 0xba],
        [0xd7, 0xbd, 0x96],
        [0xa0, 0x7e, 0x56],
        [0x82, 0x5c, 0x43],
        [0x60, 0x41, 0x34],
        [0x3a, 0x31, 0x2a],
        [0x29, 0x24, 0x20],
    ];

    /// `tone` lit from the top left, from `hi` down to `lo` times its value, with +-6 levels of
    /// noise: skin as a renderer or a camera shows it, not a flat swatch.
    fn lit(tone: [u8; 3], lo: f32, hi: f32, seed: u32) -> RgbImage {
        RgbImage::from_fn(200, 160, |x, y| {
            let l = lo + (hi - lo) * (1.0 - (x as f32 / 200.0 + y as f32 / 160.0) / 2.0);
            let n = ((x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed) % 13) as f32 - 6.0;
            Rgb(tone.map(|c| (c as f32 * l + n).round().clamp(0.0, 255.0) as u8))
        })
    }

    fn det(class: &'static str, score: f32, bbox: [f32; 4]) -> nudenet::Detection {
        nudenet::Detection { class, score, bbox }
    }

    #[test]
    fn the_reason_names_the_highest_scoring_class_first() {
        let mut found = vec![
            ("BUTTOCKS_EXPOSED".to_string(), 0.62),
            ("FEMALE_BREAST_EXPOSED".to_string(), 0.91),
            ("ANUS_EXPOSED".to_string(), 0.2),
            ("MALE_GENITALIA_EXPOSED".to_string(), 0.55),
        ];
        assert_eq!(highest(&found).unwrap().0, "FEMALE_BREAST_EXPOSED");
        assert_eq!(
            unsafe_reason(&mut found, 0.5),
            "unsafe content: FEMALE_BREAST_EXPOSED 0.91 > 0.50; also above: BUTTOCKS_EXPOSED 0.62, MALE_GENITALIA_EXPOSED 0.55"
        );
        let mut one = vec![("BUTTOCKS_EXPOSED".to_string(), 0.835)];
        assert_eq!(unsafe_reason(&mut one, 0.5), "unsafe content: BUTTOCKS_EXPOSED 0.83 > 0.50");
    }

    #[test]
    fn skin_pixels_by_hand() {
        for tone in MONK {
            assert!(is_skin(tone[0], tone[1], tone[2]), "Monk tone {tone:?}");
        }
        // Typical skin in daylight photos, and sepia.
        for [r, g, b] in [[224, 172, 105], [198, 134, 66], [141, 85, 36], [255, 219, 172], [112, 66, 20]] {
            assert!(is_skin(r, g, b), "{r} {g} {b}");
        }
        // Primaries, secondaries, greys, and the saturated hues of a colour wheel.
        for [r, g, b] in [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 0],
            [0, 255, 255],
            [255, 0, 255],
            [0, 0, 0],
            [128, 128, 128],
            [255, 255, 255],
            [255, 128, 0],
            [128, 0, 255],
            [40, 200, 190],
        ] {
            assert!(!is_skin(r, g, b), "{r} {g} {b}");
        }
    }

    #[test]
    fn box_colour_counts_the_pixels_inside_the_box() {
        // Left half skin, right half blue; a box over the middle half sees half of each.
        let img = RgbImage::from_fn(100, 50, |x, _| if x < 50 { Rgb([0xd7, 0xbd, 0x96]) } else { Rgb([20, 40, 220]) });
        let c = box_colour(&img, &[25.0, 0.0, 50.0, 50.0]);
        assert_eq!(c.skin, 0.5);
        assert!(c.chroma > 100.0, "{c:?}");
        assert_eq!(box_colour(&img, &[0.0, 0.0, 50.0, 50.0]).skin, 1.0);
        // Clipped to the image; fractional edges take the pixels they touch.
        assert_eq!(box_colour(&img, &[90.5, 10.0, 40.0, 90.0]).skin, 0.0);
        assert_eq!(box_colour(&img, &[200.0, 0.0, 10.0, 10.0]), BoxColour { skin: 0.0, chroma: 0.0 });
        let grey = RgbImage::from_pixel(10, 10, Rgb([90, 90, 90]));
        assert_eq!(box_colour(&grey, &[0.0, 0.0, 10.0, 10.0]), BoxColour { skin: 0.0, chroma: 0.0 });
    }

    #[test]
    fn rendered_skin_of_every_tone_is_corroborated() {
        // Every tone along the Monk scale (4 steps between neighbours), dim, even and bright.
        let c = Corroboration::default();
        let mut least = 1.0f32;
        for i in 0..=36u32 {
            let pos = i as f32 / 4.0;
            let k = (pos as usize).min(8);
            let t = pos - k as f32;
            let tone: [u8; 3] =
                std::array::from_fn(|ch| (MONK[k][ch] as f32 * (1.0 - t) + MONK[k + 1][ch] as f32 * t).round() as u8);
            for (lo, hi) in [(0.45, 0.75), (0.65, 1.1), (0.9, 1.25)] {
                let img = lit(tone, lo, hi, i);
                let d = [det("BUTTOCKS_EXPOSED", 0.8, [0.0, 0.0, 200.0, 160.0])];
                let skin = box_colour(&img, &d[0].bbox).skin;
                least = least.min(skin);
                assert!(c.check(0, &d, &img).is_ok(), "tone {tone:?} lit {lo}..{hi}: {skin}");
            }
        }
        assert!(least >= 0.69, "{least}");
    }

    #[test]
    fn a_box_without_skin_is_discounted_unless_something_else_says_body() {
        let c = Corroboration::default();
        // Saturated hues everywhere (a conic sweep): no skin, strong colour.
        let hues = RgbImage::from_fn(120, 120, |x, y| {
            let a = (y as f32 - 60.0).atan2(x as f32 - 60.0).to_degrees().rem_euclid(360.0);
            let (r, g, b) = match (a / 60.0) as u32 {
                0 | 5 => (255, 0, (a / 2.0) as u8),
                1 | 2 => (0, 255, (a / 2.0) as u8),
                _ => (40, 60, 255),
            };
            Rgb([r, g, b])
        });
        let alone = [det("BUTTOCKS_EXPOSED", 0.83, [0.0, 0.0, 120.0, 120.0])];
        assert_eq!(c.check(0, &alone, &hues).unwrap_err(), "0% skin in box < 15%, no other body part detected");
        // A second body part anywhere in the image corroborates it.
        let with_face = [alone[0].clone(), det("FACE_FEMALE", 0.3, [0.0, 0.0, 10.0, 10.0])];
        assert!(c.check(0, &with_face, &hues).is_ok());
        // Grey: colour cannot tell, the detection counts.
        let grey = RgbImage::from_fn(120, 120, |x, y| {
            let v = ((x + y) % 256) as u8;
            Rgb([v, v, v])
        });
        assert!(c.check(0, &alone, &grey).is_ok());
        // The threshold is the route's.
        let lax = Corroboration { min_skin: 0.0 };
        assert!(lax.check(0, &alone, &hues).is_ok());
    }

    #[test]
    fn discounted_detections_do_not_count_and_say_why() {
        let hues = RgbImage::from_fn(100, 100, |x, _| if x < 50 { Rgb([0, 200, 255]) } else { Rgb([255, 0, 80]) });
        let dets = [det("BUTTOCKS_EXPOSED", 0.83, [0.0, 0.0, 100.0, 100.0])];
        let settings = Settings::default();
        let scored = score_detections(&dets, &hues, &settings);
        assert_eq!(scored[0].discounted.as_deref(), Some("0% skin in box < 15%, no other body part detected"));
        // Off: the same detection counts.
        let off = Settings { corroboration: None, ..Settings::default() };
        assert_eq!(score_detections(&dets, &hues, &off)[0].discounted, None);
        // Classes the route does not count as unsafe are never checked.
        let faces = [det("FACE_MALE", 0.9, [0.0, 0.0, 100.0, 100.0])];
        assert_eq!(
            score_detections(&faces, &hues, &settings)[0],
            Scored { label: "FACE_MALE".into(), p: 0.9, bad: false, discounted: None }
        );
    }
}
