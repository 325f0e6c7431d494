import pytest

from cimd_pipeline.config import validate_parameters
from cimd_pipeline.errors import ConfigError


def test_defaults_are_valid():
    parsed = validate_parameters({"model": {}, "training": {}, "sampling": {}, "alignment": {}})
    assert parsed["model"].variant.value == "cimd_aa"


def test_every_bad_parameter_is_named_in_one_error():
    params = {
        "model": {"variant": "cimd_xx"},
        "training": {"max_steps": -5},
        "sampling": {"num_samples": 0},
        "alignment": {"image_size": 30},
    }
    with pytest.raises(ConfigError) as err:
        validate_parameters(params)
    text = str(err.value)
    for expected in ("model.variant", "training.max_steps", "sampling.num_samples", "alignment.image_size"):
        assert expected in text


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="training.max_step"):
        validate_parameters({"training": {"max_step": 10}})


def test_image_size_must_fit_the_unet_depth():
    with pytest.raises(ConfigError, match="not divisible by 4"):
        validate_parameters({"model": {}, "alignment": {"image_size": 34}})


def test_sampler_steps_cannot_exceed_training_steps():
    with pytest.raises(ConfigError, match="sampling.steps"):
        validate_parameters({"model": {"num_timesteps": 100}, "sampling": {"steps": 200}})


def test_unknown_ingestion_source_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"ingestion.source: unknown source 'dicom'.*'lidc'"):
        validate_parameters({"ingestion": {"source": "dicom"}})
