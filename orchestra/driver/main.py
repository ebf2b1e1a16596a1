"""The driver's entry point: `python -m orchestra.driver run|resume`.

One process owns a job from its PENDING record to its end. It is started
by `orchestra submit` in the foreground (this process), by `Client()` as
a background process on this machine, by Ray Jobs (`submit --address`)
and by KubeRay's RayJob as the Ray job's entrypoint. The typed functions
below are what each of them calls; `main` is only their command line.

    python -m orchestra.driver run SPEC.json [--job-id ID] [--status-lines] ...
    python -m orchestra.driver run --prepared PREPARED.json --job-id ID ...
    python -m orchestra.driver resume JOB_ID [--workers N] [--storage ROOT] [--datasets DIR]

Exit codes: 0 the job succeeded, 1 it failed or was stopped, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from orchestra.coordinator.protocol import CheckpointRef
from orchestra.driver.console import Console
from orchestra.driver.preflight import Prepared, preflight
from orchestra.driver.resume import (
    check_resumable,
    check_same_classes,
    folder_classes,
    reopen,
)
from orchestra.errors import OrchestraError, SpecError
from orchestra.spec import JobSpec, load_spec, parse_spec
from orchestra.storage import status_lines
from orchestra.storage.folders import Storage, storage_root
from orchestra.storage.lease import LeaseLost
from orchestra.storage.record import JobRecord, JobState

EXIT_OK, EXIT_JOB_FAILED = 0, 1

OnWrite = Callable[[JobRecord], None]


def prepare_new(spec_path: str, *, workers: int | None = None, storage: str | None = None,
                datasets: str | None = None, in_process: bool = False, sets: tuple[str, ...] = ()) -> Prepared:
    """Read a spec file, apply the overrides (`sets`: `--set path=value`), run every check (SpecError)."""
    if workers is not None and workers < 1:
        raise SpecError([("--workers", f"must be at least 1, not {workers}")], spec_path)
    if in_process and workers is not None:
        raise SpecError([("--workers", "does not go with --in-process, which trains in one process")], spec_path)
    spec = load_spec(spec_path, sets).with_overrides(workers=workers, storage=storage, source=spec_path)
    return preflight(spec, storage=storage, datasets=datasets, source=spec_path,
                     check_cluster=not in_process)


def prepare_resume(job_id: str, *, storage: str | None = None, datasets: str | None = None,
                   workers: int | None = None, ray_job: str | None = None,
                   on_write: OnWrite | None = None) -> tuple[Prepared, JobRecord, CheckpointRef | None]:
    """Check that a job can resume, check its spec again, and reopen it
    (PENDING, owned by this process, a new attempt): (prepared, record,
    checkpoint). `workers`: continue on this many workers instead (its
    global batches stay what they were, so the numbers do too); `ray_job`:
    the Ray job this driver runs as; `on_write`: called with each record
    written, from the reopening on."""
    root = storage_root(storage)
    record = check_resumable(Storage(root), job_id)
    spec = parse_spec(json.dumps(record.spec), job_id)
    if workers is not None:
        spec = _on_workers(spec, record, workers)
    # Before pre-flight: with a class more or less, its checks would blame the model's width instead.
    check_same_classes(record, folder_classes(spec))
    prepared = preflight(spec, storage=str(root), datasets=datasets, source=job_id,
                         check_cluster=record.mode == "ray")
    prepared.storage.on_write = on_write
    record, checkpoint = reopen(prepared.storage, job_id, spec if workers is not None else None, ray_job)
    return prepared, record, checkpoint


def _on_workers(spec: JobSpec, record: JobRecord, workers: int) -> JobSpec:
    """The job's spec on `workers` workers (SpecError naming the field that
    does not allow it: fit.batch_size, the global batch, must divide)."""
    source = f"job {record.job_id} on --workers {workers}"
    if record.mode == "in_process":
        raise SpecError([("--workers", "does not go with a job trained in one process (--in-process)")], source)
    if workers < 1:
        raise SpecError([("--workers", f"must be at least 1, not {workers}")], source)
    return spec.with_overrides(workers=workers, source=source)


def drive(prepared: Prepared, record: JobRecord, resume_from: CheckpointRef | None = None,
          console: Console | None = None) -> JobRecord:
    """Train a created or reopened job to its end, showing a line per epoch
    (and a progress bar on a terminal) on `console` (default: stdout);
    Ctrl-C or SIGTERM records it STOPPED. Returns the final record."""
    from orchestra.driver.run import run_in_process, run_job

    console = console or Console(sys.stdout)
    epochs = prepared.spec.fit.epochs
    where = "in this process (reference run)" if record.mode == "in_process" else f"{record.workers} workers"
    console.line(f"job {record.job_id}: {where}, storage {prepared.storage.job_dir(record.job_id)}")
    run = run_in_process if record.mode == "in_process" else run_job
    try:
        return run(prepared, record, progress=lambda result: console.line(result.line(epochs)),
                   resume_from=resume_from, on_step=console.progress)
    except KeyboardInterrupt:
        console.close()
        print(f"job {record.job_id}: stopped after epoch {record.epochs_completed} "
              f"(orchestra resume {record.job_id} continues it)", file=sys.stderr)
        return record
    finally:
        console.close()


def _read_prepared(path: str) -> Prepared:
    try:
        return Prepared.from_json(Path(path).read_text())
    except OSError as exc:
        raise SpecError([("--prepared", f"cannot read {path}: {exc.strerror or exc}")], path) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError([("--prepared", f"not what a client's checks write: {str(exc)[:200]}")], path) from None


def exit_code(record: JobRecord) -> int:
    return EXIT_OK if record.state is JobState.SUCCEEDED else EXIT_JOB_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestra.driver", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="create a job and train it to its end")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("spec", nargs="?", help="a JSON job spec (checked here)")
    source.add_argument("--prepared", metavar="FILE", help="a spec a client has checked (Prepared.to_json)")
    run.add_argument("--job-id", help="the job's id (default: a new one from the spec's name)")
    run.add_argument("--workers", type=int)
    run.add_argument("--in-process", action="store_true")
    resume = verbs.add_parser("resume", help="continue a STOPPED or FAILED job from its latest checkpoint")
    resume.add_argument("job_id")
    resume.add_argument("--workers", type=int, help="continue on this many workers (the same global batches)")
    for verb in (run, resume):
        verb.add_argument("--storage", metavar="ROOT")
        verb.add_argument("--ray-job", metavar="SUBMISSION_ID", help="the Ray job this driver runs as, on a cluster")
        verb.add_argument("--datasets", metavar="DIR")
        verb.add_argument("--status-lines", action="store_true",
                          help="print a status line per record write and progress lines, for clients that "
                               "read this log")
    return parser


def main(argv: list[str] | None = None) -> int:
    from orchestra.driver.run import create_job

    args = build_parser().parse_args(argv)
    try:
        if args.verb == "run":
            if args.prepared:
                prepared = _read_prepared(args.prepared)
            else:
                prepared = prepare_new(args.spec, workers=args.workers, storage=args.storage,
                                       datasets=args.datasets, in_process=args.in_process)
            if args.status_lines:
                prepared.storage.on_write = status_lines.print_status_line
            record = create_job(prepared, in_process=args.in_process, job_id=args.job_id, ray_job=args.ray_job)
            checkpoint = None
        else:
            prepared, record, checkpoint = prepare_resume(
                args.job_id, storage=args.storage, datasets=args.datasets, workers=args.workers,
                ray_job=args.ray_job, on_write=status_lines.print_status_line if args.status_lines else None)
    except OrchestraError as exc:
        print(f"orchestra: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        record = drive(prepared, record, checkpoint, Console(sys.stdout, progress_lines=args.status_lines))
    except LeaseLost as exc:  # another driver took the job over: its record is that driver's now
        print(f"orchestra: {exc}", file=sys.stderr)
        return exc.exit_code
    if not args.status_lines:  # a client reading the status lines prints its own summary
        print(record.status().summary(), flush=True)
    return exit_code(record)
