//! NudeNet's detector (`nudenet` 3.4.2 from PyPI, `320n.onnx`: a YOLOv8n, AGPL-3.0) run through
//! ONNX Runtime, with the pre- and post-processing of the Python package so that both give the
//! same detections on the same image (`tests/nudenet_parity.rs` checks this against outputs of
//! the real package, made by `scripts/nudenet-reference.py`).
//!
//! What the package does, and this module with it:
//! 1. pads the image with black at the right or bottom to a square of its longer side;
//! 2. resizes that square to 320x320 with OpenCV's bilinear filter (`INTER_LINEAR`: half-pixel
//!    centres, two taps, no antialiasing, 11-bit fixed-point weights) on 8-bit pixels;
//! 3. feeds it as float32 NCHW scaled to 0..1 in **B, G, R** channel order: the package reads
//!    BGR with `cv2.imread`, swaps to RGB with `cvtColor(COLOR_RGBA2BGR)` (which swaps R and B
//!    on a 3-channel image), then `blobFromImage(swapRB=True)` swaps back;
//! 4. reads `output0` `[1, 22, 2100]`: per anchor cx, cy, w, h (in 320 space) then 18 class
//!    scores; takes the best class per anchor, scales the box to the padded square's pixels,
//!    clips it to the image, and runs class-agnostic NMS (`cv2.dnn.NMSBoxes`: score strictly
//!    above 0.25, IoU above 0.45 suppresses, highest score first).
//!
//! Boxes are returned as floats; the package truncates them to integers.

use std::path::{Path, PathBuf};

use image::RgbImage;

use super::onnx;

/// Class names, in the order of the model's score rows.
pub const CLASSES: [&str; 18] = [
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
];

/// The model's input side.
pub const INPUT_SIZE: u32 = 320;
/// A detection is kept when its score is strictly above this (like `cv2.dnn.NMSBoxes`).
pub const SCORE_THRESHOLD: f32 = 0.25;
/// A box whose IoU with a better-scored kept box is above this is dropped.
pub const IOU_THRESHOLD: f32 = 0.45;
/// File name of the model in the models directory (`scripts/setup-onnx.sh`).
pub const MODEL_FILE: &str = "nudenet-320n.onnx";

/// `<models dir>/nudenet-320n.onnx`.
pub fn default_model_path() -> PathBuf {
    onnx::models_dir().join(MODEL_FILE)
}

/// One detected region.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub class: &'static str,
    pub score: f32,
    /// x, y, width, height in the original image's pixels (the Python package's `box`, not
    /// truncated to integers).
    pub bbox: [f32; 4],
}

/// Runs the detector on `img` with the model at `model` (one session per calling thread).
/// CPU-bound (about 20 ms on one core): call it from the evaluation pool, not an async worker.
/// Detections come best first. A missing library or model is an `Err` naming it.
pub fn detect(model: &Path, img: &RgbImage) -> Result<Vec<Detection>, String> {
    if img.width() == 0 || img.height() == 0 {
        return Err("empty image (0 pixels)".to_string());
    }
    let (input, frame) = preprocess(img);
    onnx::with_session(model, |session| {
        let side = INPUT_SIZE as usize;
        let tensor = ort::value::TensorRef::from_array_view(([1usize, 3, side, side], &input[..]))
            .map_err(|e| format!("nudenet: cannot build the input tensor: {e}"))?;
        let outputs = session
            .run(ort::inputs![tensor])
            .map_err(|e| format!("nudenet: inference failed ({}): {e}", model.display()))?;
        if outputs.len() == 0 {
            return Err(format!("nudenet: model {} has no output", model.display()));
        }
        let (shape, data) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("nudenet: unexpected output type from {}: {e}", model.display()))?;
        let rows = 4 + CLASSES.len() as i64;
        if shape.len() != 3 || shape[0] != 1 || shape[1] != rows || shape[2] <= 0 {
            return Err(format!(
                "nudenet: model {} gives output shape {:?}, expected [1, {rows}, N] (is it NudeNet's 320n.onnx?)",
                model.display(),
                &shape[..]
            ));
        }
        Ok(postprocess(data, shape[2] as usize, &frame))
    })
}

/// How the original image sits in the model's input: its size and the side of the padded
/// square it was resized from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// max(width, height): the image is padded at the right or bottom to this square.
    pub side: u32,
}

impl Frame {
    pub fn of(width: u32, height: u32) -> Frame {
        Frame { width, height, side: width.max(height) }
    }
}

// OpenCV's fixed-point bilinear resize of 8-bit images (INTER_RESIZE_COEF_BITS = 11).
const COEF_BITS: u32 = 11;
const COEF_SCALE: i32 = 1 << COEF_BITS;

