"""`bigmodel export`: each exported model loads offline with transformers' from_pretrained (or
onnxruntime), gives our logits within 1e-4 on inputs of its own tokenizer, and runs in a
transformers pipeline; what has no faithful counterpart is refused in one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bigmodel import config, export
from bigmodel.errors import BigModelError
from bigmodel.models import heads, registry
from bigmodel.text.tokenizers import encode_texts
from tests.conftest import REPO, save_tiny_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

LABELS = ["asyncio", "files", "gui"]
TAGS = ["O", "B-FUNC", "I-FUNC", "B-PARAM", "I-PARAM"]
TEXTS = ["def add(a, b): return a + b", "open the file and read every line",
         "class Queue: a first-in, first-out queue"]


def perturb(directory: Path) -> None:
    """Every tensor of the saved model made to matter: zero biases, unit norms, zero-initialised
    residual branches and fresh BatchNorm statistics would hide a mapping mistake."""
    info = registry.read_config(directory)
    model = registry.build(info["family"], info["arch"])
    if info["task"] in ("seq_cls", "token_cls"):
        model = heads.with_head(model, info)
    registry.load_weights(model, directory)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    registry.save(model, directory, info["family"], info["task"],
                  registry.arch_config(info["family"], info["arch"]),
                  {k: v for k, v in info.items() if k not in ("family", "task", "arch")})


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> config.Params:  # noqa: ANN001
    from bigmodel.text.tokenizers import train_bpe, train_wordpiece

    root = tmp_path_factory.mktemp("export")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    params = config.load(root / "params.yaml")
    texts = [f"{t} # {i}" for i in range(40) for t in TEXTS]
    bpe = train_bpe(iter(texts), vocab_size=300, min_frequency=1)
    wordpiece = train_wordpiece(iter(texts), vocab_size=300, min_frequency=1)
    folders = {
        ("pretrain", "gpt"): (bpe, "gpt", "clm", None, "mean"),
        ("pretrain", "bert"): (wordpiece, "bert", "mlm", None, "mean"),
        ("pretrain", "seq2seq"): (bpe, "seq2seq", "seq2seq", None, "mean"),
        ("finetune", "gpt-cls"): (bpe, "gpt", "seq_cls", LABELS, "mean"),
        ("finetune", "bert-cls"): (wordpiece, "bert", "seq_cls", LABELS, "pooler"),
        ("finetune", "bert-tag"): (wordpiece, "bert", "token_cls", TAGS, "mean"),
    }
    for (section, name), (tok, family, task, labels, pooling) in folders.items():
        save_tiny_model(params.path(section, name), tok, family, task, labels, pooling)
        if task != "seq2seq":
            perturb(params.path(section, name))
    for section, name, stem in (("pretrain", "resnet", "small"),
                                ("finetune", "resnet-cls", "imagenet")):
        torch.manual_seed(0)
        arch = registry.arch_config("resnet", {"n_classes": 3, "block": "bottleneck" if stem ==
                                               "imagenet" else "basic", "layers": [1, 2],
                                               "width": 4, "stem": stem, "in_channels": 1,
                                               "image_size": 32, "mean": [0.3], "std": [0.2]})
        folder = params.path(section, name)
        registry.save(registry.build("resnet", arch), folder, "resnet", "image_cls", arch,
                      {"labels": LABELS})
        perturb(folder)
    return params


def exported(project, name: str, fmt: str, tmp_path: Path) -> Path:  # noqa: ANN001
    out = tmp_path / f"{name}-{fmt}"
    line = export.export(project, name, fmt, out)
    assert line.startswith(f"export@{name}: ") and "logits within" in line
    return out


def ours(project, name: str):  # noqa: ANN001, ANN201
    section = "pretrain" if name in project.pretrain else "finetune"
    return export.load(project.path(section, name))


def test_gpt_goes_out_as_gpt2_and_generates_what_we_generate(project, tmp_path):  # noqa: ANN001
    from bigmodel.tasks.clm import TextGenerator

    out = exported(project, "gpt", "hf", tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf.config.activation_function == "gelu" and hf.config.tie_word_embeddings
    model, _, our_tok = ours(project, "gpt")
    for text in TEXTS:
        ids = tok(text)["input_ids"]  # the text's tokens, no end-of-text appended
        assert ids == our_tok.encode(text, add_special_tokens=False).ids
        with torch.no_grad():
            want = model(torch.tensor([ids]))[0]
            got = hf(torch.tensor([ids])).logits
        assert torch.allclose(got, want, atol=1e-4)
    # the tied matrix is stored once, with safetensors' pt metadata
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
    generate = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out))
    text = generate(TEXTS[0], max_new_tokens=6, do_sample=False)[0]["generated_text"]
    local = TextGenerator.load(project.path("pretrain", "gpt")).complete(TEXTS[0], 6, 0.0)
    assert text == TEXTS[0] + local


def test_bert_goes_out_as_bert_for_masked_lm(project, tmp_path):  # noqa: ANN001
    out = exported(project, "bert", "hf", tmp_path)
    hf = transformers.BertForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    model, _, our_tok = ours(project, "bert")
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    ids, lengths = encode_texts(our_tok, TEXTS, 32)
    assert batch["input_ids"].tolist() == ids.tolist()  # [CLS] ... [SEP], right-padded
    with torch.no_grad():
        got = hf(**batch).logits
        want = model.mlm_logits(model.hidden(torch.from_numpy(ids), torch.from_numpy(lengths)))
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-4)
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out))
    assert len(fill("open the [MASK] and read", top_k=3)) == 3


def test_bert_classifier_and_tagger_go_out_with_their_labels_and_classify_as_ours(  # noqa: ANN001
        project, tmp_path):
    from bigmodel.tasks.seq_cls import TextClassifier
    from bigmodel.tasks.token_cls import Tagger

    out = exported(project, "bert-cls", "hf", tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert cfg["label2id"] == {label: i for i, label in enumerate(LABELS)}
    classify = transformers.pipeline("text-classification", model=str(out), tokenizer=str(out))
    local = TextClassifier.load(project.path("finetune", "bert-cls")).predict(TEXTS)
    for got, (_, want) in zip(classify(TEXTS), local.iterrows()):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want[f"p_{want['label']}"], abs=1e-4)

    out = exported(project, "bert-tag", "hf", tmp_path)
    tag = transformers.pipeline("token-classification", model=str(out), tokenizer=str(out),
                                aggregation_strategy="none")
    model, info, our_tok = ours(project, "bert-tag")
    ids, lengths = encode_texts(our_tok, TEXTS, 24)
    with torch.no_grad():
        labels = model(torch.from_numpy(ids), torch.from_numpy(lengths)).argmax(-1)
    for row, entities in enumerate(tag(TEXTS)):
        tagged = {e["index"]: e["entity"] for e in entities}
        for pos in range(1, int(lengths[row]) - 1):  # the text's tokens, [CLS] and [SEP] aside
            assert tagged.get(pos, "O") == TAGS[int(labels[row, pos])], (row, pos)
    assert Tagger.load(project.path("finetune", "bert-tag"))  # still ours, untouched


def test_an_imagenet_stem_resnet_goes_out_as_resnet_for_image_classification(project, tmp_path):  # noqa: ANN001
    out = exported(project, "resnet-cls", "hf", tmp_path)
    hf = transformers.ResNetForImageClassification.from_pretrained(out, local_files_only=True)
    # a gray model goes out taking the RGB transformers' image pipelines always hand it
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.3] * 3 and processor["image_std"] == [0.2] * 3
    assert hf.config.num_channels == 3
    model, _, _ = ours(project, "resnet-cls")
    x = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(3))  # another side
    with torch.no_grad():
        got = hf.eval()(pixel_values=((x - 0.3) / 0.2).expand(-1, 3, -1, -1)).logits
        assert torch.allclose(got, model(x), atol=1e-4)
        rgb = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(5))
        luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        got = hf(pixel_values=(rgb - 0.3) / 0.2).logits  # colour: ours on its luma
        assert torch.allclose(got, model(luma), atol=1e-4)
    # the image processor's config does what our server does: from the same image file, the
    # same label and probability
    from PIL import Image

    from bigmodel.tasks.image_cls import ImageClassifier, png_base64

    pixels = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    classify = transformers.pipeline("image-classification", model=str(out))
    served = ImageClassifier.load(project.path("finetune", "resnet-cls")).predict(
        [png_base64(p) for p in pixels])
    for img, (_, want) in zip(pixels, served.iterrows()):
        [best] = classify(Image.fromarray(img[..., 0], mode="L"), top_k=1)
        assert best["label"] == want["label"]
        assert best["score"] == pytest.approx(want[f"p_{want['label']}"], abs=1e-4)


@pytest.mark.parametrize("name", ["gpt-cls", "bert-cls", "bert-tag", "resnet", "resnet-cls"])
def test_onnx_files_answer_as_ours_at_other_batch_and_sequence_sizes(project, tmp_path, name):  # noqa: ANN001
    from bigmodel.export.onnx import run

    out = exported(project, name, "onnx", tmp_path)
    model, info, tok = ours(project, name)
    assert (out / "model.onnx").is_file()
    assert json.loads((out / "labels.json").read_text()) == list(info["labels"])
    if info["task"] == "image_cls":
        inputs = {"pixels": torch.rand(5, 1, 24, 24, generator=torch.Generator().manual_seed(4))}
        with torch.no_grad():
            want = model(inputs["pixels"]).numpy()
    else:
        texts = [*TEXTS, "x", "a longer text of several more words than the others, to pad"]
        ids, lengths = encode_texts(tok, texts, 24)
        inputs = {"input_ids": torch.from_numpy(ids), "lengths": torch.from_numpy(lengths)}
        with torch.no_grad():
            want = model(inputs["input_ids"], inputs["lengths"]).numpy()
        assert (out / "tokenizer.json").is_file()
    got = run(out / "model.onnx", inputs)
    one = run(out / "model.onnx", {k: v[:1] for k, v in inputs.items()})  # a batch of one
    assert np.abs(one - got[:1]).max() < 1e-4
    if info["task"] == "token_cls":
        real = (np.arange(ids.shape[1])[None, :] < lengths[:, None])
        got, want = got[real], want[real]
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("name, fmt, says", [
    ("seq2seq", "hf", "the encoder-decoder has no faithful Hugging Face counterpart"),
    ("gpt-cls", "hf", "GPT2ForSequenceClassification scores the last token"),
    ("resnet", "hf", "with the 'small' stem"),
    ("gpt", "onnx", "--format onnx exports classifiers, taggers and ResNets"),
    ("nope", "hf", "no pretrain or finetune run named 'nope'"),
])
def test_what_has_no_faithful_counterpart_is_refused_and_nothing_is_written(  # noqa: ANN001
        project, tmp_path, name, fmt, says):
    out = tmp_path / "out"
    with pytest.raises(BigModelError, match=says.replace("(", r"\(").replace(")", r"\)")):
        export.export(project, name, fmt, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_bert_classifier_pooling_its_raw_cls_state_is_refused_naming_the_fix(project, tmp_path):  # noqa: ANN001
    from bigmodel.text.tokenizers import load

    folder = project.path("finetune", "bert-cls")
    other = tmp_path / "raw-cls"
    save_tiny_model(other, load(folder / "tokenizer.json"), "bert", "seq_cls", LABELS, "cls")
    model, info, tok = export.load(other)
    from bigmodel.export import hf

    with pytest.raises(BigModelError, match="finetune with pooling: pooler to export it"):
        hf.convert(model, info, tok)


def test_the_command_refuses_a_used_folder_in_one_line_and_exports_into_a_new_one(project, tmp_path):  # noqa: ANN001
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    cmd = [sys.executable, "-m", "bigmodel.cli", "export", "bert-tag", "--format", "onnx",
           "--params", str(project.root / "params.yaml")]
    proc = subprocess.run([*cmd, "--out", str(used)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "exists and is not an empty folder" in proc.stderr
    assert (used / "keep.txt").read_text() == "mine" and len(list(used.iterdir())) == 1
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "new")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "model.onnx (bert token_cls)" in proc.stdout and (tmp_path / "new" / "model.onnx").is_file()
