"""Synthetic people: identities, camera scenes, the RGB -> near-infrared mapping and the renderer.

Every image is drawn in two steps. First a *label map* ``(H, W) uint8`` is painted with PIL: each
pixel holds a slot number saying which surface it shows (wall, floor, a clutter object, skin, hair,
upper garment, ...). Then the label map is shaded: an RGB image looks each slot up in a colour
palette, an IR image looks it up in a reflectance palette. Both modalities therefore share the
same geometry (build, pose, sleeves, skirt or trousers, hair, hat, bag) while their intensities
differ.

The IR rendering is one fixed function for every identity and seed, so a model can learn it on
some identities and apply it to others: a garment's near-infrared reflectance follows its dye,
:func:`infrared_reflectance` (the :data:`DYE_RULE`: red, orange and warm dyes bright, blue, green
and black dark, so IR is not the colour's luminance), skin is bright whatever its tone (with a
heat glow at render), hair dark or light with its colour. Every garment is a *material class*
(:data:`MATERIALS`: cotton, denim, wool, leather, synthetic) in one of its typical colours, with
a surface texture and gloss drawn in both modalities and its own brightness in a thermal camera
(RegDB); in near-infrared all fabrics share the dye rule. An earlier version gave each fabric
its own near-infrared rule (indigo denim bright, leather mid-grey whatever its dye); at the
64x32-96x48 inputs a CPU trains on the fabric is not visible in RGB, so a garment's IR was
unpredictable from its RGB look and cross-modal retrieval of new identities stayed near 12% R1
(README "How learnable it is"). Patterns and chest prints use colours that contrast in both
modalities, with stripes, checks and dots 7-12% of the body height apart, coarse enough to show
at those inputs (finer ones alias into noise: measured, the same table). Per image: pose, side
lighting, background clutter, occlusion, exposure, white balance or illuminator falloff, sensor
noise and blur.

Randomness is explicit: an identity is a pure function of ``(seed, pid)``, a camera scene of
``(seed, camera)``, an image of the ``numpy`` generator handed to :func:`render_image`. Nothing
depends on process or call order, so the same seed gives the same bytes with any worker count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Tags keep the random streams of different purposes apart even when their other keys coincide.
_TAG_IDENTITY, _TAG_SCENE = 102, 103

# Label-map slots. Background: wall, floor and six clutter objects; then the person's surfaces.
WALL, FLOOR = 0, 1
CLUTTER = tuple(range(2, 8))
SKIN, HAIR, UPPER, LOWER, SHOES, HAT, BAG, OCCLUDER = range(8, 16)
N_SLOTS = 16
_BODY_SLOTS = (SKIN, HAIR, UPPER, LOWER, SHOES, HAT, BAG)

# Colours (RGB 0-255) of dyes, leathers, skin and hair. Materials draw from short lists of them,
# so two identities often share a colour for some region.
_COLOURS = np.array(
    [(25, 25, 28), (60, 60, 66), (128, 128, 130), (190, 190, 188), (236, 234, 230), (30, 40, 90),
     (40, 90, 180), (130, 170, 220), (190, 35, 40), (110, 25, 35), (230, 140, 170), (230, 120, 40),
     (230, 200, 60), (200, 180, 140), (110, 75, 45), (110, 110, 60), (50, 140, 70), (30, 70, 45),
     (110, 60, 140), (40, 130, 130), (70, 45, 30), (150, 95, 55)], dtype=np.float32) / 255.0
BLACK, CHARCOAL, GREY, LIGHT_GREY, WHITE, NAVY, BLUE, LIGHT_BLUE, RED, BURGUNDY, PINK, ORANGE, \
    YELLOW, BEIGE, BROWN, OLIVE, GREEN, DARK_GREEN, PURPLE, TEAL, DARK_BROWN, TAN = range(len(_COLOURS))
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Material classes. Each has typical colours, a surface texture that shows in both modalities
# (twill and fading, knit ribs, gloss, quilting), its thermal brightness, and a near-infrared response.
COTTON, DENIM, WOOL, LEATHER, SYNTHETIC, SKIN_MATERIAL, HAIR_MATERIAL = range(7)
MATERIAL_NAMES = ("cotton", "denim", "wool", "leather", "synthetic", "skin", "hair")


@dataclass(frozen=True)
class MaterialClass:
    """What a kind of material looks like in both modalities (one fixed table for every seed).

    ``colours``/``weights``: the colours it comes in and how common each is; ``texture``: the
    procedural surface (:func:`_texture_field`) and ``texture_amp`` its relative strength;
    ``gloss``: strength of the specular highlight added in both modalities; ``ir``: ``(4,)``
    coefficients of the near-infrared reflectance ``c0 + c . rgb`` (clipped to [0.03, 0.97]):
    :data:`DYE_RULE` for every fabric;
    ``heat``: brightness in a thermal (far-infrared) camera, which sees emitted heat: skin
    hottest, thin fabrics warm, thick or insulating ones (wool, leather) cool, whatever the dye.
    """

    name: str
    colours: tuple[int, ...]
    weights: tuple[float, ...]
    texture: str
    texture_amp: float
    gloss: float
    ir: tuple[float, float, float, float]
    heat: float


# Near-infrared reflectance of a dyed fabric, ``c0 + c . rgb``: a caricature of how dyes pass
# near-infrared (most red and warm dyes bright, blue, green and black dark). Not the luminance:
# a red and a blue garment of equal brightness in RGB are far apart in IR. One rule for every
# fabric: the fabric does not show at the inputs a CPU trains on (module docstring).
DYE_RULE = (0.12, 0.78, 0.12, -0.22)

MATERIALS = (
    MaterialClass("cotton", tuple(range(20)),
                  (3, 2, 2, 1, 2, 2, 1.5, 1, 1, 1, 1, .7, .7, 1, 1, .7, .7, .7, .7, .7),
                  "weave", 0.10, 0.0, DYE_RULE, 0.6),
    MaterialClass("denim", (NAVY, BLUE, LIGHT_BLUE, BLACK, CHARCOAL), (3, 3, 1.5, 1.5, 1),
                  "twill", 0.22, 0.0, DYE_RULE, 0.5),
    MaterialClass("wool", (CHARCOAL, GREY, BEIGE, BROWN, DARK_GREEN, NAVY, BURGUNDY, OLIVE),
                  (2, 1.5, 1.5, 1, 1, 1.5, 1, 1), "ribs", 0.28, 0.0, DYE_RULE, 0.3),
    MaterialClass("leather", (BLACK, DARK_BROWN, BROWN, TAN, BURGUNDY), (4, 2, 1.5, 1, 0.5),
                  "creases", 0.12, 0.45, DYE_RULE, 0.38),
    MaterialClass("synthetic", (RED, ORANGE, YELLOW, GREEN, PINK, PURPLE, TEAL, BLUE, WHITE, BLACK),
                  (1.5, 1, 1, 1, 1, 1, 1, 1.5, 1.5, 2), "quilting", 0.2, 0.25, DYE_RULE, 0.52),
    MaterialClass("skin", (), (), "none", 0.0, 0.1, (0.88, -0.05, -0.05, 0.0), 0.95),
    MaterialClass("hair", (), (), "strands", 0.15, 0.15, (0.3, 0.5, 0.0, 0.0), 0.42),
)
# Which materials each body region is made of, and how often (upper, lower, shoes, hat, bag).
_REGION_MATERIALS = {
    "upper": ((COTTON, SYNTHETIC, WOOL, LEATHER, DENIM), (0.42, 0.22, 0.2, 0.08, 0.08)),
    "lower": ((DENIM, COTTON, SYNTHETIC, WOOL), (0.5, 0.25, 0.15, 0.1)),
    "shoes": ((LEATHER, SYNTHETIC, COTTON), (0.45, 0.35, 0.2)),
    "hat": ((COTTON, WOOL, SYNTHETIC), (0.4, 0.35, 0.25)),
    "bag": ((SYNTHETIC, LEATHER, COTTON), (0.55, 0.3, 0.15)),
}
_HAIR_COLOURS = np.array(
    [(20, 16, 14), (55, 35, 25), (100, 70, 40), (200, 170, 110), (150, 150, 150)],
    dtype=np.float32) / 255.0
_SKIN_TONES = np.array([(240, 200, 170), (220, 170, 130), (180, 130, 90), (120, 80, 55)],
                       dtype=np.float32) / 255.0
# Patterns by region: (names, probabilities). A "print" is a logo or number on the chest/back.
_PATTERNS = ("plain", "hstripes", "vstripes", "checks", "dots", "print")
_REGION_PATTERNS = {
    "upper": (0.45, 0.15, 0.07, 0.09, 0.07, 0.17),
    "lower": (0.85, 0, 0.1, 0.05, 0, 0),
    "shoes": (1, 0, 0, 0, 0, 0),
    "hat": (1, 0, 0, 0, 0, 0),
    "bag": (0.8, 0.2, 0, 0, 0, 0),
}
# A pattern must show in both modalities: its two colours differ at least this much in each.
_MIN_PATTERN_CONTRAST = 0.15


def thermal_brightness(material: int, rgb: np.ndarray) -> float:
    """Brightness in a thermal camera of ``material`` in colour ``rgb`` ``(3,)``: the class's
    heat, a little more for dark colours (they absorb more light and run warmer)."""
    return float(MATERIALS[material].heat + 0.08 * (1.0 - float(rgb @ _LUMA)))


def infrared_reflectance(material: int, rgb: np.ndarray) -> float:
    """Near-infrared reflectance in [0.03, 0.97] of ``material`` in colour ``rgb`` ``(3,)``.

    The single RGB -> IR rule of the synthetic world: the same for every identity and seed.
    """
    c0, cr, cg, cb = MATERIALS[material].ir
    return float(np.clip(c0 + cr * rgb[0] + cg * rgb[1] + cb * rgb[2], 0.03, 0.97))


@dataclass(frozen=True)
class Material:
    """One surface of an identity: a material class in a colour (or two, for a pattern).

    ``rgb``/``rgb2``: ``(3,)`` float in [0, 1]; ``ir``/``ir2``: their near-infrared reflectance
    (:func:`infrared_reflectance`); ``period``: pattern period as a fraction of the person's
    height.
    """

    kind: int
    rgb: np.ndarray
    ir: float
    pattern: str = "plain"
    rgb2: np.ndarray | None = None
    ir2: float = 0.0
    period: float = 0.05


@dataclass(frozen=True)
class Identity:
    """The stable appearance of one person: build, garments and accessories."""

    pid: int
    stature: float  # relative body height; taller people fill more of the crop
    build: float  # shoulder/hip width factor
    leg: float  # leg length as a fraction of body height
    materials: dict[int, Material]  # slot -> material, for every body slot
    long_sleeves: bool
    lower_kind: str  # "trousers" | "shorts" | "skirt"
    coat: bool  # upper garment reaches the thighs
    long_hair: bool
    hat: bool
    bag: str  # "none" | "backpack" | "shoulder" | "hand"


@dataclass(frozen=True)
class Scene:
    """The fixed look of one camera's view: background surfaces, their IR, the white balance.

    ``palette``: ``(6, 3)`` RGB of clutter objects, ``palette_ir``: ``(6,)``; ``cast``: ``(3,)``
    channel gains of the camera's white balance.
    """

    camera: int
    infrared: bool
    wall: np.ndarray
    floor: np.ndarray
    palette: np.ndarray
    wall_ir: float
    floor_ir: float
    palette_ir: np.ndarray
    horizon: float  # where the floor starts, as a fraction of the image height
    clutter: int  # mean number of clutter objects per image
    cast: np.ndarray
    thermal: bool = False  # a far-infrared camera (RegDB); ``infrared`` is active near-infrared


def _pick(rng: np.random.Generator, options: tuple, weights: tuple) -> int:
    p = np.asarray(weights, dtype=np.float64)
    return int(options[rng.choice(len(options), p=p / p.sum())])


def _garment(rng: np.random.Generator, region: str) -> Material:
    """A garment or accessory of ``region``: a material class in one of its colours, maybe
    patterned with a second colour that contrasts in RGB and in IR alike."""
    kind = _pick(rng, *_REGION_MATERIALS[region])
    material = MATERIALS[kind]
    colour = _pick(rng, material.colours, material.weights)
    # A small per-identity shade jitter: two identities with the same colour are close, not equal.
    rgb = np.clip(_COLOURS[colour] + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)
    ir = infrared_reflectance(kind, rgb)
    pattern = _PATTERNS[rng.choice(len(_PATTERNS), p=_REGION_PATTERNS[region])]
    rgb2, ir2 = None, 0.0
    if pattern != "plain":
        # Prints and stripes are any dye on the garment's material; keep one that shows in both.
        for second in rng.permutation(len(_COLOURS)):
            rgb2 = _COLOURS[second]
            ir2 = infrared_reflectance(kind, rgb2)
            if (abs(float((rgb2 - rgb) @ _LUMA)) >= _MIN_PATTERN_CONTRAST
                    and abs(ir2 - ir) >= _MIN_PATTERN_CONTRAST):
                break
        else:
            pattern, rgb2, ir2 = "plain", None, 0.0
    return Material(kind=kind, rgb=rgb, ir=ir, pattern=pattern, rgb2=rgb2, ir2=ir2,
                    period=float(rng.uniform(0.07, 0.12)))


@lru_cache(maxsize=1024)
def make_identity(seed: int, pid: int) -> Identity:
    """The appearance of identity ``pid`` under ``seed``; a pure function of both (cached: a
    worker renders all images of an identity in a row)."""
    rng = np.random.default_rng([seed, _TAG_IDENTITY, pid + 2])  # +2: junk pid -1 stays >= 0
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))]
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))]
    materials = {
        # Skin is bright in near-infrared whatever its tone; body heat adds a glow at render.
        SKIN: Material(SKIN_MATERIAL, skin, infrared_reflectance(SKIN_MATERIAL, skin)),
        HAIR: Material(HAIR_MATERIAL, hair, infrared_reflectance(HAIR_MATERIAL, hair)),
        UPPER: _garment(rng, "upper"),
        LOWER: _garment(rng, "lower"),
        SHOES: _garment(rng, "shoes"),
        HAT: _garment(rng, "hat"),
        BAG: _garment(rng, "bag"),
    }
    return Identity(
        pid=pid, stature=float(rng.uniform(0.9, 1.04)), build=float(rng.uniform(0.82, 1.22)),
        leg=float(rng.uniform(0.44, 0.5)), materials=materials,
        long_sleeves=bool(rng.random() < 0.6),
        lower_kind=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.7, 0.15, 0.15])),
        coat=bool(rng.random() < 0.2), long_hair=bool(rng.random() < 0.35),
        hat=bool(rng.random() < 0.15),
        bag=str(rng.choice(["none", "backpack", "shoulder", "hand"], p=[0.45, 0.3, 0.15, 0.1])))


@lru_cache(maxsize=64)
def make_scene(seed: int, camera: int, infrared: bool, outdoor: bool, thermal: bool = False) -> Scene:
    """The background of one camera: indoor scenes are muted and warm, outdoor ones greener.
    A thermal camera (``thermal``) sees the background's IR values as its (cool) temperatures."""
    rng = np.random.default_rng([seed, _TAG_SCENE, camera])
    if outdoor:
        base = np.array([[0.45, 0.5, 0.45], [0.35, 0.45, 0.3], [0.55, 0.55, 0.58]], np.float32)
    else:
        base = np.array([[0.7, 0.65, 0.58], [0.5, 0.45, 0.4], [0.75, 0.75, 0.78]], np.float32)
    pick = base[rng.integers(3, size=2)]
    palette = np.clip(base[rng.integers(3, size=6)] + rng.normal(0, 0.12, (6, 3)), 0.02, 0.98)
    return Scene(
        camera=camera, infrared=infrared,
        wall=np.clip(pick[0] + rng.normal(0, 0.08, 3), 0, 1).astype(np.float32),
        floor=np.clip(pick[1] * 0.8 + rng.normal(0, 0.05, 3), 0, 1).astype(np.float32),
        palette=palette.astype(np.float32), wall_ir=float(rng.uniform(0.1, 0.35)),
        floor_ir=float(rng.uniform(0.15, 0.45)), palette_ir=rng.uniform(0.05, 0.7, 6),
        horizon=float(rng.uniform(0.55, 0.8)), clutter=int(rng.integers(2, 7)),
        cast=(1 + rng.normal(0, 0.06, 3)).astype(np.float32), thermal=thermal)


