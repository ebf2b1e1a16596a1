"""An image-folder job on 2 real workers, then `evaluate` and `predict` on
its best checkpoint; `validate --schema-only` for specs written elsewhere."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import read_job, run_cli, write_spec

import orchestra
from orchestra.build.images import decode
from orchestra.spec import ImageFolderSpec
from orchestra.tools.samples import write_image_tree


def image_spec(train: str, validation: str, **fit) -> dict:
    return {
        "name": "shapes",
        "seed": 2,
        "data": {"images": {"train_dir": train, "validation_dir": validation, "target_size": [24, 24],
                            "label_mode": "categorical"},
                 "rescale": "1/255",
                 "augmentation": {"rotation_range": 20, "width_shift_range": 0.1, "horizontal_flip": True}},
        "model": {"layers": [
            {"type": "Conv2D", "filters": 8, "kernel_size": 3, "activation": "relu"},
            {"type": "MaxPooling2D"}, {"type": "Flatten"},
            {"type": "Dense", "units": 2, "activation": "softmax"}]},
        "compile": {"optimizer": {"type": "adam", "learning_rate": 0.01}, "loss": "categorical_crossentropy",
                    "metrics": ["accuracy"]},
        "fit": {"epochs": 3, "batch_size": 8, **fit},
        "callbacks": [{"class_name": "ModelCheckpoint", "config": {"monitor": "val_loss", "save_best_only": True, "keep": 1}}],
        "data_loader": {"processes": 2, "prefetch": 2},
        "scaling": {"workers": 2},
    }


@pytest.fixture(scope="module")
def image_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_job")
    train = write_image_tree(root / "train", per_class=12, size=24, seed=1)
    validation = write_image_tree(root / "validation", per_class=4, size=24, seed=2)
    (train / "square" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    spec_path = write_spec(root / "shapes.json", image_spec(str(train), str(validation)))
    result = run_cli("submit", spec_path, "--storage", root / "storage")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1].rstrip(":")
    record = read_job(root / "storage" / job_id)
    return {"root": root, "job_id": job_id, "record": record, "validation": validation}


@pytest.mark.integration
def test_image_folder_job_trains_on_two_workers(image_job):
    record = image_job["record"]
    assert record["state"] == "SUCCEEDED" and record["workers"] == 2
    assert record["class_names"] == ["circle", "square"]
    assert record["skipped_files"] == 1 and record["skipped_examples"][0].endswith("square/corrupt.jpg")
    assert record["input_shape"] == [24, 24, 3]
    history = record["history"]
    assert len(history) == 3 and all("val_accuracy" in h for h in history)
    for entry in history:  # 24 images, global batch 8: 3 steps, every image once per epoch
        assert entry["samples_per_second"] * entry["epoch_time"] == pytest.approx(24)
    status = orchestra.Client(storage=str(image_job["root"] / "storage")).status(image_job["job_id"])
    assert (status.skipped_files, status.class_names) == (1, ["circle", "square"])


@pytest.mark.integration
def test_evaluate_and_predict_use_the_best_checkpoint(image_job, tmp_path):
    root, job_id, record = image_job["root"], image_job["job_id"], image_job["record"]
    storage = str(root / "storage")
    best = min(h["val_loss"] for h in record["history"])
    result = run_cli("evaluate", job_id, "--storage", storage, "--json")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    assert evaluated["set"] == "validation" and evaluated["examples"] == 8
    assert evaluated["metrics"]["loss"] == pytest.approx(best, rel=1e-4)

    images = ImageFolderSpec(train_dir="-", target_size=[24, 24])
    files = sorted(image_job["validation"].glob("*/*.png"))
    np.savez(tmp_path / "in.npz", x=np.stack([decode(str(f), images) for f in files]))
    result = run_cli("predict", job_id, tmp_path / "in.npz", "-o", tmp_path / "out.npz", "--storage", storage)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert out["probabilities"].shape == (8, 2)
        np.testing.assert_array_equal(out["classes"], out["probabilities"].argmax(-1))
        assert out["class_names"].tolist() == ["circle", "square"]
        accuracy = np.mean(out["classes"] == np.repeat([0, 1], 4))
    assert accuracy == pytest.approx(evaluated["metrics"]["accuracy"])

    other_data = {"images": {"train_dir": str(root / "train"), "target_size": [24, 24]}, "augmentation": None}
    other = orchestra.Client(storage=storage).evaluate(job_id, data=other_data)
    assert other["set"] == "training" and other["examples"] == 24


@pytest.mark.integration
def test_resume_refuses_an_image_folder_whose_classes_changed(image_job, tmp_path):
    root, job_id = image_job["root"], image_job["job_id"]
    shutil.copytree(root / "storage" / job_id, tmp_path / job_id)
    record_file = tmp_path / job_id / "job.json"
    record_file.write_text(json.dumps({**json.loads(record_file.read_text()), "state": "FAILED"}))
    added = root / "train" / "triangle"
    shutil.copytree(root / "train" / "circle", added)
    try:
        result = run_cli("resume", job_id, "--storage", tmp_path)
    finally:
        shutil.rmtree(added)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "started on the classes ['circle', 'square']" in result.stderr
    assert "now has ['circle', 'square', 'triangle']" in result.stderr
    assert json.loads(record_file.read_text())["state"] == "FAILED"


def test_schema_only_skips_the_files_a_spec_names(tmp_path):
    spec = image_spec("/cluster/data/train", "/cluster/data/validation")
    path = write_spec(tmp_path / "elsewhere.json", spec)
    result = run_cli("validate", path, "--schema-only", "--storage", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    full = run_cli("validate", path, "--storage", tmp_path / "s")
    assert full.returncode == 2 and "data.images.train_dir: no such folder: /cluster/data/train" in full.stderr
    spec["model"]["layers"][0]["type"] = "Conv2d"
    bad = run_cli("validate", write_spec(tmp_path / "bad.json", spec), "--schema-only")
    assert bad.returncode == 2 and "model.layers.0.type: unknown layer 'Conv2d'; did you mean 'Conv2D'" in bad.stderr
