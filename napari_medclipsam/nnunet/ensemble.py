"""Checkpoint-ensemble prediction and its uncertainty (MedCLIP-SAMv2 eqs. 21-22).

For G checkpoints with softmax outputs ``p_g`` the prediction is the mean
``p = (1/G) sum_g p_g`` (eq. 21), the mask is ``p[target] > threshold`` (default 0.5; with more
than one foreground label, the argmax over all C classes, threshold unused), and the
uncertainty is the entropy of the mean probabilities per pixel/voxel (eq. 22)::

    H = -sum_r p_r ln p_r          in nats (natural log), 0 <= H <= ln(C)

with C the number of classes (background included): 0 where every checkpoint agrees with
certainty, ln 2 = 0.693 for a binary task where the mean is 50/50, ln 3 = 1.099 for two targets
and background. ``0 ln 0`` is taken as 0.

Several targets (a dataset exported with a label table, see ``export.py``): channel c of the
(C, ...) probabilities is nnU-Net's label c, named by the dataset.json the model was trained
with (:attr:`EnsemblePrediction.class_names`). Masks are label maps in the values of the
exported table (``medclipsam_label_values``; nnU-Net's own 0..C-1 when nothing was remapped),
so a predicted mask can be corrected and exported again with the same table; binary models
give 0/1 as before. :func:`predict_folder` writes, per case, the same files for any C:
``masks/`` (binary: PNG 0/255 as before; several targets: the label values), ``probability/``
(the foreground probability ``1 - p(background)``, for C = 2 exactly ``p(target)`` as before)
and ``uncertainty/`` (entropy over all C classes, in [0, ln C]); with C > 2 also
``class_probabilities/CASE.tif``, all C channels (C, *spatial) float32 in the order of
``ensemble.json``'s ``"classes"``. ``ensemble.json`` names the classes (``"classes"``, and
``"labels"``: name -> value in the masks).

:func:`predict_folder` is made of parts that also run apart: :func:`list_cases` and
:func:`check_output_folder` (before any work), :func:`predict_case` (one image: its maps
written, its ranking row returned; ``medclipsam nnunet predict --scheduler`` runs it on Dask
workers), then :func:`rank_rows`, :func:`write_ranking` and :func:`write_ensemble_json`.

:class:`EnsemblePredictor` (a subclass of nnU-Net's ``nnUNetPredictor``) loads the G checkpoints
once (``weights_only=True``), preprocesses each case once, runs every checkpoint on it and
averages the softmax in the network's space, then resamples the mean probabilities back to the
image (nnU-Net's own resampling, cropping and transposition).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..core.errors import CancelledError, InputError
from ..core.runtime import avoid_triton_llvm_clash
from .export import LABEL_VALUES_KEY

NATURAL_ENDINGS = (".png", ".bmp", ".tif")

# --------------------------------------------------------------------------- maths


def mean_probabilities(probabilities: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Eq. 21: the mean over checkpoints of (C, ...) softmax maps -> (C, ...) float32."""
    stack = np.asarray(probabilities, dtype=np.float64)
    if stack.ndim < 2:
        raise InputError("Expected (G, C, ...) probabilities.")
    return stack.mean(axis=0).astype(np.float32)


