"""Start Dask workers on SLURM (one GPU job each) and print the scheduler address for
``medclipsam segment ... --scheduler ADDRESS`` (or ``nnunet predict``, or the napari dock's
Compute on field). Runs until Ctrl-C, which stops the jobs.

    pip install "napari-medclipsam[cluster]"        # dask-jobqueue
    python examples/cluster/slurm_cluster.py --jobs 8

Settings (partition, memory, environment) come from ``jobqueue.yaml`` beside this file (or
your ``~/.config/dask/jobqueue.yaml``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dask
import yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs (GPU workers)")
    parser.add_argument("--port", type=int, default=8786, help="the scheduler's port")
    args = parser.parse_args()
    here = Path(__file__).with_name("jobqueue.yaml")
    if here.is_file():
        dask.config.update(dask.config.config, yaml.safe_load(here.read_text()), priority="new")
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(scheduler_options={"port": args.port})
    cluster.scale(jobs=args.jobs)
    print(f"Scheduler: {cluster.scheduler_address}   dashboard: {cluster.dashboard_link}")
    print(f"Run: medclipsam segment IMAGES --prompt TEXT -o OUT --scheduler "
          f"{cluster.scheduler_address}")
    print("The job script:\n" + cluster.job_script())
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
