"""Image classification: the augmentation, the seeded sampler (under DDP and across a resume),
calibration, the served classifier's decoding, the trainer's per-parameter learning rates and
frozen parameters, and the objective's loss and evaluation."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from bigmodel.config import ImageFinetune, Optim
from bigmodel.errors import BigModelError
from bigmodel.models import registry
from bigmodel.models.resnet import ResNet, ResNetConfig
from bigmodel.objectives.image_cls import (Augment, ImageCls, ImageData, ImageSampler,
                                           array_data, make, score, to_float)
from bigmodel.tasks.image_cls import ImageClassifier, calibration, png_base64
from bigmodel.train.distributed import World
from bigmodel.train.trainer import Trainer, lr_at

# --- augmentation -----------------------------------------------------------------------------


def distinct_images(n: int, c: int = 2, side: int = 6, seed: int = 0) -> torch.Tensor:
    """(n, c, side, side) floats in [0.01, 1): no zero pixel, so padding is recognisable, and no
    two images (nor an image and its shifted or flipped self) alike."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g) * 0.99 + 0.01


def offsets_matching(out: torch.Tensor, x: torch.Tensor, p: int) -> list[tuple[int, int]]:
    """Every (dy, dx) shift, each within ±p, for which `out` is `x` moved by it with zeros
    entering from the side it moved away from."""
    H, W = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p))
    return [(oy - p, ox - p) for oy in range(2 * p + 1) for ox in range(2 * p + 1)
            if torch.equal(padded[:, oy:oy + H, ox:ox + W], out)]


@pytest.mark.parametrize("p", [1, 2])
def test_a_padded_crop_is_the_image_shifted_by_at_most_padding_with_zeros_entering(p):
    B = 300
    x = distinct_images(B)
    out = Augment(p, flip=False)(x, torch.Generator().manual_seed(1), B, slice(0, B))
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = []
    for b in range(B):
        found = offsets_matching(out[b], x[b], p)
        assert len(found) == 1, f"image {b}: {found}"  # one exact shift explains it
        shifts.append(found[0])
    assert all(abs(dy) <= p and abs(dx) <= p for dy, dx in shifts)
    # every shift in the square is drawn (25 of them for p = 2, over 300 images)
    assert set(shifts) == {(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)}
    # a shifted image has exactly as many zero (entered) rows / columns as its shift
    for b in range(B):
        dy, dx = shifts[b]
        assert int((out[b] == 0).all(0).all(1).sum()) == abs(dy)  # rows all zero
        assert int((out[b] == 0).all(0).all(0).sum()) == abs(dx)  # columns all zero


def test_no_padding_and_no_flip_is_the_identity_and_draws_nothing():
    x = distinct_images(16)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    out = Augment(0, flip=False)(x, gen, 16, slice(0, 16))
    assert torch.equal(out, x)
    assert torch.equal(gen.get_state(), state)  # the generator is left where it was


def test_flip_mirrors_about_half_of_a_large_batch_and_does_nothing_else():
    B = 4000
    x = distinct_images(B, side=5)
    out = Augment(0, flip=True)(x, torch.Generator().manual_seed(0), B, slice(0, B))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert not (same & mirrored).any()  # (no image is its own mirror)
    assert (same | mirrored).all()  # every image is itself or its left-right mirror
    assert 0.47 < mirrored.float().mean().item() < 0.53


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    x = distinct_images(64)
    aug = Augment(2, flip=True)

    def draw(seed: int) -> torch.Tensor:
        return aug(x, torch.Generator().manual_seed(seed), 64, slice(0, 64))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


# --- the sampler --------------------------------------------------------------------------------

def unique_data(n: int = 50, side: int = 6, c: int = 1) -> ImageData:
    """n uint8 images, each with its own pixel values (image i is filled from 4 i), labels i % 3."""
    pixels = np.stack([(np.arange(side * side * c).reshape(side, side, c) + 4 * i) % 251 + 1
                       for i in range(n)]).astype(np.uint8)  # (n, side, side, c), no zero
    return ImageData(pixels, np.arange(n) % 3, torch.device("cpu"))


