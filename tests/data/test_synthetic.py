import numpy as np
import pytest

from cimd_pipeline.data.synthetic import RATERS, SyntheticConfig, generate, make_case


def test_same_seed_gives_identical_arrays():
    a = list(generate(SyntheticConfig(num_cases=12, seed=3)))
    b = list(generate(SyntheticConfig(num_cases=12, seed=3)))
    for x, y in zip(a, b):
        assert x.case_id == y.case_id and x.group_id == y.group_id
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.masks, y.masks)
        np.testing.assert_array_equal(x.oracle, y.oracle)


def test_different_seed_gives_different_data():
    a = make_case(SyntheticConfig(seed=0), 0)[0]
    b = make_case(SyntheticConfig(seed=1), 0)[0]
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


def test_rater_model_draws_fresh_masks_matching_the_case_distribution():
    cfg = SyntheticConfig(seed=5)
    case, model = make_case(cfg, 2)
    fresh = model.draw(200, np.random.default_rng(0))
    assert fresh.shape == (200, 64, 64) and fresh.dtype == np.uint8
    # Fresh draws cover the raters' foreground: every pixel any rater drew is drawn by some sample.
    union_raters = case.masks[case.rater_valid].any(0)
    assert (fresh.any(0) | ~union_raters).all()


def test_groups_hold_several_cases():
    cases = list(generate(SyntheticConfig(num_cases=10, cases_per_group=2)))
    assert len({c.group_id for c in cases}) == 5


@pytest.mark.parametrize("bad", [{"num_cases": 0}, {"image_size": 8}, {"empty_bone_share": 2.0}])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)
