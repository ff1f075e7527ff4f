"""The record of a ``medclipsam segment`` run: what it depends on, what it wrote, what a
``--resume`` may keep.

* :class:`Plan`: a validated run (nothing loaded, nothing written) and its parameters, the
  record every result is compared by (hashed per image with the prompt and input file).
* :func:`output_paths`, :func:`partial_paths`: where an image's outputs, and a volume's
  partial files, go in OUT (:data:`OUTPUT_FOLDERS`).
* :func:`check_existing`: refuse to write over existing outputs, or check what ``--resume``
  would keep (same parameters, resolved SAM backend and precision, prompt, input file, slice
  selection and propagation settings).
* :class:`Run`: ``OUT/manifest.json`` (status, models and their hashes, parameters,
  versions, an entry per image), written atomically and throttled; :meth:`Run.check_models`
  refuses other model weights on ``--resume``; :func:`can_keep` says whether a resumed
  image's outputs stand. In the VLSM chain (``--method vlsm``) the models are the VLSM (its
  source, id, architecture and base models' hashes; compared by id) and SAM only when it
  refines; CLIP is never touched.
* :class:`FolderLock`: one run at a time writes into an output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.config import PipelineConfig
from .common import CLIError

__all__ = ["OUTPUT_FOLDERS", "FolderLock", "Plan", "Run", "can_keep", "check_existing",
           "output_paths", "partial_paths", "read_json_or_none"]

#: Subfolders of OUT this command writes.
OUTPUT_FOLDERS = ("saliency", "coarse", "prompts", "masks", "partial")
#: Settings that do not change the results (model identity is checked by weight hashes), or
#: that are recorded resolved instead: ``sam_model`` and ``precision`` ("auto" means another
#: model or precision on another machine), as :attr:`Plan.sam_model` and
#: :attr:`Plan.precision`.
_NOT_PARAMETERS = ("device", "clip_model", "sam_checkpoint", "sam_model", "precision")


# --------------------------------------------------------------------------- parameters


def _sha256_text(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(old: Any, new: Any, limit: int = 4) -> list[str]:
    """Readable differences between two parameter records (``saliency.steps 3 -> 5``)."""
    a, b = _flatten(_jsonable(old)), _flatten(_jsonable(new))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if key.endswith("sha256"):
                diffs.append(f"{key.removesuffix('_sha256').removesuffix('sha256')} "
                             "content changed")
            else:
                diffs.append(f"{key} {json.dumps(a.get(key))} -> {json.dumps(b.get(key))}")
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


@dataclasses.dataclass
class Plan:
    """A validated ``segment`` run (nothing loaded, nothing written yet)."""

    config: PipelineConfig
    files: list[Path]
    prompts: dict[Path, list[str]]
    window: Any  # Window or None
    out: Path
    volume: bool
    slices: slice | None
    slices_text: str | None
    body: dict[str, Any] | None  # {"threshold": float or None (Otsu), "fraction": float}
    resume: bool
    overwrite: bool
    debug: bool
    preset: str | None
    window_text: str | None
    previous: dict[str, Any] | None = None  # the manifest being resumed
    probe_errors: dict[Path, str] = dataclasses.field(default_factory=dict)
    #: the SAM backend and precision ``config`` resolves to on this machine ("auto" resolved)
    sam_model: str = ""
    precision: str = ""
    #: ``--propagate``: {"seeds": N or None, "seed_slices": [z, ...] or None}; None: slice by
    #: slice
    propagate: dict[str, Any] | None = None

    @property
    def run_parameters(self) -> dict[str, Any]:
        """What every result depends on, model weights aside (they are compared by hash):
        the chain's settings, the window, the resolved SAM backend and precision."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in _NOT_PARAMETERS}
        if self.config.method == "vlsm":  # the VLSM is compared by its id, not its path
            config["vlsm"] = {k: v for k, v in config["vlsm"].items() if k != "model"}
        return {"config": config, "window": self.window_text or "auto",
                "sam_model": self.sam_model, "precision": self.precision}

    def image_parameters(self, f: Path, input_sha256: str) -> dict[str, Any]:
        volume = None
        if self.volume:
            volume = {"slices": self.slices_text or "all", "body": self.body}
            if self.propagate is not None:
                volume["propagate"] = self.propagate
        return {"prompt": self.prompts[f], "input_sha256": input_sha256, "volume": volume}

    def parameters_sha256(self, f: Path, input_sha256: str) -> str:
        return _sha256_text({"run": self.run_parameters,
                             "image": self.image_parameters(f, input_sha256)})


