"""The segment dock's work on another machine: a GPU box running a Dask worker (issue 16).

On the GPU machine, from this package's environment (the models are read or downloaded
into ``$MEDCLIPSAM_HOME`` there)::

    dask scheduler                                  # says: Scheduler at tcp://gpu-box:8786
    dask worker tcp://gpu-box:8786 --nworkers 1     # one per GPU (CUDA_VISIBLE_DEVICES=1 ...)

Then the dock's Models > Compute on field takes ``tcp://gpu-box:8786``: Run all, All slices
and Propagate through volume go there (:class:`RemoteCompute`), their results come back
as the same :class:`~napari_medclipsam.core.pipeline.SegmentationResult` /
:class:`~napari_medclipsam.core.pipeline.VolumeResult`, and a single image's SAM embedding
comes back with it (:meth:`~napari_medclipsam.core.sam.SamSession.export_embedding`), so box
and point edits run only SAM's decoder here, in milliseconds.

On the worker (:func:`worker_pipeline`, :func:`run_on_worker`): one
:class:`~napari_medclipsam.cluster.ModelPlugin` per set of models (:func:`plugin_name`, a
hash of the config's model fields), so the models load once per worker and a change of
model fields loads the new ones once; the other settings travel with each task. Progress
comes back as Dask events (:meth:`distributed.Worker.log_event`, one topic per run), Cancel
sets a :class:`distributed.Event` the worker's ``should_stop`` reads (the slices finished
come back, as locally), and cancels the task if the worker does not answer.

Nothing here imports Qt, napari or torch at import time; ``distributed`` is imported when a
machine is connected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_medclipsam.core.config import PipelineConfig
from napari_medclipsam.core.errors import CancelledError, InputError
from napari_medclipsam.core.pipeline import SegmentationResult, VolumeResult

ProgressFn = Callable[[str, float], None]
StopFn = Callable[[], bool]

#: what the Compute on field says for "compute here"
THIS_MACHINE = "this machine"
#: the commands to run on the GPU machine, in this package's environment
SCHEDULER_COMMAND = "dask scheduler"
WORKER_COMMAND = "dask worker {address} --nworkers 1"
#: an example address (the tooltips')
EXAMPLE_ADDRESS = "tcp://gpu-box:8786"
#: seconds to reach a scheduler before saying it cannot be reached
CONNECT_SECONDS = 5.0
#: seconds Cancel waits for the worker to stop and send the slices it finished
STOP_GRACE_SECONDS = 10.0
#: seconds between the worker's looks at the stop flag (each is a round trip)
STOP_POLL_SECONDS = 0.25
SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")
#: the config fields that need other models on the worker (one plugin each)
MODEL_FIELDS = ("clip_model", "sam_model", "sam_checkpoint", "device", "precision")


def compute_address(text: str | None) -> str | None:
    """The Compute on field's value: None for this machine (empty, ``this machine``), else a
    Dask scheduler address (``gpu-box:8786`` gets ``tcp://``).

    Raises
    ------
    InputError
        Anything else, in one line.
    """
    value = (text or "").strip()
    if not value or value.lower() == THIS_MACHINE:
        return None
    if "://" not in value:
        host, _, port = value.rpartition(":")
        if host and port.isdigit() and " " not in value:
            return f"tcp://{value}"
    else:
        scheme, rest = value.split("://", 1)
        if scheme in SCHEMES and rest and " " not in rest:
            return value
    raise InputError(f"Compute on {value!r}: leave it empty ({THIS_MACHINE}) or give a Dask "
                     f"scheduler address such as {EXAMPLE_ADDRESS}.")


def model_fields(config: PipelineConfig) -> dict[str, Any]:
    """The settings that choose the models: :data:`MODEL_FIELDS` and the VLSM's model."""
    fields = {name: getattr(config, name) for name in MODEL_FIELDS}
    fields["vlsm_model"] = config.vlsm.model
    return fields


def plugin_name(config: PipelineConfig) -> str:
    """``medclipsam-models-<12 hex>``: the worker plugin holding ``config``'s models."""
    text = json.dumps(model_fields(config), sort_keys=True)
    return f"medclipsam-models-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# --------------------------------------------------------------------------- the worker
def worker_pipeline(worker_index: int, fields: dict[str, Any]):
    """The :class:`~napari_medclipsam.cluster.ModelPlugin` factory: a
    :class:`~napari_medclipsam.core.pipeline.ZeroShotPipeline` on these model fields (its
    models load on the first task, whose progress says so; then they stay)."""
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    fields = dict(fields)
    vlsm = PipelineConfig().vlsm
    vlsm = dataclasses.replace(vlsm, model=fields.pop("vlsm_model", vlsm.model))
    from .cluster import worker_device

    fields["device"] = worker_device(fields.get("device"), worker_index)
    return ZeroShotPipeline(PipelineConfig(**fields, vlsm=vlsm), vlsm=load_vlsm_model)


def load_vlsm_model(source: str, device: str | None = None):
    """:func:`napari_medclipsam.vlsm.models.load_vlsm`, imported when a VLSM is first
    needed, on a Dask worker or in the dock (it imports torch and transformers)."""
    from napari_medclipsam.vlsm.models import load_vlsm

    return load_vlsm(source, device)


def _worker_stop(name: str) -> StopFn:
    """``should_stop`` on the worker: whether the client set the :class:`distributed.Event`
    ``name`` (looked at every :data:`STOP_POLL_SECONDS`)."""
    from distributed import Event

    event = Event(name)
    state = {"at": 0.0, "set": False}

    def should_stop() -> bool:
        now = time.monotonic()
        if not state["set"] and now - state["at"] >= STOP_POLL_SECONDS:
            state["at"] = now
            state["set"] = bool(event.is_set())
        return state["set"]

    return should_stop


def _describe_device(device: str) -> str:
    """``"cuda:0, NVIDIA H100 80GB HBM3"`` or ``"cpu"``."""
    if device.startswith("cuda"):
        import torch

        try:
            return f"{device}, {torch.cuda.get_device_name(torch.device(device))}"
        except Exception:  # noqa: BLE001 - only a description
            return device
    return device


def run_on_worker(name: str, kind: str, config: PipelineConfig, data: np.ndarray,
                  options: dict[str, Any], topic: str, stop: str) -> dict[str, Any]:
    """The task: ``kind`` (``segment``, ``segment_volume`` or ``propagate``) with the worker's
    models of plugin ``name`` and ``config``'s other settings, on ``data`` (an image, or a
    (Z, Y, X) volume) with ``options`` (the text; seeds and locked slices to propagate).

    Progress goes to the client as events of ``topic``; ``stop`` names the Event Cancel sets.
    Returns ``{"result" | "volume", "embedding", "sam_name", "slice_faithfulness", "worker",
    "device", "seconds"}``, or ``{"cancelled": True, "partial", "message"}``.
    """
    import socket

    from distributed import get_worker

    from napari_medclipsam.cluster import worker_plugin
    from napari_medclipsam.core.models import resolve_device

    start = time.monotonic()
    worker = get_worker()
    plugin = worker_plugin(name)

    def report(stage: str, fraction: float) -> None:
        worker.log_event(topic, {"stage": str(stage), "fraction": float(fraction)})

    should_stop = _worker_stop(stop)
    with plugin.lock:
        pipeline = plugin.model
        device = resolve_device(pipeline.config.device)
        where = f"{socket.gethostname()} ({_describe_device(device)})"
        report(f"running on {where}", 0.0)
        pipeline.config = dataclasses.replace(config, device=pipeline.config.device)
        reply: dict[str, Any] = {"worker": worker.address, "device": where}
        try:
            pipeline.prepare(report)
            if kind == "segment":
                result = pipeline.segment(data, options["text"], progress=report,
                                          should_stop=should_stop)
                reply["result"] = result
                reply.update(_embedding_of(pipeline, result))
            elif kind == "segment_volume":
                checks: dict[int, Any] = {}

                def each_slice(z: int, one: SegmentationResult) -> None:
                    if one.faithfulness is not None:
                        checks[z] = one.faithfulness

                reply["volume"] = pipeline.segment_volume(
                    data, options["text"], progress=report, should_stop=should_stop,
                    on_slice=each_slice)
                reply["slice_faithfulness"] = checks
            elif kind == "propagate":
                reply["volume"] = pipeline.propagate_volume(
                    data, text=options.get("text"), seeds=options.get("seeds"),
                    locked=options.get("locked"), progress=report, should_stop=should_stop)
            else:
                raise ValueError(f"Unknown remote task {kind!r}.")
        except CancelledError as exc:
            partial = getattr(exc, "partial", None)
            if kind == "segment_volume":
                partial = (partial, checks)
            return {"cancelled": True, "partial": partial, "message": str(exc)}
    reply["seconds"] = time.monotonic() - start
    return reply


def _embedding_of(pipeline, result: SegmentationResult) -> dict[str, Any]:
    """The SAM embedding of the image a single-image run segmented, when SAM ran on it."""
    config = pipeline.config
    sam_ran = result.found and (config.method != "vlsm" or config.vlsm.refine)
    if not sam_ran or result.rgb is None:
        return {}
    session = pipeline.session
    key = session.key_for(result.rgb)
    if not session.is_cached(key):
        return {}
    return {"embedding": session.export_embedding(key), "sam_name": pipeline.sam.name}


def describe_worker() -> dict[str, Any]:
    """On a worker (``client.run``): its host, threads and GPUs."""
    import os
    import socket

    gpus: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - only a description
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"host": socket.gethostname(), "gpus": gpus, "visible": visible,
            "cores": os.cpu_count() or 1}