@dataclass(frozen=True)
class Pose:
    """Where and how a person stands in one image (pixels and radians)."""

    cx: float  # horizontal centre of the body
    top: float  # y of the top of the head
    height: float  # body height in pixels
    view: str  # "front" | "back" | "side"
    arm_swing: float
    stride: float


def random_pose(rng: np.random.Generator, ident: Identity, size: tuple[int, int]) -> Pose:
    """A pose for an ``(H, W)`` crop: the detector-style box holds the body with some slack."""
    h, w = size
    height = h * rng.uniform(0.8, 0.97) * ident.stature
    slack = h - height
    return Pose(cx=w * (0.5 + rng.uniform(-0.1, 0.1)), top=rng.uniform(-0.03, 0.9) * slack,
                height=height, view=str(rng.choice(["front", "back", "side"], p=[.37, .37, .26])),
                arm_swing=float(rng.uniform(0.05, 0.45)), stride=float(rng.uniform(0.0, 0.4)))


def _draw_background(draw: ImageDraw.ImageDraw, rng: np.random.Generator, scene: Scene,
                     size: tuple[int, int]) -> None:
    """Paint wall, floor and clutter objects (shelves, doors, poles, bushes) into the label map."""
    h, w = size
    horizon = int(h * (scene.horizon + rng.uniform(-0.08, 0.08)))
    draw.rectangle((0, 0, w, h), fill=WALL)
    draw.rectangle((0, horizon, w, h), fill=FLOOR)
    for _ in range(rng.poisson(scene.clutter)):
        slot = int(rng.choice(CLUTTER))
        x0, y0 = rng.uniform(-0.3, 1.0) * w, rng.uniform(-0.2, 0.9) * h
        kind = rng.integers(3)
        if kind == 0:  # box-like object: shelf, door, car, bench
            x1, y1 = x0 + rng.uniform(0.15, 0.7) * w, y0 + rng.uniform(0.1, 0.5) * h
            draw.rectangle((x0, y0, x1, y1), fill=slot)
        elif kind == 1:  # pole or pillar
            draw.rectangle((x0, 0, x0 + rng.uniform(0.03, 0.12) * w, h), fill=slot)
        else:  # bush, bin, round sign
            r = rng.uniform(0.08, 0.3) * w
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=slot)


