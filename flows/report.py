"""The pipeline's report card: markdown with stages, every model beside its baselines on the same
test split (one table per kind of model), explanations, champions and run links."""

from __future__ import annotations

from typing import Any

from bigmodel import tracking
from bigmodel.config import Params


def render_report(params: Params, outcomes: list[Any], parent_run_id: str,
                  children: list[dict[str, Any]], metrics: dict[str, dict[str, dict]],
                  title: str = "bigmodel pipeline report", preamble: list[str] | None = None,
                  decisions: list[Any] | None = None) -> str:
    runs = {c["stage"]: c for c in children}
    exp = children[0]["experiment_id"] if children else tracking.configure(params)
    lines = [
        f"# {title}",
        "",
        *(preamble or []),
        f"- MLflow pipeline run: [{parent_run_id}]({tracking.run_link(params, exp, parent_run_id)})",
        f"- tracking store: `{tracking.tracking_uri(params)}`",
        f"- git commit: `{tracking.git_commit(params.root) or 'none'}`",
        "",
        "## Stages",
        "",
        "| stage | status | seconds | throughput | MLflow run |",
        "|---|---|---:|---:|---|",
    ]
    for o in outcomes:
        run = runs.get(o.stage)
        link = f"[{run['run_id'][:8]}]({tracking.run_link(params, exp, run['run_id'])})" if run else "–"
        status = o.status + (f": {o.detail}" if o.detail else "")
        rate = throughput(run["metrics"]) if run and o.status == "ran" else "–"
        lines.append(f"| {o.stage} | {status} | {o.seconds:.1f} | {rate} | {link} |")
    lines += _champions(params, decisions)
    lines += _language_models(params, metrics) + _classifiers(params, metrics)
    lines += _taggers(params, metrics) + _seq2seq(params, metrics) + _images(params, metrics)
    lines += _explain(params, metrics)
    lines += [
        "",
        "## Where to look",
        "",
        f"- plots: `dvc plots show` (curves in `{params.paths.plots}/`), confusion matrices "
        f"`{params.paths.evaluate}/<run>/confusion.png`",
        f"- metrics: `dvc metrics show` (files in `{params.paths.metrics}/<stage>/<run>.json`)",
        f"- runs: `mlflow ui --backend-store-uri {tracking.tracking_uri(params)}`",
        "",
    ]
    return "\n".join(lines)


def throughput(metrics: dict[str, float]) -> str:
    """A stage's rate as it logged it (`<unit>_per_s`: tokens, target tokens, examples,
    images), e.g. '21,345 tokens/s'; '–' for a stage that logs none."""
    rates = sorted(k for k in metrics if k.endswith("_per_s"))
    if not rates:
        return "–"
    key, rate = rates[0], metrics[rates[0]]
    shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"
    return f"{shown} {key[:-len('_per_s')].replace('_', ' ')}/s"


def _champions(params: Params, decisions: list[Any] | None) -> list[str]:
    if not decisions:
        return []
    alias = params.promote.alias
    lines = ["", f"## Champions (alias `{alias}`)", "",
             f"| model | {alias} before | {alias} after | decision |", "|---|---|---|---|"]
    for d in decisions:
        lines.append(f"| {d.model} | {d.champion_before or '–'} | {d.champion_after or '–'} | "
                     f"{d.reason} |")
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _language_models(params: Params, metrics: dict[str, dict[str, dict]]) -> list[str]:
    rows = []
    for name, m in metrics.get("evaluate-pretrain", {}).items():
        if name not in params.pretrain:
            continue
        pre = metrics.get("pretrain", {}).get(name, {})
        spec = params.pretrain[name]
        train = (f"{pre.get('steps', '?')} steps, {pre.get('n_params', 0):,} params, "
                 f"{pre.get('tokens_per_s', 0):,.0f} tokens/s")
        if m["task"] in ("seq2seq", "image_cls"):
            continue  # their own tables
        if m["task"] == "clm":
            uni = m["baselines"]["unigram"]
            rows.append(f"| {name} | {spec.family} {spec.objective} | test bits/byte | "
                        f"{_fmt(m['test']['test_bpb'])} | {_fmt(uni['test_bpb'])} | {train} |")
        else:
            uni = m["baselines"]["unigram"]
            nsp = (f"; NSP accuracy {m['test']['nsp_accuracy']:.3f}"
                   if "nsp_accuracy" in m["test"] else "")
            rows.append(f"| {name} | {spec.family} {spec.objective}{'+nsp' if spec.nsp else ''} | "
                        f"test masked-token accuracy | {_fmt(m['test']['masked_accuracy'])} | "
                        f"{_fmt(uni['masked_accuracy'])} | {train}{nsp} |")
    if not rows:
        return []
    return ["", "## Language models (pretrain, test split)", "",
            "| run | model | metric | score | unigram baseline | training |",
            "|---|---|---|---:|---:|---|", *rows]


