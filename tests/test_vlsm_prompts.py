"""The VLSM prompt builder: mask attributes on constructed masks, and the p0-p9 captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.draw import disk, ellipse, polygon

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.vlsm.prompts import (
    ATTRIBUTE_SOURCES,
    DEFAULT_DEFINITIONS,
    PROMPT_SETS,
    MaskAttributes,
    build_prompts,
    count_word,
    definitions_for,
    mask_attributes,
    plural,
    read_definitions,
)

SIDE = 128


def blank() -> np.ndarray:
    return np.zeros((SIDE, SIDE), dtype=bool)


def disk_mask(center: tuple[int, int], radius: int) -> np.ndarray:
    mask = blank()
    mask[disk(center, radius, shape=mask.shape)] = True
    return mask


def star_mask() -> np.ndarray:
    """A five-pointed star (outer radius 40 px, inner 15 px) in the middle."""
    angles = np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 40, 15)
    mask = blank()
    mask[polygon(64 + radii * np.sin(angles), 64 + radii * np.cos(angles), mask.shape)] = True
    return mask


# The constructed case of the exact captions: a dark disk (radius 10 px) in the upper left of
# a bright greyscale image, two definitions.
TUMOR = disk_mask((20, 20), 10)
TUMOR_IMAGE = np.where(TUMOR, 40, 200).astype(np.uint8)
DEFINITIONS = ("an abnormal mass of tissue in the breast", "a lump in the breast tissue")


def test_constants():
    assert PROMPT_SETS == ("p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9")
    assert ATTRIBUTE_SOURCES["class name"] == ATTRIBUTE_SOURCES["definition"] == "user"
    assert {ATTRIBUTE_SOURCES[k] for k in ("shape", "count", "size", "location")} == {"mask"}
    assert ATTRIBUTE_SOURCES["colour"] == "mask and image"
    assert all(key == key.lower() for key in DEFAULT_DEFINITIONS)
    assert all(2 <= len(v) <= 5 for v in DEFAULT_DEFINITIONS.values())
    for name in ("breast tumor", "tumor", "lesion", "lung", "lungs", "left lung", "right lung",
                 "polyp", "brain tumor", "edema", "skin lesion", "nodule", "liver", "kidney",
                 "heart"):
        assert DEFAULT_DEFINITIONS[name]


def test_disk_in_upper_left():
    found = mask_attributes(TUMOR, TUMOR_IMAGE)
    assert found == MaskAttributes(
        count=1, size="small", shape="round", colour="dark", location="upper left"
    )
    assert mask_attributes(TUMOR).colour == ""  # no image, no colour


def test_two_squares_are_counted_and_pluralised():
    mask = blank()
    mask[20:40, 10:30] = True
    mask[20:40, 90:110] = True
    found = mask_attributes(mask)
    assert found.count == 2
    assert found.location == "upper middle"  # the centroid of both
    (caption,) = build_prompts("p5", "breast tumor", found)
    assert caption.startswith("two ") and caption.endswith(" breast tumors")
    assert build_prompts("p1", "breast tumor", found) == ["breast tumor"]  # the name as given
    assert build_prompts("p8", "nodule", found, ["a small mass of tissue"]) == [
        f"two {found.size} {found.shape} nodules, each of which is a small mass of tissue"
    ]


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: disk_mask((64, 64), 10), "round"),
        (lambda: disk_mask((64, 64), 3), "round"),
        (lambda: disk_mask((64, 64), 40), "round"),
        (lambda: np.pad(np.ones((60, 8), bool), ((30, 38), (60, 60))), "elongated"),
        (lambda: np.pad(np.ones((8, 60), bool), ((60, 60), (30, 38))), "elongated"),
        (star_mask, "irregular"),
        (lambda: np.pad(np.ones((20, 80), bool), ((54, 54), (24, 24)))
         | np.pad(np.ones((80, 20), bool), ((24, 24), (54, 54))), "irregular"),  # a cross
        (lambda: _ellipse(20, 10), "oval"),
        (lambda: _ellipse(30, 15), "oval"),
        (lambda: _ellipse(20, 16), "round"),
    ],
)
def test_shapes(make, shape):
    mask = make()
    assert mask.shape == (SIDE, SIDE)
    assert mask_attributes(mask).shape == shape


def _ellipse(rows: int, columns: int) -> np.ndarray:
    mask = blank()
    mask[ellipse(64, 64, rows, columns, shape=mask.shape)] = True
    return mask


def test_sizes():
    assert mask_attributes(disk_mask((64, 64), 10)).size == "small"  # 1.9 % of the image
    assert mask_attributes(disk_mask((64, 64), 20)).size == "medium"  # 7.6 %
    large = mask_attributes(disk_mask((64, 64), 30))  # 17 %
    assert (large.size, large.location) == ("large", "center")


@pytest.mark.parametrize(
    ("center", "location"),
    [((20, 20), "upper left"), ((20, 64), "upper middle"), ((20, 108), "upper right"),
     ((64, 20), "middle left"), ((64, 64), "center"), ((64, 108), "middle right"),
     ((108, 20), "lower left"), ((108, 64), "lower middle"), ((108, 108), "lower right")],
)
def test_locations(center, location):
    assert mask_attributes(disk_mask(center, 8)).location == location


def test_greyscale_colour():
    mask = disk_mask((64, 64), 12)
    assert mask_attributes(mask, np.where(mask, 0.9, 0.1)).colour == "bright"
    assert mask_attributes(mask, np.where(mask, 10, 240).astype(np.uint8)).colour == "dark"
    # a difference of 10 in a range of 2000 is no contrast; the far corner is not in the ring
    image = np.where(mask, 1010, 1000).astype(np.uint16)
    image[:20, :20] = 3000
    assert mask_attributes(mask, image).colour == "grey"
    image[:20, :20] = 1000  # now the range is 10
    assert mask_attributes(mask, image).colour == "bright"
    # greyscale stored as RGB is judged as greyscale
    rgb = np.repeat(np.where(mask, 250, 30).astype(np.uint8)[..., None], 3, axis=2)
    assert mask_attributes(mask, rgb).colour == "bright"
    # a mask filling the image leaves no ring
    assert mask_attributes(np.ones((SIDE, SIDE)), np.zeros((SIDE, SIDE))).colour == ""


@pytest.mark.parametrize(
    ("rgb", "name"),
    [((230, 20, 20), "red"), ((20, 200, 40), "green"), ((30, 40, 220), "blue"),
     ((240, 220, 30), "yellow"), ((250, 250, 250), "white"), ((10, 10, 10), "black"),
     ((250, 170, 180), "pink"), ((120, 70, 30), "brown")],
)
def test_rgb_colour(rgb, name):
    mask = disk_mask((64, 64), 12)
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    image[..., 1] = 90  # a green-ish background that must not matter
    image[mask] = rgb
    assert mask_attributes(mask, image).colour == name
    rgba = np.concatenate([image, np.full((SIDE, SIDE, 1), 255, np.uint8)], axis=2)
    assert mask_attributes(mask, rgba).colour == name
    assert mask_attributes(mask, image / 255.0).colour == name  # float 0-1


def test_specks_are_not_counted():
    mask = disk_mask((64, 64), 10)
    mask[5, 5] = mask[120, 7:9] = mask[100:102, 100:102] = True  # 1, 2 and 4 px
    assert mask_attributes(mask).count == 1
    assert mask_attributes(mask, min_fraction=0).count == 4
    specks_only = blank()
    specks_only[5, 5] = True
    assert mask_attributes(specks_only) == MaskAttributes(0, "", "", "", "")


def test_exact_captions():
    found = mask_attributes(TUMOR, TUMOR_IMAGE)
    expected = {
        "p0": [""],
        "p1": ["breast tumor"],
        "p2": ["round breast tumor"],
        "p3": ["dark round breast tumor"],
        "p4": ["small dark round breast tumor"],
        "p5": ["one small dark round breast tumor"],
        "p6": ["one small dark round breast tumor in the upper left of the image"],
        "p7": [
            "breast tumor which is an abnormal mass of tissue in the breast",
            "breast tumor which is a lump in the breast tissue",
        ],
        "p8": [
            "one small dark round breast tumor which is an abnormal mass of tissue in the breast",
            "one small dark round breast tumor which is a lump in the breast tissue",
        ],
        "p9": [
            "one small dark round breast tumor which is an abnormal mass of tissue in the "
            "breast, in the upper left of the image",
            "one small dark round breast tumor which is a lump in the breast tissue, in the "
            "upper left of the image",
        ],
    }
    for level in PROMPT_SETS:
        assert build_prompts(level, "breast tumor", found, DEFINITIONS) == expected[level]


def test_missing_words_leave_no_gaps():
    found = mask_attributes(TUMOR)  # no image: no colour
    assert build_prompts("p3", "breast tumor", found) == ["round breast tumor"]
    assert build_prompts("p5", " breast   tumor ", found) == ["one small round breast tumor"]


def test_one_caption_per_definition():
    found = mask_attributes(TUMOR, TUMOR_IMAGE)
    three = ("a first thing", "a second thing.", "which is a third thing")
    for level in ("p7", "p8", "p9"):
        captions = build_prompts(level, "tumor", found, three)
        assert len(captions) == 3
        assert [c.split(" which is ")[1].split(",")[0] for c in captions] == [
            "a first thing", "a second thing", "a third thing"
        ]
    assert build_prompts("p7", "lungs", None, ["the organs of breathing"]) == [
        "lungs which are the organs of breathing"
    ]


@pytest.mark.parametrize("attributes", [None, MaskAttributes(0, "", "", "", "")])
def test_empty_mask_falls_back(attributes):
    for level in ("p2", "p3", "p4", "p5", "p6"):
        assert build_prompts(level, "breast tumor", attributes) == ["breast tumor"]
    for level in ("p8", "p9"):
        assert build_prompts(level, "polyp", attributes, ["a projecting growth of tissue"]) == [
            "polyp which is a projecting growth of tissue"
        ]
    assert build_prompts("p0", "polyp", attributes) == [""]


def test_errors_are_one_line():
    with pytest.raises(InputError, match="p0, p1, p2, p3, p4, p5, p6, p7, p8, p9") as info:
        build_prompts("p10", "tumor")
    assert "\n" not in str(info.value)
    for level in ("p7", "p8", "p9"):
        with pytest.raises(InputError) as info:
            build_prompts(level, "tumor", mask_attributes(TUMOR), ())
        assert str(info.value) == (
            f"prompt set {level} needs a definition of 'tumor': give a definitions file "
            "(JSON: class name -> list of sentences)"
        )
    with pytest.raises(InputError, match="needs a definition"):
        build_prompts("p7", "tumor", None, ["  ", "."])
    with pytest.raises(InputError, match="HxW"):
        mask_attributes(np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match="mask's H and W"):
        mask_attributes(TUMOR, np.zeros((SIDE, SIDE + 1)))


def test_words():
    assert [count_word(n) for n in (0, 1, 2, 5, 6, 40)] == [
        "no", "one", "two", "five", "many", "many"
    ]
    assert [plural(w) for w in ("tumor", "lesion", "mass", "opacity", "lungs", "breast tumor",
                                "box", "kidney")] == [
        "tumors", "lesions", "masses", "opacities", "lungs", "breast tumors", "boxes", "kidneys"
    ]


def test_read_definitions(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"Breast Tumor": ["a lump", " an  abnormal mass "],
                                "cyst": "a sac of fluid"}), encoding="utf-8")
    table = read_definitions(good)
    assert table == {"Breast Tumor": ("a lump", "an abnormal mass"), "cyst": ("a sac of fluid",)}
    assert definitions_for("breast tumor", table) == ("a lump", "an abnormal mass")
    assert definitions_for("BREAST TUMOR") == DEFAULT_DEFINITIONS["breast tumor"]
    assert definitions_for("right kidney") == DEFAULT_DEFINITIONS["kidney"]  # the head noun
    assert definitions_for("gizmo") == ()

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"tumor": ["a lump",]}', encoding="utf-8")
    not_object = tmp_path / "list.json"
    not_object.write_text('["a lump"]', encoding="utf-8")
    bad_value = tmp_path / "value.json"
    bad_value.write_text('{"tumor": 3}', encoding="utf-8")
    for path, words in [(bad_json, "not valid JSON"), (not_object, "holds a JSON list"),
                        (bad_value, "not a string or list of strings"),
                        (tmp_path / "missing.json", "does not exist")]:
        with pytest.raises(InputError, match=words) as info:
            read_definitions(path)
        assert "\n" not in str(info.value)
        if path.exists():
            assert "expected a JSON object of class name -> string or list of strings" in str(
                info.value
            )
