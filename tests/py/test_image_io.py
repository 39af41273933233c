"""Image decoding and resizing against Pillow (PyPI), on files this test generates.

`fluxtrain image` decodes a file exactly as `prepare` does (libvips) and writes the pixels.
Reference: Pillow's decoding, then convert("RGB") — with two deliberate differences the issue asks
for: alpha is flattened on white (reference: Pillow's alpha_composite over white), and 16-bit
greyscale is scaled to 8 bits (Pillow's convert clips I;16 at 255; reference: its 16-bit values >> 8).
Bounds: decoding within one level everywhere (max |diff| <= 1); resizing within two levels of
Pillow's BILINEAR (max) and 0.5 level on average; area resize within one level of Pillow's BOX
at integer factors. PNG writing round-trips exactly. Truncated and non-image files: exit 2 with
one line naming the file.
"""
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
from PIL import Image, ImageOps
from safetensors.numpy import load_file

BIN = os.environ["FLUXTRAIN_BIN"]
failures = []


def decode(path, *extra):
    out = path + ".st"
    r = subprocess.run([BIN, "image", "--input", path, "--output", out, *extra], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fluxtrain image {path}: {r.stderr}")
    return load_file(out)["rgb"]


def check(name, got, want, max_diff=1, mean_diff=None):
    want = np.asarray(want)
    if got.shape != want.shape:
        failures.append(f"{name}: shape {got.shape} vs Pillow {want.shape}")
        print(f"{name}: shape {got.shape} vs {want.shape}  FAIL")
        return
    d = np.abs(got.astype(np.int32) - want.astype(np.int32))
    ok = d.max() <= max_diff and (mean_diff is None or d.mean() <= mean_diff)
    print(f"{name}: max |diff| {d.max()}, mean {d.mean():.3f}  {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(f"{name}: max {d.max()} mean {d.mean():.3f}")


def test_image(h=53, w=71, seed=0):
    """Smooth gradients plus noise, asymmetric (orientation errors show)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + 2 * y) % 256], -1).astype(np.int32)
    img += rng.integers(-20, 21, img.shape)
    img[:10, :20] = [255, 0, 0]  # a red block in the top-left corner
    return np.clip(img, 0, 255).astype(np.uint8)


def png16_rgb(path, arr16):
    """A 16-bit RGB PNG written by hand (Pillow cannot write RGB;16)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[r].astype(">u2").tobytes() for r in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    open(path, "wb").write(data)


def on_white(im):
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def main():
    base = test_image()
    with tempfile.TemporaryDirectory() as tmp:
        p = lambda n: os.path.join(tmp, n)  # noqa: E731
        im = Image.fromarray(base)
        im.save(p("rgb8.png"))
        check("png 8-bit rgb", decode(p("rgb8.png")), Image.open(p("rgb8.png")).convert("RGB"), 0)

        rng = np.random.default_rng(1)
        a16 = (base.astype(np.uint16) * 257 + rng.integers(0, 257, base.shape)).astype(np.uint16)
        png16_rgb(p("rgb16.png"), a16)
        check("png 16-bit rgb", decode(p("rgb16.png")), Image.open(p("rgb16.png")).convert("RGB"))

        g16 = a16[..., 1]
        Image.fromarray(g16).save(p("grey16.png"))
        ref = (np.asarray(Image.open(p("grey16.png"))).astype(np.uint32) >> 8).astype(np.uint8)
        check("png 16-bit grey", decode(p("grey16.png")), np.repeat(ref[..., None], 3, -1))

        im.convert("L").save(p("grey8.png"))
        check("png 8-bit grey", decode(p("grey8.png")), Image.open(p("grey8.png")).convert("RGB"), 0)

        im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(p("palette.png"))
        check("png palette", decode(p("palette.png")), Image.open(p("palette.png")).convert("RGB"), 0)

        alpha = np.clip(np.mgrid[0:base.shape[0], 0:base.shape[1]][1] * 4, 0, 255).astype(np.uint8)
        Image.fromarray(np.dstack([base, alpha])).save(p("rgba.png"))
        check("png rgba on white", decode(p("rgba.png")), on_white(Image.open(p("rgba.png"))))
        Image.fromarray(np.dstack([base[..., 0], alpha]), "LA").save(p("la.png"))
        check("png grey+alpha on white", decode(p("la.png")), on_white(Image.open(p("la.png"))))

        for o in range(1, 9):
            exif = Image.Exif()
            exif[0x0112] = o
            im.save(p(f"o{o}.jpg"), quality=95, exif=exif.tobytes())
            want = ImageOps.exif_transpose(Image.open(p(f"o{o}.jpg"))).convert("RGB")
            check(f"jpeg exif orientation {o}", decode(p(f"o{o}.jpg")), want)

        # An embedded ICC profile is converted to sRGB: an sRGB profile changes (almost) nothing.
        from PIL import ImageCms
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        im.save(p("icc.png"), icc_profile=srgb)
        check("png with embedded sRGB ICC", decode(p("icc.png")), base, 2)

        im.save(p("lossless.webp"), lossless=True)
        check("webp lossless", decode(p("lossless.webp")), Image.open(p("lossless.webp")).convert("RGB"), 0)
        im.save(p("lossy.webp"), quality=90)
        check("webp lossy", decode(p("lossy.webp")), Image.open(p("lossy.webp")).convert("RGB"))
        im.save(p("rgb.tiff"))
        check("tiff", decode(p("rgb.tiff")), Image.open(p("rgb.tiff")).convert("RGB"), 0)

        # Resizing: Pillow's BILINEAR (antialiased when shrinking), shrink and enlarge.
        big = Image.fromarray(test_image(211, 157, 3))
        big.save(p("big.png"))
        for w, h in ((64, 48), (40, 90), (300, 260)):
            got = decode(p("big.png"), "--resize", f"{w},{h}")
            check(f"resize bilinear {big.size} -> {(w, h)}", got, big.resize((w, h), Image.BILINEAR), 2, 0.5)
        sq = Image.fromarray(test_image(120, 160, 4))
        sq.save(p("sq.png"))
        check("resize area 160x120 -> 40x30", decode(p("sq.png"), "--resize", "40,30", "--filter", "area"),
              sq.resize((40, 30), Image.BOX))

        # PNG writing round-trips exactly.
        subprocess.run([BIN, "image", "--input", p("o6.jpg"), "--png", p("out.png")], check=True,
                       capture_output=True)
        check("png write round trip", np.asarray(Image.open(p("out.png")).convert("RGB")), decode(p("o6.jpg")), 0)

        # Bad files: one line naming the file, exit 2.
        data = open(p("rgb8.png"), "rb").read()
        open(p("trunc.png"), "wb").write(data[: len(data) // 2])
        open(p("text.png"), "w").write("not an image\n")
        for bad in ("trunc.png", "text.png", "missing.png"):
            r = subprocess.run([BIN, "image", "--input", p(bad), "--output", p("x.st")], capture_output=True, text=True)
            ok = r.returncode == 2 and p(bad) in r.stderr and r.stderr.count("\n") == 1
            print(f"bad file {bad}: rc {r.returncode}: {r.stderr.strip()}  {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"bad file {bad}: rc {r.returncode} {r.stderr!r}")

    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
