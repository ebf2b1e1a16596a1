"""`orchestra`: submit, validate, inspect jobs, here or on a Ray cluster.

Each verb is a thin layer over the Python client (`orchestra.Client`) or,
for a job trained in this terminal, the driver (`orchestra.driver.main`).

Exit codes: 0 success, 1 the job failed or was stopped, 2 bad input or an
unreachable cluster (nothing was started and no job folder was made; for
`resume`, a job that is not STOPPED or FAILED), 3 `wait --timeout` ran out
(or `cancel` waited in vain), 130 you stopped following a job that goes on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from typing import Callable

from orchestra.client.ray_jobs import submission_address
from orchestra.driver.console import Console
from orchestra.errors import OrchestraError, SpecError, StorageError
from orchestra.spec import json_schema, load_spec
from orchestra.storage import status_lines
from orchestra.storage.record import JobState, JobStatus, format_value
from orchestra.tools.board import DEFAULT_HOST, DEFAULT_PORT

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

Handler = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except OrchestraError as exc:
        message = str(exc) if isinstance(exc, SpecError) else f"orchestra: {_field_prefix(exc)}{exc}"
        print(message, file=sys.stderr)
        if args.verb == "validate" and args.json:
            _print(args, {"spec": args.spec, "valid": False, "problems": _problems(exc)}, "")
        return exc.exit_code


def _problems(exc: OrchestraError) -> list[dict[str, str]]:
    """An error as `validate --json` lists it: each problem's field and message."""
    if isinstance(exc, SpecError):
        return [{"field": field, "message": message} for field, message in exc.problems]
    return [{"field": getattr(exc, "field", None) or "", "message": str(exc)}]


def _field_prefix(exc: OrchestraError) -> str:
    field = getattr(exc, "field", None)
    return f"{field}: " if field else ""


