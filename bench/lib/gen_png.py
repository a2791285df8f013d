#!/usr/bin/env python3
"""Write the two benchmark PNG payloads (stdlib only: zlib + struct).

usage: gen_png.py OUT_DIR
  OUT_DIR/small.png  ~1 KB   (18x18 RGB, random bytes: incompressible)
  OUT_DIR/large.png  ~1.5 MiB (1024x1024 RGB, 4-bit noise, Huffman-only deflate)

Deterministic (fixed seed), so every run benchmarks identical bytes.
"""
import os
import random
import struct
import sys
import zlib


def chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(width: int, height: int, rows, compressor) -> bytes:
    # colour type 2 = truecolour RGB, bit depth 8, filter type 0 (None) per row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"".join(b"\x00" + r for r in rows)
    idat = compressor.compress(raw) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20240601)

    # Small: fully random pixels, stored almost verbatim by deflate.
    w = h = 18
    small = png(w, h, [rng.randbytes(w * 3) for _ in range(h)], zlib.compressobj(9))

    # Large: each byte takes one of 16 values (4 bits of entropy), Huffman-only
    # coding gets close to 4 bits/byte => ~3 MiB raw -> ~1.5 MiB compressed.
    w = h = 1024
    table = bytes(64 + (b & 15) * 8 for b in range(256))
    rows = [rng.randbytes(w * 3).translate(table) for _ in range(h)]
    large = png(w, h, rows,
                zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY))

    for name, data in (("small.png", small), ("large.png", large)):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