def entropy(probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
    """Eq. 22: ``-sum_r p_r ln p_r`` over ``axis`` (the classes), in nats, float32.

    Ranges from 0 (certain) to ln(C) (uniform over C classes); ``0 ln 0 = 0``.
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis).astype(np.float32)


def max_entropy(n_classes: int) -> float:
    """Largest possible entropy (nats) for ``n_classes`` classes: ln(C)."""
    return math.log(n_classes)


def rank_by_uncertainty(entropies: dict[str, np.ndarray], *, slice_axis: int | None = 0
                        ) -> list[dict]:
    """Cases sorted by mean entropy, most uncertain first.

    Parameters
    ----------
    entropies : dict
        case -> entropy map ((Y, X) or (Z, Y, X)).
    slice_axis : int or None
        For volumes, also report the slice (along this axis) with the highest mean entropy.

    Returns
    -------
    list of dict
        ``{"case", "mean_entropy", "max_entropy", "worst_slice", "worst_slice_entropy"}``
        (the slice fields are None for 2-D maps).
    """
    rows = []
    for case, h in entropies.items():
        h = np.asarray(h, dtype=np.float64)
        row = {"case": case, "mean_entropy": float(h.mean()), "max_entropy": float(h.max()),
               "worst_slice": None, "worst_slice_entropy": None}
        if h.ndim == 3 and slice_axis is not None and h.shape[slice_axis] > 1:
            per_slice = h.mean(axis=tuple(a for a in range(3) if a != slice_axis))
            row["worst_slice"] = int(per_slice.argmax())
            row["worst_slice_entropy"] = float(per_slice.max())
        rows.append(row)
    rows.sort(key=lambda r: r["mean_entropy"], reverse=True)
    return rows


def rank_slices(entropy_volume: np.ndarray, axis: int = 0) -> list[tuple[int, float]]:
    """(slice index, mean entropy) of a volume's slices, most uncertain first."""
    h = np.asarray(entropy_volume, dtype=np.float64)
    per_slice = h.mean(axis=tuple(a for a in range(h.ndim) if a != axis))
    order = np.argsort(-per_slice, kind="stable")
    return [(int(i), float(per_slice[i])) for i in order]


@dataclass
class EnsemblePrediction:
    """The ensemble's output for one image, in the image's own grid.

    Attributes
    ----------
    probabilities : np.ndarray
        (C, *spatial) float32 mean softmax (eq. 21); sums to 1 over C.
    mask : np.ndarray
        *spatial label map (0 background, 1 target for binary tasks; with several targets the
        argmax, in the values of ``label_values``), uint8 (uint16 for values above 255).
    entropy : np.ndarray
        *spatial float32 entropy of ``probabilities`` in nats, in [0, ln C] (eq. 22).
    n_checkpoints : int
    class_names : tuple of str
        Name of each channel of ``probabilities`` (``class_names[0] == "background"``); empty
        when unknown.
    label_values : tuple of int
        The value of each channel's class in ``mask`` (0 for the background).
    """

    probabilities: np.ndarray
    mask: np.ndarray
    entropy: np.ndarray
    n_checkpoints: int
    class_names: tuple[str, ...] = ()
    label_values: tuple[int, ...] = ()

    @property
    def foreground(self) -> np.ndarray:
        """Probability of any foreground label: 1 - p(background)."""
        return (1.0 - self.probabilities[0]).astype(np.float32)

    @property
    def mean_entropy(self) -> float:
        return float(self.entropy.mean())

    @property
    def n_classes(self) -> int:
        """C, background included."""
        return int(self.probabilities.shape[0])

    @property
    def labels(self) -> dict[str, int]:
        """The targets: name -> value in ``mask`` (background left out)."""
        return {n: v for n, v in zip(self.class_names[1:], self.label_values[1:], strict=True)}

    @property
    def max_entropy(self) -> float:
        """ln C, the largest value ``entropy`` can take."""
        return max_entropy(self.n_classes)


def probabilities_to_mask(probabilities: np.ndarray, threshold: float = 0.5,
                          label_values: Sequence[int] | None = None) -> np.ndarray:
    """Binary: ``p[1] > threshold``; more classes: the argmax. -> label map.

    Without ``label_values`` the map holds channel indices (uint8); with them, channel c is
    written as ``label_values[c]`` (uint8, or uint16 for values above 255).
    """
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"The threshold must lie in [0, 1]; got {threshold}.")
    if probabilities.shape[0] == 2:
        index = (probabilities[1] > threshold).astype(np.uint8)
    else:
        index = probabilities.argmax(axis=0).astype(np.uint8)
    if label_values is None or list(label_values) == list(range(probabilities.shape[0])):
        return index
    if len(label_values) != probabilities.shape[0]:
        raise InputError(f"{len(label_values)} label values for {probabilities.shape[0]} "
                         "classes.")
    dtype = np.uint8 if max(label_values) <= 255 else np.uint16
    return np.asarray(label_values, dtype=dtype)[index]


