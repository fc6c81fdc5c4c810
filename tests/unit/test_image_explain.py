"""Image explanations on hand-built models whose evidence is known: a model that reads one patch
(SHAP must put its mass there, deleting it must hurt) and a conv net that detects a bright square
(Grad-CAM must light it up)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from bigmodel.tasks import image_explain as ie

PATCH = (slice(1, 4), slice(4, 7))  # rows 1-3, columns 4-6: off-centre, so a transpose shows


class PatchModel(nn.Module):
    """logit 1 = 12 (mean of the patch − 0.5), logit 0 = 0: no pixel outside the patch matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, PATCH[0], PATCH[1]].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(s), 12 * (s - 0.5)], 1)


class SquareNet(nn.Module):
    """Conv → ReLU → Conv (the Grad-CAM layer) → ReLU(inplace) → GAP → Dropout → Linear,
    set by hand: filter 0 fires where the 3×3 local mean exceeds 0.7 (a bright square on a
    background in [0, 0.5]); class 1's logit grows with it, class 0's falls."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4, 3, padding=1)
        self.layer = nn.Conv2d(4, 4, 3, stride=2, padding=1)  # half size: upsampling matters
        self.head = nn.Sequential(nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(0.5), nn.Linear(4, 2))
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            self.conv1.weight[0] = 1 / (9 * c)
            self.conv1.bias[0] = -0.7
            self.layer.weight[0, 0, 1, 1] = 1.0
            self.head[-1].weight[:, 0] = torch.tensor([-20.0, 20.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(torch.relu(self.conv1(x))))


def patch_images(n: int, side: int, c: int, seed: int = 0) -> np.ndarray:
    """Noise in [0, 1]; the patch bright (0.9) in even images, dim (0.1) in odd ones."""
    x = np.random.default_rng(seed).random((n, side, side, c)).astype(np.float32)
    x[0::2, PATCH[0], PATCH[1]] = 0.9
    x[1::2, PATCH[0], PATCH[1]] = 0.1
    return x


def square_images(n: int, side: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = 0.5 * np.random.default_rng(seed).random((n, side, side, c)).astype(np.float32)
    square = np.zeros((side, side), dtype=bool)
    square[2:6, side - 7 : side - 3] = True  # top right
    x[:, square] = 1.0
    return x, square


def patch_mask(side: int) -> np.ndarray:
    m = np.zeros((side, side), dtype=bool)
    m[PATCH] = True
    return m


# Budgets for which the mass lands (almost) all on the patch. Pixels outside it never change the
# output, and Partition only splits a region where the output changes, but when the budget runs
# out, a region that still mixes patch and other pixels has its credit spread evenly over all
# of them. Measured share inside the patch, min over the 4 images:
#   8×8×1:   max_evals 100 → 0.67, 300 → 0.88, 500 → 0.98, 1000 → 1.00
#   16×16×3: max_evals 500 → 0.79, 1000 → 0.85, 2000 → 0.95, 4000 → 0.985
@pytest.mark.parametrize("side,c,max_evals,share", [(8, 1, 1000, 0.99), (16, 3, 2000, 0.9)])
def test_shap_puts_the_mass_on_the_patch_and_adds_up_in_grayscale_and_rgb(side, c, max_evals,
                                                                          share):
    # 8×8×1 takes the constant (mean) background, 16×16×3 the blurred one
    predict = ie.predictor(PatchModel())
    x = patch_images(4, side, c)
    values = ie.shap_images(predict, x, ["dim", "bright"], max_evals=max_evals, seed=0)
    assert values.values.shape == (4, side, side, c, 1) and np.shape(values.base_values) == (4, 1)
    predicted = predict(x).argmax(1)
    assert predicted.tolist() == [1, 0, 1, 0]
    assert [str(n[0]) for n in values.output_names] == ["bright", "dim", "bright", "dim"]
    maps = ie.class_maps(values, predicted)
    assert maps.shape == (4, side, side)
    inside = np.abs(maps[:, patch_mask(side)]).sum(1) / np.abs(maps).reshape(4, -1).sum(1)
    assert inside.min() > share
    # the patch raises p(bright) in bright images and p(dim) in dim ones: positive attributions
    assert (maps[:, patch_mask(side)].sum(1) > 0).all()
    # Partition's values add up by construction (measured: 0.0); the bound leaves float32
    # rounding room. Against the wrong class (p(bright) for the dim images) it would be ~1.
    assert ie.additivity_error(values, predict, x) < 1e-6
    again = ie.shap_images(predict, x, ["dim", "bright"], max_evals=max_evals, seed=0)
    assert np.array_equal(again.values, values.values)  # seeded: the same maps every run


def test_class_maps_picks_each_images_class_from_an_all_classes_layout():
    v = np.zeros((2, 4, 4, 3, 5))
    v[0, 1, 2, :, 3] = 1.0  # image 0, class 3
    v[1, 0, 0, 0, 4] = 2.0  # image 1, class 4
    maps = ie.class_maps(v, np.array([3, 4]))
    assert maps.shape == (2, 4, 4)
    assert maps[0, 1, 2] == 3.0 and maps[1, 0, 0] == 2.0 and maps.sum() == 5.0
    assert ie.class_maps(v, np.array([0, 0])).sum() == 0


@pytest.mark.parametrize("c,fill", [(1, 0.0), (3, np.array([0.1, 0.2, 0.3], dtype=np.float32))])
def test_deleting_the_true_evidence_hurts_more_than_deleting_random_pixels(c, fill):
    predict = ie.predictor(PatchModel())
    x = patch_images(6, 8, c)
    predicted = predict(x).argmax(1)
    truth = np.broadcast_to(patch_mask(8), (6, 8, 8)).astype(np.float32)
    scores = ie.deletion_scores(predict, x, truth, predicted, fraction=9 / 64, seed=0, fill=fill)
    assert set(scores) == {"deletion_drop_top", "deletion_drop_random"}
    # bright patches → 0.1–0.3 push p(bright) from ~0.99 to ≤ 0.1; in dim ones 0.1 → fill
    # barely moves p(dim): the mean drop is ~0.49, while 9 random pixels rarely hit the patch
    assert scores["deletion_drop_top"] > 0.4
    assert scores["deletion_drop_top"] > scores["deletion_drop_random"] + 0.2
    assert ie.deletion_scores(predict, x, truth, predicted, 9 / 64, 0, fill) == scores  # seeded


@pytest.mark.parametrize("c", [1, 3])
def test_grad_cam_lights_up_the_bright_square(c):
    model = SquareNet(c).eval()
    x, square = square_images(3, 16, c)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    cam = ie.grad_cam(model, model.layer, xt, torch.ones(3, dtype=torch.long))
    assert cam.shape == (3, 16, 16) and cam.min() >= 0 and np.allclose(cam.max((1, 2)), 1)
    # measured 60–80× brighter inside; outside is only the bilinear spill at the square's edge
    assert (cam[:, square].mean(1) > 20 * cam[:, ~square].mean(1)).all()
    peak = np.unravel_index(cam.reshape(3, -1).argmax(1), (16, 16))
    assert square[peak].all()
    # class 0's logit falls with the square: no positive evidence anywhere, an all-zero map
    assert (ie.grad_cam(model, model.layer, xt, torch.zeros(3, dtype=torch.long)) == 0).all()


@pytest.mark.parametrize("training", [True, False])
def test_grad_cam_leaves_the_model_as_it_found_it(training):
    model = SquareNet(3).train(training)
    x, _ = square_images(2, 16, 3)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():  # a caller's no_grad must not stop it
        a = ie.grad_cam(model, model.layer, xt, torch.tensor([1, 1]))
    b = ie.grad_cam(model, model.layer, xt, torch.tensor([1, 1]))
    assert np.array_equal(a, b)  # eval mode inside: dropout off
    assert not model.layer._forward_hooks and not model.layer._backward_hooks
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None for p in model.parameters()) and xt.grad is None


def test_figures_are_pngs_with_a_row_per_image(tmp_path):
    x, square = square_images(3, 16, 3)
    maps = np.broadcast_to(square, (3, 16, 16)).astype(np.float32)
    heights = {}
    for n in (1, 3):
        for name, draw in (("overlay", ie.overlay_figure), ("shap", ie.shap_figure)):
            path = tmp_path / f"{name}_{n}.png"
            draw(x[:n], maps[:n] - 0.3, [f"image {i}" for i in range(n)], path)
            with Image.open(path) as im:
                assert im.format == "PNG"
                heights[name, n] = im.size[1]
    assert all(heights[name, 3] > 2 * heights[name, 1] for name in ("overlay", "shap"))
    gray = tmp_path / "gray.png"  # grayscale images too
    ie.overlay_figure(x[:2, ..., :1], maps[:2], ["a", "b"], gray)
    assert gray.stat().st_size > 0 and Image.open(gray).format == "PNG"
