"""Renders the OCR accuracy test set (called by scripts/ocr-testimages.sh).

usage: ocr_testimages.py FONTS_DIR OUT_DIR

Writes OUT_DIR/NAME.png for each case and OUT_DIR/manifest.json:
  {"images": [{"file": "NAME.png", "lines": ["expected line", ...], "font": ..., "size": ...}]}
Deterministic: same Pillow and fonts give the same pixels.
"""
import json
import os
import random
import sys

from PIL import Image, ImageDraw, ImageFont

STRINGS = [
    ["OPEN BAKERY 24/7"],
    ["ACME"],
    ["SALE 50% OFF"],
    ["Hello World"],
    ["0123456789"],
    ["Fresh Coffee", "Since 1987"],
    ["Call 555-0142"],
    ["The quick brown fox", "jumps over the lazy dog"],
    ["Grand Opening"],
    ["PRICE $19.99"],
    ["Welcome Home"],
    ["Route 66 Diner"],
]

# (font file, sizes)
FONTS = [
    ("DejaVuSans.ttf", [28, 48]),
    ("DejaVuSans-Bold.ttf", [36, 64]),
    ("DejaVuSerif.ttf", [32, 56]),
    ("DejaVuSansMono.ttf", [24, 44]),
    ("DejaVuSerif-Bold.ttf", [40]),
]

# (background, foreground)
COLOURS = [
    ((255, 255, 255), (0, 0, 0)),
    ((20, 24, 40), (250, 240, 200)),
    ((200, 30, 40), (255, 255, 255)),
    ((240, 230, 200), (60, 40, 20)),
]


def main():
    fonts_dir, out_dir = sys.argv[1], sys.argv[2]
    rng = random.Random(1234)
    images = []
    n = 0
    for font_file, sizes in FONTS:
        for size in sizes:
            font = ImageFont.truetype(os.path.join(fonts_dir, font_file), size)
            # Each (font, size) renders a few of the strings, cycling so every string appears.
            for k in range(3):
                lines = STRINGS[n % len(STRINGS)]
                bg, fg = COLOURS[n % len(COLOURS)]
                n += 1
                widths = [font.getbbox(line)[2] for line in lines]
                line_h = int(size * 1.5)
                margin = 40 + rng.randint(0, 40)
                w = max(512, max(widths) + 2 * margin)
                h = max(256, line_h * len(lines) + 2 * margin)
                img = Image.new("RGB", (w, h), bg)
                draw = ImageDraw.Draw(img)
                y = (h - line_h * len(lines)) // 2
                for line, lw in zip(lines, widths):
                    x = (w - lw) // 2 + rng.randint(-10, 10)
                    draw.text((x, y), line, font=font, fill=fg)
                    y += line_h
                name = "%02d-%s-%d.png" % (len(images), font_file[:-4], size)
                img.save(os.path.join(out_dir, name))
                images.append({"file": name, "lines": lines, "font": font_file, "size": size})
    # Larger scenes like generated images: a gradient background with speckle noise, text blocks
    # at different places (reading order: top to bottom, left to right).
    scenes = [
        ((1024, 1024), "DejaVuSans-Bold.ttf", 72, [(80, 120, "OPEN BAKERY 24/7"), (300, 800, "SALE 50% OFF")]),
        ((1024, 1024), "DejaVuSerif.ttf", 40, [(60, 60, "ACME"), (600, 70, "Hello World"), (200, 900, "0123456789")]),
        ((768, 768), "DejaVuSansMono-Bold.ttf", 36, [(100, 350, "Route 66 Diner")]),
        ((1536, 1024), "DejaVuSans.ttf", 64, [(200, 450, "Grand Opening Today")]),
    ]
    for (w, h), font_file, size, texts in scenes:
        font = ImageFont.truetype(os.path.join(fonts_dir, font_file), size)
        img = Image.new("RGB", (w, h))
        px = img.load()
        for y in range(h):
            for x in range(w):
                n = rng.randint(-12, 12)
                px[x, y] = (min(255, max(0, 180 + x * 60 // w + n)), min(255, max(0, 200 - y * 80 // h + n)), 230)
        draw = ImageDraw.Draw(img)
        for x, y, text in texts:
            draw.text((x, y), text, font=font, fill=(25, 20, 60))
        name = "%02d-scene-%dx%d.png" % (len(images), w, h)
        img.save(os.path.join(out_dir, name))
        images.append({"file": name, "lines": [t for _, _, t in texts], "font": font_file, "size": size})
    # Fine print (not in the accuracy set): 12 px lines on a 1024x1024 scene, below what OCR's
    # default detector size finds; a route's larger ocr_max_side reads them.
    font = ImageFont.truetype(os.path.join(fonts_dir, "DejaVuSans.ttf"), 12)
    img = Image.new("RGB", (1024, 1024), (230, 220, 200))
    draw = ImageDraw.Draw(img)
    draw.text((100, 300), "FRESH COFFEE", font=font, fill=(20, 20, 20))
    draw.text((500, 700), "Open 7 days", font=font, fill=(120, 20, 20))
    img.save(os.path.join(out_dir, "fineprint-1024x1024.png"))
    extras = [{"file": "fineprint-1024x1024.png", "lines": ["FRESH COFFEE", "Open 7 days"], "font": "DejaVuSans.ttf", "size": 12}]
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"images": images, "extras": extras}, f, indent=1)
    print("ocr_testimages.py: wrote %d images to %s" % (len(images), out_dir), file=sys.stderr)


if __name__ == "__main__":
    main()
