"""Training captions for vision-language segmentation models, built at prompt levels p0-p9.

After Poudel et al.'s medvlsm, each training image's caption comes from one prompt level. The
levels add attributes one at a time; the example is a breast tumor mask in the upper left of a
greyscale ultrasound image, with the definition "an abnormal mass of tissue in the breast":

===== ====================================== ================================================
level parts                                  caption
===== ====================================== ================================================
p0    (nothing)                              ``""``
p1    class                                  ``"breast tumor"``
p2    shape + class                          ``"round breast tumor"``
p3    colour + shape + class                 ``"dark round breast tumor"``
p4    size + colour + shape + class          ``"small dark round breast tumor"``
p5    count + size + colour + shape + class  ``"one small dark round breast tumor"``
p6    p5 + location                          ``"one small dark round breast tumor in the upper
                                             left of the image"``
p7    class + definition                     ``"breast tumor which is an abnormal mass of
                                             tissue in the breast"``
p8    p5 + definition                        ``"one small dark round breast tumor which is an
                                             abnormal mass of tissue in the breast"``
p9    p8 + location                          ``"one small dark round breast tumor which is an
                                             abnormal mass of tissue in the breast, in the
                                             upper left of the image"``
===== ====================================== ================================================

p7-p9 give one caption per definition; the other levels give one caption.

Where the words come from (:data:`ATTRIBUTE_SOURCES`)
------------------------------------------------------
* From the user: the class name (the prompt) and the definitions (a JSON file,
  :func:`read_definitions`, else the built-in :data:`DEFAULT_DEFINITIONS`).
* From the mask: count, size, shape and location; colour from the mask and the image.

The mask's words therefore exist only at training time, where a (corrected) mask is given. At
inference the model sees only the user's own words (a class name, perhaps a definition), so
the levels that teach with the user's words alone (p1, p7) are the ones that match inference
exactly; the richer levels add what the mask shows.

Grammar
-------
* Missing words (colour ``""`` when no image is given) are left out, with no double spaces.
* More than one component (``count > 1``): the class name is pluralised (:func:`plural`) in
  p2-p6, p8 and p9, after the count word in p5, p6, p8 and p9 (:func:`count_word`:
  "two", ..., "five", then "many"). p1 and p7 name the class as given.
* Definitions are joined with "which is" (p7, p8 and p9 of one component); for several
  components with ", each of which is"; a class name that is already plural ("lungs") takes
  "which are". p9 adds ", in the LOCATION of the image" after the definition.
* Empty mask (``count == 0``) or no attributes: p2-p6 fall back to the class name alone (p1),
  p8 and p9 to class + definition (p7). An empty target captioned with the plain name teaches
  absence, and at inference a user types the name.

Attribute rules (:func:`mask_attributes`)
-----------------------------------------
* Components: 8-connected components of ``mask > 0``; components smaller than
  ``min_fraction`` of the image (default 0.05 %) are specks and are ignored everywhere (count,
  size, shape, colour, location). A mask of specks only is empty.
* Size, from the total area of the kept components as a fraction of the image: "small" under
  3 %, "medium" under 15 %, "large" from 15 %.
* Shape, of the largest component (:func:`skimage.measure.regionprops`): "irregular" if its
  solidity (area / convex area) is under 0.85; else "elongated" if the major/minor axis ratio
  exceeds 2.5; else "round" if the axis ratio is under 1.5 and the circularity
  4*pi*area/perimeter^2 (Crofton perimeter, capped at 1) is at least 0.8; else "oval" if the
  circularity is at least 0.6; else "irregular". On discrete masks a disk of radius 5-40 px has
  circularity 0.99-1.0, a 2:1 ellipse about 0.82-0.85 (axis ratio 2.0), a square about 0.9
  (so squares read "round"), a five-pointed star solidity about 0.5-0.6.
* Colour. Greyscale images (HxW, HxWx1, or RGB with three equal channels): the mean
  intensity inside the mask against the mean in a ring around it (the pixels within 5 % of the
  image's shorter side, at least 2 px, of the mask, outside it): "dark" if inside is lower by
  more than 10 % of the image's intensity range (max - min), "bright" if higher by more than
  10 %, else "grey" (also for a uniform image); "" when the mask leaves no ring (it fills the
  image). Colour images (HxWx3 or HxWx4, alpha dropped): the HSV of the mean colour inside
  the mask (integer images scaled by their dtype's maximum; float images taken as 0-1, or as
  0-255 if any value exceeds 1): value under 0.2 "black"; saturation under 0.2 "white" (value
  over 0.8) or "grey"; else by hue in degrees: red (under 15 or from 340; "pink" when light,
  saturation under 0.5 and value over 0.7), orange (15-45; "brown" when value is under 0.6),
  yellow (45-70), green (70-170), blue (170-260), purple (260-290), pink (290-340).
* Location, of the centroid of all kept foreground, in image coordinates (the image's left,
  not the patient's): rows in thirds "upper" / "middle" / "lower", columns in thirds "left" /
  "middle" / "right", named "upper left", "upper middle", ..., "middle left", "center",
  "middle right", ..., "lower right".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError

__all__ = [
    "ATTRIBUTE_SOURCES",
    "DEFAULT_DEFINITIONS",
    "LEVEL_PARTS",
    "PROMPT_SETS",
    "MaskAttributes",
    "build_prompts",
    "count_word",
    "definitions_for",
    "mask_attributes",
    "plural",
    "read_definitions",
]

PROMPT_SETS: tuple[str, ...] = tuple(f"p{i}" for i in range(10))

#: Where each attribute of a caption comes from: the user, the mask, or the mask and the image.
ATTRIBUTE_SOURCES: dict[str, str] = {
    "class name": "user",
    "definition": "user",
    "count": "mask",
    "size": "mask",
    "shape": "mask",
    "location": "mask",
    "colour": "mask and image",
}

_DESCRIPTION = ("count", "size", "colour", "shape", "class name")

#: The parts of each level's caption, in the order they are written.
LEVEL_PARTS: dict[str, tuple[str, ...]] = {
    "p0": (),
    "p1": ("class name",),
    "p2": ("shape", "class name"),
    "p3": ("colour", "shape", "class name"),
    "p4": ("size", "colour", "shape", "class name"),
    "p5": _DESCRIPTION,
    "p6": (*_DESCRIPTION, "location"),
    "p7": ("class name", "definition"),
    "p8": (*_DESCRIPTION, "definition"),
    "p9": (*_DESCRIPTION, "definition", "location"),
}

# Thresholds of mask_attributes (stated in the module docstring).
SMALL_FRACTION = 0.03
MEDIUM_FRACTION = 0.15
MIN_SOLIDITY = 0.85
ELONGATED_RATIO = 2.5
ROUND_RATIO = 1.5
ROUND_CIRCULARITY = 0.8
OVAL_CIRCULARITY = 0.6
RING_FRACTION = 0.05
CONTRAST_FRACTION = 0.10

_ROWS = ("upper", "middle", "lower")
_COLUMNS = ("left", "middle", "right")
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class MaskAttributes:
    """What a mask (and its image) show, in caption words.

    Attributes
    ----------
    count : int
        8-connected components of the mask, without specks smaller than ``min_fraction`` of
        the image.
    size : str
        "small" (kept area under 3 % of the image), "medium" (under 15 %) or "large";
        "" when ``count == 0``.
    shape : str
        Of the largest component: "irregular" (solidity < 0.85), "elongated" (axis ratio
        > 2.5), "round" (axis ratio < 1.5 and circularity >= 0.8), "oval" (circularity
        >= 0.6) or "irregular"; "" when ``count == 0``.
    colour : str
        Greyscale images: "dark", "bright" or "grey" against a ring around the mask (a
        difference of more than 10 % of the image's range counts). Colour images: a colour
        name of the mean colour inside ("red", "orange", "brown", "yellow", "green", "blue",
        "purple", "pink", "white", "grey", "black"). "" without an image, for an empty mask,
        or when no ring is left around the mask.
    location : str
        Cell of a 3x3 grid of the image holding the centroid of all kept foreground, in image
        coordinates (the image's left, not the patient's): "upper left", "upper middle",
        "upper right", "middle left", "center", "middle right", "lower left",
        "lower middle", "lower right"; "" when ``count == 0``.
    """

    count: int
    size: str
    shape: str
    colour: str
    location: str


EMPTY = MaskAttributes(count=0, size="", shape="", colour="", location="")


def mask_attributes(
    mask: np.ndarray, image: np.ndarray | None = None, *, min_fraction: float = 0.0005
) -> MaskAttributes:
    """Count, size, shape, colour and location of a mask, as caption words.

    Parameters
    ----------
    mask : np.ndarray
        HxW, any dtype; values > 0 are foreground.
    image : np.ndarray or None
        The image the mask belongs to: HxW or HxWx1 (any dtype), or HxWx3 / HxWx4 (uint8,
        other integers, or float), with the mask's H and W. None: colour is "".
    min_fraction : float
        Components smaller than this fraction of the image (H*W) are specks, ignored.

    Returns
    -------
    MaskAttributes
        The words; all empty and ``count == 0`` when nothing but specks is foreground.

    Raises
    ------
    InputError
        If the mask is not 2-D, the image's shape does not fit, or ``min_fraction`` is not
        in [0, 1).
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise InputError(f"the mask must be a non-empty HxW array; got shape {mask.shape}")
    if not 0.0 <= min_fraction < 1.0:
        raise InputError(f"min_fraction must be in [0, 1); got {min_fraction}")
    if image is not None:
        image = np.asarray(image)
        ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
        if not ok or image.shape[:2] != mask.shape:
            raise InputError(
                f"the image must be HxW, HxWx1, HxWx3 or HxWx4 with the mask's H and W "
                f"{mask.shape}; got shape {image.shape}"
            )

    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    kept = np.flatnonzero(areas >= min_fraction * mask.size) + 1
    if kept.size == 0:
        return EMPTY
    foreground = np.isin(labels, kept)
    largest = labels == kept[np.argmax(areas[kept - 1])]

    fraction = float(foreground.sum()) / mask.size
    if fraction < SMALL_FRACTION:
        size = "small"
    elif fraction < MEDIUM_FRACTION:
        size = "medium"
    else:
        size = "large"

    return MaskAttributes(
        count=int(kept.size),
        size=size,
        shape=_shape(largest),
        colour="" if image is None else _colour(foreground, image),
        location=_location(foreground),
    )


def _shape(component: np.ndarray) -> str:
    """Shape word of one component (HxW bool), by the rules of :class:`MaskAttributes`."""
    from skimage.measure import regionprops

    props = regionprops(component.astype(np.uint8))[0]
    if props.solidity < MIN_SOLIDITY:
        return "irregular"
    major, minor = props.axis_major_length, props.axis_minor_length
    ratio = 1.0 if major == 0 else (math.inf if minor == 0 else major / minor)
    if ratio > ELONGATED_RATIO:
        return "elongated"
    perimeter = props.perimeter_crofton
    circularity = 1.0 if perimeter <= 0 else min(1.0, 4 * math.pi * props.area / perimeter**2)
    if ratio < ROUND_RATIO and circularity >= ROUND_CIRCULARITY:
        return "round"
    if circularity >= OVAL_CIRCULARITY:
        return "oval"
    return "irregular"


def _location(foreground: np.ndarray) -> str:
    """3x3 grid cell of the centroid of ``foreground`` (HxW bool, not empty)."""
    rows, columns = np.nonzero(foreground)
    height, width = foreground.shape
    row = _ROWS[min(2, int(3 * (rows.mean() + 0.5) / height))]
    column = _COLUMNS[min(2, int(3 * (columns.mean() + 0.5) / width))]
    if row == column == "middle":
        return "center"
    return f"{row} {column}"


def _colour(foreground: np.ndarray, image: np.ndarray) -> str:
    """Colour word of ``foreground`` (HxW bool) in ``image`` (HxW[xC], C in 1, 3, 4)."""
    if image.ndim == 3:
        channels = image[..., :3]
        if channels.shape[2] == 1 or (
            np.array_equal(channels[..., 0], channels[..., 1])
            and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            return _grey_colour(foreground, channels[..., 0])
        return _rgb_colour(foreground, channels)
    return _grey_colour(foreground, image)


def _grey_colour(foreground: np.ndarray, image: np.ndarray) -> str:
    """Greyscale word ("dark", "bright", "grey") of ``foreground`` (HxW bool) in an HxW image,
    against a ring around it."""
    from scipy import ndimage

    span_values = image[np.isfinite(image)] if image.dtype.kind == "f" else image
    if span_values.size == 0:
        return ""
    span = float(span_values.max()) - float(span_values.min())
    width = max(2.0, RING_FRACTION * min(image.shape))
    rows, columns = np.nonzero(foreground)
    margin = int(math.ceil(width)) + 1  # the ring lies within this box around the foreground
    box = (
        slice(max(0, rows.min() - margin), rows.max() + margin + 1),
        slice(max(0, columns.min() - margin), columns.max() + margin + 1),
    )
    foreground, values = foreground[box], image[box].astype(np.float64)
    ring = (ndimage.distance_transform_edt(~foreground) <= width) & ~foreground
    finite = np.isfinite(values)
    inside, around = values[foreground & finite], values[ring & finite]
    if inside.size == 0 or around.size == 0:
        return ""
    difference = float(inside.mean() - around.mean())
    if difference > CONTRAST_FRACTION * span:
        return "bright"
    if difference < -CONTRAST_FRACTION * span:
        return "dark"
    return "grey"


def _rgb_colour(foreground: np.ndarray, image: np.ndarray) -> str:
    """Colour name of the mean colour of ``foreground`` in an HxWx3 ``image``."""
    from skimage.color import rgb2hsv

    pixels = image[foreground].astype(np.float64)
    pixels = pixels[np.isfinite(pixels).all(axis=1)]
    if pixels.size == 0:
        return ""
    if np.issubdtype(image.dtype, np.integer):
        scale = float(np.iinfo(image.dtype).max)
    else:
        finite = image[np.isfinite(image)]
        scale = 255.0 if finite.size and float(finite.max()) > 1.0 else 1.0
    mean = np.clip(pixels.mean(axis=0) / scale, 0.0, 1.0)
    hue, saturation, value = rgb2hsv(mean.reshape(1, 1, 3))[0, 0]
    hue *= 360.0
    if value < 0.2:
        return "black"
    if saturation < 0.2:
        return "white" if value > 0.8 else "grey"
    if hue < 15 or hue >= 340:
        return "pink" if saturation < 0.5 and value > 0.7 else "red"
    if hue < 45:
        return "brown" if value < 0.6 else "orange"
    if hue < 70:
        return "yellow"
    if hue < 170:
        return "green"
    if hue < 260:
        return "blue"
    if hue < 290:
        return "purple"
    return "pink"


def count_word(n: int) -> str:
    """The count as a word: 0 "no", 1 "one", ..., 5 "five", more "many".

    Parameters
    ----------
    n : int
        A count, >= 0.

    Returns
    -------
    str
        The word.
    """
    if n < 0:
        raise InputError(f"a count cannot be negative; got {n}")
    return _COUNT_WORDS[n] if n < len(_COUNT_WORDS) else "many"


def plural(noun_phrase: str) -> str:
    """The phrase with its last word pluralised.

    "tumor" -> "tumors", "mass" -> "masses", "opacity" -> "opacities", "box" -> "boxes",
    "breast tumor" -> "breast tumors"; a phrase already ending in "s" ("lungs", "pancreas"),
    other than "ss", is returned unchanged.

    Parameters
    ----------
    noun_phrase : str
        A noun phrase whose head noun is its last word.

    Returns
    -------
    str
        The plural phrase.
    """
    phrase = noun_phrase.rstrip()
    lower = phrase.lower()
    if not phrase or (lower.endswith("s") and not lower.endswith("ss")):
        return phrase
    if lower.endswith(("ss", "x", "z", "ch", "sh")):
        return phrase + "es"
    if lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        return phrase[:-1] + "ies"
    return phrase + "s"


def _looks_plural(noun_phrase: str) -> bool:
    """Whether a class name is already plural ("lungs"; not "mass", "uterus", "pancreas")."""
    lower = noun_phrase.lower()
    return lower.endswith("s") and not lower.endswith(("ss", "us", "is", "as"))


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _clean_definition(text: str) -> str:
    """A definition as a noun phrase: no trailing full stop, no leading "which is" / "is"."""
    text = _clean(text).rstrip(".").rstrip()
    lower = text.lower()
    for lead in ("which is ", "which are ", "is ", "are "):
        if lower.startswith(lead):
            return text[len(lead) :].strip()
    return text


def build_prompts(
    level: str,
    class_name: str,
    attributes: MaskAttributes | None = None,
    definitions: Sequence[str] = (),
) -> list[str]:
    """Every caption of one prompt level for one class (see the module's table).

    Parameters
    ----------
    level : str
        One of :data:`PROMPT_SETS` ("p0" ... "p9").
    class_name : str
        The target's name, as the user types it ("breast tumor").
    attributes : MaskAttributes or None
        The mask's words (:func:`mask_attributes`). None, or ``count == 0``: p2-p6 give the
        class name alone (as p1), p8 and p9 class + definition (as p7).
    definitions : sequence of str
        Noun phrases defining the class ("an abnormal mass of tissue"), used by p7-p9; a
        trailing full stop and a leading "which is" are dropped.

    Returns
    -------
    list of str
        One caption, or for p7-p9 one per (distinct) definition.

    Raises
    ------
    InputError
        For an unknown level, an empty class name (levels other than p0), or p7-p9 without
        a definition.
    """
    key = str(level).strip().lower()
    if key not in LEVEL_PARTS:
        raise InputError(
            f"unknown prompt set {level!r}; choose one of: {', '.join(PROMPT_SETS)}"
        )
    parts = LEVEL_PARTS[key]
    if not parts:
        return [""]
    name = _clean(class_name)
    if not name:
        raise InputError(f"prompt set {key} needs a class name; got an empty one")

    if isinstance(definitions, str):
        definitions = (definitions,)
    phrases = [d for d in dict.fromkeys(_clean_definition(d) for d in definitions) if d]
    if "definition" in parts and not phrases:
        raise InputError(
            f"prompt set {key} needs a definition of {name!r}: give a definitions file "
            f"(JSON: class name -> list of sentences)"
        )

    empty = attributes is None or attributes.count <= 0
    if empty and parts != LEVEL_PARTS["p7"]:
        parts = LEVEL_PARTS["p7"] if "definition" in parts else LEVEL_PARTS["p1"]
    many = not empty and attributes.count > 1 and "shape" in parts  # p1, p7: the name as given

    words = []
    for part in parts:
        if part == "class name":
            words.append(plural(name) if many else name)
        elif part == "count":
            words.append(count_word(attributes.count))
        elif part in ("size", "colour", "shape"):
            words.append(getattr(attributes, part))
        elif part in ("definition", "location"):
            break  # written after the description, below
    description = " ".join(w for w in words if w)

    location = ""
    if "location" in parts and attributes.location:
        location = f"in the {attributes.location} of the image"
    if "definition" not in parts:
        return [" ".join(w for w in (description, location) if w)]

    if _looks_plural(name):
        joiner = " which are "
    elif many:
        joiner = ", each of which is "
    else:
        joiner = " which is "
    return [
        description + joiner + phrase + (f", {location}" if location else "")
        for phrase in phrases
    ]


# Built-in definitions: short factual noun phrases that read after "which is" ("which are"
# for the plural names). Keys are lower case.
_TUMOR = (
    "an abnormal mass of tissue",
    "an abnormal growth of cells",
    "a lump formed by cells that divide without control",
)
DEFAULT_DEFINITIONS: dict[str, tuple[str, ...]] = {
    "tumor": _TUMOR,
    "tumour": _TUMOR,
    "breast tumor": (
        "an abnormal mass of tissue in the breast",
        "a lump in the breast tissue",
        "an abnormal growth of cells in the breast",
    ),
    "breast lesion": (
        "an area of abnormal tissue in the breast",
        "a lump or mass in the breast",
    ),
    "brain tumor": (
        "an abnormal mass of tissue in the brain",
        "an abnormal growth of cells in the brain",
        "a mass inside the skull",
    ),
    "lesion": (
        "an area of abnormal tissue",
        "a region of tissue damaged by injury or disease",
        "an abnormal change in an organ or tissue",
    ),
    "skin lesion": (
        "an area of skin that differs from the surrounding skin",
        "an abnormal patch or growth on the skin",
        "a mole, spot or growth on the skin",
    ),
    "polyp": (
        "a projecting growth of tissue",
        "a small growth on the lining of the bowel",
        "a lump of tissue that sticks out from the lining of an organ",
    ),
    "nodule": (
        "a small rounded lump of tissue",
        "a small mass of tissue",
        "a small growth in an organ such as the lung or the thyroid",
    ),
    "edema": (
        "a swelling caused by fluid in the tissue",
        "an excess of watery fluid in the tissue",
        "a region of tissue swollen with fluid",
    ),
    "oedema": (
        "a swelling caused by fluid in the tissue",
        "an excess of watery fluid in the tissue",
    ),
    "cyst": (
        "a closed sac filled with fluid",
        "a round pocket of fluid in the tissue",
    ),
    "lung": (
        "an organ of breathing in the chest",
        "a spongy organ filled with air",
        "the organ where the blood takes up oxygen",
    ),
    "left lung": (
        "the organ of breathing on the left side of the chest",
        "a spongy organ filled with air on the left of the heart",
    ),
    "right lung": (
        "the organ of breathing on the right side of the chest",
        "a spongy organ filled with air on the right of the heart",
    ),
    "lungs": (
        "the two organs of breathing in the chest",
        "spongy organs filled with air on either side of the heart",
        "the organs where the blood takes up oxygen",
    ),
    "liver": (
        "a large organ in the upper right of the abdomen",
        "the organ that filters the blood and makes bile",
        "the largest organ inside the abdomen",
    ),
    "kidney": (
        "a bean-shaped organ at the back of the abdomen",
        "an organ that filters the blood and makes urine",
    ),
    "kidneys": (
        "the two bean-shaped organs at the back of the abdomen",
        "the organs that filter the blood and make urine",
    ),
    "heart": (
        "a muscular organ in the chest that pumps blood",
        "the organ that pumps blood through the body",
        "a muscle with four chambers in the middle of the chest",
    ),
    "spleen": (
        "an organ in the upper left of the abdomen",
        "an organ that filters the blood and stores blood cells",
    ),
    "pancreas": (
        "a long organ behind the stomach",
        "the organ that makes insulin and digestive juices",
    ),
    "prostate": (
        "a small gland below the bladder",
        "a gland in the male pelvis around the urethra",
    ),
    "thyroid nodule": (
        "a lump in the thyroid gland",
        "a small growth of tissue in the thyroid gland",
    ),
    "optic disc": (
        "the round spot where the optic nerve leaves the eye",
        "the bright round area at the back of the eye",
    ),
}


def read_definitions(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Definitions from a JSON file: an object of class name -> sentence or list of sentences.

    Example: ``{"breast tumor": ["an abnormal mass of tissue in the breast"], "cyst": "a
    closed sac filled with fluid"}``.

    Parameters
    ----------
    path : str or Path
        The JSON file (UTF-8).

    Returns
    -------
    dict of str to tuple of str
        Class names (whitespace collapsed, case kept) to their definitions (whitespace
        collapsed, empty ones dropped).

    Raises
    ------
    InputError
        In one line, for a missing or unreadable file, invalid JSON, or an object of the
        wrong shape.
    """
    path = Path(path)
    expected = "expected a JSON object of class name -> string or list of strings"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"definitions file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise InputError(f"cannot read definitions file {str(path)!r}: {reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"definitions file {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno} "
            f"column {exc.colno}); {expected}"
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            f"definitions file {str(path)!r} holds a JSON {type(data).__name__}; {expected}"
        )
    result: dict[str, tuple[str, ...]] = {}
    for key, value in data.items():
        name = _clean(key)
        if not name:
            raise InputError(f"definitions file {str(path)!r} has an empty class name; {expected}")
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InputError(
                f"definitions file {str(path)!r}: the value of {name!r} is a "
                f"{type(value).__name__}, not a string or list of strings; {expected}"
            )
        result[name] = tuple(d for d in (_clean(v) for v in values) if d)
    return result


def _lookup(table: Mapping[str, Sequence[str]], name: str) -> tuple[str, ...]:
    wanted = name.casefold()
    for key, value in table.items():
        if _clean(key).casefold() == wanted:
            if isinstance(value, str):
                return (value,)
            return tuple(value)
    return ()


def definitions_for(
    class_name: str, extra: Mapping[str, Sequence[str]] | None = None
) -> tuple[str, ...]:
    """The definitions of a class: the user's (``extra``) first, else the built-in ones.

    Names match case-insensitively, with whitespace collapsed. When neither table has the
    whole name, its last word (the head noun: "liver tumor" -> "tumor", "right kidney" ->
    "kidney") is looked up the same way, the user's table first.

    Parameters
    ----------
    class_name : str
        The class name.
    extra : mapping of str to sequence of str, or None
        The user's definitions (:func:`read_definitions`).

    Returns
    -------
    tuple of str
        The definitions; () when none is known.
    """
    name = _clean(class_name)
    if not name:
        return ()
    candidates = [name]
    if " " in name:
        candidates.append(name.rsplit(" ", 1)[1])
    for candidate in candidates:
        for table in (extra or {}, DEFAULT_DEFINITIONS):
            found = _lookup(table, candidate)
            if found:
                return found
    return ()
