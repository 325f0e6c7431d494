import math

import nibabel as nib
import numpy as np
import pytest
import torch

from cimd_pipeline.config import TrainingParams
from cimd_pipeline.data.alignment import slice_volume
from cimd_pipeline.training.augment import apply_affine, apply_flips, apply_intensity, draw_affine, draw_flips, draw_intensity
from cimd_pipeline.training.fingerprint import data_digest, run_fingerprint
from cimd_pipeline.training.loop import train
from tests.data.readers.test_nifti import AFFINE, SHAPE, modality, read, save
from tests.training.test_loop import assert_resumes_exactly_and_changes_the_run, data, fresh, params  # noqa: F401


def test_flips_turn_exactly_the_chosen_examples_along_the_chosen_axes_masks_with_their_image():
    image = torch.arange(4 * 5 * 6, dtype=torch.float32).view(4, 1, 5, 6)
    masks = torch.stack([(image[:, 0] % 7 > 2), (image[:, 0] % 5 > 1)], 1).to(torch.uint8)
    flips = torch.tensor([[True, False], [False, True], [False, False], [True, True]])
    out_image, out_masks = apply_flips(image, masks, flips, ["width", "height"])
    expected = [image[0].flip(-1), image[1].flip(-2), image[2], image[3].flip(-1).flip(-2)]
    for i, want in enumerate(expected):
        assert torch.equal(out_image[i], want), i
    # every rater's mask went where its image went
    assert torch.equal(out_masks, torch.stack([(out_image[:, 0] % 7 > 2), (out_image[:, 0] % 5 > 1)], 1).to(torch.uint8))
    assert out_masks.dtype == torch.uint8
    only_height, _ = apply_flips(image, masks, flips[:, :1], ["height"])  # the column belongs to the axis named
    assert torch.equal(only_height[0], image[0].flip(-2)) and torch.equal(only_height[1], image[1])


def test_coins_are_fair_independent_per_axis_and_fixed_by_the_generator():
    coins = draw_flips(["width", "height"], 4000, torch.Generator().manual_seed(3))
    assert coins.shape == (4000, 2) and coins.dtype == torch.bool
    assert abs(coins.float().mean().item() - 0.5) < 0.03
    assert 0.2 < (coins[:, 0] & coins[:, 1]).float().mean().item() < 0.3
    assert torch.equal(coins, draw_flips(["width", "height"], 4000, torch.Generator().manual_seed(3)))


def test_an_axis_named_twice_or_unknown_is_refused():
    for axes in (["width", "width"], ["z"]):
        with pytest.raises(ValueError, match="flip_axes"):
            TrainingParams(flip_axes=axes)
    assert TrainingParams().flip_axes == []


def test_training_sees_flipped_and_unflipped_copies_of_its_cases_and_resumes_exactly(data, tmp_path):  # noqa: F811
    images = torch.from_numpy(data.images)
    masks = torch.from_numpy(data.masks)
    seen = {"flipped": 0, "plain": 0}
    net = fresh()
    losses = net.losses

    def spy(image, batch_masks, valid, generator):
        for one, one_masks in zip(image, batch_masks):
            case = next(i for i in range(len(images)) if torch.equal(one, images[i]) or torch.equal(one, images[i].flip(-1)))
            flipped = not torch.equal(one, images[case])
            seen["flipped" if flipped else "plain"] += 1
            assert torch.equal(one_masks, masks[case].flip(-1) if flipped else masks[case])
        return losses(image, batch_masks, valid, generator)

    net.losses = spy
    full = train(net, data, params(flip_axes=["width"]), tmp_path / "a" / "last.pt", "fp")
    assert seen["flipped"] >= 5 and seen["plain"] >= 5  # 24 examples, a coin each
    assert_resumes_exactly_and_changes_the_run(full, data, tmp_path, flip_axes=["width"])


def test_flips_are_part_of_the_run_fingerprint(data):  # noqa: F811
    model, digest = {"variant": "cimd_aa"}, data_digest(data)
    fingerprints = {run_fingerprint(model, params(flip_axes=axes), digest) for axes in ([], ["width"], ["height"], ["width", "height"])}
    assert len(fingerprints) == 4


def test_the_old_axis_names_are_refused_with_their_translation():
    with pytest.raises(ValueError, match=r"\['width', 'height'\] for the same flips.*anterior-posterior"):
        TrainingParams(flip_axes=["x", "y"])
    with pytest.raises(ValueError, match=r"\['height'\]"):
        TrainingParams(flip_axes=["y"])