def _limb(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float],
          width: float, slot: int) -> None:
    """A limb segment with rounded ends."""
    draw.line((start, end), fill=slot, width=max(1, round(width)))
    r = width / 2
    for x, y in (start, end):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=slot)


def _draw_person(draw: ImageDraw.ImageDraw, ident: Identity, pose: Pose) -> None:
    """Paint the person into the label map; body proportions are fractions of ``pose.height``."""
    ph, cx, top = pose.height, pose.cx, pose.top

    def at(dx: float, fy: float) -> tuple[float, float]:
        return cx + dx * ph, top + fy * ph

    side = pose.view == "side"
    shoulder = (0.07 if side else 0.115) * ident.build
    hip = (0.065 if side else 0.085) * ident.build
    hip_y, ankle_y = 1.0 - ident.leg, 0.955
    limb_w = 0.05 * ident.build * ph

    # Legs: spread sideways when seen from front/back, striding when seen from the side.
    spread = math.sin(pose.stride) * (0.22 if side else 0.06)
    for sign in (-1, 1):
        hip_pt = at(sign * hip * (0.2 if side else 0.55), hip_y)
        ankle = at(sign * (spread + (0 if side else 0.035)), ankle_y)
        knee = ((hip_pt[0] + ankle[0]) / 2, (hip_pt[1] + ankle[1]) / 2)
        lower_slot = SKIN if ident.lower_kind == "skirt" else LOWER
        _limb(draw, hip_pt, ankle, limb_w * 1.25, lower_slot)
        if ident.lower_kind == "shorts":
            _limb(draw, knee, ankle, limb_w * 1.0, SKIN)
        shoe_dx = 0.04 if side else 0.0
        sx, sy = ankle
        draw.ellipse((sx - 0.035 * ph, sy - 0.015 * ph, sx + (0.035 + shoe_dx) * ph,
                      sy + 0.04 * ph), fill=SHOES)
    if ident.lower_kind == "skirt":
        draw.polygon([at(-hip, hip_y - 0.02), at(hip, hip_y - 0.02), at(hip * 1.6, hip_y + 0.2),
                      at(-hip * 1.6, hip_y + 0.2)], fill=LOWER)
    else:  # the seat of trousers/shorts joins the two legs
        draw.polygon([at(-hip, hip_y - 0.02), at(hip, hip_y - 0.02), at(hip * 0.7, hip_y + 0.06),
                      at(-hip * 0.7, hip_y + 0.06)], fill=LOWER)

    if ident.long_hair and pose.view == "front":  # hair falling behind the shoulders
        draw.rectangle((*at(-0.055, 0.06), *at(0.055, 0.26)), fill=HAIR)
    if ident.bag == "backpack" and side:  # the pack sticks out behind the back
        draw.rectangle((*at(-shoulder - 0.06, 0.19), *at(-shoulder + 0.02, 0.45)), fill=BAG)

    # Torso (and coat tails) in the upper garment.
    bottom = hip_y + (0.17 if ident.coat else 0.02)
    flare = 1.25 if ident.coat else 1.0
    draw.polygon([at(-shoulder, 0.17), at(shoulder, 0.17), at(hip * flare, bottom),
                  at(-hip * flare, bottom)], fill=UPPER)
    draw.rectangle((*at(-0.022, 0.11), *at(0.022, 0.18)), fill=SKIN)  # neck

    # Arms swing forward/back from the side, slightly outwards from the front.
    arm_len = 0.36
    for sign in (-1, 1):
        angle = sign * pose.arm_swing * (1.0 if side else 0.35)
        sh = at(sign * shoulder * (0.3 if side else 0.85), 0.19)
        hand = (sh[0] + math.sin(angle) * arm_len * ph, sh[1] + math.cos(angle) * arm_len * ph)
        elbow = ((sh[0] + hand[0]) / 2, (sh[1] + hand[1]) / 2)
        if ident.long_sleeves:
            _limb(draw, sh, hand, limb_w, UPPER)
        else:
            _limb(draw, elbow, hand, limb_w * 0.85, SKIN)
            _limb(draw, sh, elbow, limb_w * 1.1, UPPER)
        hx, hy = hand
        r = limb_w * 0.6
        draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=SKIN)
        if ident.bag == "hand" and sign == 1:
            draw.rectangle((hx - 0.04 * ph, hy, hx + 0.04 * ph, hy + 0.1 * ph), fill=BAG)

    if ident.bag == "shoulder":  # strap across the chest, bag at the opposite hip
        draw.line((at(-shoulder * 0.7, 0.18), at(hip, hip_y - 0.05)), fill=BAG,
                  width=max(1, round(0.015 * ph)))
        draw.rectangle((*at(hip - 0.02, hip_y - 0.09), *at(hip + 0.07, hip_y + 0.02)), fill=BAG)
    elif ident.bag == "backpack" and pose.view == "back":
        draw.rectangle((*at(-shoulder * 0.8, 0.19), *at(shoulder * 0.8, 0.47)), fill=BAG)
    elif ident.bag == "backpack" and pose.view == "front":  # straps only
        for sign in (-1, 1):
            draw.line((at(sign * shoulder * 0.6, 0.17), at(sign * shoulder * 0.55, 0.4)), fill=BAG,
                      width=max(1, round(0.018 * ph)))

    # Head: face from the front, hair from the back, a profile from the side.
    head = (*at(-0.048, 0.0), *at(0.048, 0.13))
    draw.ellipse(head, fill=HAIR if pose.view == "back" else SKIN)
    if pose.view == "front":
        draw.chord(head, 180, 360, fill=HAIR)
    elif side:
        draw.pieslice(head, 150, 330, fill=HAIR)
    if ident.long_hair and pose.view != "front":
        right = 0.05 if pose.view == "back" else 0.0  # from the side, only behind the head
        draw.rectangle((*at(-0.05, 0.06), *at(right, 0.26)), fill=HAIR)
    if ident.hat:
        draw.chord((*at(-0.055, -0.015), *at(0.055, 0.09)), 180, 360, fill=HAT)
        draw.rectangle((*at(-0.065, 0.03), *at(0.065 + (0.03 if side else 0), 0.045)), fill=HAT)


