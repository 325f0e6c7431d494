import numpy as np
import pytest

from cimd_pipeline.data.synthetic import RATERS, SyntheticConfig, generate, make_case


def test_same_seed_gives_identical_arrays():
    a = list(generate(SyntheticConfig(num_cases=12), seed=3))
    b = list(generate(SyntheticConfig(num_cases=12), seed=3))
    for x, y in zip(a, b):
        assert x.case_id == y.case_id and x.group_id == y.group_id
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.masks, y.masks)
        np.testing.assert_array_equal(x.oracle, y.oracle)


def test_different_seed_gives_different_data():
    a = make_case(SyntheticConfig(), 0, seed=0)[0]
    b = make_case(SyntheticConfig(), 0, seed=1)[0]
    assert not np.array_equal(a.image, b.image)


def test_cases_have_the_family_rater_count_and_binary_masks():
    for case in generate(SyntheticConfig(num_cases=30)):
        family = case.meta["family"]
        assert case.rater_valid.sum() == RATERS[family]
        assert case.image.shape == (1, 64, 64) and case.image.dtype == np.float32
        assert set(np.unique(case.masks)) <= {0, 1}
        assert case.masks[~case.rater_valid].sum() == 0


def test_rater_model_sanity_empty_share_and_disagreement():
    cases = list(generate(SyntheticConfig(num_cases=300)))
    bone = [c for c in cases if c.meta["family"] == "bone"]
    empty_bone = np.mean([c.masks.sum() == 0 for c in bone])
    assert 0.08 < empty_bone < 0.35  # configured 20 %
    annotated = [c for c in cases if c.masks.sum() > 0]
    disagree = np.mean([len({m.tobytes() for m in c.masks[c.rater_valid]}) > 1 for c in annotated])
    assert disagree > 0.5  # raters disagree on most annotated cases
    families = {c.meta["family"] for c in cases}
    assert families == {"nodule", "bone", "lesions"}


def marginal(model) -> np.ndarray:
    """P(pixel drawn) under the rater model, integrated over the threshold in closed form per tau.

    A rater keeps component k with probability inclusion[k] and draws pixel p if a kept component
    exceeds tau there, tau ~ U(tau_low, tau_high): P(p | tau) = 1 - prod_k (1 - inclusion_k [c_k(p) > tau]).
    """
    edges = np.linspace(model.tau_low, model.tau_high, 401)
    taus = ((edges[1:] + edges[:-1]) / 2)[:, None, None, None]  # midpoint rule over 400 bins
    above = model.components[None] > taus  # (taus, K, H, W)
    per_tau = 1.0 - np.prod(1.0 - model.inclusion[None, :, None, None] * above, axis=1)
    return per_tau.mean(0)


@pytest.mark.parametrize("index", [0, 2, 4])  # nodule, lesions, bone for seed 5
def test_rater_model_draws_fresh_masks_matching_the_case_distribution(index):
    case, model = make_case(SyntheticConfig(), index, seed=5)
    fresh = model.draw(600, np.random.default_rng(0))
    assert fresh.shape == (600, 64, 64) and fresh.dtype == np.uint8
    # Per-pixel frequencies match the model's marginal (binomial sd <= 0.02 at 600 draws).
    expected = marginal(model)
    assert np.abs(fresh.mean(0) - expected).max() < 0.08
    # Fresh draws disagree where raters can: not one mask repeated, nor the union of the raters'.
    uncertain = (expected > 0.1) & (expected < 0.9)
    assert uncertain.sum() > 10
    assert len({m.tobytes() for m in fresh}) > 100
    union = fresh.any(0)
    assert fresh.sum((1, 2)).mean() < 0.9 * union.sum()
    # The case's own raters come from the same distribution: each drew only where the model can.
    raters = case.masks[case.rater_valid]
    assert not raters[:, expected == 0].any()


def test_groups_hold_several_cases():
    cases = list(generate(SyntheticConfig(num_cases=10, cases_per_group=2)))
    assert len({c.group_id for c in cases}) == 5


@pytest.mark.parametrize("bad", [{"num_cases": 0}, {"image_size": 8}, {"empty_bone_share": 2.0}])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)
