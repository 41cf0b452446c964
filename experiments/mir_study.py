"""The MIR-predicts-SFT study (docs/study-plan.md), resumable: pre-train, measure, instruction-tune, benchmark.

    nohup nice -n 5 python experiments/mir_study.py --threads 2 > study.log 2>&1 &   # everything, resumable
    python experiments/mir_study.py --plan                                            # what is done, what is left

Configurations: `mirlab.study.mir_vs_sft.CONFIGS` (13 pre-training runs, the two shipped recipes among them)
and `TRAJECTORY` (three more SFT starts along lr2e-3). For each, in this order, each stage skipped when its
output exists:

    pretrain   `pretrain.train` of the configuration's recipe (not for the shipped recipes); trajectory in the
               cache (<cache>/study/pretrain/<name>/), the last step copied to data/study/checkpoints/<name>.safetensors
    measure    `mir_vs_sft.measure_mir` (MIR exact + official-fast, prose and captions, N = 100, per-layer norm
               ratio) and `measure_captioning` (retrieval accuracy, held-out caption loss) of that checkpoint
               -> data/study/pretrained.csv (one row per start) and data/study/mir_per_layer.csv
    probes     `mir_vs_sft.measure_probes` (row probes per layer on the captions side, N = 100, and the visual
               dependence; a secondary analysis added before any SFT result existed)
               -> data/study/probes.csv (one row per start) and data/study/probes_per_layer.csv
    sft        `sft.train_sft` with the one SFT recipe of data/study/sft_recipe.json (fixed before the first study
               SFT; the script refuses to run if the file is missing) -> <cache>/sft/<recipe>-<start>/final.safetensors;
               its resumable state (1.6 GB) is deleted once the run is complete; a finished run of the same recipe from the same
               trained tensors (`identical_run`, e.g. the recipe search's run from `final` = lr2e-3/step-0250) is
               copied instead of repeated
    benchmark  `benchmark.benchmark` (600 held-out questions, with the image and with a blank image; no free
               generation) of the fine-tuned model -> data/study/benchmark.csv (tidy: start, kind, ...)

Every stage records its process CPU time (user + system, all threads) and wall time in data/study/cpu_time.csv,
kept up to date every minute while it runs (`stage_clock`), so a stage stopped with its session leaves the CPU
time it spent (status "stopped") and its resumed run adds a row of its own.
Tables are written atomically after every stage, so a stop loses at most the stage in progress (pre-training and
SFT themselves also resume from their state files while the cache survives). Table updates hold an exclusive
lock (data/study/.lock), so two drivers with disjoint `--only` lists may run side by side, one thread each:

    nohup nice -n 5 python experiments/mir_study.py --threads 1 --only lr6e-4 lr6e-3 > a.log 2>&1 &
    nohup nice -n 5 python experiments/mir_study.py --threads 1 --only moca linear > b.log 2>&1 &
"""
import argparse
import contextlib
import fcntl
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from mirlab import paths
from mirlab.study import mir_vs_sft as study
from mirlab.tiny import benchmark, pretrain, sft
from mirlab.tiny.build import checkpoint_path, embedded_model

OUT = paths.data_dir() / "study"
SFT_RECIPE_FILE = OUT / "sft_recipe.json"
STAGES = ("pretrain", "measure", "probes", "sft", "benchmark")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Atomic write (temporary sibling, then rename): a reader never sees half a table."""
    paths.atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.10g"))


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


@contextlib.contextmanager
def tables_locked():
    """Hold an exclusive lock on data/study while a table is read, changed and written (parallel drivers)."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_rows(path: Path, rows: pd.DataFrame, key: str, value: str) -> None:
    """Replace the rows of `path` whose `key` equals `value` by `rows` (idempotent re-runs)."""
    with tables_locked():
        table = read_csv(path)
        if len(table):
            table = table[table[key] != value]
        write_csv(pd.concat([table, rows], ignore_index=True) if len(table) else rows, path)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_time(stage: str, start_name: str, cpu: float, wall: float, threads: int, status: str = "done",
                started: str | None = None) -> None:
    """Put one row into cpu_time.csv, replacing the row of the same attempt (stage, start, `started`, process id).

    status "done": the stage ended in this process; "stopped": the process was still in the stage at the row's
    `finished` time (a heartbeat of `stage_clock`; if nothing replaces it, the process ended there).
    """
    started = started or now()
    row = pd.DataFrame([{"stage": stage, "start": start_name, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
                         "threads": threads, "finished": now(), "status": status, "started": started,
                         "pid": os.getpid()}])
    path = OUT / "cpu_time.csv"
    with tables_locked():
        table = read_csv(path)
        if len(table) and {"started", "pid"} <= set(table.columns):
            same = ((table.stage == stage) & (table.start == start_name) & (table.started == started)
                    & (table.pid == os.getpid()))
            table = table[~same]
        write_csv(pd.concat([table, row], ignore_index=True) if len(table) else row, path)