def test_image_data_holds_uint8_channels_first_with_int64_labels():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 2), dtype=np.uint8)  # N H W C
    data = ImageData(pixels, [2, 0, 1, 1, 0], torch.device("cpu"))
    assert data.x.dtype == torch.uint8 and data.x.shape == (5, 2, 4, 3)  # N C H W
    assert torch.equal(data.x, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert data.y.dtype == torch.int64 and data.y.tolist() == [2, 0, 1, 1, 0] and len(data) == 5
    with pytest.raises(BigModelError, match="an image split is empty"):
        ImageData(pixels[:0], [], torch.device("cpu"))


def test_image_data_owns_its_pixels_even_when_given_a_read_only_table():
    from bigmodel.data import images

    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 1), dtype=np.uint8)
    table = pd.DataFrame({"pixels": [p.tobytes() for p in pixels], "channels": np.int8(1)})
    read_only = images.pixels_of(table, (5, 5, 1))  # a view of one immutable bytes object
    assert not read_only.flags.writeable
    data = ImageData(read_only, [0, 1, 0, 1], torch.device("cpu"))
    assert data.x.data_ptr() != read_only.ctypes.data  # a copy torch may write to


def test_sampled_batches_are_images_of_the_split_scaled_to_0_1_with_their_labels():
    data = unique_data()
    x, y = ImageSampler(data, 12, seed=0, augment=Augment(0, False))()
    assert x.shape == (12, 1, 6, 6) and x.dtype == torch.float32 and y.shape == (12,)
    floats = to_float(data.x)
    for b in range(12):
        k = [i for i in range(len(data)) if torch.equal(floats[i], x[b])]
        assert len(k) == 1 and data.y[k[0]] == y[b]  # a row of the split, with its own label


@pytest.mark.parametrize("padding, flip", [(0, False), (1, True), (2, False)])
def test_two_ranks_batches_together_are_the_one_process_batch(padding, flip):
    data = unique_data()
    aug = Augment(padding, flip)
    one = ImageSampler(data, 8, seed=5, augment=aug)
    ranks = [ImageSampler(data, 8, seed=5, augment=aug, world=World(rank=r, local_rank=r, size=2))
             for r in (0, 1)]
    for _ in range(5):  # consecutive calls stay in step
        x, y = one()
        parts = [sampler() for sampler in ranks]
        assert all(px.shape == (4, 1, 6, 6) for px, _ in parts)
        assert torch.equal(torch.cat([px for px, _ in parts]), x)
        assert torch.equal(torch.cat([py for _, py in parts]), y)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_naming_the_key():
    with pytest.raises(BigModelError, match=r"pretrain.resnet.batch_size = 9 does not split over "
                                            r"2 processes; use a multiple of 2"):
        ImageSampler(unique_data(), 9, 0, Augment(0, False), World(rank=1, size=2),
                     key="pretrain.resnet.batch_size")


def test_the_generator_state_resumes_the_same_batches_and_crops():
    data = unique_data()
    aug = Augment(1, flip=True)
    sampler = ImageSampler(data, 6, seed=11, augment=aug)
    sampler(), sampler()
    state = sampler.gen.get_state()
    want = [sampler() for _ in range(3)]
    resumed = ImageSampler(data, 6, seed=999, augment=aug)  # another seed: the state is all
    resumed.gen.set_state(state)
    got = [resumed() for _ in range(3)]
    for (wx, wy), (gx, gy) in zip(want, got):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)
    assert not torch.equal(ImageSampler(data, 6, 999, aug)()[0], want[0][0])


# --- calibration --------------------------------------------------------------------------------

