"""Salient boxes (appendix A): candidate geometry, the score formula, selection."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from ps3.curation.boxes import (
    MIN_MASK_AREA,
    ImageTooSmall,
    candidate_boxes,
    centres_inside,
    salient_boxes,
    saliency_scores,
    saliency_scores_loop,
    select_boxes,
)
from ps3.curation.types import Masks, mask_bounds


def _areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


@pytest.mark.parametrize("width,height", [(1000, 750), (750, 1000), (1536, 1152), (2000, 2000)])
def test_candidates_tile_the_image_with_three_aspects_of_equal_area(width, height):
    side = 0.2 * min(width, height)
    cols, rows = math.floor(width / side + 1e-9), math.floor(height / side + 1e-9)
    boxes = candidate_boxes(width, height)
    n = cols * rows
    assert boxes.shape == (3 * n, 4) and boxes.dtype == np.float32
    np.testing.assert_allclose(_areas(boxes), side * side, rtol=1e-5)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
    squares, wide, tall = boxes[:n], boxes[n:2 * n], boxes[2 * n:]
    np.testing.assert_allclose((wide[:, 2] - wide[:, 0]) / (wide[:, 3] - wide[:, 1]), 1.5, rtol=1e-5)
    np.testing.assert_allclose((tall[:, 2] - tall[:, 0]) / (tall[:, 3] - tall[:, 1]), 1 / 1.5, rtol=1e-5)
    xs, ys = np.unique(squares[:, 0]), np.unique(squares[:, 1])
    assert len(xs) == cols and len(ys) == rows
    np.testing.assert_allclose(np.diff(xs), side, rtol=1e-5)  # stride = side: squares touch, never overlap
    np.testing.assert_allclose(np.diff(ys), side, rtol=1e-5)
    # the leftover margin is split evenly
    assert squares[:, 0].min() == pytest.approx(width - squares[:, 2].max(), abs=1e-2)


def test_rectangles_share_the_square_centre_unless_shifted_inside():
    boxes = candidate_boxes(1000, 750).astype(np.float64)
    n = len(boxes) // 3
    centre = lambda b: np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)  # noqa: E731
    shifted = 0
    for rect in (boxes[n:2 * n], boxes[2 * n:]):
        touching = (rect[:, 0] < 1e-3) | (rect[:, 1] < 1e-3) | (rect[:, 2] > 1000 - 1e-3) | (rect[:, 3] > 750 - 1e-3)
        same = np.isclose(centre(rect), centre(boxes[:n]), atol=1e-2).all(axis=1)
        assert (same | touching).all()
        shifted += int((~same).sum())
    assert shifted == 2 * 6  # the 1:1.5 boxes of the top and bottom rows overhang (no vertical margin)


def test_candidate_fraction_that_cannot_fit_is_rejected():
    with pytest.raises(ValueError, match="fraction"):
        candidate_boxes(100, 100, fraction=0.9)


def _random_masks(n: int, work: tuple[int, int], image: tuple[int, int], seed: int = 0) -> Masks:
    rng = np.random.default_rng(seed)
    w, h = work
    masks = np.zeros((n, h, w), dtype=bool)
    for m in range(n - 1):  # the last mask stays empty
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        masks[m, y0:y0 + rng.integers(1, h // 2), x0:x0 + rng.integers(1, w // 2)] = True
        masks[m] &= rng.random((h, w)) < 0.8
    return Masks(masks, image)


def test_vectorised_scores_equal_the_loop_at_a_non_integer_working_scale():
    masks = _random_masks(25, (97, 61), (1000, 750))  # 10.31 x 12.30 original px per mask px
    rng = np.random.default_rng(1)
    x0, y0 = rng.uniform(-50, 1000, 40), rng.uniform(-50, 750, 40)  # fractional, some outside
    random = np.stack([x0, y0, x0 + rng.uniform(1, 400, 40), y0 + rng.uniform(1, 300, 40)], 1)
    boxes = np.concatenate([candidate_boxes(1000, 750), random]).astype(np.float32)
    fast, loop = saliency_scores(masks, boxes), saliency_scores_loop(masks, boxes)
    assert (loop > 0).sum() > 50
    np.testing.assert_allclose(fast, loop, rtol=1e-5, atol=1e-9)


def test_score_formula_by_hand_with_the_40px_floor_and_fractional_edges():
    image = (100, 100)
    masks = np.zeros((3, 50, 50), dtype=bool)  # one mask pixel = 2 x 2 original pixels
    masks[0, 0:10, 0:10] = True  # original [0,0,20,20]: 400 px, below the 40*40 floor
    masks[1, 0:30, 10:40] = True  # original [20,0,80,60]: 3600 px
    m = Masks(masks, image)  # masks[2] is empty and must add nothing
    boxes = np.array([[0, 0, 40, 40], [0, 0, 21, 20], [80, 80, 100, 100]], dtype=np.float32)
    small = 100 * 100 / MIN_MASK_AREA  # 6.25: the floor, not 100*100/400
    big = 100 * 100 / 3600
    expected = [small + big * (20 * 40) / 3600,
                small + big * (1 * 20) / 3600,  # x 20..21 is half a mask pixel: 1 x 20 original px
                0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero for the empty mask
        fast = saliency_scores(m, boxes)
    np.testing.assert_allclose(fast, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(saliency_scores_loop(m, boxes), expected, rtol=1e-9, atol=1e-12)


def test_select_keeps_top_k_non_overlapping_and_never_zero_scores():
    boxes = np.array([[0, 0, 10, 10],     # 0: best
                      [5, 5, 15, 15],     # 1: overlaps 0 -> skipped
                      [10, 0, 20, 10],    # 2: touches 0 along an edge -> kept
                      [0, 10, 10, 20],    # 3
                      [20, 20, 30, 30],   # 4: would fit, but k is reached
                      [40, 40, 50, 50]],  # 5: score 0
                     dtype=np.float32)
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 0.0])
    assert select_boxes(boxes, scores, k=3).tolist() == [0, 2, 3]
    assert select_boxes(boxes, scores, k=10).tolist() == [0, 2, 3, 4]
    assert select_boxes(boxes, np.zeros(6), k=4).tolist() == []


def test_select_breaks_rounding_ties_by_candidate_order():
    boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10]], dtype=np.float32)
    assert select_boxes(boxes, np.array([1.0, 1.0 + 1e-13]), k=1).tolist() == [0]
    assert select_boxes(boxes, np.array([1.0, 1.0 + 1e-6]), k=1).tolist() == [1]


def test_salient_boxes_find_the_small_object():
    masks = np.zeros((2, 75, 100), dtype=bool)  # 10 original px per mask px
    masks[0, :, :50] = True  # a huge mask: little weight
    masks[1, 60:64, 80:84] = True  # a small one near (820, 620)
    boxes, scores = salient_boxes(Masks(masks, (1000, 750)), top_k=4)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and len(boxes) == len(scores) <= 4
    assert centres_inside(boxes[:1], np.array([[800, 600, 840, 640]])).all()
    assert scores[0] == pytest.approx(1000 * 750 / 1600, rel=1e-5)  # the whole small mask in one box
    assert (np.diff(scores) <= 0).all()


def test_zero_masks_give_no_boxes():
    boxes, scores = salient_boxes(Masks(np.zeros((0, 48, 64), dtype=bool), (640, 480)))
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    boxes, _ = salient_boxes(Masks(np.zeros((3, 48, 64), dtype=bool), (640, 480)))
    assert boxes.shape == (0, 4)


def test_image_smaller_than_one_box_raises_a_countable_error():
    masks = Masks(np.ones((1, 10, 10), dtype=bool), (200, 100))  # side 20 px < 28
    with pytest.raises(ImageTooSmall):
        salient_boxes(masks)
    assert issubclass(ImageTooSmall, ValueError)
    assert len(salient_boxes(masks, min_box_px=16)[0]) > 0


def test_centres_inside():
    boxes = np.array([[0, 0, 10, 10]], dtype=np.float32)
    targets = np.array([[8, 8, 12, 12], [9, 9, 13, 13], [-2, 0, 2, 2]])  # centres (10,10), (11,11), (0,1)
    assert centres_inside(boxes, targets).tolist() == [True, False, True]
    assert centres_inside(np.zeros((0, 4)), targets).tolist() == [False] * 3


def test_mask_bounds_give_the_same_scores_as_whole_masks():
    whole = _random_masks(25, (97, 61), (1000, 750), seed=3)
    bounds = mask_bounds(whole.masks)
    assert bounds[-1].tolist() == [0, 0, 0, 0]  # the empty mask
    for m, (x0, y0, x1, y1) in zip(whole.masks[:-1], bounds[:-1]):
        ys, xs = np.nonzero(m)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    bounded = Masks(whole.masks, whole.image_size, bounds)
    boxes = candidate_boxes(1000, 750)
    loop = saliency_scores_loop(whole, boxes)
    atol = 1e-7 * loop.max()  # float32 density: boxes with no mask in them score ~0, not 0
    np.testing.assert_allclose(saliency_scores(bounded, boxes), saliency_scores(whole, boxes), rtol=1e-6, atol=atol)
    np.testing.assert_allclose(saliency_scores(bounded, boxes), loop, rtol=1e-5, atol=atol)


def test_bounds_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="bounds"):
        Masks(np.zeros((2, 4, 4), dtype=bool), (8, 8), np.zeros((3, 4), dtype=np.int32))


def test_rounding_residue_of_an_empty_box_is_not_a_score():
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], dtype=np.float32)
    assert select_boxes(boxes, np.array([5.0, 3e-12]), k=4).tolist() == [0]