# --------------------------------------------------------------------------- this machine
@dataclass
class RemoteReply:
    """What a run on the remote machine gave back.

    Attributes
    ----------
    result : SegmentationResult or None
        A single image's run (its ``rgb`` is the image exactly as the worker saw it).
    volume : VolumeResult or None
        An All slices run or a propagation.
    embedding : dict or None
        SAM's embedding of ``result.rgb`` (:meth:`~napari_medclipsam.core.sam.SamSession.
        export_embedding`); None when SAM did not run.
    sam_name : str or None
        The SAM the worker ran (``auto`` resolved there), with ``embedding``.
    slice_faithfulness : dict
        An All slices run's faithfulness check per slice.
    worker, device : str
        The worker's address; its host and device (``"gpu-box (cuda:0, NVIDIA ...)"``).
    seconds : float
        On the worker (models' loading included).
    """

    result: SegmentationResult | None = None
    volume: VolumeResult | None = None
    embedding: dict[str, Any] | None = None
    sam_name: str | None = None
    slice_faithfulness: dict[int, Any] = field(default_factory=dict)
    worker: str = ""
    device: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class RemoteStatus:
    """A connected scheduler and its workers (host, GPUs) as the dock shows it."""

    address: str
    workers: tuple[dict[str, Any], ...] = ()

    @property
    def line(self) -> str:
        """:attr:`text` as a sentence: ``"Connected to ..."``."""
        text = self.text
        return text[:1].upper() + text[1:]

    @property
    def text(self) -> str:
        """``"connected to tcp://gpu-box:8786: 1 worker (gpu-box: NVIDIA H100 80GB HBM3)"``."""
        n = len(self.workers)
        if n == 0:
            return (f"connected to {self.address}, but no worker yet: start one there with "
                    f"'{WORKER_COMMAND.format(address=self.address)}' (runs wait for it).")
        hosts = []
        for info in self.workers:
            gpus = info.get("gpus") or []
            what = ", ".join(dict.fromkeys(gpus)) if gpus else f"CPU, {info.get('cores')} cores"
            if len(gpus) > 1:
                what = f"{len(gpus)} GPUs: {what}"
            hosts.append(f"{info.get('host', '?')}: {what}")
        return (f"connected to {self.address}: {n} worker{'s' * (n != 1)} "
                f"({'; '.join(dict.fromkeys(hosts))})")


