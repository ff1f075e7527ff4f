"""``medclipsam nnunet predict --scheduler local|tcp://HOST:8786``: the ensemble prediction of
a folder on a Dask cluster.

Each worker loads the ensemble once (:class:`~napari_medclipsam.cluster.ModelPlugin` over
:func:`load_worker_ensemble`: every checkpoint, on ``cuda:{worker % GPUs}`` when the device is
CUDA and the machine has several GPUs); each image is one task, run by the same
:func:`~napari_medclipsam.nnunet.ensemble.predict_case` as a run on this machine, which writes
the case's maps atomically into OUT (a shared file system on a cluster: checked before any
work, :func:`~napari_medclipsam.cluster.check_shared_folder`) and returns the case's ranking
row. This machine writes ``uncertainty_ranking.csv`` and ``ensemble.json`` from the rows at the
end, so every file is the one a run without ``--scheduler`` writes (``--threads-per-worker``
aside: a different torch thread count may change the last bits of the float maps;
``tests/test_nnunet_dask.py`` compares them byte for byte).

Everything that needs no model is checked here first (the model folder, the inputs, OUT);
the checkpoints are read on the workers, and a worker that cannot load them stops the run
in one line before any image. A case that fails (an unreadable image) is named in one line,
recorded in ``ensemble.json`` (``"failed"``) and the others go on (exit status 1); without
``--scheduler`` the first failure stops the run. A failure every case would share (a full or
read-only disk, the ensemble missing on a worker) stops the run. Ctrl-C cancels the cases
not started and says how many were written; the ranking and ensemble.json are then not
written.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
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
from .common import (
    CLIError,
    exception_line,
    is_fatal_oserror,
    sigterm_as_interrupt,
    tqdm_progress,
)

__all__ = ["PLUGIN", "Outcome", "load_worker_ensemble", "predict_distributed", "predict_task",
           "worker_info"]

PLUGIN = "medclipsam-nnunet-predict"

#: OS errors every case would share: the run stops at the first


# --------------------------------------------------------------------------- on the workers


def load_worker_ensemble(index: int, model_dir: str, checkpoints: list[str] | None,
                         device: str, threshold: float, use_mirroring: bool):
    """The worker plugin's factory: :func:`~napari_medclipsam.nnunet.ensemble.load_ensemble`
    on this worker's device."""
    from ..nnunet.ensemble import load_ensemble

    return load_ensemble(model_dir, checkpoints, device=worker_device(device, index),
                         threshold=threshold, use_mirroring=use_mirroring)


def worker_info(dask_worker=None) -> dict[str, Any]:
    """On each worker (``client.run``): ``{"info": ensemble.json's fields, "device": ...}``,
    or ``{"error": why the ensemble did not load}``."""
    from ..nnunet.ensemble import ensemble_info

    if dask_worker is None:   # a task
        try:
            plugin = worker_plugin(PLUGIN)
        except (RuntimeError, KeyError) as exc:
            return {"error": str(exc)}
    else:
        plugin = dask_worker.plugins.get(PLUGIN)
        if plugin is None or plugin.error or plugin.model is None:
            return {"error": "the ensemble did not load on this worker ("
                             f"{plugin.error if plugin else 'no plugin'})"}
    return {"info": ensemble_info(plugin.model), "device": str(plugin.model.device)}


def predict_task(item: tuple[str, str, str]) -> dict[str, Any]:
    """Task: predict one case ``(path, case, out folder)`` and write its maps.

    Returns
    -------
    dict
        ``{"case", "row", "seconds", "worker"}``, or ``{"case", "error", "fatal"}`` (``fatal``:
        every case would fail alike) rather than an exception.
    """
    from distributed import get_worker

    from ..nnunet.ensemble import predict_case

    path, case, out = item
    try:
        plugin = worker_plugin(PLUGIN)
    except (RuntimeError, KeyError) as exc:
        return {"case": case, "error": str(exc), "fatal": True}
    with plugin.lock:
        t0 = time.perf_counter()
        try:
            row = predict_case(plugin.model, path, case, out)
        except Exception as exc:  # one image must not stop the others
            return {"case": case, "error": exception_line(exc),
                    "fatal": is_fatal_oserror(exc)}
        return {"case": case, "row": row, "seconds": round(time.perf_counter() - t0, 3),
                "worker": str(get_worker().name)}


# --------------------------------------------------------------------------- on this machine


@dataclass
class Outcome:
    """What a distributed prediction wrote: the ranking rows (most uncertain first),
    ensemble.json's fields and the failed cases (case -> one-line error)."""

    rows: list[dict]
    info: dict
    failed: dict[str, str]


