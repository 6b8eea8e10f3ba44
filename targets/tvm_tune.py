"""MetaSchedule tuning of the standalone ``tvm:llvm`` library's convolutions and dense layers.

    m = snnc.compile(g, target="tvm:llvm", mode="relax", tune=True)      # default budget
    m = snnc.compile(g, target="tvm:llvm", trials=64, tune_minutes=5)     # per-task trials, wall budget
    m = snnc.compile(g, target="tvm:llvm", database="net.tune")           # a database you keep
    snnc compile model.pt --target tvm:llvm --tune [--trials N] [--tune-minutes M]

Assumes: an unrolled graph the Relax lowering accepts, a CPU ``tvm:llvm`` target.
Guarantees: the library computes what the untuned one computes (same TIR semantics, only the
schedule differs, outputs compared in tests); every tuned kernel is used only where it measured
faster than the hand schedule of ``tvm_schedule.py``, so tuning never makes a library slower.

How (Shao et al. 2022, "Tensor program optimization with probabilistic programs", TVM's
MetaSchedule): the graph is legalized and fused (``relax.get_pipeline("zero")``, needed before
task extraction), each conv/dense function is one task, evolutionary search samples schedules,
builds and times them in worker processes and records every measurement in a JSON database
(``database_workload.json`` + ``database_tuning_record.json``) under ``work_dir``.

* Database: by default ``$SNNC_CACHE_DIR/tvm/tune/<graph key>/``, keyed like the library cache
  (graph, weights, shapes, target, snnc's lowering source), so another net or shape never reads
  it. Records are appended as they are measured: an interrupted or budget-limited run resumes
  where it stopped; a task that already has ``trials`` records is not tuned again, so the second
  compile of the same shapes only applies the database and loads the cached library (< 1 s).
* Budget: ``trials`` measured schedules per task and ``tune_minutes`` of wall time, whichever
  ends first (a measure callback terminates every task once the time is spent); a progress bar
  on stderr counts measured schedules.
* Static shapes: MetaSchedule tunes concrete shapes, so a tuned library is built for the traced
  batch; ``TVMModule`` runs other batch sizes as chunks of it (see ``tvm._chunked``).
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from snnc.errors import SnncError

from . import tvm_build as tb
from .tvm_schedule import OPAQUE, schedule_conv2d

DEFAULT_TRIALS = 64        # per task; 3 tasks on the bench net
DEFAULT_MINUTES = 10.0     # wall budget for the whole graph
TUNED_OPS = ("conv2d", "matmul", "dense")


def _tunable(task) -> bool:
    return _tunable_name(task.task_name)


def _tunable_name(name: str) -> bool:
    """conv / dense functions, except the hand-written int8 spike kernels (``spike_conv2d_*``)."""
    return any(op in name for op in TUNED_OPS) and not name.startswith("spike_")


def _records(db, task) -> int:
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return 0
    return len(db.get_top_k(db.commit_workload(mod), 10**6))


class _BudgetSpent(Exception):
    pass


@derived_object
class _Budget(ms.measure_callback.PyMeasureCallback):
    """Progress bar over measured schedules; stops every task once the wall budget is spent."""

    def __init__(self, total: int, seconds: float, progress: bool):
        self.deadline = time.monotonic() + seconds
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="snnc tune", unit="schedule", file=sys.stderr)
        self.stopped = False

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        if self.bar is not None:
            self.bar.update(len(measure_candidates))
        if time.monotonic() > self.deadline:
            # the records measured so far are in the database already (AddToDatabase runs first);
            # unwinding out of the task scheduler is its only stop (terminate_task races with it)
            self.stopped = True
            raise _BudgetSpent()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _time(func, args, dev, repeat=3) -> float:
    """Median seconds of one call of a built PrimFunc (``time_evaluator``)."""
    lib = tvm.compile(tb._noalias(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})),
                      target=tvm.target.Target.current())
    f = lib["main"]
    f(*args)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _random_args(func, dev):
    out = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape = [int(s) for s in info.shape]
        out.append(tvm.runtime.tensor(np.random.uniform(-1, 1, shape).astype(str(info.dtype)), device=dev))
    return out


def _pick(legal, db, target) -> dict:
    """Per conv/dense function of the module: the database's best schedule if it beats the hand
    schedule, both timed here on random data of the function's shapes and the same target.
    Functions are looked up by structure, so layers of equal shape share one task's result."""
    dev = tvm.cpu(0)
    choices = {}
    with target:
        for gv, func in list(legal.functions.items()):
            name = gv.name_hint
            if not isinstance(func, tvm.tirx.PrimFunc) or not _tunable_name(name):
                continue
            workload = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            sch = db.query_schedule(workload, target, name)
            if sch is None:
                continue
            tuned = sch.mod["main"]
            hand = schedule_conv2d(func) if "conv2d" in name else None
            args = _random_args(func, dev)
            t_tuned = _time(tuned, args, dev)
            t_hand = _time(hand, args, dev) if hand is not None else float("inf")
            use = "tuned" if t_tuned < t_hand else "hand"
            choices[name] = {"use": use, "tuned_ms": round(t_tuned * 1e3, 3),
                             "hand_ms": None if hand is None else round(t_hand * 1e3, 3)}
            if use == "tuned":
                legal[gv] = (tuned.without_attr("global_symbol")  # the module names it
                             .with_attr("op_pattern", OPAQUE).with_attr("tir.is_scheduled", True))
    return choices


