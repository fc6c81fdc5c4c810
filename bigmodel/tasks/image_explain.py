"""Explanations for image classifiers (the ResNet family, but any model taking (N, C, H, W) floats
in [0, 1] and returning logits (N, K) will do), used by the task `image_cls`.

Two maps per image, because they fail differently and agreeing maps are worth more than either:
- SHAP (shap's Partition explainer over an Image masker): model-agnostic and additive, base +
  Σ values = p(predicted class) exactly, but it sees the model only through masked inputs.
  Hidden regions are replaced by a blurred copy of the image (side ≥ 16) or, for tiny images where
  a blur kernel would cover everything anyway, by the image's per-channel mean.
- Grad-CAM (Selvaraju et al., 2017): one forward and one backward pass, so cheap enough for every
  test image, but it reads only the last conv stage and sees only positive evidence.
Then the deletion score (does hiding the top pixels hurt p(predicted) more than hiding as many
random ones?) and figures. Conventions: images are float32 numpy (N, H, W, C) in [0, 1], C = 1 or
3; `predict(images_nhwc) -> probabilities (N, K)` is the callable SHAP sees; maps are (N, H, W).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.tasks.seq_cls import import_shap

Predict = Callable[[np.ndarray], np.ndarray]
BLUR_MIN_SIDE = 16  # below this a useful blur kernel covers the whole image: use the mean


def predictor(model: nn.Module, batch_size: int = 64) -> Predict:
    """`predict` for a torch classifier: NHWC numpy in [0, 1] → softmax probabilities (N, K)."""

    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2)  # NHWC → NCHW
        out = [model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])))
               .float().softmax(-1).numpy() for i in range(0, len(x), batch_size)]
        return np.concatenate(out)

    return predict


# --- SHAP -----------------------------------------------------------------------------------

def background(image: np.ndarray) -> np.ndarray:
    """What a hidden pixel becomes, for one (H, W, C) image. shap's own "blur(k, k)" mask value
    needs OpenCV, which this project does not install, so the same box blur (k ≈ side / 2, as in
    shap's ImageNet examples; mirrored borders like cv2's default) is done here with scipy and
    handed to the masker as an array. Tiny images get their per-channel mean instead."""
    h, w, _ = image.shape
    if min(h, w) < BLUR_MIN_SIDE:
        return np.broadcast_to(image.mean((0, 1)), image.shape).astype(np.float32)
    from scipy.ndimage import uniform_filter

    k = (min(h, w) // 2) | 1  # odd, so the box is centred on the pixel
    return uniform_filter(image, size=(k, k, 1), mode="mirror").astype(np.float32)


def shap_images(predict: Predict, images: np.ndarray, labels: list[str], max_evals: int, seed: int,
                batch_size: int = 64) -> Any:
    """SHAP values of p(predicted class), one shap.Explanation for all images.

    Layout: values (N, H, W, C, 1), base_values (N, 1), output_names (N, 1), data = images;
    the single output is each image's top class, argmax of predict(images) (what shap's
    `Explanation.argsort.flip[:1]` picks, given here as an explicit index so ties cannot make
    the two disagree). Only the top class, because (a) that is the map the report needs, (b) the
    Partition explainer expands the partition tree where the explained outputs change most, so
    with K outputs the budget goes to whichever class moves most, not the predicted one, and
    (c) all classes cost K times the memory (ImageNet: 1000 × 224 × 224 × 3 floats an image).
    Each (pixel, channel) is a feature: shap's partition tree splits rows and columns first and
    channels last. One explainer per image, because the background is per image (its blur)."""
    shap = import_shap()

    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:  # shap's Image masker needs the channel axis, even for grayscale
        raise ValueError(f"images must be (N, H, W, C), got {x.shape}")
    predicted = predict(x).argmax(1)
    values, base, names = [], [], []
    # the Partition explainer ignores `seed`: it breaks ties in its priority queue (which region
    # to split next) with np.random.randn. Ties that matter are rare, but seed the global
    # generator so they cannot change a map between runs, and put it back after
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        for image, cls in zip(x, predicted):
            masker = shap.maskers.Image(background(image), image.shape)
            explainer = shap.Explainer(predict, masker, output_names=labels,
                                       algorithm="partition")
            e = explainer(image[None], max_evals=max_evals, batch_size=batch_size,
                          outputs=np.array([int(cls)]), silent=True)
            values.append(e.values[0])
            base.append(np.asarray(e.base_values[0]).reshape(1))
            names.append([labels[int(cls)]])
    finally:
        np.random.set_state(state)
    return shap.Explanation(np.stack(values), base_values=np.stack(base), data=x,
                            output_names=np.array(names))


def _values(values: Any) -> np.ndarray:
    return np.asarray(getattr(values, "values", values))


def class_maps(values: Any, predicted: np.ndarray) -> np.ndarray:
    """(N, H, W): each image's attribution to its predicted class, summed over channels. Takes
    shap_images' top-class layout (…, 1) or an all-classes one (…, K), Explanation or array."""
    v = _values(values)
    rows = np.arange(len(v))
    picked = v[..., 0] if v.shape[-1] == 1 else v[rows, ..., np.asarray(predicted)]
    return picked.sum(-1)


