"""Checkpoint-ensembling schedule, ensemble mean (eq. 21) and entropy (eq. 22) on constructed
inputs; no nnU-Net run needed."""

import math

import numpy as np
import pytest

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.nnunet.ensemble import (
    entropy,
    max_entropy,
    mean_probabilities,
    probabilities_to_mask,
    rank_by_uncertainty,
    rank_slices,
)
from napari_medclipsam.nnunet.schedule import EnsembleSchedule


def test_paper_schedule_keeps_the_last_ten_epochs_of_each_of_three_cycles():
    s = EnsembleSchedule()
    assert (s.epochs, s.cycles, s.checkpoints_per_cycle, s.lr_max) == (600, 3, 10, 0.01)
    assert s.n_checkpoints == 30
    assert s.ensemble_epochs() == [*range(190, 200), *range(390, 400), *range(590, 600)]
    assert [s.cycle_of(e) for e in (0, 199, 200, 399, 400, 599)] == [0, 0, 1, 1, 2, 2]
    assert s.checkpoint_name(599) == "cycle3_epoch0600.pth"


def test_learning_rate_restarts_at_max_and_anneals_to_min_in_every_cycle():
    s = EnsembleSchedule(epochs=30, cycles=3, checkpoints_per_cycle=2, lr_max=0.01,
                         lr_min=0.001)
    lrs = [s.lr_at(e) for e in range(30)]
    for c in range(3):
        cyc = lrs[10 * c: 10 * (c + 1)]
        assert cyc[0] == pytest.approx(0.01)        # restart at the maximum
        assert cyc[-1] == pytest.approx(0.001)      # the minimum by the end of the cycle
        assert all(a > b for a, b in zip(cyc, cyc[1:], strict=False))  # strictly annealing
    # cosine: halfway through (k = 4.5 of 9) is the midpoint; check k=3 against the formula
    assert lrs[3] == pytest.approx(0.001 + 0.009 * (1 + math.cos(math.pi * 3 / 9)) / 2)
    # the research fork's rate barely cycles; ours spans the whole range in each cycle
    assert max(lrs[10:20]) / min(lrs[10:20]) == pytest.approx(10.0)


def test_schedule_validation():
    with pytest.raises(InputError, match="multiple of cycles"):
        EnsembleSchedule(epochs=10, cycles=3)
    with pytest.raises(InputError, match="cannot exceed"):
        EnsembleSchedule(epochs=4, cycles=2, checkpoints_per_cycle=3)
    with pytest.raises(InputError, match="lr_min"):
        EnsembleSchedule(lr_min=0.1, lr_max=0.01)
    s = EnsembleSchedule(epochs=4, cycles=2, checkpoints_per_cycle=2)
    assert EnsembleSchedule.from_json(s.to_json()) == s
    assert s.ensemble_epochs() == [0, 1, 2, 3]


def _onehot(labels, c=2):
    return np.eye(c, dtype=np.float32)[labels].transpose(2, 0, 1)


def test_checkpoints_that_agree_give_zero_entropy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (8, 8))
    probs = [_onehot(labels) for _ in range(5)]
    mean = mean_probabilities(probs)
    np.testing.assert_array_equal(mean, _onehot(labels))
    np.testing.assert_array_equal(entropy(mean), np.zeros((8, 8)))
    np.testing.assert_array_equal(probabilities_to_mask(mean), labels)


def test_checkpoints_that_disagree_give_the_entropy_of_eq_22():
    # pixel 0: 3 of 4 checkpoints say target with certainty -> p = (0.25, 0.75)
    # pixel 1: 2 say background, 2 say target -> p = (0.5, 0.5): the maximum, ln 2
    # pixel 2: soft outputs 0.9/0.7 -> p = (0.2, 0.8)
    g = np.zeros((4, 2, 3), dtype=np.float32)
    g[:, :, 0] = [[0, 1], [0, 1], [0, 1], [1, 0]]
    g[:, :, 1] = [[1, 0], [1, 0], [0, 1], [0, 1]]
    g[:, :, 2] = [[0.1, 0.9], [0.3, 0.7], [0.1, 0.9], [0.3, 0.7]]
    mean = mean_probabilities(g)
    np.testing.assert_allclose(mean[:, 0], [0.25, 0.75], atol=1e-7)
    np.testing.assert_allclose(mean[:, 2], [0.2, 0.8], atol=1e-7)
    h = entropy(mean)
    expected0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))   # 0.5623 nats
    expected2 = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))       # 0.5004 nats
    np.testing.assert_allclose(h, [expected0, math.log(2), expected2], rtol=1e-6)
    assert h.max() <= max_entropy(2) + 1e-7
    # the entropy of the mean, not the mean of the entropies (which is 0 for pixels 0 and 1)
    assert h[1] > 0.69
    np.testing.assert_array_equal(probabilities_to_mask(mean, 0.5), [1, 0, 1])
    np.testing.assert_array_equal(probabilities_to_mask(mean, 0.79), [0, 0, 1])