def _side(mask: torch.Tensor) -> tuple[str, str]:
    """Where a marker lies on an axial slice in RAS+ as docs/datasets.md states it: rows run from
    the patient's left to right, columns from posterior to anterior."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    height, width = mask.shape
    return (
        "right" if rows.float().mean() > (height - 1) / 2 else "left",
        "anterior" if cols.float().mean() > (width - 1) / 2 else "posterior",
    )


def test_on_an_axial_nifti_slice_height_flips_left_right_and_width_anterior_posterior(tmp_path):
    """The per-reader table of docs/datasets.md, for the NIfTI readers at slice_axis 2: a marker
    placed in the patient's right-anterior corner of a volume stored in LPS."""
    lps = AFFINE.copy()
    lps[0, 0] = lps[1, 1] = -1.0
    assert nib.aff2axcodes(lps) == ("L", "P", "S")
    marker = np.zeros(SHAPE, np.uint8)
    marker[1:4, 1:4, :] = 1  # low i, low j of an LPS file: the patient's right and anterior
    save(tmp_path / "c1" / "image.nii.gz", modality(0), lps)
    save(tmp_path / "c1" / "annotation_1.nii.gz", marker, lps)
    (case,) = read("qubiq", tmp_path)
    axial = slice_volume(case, 2, 1.0, np.random.default_rng(0))[0]
    image = torch.from_numpy(axial.image)[None]
    masks = torch.from_numpy(axial.masks)[None]
    assert _side(masks[0, 0]) == ("right", "anterior")
    yes = torch.ones(1, 1, dtype=torch.bool)
    flipped = {axis: apply_flips(image, masks, yes, [axis])[1][0, 0] for axis in ("width", "height")}
    assert _side(flipped["height"]) == ("left", "anterior")
    assert _side(flipped["width"]) == ("right", "posterior")


def test_intensity_changes_scale_and_shift_each_image_within_its_bounds_and_never_the_masks(data, tmp_path):  # noqa: F811
    changes = draw_intensity(0.2, 0.5, 4000, torch.Generator().manual_seed(2))
    assert changes.shape == (4000, 2) and changes.dtype == torch.float32
    assert changes[:, 0].abs().max() <= 0.2 and changes[:, 1].abs().max() <= 0.5
    assert changes[:, 0].abs().max() > 0.19 and changes[:, 1].abs().max() > 0.49  # uniform over the range
    assert abs(changes.mean().item()) < 0.02 and abs(torch.corrcoef(changes.T)[0, 1].item()) < 0.05
    image = torch.randn(2, 3, 4, 4)
    out = apply_intensity(image, torch.tensor([[0.1, -0.5], [0.0, 0.25]]))
    assert torch.allclose(out[0], 1.1 * image[0] - 0.5) and torch.allclose(out[1], image[1] + 0.25)

    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks)
    seen = []
    net = fresh()
    losses = net.losses

    def spy(image, batch_masks, valid, generator):
        for one, one_masks in zip(image, batch_masks):
            # the case is the one whose masks these are; its image went through gain and offset
            case = next(i for i in range(len(masks)) if torch.equal(one_masks, masks[i]))
            plain = images[case]
            gain = ((one - one.mean()) * (plain - plain.mean())).sum() / ((plain - plain.mean()) ** 2).sum()
            offset = (one - gain * plain).mean()
            assert torch.allclose(one, gain * plain + offset, atol=1e-5)
            seen.append((gain.item() - 1, offset.item()))
        return losses(image, batch_masks, valid, generator)

    net.losses = spy
    full = train(net, data, params(intensity_scale=0.3, intensity_shift=0.4), tmp_path / "a" / "last.pt", "fp")
    gains, offsets = zip(*seen)
    assert max(map(abs, gains)) <= 0.3 + 1e-5 and max(map(abs, offsets)) <= 0.4 + 1e-5
    assert max(map(abs, gains)) > 0.05 and max(map(abs, offsets)) > 0.05  # both changes happen
    assert_resumes_exactly_and_changes_the_run(full, data, tmp_path, intensity_scale=0.3, intensity_shift=0.4)


def test_intensity_changes_are_part_of_the_run_fingerprint_and_their_absence_changes_nothing(data):  # noqa: F811
    model, digest = {"variant": "cimd_aa"}, data_digest(data)
    fingerprints = {run_fingerprint(model, params(**kw), digest) for kw in (
        {}, {"intensity_scale": 0.1}, {"intensity_shift": 0.1}, {"intensity_scale": 0.1, "intensity_shift": 0.1})}
    assert len(fingerprints) == 4
    with pytest.raises(ValueError, match="intensity_scale"):
        TrainingParams(intensity_scale=1.0)  # a gain of zero would blank the image


