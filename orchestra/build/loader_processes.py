"""Image decoding and augmentation in a pool of loader processes.

The design names multiprocessing loaders: the loaders' Python work never
shares the training worker's interpreter, and a loader that crashes fails
the job naming it instead of taking the worker down. Each training
worker owns a `LoaderPool`: `processes` children that decode and augment
the examples of a batch and write them straight into memory the worker
shares with them (a `memfd`, or an unlinked temporary file elsewhere; no
pickling, no pipe carries pixels). `tf.data` keeps `data_loader.processes`
batches in flight and `prefetch` ready ahead (`data.training_pipeline`).

The children are plain interpreters running this file (no TensorFlow, no
orchestra package: ~0.4 s and ~60 MB each), started by `subprocess`, not
`multiprocessing`: a Ray worker has TensorFlow's threads running (fork is
unsafe) and `multiprocessing`'s spawn would import the Ray worker's main
module again in every child. A child ends with its worker, also on
`kill -9`: the kernel sends it SIGKILL when the thread that started it ends
(`PR_SET_PDEATHSIG`; the pool's own thread, alive as long as the pool), and
its socket to the worker reaches end-of-file when the worker is gone. A
child that dies fails every batch after it with `LoaderError` naming it.

Every random draw of an example comes from a generator seeded by
(seed, epoch, example index), and each example is written to its own row:
the batches are the same, bit for bit, whatever the number of processes.

This module imports nothing from orchestra: the children run it as a file.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import weakref
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

START_TIMEOUT = 120.0  # seconds for a child to import numpy, Pillow and SciPy on a loaded node
STOP_TIMEOUT = 5.0
CHUNK = 64  # examples per task at most: a batch is split over the processes in tasks of up to this many
_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1


class LoaderError(RuntimeError):
    """A loader process died, could not start, or could not load an example."""


@dataclass(frozen=True)
class Recipe:
    """What a loader does to one image file: decode it (resized as Keras's
    `load_img`, nearest neighbour), augment it as `ImageDataGenerator` does
    when `epoch >= 0` and `augmentation` is set, and rescale it.

    Plain values only: it travels to the children as JSON.

    Args:
        height: target height in pixels.
        width: target width in pixels.
        grayscale: one channel instead of RGB.
        rescale: the factor every pixel is multiplied by, or None.
        augmentation: `AugmentationSpec` fields as a dict, or None.
        seed: seeds each example's draws with (seed, epoch, index).
    """

    height: int
    width: int
    grayscale: bool = False
    rescale: float | None = None
    augmentation: dict[str, Any] | None = None
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 1 if self.grayscale else 3)

    def load(self, path: str, index: int, epoch: int) -> np.ndarray:
        """Example `index` of its set, as the model sees it in `epoch` (-1: never augmented)."""
        x = decode_image(path, self.height, self.width, self.grayscale)
        if self.augmentation is not None and epoch >= 0:
            x = augment(x, Transforms(**self.augmentation), np.random.default_rng([self.seed, epoch, index]))
        if self.rescale is not None:
            x *= np.float32(self.rescale)
        return x


@dataclass(frozen=True)
class Transforms:
    """`ImageDataGenerator`'s random transforms, with its meanings (and
    `AugmentationSpec`'s fields)."""

    rotation_range: float = 0
    width_shift_range: float = 0
    height_shift_range: float = 0
    shear_range: float = 0
    zoom_range: float = 0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: str = "nearest"


