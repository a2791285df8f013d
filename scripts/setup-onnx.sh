#!/usr/bin/env bash
# Fetches ONNX Runtime and the evaluator models into an ignored cache directory, verifying each
# file's SHA-256 against the values pinned below. Idempotent: files already present with the
# right hash are left alone and nothing is downloaded.
#
#   .cache/onnx/libonnxruntime.so.1.31.1        from the PyPI wheel onnxruntime==1.31.1 (MIT)
#   .cache/onnx/nudenet-320n.onnx                from nudenet==3.4.2 (model: AGPL-3.0, Ultralytics YOLOv8n)
#   .cache/onnx/ch_PP-OCRv4_det_infer.onnx       from rapidocr-onnxruntime==1.4.4 (Apache-2.0)
#   .cache/onnx/ch_PP-OCRv4_rec_infer.onnx       from rapidocr-onnxruntime==1.4.4 (Apache-2.0)
#   .cache/onnx/ch_PP-OCRv4_{det,rec}_infer.fused.onnx
#                                                the two OCR models rewritten by scripts/ocr_fuse.py:
#                                                same outputs up to float rounding, about a fifth
#                                                less CPU; the gateway prefers them when present
#   .cache/onnx/ch_PP-OCRv4_{det,rec}_infer.int8.onnx
#                                                8-bit copies of the fused ones by
#                                                scripts/ocr_quantize.py (ONNX Runtime's static
#                                                quantization): about a third less CPU again, not
#                                                exact; preferred unless ACC_OCR_PRECISION=float
#
# The wheels are downloaded with pip (never installed) into .cache/onnx/wheels/, and the files
# are taken out of them with Python's zipfile. Nothing here is committed to the repository.
# The directory is $ACC_MODELS_DIR when set (the gateway reads the same variable), else
# .cache/onnx at the repository root. Needs python3 with pip; Linux x86_64 only (the pinned
# ONNX Runtime library is the manylinux_2_28_x86_64 build). Prints the directory on the last line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${ACC_MODELS_DIR:-$root/.cache/onnx}"

# wheel requirement | path inside the wheel | file name in $dir | SHA-256 of that file
FILES="
onnxruntime==1.31.1|onnxruntime/capi/libonnxruntime.so.1.31.1|libonnxruntime.so.1.31.1|fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3
nudenet==3.4.2|nudenet/320n.onnx|nudenet-320n.onnx|c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f
rapidocr-onnxruntime==1.4.4|rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx|ch_PP-OCRv4_det_infer.onnx|d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9
rapidocr-onnxruntime==1.4.4|rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx|ch_PP-OCRv4_rec_infer.onnx|48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b
"

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "setup-onnx.sh: only Linux x86_64 is supported (this is $(uname -s)-$(uname -m)); put an ONNX Runtime >= 1.31 library where ACC_ORT_DYLIB points" >&2
    exit 1
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "setup-onnx.sh: python3 is not installed; it is needed to download and unpack the wheels (apt-get install python3 python3-pip)" >&2
    exit 1
fi

mkdir -p "$dir/wheels"
# One writer at a time (scripts/test.sh and a developer may run this together).
exec 9>"$dir/.setup.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

python3 - "$dir" "$FILES" <<'PYEOF'
import glob, hashlib, os, re, subprocess, sys, zipfile

out_dir, spec = sys.argv[1], sys.argv[2]
wheel_dir = os.path.join(out_dir, "wheels")

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def find_wheel(req):
    name, version = req.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for path in sorted(glob.glob(os.path.join(wheel_dir, "*.whl"))):
        base = os.path.basename(path)
        parts = base.split("-")
        if re.sub(r"[-_.]+", "_", parts[0]).lower() == stem and parts[1] == version:
            return path
    return None

