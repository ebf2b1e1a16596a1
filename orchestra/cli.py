"""`orchestra`: submit, validate, inspect jobs, here or on a Ray cluster.

Exit codes: 0 success, 1 the job failed or was stopped, 2 bad input or an
unreachable cluster (nothing was started and no job folder was made; for
`resume`, a job that is not STOPPED or FAILED),
3 `wait --timeout` ran out (or `cancel` waited in vain), 130 you stopped
following a job that goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from orchestra.board import DEFAULT_HOST, DEFAULT_PORT
from orchestra.remote import ClusterError, submission_address
from orchestra.resume import ResumeError
from orchestra.spec import FieldError, SpecError, json_schema, load_spec, parse_spec
from orchestra.storage import StorageError

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", metavar="PATH",
        help="root of the shared storage (default: ORCHESTRA_STORAGE, else ~/orchestra_storage)",
    )


def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", metavar="URL",
        help="a Ray cluster's job server, e.g. http://HEAD:8265 (default: ORCHESTRA_ADDRESS, else RAY_ADDRESS "
             "when it is a URL; neither: this machine)",
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")


def _job_verb(verbs, name: str, help: str, json_output: bool = True) -> argparse.ArgumentParser:
    """A verb about one job, here or on a cluster."""
    parser = verbs.add_parser(name, help=help)
    parser.add_argument("job_id")
    _address_option(parser)
    _storage_option(parser)
    if json_output:
        _json_option(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestra", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    submit = verbs.add_parser("submit", help="validate a job spec and train it on Ray workers")
    submit.add_argument("spec", help="path to a JSON job spec")
    _address_option(submit)
    _storage_option(submit)
    submit.add_argument("--workers", type=int, help="override scaling.workers")
    submit.add_argument("--datasets", metavar="DIR", help="folder of <name>.npz datasets (default: ORCHESTRA_DATASETS)")
    submit.add_argument("--detach", action="store_true", help="print the job id and return; the job goes on")
    submit.add_argument("--in-process", action="store_true",
                        help="reference run: plain Keras fit in this process, no Ray, no distribution strategy")
    _json_option(submit)
    # For drivers that Ray Jobs or KubeRay start (orchestra's own client passes them too).
    submit.add_argument("--job-id", help="train here, under this job id (a Ray job's submission id)")
    submit.add_argument("--status-lines", action="store_true",
                        help="print a status line per record write, for clients that read the driver's log")

    validate = verbs.add_parser("validate", help="check a job spec without running it")
    validate.add_argument("spec")
    _storage_option(validate)
    validate.add_argument("--workers", type=int, help="override scaling.workers")
    validate.add_argument("--datasets", metavar="DIR")
    validate.add_argument("--schema-only", action="store_true",
                          help="check everything but the files the spec names (data, weights) and the storage: "
                               "for a spec written for another machine")

    evaluate = verbs.add_parser("evaluate", help="evaluate a job's best checkpoint (else its final model)")
    evaluate.add_argument("job_id")
    _storage_option(evaluate)
    evaluate.add_argument("--data", metavar="JSON",
                          help='fields of the spec\'s data section to use instead, e.g. \'{"source": "other.npz"}\' '
                               "(default: the job's test set, else its validation set)")
    evaluate.add_argument("--checkpoint", choices=("best", "latest", "final"),
                          help="which model (default: best checkpoint, else final)")
    evaluate.add_argument("--datasets", metavar="DIR")
    _json_option(evaluate)

    predict = verbs.add_parser("predict", help="write a job's class predictions for the examples in an .npz")
    predict.add_argument("job_id")
    predict.add_argument("input", metavar="INPUT.npz", help="examples under 'x', raw as the job's data source has them")
    predict.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    _storage_option(predict)
    predict.add_argument("--checkpoint", choices=("best", "latest", "final"))

    _job_verb(verbs, "status", "show one job")
    listing = verbs.add_parser("list", help="list jobs, newest first")
    _address_option(listing)
    _storage_option(listing)
    _json_option(listing)
    _job_verb(verbs, "logs", "print a job's driver output", json_output=False)
    _job_verb(verbs, "cancel", "stop a job and its workers")
    wait = _job_verb(verbs, "wait", "wait until a job has ended; exit 0 if it succeeded")
    wait.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long (exit 3)")
    resume = _job_verb(verbs, "resume", "continue a STOPPED or FAILED job from its latest checkpoint")
    resume.add_argument("--datasets", metavar="DIR", help="folder of <name>.npz datasets (default: ORCHESTRA_DATASETS)")
    resume.add_argument("--detach", action="store_true", help="resume in a background driver and return")

    board = verbs.add_parser("tensorboard", help="serve jobs' TensorBoard runs until interrupted")
    board.add_argument("jobs", nargs="*", metavar="JOB", help="jobs to show (default: every job in the storage)")
    _storage_option(board)
    board.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 exposes it to the network)")
    board.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    board.add_argument("--watch", action="store_true",
                       help="serve the whole storage, jobs started later included (runs: <job>/tensorboard/...)")
    board.add_argument("--reload-interval", type=float, default=5.0, metavar="SECONDS",
                       help="how often TensorBoard reads new events (default 5)")

    plot = verbs.add_parser("plot", help="draw loss and accuracy curves of jobs to a PNG")
    plot.add_argument("jobs", nargs="+", metavar="JOB")
    _storage_option(plot)
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png")

    verbs.add_parser("schema", help="print the job spec's JSON Schema")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    except FieldError as exc:
        print(f"orchestra: {exc.field}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (StorageError, ClusterError, ResumeError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"orchestra: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _prepare(args: argparse.Namespace):
    from orchestra.dispatch import cluster_address
    from orchestra.preflight import preflight

    if args.workers is not None and args.workers < 1:
        raise SpecError([("--workers", f"must be at least 1, not {args.workers}")], args.spec)
    in_process = getattr(args, "in_process", False)
    if in_process and args.workers is not None:
        raise SpecError([("--workers", "does not go with --in-process, which trains in one process")], args.spec)
    spec = load_spec(args.spec).with_overrides(workers=args.workers, storage=args.storage, source=args.spec)
    return preflight(spec, storage=args.storage, datasets=args.datasets, source=args.spec,
                     check_cluster=not in_process and cluster_address() is None)


def cmd_validate(args: argparse.Namespace) -> int:
    if args.schema_only:
        from orchestra.preflight import preflight

        spec = load_spec(args.spec).with_overrides(workers=args.workers, storage=args.storage, source=args.spec)
        preflight(spec, storage=args.storage, source=args.spec, check_cluster=False, check_files=False)
        print(f"{args.spec}: valid as a spec (the files it names and the storage were not checked)")
        return EXIT_OK
    prepared = _prepare(args)
    spec = prepared.spec
    print(f"{args.spec}: valid — {spec.scaling.workers} workers, {len(spec.model.layers)} layers, "
          f"up to {spec.fit.epochs} epochs, storage {prepared.storage.root}")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    address = None if args.job_id else submission_address(args.address)
    if args.in_process and (address or args.detach):
        raise SpecError([("--in-process", "trains in this process, in the foreground; "
                                          "it does not go with --address or --detach")], args.spec)
    if address or args.detach:
        return _submit_to_client(args, address)
    return _run_here(args)


def _run_here(args: argparse.Namespace) -> int:
    """Drive the job from this process, to its end."""
    from orchestra import events
    from orchestra.dispatch import create_job

    prepared = _prepare(args)
    if args.status_lines:
        prepared.storage.on_write = events.print_status_line
    record = create_job(prepared, in_process=args.in_process, job_id=args.job_id)
    return _drive_here(args, prepared, record)


def _drive_here(args: argparse.Namespace, prepared, record, resume_from=None) -> int:
    """Train a created or reopened job in this process's driver, printing
    each epoch; the exit code says how it ended."""
    from orchestra.dispatch import run_in_process, run_job

    epochs = prepared.spec.fit.epochs
    where = "in this process (reference run)" if record.mode == "in_process" else f"{record.workers} workers"
    print(f"job {record.job_id}: {where}, storage {prepared.storage.job_dir(record.job_id)}", flush=True)

    def progress(result) -> None:
        metrics = "  ".join(f"{k} {_fmt(v)}" for k, v in result.metrics.items() if k != "learning_rate")
        print(f"epoch {result.epoch}/{epochs}  {metrics}  {result.epoch_time:.2f}s", flush=True)

    try:
        run = run_in_process if record.mode == "in_process" else run_job
        record = run(prepared, record, progress=progress, resume_from=resume_from)
    except KeyboardInterrupt:
        print(f"job {record.job_id}: stopped after epoch {record.epochs_completed} "
              f"(orchestra resume {record.job_id} continues it)", file=sys.stderr)
        return EXIT_JOB_FAILED
    if getattr(args, "status_lines", False):  # the client that follows this driver prints the summary
        return EXIT_OK if record.state.value == "SUCCEEDED" else EXIT_JOB_FAILED
    return _print_final(record.status(), args.json)


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a STOPPED or FAILED job here, from its latest checkpoint."""
    from orchestra.dispatch import cluster_address
    from orchestra.preflight import preflight
    from orchestra.resume import check_resumable, check_same_classes, reopen
    from orchestra.storage import Storage, storage_root

    if submission_address(args.address):
        raise ClusterError("resume runs the job's driver on this machine, over its storage: "
                           "run it where the storage is mounted, without --address")
    if args.detach:
        _client(args).resume(args.job_id, datasets=args.datasets)
        print(f"job {args.job_id}: resuming in a background driver on this machine", flush=True)
        return EXIT_OK
    root = storage_root(args.storage)
    record = check_resumable(Storage(root), args.job_id)
    prepared = preflight(parse_spec(json.dumps(record.spec), args.job_id), storage=str(root),
                         datasets=args.datasets, source=args.job_id,
                         check_cluster=record.mode == "ray" and cluster_address() is None)
    check_same_classes(record, prepared.images.train.class_names if prepared.images else None)
    record, checkpoint = reopen(prepared.storage, args.job_id)
    return _drive_here(args, prepared, record, resume_from=checkpoint)