# --------------------------------------------------------------------------- files


def output_paths(out: Path, stem: str, volume: bool) -> dict[str, Path]:
    ext = ".nii.gz" if volume else ".png"
    return {"saliency": out / "saliency" / f"{stem}.tif",
            "coarse": out / "coarse" / f"{stem}{ext}",
            "prompts": out / "prompts" / f"{stem}.json",
            "mask": out / "masks" / f"{stem}{ext}"}


def partial_paths(out: Path, stem: str) -> dict[str, Path]:
    folder = out / "partial"
    return {"record": folder / f"{stem}.json", "mask": folder / f"{stem}.mask.nii.gz",
            "coarse": folder / f"{stem}.coarse.nii.gz",
            "saliency": folder / f"{stem}.saliency.tif"}


def _existing_outputs(out: Path, stem: str) -> list[Path]:
    paths = {*output_paths(out, stem, True).values(), *output_paths(out, stem, False).values(),
             *partial_paths(out, stem).values()}
    return sorted(p for p in paths if p.exists())


def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _resolved_models(old: dict[str, Any], device: str | None) -> dict[str, Any]:
    """Parameters of a manifest written before the resolved SAM backend and precision were
    recorded, with them: the backend its config names ("auto" resolved for ``device``), and
    fp32 when its config has no precision (every run was fp32 then)."""
    from ..core.models import resolve_sam_model
    from ..core.precision import resolve_precision

    config = old.get("config")
    if not isinstance(config, dict) or ("sam_model" in old and "precision" in old):
        return old
    old = {**old, "config": {k: v for k, v in config.items() if k not in _NOT_PARAMETERS}}
    try:
        if "sam_model" not in old and config.get("sam_model"):
            old["sam_model"] = resolve_sam_model(config["sam_model"], device)
        if "precision" not in old:
            old["precision"] = resolve_precision(config.get("precision", "fp32"),
                                                 _device(device))
    except ValueError:  # an unknown name or precision: compared as written
        pass
    return old


def _device(device: str | None) -> str:
    from ..core.models import resolve_device

    return resolve_device(device)


def check_existing(plan: Plan) -> None:
    """Refuse to write over existing outputs, or check what ``--resume`` would keep."""
    from ..core.io import file_stem
    from ..core.models import file_sha256

    out = plan.out
    manifest_path = out / "manifest.json"
    existing = sorted({p for f in plan.files for p in _existing_outputs(out, file_stem(f))})
    if not plan.resume:
        if plan.overwrite:
            return
        clash = existing + ([manifest_path] if manifest_path.exists() else [])
        if clash:
            raise CLIError(f"{len(clash)} output file(s) already exist in {out} (e.g. "
                           f"{clash[0]}); continue that run with --resume, choose another -o "
                           "folder, or pass --overwrite.")
        return
    if not manifest_path.exists():
        if existing and not plan.overwrite:
            raise CLIError(f"--resume: {out} has outputs but no manifest.json, so they cannot "
                           "be checked; pass --overwrite to redo them, or choose another -o.")
        return
    previous = read_json_or_none(manifest_path)
    if not isinstance(previous, dict) or previous.get("command") != "segment":
        if plan.overwrite:
            return
        raise CLIError(f"--resume: {manifest_path} is not a readable segment manifest; pass "
                       "--overwrite to redo the run, or choose another -o.")
    old = previous.get("parameters")
    if not isinstance(old, dict):  # a manifest written before parameters were recorded
        old_config = previous.get("config") if isinstance(previous.get("config"), dict) else {}
        old = {"config": dict(old_config), "window": plan.run_parameters["window"]}
    diffs = _differences(_resolved_models(old, plan.config.device), plan.run_parameters)
    if diffs:
        if plan.overwrite:
            return  # redo everything
        raise CLIError(f"--resume: {out} was made with other parameters ({'; '.join(diffs)}); "
                       "rerun with the same ones to continue it, or add --overwrite to redo "
                       "it.")
    merge_entry_files(previous, out)
    entries = {e.get("name"): e for e in previous.get("images", []) if isinstance(e, dict)}
    changed = []
    for f in plan.files:
        stem = file_stem(f)
        record = read_json_or_none(partial_paths(out, stem)["record"])
        olds = [e.get("parameters") for e in (entries.get(stem), record)
                if isinstance(e, dict) and e.get("status", "done") in ("done", "interrupted",
                                                                        "running")
                and isinstance(e.get("parameters"), dict)]
        if not olds:
            continue
        now = plan.image_parameters(f, file_sha256(f))
        for old_image in olds:
            diff = _differences(old_image.get("image", old_image), now, limit=2)
            if diff:
                changed.append(f"{f.name}: {'; '.join(diff)}")
                break
    if changed and not plan.overwrite:
        raise CLIError(f"--resume: {len(changed)} image(s) were made with another prompt, "
                       f"input file or slice selection ({' | '.join(changed[:3])}); rerun with "
                       "the same ones, or add --overwrite to redo them.")
    plan.previous = previous