def _body_coords(pose: Pose, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(W,)`` and ``(H,)`` float32 coordinates relative to the body, in units of its height:
    textures and patterns stay the same size on the body as the person scales."""
    h, w = size
    u = (np.arange(w, dtype=np.float32) - pose.cx) / pose.height
    v = (np.arange(h, dtype=np.float32) - pose.top) / pose.height
    return u, v


def _pattern_mask(material: Material, pose: Pose, size: tuple[int, int]) -> np.ndarray | None:
    """``(H, W)`` bool: where a patterned material shows its second colour (None when plain).

    A print is a block on the chest (front) or back; it is not seen from the side.
    """
    if material.pattern == "plain" or (material.pattern == "print" and pose.view == "side"):
        return None
    u, v = _body_coords(pose, size)
    if material.pattern == "print":
        return (np.abs(v - 0.3) < 0.045)[:, None] & (np.abs(u) < 0.055)[None, :]
    u, v = (u / material.period) % 1.0, (v / material.period) % 1.0
    if material.pattern == "hstripes":
        return np.broadcast_to((v < 0.4)[:, None], size)
    if material.pattern == "vstripes":
        return np.broadcast_to((u < 0.4)[None, :], size)
    if material.pattern == "checks":
        return (v[:, None] < 0.5) ^ (u[None, :] < 0.5)
    return (v[:, None] - 0.5) ** 2 + (u[None, :] - 0.5) ** 2 < 0.06  # dots


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """``(H, W)`` float32 low-frequency noise in about [-1, 1]: stains, shadows, uneven light."""
    h, w = size
    coarse = rng.uniform(0, 255, (max(2, h // cells), max(2, w // cells))).astype(np.uint8)
    big = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
    return np.asarray(big, dtype=np.float32) / 127.5 - 1.0


def _texture_field(texture: str, rng: np.random.Generator, pose: Pose, size: tuple[int, int]
                   ) -> np.ndarray | None:
    """``(H, W)`` float32 in about [-1, 1]: the surface texture of a material class (None: flat).

    Scales are fractions of the body height, coarse enough to survive a 96x48 training input.
    """
    u, v = _body_coords(pose, size)
    cells = max(2, round(0.04 * pose.height))
    if texture == "weave":  # cotton: soft wrinkles
        return _smooth_noise(rng, size, cells)
    if texture == "twill":  # denim: diagonal twill plus faded, lighter patches
        twill = np.sin((u[None, :] + v[:, None]) * (2 * np.pi / 0.02))
        return 0.35 * twill + 0.9 * np.abs(_smooth_noise(rng, size, 2 * cells))
    if texture == "ribs":  # knitted wool: vertical ribs
        return np.broadcast_to(np.sin(u * (2 * np.pi / 0.035))[None, :], size)
    if texture == "creases":  # leather: a few sharp creases
        return -np.abs(_smooth_noise(rng, size, cells)) ** 3
    if texture == "quilting":  # nylon: dark horizontal seams of a quilted jacket
        return np.broadcast_to(np.where((v / 0.06) % 1.0 < 0.18, -1.0, 0.2)[:, None], size)
    if texture == "strands":  # hair: fine vertical strands
        return np.broadcast_to(np.sin(u * (2 * np.pi / 0.012))[None, :], size)
    return None


def _gloss(pose: Pose, size: tuple[int, int]) -> np.ndarray:
    """``(1, W)`` float32 in [0, 1]: a specular highlight down one side of the rounded body."""
    u, _ = _body_coords(pose, size)
    return np.exp(-(((u / 0.14) - 0.35) / 0.2) ** 2)[None, :].astype(np.float32)


def _lighting(labels: np.ndarray, pose: Pose, rng: np.random.Generator) -> np.ndarray:
    """``(H, W)`` float32 gain: bodies are rounder (darker at their left/right edges) and lit from
    one side, by a different amount in every image."""
    w = labels.shape[1]
    dx = (np.arange(w, dtype=np.float32) - pose.cx) / (0.14 * pose.height)
    side = np.float32(rng.uniform(-0.2, 0.2))
    gain = np.clip(1.0 - 0.35 * dx**2 + side * np.clip(dx, -1, 1), 0.5, 1.2)[None, :]
    is_body = np.isin(labels, _BODY_SLOTS)
    return np.where(is_body, gain, 1.0).astype(np.float32)


def _palettes(ident: Identity | None, scene: Scene, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot RGB ``(N_SLOTS, 3)`` and IR reflectance ``(N_SLOTS,)`` for one image."""
    rgb = np.zeros((N_SLOTS, 3), np.float32)
    ir = np.zeros(N_SLOTS, np.float32)
    rgb[WALL], rgb[FLOOR] = scene.wall, scene.floor
    ir[WALL], ir[FLOOR] = scene.wall_ir, scene.floor_ir
    # Clutter changes from image to image: objects come and go, but in the camera's palette.
    pick = rng.integers(len(scene.palette), size=len(CLUTTER))
    rgb[list(CLUTTER)] = np.clip(scene.palette[pick] + rng.normal(0, 0.08, (len(CLUTTER), 3)), 0, 1)
    ir[list(CLUTTER)] = np.clip(scene.palette_ir[pick] + rng.normal(0, 0.05, len(CLUTTER)), 0, 1)
    rgb[OCCLUDER], ir[OCCLUDER] = rng.uniform(0.05, 0.9, 3), rng.uniform(0.05, 0.8)
    if ident is not None:
        for slot, material in ident.materials.items():
            rgb[slot], ir[slot] = material.rgb, material.ir
    return rgb, ir


def _shade(labels: np.ndarray, table: np.ndarray, ident: Identity | None, pose: Pose,
           modality: str, rng: np.random.Generator) -> np.ndarray:
    """Look the label map up in ``table`` and dress each body surface in its material: pattern,
    texture and gloss, the same in the ``rgb`` and ``ir`` modalities; a ``thermal`` camera sees
    heat, so no dye pattern and no gloss, and only half the texture. ``(H, W, C)`` float32
    (C = 3 or 1)."""
    image = table[labels]
    if ident is None:
        return image
    # Whole-image np.where passes: faster than masked assignment on these small images.
    texture = np.ones(labels.shape, np.float32)
    shine = np.zeros(labels.shape, np.float32)
    for slot, material in ident.materials.items():
        where = labels == slot
        if not where.any():
            continue
        thermal = modality == "thermal"
        mask = None if thermal else _pattern_mask(material, pose, labels.shape)
        if mask is not None:
            second = np.float32(material.ir2) if modality == "ir" else material.rgb2
            image = np.where((mask & where)[..., None], second, image)
        kind = MATERIALS[material.kind]
        field = _texture_field(kind.texture, rng, pose, labels.shape)
        if field is not None:
            amp = kind.texture_amp * (0.5 if thermal else 1.0)
            texture = np.where(where, 1.0 + amp * field, texture)
        if kind.gloss and not thermal:
            shine = np.where(where, kind.gloss * _gloss(pose, labels.shape), shine)
    image = image * texture[..., None]
    return image + shine[..., None] * (1.0 - image)


def _occlude(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """Something between camera and person: a railing, a passer-by's arm, a sign, from an edge."""
    h, w = size
    edge = rng.integers(3)
    depth = rng.uniform(0.2, 0.45)
    if edge == 0:
        draw.rectangle((0, h * (1 - depth * 0.8), w, h), fill=OCCLUDER)
    elif edge == 1:
        draw.rectangle((0, rng.uniform(0, 0.5) * h, w * depth, h), fill=OCCLUDER)
    else:
        draw.rectangle((w * (1 - depth), rng.uniform(0, 0.5) * h, w, h), fill=OCCLUDER)


def render_labels(rng: np.random.Generator, ident: Identity | None, scene: Scene,
                  size: tuple[int, int], pose: Pose | None, occlusion_p: float = 0.12
                  ) -> np.ndarray:
    """The label map ``(H, W) uint8`` of one image; no person when ``ident`` is None."""
    h, w = size
    canvas = Image.new("L", (w, h))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, rng, scene, size)
    if ident is not None and pose is not None:
        _draw_person(draw, ident, pose)
    if rng.random() < occlusion_p:
        _occlude(draw, rng, size)
    return np.asarray(canvas)


def _finish_rgb(rng: np.random.Generator, image: np.ndarray, scene: Scene) -> Image.Image:
    """Camera and lighting on an ``(H, W, 3)`` float image: exposure, contrast, cast, noise."""
    h, w = image.shape[:2]
    image = image * (1.0 + 0.18 * _smooth_noise(rng, (h, w), 24)[..., None])  # uneven light
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.75, 1.15) + mean * rng.uniform(0.7, 1.25)
    image = image * scene.cast * rng.uniform(0.93, 1.07, 3).astype(np.float32)
    image = np.clip(image, 0, 1) ** np.float32(rng.uniform(0.85, 1.2))
    image = image + rng.normal(0, rng.uniform(0.005, 0.03), image.shape).astype(np.float32)
    pixels = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    return pixels.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))


