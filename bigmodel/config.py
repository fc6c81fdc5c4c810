"""The schema of params.yaml: load, override (`--set a.b=v`), validate, all before any work.

Stage kinds whose instances differ only by their params are named runs: `data.<name>`,
`tokenizer.<name>`, `pretrain.<name>`, `finetune.<name>` are dicts of runs, which dvc.yaml
expands with `foreach` into one stage per run (`pretrain@bert`). A run names the runs it builds
on (a pretrain run its corpus and tokenizer, a finetune run its base model and labelled data),
and a name that does not exist is refused here, in one line, before any work.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      model_validator)

from bigmodel.errors import BigModelError

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # a run name: a path part, a DVC key, a model name
SPLIT_NAMES = ("train", "val", "test")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Paths(Section):
    """Where each stage kind writes (a run's outputs go in a folder named after it); relative
    paths are resolved against the params file's folder."""

    data: str = "data"  # <data run>/source.json, <data run>/prepared/
    tokenizer: str = "models/tokenizer"  # <tokenizer run>/tokenizer.json
    tokens: str = "data/tokens"  # <pretrain run>/{train,val,test}.bin
    pretrain: str = "models/pretrain"
    # <pretrain run>/: what `--resume` continues from. Not a DVC output (DVC deletes a stage's
    # outputs before it runs it, and its cache need not hold optimizer state), so a retried
    # stage still finds it.
    checkpoints: str = "models/checkpoints"
    finetune: str = "models/finetune"
    evaluate: str = "reports/evaluate"
    explain: str = "reports/explain"
    metrics: str = "reports/metrics"  # <stage kind>/<run>.json: what `dvc metrics show` lists
    plots: str = "reports/plots"  # <stage kind>/<run>.csv: what `dvc plots show` renders


class Tracking(Section):
    uri: str = ""  # empty: sqlite file mlflow.db in the project folder
    experiment: str = Field("bigmodel", min_length=1)
    model_prefix: str = Field("bigmodel-", min_length=1)  # registered as <prefix><run name>


# --- data runs ------------------------------------------------------------------------------

class FilesSource(Section):
    glob: str = ""  # txt / csv / tsv / jsonl / CoNLL files, e.g. "data/raw/*.jsonl"
    # A fixed split: one glob per split (`{train: a/*.csv, val: b.csv, test: c.csv}`), kept as
    # given instead of `glob`.
    splits: dict[Literal["train", "val", "test"], str] = {}
    # conll: a token a line, tag in the last column; aligned: line i of each matched (source)
    # file pairs with line i of the file named like it with `target_suffix` (train.en / train.de)
    format: Literal["auto", "conll", "aligned"] = "auto"
    text_column: str = "text"
    label_column: str = ""  # empty: no sequence-classification set
    source_column: str = ""  # with target_column: each row is a (source, target) pair (seq2seq)
    target_column: str = ""
    target_suffix: str = ""  # format aligned: the target file's suffix (train.en → train.de: de)
    group_column: str = ""  # rows sharing a group stay in one split; empty: split by text
    split_column: str = ""  # a column naming each row's split (train, val / dev, test)


class HFSource(Section):
    name: str = ""  # hub id, or a local folder written by `save_to_disk` / holding data files
    config: str | None = None
    revision: str | None = None
    split: str = "train"
    text_column: str = "text"
    label_column: str = ""
    group_column: str = ""
    # (source, target) pairs: two columns, or two keys of a dict column (a translation
    # dataset's `translation.en` / `translation.de`)
    source_column: str = ""
    target_column: str = ""


class DataRun(Section):
    """One dataset: a pretraining corpus and the labelled tasks it carries. The built-in text
    one (the Python stdlib) carries a sequence-classification task (docstring → package
    family), a token-classification task (the names in a line of code → what they denote) and
    a sequence-to-sequence task (a function's code → its docstring's summary line). A data run
    of kind image is an ImageDataRun."""

    kind: Literal["text"] = "text"
    source: Literal["builtin", "files", "hf"] = "builtin"
    files: FilesSource = FilesSource()
    hf: HFSource = HFSource()
    min_chars: int = Field(32, ge=1)  # pretraining documents shorter/longer than this are dropped
    max_chars: int = Field(200_000, ge=1)
    label_min_chars: int = Field(20, ge=1)  # labelled texts likewise
    label_max_chars: int = Field(1_000, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_per_class: int = Field(700, ge=0)  # cap of labelled *training* examples per class (0: none)
    max_tagged: int = Field(6000, ge=0)  # cap of tagged *training* sentences (0: none)
    tag_max_words: int = Field(48, ge=4)  # longer tagged sentences are dropped
    # the built-in pairs: bytecode (a function → its CPython bytecode) | docstring (a function
    # → its docstring's summary line)
    builtin_pairs: Literal["bytecode", "docstring"] = "bytecode"
    pair_min_chars: int = Field(1, ge=1)  # (source, target) pairs: each side at least this long
    pair_max_chars: int = Field(1_000, ge=1)  # and at most this long, else the pair is dropped
    pair_max_ratio: float = Field(0.0, ge=0)  # longer side / shorter side in characters (0: off)

    @model_validator(mode="after")
    def _check(self) -> "DataRun":
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must not exceed max_chars")
        if self.label_min_chars > self.label_max_chars:
            raise ValueError("label_min_chars must not exceed label_max_chars")
        if self.pair_min_chars > self.pair_max_chars:
            raise ValueError("pair_min_chars must not exceed pair_max_chars")
        if 0 < self.pair_max_ratio < 1:
            raise ValueError("pair_max_ratio is longer side / shorter side: 0 (off) or >= 1")
        _check_where(self.source, self.files, self.hf)
        for where, src in (("files", self.files), ("hf", self.hf)):
            if bool(src.source_column) != bool(src.target_column):
                raise ValueError(f"{where}.source_column and {where}.target_column go together "
                                 f"(a pair)")
        if (self.files.format == "aligned") != bool(self.files.target_suffix):
            raise ValueError("files.format 'aligned' and files.target_suffix go together "
                             "(train.en pairs with train.<target_suffix>)")
        return self

    def tasks(self) -> set[str]:
        """The labelled tasks this dataset provides."""
        if self.source == "builtin":
            return {"seq_cls", "token_cls", "seq2seq"}
        if self.source == "files":
            if self.files.format == "conll":
                return {"token_cls"}
            if self.files.format == "aligned":
                return {"seq2seq"}
            return ({"seq_cls"} if self.files.label_column else set()) | (
                {"seq2seq"} if self.files.source_column else set())
        return ({"seq_cls"} if self.hf.label_column else set()) | (
            {"seq2seq"} if self.hf.source_column else set())


class ImageFiles(Section):
    # PNG / JPEG files, each in a folder named after its class: "data/raw/pets/*/*.jpg"
    glob: str = ""
    # or the user's fixed split, kept as given: {train: "pets/train/*/*", val: ..., test: ...}
    splits: dict[Literal["train", "val", "test"], str] = {}


class ImageHF(Section):
    name: str = ""  # hub id, or a local folder (`save_to_disk`, or an imagefolder layout)
    config: str | None = None
    revision: str | None = None
    # a dataset with train, validation and test splits keeps them as given; else this one split
    # is split into train / val / test
    split: str = "train"
    image_column: str = "image"  # a datasets Image feature (or PNG / JPEG bytes)
    label_column: str = "label"  # a ClassLabel (its names are the labels) or strings


class ImageDataRun(Section):
    """A data run of images with one task, image classification. The built-in one is
    scikit-learn's 1,797 handwritten digits (8 × 8, gray: shipped inside the package, so no
    download); files are an image folder (one subfolder per class); hf an image dataset.
    `prepare` decodes every image once into uint8 pixel rows; unreadable files are counted."""

    kind: Literal["image"] = "image"
    source: Literal["builtin", "files", "hf"] = "builtin"
    files: ImageFiles = ImageFiles()
    hf: ImageHF = ImageHF()
    size: int = Field(0, ge=0, le=1024)  # every image resized to size × size; 0: the source's own
    # (the digits: 8; files and hf: 32)
    color: Literal["auto", "gray", "rgb"] = "auto"  # auto: gray for the digits, else rgb
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    max_per_class: int = Field(0, ge=0)  # cap of *training* images per class (0: none)

    @model_validator(mode="after")
    def _check(self) -> "ImageDataRun":
        _check_where(self.source, self.files, self.hf)
        return self

    def tasks(self) -> set[str]:
        return {"image_cls"}


def _check_where(source: str, files: FilesSource | ImageFiles, hf: HFSource | ImageHF) -> None:
    """What a data run of either kind needs of where its data is."""
    if source == "files" and not (files.glob or files.splits):
        raise ValueError("source 'files' needs files.glob (or files.splits)")
    if files.glob and files.splits:
        raise ValueError("files.glob and files.splits exclude each other (splits: one glob per "
                         "split, kept as given)")
    if files.splits and set(files.splits) != set(SPLIT_NAMES):
        raise ValueError(f"files.splits needs a glob for each of train, val, test "
                         f"(got {', '.join(sorted(files.splits))})")
    if source == "hf" and not hf.name:
        raise ValueError("source 'hf' needs hf.name")


def _data_kind(value: Any) -> str:
    return (value.get("kind", "text") if isinstance(value, dict) else getattr(value, "kind", "text"))


DataSpec = Annotated[Union[Annotated[DataRun, Tag("text")], Annotated[ImageDataRun, Tag("image")]],
                     Discriminator(_data_kind)]
DATA_KINDS: dict[str, type[Section]] = {"text": DataRun, "image": ImageDataRun}


# --- tokenizer runs -------------------------------------------------------------------------

class TokenizerRun(Section):
    # bpe: byte-level BPE (GPT); wordpiece: BERT's, with [CLS] [SEP] [MASK] [PAD] [UNK];
    # char: one token per character of the train split (nanoGPT's setup); image: the image
    # processor (the picture side, fitted on train images: their size, channels and the
    # per-channel mean and spread a ResNet normalises its input with)
    kind: Literal["bpe", "wordpiece", "char", "image"] = "bpe"
    data: str = "stdlib"  # the data run whose train split it is trained on
    # which table of it: pretrain (the documents) | seq2seq (both sides of the pairs: a joint
    # vocabulary for source and target) | image_cls (the images of an image data run)
    text: Literal["pretrain", "seq2seq", "image_cls"] = "pretrain"
    vocab_size: int = Field(4096, ge=260, le=1 << 20)  # bpe / wordpiece
    min_frequency: int = Field(2, ge=1)
    # bpe: what merges never cross. bytelevel: GPT-2's words, each with the space before it;
    # code: names, numbers, punctuation marks and whitespace apart (a name tokenizes the same
    # after a space, a dot or a bracket: what a seq2seq model copies from source to target)
    pieces: Literal["bytelevel", "code"] = "bytelevel"

    @model_validator(mode="after")
    def _check(self) -> "TokenizerRun":
        if self.pieces != "bytelevel" and self.kind != "bpe":
            raise ValueError(f"pieces: {self.pieces} is a bpe setting; a {self.kind} tokenizer "
                             "has its own pre-tokenizer (leave pieces at bytelevel)")
        if (self.kind == "image") != (self.text == "image_cls"):
            raise ValueError("kind 'image' and text 'image_cls' go together (an image processor "
                             "is fitted on the images of an image data run)")
        return self


class Tokenize(Section):
    batch_size: int = Field(1024, ge=1)  # documents per encode_batch call


# --- training runs --------------------------------------------------------------------------

class Optim(Section):
    """What every training stage shares: optimiser, schedule, device."""

    lr: float = Field(1e-3, gt=0, le=1)
    min_lr: float = Field(1e-4, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    grad_accum: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Matrix-product precision. bf16: on CUDA, bf16 autocast over fp32 weights; on a CPU with
    # native bf16 units (AVX512-BF16, AMX), bf16 weights and activations with an fp32 master
    # copy that the optimizer updates (a CPU without them falls back to fp32, saying so).
    # auto: bf16 on CUDA, fp32 on the CPU. fp32: fp32 everywhere.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False


class Loop(Optim):
    """What every pretraining run has: its data, its length, its logging and checkpoints."""

    corpus: str = "stdlib"  # the data run it trains on
    max_steps: int = Field(600, ge=1)
    eval_interval: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1)
    log_interval: int = Field(10, ge=1)
    checkpoint_interval: int = Field(250, ge=1)
    # Under torchrun: ddp (a full replica per process) or fsdp (parameters, gradients and
    # optimizer state sharded over the processes, for a model that does not fit one device).
    # One process ignores it.
    parallel: Literal["ddp", "fsdp"] = "ddp"


class PretrainBase(Loop):
    """A transformer's shape."""

    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    block_size: int = Field(128, ge=8)
    lr: float = Field(3e-3, gt=0, le=1)
    min_lr: float = Field(3e-4, ge=0, le=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> "PretrainBase":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class GPTPretrain(PretrainBase):
    """A decoder-only transformer trained to predict the next token."""

    family: Literal["gpt"] = "gpt"
    objective: Literal["clm"] = "clm"
    tokenizer: str = "bpe"
    max_steps: int = Field(400, ge=1)


class BERTPretrain(PretrainBase):
    """An encoder trained on masked tokens (and, with mlm+nsp, on next-sentence prediction)."""

    family: Literal["bert"] = "bert"
    objective: Literal["mlm"] = "mlm"
    nsp: bool = False  # also train next-sentence prediction on [CLS] (sentence pairs)
    tokenizer: str = "wordpiece"
    norm: Literal["post", "pre"] = "post"  # post: the original BERT layout
    dropout: float = Field(0.1, ge=0, lt=1)
    max_steps: int = Field(400, ge=1)
    lr: float = Field(2e-3, gt=0, le=1)
    min_lr: float = Field(2e-4, ge=0, le=1)
    # post-norm at 2e-3 after 50 warm-up steps can stay stuck on the unigram plateau for the
    # whole run (measured: benchmarks/RESULTS.md); 150 steps got out of it
    warmup_steps: int = Field(150, ge=0)
    beta2: float = Field(0.98, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(32, ge=1)
    mask_rate: float = Field(0.15, gt=0, lt=1)  # of the tokens, chosen for the loss

    @model_validator(mode="after")
    def _no_fsdp(self) -> "BERTPretrain":
        if self.parallel == "fsdp":
            raise ValueError("parallel = 'fsdp' is for GPT: BERT's MLM and NSP heads run outside "
                             "the sharded forward pass; use parallel: ddp")
        return self


class Seq2SeqPretrain(PretrainBase):
    """The encoder-decoder Transformer trained on (source, target) pairs: teacher-forced,
    label-smoothed cross-entropy; decoded by beam search (the decoding keys are the served
    model's defaults)."""

    family: Literal["seq2seq"] = "seq2seq"
    objective: Literal["seq2seq"] = "seq2seq"
    tokenizer: str = "joint"
    n_layer: int = Field(3, ge=1)  # encoder blocks
    n_decoder_layer: int = Field(3, ge=1)
    norm: Literal["pre", "post"] = "pre"  # post: the 2017 paper's layout
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    # copy source tokens as well as generate them (See et al., 2017); false: the paper's model
    copy_attention: bool = True
    dropout: float = Field(0.1, ge=0, lt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)  # pairs
    max_steps: int = Field(400, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    min_lr: float = Field(3e-4, ge=0, le=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    beam_size: int = Field(4, ge=1)  # 1: greedy
    length_penalty: float = Field(0.6, ge=0)  # GNMT's alpha: ((5 + length) / 6) ** alpha
    coverage_penalty: float = Field(0.2, ge=0)  # GNMT's beta: ignoring source tokens costs
    max_len_a: float = Field(1.2, ge=0)  # the longest output: a × source tokens + b
    max_len_b: int = Field(10, ge=1)


class Augment(Section):
    """Augmentation of image batches, in torch on the device, from the sampler's seeded
    generator (so a resumed run draws the same crops and flips)."""

    crop_padding: int = Field(1, ge=0)  # random crop back to size after padding by this (0: off)
    flip: bool = False  # random horizontal flips: for photos, not for digits or text


class ImageModel(Section):
    """What a ResNet run and an image finetune share: the label set and how images are fed."""

    classes: list[str] = []  # the labels it is trained on (the others' images are left out); []: all
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: Augment = Augment()


class ResNetPretrain(Loop, ImageModel):
    """A ResNet (He et al., 2015) trained to classify the images of a data run of kind image:
    the vision side's pretraining, whose backbone a finetune run takes to another label set."""

    family: Literal["resnet"] = "resnet"
    objective: Literal["image_cls"] = "image_cls"
    corpus: str = "digits"
    tokenizer: str = "pixels"  # an image processor run (tokenizer kind: image)
    # resnet18 | resnet34 | resnet50 (the ImageNet networks: block and layers from the paper);
    # empty: block and layers below
    preset: Literal["", "resnet18", "resnet34", "resnet50"] = ""
    block: Literal["basic", "bottleneck"] = "basic"
    layers: list[int] = Field(default_factory=lambda: [1, 1, 1], min_length=1, max_length=6)
    width: int = Field(16, ge=4)  # channels of the first stage; each next stage doubles them
    stem: Literal["small", "imagenet"] = "small"  # small: 3×3 conv, no pooling (small images)
    batch_size: int = Field(64, ge=1)
    max_steps: int = Field(300, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    min_lr: float = Field(3e-4, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    beta2: float = Field(0.99, ge=0, lt=1)
    eval_interval: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _no_fsdp(self) -> "ResNetPretrain":
        if self.parallel == "fsdp":
            raise ValueError("parallel = 'fsdp' shards transformer blocks; a ResNet this size "
                             "fits one device: use parallel: ddp")
        if any(n < 1 for n in self.layers):
            raise ValueError(f"layers {self.layers}: every stage needs at least one block")
        return self


PretrainRun = Annotated[Union[GPTPretrain, BERTPretrain, Seq2SeqPretrain, ResNetPretrain],
                        Field(discriminator="family")]
FAMILY_RUNS: dict[str, type[Loop]] = {"gpt": GPTPretrain, "bert": BERTPretrain,
                                      "seq2seq": Seq2SeqPretrain, "resnet": ResNetPretrain}
# which tokenizer kinds a family can read: BERT needs [CLS] [SEP] [MASK]; GPT an end-of-text
# token; the encoder-decoder <|bos|> and <|endoftext|>; a ResNet an image processor
FAMILY_TOKENIZERS = {"gpt": ("bpe", "char"), "bert": ("wordpiece",), "seq2seq": ("bpe", "char"),
                     "resnet": ("image",)}


class FinetuneBase(Optim):
    base: str  # the pretrain run whose model it starts from
    data: str = "stdlib"  # the data run whose labelled set (for `task`) it trains on
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    min_lr: float = Field(1e-4, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    dropout: float = Field(0.1, ge=0, lt=1)


class ImageFinetune(FinetuneBase, ImageModel):
    """A pretrained ResNet's backbone with a new classifier for this run's label set."""

    task: Literal["image_cls"] = "image_cls"
    data: str = "digits"
    freeze_backbone: bool = False  # true: only the new classifier trains (a linear probe)
    backbone_lr_scale: float = Field(1.0, gt=0, le=1)  # the backbone's LR is lr × this
    from_scratch: bool = False  # the base's architecture with fresh weights: the no-transfer control
    max_per_class: int = Field(0, ge=0)  # train on at most this many images a class (0: all)
    epochs: int = Field(15, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class FinetuneRun(FinetuneBase):
    task: Literal["seq_cls", "token_cls"] = "seq_cls"
    # how token states become one vector (seq_cls): the [CLS] state, BERT's pooler over it
    # (dense + tanh: Hugging Face's BertForSequenceClassification), the mean over real tokens,
    # or the last real token's; auto: cls for BERT, mean for GPT
    pooling: Literal["auto", "cls", "pooler", "mean", "last"] = "auto"
    max_len: int = Field(128, ge=4)


def _finetune_kind(value: Any) -> str:
    task = value.get("task", "seq_cls") if isinstance(value, dict) else getattr(value, "task", "")
    return "image" if task == "image_cls" else "text"


# A finetune run's keys follow its task: an image classifier's are not a text one's. (The text
# side defaults to seq_cls, so a run without a task still validates as one.)
FinetuneSpec = Annotated[Union[Annotated[FinetuneRun, Tag("text")],
                               Annotated[ImageFinetune, Tag("image")]],
                         Discriminator(_finetune_kind)]
FINETUNE_KINDS: dict[str, type[FinetuneBase]] = {"text": FinetuneRun, "image": ImageFinetune}


class Evaluate(Section):
    eval_tokens: int = Field(200_000, ge=0)  # LM tokens scored per split (0: all)
    eval_batches: int = Field(50, ge=1)  # MLM batches scored on the test split
    batch_size: int = Field(32, ge=1)


class Explain(Section):
    n_examples: int = Field(4, ge=1, le=200)
    max_evals: int = Field(300, ge=10)
    max_len: int = Field(64, ge=4)


class Serving(Section):
    """What a served model accepts (bigmodel/serving.py): a request past one of these is
    answered HTTP 400 naming the limit, before any model code runs. They are logged with each
    model (its serving.json), so a served model keeps the limits it was registered with."""

    max_rows: int = Field(64, ge=1)  # texts / prompts / sources / images in one request
    max_text_chars: int = Field(4000, ge=1)  # characters in one text, prompt or source
    max_new_tokens: int = Field(256, ge=1)  # a request's max_new_tokens (GPT and seq2seq)
    max_beam_size: int = Field(8, ge=1)  # a seq2seq request's beam_size
    max_image_bytes: int = Field(1_000_000, ge=1)  # one decoded PNG / JPEG (image_cls)


class Promote(Section):
    """The champion gate run by the flows after the stages (not a DVC stage: it moves aliases).
    Each registered model is scored by its task's metric on the test split: macro-F1 for a
    classifier, entity F1 for a tagger, bits per byte for a GPT, BLEU for a seq2seq model."""

    alias: str = Field("champion", min_length=1)
    margin: float = Field(0.01, ge=0, le=1)  # needed gain in F1 to move the alias
    margin_bpb: float = Field(0.01, ge=0)  # GPT: needed drop in test bits per byte
    margin_bleu: float = Field(0.5, ge=0)  # seq2seq: needed gain in test BLEU
    lm_eval_bytes: int = Field(200_000, ge=1_000)  # test text the GPTs are scored on


def _default_tokenizers() -> dict[str, TokenizerRun]:
    return {"bpe": TokenizerRun(kind="bpe"), "wordpiece": TokenizerRun(kind="wordpiece"),
            "joint": TokenizerRun(kind="bpe", text="seq2seq", pieces="code", vocab_size=2048),
            "pixels": TokenizerRun(kind="image", data="digits", text="image_cls")}


def _default_finetunes() -> dict[str, FinetuneRun | ImageFinetune]:
    return {
        "gpt-cls": FinetuneRun(base="gpt", task="seq_cls", pooling="mean", epochs=2,
                               precision="bf16"),
        "bert-cls": FinetuneRun(base="bert", task="seq_cls", pooling="pooler", precision="bf16"),
        "bert-tag": FinetuneRun(base="bert", task="token_cls", epochs=2, max_len=64,
                                precision="bf16"),
        "resnet-cls": ImageFinetune(base="resnet"),
    }


# The built-in images: the backbone learns digits 0-4; the finetune run takes it to all ten
# (a new classifier; five of its classes the backbone never saw)
DIGITS_PRETRAIN = ["0", "1", "2", "3", "4"]


class Params(Section):
    seed: int = 1337
    paths: Paths = Paths()
    tracking: Tracking = Tracking()
    data: dict[str, DataSpec] = Field(default_factory=lambda: {
        "stdlib": DataRun(), "digits": ImageDataRun()})
    tokenizer: dict[str, TokenizerRun] = Field(default_factory=_default_tokenizers)
    tokenize: Tokenize = Tokenize()
    pretrain: dict[str, PretrainRun] = Field(
        # the built-in transformers train in bf16 (measured 1.3-1.5x a step on the CPU, the same
        # loss at equal steps: benchmarks/RESULTS.md); the ResNet keeps fp32 batch-norm steps
        default_factory=lambda: {"gpt": GPTPretrain(precision="bf16"),
                                 "bert": BERTPretrain(precision="bf16"),
                                 "seq2seq": Seq2SeqPretrain(precision="bf16"),
                                 "resnet": ResNetPretrain(classes=DIGITS_PRETRAIN)})
    finetune: dict[str, FinetuneSpec] = Field(default_factory=_default_finetunes)
    evaluate: Evaluate = Evaluate()
    explain: Explain = Explain()
    promote: Promote = Promote()
    serving: Serving = Serving()

    _root: Path = Path(".")

    @model_validator(mode="after")
    def _runs_refer_to_runs(self) -> "Params":
        for section in ("data", "tokenizer", "pretrain", "finetune"):
            for name in getattr(self, section):
                if not NAME.match(name):
                    raise ValueError(f"{section}.{name}: a run name is lowercase letters, digits, "
                                     f"'-' and '_', starting with a letter or digit")
        for name, tok in self.tokenizer.items():
            _must_name(self.data, tok.data, f"tokenizer.{name}.data", "data run")
        for name in set(self.pretrain) & set(self.finetune):
            raise ValueError(f"pretrain.{name} and finetune.{name} share a name: both would "
                             f"explain into {self.paths.explain}/{name}; rename one")
        for name, run in self.pretrain.items():
            _must_name(self.data, run.corpus, f"pretrain.{name}.corpus", "data run")
            _must_name(self.tokenizer, run.tokenizer, f"pretrain.{name}.tokenizer", "tokenizer run")
            kind, allowed = self.tokenizer[run.tokenizer].kind, FAMILY_TOKENIZERS[run.family]
            if kind not in allowed:
                raise ValueError(f"pretrain.{name}.tokenizer = {run.tokenizer!r} is a {kind} "
                                 f"tokenizer; a {run.family} model reads {' or '.join(allowed)}")
            if run.family == "resnet" and "image_cls" not in self.data[run.corpus].tasks():
                raise ValueError(f"pretrain.{name}.corpus = {run.corpus!r} is a text data run; a "
                                 f"ResNet trains on images (a data run with kind: image)")
            if run.family == "seq2seq":
                text = self.tokenizer[run.tokenizer].text
                if text != "seq2seq":
                    raise ValueError(f"pretrain.{name}.tokenizer = {run.tokenizer!r} is trained "
                                     f"on {text} text; a seq2seq model needs a joint vocabulary "
                                     f"(a tokenizer run with text: seq2seq)")
                if "seq2seq" not in self.data[run.corpus].tasks():
                    raise ValueError(f"pretrain.{name}.corpus = {run.corpus!r} has no (source, "
                                     f"target) pairs (see the README: parallel text)")
        for name, tok in self.tokenizer.items():
            if (tok.kind == "image") != (self.data[tok.data].kind == "image"):
                raise ValueError(f"tokenizer.{name}: a {tok.kind} tokenizer on data run "
                                 f"{tok.data!r} of kind {self.data[tok.data].kind}: images take "
                                 f"an image processor (kind: image), text the others")
            if tok.text == "seq2seq" and "seq2seq" not in self.data[tok.data].tasks():
                raise ValueError(f"tokenizer.{name}.text = 'seq2seq': data run {tok.data!r} has "
                                 f"no (source, target) pairs")
        for name, ft in self.finetune.items():
            _must_name(self.pretrain, ft.base, f"finetune.{name}.base", "pretrain run")
            _must_name(self.data, ft.data, f"finetune.{name}.data", "data run")
            if ft.task not in self.data[ft.data].tasks():
                has = ", ".join(sorted(self.data[ft.data].tasks())) or "none"
                raise ValueError(f"finetune.{name}.task = {ft.task!r}: data run {ft.data!r} has "
                                 f"no such labelled set (it has: {has})")
            image_base = self.pretrain[ft.base].family == "resnet"
            if image_base != (ft.task == "image_cls"):
                raise ValueError(f"finetune.{name}: task {ft.task!r} on pretrain.{ft.base}, a "
                                 f"{self.pretrain[ft.base].family} model: image_cls finetunes a "
                                 f"ResNet, and a ResNet finetunes to image_cls only")
            if isinstance(ft, ImageFinetune):
                continue
            block = self.pretrain[ft.base].block_size  # type: ignore[union-attr]
            if ft.max_len > block:
                raise ValueError(f"finetune.{name}.max_len ({ft.max_len}) exceeds the block_size "
                                 f"of pretrain.{ft.base} ({block})")
        return self

    @property
    def root(self) -> Path:
        return self._root

    def path(self, kind: str, name: str = "") -> Path:
        """Absolute path of a stage kind's output folder, or of one run's (`name`)."""
        p = Path(getattr(self.paths, kind))
        p = p if p.is_absolute() else (self._root / p).resolve()
        return p / name if name else p

    def metrics_file(self, kind: str, name: str) -> Path:
        return self.path("metrics") / kind / f"{name}.json"

    def plot_file(self, kind: str, name: str) -> Path:
        return self.path("plots") / kind / f"{name}.csv"

    def registered_name(self, run: str) -> str:
        return f"{self.tracking.model_prefix}{run}"

    def value(self, key: str) -> Any:
        """The JSON value of a dotted key (`pretrain.bert.lr`, `seed`)."""
        node: Any = self.model_dump(mode="json")
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise BigModelError(f"params: no key {key!r}")
            node = node[part]
        return node

    def keys_hash(self, keys: list[str]) -> str:
        data = {k: self.value(k) for k in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _must_name(runs: Mapping[str, Any], name: str, key: str, what: str) -> None:
    if name not in runs:
        have = ", ".join(sorted(runs)) or "none"
        raise ValueError(f"{key} = {name!r}: no such {what} (have: {have})")


def pick_run(runs: Mapping[str, Any], name: str | None, section: str) -> str:
    """The run a command means: `name`, or the only run there is."""
    if not runs:
        raise BigModelError(f"{section}: params.yaml has no such run")
    if name is None:
        if len(runs) == 1:
            return next(iter(runs))
        raise BigModelError(f"{section}: several runs ({', '.join(sorted(runs))}); name one "
                            f"with --name")
    if name not in runs:
        raise BigModelError(f"{section}.{name}: no such run (have: {', '.join(sorted(runs))})")
    return name


def load(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; any problem is a BigModelError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise BigModelError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BigModelError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise BigModelError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    params = validate(raw, source=str(path))
    check_spelled_out(raw, source=str(path))
    params._root = path.resolve().parent
    return params


# The keys of a run that dvc.yaml builds the run's stages from (`${item.corpus}` in a dep path):
# DVC reads them from the file itself, so a file must name them even where the schema has a default.
SPELLED_OUT = {"tokenizer": ("data", "text"), "pretrain": ("family", "objective", "corpus", "tokenizer"),
               "finetune": ("base", "task", "data")}


def check_spelled_out(raw: dict[str, Any], source: str) -> None:
    for section, keys in SPELLED_OUT.items():
        for name, run in (raw.get(section) or {}).items():
            missing = [k for k in keys if k not in (run or {})]
            if missing:
                raise BigModelError(
                    f"{source}: {section}.{name}.{missing[0]}: missing; dvc.yaml builds this run's "
                    f"stages from it, so write it out (a {section} run names "
                    f"{', '.join(keys)})")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` (value parsed as YAML) to the raw params dict."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise BigModelError(f"--set {item!r}: expected section.key=value")
    _set(raw, key.strip(), yaml.safe_load(value) if value.strip() else "", f"--set {item!r}")


def _set(raw: dict[str, Any], key: str, value: Any, what: str) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BigModelError(f"{what}: {part!r} is not a section")
    node[leaf] = value


def backup_of(path: Path) -> Path:
    return path.with_name(path.name + ".bigmodel-backup")


@contextmanager
def overridden(path: str | Path, overrides: Mapping[str, Any] | None) -> Iterator[Params]:
    """The params file with `overrides` ({"pretrain.gpt.max_steps": 200}; string values parsed
    as YAML, like --set) written into it for the duration, so that DVC records exactly the
    values the stages used. The original text is kept beside it and put back afterwards, even on
    failure; a backup left by a killed run stops the next one instead of being overwritten."""
    path = Path(path)
    backup = refuse_leftover_backup(path)
    params = load(path)
    if not overrides:
        yield params
        return
    raw = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        if not isinstance(key, str) or not key.strip():
            raise BigModelError(f"override {key!r}: expected a 'section.key' name")
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else ""
        _set(raw, key.strip(), value, f"override {key!r}")
    params = validate(raw, source=f"{path} with overrides")
    check_spelled_out(raw, source=f"{path} with overrides")
    params._root = path.resolve().parent
    original = path.read_text()
    backup.write_text(original)
    try:
        path.write_text("# written by a run with overrides; the original is put back after it\n"
                        + yaml.safe_dump(raw, sort_keys=False))
        yield params
    finally:
        path.write_text(original)
        backup.unlink()


def refuse_leftover_backup(path: Path) -> Path:
    """The backup path of a params file; a BigModelError if a killed run left one (the file
    then holds that run's overrides, which no run should take for the user's params)."""
    backup = backup_of(path)
    if backup.exists():
        raise BigModelError(f"{backup} exists: an earlier run with overrides was interrupted; "
                            f"put it back with `mv {backup} {path}` (or delete it) first")
    return backup


def validate(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise BigModelError(f"{source}: {_describe(e.errors()[0], raw)}") from None


RUN_SECTIONS = {"tokenizer": TokenizerRun}


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections: its message names the keys
        return msg
    if len(loc) >= 3 and ((loc[0] == "pretrain" and loc[2] in FAMILY_RUNS)
                          or (loc[0] == "finetune" and loc[2] in FINETUNE_KINDS)
                          or (loc[0] == "data" and loc[2] in DATA_KINDS)):
        del loc[2]  # the union's tag (the family, the kind of task), not a key the user wrote
    key = ".".join(loc) or "(top level)"
    if err["type"] == "union_tag_not_found":
        return f"{key}.family: missing (one of {', '.join(FAMILY_RUNS)})"
    if err["type"] == "union_tag_invalid":
        return (f"{key}.family: {err['input'].get('family')!r} is not a model family "
                f"(one of {', '.join(FAMILY_RUNS)})")
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(loc[:-1], raw))
        return f"unknown key '{key}' (allowed here: {allowed})"
    if err["type"] == "missing":
        return f"{key}: missing (a required key)"
    if err["type"] == "literal_error":
        return f"{key} = {err['input']!r}: {msg}"
    if "input" in err and not isinstance(err["input"], dict):
        return f"{key} = {err['input']!r}: {msg}"
    return f"{key}: {msg}"


def _fields_at(loc: list[str], raw: dict[str, Any]) -> list[str]:
    """The keys allowed at `loc` (for an unknown-key message)."""
    model: type[BaseModel] = Params
    rest = loc
    if loc and loc[0] in RUN_SECTIONS and len(loc) >= 2:
        model, rest = RUN_SECTIONS[loc[0]], loc[2:]
    elif loc and loc[0] == "pretrain" and len(loc) >= 2:
        family = (raw.get("pretrain") or {}).get(loc[1], {}).get("family", "gpt")
        model, rest = FAMILY_RUNS.get(family, GPTPretrain), loc[2:]
    elif loc and loc[0] == "data" and len(loc) >= 2:
        model, rest = DATA_KINDS[_data_kind((raw.get("data") or {}).get(loc[1], {}))], loc[2:]
    elif loc and loc[0] == "finetune" and len(loc) >= 2:
        run = (raw.get("finetune") or {}).get(loc[1], {})
        model, rest = FINETUNE_KINDS[_finetune_kind(run)], loc[2:]
    for part in rest:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)