def _digest(work_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(work_dir.glob("database_*.json")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def tuned_relax(g, tdict: dict, *, trials=None, database=None, minutes=None, progress=True, cache=True,
                spike_isa="fp32"):
    """The tuned Relax library of graph ``g`` (``tb.Built``), tuning what the database lacks.
    ``spike_isa`` other than "fp32": convs on spikes are the int8 kernels of ``tvm_spike_conv``
    (hand-written TIR, not tunable), so only the remaining fp32 convs / dense layers are tasks."""
    from .tvm_lower import to_relax
    trials = DEFAULT_TRIALS if trials is None else trials
    minutes = DEFAULT_MINUTES if minutes is None else minutes
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise SnncError(f"tvm:llvm: trials={trials!r}; expected a positive number of schedules per task")
    if not isinstance(minutes, (int, float)) or not minutes > 0 or minutes == float("inf"):
        raise SnncError(f"tvm:llvm: tune_minutes={minutes!r}; expected a positive number of minutes")
    if tdict.get("kind") != "llvm":
        raise SnncError("tuning is for the tvm:llvm target")
    key = tb.graph_key(g, tdict, "relax", "tuned", *(() if spike_isa == "fp32" else (spike_isa,)))
    work_dir = Path(database) if database is not None else tb.cache_dir() / "tune" / key
    if work_dir.exists() and not work_dir.is_dir():
        raise SnncError(f"database={str(work_dir)!r} is a file; the tuning database is a folder")
    work_dir.mkdir(parents=True, exist_ok=True)
    done = _complete(work_dir, key, trials, cache)
    if done is not None:  # nothing left to tune: the library of this database, no task extraction
        return done
    target = tb.make_target(tdict)
    with target:
        legal = relax.get_pipeline("zero")(to_relax(g, "cpu", batch="static", spike_convs=spike_isa))
    tasks = [t for t in ms.relax_integration.extract_tasks(legal, target) if _tunable(t)]
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    todo = [t for t in tasks if _records(db, t) < trials]
    stats = {"tasks": len(tasks), "tuned_now": len(todo), "database": str(work_dir)}
    if todo:
        t0 = time.monotonic()
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, str(work_dir), num_threads=tb.llvm_threads(tdict),
            # a small population: the default 512 spends minutes per round in the search alone on 2 cores
            strategy=ms.search_strategy.EvolutionarySearch(population_size=64, genetic_num_iters=2))
        budget = _Budget(trials * len(todo), minutes * 60, progress)
        try:
            _tune(budget, 
                tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                max_trials_global=trials * len(todo), max_trials_per_task=trials,
                num_trials_per_iter=min(16, trials), database=db, cost_model=_cost_model(),
                # a worker process imports TVM before it builds: generous timeouts on a loaded machine
                builder=ms.builder.LocalBuilder(timeout_sec=300, max_workers=1),
                runner=ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ms.runner.EvaluatorConfig(
                    number=1, repeat=1, min_repeat_ms=0)),
                measure_callbacks=[ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                                   ms.measure_callback.UpdateCostModel(), budget])
        finally:
            budget.close()
        stats["tune_seconds"] = round(time.monotonic() - t0, 1)
        stats["stopped_by_budget"] = budget.stopped
    lib_key = f"{key}-{_digest(work_dir)}"
    choices = {}

    def build():
        choices.update(_pick(legal, db, target))
        return tb.build_relax(legal, tdict)
    built, hit = tb.cached(lib_key, build, cache)
    if hit:
        choices = tb.cached_json(f"{lib_key}.choices", lambda: {}, cache)
    else:
        tb.cached_json(f"{lib_key}.choices", lambda: choices, cache)
    built.tuning = {**stats, "kernels": choices}
    _mark_complete(work_dir, key, trials, stats, lib_key)
    return built


class _Miss(Exception):
    pass


def _raise_miss():
    raise _Miss()


def _complete(work_dir: Path, key: str, trials: int, cache: bool):
    """The cached library of a database already tuned to ``trials`` per task for graph ``key``
    (``snnc_complete.json``, written after each run, names the database digest it was built
    from), or None. Task extraction and the database load cost seconds; this check does not."""
    import json
    try:
        mark = json.loads((work_dir / "snnc_complete.json").read_text())[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not cache or mark.get("trials", 0) < trials or mark.get("lib_key") != f"{key}-{_digest(work_dir)}":
        return None
    try:
        built, _ = tb.cached(mark["lib_key"], _raise_miss, cache)
    except _Miss:
        return None
    built.tuning = {**mark.get("stats", {}), "tuned_now": 0, "reused": True,
                    "kernels": tb.cached_json(f"{mark['lib_key']}.choices", lambda: {}, cache)}
    return built


def _mark_complete(work_dir: Path, key: str, trials: int, stats: dict, lib_key: str) -> None:
    import json

    from snnc.fileio import atomic_write
    if stats.get("stopped_by_budget"):
        return  # unfinished: the next compile resumes tuning
    path = work_dir / "snnc_complete.json"
    try:
        marks = json.loads(path.read_text())
    except (OSError, ValueError):
        marks = {}
    if not isinstance(marks, dict):
        marks = {}
    marks[key] = {"trials": trials, "lib_key": lib_key, "stats": {k: v for k, v in stats.items() if k != "tuned_now"}}
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(marks)), overwrite=True)
    except OSError:
        pass


def _tune(budget, **kwargs):
    try:
        ms.tune_tasks(**kwargs)
    except Exception:
        if not budget.stopped:  # a real failure, not the budget's stop
            raise


def _cost_model():
    """XGBoost's cost model when xgboost is installed, else random (pure search)."""
    try:
        import xgboost  # noqa: F401
        return "xgb"
    except ImportError:
        return "random"
