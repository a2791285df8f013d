//! Abstract images of the kind diffusion models often return (colour wheels, gradients, fractals,
//! noise, soft blobs), generated deterministically so the `safety` evaluator can be checked for
//! false "unsafe" verdicts without committing image files.

use image::{Rgb, RgbImage};

/// Every image of the set, by name.
pub fn all() -> Vec<(&'static str, RgbImage)> {
    vec![
        ("wheel-white-centre-black-rim", wheel(384, 0.0, true)),
        ("wheel-white-centre-black-rim-rot90", wheel(512, 90.0, true)),
        ("wheel-hsv-disc-on-white", wheel(400, 0.0, false)),
        ("wheel-hsv-disc-rot200", wheel(320, 200.0, false)),
        ("conic-hue-sweep", conic(480, 360)),
        ("rainbow-horizontal", rainbow(640, 360, false)),
        ("rainbow-vertical", rainbow(360, 640, true)),
        ("gradient-peach-to-rose", linear(512, 512, [255, 214, 170], [200, 110, 120])),
        ("gradient-sunset", linear(640, 400, [255, 160, 60], [90, 40, 130])),
        ("gradient-teal-navy", linear(400, 400, [40, 200, 190], [10, 20, 80])),
        ("radial-peach-glow", radial(512, [255, 220, 190], [120, 50, 40])),
        ("radial-orange-sun", radial(448, [255, 240, 200], [200, 60, 20])),
        ("mandelbrot-fire", mandelbrot(480, 360, 0)),
        ("mandelbrot-ice", mandelbrot(400, 400, 1)),
        ("julia-warm", julia(400, 400)),
        ("fbm-clouds-warm", fbm(512, 512, [250, 200, 160], [150, 70, 50], 7)),
        ("fbm-clouds-cool", fbm(512, 384, [220, 235, 255], [30, 60, 140], 11)),
        ("plasma", plasma(400, 400)),
        ("soft-blobs-warm", blobs(512, 512, true, 3)),
        ("soft-blobs-pastel", blobs(512, 512, false, 5)),
        ("soft-blobs-warm-large", blobs(640, 640, true, 9)),
    ]
}

/// HSV (h in degrees, s and v in 0..1) to 8-bit RGB.
pub fn hsv(h: f32, s: f32, v: f32) -> Rgb<u8> {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    Rgb([r, g, b].map(|t| ((t + m) * 255.0).round().clamp(0.0, 255.0) as u8))
}

fn mix(a: [u8; 3], b: [u8; 3], t: f32) -> Rgb<u8> {
    let t = t.clamp(0.0, 1.0);
    Rgb(std::array::from_fn(|c| (a[c] as f32 * (1.0 - t) + b[c] as f32 * t).round() as u8))
}

/// A disc of hues by angle. `rim`: white at the centre, full colour half-way, black at the rim,
/// black outside (like scikit-image's `color.png`); else saturation grows with the radius on a
/// white background (the usual HSV picker).
pub fn wheel(side: u32, rotation: f32, rim: bool) -> RgbImage {
    let c = side as f32 / 2.0;
    RgbImage::from_fn(side, side, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - c, y as f32 + 0.5 - c);
        let r = (dx * dx + dy * dy).sqrt() / c;
        let outside = if rim { Rgb([0, 0, 0]) } else { Rgb([255, 255, 255]) };
        if r > 1.0 {
            return outside;
        }
        let h = dy.atan2(dx).to_degrees() + rotation;
        if rim {
            if r < 0.5 {
                hsv(h, r * 2.0, 1.0)
            } else {
                hsv(h, 1.0, 2.0 - r * 2.0)
            }
        } else {
            hsv(h, r, 1.0)
        }
    })
}

/// Hue by angle around the centre, over the whole rectangle.
pub fn conic(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let a = (y as f32 - h as f32 / 2.0).atan2(x as f32 - w as f32 / 2.0).to_degrees();
        hsv(a, 0.85, 0.95)
    })
}

pub fn rainbow(w: u32, h: u32, vertical: bool) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let t = if vertical { y as f32 / h as f32 } else { x as f32 / w as f32 };
        let fade = if vertical { x as f32 / w as f32 } else { y as f32 / h as f32 };
        hsv(t * 330.0, 0.4 + 0.6 * fade, 1.0)
    })
}

/// A diagonal two-colour gradient.
pub fn linear(w: u32, h: u32, a: [u8; 3], b: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| mix(a, b, (x + y) as f32 / (w + h - 2) as f32))
}

/// `inner` at the centre fading to `outer` at the corners.
pub fn radial(side: u32, inner: [u8; 3], outer: [u8; 3]) -> RgbImage {
    let c = side as f32 / 2.0;
    RgbImage::from_fn(side, side, |x, y| {
        let (dx, dy) = (x as f32 - c, y as f32 - c);
        mix(inner, outer, (dx * dx + dy * dy).sqrt() / (c * 1.414))
    })
}