/// For each destination index: the source index and the two weights (summing to 2048), as
/// OpenCV computes them for INTER_LINEAR.
fn linear_taps(src: u32, dst: u32) -> Vec<(usize, i32, i32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as i64;
            f -= s as f32;
            if s < 0 {
                s = 0;
                f = 0.0;
            }
            if s >= src as i64 - 1 {
                s = src as i64 - 1;
                f = 0.0;
            }
            let a0 = ((1.0 - f) * COEF_SCALE as f32).round_ties_even() as i32;
            (s as usize, a0, COEF_SCALE - a0)
        })
        .collect()
}

/// The model input for `img`: float32 `[1, 3, 320, 320]` (B, G, R planes, 0..1) and the frame
/// needed to map boxes back. Gives the same values as `nudenet._read_image` (OpenCV 5.0) on the
/// same pixels: checked bit for bit on downscales of PNG photos and noise; enlarging a tiny image
/// may differ by one 8-bit level on a few values. (JPEGs decode slightly differently in OpenCV.)
pub fn preprocess(img: &RgbImage) -> (Vec<f32>, Frame) {
    let frame = Frame::of(img.width(), img.height());
    let n = INPUT_SIZE as usize;
    let mut out = vec![0f32; 3 * n * n];
    if frame.side == 0 {
        return (out, frame);
    }
    let (w, h) = (frame.width as usize, frame.height as usize);
    let raw = img.as_raw();
    // 8-bit level -> input value.
    let level: [f32; 256] = std::array::from_fn(|v| v as f32 * (1.0 / 255.0));
    // The B, G and R planes, like the package's blob; `pixel` writes one RGB pixel.
    let (blue, rest) = out.split_at_mut(n * n);
    let (green, red) = rest.split_at_mut(n * n);
    let mut pixel = |i: usize, rgb: [i32; 3]| {
        red[i] = level[rgb[0] as usize];
        green[i] = level[rgb[1] as usize];
        blue[i] = level[rgb[2] as usize];
    };

    if frame.side == 2 * INPUT_SIZE {
        // OpenCV turns an exact 2x INTER_LINEAR downscale into INTER_AREA: a rounded 2x2 mean.
        let px = |x: usize, y: usize, c: usize| if x < w && y < h { raw[(y * w + x) * 3 + c] as i32 } else { 0 };
        for y in 0..n {
            for x in 0..n {
                let rgb: [i32; 3] = std::array::from_fn(|c| {
                    let (sx, sy) = (2 * x, 2 * y);
                    (px(sx, sy, c) + px(sx + 1, sy, c) + px(sx, sy + 1, c) + px(sx + 1, sy + 1, c) + 2) >> 2
                });
                pixel(y * n + x, rgb);
            }
        }
        return (out, frame);
    }

    let taps = linear_taps(frame.side, INPUT_SIZE);
    // Horizontal taps as byte offsets into a source row; a tap on the padding (black) gets
    // weight 0 instead of a branch.
    let htaps: Vec<(usize, i32, usize, i32)> = taps
        .iter()
        .map(|&(s, a0, a1)| {
            let (i0, a0) = if s < w { (s * 3, a0) } else { (0, 0) };
            let (i1, a1) = if a1 != 0 && s + 1 < w { ((s + 1) * 3, a1) } else { (0, 0) };
            (i0, a0, i1, a1)
        })
        .collect();
    // Horizontal pass of source row y: 2048-scaled values per destination column and channel.
    let hrow = |y: usize, buf: &mut [i32]| {
        if y >= h {
            buf.fill(0);
            return;
        }
        let row = &raw[y * w * 3..(y + 1) * w * 3];
        for (d, &(i0, a0, i1, a1)) in buf.chunks_exact_mut(3).zip(&htaps) {
            for c in 0..3 {
                d[c] = row[i0 + c] as i32 * a0 + row[i1 + c] as i32 * a1;
            }
        }
    };
    let (mut r0, mut r1) = (vec![0i32; n * 3], vec![0i32; n * 3]);
    let mut rows: (usize, usize) = (usize::MAX, usize::MAX);
    for (dy, &(sy, b0, b1)) in taps.iter().enumerate() {
        let sy1 = if b1 != 0 { sy + 1 } else { sy };
        if rows != (sy, sy1) {
            if rows.1 == sy {
                std::mem::swap(&mut r0, &mut r1);
            } else {
                hrow(sy, &mut r0);
            }
            if sy1 != sy {
                hrow(sy1, &mut r1);
            } else {
                r1.copy_from_slice(&r0);
            }
            rows = (sy, sy1);
        }
        for (dx, (v0, v1)) in r0.chunks_exact(3).zip(r1.chunks_exact(3)).enumerate() {
            // OpenCV's SIMD vertical pass: 16-bit multiply-high on values shifted by 4, then a
            // rounding shift by 2.
            let rgb: [i32; 3] = std::array::from_fn(|c| {
                let t = ((b0 * (v0[c] >> 4)) >> 16) + ((b1 * (v1[c] >> 4)) >> 16);
                ((t + 2) >> 2).clamp(0, 255)
            });
            pixel(dy * n + dx, rgb);
        }
    }
    (out, frame)
}