@contextlib.contextmanager
def stage_clock(stage: str, start_name: str, threads: int, every: float = 60.0):
    """Record the CPU and wall time of one stage in cpu_time.csv, also if the process never gets to the end.

    While the stage runs, a background thread rewrites the attempt's row every `every` seconds with status
    "stopped" and the CPU time so far; when the stage ends the row becomes "done" (or stays "stopped", with the
    final time, if it raised). A process killed with its session thus leaves its CPU time up to the last
    heartbeat: at most `every` seconds of it are lost, not the whole stage.
    """
    cpu, wall, started = cpu_seconds(), time.perf_counter(), now()
    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            record_time(stage, start_name, cpu_seconds() - cpu, time.perf_counter() - wall, threads, "stopped",
                        started)

    heart = threading.Thread(target=beat, name=f"heartbeat {stage} {start_name}", daemon=True)
    heart.start()
    status = "stopped"
    try:
        yield
        status = "done"
    finally:
        stop.set()
        heart.join()
        record_time(stage, start_name, cpu_seconds() - cpu, time.perf_counter() - wall, threads, status, started)


def load_sft_recipe() -> sft.SFTRecipe:
    if not SFT_RECIPE_FILE.is_file():
        raise SystemExit(f"{SFT_RECIPE_FILE} is missing: fix the study's SFT recipe there before any study SFT "
                         "(docs/study-plan.md, 'SFT and the benchmark')")
    return sft.SFTRecipe(**json.loads(SFT_RECIPE_FILE.read_text()))


# --- what each start is ---------------------------------------------------------------------------------------

def starts() -> list[dict]:
    """Every SFT start in run order: the 13 configurations, then the trajectory checkpoints."""
    out = [{"start": c.name, "config": c.name, "number": c.number, "axis": c.axis, "recipe": c.recipe,
            "shipped": c.shipped} for c in study.CONFIGS]
    for name in study.TRAJECTORY:
        out.append({"start": name, "config": "lr2e-3", "number": 1, "axis": "trajectory", "recipe": None,
                    "shipped": name})
    return out


def checkpoint_file(item: dict) -> Path:
    """The pre-training checkpoint a start begins SFT from (shipped file, or the study's own)."""
    if item["shipped"] is not None:
        return checkpoint_path(item["shipped"])
    return OUT / "checkpoints" / f"{item['start']}.safetensors"


def sft_dir(item: dict, recipe: sft.SFTRecipe) -> Path:
    return sft.run_dir(recipe, item["start"])


def done(item: dict, stage: str, sft_recipe: sft.SFTRecipe | None) -> bool:
    if stage == "pretrain":
        return item["shipped"] is not None or checkpoint_file(item).is_file()
    if stage in ("measure", "probes"):
        table = read_csv(OUT / ("pretrained.csv" if stage == "measure" else "probes.csv"))
        return len(table) > 0 and item["start"] in set(table["start"])
    if stage == "sft":
        table = read_csv(OUT / "benchmark.csv")  # a benchmarked start needs no SFT weights any more
        if len(table) and item["start"] in set(table["start"]):
            return True
        return sft_recipe is not None and (sft_dir(item, sft_recipe) / sft.FINAL_FILE).is_file()
    table = read_csv(OUT / "benchmark.csv")
    return len(table) > 0 and item["start"] in set(table["start"])


# --- the stages -------------------------------------------------------------------------------------------------

def run_pretrain(item: dict, progress: bool) -> None:
    recipe = item["recipe"]
    out_dir = paths.cache_dir() / "study" / "pretrain"
    pretrain.run(recipe, out_dir=out_dir, progress=progress)
    last = out_dir / recipe.name / f"step-{recipe.steps:04d}.safetensors"
    target = checkpoint_file(item)
    paths.atomic_write(target, lambda tmp: shutil.copyfile(last, tmp))
    shutil.copyfile(out_dir / recipe.name / "log.csv", OUT / "checkpoints" / f"{recipe.name}.log.csv")


def train_loss(item: dict, window: int = 10) -> float:
    """Mean logged training loss of the last `window` updates before the checkpoint (nan for step 0)."""
    if item["shipped"] is not None:
        recipe, _, step = item["shipped"].partition("/step-")
        log = paths.data_dir() / "projector" / recipe / "log.csv"
        step = int(step)
    else:
        log = OUT / "checkpoints" / f"{item['start']}.log.csv"
        step = item["recipe"].steps
    if step == 0 or not log.is_file():
        return float("nan")
    losses = pd.read_csv(log).set_index("step")["loss"]
    return float(losses.loc[max(1, step - window + 1):step].mean())


def run_measure(item: dict, progress: bool) -> None:
    model, processor = embedded_model(checkpoint_file(item))
    row, layers = study.measure_mir(model, processor, progress=progress)
    row.update(study.measure_captioning(model, processor))
    row = {"start": item["start"], "config": item["config"], "axis": item["axis"], "train_loss": train_loss(item),
           **row}
    layers.insert(0, "start", item["start"])
    append_rows(OUT / "mir_per_layer.csv", layers, "start", item["start"])
    append_rows(OUT / "pretrained.csv", pd.DataFrame([row]), "start", item["start"])
    print(f"  MIR exact prose {row['mir_exact_prose']:.4f}, captions {row['mir_exact_captions']:.4f}; "
          f"retrieval {row['retrieval_accuracy']:.3f}", flush=True)