def decode_image(path: str, height: int, width: int, grayscale: bool) -> np.ndarray:
    """One file as float32 (height, width, channels), resized as Keras's
    `load_img` does by default (nearest neighbour)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("L" if grayscale else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.NEAREST)
        array = np.asarray(image, dtype=np.float32)
    return array if array.ndim == 3 else array[..., None]


def augment(x: np.ndarray, spec: Transforms, rng: np.random.Generator) -> np.ndarray:
    """A random transform drawn as `ImageDataGenerator.get_random_transform`
    draws it, applied as Keras's `apply_affine_transform` applies it."""
    rows, cols = x.shape[0], x.shape[1]
    theta = rng.uniform(-spec.rotation_range, spec.rotation_range) if spec.rotation_range else 0
    tx = rng.uniform(-spec.height_shift_range, spec.height_shift_range) * rows if spec.height_shift_range else 0
    ty = rng.uniform(-spec.width_shift_range, spec.width_shift_range) * cols if spec.width_shift_range else 0
    shear = rng.uniform(-spec.shear_range, spec.shear_range) if spec.shear_range else 0
    zx, zy = rng.uniform(1 - spec.zoom_range, 1 + spec.zoom_range, 2) if spec.zoom_range else (1, 1)
    x = apply_affine_transform(x, theta=theta, tx=tx, ty=ty, shear=shear, zx=zx, zy=zy, fill_mode=spec.fill_mode)
    if spec.horizontal_flip and rng.random() < 0.5:
        x = x[:, ::-1]
    if spec.vertical_flip and rng.random() < 0.5:
        x = x[::-1]
    return np.ascontiguousarray(x, dtype=np.float32)


def apply_affine_transform(x: np.ndarray, theta: float = 0, tx: float = 0, ty: float = 0, shear: float = 0,
                           zx: float = 1, zy: float = 1, fill_mode: str = "nearest") -> np.ndarray:
    """Keras's `apply_affine_transform` for a (rows, cols, channels) image,
    bilinear, `cval` 0: the same matrices in the same order, without
    importing Keras (and TensorFlow) into a loader process.
    tests/test_loader_processes.py checks it against Keras's own."""
    from scipy import ndimage

    matrix = np.eye(3)
    if theta != 0:
        t = np.deg2rad(theta)
        matrix = matrix @ np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    if tx != 0 or ty != 0:
        matrix = matrix @ np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    if shear != 0:
        s = np.deg2rad(shear)
        matrix = matrix @ np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
    if zx != 1 or zy != 1:
        matrix = matrix @ np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    if theta == 0 and tx == 0 and ty == 0 and shear == 0 and zx == 1 and zy == 1:
        return x
    o_x, o_y = x.shape[0] / 2 - 0.5, x.shape[1] / 2 - 0.5
    matrix = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]]) @ matrix @ np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    # Keras's matrix is in (x, y); numpy indexes (row, col): swap both axes.
    matrix[:, [0, 1]] = matrix[:, [1, 0]]
    matrix[[0, 1]] = matrix[[1, 0]]
    channels = [ndimage.affine_transform(x[..., c], matrix[:2, :2], matrix[:2, 2], order=1, mode=fill_mode, cval=0.0)
                for c in range(x.shape[2])]
    return np.stack(channels, axis=-1)


# ---------------------------------------------------------------------------
# Messages: a 4-byte length and JSON, over a Unix stream socket; a block's
# file descriptor rides along (SCM_RIGHTS) with the first task that uses it.

def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = _HEADER.pack(len(payload := json.dumps(message).encode())) + payload
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def _receive(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """(message, descriptors), or (None, []) at end of file."""
    header, fds, _, _ = socket.recv_fds(sock, _HEADER.size, 4)
    if not header:
        return None, []
    header += _exactly(sock, _HEADER.size - len(header))
    return json.loads(_exactly(sock, _HEADER.unpack(header)[0])), fds


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError("the other end closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class _Block:
    """Memory the worker shares with its loaders: one batch's pixels."""

    def __init__(self, number: int, nbytes: int):
        import mmap

        self.number, self.nbytes = number, nbytes
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create(f"orchestra-loader-{number}", os.MFD_CLOEXEC)
        else:
            with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None,
                                             delete=False) as handle:
                self.fd = os.dup(handle.fileno())
            os.unlink(handle.name)
        os.ftruncate(self.fd, nbytes)
        self.memory = mmap.mmap(self.fd, nbytes)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.ndarray(shape, np.float32, buffer=self.memory)

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)


