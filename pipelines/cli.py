"""The command line of pipeline.py: parameters typed by the pipeline's own signature, and the commands."""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import os
import re
import sys

from components import cities, names, rollout, sources, tracking
from components.errors import StepError
from components.model import ModelParams
from components.params import fields, typed
from pipelines import PIPELINES, cluster, dag

USAGE = """The rental-price pipelines (training, batch scoring, monitoring): run locally, compile, submit, schedule.

    python pipeline.py compile [--pipeline NAME] [--output FILE]
    python pipeline.py run [--param key=value ...] [--no-cache] [--verbose]   # kfp.local, no cluster, no Docker
    python pipeline.py run --runner docker ...                       # kfp.local, each step in its image
    python pipeline.py run --pipeline batch --param source=... [--param model=models:/rental-price/3]
    python pipeline.py run --pipeline monitor --param source=... [--param retrain=true]
    python pipeline.py submit [--host URL] [--wait]                  # upload pipeline.yaml to KFP and start a run
    python pipeline.py schedule [--cron "0 6 * * *"] | unschedule     # monitoring as a KFP recurring run
    python pipeline.py promote --version N | rollback                # move the `prod` alias by hand
    python pipeline.py seed-data --to s3://data/KEY                  # put the shipped sample into S3/MinIO
"""
CITY_LISTS = ("area_groups", "date_formats")


def parse_params(pairs: list[str], pipeline: str = "training") -> dict:
    """`key=value` pairs, typed by the pipeline's own signature. `city=NAME` (a shipped profile), `city=PATH.toml`
    or `city={...}` gives the city's whole profile; a profile's field (`max_price=500`) changes it for this run. A
    city other than the default gets its own model, rental-price-CITY, unless model_name says otherwise."""
    params, changes = {}, {}
    known = PIPELINES[pipeline].parameters(cluster=False) if pairs else {}
    city_fields = [f for f in cities.city().as_dict() if f != "name"] if "city" in known else []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if sep and key in city_fields:
            changes[key] = profile_value(key, value)
            continue
        if not sep:
            sys.exit(f"pipeline.py: --param {pair!r}: expected key=value")
        if key not in known:
            close = difflib.get_close_matches(key, list(known) + city_fields, n=1)
            sys.exit(f"pipeline.py: --param {pair!r}: {key} is not a parameter of the {pipeline} pipeline"
                     + (f"; did you mean {close[0]}?" if close else "")
                     + f" (its parameters: {', '.join(sorted(known) + city_fields)})")
        kind = known[key].annotation
        try:
            params[key] = (sweep_trials(json.loads(value)) if kind is list else city_param(value) if key == "city"
                           else typed(kind, value, key))
        except ValueError as exc:
            sys.exit(f"pipeline.py: --param {key}: {value!r} is not a valid {kind.__name__}"
                     + (f" of trials: {exc}" if kind is list else ""))
    try:
        ModelParams(**{k: v for k, v in params.items() if k in fields(ModelParams)})
    except ValueError as exc:
        sys.exit(f"pipeline.py: --param {exc}")
    if "city" in params or changes:
        try:
            city = cities.City.from_dict({**params.get("city", cities.city().as_dict()), **changes}, "pipeline.py")
        except StepError as exc:
            sys.exit(str(exc))
        params["city"], name = city.as_param(), city.name
        if name != cities.DEFAULT_CITY and "model_name" in known and "model_name" not in params:
            params["model_name"] = f"{names.MODEL_NAME}-{name}"
    return params


def city_param(value: str) -> dict:
    """A city's whole profile from `city=`: a shipped profile's name, a .toml file, or the profile as JSON."""
    try:
        return cities.profile_of(value, "pipeline.py", "--param city")
    except StepError as exc:
        sys.exit(str(exc))


def profile_value(key: str, value: str):
    """A profile field from the command line: a number, a JSON list, or for a list field its items by commas."""
    try:
        return json.loads(value)
    except ValueError:
        return [v for v in value.split(",") if v] if key in CITY_LISTS else value


def sweep_trials(trials) -> list[dict]:
    """A sweep as the pipeline takes it: a non-empty list of trials, each a dict of parameters to change, checked
    here so that a typo fails before anything runs."""
    if not isinstance(trials, list) or not trials or not all(isinstance(t, dict) for t in trials):
        raise ValueError("expected a non-empty JSON list of objects, e.g. [{}, {\"learning_rate\": 0.05}]")
    for trial in trials:
        ModelParams().with_overrides(trial)
    return trials


def sweep_grid(spec: str) -> list[dict]:
    """`learning_rate=0.05,0.1 max_iter=200,300` -> every combination, in order, as a list of trials."""
    axes = []
    for part in spec.split():
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise ValueError(f"{part!r}: expected name=value[,value...]")
        axes.append([(key, number_or_text(value)) for value in values.split(",")])
    return sweep_trials([dict(combo) for combo in itertools.product(*axes)])


def number_or_text(value: str):
    try:
        return json.loads(value) if re.fullmatch(r"[-+\d.eE]+", value) else value
    except ValueError:
        return value