# The parser: one subparser per verb, each with its own options and handler.

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestra", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    submit = _verb(verbs, "submit", cmd_submit, "validate a job spec and train it on Ray workers")
    submit.add_argument("spec", help="path to a job spec, JSON or YAML (.yaml, .yml)")
    _set_option(submit)
    _address_option(submit)
    _storage_option(submit)
    submit.add_argument("--workers", type=int, help="override scaling.workers")
    _datasets_option(submit)
    submit.add_argument("--detach", action="store_true", help="print the job id and return; the job goes on")
    submit.add_argument("--in-process", action="store_true",
                        help="reference run: plain Keras fit in this process, no Ray, no distribution strategy")
    _json_option(submit)
    _quiet_option(submit)

    validate = _verb(verbs, "validate", cmd_validate, "check a job spec without running it")
    validate.add_argument("spec", help="path to a job spec, JSON or YAML (.yaml, .yml)")
    _set_option(validate)
    _address_option(validate)
    _storage_option(validate)
    validate.add_argument("--workers", type=int, help="override scaling.workers")
    _datasets_option(validate)
    validate.add_argument("--schema-only", action="store_true",
                          help="check everything but the files the spec names (data, weights) and the storage: "
                               "for a spec written for another machine")
    _json_option(validate)

    evaluate = _verb(verbs, "evaluate", cmd_evaluate, "evaluate a job's best checkpoint (else its final model)")
    evaluate.add_argument("job_id")
    _storage_option(evaluate)
    evaluate.add_argument("--data", metavar="JSON",
                          help='fields of the spec\'s data section to use instead, e.g. \'{"source": "other.npz"}\' '
                               "(default: the job's test set, else its validation set)")
    _checkpoint_option(evaluate)
    _datasets_option(evaluate)
    _json_option(evaluate)

    predict = _verb(verbs, "predict", cmd_predict, "write a job's class predictions for the examples in an .npz")
    predict.add_argument("job_id")
    predict.add_argument("input", metavar="INPUT.npz", help="examples under 'x', raw as the job's data source has them")
    predict.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    _storage_option(predict)
    _checkpoint_option(predict)
    _json_option(predict)

    _job_verb(verbs, "status", cmd_status, "show one job")
    listing = _verb(verbs, "list", cmd_list, "list jobs, newest first")
    _address_option(listing)
    _storage_option(listing)
    _json_option(listing)
    logs = _job_verb(verbs, "logs", cmd_logs, "print a job's driver output")
    logs.add_argument("-f", "--follow", action="store_true", help="go on printing it until the job has ended")
    _job_verb(verbs, "cancel", cmd_cancel, "stop a job and its workers")
    wait = _job_verb(verbs, "wait", cmd_wait, "wait until a job has ended; exit 0 if it succeeded")
    wait.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long (exit 3)")
    wait.add_argument("--progress", action="store_true",
                      help="on a terminal, show the running epoch's progress bar while waiting")
    resume = _job_verb(verbs, "resume", cmd_resume, "continue a STOPPED or FAILED job from its latest checkpoint")
    _datasets_option(resume)
    resume.add_argument("--workers", type=int,
                        help="continue on this many workers: the same global batches, so the same numbers")
    resume.add_argument("--detach", action="store_true", help="resume in a background driver and return")

    board = _verb(verbs, "tensorboard", cmd_tensorboard, "serve jobs' TensorBoard runs until interrupted")
    board.add_argument("jobs", nargs="*", metavar="JOB", help="jobs to show (default: every job in the storage)")
    _storage_option(board)
    board.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 exposes it to the network)")
    board.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    board.add_argument("--watch", action="store_true",
                       help="serve the whole storage, jobs started later included (runs: <job>/tensorboard/...)")
    board.add_argument("--reload-interval", type=float, default=5.0, metavar="SECONDS",
                       help="how often TensorBoard reads new events (default 5)")
    _json_option(board)

    plot = _verb(verbs, "plot", cmd_plot, "draw loss and accuracy curves of jobs to a PNG")
    plot.add_argument("jobs", nargs="+", metavar="JOB")
    _storage_option(plot)
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png")
    _json_option(plot)

    data = verbs.add_parser("data", help="prepare datasets", description="prepare datasets")
    convert = _verb(data.add_subparsers(dest="data_verb", required=True, metavar="VERB"), "convert",
                    cmd_data_convert, "write a dataset as shard files and a manifest, for data.shards")
    convert.add_argument("src", metavar="SRC", help="Keras dataset name, .npz path or class-per-subfolder image folder")
    convert.add_argument("dest", metavar="DEST",
                         help="new folder, or new s3://bucket/prefix, for the shards and manifest.json")
    convert.add_argument("--format", required=True, choices=("npy", "tfrecord"))
    convert.add_argument("--shards", required=True, type=int, metavar="N", help="shard files per split")
    convert.add_argument("--target-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                         help="image folders: height and width images are resized to (default 256 256)")
    convert.add_argument("--color-mode", choices=("rgb", "grayscale"), default="rgb", help="image folders")
    convert.add_argument("--validation-split", type=float, metavar="F",
                         help="hold out this fraction of train as a 'validation' split (data.validation: split)")
    convert.add_argument("--seed", type=int, help="seed of --validation-split's draw (default: a job's data.seed "
                         "default)")
    _datasets_option(convert)

    _verb(verbs, "schema", cmd_schema, "print the job spec's JSON Schema (always JSON)")
    completion = _verb(verbs, "completion", cmd_completion,
                       "print a shell completion script, e.g. "
                       "orchestra completion bash > ~/.local/share/bash-completion/completions/orchestra")
    completion.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _verb(verbs, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    parser = verbs.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler)
    return parser


def _job_verb(verbs, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    """A verb about one job, here or on a cluster."""
    parser = _verb(verbs, name, handler, help)
    parser.add_argument("job_id")
    _address_option(parser)
    _storage_option(parser)
    _json_option(parser)
    return parser


def _storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", metavar="PATH",
        help="root of the shared storage, a path or s3://BUCKET/PREFIX "
             "(default: ORCHESTRA_STORAGE, else ~/orchestra_storage)",
    )


def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", metavar="URL",
        help="a Ray cluster's job server, e.g. http://HEAD:8265 (default: ORCHESTRA_ADDRESS, else RAY_ADDRESS "
             "when it is a URL; neither: this machine)",
    )


def _datasets_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", metavar="DIR", help="folder of <name>.npz datasets (default: ORCHESTRA_DATASETS)")


def _checkpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", choices=("best", "latest", "final"),
                        help="which model (default: best checkpoint, else final)")