def classes_of(dataset_json: dict) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Class names of a model's output channels and their values in predicted masks.

    Channel c is nnU-Net's label c (dataset.json ``"labels"``, sorted by value); its value in a
    mask is the exported table's (``medclipsam_label_values``), else nnU-Net's own.

    Returns
    -------
    (names, values) : tuple of str, tuple of int
        ``names[0] == "background"`` and ``values[0] == 0``.
    """
    by_value = {int(v): k for k, v in dataset_json["labels"].items()
                if k != "ignore" and not isinstance(v, list | tuple)}
    order = sorted(by_value)
    user = dataset_json.get(LABEL_VALUES_KEY) or {}
    names = tuple(by_value[v] for v in order)
    values = tuple(0 if v == 0 else int(user.get(by_value[v], v)) for v in order)
    return names, values


# --------------------------------------------------------------------------- predictor


def list_checkpoints(model_dir: str | Path) -> list[Path]:
    """The ensemble checkpoints of a training (``fold_all/ensemble/*.pth``), in epoch order."""
    folder = Path(model_dir) / "fold_all" / "ensemble"
    found = sorted(folder.glob("*.pth"), key=lambda p: (
        int(m.group(1)) if (m := re.search(r"epoch(\d+)", p.name)) else 0, p.name))
    return found


def read_model_folder(model_dir: str | Path,
                      checkpoints: Sequence[str | Path] | None = None
                      ) -> tuple[dict, dict, list[Path]]:
    """What a trained model folder holds, read without torch: (dataset.json, plans.json,
    the checkpoints to use: ``checkpoints`` as given, else :func:`list_checkpoints`).

    Raises
    ------
    InputError
        plans.json or dataset.json missing or not JSON; no ensemble checkpoint yet.
    """
    model_dir = Path(model_dir)
    for f in ("plans.json", "dataset.json"):
        if not (model_dir / f).is_file():
            raise InputError(f"{model_dir} is not a trained nnU-Net model folder "
                             f"({f} missing): train first, or point at the folder "
                             "that holds plans.json and fold_all/.")
    paths = [Path(c) for c in checkpoints] if checkpoints else list_checkpoints(model_dir)
    if not paths:
        raise InputError(f"No ensemble checkpoints in {model_dir}/fold_all/ensemble: "
                         "the training has not reached the end of a cycle yet.")
    try:
        dataset_json = json.loads((model_dir / "dataset.json").read_text())
        plans = json.loads((model_dir / "plans.json").read_text())
    except ValueError as exc:
        raise InputError(f"{model_dir}: dataset.json or plans.json is not valid JSON "
                         f"({exc}): the model folder is damaged; train again.") from None
    return dataset_json, plans, paths


def _make_predictor_class():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class EnsemblePredictor(nnUNetPredictor):
        """nnU-Net's predictor, with the mean of the softmax of G checkpoints."""

        threshold: float = 0.5

        def load_checkpoints(self, model_dir: str | Path,
                             checkpoints: Sequence[str | Path] | None = None) -> None:
            """Build the network once and load every checkpoint's weights (CPU memory)."""
            import inspect

            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
            from nnunetv2.utilities.label_handling.label_handling import (
                determine_num_input_channels,
            )
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            from .job import read_checkpoint
            from .trainer import nnUNetTrainerCheckpointEnsemble

            model_dir = Path(model_dir)
            dataset_json, plans, paths = read_model_folder(model_dir, checkpoints)
            try:
                plans_manager = PlansManager(plans)
            except ValueError as exc:
                raise InputError(f"{model_dir}: dataset.json or plans.json is not valid JSON "
                                 f"({exc}): the model folder is damaged; train again.") from None
            parameters, first = [], None
            for p in paths:
                ckpt = read_checkpoint(p, "cpu")   # one-line InputError if unsafe or broken
                first = first or ckpt
                parameters.append(ckpt["network_weights"])
            if not isinstance(first.get("init_args"), dict) or not isinstance(
                    first.get("trainer_name"), str):
                raise InputError(f"{paths[0]} is not an nnU-Net training checkpoint (no "
                                 "init_args or trainer_name in it).")
            try:
                configuration_manager = plans_manager.get_configuration(
                    first["init_args"]["configuration"])
            except (KeyError, TypeError, RuntimeError, ValueError):
                raise InputError(f"{paths[0]} was trained with a configuration that "
                                 f"{model_dir / 'plans.json'} does not have: it comes from "
                                 "another training.") from None
            trainer_name = first["trainer_name"]
            try:
                trainer_class = (nnUNetTrainerCheckpointEnsemble
                                 if trainer_name == nnUNetTrainerCheckpointEnsemble.__name__
                                 else recursive_find_trainer_class_by_name(trainer_name))
            except RuntimeError:
                trainer_class = None
            if trainer_class is None:
                raise InputError(f"{paths[0]} was trained by {trainer_name!r}, a trainer "
                                 "neither nnU-Net nor this package has.")
            n_in = determine_num_input_channels(plans_manager, configuration_manager,
                                                dataset_json)
            n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
            assert "plans_manager" in inspect.signature(
                trainer_class.build_network_architecture).parameters
            network = trainer_class.build_network_architecture(
                plans_manager, configuration_manager, n_in, n_out,
                enable_deep_supervision=False)
            for p, weights in zip(paths, parameters, strict=True):
                try:
                    network.load_state_dict(weights)
                except (RuntimeError, TypeError, ValueError, AttributeError):
                    raise InputError(f"{p} does not fit the network of {model_dir.name}: it "
                                     "comes from another training.") from None
            network.load_state_dict(parameters[0])
            self.manual_initialization(network, plans_manager, configuration_manager,
                                       parameters, dataset_json, trainer_name,
                                       first.get("inference_allowed_mirroring_axes"))
            self.checkpoint_paths = paths
            self.class_names, self.label_values = classes_of(dataset_json)
            if len(self.class_names) != n_out:
                self.class_names = ("background", *(f"class {c}" for c in range(1, n_out)))
                self.label_values = tuple(range(n_out))

        def _internal_maybe_mirror_and_predict(self, x):
            """nnU-Net's mirroring test-time augmentation with the flips in one batch.

            Same average as nnU-Net's (the identity plus every combination of mirrored
            axes), but one forward pass of batch 2^k instead of 2^k passes of batch 1, which
            uses the CPU's cores far better (``benchmarks/bench_ensemble.py``). Large 3-D
            tiles on a GPU fall back to nnU-Net's one-by-one passes to bound memory.
            """
            import itertools

            import torch

            axes = self.allowed_mirroring_axes if self.use_mirroring else None
            if not axes or (x.device.type == "cuda" and x.ndim == 5):
                return super()._internal_maybe_mirror_and_predict(x)
            with torch.inference_mode():
                dims = [a + 2 for a in axes]
                combos = [c for i in range(len(dims) + 1) for c in itertools.combinations(dims, i)]
                batch = torch.cat([torch.flip(x, c) if c else x for c in combos])
                out = self.network(batch).chunk(len(combos))
                pred = out[0].clone()
                for o, c in zip(out[1:], combos[1:], strict=True):
                    pred += torch.flip(o, c)
                return pred / len(combos)

        @property
        def n_classes(self) -> int:
            return self.label_manager.num_segmentation_heads

        @property
        def labels(self) -> dict[str, int]:
            """The targets: name -> value in predicted masks (background left out)."""
            return dict(zip(self.class_names[1:], self.label_values[1:], strict=True))

        def ensemble_probabilities(self, data, should_stop=None, progress=None):
            """Preprocessed (C, ...) tensor -> mean softmax over checkpoints (CPU tensor)."""
            import torch

            total = None
            for i, params in enumerate(self.list_of_parameters):
                if should_stop is not None and should_stop():
                    raise CancelledError("Prediction cancelled.")
                self.network.load_state_dict(params)
                logits = self.predict_sliding_window_return_logits(data).to("cpu")
                probs = self.label_manager.apply_inference_nonlin(logits.float())
                total = probs.double() if total is None else total + probs
                if progress is not None:
                    progress(i + 1, len(self.list_of_parameters))
            return (total / len(self.list_of_parameters)).float() if total is not None \
                else torch.zeros(0)

        def predict_nnunet_array(self, image: np.ndarray, spacing: Sequence[float], *,
                                 should_stop=None, progress=None) -> EnsemblePrediction:
            """Predict an image in nnU-Net's layout.

            Parameters
            ----------
            image : np.ndarray
                (C, Z, Y, X); 2-D images are (C, 1, Y, X).
            spacing : sequence of 3 floats
                (Z, Y, X) spacing; 2-D images use nnU-Net's (999, 1, 1) convention.
            """
            import torch

            preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
            data, _, props = preprocessor.run_case_npy(
                np.asarray(image, dtype=np.float32), None, {"spacing": list(spacing)},
                self.plans_manager, self.configuration_manager, self.dataset_json)
            data = torch.from_numpy(data).contiguous().float()
            mean = self.ensemble_probabilities(data, should_stop, progress)
            probs = self._to_image_grid(mean, props)
            mask = probabilities_to_mask(probs, self.threshold, self.label_values)
            return EnsemblePrediction(probs, mask, entropy(probs, axis=0),
                                      len(self.list_of_parameters), tuple(self.class_names),
                                      tuple(self.label_values))

        def _to_image_grid(self, probs, props: dict) -> np.ndarray:
            """Mean probabilities in the network's grid -> the image's grid (C, Z, Y, X)."""
            pm, cm = self.plans_manager, self.configuration_manager
            spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
            shape = props["shape_after_cropping_and_before_resampling"]
            current = cm.spacing if len(cm.spacing) == len(shape) else \
                [spacing_t[0], *cm.spacing]
            probs = cm.resampling_fn_probabilities(probs, shape, current, spacing_t)
            if not isinstance(probs, np.ndarray):
                probs = probs.cpu().numpy()
            probs = self.label_manager.revert_cropping_on_probabilities(
                np.asarray(probs, dtype=np.float32), props["bbox_used_for_cropping"],
                props["shape_before_cropping"])
            probs = probs.transpose([0] + [i + 1 for i in pm.transpose_backward])
            # interpolation may leave values slightly outside the simplex
            probs = np.clip(probs, 0.0, 1.0)
            probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)
            return np.ascontiguousarray(probs, dtype=np.float32)

        # -------------------------------------------------------------- our conventions
        def predict_image(self, image: np.ndarray, spacing: Sequence[float] | None = None, *,
                          rgb: bool | None = None, should_stop=None,
                          progress=None) -> EnsemblePrediction:
            """Predict an image in this package's conventions; outputs drop the channel axis.

            ``image`` is (Y, X), (Y, X, 3) RGB or (Z, Y, X); ``spacing`` per spatial axis
            (e.g. a napari layer's ``scale``; ignored for models trained on PNG/BMP/TIFF
            images, which carry no spacing). A 3-D stack with a 2-D model is predicted slice
            by slice. Returned maps have the image's spatial shape.
            """
            image = np.asarray(image)
            n_in = len(self.dataset_json["channel_names"])
            if rgb is None:
                rgb = image.ndim == 3 and image.shape[-1] in (3, 4) and n_in == 3
            if rgb or (image.ndim == 3 and image.shape[-1] in (3, 4) and n_in == 1
                       and image.shape[0] > 4):
                # (Y, X, C) -> (C, 1, Y, X), then to the model's channels as the export did
                data = match_channels(image[..., :3].transpose(2, 0, 1)[:, None], n_in)
                spatial_ndim = 2
            elif image.ndim == 2:
                if n_in != 1:
                    raise InputError(f"This model takes {n_in} channels; the image has one.")
                data, spatial_ndim = image[None, None], 2
            elif image.ndim == 3:
                if n_in != 1:
                    raise InputError(f"This model takes {n_in} channels (RGB); got a 3-D "
                                     "grayscale stack.")
                data, spatial_ndim = image[None], 3
            else:
                raise InputError(f"Expected (Y, X), (Y, X, 3) or (Z, Y, X); got {image.shape}.")
            sp = [float(s) for s in spacing] if spacing is not None else [1.0] * spatial_ndim
            if self.dataset_json.get("file_ending") in NATURAL_ENDINGS:
                # Trained on PNG/BMP/TIFF: nnU-Net saw no spacing (1 per pixel), so a layer's
                # scale must not make it resample; predict in pixels.
                sp = [1.0] * spatial_ndim
            sp = [999.0, *sp[-2:]] if spatial_ndim == 2 else sp[-3:]
            out = self.predict_nnunet_array(data, sp, should_stop=should_stop,
                                            progress=progress)
            if spatial_ndim == 2:
                out = replace(out, probabilities=out.probabilities[:, 0], mask=out.mask[0],
                              entropy=out.entropy[0])
            return out

    return EnsemblePredictor


_PREDICTOR_CLASS = None


def load_ensemble(model_dir: str | Path, checkpoints: Sequence[str | Path] | None = None, *,
                  device: str = "auto", threshold: float = 0.5, use_mirroring: bool = True,
                  tile_step_size: float = 0.5):
    """An :class:`EnsemblePredictor` with every checkpoint of ``model_dir`` loaded.

    Parameters
    ----------
    model_dir : path
        The trainer's output folder (``.../nnUNetTrainerCheckpointEnsemble__nnUNetPlans__2d``).
    checkpoints : paths, optional
        Default: all of ``fold_all/ensemble/*.pth``.
    device : str
        "auto" (CUDA, then MPS, then CPU), "cuda", "mps" or "cpu".
    threshold : float
        Foreground probability above which a pixel is in the mask.
    use_mirroring : bool
        nnU-Net's mirroring test-time augmentation (its default; 4x the work in 2-D).
    """
    global _PREDICTOR_CLASS
    avoid_triton_llvm_clash()   # before nnU-Net's predictor imports torch._dynamo
    from .job import pick_device

    if _PREDICTOR_CLASS is None:
        _PREDICTOR_CLASS = _make_predictor_class()
    dev = pick_device(device)
    predictor = _PREDICTOR_CLASS(tile_step_size=tile_step_size, use_gaussian=True,
                                 use_mirroring=use_mirroring,
                                 perform_everything_on_device=dev.type == "cuda",
                                 device=dev, verbose=False, verbose_preprocessing=False,
                                 allow_tqdm=False)
    predictor.threshold = float(threshold)
    if not 0.0 <= predictor.threshold <= 1.0:
        raise InputError(f"The threshold must lie in [0, 1]; got {threshold}.")
    predictor.load_checkpoints(model_dir, checkpoints)
    return predictor


# --------------------------------------------------------------------------- folders


def case_name(path: Path, file_ending: str) -> str:
    """The case of an input file: its name without ``file_ending`` and nnU-Net's ``_0000``."""
    name = path.name[: -len(file_ending)]
    return re.sub(r"_0000$", "", name)


def match_channels(data: np.ndarray, n_in: int, name: str = "image") -> np.ndarray:
    """(C, ...) image -> the model's channel count, as the export did: RGB(A) -> 1 channel by
    luminance (exact for gray stored as RGB), 1 -> 3 by replication; alpha dropped."""
    from .export import luminance

    c = data.shape[0]
    if c == n_in:
        return data
    if n_in == 1 and c in (3, 4):
        return luminance(data, axis=0)[None]
    if n_in == 3 and c in (1, 4):
        return data[:3] if c == 4 else np.repeat(data, 3, axis=0)
    raise InputError(f"{name} has {c} channel(s); the model takes {n_in}.")


def list_cases(input_dir: str | Path, file_ending: str) -> list[tuple[Path, str]]:
    """The images of ``input_dir`` with the dataset's ``file_ending`` and their case names,
    sorted by file name (hidden files left out).

    Raises
    ------
    InputError
        No such image, or two files giving the same case name.
    """
    input_dir = Path(input_dir)
    files = sorted(p for p in input_dir.glob(f"*{file_ending}") if not p.name.startswith("."))
    if not files:
        raise InputError(f"No {file_ending} images in {input_dir}: the model was trained on "
                         f"{file_ending} files; convert the images (or export them) first.")
    names = [case_name(p, file_ending) for p in files]
    if len(set(names)) != len(names):
        raise InputError(f"Two files in {input_dir} give the same case name.")
    return list(zip(files, names, strict=True))


def check_output_folder(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse a non-empty ``out_dir`` unless ``overwrite``.

    Raises
    ------
    InputError
        ``out_dir`` holds files and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{out_dir} is not empty: choose a new folder or pass --overwrite.")


def predict_case(predictor, path: str | Path, case: str, out_dir: str | Path) -> dict:
    """Predict one image file and write its maps into ``out_dir`` (each file atomically):
    ``masks/``, ``probability/``, ``uncertainty/`` and, with several targets,
    ``class_probabilities/`` (see :func:`predict_folder`).

    Returns
    -------
    dict
        The case's row of the ranking: :func:`rank_by_uncertainty`'s fields for its entropy
        map and ``"foreground_fraction"`` (the share of the mask's pixels/voxels > 0).
    """
    from ..core.io import atomic_path, write_float_tiff, write_mask_png

    path, out_dir = Path(path), Path(out_dir)
    ending = predictor.dataset_json["file_ending"]
    reader = predictor.plans_manager.image_reader_writer_class()
    n_in = len(predictor.dataset_json["channel_names"])
    multi = predictor.n_classes > 2
    data, props = reader.read_images([str(path)])
    out = predictor.predict_nnunet_array(match_channels(data, n_in, path.name),
                                         props["spacing"])
    fg, mask, h, probs = out.foreground, out.mask, out.entropy, out.probabilities
    if fg.shape[0] == 1:   # a 2-D image is (1, Y, X) in nnU-Net's layout
        fg, mask, h, probs = fg[0], mask[0], h[0], probs[:, 0]
    if mask.ndim == 2 and not multi:
        write_mask_png(out_dir / "masks" / f"{case}.png", mask)
    elif mask.ndim == 2:
        _write_label_png(out_dir / "masks" / f"{case}.png", mask)
    else:
        with atomic_path(out_dir / "masks" / f"{case}{ending}") as tmp:
            reader.write_seg(mask, str(tmp), props)
    write_float_tiff(out_dir / "probability" / f"{case}.tif", fg)
    if multi:
        write_float_tiff(out_dir / "class_probabilities" / f"{case}.tif", probs)
    write_float_tiff(out_dir / "uncertainty" / f"{case}.tif", h)
    row = rank_by_uncertainty({case: h})[0]
    row["foreground_fraction"] = float((mask > 0).mean())
    return row


def rank_rows(rows: Sequence[dict]) -> list[dict]:
    """Case rows (in the order of the input files) sorted as :func:`rank_by_uncertainty`
    sorts: by mean entropy, most uncertain first, ties in the given order."""
    return sorted(rows, key=lambda r: r["mean_entropy"], reverse=True)


def write_ranking(out_dir: str | Path, rows: Sequence[dict]) -> None:
    """``OUT/uncertainty_ranking.csv`` (atomically): one line per row, columns in the rows'
    key order."""
    from ..core.io import atomic_path

    with atomic_path(Path(out_dir) / "uncertainty_ranking.csv") as tmp, open(
            tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def ensemble_info(predictor) -> dict:
    """What ``ensemble.json`` records of a predictor (all but ``"created"``): checkpoints,
    threshold, mirroring, the mask rule, classes, labels and the entropy's range."""
    multi = predictor.n_classes > 2
    return {
        "checkpoints": [str(p) for p in predictor.checkpoint_paths],
        "threshold": predictor.threshold, "mirroring": predictor.use_mirroring,
        "mask": "argmax over the classes" if multi else "p(target) > threshold",
        "classes": list(predictor.class_names),
        "labels": predictor.labels,
        "entropy": {"units": "nats", "min": 0.0,
                    "max": max_entropy(predictor.n_classes), "n_classes": predictor.n_classes}}


def write_ensemble_json(out_dir: str | Path, info: dict, **extra) -> None:
    """``OUT/ensemble.json`` (atomically): ``info`` (see :func:`ensemble_info`), then
    ``extra`` fields, then ``"created"``."""
    from ..core.io import write_text

    write_text(Path(out_dir) / "ensemble.json", json.dumps({
        **info, **extra, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")


def predict_folder(predictor, input_dir: str | Path, out_dir: str | Path, *,
                   overwrite: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   on_error: Callable[[Path, str, Exception], str] | None = None
                   ) -> list[dict]:
    """Predict every image of ``input_dir`` (the dataset's file type); write per case::

        OUT/masks/CASE.{png|nii.gz}           the mask: binary, thresholded (PNG 0/255; NIfTI
                                              0/1); several targets, the argmax as label values
        OUT/probability/CASE.tif              float32 foreground probability 1 - p(background)
        OUT/class_probabilities/CASE.tif      several targets only: (C, ...) float32, all classes
        OUT/uncertainty/CASE.tif              float32 entropy in nats, [0, ln C]
        OUT/uncertainty_ranking.csv           cases by mean entropy, most uncertain first
                                              (not written when no case succeeded)
        OUT/ensemble.json                     checkpoints, threshold, entropy units, class
                                              names; ``"failed"``: the cases that failed

    One case after the other (:func:`predict_case`). Without ``on_error`` the first case that
    fails stops the run (its exception propagates, nothing folder-level is written). With it,
    a failed case is handed to ``on_error(path, case, exc)``, which returns the one line that
    ``ensemble.json`` records for it (``{"case", "file", "error"}``) and the others go on; it
    raises to stop the run instead. Returns the ranking rows of the cases that succeeded.
    """
    cases = list_cases(input_dir, predictor.dataset_json["file_ending"])
    check_output_folder(out_dir, overwrite)
    rows, failed = [], []
    for i, (path, case) in enumerate(cases):
        try:
            rows.append(predict_case(predictor, path, case, out_dir))
        except Exception as exc:
            if on_error is None:
                raise
            failed.append({"case": case, "file": str(Path(path).resolve()),
                           "error": on_error(path, case, exc)})
        if progress:
            progress(i + 1, len(cases))
    rows = rank_rows(rows)
    if rows:
        write_ranking(out_dir, rows)
    write_ensemble_json(out_dir, ensemble_info(predictor),
                        **({"failed": failed} if failed else {}))
    return rows


def _write_label_png(path: Path, mask: np.ndarray) -> None:
    """A label map as PNG with its values (uint8, or uint16 for values above 255)."""
    import imageio.v3 as iio

    from ..core.io import atomic_path

    data = np.asarray(mask)
    data = data.astype(np.uint8 if data.max(initial=0) <= 255 else np.uint16)
    with atomic_path(path) as tmp:
        iio.imwrite(str(tmp), data, extension=".png")
