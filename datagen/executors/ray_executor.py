"""Run shard tasks on a Ray cluster (``--executor ray``): one actor per GPU (CPU actors where the
cluster has none), each loading the model once, taking whole shards.

Ray core actors rather than Ray Data's ``map_batches``: the build needs per-shard retry
accounting, a named failure after ``max_retries`` and every result back on the driver, and
Ray Data keeps those inside its own machinery (and names its output files itself). Actors
restart after a crash (``max_restarts=-1``) but never retry a task on their own
(``max_task_retries=0``): a shard whose actor died or whose attempt raised is resubmitted here,
to whichever actor is free. Each actor writes its shards with the same ShardWorker as every
other executor, so the shards, the stats markers and the manifest (written by the driver) are
byte-identical to a local build. Workers must see the output folder (a shared file system on
a multi-node cluster) and have the package installed.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from datagen.config import BuildConfig
from datagen.errors import UserError
from datagen.executors.base import DEFAULT_RETRIES, ShardFailure, fatal, reason_of, torch_threads
from datagen.executors.local import progress_bar
from datagen.faults import failpoint
from datagen.plan import ShardTask
from datagen.quiet import quiet_libraries
from datagen.worker import ShardResult, ShardWorker

log = logging.getLogger("datagen.build")
DIED = "worker actor died (killed, preempted, out of memory or crashed)"


class _ShardActor:
    """One Ray actor: a ShardWorker, its log lines into the build's log."""

    def __init__(self, cfg: BuildConfig, log_path: str, progress: Any, threads: int):
        import torch

        torch.set_num_threads(threads)  # the driver's count: same bytes as a local build
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("datagen").addHandler(handler)
        logging.getLogger("datagen").setLevel(logging.INFO)
        quiet_libraries()
        failpoint("worker-start", 0)
        self.worker = ShardWorker(cfg)
        self.progress = progress

    def run(self, task: ShardTask, out: str) -> ShardResult:
        def done(n: int) -> None:
            self.progress.put_nowait((task.index, n))

        return self.worker.run(task, Path(out), on_sample=done)


def _actor_reason(exc: BaseException) -> str:
    """Why an actor cannot start: the error its constructor raised (Ray wraps it in the
    text of an ActorDiedError), else the Ray error itself."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return reason_of(cause)
    for line in reversed(str(exc).splitlines()):
        m = re.match(r"^\s*([\w.]+(?:Error|Exception)): (.+)$", line)
        name = m.group(1).rsplit(".", 1)[-1] if m else ""
        if m and name not in ("ActorDiedError", "RayActorError"):
            return f"{name}: {m.group(2)}"
    return reason_of(exc)


def _env_vars() -> dict[str, str]:
    """What actors must see of the driver's environment (thread counts, failpoints, caches)."""
    keep = ("DATAGEN_", "OMP_NUM_THREADS", "HF_", "TRANSFORMERS_", "TORCH_HOME")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


