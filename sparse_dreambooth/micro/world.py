"""The micro world: captioned scenes drawn procedurally, deterministic from a seed.

A scene is one *instance* of a DreamBooth class (a dog, a teapot, ...; colours, markings and
proportions of its own) drawn as a simple figure in a context the DreamBooth prompt lists name
("on the beach", "with a city in the background", "wearing a santa hat", "a shiny X"). Captions
use the prompt lists' own words, so a model pretrained here understands the evaluation prompts.

Figures are drawn at 4x the image size and downsampled, so edges stay smooth at 64 px. Everything
random comes from numpy generators seeded by the caller; PIL's drawing is deterministic, so the same
seed gives the same pixels everywhere. torch is not imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from sparse_dreambooth.data import LIVE_CLASSES, LIVE_PROMPT_TEMPLATES, OBJECT_PROMPT_TEMPLATES

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

Colour = tuple[int, int, int]

# Class name -> kind. The names are the DreamBooth dataset's class names; "live" ones get the live
# prompt list (outfits), as the dataset's cats and dogs do.
CLASSES: dict[str, str] = {
    name: ("live" if name in LIVE_CLASSES else "object")
    for name in (
        "dog",
        "cat",
        "backpack",
        "bowl",
        "boot",
        "can",
        "candle",
        "clock",
        "sneaker",
        "stuffed animal",
        "teapot",
        "toy",
        "vase",
    )
}


def _template_phrases() -> tuple[list[str], list[str], list[str]]:
    # Split the DreamBooth templates into the words around "{token} {class_name}": a suffix is a
    # context or (live only) an outfit, a prefix is a modifier ("red", "cube shaped").
    head = "a {token} {class_name} "
    object_suffixes = [t.removeprefix(head) for t in OBJECT_PROMPT_TEMPLATES if t.startswith(head)]
    live_suffixes = [t.removeprefix(head) for t in LIVE_PROMPT_TEMPLATES if t.startswith(head)]
    modifiers = [
        t.removeprefix("a ").removesuffix(" {token} {class_name}") for t in OBJECT_PROMPT_TEMPLATES if t.endswith("}")
    ]
    outfits = [suffix for suffix in live_suffixes if suffix not in object_suffixes]
    return object_suffixes, modifiers, outfits


CONTEXTS, MODIFIERS, OUTFITS = _template_phrases()
# CONTEXTS: "in the jungle", ..., "on top of a white rug" (20; the live list uses the first 10)
# MODIFIERS: "red", "purple", "shiny", "wet", "cube shaped"
# OUTFITS: "wearing a red hat", ..., "in a purple wizard outfit" (live classes only)

# Markings random instances have; subjects use others (see subjects.py), which the base never draws.
RANDOM_MARKINGS = ("plain", "spots", "stripes", "patch", "band")
SUBJECT_MARKINGS = ("checks", "stars", "zigzag", "hearts", "rings")


@dataclass(frozen=True)
class Instance:
    """One specific thing: its class and what tells it apart from others of that class.

    Attributes:
        class_name: A key of `CLASSES`.
        body: Main colour.
        accent: Colour of the secondary parts (ears, lid, label, sole, ...).
        marking: Pattern on the body: one of `RANDOM_MARKINGS` or `SUBJECT_MARKINGS`.
        marking_colour: Colour of the pattern.
        width: Horizontal stretch of the figure (1 = standard proportions).
        height: Vertical stretch of the figure.
        ears: "floppy" or "pointy" (dogs; cats always have pointy ears, objects none).
        pattern_seed: Where spots and patches sit on the body; fixed for the instance.
    """

    class_name: str
    body: Colour
    accent: Colour
    marking: str
    marking_colour: Colour
    width: float = 1.0
    height: float = 1.0
    ears: str = "pointy"
    pattern_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """An instance in a context, with a pose.

    Attributes:
        instance: What is shown.
        context: One of `CONTEXTS`, or None for a plain studio background.
        attribute: One of `MODIFIERS` or (live classes) `OUTFITS`, or None.
        facing: 1 when the figure faces right, -1 left.
        scale: Figure size as a fraction of the image side.
        x: Horizontal centre of the figure, as a fraction of the image width.
        ground: Where the figure stands, as a fraction of the image height from the top.
        detail_seed: Seeds the background's details (buildings, leaves, people, droplets).
    """

    instance: Instance
    context: str | None
    attribute: str | None
    facing: int
    scale: float
    x: float
    ground: float
    detail_seed: int


# ---------------------------------------------------------------------------------------------
# Random instances and scenes

_NEUTRAL = [(235, 235, 230), (130, 130, 135), (35, 35, 40), (240, 225, 190)]  # white, grey, black, cream
_BODY_PALETTES: dict[str, list[Colour]] = {
    "dog": [(130, 85, 50), (205, 165, 110), (40, 35, 35), (235, 230, 220), (220, 170, 80), (80, 50, 30)],
    "cat": [(225, 140, 60), (130, 130, 135), (35, 35, 40), (235, 235, 230), (235, 215, 175), (125, 90, 60)],
    "stuffed animal": [(160, 110, 70), (205, 170, 120), (240, 230, 210), (150, 150, 150), (230, 160, 180)],
}
_OBJECT_PALETTE: list[Colour] = [
    (40, 60, 120),  # navy
    (50, 110, 200),  # blue
    (60, 140, 70),  # green
    (120, 130, 60),  # olive
    (120, 80, 45),  # brown
    (200, 170, 120),  # tan
    (230, 200, 60),  # yellow
    (235, 140, 40),  # orange
    *_NEUTRAL,
]
_MARKING_PALETTE: list[Colour] = [(30, 30, 30), (245, 245, 240), (120, 75, 40), (230, 200, 60), (60, 90, 160)]
_MODIFIER_COLOURS = {"red": (205, 30, 30), "purple": (130, 50, 175)}


def _jitter(colour: Colour, rng: np.random.Generator, amount: int = 14) -> Colour:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _pick(rng: np.random.Generator, choices):
    return choices[int(rng.integers(len(choices)))]


def random_instance(class_name: str, rng: np.random.Generator) -> Instance:
    """A random instance of `class_name`, never one of the named micro subjects.

    Args:
        class_name: A key of `CLASSES`.
        rng: The source of every random choice.

    Raises:
        KeyError: `class_name` is not a micro-world class.
    """
    if class_name not in CLASSES:
        raise KeyError(f"{class_name!r} is not a micro-world class; known: {', '.join(CLASSES)}")
    palette = _BODY_PALETTES.get(class_name, _OBJECT_PALETTE)
    body = _jitter(_pick(rng, palette), rng)
    accent = _jitter(_pick(rng, palette if class_name in _BODY_PALETTES else _OBJECT_PALETTE), rng)
    markings = RANDOM_MARKINGS if CLASSES[class_name] == "object" else RANDOM_MARKINGS[:4]
    marking = markings[int(rng.choice(len(markings), p=_marking_weights(len(markings))))]
    return Instance(
        class_name=class_name,
        body=body,
        accent=accent,
        marking=marking,
        marking_colour=_jitter(_pick(rng, _MARKING_PALETTE), rng),
        width=float(rng.uniform(0.85, 1.15)),
        height=float(rng.uniform(0.9, 1.1)),
        ears=_pick(rng, ("floppy", "pointy")) if class_name == "dog" else "pointy",
        pattern_seed=int(rng.integers(2**31)),
    )


def _marking_weights(count: int) -> np.ndarray:
    # Plain instances are as common as all patterned ones together.
    weights = np.array([float(count - 1)] + [1.0] * (count - 1))
    return weights / weights.sum()


def random_scene(
    rng: np.random.Generator,
    *,
    instance: Instance | None = None,
    class_name: str | None = None,
    context: str | None = None,
) -> Scene:
    """A random scene: about 80 % have a context, about 35 % a modifier or outfit.

    Args:
        rng: The source of every random choice.
        instance: Show this instance; default a random one (of `class_name` if given).
        class_name: The class of the random instance; default a random class.
        context: Use this context; default a random one or none.

    Raises:
        KeyError: An unknown `class_name`.
        ValueError: An unknown `context`.
    """
    if context is not None and context not in CONTEXTS:
        raise ValueError(f"{context!r} is not a micro-world context; known: {', '.join(CONTEXTS)}")
    if instance is None:
        instance = random_instance(class_name or _pick(rng, list(CLASSES)), rng)
    if context is None and rng.random() < 0.8:
        context = _pick(rng, CONTEXTS)
    attribute = None
    if rng.random() < 0.35:
        live = CLASSES[instance.class_name] == "live"
        attribute = _pick(rng, OUTFITS) if live and rng.random() < 0.6 else _pick(rng, MODIFIERS)
    return Scene(
        instance=instance,
        context=context,
        attribute=attribute,
        facing=1 if rng.random() < 0.5 else -1,
        scale=float(rng.uniform(0.5, 0.75)),
        x=float(rng.uniform(0.38, 0.62)),
        # On a mirror the figure stands higher, so its reflection fits below it.
        ground=float(rng.uniform(0.68, 0.78) if context == "on top of a mirror" else rng.uniform(0.86, 0.95)),
        detail_seed=int(rng.integers(2**31)),
    )


def scenes(seed: int, count: int) -> Iterator[Scene]:
    """A deterministic stream of `count` random scenes: the same seed gives the same scenes."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield random_scene(rng)