/// Maps a model box (centre x, centre y, width, height in 320 space) to the original image, as
/// the package does: scale by side/320, then clip the corner into the image and the size to
/// what is left of it. Returns x, y, width, height.
pub fn scale_box(cx: f32, cy: f32, w: f32, h: f32, frame: &Frame) -> [f32; 4] {
    let k = frame.side as f32 / INPUT_SIZE as f32;
    let (iw, ih) = (frame.width as f32, frame.height as f32);
    let x = ((cx - w / 2.0) * k).min(iw).max(0.0);
    let y = ((cy - h / 2.0) * k).min(ih).max(0.0);
    let w = (w * k).min(iw - x);
    let h = (h * k).min(ih - y);
    [x, y, w, h]
}

/// Intersection over union of two x, y, width, height boxes (0 when both are empty).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    let [ax, ay, aw, ah] = a.map(f64::from);
    let [bx, by, bw, bh] = b.map(f64::from);
    let iw = (ax + aw).min(bx + bw) - ax.max(bx);
    let ih = (ay + ah).min(by + bh) - ay.max(by);
    let inter = if iw > 0.0 && ih > 0.0 { iw * ih } else { 0.0 };
    let union = aw * ah + bw * bh - inter;
    if aw * ah + bw * bh <= f64::EPSILON {
        return 0.0;
    }
    inter / union
}

/// Greedy non-maximum suppression over all classes together: keeps the detections scored
/// strictly above `score_threshold`, best first (ties in input order), dropping any whose IoU
/// with an already kept one is above `iou_threshold`.
pub fn nms(mut dets: Vec<Detection>, score_threshold: f32, iou_threshold: f32) -> Vec<Detection> {
    dets.retain(|d| d.score > score_threshold);
    // Stable: equal scores keep their order, as OpenCV's stable_sort does.
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for d in dets {
        if kept.iter().all(|k| iou(&k.bbox, &d.bbox) <= iou_threshold as f64) {
            kept.push(d);
        }
    }
    kept
}

