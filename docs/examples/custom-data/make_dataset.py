"""Write a tiny dataset of one's own in the layouts Perceptio reads (docs/custom-data.md).

    python3 make_dataset.py my-data

16 pictures of three shapes (a circle, a square, a triangle; colours and order vary), each shape
at its own distance from the camera, written as:

    my-data/images/shapes_0000.jpg ...          the pictures (data.coco_images=images)
    my-data/depth/shapes_0000.npy ...           true depth, metres, float32 [H, W] (fits the teacher)
    my-data/shapes/instances.json               COCO instances: images, annotations, categories
    my-data/shapes/refs(unc).p                  REFER refs: one per shape, two sentences each
    my-data/conversations.json                  LLaVA-format conversations (data.llava_json)
    my-data/grounded.json                       GLaMM GCG-format grounded captions (data.glamm_json)

Images 0-11 are the train split, 12-15 the val split.
"""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

W, H = 96, 64
N_IMAGES, N_TRAIN = 16, 12
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220)}
SHAPES = ["circle", "square", "triangle"]
PLACES = ["on the left", "in the middle", "on the right"]  # one shape in each third of the picture


def outline(shape, cx, cy, r):
    """The shape's outline as [x1, y1, x2, y2, ...] (a COCO polygon), or its box for a circle."""
    if shape == "circle":
        return [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        return [cx - r, cy - r, cx + r, cy - r, cx + r, cy + r, cx - r, cy + r]
    return [cx, cy - r, cx + r, cy + r, cx - r, cy + r]  # triangle


def rle(mask):
    """A boolean mask [H, W] as COCO compressed RLE with plain-string counts (JSON-able)."""
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(enc["size"][0]), int(enc["size"][1])], "counts": enc["counts"].decode("ascii")}


def main(out):
    out = Path(out)
    for sub in ("images", "depth", "shapes"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    images, annotations, refs, conversations, grounded = [], [], [], [], []
    for i in range(N_IMAGES):
        rng = np.random.default_rng(i)
        shapes = [SHAPES[k] for k in rng.permutation(3)]
        colours = [list(COLOURS)[k] for k in rng.permutation(3)]
        file_name = f"shapes_{i:04d}.jpg"
        # a grey floor going away towards the top (10 m) from the bottom (3 m)
        depth = np.repeat(np.linspace(10.0, 3.0, H, dtype=np.float32)[:, None], W, axis=1)
        picture = Image.new("RGB", (W, H), (150, 150, 150))
        draw = ImageDraw.Draw(picture)
        split = "train" if i < N_TRAIN else "val"
        found = []
        for j, (shape, colour) in enumerate(zip(shapes, colours)):
            cx, cy, r = 16 + 32 * j, int(rng.integers(24, 40)), int(rng.integers(9, 13))
            points = outline(shape, cx, cy, r)
            label = Image.new("L", (W, H), 0)
            if shape == "circle":
                draw.ellipse(points, fill=COLOURS[colour])
                ImageDraw.Draw(label).ellipse(points, fill=1)
            else:
                draw.polygon(points, fill=COLOURS[colour])
                ImageDraw.Draw(label).polygon(points, fill=1)
            mask = np.asarray(label) > 0
            depth[mask] = float(rng.uniform(1.5, 2.5)) + j  # the further right, the further away
            ys, xs = np.nonzero(mask)
            ann_id = 100 * i + j + 1
            annotations.append({
                "id": ann_id, "image_id": i + 1, "category_id": SHAPES.index(shape) + 1, "iscrowd": 0,
                "area": int(mask.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                # polygons for the square and the triangle, RLE for the circle: COCO allows both
                "segmentation": rle(mask) if shape == "circle" else [[float(v) for v in points]],
                "attributes": {"colour": colour},  # optional: the answer then names the colour
            })
            sentences = [f"the {colour} {shape}", f"the {shape} {PLACES[j]}"]
            sent_ids = [10 * ann_id + k for k in range(len(sentences))]
            refs.append({
                "ref_id": ann_id, "ann_id": ann_id, "image_id": i + 1, "split": split,
                "category_id": SHAPES.index(shape) + 1, "file_name": file_name, "sent_ids": sent_ids,
                "sentences": [{"sent_id": s, "sent": t, "raw": t.capitalize(), "tokens": t.split()}
                              for s, t in zip(sent_ids, sentences)],
            })
            found.append((f"a {colour} {shape}", mask))
        picture.save(out / "images" / file_name, quality=95)
        np.save(out / "depth" / f"shapes_{i:04d}.npy", depth)
        images.append({"id": i + 1, "file_name": file_name, "width": W, "height": H})
        if split == "train":
            conversations.append({"id": f"shapes-{i}", "image": f"images/{file_name}", "conversations": [
                {"from": "human", "value": "<image>\nWhich shape is on the left?"},
                {"from": "gpt", "value": f"The {shapes[0]}."},
                {"from": "human", "value": "And which shape is nearest to the camera?"},
                {"from": "gpt", "value": f"The {shapes[0]} on the left."},
            ]})
            phrases = [found[0][0].capitalize(), found[1][0]]  # each grounded phrase with its mask
            caption = f"{phrases[0]} beside {phrases[1]}."
            grounded.append({"file_name": f"images/{file_name}", "caption": caption, "groundings": {
                p: {"token_positives": [caption.find(p), caption.find(p) + len(p)], "rle_masks": [rle(m)]}
                for p, (_, m) in zip(phrases, found)
            }})
    conversations.append({"id": "text-only", "conversations": [  # no image: a text-only sample
        {"from": "human", "value": "How many corners has a triangle?"}, {"from": "gpt", "value": "Three."}]})
    categories = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    (out / "shapes" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    with open(out / "shapes" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # plain lists, dicts, str and int only (numpy types are refused)
    (out / "conversations.json").write_text(json.dumps(conversations, indent=1))
    (out / "grounded.json").write_text(json.dumps(grounded, indent=1))
    print(f"{out}: {len(images)} images, {len(refs)} refs "
          f"({sum(r['split'] == 'train' for r in refs)} train, {sum(r['split'] == 'val' for r in refs)} val), "
          f"{len(conversations)} conversations, {len(grounded)} grounded captions")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "my-data")
