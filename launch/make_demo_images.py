"""Writes a tiny EasyControl-style image dataset for the quickstart: target pictures of coloured
shapes, a subject picture for each (the shape alone), and the jsonl that `fluxtrain prepare`
reads ({"source": ..., "caption": ..., "target": ...} with the subject under "subject").
Usage: python make_demo_images.py OUT_DIR [COUNT]"""
import json
import os
import random
import sys

from PIL import Image, ImageDraw

out = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 16
os.makedirs(out, exist_ok=True)
rng = random.Random(0)
colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
shapes = ["circle", "square"]
with open(os.path.join(out, "data.jsonl"), "w") as f:
    for i in range(count):
        name, rgb = rng.choice(list(colours.items()))
        shape = rng.choice(shapes)
        size = rng.choice([(128, 128), (160, 96), (96, 160)])
        bg = tuple(rng.randint(200, 255) for _ in range(3))
        img = Image.new("RGB", size, bg)
        d = ImageDraw.Draw(img)
        w, h = size
        r = rng.randint(20, 40)
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        box = [cx - r, cy - r, cx + r, cy + r]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=rgb)
        img.save(os.path.join(out, f"target_{i}.png"))
        subj = Image.new("RGB", (64, 64), (255, 255, 255))
        ds = ImageDraw.Draw(subj)
        (ds.ellipse if shape == "circle" else ds.rectangle)([12, 12, 52, 52], fill=rgb)
        subj.save(os.path.join(out, f"subject_{i}.png"))
        f.write(json.dumps({"target": f"target_{i}.png", "subject": f"subject_{i}.png",
                            "caption": f"a {name} {shape} on a pale background"}) + "\n")
print(os.path.join(out, "data.jsonl"))
