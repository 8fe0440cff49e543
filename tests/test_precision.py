"""--mixed_precision (bfloat16 on CPU) and --jit_compile (XLA) train correctly on the CPU.

Both are GPU settings (mixed_float16 with loss scaling, XLA fusion); here they must at least give
a model that learns and exports float32 probabilities.
"""

import pytest
from helpers import TINY_JOB, prepare_stripes, run_trainer

from trainer.evaluate import run as evaluate
from trainer.infra import storage


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_stripes(tmp_path_factory.mktemp("precision"), per_class=40)


@pytest.mark.parametrize("setting", ["--mixed_precision", "--jit_compile"])
def test_setting_trains_and_exports_float32(dataset, tmp_path, setting):
    job = str(tmp_path / "job")
    result = run_trainer("train", f"--data={dataset}", f"--job_dir={job}", *TINY_JOB, "--batch_size=8",
                         "--epochs=2", "--learning_rate=3e-3", "--fine_tune_epochs=2",
                         "--fine_tune_from=block1_conv1", "--fine_tune_learning_rate=1e-3", setting, check=True)
    if setting == "--mixed_precision":
        assert "mixed precision: mixed_bfloat16" in result.stderr
    history = storage.read_json(f"{job}/history.json")
    losses = [epoch["loss"] for phase in history["phases"] for epoch in phase["epochs"]]
    assert all(loss == loss for loss in losses), losses  # no NaN
    assert losses[-1] < losses[0]  # it learns
    # Training in its own process (mixed precision is a process-wide Keras policy); the export it
    # left is scored here.
    metrics = evaluate.run(f"{job}/model", dataset, "test", f"{job}/eval")
    assert metrics == storage.read_json(f"{job}/eval/metrics.json")
    assert metrics["examples"] > 0 and metrics["accuracy"] > 0.6