def _set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field of the spec, checked like the file; repeatable: "
                             "--set fit.epochs=5 --set compile.optimizer.config.learning_rate=1e-4 "
                             "--set callbacks.0.config.patience=3 (VALUE is read as JSON, else as a string)")


def _quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final status")


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")


# The verbs.

def cmd_validate(args: argparse.Namespace) -> int:
    from orchestra.driver.main import prepare_new
    from orchestra.driver.preflight import preflight

    address = submission_address(args.address)
    if args.schema_only:
        spec = load_spec(args.spec, args.set).with_overrides(workers=args.workers, storage=args.storage,
                                                             source=args.spec)
        preflight(spec, storage=args.storage, source=args.spec, check_cluster=False, check_files=False)
        waits = _waits(spec, address) if address else []
        _print(args, {"spec": args.spec, "valid": True, "checked_files": False, "waits_for": _waits_json(waits)},
               f"{args.spec}: valid as a spec (the files it names and the storage were not checked)"
               + _waits_text(args.spec, waits))
        return EXIT_OK
    prepared = prepare_new(args.spec, workers=args.workers, storage=args.storage, datasets=args.datasets,
                           sets=tuple(args.set))
    spec = prepared.spec
    waits = _waits(spec, address)
    _print(args, {"spec": args.spec, "valid": True, "checked_files": True, "workers": spec.scaling.workers,
                  "layers": len(spec.model.layers), "epochs": spec.fit.epochs, "storage": prepared.storage.where,
                  "waits_for": _waits_json(waits)},
           f"{args.spec}: valid — {spec.scaling.workers} workers, {len(spec.model.layers)} layers, "
           f"up to {spec.fit.epochs} epochs, storage {prepared.storage.where}" + _waits_text(args.spec, waits))
    return EXIT_OK


def _waits(spec, address: str | None) -> list[tuple[str, str]]:
    """GPUs and custom resources the cluster lacks now, which the job would
    wait PENDING for: the cluster at `address`, else the one this process sees."""
    from orchestra.driver.ray_runtime import waits_for

    if address is None:
        return waits_for(spec)
    from orchestra.client.cluster_view import nodes_at
    from orchestra.driver.resources import missing

    return missing(spec, nodes_at(address))


def _waits_json(waits: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"field": field, "reason": reason} for field, reason in waits]


def _waits_text(source: str, waits: list[tuple[str, str]]) -> str:
    return "".join(f"\n{source}: would wait PENDING: {field}: {reason}" for field, reason in waits)


def _print(args: argparse.Namespace, document: dict, text: str) -> None:
    """`document` as JSON with --json, else `text`."""
    print(json.dumps(document, indent=1) if args.json else text, flush=True)