def _image_and_masks(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    image = torch.randn((2, 2, size, size), generator=generator)
    masks = (torch.rand((2, 3, size, size), generator=generator) < 0.4).to(torch.uint8)
    return image, masks


def test_a_quarter_turn_and_whole_pixel_shifts_move_the_image_and_every_mask_alike():
    image, masks = _image_and_masks()
    turned, turned_masks = apply_affine(image, masks, torch.tensor([[math.pi / 2, 0, 0, 0], [-math.pi / 2, 0, 0, 0]]))
    for i, k in enumerate((-1, 1)):  # opposite angles turn opposite ways
        assert torch.allclose(turned[i], torch.rot90(image[i], k, (-2, -1)), atol=1e-5), i
        assert torch.equal(turned_masks[i], torch.rot90(masks[i], k, (-2, -1))), i
    assert turned_masks.dtype == torch.uint8

    # 2 rows down for the first example, 1 column left for the second (a side is 8 pixels)
    shifted, shifted_masks = apply_affine(image, masks, torch.tensor([[0, 2 / 8, 0, 0], [0, 0, -1 / 8, 0]]))
    assert torch.allclose(shifted[0, :, 2:], image[0, :, :-2], atol=1e-5)
    assert torch.allclose(shifted[0, :, :2], image[0, :, :1].expand(-1, 2, -1), atol=1e-5)  # the border repeated
    assert torch.equal(shifted_masks[0, :, 2:], masks[0, :, :-2]) and not shifted_masks[0, :, :2].any()  # background
    assert torch.allclose(shifted[1, :, :, :-1], image[1, :, :, 1:], atol=1e-5)
    assert torch.equal(shifted_masks[1, :, :, :-1], masks[1, :, :, 1:]) and not shifted_masks[1, :, :, -1].any()

    same, same_masks = apply_affine(image, masks, torch.zeros(2, 4))
    assert torch.allclose(same, image, atol=1e-5) and torch.equal(same_masks, masks)


def test_a_zoom_scales_a_mask_s_area_and_a_turn_keeps_it():
    masks = torch.zeros(3, 1, 32, 32, dtype=torch.uint8)
    masks[:, :, 12:20, 12:20] = 1  # an 8 x 8 square about the centre
    changes = torch.tensor([[0, 0, 0, 0.5], [0, 0, 0, -0.5], [math.radians(30), 0, 0, 0]])
    _, moved = apply_affine(torch.zeros(3, 1, 32, 32), masks, changes)
    areas = moved.sum((1, 2, 3)).float()
    assert abs(areas[0] / 64 - 1.5**2) < 0.15 and abs(areas[1] / 64 - 0.5**2) < 0.1
    assert abs(areas[2] / 64 - 1) < 0.1 and not torch.equal(moved[2], masks[2])
    assert set(moved.unique().tolist()) <= {0, 1}


def test_affine_draws_are_uniform_within_their_bounds_and_fixed_by_the_generator():
    changes = draw_affine(15.0, 0.05, 0.1, 4000, torch.Generator().manual_seed(4))
    assert changes.shape == (4000, 4) and changes.dtype == torch.float32
    bounds = torch.tensor([math.radians(15.0), 0.05, 0.05, 0.1])
    assert (changes.abs() <= bounds).all() and (changes.abs().amax(0) > 0.98 * bounds).all()
    assert (changes.mean(0).abs() < 0.05 * bounds).all()
    assert abs(torch.corrcoef(changes.T)[1, 2].item()) < 0.05  # the two shifts are drawn apart
    assert torch.equal(changes, draw_affine(15.0, 0.05, 0.1, 4000, torch.Generator().manual_seed(4)))
    assert not draw_affine(0.0, 0.0, 0.0, 8, torch.Generator().manual_seed(4)).any()


def test_training_sees_moved_cases_with_binary_masks_and_resumes_exactly(data, tmp_path):  # noqa: F811
    images = torch.from_numpy(data.images)
    seen = {"moved": 0, "plain": 0}
    net = fresh()
    losses = net.losses

    def spy(image, batch_masks, valid, generator):
        assert set(batch_masks.unique().tolist()) <= {0, 1}
        for one in image:
            seen["plain" if any(torch.equal(one, i) for i in images) else "moved"] += 1
        return losses(image, batch_masks, valid, generator)

    net.losses = spy
    switches = {"affine_rotation": 20.0, "affine_translation": 0.1, "affine_scaling": 0.2}
    full = train(net, data, params(**switches), tmp_path / "a" / "last.pt", "fp")
    assert seen["moved"] == sum(seen.values()) > 0  # every example is moved by some amount
    assert_resumes_exactly_and_changes_the_run(full, data, tmp_path, **switches)


def test_affine_changes_are_part_of_the_run_fingerprint_and_their_absence_changes_nothing(data):  # noqa: F811
    model, digest = {"variant": "cimd_aa"}, data_digest(data)
    fingerprints = {run_fingerprint(model, params(**kw), digest) for kw in (
        {}, {"affine_rotation": 10.0}, {"affine_translation": 0.05}, {"affine_scaling": 0.1})}
    assert len(fingerprints) == 4
    assert run_fingerprint(model, params(affine_rotation=0.0), digest) == run_fingerprint(model, params(), digest)
    for bad in ({"affine_rotation": 181.0}, {"affine_translation": 0.5}, {"affine_scaling": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainingParams(**bad)