def _seq2seq(params: Params, metrics: dict[str, dict[str, dict]]) -> list[str]:
    """Every seq2seq model beside the copy and retrieval baselines, with sacreBLEU's
    signatures and a few example outputs."""
    runs = {n: m for n, m in metrics.get("evaluate-pretrain", {}).items()
            if n in params.pretrain and m.get("task") == "seq2seq"}
    if not runs:
        return []
    lines = ["", "## Sequence-to-sequence models (test split, sacreBLEU)", "",
             "| run | decoding | BLEU | chrF | greedy BLEU | retrieval BLEU / chrF | copy-source BLEU / chrF | training |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    signatures, examples = [], []
    for name, m in runs.items():
        t, b = m["test"], m["baselines"]
        pre = metrics.get("pretrain", {}).get(name, {})
        train = (f"{pre.get('steps', '?')} steps, {pre.get('n_params', 0):,} params, "
                 f"{pre.get('target_tokens_per_s', pre.get('tokens_per_s', 0)):,.0f} target tokens/s")
        lines.append(f"| {name} | beam {t['beam_size']} | {t['bleu']:.2f} | {t['chrf']:.2f} | "
                     f"{t['greedy_bleu']:.2f} | {b['retrieval']['bleu']:.2f} / "
                     f"{b['retrieval']['chrf']:.2f} | {b['copy_source']['bleu']:.2f} / "
                     f"{b['copy_source']['chrf']:.2f} | {train} |")
        signatures.append(f"- {name}: `{t['bleu_signature']}`, `{t['chrf_signature']}`")
        for ex in m.get("examples", []):
            cell = [str(ex[k]).replace("|", "\\|")[:160] for k in ("source", "reference", "model")]
            examples.append(f"| {name} | `{cell[0]}` | {cell[1]} | {cell[2]} |")
    lines += ["", "sacreBLEU signatures:", "", *signatures]
    if examples:
        lines += ["", "| run | source | reference | model |", "|---|---|---|---|", *examples]
    return lines


def _finetuned(params: Params, metrics: dict[str, dict[str, dict]], task: str) -> dict[str, dict]:
    return {n: m for n, m in metrics.get("evaluate", {}).items()
            if n in params.finetune and m.get("task") == task}


def _classifiers(params: Params, metrics: dict[str, dict[str, dict]]) -> list[str]:
    models = _finetuned(params, metrics, "seq_cls")
    if not models:
        return []
    lines = ["", "## Classifiers (test split)", ""]
    by_data: dict[str, list[str]] = {}
    for name in models:
        by_data.setdefault(params.finetune[name].data, []).append(name)
    for data, names in by_data.items():
        lines += [f"Data `{data}`:", "", "| model | accuracy | macro-F1 |", "|---|---:|---:|"]
        for name in sorted(names, key=lambda n: -models[n]["test"]["macro_f1"]):
            m, base = models[name], params.finetune[name].base
            lines.append(f"| {name} (finetuned {m['family']} `{base}`) | "
                         f"{_fmt(m['test']['accuracy'])} | {_fmt(m['test']['macro_f1'])} |")
        for b, s in models[names[0]]["baselines"].items():
            lines.append(f"| baseline: {b.replace('_', ' ')} | {_fmt(s['accuracy'])} | "
                         f"{_fmt(s['macro_f1'])} |")
        lines.append("")
    return lines


def _images(params: Params, metrics: dict[str, dict[str, dict]]) -> list[str]:
    """Every image classifier, pretrained (its own classes) or finetuned, beside the pixel
    baselines on the same test images, with its calibration."""
    rows = []
    sources = [("evaluate-pretrain", params.pretrain), ("evaluate", params.finetune)]
    for kind, runs in sources:
        for name, m in metrics.get(kind, {}).items():
            if name not in runs or m.get("task") != "image_cls":
                continue
            spec = runs[name]
            how = (f"pretrained, {len(spec.classes) or 'all'} classes" if kind == "evaluate-pretrain"
                   else f"finetuned `{spec.base}`" + (" from scratch" if spec.from_scratch else "")
                   + (" frozen" if spec.freeze_backbone else ""))
            t, b = m["test"], m["baselines"]
            rows.append(f"| {name} ({how}) | {spec.data if kind == 'evaluate' else spec.corpus} | "
                        f"{_fmt(t['accuracy'])} | {_fmt(t['macro_f1'])} | {_fmt(t['ece'])} | "
                        f"{_fmt(b['pixel_logreg']['macro_f1'])} | {_fmt(b['majority']['macro_f1'])} |")
    if not rows:
        return []
    return ["", "## Image classifiers (test split)", "",
            "| model | data | accuracy | macro-F1 | ECE | pixel logreg macro-F1 | majority macro-F1 |",
            "|---|---|---:|---:|---:|---:|---:|", *rows]


def _taggers(params: Params, metrics: dict[str, dict[str, dict]]) -> list[str]:
    models = _finetuned(params, metrics, "token_cls")
    if not models:
        return []
    lines = ["", "## Taggers (test split, entity level, seqeval)", "",
             "| model | data | precision | recall | F1 | baseline F1 (most frequent tag) |",
             "|---|---|---:|---:|---:|---:|"]
    for name, m in models.items():
        t, b = m["test"], m["baselines"]["most_frequent_tag"]
        lines.append(f"| {name} (finetuned {m['family']} `{params.finetune[name].base}`) | "
                     f"{params.finetune[name].data} | {_fmt(t['precision'])} | "
                     f"{_fmt(t['recall'])} | {_fmt(t['f1'])} | {_fmt(b['f1'])} |")
    for name, m in models.items():
        lines += ["", f"{name}, per entity type:", "", "| type | precision | recall | F1 | support |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | "
                  f"{v['support']} |" for k, v in m["test"]["per_type"].items()]
    return lines


def _explain(params: Params, metrics: dict[str, dict[str, dict]]) -> list[str]:
    ex = {n: m for n, m in metrics.get("explain", {}).items()
          if n in params.finetune or n in params.pretrain}
    if not ex:
        return []
    lines = ["", "## Explanations", ""]
    for name, m in ex.items():
        where = f"`{params.paths.explain}/{name}/`"
        if "deletion_drop_gradcam" in m:
            lines.append(f"- {name}: {m['n_examples']} test images in {where} (SHAP maps "
                         f"`shap.png`, Grad-CAM `gradcam.png`); deleting the top-20% pixels "
                         f"lowers p(predicted) by {m['deletion_drop_shap']:.3f} (SHAP), "
                         f"{m['deletion_drop_gradcam']:.3f} (Grad-CAM), as many random pixels "
                         f"by {m['deletion_drop_random']:.3f}; additivity error "
                         f"{m['additivity_max_error']:.1e}")
        elif "alignment_accuracy" in m:
            lines.append(f"- {name}: {m['n_examples']} test sources in {where} (alignment maps "
                         f"`alignment_<i>.png`: cross-attention of each decoder block and the "
                         f"copy attention; SHAP per output token `shap.html`); the last map's "
                         f"strongest source token is the copied one for "
                         f"{m['alignment_accuracy']:.2f} of {m['alignment_tokens']} output tokens "
                         f"found in the source; deleting the top-20% source tokens by SHAP lowers "
                         f"log p(output) by {m['deletion_drop_shap']:.2f}, as many random ones by "
                         f"{m['deletion_drop_random']:.2f}; additivity error "
                         f"{m['additivity_max_error']:.1e}")
        elif name in params.pretrain:
            lines.append(f"- {name}: attention maps + rollout of {m['n_examples']} test documents "
                         f"in {where} (`attention_<i>.png`)")
        elif "deletion_drop_shap" in m:
            lines.append(f"- {name}: {m['n_examples']} test examples in {where} (SHAP `shap.html`, "
                         f"`shap_<i>.png`, attention + rollout `attention_<i>.png`); deleting the "
                         f"top-20% tokens by SHAP lowers p(predicted) by "
                         f"{m['deletion_drop_shap']:.3f}, as many random tokens by "
                         f"{m['deletion_drop_random']:.3f}; additivity error "
                         f"{m['additivity_max_error']:.1e}")
        else:
            lines.append(f"- {name}: {m['n_examples']} test sentences in {where} (tags "
                         f"`tags.html`, attention + rollout `attention_<i>.png`)")
    return lines
