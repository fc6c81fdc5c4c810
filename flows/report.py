"""The pipeline's report card: markdown with stages, metrics beside baselines, plots, run links."""

from __future__ import annotations

from typing import Any

from bigmodel import tracking
from bigmodel.config import Params


def render_report(params: Params, outcomes: list[Any], parent_run_id: str,
                  children: list[dict[str, Any]], metrics: dict[str, dict],
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
        "| stage | status | seconds | MLflow run |",
        "|---|---|---:|---|",
    ]
    for o in outcomes:
        run = runs.get(o.stage)
        link = f"[{run['run_id'][:8]}]({tracking.run_link(params, exp, run['run_id'])})" if run else "–"
        status = o.status + (f": {o.detail}" if o.detail else "")
        lines.append(f"| {o.stage} | {status} | {o.seconds:.1f} | {link} |")
    lines += _champions(params, decisions)
    lines += _language_model(metrics) + _classifier(metrics) + _explain(params, metrics)
    lines += [
        "",
        "## Where to look",
        "",
        f"- plots: `dvc plots show` (curves in `{params.paths.plots}/`), confusion matrix "
        f"`{params.paths.evaluate}/confusion.png`",
        f"- metrics: `dvc metrics show` (files in `{params.paths.metrics}/`)",
        f"- runs: `mlflow ui --backend-store-uri {tracking.tracking_uri(params)}`",
        "",
    ]
    return "\n".join(lines)


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


def _language_model(metrics: dict[str, dict]) -> list[str]:
    lm = metrics.get("evaluate", {}).get("lm")
    pre = metrics.get("pretrain", {})
    if not lm:
        return []
    lines = ["", "## Language model (pretrain)", "", "| split | loss (nats/token) | perplexity | bits/byte |",
             "|---|---:|---:|---:|"]
    for split in ("val", "test"):
        lines.append(f"| {split} | {_fmt(lm[f'{split}_loss'])} | {lm[f'{split}_perplexity']:.1f} | "
                     f"{_fmt(lm[f'{split}_bpb'])} |")
    if pre:
        lines.append("")
        lines.append(f"{pre.get('steps')} steps, {pre.get('n_params', 0):,} parameters, "
                     f"{pre.get('tokens_per_s', 0):,.0f} tokens/s, {pre.get('seconds', 0):.0f} s.")
    return lines


def _classifier(metrics: dict[str, dict]) -> list[str]:
    ev = metrics.get("evaluate", {})
    if "classifier" not in ev:
        return []
    rows = [("bigmodel (finetuned GPT)", ev["classifier"])]
    rows += [(name.replace("_", " "), scores) for name, scores in ev.get("baselines", {}).items()]
    lines = ["", "## Classifier (test split)", "", "| model | accuracy | macro-F1 |", "|---|---:|---:|"]
    lines += [f"| {name} | {_fmt(s['accuracy'])} | {_fmt(s['macro_f1'])} |" for name, s in rows]
    per_class = ev["classifier"].get("per_class", {})
    if per_class:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {c} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | "
                  f"{v['support']} |" for c, v in per_class.items()]
    return lines


def _explain(params: Params, metrics: dict[str, dict]) -> list[str]:
    ex = metrics.get("explain")
    if not ex:
        return []
    return [
        "",
        "## Explanations",
        "",
        f"- {ex['n_examples']} test examples: SHAP `{params.paths.explain}/shap.html`, "
        f"`shap_<i>.png`, attention maps `attention_<i>.png`",
        f"- faithfulness: deleting the top-20% tokens by SHAP lowers p(predicted) by "
        f"{ex['deletion_drop_shap']:.3f}, deleting as many random tokens by "
        f"{ex['deletion_drop_random']:.3f}",
        f"- additivity: max |base + Σ SHAP − logit| = {ex['additivity_max_error']:.2e}",
    ]