def _finish_ir(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray) -> Image.Image:
    """Active-illumination IR on ``(H, W)`` reflectance: heat glow, falloff, grain, softer optics.

    Returns an RGB image whose three channels are equal, as the real IR cameras store them.
    """
    h, w = labels.shape
    skin = Image.fromarray(((labels == SKIN) * 255).astype(np.uint8))
    glow = np.asarray(skin.filter(ImageFilter.GaussianBlur(max(1.0, w / 40))), np.float32) / 255
    image = image + 0.35 * glow  # body heat spills around exposed skin
    # The illuminator sits by the lens: the centre of the view is lit most.
    yy = (np.arange(h, dtype=np.float32)[:, None] / h - rng.uniform(0.35, 0.6)) * 1.6
    xx = np.arange(w, dtype=np.float32)[None, :] / w - 0.5
    image = image * (1.0 - rng.uniform(0.2, 0.5) * (xx**2 + yy**2) * 2)
    image = image * rng.uniform(0.75, 1.3) + rng.uniform(-0.05, 0.08)
    image = image * (1.0 + 0.12 * _smooth_noise(rng, (h, w), 16))
    image = image + rng.normal(0, rng.uniform(0.02, 0.05), image.shape).astype(np.float32)
    grey = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    return grey.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.4))).convert("RGB")


