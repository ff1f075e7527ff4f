"""``medclipsam segment --scheduler local|tcp://HOST:8786``: the same run on a Dask cluster.

Each worker loads the models once (:class:`~napari_medclipsam.cluster.ModelPlugin`: the
pipeline of the run's settings, prepared, and the run's record of the models); each image is
one task (a volume's slices stay on one worker, for SAM's cache, propagation and its partial
saves), run by the same :func:`~.segment.segment_one` as a run on this machine, which writes
the image's outputs atomically into OUT (a shared file system on a cluster: checked before any
work, :func:`~napari_medclipsam.cluster.check_shared_folder`). The client records each entry
as its task ends and writes ``manifest.json`` (throttled, and at the end), so the outputs and
the manifest are those of a run on this machine: the same parameters and seeds per image give
the same files (``tests/test_segment_dask.py`` compares them byte for byte). Each task also
writes its entry to ``OUT/entries/NAME.json``, so a run killed between two manifest writes
(even by SIGKILL, workers and all) loses no finished image: ``--resume`` merges them; they are
removed once the run's manifest holds them all.

A failure on one image is recorded and the others go on; a failure every image would share
(a full disk, the models missing on a worker) stops the run, said once. ``--resume`` works as
without ``--scheduler`` (the kept images cost a hash on a worker). Ctrl-C cancels the images
not finished: the manifest lists them as pending, ``--resume`` does them.

The models are checked and loaded on the workers (the GPU box has them; this machine may
not): one task asks a worker for the record of its models before any image is sent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..cluster import (
    LOCAL,
    ModelPlugin,
    check_shared_folder,
    default_workers,
    open_client,
    register,
    run_tasks,
    worker_device,
    worker_plugin,
)
from .common import CLIError, Terminated, sigterm_as_interrupt
from .run_record import ENTRIES, FolderLock, Plan, Run, entry_path, model_records
from .segment import (
    MANIFEST_SECONDS,
    Tally,
    failed_entry,
    interrupted,
    record_entry,
    record_probe_errors,
    resolve_plan,
    resolved_models,
    segment_one,
    start_output,
    stop_on_fatal,
    summary,
)

PLUGIN = "medclipsam-segment"


class WorkerState:
    """What a worker keeps for the run: the plan, the pipeline (models loaded) and the run's
    record of the models (never saved on the worker)."""

    def __init__(self, plan: Plan, pipeline, run: Run):
        self.plan, self.pipeline, self.run = plan, pipeline, run


def build_worker_state(index: int, plan: Plan) -> WorkerState:
    """The factory of the worker plugin: the pipeline of ``plan``'s settings, prepared."""
    import dataclasses

    from ..core.pipeline import ZeroShotPipeline

    config = plan.config
    device = worker_device(config.device, index)
    pinned = {"device": device}
    if plan.sam_model not in ("", "none"):  # every worker uses the backend the run records
        pinned["sam_model"] = plan.sam_model
    config = dataclasses.replace(config, **pinned)
    loader = None
    if config.method == "vlsm":
        from ..vlsm.models import load_vlsm

        loader = load_vlsm
    pipeline = ZeroShotPipeline(config, vlsm=loader)
    pipeline.prepare()
    return WorkerState(plan, pipeline, Run(plan, pipeline, "", every=float("inf")))


def worker_records(_: Any = None) -> dict[str, Any]:
    """Task: the record of this worker's models (or the reason they did not load)."""
    state: WorkerState = worker_plugin(PLUGIN).model
    return model_records(state.plan, state.pipeline)


class _NoBar:
    """Stands in for the progress bar ``segment_one`` writes its stage into."""

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass


def segment_task(path: str) -> dict[str, Any]:
    """Task: segment one image (or volume) on this worker; the manifest entry (a failed
    entry, with ``fatal`` when every image would fail alike, rather than an exception)."""
    from distributed import get_worker

    from ..core.io import write_text

    plugin = worker_plugin(PLUGIN)
    state: WorkerState = plugin.model
    f = Path(path)
    with plugin.lock:
        t0 = time.perf_counter()
        try:
            entry = segment_one(state.plan, state.pipeline, state.run, f, _NoBar())
        except Exception as exc:  # one input must not stop the batch
            entry, fatal = failed_entry(state.plan, f, exc)
            return {**entry, "fatal": fatal}
        entry.pop("stop", None)
        if not entry.get("kept"):
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            entry["worker"] = str(get_worker().name)
            write_text(entry_path(state.plan.out, entry["name"]),
                       json.dumps(entry, indent=2, default=str))
        return entry


def run_distributed(plan: Plan, args: argparse.Namespace) -> int:
    """``segment`` with ``--scheduler``; the exit status as without it."""
    say = _stderr
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    threads = args.threads_per_worker or (
        default_workers()[1] if args.scheduler == LOCAL else None)
    with sigterm_as_interrupt(), open_client(args.scheduler, args.workers, threads,
                                              log=say) as client:
        try:
            files = [f for f in plan.files if f not in plan.probe_errors]
            if not plan.precision:  # a remote cluster: "auto" means what it means there
                try:
                    resolved = client.submit(resolved_models, plan.config, pure=False).result()
                except CLIError as exc:
                    raise CLIError(f"on a Dask worker: {exc}") from None
                resolve_plan(plan, resolved)
            plan.out.mkdir(parents=True, exist_ok=True)
            check_shared_folder(client, plan.out, files)
            register(client, ModelPlugin(PLUGIN, build_worker_state, plan,
                                         torch_threads=threads))
            say("Dask: loading the models on the workers...")
            try:
                records = client.submit(worker_records, pure=False).result()
            except RuntimeError as exc:
                raise CLIError(f"on a Dask worker: {exc}") from None
        except KeyboardInterrupt as exc:
            print(f"{'Terminated' if isinstance(exc, Terminated) else 'Interrupted'} while "
                  "starting the cluster; nothing was written.", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
        run = Run(plan, None, started, every=MANIFEST_SECONDS, records=records)
        run.check_models()
        return _run_tasks(client, plan, run, files)


def _run_tasks(client, plan: Plan, run: Run, files: list[Path]) -> int:
    from tqdm import tqdm

    with FolderLock(plan.out):
        start_output(plan, run)
        if not plan.resume:  # a killed run's entries belong to that run
            _remove_entries(plan.out)
        tally = Tally()
        record_probe_errors(plan, run, tally)
        bar = tqdm(total=len(files), desc="segment", unit="image", file=sys.stderr,
                   disable=None)
        by_path = {str(f): f for f in files}

        def on_result(path: str, entry: dict[str, Any]) -> None:
            f = by_path[path]
            fatal = entry.pop("fatal", False)
            if fatal:
                entry.pop("worker", None)
                stop_on_fatal(run, f, entry, CLIError(f"{f.name}: {entry['error']}"))
            record_entry(plan, run, f, entry, tally)
            bar.update(1)

        def on_error(path: str, exc: BaseException) -> None:  # the task itself failed
            f = by_path[path]
            entry, _ = failed_entry(plan, f, exc)
            record_entry(plan, run, f, entry, tally)
            bar.update(1)

        try:
            run_tasks(client, segment_task, list(by_path), on_result=on_result,
                      on_error=on_error, key=lambda p: f"segment-{Path(p).name}")
        except KeyboardInterrupt as exc:
            bar.close()
            return interrupted(plan, run, tally, exc, None)
        finally:
            bar.close()
        run.save("finished", force=True)
        _remove_entries(plan.out)  # all in manifest.json now
    return summary(plan, run, tally)


def _remove_entries(out: Path) -> None:
    """Remove the per-image entry files (our own: ``OUT/entries/*.json``) and the folder
    when nothing else is in it."""
    folder = out / ENTRIES
    if not folder.is_dir():
        return
    for path in folder.glob("*.json"):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