def cmd_submit(args: argparse.Namespace) -> int:
    address = submission_address(args.address)
    if args.in_process and (address or args.detach):
        raise SpecError([("--in-process", "trains in this process, in the foreground; "
                                          "it does not go with --address or --detach")], args.spec)
    if address or args.detach:
        return _submit_to_client(args, address)
    from orchestra.driver.main import drive, exit_code, prepare_new
    from orchestra.driver.run import create_job

    prepared = prepare_new(args.spec, workers=args.workers, storage=args.storage, datasets=args.datasets,
                           in_process=args.in_process, sets=tuple(args.set))
    record = create_job(prepared, in_process=args.in_process)
    record = drive(prepared, record, console=Console(sys.stdout, quiet=args.quiet))
    _print_status(record.status(), args.json)
    return exit_code(record)


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a STOPPED or FAILED job from its latest checkpoint: here,
    or on its cluster as a new Ray job of the same job (--address)."""
    address = submission_address(args.address)
    if address:
        return _resume_on_cluster(args, address)
    if args.detach:
        _client(args).resume(args.job_id, workers=args.workers, datasets=args.datasets)
        print(f"job {args.job_id}: resuming in a background driver on this machine", flush=True)
        return EXIT_OK
    from orchestra.driver.main import drive, exit_code, prepare_resume

    prepared, record, checkpoint = prepare_resume(args.job_id, storage=args.storage, datasets=args.datasets,
                                                  workers=args.workers)
    record = drive(prepared, record, checkpoint)
    _print_status(record.status(), args.json)
    return exit_code(record)


def _resume_on_cluster(args: argparse.Namespace, address: str) -> int:
    """Resume a cluster job through its job server (--storage: the storage
    as the cluster sees it); follow the new run to its end unless --detach."""
    client = _client(args)
    client.resume(args.job_id, workers=args.workers, datasets=args.datasets, storage=args.storage)
    print(f"job {args.job_id}: resumed on {address}", flush=True)
    if args.detach:
        return EXIT_OK
    try:
        status = _follow(client, args.job_id, Console(sys.stdout), latest_only=True)
    except KeyboardInterrupt:
        print(f"job {args.job_id}: no longer followed; it goes on (orchestra cancel {args.job_id} stops it)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return _print_final(status, args.json)


def _submit_to_client(args: argparse.Namespace, address: str | None) -> int:
    """Hand the job to a cluster's job server, or to a background driver
    here; follow it to its end unless --detach."""
    from orchestra.client.client import Client

    spec = load_spec(args.spec, args.set).with_overrides(workers=args.workers, source=args.spec)
    client = Client(address, storage=None if address else args.storage)
    job_id = client.submit(spec, storage=args.storage if address else None, datasets=args.datasets)
    print(f"job {job_id}: submitted to {address or 'a background driver on this machine'}", flush=True)
    if args.detach:
        return EXIT_OK
    try:
        status = _follow(client, job_id, Console(sys.stdout, quiet=args.quiet))
    except KeyboardInterrupt:
        print(f"job {job_id}: no longer followed; it goes on (orchestra cancel {job_id} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return _print_final(status, args.json)


def _follow(client, job_id: str, console: Console, bar_only: bool = False, latest_only: bool = False) -> JobStatus:
    """Show the driver's output as it comes until the job has ended: its
    lines (unless `bar_only`), and its progress as a bar on a terminal
    (never its status lines); return the final status. `latest_only`: a
    cluster job's latest run only (Client.follow)."""
    pending = ""
    try:
        for chunk in client.follow(job_id, latest_only=latest_only):
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                _show(line, console, bar_only)
        _show(pending, console, bar_only)
    finally:
        console.close()
    return client.status(job_id)


def _show(line: str, console: Console, bar_only: bool = False) -> None:
    progress = status_lines.parse_progress(line)
    if progress is not None:
        console.progress(progress)
    elif line and not bar_only and not status_lines.is_status_line(line):
        console.line(line)


def _print_status(status: JobStatus, as_json: bool) -> None:
    print(json.dumps(status.model_dump(mode="json"), indent=1) if as_json else status.summary())


def _print_final(status: JobStatus, as_json: bool) -> int:
    _print_status(status, as_json)
    return EXIT_OK if status.state is JobState.SUCCEEDED else EXIT_JOB_FAILED


def _client(args: argparse.Namespace):
    from orchestra.client.client import Client

    address = submission_address(args.address)
    return Client(address, storage=None if address else args.storage)


def cmd_status(args: argparse.Namespace) -> int:
    _print_status(_client(args).status(args.job_id), args.json)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    statuses = _client(args).list()
    if args.json:
        print(json.dumps([s.model_dump(mode="json") for s in statuses], indent=1))
        return EXIT_OK
    print(job_table(statuses, shutil.get_terminal_size().columns))
    return EXIT_OK


def job_table(statuses: list[JobStatus], width: int) -> str:
    """`orchestra list`'s table: columns as wide as their widest cell, the
    job ids shortened (with `…`) when the table would not fit `width`."""
    header = ("JOB", "STATE", "EPOCHS", "BEST", "MONITOR")
    rows = [(s.job_id, s.state.value, str(s.epochs_completed), "-" if s.best_epoch is None else str(s.best_epoch),
             f"{s.monitor or '-'} {format_value(s.best_value)}") for s in statuses]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    room = width - sum(widths[1:]) - 2 * (len(header) - 1)
    widths[0] = max(len(header[0]), min(widths[0], room))

    def line(cells) -> str:
        job = cells[0] if len(cells[0]) <= widths[0] else cells[0][:widths[0] - 1] + "…"
        return "  ".join([job.ljust(widths[0]), cells[1].ljust(widths[1]), cells[2].rjust(widths[2]),
                          cells[3].rjust(widths[3]), cells[4]]).rstrip()

    return "\n".join(line(cells) for cells in [header, *rows])


