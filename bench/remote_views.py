"""`python -m bench.remote_views`: what remote views cost on a cluster.

Starts a real Ray cluster on loopback (head + one node, token auth, as the
cluster tests do), then measures with orchestra's client:

- `orchestra list` over N finished orchestra jobs: the first call (reads
  each finished job's log once) and the second (a new client, as a second
  `orchestra list` would be: final statuses come from the cache);
- following a job whose driver prints E epoch lines (and its status
  lines): the bytes the client receives, against the log's size, and
  against what polling the whole log once a second (the old way) would
  have downloaded.

The jobs are stand-ins for finished orchestra jobs (their drivers print an
orchestra job's status lines, no training), so only the client's costs show.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from ray_cluster import LoopbackCluster  # noqa: E402

from orchestra.client.client import Client  # noqa: E402
from orchestra.storage import status_lines  # noqa: E402
from orchestra.storage.record import JobRecord  # noqa: E402


def stand_in(jobs, job_id: str, epochs: int, pause: float) -> None:
    """A Ray job whose driver prints what an orchestra driver prints: an
    epoch line and a status line per epoch, then the final status."""
    record = JobRecord(job_id=job_id, name="stand-in", workers=2, spec={})
    record.start()
    running = status_lines.status_line(record)
    record.epochs_completed = epochs
    record.finish()
    script = (f"import time\nfor i in range({epochs}):\n"
              f"    print(f'epoch {{i + 1}}/{epochs}  loss 0.1234  accuracy 0.9876  0.50s', flush=True)\n"
              f"    print({running!r}, flush=True)\n    time.sleep({pause})\n"
              f"print({status_lines.status_line(record)!r}, flush=True)\n")
    jobs.submit_job(entrypoint=shlex.join(["python", "-c", script]), submission_id=job_id,
                    metadata={"orchestra": "1", "name": "stand-in", "workers": "2"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orchestra-remote-") as folder:
        cluster = LoopbackCluster(Path(folder), cpus_per_node=2).start()
        try:
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(cluster.token_path)
            os.environ["ORCHESTRA_CACHE"] = str(Path(folder) / "cache")
            client = Client(cluster.address)
            jobs = client._jobs._jobs
            ids = [f"stand-in-{i:03d}" for i in range(args.jobs)]
            for job_id in ids:
                stand_in(jobs, job_id, epochs=5, pause=0)
            while not all(jobs.get_job_status(job_id).is_terminal() for job_id in ids):
                time.sleep(1)
            timings = []
            for _ in range(2):
                started = time.perf_counter()
                listed = Client(cluster.address).list()
                timings.append(time.perf_counter() - started)
                assert len(listed) == args.jobs
            print(f"| `orchestra list`, {args.jobs} finished jobs | first call {timings[0]:.2f} s "
                  f"| second call {timings[1]:.2f} s |")

            stand_in(jobs, "followed", epochs=args.epochs, pause=0.01)
            started, received, polls = time.perf_counter(), 0, 0
            for chunk in client.follow("followed"):
                received += len(chunk)
            seconds = time.perf_counter() - started
            size = len(client.logs("followed"))
            # The old follow downloaded the whole log once a second while the job ran.
            polls = max(1, int(seconds))
            print(f"| follow a {args.epochs}-epoch job ({seconds:.0f} s) | received {received:,} bytes "
                  f"| log {size:,} bytes | old way ≈ {size * (polls + 1) // 2:,} bytes ({polls} polls) |")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
