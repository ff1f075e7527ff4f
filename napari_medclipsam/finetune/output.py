"""The fine-tuning output folder: what it may be, and how a run's result becomes it.

Promises, whatever the flags:

* The user's input is never written, replaced or deleted: an output folder that is, holds,
  or lies inside the source model's folder (or the caption data's folder) is refused before
  anything is written (:func:`check_separate`); an output that holds one of the input files
  (a checkpoint, the CSV, an image) is refused too.
* Nothing is written into an existing non-empty folder unless ``overwrite`` (or ``resume``,
  which continues a fine-tuning output in place); ``overwrite`` only replaces an earlier
  fine-tuning output, and files in it that fine-tuning did not write are kept.
* A new output appears in one step (a staging folder beside it is renamed) once the first
  epoch is saved, so a run killed earlier leaves no half-written folder; from then on each
  epoch's files are replaced one by one, atomically (weights, then ``last.pt``, then
  ``finetune.json``), so a killed run resumes from its last finished epoch.
* With ``overwrite``, the whole new output is written in the staging folder and swapped in
  at the end: until then the old output is untouched, and a killed run leaves it intact.
* Leftovers of a killed run beside the output (folders named exactly
  ``.{OUT}.finetune-staging-{pid}-{8 hex}`` or ``.{OUT}.finetune-old-{pid}-{8 hex}``, whose
  process is gone) are removed, or an interrupted swap is rolled back, by the next run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from ..core.errors import InputError
from ..core.io import remove_stale_temporaries

WEIGHTS_NAME = "open_clip_pytorch_model.bin"
INFO_NAME = "finetune.json"
CONFIG_NAME = "open_clip_config.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.json")
#: Paths (relative to OUT) that fine-tuning writes; everything else in OUT is the user's.
OWNED = frozenset({CONFIG_NAME, WEIGHTS_NAME, INFO_NAME, LAST_CHECKPOINT.as_posix(),
                   *(f"text/{name}" for name in TEXT_FILES)})
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.finetune-(?P<kind>staging|old)-(?P<pid>[0-9]+)-"
                       r"[0-9a-f]{8}$")

Log = Callable[[str], None]


# --------------------------------------------------------------------------- inputs


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_separate(out: str | Path, folders: Iterable[tuple[str | Path, str]] = (),
                   files: Iterable[tuple[str | Path, str]] = ()) -> None:
    """Refuse an output folder that could touch the user's input.

    ``out`` may not be, lie inside, or hold any of ``folders`` (the source model's folder,
    a sidecar caption folder), and may not be or hold any of ``files`` (a checkpoint, a CSV,
    the images it lists). Each input comes as ``(path, what)``; ``what`` names it in the
    message ("source model folder"). Paths are compared after resolving symbolic links.

    Raises
    ------
    InputError
        Naming the input and what to do.
    """
    out = Path(out).expanduser()
    target = _real(out)
    for folder, what in folders:
        real = _real(Path(folder))
        if target == real:
            raise InputError(f"-o {out} is the {what} itself; fine-tuning never writes into "
                             "its input. Choose a new folder for the output.")
        if _within(target, real):
            raise InputError(f"-o {out} lies inside the {what} {folder}; fine-tuning never "
                             "writes into its input. Choose a folder outside it.")
        if _within(real, target):
            raise InputError(f"-o {out} holds the {what} {folder}; fine-tuning never "
                             "replaces its input. Choose a folder that does not contain it.")
    for file, what in files:
        real = _real(Path(file))
        if real == target:
            raise InputError(f"-o {out} is the {what}; give a new folder for the output.")
        if _within(real, target):
            raise InputError(f"-o {out} holds the {what} {file}; fine-tuning never "
                             "replaces its input. Choose a folder that does not contain it.")


# --------------------------------------------------------------------------- leftovers


def _stale(entry: Path, pid: int) -> bool:
    """True when the process that made ``entry`` is gone (its id absent, or reused by a
    process started after the folder was last changed)."""
    from ..core.runtime import process_create_time, process_matches

    running = process_matches(pid)
    if running is not True:
        return running is False  # None: cannot tell, keep it
    started = process_create_time(pid)
    try:
        changed = entry.lstat().st_mtime
    except OSError:
        return False
    return started is not None and started > changed + 1.0


def _owned_temporaries(folder: Path) -> None:
    remove_stale_temporaries(folder)
    for sub in ("checkpoints", "text"):
        remove_stale_temporaries(folder / sub)


def clean_leftovers(out: Path, log: Log | None = None) -> list[Path]:
    """Remove what a killed run left beside (and in) ``out``; roll back a swap it broke off.

    Only folders named exactly as this module names its staging and backup folders are
    touched, and only when their process is gone: a staging folder is removed; a backup
    (``finetune-old``) is the previous output, renamed back to ``out`` when ``out`` is
    missing (the run died between the two renames of the swap), else removed. Temporary
    files of interrupted atomic writes inside ``out`` are removed too.

    Returns
    -------
    list of Path
        The folders removed or restored.
    """
    say = log or (lambda line: None)
    touched: list[Path] = []
    parent = out.parent
    if parent.is_dir():
        found = []
        for entry in parent.iterdir():
            match = _LEFTOVER.match(entry.name)
            if match is None or match["name"] != out.name:
                continue
            try:
                is_dir = stat.S_ISDIR(entry.lstat().st_mode)
            except OSError:
                continue
            if is_dir and _stale(entry, int(match["pid"])):
                found.append((match["kind"], entry))
        # Restore a backup first (when OUT is missing), then remove the rest.
        for kind, entry in sorted(found, key=lambda item: item[0] != "old"):
            if kind == "old" and not os.path.lexists(out):
                os.rename(entry, out)
                say(f"restored {out} from the backup a killed run left ({entry.name})")
            else:
                shutil.rmtree(entry)
                say(f"removed {entry.name}, left beside {out.name} by a killed run")
            touched.append(entry)
    if out.is_dir() and not out.is_symlink():
        _owned_temporaries(out)
    return touched


# --------------------------------------------------------------------------- the folder


def is_finetune_output(folder: Path) -> bool:
    """Whether ``folder`` was written by fine-tuning (it has ``checkpoints/last.pt`` or a
    ``finetune.json`` naming its weights)."""
    if (folder / LAST_CHECKPOINT).is_file():
        return True
    try:
        info = json.loads((folder / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("weights") == WEIGHTS_NAME and "config" in info


def _absolute(out: str | Path) -> Path:
    """``out`` made absolute; a symbolic link to a folder is followed (the folder is what
    gets staged and swapped)."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    return _real(out) if out.is_symlink() else out


