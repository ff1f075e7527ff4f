"""Running many images on a Dask cluster (``dask.distributed``): the scheduler, the workers'
models, the shared folder, the task loop. Used by ``medclipsam segment --scheduler`` and
``medclipsam nnunet predict --scheduler``, and by the dock's remote Run all.

* ``--scheduler local`` starts a :class:`distributed.LocalCluster` of ``--workers`` processes
  on this machine (one task at a time each, ``--threads-per-worker`` torch threads; default:
  one worker per GPU, else the CPU cores shared between two workers); ``tcp://HOST:8786``
  connects to a running scheduler (``dask scheduler`` on one machine, ``dask worker
  tcp://HOST:8786`` on each GPU box, or ``dask-jobqueue`` on SLURM/PBS).
* :class:`ModelPlugin` loads the models once per worker (a ``WorkerPlugin``), not per task;
  tasks on one worker take turns on them (a lock), so a worker with several Dask threads is
  still correct.
* :func:`check_shared_folder` proves, before any work, that every worker sees the inputs and
  can write the output folder (a cluster needs a shared file system there).
* :func:`run_tasks` submits one task per item, hands each result to the caller as it
  completes (the caller records it and writes the manifest), shows a progress bar, and on
  Ctrl-C cancels what has not started.

Nothing here imports torch; ``distributed`` is imported when a cluster is used.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .core.errors import InputError

#: ``--scheduler`` value that starts a cluster on this machine
LOCAL = "local"
#: how long to try reaching a running scheduler
CONNECT_TIMEOUT = "20s"


def check_scheduler(value: str | None) -> str | None:
    """``local``, ``tcp://HOST:PORT`` (also ``tls://``, ``ucx://``, ``ws(s)://``) or None.

    Raises
    ------
    InputError
        Anything else, in one line.
    """
    if value is None:
        return None
    value = value.strip()
    if value == LOCAL or "://" in value and value.split("://", 1)[0] in (
            "tcp", "tls", "ucx", "ws", "wss", "inproc"):
        return value
    raise InputError(f"--scheduler {value!r}: give 'local' (a cluster on this machine) or a "
                     "scheduler address such as tcp://gpu-box:8786.")


def default_workers(threads_per_worker: int | None = None) -> tuple[int, int]:
    """(workers, torch threads per worker) for a local cluster: one worker per CUDA GPU;
    without GPUs two workers sharing the cores (at least one thread each)."""
    cores = os.cpu_count() or 1
    gpus = 0
    with contextlib.suppress(Exception):  # torch missing or broken: CPU workers
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    workers = gpus or max(1, min(2, cores))
    threads = threads_per_worker or max(1, cores // workers)
    return workers, threads


def worker_device(device: str | None, worker_index: int) -> str | None:
    """The device a worker's models go to: ``device`` as given, except CUDA chosen
    automatically (None, ``auto`` or ``cuda``) on a machine with several GPUs, which spreads
    the workers of a local cluster over them (``cuda:{worker_index % n}``)."""
    if device not in (None, "", "auto", "cuda"):
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{worker_index % count}" if count > 1 else device


@contextlib.contextmanager
def open_client(scheduler: str, workers: int | None = None,
                threads_per_worker: int | None = None,
                log: Callable[[str], None] | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` on a new local cluster or a running scheduler; closed (and a
    local cluster shut down) on exit.

    Raises
    ------
    InputError
        The scheduler cannot be reached, in one line saying how to start one.
    """
    say = log or (lambda line: None)
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - a dependency; a broken install
        raise InputError("--scheduler needs the 'distributed' package: pip install "
                         "distributed") from exc
    with _quiet_distributed():
        yield from _client(scheduler, workers, threads_per_worker, say, Client, LocalCluster)


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """distributed logs every worker's start and stop at INFO (and a slow shutdown at
    WARNING) through handlers of its own: only errors show, unless the root logger is at
    DEBUG (``medclipsam -v``)."""
    import logging

    logger = logging.getLogger("distributed")
    before = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def _client(scheduler, workers, threads_per_worker, say, Client, LocalCluster):
    if scheduler == LOCAL:
        import dask

        n, threads = default_workers(threads_per_worker)
        n = workers or n
        # distributed's nanny starts workers with OMP/MKL threads at 1 and glibc's
        # MALLOC_TRIM_THRESHOLD_ set, which stops malloc's adaptive mmap threshold: every large
        # tensor is then mapped and unmapped afresh (measured: 11.8 s against 6.7 s per image
        # for the full chain). Workers here get the threads they run and glibc's defaults.
        environ = {name: threads for name in (
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=40)
        client = Client(cluster)
        say(f"Dask: a local cluster of {n} worker(s), {threads} torch thread(s) each; "
            f"dashboard {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT)
    except Exception as exc:  # OSError, TimeoutError: the address is wrong or nothing listens
        raise InputError(f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__}:"
                         f" {exc}); start one with 'dask scheduler' and workers with 'dask "
                         f"worker {scheduler}', or use --scheduler local.") from None
    try:
        n = len(client.scheduler_info().get("workers", {}))
        if n == 0:
            say(f"Dask: no worker is connected to {scheduler} yet; the tasks wait for one.")
        say(f"Dask: {scheduler}, {n} worker(s); dashboard {client.dashboard_link}")
        yield client
    finally:
        client.close()


def _probe(path: str, inputs: Sequence[str], out: str) -> str:
    """On a worker: what it cannot see or write ("" when all is well)."""
    if not os.path.isfile(path):
        return f"does not see {out} (the output folder must be on a shared file system)"
    for item in inputs:
        if not os.access(item, os.R_OK):
            return f"cannot read {item} (the inputs must be on a shared file system)"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"cannot write in {out}"
    return ""


def check_shared_folder(client, out: str | Path, inputs: Sequence[str | Path]) -> None:
    """Check that every worker sees ``out`` (a probe file written here) and can write it, and
    reads the first and last input. Nothing is left behind.

    Raises
    ------
    InputError
        Naming the first worker that cannot, and what.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".medclipsam-probe-{secrets.token_hex(6)}"
    probe.write_text("probe\n")
    sample = [str(Path(p).resolve()) for p in (inputs[:1] + inputs[-1:] if inputs else [])]
    try:
        answers = client.run(_probe, str(probe), sample, str(out))
    finally:
        probe.unlink(missing_ok=True)
    for worker, problem in sorted(answers.items()):
        if problem:
            raise InputError(f"Dask worker {worker} {problem}.")


try:  # the base class when distributed is installed (it is a dependency)
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover
    _WorkerPlugin = object


class ModelPlugin(_WorkerPlugin):
    """Builds ``factory(worker_index, *args)`` once when a worker starts (or joins), keeps it
    as :attr:`model`, and sets torch's thread count. Tasks get it with
    :func:`worker_plugin` and hold :attr:`lock` while they use it.

    Parameters
    ----------
    name : str
        The plugin's name (one per kind of run).
    factory : callable
        A module-level function (it is pickled to the workers); ``worker_index`` is the
        worker's number in a local cluster (its name), else 0; use it to pick a GPU.
    torch_threads : int, optional
        ``torch.set_num_threads`` on each worker.
    """

    idempotent = False

    def __init__(self, name: str, factory: Callable[..., Any], *args: Any,
                 torch_threads: int | None = None):
        self.name = name
        self.factory = factory
        self.args = args
        self.torch_threads = torch_threads
        self.model: Any = None
        self.lock = threading.Lock()
        self.error: str = ""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["model"], state["lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def setup(self, worker) -> None:
        if self.torch_threads:
            import torch

            torch.set_num_threads(int(self.torch_threads))
        index = worker.name if isinstance(worker.name, int) else 0
        try:
            self.model = self.factory(index, *self.args)
        except Exception as exc:  # reported by every task of this worker, in one line
            self.error = f"{type(exc).__name__}: {exc}"


def worker_plugin(name: str, worker=None) -> ModelPlugin:
    """The :class:`ModelPlugin` ``name`` of the worker running the calling task (or of
    ``worker``: inside ``client.run``, which passes ``dask_worker``).

    Raises
    ------
    RuntimeError
        Its models failed to load on this worker (the message says why).
    """
    from distributed import get_worker

    plugin = (worker or get_worker()).plugins[name]
    if plugin.error:
        raise RuntimeError(f"the models did not load on this worker ({plugin.error})")
    return plugin


def register(client, plugin: ModelPlugin) -> None:
    """Send ``plugin`` to every worker (and to workers that join later)."""
    client.register_plugin(plugin, name=plugin.name)


def run_tasks(client, fn: Callable[..., Any], items: Sequence[Any], *,
              on_result: Callable[[Any, Any], None],
              on_error: Callable[[Any, BaseException], None],
              progress: Callable[[int, int], None] | None = None,
              stop: Callable[[], bool] | None = None,
              key: Callable[[Any], str] = str) -> int:
    """Submit ``fn(item)`` for every item, one task each (``pure=False``: a rerun recomputes),
    and hand each outcome to ``on_result(item, value)`` or ``on_error(item, exc)`` in the
    order they complete. Returns how many completed.

    Ctrl-C (or ``stop()`` True between results) cancels the tasks not finished and re-raises
    :class:`KeyboardInterrupt`; so does an exception a callback raises (e.g. a full disk:
    the next tasks would fail alike). Results that arrived were already handed over.
    """
    from distributed import as_completed

    futures = {client.submit(fn, item, key=f"{key(item)}-{secrets.token_hex(4)}",
                             pure=False): item for item in items}
    done = 0
    try:
        for future in as_completed(futures):
            item = futures[future]
            try:
                value = future.result()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one item's failure never stops the rest
                on_error(item, exc)
            else:
                on_result(item, value)
            done += 1
            if progress is not None:
                progress(done, len(futures))
            if stop is not None and stop():
                raise KeyboardInterrupt
    except BaseException:  # Ctrl-C, or a callback that stops the run (a full disk)
        client.cancel([f for f in futures if not f.done()])
        raise
    return done