def test_entropy_of_three_classes_reaches_ln3():
    uniform = np.full((3, 2, 2), 1 / 3, dtype=np.float32)
    np.testing.assert_allclose(entropy(uniform), math.log(3), rtol=1e-6)
    assert max_entropy(3) == pytest.approx(1.0986, abs=1e-4)


def test_ranking_puts_the_most_uncertain_case_and_slice_first():
    flat = np.zeros((4, 4))
    noisy = np.full((4, 4), 0.6)
    vol = np.zeros((5, 4, 4))
    vol[3] = 0.69
    vol[1] = 0.2
    rows = rank_by_uncertainty({"calm": flat, "noisy": noisy, "vol": vol})
    assert [r["case"] for r in rows] == ["noisy", "vol", "calm"]
    assert rows[1]["worst_slice"] == 3
    assert rows[0]["worst_slice"] is None
    assert [i for i, _ in rank_slices(vol)[:2]] == [3, 1]


def test_images_are_matched_to_the_models_channels_as_the_export_did():
    from napari_medclipsam.nnunet.ensemble import match_channels

    gray = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    rgb_equal = np.repeat(gray, 3, axis=0)
    np.testing.assert_array_equal(match_channels(rgb_equal, 1), gray)   # gray saved as RGB
    rgba = np.concatenate([rgb_equal, np.full_like(gray, 255)])
    np.testing.assert_array_equal(match_channels(rgba, 1), gray)        # alpha ignored
    np.testing.assert_array_equal(match_channels(gray, 3), rgb_equal)
    yellow = np.zeros((3, 1, 1, 1), np.uint8)
    yellow[:2] = 255
    assert match_channels(yellow, 1)[0, 0, 0, 0] == round(0.299 * 255 + 0.587 * 255)
    with pytest.raises(InputError, match="2 channel"):
        match_channels(np.zeros((2, 1, 2, 2)), 1)


def test_several_classes_give_the_argmax_in_the_tables_values_and_entropy_up_to_ln3():
    from napari_medclipsam.nnunet.ensemble import EnsemblePrediction, classes_of

    # 3 checkpoints, C = 3 (background, disk, square), 4 pixels
    g = np.zeros((3, 3, 4), dtype=np.float32)
    g[:, :, 0] = [[1, 0, 0]] * 3                    # all say background
    g[:, :, 1] = [[0, 1, 0], [0, 1, 0], [0, 0, 1]]  # 2 of 3 say disk
    g[:, :, 2] = [[0, 0, 1]] * 3                    # all say square
    g[:, :, 3] = np.eye(3)                          # one vote each: uniform
    mean = mean_probabilities(g)
    np.testing.assert_allclose(mean.sum(0), 1, atol=1e-6)
    h = entropy(mean)
    np.testing.assert_allclose(h[[0, 2]], 0, atol=1e-7)
    np.testing.assert_allclose(h[3], math.log(3), rtol=1e-6)
    assert math.log(2) < h[3] <= max_entropy(3) + 1e-6 and 0 < h[1] < math.log(2)
    # the argmax (the threshold plays no part with C > 2) ...
    np.testing.assert_array_equal(probabilities_to_mask(mean[:, :3], 0.99), [0, 1, 2])
    # ... written in the exported table's values (nnU-Net's 1, 2 were the user's 3 and 7)
    ds_json = {"labels": {"background": 0, "disk": 1, "square": 2},
               "medclipsam_label_values": {"disk": 3, "square": 7}}
    names, values = classes_of(ds_json)
    assert names == ("background", "disk", "square") and values == (0, 3, 7)
    mask = probabilities_to_mask(mean[:, :3], label_values=values)
    np.testing.assert_array_equal(mask, [0, 3, 7])
    assert mask.dtype == np.uint8
    assert probabilities_to_mask(mean[:, :3], label_values=(0, 3, 700)).dtype == np.uint16
    # binary keeps the threshold on p(target), and 0/1 without a table
    assert classes_of({"labels": {"background": 0, "tumor": 1}}) == (("background", "tumor"),
                                                                    (0, 1))
    binary = np.array([[0.3, 0.6], [0.7, 0.4]], np.float32)
    np.testing.assert_array_equal(probabilities_to_mask(binary, 0.5, (0, 1)), [1, 0])
    pred = EnsemblePrediction(mean, probabilities_to_mask(mean, label_values=values), h, 3,
                              names, values)
    assert pred.labels == {"disk": 3, "square": 7} and pred.n_classes == 3
    assert pred.max_entropy == pytest.approx(math.log(3))
    np.testing.assert_allclose(pred.foreground, 1 - mean[0])