def caption(scene: Scene, token: str | None = None) -> str:
    """The scene's caption in the DreamBooth prompt lists' words.

    "a photo of a dog on the beach"; with a token: "a photo of a zjw dog on the beach";
    "a photo of a red zjw dog", "a photo of a cat wearing a santa hat in the snow".
    """
    words = ["a photo of a"]
    if scene.attribute in MODIFIERS:
        words.append(scene.attribute)
    if token:
        words.append(token)
    words.append(scene.instance.class_name)
    if scene.attribute in OUTFITS:
        words.append(scene.attribute)
    if scene.context:
        words.append(scene.context)
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Drawing figures


class _Painter:
    """Draws a figure in unit coordinates: u across (-0.5..0.5, the figure faces +u), v up from its
    base (0..1), stretched by the instance's proportions and mirrored when it faces left.

    Shapes drawn with `body=True` also go into a mask, so markings and clothes stay on the body.
    """

    def __init__(self, canvas: int, scene: Scene):
        self.canvas = canvas
        self.length = scene.scale * canvas
        self.centre_x = scene.x * canvas
        self.base_y = scene.ground * canvas
        self.facing = scene.facing
        self.stretch = (scene.instance.width, scene.instance.height)
        self.layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.layer)
        self.body_mask = Image.new("L", (canvas, canvas), 0)
        self.mask_draw = ImageDraw.Draw(self.body_mask)

    def point(self, u: float, v: float) -> tuple[float, float]:
        return (
            self.centre_x + self.facing * u * self.stretch[0] * self.length,
            self.base_y - v * self.stretch[1] * self.length,
        )

    def box(self, u0: float, v0: float, u1: float, v1: float) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = self.point(u0, v0), self.point(u1, v1)
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)

    def pixels(self, length: float) -> int:
        return max(1, round(length * self.length))

    def ellipse(self, u, v, ru, rv, fill, body=False, outline=None, width=0.0):
        self._shape("ellipse", self.box(u - ru, v - rv, u + ru, v + rv), fill, body, outline, width)

    def rect(self, u0, v0, u1, v1, fill, body=False, radius=0.0):
        box = self.box(u0, v0, u1, v1)
        extra = {"radius": self.pixels(radius)} if radius else {}
        self.draw.rounded_rectangle(box, fill=fill, **extra) if radius else self.draw.rectangle(box, fill=fill)
        if body:
            self.mask_draw.rounded_rectangle(box, fill=255, **extra) if radius else self.mask_draw.rectangle(
                box, fill=255
            )

    def polygon(self, points, fill, body=False):
        xy = [self.point(u, v) for u, v in points]
        self.draw.polygon(xy, fill=fill)
        if body:
            self.mask_draw.polygon(xy, fill=255)

    def line(self, points, fill, width, body=False):
        xy = [self.point(u, v) for u, v in points]
        self.draw.line(xy, fill=fill, width=self.pixels(width), joint="curve")
        if body:
            self.mask_draw.line(xy, fill=255, width=self.pixels(width), joint="curve")

    def _shape(self, kind, box, fill, body, outline, width):
        getattr(self.draw, kind)(box, fill=fill, outline=outline, width=self.pixels(width) if outline else 0)
        if body:
            getattr(self.mask_draw, kind)(box, fill=255)

    def on_body(self, paint: Callable[[_Painter], None], region: tuple[float, float, float, float] | None = None):
        """Run `paint` on a fresh layer and keep only what falls on the body (and inside `region`)."""
        overlay = _Painter.__new__(_Painter)
        overlay.__dict__.update(self.__dict__)
        overlay.layer = Image.new("RGBA", self.layer.size, (0, 0, 0, 0))
        overlay.draw = ImageDraw.Draw(overlay.layer)
        overlay.mask_draw = ImageDraw.Draw(Image.new("L", self.layer.size))  # overlays add no body
        paint(overlay)
        keep = self.body_mask
        if region is not None:
            limit = Image.new("L", self.layer.size, 0)
            ImageDraw.Draw(limit).rectangle(self.box(*region), fill=255)
            keep = _mask_and(keep, limit)
        overlay.layer.putalpha(_mask_and(overlay.layer.getchannel("A"), keep))
        self.layer.alpha_composite(overlay.layer)


def _mask_and(first: Image.Image, second: Image.Image) -> Image.Image:
    return Image.fromarray(np.minimum(np.asarray(first), np.asarray(second)))


