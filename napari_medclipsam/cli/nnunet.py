"""``medclipsam nnunet export|train|predict|status|cancel|repair``: weak supervision with
nnU-Net v2 (pseudo-label export, background training with checkpoint ensembling, ensemble
prediction).

``nnunet predict --scheduler local|tcp://HOST:8786 [--workers N] [--threads-per-worker T]``
shards the prediction over a Dask cluster (:mod:`.nnunet_dask`): ``local`` starts N worker
processes here (default one per GPU, else 2; T torch threads each), a ``tcp://`` address uses
a running scheduler (``dask scheduler``; ``dask worker tcp://HOST:8786`` on each GPU box).
Each worker loads the ensemble once (one GPU each on a machine with several); each image is
one task writing its maps into OUT; this machine writes ``uncertainty_ranking.csv`` and
``ensemble.json``. The files are those of a run without ``--scheduler``. The model folder,
the inputs and OUT must be on a file system every worker sees (checked first). A case that
fails is named, recorded in ensemble.json (``"failed"``) and the others go on (exit status 1),
with or without ``--scheduler``; a full or read-only disk stops the run.

Every error is one line (exit status 2): our own refusals, and the operating system's (a
read-only or full disk, a file where a folder is expected) in words.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..nnunet.schedule import EnsembleSchedule
from .common import (
    CLIError,
    add_scheduler_flags,
    check_scheduler_flags,
    exception_line,
    is_fatal_oserror,
    tqdm_progress,
)

__all__ = ["add_parser", "run_nnunet"]


def add_parser(sub) -> None:
    """Register ``nnunet`` and its actions on the top-level subparsers."""
    nn = sub.add_parser(
        "nnunet", help="weak supervision: export pseudo-labels, train nnU-Net with checkpoint "
                       "ensembling, predict with an uncertainty map.",
        description="nnU-Net v2 weak supervision (MedCLIP-SAMv2). nnU-Net's folders come from "
                    "--raw/--preprocessed/--results or $nnUNet_raw, $nnUNet_preprocessed, "
                    "$nnUNet_results.")
    nn.set_defaults(func=run_nnunet)
    nsub = nn.add_subparsers(dest="nnunet_command", metavar="ACTION")

    def folders(p, raw=True):
        g = p.add_argument_group("nnU-Net folders (default: the nnUNet_* environment variables)")
        if raw:
            g.add_argument("--raw", metavar="DIR", help="nnUNet_raw.")
        g.add_argument("--preprocessed", metavar="DIR", help="nnUNet_preprocessed.")
        g.add_argument("--results", metavar="DIR", help="nnUNet_results.")

    def dataset(p):
        p.add_argument("--dataset-id", type=int, required=True, metavar="N",
                       help="the dataset's number (Dataset{N:03d}_NAME).")

    ex = nsub.add_parser("export", help="images + masks -> a raw nnU-Net v2 dataset.",
                         description="Pair images with masks by file name (case.png <-> "
                                     "case.png or case_mask.png) and write "
                                     "OUT/Dataset{ID:03d}_{NAME}; nnU-Net's integrity check "
                                     "runs on it. Nothing is overwritten.")
    ex.add_argument("--images", required=True, metavar="DIR", help="folder of images.")
    ex.add_argument("--masks", required=True, metavar="DIR",
                    help="folder of masks (e.g. medclipsam segment's OUT/masks).")
    dataset(ex)
    ex.add_argument("--name", required=True, help="dataset name (letters, digits, _ and -).")
    ex.add_argument("--out", metavar="RAW_DIR", help="nnU-Net raw folder (default $nnUNet_raw).")
    ex.add_argument("--label-name", default="target", help="name of label 1 (e.g. tumor).")
    ex.add_argument("--labels", metavar="TABLE", default=None,
                    help="several targets in one label map: value=name pairs, e.g. "
                         "'1=left lung,2=right lung,3=nodule'; the masks keep these values "
                         "(other values are refused; values that are not 1..C are remapped "
                         "in order and recorded). Default: binary, every value > 0 is label 1 "
                         "(--label-name). With --append, the dataset's own table.")
    ex.add_argument("--channel-name", default=None,
                    help="input channel name; 'CT' makes nnU-Net use CT normalisation (HU "
                         "data), anything else z-score (default 'image').")
    ex.add_argument("--corrected", action="store_true",
                    help="record these masks as corrected by hand (default: raw zero-shot).")
    ex.add_argument("--append", action="store_true",
                    help="add the cases to an existing dataset with this ID.")
    ex.add_argument("--no-verify", action="store_true",
                    help="skip nnU-Net's verify_dataset_integrity.")

    d = EnsembleSchedule()
    tr = nsub.add_parser("train", help="plan, preprocess and train in the background.",
                         description="Start nnU-Net planning, preprocessing and training with "
                                     "checkpoint ensembling as a background process (it goes "
                                     "on after this command returns; watch it with 'status', "
                                     "stop it with 'cancel', continue with --resume).")
    dataset(tr)
    g = tr.add_argument_group("checkpoint ensembling")
    g.add_argument("--epochs", type=int, help=f"E, total epochs (default {d.epochs}).")
    g.add_argument("--cycles", type=int, help=f"D, learning-rate cycles (default {d.cycles}).")
    g.add_argument("--checkpoints-per-cycle", type=int,
                   help=f"G_d, last checkpoints kept per cycle (default "
                        f"{d.checkpoints_per_cycle}).")
    g.add_argument("--iterations-per-epoch", type=int,
                   help=f"default {d.iterations_per_epoch} (nnU-Net's).")
    g.add_argument("--val-iterations-per-epoch", type=int,
                   help=f"default {d.val_iterations_per_epoch}.")
    g.add_argument("--lr", type=float, help=f"maximum learning rate (default {d.lr_max}).")
    g.add_argument("--lr-min", type=float,
                   help=f"learning rate at the end of each cycle (default {d.lr_min}).")
    tr.add_argument("--configuration", default="2d", choices=("2d", "3d_fullres"),
                    help="nnU-Net configuration (default 2d, the paper's).")
    tr.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                    help="default auto: CUDA, then MPS, then CPU.")
    tr.add_argument("--data-workers", type=int, default=None,
                    help="nnU-Net's augmentation processes (nnUNet_n_proc_DA; default: "
                         "nnU-Net's choice).")
    tr.add_argument("--seed", type=int, default=None,
                    help="seed the training (weights and patch order): with --data-workers 0 "
                         "on the CPU the same seed gives the same checkpoints (default: "
                         "unseeded, as nnU-Net).")
    tr.add_argument("--resume", action="store_true",
                    help="continue a cancelled or crashed run from its last epoch.")
    tr.add_argument("--restart", action="store_true",
                    help="delete this dataset's previous training and start over.")
    tr.add_argument("--wait", action="store_true",
                    help="follow the progress here until the run ends (Ctrl-C stops "
                         "following, not the training).")
    folders(tr)

    pr = nsub.add_parser("predict", help="ensemble prediction + uncertainty of a folder.",
                         description="Predict every image in INPUT with all ensemble "
                                     "checkpoints: OUT/masks, OUT/probability (mean softmax "
                                     "of the foreground), OUT/uncertainty (entropy in nats, "
                                     "0..ln C) and OUT/uncertainty_ranking.csv (most uncertain "
                                     "first); with several targets the masks are the argmax "
                                     "in the exported label values and "
                                     "OUT/class_probabilities holds every class; "
                                     "OUT/ensemble.json names the classes. With --scheduler "
                                     "the images are shared out over a Dask cluster (same "
                                     "files).")
    dataset(pr)
    pr.add_argument("--input", required=True, metavar="DIR",
                    help="images of the dataset's file type (case.png or case_0000.png).")
    pr.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder.")
    pr.add_argument("--threshold", type=float, default=0.5,
                    help="foreground probability threshold (default 0.5; one target only, "
                         "several use the argmax).")
    pr.add_argument("--checkpoints", nargs="+", metavar="PTH",
                    help="use these checkpoints (default: all of fold_all/ensemble).")
    pr.add_argument("--configuration", default="2d", choices=("2d", "3d_fullres"))
    pr.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    pr.add_argument("--no-mirroring", action="store_true",
                    help="no mirroring test-time augmentation (4x faster in 2-D).")
    pr.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT.")
    folders(pr)
    add_scheduler_flags(pr, (
        "Each worker loads the ensemble once; each image is one task that writes its maps "
        "into OUT, which every worker must see, as the inputs and the model folder (a shared "
        "file system; checked first). The files are those of a run without --scheduler; a "
        "case that fails is recorded in ensemble.json and the others go on (exit status 1)."))

    st = nsub.add_parser("status", help="phase, epoch, cycle, loss, ETA and log tail.")
    dataset(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON.")
    st.add_argument("--lines", type=int, default=10, help="log lines to show (default 10).")
    folders(st)

    ca = nsub.add_parser("cancel", help="stop a running training (its whole process tree), "
                                        "or what a crashed one left running.",
                         description="Stop the training of a dataset: the job and its "
                                     "workers, or the workers a killed job left behind. Each "
                                     "process is verified as this job's (pid, start time, "
                                     "command line) before it is signalled.")
    dataset(ca)
    folders(ca)

    rp = nsub.add_parser("repair", help="complete or roll back a killed export/append.",
                         description="Find what a killed export or append left in the raw "
                                     "folder and repair it: an append is completed (or rolled "
                                     "back when it cannot be), staging folders of killed "
                                     "exports are removed. Every export, append and train "
                                     "does this first by itself.")
    dataset(rp)
    rp.add_argument("--out", "--raw", dest="raw", metavar="RAW_DIR",
                    help="nnU-Net raw folder (default $nnUNet_raw).")


def _folders(args: argparse.Namespace, raw: str | None = None):
    from ..nnunet.job import NnUNetFolders

    return NnUNetFolders.resolve(raw or getattr(args, "raw", None), args.preprocessed,
                                 args.results)


def run_nnunet(args: argparse.Namespace) -> int:
    import os

    from ..nnunet import job

    cmd = args.nnunet_command
    if cmd is None:
        raise CLIError("choose an action: export, train, predict, status, cancel or repair "
                       "(medclipsam nnunet --help).")
    if cmd == "repair":
        from ..nnunet.export import repair_dataset

        raw = args.raw or os.environ.get("nnUNet_raw")
        if not raw:
            raise CLIError("which raw folder: pass --raw RAW_DIR or set nnUNet_raw.")
        notes = repair_dataset(raw, args.dataset_id)
        print("Repaired (see above)." if notes else
              f"Nothing to repair for Dataset{args.dataset_id:03d} in {raw}.")
        return 0
    if cmd == "export":
        from ..nnunet.export import (
            cases_from_folders,
            export_dataset,
            format_label_table,
            nnunet_label_values,
            pair_images_and_masks,
            parse_label_table,
        )

        raw = args.out or os.environ.get("nnUNet_raw")
        if not raw:
            raise CLIError("where to write the dataset: pass --out RAW_DIR or set nnUNet_raw.")
        table = parse_label_table(args.labels) if args.labels is not None else None
        n = len(pair_images_and_masks(args.images, args.masks))
        print(f"Exporting {n} image/mask pairs ...", file=sys.stderr)
        res = export_dataset(cases_from_folders(args.images, args.masks,
                                                corrected=args.corrected, label_table=table),
                             raw, args.dataset_id, args.name, label_name=args.label_name,
                             label_table=table, channel_name=args.channel_name,
                             append=args.append,
                             verify=not args.no_verify)
        print(f"{'Added' if res.appended else 'Wrote'} {len(res.cases)} cases "
              f"({res.n_corrected} corrected, {res.n_zero_shot} zero-shot, "
              f"{res.file_ending}) to {res.folder}"
              + ("" if args.no_verify else "; nnU-Net's integrity check passed") + ".")
        if res.converted:
            shown = ", ".join(res.converted[:5]) + (" ..." if len(res.converted) > 5 else "")
            print(f"Note: {len(res.converted)} image(s) had other channels than the dataset "
                  f"(set by the first image) and were converted (colour -> gray by luminance, "
                  f"or gray -> RGB): {shown}. See medclipsam_cases.json.")
        if res.label_table:
            print(f"Labels (value=name): {format_label_table(res.label_table)}")
            nn_values = nnunet_label_values(res.label_table)
            if nn_values != res.label_table:
                print(f"nnU-Net needs consecutive values; they are stored as "
                      f"{format_label_table(nn_values)} (recorded in dataset.json, and "
                      "predictions use yours again).")
        print(f"Next: medclipsam nnunet train --dataset-id {args.dataset_id}")
        return 0
    folders = _folders(args)
    if cmd == "train":
        values = {"epochs": args.epochs, "cycles": args.cycles,
                  "checkpoints_per_cycle": args.checkpoints_per_cycle,
                  "iterations_per_epoch": args.iterations_per_epoch,
                  "val_iterations_per_epoch": args.val_iterations_per_epoch,
                  "lr_max": args.lr, "lr_min": args.lr_min}
        given = {k: v for k, v in values.items() if v is not None}
        saved = job.saved_schedule(job.job_dir_for(folders, args.dataset_id)) \
            if args.resume else None
        schedule = EnsembleSchedule(**{**(dataclasses.asdict(saved) if saved else {}),
                                       **given})
        job_dir = job.start_training(args.dataset_id, schedule, folders=folders,
                                     configuration=args.configuration, device=args.device,
                                     resume=args.resume, restart=args.restart,
                                     data_workers=args.data_workers, seed=args.seed)
        print(f"{'Resumed' if args.resume else 'Started'} training in the background: "
              f"{schedule.epochs} epochs in {schedule.cycles} cycles, "
              f"{schedule.n_checkpoints} ensemble checkpoints. Job folder: {job_dir}")
        print(f"Watch: medclipsam nnunet status --dataset-id {args.dataset_id}   "
              f"Stop: medclipsam nnunet cancel --dataset-id {args.dataset_id}")
        if args.wait:
            return _follow(job_dir)
        return 0
    if cmd == "predict":
        return _predict(args, folders)
    job_dir = job.job_dir_for(folders, args.dataset_id)
    if cmd == "status":
        status = job.read_status(job_dir, log_lines=args.lines)
        if args.json:
            print(json.dumps(status, indent=2, default=str))
            return 0
        print(job.format_status(status, details=True))
        if status.get("log_tail"):
            print(status["log_tail"])
        return 0 if status.get("phase") != "failed" else 1
    if cmd == "cancel":
        report = job.stop_job(job_dir)
        if report.job:
            print(f"Cancelled (stopped {len(report.stopped)} process(es)). Continue later "
                  f"with: medclipsam nnunet train --dataset-id {args.dataset_id} --resume")
        elif report.stopped:
            print(f"No training was running; stopped {len(report.stopped)} process(es) the "
                  f"crashed training left (pids {', '.join(map(str, report.stopped))}). "
                  f"Continue with: medclipsam nnunet train --dataset-id {args.dataset_id} "
                  "--resume")
        else:
            print("No training of this dataset is running"
                  + (f"; {report.note}." if report.note else "."))
        return 0
    raise CLIError(f"unknown action {cmd}")


def _predict(args: argparse.Namespace, folders) -> int:
    """``nnunet predict``: here, one case after the other, or with ``--scheduler`` on a
    Dask cluster (:mod:`.nnunet_dask`); the same files and summary."""
    from ..nnunet import job
    from ..nnunet.ensemble import ensemble_info, load_ensemble, predict_folder
    from ..nnunet.export import format_label_table

    check_scheduler_flags(args)
    model_dir = job.model_dir_for(folders, args.dataset_id, args.configuration)
    failed: dict[str, str] = {}
    if args.scheduler is not None:
        from .nnunet_dask import predict_distributed

        outcome = predict_distributed(args, model_dir)
        rows, info, failed = outcome.rows, outcome.info, outcome.failed
    else:
        predictor = load_ensemble(model_dir, args.checkpoints, device=args.device,
                                  threshold=args.threshold,
                                  use_mirroring=not args.no_mirroring)
        def on_error(path: Path, case: str, exc: Exception) -> str:
            if is_fatal_oserror(exc):   # every later case would fail alike
                raise exc
            failed[case] = line = exception_line(exc)
            print(f"{path.name}: failed: {line}", file=sys.stderr)
            return line

        rows = predict_folder(predictor, args.input, args.out, overwrite=args.overwrite,
                              progress=tqdm_progress("predicting"), on_error=on_error)
        info = ensemble_info(predictor)
    n_classes = info["entropy"]["n_classes"]
    print(f"Predicted {len(rows)} images with {len(info['checkpoints'])} "
          f"checkpoints into {args.out}.")
    print(f"Classes in the masks (value=name, also in ensemble.json): "
          f"{format_label_table(info['labels'])}"
          + ("; per-class probabilities in class_probabilities/"
             if n_classes > 2 else "") + ".")
    if rows:
        print("Most uncertain first (mean entropy, nats, 0..ln C):")
    for r in rows[:5]:
        print(f"  {r['case']}: {r['mean_entropy']:.4f}")
    if failed:
        print(f"{len(failed)} case(s) failed (each named above; listed in ensemble.json's "
              f"\"failed\"): {', '.join(failed)}.")
        return 1
    return 0


def _follow(job_dir) -> int:
    from ..nnunet import job

    last = None
    try:
        while True:
            status = job.read_status(job_dir, log_lines=0)
            line = job.format_status(status, details=True)
            if line != last:
                print(line, file=sys.stderr)
                last = line
            if not status["running"]:
                return 0 if status.get("phase") == "done" else 1
            time.sleep(2.0)
    except KeyboardInterrupt:
        print("Stopped following; the training goes on.", file=sys.stderr)
        return 0
