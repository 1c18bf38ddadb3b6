"""Drawing of the procedural pedestrians of Demo-PEDES (attributes and poses come from datasets/demo_pedes.py).

A figure is drawn at 2x the output size from flat shapes, one mask per garment, so that a pattern fills exactly
the garment and every garment gets a darker outline; the result is downscaled (anti-aliasing), lit and
lightly noised. Geometry is in "person units": x = 0 at the body axis, y = 0 at the top of the head, 1 at the
soles. Colours are saturated and parts are large on purpose: the set must stay readable at 96x32 pixels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

if TYPE_CHECKING:
    from datasets.demo_pedes import Identity, Pose

RGB = Tuple[int, int, int]

COLOURS: Dict[str, RGB] = {
    "red": (205, 30, 35), "blue": (35, 75, 210), "green": (35, 150, 60), "yellow": (245, 210, 35),
    "black": (30, 30, 32), "white": (240, 240, 238), "grey": (130, 130, 132), "orange": (245, 125, 25),
    "purple": (125, 45, 170), "pink": (250, 145, 195), "brown": (115, 72, 38),
}
HAIR_COLOURS: Dict[str, RGB] = {"black": (22, 20, 20), "brown": (100, 62, 30), "blonde": (230, 195, 115),
                                "grey": (170, 170, 170)}
SKIN_TONES: List[RGB] = [(243, 208, 180), (226, 178, 140), (196, 142, 102), (150, 102, 70), (100, 66, 45)]

SUPERSAMPLE = 2
HEAD_CY, HEAD_RX, HEAD_RY = 0.075, 0.05, 0.066
SHOULDER_Y, WAIST_Y, HIP_Y, KNEE_Y, ANKLE_Y = 0.17, 0.36, 0.49, 0.72, 0.935
# Half widths of shoulders, waist and hips.
BUILD = {"man": (0.115, 0.09, 0.095), "woman": (0.1, 0.075, 0.1)}
HEMS = {"t-shirt": 0.5, "shirt": 0.51, "jacket": 0.52, "coat": 0.74, "sweater": 0.5, "hoodie": 0.51,
        "tank top": 0.5, "dress": 0.7}
LONG_SLEEVES = {"shirt", "jacket", "coat", "sweater", "hoodie"}


def shade(colour: RGB, factor: float) -> RGB:
    """Darker (factor < 1) or lighter (factor > 1, towards white) version of a colour."""
    if factor <= 1:
        return tuple(int(c * factor) for c in colour)  # type: ignore[return-value]
    t = min(factor - 1.0, 1.0)
    return tuple(int(c + (255 - c) * t) for c in colour)  # type: ignore[return-value]


def _outline_of(colour: RGB) -> RGB:
    # A black garment needs a lighter edge, not a darker one, to keep its shape readable.
    return shade(colour, 1.35) if sum(colour) < 120 else shade(colour, 0.6)


class _Figure:
    """Maps person units to canvas pixels and paints masks; facing left mirrors the canonical right view."""

    def __init__(self, canvas: Image.Image, pose: "Pose", width: int, height: int):
        self.canvas = canvas
        self.hp = pose.scale * height
        self.top = pose.top * (0.98 * height - self.hp) + 0.01 * height  # feet stay inside the frame
        self.cx = width / 2 + pose.shift * width
        self.squash = 0.86 if pose.view in ("left", "right") else 1.0
        self.mirror = -1.0 if pose.view in ("left", "back") else 1.0

    def pt(self, x: float, y: float) -> Tuple[float, float]:
        return self.cx + self.mirror * x * self.squash * self.hp, self.top + y * self.hp

    def new(self) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
        mask = Image.new("L", self.canvas.size, 0)
        return mask, ImageDraw.Draw(mask)

    def poly(self, draw: ImageDraw.ImageDraw, points: List[Tuple[float, float]]) -> None:
        draw.polygon([self.pt(x, y) for x, y in points], fill=255)

    def ellipse(self, draw: ImageDraw.ImageDraw, x: float, y: float, rx: float, ry: float) -> None:
        (x0, y0), (x1, y1) = self.pt(x - rx, y - ry), self.pt(x + rx, y + ry)
        draw.ellipse([min(x0, x1), y0, max(x0, x1), y1], fill=255)

    def limb(self, draw: ImageDraw.ImageDraw, joints: List[Tuple[float, float]], w0: float, w1: float) -> None:
        """A tapering limb through `joints` (half width w0 at the first joint, w1 at the last), round joints."""
        n = len(joints) - 1
        for i in range(n):
            (xa, ya), (xb, yb) = joints[i], joints[i + 1]
            wa, wb = w0 + (w1 - w0) * i / n, w0 + (w1 - w0) * (i + 1) / n
            dx, dy = xb - xa, yb - ya
            norm = max((dx * dx + dy * dy) ** 0.5, 1e-6)
            nx, ny = -dy / norm, dx / norm
            self.poly(draw, [(xa + nx * wa, ya + ny * wa), (xb + nx * wb, yb + ny * wb),
                             (xb - nx * wb, yb - ny * wb), (xa - nx * wa, ya - ny * wa)])
            self.ellipse(draw, xb, yb, wb, wb)
        self.ellipse(draw, joints[0][0], joints[0][1], w0, w0)

    def paint(self, mask: Image.Image, fill, outline: RGB | None = None) -> None:
        bbox = mask.getbbox()
        if bbox is None:
            return
        # Work on the shape's bounding box only: filtering and pasting the whole canvas dominated the run time.
        bbox = (max(bbox[0] - 1, 0), max(bbox[1] - 1, 0), min(bbox[2] + 1, mask.width), min(bbox[3] + 1, mask.height))
        mask = mask.crop(bbox)
        self.canvas.paste(fill if isinstance(fill, tuple) else fill.crop(bbox), bbox[:2], mask)
        if outline is not None:
            ring = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(3)))
            self.canvas.paste(outline, bbox[:2], ring)


def _pattern_fill(size: Tuple[int, int], colour: RGB, pattern: str, fig: _Figure) -> Image.Image | RGB:
    if pattern == "plain":
        return colour
    second = (35, 35, 38) if sum(colour) > 500 or colour == COLOURS["yellow"] else (242, 242, 240)
    img = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(img)
    period = max(4, int(0.036 * fig.hp))
    if pattern == "striped":
        for y in range(int(fig.top) % period, size[1], period):
            draw.rectangle([0, y, size[0], y + max(1, int(period * 0.38))], fill=second)
    else:  # checked: a coarse two-way grid
        period = int(period * 1.4)
        thick = max(2, int(period * 0.3))
        for v in range(0, max(size), period):
            draw.rectangle([v, 0, v + thick, size[1]], fill=second)
            draw.rectangle([0, v, size[0], v + thick], fill=second)
    return img


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    def muted() -> np.ndarray:
        grey = rng.uniform(80, 200)
        return np.clip(grey + rng.uniform(-25, 25, 3), 0, 255)

    sky_top, sky_bottom, ground = muted(), muted(), muted() * rng.uniform(0.6, 0.9)
    horizon = rng.uniform(0.55, 0.8)
    t = np.linspace(0, 1, height)[:, None]
    upper = sky_top + (sky_bottom - sky_top) * (t / horizon)
    lower = ground * (0.9 + 0.2 * (t - horizon))
    column = np.where(t < horizon, upper, lower)
    img = Image.fromarray(np.repeat(column[:, None, :], width, axis=1).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        base = np.array(img.getpixel((int(rng.integers(width)), int(rng.integers(height)))), float)
        tint = np.clip(base + rng.uniform(-45, 45, 3), 0, 255).astype(int)
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(0, 0.9) * height
        w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.03, 0.4) * height
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(tint))
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h * 0.6], fill=tuple(tint))
        else:  # a pole or a post
            draw.rectangle([x0, y0, x0 + max(2, w * 0.12), height], fill=tuple(tint))
    return img


def _legs(fig: _Figure, pose: "Pose") -> List[List[Tuple[float, float]]]:
    """Hip, knee and ankle of the two legs; side views swing them along x, front/back views barely."""
    s = pose.stride
    if fig.squash < 1:
        ankles, knees = (0.1 * s, -0.08 * s), (0.05 * s, -0.03 * s)
        return [[(0.02, HIP_Y + 0.01), (0.02 + knees[i], KNEE_Y), (ankles[i], ANKLE_Y)] for i in range(2)]
    return [[(sx * 0.05, HIP_Y + 0.01), (sx * (0.05 + 0.006 * s), KNEE_Y),
             (sx * (0.05 + 0.015 * s), ANKLE_Y - (0.012 * s if sx > 0 else 0))] for sx in (-1, 1)]


def _arms(fig: _Figure, pose: "Pose", sw: float) -> List[List[Tuple[float, float]]]:
    a = pose.arm_swing
    if fig.squash < 1:
        return [[(0.0, SHOULDER_Y + 0.015), (sx * 0.04 * a, 0.33), (sx * 0.09 * a, 0.47)] for sx in (-1, 1)]
    return [[(sx * (sw - 0.022), SHOULDER_Y + 0.015), (sx * (sw + 0.004), 0.33),
             (sx * (sw + 0.002 - 0.01 * abs(a)), 0.475 - 0.015 * abs(a) * (sx == 1))] for sx in (-1, 1)]


def render_pedestrian(person: "Identity", pose: "Pose", image_size: Tuple[int, int],
                      rng: np.random.Generator) -> Image.Image:
    """Draw one image of `person` in `pose`; `image_size` is (height, width); `rng` drives the background."""
    height, width = image_size[0] * SUPERSAMPLE, image_size[1] * SUPERSAMPLE
    canvas = _background(rng, width, height)
    fig = _Figure(canvas, pose, width, height)
    sw, ww, hw = BUILD[person.gender]
    skin, hair = SKIN_TONES[person.skin], HAIR_COLOURS[person.hair]
    upper = COLOURS[person.upper_colour]
    back, side = pose.view == "back", fig.squash < 1
    hx = 0.012 if side else 0.0
    legs, arms = _legs(fig, pose), _arms(fig, pose, sw)
    bag = COLOURS[person.bag_colour] if person.bag else None

    if person.bag == "backpack" and not back:  # behind the body: shows above the shoulders or behind the back
        m, d = fig.new()
        if side:
            fig.poly(d, [(-sw - 0.08, 0.19), (-sw + 0.02, 0.18), (-sw + 0.02, 0.43), (-sw - 0.07, 0.43)])
        else:
            fig.poly(d, [(-0.075, 0.145), (0.075, 0.145), (0.08, 0.2), (-0.08, 0.2)])
        fig.paint(m, bag, _outline_of(bag))
    if person.gender == "woman" and not back:
        m, d = fig.new()
        fig.poly(d, [(hx - 0.065, HEAD_CY), (hx + 0.065, HEAD_CY), (hx + 0.07, 0.27), (hx - 0.07, 0.27)])
        fig.paint(m, hair)
    if person.upper == "hoodie" and not back:
        m, d = fig.new()
        fig.ellipse(d, hx, 0.14, 0.078, 0.05)
        fig.paint(m, upper, _outline_of(upper))

    # Legs, shoes and the lower garment.
    m, d = fig.new()
    for leg in legs:
        fig.limb(d, leg, 0.042, 0.024)
    fig.paint(m, skin)
    shoes = COLOURS[person.shoes]
    m, d = fig.new()
    for leg in legs:
        ax = leg[-1][0]
        fig.ellipse(d, ax + (0.018 if side else 0.0), ANKLE_Y + 0.03, 0.045 if side else 0.034, 0.024)
    fig.paint(m, shoes, _outline_of(shoes))
    if person.lower is not None:
        lower = COLOURS[person.lower_colour]
        m, d = fig.new()
        if person.lower == "skirt":
            fig.poly(d, [(-hw, 0.46), (hw, 0.46), (hw + 0.05, 0.66), (-hw - 0.05, 0.66)])
        else:
            fig.poly(d, [(-hw, 0.46), (hw, 0.46), (hw, 0.55), (0, 0.57), (-hw, 0.55)])
            for leg in legs:
                if person.lower == "shorts":
                    (x0, y0), (x1, y1) = leg[0], leg[1]
                    fig.limb(d, [(x0, y0), (x0 + (x1 - x0) * 0.6, y0 + (y1 - y0) * 0.6)], 0.055, 0.048)
                else:
                    fig.limb(d, leg, 0.05, 0.032)
        fig.paint(m, lower, _outline_of(lower))
        if person.lower == "jeans":  # outer seams and turned-up cuffs in a lighter denim tone
            m, d = fig.new()
            for leg, sx in zip(legs, (-1, 1)):
                (x0, y0), (x1, y1), (x2, y2) = leg
                off = sx * 0.03 * (0 if side else 1)
                fig.limb(d, [(x0 + off, y0 + 0.03), (x1 + off, y1), (x2 + off * 0.6, y2 - 0.02)], 0.005, 0.004)
                fig.limb(d, [(x2 - 0.03, y2 - 0.012), (x2 + 0.03, y2 - 0.012)], 0.008, 0.008)
            fig.paint(m, shade(lower, 1.35))

    # Arms (skin) under the upper garment, whose mask covers torso and sleeves.
    m, d = fig.new()
    for arm in arms:
        fig.limb(d, arm, 0.026, 0.019)
        fig.ellipse(d, arm[-1][0], arm[-1][1] + 0.02, 0.022, 0.024)
    fig.poly(d, [(-sw + 0.02, SHOULDER_Y - 0.01), (sw - 0.02, SHOULDER_Y - 0.01), (ww, WAIST_Y), (-ww, WAIST_Y)])
    fig.paint(m, skin)
    hem = HEMS[person.upper]
    flare = {"coat": 0.03, "dress": 0.07}.get(person.upper, 0.0)
    top_w = sw - 0.045 if person.upper in ("tank top", "dress") else sw - 0.015
    m, d = fig.new()
    fig.poly(d, [(-top_w, SHOULDER_Y - 0.008), (top_w, SHOULDER_Y - 0.008), (sw, SHOULDER_Y + 0.02),
                 (ww, WAIST_Y), (hw, HIP_Y), (hw + flare, hem), (-hw - flare, hem), (-hw, HIP_Y),
                 (-ww, WAIST_Y), (-sw, SHOULDER_Y + 0.02)])
    for arm in arms:
        if person.upper in LONG_SLEEVES:
            fig.limb(d, arm, 0.032, 0.024)
        elif person.upper == "t-shirt":
            (x0, y0), (x1, y1) = arm[0], arm[1]
            fig.limb(d, [(x0, y0), (x0 + (x1 - x0) * 0.5, y0 + (y1 - y0) * 0.5)], 0.034, 0.031)
    fig.paint(m, _pattern_fill(canvas.size, upper, person.pattern, fig), _outline_of(upper))
    _garment_details(fig, person, arms, hw, back)

    # Neck, head, hair, face.
    m, d = fig.new()
    fig.poly(d, [(hx - 0.022, 0.11), (hx + 0.022, 0.11), (0.024, SHOULDER_Y), (-0.024, SHOULDER_Y)])
    if person.upper in ("tank top", "dress") and not back:
        fig.poly(d, [(-0.04, SHOULDER_Y - 0.01), (0.04, SHOULDER_Y - 0.01), (0.0, 0.23)])
    fig.ellipse(d, hx, HEAD_CY, HEAD_RX, HEAD_RY)
    fig.paint(m, skin)
    m, d = fig.new()
    (x0, y0), (x1, y1) = fig.pt(hx - HEAD_RX - 0.007, HEAD_CY - HEAD_RY - 0.009), fig.pt(
        hx + HEAD_RX + 0.007, HEAD_CY + HEAD_RY + 0.01)
    box = [min(x0, x1), y0, max(x0, x1), y1]
    if back:
        d.chord(box, 130, 410, fill=255)
    else:
        d.chord(box, 190, 350, fill=255)
        if side:  # hair covers the back of the head
            d.chord(box, 115, 245, fill=255) if fig.mirror > 0 else d.chord(box, 295, 425, fill=255)
    if person.gender == "woman":
        if back:
            fig.poly(d, [(-0.066, HEAD_CY), (0.066, HEAD_CY), (0.072, 0.28), (-0.072, 0.28)])
        else:  # locks falling in front of the shoulders
            for sx in (-1, 1):
                if side and sx > 0:
                    continue
                fig.limb(d, [(hx + sx * 0.047, HEAD_CY - 0.02), (hx + sx * 0.06, 0.25)], 0.016, 0.02)
    fig.paint(m, hair, shade(hair, 0.7) if sum(hair) > 150 else None)
    if not back:
        m, d = fig.new()
        for ex in ((0.015, 0.038) if side else (-0.018, 0.018)):
            fig.ellipse(d, ex, HEAD_CY + 0.008, 0.006, 0.006)
        fig.paint(m, (25, 20, 20))

    if bag is not None:
        _bag(fig, person.bag, bag, pose, arms, sw, hw, back, side)
    return _finish(canvas, pose, image_size, rng)


def _finish(canvas: Image.Image, pose: "Pose", image_size: Tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Downscale, then lighting (brightness, contrast, colour cast within limits) and mild sensor noise."""
    small = canvas.resize((image_size[1], image_size[0]), Image.Resampling.LANCZOS)
    arr = np.asarray(small, dtype=np.float32)
    mean = arr.mean()
    arr = (arr - mean) * pose.contrast + mean * pose.brightness
    arr = arr * np.asarray(pose.cast, dtype=np.float32) + rng.normal(0.0, 3.0, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def _garment_details(fig: _Figure, person: "Identity", arms, hw: float, back: bool) -> None:
    """Collars, buttons, zips, pockets, hems: what tells the upper-garment kinds apart besides the sleeves."""
    colour = COLOURS[person.upper_colour]
    dark, light = _outline_of(colour), shade(colour, 1.4) if sum(colour) < 600 else shade(colour, 0.85)
    kind = person.upper
    m, d = fig.new()
    if kind == "hoodie":
        if back:
            fig.ellipse(d, 0.0, 0.2, 0.07, 0.05)
        else:
            fig.poly(d, [(-0.06, 0.37), (0.06, 0.37), (0.07, 0.46), (-0.07, 0.46)])
        fig.paint(m, shade(colour, 0.8) if sum(colour) > 120 else light, dark)
        if not back:
            m, d = fig.new()
            for sx in (-1, 1):
                fig.limb(d, [(sx * 0.015, 0.17), (sx * 0.017, 0.24)], 0.004, 0.004)
            fig.paint(m, (235, 235, 235) if sum(colour) < 600 else (60, 60, 60))
        return
    if kind == "sweater":  # ribbed hem and cuffs
        fig.poly(d, [(-hw, 0.47), (hw, 0.47), (hw, 0.5), (-hw, 0.5)])
        for arm in arms:
            fig.limb(d, [arm[-1], (arm[-1][0], arm[-1][1] - 0.02)], 0.025, 0.025)
        fig.paint(m, shade(colour, 0.78) if sum(colour) > 120 else light)
        return
    if back:
        return
    if kind in ("shirt", "jacket", "coat"):
        for sx in (-1, 1):  # collar or lapels
            low = 0.3 if kind == "coat" else 0.2
            fig.poly(d, [(sx * 0.012, SHOULDER_Y - 0.012), (sx * 0.05, SHOULDER_Y - 0.01), (sx * 0.005, low)])
        fig.paint(m, light, dark)
        m, d = fig.new()
        if kind == "jacket":
            fig.limb(d, [(0.0, 0.2), (0.0, HEMS[kind])], 0.005, 0.005)
        else:
            step = 0.06 if kind == "coat" else 0.05
            for i, y in enumerate(np.arange(0.22 if kind == "shirt" else 0.33, HEMS[kind] - 0.02, step)):
                for x in ((0.0,) if kind == "shirt" else (-0.03, 0.03)):
                    fig.ellipse(d, x, float(y), 0.006, 0.006)
        if kind == "coat":
            fig.poly(d, [(-0.1, WAIST_Y), (0.1, WAIST_Y), (0.1, WAIST_Y + 0.014), (-0.1, WAIST_Y + 0.014)])
        fig.paint(m, dark)
    elif kind == "dress":
        fig.poly(d, [(-0.09, WAIST_Y), (0.09, WAIST_Y), (0.09, WAIST_Y + 0.012), (-0.09, WAIST_Y + 0.012)])
        fig.paint(m, dark)


def _bag(fig: _Figure, kind: str, colour: RGB, pose: "Pose", arms, sw: float, hw: float, back: bool,
         side: bool) -> None:
    outline = _outline_of(colour)
    m, d = fig.new()
    if kind == "backpack":
        if back:
            fig.poly(d, [(-0.085, 0.19), (0.085, 0.19), (0.09, 0.44), (-0.09, 0.44)])
            fig.paint(m, colour, outline)
            m, d = fig.new()
            fig.poly(d, [(-0.06, 0.34), (0.06, 0.34), (0.06, 0.42), (-0.06, 0.42)])
            fig.paint(m, shade(colour, 0.8) if sum(colour) > 120 else shade(colour, 1.3), outline)
        else:
            for sx in ((-1,) if side else (-1, 1)):
                x = sx * (sw - 0.04) if not side else -0.03
                fig.limb(d, [(x, SHOULDER_Y - 0.005), (x * 0.95, 0.4)], 0.015, 0.013)
            fig.paint(m, colour, outline)
        return
    if kind == "handbag":
        wx, wy = arms[0 if pose.bag_hand < 0 else 1][-1]
        top = wy + 0.04
        fig.poly(d, [(wx - 0.045, top), (wx + 0.045, top), (wx + 0.055, top + 0.085), (wx - 0.055, top + 0.085)])
        fig.limb(d, [(wx - 0.03, top), (wx, wy + 0.015), (wx + 0.03, top)], 0.005, 0.005)
        fig.paint(m, colour, outline)
        return
    # Shoulder bag: a strap across the chest (or back) and the bag at the opposite hip.
    sx = 1.0 if pose.bag_hand > 0 else -1.0
    if side:
        fig.limb(d, [(-0.02, SHOULDER_Y), (0.03, 0.44)], 0.011, 0.011)
        fig.poly(d, [(-0.02, 0.43), (0.1, 0.43), (0.1, 0.55), (-0.02, 0.55)])
    else:
        fig.limb(d, [(-sx * (sw - 0.035), SHOULDER_Y), (sx * (hw + 0.02), 0.45)], 0.011, 0.011)
        fig.poly(d, [(sx * (hw - 0.04), 0.43), (sx * (hw + 0.07), 0.43), (sx * (hw + 0.07), 0.55),
                     (sx * (hw - 0.04), 0.55)])
    fig.paint(m, colour, outline)