def _shade(colour: Colour, factor: float) -> Colour:
    """Darker (factor < 1) or lighter (factor > 1, towards white) version of a colour."""
    if factor <= 1:
        return tuple(int(c * factor) for c in colour)
    return tuple(int(c + (255 - c) * (factor - 1)) for c in colour)


_DARK = (25, 22, 22)
_WHITE = (250, 250, 248)


@dataclass(frozen=True)
class _Anchors:
    """Where outfits go on a live figure, in unit coordinates."""

    head: tuple[float, float, float]  # centre u, v and radius
    eye: tuple[float, float]
    neck: tuple[float, float]
    torso: tuple[float, float, float, float]


def _draw_dog(p: _Painter, item: Instance) -> _Anchors:
    body, accent = item.body, item.accent
    p.line([(-0.31, 0.47), (-0.4, 0.58), (-0.44, 0.68)], body, 0.055, body=True)  # tail
    for u in (-0.27, -0.17, 0.08, 0.18):
        p.rect(u - 0.04, 0.0, u + 0.04, 0.42, body if u in (-0.17, 0.18) else _shade(body, 0.85), body=True)
    p.ellipse(-0.05, 0.44, 0.3, 0.14, body, body=True)
    p.polygon([(0.1, 0.5), (0.24, 0.7), (0.36, 0.62), (0.24, 0.4)], body, body=True)  # neck
    p.ellipse(0.3, 0.64, 0.13, 0.12, body, body=True)
    p.ellipse(0.42, 0.59, 0.09, 0.06, _shade(body, 1.15), body=True)  # snout
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    if item.ears == "floppy":
        p.ellipse(0.23, 0.62, 0.05, 0.11, accent)
    else:
        p.polygon([(0.2, 0.71), (0.25, 0.87), (0.32, 0.74)], accent)
    p.ellipse(0.5, 0.61, 0.028, 0.024, _DARK)  # nose
    p.ellipse(0.34, 0.68, 0.022, 0.022, _DARK)
    return _Anchors(head=(0.29, 0.66, 0.13), eye=(0.34, 0.68), neck=(0.22, 0.52), torso=(-0.35, 0.28, 0.24, 0.6))


