"""Hugging Face `transformers` counterparts of bigmodel's models, weight for weight.

Each converter builds the transformers model from a bigmodel folder's config, fills every one of
its tensors from ours (strict: nothing left at its random init, nothing of ours dropped), and
returns it with the tokenizer or image processor it reads. What has no faithful counterpart
raises a BigModelError saying why, and what to do instead.

The layouts, and what the mapping has to mind:

- GPT → GPT2LMHeadModel (GPT2ForTokenClassification for a tagger). GPT-2's Conv1D stores its
  weights transposed (in, out); our bias-free linears and LayerNorms get zero biases; our MLP's
  GELU is the exact one, `activation_function: "gelu"` (GPT-2's default is the tanh
  approximation); the output head is tied to the token embeddings, as GPT-2's.
- BERT (post-norm only: Hugging Face's BERT is post-norm) → BertForMaskedLM,
  BertForSequenceClassification (pooling `pooler`: the [CLS] state through dense + tanh, then
  the classifier) and BertForTokenClassification. Our fused qkv splits into query, key, value;
  `layer_norm_eps` is torch's 1e-5, not BERT's 1e-12.
- ResNet with the ImageNet stem (7x7/2 conv, 3x3/2 max-pool) → ResNetForImageClassification:
  the same basic and bottleneck blocks (the bottleneck strides on its 3x3, Hugging Face's
  `downsample_in_bottleneck: false`), projection shortcuts where the shape changes. Our model
  normalises pixels itself; the exported image processor does it there (rescale 1/255, then the
  train split's mean and std). A gray model goes out taking RGB, Pillow's luma weights folded
  into its first convolution, since transformers' image pipelines always hand it RGB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bigmodel.errors import BigModelError
from bigmodel.text.tokenizers import EOT, PAD, UNK

LN_EPS = 1e-5  # torch's nn.LayerNorm default, which every bigmodel norm uses


def _bias(linear: nn.Module, size: int) -> torch.Tensor:
    b = getattr(linear, "bias", None)
    return b.detach().clone() if b is not None else torch.zeros(size)


def _w(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _labels(info: dict[str, Any]) -> dict[str, Any]:
    labels = list(info.get("labels") or [])
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}} if labels else {}


# --- GPT ---

def gpt_config(arch: dict[str, Any], tokenizer: Any, **extra: Any) -> Any:
    from transformers import GPT2Config

    eot, pad = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
    return GPT2Config(
        vocab_size=arch["vocab_size"], n_positions=arch["block_size"], n_embd=arch["n_embd"],
        n_layer=arch["n_layer"], n_head=arch["n_head"], n_inner=4 * arch["n_embd"],
        activation_function="gelu", resid_pdrop=arch.get("dropout", 0.0),
        embd_pdrop=arch.get("dropout", 0.0), attn_pdrop=0.0, layer_norm_epsilon=LN_EPS,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=pad, tie_word_embeddings=True, **extra)


def gpt_body(gpt: nn.Module, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    C = gpt.cfg.n_embd
    sd = {f"{prefix}wte.weight": _w(gpt.wte.weight), f"{prefix}wpe.weight": _w(gpt.wpe.weight)}
    for i, b in enumerate(gpt.blocks):
        p = f"{prefix}h.{i}."
        for ours, theirs in ((b.ln_1, "ln_1"), (b.ln_2, "ln_2")):
            sd[f"{p}{theirs}.weight"], sd[f"{p}{theirs}.bias"] = _w(ours.weight), _bias(ours, C)
        for ours, theirs in ((b.attn.qkv, "attn.c_attn"), (b.attn.proj, "attn.c_proj"),
                             (b.mlp.fc, "mlp.c_fc"), (b.mlp.proj, "mlp.c_proj")):
            sd[f"{p}{theirs}.weight"] = _w(ours.weight).T.contiguous()  # Conv1D: (in, out)
            sd[f"{p}{theirs}.bias"] = _bias(ours, ours.out_features)
    sd[f"{prefix}ln_f.weight"], sd[f"{prefix}ln_f.bias"] = _w(gpt.ln_f.weight), _bias(gpt.ln_f, C)
    return sd


# --- BERT ---

def bert_config(arch: dict[str, Any], **extra: Any) -> Any:
    from transformers import BertConfig

    if arch.get("norm", "post") != "post":
        raise BigModelError("a pre-norm BERT (norm: pre) has no Hugging Face counterpart: "
                            "transformers' BERT is post-norm; train with norm: post to export "
                            "it, or use --format onnx for a finetuned one")
    return BertConfig(
        vocab_size=arch["vocab_size"], hidden_size=arch["n_embd"],
        num_hidden_layers=arch["n_layer"], num_attention_heads=arch["n_head"],
        intermediate_size=4 * arch["n_embd"], hidden_act="gelu",
        hidden_dropout_prob=arch.get("dropout", 0.0), attention_probs_dropout_prob=0.0,
        max_position_embeddings=arch["block_size"], type_vocab_size=arch["type_vocab_size"],
        layer_norm_eps=LN_EPS, pad_token_id=arch.get("pad_id", 0), **extra)


def bert_body(bert: nn.Module, pooler: nn.Linear | None = None) -> dict[str, torch.Tensor]:
    C = bert.cfg.n_embd
    e = "bert.embeddings."
    sd = {f"{e}word_embeddings.weight": _w(bert.wte.weight),
          f"{e}position_embeddings.weight": _w(bert.wpe.weight),
          f"{e}token_type_embeddings.weight": _w(bert.wse.weight),
          f"{e}LayerNorm.weight": _w(bert.ln_emb.weight), f"{e}LayerNorm.bias": _bias(bert.ln_emb, C)}
    for i, b in enumerate(bert.blocks):
        p = f"bert.encoder.layer.{i}."
        qkv, qkv_b = _w(b.attn.qkv.weight), _bias(b.attn.qkv, 3 * C)
        for j, name in enumerate(("query", "key", "value")):
            sd[f"{p}attention.self.{name}.weight"] = qkv[j * C:(j + 1) * C].contiguous()
            sd[f"{p}attention.self.{name}.bias"] = qkv_b[j * C:(j + 1) * C].contiguous()
        for ours, theirs in ((b.attn.proj, "attention.output.dense"),
                             (b.mlp.fc, "intermediate.dense"), (b.mlp.proj, "output.dense")):
            sd[f"{p}{theirs}.weight"] = _w(ours.weight)
            sd[f"{p}{theirs}.bias"] = _bias(ours, ours.out_features)
        for ours, theirs in ((b.ln_1, "attention.output.LayerNorm"), (b.ln_2, "output.LayerNorm")):
            sd[f"{p}{theirs}.weight"], sd[f"{p}{theirs}.bias"] = _w(ours.weight), _bias(ours, C)
    if pooler is not None:
        sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"] = (_w(pooler.weight),
                                                                       _w(pooler.bias))
    return sd


def bert_mlm_head(bert: nn.Module) -> dict[str, torch.Tensor]:
    C, p = bert.cfg.n_embd, "cls.predictions."
    bias = _bias(bert.mlm_decoder, bert.cfg.vocab_size)
    return {f"{p}transform.dense.weight": _w(bert.mlm_dense.weight),
            f"{p}transform.dense.bias": _bias(bert.mlm_dense, C),
            f"{p}transform.LayerNorm.weight": _w(bert.mlm_ln.weight),
            f"{p}transform.LayerNorm.bias": _bias(bert.mlm_ln, C),
            f"{p}decoder.weight": _w(bert.wte.weight), f"{p}decoder.bias": bias, f"{p}bias": bias}


# --- ResNet ---

LUMA = torch.tensor([0.299, 0.587, 0.114])  # Pillow's RGB → "L" weights (ITU-R 601-2)


def _conv_bn(sd: dict, prefix: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    sd[f"{prefix}convolution.weight"] = _w(conv.weight)
    for key, value in bn.state_dict().items():
        sd[f"{prefix}normalization.{key}"] = value.detach().clone()


def resnet(model: nn.Module, info: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = model.cfg
    if cfg.stem != "imagenet":
        raise BigModelError(f"a ResNet with the {cfg.stem!r} stem (one 3x3/1 conv, no pooling) "
                            f"has no Hugging Face counterpart: transformers' ResNet always opens "
                            f"with the ImageNet stem (7x7/2 conv, 3x3/2 max-pool); train with "
                            f"stem: imagenet to export it, or use --format onnx")
    expansion = 4 if cfg.block == "bottleneck" else 1
    labels = _labels(info) or {"num_labels": cfg.n_classes}
    # transformers' image pipelines hand the processor RGB whatever the file holds, and its
    # processors have no conversion to gray; our server converts to gray (Pillow's "L", ITU-R
    # 601-2 luma). So a gray model goes out taking RGB, the luma weights folded into its first
    # convolution: on a gray image (R = G = B) exactly our model; on a colour one, ours on its
    # luma before the rounding to 8 bits.
    gray = cfg.in_channels == 1
    hf_cfg = ResNetConfig(
        num_channels=3 if gray else cfg.in_channels, embedding_size=cfg.width,
        hidden_sizes=[cfg.width * 2**i * expansion for i in range(len(cfg.layers))],
        depths=list(cfg.layers), layer_type=cfg.block, hidden_act="relu",
        downsample_in_first_stage=False, downsample_in_bottleneck=False, **labels)
    sd: dict[str, torch.Tensor] = {}
    _conv_bn(sd, "resnet.embedder.embedder.", model.stem[0], model.stem[1])
    if gray:
        w = sd["resnet.embedder.embedder.convolution.weight"]  # (out, 1, k, k)
        sd["resnet.embedder.embedder.convolution.weight"] = w * LUMA.view(1, 3, 1, 1)
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            p = f"resnet.encoder.stages.{i}.layers.{j}."
            if not isinstance(block.shortcut, nn.Identity):
                _conv_bn(sd, f"{p}shortcut.", block.shortcut[0], block.shortcut[1])
            convs = block.convs()
            bns = [block.bn1, block.bn2] + ([block.bn3] if len(convs) == 3 else [])
            for k, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
                _conv_bn(sd, f"{p}layer.{k}.", conv, bn)
    sd["classifier.1.weight"], sd["classifier.1.bias"] = _w(model.fc.weight), _w(model.fc.bias)
    hf = ResNetForImageClassification(hf_cfg)
    _load_strict(hf, sd)
    processor = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": cfg.image_size, "width": cfg.image_size}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(cfg.mean) * (3 if gray else 1),
        "image_std": list(cfg.std) * (3 if gray else 1),
    }
    return hf, processor


# --- the whole conversion ---

def _load_strict(hf: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Every tensor of the transformers model from ours, with its shape; nothing left over."""
    want = hf.state_dict()
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise BigModelError(f"the {type(hf).__name__} layout does not match (missing "
                            f"{missing[:3]}, unused {extra[:3]}): a bug in the export")
    for key, value in sd.items():
        if tuple(value.shape) != tuple(want[key].shape):
            raise BigModelError(f"{key}: shape {tuple(value.shape)} against "
                                f"{type(hf).__name__}'s {tuple(want[key].shape)}: a bug in the export")
    hf.load_state_dict(sd, strict=True)
    hf.tie_weights()


