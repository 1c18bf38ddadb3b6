"""Demo-PEDES: a generated stand-in for CUHK-PEDES (procedural pedestrians with natural-language captions).

It lets training, testing and the retrieval demo run end to end without real data or pretrained weights. Each
identity has fixed attributes (gender, hair, upper and lower garment with colours, shoes, bag); each of its
images varies pose, view, scale, position, background and lighting; each image gets two captions built from
varied templates that name a subset of the attributes (plus sometimes the view of that image).
The files follow the CUHK-PEDES layout (SPEC section 2): `imgs/<split>/<id:04d>_<k>.jpg` and `reid_raw.json`,
plus `generator.json`, the seed and sizes that made them. Everything is a function of the seed: the same seed
gives byte-identical files. The set of seed 0 lives in `<root>/Demo-PEDES`, that of seed N in
`<root>/Demo-PEDES_seed<N>`, so that runs with different seeds never share (or silently reuse) one set.

    python -m datasets.demo_pedes --root_dir ./data [--seed 0] [--force]
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from datasets import demo_render
from utils.cli import command, integer, parse_command_line
from utils.errors import UserError, short_repr

DATASET_NAME = "Demo-PEDES"
ANNOTATION_FILE = "reid_raw.json"
GENERATOR_FILE = "generator.json"
JPEG_QUALITY = 90

GARMENT_COLOURS = tuple(demo_render.COLOURS)
HAIR_COLOURS = tuple(demo_render.HAIR_COLOURS)
UPPER_KINDS = {"man": ("t-shirt", "shirt", "jacket", "coat", "sweater", "hoodie", "tank top"),
               "woman": ("t-shirt", "shirt", "jacket", "coat", "sweater", "hoodie", "tank top", "dress")}
PATTERNED_KINDS = ("t-shirt", "shirt", "sweater", "dress")
LOWER_KINDS = {"man": ("trousers", "jeans", "shorts"), "woman": ("trousers", "jeans", "shorts", "skirt")}
JEANS_COLOURS = ("blue", "black", "grey", "white")
SHOE_COLOURS = ("black", "white", "brown", "grey", "red", "blue")
BAGS = (None, "backpack", "handbag", "shoulder bag")
VIEWS = ("front", "back", "left", "right")


@dataclass(frozen=True)
class Identity:
    """The fixed attributes of one generated person (colour values are keys of `demo_render.COLOURS`)."""

    pid: int
    gender: str
    skin: int
    hair: str
    upper: str
    upper_colour: str
    pattern: str
    lower: Optional[str]  # None when the upper garment is a dress
    lower_colour: Optional[str]
    shoes: str
    bag: Optional[str]
    bag_colour: Optional[str]

    def colours(self) -> set:
        """Every colour word that is true of this person (garments, shoes, bag, hair)."""
        return {c for c in (self.hair, self.upper_colour, self.lower_colour, self.shoes, self.bag_colour) if c}


@dataclass(frozen=True)
class Pose:
    """What varies between the images of one identity."""

    view: str  # front, back, left, right (the side the person faces, in the image)
    stride: float  # 0 standing .. 1 long step
    arm_swing: float  # -1 .. 1
    scale: float  # person height / image height
    top: float  # 0 .. 1: vertical position within the free space
    shift: float  # horizontal offset of the body axis, in image widths
    bag_hand: float  # sign picks the hand holding a handbag / the hip of a shoulder bag
    brightness: float
    contrast: float
    cast: Tuple[float, float, float]


def _rng(seed: int, pid: int, stream: int, k: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, pid, stream, k])


def _pick(rng: np.random.Generator, options: Sequence, p: Optional[Sequence[float]] = None):
    return options[int(rng.choice(len(options), p=p))]


def sample_identity(seed: int, pid: int) -> Identity:
    """The attributes of identity `pid` in the set generated with `seed` (sampled independently per person)."""
    rng = _rng(seed, pid, 0)
    gender = _pick(rng, ("woman", "man"))
    upper = _pick(rng, UPPER_KINDS[gender])
    pattern = _pick(rng, ("plain", "striped", "checked"), (0.6, 0.25, 0.15)) if upper in PATTERNED_KINDS \
        else "plain"
    lower, lower_colour = None, None
    if upper != "dress":
        # A knee-length coat would hide shorts or a skirt, and the caption would name something unseen.
        kinds = ("trousers", "jeans") if upper == "coat" else LOWER_KINDS[gender]
        lower = _pick(rng, kinds)
        lower_colour = _pick(rng, JEANS_COLOURS if lower == "jeans" else GARMENT_COLOURS)
    bag = _pick(rng, BAGS, (0.3, 0.25, 0.2, 0.25))
    return Identity(pid=pid, gender=gender, skin=int(rng.integers(len(demo_render.SKIN_TONES))),
                    hair=_pick(rng, HAIR_COLOURS, (0.4, 0.3, 0.2, 0.1)), upper=upper,
                    upper_colour=_pick(rng, GARMENT_COLOURS), pattern=pattern, lower=lower,
                    lower_colour=lower_colour, shoes=_pick(rng, SHOE_COLOURS), bag=bag,
                    bag_colour=_pick(rng, GARMENT_COLOURS) if bag else None)


def sample_pose(rng: np.random.Generator, image_size: Tuple[int, int]) -> Pose:
    """A random pose and lighting; the horizontal shift is bounded so that the person stays in the frame."""
    scale = float(rng.uniform(0.8, 0.93))
    half_width = 0.17 * scale * image_size[0] / image_size[1]  # widest reach (arms, bags), in image widths
    room = max(0.0, 0.5 - half_width - 0.02)
    return Pose(view=_pick(rng, VIEWS, (0.4, 0.25, 0.175, 0.175)), stride=float(rng.uniform(0, 1)),
                arm_swing=float(rng.uniform(-1, 1)), scale=scale, top=float(rng.uniform(0, 1)),
                shift=float(rng.uniform(-room, room)), bag_hand=float(rng.uniform(-1, 1)),
                brightness=float(rng.uniform(0.88, 1.12)), contrast=float(rng.uniform(0.85, 1.1)),
                cast=tuple(float(c) for c in rng.uniform(0.95, 1.05, 3)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- captions
SUBJECTS = {"woman": ("woman", "young woman", "lady", "young lady", "girl", "female pedestrian"),
            "man": ("man", "young man", "guy", "gentleman", "male pedestrian", "boy")}
UPPER_NOUNS = {"t-shirt": ("t-shirt", "tee", "short-sleeved t-shirt", "t-shirt"),
               "shirt": ("shirt", "long-sleeved shirt", "button-up shirt", "collared shirt"),
               "jacket": ("jacket", "zip-up jacket", "jacket"), "coat": ("coat", "long coat", "knee-length coat"),
               "sweater": ("sweater", "jumper", "pullover"), "hoodie": ("hoodie", "hooded sweatshirt", "hoodie"),
               "tank top": ("tank top", "sleeveless top"), "dress": ("dress", "sleeveless dress", "dress")}
PATTERN_WORDS = {"plain": ("",), "striped": ("striped",), "checked": ("checked", "plaid", "checkered")}
LOWER_NOUNS = {"trousers": ("trousers", "pants", "slacks"), "jeans": ("jeans", "denim jeans"),
               "shorts": ("shorts",), "skirt": ("skirt", "skirt", "knee-length skirt")}
SHOE_NOUNS = ("shoes", "sneakers", "trainers", "shoes")
BAG_NOUNS = {"backpack": ("backpack", "rucksack", "backpack"), "handbag": ("handbag", "purse", "handbag"),
             "shoulder bag": ("shoulder bag", "crossbody bag", "shoulder bag")}
VIEW_PHRASES = {"front": ("facing the camera", "walking towards the camera"),
                "back": ("seen from the back", "walking away from the camera", "with {poss} back to the camera"),
                "left": ("walking to the left", "facing left", "heading left"),
                "right": ("walking to the right", "facing right", "heading right")}
WEAR_VERBS = ("in", "wearing", "dressed in", "is wearing", "wears", "walks in", "is walking in")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: List[str], rng: np.random.Generator) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2 and rng.random() < 0.25:
        return f"{items[0]} with {items[1]}"
    comma = "," if len(items) > 2 and rng.random() < 0.3 else ""
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


def _phrases(p: Identity, rng: np.random.Generator) -> Dict[str, str]:
    pattern = _pick(rng, PATTERN_WORDS[p.pattern])
    words = [p.upper_colour, pattern] if rng.random() < 0.7 else [pattern, p.upper_colour]
    upper = _article(" ".join(w for w in words + [_pick(rng, UPPER_NOUNS[p.upper])] if w))
    out = {"upper": upper, "hair": f"{'long' if p.gender == 'woman' else 'short'} {p.hair} hair",
           "shoes": ("a pair of " if rng.random() < 0.2 else "") + f"{p.shoes} {_pick(rng, SHOE_NOUNS)}"}
    if p.lower:
        noun = f"{p.lower_colour} {_pick(rng, LOWER_NOUNS[p.lower])}"
        out["lower"] = _article(noun) if p.lower == "skirt" else ("a pair of " if rng.random() < 0.2 else "") + noun
    if p.bag:
        out["bag"] = _article(f"{p.bag_colour} {_pick(rng, BAG_NOUNS[p.bag])}")
    return out


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _one_caption(p: Identity, pose: Pose, rng: np.random.Generator) -> str:
    ph = _phrases(p, rng)
    she, poss = ("she", "her") if p.gender == "woman" else ("he", "his")
    chosen = [k for k, prob in (("upper", 0.92), ("lower", 0.9), ("hair", 0.45), ("shoes", 0.45),
                                ("bag", 0.7), ("view", 0.3)) if (k in ph or k == "view") and rng.random() < prob]
    optional = [k for k in ("upper", "lower", "hair", "shoes", "bag") if k in ph and k not in chosen]
    rng.shuffle(optional)
    while len([k for k in chosen if k != "view"]) < 3 and optional:  # three attributes besides the gender
        chosen.append(optional.pop())
    view = _pick(rng, VIEW_PHRASES[pose.view]).format(poss=poss) if "view" in chosen else None

    subject = _pick(rng, SUBJECTS[p.gender])
    subject = (_article(subject) if rng.random() < 0.6 else "the " + subject) if rng.random() < 0.85 \
        else "this " + subject
    clothes = [ph[k] for k in ("upper", "lower", "shoes") if k in chosen]
    if len(clothes) > 1 and rng.random() < 0.25:
        clothes[0], clothes[1] = clothes[1], clothes[0]
    later: List[str] = []
    if len(clothes) == 3 and rng.random() < 0.3:  # shoes told in a sentence of their own
        later.append(_pick(rng, (f"{she} wears {clothes[2]}", f"{poss} shoes are {p.shoes}",
                                 f"{she} has {clothes[2]} on")))
        clothes = clothes[:2]
    first = subject
    if "hair" in chosen and rng.random() < 0.5:
        first += f" with {ph['hair']}"
    elif "hair" in chosen:
        later.append(_pick(rng, (f"{she} has {ph['hair']}", f"{poss} hair is {ph['hair'].split()[0]} and {p.hair}")))
    if clothes:
        verbs = WEAR_VERBS if view is None else tuple(v for v in WEAR_VERBS if "walk" not in v)
        first += f" {_pick(rng, verbs)} {_join(clothes, rng)}"
    if "bag" in chosen:
        backpack = p.bag == "backpack"
        if rng.random() < 0.5:
            first += ", " + _pick(rng, (f"carrying {ph['bag']}", f"with {ph['bag']}") + (
                (f"{ph['bag']} on {poss} back",) if backpack else ()))
        else:
            later.append(_pick(rng, (f"{she} is carrying {ph['bag']}", f"{she} carries {ph['bag']}",
                                     f"{she} has {ph['bag']}" + (f" on {poss} back" if backpack else ""))))
    if view and rng.random() < 0.5:
        first = f"{view}, {first}" if rng.random() < 0.3 and view.startswith(("seen", "walking")) \
            else f"{first}, {view}"
    elif view:
        later.append(f"{she} is {view}" if not view.startswith("with") else f"{poss} back is to the camera")
    rng.shuffle(later)
    return " ".join(_sentence(s) for s in [first] + later)


def make_captions(person: Identity, pose: Pose, rng: np.random.Generator) -> List[str]:
    """Two different captions of one image of `person`."""
    first = _one_caption(person, pose, rng)
    for _ in range(50):
        second = _one_caption(person, pose, rng)
        if second != first:
            return [first, second]
    raise RuntimeError(f"could not vary the caption of identity {person.pid}")


def tokenize_caption(caption: str) -> List[str]:
    """Lower-cased word tokens, punctuation dropped, hyphenated words kept whole ("t-shirt")."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", caption.lower())


