"""Query-box localisation: the box sampler, matching, GIoU, the group mask, learning, pictures; 2D and 3D."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data.box_utils import box_pair_giou
from monai.transforms import Resize

from medssl.data.views import RandQueryBoxesd, crop_box, query_boxes
from medssl.models import ViT
from medssl.tasks import QueryBoxTask
from medssl.tasks.box_matching import centre_size_to_corners, corners_to_centre_size, group_mask, match


def _phantom(spatial_dims, n=1, size=32, seed=0):
    """Dark images with one bright block of random place and size (the foreground)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, 1, *[size] * spatial_dims)
    for i in range(n):
        edge = int(torch.randint(size // 3, size // 2 + 1, (1,), generator=g))
        start = torch.randint(0, size - edge + 1, (spatial_dims,), generator=g).tolist()
        img[(i, slice(None), *[slice(s, s + edge) for s in start])] = 0.3 + 0.7 * torch.rand(1, *[edge] * spatial_dims, generator=g)
    return img


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_sampled_boxes_lie_inside_the_image_and_its_foreground_at_the_minimum_size(spatial_dims):
    sampler = RandQueryBoxesd(n_boxes=20, min_size=4, max_fraction=0.3, query_size=8, min_foreground=0.5)
    sampler.set_random_state(seed=0)
    for seed in range(3):
        img = _phantom(spatial_dims, seed=seed)[0]
        boxes = sampler.sample_boxes(img)
        assert boxes.shape == (20, 2 * spatial_dims)
        lo, hi = boxes[:, :spatial_dims], boxes[:, spatial_dims:]
        assert (lo >= 0).all() and (hi <= 32).all() and ((hi - lo) >= 4).all() and ((hi - lo) <= 9).all()
        shares = [float((crop_box(img, b) > 0.05).float().mean()) for b in boxes]
        assert min(shares) >= 0.5, shares


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_query_is_the_crop_at_its_box(spatial_dims):
    """Crop-then-box round trip: resizing the image region at each returned box gives the query."""
    views = RandQueryBoxesd(n_boxes=5, min_size=6, query_size=8, augment=None)
    views.set_random_state(seed=1)
    img = _phantom(spatial_dims, seed=2)[0]
    out = views({"image": img})
    assert out["query_views"].shape == (5, 1, *[8] * spatial_dims) and out["query_boxes"].dtype == torch.float32
    resize = Resize(spatial_size=[8] * spatial_dims, mode="bilinear" if spatial_dims == 2 else "trilinear")
    for box, query in zip(out["query_boxes"], out["query_views"]):
        torch.testing.assert_close(torch.as_tensor(resize(crop_box(img, box))), query)
    views.set_random_state(seed=1)
    assert torch.equal(views({"image": img})["query_boxes"], out["query_boxes"])  # reproducible from the seed


def test_hungarian_matching_finds_the_hand_made_assignment():
    targets = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.2, 0.3, 0.1]]])
    preds = torch.tensor([[[0.69, 0.71, 0.2, 0.2], [0.9, 0.9, 0.05, 0.05], [0.21, 0.19, 0.1, 0.1], [0.5, 0.21, 0.3, 0.12]]])
    logits = torch.zeros(1, 4, 2)
    rows, cols = match(preds, logits, targets)[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0, 2: 3}  # the far query 1 stays unmatched


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_giou_of_identical_boxes_is_one_and_of_far_boxes_negative(spatial_dims):
    box = torch.tensor([[0.3] * spatial_dims + [0.2] * spatial_dims])
    far = torch.tensor([[0.9] * spatial_dims + [0.1] * spatial_dims])
    a, b = centre_size_to_corners(box), centre_size_to_corners(far)
    assert float(box_pair_giou(a, a)) == pytest.approx(1.0, abs=1e-4)  # MONAI adds a small eps to the union
    assert float(box_pair_giou(a, b)) < 0
    torch.testing.assert_close(corners_to_centre_size(a), box)


@pytest.mark.parametrize("groups,per_group", [(3, 2), (10, 3), (5, 5), (2, 7)])
def test_the_group_mask_keeps_each_query_in_its_own_group(groups, per_group):
    mask = group_mask(groups, per_group)[0, 0]
    assert mask.shape == (groups * per_group,) * 2 and mask.equal(mask.T)
    for i in range(groups * per_group):
        assert mask[i].nonzero().flatten().tolist() == list(range(i // per_group * per_group, (i // per_group + 1) * per_group))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_tiny_model_learns_to_localise(spatial_dims):
    torch.manual_seed(0)
    task = QueryBoxTask(ViT(spatial_dims, 1, patch_size=4, size="micro"), queries_per_box=2, max_boxes=4, decoder_dim=48)
    views = query_boxes(spatial_dims, query_size=8, n_boxes=3, min_size=4, max_fraction=0.5, intensity=0, noise_std=0)
    views.set_random_state(seed=0)
    images = _phantom(spatial_dims, n=8, size=32 if spatial_dims == 2 else 16, seed=3)
    items = [views({"image": img}) for img in images]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "query_views", "query_boxes")}
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    first, last = [], []
    for step in range(50):
        out = task(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        (first if step < 5 else last).append((float(out["loss"].detach()), float(out["mean_iou"])))
    # measured: loss 5.2 -> 3.8 and IoU 0.20 -> 0.35 in 2D; 7.3 -> 5.9 and 0.10 -> 0.16 in 3D
    assert np.mean([l for l, _ in last[-5:]]) < 0.85 * np.mean([l for l, _ in first])
    assert np.mean([i for _, i in last[-5:]]) > np.mean([i for _, i in first]) + 0.04


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pictures_show_true_boxes_in_red_and_predictions_in_blue(spatial_dims, tmp_path):
    from medssl.viz.boxes import PREDICTED_COLOUR, TRUE_COLOUR
    from medssl.viz.panels import write_panels

    torch.manual_seed(0)
    task = QueryBoxTask(ViT(spatial_dims, 1, patch_size=4, size="micro"), queries_per_box=2, max_boxes=4, decoder_dim=32).eval()
    views = query_boxes(spatial_dims, query_size=8, n_boxes=3, min_size=6)
    views.set_random_state(seed=0)
    items = [views({"image": img}) for img in _phantom(spatial_dims, n=2, seed=4)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "query_views", "query_boxes")}
    pictures = task.visualize(batch)
    drawn = pictures["boxes"]
    assert drawn.shape == (2, 3, *[32] * spatial_dims)
    for colour in (TRUE_COLOUR, PREDICTED_COLOUR):
        hit = (drawn - torch.tensor(colour).view(1, 3, *[1] * spatial_dims)).abs().sum(1) < 1e-6
        assert int(hit.sum()) > 0, colour
        if spatial_dims == 3:  # the middle slices (what the panels show) cut the first true box
            assert bool(hit[:, 16].any() and hit[:, :, 16].any() and hit[:, :, :, 16].any()) or colour == PREDICTED_COLOUR
    assert pictures["queries"].shape == (2, 1, *[32] * spatial_dims)
    assert write_panels(pictures, tmp_path / "box.png").stat().st_size > 1000
