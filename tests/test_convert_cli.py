"""`orchestra data convert` stopped by a signal: nothing of it is left."""

from __future__ import annotations

import signal
import subprocess
import sys
import time


def test_a_conversion_stopped_by_kill_leaves_nothing_and_exits_130(tmp_path, mnist_dir):
    """SIGTERM is handled as Ctrl-C is (KeyboardInterrupt), so this covers both."""
    dest = tmp_path / "mnist-tfrecord"
    process = subprocess.Popen([sys.executable, "-m", "orchestra.cli", "data", "convert", "mnist", str(dest),
                                "--format", "tfrecord", "--shards", "64", "--datasets", str(mnist_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".mnist-tfrecord.partial-*/*.tfrecord")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    # Frozen while it writes its first shards, so the signal lands mid-conversion, not after it.
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == [f"orchestra: data convert stopped; nothing of it was left at {dest}"]
    assert list(tmp_path.iterdir()) == []
