"""Pipeline benchmark: `make bench`. Prints figures (and writes them to local_outputs/bench/); asserts nothing.

First runs of each learner on the sample, side by side (alternated, the fastest of two each). Then for each data
size (the shipped 20k sample, then larger sets resampled from it with small seeded noise) it runs `pipeline.py run`
three times against its own MLflow server: a first run (no prod yet), the identical re-run (the
cache), and a run on other data of the same size (with prod to compare with, as next month's run). Per step it
reads what the step logged (compute, start-up, peak memory) and takes each task's wall time from kfp.local's log.
Then batch scoring (`pipeline.py run --pipeline batch`) of the other data with the prod just made, beside the
in-process floor (the model's own predict on the same rows). Then the reference forest and the default learner on
the sample's split protocol: test MAE and fit time.
"""

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from conftest import ROOT, free_port, wait_until

sys.path.insert(0, str(ROOT))
from components import cities, listings, model, saved_model, sources, tracking  # noqa: E402

STEPS = ["download", "clean", "check", "split", "train", "select", "evaluate", "register"]


def synthesize(sample: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """`rows` listings drawn from the sample with replacement, each moved a little: new ids, coordinates within
    about 50 m, prices and counts within a few per cent, so no two rows are the same listing."""
    rng = np.random.default_rng(seed)
    df = sample.sample(rows, replace=True, random_state=seed).reset_index(drop=True)
    df["id"] = np.arange(1, rows + 1) + seed * 10_000_000
    for column in ("latitude", "longitude"):
        df[column] = (df[column] + rng.normal(0, 0.0004, rows)).round(5)
    df["price"] = (df["price"] * rng.normal(1, 0.03, rows)).round().clip(0)
    for column in ("number_of_reviews", "availability_365"):
        df[column] = (df[column] * rng.normal(1, 0.05, rows)).round().clip(0).astype(int)
    return df


def task_walls(stdout: str) -> dict[str, float]:
    """Seconds each task took, from the line `pipeline.py run` prints as it ends (trials added up)."""
    walls = {}
    for task, seconds in re.findall(r"^  (\w+) +done in +([\d.]+) s", stdout, re.M):
        walls[task] = walls.get(task, 0) + float(seconds)
    return walls


def pipeline_run(args: list[str], experiment: str) -> tuple[str, float, pd.DataFrame]:
    """`pipeline.py run ARGS` under `experiment`: its output, its wall seconds and the runs its steps logged."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "pipeline.py", "run", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_EXPERIMENT_NAME": experiment}, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"bench: pipeline.py run {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    kfp_run = re.search(r"pipeline run (local-\w+)", done.stdout).group(1)
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.kfp_run_id = '{kfp_run}'")
    return done.stdout, wall, runs[runs["tags.pipeline_step"] != "pipeline"]


def run(source: str, root: Path, model_name: str, experiment: str) -> dict:
    """One training run: wall seconds, the test MAE, and what each step logged to MLflow."""
    stdout, wall, runs = pipeline_run(["--pipeline-root", str(root), "--param", f"source={source}",
                                       "--param", f"model_name={model_name}"], experiment)
    figures = runs.groupby("tags.pipeline_step").agg(
        compute=("metrics.step_seconds", "sum"), startup=("metrics.startup_seconds", "max"),
        peak_mb=("metrics.peak_memory_mb", "max"))
    walls = task_walls(stdout)
    figures["wall"] = [walls.get(step, float("nan")) for step in figures.index]
    mae = float(re.search(r"test MAE ([\d.]+)", stdout).group(1))
    return {"wall": wall, "steps": figures.reindex([s for s in STEPS if s in figures.index]), "test_mae": mae}


def batch_row(rows: int, source: str, root: Path, name: str) -> str:
    """Batch scoring of `source` with prod of `name`: wall, the score step's compute and peak memory, rows per second,
    and the floor: the same version's predict on the same rows, in this process (after reading and checking)."""
    from components import model

    _, wall, runs = pipeline_run(["--pipeline", "batch", "--pipeline-root", str(root), "--param", f"source={source}",
                                  "--param", f"model=models:/{name}@prod", "--param", "max_rejected=1"], name)
    step = runs[runs["tags.pipeline_step"] == "score"].iloc[0]
    fitted, profile = saved_model.load_model(f"models:/{name}/{tracking.prod_version(name).version}", "bench")
    typed, problems = model.check_inputs(model.numbers_from_text(pd.read_csv(source)), profile)
    typed = typed.drop(index=list({p.row for p in problems}))
    started = time.perf_counter()
    fitted.predict(typed)
    floor = len(typed) / (time.perf_counter() - started)
    compute = step["metrics.step_seconds"]
    return (f"| {rows:,} | {wall:.1f} | {compute:.1f} | {rows / compute:,.0f} | {step['metrics.peak_memory_mb']:.0f} | "
            f"{floor:,.0f} | {floor / (rows / compute):.1f} |")


def size_table(rows: int, first: dict, again: dict, other: dict) -> list[str]:
    lines = [f"### {rows:,} rows", "",
             f"first run {first['wall']:.1f} s (test MAE {first['test_mae']:.2f}); identical re-run "
             f"{again['wall']:.1f} s = {again['wall'] / first['wall']:.0%} of the first; run on other data with "
             f"prod to compare {other['wall']:.1f} s", "",
             "| step | wall s | compute s | start-up s | peak MB | (with prod) wall s | compute s | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for step in STEPS:
        a, b = first["steps"], other["steps"]
        if step not in a.index:
            continue
        lines.append(f"| {step} | {a.wall[step]:.1f} | {a.compute[step]:.1f} | {a.startup[step]:.1f} | "
                     f"{a.peak_mb[step]:.0f} | {b.wall.get(step, float('nan')):.1f} | "
                     f"{b.compute.get(step, float('nan')):.1f} | {b.peak_mb.get(step, float('nan')):.0f} |")
    for name, result in (("first run", first), ("with prod", other)):
        compute = result["steps"].compute.sum()
        lines.append(f"\n{name}: wall {result['wall']:.1f} s / sum of step compute {compute:.1f} s = "
                     f"{result['wall'] / compute:.2f}; max step peak memory {result['steps'].peak_mb.max():.0f} MB")
    return lines


def model_figures(sample: pd.DataFrame) -> list[str]:
    """The reference forest and the default learner, fitted on train and scored on test as the pipeline does."""
    df, _ = listings.clean_listings(sample, cities.city())
    trainval, test = listings.split_listings(df, 0.2, 42)
    train, _ = listings.split_listings(trainval, 0.2, 42)
    lines = ["| learner | test MAE | test R² | fit s |", "|---|---|---|---|"]
    for learner in ("random_forest", "hist_gbm"):
        started = time.perf_counter()
        fitted = model.fit(train, model.ModelParams(learner=learner))
        took = time.perf_counter() - started
        scores = model.score(fitted, test)
        lines.append(f"| {learner} | {scores['mae']:.2f} | {scores['r2']:.3f} | {took:.1f} |")
    return lines


def learners_side_by_side(source: str, root: Path, rounds: int = 2) -> list[str]:
    """First runs of each learner on the sample, alternated, `rounds` each (the fastest is shown: the machine is
    shared): the default (the booster) against the forest. Their difference is the fit; what they share is the
    floor of a run (start-up, MLflow, kfp.local)."""
    best: dict[str, tuple[float, dict]] = {}
    for round_ in range(rounds):
        for learner in ("hist_gbm", "random_forest"):
            name = f"side-{learner.replace('_', '-')}-{round_}"
            stdout, wall, _ = pipeline_run(["--pipeline-root", str(root / name), "--param", f"source={source}",
                                            "--param", f"model_name={name}", "--param", f"learner={learner}"], name)
            if learner not in best or wall < best[learner][0]:
                best[learner] = (wall, task_walls(stdout))
    lines = ["| learner | wall s | train wall s | other steps s |", "|---|---|---|---|"]
    for learner, (wall, steps) in best.items():
        lines.append(f"| {learner} | {wall:.1f} | {steps['train']:.1f} | {sum(steps.values()) - steps['train']:.1f} |")
    lines.append(f"\ndefault / forest: {best['hist_gbm'][0] / best['random_forest'][0]:.0%} (fastest of {rounds} each)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="20000,100000,500000", help="rows per data set (20000: the sample)")
    parser.add_argument("--out", default=str(ROOT / "local_outputs" / "bench"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sample = listings.parse_csv(sources.fetch(sources.DEFAULT_SOURCE))
    machine = (f"{platform.node()}: {os.cpu_count()} cores, "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
               f"Python {platform.python_version()}, {datetime.now():%Y-%m-%d}")
    report = ["# make bench", "", machine, "", "## Model on the sample's split protocol", "", *model_figures(sample),
              "", "## Pipeline (kfp.local SubprocessRunner, local MLflow server)", ""]
    print("\n".join(report), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        home, port = Path(tmp), free_port()
        uri = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", str(home / "art")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        batch = ["## Batch scoring (the other data, with the prod of its size)", "",
                 "| rows | wall s | score compute s | rows/s | peak MB | in-process predict rows/s | floor / batch |",
                 "|---|---|---|---|---|---|---|"]
        try:
            wait_until(f"{uri}/health", process=server)
            side = ["## The two learners side by side (the sample, first runs)", "",
                    *learners_side_by_side(sources.DEFAULT_SOURCE, home), ""]
            print("\n".join(side), flush=True)
            report += side
            for rows in (int(n) for n in args.sizes.split(",")):
                files = {}
                for seed in (0, 1):
                    df = sample if rows == len(sample) and seed == 0 else synthesize(sample, rows, seed + 1)
                    files[seed] = str(home / f"listings-{rows}-{seed}.csv")
                    df.to_csv(files[seed], index=False)
                root, name = home / f"root-{rows}", f"bench-{rows}"
                first = run(files[0], root, name, name)
                again = run(files[0], root, name, name)
                other = run(files[1], root, name, name)
                lines = size_table(rows, first, again, other)
                print("\n".join(lines) + "\n", flush=True)
                report += lines + [""]
                batch.append(batch_row(rows, files[1], root, name))
                print(batch[-1], flush=True)
            report += batch + [""]
            print("\n".join(batch), flush=True)
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    (out / "results.md").write_text("\n".join(report) + "\n")
    print(f"written to {out / 'results.md'}")


if __name__ == "__main__":
    main()