def _heat_table(ident: Identity | None, ir_table: np.ndarray) -> np.ndarray:
    """Per-slot thermal brightness ``(N_SLOTS,)``: the background is cool (its IR values,
    halved), the body's surfaces follow :func:`thermal_brightness`."""
    heat = (ir_table * 0.5).astype(np.float32)
    if ident is not None:
        for slot, material in ident.materials.items():
            heat[slot] = thermal_brightness(material.kind, material.rgb)
    return heat


def _finish_thermal(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray) -> Image.Image:
    """A thermal camera on ``(H, W)`` heat: warmth spreading around the body, automatic gain,
    low-resolution optics. Returns an RGB image with three equal channels."""
    h, w = labels.shape
    body = Image.fromarray((np.isin(labels, _BODY_SLOTS) * 255).astype(np.uint8))
    halo = np.asarray(body.filter(ImageFilter.GaussianBlur(max(1.0, w / 20))), np.float32) / 255
    image = np.maximum(image, 0.45 * halo)
    image = (image - image.mean()) * rng.uniform(0.8, 1.3) + image.mean() * rng.uniform(0.85, 1.15)
    image = image + rng.normal(0, rng.uniform(0.01, 0.03), image.shape).astype(np.float32)
    grey = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    return grey.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 1.8))).convert("RGB")


