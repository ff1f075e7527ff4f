"""The zero-shot chain as one call: text + image -> saliency -> coarse mask -> prompts -> SAM.

>>> pipe = ZeroShotPipeline(PipelineConfig(sam_model="vit_b"))     # doctest: +SKIP
>>> result = pipe.segment(image, "breast tumor")                   # doctest: +SKIP
>>> result.mask.shape == image.shape[:2]                           # doctest: +SKIP

Each stage is also callable on its own (:meth:`ZeroShotPipeline.saliency`,
:func:`~napari_medclipsam.core.postprocess.coarse_mask`,
:func:`~napari_medclipsam.core.postprocess.make_prompts`,
:meth:`ZeroShotPipeline.refine`) so an interactive user can edit any intermediate result
and re-run only what follows it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import PipelineConfig
from .errors import CancelledError, InputError
from .io import Window, auto_window, to_rgb_uint8
from .postprocess import (
    CoarseResult,
    Component,
    Prompts,
    coarse_mask,
    keep_largest_components,
    make_prompts,
)

ProgressFn = Callable[[str, float], None]
StopFn = Callable[[], bool]
SliceFn = Callable[[int, "SegmentationResult"], None]

NOTHING_FOUND_VLSM = ("Nothing found: no pixel of the VLSM's probability map is above "
                      "{t:g} (or no component passed eta_c). Try another prompt, a lower "
                      "VLSM threshold, or a model trained on this kind of image.")
CONSTANT_IMAGE = ("Nothing found: the image (after windowing) has one intensity everywhere, so "
                  "there is nothing to segment. Check the window or the slice.")
#: Text-chosen seeds: the chain runs on at most this many best-ranked slices (or n_seeds).
MAX_SEED_TRIES = 8
NOTHING_FOUND = ("Nothing found: the saliency map has no component that passes the threshold "
                 "and confidence filter (eta_c). Try another prompt, a lower eta_c or another "
                 "threshold method.")


@dataclass
class SegmentationResult:
    """What one image's zero-shot run produced.

    Attributes
    ----------
    saliency : np.ndarray
        HxW float32 in [0, 1].
    coarse : CoarseResult
        Coarse mask, component labels and their confidences.
    prompts : Prompts
        Boxes (XYXY, image pixels) and points (XY) given to SAM.
    mask : np.ndarray
        HxW bool, SAM's mask after post-processing; all False when nothing was found.
    found : bool
        False when the coarse mask was empty (then SAM was not called).
    message : str
        A human-readable summary ("nothing found" explains what to try).
    rgb : np.ndarray or None
        HxWx3 uint8, the image exactly as CLIP and SAM saw it (after windowing); SAM's
        cached embedding belongs to it, so re-prompting (:meth:`ZeroShotPipeline.refine`)
        must pass this array.
    faithfulness : Faithfulness or None
        How much the text steered the map, against a neutral prompt's
        (:mod:`napari_medclipsam.core.faithfulness`); None when the check is off.
    """

    saliency: np.ndarray
    coarse: CoarseResult
    prompts: Prompts
    mask: np.ndarray
    found: bool
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    rgb: np.ndarray | None = None
    faithfulness: Any = None  # core.faithfulness.Faithfulness, or None when switched off


@dataclass
class VolumeResult:
    """Slice-by-slice results of a (Z, Y, X) volume, stacked.

    After :meth:`ZeroShotPipeline.propagate_volume`, ``saliency``/``coarse``/``prompts``
    hold the seed slices' chain results only, ``mask`` the propagated mask and
    ``propagation`` what propagation did (seeds, slices written, early stops); ``ranking``
    the candidate slices ordered by CLIP's image-text similarity, best first.
    """

    saliency: np.ndarray  # (Z, Y, X) float32
    coarse: np.ndarray  # (Z, Y, X) bool
    mask: np.ndarray  # (Z, Y, X) bool
    prompts: dict[int, Prompts]  # per slice index, only slices where something was found
    found_slices: list[int]
    completed: list[int] = field(default_factory=list)  # slices run so far, in run order
    propagation: Any = None  # core.propagate.PropagationResult
    ranking: list[tuple[int, float]] = field(default_factory=list)


def _check_stop(should_stop: StopFn | None) -> None:
    if should_stop is not None and should_stop():
        raise CancelledError("Cancelled.")


class ZeroShotPipeline:
    """MedCLIP-SAMv2's zero-shot chain with models loaded lazily and SAM embeddings cached.

    Parameters
    ----------
    config : PipelineConfig
    clip : ClipBundle, optional
        An already loaded CLIP (otherwise ``load_clip(config.clip_model, config.device)``).
    sam : SamBundle, optional
        An already loaded SAM (otherwise ``load_sam(config.sam_model, ...)``).
    vlsm : object or callable, optional
        For ``config.method == "vlsm"``: a loaded vision-language segmentation model (anything
        with ``probabilities(image_rgb, prompts) -> (N, H, W) float32`` and ``model_id``, as
        :class:`napari_medclipsam.vlsm.models.VlsmModel`), or a loader called once as
        ``vlsm(config.vlsm.model, config.device)`` when the model is first needed
        (:func:`napari_medclipsam.vlsm.models.load_vlsm`; core never imports the VLSM
        package itself).
    """

    def __init__(self, config: PipelineConfig | None = None, clip=None, sam=None, vlsm=None):
        self.config = config or PipelineConfig()
        self._clip = clip
        self._sam = sam
        self._vlsm = None if callable(vlsm) and not hasattr(vlsm, "probabilities") else vlsm
        self._vlsm_loader = vlsm if self._vlsm is None else None
        self._session = None
        self._text_cache: dict[tuple[str, ...], Any] = {}
        self._propagator = None  # SamBundle used for propagation (may differ in input size)

    # -- models ---------------------------------------------------------------------------
    @property
    def clip(self):
        if self._clip is None:
            from .models import load_clip

            self._clip = load_clip(self.config.clip_model, self.config.device)
        return self._clip

    @property
    def sam(self):
        if self._sam is None:
            from .models import load_sam

            self._sam = load_sam(self.config.sam_model, self.config.sam_checkpoint,
                                 self.config.device)
        return self._sam

    @property
    def vlsm(self):
        """The VLSM of the ``vlsm`` chain (loaded by the loader given, on first use)."""
        if self._vlsm is None:
            if self._vlsm_loader is None:
                raise InputError("The VLSM chain needs a model loader: build the pipeline with "
                                 "ZeroShotPipeline(config, vlsm=napari_medclipsam.vlsm.models."
                                 "load_vlsm).")
            self._vlsm = self._vlsm_loader(self.config.vlsm.model, self.config.device)
        return self._vlsm

    @property
    def vlsm_loaded(self) -> bool:
        return self._vlsm is not None

    @property
    def device(self) -> str:
        """The torch device the models run on."""
        if self._vlsm is not None and self.config.method == "vlsm":
            return str(self._vlsm.device)
        if self._clip is not None:
            return str(self._clip.device)
        if self._sam is not None:
            return str(self._sam.device)
        from .models import resolve_device

        return resolve_device(self.config.device)

    @property
    def precision(self) -> str:
        """``"bf16"`` or ``"fp32"``: ``config.precision`` resolved for the device."""
        from .precision import resolve_precision

        return resolve_precision(self.config.precision, self.device)

    @property
    def session(self):
        """The SAM session (embedding cache) of this pipeline (SAM or SAM 2)."""
        if self._session is None:
            from .sam import make_session

            self._session = make_session(self.sam, precision=self.precision)
        return self._session

    def text_embedding(self, text: str | Sequence[str], allow_empty: bool = False):
        """Cached text embedding of a prompt or prompt ensemble (``allow_empty``: a blank
        text is the empty prompt, as a neutral prompt may be)."""
        from .saliency import as_prompts, encode_text

        key = ("",) if allow_empty and not as_text(text) else tuple(as_prompts(text))
        if key not in self._text_cache:
            self._text_cache[key] = encode_text(self.clip, list(key), allow_empty=allow_empty)
        return self._text_cache[key]

    def faithfulness_prompts(self) -> list[str]:
        """The neutral prompt, then the contrast prompts, when the check is on; else []."""
        cfg = self.config.faithfulness
        if not cfg.enabled:
            return []
        return [cfg.neutral_prompt, *cfg.contrast_prompts]

    # -- stages ---------------------------------------------------------------------------
    def saliency(self, image_rgb: np.ndarray, text: str | Sequence[str],
                 progress: Callable[[int, int], None] | None = None,
                 should_stop: StopFn | None = None) -> np.ndarray:
        """HxW float32 saliency in [0, 1] of ``text`` on an HxWx3 uint8 image (the prompt's
        map alone: :meth:`saliency_maps` of one text)."""
        return self.saliency_maps(image_rgb, [text], progress=progress,
                                  should_stop=should_stop)[0]

    def saliency_maps(self, image_rgb: np.ndarray, texts: Sequence[str | Sequence[str]],
                      progress: Callable[[int, int], None] | None = None,
                      should_stop: StopFn | None = None) -> list[np.ndarray]:
        """HxW float32 maps of several texts on one image, with the same settings and noise.

        The first text is the user's prompt; the others (the faithfulness check's neutral and
        contrast prompts) may be blank (the empty prompt). With M2IB the blocks before the
        bottleneck run once for all (:func:`~.saliency.m2ib_saliencies`); the CAMs run once
        per text. ``progress(step, total)`` counts over all texts.
        """
        from .precision import autocast

        if self.config.method == "vlsm":
            return self._vlsm_maps(image_rgb, texts, progress, should_stop)
        cfg = self.config.saliency
        embeddings = [self.text_embedding(t, allow_empty=i > 0) for i, t in enumerate(texts)]
        with autocast(self.precision, str(self.clip.device)):
            if cfg.method == "m2ib":
                from .saliency import m2ib_saliencies

                return m2ib_saliencies(self.clip, image_rgb, [(e, cfg) for e in embeddings],
                                       progress=progress, should_stop=should_stop)
            from .cam import cam_saliency

            per_text = self.saliency_steps()
            maps = []
            for i, (text, embedding) in enumerate(zip(texts, embeddings, strict=True)):
                def inner(step: int, steps: int, offset: int = i * per_text) -> None:
                    if progress is not None:
                        progress(offset + step, per_text * len(texts))
                maps.append(cam_saliency(self.clip, image_rgb, text or " ", cfg,
                                         progress=inner, should_stop=should_stop,
                                         text_embedding=embedding))
            return maps

    def _vlsm_maps(self, image_rgb: np.ndarray, texts: Sequence[str | Sequence[str]],
                   progress: Callable[[int, int], None] | None,
                   should_stop: StopFn | None) -> list[np.ndarray]:
        """The VLSM's probability of each text (a prompt ensemble: the mean of its prompts'
        probabilities); a blank text after the first is the empty prompt."""
        from .precision import autocast

        model = self.vlsm
        _check_stop(should_stop)
        groups = [[""] if i > 0 and not as_text(t) else
                  (as_text(t) if i > 0 else _prompts_of(t)) for i, t in enumerate(texts)]
        flat = [p for g in groups for p in g]
        with autocast(self.precision, str(model.device)):
            probs = np.asarray(model.probabilities(image_rgb, flat), dtype=np.float32)
        maps, start = [], 0
        for g in groups:
            maps.append(probs[start:start + len(g)].mean(axis=0).astype(np.float32))
            start += len(g)
        if progress is not None:
            progress(len(texts), len(texts))
        return maps

    def saliency_steps(self) -> int:
        """How many progress steps the saliency method reports for the prompt: M2IB's
        optimisation steps; GradCAM's one gradient pass; gScoreCAM's gradient pass and
        scoring batches; the VLSM's one pass."""
        if self.config.method == "vlsm":
            return 1
        cfg = self.config.saliency
        if cfg.method == "m2ib":
            return cfg.steps
        if cfg.method == "gradcam":
            return 1
        width = getattr(getattr(self.clip.model.visual, "trunk", None), "embed_dim", None)
        channels = min(cfg.cam_channels, int(width)) if width else cfg.cam_channels
        return 1 + -(-channels // cfg.cam_batch)

    def faithfulness_steps(self) -> int:
        """Progress steps of the faithfulness check (:meth:`saliency_steps` per neutral or
        contrast prompt; 0 when it is off), reported after the prompt's as ``faithfulness
        check step i/n``."""
        return self.saliency_steps() * len(self.faithfulness_prompts())

    def keep_largest(self) -> int | None:
        """Components of SAM's mask kept: ``config.sam.keep_largest``; 0 follows the coarse
        mask's top-K (MedCLIP-SAMv2's post-processing), or keeps SAM's mask whole in SaLIP
        mode (SaLIP OR-s SAM's masks as they are)."""
        n = self.config.sam.keep_largest
        if n == 0:
            return None if self.config.method == "salip" else self.config.coarse.top_k
        return n

    def prepare(self, progress: ProgressFn | None = None) -> None:
        """Check every model source, then load the models not loaded yet.

        All files and downloads are checked first (:func:`~.models.check_model_sources`), so
        a missing SAM checkpoint is reported together with a missing CLIP, before any model
        is loaded or any image computed. Stages reported: ``checking models``,
        ``loading CLIP``, ``loading SAM``.
        """
        from .models import check_model_sources

        report = progress or (lambda stage, fraction: None)
        if self.config.method == "vlsm":
            self._prepare_vlsm(report)
            return
        if self._clip is None or self._sam is None:
            report("checking models", 0.0)
            check_model_sources(
                clip_model=self.config.clip_model if self._clip is None else None,
                sam_model=self.config.sam_model if self._sam is None else None,
                sam_checkpoint=self.config.sam_checkpoint, device=self.config.device)
        if self._clip is None:
            report("loading CLIP", 0.0)
            _ = self.clip
        if self._sam is None:
            report("loading SAM", 0.0)
            _ = self.sam

    def _prepare_vlsm(self, report: ProgressFn) -> None:
        """The VLSM chain needs the VLSM, and SAM only to refine its mask (no CLIP)."""
        from .models import check_model_sources

        refine = self.config.vlsm.refine
        if refine and self._sam is None:
            report("checking models", 0.0)
            check_model_sources(sam_model=self.config.sam_model,
                                sam_checkpoint=self.config.sam_checkpoint,
                                device=self.config.device)
        if self._vlsm is None:
            report("loading VLSM", 0.0)
            _ = self.vlsm
        if refine and self._sam is None:
            report("loading SAM", 0.0)
            _ = self.sam

    def coarse_config(self):
        """The coarse-mask settings the chain uses: ``config.coarse``, with the VLSM's
        fixed probability threshold in the ``vlsm`` chain."""
        import dataclasses

        if self.config.method == "vlsm":
            return dataclasses.replace(self.config.coarse, method="fixed",
                                       threshold=self.config.vlsm.threshold)
        return self.config.coarse

    def refine(self, image_rgb: np.ndarray, prompts: Prompts) -> np.ndarray:
        """SAM mask (HxW bool) for prompts on an HxWx3 uint8 image (embedding cached)."""
        if prompts.empty:
            return np.zeros(image_rgb.shape[:2], dtype=bool)
        session = self.session
        session.set_image(image_rgb)
        mask = session.predict(boxes=prompts.boxes if len(prompts.boxes) else None,
                               points=prompts.points if len(prompts.points) else None,
                               point_labels=prompts.point_labels if len(prompts.points) else None,
                               point_box=prompts.point_box if len(prompts.points) else None,
                               multimask_output=self.config.sam.multimask_output)
        return keep_largest_components(mask, self.keep_largest())

    # -- the chain ------------------------------------------------------------------------
    def segment(self, image: np.ndarray, text: str | Sequence[str],
                window: Window | None = None, progress: ProgressFn | None = None,
                should_stop: StopFn | None = None) -> SegmentationResult:
        """Run the whole chain on one 2-D image.

        Parameters
        ----------
        image : np.ndarray
            (H, W) or (H, W, 3/4), any dtype (see :func:`~napari_medclipsam.core.io.to_rgb_uint8`).
        text : str or sequence of str
            Prompt or prompt ensemble.
        window : Window, optional
            Intensity window for non-uint8 data.
        progress : callable, optional
            ``progress(stage, fraction)`` with stage in saliency/coarse/prompts/sam/done.
        should_stop : callable, optional
            Checked between stages and saliency steps; raises :class:`CancelledError`.
        """
        rgb = to_rgb_uint8(image, window)
        report = progress or (lambda stage, fraction: None)
        _check_stop(should_stop)
        if rgb.min() == rgb.max():  # nothing to see: no model could find anything honestly
            report("done", 1.0)
            empty = np.zeros(rgb.shape[:2], dtype=bool)
            coarse = CoarseResult(empty, np.zeros(rgb.shape[:2], dtype=np.int32), (), 0.0, 0)
            return SegmentationResult(np.zeros(rgb.shape[:2], dtype=np.float32), coarse,
                                      Prompts(), empty, False, CONSTANT_IMAGE,
                                      {"saliency_steps": 0}, rgb=rgb)
        if self.config.method == "salip":
            return self._segment_salip(rgb, text, report, should_stop)
        vlsm = self.config.method == "vlsm"
        if vlsm and self._vlsm is None:
            report("loading VLSM", 0.0)
            _ = self.vlsm
        elif not vlsm and self._clip is None:
            report("loading CLIP", 0.0)
            _ = self.clip
        steps = self.saliency_steps()
        report("VLSM" if vlsm else f"saliency step 0/{steps}", 0.0)
        others = self.faithfulness_prompts()

        def saliency_progress(i: int, total: int) -> None:
            if vlsm:
                report("VLSM", 0.7)
            elif i <= steps:
                report(f"saliency step {i}/{steps}", 0.7 * i / total)
            else:
                report(f"faithfulness check step {i - steps}/{total - steps}", 0.7 * i / total)

        saliency, *other_maps = self.saliency_maps(rgb, [text, *others],
                                                   should_stop=should_stop,
                                                   progress=saliency_progress)
        _check_stop(should_stop)
        report("coarse mask", 0.72)
        coarse = coarse_mask(saliency, self.coarse_config(), image=rgb)
        faithfulness = None
        if others:
            faithfulness = self._assess(saliency, other_maps, coarse.mask, rgb)
        prompts = make_prompts(coarse.labels, self.config.prompts)
        if coarse.empty or prompts.empty:
            report("done", 1.0)
            return SegmentationResult(saliency, coarse, prompts,
                                      np.zeros(rgb.shape[:2], dtype=bool), False,
                                      NOTHING_FOUND_VLSM.format(
                                          t=self.config.vlsm.threshold) if vlsm
                                      else NOTHING_FOUND,
                                      {"saliency_steps": steps}, rgb=rgb,
                                      faithfulness=faithfulness)
        if vlsm and not self.config.vlsm.refine:
            report("done", 1.0)
            mask = keep_largest_components(coarse.mask, self.keep_largest())
            message = (f"VLSM mask: {len(coarse.components)} component(s) kept of "
                       f"{coarse.n_candidates}; {int(mask.sum())} pixels.")
            return SegmentationResult(saliency, coarse, prompts, mask, True, message,
                                      {"saliency_steps": steps}, rgb=rgb,
                                      faithfulness=faithfulness)
        mask = self._sam_mask(rgb, prompts, report, should_stop, 0.74)
        message = (f"{len(coarse.components)} component(s) kept of {coarse.n_candidates}; "
                   f"mask of {int(mask.sum())} pixels.")
        return SegmentationResult(saliency, coarse, prompts, mask, True, message, rgb=rgb,
                                  faithfulness=faithfulness)

    def _sam_mask(self, rgb: np.ndarray, prompts: Prompts, report: ProgressFn,
                  should_stop: StopFn | None, at: float) -> np.ndarray:
        """The chain's last stage: SAM (loaded and the image encoded if needed, reported
        from fraction ``at``), then :meth:`refine`; reports ``done``."""
        _check_stop(should_stop)
        if self._sam is None:
            report("loading SAM", at)
            _ = self.sam
        session = self.session
        if not session.is_cached(session.key_for(rgb)):
            report("encoding image (SAM)", at + 0.02)
            session.set_image(rgb)
        _check_stop(should_stop)
        report("SAM mask", 0.97)
        mask = self.refine(rgb, prompts)
        report("done", 1.0)
        return mask

    def _assess(self, saliency: np.ndarray, other_maps: list[np.ndarray],
                selected: np.ndarray, rgb: np.ndarray, neutral_selection=None):
        """The faithfulness check from the neutral and contrast prompts' maps; the neutral
        map is thresholded as the prompt's was, unless its selection is given."""
        from .faithfulness import assess
        from .postprocess import threshold_saliency

        cfg = self.config.faithfulness
        neutral, *contrast_maps = other_maps
        if neutral_selection is None:
            neutral_selection = threshold_saliency(neutral, self.coarse_config(), image=rgb)[0]
        return assess(saliency, neutral, selected, neutral_selection, cfg,
                      dict(zip(cfg.contrast_prompts, contrast_maps, strict=True)))

    def _segment_salip(self, rgb: np.ndarray, text: str | Sequence[str], report: ProgressFn,
                       should_stop: StopFn | None) -> SegmentationResult:
        """SaLIP's chain (:mod:`~napari_medclipsam.core.salip`) on an HxWx3 uint8 image.

        The result's ``saliency`` is the retrieval map, ``coarse`` holds the retrieved
        proposals (``confidence`` = CLIP score), ``prompts`` their boxes, and
        ``extra["salip"]`` every proposal under the area cap with its score
        (``proposals``, ``scores``, ``retrieved`` indices best first, ``n_generated``).
        """
        from .salip import (
            NOTHING_PROPOSED,
            NOTHING_UNDER_CAP,
            cap_proposals,
            crop_embeddings,
            crop_image,
            embedding_scores,
            generate_proposals,
            retrieval_map,
            retrieve,
        )

        cfg = self.config.salip
        shape = rgb.shape[:2]
        if self._sam is None:
            report("loading SAM", 0.0)
            _ = self.sam
        if self._clip is None:
            report("loading CLIP", 0.0)
            _ = self.clip
        report("SAM proposals", 0.0)
        generated = generate_proposals(
            self.sam, rgb, cfg, self.precision, should_stop=should_stop,
            progress=lambda i, n: report(f"SAM proposals: crop {i}/{n}", 0.6 * i / n))
        kept = cap_proposals(generated, cfg, shape)
        _check_stop(should_stop)
        scores = np.zeros(0, dtype=np.float32)
        others = self.faithfulness_prompts()
        other_scores: list[np.ndarray] = []
        if kept:
            report(f"CLIP scoring {len(kept)} crops", 0.62)
            crops = [crop_image(rgb, p, cfg.crop) for p in kept]
            embeddings = crop_embeddings(self.clip, crops, self.precision,
                                         should_stop=should_stop)
            scores = embedding_scores(embeddings, self.text_embedding(text))
            other_scores = [embedding_scores(embeddings, self.text_embedding(o, True))
                            for o in others]
        chosen = retrieve(scores, cfg.top_k)
        labels = np.zeros(shape, dtype=np.int32)
        components = []
        for rank, i in enumerate(chosen, start=1):
            labels[kept[i].mask & (labels == 0)] = rank
            components.append(Component(rank, kept[i].area, float(scores[i]), kept[i].box))
        coarse = CoarseResult(labels > 0, labels, tuple(components), float("nan"), len(kept))
        prompts = Prompts(boxes=np.array([kept[i].box for i in chosen], dtype=np.float32)
                          .reshape(-1, 4))
        extra = {"salip": {"proposals": kept, "scores": scores, "retrieved": chosen,
                           "n_generated": len(generated)}}
        saliency = retrieval_map(shape, kept, scores)
        faithfulness = None
        if other_scores:  # the neutral prompt's retrieval from the same crop embeddings
            neutral_selection = np.zeros(shape, dtype=bool)
            for i in retrieve(other_scores[0], cfg.top_k):
                neutral_selection |= kept[i].mask
            faithfulness = self._assess(
                saliency, [retrieval_map(shape, kept, s) for s in other_scores], coarse.mask,
                rgb, neutral_selection=neutral_selection)
        if not chosen:
            report("done", 1.0)
            message = (NOTHING_UNDER_CAP.format(n=len(generated), cap=100 * cfg.area_cap)
                       if generated else NOTHING_PROPOSED)
            return SegmentationResult(saliency, coarse, prompts, np.zeros(shape, dtype=bool),
                                      False, message, extra, rgb=rgb,
                                      faithfulness=faithfulness)
        mask = self._sam_mask(rgb, prompts, report, should_stop, 0.8)
        best = ", ".join(f"{scores[i]:.1f}" for i in chosen)
        message = (f"{len(chosen)} of {len(kept)} SAM proposal(s) retrieved by CLIP (score "
                   f"{best}); mask of {int(mask.sum())} pixels.")
        return SegmentationResult(saliency, coarse, prompts, mask, True, message, extra,
                                  rgb=rgb, faithfulness=faithfulness)

    def segment_volume(self, volume: np.ndarray, text: str | Sequence[str],
                       window: Window | None = None, slices: Sequence[int] | None = None,
                       progress: ProgressFn | None = None,
                       should_stop: StopFn | None = None,
                       on_slice: SliceFn | None = None) -> VolumeResult:
        """Run the chain slice by slice on a (Z, Y, X) volume.

        One window (given, or the volume's percentiles) is used for every slice, so slices
        are normalised alike. ``slices`` restricts the work to some indices (others stay 0).

        ``progress(stage, fraction)`` names the slice and its stage
        (``"slice 3/8 (z=12): saliency step 4/10"``) with the fraction of the whole run.
        ``on_slice(z, result)`` is called as each slice finishes, so a caller can save it at
        once. When ``should_stop`` stops the run, the :class:`CancelledError` raised carries
        the finished slices as ``partial`` (a :class:`VolumeResult`).
        """
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise InputError(f"Expected a (Z, Y, X) volume; got shape {volume.shape}.")
        window = window or auto_window(volume)
        indices = list(range(volume.shape[0])) if slices is None else list(slices)
        bad = [i for i in indices if not 0 <= i < volume.shape[0]]
        if bad:
            raise InputError(f"Slice indices out of range 0..{volume.shape[0] - 1}: {bad}.")
        result = VolumeResult(np.zeros(volume.shape, dtype=np.float32),
                              np.zeros(volume.shape, dtype=bool),
                              np.zeros(volume.shape, dtype=bool), {}, [])
        total = len(indices)
        for n, z in enumerate(indices):
            def inner(stage: str, fraction: float, n=n, z=z) -> None:
                if progress is not None:
                    progress(f"slice {n + 1}/{total} (z={z}): {stage}", (n + fraction) / total)

            try:
                _check_stop(should_stop)
                one = self.segment(volume[z], text, window=window, should_stop=should_stop,
                                   progress=inner)
            except CancelledError as exc:
                exc.partial = result
                raise
            result.saliency[z], result.coarse[z], result.mask[z] = (
                one.saliency, one.coarse.mask, one.mask)
            result.completed.append(z)
            if one.found:
                result.prompts[z] = one.prompts
                result.found_slices.append(z)
            if on_slice is not None:
                on_slice(z, one)
        return result

    # -- 3-D by propagation ----------------------------------------------------------------
    def rank_slices(self, volume_rgb: np.ndarray, text: str | Sequence[str],
                    candidates: Sequence[int] | None = None, batch: int = 16,
                    should_stop: StopFn | None = None) -> list[tuple[int, float]]:
        """Slices ordered by CLIP's cosine similarity between the slice and the text.

        One forward pass of the vision tower per slice (batched), no M2IB: about 0.1 s per
        slice for BiomedCLIP on a CPU. Returns ``[(z, similarity), ...]``, best first.
        """
        import torch

        from .precision import autocast
        from .saliency import prepare_image

        indices = list(range(len(volume_rgb))) if candidates is None else list(candidates)
        if self.config.method == "vlsm":  # the VLSM's own evidence: its 99th percentile
            scores = []
            for z in indices:
                _check_stop(should_stop)
                prob = self.saliency_maps(volume_rgb[z], [text])[0]
                scores.append((z, float(np.percentile(prob, 99))))
            return sorted(scores, key=lambda item: (-item[1], item[0]))
        text_emb = self.text_embedding(text).float()
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        scores: list[tuple[int, float]] = []
        clip = self.clip
        for start in range(0, len(indices), batch):
            _check_stop(should_stop)
            chunk = indices[start:start + batch]
            x = torch.cat([prepare_image(clip, volume_rgb[z]) for z in chunk])
            with torch.no_grad(), autocast(self.precision, str(clip.device)):
                emb = clip.model.encode_image(x).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            sims = (emb @ text_emb.to(emb.device).T)[:, 0].cpu().tolist()
            scores += list(zip(chunk, sims, strict=True))
        return sorted(scores, key=lambda item: (-item[1], item[0]))

    def propagation_model(self, slice_shape: tuple[int, int]):
        """The SAM bundle propagation runs with: the pipeline's own, or (SAM 2 on a CPU
        with small slices, ``config.sam.propagate_size`` 0) the same weights at 512x512
        input. See :class:`~napari_medclipsam.core.config.SamConfig`."""
        bundle = self.sam
        if bundle.family != "sam2":
            return bundle
        size = self.config.sam.propagate_size
        own = int(bundle.model.image_size)
        if size == 0:
            on_gpu = str(bundle.device).startswith("cuda")
            size = own if on_gpu or max(slice_shape) > 512 else min(own, 512)
        if size == own:
            return bundle
        if self._propagator is None or int(self._propagator.model.image_size) != size:
            from .models import sam2_at_size

            self._propagator = sam2_at_size(bundle, size)  # shares the weights' tensors
        return self._propagator

    def propagate_volume(self, volume: np.ndarray, text: str | Sequence[str] | None = None,
                         window: Window | None = None,
                         seeds: dict[int, np.ndarray] | None = None,
                         locked: dict[int, np.ndarray] | None = None,
                         candidates: Sequence[int] | None = None, n_seeds: int = 1,
                         seed_slices: Sequence[int] | None = None,
                         progress: ProgressFn | None = None,
                         should_stop: StopFn | None = None) -> VolumeResult:
        """Segment a (Z, Y, X) volume by propagating masks from a few slices.

        Seeds are the masks given (``seeds``: slices the user prompted; ``locked``: slices
        corrected by hand, kept as they are). Without any, the text chooses them: candidate
        slices (all, or ``candidates``, e.g. the body slices) are ranked by CLIP's
        image-text similarity (:meth:`rank_slices`), and the full chain (M2IB, coarse mask,
        SAM) runs on the best-ranked slices until ``n_seeds`` of them gave a non-empty SAM
        mask, trying at most ``max(MAX_SEED_TRIES, n_seeds)`` slices. With ``seed_slices``
        the chain runs on exactly those slices instead (no ranking), and every one whose SAM
        mask is not empty is a seed. The masks then propagate through the volume in both directions
        (:func:`~napari_medclipsam.core.propagate.propagate_volume`: SAM 2's video
        predictor, or the previous slice's box for SAM backends).

        ``progress(stage, fraction)`` stages: ``ranking slices``, ``seed slice z=Z: ...``
        (the chain's stages), ``propagating: slice n/N (z=Z)``. A stop raises
        :class:`CancelledError` with ``partial`` (a :class:`VolumeResult`).
        """
        from .propagate import propagate_volume

        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise InputError(f"Expected a (Z, Y, X) volume; got shape {volume.shape}.")
        for what, given in (("Candidate", candidates), ("Seed", seed_slices)):
            bad = [int(z) for z in (given or ()) if not 0 <= int(z) < len(volume)]
            if bad:
                raise InputError(f"{what} slice indices out of range 0..{len(volume) - 1}: "
                                 f"{bad}.")
        window = window or auto_window(volume)
        report = progress or (lambda stage, fraction: None)
        rgb = np.stack([to_rgb_uint8(volume[z], window) for z in range(len(volume))])
        result = VolumeResult(np.zeros(volume.shape, dtype=np.float32),
                              np.zeros(volume.shape, dtype=bool),
                              np.zeros(volume.shape, dtype=bool), {}, [])
        seeds = dict(seeds or {})
        if not seeds and not locked:
            if text is None or not as_text(text):
                raise InputError("Propagation needs a mask on at least one slice, or a text "
                                 "prompt to find one.")
            try:
                _check_stop(should_stop)
                if seed_slices is not None:
                    tries, wanted = [int(z) for z in seed_slices], len(seed_slices)
                else:
                    report("ranking slices", 0.0)
                    result.ranking = self.rank_slices(rgb, text, candidates,
                                                      should_stop=should_stop)
                    tries = [z for z, _ in result.ranking[:max(MAX_SEED_TRIES, n_seeds)]]
                    wanted = n_seeds
                for z in tries:
                    _check_stop(should_stop)
                    one = self.segment(
                        volume[z], text, window=window, should_stop=should_stop,
                        progress=lambda stage, fraction, z=z: report(
                            f"seed slice z={z}: {stage}", 0.2 * fraction))
                    result.saliency[z], result.coarse[z] = one.saliency, one.coarse.mask
                    result.completed.append(z)
                    if one.found and one.mask.any():  # SAM's mask, not only the coarse one
                        seeds[z] = result.mask[z] = one.mask
                        result.prompts[z] = one.prompts
                        result.found_slices.append(z)
                        if len(seeds) >= wanted:
                            break
            except CancelledError as exc:  # the seed slices found so far, nothing propagated
                exc.partial = result
                raise
            if not seeds:
                tried = len(result.completed)
                which = "given seed" if seed_slices is not None else "best-ranked"
                raise InputError(f"Nothing found on the {tried} {which} slice(s) for "
                                 f"{text!r}; no seed to propagate. "
                                 + NOTHING_FOUND.split(": ", 1)[1])
        bundle = self.propagation_model(volume.shape[1:])
        session = self.session if bundle is self.sam else None
        base = 0.2 if result.found_slices else 0.0

        def inner(stage: str, fraction: float) -> None:
            report(stage, base + (1.0 - base) * fraction)

        try:
            prop = propagate_volume(bundle, rgb, seeds, locked=locked, progress=inner,
                                    should_stop=should_stop,
                                    stop_after_empty=self.config.sam.stop_after_empty,
                                    precision=self.precision, session=session)
        except CancelledError as exc:
            partial = getattr(exc, "partial", None)
            if partial is not None:
                result.mask = partial.mask
                result.propagation = partial
            exc.partial = result
            raise
        result.mask = prop.mask
        result.propagation = prop
        report("done", 1.0)
        return result


def _prompts_of(text: str | Sequence[str]) -> list[str]:
    from .saliency import as_prompts

    return as_prompts(text)


def as_text(text: str | Sequence[str]) -> list[str]:
    """The non-blank prompts of ``text`` (one string or several)."""
    items = [text] if isinstance(text, str) else list(text)
    return [t for t in items if str(t).strip()]