def cmd_logs(args: argparse.Namespace) -> int:
    if args.follow:
        try:
            _follow(_client(args), args.job_id, Console(sys.stdout))
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        return EXIT_OK
    log = _client(args).logs(args.job_id)
    if args.json:
        print(json.dumps({"job_id": args.job_id, "log": log}, indent=1))
    else:  # the lines for people, without those for clients
        sys.stdout.writelines(line for line in log.splitlines(keepends=True) if not status_lines.is_status_line(line))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        status = _client(args).cancel(args.job_id)
    except TimeoutError as exc:
        print(f"orchestra: asked the job to stop; {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    _print_status(status, args.json)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if args.progress and sys.stdout.isatty() and args.timeout is None:
            try:
                return _print_final(_follow(client, args.job_id, Console(sys.stdout), bar_only=True), args.json)
            except StorageError:
                pass  # a job trained in another terminal keeps no log here: wait without the bar
        status = client.wait(args.job_id, args.timeout)
    except TimeoutError as exc:
        print(f"orchestra: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return _print_final(status, args.json)


def cmd_tensorboard(args: argparse.Namespace) -> int:
    from orchestra.errors import BoardError
    from orchestra.net import is_loopback
    from orchestra.storage.folders import Storage, storage_root
    from orchestra.tools.board import job_logdirs, serve

    if not 0 < args.port < 65536:
        raise BoardError(f"--port must be between 1 and 65535, not {args.port}")
    logdirs = job_logdirs(Storage(storage_root(args.storage)), args.jobs, args.watch)
    if not is_loopback(args.host):
        print(f"warning: TensorBoard has no authentication; anyone who can reach {args.host}:{args.port} "
              "can read these runs", file=sys.stderr)
    url = serve(logdirs, args.host, args.port, args.reload_interval)
    what = f"every job in {args.storage or 'the storage'}, new ones included" if args.watch else f"{len(logdirs)} job(s)"
    _print(args, {"url": url, "jobs": sorted(logdirs)}, f"TensorBoard for {what} at {url} (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from orchestra.client.inference import evaluate

    data = None
    if args.data:
        try:
            data = json.loads(args.data)
        except json.JSONDecodeError as exc:
            raise SpecError([("--data", f"malformed JSON: {exc.msg}")], "--data") from None
        except (ValueError, RecursionError) as exc:  # an integer of thousands of digits; nesting past the stack
            raise SpecError([("--data", f"malformed JSON: {str(exc)[:100] or type(exc).__name__}")], "--data") from None
        if not isinstance(data, dict):
            raise SpecError([("--data", "must be a JSON object of data fields")], "--data")
    result = evaluate(args.job_id, data=data, storage=args.storage, checkpoint=args.checkpoint,
                      datasets=args.datasets)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"job {args.job_id} on {result['examples']} {result['set']} examples: "
              + "  ".join(f"{k} {format_value(v)}" for k, v in result["metrics"].items()))
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from orchestra.client.inference import predict

    result = predict(args.job_id, args.input, args.output, storage=args.storage, checkpoint=args.checkpoint)
    _print(args, result, f"wrote {result['output']}: {result['examples']} predictions, per class {result['classes']}")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from orchestra.storage.folders import Storage, storage_root
    from orchestra.tools.plot import plot_jobs

    storage = Storage(storage_root(args.storage))
    output = plot_jobs([storage.read_record(job_id, history=True) for job_id in args.jobs], args.output)
    _print(args, {"output": str(output), "jobs": args.jobs}, f"wrote {output}")
    return EXIT_OK


def cmd_data_convert(args: argparse.Namespace) -> int:
    from orchestra.tools.convert import convert, summary

    def stopped(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopped)  # a conversion stopped by kill leaves nothing, as on Ctrl-C
    try:
        manifest = convert(args.src, args.dest, args.format, args.shards, args.datasets,
                           tuple(args.target_size), args.color_mode, args.validation_split, args.seed)
    except KeyboardInterrupt:
        print(f"orchestra: data convert stopped; nothing of it was left at {args.dest}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary(manifest, args.dest))
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=1))
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