def render_image(rng: np.random.Generator, ident: Identity | None, scene: Scene,
                 size: tuple[int, int], pose: Pose | None = None) -> Image.Image:
    """One ``(H, W)`` image of ``ident`` (or of the empty scene when None) seen by ``scene``.

    ``pose`` defaults to a random one; junk crops pass an off-centre pose of their own.
    """
    if ident is not None and pose is None:
        pose = random_pose(rng, ident, size)
    labels = render_labels(rng, ident, scene, size, pose)
    rgb_table, ir_table = _palettes(ident, scene, rng)
    # A pose is still needed for shading an empty scene; an off-canvas one changes nothing.
    pose = pose or Pose(cx=-1e4, top=0, height=size[0], view="front", arm_swing=0, stride=0)
    light = _lighting(labels, pose, rng)
    # Half the people walk the other way (the drawing itself always faces right).
    flip = rng.random() < 0.5
    # Every random draw above is shared by the modalities: the same stream gives a visible and a
    # thermal image of the same moment (RegDB's cameras are co-located and synchronised).
    if scene.thermal:
        heat = _shade(labels, _heat_table(ident, ir_table)[:, None], ident, pose, "thermal", rng)[..., 0]
        image = _finish_thermal(rng, heat, labels)
    elif scene.infrared:
        reflectance = _shade(labels, ir_table[:, None], ident, pose, "ir", rng)[..., 0]
        image = _finish_ir(rng, reflectance * light, labels)
    else:
        colour = _shade(labels, rgb_table, ident, pose, "rgb", rng)
        image = _finish_rgb(rng, colour * light[..., None], scene)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image