def run_probes(item: dict, progress: bool) -> None:
    model, processor = embedded_model(checkpoint_file(item))
    row, layers = study.measure_probes(model, processor, progress=progress)
    layers.insert(0, "start", item["start"])
    append_rows(OUT / "probes_per_layer.csv", layers, "start", item["start"])
    append_rows(OUT / "probes.csv", pd.DataFrame([{"start": item["start"], **row}]), "start", item["start"])
    print(f"  norm ratio layer 1 {row['norm_ratio_layer1']:.3f}, CKA mean {row['cka_mean']:.3f}, "
          f"visual dependence {row['visual_dependence']:.2f} nats", flush=True)


def identical_run(model, recipe: sft.SFTRecipe) -> Path | None:
    """A finished SFT run of the same recipe whose start had exactly the trained tensors `model` has now (same
    state digest): the same computation as the run about to start, e.g. the recipe search's run from `final`,
    whose tensors are those of lr2e-3/step-0250. None if there is none."""
    from mirlab.tiny import trainable

    digest = sft.state_digest(model, sft.trained_names(model, recipe))
    for folder in sorted((paths.cache_dir() / sft.RUNS_FOLDER).glob("*")):
        file = folder / sft.FINAL_FILE
        if not file.is_file():
            continue
        record = trainable.read_state(file)[2]
        if (record.get("stage") == "sft" and record.get("start", {}).get("digest") == digest
                and sft.SFTRecipe(**record["recipe"]) == recipe):
            return folder
    return None


def run_sft(item: dict, recipe: sft.SFTRecipe, progress: bool) -> None:
    model, processor = embedded_model(checkpoint_file(item))
    same = identical_run(model, recipe)
    if same is not None:  # reuse it rather than repeat it (recorded in the log line)
        target = sft_dir(item, recipe)
        target.mkdir(parents=True, exist_ok=True)
        for name in (sft.FINAL_FILE, sft.LOG_FILE):
            shutil.copyfile(same / name, target / name)
        (target / "reused_from.txt").write_text(f"{same}\n")
        print(f"  the same recipe from the same tensors already ran: reused {same}", flush=True)
        return
    step = sft.train_sft(model, processor, recipe, start=item["start"], progress=progress)
    if step == recipe.steps:
        state = sft_dir(item, recipe) / sft.STATE_FILE
        state.unlink(missing_ok=True)


def run_benchmark(item: dict, recipe: sft.SFTRecipe, progress: bool) -> None:
    model, processor = sft.load_sft(sft_dir(item, recipe))
    tables = benchmark.benchmark(model, processor, blind=("blank",), generation=False, progress=progress)
    summary = tables["summary"].copy()
    summary.insert(0, "start", item["start"])
    append_rows(OUT / "benchmark.csv", summary, "start", item["start"])
    log = sft.read_log(sft_dir(item, recipe))
    average = summary.set_index("kind").loc["average"]
    print(f"  post-SFT average {average['accuracy']:.3f} (blank {average['blank_accuracy']:.3f}); "
          f"final SFT loss {log['loss'].iloc[-1]:.3f}", flush=True)


def plan(sft_recipe) -> pd.DataFrame:
    rows = []
    for item in starts():
        rows.append({"start": item["start"], **{s: done(item, s, sft_recipe) for s in STAGES}})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print what is done and what is left, run nothing")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--only", nargs="*", default=None, help="restrict to these starts")
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES, help="restrict to these stages")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    sft_recipe = load_sft_recipe() if SFT_RECIPE_FILE.is_file() else None
    if args.plan:
        print(plan(sft_recipe).to_string(index=False))
        return 0
    if sft_recipe is None and {"sft", "benchmark"} & set(args.stages):
        load_sft_recipe()  # raises with the reason
    torch.set_num_threads(args.threads)
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the stage in progress records its time as "stopped"
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tables_locked():
        write_csv(study.configs_table(), OUT / "configs.csv")
    progress = not args.no_progress
    for item in starts():
        if args.only is not None and item["start"] not in args.only:
            continue
        for stage in STAGES:
            if stage not in args.stages or done(item, stage, sft_recipe):
                continue
            print(f"{datetime.now():%H:%M:%S} {item['start']}: {stage}", flush=True)
            with stage_clock(stage, item["start"], args.threads):
                if stage == "pretrain":
                    run_pretrain(item, progress)
                elif stage == "measure":
                    run_measure(item, progress)
                elif stage == "probes":
                    run_probes(item, progress)
                elif stage == "sft":
                    run_sft(item, sft_recipe, progress)
                else:
                    run_benchmark(item, sft_recipe, progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