/// The Mandelbrot set, smooth-coloured with a fire (0) or ice (1) palette.
pub fn mandelbrot(w: u32, h: u32, palette: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let cx = -2.2 + 3.2 * x as f64 / w as f64;
        let cy = -1.2 + 2.4 * y as f64 / h as f64;
        let (mut zx, mut zy, mut i) = (0.0f64, 0.0f64, 0u32);
        while i < 120 && zx * zx + zy * zy < 16.0 {
            (zx, zy) = (zx * zx - zy * zy + cx, 2.0 * zx * zy + cy);
            i += 1;
        }
        if i == 120 {
            return Rgb([0, 0, 0]);
        }
        let t = ((i as f64 + 1.0 - (zx * zx + zy * zy).sqrt().ln().ln() / 2f64.ln()) / 40.0).clamp(0.0, 1.0) as f32;
        match palette {
            0 => hsv(10.0 + 50.0 * t, 1.0 - 0.5 * t, 0.3 + 0.7 * t),
            _ => hsv(200.0 + 40.0 * t, 1.0 - 0.6 * t, 0.3 + 0.7 * t),
        }
    })
}

pub fn julia(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (mut zx, mut zy) = (-1.6 + 3.2 * x as f64 / w as f64, -1.6 + 3.2 * y as f64 / h as f64);
        let mut i = 0u32;
        while i < 100 && zx * zx + zy * zy < 4.0 {
            (zx, zy) = (zx * zx - zy * zy - 0.8, 2.0 * zx * zy + 0.156);
            i += 1;
        }
        let t = i as f32 / 100.0;
        hsv(20.0 + 300.0 * t, 0.6 + 0.4 * t, 0.25 + 0.75 * t.sqrt())
    })
}

/// Deterministic lattice value in 0..1.
fn lattice(x: i32, y: i32, seed: u32) -> f32 {
    let mut n =
        (x as u32).wrapping_mul(374_761_393) ^ (y as u32).wrapping_mul(668_265_263) ^ seed.wrapping_mul(2_246_822_519);
    n = (n ^ (n >> 13)).wrapping_mul(1_274_126_177);
    (n ^ (n >> 16)) as f32 / u32::MAX as f32
}

fn value_noise(x: f32, y: f32, seed: u32) -> f32 {
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
    let (x0, y0) = (x0 as i32, y0 as i32);
    let top = lattice(x0, y0, seed) * (1.0 - sx) + lattice(x0 + 1, y0, seed) * sx;
    let bottom = lattice(x0, y0 + 1, seed) * (1.0 - sx) + lattice(x0 + 1, y0 + 1, seed) * sx;
    top * (1.0 - sy) + bottom * sy
}

/// Fractal (5-octave) value noise between two colours: clouds.
pub fn fbm(w: u32, h: u32, a: [u8; 3], b: [u8; 3], seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (mut sum, mut amp, mut freq) = (0.0, 0.5, 1.0 / 64.0);
        for octave in 0..5 {
            sum += amp * value_noise(x as f32 * freq, y as f32 * freq, seed + octave);
            amp *= 0.5;
            freq *= 2.0;
        }
        mix(a, b, (sum - 0.2) / 0.6)
    })
}

pub fn plasma(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / 40.0, y as f32 / 40.0);
        let v = (fx.sin() + (fy * 1.3).sin() + ((fx + fy) * 0.7).sin() + ((fx * fx + fy * fy).sqrt()).sin()) / 4.0;
        hsv(180.0 + 180.0 * v, 0.7, 0.9)
    })
}

/// Soft round blobs (Gaussians) of warm or pastel colours on a dark or light background.
pub fn blobs(w: u32, h: u32, warm: bool, seed: u32) -> RgbImage {
    let count = 7;
    let spots: Vec<(f32, f32, f32, [f32; 3])> = (0..count)
        .map(|i| {
            let r = |k: u32| lattice(i, k as i32, seed);
            let colour = if warm {
                hsv(5.0 + 40.0 * r(3), 0.35 + 0.4 * r(4), 0.75 + 0.25 * r(5)).0
            } else {
                hsv(360.0 * r(3), 0.3, 1.0).0
            };
            let size = (w.min(h) as f32) * (0.08 + 0.12 * r(2));
            (w as f32 * r(0), h as f32 * r(1), size, colour.map(f32::from))
        })
        .collect();
    let background: [f32; 3] = if warm { [25.0, 15.0, 30.0] } else { [245.0, 245.0, 250.0] };
    RgbImage::from_fn(w, h, |x, y| {
        let mut px = background;
        for &(cx, cy, s, colour) in &spots {
            let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
            let a = (-d2 / (2.0 * s * s)).exp();
            for c in 0..3 {
                px[c] = px[c] * (1.0 - a) + colour[c] * a;
            }
        }
        Rgb(px.map(|v| v.round().clamp(0.0, 255.0) as u8))
    })
}