def download(req):
    wheel = find_wheel(req)
    if wheel:
        return wheel
    print(f"setup-onnx.sh: downloading {req} (not installing it)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
           "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
           "--platform", "manylinux_2_28_x86_64", "-d", wheel_dir, req]
    if subprocess.call(cmd, stdout=sys.stderr) != 0:
        sys.exit(f"setup-onnx.sh: 'pip download {req}' failed (is PyPI reachable, and is pip installed: apt-get install python3-pip?)")
    wheel = find_wheel(req)
    if not wheel:
        sys.exit(f"setup-onnx.sh: pip reported success but no wheel for {req} is in {wheel_dir}")
    return wheel

failed = False
for line in spec.split():
    req, member, name, want = line.split("|")
    dest = os.path.join(out_dir, name)
    if os.path.isfile(dest) and sha256(dest) == want:
        continue
    wheel = download(req)
    tmp = dest + ".part"
    try:
        with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as f:
            f.write(z.read(member))
    except (KeyError, zipfile.BadZipFile) as e:
        sys.exit(f"setup-onnx.sh: cannot take {member} out of {wheel}: {e} (delete the wheel and run again)")
    got = sha256(tmp)
    if got != want:
        os.remove(tmp)
        print(f"setup-onnx.sh: SHA-256 MISMATCH for {name} from {os.path.basename(wheel)}:{member}\n"
              f"    expected {want}\n    got      {got}\n"
              f"    the file was not installed; delete {wheel} and run again, or check the pin", file=sys.stderr)
        failed = True
        continue
    os.replace(tmp, dest)
    print(f"setup-onnx.sh: {name} ok ({got[:12]}...)", file=sys.stderr)
sys.exit(1 if failed else 0)
PYEOF

# Writes $dir/NAME.SUFFIX.onnx from SRC with scripts/SCRIPT (ARGS, then SRC and the copy's path),
# unless the copy is current: made from this SRC by this script in this venv (its stamp) and
# newer than the model as shipped (the gateway's own test).
derive() {
    local py="$1" name="$2" suffix="$3" src="$4" script="$5" out stamp
    shift 5
    out="$dir/$name.$suffix.onnx"
    stamp="$(cat "$src" "$root/scripts/$script" "$root/scripts/onnx-venv.sh" | sha256sum | cut -d' ' -f1)"
    if [ -f "$out" ] && [ "$(cat "$dir/$name.$suffix.stamp" 2>/dev/null)" = "$stamp" ] \
        && ! [ "$dir/$name.onnx" -nt "$out" ]; then
        return 0
    fi
    rm -f "$out" "$dir/$name.$suffix.stamp"
    "$py" "$root/scripts/$script" "$@" "$src" "$out" >&2 || return 1
    echo "$stamp" >"$dir/$name.$suffix.stamp"
}

# The OCR models' fused copies (scripts/ocr_fuse.py, in the pinned onnx/numpy venv), rewritten when
# missing or when the model, the script or the pins changed. Optional: when this fails the gateway
# reads with the models as shipped, so it warns and goes on.
fuse() {
    local py name
    py="$("$root/scripts/onnx-venv.sh" | tail -n 1)" || return 1
    for name in ch_PP-OCRv4_det_infer ch_PP-OCRv4_rec_infer; do
        derive "$py" "$name" fused "$dir/$name.onnx" ocr_fuse.py || return 1
    done
}
if ! fuse; then
    echo "setup-onnx.sh: WARNING: could not write the fused OCR models; OCR uses the models as shipped where no current fused copy is there (about a fifth more CPU)" >&2
fi

# The 8-bit copies (scripts/ocr_quantize.py), made from the fused copies (else the models as
# shipped) and remade when that source, the script or the pins change. Optional like the fused
# ones: the gateway then reads with the float models.
quantize() {
    local py name kind src
    py="$("$root/scripts/onnx-venv.sh" | tail -n 1)" || return 1
    for kind in det rec; do
        name="ch_PP-OCRv4_${kind}_infer"
        src="$dir/$name.fused.onnx"
        [ -f "$src" ] || src="$dir/$name.onnx"
        derive "$py" "$name" int8 "$src" ocr_quantize.py "$kind" || return 1
    done
}
if ! quantize; then
    echo "setup-onnx.sh: WARNING: could not write the 8-bit OCR models; OCR reads with the float models (about a third more CPU)" >&2
fi

echo "$dir"