def additivity_error(values: Any, predict: Predict, images: np.ndarray) -> float:
    """max |base + Σ values − f(x)| over images and explained outputs (SHAP's efficiency
    property). With one output it is the top class of predict(images), as in shap_images."""
    full = predict(np.asarray(images, dtype=np.float32))
    v = _values(values)
    total = np.asarray(values.base_values) + v.reshape(len(v), -1, v.shape[-1]).sum(1)
    target = full.max(1, keepdims=True) if v.shape[-1] == 1 else full
    return float(np.abs(total - target).max())


# --- Grad-CAM -------------------------------------------------------------------------------

def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor,
             target: torch.Tensor) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] for class `target` (N,) at `layer`'s output.

    w_k = spatial mean of d logit[target] / d A_k, cam = relu(Σ_k w_k A_k), upsampled
    bilinearly to the input and divided by its max (so 1 = strongest evidence in that image, and
    an image with no positive evidence stays all zero). A forward hook keeps A; the gradient
    comes from torch.autograd.grad rather than backward(), so parameters' .grad are never
    touched, and a ReLU(inplace=True) after the layer cannot break a module backward hook. The
    model runs in eval mode (BatchNorm on running stats, images independent) and every module's
    train/eval flag is restored, with the hook, even on error."""
    modes = {m: m.training for m in model.modules()}
    acts: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        model.eval()
        with torch.enable_grad():
            # an input that requires grad keeps the graph alive even for frozen parameters
            logits = model(x.detach().float().clone().requires_grad_(True))
            score = logits.gather(1, target.long().view(-1, 1).to(logits.device)).sum()
            a = acts[-1]  # the last call, if the layer runs more than once
            (grad,) = torch.autograd.grad(score, a)
        with torch.no_grad():
            cam = F.relu((grad.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            peak = cam.flatten(1).max(1).values.view(-1, 1, 1)
            cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    finally:
        handle.remove()
        for m, training in modes.items():
            m.train(training)
    return cam.float().cpu().numpy()


# --- faithfulness ---------------------------------------------------------------------------

def deletion_scores(predict: Predict, images: np.ndarray, maps: np.ndarray, predicted: np.ndarray,
                    fraction: float, seed: int, fill: float | np.ndarray) -> dict[str, float]:
    """Mean drop of p(predicted) when the top `fraction` of pixels by `maps` (all channels) are
    set to `fill` (a number, or per-channel values such as the train mean), beside the drop for
    as many random pixels. A faithful map makes the first drop bigger. Single pixels rather than
    regions: simple, and at the sizes explained here (≤ 224²) it is one forward pass each."""
    x = np.asarray(images, dtype=np.float32)
    n, h, w, c = x.shape
    k = max(1, int(round(fraction * h * w)))
    rng = np.random.default_rng(seed)
    fill_c = np.broadcast_to(np.asarray(fill, dtype=np.float32), (c,))
    top, rand = x.copy(), x.copy()
    for i in range(n):
        order = np.argsort(-np.asarray(maps[i]).ravel(), kind="stable")[:k]  # ties: first pixel
        top[i].reshape(h * w, c)[order] = fill_c
        rand[i].reshape(h * w, c)[rng.choice(h * w, size=k, replace=False)] = fill_c
    rows, cls = np.arange(n), np.asarray(predicted)
    p = [predict(batch)[rows, cls] for batch in (x, top, rand)]
    return {"deletion_drop_top": float(np.mean(p[0] - p[1])),
            "deletion_drop_random": float(np.mean(p[0] - p[2]))}


# --- figures --------------------------------------------------------------------------------

def _show(ax: Any, image: np.ndarray, **kw: Any) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, **kw)
    else:
        ax.imshow(np.clip(image, 0, 1), **kw)


def _grid(n: int):  # noqa: ANN202
    from bigmodel.tasks import plots  # sets the Agg backend

    fig, axes = plots.plt.subplots(n, 2, figsize=(5.0, 2.4 * n), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return plots.plt, fig, axes


def overlay_figure(images: np.ndarray, maps: np.ndarray, titles: list[str], path: Path,
                   cmap: str = "jet") -> None:
    """One PNG, a row per image: the image, then the map over it (alpha 0.5)."""
    plt, fig, axes = _grid(len(images))
    for i, (image, m) in enumerate(zip(images, maps)):
        _show(axes[i, 0], image)
        axes[i, 0].set_title(titles[i], fontsize=8)
        _show(axes[i, 1], image)
        axes[i, 1].imshow(m, cmap=cmap, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def shap_figure(images: np.ndarray, maps: np.ndarray, titles: list[str], path: Path) -> None:
    """One PNG, a row per image: the image, then its SHAP map (red raises p(predicted), blue
    lowers it) on a faint gray copy, its colour scale symmetric about 0 and set per row (the
    scale of SHAP values varies between images), as shap.image_plot does. Drawn here because
    image_plot draws into pyplot's global figure and takes maps per channel, not these."""
    plt, fig, axes = _grid(len(images))
    for i, (image, m) in enumerate(zip(images, maps)):
        _show(axes[i, 0], image)
        axes[i, 0].set_title(titles[i], fontsize=8)
        axes[i, 1].imshow(image.mean(-1), cmap="gray", vmin=0, vmax=1, alpha=0.2)
        lim = float(np.abs(m).max()) or 1.0
        im = axes[i, 1].imshow(m, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.8)
        fig.colorbar(im, ax=axes[i, 1], fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
