"""trainer/config.py: the flags of `trainer train` are TrainConfig's fields, and answer without TensorFlow."""

import dataclasses
import os
import subprocess
import sys

import pytest
from absl import flags

from trainer import config
from trainer.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def flag_values():
    values = flags.FlagValues()
    config.define_flags(values)
    return values


def test_every_field_is_a_flag_with_its_default_type_and_choices(flag_values):
    fields = dataclasses.fields(config.TrainConfig)
    assert sorted(flag_values) == sorted(field.name for field in fields)
    for field in fields:
        flag = flag_values[field.name]
        assert flag.default == field.default, field.name
        assert flag.help.endswith(field.metadata["help"]), field.name
        if field.metadata["choices"]:
            assert tuple(flag.parser.enum_values) == field.metadata["choices"], field.name
        elif config.flag_type(field) is bool:
            assert isinstance(flag, flags.BooleanFlag), field.name
        else:
            parsed = flag.parser.parse({str: "x", int: "3", float: "0.25"}[config.flag_type(field)])
            assert type(parsed) is config.flag_type(field), field.name


def test_parsed_flags_fill_the_config(flag_values):
    flag_values(["trainer train", "--data=gs://b/d.json", "--job_dir=gs://b/j", "--backbone=resnet50",
                 "--epochs=3", "--learning_rate=0.001", "--augment", "--num_workers=2"])
    parsed = config.TrainConfig.from_flags(flag_values)
    assert parsed == dataclasses.replace(config.TrainConfig(data="gs://b/d.json", job_dir="gs://b/j"),
                                         backbone="resnet50", epochs=3, learning_rate=0.001, augment=True,
                                         num_workers=2)


def test_a_field_without_a_flag_type_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        values: list = config._field(None, "a list")  # noqa: SLF001 - the field helper itself

    with pytest.raises(TypeError, match="no flag type"):
        config.define_flags(flags.FlagValues(), Odd)


def test_data_is_required_and_job_dir_unless_vertex_names_one(flag_values):
    from trainer.errors import UserError

    with pytest.raises(flags.IllegalFlagValueError, match="data"):
        flag_values(["trainer train", "--job_dir=j"])
    fresh = flags.FlagValues()
    config.define_flags(fresh)
    fresh(["trainer train", "--data=d.json"])
    parsed = config.TrainConfig.from_flags(fresh)
    with pytest.raises(UserError, match="--job_dir are required"):
        config.check_config(config.with_launcher_defaults(parsed, {}))
    on_vertex = config.with_launcher_defaults(parsed, {"AIP_CHECKPOINT_DIR": "gs://b/run/checkpoints"})
    assert on_vertex.job_dir == "gs://b/run/checkpoints"
    config.check_config(on_vertex)
    explicit = dataclasses.replace(parsed, job_dir="gs://b/mine")
    assert config.with_launcher_defaults(explicit, {"AIP_CHECKPOINT_DIR": "gs://x"}).job_dir == "gs://b/mine"


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "predict", "promote", "tflite"])
def test_help_and_flag_errors_answer_without_tensorflow(command):
    """`--help`, a bad flag value and a failed check never load TensorFlow (they used to take seconds)."""
    bad = {"prepare": ["--source=a", "--output=b", "--val_fraction=2"],
           "train": ["--data=d", "--job_dir=j", "--learning_rate=-1"],
           "evaluate": ["--model=m", "--data=d", "--output=o", "--split=nope"],
           "predict": ["--model=m", "--input=i", "--output=o", "--batch_size=x"],
           "promote": ["--candidate=c", "--production=p", "--tolerance=x"],
           "tflite": ["--model=m"]}[command]
    script = (
        "import sys\n"
        "from trainer import cli\n"
        "try:\n"
        "    cli.main(['trainer', *sys.argv[1:]])\n"
        "finally:\n"
        "    print('tensorflow loaded' if 'tensorflow' in sys.modules else 'no tensorflow')\n"
    )
    for argv, code in (([command, "--help"], 0), ([command, *bad], 1)):
        result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == code, result.stdout + result.stderr
        assert result.stdout.strip().splitlines()[-1] == "no tensorflow", result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"trainer {command}: error:") or \
        result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr


def test_changed_settings_names_run_defining_fields_only():
    recorded = {**config.TrainConfig(data="d", job_dir="j").to_dict(), "plan": {}}
    changed = config.TrainConfig(data="d", job_dir="elsewhere", learning_rate=0.5, backup_every_steps=7,
                                 cpu_replicas=2)
    assert changed.changed_settings(recorded) == ["--learning_rate=1e-05 (now: 0.5)"]
    del recorded["dropout"]  # an older config.json without the field: not compared
    assert config.TrainConfig(data="d", job_dir="j", dropout=0.1).changed_settings(recorded) == []


def test_the_modern_preset_parses_passes_the_checks_and_fine_tunes_from_the_documented_layer(flag_values):
    from test_backbones import suggested_layers

    flag_values(["train", f"--flagfile={os.path.join(ROOT, 'configs', 'efficientnetv2s_modern.flags')}",
                 "--data=d", "--job_dir=j"])
    parsed = config.TrainConfig.from_flags(flag_values)
    config.check_config(parsed)
    assert (parsed.backbone, parsed.optimizer, parsed.lr_schedule, parsed.class_weight, parsed.augment) == (
        "efficientnet_v2_s", "adamw", "cosine", "balanced", True)
    assert parsed.early_stopping_patience == 3 and parsed.fine_tune_epochs == 10
    assert parsed.fine_tune_from == suggested_layers()["efficientnet_v2_s"]  # checked against the built base


@pytest.mark.parametrize("text", ["5", "3,2", "0,4", "a,b", "1,2,3"])
def test_profile_steps_must_be_a_range_of_steps(text):
    with pytest.raises(UserError, match="--profile_steps must be A,B with 1 <= A <= B"):
        config.parse_profile_steps(text)
    assert config.parse_profile_steps("10,20") == (10, 20)


def test_without_a_gpu_there_is_nothing_to_sample_and_no_error():
    from trainer.infra import devices

    sampler = devices.GpuSampler()
    assert not sampler.active and sampler.take() is None
    sampler.stop()
    assert devices.describe() == {"count": 0, "names": [], "driver": None, "memory_mib": None}