def registry_command(command: str, model_name: str, version: str, kube_context: str) -> int:
    """Move `prod` by hand (promote, rollback), then roll the serving Deployment when a context is named."""
    try:
        tracking.require_server(command)
        print(tracking.promote(model_name, version) if command == "promote" else tracking.rollback(model_name))
        if kube_context:
            print(rollout.roll_serving(tracking.prod_version(model_name).version, context=kube_context))
    except StepError as exc:
        sys.exit(str(exc))
    return 0


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = found.add_subparsers(dest="command", required=True)
    specs = ", ".join(f"{p.spec} for {key}" for key, p in PIPELINES.items())
    compile_cmd = commands.add_parser("compile", help="write the KFP pipeline spec")
    compile_cmd.add_argument("--output", default="", help=f"default: {specs}")
    run_cmd = commands.add_parser("run", help="run the pipeline locally with kfp.local")
    run_cmd.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    run_cmd.add_argument("--sweep", default="", metavar="GRID",
                         help="a grid of trials, e.g. 'learning_rate=0.05,0.1 max_iter=200,300'")
    run_cmd.add_argument("--pipeline-root", default=str(dag.ROOT / "local_outputs"))
    run_cmd.add_argument("--no-cache", action="store_true", help="re-run every step")
    run_cmd.add_argument("--verbose", action="store_true", help="print kfp.local's whole output, not a line per step")
    run_cmd.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                         help="subprocess: this interpreter (default); docker: every task in its image")
    submit_cmd = commands.add_parser("submit", help="upload the compiled spec to KFP and start a run")
    submit_cmd.add_argument("--spec", default="", help="default: the pipeline's spec file, as compile writes it")
    submit_cmd.add_argument("--host", default=os.environ.get("KFP_HOST", "http://127.0.0.1:8081"))
    submit_cmd.add_argument("--experiment", default=names.EXPERIMENT)
    submit_cmd.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    submit_cmd.add_argument("--sweep", default="", metavar="GRID", help="a grid of trials (as for run)")
    submit_cmd.add_argument("--wait", action="store_true", help="wait for the run; fail unless it succeeds")
    submit_cmd.add_argument("--timeout", type=int, default=3600)
    submit_cmd.add_argument("--no-cache", action="store_true", help="re-run every step, reusing nothing")
    schedule_cmd = commands.add_parser("schedule", help="run the monitoring pipeline on KFP on a cron schedule")
    schedule_cmd.add_argument("--cron", default="0 6 * * *", help="5 fields, or KFP's 6 with seconds first")
    schedule_cmd.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    schedule_cmd.add_argument("--spec", default=PIPELINES["monitor"].spec)
    schedule_cmd.add_argument("--training-spec", default=PIPELINES["training"].spec)
    unschedule_cmd = commands.add_parser("unschedule", help="remove the monitoring pipeline's recurring run")
    for command in (schedule_cmd, unschedule_cmd):
        command.add_argument("--host", default=os.environ.get("KFP_HOST", "http://127.0.0.1:8081"))
    seed_cmd = commands.add_parser("seed-data", help="copy a data source (default: the shipped sample) to s3://")
    seed_cmd.add_argument("--source", default=sources.DEFAULT_SOURCE)
    seed_cmd.add_argument("--to", default=sources.CLUSTER_SOURCE, help="s3://bucket/key (endpoint: S3_ENDPOINT_URL)")
    for name, text in (("promote", "move alias prod to a version"), ("rollback", "move prod back to previous-prod")):
        registry_cmd = commands.add_parser(name, help=text)
        registry_cmd.add_argument("--model-name", default=names.MODEL_NAME)
        if name == "promote":
            registry_cmd.add_argument("--version", required=True)
        registry_cmd.add_argument("--kube-context", default="", help="then roll the serving Deployment of this "
                                  "kubeconfig context to the new prod (make promote-cluster / rollback-cluster)")
    for command in (compile_cmd, run_cmd, submit_cmd):
        command.add_argument("--pipeline", choices=list(PIPELINES), default="training",
                             help="; ".join(f"{key}: {p.description}" for key, p in PIPELINES.items()))
    return found


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "sweep", ""):
        if any(pair.startswith("sweep=") for pair in args.param):
            sys.exit("pipeline.py: give the sweep once: --sweep GRID or --param sweep=JSON, not both")
        try:
            args.param.append("sweep=" + json.dumps(sweep_grid(args.sweep)))
        except ValueError as exc:
            sys.exit(f"pipeline.py: --sweep {args.sweep!r}: {exc}")
    if args.command == "compile":
        cluster.compile_pipeline(args.output or PIPELINES[args.pipeline].spec, args.pipeline)
        return 0
    if args.command == "submit":
        params = parse_params(args.param, args.pipeline)
        if not PIPELINES[args.pipeline].fresh_data and not args.no_cache:  # its download may be reused
            params = cluster.pin_source(params)
        return cluster.submit(args.spec or PIPELINES[args.pipeline].spec, args.host, params, args.experiment,
                              args.wait, args.timeout, cache=not args.no_cache)
    if args.command == "schedule":
        return cluster.schedule(args.host, args.cron, parse_params(args.param, "monitor"), args.spec,
                                args.training_spec)
    if args.command == "unschedule":
        return cluster.unschedule(args.host)
    if args.command == "seed-data":
        return cluster.seed_data(args.source, args.to)
    if args.command in ("promote", "rollback"):
        return registry_command(args.command, args.model_name, getattr(args, "version", ""), args.kube_context)
    from pipelines import local  # kfp.local, only for `run`

    return local.run(args.pipeline, parse_params(args.param, args.pipeline), args.pipeline_root,
                     cache=not args.no_cache, runner=args.runner, verbose=args.verbose)