def _carry_over(old: Path, new: Path, rel: str = "") -> None:
    """Link (or copy) into ``new`` every entry of ``old`` that fine-tuning does not write,
    so that the swap keeps the user's files."""
    for entry in sorted(old.iterdir()):
        key = f"{rel}{entry.name}"
        if key in OWNED:
            continue
        target = new / entry.name
        info = entry.lstat()
        if stat.S_ISDIR(info.st_mode):
            if not target.exists():
                os.mkdir(target)
                shutil.copystat(entry, target)
            _carry_over(entry, target, f"{key}/")
        elif os.path.lexists(target):
            continue  # a name we wrote in the staging folder wins (only OWNED ones can clash)
        elif stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(entry), target)
        elif stat.S_ISREG(info.st_mode):
            try:
                os.link(entry, target)
            except OSError:
                shutil.copy2(entry, target)
        # sockets, fifos, devices: not something a user keeps in a model folder; left out


class OutputFolder:
    """Where a fine-tuning run writes (``work``) and how it becomes ``out``.

    Modes: ``new`` (``out`` missing or empty: staged, published after the first epoch),
    ``overwrite`` (an earlier output: staged, swapped in by :meth:`finish`) and ``resume``
    (written in place). Use :meth:`open`.
    """

    def __init__(self, out: Path, mode: str, work: Path, log: Log):
        self.out, self.mode, self.work, self._say = out, mode, work, log
        self.published = mode == "resume"

    @property
    def staged(self) -> bool:
        """Whether ``work`` is still a staging folder (nothing of this run is in ``out``)."""
        return self.work != self.out

    @staticmethod
    def check(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> str:
        """The mode a run on ``out`` would use (``new``, ``overwrite`` or ``resume``), or
        the reason it may not run; nothing is written.

        Raises
        ------
        InputError
            ``out`` is a file, a non-empty folder without ``overwrite``/``resume``, a folder
            ``overwrite`` may not replace, or has nothing to resume.
        """
        out = _absolute(out)
        if resume and overwrite:
            raise InputError("--resume and --overwrite exclude each other.")
        if out.exists() and not out.is_dir():
            raise InputError(f"-o {out} is a file; give a folder for the fine-tuned model.")
        if resume:
            if not (out / LAST_CHECKPOINT).is_file():
                raise InputError(f"Nothing to resume: {out / LAST_CHECKPOINT} does not exist.")
            if not os.access(out / LAST_CHECKPOINT.parent, os.W_OK):
                raise InputError(f"Cannot write in {out / LAST_CHECKPOINT.parent}: permission "
                                 "denied. Make it writable or fine-tune into another folder.")
            return "resume"
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        parent = out.parent
        while not parent.exists() and parent.parent != parent:
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"-o {out}: {parent} is a file, not a folder; choose another "
                             "place for the output.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"Cannot write in {parent}: permission denied. Choose a folder "
                             "you can write to.")
        if not entries:
            return "new"
        if is_finetune_output(out):
            if overwrite:
                return "overwrite"
            raise InputError(f"{out} already holds a fine-tuned model. Pass --resume to "
                             "continue its training, --overwrite to start again, or choose "
                             "another folder.")
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        if overwrite:
            raise InputError(f"{out} is not a fine-tuning output (it holds {shown}); "
                             "--overwrite only replaces an earlier fine-tuned model. Choose a "
                             "new or empty folder.")
        raise InputError(f"{out} is not empty (it holds {shown}); fine-tuning writes only "
                         "into a new or empty folder (or --overwrite an earlier fine-tuned "
                         "model). Choose another one.")

    @classmethod
    def open(cls, out: str | Path, *, resume: bool = False, overwrite: bool = False,
             log: Log | None = None) -> OutputFolder:
        """Clean a killed run's leftovers, :meth:`check` ``out`` against the flags, and
        create the staging folder (which also proves the parent folder is writable).

        Raises
        ------
        InputError
            As :meth:`check`, or when the folder cannot be written.
        """
        say = log or (lambda line: None)
        out = _absolute(out)
        if not (out.exists() and not out.is_dir()):
            clean_leftovers(out, say)
        mode = cls.check(out, resume=resume, overwrite=overwrite)
        if mode == "resume":
            return cls(out, mode, out, say)
        return cls(out, mode, cls._make_staging(out), say)

    @staticmethod
    def _make_staging(out: Path) -> Path:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"Cannot create {out.parent}: {exc.strerror}. Choose a folder "
                             "you can write to.") from exc
        while True:
            staging = out.parent / (f".{out.name}.finetune-staging-{os.getpid()}-"
                                    f"{secrets.token_hex(4)}")
            try:
                os.mkdir(staging)  # the umask's mode, like any folder the user makes
            except FileExistsError:
                continue
            except OSError as exc:
                raise InputError(f"Cannot write in {out.parent}: {exc.strerror}. Choose a "
                                 "folder you can write to.") from exc
            return staging

    def epoch_saved(self) -> None:
        """Called after an epoch's files are written: a new output appears now (one
        rename); later epochs write into it directly."""
        if self.mode != "new" or not self.staged:
            return
        try:  # POSIX rename replaces a folder that is (still) empty in the same step
            os.rename(self.work, self.out)
        except OSError as exc:
            if not self.out.is_dir() or any(self.out.iterdir()):
                raise InputError(f"{self.out} was filled by something else during "
                                 "fine-tuning; nothing was written into it.") from exc
            self.out.rmdir()  # where rename does not replace an empty folder (Windows)
            os.rename(self.work, self.out)
        self.work = self.out
        self.published = True

    def finish(self) -> None:
        """The run is complete: swap the staged output in (``overwrite``), keeping files in
        the old output that fine-tuning did not write."""
        if self.mode == "new" and self.staged:
            self.epoch_saved()
        if self.mode != "overwrite" or not self.staged:
            return
        backup = self.out.parent / (f".{self.out.name}.finetune-old-{os.getpid()}-"
                                    f"{secrets.token_hex(4)}")
        _carry_over(self.out, self.work)
        os.rename(self.out, backup)   # a kill here: the next run renames the backup back
        os.rename(self.work, self.out)
        self.work = self.out
        self.published = True
        shutil.rmtree(backup)

    def abort(self) -> None:
        """Remove the staging folder of a run that failed or was cancelled (``out`` keeps
        what it had)."""
        if self.staged and self.work.is_dir():
            shutil.rmtree(self.work, ignore_errors=True)