@dataclass
class _Batch:
    """One `LoaderPool.load` call: its tasks still out, and how it ended."""

    tasks_left: int
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


@dataclass
class _Task:
    number: int
    batch: _Batch
    block: _Block
    row: int
    epoch: int
    items: list[tuple[int, str]]


@dataclass
class _Child:
    number: int
    process: subprocess.Popen
    sock: socket.socket
    blocks: set[int] = field(default_factory=set)
    task: _Task | None = None


class LoaderPool:
    """`processes` loader processes, children of this one, that load images
    as a `Recipe` says into memory shared with this process.

    `load` may be called from many threads at once (tf.data's); each call's
    examples are split over the processes, and its batch comes back in the
    order asked. A child that dies makes this and every later `load` raise
    `LoaderError` naming it; the others are stopped. `close` (or the end of
    this process, however it ends) ends them all.

    Args:
        processes: how many loader processes.
        recipe: what they do to each file.

    Example:

    >>> import tempfile
    >>> from orchestra.tools.samples import write_image_tree
    >>> root = write_image_tree(tempfile.mkdtemp(), per_class=2, size=8)
    >>> files = sorted(str(p) for p in root.glob("*/*.png"))
    >>> with LoaderPool(1, Recipe(8, 8, rescale=1 / 255)) as pool:
    ...     batch = pool.load(list(enumerate(files)), epoch=0)
    >>> batch.shape, float(batch.max()) <= 1.0
    ((4, 8, 8, 3), True)
    """

    def __init__(self, processes: int, recipe: Recipe):
        if processes < 1:
            raise ValueError(f"a loader pool needs at least 1 process, not {processes}")
        self.recipe, self.processes = recipe, processes
        self._supervisor = _Supervisor(processes, recipe)
        # The supervisor, not this handle, is what its thread holds: dropping
        # the pool stops the children (as do `close` and the end of the process).
        self._finalizer = weakref.finalize(self, self._supervisor.stop)
        if self._supervisor.broken:
            self.close()
            raise LoaderError(self._supervisor.broken)

    @property
    def pids(self) -> list[int]:
        """The loader processes' ids."""
        return [child.process.pid for child in self._supervisor.children]

    def load(self, items: list[tuple[int, str]], epoch: int) -> np.ndarray:
        """The examples (index in their set, file) as one float32 batch, in order.

        Args:
            items: (index, path) of each example; the index seeds its draws.
            epoch: the epoch (seeds the draws); -1 for no augmentation.
        """
        return self._supervisor.load(items, epoch)

    def close(self) -> None:
        """End the loader processes and free the shared memory."""
        self._finalizer()

    def __enter__(self) -> LoaderPool:
        return self

    def __exit__(self, *_) -> None:
        self.close()