def predict_distributed(args: argparse.Namespace, model_dir: Path) -> Outcome:
    """``nnunet predict`` with ``--scheduler`` (see the module's docstring).

    Raises
    ------
    KeyboardInterrupt
        Ctrl-C (:class:`~.common.Terminated` for SIGTERM), after saying what was written.
    CLIError, InputError
        Before any case: the model folder, the inputs, OUT, the scheduler, a worker that
        cannot see the files or load the ensemble; during the run: a failure every case
        would share.
    """
    from ..nnunet.ensemble import (
        check_output_folder,
        list_cases,
        rank_rows,
        read_model_folder,
        write_ensemble_json,
        write_ranking,
    )

    dataset_json, _, _ = read_model_folder(model_dir, args.checkpoints)
    cases = list_cases(args.input, dataset_json["file_ending"])
    check_output_folder(args.out, args.overwrite)
    out = Path(args.out).resolve()
    items = [(str(p.resolve()), case, str(out)) for p, case in cases]
    checkpoints = [str(Path(c).resolve()) for c in args.checkpoints] \
        if args.checkpoints else None
    threads = args.threads_per_worker or (
        default_workers()[1] if args.scheduler == LOCAL else None)
    with sigterm_as_interrupt(), open_client(args.scheduler, args.workers, threads,
                                              log=_stderr) as client:
        try:
            check_shared_folder(client, out, [i[0] for i in items])
            register(client, ModelPlugin(PLUGIN, load_worker_ensemble, str(model_dir),
                                         checkpoints, args.device, args.threshold,
                                         not args.no_mirroring, torch_threads=threads))
            info = _loaded_info(client)
        except KeyboardInterrupt:
            _stderr("Stopped while starting the cluster; nothing was written.")
            raise
        results: dict[str, dict] = {}
        failed: dict[str, str] = {}
        paths = {case: path for path, case, _ in items}

        def on_result(item, value: dict) -> None:
            case = item[1]
            if "error" in value:
                if value.get("fatal"):
                    raise CLIError(f"{Path(paths[case]).name}: {value['error']}")
                failed[case] = value["error"]
                print(f"{Path(paths[case]).name}: failed: {value['error']}", file=sys.stderr)
            else:
                results[case] = value

        def on_error(item, exc: BaseException) -> None:   # the task itself failed
            failed[item[1]] = exception_line(exc)
            print(f"{Path(item[0]).name}: failed: {failed[item[1]]}", file=sys.stderr)

        try:
            run_tasks(client, predict_task, items, on_result=on_result, on_error=on_error,
                      progress=tqdm_progress("predicting"),
                      key=lambda item: f"nnunet-predict-{item[1]}")
        except KeyboardInterrupt:
            _stderr(f"Stopped: {len(results)} of {len(items)} case(s) predicted and written "
                    f"to {out} (masks/, probability/, uncertainty/); a case still running "
                    "on a worker may add its maps; uncertainty_ranking.csv and ensemble.json "
                    "were not written. Rerun with --overwrite to predict all.")
            raise
    rows = rank_rows([results[case]["row"] for _, case, _ in items if case in results])
    if rows:
        write_ranking(out, rows)
    extra = {"failed": [{"case": case, "file": paths[case], "error": failed[case]}
                        for _, case, _ in items if case in failed]} if failed else {}
    write_ensemble_json(out, info, **extra)
    _timings(results)
    return Outcome(rows, info, failed)


def _loaded_info(client) -> dict:
    """ensemble.json's fields as the workers loaded the ensemble; a worker that could not
    load it stops the run here (one line)."""
    _stderr("Dask: loading the ensemble on the workers...")
    answers = client.run(worker_info)
    if not answers:   # a running scheduler without workers yet: the first one to join
        answers = {"the first worker": client.submit(_task_info, pure=False).result()}
    for worker, answer in sorted(answers.items()):
        if "error" in answer:
            raise CLIError(f"on Dask worker {worker}: {answer['error']}")
    devices = sorted({a["device"] for a in answers.values()})
    first = next(iter(answers.values()))["info"]
    _stderr(f"Dask: {len(first['checkpoints'])} checkpoint(s) loaded on {len(answers)} "
            f"worker(s) ({', '.join(devices)}).")
    return first


def _task_info(_: Any = None) -> dict:
    return worker_info()


def _timings(results: dict[str, dict]) -> None:
    if not results:
        return
    seconds = [r["seconds"] for r in results.values()]
    workers = len({r["worker"] for r in results.values()})
    _stderr(f"Dask: {len(seconds)} case(s) on {workers} worker(s), "
            f"{sum(seconds) / len(seconds):.2f} s per case on a worker.")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