# ----------------------------------------------------------------------------------------------- folders
def folder_name(seed: int) -> str:
    """The folder under the data root that holds the set of `seed` (seed 0 keeps the original name)."""
    if type(seed) is not int or seed < 0:
        raise UserError(f"demo_seed = {short_repr(seed)}; expected a non-negative integer")
    return DATASET_NAME if seed == 0 else f"{DATASET_NAME}_seed{seed}"


def recorded_seed(dataset_dir: str) -> int:
    """The seed named by the folder's generator.json; 0 for a folder generated before that record existed."""
    path = os.path.join(dataset_dir, GENERATOR_FILE)
    try:
        with open(path, "r", encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return 0  # every set generated before the record was written came from the default seed
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: cannot be read as the Demo-PEDES generation record "
                        f"({type(e).__name__}); delete {dataset_dir} to regenerate it") from None
    seed = record.get("seed") if isinstance(record, dict) else None
    if type(seed) is not int:
        raise UserError(f"{path}: expected a mapping with an integer 'seed', got {short_repr(record)}; "
                        f"delete {dataset_dir} to regenerate it")
    return seed


def check_generated(dataset_dir: str, seed: int) -> None:
    """Refuse a generated folder that another seed made (configs.yaml would name a set it did not train on)."""
    made_by = recorded_seed(dataset_dir)
    if made_by != seed:
        raise UserError(f"{dataset_dir} holds Demo-PEDES generated with demo_seed {made_by} (see "
                        f"{os.path.join(dataset_dir, GENERATOR_FILE)}), not {seed}; delete the folder to "
                        f"regenerate it with seed {seed}")


