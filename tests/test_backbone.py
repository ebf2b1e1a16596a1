"""Backbones from keras.applications: local weights only, frozen as asked,
cut at an inner layer, a weights file that does not fit refused before
anything runs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli, write_spec

from orchestra.build.model import build_backbone, build_model
from orchestra.errors import FieldError, SpecError
from orchestra.keras_compat import keras
from orchestra.spec import JobSpec, parse_spec

HEAD = [{"type": "GlobalAveragePooling2D"}, {"type": "Dense", "units": 1, "activation": "sigmoid"}]


def backbone_spec(tmp_path, **backbone) -> dict:
    return {
        "data": {"images": {"train_dir": str(tmp_path), "target_size": backbone["input_shape"][:2],
                            "label_mode": "binary"}},
        "model": {"backbone": backbone, "layers": HEAD},
        "compile": {"optimizer": {"type": "rmsprop", "learning_rate": 1e-4}, "loss": "binary_crossentropy"},
    }


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory):
    """A MobileNetV2 with random weights, saved as a file (as ImageNet's would be)."""
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_random.h5"
    keras().utils.set_random_seed(5)
    model = keras().applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False, weights=None)
    model.save_weights(str(path))
    return path, [w.copy() for w in model.get_weights()]


def test_weights_file_is_loaded_and_frozen(tmp_path, mobilenet_weights):
    path, saved = mobilenet_weights
    spec = JobSpec.model_validate(backbone_spec(
        tmp_path, name="MobileNetV2", input_shape=[32, 32, 3], weights=str(path), trainable_from="block_16_expand"))
    model = build_model(spec, (32, 32, 3))
    backbone_weights = model.get_weights()[: len(saved)]
    assert all(np.array_equal(a, b) for a, b in zip(backbone_weights, saved))
    trainable = {w.name.split("/")[0] for w in model.trainable_weights}
    assert "block_16_expand" in trainable and "block_15_expand" not in trainable
    assert model.layers[-1].trainable and model.output_shape == (None, 1)


def test_inception_v3_cut_at_mixed7(tmp_path):
    """Seed 003's model: InceptionV3 frozen, cut at mixed7, a functional head (build only)."""
    spec = JobSpec.model_validate({**backbone_spec(
        tmp_path, name="InceptionV3", input_shape=[150, 150, 3], cut_at="mixed7"),
        "model": {"backbone": {"name": "InceptionV3", "input_shape": [150, 150, 3], "cut_at": "mixed7"},
                  "layers": [{"type": "Flatten"}, {"type": "Dense", "units": 1024, "activation": "relu"},
                             {"type": "Dropout", "rate": 0.2}, {"type": "Dense", "units": 1, "activation": "sigmoid"}]}})
    model = build_model(spec, (150, 150, 3))
    assert model.get_layer("mixed7").output.shape[1:] == (7, 7, 768)
    assert "mixed8" not in [layer.name for layer in model.layers]
    head = [w.name for w in model.trainable_weights]
    assert len(head) == 4 and all(name.startswith("dense") for name in head)


def test_weights_that_do_not_fit_are_refused_before_training(tmp_path, mobilenet_weights):
    path, _ = mobilenet_weights
    with pytest.raises(FieldError) as error:
        build_backbone(JobSpec.model_validate(backbone_spec(
            tmp_path, name="MobileNetV2", input_shape=[32, 32, 3], include_top=True, weights=str(path)))
            .model.backbone)
    assert error.value.field == "model.backbone.weights" and "does not fit MobileNetV2" in str(error.value)

    from orchestra.tools.samples import write_image_tree

    write_image_tree(tmp_path / "images", per_class=2, size=32)
    spec = backbone_spec(tmp_path / "images", name="DenseNet121", input_shape=[32, 32, 3], weights=str(path))
    spec["fit"] = {"batch_size": 2}
    result = run_cli("validate", write_spec(tmp_path / "job.json", spec), "--storage", tmp_path / "storage")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model.backbone.weights:" in result.stderr and "does not fit DenseNet121" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "storage").exists() or not any((tmp_path / "storage").iterdir())


def test_imagenet_and_unknown_names_are_refused(tmp_path):
    with pytest.raises(SpecError) as error:
        parse_spec(__import__("json").dumps(backbone_spec(
            tmp_path, name="MobileNetV2", input_shape=[32, 32, 3], weights="imagenet")))
    assert error.value.problems[0][0] == "model.backbone.weights" and "would download" in str(error.value)
    from orchestra.build.model import check_keras_names

    problems = dict(check_keras_names(JobSpec.model_validate(backbone_spec(
        tmp_path, name="InceptionV4", input_shape=[150, 150, 3]))))
    assert "did you mean 'InceptionV3'" in problems["model.backbone.name"]