def convert(model: nn.Module, info: dict[str, Any], tokenizer: Any | None) -> tuple[Any, Any]:
    """(transformers model in eval mode, its tokenizer or image-processor dict) of a bigmodel
    model and its folder's config."""
    family, task, arch = info["family"], info["task"], info["arch"]
    if family == "resnet":
        hf, processor = resnet(model, info)
        return hf.eval(), processor
    if family == "gpt":
        from transformers import GPT2ForTokenClassification, GPT2LMHeadModel

        if task == "clm":
            hf = GPT2LMHeadModel(gpt_config(arch, tokenizer))
            sd = {**gpt_body(model), "lm_head.weight": _w(model.wte.weight)}
        elif task == "token_cls":
            hf = GPT2ForTokenClassification(gpt_config(arch, tokenizer, **_labels(info),
                                                       classifier_dropout=0.0))
            sd = {**gpt_body(model.backbone), "classifier.weight": _w(model.head.out.weight),
                  "classifier.bias": _w(model.head.out.bias)}
        elif task == "seq_cls":
            raise BigModelError(
                "a GPT classifier has no faithful Hugging Face counterpart: "
                "GPT2ForSequenceClassification scores the last token with a bias-free layer, "
                f"this one pools {info.get('pooling')!r} into a layer with a bias; use "
                "--format onnx")
        else:
            raise BigModelError(f"a GPT {task} model has no Hugging Face export")
        _load_strict(hf, sd)
        return hf.eval(), gpt_tokenizer(tokenizer, arch["block_size"])
    if family == "bert":
        from transformers import (BertForMaskedLM, BertForSequenceClassification,
                                  BertForTokenClassification)

        if task == "mlm":
            hf = BertForMaskedLM(bert_config(arch))
            sd = {**bert_body(model), **bert_mlm_head(model)}
        elif task == "seq_cls":
            if info.get("pooling") != "pooler":
                raise BigModelError(
                    f"this BERT classifier pools {info.get('pooling')!r}; Hugging Face's "
                    f"BertForSequenceClassification reads the [CLS] state through BERT's pooler "
                    f"(dense + tanh): finetune with pooling: pooler to export it, or use "
                    f"--format onnx")
            hf = BertForSequenceClassification(bert_config(arch, **_labels(info),
                                                           classifier_dropout=None))
            sd = {**bert_body(model.backbone, model.pooler),
                  "classifier.weight": _w(model.head.out.weight),
                  "classifier.bias": _w(model.head.out.bias)}
        elif task == "token_cls":
            hf = BertForTokenClassification(bert_config(arch, **_labels(info)))
            sd = {**bert_body(model.backbone), "classifier.weight": _w(model.head.out.weight),
                  "classifier.bias": _w(model.head.out.bias)}
        else:
            raise BigModelError(f"a BERT {task} model has no Hugging Face export")
        _load_strict(hf, sd)
        max_len = info.get("max_len") or arch["block_size"]
        return hf.eval(), bert_tokenizer(tokenizer, min(max_len, arch["block_size"]))
    if family == "seq2seq":
        raise BigModelError(
            "the encoder-decoder has no faithful Hugging Face counterpart: its copy attention "
            "(pointer-generator) and bias-free pre-norm layers match no transformers "
            "encoder-decoder; use it through `bigmodel translate` or `make serve`")
    raise BigModelError(f"a {family} model has no Hugging Face export")


def gpt_tokenizer(tok: Any, max_len: int) -> Any:
    """Ours, without the end-of-text token our post-processor appends to every document: a
    prompt must end where its text ends (as GPT-2's tokenizer, which adds nothing)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _copy(tok)
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1",
                                                       special_tokens=[])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   pad_token=PAD,
                                   unk_token=UNK if tok.token_to_id(UNK) is not None else None,
                                   model_max_length=max_len, padding_side="right")


def bert_tokenizer(tok: Any, max_len: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_copy(tok), cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]", model_max_length=max_len,
                                   padding_side="right")


def _copy(tok: Any) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def save(hf: Any, extra: Any, out: Path) -> None:
    """save_pretrained: safetensors (a tied matrix once, metadata {"format": "pt"}), config,
    and the tokenizer files or the image processor's preprocessor_config.json."""
    hf.save_pretrained(out)
    if isinstance(extra, dict):
        (out / "preprocessor_config.json").write_text(json.dumps(extra, indent=2) + "\n")
    else:
        extra.save_pretrained(out)