/// Turns the raw output (`[1, 22, anchors]`, row-major) into detections for an image framed
/// as `frame`: best class per anchor, box scaled back, then [`nms`].
pub fn postprocess(output: &[f32], anchors: usize, frame: &Frame) -> Vec<Detection> {
    let rows = 4 + CLASSES.len();
    if output.len() < rows * anchors {
        return Vec::new();
    }
    let at = |row: usize, i: usize| output[row * anchors + i];
    let mut candidates = Vec::new();
    for i in 0..anchors {
        // First best class, like numpy's argmax.
        let mut best = (0usize, at(4, i));
        for k in 1..CLASSES.len() {
            let s = at(4 + k, i);
            if s > best.1 {
                best = (k, s);
            }
        }
        if best.1.is_nan() || best.1 <= SCORE_THRESHOLD {
            continue;
        }
        candidates.push(Detection {
            class: CLASSES[best.0],
            score: best.1,
            bbox: scale_box(at(0, i), at(1, i), at(2, i), at(3, i), frame),
        });
    }
    nms(candidates, SCORE_THRESHOLD, IOU_THRESHOLD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(class: &'static str, score: f32, bbox: [f32; 4]) -> Detection {
        Detection { class, score, bbox }
    }

    #[test]
    fn classes_are_the_packages_order() {
        assert_eq!(CLASSES.len(), 18);
        assert_eq!(CLASSES[1], "FACE_FEMALE");
        assert_eq!(CLASSES[12], "FACE_MALE");
        assert_eq!(CLASSES[17], "BUTTOCKS_COVERED");
    }

    #[test]
    fn iou_of_known_boxes() {
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 10.0, 10.0]), 1.0);
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[10.0, 0.0, 10.0, 10.0]), 0.0);
        // Half overlap: 50 / (100 + 100 - 50).
        assert!((iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 10.0, 10.0]) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn nms_keeps_best_of_overlapping_boxes_across_classes() {
        let dets = vec![
            det("FACE_MALE", 0.4, [0.0, 0.0, 10.0, 10.0]),
            det("FACE_FEMALE", 0.9, [1.0, 0.0, 10.0, 10.0]), // IoU with the first: 90/110 > 0.45
            det("FEET_EXPOSED", 0.5, [50.0, 50.0, 10.0, 10.0]),
            det("BELLY_COVERED", 0.25, [80.0, 80.0, 5.0, 5.0]), // not above the threshold
            det("BELLY_EXPOSED", 0.3, [55.0, 50.0, 10.0, 10.0]), // IoU 50/150 = 0.33: kept
        ];
        let kept = nms(dets, SCORE_THRESHOLD, IOU_THRESHOLD);
        let names: Vec<_> = kept.iter().map(|d| d.class).collect();
        assert_eq!(names, ["FACE_FEMALE", "FEET_EXPOSED", "BELLY_EXPOSED"]);
    }

    #[test]
    fn nms_ties_keep_input_order() {
        let dets = vec![det("A", 0.5, [0.0, 0.0, 4.0, 4.0]), det("B", 0.5, [0.0, 0.0, 4.0, 4.0])];
        assert_eq!(nms(dets, 0.25, 0.45)[0].class, "A");
    }

    #[test]
    fn boxes_scale_from_the_padded_square_and_clip() {
        // 640x480 image: padded to 640x640, so 320 space is 2 pixels per unit on both axes.
        let f = Frame::of(640, 480);
        assert_eq!(scale_box(100.0, 100.0, 20.0, 40.0, &f), [180.0, 160.0, 40.0, 80.0]);
        // A box reaching into the bottom padding is cut at the image's bottom edge.
        assert_eq!(scale_box(160.0, 230.0, 40.0, 40.0, &f), [280.0, 420.0, 80.0, 60.0]);
        // Off the top-left corner: the corner clips to 0 and the size is kept (as the package).
        assert_eq!(scale_box(0.0, 0.0, 20.0, 20.0, &f), [0.0, 0.0, 40.0, 40.0]);
        // Tall image: padded at the right.
        let f = Frame::of(100, 400);
        assert_eq!(scale_box(40.0, 160.0, 80.0, 320.0, &f), [0.0, 0.0, 100.0, 400.0]);
    }

    #[test]
    fn postprocess_reads_the_transposed_layout() {
        let anchors = 3;
        let rows = 4 + CLASSES.len();
        let mut out = vec![0f32; rows * anchors];
        let mut set = |row: usize, i: usize, v: f32| out[row * anchors + i] = v;
        // Anchor 1: a FACE_MALE at (160, 160), 32x32 in 320 space; the others score too low.
        for (row, v) in [(0, 160.0), (1, 160.0), (2, 32.0), (3, 32.0)] {
            set(row, 1, v);
        }
        set(4 + 12, 1, 0.8);
        set(4 + 1, 1, 0.3);
        set(4 + 3, 0, 0.2);
        set(4 + 3, 2, 0.25);
        let dets = postprocess(&out, anchors, &Frame::of(320, 160));
        assert_eq!(dets, vec![det("FACE_MALE", 0.8, [144.0, 144.0, 32.0, 16.0])]);
    }

    #[test]
    fn taps_match_opencv_for_a_downscale() {
        // 512 -> 320: scale 1.6; destination 0 samples source 0.5 * 1.6 - 0.5 = 0.3.
        let t = linear_taps(512, 320);
        assert_eq!(t[0], (0, 1434, 614));
        // d = 1: (1.5 * 1.6) - 0.5 = 1.9 -> source 1, weights 0.1 / 0.9.
        assert_eq!(t[1], (1, 205, 1843));
        assert_eq!(t[319].0, 510);
        // Upscale: the first and last destinations clamp to the edge pixels.
        let t = linear_taps(100, 320);
        assert_eq!(t[0], (0, 2048, 0));
        assert_eq!(t[319], (99, 2048, 0));
    }

    #[test]
    fn preprocess_pads_bottom_right_and_orders_bgr() {
        // A 320x160 red image: the top half of the input is red (in the last plane, R), the
        // bottom half is padding (0).
        let img = RgbImage::from_pixel(320, 160, image::Rgb([255, 0, 0]));
        let (input, frame) = preprocess(&img);
        assert_eq!(frame, Frame { width: 320, height: 160, side: 320 });
        let n = 320 * 320;
        let at = |plane: usize, x: usize, y: usize| input[plane * n + y * 320 + x];
        assert_eq!(at(2, 10, 10), 1.0);
        assert_eq!(at(0, 10, 10), 0.0);
        assert_eq!(at(2, 10, 200), 0.0);
        // 2x downscale (INTER_AREA path) and a generic one keep a uniform area uniform.
        for side in [640, 500] {
            let img = RgbImage::from_pixel(side, side, image::Rgb([10, 128, 250]));
            let (input, _) = preprocess(&img);
            let at = |plane: usize, x: usize, y: usize| input[plane * n + y * 320 + x];
            for (x, y) in [(0, 0), (319, 319), (100, 57)] {
                assert_eq!([at(0, x, y), at(1, x, y), at(2, x, y)].map(|v| (v * 255.0).round() as u8), [250, 128, 10]);
            }
        }
    }
}