#: a Dask run's per-image entries, written by each task beside its outputs (a run killed
#: between two manifest writes loses no finished image)
ENTRIES = "entries"


def entry_path(out: Path, name: str) -> Path:
    return out / ENTRIES / f"{name}.json"


def merge_entry_files(previous: dict[str, Any], out: Path) -> None:
    """Add to a resumed manifest the finished images it does not list as done but whose
    entry a Dask task wrote (``OUT/entries/NAME.json``)."""
    folder = out / ENTRIES
    if not folder.is_dir():
        return
    images = [e for e in previous.get("images", []) if isinstance(e, dict)]
    done = {e.get("name") for e in images if e.get("status", "done") == "done"}
    for path in sorted(folder.glob("*.json")):
        entry = read_json_or_none(path)
        if isinstance(entry, dict) and entry.get("status") == "done" and \
                isinstance(entry.get("name"), str) and entry["name"] not in done:
            images = [e for e in images if e.get("name") != entry["name"]] + [entry]
    previous["images"] = images


# --------------------------------------------------------------------------- the manifest


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "napari-medclipsam": __version__}
    for pkg in ("torch", "open_clip_torch", "segment-anything", "sam2", "timm", "transformers",
                "numpy", "scikit-image"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def model_records(plan: Plan, pipeline) -> dict[str, Any]:
    """What identifies the models ``pipeline`` loaded for ``plan`` (its ``models`` for the
    manifest, ``models_sha256`` per image, ``precision``): the VLSM and, when it refines,
    SAM in the VLSM chain (never CLIP); CLIP and SAM otherwise. Plain values, so a Dask
    worker can send them to the client."""
    models_sha256: dict[str, Any] = {}
    models: dict[str, Any] = {}
    config = plan.config
    if config.method == "vlsm":  # the VLSM, and SAM only to refine: never CLIP
        vlsm = pipeline.vlsm
        models_sha256["vlsm"] = vlsm.model_id
        models["vlsm"] = {"source": config.vlsm.model, "id": vlsm.model_id,
                          "arch": getattr(vlsm, "arch", None),
                          "base": dict(getattr(vlsm, "base", {}) or {}),
                          "decoder_sha256": (getattr(vlsm, "info", {}) or {}).get(
                              "decoder_sha256")}
    else:
        clip = pipeline.clip
        models_sha256["clip"] = clip.weights_sha256
        models["clip"] = {"source": config.clip_model, "id": clip.model_id,
                          "sha256": clip.weights_sha256}
    if config.method != "vlsm" or config.vlsm.refine:
        sam = pipeline.sam
        models_sha256["sam"] = sam.checkpoint_sha256
        models["sam"] = {"name": sam.name, "requested": config.sam_model,
                         "family": sam.family, "id": sam.model_id,
                         "checkpoint": sam.checkpoint, "sha256": sam.checkpoint_sha256}
    models["device"] = str(pipeline.device)
    return {"models_sha256": models_sha256, "models": models,
            "precision": {"resolved": pipeline.precision, "requested": config.precision}}


class Run:
    """The manifest of one run: entries per image, written atomically, at most every ``every``
    seconds unless forced (``segment.MANIFEST_SECONDS``). The models are read from
    ``pipeline`` (:func:`model_records`), or given as ``records`` (a Dask run: a worker
    loaded them)."""

    def __init__(self, plan: Plan, pipeline, started: str, every: float,
                 records: dict[str, Any] | None = None):
        self.plan = plan
        self.every = every  # seconds between manifest writes (forced writes aside)
        self.pipeline = pipeline
        self.started = started
        self.entries: dict[str, dict[str, Any]] = {}
        self.kept: dict[str, dict[str, Any]] = {}  # entries of the resumed manifest
        if plan.previous is not None:
            self.kept = {e["name"]: e for e in plan.previous.get("images", [])
                         if isinstance(e, dict) and isinstance(e.get("name"), str)}
        self.last_save = 0.0
        self.versions = _versions()
        records = records if records is not None else model_records(plan, pipeline)
        #: what identifies each model used (weights' SHA-256; the VLSM's id), per image too
        self.models_sha256: dict[str, Any] = records["models_sha256"]
        self.models: dict[str, Any] = records["models"]
        self.precision = records["precision"]

    def check_models(self) -> None:
        """On --resume, refuse other model weights than the resumed run's (unless
        --overwrite, which redoes everything)."""
        previous = self.plan.previous
        if previous is None:
            return
        old = previous.get("models", {})
        old = old if isinstance(old, dict) else {}
        diffs = []
        for key, now in self.models_sha256.items():
            entry = old.get(key) if isinstance(old.get(key), dict) else {}
            before = entry.get("id" if key == "vlsm" else "sha256")
            if key == "vlsm" and before and before != now:
                diffs.append(f"VLSM {before} -> {now}")
            elif before and before != now:
                diffs.append(f"{key.upper()} weights {before[:12]}... -> "
                             f"{(now or 'none')[:12]}...")
        if diffs and not self.plan.overwrite:
            raise CLIError(f"--resume: {self.plan.out} was made with other model weights "
                           f"({'; '.join(diffs)}); use the same models to continue it, or "
                           "add --overwrite to redo it.")
        if diffs:
            self.plan.previous, self.kept = None, {}

    def model_ids(self) -> dict[str, Any]:
        """Each model's id (``{"clip": ..., "sam": ...}``, or the VLSM's and, when it
        refines, SAM's), as partial records name them."""
        return {k: v["id"] for k, v in self.models.items() if isinstance(v, dict) and "id" in v}

    def previous_entry(self, name: str) -> dict[str, Any] | None:
        return self.kept.get(name)

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.entries[name] = entry
        self.kept.pop(name, None)
        self.save()

    def manifest(self, status: str) -> dict[str, Any]:
        from ..core.io import file_stem

        plan = self.plan
        names = [file_stem(f) for f in plan.files]
        images = [self.entries[n] for n in names if n in self.entries]
        images += [self.kept[n] for n in names if n in self.kept and n not in self.entries]
        images += [e for n, e in self.kept.items() if n not in names]
        by_status: dict[str, list[str]] = {"done": [], "failed": [], "interrupted": []}
        for e in images:
            by_status.setdefault(e.get("status", "done"), []).append(e["name"])
        finished = set(by_status["done"]) | set(by_status["failed"])
        return {
            "tool": "napari-medclipsam", "command": "segment", "status": status,
            "started": self.started,
            "finished": None if status == "running" else time.strftime("%Y-%m-%dT%H:%M:%S"),
            "preset": plan.preset,
            "config": plan.config.to_dict(),
            "parameters": plan.run_parameters,
            "parameters_sha256": _sha256_text(plan.run_parameters),
            "window": dataclasses.asdict(plan.window) if plan.window
            else "auto (0.5-99.5 percentiles)",
            "models": self.models,
            "precision": self.precision,
            "versions": self.versions,
            "done": by_status["done"], "failed": by_status["failed"],
            "pending": [n for n in names if n not in finished],
            "images": images,
        }

    def save(self, status: str = "running", force: bool = False) -> None:
        from ..core.io import write_text

        now = time.monotonic()
        if not force and now - self.last_save < self.every:
            return
        write_text(self.plan.out / "manifest.json",
                   json.dumps(self.manifest(status), indent=2, default=str))
        self.last_save = time.monotonic()


def can_keep(entry: dict[str, Any] | None, parameters_sha256: str, models: dict,
              out: Path) -> bool:
    """True when a resumed entry's outputs can be kept as they are."""
    if not entry or entry.get("status", "done") != "done":
        return False
    if entry.get("parameters_sha256") != parameters_sha256:
        return False
    if entry.get("models_sha256") not in (None, models):
        return False
    outputs = entry.get("outputs") or {}
    return bool(outputs) and all((out / rel).is_file() for rel in outputs.values())


class FolderLock:
    """Exclusive lock on the output folder while a run writes into it (two runs into one
    folder would mix their manifests); released when the process ends, however it ends."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return self
        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            raise CLIError(f"Another medclipsam segment is writing to {self.folder}; wait for "
                           "it to finish, or choose another -o folder.") from exc
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return False