class RayExecutor:
    def __init__(
        self,
        address: str | None = None,
        actors: int | None = None,
        max_retries: int = DEFAULT_RETRIES,
        num_cpus: int | None = None,
    ):
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.address = address
        self.actors = actors
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        """CPUs of a local cluster this executor starts (None: all of this machine's)."""
        self.startup_seconds = 0.0

    def run(
        self, cfg: BuildConfig, tasks: list[ShardTask], out: Path, progress: bool = True
    ) -> list[ShardResult | ShardFailure]:
        if not tasks:
            return []
        try:
            import ray
        except ImportError:
            raise UserError(
                "--executor ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[data]')"
            ) from None

        t0 = time.perf_counter()
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(
                    address=self.address,
                    num_cpus=self.num_cpus if self.address is None else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": _env_vars()},
                )
            except ConnectionError as exc:
                raise UserError(
                    f"--ray-address {self.address}: cannot attach to a Ray cluster ({exc}); start "
                    "one with 'ray start --head' or leave --ray-address out to start a local one"
                ) from None
        self.startup_seconds = time.perf_counter() - t0
        try:
            return self._run(ray, cfg, tasks, out, progress)
        finally:
            if started:
                ray.shutdown()

    def _run(
        self, ray: Any, cfg: BuildConfig, tasks: list[ShardTask], out: Path, progress: bool
    ) -> list[ShardResult | ShardFailure]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError, RayTaskError
        from ray.util.queue import Empty, Queue

        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpu = gpus > 0 and cfg.model.device != "cpu"
        room = gpus if use_gpu else int(resources.get("CPU", 0))
        if room < 1:
            raise UserError("the Ray cluster has no CPU or GPU to run an actor on")
        n = self.actors or (gpus if use_gpu else 1)
        if n > room:
            # Actors that can never be placed would hold their shards forever.
            log.warning("--ray-actors %d: the cluster has room for %d; using %d", n, room, room)
            n = room
        n = min(n, len(tasks))
        queue = Queue(actor_options={"num_cpus": 0})
        actor_cls = ray.remote(
            num_cpus=0 if use_gpu else 1,
            num_gpus=1 if use_gpu else 0,
            max_restarts=-1,
            max_task_retries=0,
        )(_ShardActor)
        # The driver holds the config in the object store for the whole run, so an actor that
        # restarts after a crash finds its constructor arguments (ray-project/ray#53727).
        cfg_ref = ray.put(cfg)
        log_path, threads = str(out / "build.log"), torch_threads()
        actors = [actor_cls.remote(cfg_ref, log_path, queue, threads) for _ in range(n)]
        bar = progress_bar(sum(len(t.units) for t in tasks), progress)
        counted = {t.index: 0 for t in tasks}
        attempts = {t.index: 0 for t in tasks}
        results: dict[int, ShardResult | ShardFailure] = {}
        todo = list(tasks)
        inflight: dict[Any, tuple[Any, ShardTask]] = {}
        # An actor gets work only once it is up: after it starts, and after every restart.
        waiting: dict[Any, Any] = {a.__ray_ready__.remote(): a for a in actors}
        gone: list[str] = []

        def drain() -> None:
            while True:
                try:
                    index, k = queue.get_nowait()
                except Empty:
                    return
                counted[index] += k
                bar.update(k)

        def failed(task: ShardTask, reason: str) -> None:
            drain()
            lost = counted[task.index]
            bar.update(-lost)
            counted[task.index] = 0
            n_ = attempts[task.index]
            log.warning("shard %d attempt %d failed after %d samples: %s", task.index, n_, lost,
                        reason)  # fmt: skip
            if n_ > self.max_retries:
                results[task.index] = ShardFailure(task, reason, n_)
            else:
                todo.append(task)

        try:
            while inflight or (todo and waiting):
                refs = list(inflight) + list(waiting)
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.2)
                drain()
                for ref in ready:
                    if ref in waiting:
                        actor = waiting.pop(ref)
                        try:
                            ray.get(ref)
                        except ActorUnavailableError:  # still restarting: ask again shortly
                            time.sleep(0.1)
                            waiting[actor.__ray_ready__.remote()] = actor
                            continue
                        except RayError as exc:  # cannot start (again): out of rotation
                            gone.append(_actor_reason(exc))
                            log.warning("a Ray actor cannot start: %s", gone[-1])
                            continue
                        if todo:
                            task = todo.pop(0)
                            attempts[task.index] += 1
                            inflight[actor.run.remote(task, str(out))] = (actor, task)
                        continue
                    actor, task = inflight.pop(ref)
                    try:
                        results[task.index] = ray.get(ref)
                        waiting[actor.__ray_ready__.remote()] = actor
                        continue
                    except RayTaskError as exc:
                        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                        stop = fatal(cause, out)
                        if stop is not None:
                            raise stop from None
                        failed(task, reason_of(cause))
                    except (ActorDiedError, ActorUnavailableError):
                        # Work goes only to actors that are up, so the actor died on this
                        # shard (or its node went away) while running it.
                        failed(task, DIED)
                    except RayError as exc:  # the task's worker, node or object was lost
                        failed(task, reason_of(exc))
                    waiting[actor.__ray_ready__.remote()] = actor
            drain()
            if todo and not waiting and not inflight:
                raise UserError(
                    f"no Ray actor can run shards ({gone[-1] if gone else 'none started'}); "
                    f"{len(todo)} shard(s) not built: fix it and run the same command again"
                )
        finally:
            bar.close()
            for actor in actors:
                ray.kill(actor)
        return [results[t.index] for t in tasks]
