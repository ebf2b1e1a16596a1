"""The GPU plan as a calculation: per training step, the bytes each
worker's gradient all-reduce moves for every job in jobs/, and how long that
takes over NVLink, PCIe 4.0 x16 and 25 GbE.

    python -m bench.gpu_plan [--workers 2 8] [--write docs/gpus.md]

A step all-reduces one float32 gradient per trainable weight (frozen
backbone weights have none; under a mixed precision policy the weights and
their gradients stay float32). A ring all-reduce of B bytes over N workers
sends, and receives, 2(N-1)/N x B per worker: a reduce-scatter and an
all-gather of N-1 chunks of B/N each. The time is that over the link's
bandwidth alone: a lower bound, which leaves out each of the ring's 2(N-1)
hops' latency and any overlap with the backward pass.

The models are counted, not trained: assembled in a `tf.Graph`, where
weights are shapes only (as pre-flight sizes them), backbones without their
weights files. `--write` puts the table into a page between its markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
TABLE_START = "<!-- gpu_plan:table:start -->"
TABLE_END = "<!-- gpu_plan:table:end -->"
GRADIENT_BYTES = 4  # float32
# Bytes per second one way, as commonly quoted: NVLink 3 (A100) ~300 GB/s per direction,
# PCIe 4.0 x16 ~25 GB/s usable, 25 Gb Ethernet ~3 GB/s.
LINKS = {"NVLink": 300e9, "PCIe 4.0 x16": 25e9, "25 GbE": 3e9}
# One example's shape of the Keras datasets the jobs name (their arrays are not read here).
KERAS_SHAPES = {"mnist": (28, 28), "fashion_mnist": (28, 28), "cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}


@dataclass(frozen=True)
class JobWeights:
    """A job's weights; None where its input shape is known only from its data files."""

    job: str
    parameters: int | None
    trainable: int | None

    @property
    def gradient_bytes(self) -> int:
        return GRADIENT_BYTES * (self.trainable or 0)


def ring_bytes_per_worker(gradient_bytes: int, workers: int) -> float:
    """Bytes one worker sends (and receives) in a ring all-reduce of
    `gradient_bytes` over `workers`.

        >>> ring_bytes_per_worker(1_000, 2), ring_bytes_per_worker(1_000, 8)
        (1000.0, 1750.0)
    """
    return 2 * (workers - 1) / workers * gradient_bytes


def input_shape(spec) -> tuple[int, ...] | None:
    """One example's shape, from the spec alone (None: only its data files say)."""
    if spec.model.input_shape:
        return tuple(spec.model.input_shape)
    if spec.model.backbone is not None:
        return tuple(spec.model.backbone.input_shape)
    if spec.data.images is not None:
        return tuple(spec.data.images.image_shape)
    shape = KERAS_SHAPES.get(spec.data.source or "")
    if shape is None:
        return None
    return (math.prod(shape),) if spec.data.flatten else shape


def count(path: Path) -> JobWeights:
    """The job's weights and trainable weights, counted in a `tf.Graph`."""
    from orchestra.build.model import assemble_model
    from orchestra.keras_compat import tensorflow
    from orchestra.spec import parse_spec

    raw = json.loads(path.read_text())
    raw.pop("callbacks", None)  # the model is all that counts here
    spec = parse_spec(json.dumps(raw), str(path))
    backbone = spec.model.backbone
    if backbone is not None and backbone.weights is not None:
        model = spec.model.model_copy(update={"backbone": backbone.model_copy(update={"weights": None})})
        spec = spec.model_copy(update={"model": model})
    shape = input_shape(spec)
    if shape is None:
        return JobWeights(path.stem, None, None)
    logger = tensorflow().get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # graph mode warns of deprecations (BatchNormalization's) that training never meets
    try:
        with tensorflow().Graph().as_default():
            model = assemble_model(spec, shape)
            trainable = sum(math.prod(int(d) for d in weight.shape) for weight in model.trainable_weights)
            return JobWeights(path.stem, model.count_params(), trainable)
    finally:
        logger.setLevel(level)


def _size(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def table(jobs: list[JobWeights], workers: list[int]) -> str:
    most = max(workers)
    heads = ["job", "weights", "trainable", "gradient bytes"]
    heads += [f"per worker, {n} workers" for n in workers]
    heads += [f"{link}, {most} workers" for link in LINKS]
    rows = ["| " + " | ".join(heads) + " |", "| --- |" + " ---: |" * (len(heads) - 1)]
    for job in jobs:
        if job.trainable is None:
            rows.append(f"| `{job.job}` | not counted: its input shape is in its data files |"
                        + " |" * (len(heads) - 2))
            continue
        cells = [f"`{job.job}`", f"{job.parameters:,}", f"{job.trainable:,}", _size(job.gradient_bytes)]
        cells += [_size(ring_bytes_per_worker(job.gradient_bytes, n)) for n in workers]
        cells += [_time(ring_bytes_per_worker(job.gradient_bytes, most) / rate) for rate in LINKS.values()]
        rows.append("| " + " | ".join(cells) + " |")
    links = ", ".join(f"{name} {rate / 1e9:g} GB/s" for name, rate in LINKS.items())
    return (f"Per training step; link bandwidths one way: {links} "
            f"(`python -m bench.gpu_plan --workers {' '.join(map(str, workers))}`).\n\n" + "\n".join(rows))


def write_table(page: Path, text: str) -> None:
    doc = page.read_text()
    start, end = doc.index(TABLE_START) + len(TABLE_START), doc.index(TABLE_END)
    page.write_text(f"{doc[:start]}\n{text}\n{doc[end:]}")


def plan(workers: list[int], paths: list[Path] | None = None) -> str:
    """The table for the specs at `paths` (default: every job in jobs/)."""
    return table([count(path) for path in paths or sorted(JOBS.glob("*.json"))], workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--write", type=Path, metavar="PAGE", help="put the table between the page's markers")
    args = parser.parse_args()
    text = plan(args.workers)
    print(text)
    if args.write:
        write_table(args.write, text)


if __name__ == "__main__":
    main()