# ----------------------------------------------------------------------------------------------- writing
def _make_identity(seed: int, pid: int, split: str, images_per_id: int, image_size: Tuple[int, int],
                   out_dir: str) -> List[dict]:
    person = sample_identity(seed, pid)
    entries = []
    for k in range(images_per_id):
        image_rng, caption_rng = _rng(seed, pid, 1, k), _rng(seed, pid, 2, k)
        pose = sample_pose(image_rng, image_size)
        image = demo_render.render_pedestrian(person, pose, image_size, image_rng)
        rel = f"{split}/{pid:04d}_{k}.jpg"
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        with open(os.path.join(out_dir, "imgs", rel), "wb") as f:
            f.write(buf.getvalue())
        captions = make_captions(person, pose, caption_rng)
        entries.append({"split": split, "captions": captions, "file_path": rel,
                        "processed_tokens": [tokenize_caption(c) for c in captions], "id": pid})
    return entries


def generate_demo_pedes(dataset_dir: str, seed: int = 0, num_train_ids: int = 600, num_val_ids: int = 100,
                        num_test_ids: int = 200, images_per_id: int = 4,
                        image_size: Tuple[int, int] = (192, 64)) -> None:
    """Write the Demo-PEDES set into `dataset_dir` (CUHK-PEDES layout), deterministically from `seed`.

    600 training identities rather than the 300 the spec asks at least: a model trained from scratch in the
    demo's 10 minutes generalised much better from more identities than from more passes over fewer (val R1
    59 after 10 epochs over 600, against 44 at best over 22 epochs of 300).
    Ids start at 1: train ids first, then val, then test. The set is written into a temporary sibling folder
    that is renamed into place at the end, so an interrupted run never leaves a half-written set. An existing
    `dataset_dir` is replaced only if it is empty or holds a `reid_raw.json` (a previous generation). The seed and
    sizes are recorded in `generator.json`, which loading checks (`check_generated`).
    """
    folder_name(seed)  # a bad seed is a one-line error here, not a numpy traceback after the set was started
    for name, value in (("num_train_ids", num_train_ids), ("num_val_ids", num_val_ids),
                        ("num_test_ids", num_test_ids), ("images_per_id", images_per_id)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"generate_demo_pedes: {name} = {value!r}; expected a positive integer")
    if len(image_size) != 2 or min(image_size) < 16:
        raise UserError(f"generate_demo_pedes: image_size = {image_size!r}; expected (height, width), each >= 16")
    target = os.path.abspath(dataset_dir)
    if os.path.exists(target) and not (os.path.isdir(target) and (
            not os.listdir(target) or os.path.isfile(os.path.join(target, ANNOTATION_FILE)))):
        raise UserError(f"{target} exists and is not a Demo-PEDES folder (no {ANNOTATION_FILE}); "
                        "expected a new or previously generated folder")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    try:
        splits = ["train"] * num_train_ids + ["val"] * num_val_ids + ["test"] * num_test_ids
        for split in ("train", "val", "test"):
            os.makedirs(os.path.join(tmp, "imgs", split))
        entries = []
        for pid, split in enumerate(splits, start=1):
            entries.extend(_make_identity(seed, pid, split, images_per_id, tuple(image_size), tmp))
        with open(os.path.join(tmp, ANNOTATION_FILE), "w", encoding="utf-8") as f:
            json.dump(entries, f)
        record = {"generator": "datasets/demo_pedes.py", "seed": seed, "num_train_ids": num_train_ids,
                  "num_val_ids": num_val_ids, "num_test_ids": num_test_ids, "images_per_id": images_per_id,
                  "image_size": list(image_size)}
        with open(os.path.join(tmp, GENERATOR_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the set is ordinary data
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rename(target, os.path.join(old, "set"))
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


COMMAND = command("python -m datasets.demo_pedes", "Generate the Demo-PEDES data set.", options=False)
COMMAND.add_argument("--root_dir", default="./data", help="folder that receives Demo-PEDES/")
COMMAND.add_argument("--seed", type=integer, default=0,
                     help="generation seed (same seed, same files); seed N > 0 writes Demo-PEDES_seed<N>/")
COMMAND.add_argument("--force", action="store_true", help="regenerate even if the folder exists")


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: write <root_dir>/Demo-PEDES (seed N: Demo-PEDES_seed<N>) unless it exists (`--force`
    regenerates)."""
    start = time.perf_counter()
    try:
        args = parse_command_line(COMMAND, argv)
        target = os.path.join(args.root_dir, folder_name(args.seed))
        if os.path.exists(target) and not args.force:
            if os.path.isfile(os.path.join(target, ANNOTATION_FILE)):
                check_generated(target, args.seed)
            print(f"{target} already exists; nothing done (use --force to regenerate).")
            return 0
        generate_demo_pedes(target, seed=args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    print(f"wrote {target} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
