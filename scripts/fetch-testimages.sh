#!/usr/bin/env bash
# Puts the test images of the NudeNet parity test (tests/nudenet_parity.rs) in .cache/testimages/,
# verifying each file's SHA-256 against the values pinned below. Idempotent. The images are
# never committed; only the reference detections (tests/fixtures/nudenet/*.json) are.
#
# Real photographs come from the PyPI wheel scikit-image==0.26.0 (downloaded with pip, never
# installed), skimage/data/. Their licences, as the docstrings of skimage/data/_fetchers.py in
# that wheel state them (the wheel's skimage/data/README.txt says nothing on licences):
#   astronaut.png  Eileen Collins, NASA: "No known copyright restrictions, released into the public domain."
#   camera.png     "No copyright restrictions. CC0 by the photographer (Lav Varshney)."
#   chelsea.png    "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)."
#   coffee.png     "No copyright restrictions. CC0 by the photographer (Rachel Michetti)."
#   color.png      a colour chart; no licence line of its own (scikit-image is BSD-3-Clause).
# Synthetic images are drawn here (uncompressed PNG, so the bytes are the same everywhere):
#   synthetic-grey-640x360.png      solid mid-grey, landscape (padded at the bottom)
#   synthetic-gradient-300x500.png  smooth colour gradient, portrait (padded at the right)
# Prints the directory on the last line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.cache/testimages"

SKIMAGE="scikit-image==0.26.0"
# name | source ("skimage:<path in the wheel>" or "synthetic") | SHA-256 of the file
FILES="
astronaut.png|skimage:skimage/data/astronaut.png|88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5
camera.png|skimage:skimage/data/camera.png|b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a
chelsea.png|skimage:skimage/data/chelsea.png|596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb
coffee.png|skimage:skimage/data/coffee.png|cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7
color.png|skimage:skimage/data/color.png|7d2df993de2b4fa2a78e04e5df8050f49a9c511aa75e59ab3bd56ac9c98aef7e
synthetic-grey-640x360.png|synthetic|d4448bca1d4997fb7cf6b4234da55388cfdc1ea5baf5977a239e283018ef23c2
synthetic-gradient-300x500.png|synthetic|10ea73ff3e32653a2cfaa7a63ba0e7867bfbdbeed170bab8909f4ebb75bc7538
"

if ! command -v python3 >/dev/null 2>&1; then
    echo "fetch-testimages.sh: python3 is not installed; it is needed to download and unpack the wheel (apt-get install python3 python3-pip)" >&2
    exit 1
fi

mkdir -p "$dir/wheels"
exec 9>"$dir/.fetch.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

python3 - "$dir" "$SKIMAGE" "$FILES" <<'PYEOF'
import glob, hashlib, os, struct, subprocess, sys, zipfile, zlib

out_dir, skimage_req, spec = sys.argv[1], sys.argv[2], sys.argv[3]
wheel_dir = os.path.join(out_dir, "wheels")

def sha256(data):
    return hashlib.sha256(data).hexdigest()

def skimage_wheel():
    version = skimage_req.split("==")[1]
    found = sorted(glob.glob(os.path.join(wheel_dir, f"scikit_image-{version}-*.whl")))
    if found:
        return found[0]
    print(f"fetch-testimages.sh: downloading {skimage_req} (not installing it)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
           "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
           "--platform", "manylinux_2_28_x86_64", "-d", wheel_dir, skimage_req]
    if subprocess.call(cmd, stdout=sys.stderr) != 0:
        sys.exit(f"fetch-testimages.sh: 'pip download {skimage_req}' failed (is PyPI reachable, and is pip installed?)")
    found = sorted(glob.glob(os.path.join(wheel_dir, f"scikit_image-{version}-*.whl")))
    if not found:
        sys.exit(f"fetch-testimages.sh: pip reported success but no {skimage_req} wheel is in {wheel_dir}")
    return found[0]

def png(width, height, pixel):
    """An 8-bit RGB PNG with stored (uncompressed) deflate blocks: the same bytes with any zlib."""
    raw = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))
    z = b"\x78\x01"
    step = 65535
    for i in range(0, len(raw), step):
        chunk = raw[i:i + step]
        last = 1 if i + step >= len(raw) else 0
        z += bytes([last]) + struct.pack("<HH", len(chunk), len(chunk) ^ 0xFFFF) + chunk
    z += struct.pack(">I", zlib.adler32(raw))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", z) + chunk(b"IEND", b"")

SYNTHETIC = {
    "synthetic-grey-640x360.png": lambda: png(640, 360, lambda x, y: (128, 128, 128)),
    "synthetic-gradient-300x500.png": lambda: png(
        300, 500, lambda x, y: (40 + x * 180 // 299, 200 - y * 150 // 499, 90 + (x + y) * 100 // 798)),
}

failed = False
for line in spec.split():
    name, source, want = line.split("|")
    dest = os.path.join(out_dir, name)
    if os.path.isfile(dest):
        with open(dest, "rb") as f:
            if sha256(f.read()) == want:
                continue
    if source == "synthetic":
        data = SYNTHETIC[name]()
        origin = "drawn here"
    else:
        member = source.split(":", 1)[1]
        wheel = skimage_wheel()
        with zipfile.ZipFile(wheel) as z:
            data = z.read(member)
        origin = f"{os.path.basename(wheel)}:{member}"
    got = sha256(data)
    if got != want:
        print(f"fetch-testimages.sh: SHA-256 MISMATCH for {name} ({origin})\n"
              f"    expected {want}\n    got      {got}", file=sys.stderr)
        failed = True
        continue
    with open(dest + ".part", "wb") as f:
        f.write(data)
    os.replace(dest + ".part", dest)
    print(f"fetch-testimages.sh: {name} ok", file=sys.stderr)
sys.exit(1 if failed else 0)
PYEOF

echo "$dir"