class _Supervisor:
    """The pool's state and its thread, which starts the children, hands
    them tasks, collects their answers and notices their deaths."""

    def __init__(self, processes: int, recipe: Recipe):
        self.processes, self.recipe = processes, recipe
        self.lock = threading.Lock()
        self.pending: deque[_Task] = deque()
        self.free_blocks: list[_Block] = []
        self.blocks: list[_Block] = []
        self.children: list[_Child] = []
        self.task_numbers = 0
        self.broken: str | None = None
        self.stopped = False
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)  # a full pipe already wakes the thread
        started = threading.Event()
        # The children are started by this thread: PR_SET_PDEATHSIG fires when the
        # *thread* that started a child ends, and this one lives as long as the pool.
        self.thread = threading.Thread(target=self.run, args=(started,), name="orchestra-loader-pool", daemon=True)
        self.thread.start()
        started.wait()

    def load(self, items: list[tuple[int, str]], epoch: int) -> np.ndarray:
        shape = (len(items), *self.recipe.shape)
        rows_per_task = min(CHUNK, -(-len(items) // self.processes)) or 1
        starts = range(0, len(items), rows_per_task)
        batch = _Batch(tasks_left=len(starts))
        with self.lock:
            if self.broken or self.stopped:
                raise LoaderError(self.broken or "the loader pool is closed")
            block = self.block(max(1, int(np.prod(shape)) * 4))
            for row in starts:
                self.task_numbers += 1
                self.pending.append(_Task(self.task_numbers, batch, block, row, int(epoch),
                                          [(int(i), str(p)) for i, p in items[row:row + rows_per_task]]))
            self.wake(b"t")
        if starts:
            batch.done.wait()
        try:
            if batch.error:
                raise LoaderError(batch.error)
            return np.array(block.view(shape))  # the pixels leave the shared block before it is reused
        finally:
            with self.lock:
                if self.stopped:
                    block.close()  # the pool closed while this batch was copied out: `stop` left it open
                else:
                    self.free_blocks.append(block)

    def block(self, nbytes: int) -> _Block:
        """A free block of at least `nbytes` (the caller holds the lock)."""
        fitting = [b for b in self.free_blocks if b.nbytes >= nbytes]
        if fitting:
            block = min(fitting, key=lambda b: b.nbytes)
            self.free_blocks.remove(block)
            return block
        block = _Block(len(self.blocks), -(-nbytes // 2**20) * 2**20)
        self.blocks.append(block)
        return block

    def run(self, started: threading.Event) -> None:
        try:
            self.start_children()
        except LoaderError as exc:
            self.broken = str(exc)
        finally:
            started.set()
        if self.broken:
            return
        selector = selectors.DefaultSelector()
        selector.register(self.wake_read, selectors.EVENT_READ)
        for child in self.children:
            selector.register(child.sock, selectors.EVENT_READ, child)
        try:
            while True:
                for key, _ in selector.select():
                    if key.data is None:
                        if b"q" in os.read(self.wake_read, 4096) or self.stopped:
                            return
                        continue
                    self.answer(key.data)
                self.dispatch()
        except _Broken as exc:
            self.fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - a batch waiting on this thread must not wait forever
            self.fail(f"the loader pool's thread failed ({type(exc).__name__}: {exc})")
        finally:
            selector.close()

    def start_children(self) -> None:
        here = os.path.abspath(__file__)
        for number in range(1, self.processes + 1):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                process = subprocess.Popen(
                    [sys.executable, "-c", _BOOT, here, str(theirs.fileno()), str(os.getpid())],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
            except OSError as exc:
                mine.close()
                raise LoaderError(f"loader process {number} of {self.processes} could not start: {exc}") from None
            finally:
                theirs.close()
            self.children.append(_Child(number, process, mine))
            _send(mine, {"recipe": asdict(self.recipe)})
        for child in self.children:
            child.sock.settimeout(START_TIMEOUT)
            try:
                message, _ = _receive(child.sock)
            except (OSError, EOFError, ValueError):
                message = None
            child.sock.settimeout(None)
            if message != {"ready": True}:
                raise LoaderError(f"{self.name(child)} did not start ({self.ending(child)})")

    def answer(self, child: _Child) -> None:
        try:
            message, _ = _receive(child.sock)
        except (OSError, EOFError, ValueError):
            message = None
        task = child.task
        if message is None or task is None or message.get("task") != task.number:
            raise _Broken(f"{self.name(child)} ended ({self.ending(child)})"
                          + (f" while loading {len(task.items)} images of epoch {task.epoch}" if task else ""))
        child.task = None
        if "error" in message:
            task.batch.error = f"{self.name(child)} could not load an image: {message['error']}"
        task.batch.tasks_left -= 1
        if task.batch.tasks_left == 0:
            task.batch.done.set()

    def dispatch(self) -> None:
        for child in self.children:
            if child.task is not None:
                continue
            with self.lock:
                if not self.pending:
                    return
                task = self.pending.popleft()
            fds = [] if task.block.number in child.blocks else [task.block.fd]
            message = {"task": task.number, "block": task.block.number, "nbytes": task.block.nbytes,
                       "row": task.row, "epoch": task.epoch, "items": task.items}
            child.task = task
            try:
                _send(child.sock, message, fds)
            except OSError:
                raise _Broken(f"{self.name(child)} ended ({self.ending(child)})") from None
            child.blocks.add(task.block.number)

    def fail(self, reason: str) -> None:
        """Fail every batch waiting and every later one; stop the other children."""
        with self.lock:
            self.broken = f"{reason}; the job's input stops here (data_loader.processes)"
            waiting = [child.task for child in self.children if child.task] + list(self.pending)
            self.pending.clear()
        for task in waiting:
            task.batch.error = self.broken
            task.batch.done.set()
        for child in self.children:
            if child.process.poll() is None:
                child.process.kill()

    def wake(self, why: bytes) -> None:
        try:
            os.write(self.wake_write, why)
        except BlockingIOError:
            pass

    def name(self, child: _Child) -> str:
        return f"loader process {child.number} of {self.processes} (pid {child.process.pid})"

    @staticmethod
    def ending(child: _Child) -> str:
        try:
            code = child.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.wake(b"q")
        self.thread.join(STOP_TIMEOUT)
        with self.lock:
            waiting = [child.task for child in self.children if child.task] + list(self.pending)
            self.pending.clear()
        for task in waiting:
            task.batch.error = "the loader pool was closed"
            task.batch.done.set()
        for child in self.children:
            child.sock.close()  # a child waiting for work sees end of file and exits
        for child in self.children:
            try:
                child.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        with self.lock:  # a block out with a `load` is closed by that `load`, once its batch is copied
            for block in self.free_blocks:
                block.close()
            self.free_blocks.clear()
        os.close(self.wake_read)
        os.close(self.wake_write)


class _Broken(Exception):
    pass


# ---------------------------------------------------------------------------
# A loader process: `python -c _BOOT <this file> <socket fd> <parent pid>`.
# The boot line drops the current directory from the path (a file there
# named like a module would shadow it) and runs this file as a script.

_BOOT = "import sys; del sys.path[0]; import runpy; runpy.run_path(sys.argv[1], run_name='__main__')"


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent's thread that started us ends (Linux); if the
    parent is already gone, exit now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def _serve(fd: int, parent: int) -> None:
    import mmap

    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle
    sock = socket.socket(fileno=fd)
    message, _ = _receive(sock)
    recipe = Recipe(**message["recipe"])
    import PIL.Image  # noqa: F401 - imported before "ready", not during the first batch
    import scipy.ndimage  # noqa: F401

    _send(sock, {"ready": True})
    blocks: dict[int, mmap.mmap] = {}
    while True:
        try:
            message, fds = _receive(sock)
        except (OSError, EOFError):
            message = None
        if message is None:
            return  # the worker closed the pool, or is gone
        if fds:
            blocks[message["block"]] = mmap.mmap(fds[0], message["nbytes"])
            os.close(fds[0])
        rows = np.ndarray((message["nbytes"] // 4,), np.float32, buffer=blocks[message["block"]])
        size = int(np.prod(recipe.shape))
        answer: dict[str, Any] = {"task": message["task"]}
        index, path = None, "<no file>"
        try:
            for offset, (index, path) in enumerate(message["items"], start=message["row"]):
                rows[offset * size:(offset + 1) * size] = recipe.load(path, index, message["epoch"]).reshape(-1)
        except Exception as exc:  # noqa: BLE001 - the worker reports it; this process carries on
            reason = str(exc).replace(path, "<file>")
            answer["error"] = f"example {index}: {type(exc).__name__}: {reason}"[:500]
        try:
            _send(sock, answer)
        except OSError:
            return


if __name__ == "__main__":
    _serve(int(sys.argv[-2]), int(sys.argv[-1]))
