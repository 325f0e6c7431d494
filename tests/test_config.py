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


# --- rules that used to fail late (after ingestion or training) --------------------------------
@pytest.mark.parametrize("timesteps", [20, 10])
def test_schedule_reaching_beta_one_is_refused(timesteps):
    # T = 20 scales beta_end 0.02 to 1.0: abar_T = 0 and every DDIM sample is NaN; T < 20 crashes
    with pytest.raises(ConfigError, match=r"model: .*every beta must lie in \(0, 1\)"):
        validate_parameters({"model": {"num_timesteps": timesteps}})


def test_schedule_with_decreasing_betas_is_refused():
    with pytest.raises(ConfigError, match="must increase"):
        validate_parameters({"model": {"beta_start": 0.02, "beta_end": 0.001}})


def test_shortest_valid_schedule_is_accepted_and_builds_its_diffusion():
    from cimd_pipeline.diffusion import GaussianDiffusion, linear_betas

    parsed = validate_parameters({"model": {"num_timesteps": 21}})["model"]
    diffusion = GaussianDiffusion(linear_betas(parsed.num_timesteps, parsed.beta_start, parsed.beta_end))
    assert diffusion.alphas_cumprod[-1] > 0


def test_one_sampling_step_is_refused_with_the_reason():
    for block in ("sampling", "inference"):
        with pytest.raises(ConfigError, match=rf"{block}.steps: .*shortest chain has 2 steps"):
            validate_parameters({block: {"steps": 1}})


def test_head_channels_must_divide_the_attended_channels():
    with pytest.raises(ConfigError, match=r"model.unet: .*num_head_channels=24.*\[64\]"):
        validate_parameters({"model": {"unet": {"num_head_channels": 24}}})


def test_unet_and_synthetic_blocks_refuse_unknown_keys():
    with pytest.raises(ConfigError) as err:
        validate_parameters({"model": {"unet": {"chanels": [16]}}, "ingestion": {"synthetic": {"seed": 3}}})
    assert "model.unet.chanels" in str(err.value) and "ingestion.synthetic.seed" in str(err.value)


def test_inference_block_is_checked_up_front():
    with pytest.raises(ConfigError, match=r"inference.num_samples"):
        validate_parameters({"inference": {"num_samples": 0}})
    validate_parameters({"inference": {}})  # input is needed only when inference runs
    with pytest.raises(ConfigError, match=r"inference.input: set it"):
        validate_parameters({"inference": {}}, running={"inference"})


def test_inference_model_is_read_by_inference_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = {"input": "scans", "model": "models/lidc_cpu_64/model.pt"}
    # a run that trains writes the catalog's trained_model, i.e. inference.model: never a shipped file
    with pytest.raises(ConfigError, match=r"inference.model: models/lidc_cpu_64/model.pt would be overwritten"):
        validate_parameters({"inference": shipped}, running={"training", "inference"})
    validate_parameters({"inference": {"input": "scans"}}, running={"training", "inference"})
    with pytest.raises(ConfigError, match=r"inference.model: no model file at models/lidc_cpu_64/model.pt"):
        validate_parameters({"inference": shipped}, running={"inference"})
    (tmp_path / "models/lidc_cpu_64").mkdir(parents=True)
    (tmp_path / "models/lidc_cpu_64/model.pt").write_bytes(b"")
    validate_parameters({"inference": shipped}, running={"inference"})


def test_reader_options_are_checked_up_front():
    params = {"ingestion": {"source": "folders", "reader": {"layot": "flat", "group_regex": "(["}}}
    with pytest.raises(ConfigError) as err:
        validate_parameters(params)
    text = str(err.value)
    assert "ingestion.reader.layot" in text and "ingestion.reader.group_regex: Value error, not a valid regular" in text
    with pytest.raises(ConfigError, match="ingestion.reader.case_regex"):
        validate_parameters({"ingestion": {"source": "msmri", "reader": {"case_regex": "(?P<"}}})
    with pytest.raises(ConfigError, match="synthetic source takes no reader options"):
        validate_parameters({"ingestion": {"reader": {"file": "x.pickle"}}})
    validate_parameters({"ingestion": {"source": "qubiq", "reader": {"group_regex": "^([^/]+)"}}})


def test_sampling_a_split_that_alignment_leaves_empty_is_refused():
    with pytest.raises(ConfigError, match="sampling.split: 'val' is empty"):
        validate_parameters({"sampling": {"split": "val"}, "alignment": {"split": {"val": 0.0}}})


def test_unavailable_device_is_refused_for_the_blocks_that_run(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    params = {"training": {"device": "cuda"}}
    validate_parameters(params)  # the training block is not used by this run
    with pytest.raises(ConfigError, match="training.device: 'cuda' is not available"):
        validate_parameters(params, running={"training"})


def test_unet_and_synthetic_blocks_have_one_definition():
    from cimd_pipeline.config import IngestionParams, ModelParams
    from cimd_pipeline.data.synthetic import SyntheticConfig
    from cimd_pipeline.models.denoiser import UNetConfig

    assert ModelParams.model_fields["unet"].annotation is UNetConfig
    assert IngestionParams.model_fields["synthetic"].annotation is SyntheticConfig