def test_expected_calibration_error_of_a_hand_built_case():
    probs = np.array([
        [0.95, 0.03, 0.02],  # confident, right   → bin (0.9, 1.0]
        [0.95, 0.04, 0.01],  # confident, wrong   → bin (0.9, 1.0]
        [0.05, 0.85, 0.10],  # right              → bin (0.8, 0.9]
        [0.35, 0.45, 0.20],  # wrong              → bin (0.4, 0.5]
        [0.25, 0.20, 0.55],  # right              → bin (0.5, 0.6]
    ])
    actual = np.array([0, 1, 1, 0, 2])
    ece, rows = calibration(probs, actual, bins=10)
    # by hand: Σ (bin share) × |accuracy − confidence|
    #   (0.9, 1]: 2/5 × |0.5 − 0.95| = 0.18      (0.8, 0.9]: 1/5 × |1 − 0.85| = 0.03
    #   (0.4, 0.5]: 1/5 × |0 − 0.45| = 0.09      (0.5, 0.6]: 1/5 × |1 − 0.55| = 0.09
    assert ece == pytest.approx(0.18 + 0.03 + 0.09 + 0.09)
    assert [r["count"] for r in rows] == [1, 1, 1, 2]  # empty bins are left out
    assert [(r["low"], r["high"]) for r in rows] == [pytest.approx((lo, lo + 0.1))
                                                    for lo in (0.4, 0.5, 0.8, 0.9)]
    assert [r["accuracy"] for r in rows] == [0.0, 1.0, 1.0, 0.5]
    assert [r["confidence"] for r in rows] == pytest.approx([0.45, 0.55, 0.85, 0.95])


def test_calibration_bins_hold_every_prediction_once_with_its_confidence_inside():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 4)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    actual = rng.integers(0, 4, 500)
    for bins in (15, 7):
        ece, rows = calibration(probs, actual, bins=bins)
        assert len(rows) <= bins and sum(r["count"] for r in rows) == 500
        for r in rows:
            assert r["high"] - r["low"] == pytest.approx(1 / bins)
            assert r["low"] < r["confidence"] <= r["high"]
        weighted = sum(r["count"] / 500 * abs(r["accuracy"] - r["confidence"]) for r in rows)
        assert ece == pytest.approx(weighted) and 0 <= ece <= 1
    assert len(calibration(probs, actual)[1]) <= 15  # ECE_BINS by default


def test_perfect_calibration_has_zero_error_and_confident_mistakes_the_most():
    probs = np.array([[0.75, 0.125, 0.125]] * 4 + [[1.0, 0.0, 0.0]] * 2)
    actual = np.array([0, 0, 0, 1, 0, 0])  # 3 of the 4 at 0.75 right, the sure ones right
    assert calibration(probs, actual)[0] == pytest.approx(0.0, abs=1e-12)
    assert calibration(np.array([[1.0, 0.0]] * 3), np.array([1, 1, 1]))[0] == pytest.approx(1.0)


# --- the served classifier ------------------------------------------------------------------------

LABELS = ["a", "b", "c"]


def classifier_dir(tmp_path, in_channels: int = 1):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    cfg = ResNetConfig(n_classes=3, layers=[1], width=4, stem="small", in_channels=in_channels,
                       image_size=8)
    directory = tmp_path / f"resnet{in_channels}"
    registry.save(ResNet(cfg), directory, "resnet", "image_cls", cfg, {"labels": LABELS})
    return directory