def _draw_cat(p: _Painter, item: Instance) -> _Anchors:
    body, accent = item.body, item.accent
    p.line([(-0.28, 0.38), (-0.42, 0.48), (-0.44, 0.66), (-0.38, 0.8)], body, 0.045, body=True)  # upright tail
    for u in (-0.24, -0.15, 0.07, 0.15):
        p.rect(u - 0.03, 0.0, u + 0.03, 0.34, body if u in (-0.15, 0.15) else _shade(body, 0.85), body=True)
    p.ellipse(-0.05, 0.37, 0.26, 0.12, body, body=True)
    p.polygon([(0.08, 0.42), (0.2, 0.6), (0.32, 0.54), (0.2, 0.34)], body, body=True)
    p.ellipse(0.27, 0.58, 0.12, 0.11, body, body=True)
    for tip in (0.2, 0.33):
        p.polygon([(tip - 0.07, 0.64), (tip, 0.8), (tip + 0.05, 0.64)], body, body=True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    for tip in (0.2, 0.33):
        p.polygon([(tip - 0.04, 0.66), (tip, 0.75), (tip + 0.025, 0.66)], accent)  # inner ears
    p.ellipse(0.31, 0.6, 0.03, 0.025, (120, 200, 90))
    p.ellipse(0.31, 0.6, 0.012, 0.022, _DARK)
    p.ellipse(0.38, 0.55, 0.018, 0.014, (230, 120, 140))  # nose
    for dv in (-0.02, 0.01):
        p.line([(0.38, 0.54 + dv), (0.48, 0.53 + 2 * dv)], _shade(body, 0.5), 0.008)
    return _Anchors(head=(0.27, 0.6, 0.12), eye=(0.31, 0.6), neck=(0.2, 0.46), torso=(-0.31, 0.24, 0.21, 0.52))


def _draw_stuffed_animal(p: _Painter, item: Instance) -> None:
    body, accent = item.body, item.accent
    for u in (-0.15, 0.15):
        p.ellipse(u, 0.86, 0.08, 0.08, body, body=True)
    for u in (-0.25, 0.25):
        p.ellipse(u, 0.38, 0.07, 0.13, body, body=True)  # arms
    for u in (-0.13, 0.13):
        p.ellipse(u, 0.08, 0.09, 0.08, body, body=True)
    p.ellipse(0.0, 0.32, 0.21, 0.24, body, body=True)
    p.ellipse(0.0, 0.69, 0.19, 0.18, body, body=True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    for u in (-0.15, 0.15):
        p.ellipse(u, 0.86, 0.04, 0.04, accent)
        p.ellipse(u, 0.07, 0.05, 0.045, accent)
    p.ellipse(0.03, 0.62, 0.08, 0.06, accent)  # muzzle, turned towards where it faces
    p.ellipse(0.04, 0.65, 0.025, 0.02, _DARK)
    for u in (-0.05, 0.1):
        p.ellipse(u, 0.74, 0.022, 0.022, _DARK)


def _draw_backpack(p: _Painter, item: Instance) -> None:
    p.line([(-0.1, 0.78), (-0.06, 0.88), (0.06, 0.88), (0.1, 0.78)], _shade(item.accent, 0.7), 0.035)  # handle
    p.rect(0.2, 0.1, 0.27, 0.7, _shade(item.accent, 0.8), radius=0.03)  # strap on the far side
    p.rect(-0.22, 0.02, 0.22, 0.8, item.body, body=True, radius=0.1)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.polygon([(-0.22, 0.62), (-0.2, 0.76), (-0.1, 0.82), (0.1, 0.82), (0.2, 0.76), (0.22, 0.62)], item.accent)
    p.rect(-0.15, 0.08, 0.15, 0.36, item.accent, radius=0.05)  # front pocket
    p.line([(-0.1, 0.32), (0.1, 0.32)], _shade(item.accent, 0.6), 0.015)


def _draw_teapot(p: _Painter, item: Instance) -> None:
    p.ellipse(-0.3, 0.34, 0.11, 0.13, None, outline=item.accent, width=0.045)  # handle
    p.polygon([(0.18, 0.24), (0.46, 0.56), (0.5, 0.55), (0.44, 0.5), (0.22, 0.42)], item.body, body=True)  # spout
    p.ellipse(0.0, 0.28, 0.28, 0.25, item.body, body=True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.ellipse(0.0, 0.52, 0.15, 0.05, item.accent)
    p.ellipse(0.0, 0.58, 0.04, 0.04, item.accent)
    p.rect(-0.14, 0.0, 0.14, 0.04, _shade(item.accent, 0.8))


def _draw_vase(p: _Painter, item: Instance) -> None:
    profile = [(0.09, 0.0), (0.18, 0.1), (0.21, 0.3), (0.15, 0.5), (0.07, 0.62), (0.07, 0.72), (0.13, 0.8)]
    outline = profile + [(-u, v) for u, v in reversed(profile)]
    p.polygon(outline, item.body, body=True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.ellipse(0.0, 0.8, 0.13, 0.03, item.accent)
    p.ellipse(0.0, 0.8, 0.07, 0.015, _DARK)


def _draw_bowl(p: _Painter, item: Instance) -> None:
    arc = [(0.4 * math.cos(a), 0.32 - 0.28 * math.sin(a)) for a in np.linspace(0, math.pi, 24)]
    p.polygon(arc, item.body, body=True)
    p.rect(-0.12, 0.0, 0.12, 0.06, _shade(item.body, 0.8), body=True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.ellipse(0.0, 0.32, 0.4, 0.07, item.accent)
    p.ellipse(0.0, 0.32, 0.34, 0.045, _shade(item.accent, 0.7))


def _draw_can(p: _Painter, item: Instance) -> None:
    p.rect(-0.17, 0.03, 0.17, 0.6, item.body, body=True)
    p.ellipse(0.0, 0.03, 0.17, 0.035, item.body, body=True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.rect(-0.17, 0.25, 0.17, 0.36, item.accent)  # label
    p.ellipse(0.0, 0.6, 0.17, 0.04, (195, 195, 200))
    p.ellipse(0.04, 0.61, 0.05, 0.015, (150, 150, 155))
    p.rect(0.12, 0.05, 0.15, 0.58, _shade(item.body, 1.3))  # a gleam down one side


def _draw_boot(p: _Painter, item: Instance) -> None:
    p.rect(-0.2, 0.1, 0.06, 0.74, item.body, body=True)
    p.polygon([(-0.2, 0.03), (0.34, 0.03), (0.35, 0.13), (0.22, 0.24), (0.06, 0.28), (-0.2, 0.28)], item.body, True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.rect(-0.22, 0.64, 0.08, 0.76, item.accent)  # cuff
    p.rect(-0.22, 0.0, 0.36, 0.05, _shade(item.accent, 0.5))  # sole
    p.rect(-0.22, 0.0, -0.1, 0.09, _shade(item.accent, 0.5))  # heel


def _draw_sneaker(p: _Painter, item: Instance) -> None:
    upper = [(-0.36, 0.06), (0.38, 0.06), (0.39, 0.14), (0.2, 0.24), (0.0, 0.3), (-0.24, 0.34), (-0.36, 0.27)]
    p.polygon(upper, item.body, body=True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.rect(-0.38, 0.0, 0.41, 0.07, _WHITE, radius=0.03)  # sole
    p.polygon([(0.22, 0.07), (0.39, 0.07), (0.39, 0.14), (0.25, 0.2)], item.accent)  # toe cap
    p.line([(-0.2, 0.12), (0.0, 0.22), (0.14, 0.12)], item.accent, 0.03)  # side stripe
    for u in (-0.06, 0.02, 0.1):
        p.line([(u, 0.26), (u + 0.05, 0.21)], _WHITE, 0.015)  # laces


def _draw_candle(p: _Painter, item: Instance) -> None:
    p.ellipse(0.0, 0.03, 0.2, 0.04, item.accent)  # holder
    p.rect(-0.1, 0.04, 0.1, 0.58, item.body, body=True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.ellipse(0.0, 0.58, 0.1, 0.025, _shade(item.body, 1.2))
    p.line([(0.0, 0.58), (0.0, 0.64)], _DARK, 0.012)
    p.ellipse(0.0, 0.7, 0.04, 0.07, (250, 170, 40))
    p.ellipse(0.0, 0.68, 0.02, 0.035, (255, 240, 150))


def _draw_clock(p: _Painter, item: Instance) -> None:
    for u in (-0.2, 0.2):
        p.ellipse(u, 0.7, 0.09, 0.07, item.accent)  # bells
        p.line([(u * 0.7, 0.06), (u * 1.1, 0.0)], _DARK, 0.03)  # legs
    p.ellipse(0.0, 0.4, 0.29, 0.29, item.body, body=True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.ellipse(0.0, 0.4, 0.21, 0.21, _WHITE)
    p.line([(0.0, 0.4), (0.0, 0.56)], _DARK, 0.025)
    p.line([(0.0, 0.4), (0.11, 0.36)], _DARK, 0.025)


def _draw_toy(p: _Painter, item: Instance) -> None:
    for u in (-0.16, 0.16):
        p.ellipse(u, 0.08, 0.08, 0.08, _DARK)  # wheels
    p.line([(-0.2, 0.4), (-0.32, 0.28)], _shade(item.accent, 0.8), 0.05)  # arms
    p.line([(0.2, 0.4), (0.32, 0.28)], _shade(item.accent, 0.8), 0.05)
    p.rect(-0.22, 0.12, 0.22, 0.5, item.body, body=True, radius=0.05)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.rect(-0.16, 0.52, 0.16, 0.78, item.accent, radius=0.04)  # head
    p.line([(0.0, 0.78), (0.0, 0.9)], _DARK, 0.02)
    p.ellipse(0.0, 0.91, 0.035, 0.035, (250, 210, 50))
    for u in (-0.02, 0.1):
        p.ellipse(u, 0.66, 0.04, 0.04, _WHITE)
        p.ellipse(u + 0.01, 0.66, 0.02, 0.02, _DARK)


def _draw_cube(p: _Painter, item: Instance) -> _Anchors | None:
    """Any class as a cube in its colours: front face, lighter top, darker side; live classes keep
    their ears, eyes and tail so a cube shaped dog is still a dog."""
    depth = 0.12
    p.rect(-0.28, 0.0, 0.22, 0.5, item.body, body=True)
    p.polygon([(-0.28, 0.5), (-0.28 + depth, 0.5 + depth), (0.22 + depth, 0.5 + depth), (0.22, 0.5)], item.body, True)
    p.polygon([(0.22, 0.0), (0.22 + depth, depth), (0.22 + depth, 0.5 + depth), (0.22, 0.5)], item.body, True)
    p.on_body(lambda overlay: _draw_marking(overlay, item))
    p.polygon(
        [(-0.28, 0.5), (-0.28 + depth, 0.5 + depth), (0.22 + depth, 0.5 + depth), (0.22, 0.5)],
        (255, 255, 255, 70),
    )
    p.polygon([(0.22, 0.0), (0.22 + depth, depth), (0.22 + depth, 0.5 + depth), (0.22, 0.5)], (0, 0, 0, 70))
    if CLASSES[item.class_name] != "live":
        p.rect(-0.28, 0.0, 0.22, 0.06, item.accent)
        return None
    for u in (-0.16, 0.1):
        p.polygon([(u - 0.06, 0.61), (u + 0.01, 0.76), (u + 0.07, 0.61)], item.accent)
    p.line([(-0.28, 0.3), (-0.4, 0.45)], item.body, 0.05)
    for u in (0.02, 0.14):
        p.ellipse(u, 0.34, 0.03, 0.03, _DARK)
    return _Anchors(head=(0.0, 0.5, 0.18), eye=(0.14, 0.34), neck=(-0.03, 0.42), torso=(-0.28, 0.0, 0.22, 0.3))


_DRAWERS: dict[str, Callable[[_Painter, Instance], _Anchors | None]] = {
    "dog": _draw_dog,
    "cat": _draw_cat,
    "backpack": _draw_backpack,
    "bowl": _draw_bowl,
    "boot": _draw_boot,
    "can": _draw_can,
    "candle": _draw_candle,
    "clock": _draw_clock,
    "sneaker": _draw_sneaker,
    "stuffed animal": _draw_stuffed_animal,
    "teapot": _draw_teapot,
    "toy": _draw_toy,
    "vase": _draw_vase,
}


def _draw_marking(p: _Painter, item: Instance) -> None:
    """The instance's pattern over the whole figure area; the caller keeps what falls on the body."""
    colour = item.marking_colour
    rng = np.random.default_rng(item.pattern_seed)
    if item.marking == "spots":
        for _ in range(7):
            p.ellipse(rng.uniform(-0.4, 0.4), rng.uniform(0.05, 0.8), 0.05, 0.05, colour)
    elif item.marking == "stripes":
        for u in np.arange(-0.45, 0.5, 0.14):
            p.rect(u, 0.0, u + 0.05, 1.0, colour)
    elif item.marking == "patch":
        p.ellipse(rng.uniform(-0.15, 0.15), rng.uniform(0.3, 0.5), 0.14, 0.12, colour)
    elif item.marking == "band":
        p.rect(-0.5, 0.22, 0.5, 0.32, colour)
    elif item.marking == "checks":
        for i, u in enumerate(np.arange(-0.5, 0.5, 0.1)):
            for j, v in enumerate(np.arange(0.0, 1.0, 0.1)):
                if (i + j) % 2 == 0:
                    p.rect(u, v, u + 0.1, v + 0.1, colour)
    elif item.marking == "stars":
        for u, v in ((-0.12, 0.42), (0.1, 0.25), (0.08, 0.6), (-0.25, 0.15)):
            p.polygon(_star(u, v, 0.08), colour)
    elif item.marking == "zigzag":
        for v in (0.2, 0.42, 0.64):
            p.line(
                [(u, v + (0.05 if i % 2 else -0.05)) for i, u in enumerate(np.arange(-0.5, 0.55, 0.1))], colour, 0.04
            )
    elif item.marking == "hearts":
        for u, v in ((-0.12, 0.4), (0.12, 0.22), (0.1, 0.58), (-0.25, 0.15)):
            p.ellipse(u - 0.03, v + 0.02, 0.035, 0.035, colour)
            p.ellipse(u + 0.03, v + 0.02, 0.035, 0.035, colour)
            p.polygon([(u - 0.065, v + 0.01), (u + 0.065, v + 0.01), (u, v - 0.07)], colour)
    elif item.marking == "rings":
        for radius in (0.08, 0.18, 0.28):
            p.ellipse(0.0, 0.35, radius, radius, None, outline=colour, width=0.035)


def _star(u: float, v: float, radius: float) -> list[tuple[float, float]]:
    return [
        (u + r * math.sin(a), v + r * math.cos(a))
        for k in range(10)
        for a, r in [(k * math.pi / 5, radius if k % 2 == 0 else radius * 0.45)]
    ]


def _draw_outfit(p: _Painter, outfit: str, at: _Anchors) -> None:
    hu, hv, hr = at.head
    top = hv + 0.75 * hr

    def coat(colour: Colour) -> None:
        p.on_body(lambda overlay: overlay.rect(*at.torso, colour), region=at.torso)

    if outfit == "wearing a red hat":
        p.ellipse(hu, top + 0.02, hr * 1.0, hr * 0.75, (210, 25, 30))
        p.rect(hu - hr * 0.3, top - 0.03, hu + hr * 1.5, top + 0.02, (170, 20, 25))
    elif outfit == "wearing a santa hat":
        p.polygon([(hu - hr, top - 0.02), (hu + hr * 0.9, top - 0.02), (hu - hr * 1.3, top + 0.22)], (210, 25, 30))
        p.rect(hu - hr * 1.05, top - 0.05, hu + hr * 1.0, top + 0.01, _WHITE, radius=0.02)
        p.ellipse(hu - hr * 1.3, top + 0.22, 0.035, 0.035, _WHITE)
    elif outfit == "wearing a rainbow scarf":
        nu, nv = at.neck
        rainbow = [(220, 40, 40), (245, 140, 30), (245, 220, 40), (60, 170, 60), (50, 100, 210), (130, 60, 180)]
        for i, colour in enumerate(rainbow):
            p.ellipse(nu, nv + 0.06 - i * 0.022, 0.1, 0.018, colour)
        for i, colour in enumerate(rainbow):
            p.rect(nu - 0.06 + i * 0.018, nv - 0.2, nu - 0.042 + i * 0.018, nv, colour)
    elif outfit == "wearing a black top hat and a monocle":
        p.rect(hu - hr * 0.6, top, hu + hr * 0.6, top + 0.2, _DARK)
        p.rect(hu - hr * 1.0, top - 0.01, hu + hr * 1.0, top + 0.02, _DARK)
        eu, ev = at.eye
        p.ellipse(eu, ev, 0.045, 0.045, None, outline=(230, 200, 80), width=0.012)
        p.line([(eu, ev - 0.045), (eu - 0.04, ev - 0.15)], (230, 200, 80), 0.008)
    elif outfit == "in a chef outfit":
        coat(_WHITE)
        p.rect(hu - hr * 0.55, top - 0.02, hu + hr * 0.55, top + 0.12, _WHITE)
        for du in (-0.5, 0.0, 0.5):
            p.ellipse(hu + du * hr, top + 0.15, hr * 0.45, hr * 0.45, _WHITE)
    elif outfit == "in a firefighter outfit":
        coat((200, 150, 40))
        p.on_body(lambda overlay: overlay.rect(-0.5, 0.36, 0.5, 0.4, (240, 240, 120)), region=at.torso)
        p.ellipse(hu, top - 0.01, hr * 0.95, hr * 0.6, (205, 30, 25))
        p.rect(hu - hr * 1.1, top - 0.04, hu + hr * 1.3, top, (160, 20, 20))
    elif outfit == "in a police outfit":
        coat((30, 40, 90))
        p.ellipse((at.torso[0] + at.torso[2]) / 2 + 0.1, (at.torso[1] + at.torso[3]) / 2, 0.025, 0.03, (230, 200, 80))
        p.rect(hu - hr * 0.8, top - 0.02, hu + hr * 0.8, top + 0.1, (30, 40, 90))
        p.rect(hu, top - 0.04, hu + hr * 1.3, top, _DARK)
    elif outfit == "wearing pink glasses":
        eu, ev = at.eye
        for du in (-0.11, 0.01):
            p.ellipse(eu + du, ev, 0.055, 0.05, (255, 170, 215), outline=(245, 70, 170), width=0.025)
        p.line([(eu - 0.06, ev), (eu - 0.04, ev)], (245, 70, 170), 0.02)
    elif outfit == "wearing a yellow shirt":
        coat((245, 215, 40))
    elif outfit == "in a purple wizard outfit":
        coat((110, 40, 160))
        p.polygon([(hu - hr, top - 0.02), (hu + hr, top - 0.02), (hu - hr * 0.2, top + 0.32)], (110, 40, 160))
        p.rect(hu - hr * 1.2, top - 0.03, hu + hr * 1.2, top + 0.0, (90, 30, 130))
        p.polygon(_star(hu - 0.2 * hr, top + 0.1, 0.035), (250, 220, 60))


def _figure(scene: Scene, canvas: int) -> Image.Image:
    """The scene's figure on a transparent layer of the canvas size."""
    item = scene.instance
    if scene.attribute in _MODIFIER_COLOURS:
        colour = _MODIFIER_COLOURS[scene.attribute]
        item = replace(item, body=colour, accent=_shade(colour, 0.7))
    elif scene.attribute == "wet":
        item = replace(item, body=_shade(item.body, 0.75), accent=_shade(item.accent, 0.75))
    p = _Painter(canvas, scene)
    drawer = _draw_cube if scene.attribute == "cube shaped" else _DRAWERS[item.class_name]
    anchors = drawer(p, item)
    if scene.attribute in OUTFITS and anchors is not None:
        _draw_outfit(p, scene.attribute, anchors)
    if scene.attribute == "shiny":
        p.on_body(lambda overlay: _draw_gleams(overlay))
        for u, v in ((-0.42, 0.75), (0.4, 0.85), (0.35, 0.2)):
            p.polygon(_star(u, v, 0.06), (255, 255, 230))
    elif scene.attribute == "wet":
        rng = np.random.default_rng(scene.detail_seed + 1)
        for _ in range(14):
            u, v = rng.uniform(-0.45, 0.45), rng.uniform(0.05, 0.95)
            p.ellipse(u, v, 0.018, 0.03, (170, 215, 255))
    return p.layer


def _draw_gleams(p: _Painter) -> None:
    for u, v, size in ((-0.15, 0.55, 0.06), (0.05, 0.4, 0.04), (0.2, 0.65, 0.03), (-0.25, 0.25, 0.035)):
        p.ellipse(u, v, size * 1.6, size, (255, 255, 255, 220))


# ---------------------------------------------------------------------------------------------
# Backgrounds: each draws the whole canvas; `size` is the canvas side in pixels.


def _gradient(draw: ImageDraw.ImageDraw, size: int, top: Colour, bottom: Colour, y0: float, y1: float) -> None:
    start, stop = int(y0 * size), int(y1 * size)
    for y in range(start, stop):
        t = (y - start) / max(1, stop - start - 1)
        draw.line((0, y, size, y), fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))


def _sky(draw, size, horizon):
    _gradient(draw, size, (110, 170, 235), (195, 225, 250), 0.0, horizon)


def _ground(draw, size, colour, y0):
    draw.rectangle((0, int(y0 * size), size, size), fill=colour)


def _plain(draw, size, rng):
    wall = _pick(rng, [(225, 225, 222), (210, 200, 185), (235, 232, 225), (190, 198, 205), (200, 195, 190)])
    _ground(draw, size, wall, 0.0)
    _gradient(draw, size, _shade(wall, 0.9), _shade(wall, 0.8), 0.62, 1.0)


def _beach(draw, size, rng):
    _sky(draw, size, 0.42)
    _ground(draw, size, (30, 100, 170), 0.42)
    _ground(draw, size, (230, 205, 150), 0.56)
    draw.line((0, 0.56 * size, size, 0.56 * size), fill=_WHITE, width=max(2, size // 60))
    for _ in range(60):
        x, y = rng.uniform(0, size), rng.uniform(0.6, 1.0) * size
        draw.ellipse((x, y, x + 3, y + 2), fill=(205, 180, 125))


def _snow(draw, size, rng):
    _gradient(draw, size, (195, 210, 228), (232, 238, 245), 0.0, 0.45)
    draw.ellipse((-0.3 * size, 0.35 * size, 0.7 * size, 0.7 * size), fill=(236, 240, 248))
    draw.ellipse((0.4 * size, 0.38 * size, 1.4 * size, 0.7 * size), fill=(228, 234, 244))
    _gradient(draw, size, (240, 244, 250), (250, 252, 255), 0.5, 1.0)
    for _ in range(70):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1, 3) * size / 256
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_WHITE)


def _jungle(draw, size, rng):
    _ground(draw, size, (20, 75, 35), 0.0)
    for _ in range(90):
        x, y = rng.uniform(0, size), rng.uniform(0, 0.85) * size
        w, h = rng.uniform(0.04, 0.1) * size, rng.uniform(0.02, 0.05) * size
        green = (int(rng.integers(30, 90)), int(rng.integers(110, 190)), int(rng.integers(30, 80)))
        draw.ellipse((x - w, y - h, x + w, y + h), fill=green)
    _gradient(draw, size, (70, 70, 30), (55, 50, 25), 0.82, 1.0)


def _cobblestone(draw, size, rng):
    _ground(draw, size, (150, 140, 130), 0.0)
    _ground(draw, size, (95, 95, 100), 0.42)
    y = 0.42 * size
    row = 0
    while y < size:
        height = size * (0.04 + 0.05 * (y / size - 0.42))
        x = -(row % 2) * height
        while x < size:
            grey = int(rng.integers(135, 175))
            draw.rounded_rectangle(
                (x + 2, y + 2, x + 1.5 * height - 2, y + height - 2), radius=height / 4, fill=(grey, grey, grey + 4)
            )
            x += 1.5 * height
        y += height
        row += 1


def _pink_fabric(draw, size, rng):
    _ground(draw, size, (240, 160, 190), 0.0)
    for k in range(9):
        base, phase = (k + 0.5) * size / 9, rng.uniform(0, 6.3)
        points = [(x, base + 0.03 * size * math.sin(x / size * 9 + phase)) for x in range(0, size + 8, 8)]
        draw.line(points, fill=(215, 125, 160) if k % 2 else (250, 190, 210), width=max(2, size // 40))


def _wooden_floor(draw, size, rng):
    _ground(draw, size, (225, 210, 185), 0.0)
    y, plank = 0.45 * size, 0.07 * size
    while y < size:
        shade = int(rng.integers(-18, 18))
        draw.rectangle((0, y, size, y + plank), fill=(160 + shade, 110 + shade, 60 + shade // 2))
        draw.line((0, y, size, y), fill=(95, 60, 30), width=max(1, size // 128))
        joint = rng.uniform(0, size)
        draw.line((joint, y, joint, y + plank), fill=(95, 60, 30), width=max(1, size // 128))
        y += plank
        plank *= 1.15


def _city(draw, size, rng):
    _sky(draw, size, 0.75)
    x = 0.0
    while x < size:
        width, height = rng.uniform(0.08, 0.16) * size, rng.uniform(0.2, 0.55) * size
        grey = int(rng.integers(60, 115))
        top = 0.72 * size - height
        draw.rectangle((x, top, x + width, 0.75 * size), fill=(grey, grey + 5, grey + 20))
        for wx in np.arange(x + 4, x + width - 6, size / 28):
            for wy in np.arange(top + 5, 0.7 * size, size / 20):
                if rng.random() < 0.5:
                    draw.rectangle((wx, wy, wx + size / 64, wy + size / 48), fill=(245, 220, 120))
        x += width + rng.uniform(0, 0.02) * size
    _ground(draw, size, (105, 105, 110), 0.72)


def _mountain(draw, size, rng):
    _sky(draw, size, 0.65)
    for peak_x, peak_y, half in ((0.25, 0.12, 0.45), (0.72, 0.2, 0.4), (0.5, 0.3, 0.3)):
        grey = int(rng.integers(95, 130))
        px, py, h = peak_x * size, peak_y * size, half * size
        draw.polygon([(px - h, 0.66 * size), (px, py), (px + h, 0.66 * size)], fill=(grey, grey, grey + 30))
        cap = (0.66 * size - py) * 0.25
        draw.polygon(
            [(px - h * cap / (0.66 * size - py), py + cap), (px, py), (px + h * cap / (0.66 * size - py), py + cap)],
            fill=_WHITE,
        )
    _ground(draw, size, (90, 150, 70), 0.64)


def _blue_house(draw, size, rng):
    _sky(draw, size, 0.62)
    _ground(draw, size, (95, 160, 75), 0.6)
    left = rng.uniform(0.5, 0.6) * size if rng.random() < 0.5 else rng.uniform(0.02, 0.1) * size
    width = 0.4 * size
    draw.rectangle((left, 0.32 * size, left + width, 0.62 * size), fill=(45, 90, 200))
    draw.polygon(
        [(left - 0.03 * size, 0.33 * size), (left + width / 2, 0.14 * size), (left + width + 0.03 * size, 0.33 * size)],
        fill=(130, 45, 40),
    )
    draw.rectangle((left + 0.16 * size, 0.47 * size, left + 0.24 * size, 0.62 * size), fill=(240, 240, 235))
    for wx in (left + 0.04 * size, left + 0.29 * size):
        draw.rectangle((wx, 0.39 * size, wx + 0.07 * size, 0.46 * size), fill=(235, 240, 250))


def _purple_rug_forest(draw, size, rng):
    _gradient(draw, size, (180, 205, 185), (150, 180, 150), 0.0, 0.6)
    for _ in range(9):
        x = rng.uniform(0, size)
        draw.rectangle((x - 0.02 * size, 0.25 * size, x + 0.02 * size, 0.62 * size), fill=(90, 60, 35))
        r = rng.uniform(0.08, 0.14) * size
        draw.ellipse((x - r, 0.22 * size - r, x + r, 0.22 * size + r), fill=(40, int(rng.integers(90, 130)), 45))
    _ground(draw, size, (55, 95, 45), 0.6)
    draw.ellipse((0.05 * size, 0.68 * size, 0.95 * size, 1.02 * size), fill=(120, 50, 150))
    draw.ellipse((0.12 * size, 0.72 * size, 0.88 * size, 0.98 * size), outline=(160, 90, 190), width=max(2, size // 60))


def _wheat_field(draw, size, rng):
    _sky(draw, size, 0.45)
    _ground(draw, size, (220, 180, 80), 0.45)
    for _ in range(260):
        x, y = rng.uniform(0, size), rng.uniform(0.45, 1.0) * size
        length = (0.02 + 0.05 * (y / size - 0.45)) * size
        draw.line((x, y, x + 1, y - length), fill=(185, 140, 45), width=max(1, size // 160))


def _autumn_tree(draw, size, rng):
    _sky(draw, size, 0.62)
    _ground(draw, size, (150, 120, 70), 0.6)
    trunk = rng.uniform(0.15, 0.3) * size if rng.random() < 0.5 else rng.uniform(0.7, 0.85) * size
    draw.rectangle((trunk - 0.04 * size, 0.3 * size, trunk + 0.04 * size, 0.62 * size), fill=(90, 55, 30))
    for _ in range(40):
        x, y = trunk + rng.normal(0, 0.12) * size, rng.uniform(0.05, 0.35) * size
        r = rng.uniform(0.04, 0.08) * size
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_pick(rng, [(220, 110, 30), (190, 50, 30), (235, 170, 40)]))
    for _ in range(50):
        x, y = rng.uniform(0, size), rng.uniform(0.62, 1.0) * size
        draw.ellipse(
            (x, y, x + size / 50, y + size / 80), fill=_pick(rng, [(220, 110, 30), (190, 50, 30), (235, 170, 40)])
        )


def _eiffel_tower(draw, size, rng):
    _gradient(draw, size, (165, 195, 230), (220, 225, 235), 0.0, 0.72)
    _ground(draw, size, (135, 150, 105), 0.7)
    cx = rng.uniform(0.62, 0.8) * size if rng.random() < 0.5 else rng.uniform(0.2, 0.38) * size
    colour, base = (85, 75, 65), 0.72 * size
    draw.polygon(
        [
            (cx - 0.15 * size, base),
            (cx - 0.015 * size, 0.05 * size),
            (cx + 0.015 * size, 0.05 * size),
            (cx + 0.15 * size, base),
        ],
        fill=colour,
    )
    draw.ellipse((cx - 0.08 * size, 0.58 * size, cx + 0.08 * size, 0.8 * size), fill=(190, 200, 215))  # the arch
    for y in (0.35, 0.55):
        draw.rectangle(
            (cx - 0.1 * size * (1.3 - y), y * size, cx + 0.1 * size * (1.3 - y), y * size + size / 50), fill=colour
        )
    draw.line((cx, 0.0, cx, 0.06 * size), fill=colour, width=max(1, size // 128))


def _water(draw, size, rng):
    _sky(draw, size, 0.3)
    _gradient(draw, size, (40, 110, 180), (25, 80, 150), 0.3, 1.0)
    _ripples(draw, size, rng, (110, 170, 220))


def _milk(draw, size, rng):
    _gradient(draw, size, (215, 222, 235), (235, 238, 242), 0.0, 0.3)
    _ground(draw, size, (248, 246, 240), 0.3)
    _ripples(draw, size, rng, (222, 218, 205))


def _ripples(draw, size, rng, colour):
    for _ in range(30):
        x, y = rng.uniform(0, size), rng.uniform(0.32, 1.0) * size
        w = (0.03 + 0.08 * (y / size)) * size
        draw.arc((x - w, y - w / 5, x + w, y + w / 5), 200, 340, fill=colour, width=max(1, size // 128))


def _sunflower(draw, x, y, r):
    draw.line((x, y, x, y + 3 * r), fill=(50, 120, 40), width=max(1, int(r / 3)))
    for k in range(10):
        a = k * math.pi / 5
        px, py = x + r * math.cos(a), y + r * math.sin(a)
        draw.ellipse((px - r / 2, py - r / 2, px + r / 2, py + r / 2), fill=(250, 205, 30))
    draw.ellipse((x - r * 0.6, y - r * 0.6, x + r * 0.6, y + r * 0.6), fill=(110, 65, 25))


def _sunflowers(draw, size, rng):
    _sky(draw, size, 0.4)
    _ground(draw, size, (80, 170, 60), 0.4)
    for _ in range(14):
        _sunflower(draw, rng.uniform(0, size), rng.uniform(0.3, 0.55) * size, rng.uniform(0.025, 0.04) * size)


def _sunflowers_front(draw, size, rng):
    for x in (rng.uniform(0.02, 0.18), rng.uniform(0.82, 0.98)):
        _sunflower(draw, x * size, rng.uniform(0.68, 0.8) * size, 0.06 * size)


def _mirror(draw, size, rng):
    _ground(draw, size, (200, 198, 205), 0.0)
    _gradient(draw, size, (185, 195, 208), (235, 238, 244), 0.5, 1.0)
    for _ in range(3):  # glints
        x = rng.uniform(0, size)
        draw.polygon(
            [(x, 0.5 * size), (x + 0.05 * size, 0.5 * size), (x - 0.1 * size, size), (x - 0.15 * size, size)],
            fill=(240, 243, 248),
        )
    draw.line((0, 0.5 * size, size, 0.5 * size), fill=(150, 150, 160), width=max(2, size // 64))


def _crowded_street(draw, size, rng):
    _ground(draw, size, (165, 150, 140), 0.0)
    for _ in range(16):
        x, height = rng.uniform(0, size), rng.uniform(0.2, 0.3) * size
        top = 0.62 * size - height
        width = height * 0.3
        colour = (int(rng.integers(30, 220)), int(rng.integers(30, 220)), int(rng.integers(30, 220)))
        draw.rounded_rectangle(
            (x - width / 2, top + width * 0.7, x + width / 2, 0.62 * size), radius=width / 3, fill=colour
        )
        skin = _pick(rng, [(240, 200, 170), (200, 150, 110), (130, 90, 60)])
        draw.ellipse((x - width * 0.35, top, x + width * 0.35, top + width * 0.7), fill=skin)
    _ground(draw, size, (178, 178, 172), 0.6)
    for y in np.arange(0.66, 1.0, 0.1):
        draw.line((0, y * size, size, y * size), fill=(150, 150, 145), width=max(1, size // 128))


def _dirt_road(draw, size, rng):
    _sky(draw, size, 0.45)
    _ground(draw, size, (95, 150, 70), 0.44)
    vanish = rng.uniform(0.4, 0.6) * size
    draw.polygon(
        [(vanish - 4, 0.44 * size), (vanish + 4, 0.44 * size), (1.1 * size, size), (-0.1 * size, size)],
        fill=(150, 110, 70),
    )
    for offset in (-0.25, 0.25):
        draw.line((vanish, 0.44 * size, (0.5 + offset) * size, size), fill=(120, 85, 50), width=max(2, size // 50))


def _white_rug(draw, size, rng):
    _ground(draw, size, (190, 180, 170), 0.0)
    _ground(draw, size, (140, 110, 80), 0.5)
    draw.rounded_rectangle((0.04 * size, 0.6 * size, 0.96 * size, 1.05 * size), radius=size // 20, fill=(245, 245, 240))
    for _ in range(120):
        x, y = rng.uniform(0.06, 0.94) * size, rng.uniform(0.62, 1.0) * size
        draw.ellipse((x, y, x + 3, y + 3), fill=(225, 225, 218))


_BACKGROUNDS = dict(
    zip(
        CONTEXTS,
        (
            _jungle,
            _snow,
            _beach,
            _cobblestone,
            _pink_fabric,
            _wooden_floor,
            _city,
            _mountain,
            _blue_house,
            _purple_rug_forest,
            _wheat_field,
            _autumn_tree,
            _eiffel_tower,
            _water,
            _milk,
            _sunflowers,
            _mirror,
            _crowded_street,
            _dirt_road,
            _white_rug,
        ),
        strict=True,
    )
)
_FLOATING = ("floating on top of water", "floating in an ocean of milk")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels; the same scene gives the same pixels."""
    canvas = size * _SUPERSAMPLE
    rng = np.random.default_rng(scene.detail_seed)
    image = Image.new("RGB", (canvas, canvas))
    draw = ImageDraw.Draw(image)
    _BACKGROUNDS.get(scene.context, _plain)(draw, canvas, rng)
    background = image.copy()
    figure = _figure(scene, canvas)
    base_y, half_width = scene.ground * canvas, 0.32 * scene.scale * canvas * scene.instance.width
    centre_x = scene.x * canvas
    if scene.context == "on top of a mirror":
        reflection = figure.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        reflection = reflection.transform(
            reflection.size,
            Image.Transform.AFFINE,
            (1, 0, 0, 0, 1, canvas - 2 * base_y),
            resample=Image.Resampling.NEAREST,
        )
        reflection.putalpha(reflection.getchannel("A").point(lambda a: a * 45 // 100))
        image.paste(reflection, mask=reflection)
    elif scene.context not in _FLOATING:
        shadow = Image.new("RGBA", image.size, (0, 0, 0, 0))
        colour = (120, 160, 220, 150) if scene.attribute == "wet" else (0, 0, 0, 60)
        ImageDraw.Draw(shadow).ellipse(
            (centre_x - half_width * 1.4, base_y - 0.03 * canvas, centre_x + half_width * 1.4, base_y + 0.02 * canvas),
            fill=colour,
        )
        image.paste(shadow, mask=shadow)
    image.paste(figure, mask=figure)
    if scene.context in _FLOATING:
        # The figure sinks a little: the background's water covers its base again, edged by ripples.
        top = round(base_y - 0.08 * scene.scale * canvas)
        image.paste(background.crop((0, top, canvas, canvas)), (0, top))
        edge = (110, 170, 220) if scene.context == _FLOATING[0] else (215, 210, 198)
        for k in range(3):
            w, y = half_width * (1.2 + 0.3 * k), top + k * 0.02 * canvas
            draw.arc(
                (centre_x - w, y - 0.02 * canvas, centre_x + w, y + 0.02 * canvas),
                0,
                180,
                fill=edge,
                width=max(2, canvas // 90),
            )
    elif scene.context == "on top of green grass with sunflowers around it":
        _sunflowers_front(draw, canvas, rng)
    return image.resize((size, size), Image.Resampling.LANCZOS)