def _submit_to_client(args: argparse.Namespace, address: str | None) -> int:
    """Hand the job to a cluster's job server, or to a background driver
    here; follow it to its end unless --detach."""
    from orchestra.client import Client
    from orchestra.model import check_keras_names

    spec = load_spec(args.spec).with_overrides(workers=args.workers, source=args.spec)
    if address:
        # The files a spec names are the cluster's: the driver checks them there, before any worker starts.
        problems = check_keras_names(spec)
        if problems:
            raise SpecError(problems, args.spec)
    client = Client(address, storage=None if address else args.storage)
    job_id = client.submit(spec, storage=args.storage if address else None, datasets=args.datasets)
    print(f"job {job_id}: submitted to {address or 'a background driver on this machine'}", flush=True)
    if args.detach:
        return EXIT_OK
    try:
        status = _follow(client, job_id)
    except KeyboardInterrupt:
        print(f"job {job_id}: no longer followed; it goes on (orchestra cancel {job_id} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return _print_final(status, args.json)


def _follow(client, job_id: str, poll_seconds: float = 1.0):
    """Print the driver's output as it comes, without its status lines,
    until the job has ended; return the final status."""
    from orchestra.events import is_status_line

    printed = 0
    while True:
        status = client.status(job_id)
        log = client.logs(job_id)
        end = len(log) if status.state.is_terminal else log.rfind("\n", printed) + 1
        for line in log[printed:end].splitlines():
            if not is_status_line(line):
                print(line, flush=True)
        printed = max(printed, end)
        if status.state.is_terminal:
            return status
        time.sleep(poll_seconds)


def _print_final(status, as_json: bool) -> int:
    print(json.dumps(status.model_dump(mode="json"), indent=1) if as_json else _summary(status.model_dump(mode="json")))
    return EXIT_OK if status.state.value == "SUCCEEDED" else EXIT_JOB_FAILED


def _client(args: argparse.Namespace):
    from orchestra.client import Client

    address = submission_address(args.address)
    return Client(address, storage=None if address else args.storage)


def cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).status(args.job_id).model_dump(mode="json")
    print(json.dumps(status, indent=1) if args.json else _summary(status))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    statuses = [s.model_dump(mode="json") for s in _client(args).list()]
    if args.json:
        print(json.dumps(statuses, indent=1))
        return EXIT_OK
    print(f"{'JOB':44} {'STATE':10} {'EPOCHS':>6} {'BEST':>6}  MONITOR")
    for s in statuses:
        best = "-" if s["best_epoch"] is None else str(s["best_epoch"])
        print(f"{s['job_id']:44} {s['state']:10} {s['epochs_completed']:>6} {best:>6}  "
              f"{s['monitor'] or '-'} {_fmt(s['best_value'])}")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    sys.stdout.write(_client(args).logs(args.job_id))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        status = _client(args).cancel(args.job_id)
    except TimeoutError as exc:
        print(f"orchestra: asked the job to stop; {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    print(json.dumps(status.model_dump(mode="json"), indent=1) if args.json else _summary(status.model_dump(mode="json")))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    try:
        status = _client(args).wait(args.job_id, args.timeout)
    except TimeoutError as exc:
        print(f"orchestra: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    return _print_final(status, args.json)


def cmd_tensorboard(args: argparse.Namespace) -> int:
    from orchestra.board import BoardError, is_loopback, job_logdirs, serve
    from orchestra.storage import Storage, storage_root

    if not 0 < args.port < 65536:
        print(f"orchestra: --port must be between 1 and 65535, not {args.port}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        logdirs = job_logdirs(Storage(storage_root(args.storage)), args.jobs, args.watch)
        if not is_loopback(args.host):
            print(f"warning: TensorBoard has no authentication; anyone who can reach {args.host}:{args.port} "
                  "can read these runs", file=sys.stderr)
        url = serve(logdirs, args.host, args.port, args.reload_interval)
    except BoardError as exc:
        print(f"orchestra: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    what = f"every job in {args.storage or 'the storage'}, new ones included" if args.watch else f"{len(logdirs)} job(s)"
    print(f"TensorBoard for {what} at {url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from orchestra.inference import evaluate

    data = None
    if args.data:
        try:
            data = json.loads(args.data)
        except json.JSONDecodeError as exc:
            raise SpecError([("--data", f"malformed JSON: {exc.msg}")], "--data") from None
        if not isinstance(data, dict):
            raise SpecError([("--data", "must be a JSON object of data fields")], "--data")
    result = evaluate(args.job_id, data=data, storage=args.storage, checkpoint=args.checkpoint,
                      datasets=args.datasets)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"job {args.job_id} on {result['examples']} {result['set']} examples: "
              + "  ".join(f"{k} {_fmt(v)}" for k, v in result["metrics"].items()))
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from orchestra.inference import predict

    result = predict(args.job_id, args.input, args.output, storage=args.storage, checkpoint=args.checkpoint)
    print(f"wrote {result['output']}: {result['examples']} predictions, per class {result['classes']}")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from orchestra.client import Client
    from orchestra.plot import plot_jobs

    client = Client(storage=args.storage)
    records = [client.storage.read_record(job_id) for job_id in args.jobs]
    plot_jobs(records, args.output)
    print(f"wrote {args.output}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=1))
    return EXIT_OK


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _summary(status: dict[str, Any]) -> str:
    lines = [f"job {status['job_id']}: {status['state']}" + (f" ({status['reason']})" if status["reason"] else "")]
    lines.append(f"  epochs completed  {status['epochs_completed']}"
                 + (f", stopped early at epoch {status['stopped_epoch']}" if status["stopped_epoch"] else ""))
    if status["best_epoch"] is not None:
        lines.append(f"  best epoch        {status['best_epoch']} ({status['monitor']} {_fmt(status['best_value'])})")
    if status.get("skipped_files"):
        lines.append(f"  skipped files     {status['skipped_files']} (not readable images; see the record)")
    if status["test_metrics"]:
        lines.append("  test              " + "  ".join(f"{k} {_fmt(v)}" for k, v in status["test_metrics"].items()))
    for label, key in (("best checkpoint", "checkpoint"), ("model", "model"), ("tensorboard", "tensorboard_logdir")):
        if status[key]:
            lines.append(f"  {label:<17} {status[key]}")
    return "\n".join(lines)


VERBS = {
    "submit": cmd_submit,
    "validate": cmd_validate,
    "status": cmd_status,
    "list": cmd_list,
    "logs": cmd_logs,
    "cancel": cmd_cancel,
    "wait": cmd_wait,
    "resume": cmd_resume,
    "tensorboard": cmd_tensorboard,
    "plot": cmd_plot,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "schema": cmd_schema,
}

if __name__ == "__main__":
    sys.exit(main())