def encoded(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def rgb_picture(w: int = 20, h: int = 13, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_decode_resizes_and_converts_as_pillow_does(tmp_path):
    gray = ImageClassifier.load(classifier_dir(tmp_path, 1))
    assert (gray.size, gray.channels, gray.labels) == (8, 1, LABELS)
    pic = rgb_picture()
    want = np.asarray(pic.convert("L").resize((8, 8), Image.Resampling.BILINEAR))[..., None]
    out = gray.decode([encoded(pic), "data:image/png;base64," + encoded(pic)])
    assert out.shape == (2, 8, 8, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], want)
    np.testing.assert_array_equal(out[1], want)  # a data: URL is read the same

    rgb = ImageClassifier.load(classifier_dir(tmp_path, 3))
    small_gray = Image.fromarray(np.arange(25, dtype=np.uint8).reshape(5, 5) * 10)
    out = rgb.decode([encoded(small_gray, "JPEG"), png_base64(np.asarray(pic))])
    assert out.shape == (2, 8, 8, 3)
    assert (out[0, ..., 0] == out[0, ..., 1]).all() and (out[0, ..., 1] == out[0, ..., 2]).all()
    np.testing.assert_array_equal(out[1], np.asarray(pic.resize((8, 8), Image.Resampling.BILINEAR)))


def test_predict_gives_a_label_of_the_model_and_probabilities_summing_to_one(tmp_path):
    clf = ImageClassifier.load(classifier_dir(tmp_path))
    pictures = [encoded(rgb_picture(seed=s)) for s in range(4)]
    out = clf.predict(pictures)
    assert list(out.columns) == ["label", "p_a", "p_b", "p_c"] and len(out) == 4
    probs = out[["p_a", "p_b", "p_c"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert out["label"].isin(LABELS).all()
    assert out["label"].tolist() == [LABELS[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(probs, clf.predict_proba(clf.decode(pictures)), atol=1e-7)
    # the same pixels given as uint8 or as floats in [0, 1] score alike
    pixels = clf.decode(pictures)
    np.testing.assert_allclose(clf.predict_proba(pixels.astype(np.float32) / 255), probs, atol=1e-6)
    assert len(clf.predict([])) == 0


@pytest.mark.parametrize("bad, message", [
    ("this is not base64!", "image 1: not base64 (send PNG / JPEG bytes, base64 encoded)"),
    (base64.b64encode(b"plain text, no picture").decode(),
     "image 1: not a readable image (22 bytes; PNG or JPEG expected)"),
])
def test_a_bad_image_is_a_one_line_error_naming_its_index(tmp_path, bad, message):
    clf = ImageClassifier.load(classifier_dir(tmp_path))
    with pytest.raises(BigModelError) as err:
        clf.predict([encoded(rgb_picture()), bad])
    assert str(err.value) == message


def test_a_model_of_another_task_is_not_loaded_as_an_image_classifier(tmp_path):
    torch.manual_seed(0)
    cfg = ResNetConfig(n_classes=3, layers=[1], width=4, stem="small", in_channels=1, image_size=8)
    registry.save(ResNet(cfg), tmp_path / "m", "resnet", "seq_cls", cfg, {"labels": LABELS})
    with pytest.raises(BigModelError, match="a seq_cls model, not an image classifier"):
        ImageClassifier.load(tmp_path / "m")


# --- the trainer: a learning rate per parameter, frozen parameters ------------------------------

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.body(x)))  # tanh: no dead units, every gradient non-zero


OPT = Optim(lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1, grad_clip=0.0,
            device="cpu")
X = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 2


def backbone_quarter(name: str) -> float:
    return 1.0 if name.startswith("fc.") else 0.25


def fit(trainer: Trainer) -> None:
    trainer.fit(lambda: (X, Y), lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
                evaluate=lambda: {}, eval_interval=1000, log=lambda m, s: None, log_interval=1000,
                tokens_per_step=16, progress=False)


def names_by_param(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def test_each_parameter_group_gets_the_scheduled_lr_times_its_scale():
    torch.manual_seed(0)
    model = Toy()
    trainer = Trainer(model, OPT, max_steps=5, lr_scale=backbone_quarter)
    fit(trainer)
    names = names_by_param(model)
    seen = []
    for group in trainer.optimizer.param_groups:
        members = [names[id(p)] for p in group["params"]]
        scale = {backbone_quarter(n) for n in members}
        decay = {p.dim() >= 2 for p in group["params"]}
        assert len(scale) == 1 and len(decay) == 1  # a group is one scale and one decay
        assert group["lr_scale"] == scale.pop()
        assert group["lr"] == pytest.approx(lr_at(4, OPT, 5) * group["lr_scale"])  # last step's
        assert group["weight_decay"] == (OPT.weight_decay if decay.pop() else 0.0)
        seen += members
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())  # each one, once
    assert len(trainer.optimizer.param_groups) == 4  # {matrices, vectors} × {1, 0.25}


def test_a_scaled_parameter_really_moves_by_the_scaled_lr():
    torch.manual_seed(0)
    model = Toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, OPT, max_steps=1, lr_scale=backbone_quarter)
    fit(trainer)  # one AdamW step: each element moves by lr × sign(gradient), after the decay
    lr0 = lr_at(0, OPT, 1)
    for n, p in model.named_parameters():
        lr = lr0 * backbone_quarter(n)
        decayed = before[n] * (1 - lr * (OPT.weight_decay if p.dim() >= 2 else 0.0))
        step = (p.detach() - decayed).abs()
        torch.testing.assert_close(step, torch.full_like(step, lr), rtol=1e-3, atol=0,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_frozen_parameters_are_left_out_of_the_optimizer_and_do_not_move():
    torch.manual_seed(0)
    model = Toy()
    model.body[0].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, OPT, max_steps=4, lr_scale=backbone_quarter)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    names = names_by_param(model)
    assert {names[i] for i in in_optimizer} == {"body.1.weight", "body.1.bias", "fc.weight",
                                                "fc.bias"}
    fit(trainer)
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (n not in ("body.0.weight", "body.0.bias")), n


def test_all_parameters_frozen_is_an_error():
    model = Toy().requires_grad_(False)
    with pytest.raises(BigModelError, match=r"finetune@x: no parameter to train \(all are frozen\)"):
        Trainer(model, OPT, max_steps=2, label="finetune@x")


def test_the_image_finetune_scales_the_backbone_and_a_frozen_backbone_trains_the_head_alone():
    from bigmodel.stages.finetune import image_model

    train = pd.DataFrame({"label": ["3", "1", "2", "1"]})
    for frozen, groups in ((False, {1.0, 0.1}), (True, {1.0})):
        torch.manual_seed(0)
        backbone = ResNet(ResNetConfig(n_classes=10, layers=[1], width=4, stem="small",
                                       in_channels=1, image_size=8))
        spec = ImageFinetune(base="resnet", backbone_lr_scale=0.1, freeze_backbone=frozen,
                             classes=["1", "3"], device="cpu")
        model, labels, info, lr_scale = image_model(backbone, {"arch": {}}, spec, "x", train)
        assert labels == ["1", "3"] and model.fc.out_features == 2 and info["labels"] == labels
        assert lr_scale("fc.weight") == 1.0 and lr_scale("stages.0.0.conv1.weight") == 0.1
        trainer = Trainer(model, spec, 3, lr_scale=lr_scale)
        assert {g["lr_scale"] for g in trainer.optimizer.param_groups} == groups
        n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
        want = model.num_params() if not frozen else sum(p.numel() for p in model.fc.parameters())
        assert n_opt == want


# --- the objective ------------------------------------------------------------------------------

def tiny_resnet(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(ResNetConfig(n_classes=3, layers=[1], width=4, stem="small", in_channels=1,
                               image_size=6))


def objective(smoothing: float, padding: int = 0) -> ImageCls:
    spec = ImageFinetune(base="resnet", label_smoothing=smoothing, batch_size=10,
                         augment={"crop_padding": padding, "flip": False})
    data = unique_data(60)
    val = unique_data(21)
    return ImageCls(spec, data, val, LABELS, seed=0)


def test_label_smoothing_changes_the_loss_as_cross_entropy_defines_it():
    model = tiny_resnet().eval()
    plain, smooth = objective(0.0), objective(0.1)
    batch = plain.next_batch()
    assert torch.equal(batch[0], smooth.next_batch()[0])  # one seed: the same batch
    with torch.no_grad():
        logits = model(batch[0])
        l0, l1 = plain.loss(model, batch), smooth.loss(model, batch)
    assert l0.item() == pytest.approx(F.cross_entropy(logits, batch[1]).item(), rel=1e-6)
    assert l1.item() == pytest.approx(F.cross_entropy(logits, batch[1], label_smoothing=0.1).item(),
                                      rel=1e-6)
    logp = logits.log_softmax(-1)
    nll = -logp.gather(1, batch[1][:, None]).mean()
    uniform = -logp.mean()  # the cross-entropy against the uniform distribution
    assert l1.item() == pytest.approx((0.9 * nll + 0.1 * uniform).item(), rel=1e-5)
    assert abs(l1.item() - l0.item()) > 1e-4


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_scores_the_val_split_and_leaves_the_model_in_its_mode(training):
    model = tiny_resnet(1).train(training)
    obj = objective(0.1, padding=1)
    running = model.stem[1].running_mean.clone()
    metrics = obj.evaluate(model)
    assert model.training is training
    assert torch.equal(model.stem[1].running_mean, running)  # scored in eval mode throughout
    assert set(metrics) == {"val_loss", "val_accuracy", "val_macro_f1", "train_eval_loss",
                            "train_accuracy"}
    with torch.no_grad():
        logits = model.eval()(to_float(obj.val.x))
    assert metrics["val_loss"] == pytest.approx(F.cross_entropy(logits, obj.val.y).item(), rel=1e-5)
    accuracy = (logits.argmax(-1) == obj.val.y).float().mean().item()
    assert metrics["val_accuracy"] == pytest.approx(accuracy)
    predicted, actual = logits.argmax(-1), obj.val.y
    f1 = []  # per class 2TP / (2TP + FP + FN), 0 for a class never predicted right
    for c in range(len(LABELS)):
        tp = int(((predicted == c) & (actual == c)).sum())
        wrong = int(((predicted == c) != (actual == c)).sum())  # FP + FN
        f1.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
    assert metrics["val_macro_f1"] == pytest.approx(sum(f1) / len(f1))
    assert score(model, obj.val, LABELS, batch_size=4) == pytest.approx(
        score(model, obj.val, LABELS, batch_size=256))  # batching does not change a score


def test_the_finetune_objective_reads_prepared_tables_of_its_labels_only():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (9, 5, 5, 1), dtype=np.uint8)
    table = pd.DataFrame({"pixels": [p.tobytes() for p in pixels], "label": list("xyzxyzxyz"),
                          "group": [f"g{i}" for i in range(9)], "channels": np.int8(1)})
    spec = ImageFinetune(base="resnet", batch_size=4)
    obj = make(spec, table, table, None, ["x", "z"], 0, torch.device("cpu"))
    keep = [i for i, label in enumerate("xyzxyzxyz") if label != "y"]
    assert len(obj) == 6
    assert torch.equal(obj.train.x, torch.from_numpy(pixels[keep]).permute(0, 3, 1, 2))
    assert obj.train.y.tolist() == [0, 1, 0, 1, 0, 1]  # x → 0, z → 1


def test_the_pretrain_arrays_are_restricted_to_the_runs_classes_and_reindexed(tmp_path):
    pixels = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2, 1)
    np.save(tmp_path / "train_images.npy", pixels)
    np.save(tmp_path / "train_labels.npy", np.array([0, 1, 2, 3, 1, 3]))
    data = array_data(tmp_path, "train", ["0", "1", "2", "3"], ["1", "3"], torch.device("cpu"))
    assert data.y.tolist() == [0, 1, 0, 1]
    assert torch.equal(data.x, torch.from_numpy(pixels[[1, 3, 4, 5]]).permute(0, 3, 1, 2))