class RemoteCompute:
    """Runs the dock's chain on a Dask scheduler's workers (a GPU box).

    Connects on first use (:meth:`connect`, :data:`CONNECT_SECONDS` at most) and keeps the
    connection; every method is safe to call from a worker thread.

    Parameters
    ----------
    address : str
        The scheduler, ``tcp://gpu-box:8786`` (:func:`compute_address`).
    connect_timeout : float, optional
        Seconds to reach it (default :data:`CONNECT_SECONDS`).
    """

    def __init__(self, address: str, connect_timeout: float | None = None):
        self.address = compute_address(address) or ""
        if not self.address:
            raise InputError(f"RemoteCompute needs a scheduler address such as "
                             f"{EXAMPLE_ADDRESS}.")
        self.connect_timeout = float(CONNECT_SECONDS if connect_timeout is None
                                     else connect_timeout)
        self._client = None
        self._registered: set[str] = set()
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.status == "running"

    def connect(self):
        """The ``distributed.Client`` (connected now when it is not yet).

        Raises
        ------
        InputError
            The scheduler cannot be reached, in one line saying how to start one.
        """
        with self._lock:
            if self.connected:
                return self._client
            self._close_client()
            try:
                from distributed import Client
            except ImportError as exc:  # pragma: no cover - a dependency; a broken install
                raise InputError("Computing on another machine needs the 'distributed' "
                                 "package: pip install distributed") from exc
            try:
                self._client = Client(self.address, timeout=self.connect_timeout,
                                      set_as_default=False)
            except Exception as exc:  # OSError, TimeoutError: wrong address, nothing there
                detail = " ".join(str(exc).split())
                if len(detail) > 160:
                    detail = detail[:160] + "..."
                raise InputError(
                    f"Cannot reach the Dask scheduler at {self.address} within "
                    f"{self.connect_timeout:g} s ({type(exc).__name__}: {detail}). On the GPU "
                    f"machine run '{SCHEDULER_COMMAND}' and "
                    f"'{WORKER_COMMAND.format(address=self.address)}', or set Compute on to "
                    f"'{THIS_MACHINE}'.") from None
            self._registered.clear()
            return self._client

    def status(self) -> RemoteStatus:
        """Connect, and say how many workers there are and their GPUs (asks each worker)."""
        client = self.connect()
        try:
            answers = client.run(describe_worker)
        except Exception:  # noqa: BLE001 - a worker leaving meanwhile: count them only
            answers = {w: {} for w in client.scheduler_info().get("workers", {})}
        return RemoteStatus(self.address, tuple(answers[w] for w in sorted(answers)))

    def close(self) -> None:
        """Disconnect (nothing runs on the workers on our behalf afterwards)."""
        with self._lock:
            self._close_client()

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # already gone
                client.close(timeout=2)

    # -- runs ---------------------------------------------------------------------------
    def segment(self, config: PipelineConfig, image: np.ndarray,
                text: str | Sequence[str], *, progress: ProgressFn | None = None,
                should_stop: StopFn | None = None) -> RemoteReply:
        """:meth:`~napari_medclipsam.core.pipeline.ZeroShotPipeline.segment` there; the
        reply holds SAM's embedding of the image when SAM ran."""
        return self._run("segment", config, image, {"text": text}, progress, should_stop)

    def segment_volume(self, config: PipelineConfig, volume: np.ndarray,
                       text: str | Sequence[str], *, progress: ProgressFn | None = None,
                       should_stop: StopFn | None = None) -> RemoteReply:
        """:meth:`~napari_medclipsam.core.pipeline.ZeroShotPipeline.segment_volume` there.
        Cancel raises :class:`CancelledError` whose ``partial`` is ``(VolumeResult of the
        finished slices or None, their faithfulness checks)``."""
        return self._run("segment_volume", config, volume, {"text": text}, progress,
                         should_stop)

    def propagate(self, config: PipelineConfig, volume: np.ndarray, *,
                  text: str | Sequence[str] | None = None,
                  seeds: dict[int, np.ndarray] | None = None,
                  locked: dict[int, np.ndarray] | None = None,
                  progress: ProgressFn | None = None,
                  should_stop: StopFn | None = None) -> RemoteReply:
        """:meth:`~napari_medclipsam.core.pipeline.ZeroShotPipeline.propagate_volume` there
        (Cancel: ``partial`` as it gives)."""
        return self._run("propagate", config, volume,
                         {"text": text, "seeds": seeds, "locked": locked}, progress,
                         should_stop)

    def _plugin(self, client, config: PipelineConfig) -> str:
        """Register the worker plugin of ``config``'s models once per connection."""
        from napari_medclipsam.cluster import ModelPlugin, register

        name = plugin_name(config)
        if name not in self._registered:
            register(client, ModelPlugin(name, worker_pipeline, model_fields(config)))
            self._registered.add(name)
        return name

    def _run(self, kind: str, config: PipelineConfig, data: np.ndarray,
             options: dict[str, Any], progress: ProgressFn | None,
             should_stop: StopFn | None) -> RemoteReply:
        from distributed import Event

        report = progress or (lambda stage, fraction: None)
        stopped = should_stop or (lambda: False)
        if not self.connected:
            report(f"connecting to {self.address}", 0.0)
        client = self.connect()
        if stopped():
            raise CancelledError("Cancelled; nothing changed.")
        name = self._plugin(client, config)
        run_id = secrets.token_hex(6)
        topic, stop_name = f"medclipsam-progress-{run_id}", f"medclipsam-stop-{run_id}"
        live: dict[str, Any] = {"on": True, "fraction": 0.0}

        def on_event(event) -> None:
            message = event[1] if isinstance(event, tuple) else event
            if live["on"] and isinstance(message, dict) and message.get("stage") != "done":
                live["fraction"] = float(message.get("fraction", 0.0))
                report(str(message.get("stage")), live["fraction"])

        client.subscribe_topic(topic, on_event)
        stop_event = Event(stop_name, client=client)
        report(f"sent to {self.address}", 0.0)
        payload = None
        try:
            if not client.scheduler_info().get("workers"):
                report(f"waiting for a worker to join {self.address}", 0.0)
            payload = client.scatter(np.asarray(data), hash=False)
            future = client.submit(run_on_worker, name, kind, config, payload, options, topic,
                                   stop_name, key=f"medclipsam-{kind}-{run_id}", pure=False)
            value = self._wait(future, stop_event, stopped, report, live)
        finally:
            live["on"] = False
            with contextlib.suppress(Exception):  # a closed connection
                client.unsubscribe_topic(topic)
            if payload is not None:
                payload.release()
        if value.get("cancelled"):
            exc = CancelledError(value.get("message") or "Cancelled.")
            exc.partial = value.get("partial")
            raise exc
        report("done", 1.0)
        return RemoteReply(result=value.get("result"), volume=value.get("volume"),
                           embedding=value.get("embedding"), sam_name=value.get("sam_name"),
                           slice_faithfulness=dict(value.get("slice_faithfulness") or {}),
                           worker=value.get("worker", ""), device=value.get("device", ""),
                           seconds=float(value.get("seconds", 0.0)))

    def _wait(self, future, stop_event, stopped: StopFn, report: ProgressFn,
              live: dict[str, Any]) -> dict[str, Any]:
        """The task's value; Cancel sets the stop event (the worker's progress is no longer
        shown), waits up to :data:`STOP_GRACE_SECONDS` for the worker's partial result,
        then cancels the task."""
        stopping_since: float | None = None
        while True:
            try:
                return future.result(timeout=0.2)
            except TimeoutError:
                pass
            except Exception as exc:  # the worker's error (or its death), in one line
                raise self._error(exc) from None
            if stopping_since is None and stopped():
                stopping_since = time.monotonic()
                live["on"] = False
                report(f"stopping on {self.address}", live["fraction"])
                try:
                    stop_event.set()
                except Exception:  # noqa: BLE001 - then the task is cancelled below
                    stopping_since = -STOP_GRACE_SECONDS
            if stopping_since is not None \
                    and time.monotonic() - stopping_since > STOP_GRACE_SECONDS:
                future.cancel()
                raise CancelledError(f"Cancelled; nothing changed ({self.address} did not "
                                     "stop in time; its task was cancelled).")

    def _error(self, exc: BaseException) -> InputError:
        """An error the worker raised, or the worker's loss, in one line naming where."""
        from napari_medclipsam.core.models import ModelUnavailableError

        name = type(exc).__name__
        if isinstance(exc, (InputError, ModelUnavailableError, ValueError, OSError)) \
                and "Comm" not in name:
            return InputError(f"On {self.address}: {exc}")
        if name in ("KilledWorker", "CommClosedError", "FutureCancelledError") \
                or "Comm" in name:
            return InputError(f"The Dask worker on {self.address} stopped or lost the "
                              f"connection ({name}: {exc}); start it again with "
                              f"'{WORKER_COMMAND.format(address=self.address)}' and rerun.")
        return InputError(f"On {self.address}: {name}: {exc}")
