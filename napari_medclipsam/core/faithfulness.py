"""Does the text steer the result? The prompt's map against a neutral prompt's.

Users of the research code found the same saliency for "brain tumor", "sitting on a chair" and
gibberish (MedCLIP-SAM issue 3), and a prompt of "normal" still highlighting the tumour
(MedCLIP-SAMv2 issue 1): a CLIP can find what stands out in the image whatever the text says.
Nothing told them. Here every run also computes the map of a neutral prompt ("an image") on
the same image, with the same settings and the same noise, and of any contrast prompts the
user gives ("normal breast tissue"), and reports

* ``correlation``: Pearson's r between the prompt's map and the neutral prompt's (1: the same
  map; the faithfulness score is ``1 - r``);
* ``neutral_overlap``: the share of the coarse mask that the neutral map, thresholded the same
  way, would also select (1: the text picked nothing the neutral prompt would not have);
* the correlation with each contrast prompt's map;

and a warning when a correlation reaches ``FaithfulnessConfig.max_correlation`` (0.9).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import FaithfulnessConfig

__all__ = ["Faithfulness", "assess", "map_correlation", "mean_faithfulness"]


@dataclass(frozen=True)
class Faithfulness:
    """How much the text steered one image's result.

    Attributes
    ----------
    neutral_prompt : str
    correlation : float
        Pearson's r of the prompt's map with the neutral prompt's, in [-1, 1].
    neutral_overlap : float or None
        Share of the coarse mask (the retrieved proposals for SaLIP) that the neutral
        prompt's map would also select; None when the coarse mask is empty.
    contrasts : tuple of (str, float)
        Each contrast prompt and its map's correlation with the prompt's.
    max_correlation : float
        The limit the correlations were judged against.
    """

    neutral_prompt: str
    correlation: float
    neutral_overlap: float | None
    contrasts: tuple[tuple[str, float], ...] = ()
    max_correlation: float = 0.9

    @property
    def score(self) -> float:
        """``1 - correlation``: 0 when the map is the neutral prompt's, higher is better."""
        return 1.0 - self.correlation

    @property
    def steers(self) -> bool:
        """False when the map is at least ``max_correlation`` correlated with the neutral
        prompt's or with a contrast prompt's."""
        return self.correlation < self.max_correlation and all(
            r < self.max_correlation for _, r in self.contrasts)

    @property
    def message(self) -> str:
        """A one-line warning when the text does not steer; "" when it does."""
        neutral = repr(self.neutral_prompt) if self.neutral_prompt else "the empty prompt"
        if self.correlation >= self.max_correlation:
            return (f"This prompt's map is {self.correlation:.2f} correlated with the map of "
                    f"the neutral prompt {neutral}: the text is not guiding the result. Try "
                    "naming the finding and the organ (e.g. 'hypoechoic breast tumor'), a "
                    "prompt ensemble, or another saliency method or model.")
        close = [(c, r) for c, r in self.contrasts if r >= self.max_correlation]
        if close:
            c, r = max(close, key=lambda item: item[1])
            return (f"This prompt's map is {r:.2f} correlated with the map of the contrast "
                    f"prompt {c!r}: the text does not tell them apart here. Try a more "
                    "specific prompt, or another saliency method or model.")
        return ""

    def summary(self) -> str:
        """One line for a status bar: the score and, when it does not steer, the warning."""
        overlap = ("" if self.neutral_overlap is None else
                   f", {self.neutral_overlap:.0%} of the mask also neutral")
        head = f"faithfulness {self.score:.2f} (r = {self.correlation:.2f} vs neutral{overlap})"
        return head if self.steers else f"{head}. {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"neutral_prompt": self.neutral_prompt, "correlation": self.correlation,
                "score": self.score, "neutral_overlap": self.neutral_overlap,
                "contrasts": {c: r for c, r in self.contrasts},
                "max_correlation": self.max_correlation, "steers": self.steers,
                "message": self.message}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faithfulness:
        """The inverse of :meth:`to_dict` (derived fields are recomputed)."""
        return cls(str(data["neutral_prompt"]), float(data["correlation"]),
                   None if data.get("neutral_overlap") is None
                   else float(data["neutral_overlap"]),
                   tuple((str(c), float(r)) for c, r in dict(data.get("contrasts", {})).items()),
                   float(data.get("max_correlation", 0.9)))


def mean_faithfulness(items: list[Faithfulness]) -> Faithfulness | None:
    """The mean check over several images or slices (correlations and overlaps averaged,
    overlaps over those that have one); None for an empty list. Its message then speaks
    of the average map."""
    if not items:
        return None
    overlaps = [f.neutral_overlap for f in items if f.neutral_overlap is not None]
    names = [c for c, _ in items[0].contrasts]
    contrasts = tuple((c, float(np.mean([dict(f.contrasts).get(c, 0.0) for f in items])))
                      for c in names)
    return Faithfulness(items[0].neutral_prompt,
                        float(np.mean([f.correlation for f in items])),
                        float(np.mean(overlaps)) if overlaps else None, contrasts,
                        items[0].max_correlation)


def map_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r of two maps of the same shape. A constant map carries no text: two
    constant maps count as identical (1.0), a constant and a varying one as unrelated (0.0)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"Maps of different sizes: {a.size} and {b.size} values.")
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt((da * da).sum()), np.sqrt((db * db).sum())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.clip((da * db).sum() / (na * nb), -1.0, 1.0))


def assess(saliency: np.ndarray, neutral: np.ndarray, coarse: np.ndarray,
           neutral_selection: np.ndarray, config: FaithfulnessConfig,
           contrasts: Mapping[str, np.ndarray] | None = None) -> Faithfulness:
    """Compare the prompt's map with the neutral prompt's (and the contrast prompts').

    Parameters
    ----------
    saliency, neutral : np.ndarray
        HxW maps of the prompt and of the neutral prompt.
    coarse : np.ndarray
        HxW bool, what the prompt's map selected (the coarse mask).
    neutral_selection : np.ndarray
        HxW bool, what the neutral map selects under the same threshold method.
    contrasts : mapping of str to np.ndarray, optional
        Contrast prompt -> its HxW map.
    """
    coarse = np.asarray(coarse, dtype=bool)
    overlap = None
    if coarse.any():
        overlap = float(np.asarray(neutral_selection, dtype=bool)[coarse].mean())
    pairs = tuple((c, map_correlation(saliency, m)) for c, m in (contrasts or {}).items())
    return Faithfulness(config.neutral_prompt, map_correlation(saliency, neutral), overlap,
                        pairs, config.max_correlation)
