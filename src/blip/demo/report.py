"""The demo's report: `report.html` with its PNGs, written next to `metrics.json`.

    write_report(out, metrics, scores, examples) -> out/report.html
        out/report_metrics.png   before / after bars (chance, untrained, web, CapFilt) per test metric
        out/report_filter.png    the filter's score histograms: web captions by noise label, synthetic by truth
        out/report_data.png      what each pretraining run reads: true / false web, synthetic and clean texts
        out/report_losses.png    the two pretraining runs' losses

`metrics` is the demo's `metrics.json` content, `scores` the per-text filter scores (`analyse_capfilt`),
`examples` web images with their captions and verdicts (`pick_examples`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Any

from blip.io import read_jsonl

_logger = logging.getLogger(__name__)

COLORS = {"chance": "#bdbdbd", "untrained": "#8c8c8c", "web": "#e6862e", "capfilt": "#2a9d5c"}
NOISE_COLORS = {"correct": "#2a9d5c", "partial": "#e6862e", "unrelated": "#c0392b", "junk": "#7d3c98"}
METRICS = (
    ("cider", "captioning CIDEr", "fine-tuned on clean captions; beam 3"),
    ("bleu4", "captioning BLEU-4", "same captions"),
    ("vqa_accuracy", "VQA accuracy (%)", "fine-tuned on VQA; greedy answers"),
    ("retrieval_r1", "zero-shot retrieval R@1 (%)", "mean of text and image R@1, ITC + ITM re-rank"),
)


def _finetunes_note(metrics: dict[str, Any]) -> str:
    """A sentence naming each arm's captioning fine-tunes when there are several (their CIDEr is the mean)."""
    draws = {arm: metrics[arm].get("caption_finetunes", []) for arm in ("web", "capfilt")}
    if len(draws["web"]) < 2:
        return ""
    each = "; ".join(arm + ": " + " / ".join(f"{d['cider']:.1f}" for d in ds) for arm, ds in draws.items())
    return (
        f"Captioning is fine-tuned {len(draws['web'])} times per arm, each time with its own seed, and its numbers are "
        f"the mean (each fine-tune's CIDEr &mdash; {each}). "
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(metrics: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 3.6))
    series = [
        ("chance", metrics["baselines"]["chance"]),
        ("untrained", metrics["baselines"]["untrained"]),
        ("web", metrics["web"]),
        ("capfilt", metrics["capfilt"]),
    ]
    series = [(name, values) for name, values in series if values]
    for ax, (key, title, _) in zip(axes, METRICS):
        labels = [name for name, _ in series]
        values = [float(values.get(key, 0.0)) for _, values in series]
        bars = ax.bar(range(len(values)), values, color=[COLORS[n] for n in labels])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([{"capfilt": "CapFilt"}.get(n, n) for n in labels], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(values + [1.0]) * 1.18)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _logit(p: float, eps: float = 1e-7) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def plot_filter_scores(scores: dict[str, Any], threshold: float, path: Path) -> Path:
    """Histograms of the filter's scores on a logit axis: with the ITC term most true texts score above 0.99, where a
    linear axis would put them all in one bin."""
    plt = _pyplot()
    fig, (ax_web, ax_syn) = plt.subplots(1, 2, figsize=(12, 3.8))
    bins = [-16 + i * 0.8 for i in range(41)]
    for kind, values in scores["web"].items():
        if values:
            logits = [_logit(v) for v in values]
            ax_web.hist(logits, bins=bins, histtype="step", lw=2, color=NOISE_COLORS.get(kind), label=kind)
    ax_web.set_title("filter score on web captions, by noise label", fontsize=10)
    for name, color in (("true", NOISE_COLORS["correct"]), ("false", NOISE_COLORS["unrelated"])):
        values = [_logit(v) for v in scores["synthetic"].get(name, [])]
        if values:
            ax_syn.hist(values, bins=bins, histtype="step", lw=2, color=color, label=f"{name} for the image")
    ax_syn.set_title("filter score on synthetic captions, by truth", fontsize=10)
    cut = _logit(threshold)
    for ax in (ax_web, ax_syn):
        ax.axvline(cut, color="black", ls="--", lw=1)
        ax.text(cut, ax.get_ylim()[1] * 0.95, " keep \u2192", fontsize=8, va="top")
        ax.text(cut, ax.get_ylim()[1] * 0.95, "\u2190 remove ", fontsize=8, va="top", ha="right")
        ax.set_xlabel("logit of the filter's score (ITM P(match), or with the ITC term)")
        ax.set_ylabel("texts")
        ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper left")
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_seed_bars(summary: dict[str, Any], path: Path) -> Path:
    """Per test metric: web and CapFilt bars (mean over the seeds, std as error bars) with every seed's value as a
    dot; with ablations, one more row of every arm's mean ± std."""
    from blip.demo.seeds import mean_std

    plt = _pyplot()
    ablations = summary.get("ablations")
    rows = 2 if ablations else 1
    fig, axes = plt.subplots(rows, len(METRICS) - 1, figsize=(13, 3.6 * rows), squeeze=False)
    shown = [m for m in METRICS if m[0] != "bleu4"]
    for ax, (key, title, _) in zip(axes[0], shown):
        for i, arm in enumerate(("web", "capfilt")):
            spread = summary["spread"][f"{arm}.{key}"]
            ax.bar(i, spread["mean"], yerr=spread["std"], color=COLORS[arm], capsize=4)
            values = [summary["per_seed"][s][f"{arm}.{key}"] for s in summary["seeds"]]
            ax.plot([i] * len(values), values, "o", color="black", ms=3)
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["web", "CapFilt"], fontsize=8)
        ax.set_title(f"{title}, {len(summary['seeds'])} seeds", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    if ablations:
        arms = list(ablations["arms"])
        for ax, (key, title, _) in zip(axes[1], shown):
            means, stds = zip(*(mean_std(ablations["arms"][a][key]) for a in arms))
            colors = [COLORS.get(a, "#4c72b0") for a in arms]
            ax.bar(range(len(arms)), means, yerr=stds, color=colors, capsize=3)
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels(arms, fontsize=7, rotation=30, ha="right")
            low, high = min(m - s for m, s in zip(means, stds)) * 0.9, max(m + s for m, s in zip(means, stds)) * 1.03
            if high > low:  # the arms' differences are small against their size: do not start at 0
                ax.set_ylim(low, high)
            ax.set_title(f"{title}: ablation arms", fontsize=10)
            ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training_data(sets: dict[str, dict[str, Any]], path: Path) -> Path:
    """Stacked bars: true/false web, true/false synthetic and clean texts in each pretraining set."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 2.6))
    parts = (
        ("web, true", "#f2b27a"),
        ("web, false", "#c0392b"),
        ("synthetic, true", "#7fd1a3"),
        ("synthetic, false", "#7d3c98"),
        ("clean (human)", "#4a78b5"),
    )
    for row, arm in enumerate(("capfilt", "web")):
        s = sets[arm]
        synth_false = s["false"] - s.get("web_false", 0)
        values = {
            "web, true": s["web"] - s.get("web_false", 0),
            "web, false": s.get("web_false", 0),
            "synthetic, true": s["synthetic"] - synth_false,
            "synthetic, false": synth_false,
            "clean (human)": s["clean"],
        }
        left = 0
        for name, color in parts:
            ax.barh(row, values[name], left=left, color=color, label=name if row == 0 else None)
            if values[name] > 0.04 * s["texts"]:
                ax.text(left + values[name] / 2, row, f"{values[name]}", ha="center", va="center", fontsize=8)
            left += values[name]
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["CapFilt data", "web data"])
    ax.set_xlabel("texts in the pretraining set")
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pretrain_losses(out: Path, path: Path) -> Path | None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    found = False
    for arm in ("web", "capfilt"):
        log = out / arm / "pretrain" / "metrics.jsonl"
        if not log.is_file():
            continue
        rows = read_jsonl(log)
        found = found or bool(rows)
        for ax, name in zip(axes, ("itc_loss", "itm_loss", "lm_loss")):
            ax.plot([r["step"] for r in rows], [r.get(name) for r in rows], color=COLORS[arm], label=arm)
            ax.set_title(f"pretraining {name}", fontsize=10)
            ax.set_xlabel("step")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path if found else None


# ---------------------------------------------------------------------------------------------------------------------
# HTML


def _img_data(path: str, size: int = 128) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _verdict(keep: bool) -> str:
    return '<span class="keep">kept</span>' if keep else '<span class="drop">removed</span>'


def _truth(s: dict[str, Any]) -> str:
    return "true" if s["true"] else "false: " + html.escape("; ".join(s["errors"]))


def _example_cards(examples: list[dict[str, Any]]) -> str:
    cards = []
    for ex in examples:
        detail = f" ({ex['noise_detail']})" if ex.get("noise_detail") else ""
        synth = "".join(
            f"<div class='txt'><b>synthetic</b> \u201c{html.escape(s['text'])}\u201d<br>"
            f"<span class='{'ok' if s['true'] else 'bad'}'>{_truth(s)}</span> \u00b7 P={s['score']:.2f} \u00b7 "
            f"{_verdict(s['keep'])}</div>"
            for s in ex["synthetic"]
        )
        cards.append(
            f"<div class='card'><img src='{_img_data(ex['image'])}' alt='{html.escape(ex['id'])}'>"
            f"<div class='txt'><b>web</b> \u201c{html.escape(ex['web_text'] or '')}\u201d<br>"
            f"<span class='tag {ex['noise']}'>{ex['noise']}{detail}</span> \u00b7 P={ex['web_score']:.2f} \u00b7 "
            f"{_verdict(ex['web_keep'])}</div>{synth}</div>"
        )
    return "<div class='grid'>" + "".join(cards) + "</div>"


def _change(web: float, capfilt: float) -> str:
    delta = round(capfilt - web, 1) + 0.0  # + 0.0: no "-0.0"
    cls = "up" if delta > 0 else ("down" if delta < 0 else "")
    return f"<span class='{cls}'>{delta:+.1f}</span>"


def _headline(m: dict[str, Any]) -> str:
    sets = m["training_sets"]
    web, cf = m["web"], m["capfilt"]
    better = [name for key, name, _ in METRICS if cf[key] > web[key]]
    worse = [name for key, name, _ in METRICS if cf[key] < web[key]]
    verdict = (
        "CapFilt beat the raw web data on every test metric"
        if not worse
        else f"CapFilt did better on {', '.join(better) or 'no metric'} and worse on {', '.join(worse)}"
    )
    return (
        f"<p class='headline'>{verdict} (one seed, {m['config']['n_test']} test images). The filter removed "
        f"{_pct(m['filter_recall'])} of the noisy web captions, and {_pct(m['filter_precision'])} of what it removed "
        f"was noise; with the synthetic captions added, the share of false texts in the pretraining data went from "
        f"{_pct(sets['web']['false_rate'])} to {_pct(sets['capfilt']['false_rate'])}.</p>"
    )


def _reading(m: dict[str, Any]) -> str:
    """What the numbers say about where the change comes from, and what they do not show."""
    sets, syn, web = m["training_sets"], m["filter"]["synthetic"], m["filter"]["web"]
    cf = sets["capfilt"]
    clean_share_up = cf["clean"] / max(1, cf["texts"]) > sets["web"]["clean"] / max(1, sets["web"]["texts"])
    points = [
        f"The CapFilt run reads {cf['texts']} texts: {cf['web']} kept web captions, {cf['synthetic']} kept synthetic "
        f"captions and the {cf['clean']} clean ones; the web run reads {sets['web']['texts']}. Both take the same "
        f"number of steps: {m['capfilt']['pretrain_epochs']:.1f} passes over the CapFilt set, "
        f"{m['web']['pretrain_epochs']:.1f} over the web set.",
        f"{_pct(syn['true_rate'])} of the synthetic captions are true for their image; the filter kept "
        f"{syn['kept']} of them, {syn['kept_true']} true"
        + (
            ". At this budget the captioner is the weak link: the synthetic captions add few true texts, and what "
            "changes most is what the filter removes (in the paper both parts help)."
            if syn["true_rate"] < 0.5
            else "."
        ),
        f"The filter removed {_pct(1 - web['kept_correct_rate'])} of the correct web captions along with "
        f"{_pct(m['filter_recall'])} of the noisy ones"
        + (", so clean human captions make up a larger share of the CapFilt set." if clean_share_up else "."),
        "One seed: differences of a few points can be noise. "
        "<code>blip demo --seeds 0 1 2</code> runs several and reports the spread.",
    ]
    return "<h2>Reading the result</h2><ul>" + "".join(f"<li>{p}</li>" for p in points) + "</ul>"


def _metrics_table(m: dict[str, Any]) -> str:
    rows = []
    chance, untrained = m["baselines"]["chance"], m["baselines"]["untrained"]
    for key, name, how in METRICS:
        untrained_cell = f"{untrained[key]:.1f}" if key in untrained else "&ndash;"
        rows.append(
            f"<tr><td>{name}<div class='small'>{how}</div></td><td>{chance[key]:.1f}</td>"
            f"<td>{untrained_cell}</td><td>{m['web'][key]:.1f}</td><td><b>{m['capfilt'][key]:.1f}</b></td>"
            f"<td>{_change(m['web'][key], m['capfilt'][key])}</td></tr>"
        )
    return (
        "<table><tr><th>test metric</th><th>chance</th><th>untrained</th><th>web data</th><th>CapFilt data</th>"
        "<th>change</th></tr>" + "".join(rows) + "</table>"
    )


def _filter_table(m: dict[str, Any]) -> str:
    web = m["filter"]["web"]
    rows = "".join(
        f"<tr><td><span class='tag {kind}'>{kind}</span></td><td>{v['texts']}</td><td>{v['removed']}</td>"
        f"<td>{_pct(v['removed'] / max(1, v['texts']))}</td></tr>"
        for kind, v in web["by_noise"].items()
    )
    rows += "".join(
        f"<tr><td class='small'>&nbsp;&nbsp;partial: {attribute} swapped</td><td>{v['texts']}</td>"
        f"<td>{v['removed']}</td><td>{_pct(v['removed'] / max(1, v['texts']))}</td></tr>"
        for attribute, v in web.get("partial_by_attribute", {}).items()
    )
    syn = m["filter"]["synthetic"]
    validation = m["filter"].get("validation")
    chosen = ""
    if validation:
        c = validation["chosen"]
        keep = m.get("config", {}).get("filter_keep_true")
        rule = f"the strictest cut keeping {_pct(keep)} of the true ones" if keep else "the best balanced accuracy"
        weight, auc = m["filter"].get("itc_weight", 0), validation.get("auc_by_itc_weight", {})
        score = (
            f"The filter's score is &sigma;(logit ITM P(match) + {weight:g} &times; ITC cosine): of the ITC weights "
            f"{', '.join(f'{float(w):g}' for w in auc)}, the one whose scores best separate the held-out true and "
            f"false texts (ROC AUC {auc[str(float(weight))]:.3f}; ITM alone {auc.get('0.0', float('nan')):.3f}). "
            if weight and str(float(weight)) in auc
            else ""
        )
        chosen = (
            f"<p>{score}Threshold {m['filter']['threshold']:.3g} ({rule}), chosen on {validation['true_texts']} true "
            f"captions and {validation['false_texts']} false ones of held-out clean images (written negatives and "
            f"other images' captions; images neither the filter nor its pretraining saw), not on the web labels: "
            f"there it keeps {_pct(c['kept_true'])} of the true and removes {_pct(c['removed_false'])} of the false "
            "texts.</p>"
        )
    if m.get("vision"):
        right = ", ".join(f"{label} {_pct(share)}" for label, share in m["vision"]["accuracy"].items())
        chosen += (
            f"<p>Every pretraining started its ViT from one taught to name the shape under each patch and its place "
            f"({m['vision']['steps']} steps; right on the shapes' patches of held-out images: {right}), as the paper "
            f"starts from an ImageNet ViT.</p>"
        )
    return (
        chosen
        + "<table><tr><th>web caption</th><th>texts</th><th>removed</th><th>removed %</th></tr>"
        + rows
        + "</table>"
        f"<p>Synthetic captions (one per web image, nucleus sampling p={m['config']['capfilt']['top_p']}): "
        f"{_pct(syn['true_rate'])} are true for their image (checked against the scene); the filter kept "
        f"{syn['kept']} of {syn['texts']}, and {_pct(syn['kept_true_rate'])} of the kept ones are true "
        f"(removal precision {_pct(syn['precision'])}, recall {_pct(syn['recall'])} with false = positive).</p>"
    )


ARM_NAMES = {
    "web": "web only",
    "captioner_only": "captioner only (C)",
    "filter_only": "filter only (F)",
    "capfilt": "CapFilt (C + F)",
    "beam": "C + F, beam search",
    "shared": "C + F, shared parameters",
    "round2": "C + F, second round",
}


def _cell(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "&ndash;"
    return _pct(value) if pct else f"{value:.1f}"


def _ablations(m: dict[str, Any]) -> str:
    """The paper's ablations on this seed: one table per ablation, and whether the paper's direction holds."""
    arms, found = m.get("ablations"), m.get("ablation_findings")
    if not arms or not found:
        return ""
    parts = ["<h2>Ablations (the paper's Tables 1-3, and a second round)</h2>"]
    head = (
        "<tr><th>arm</th><th>CIDEr</th><th>BLEU-4</th><th>VQA</th><th>zs R@1</th><th>false texts in pretraining</th>"
        "<th>synthetic true</th><th>synthetic distinct</th><th>false synthetic kept</th><th>filter P / R</th></tr>"
    )
    for name, finding in found.items():
        rows = []
        for arm in finding["arms"]:
            a = arms[arm]
            cf = a.get("capfilt", {})
            pr = f"{_pct(cf['filter_precision'])} / {_pct(cf['filter_recall'])}" if cf else "&ndash;"
            rows.append(
                f"<tr><td>{ARM_NAMES[arm]}</td><td>{a['cider']:.1f}</td><td>{a['bleu4']:.1f}</td>"
                f"<td>{a['vqa_accuracy']:.1f}</td><td>{a['retrieval_r1']:.1f}</td>"
                f"<td>{_cell(a.get('data', {}).get('false_rate'), True)}</td>"
                f"<td>{_cell(cf.get('synthetic_true_rate'), True)}</td>"
                f"<td>{_cell(cf.get('synthetic_distinct_rate'), True)}</td>"
                f"<td>{_cell(cf.get('false_synthetic_accepted'), True)}</td><td>{pr}</td></tr>"
            )
        verdict = "holds here" if finding["holds"] else "does not fully hold here"
        detail = "; ".join(
            f"{what}: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result.items())
            for what, result in finding["comparisons"].items()
        )
        parts.append(
            f"<h3>{name}</h3><p>Paper: {html.escape(finding['claim'])}. <b>{verdict}</b> "
            f"<span class='small'>({html.escape(detail)})</span></p><table>{head}{''.join(rows)}</table>"
        )
    parts.append(
        "<p class='small'>Every arm pretrains the same architecture from scratch with the same steps, schedule and "
        "seed, then gets the same captioning and VQA fine-tunes. One seed: "
        "<code>blip demo --seeds 0 1 2 --ablations</code> gives the spread.</p>"
    )
    return "".join(parts)


def _stage_table(m: dict[str, Any]) -> str:
    cfg = m["config"]
    steps = cfg["pretrain"]["max_steps"]
    what = {
        "data": f"generate {cfg['n_web']} web, {cfg['n_clean']} clean ({cfg['n_clean'] * 5} captions), "
        f"{cfg['n_vqa']} VQA and {cfg['n_test']} test images",
        "baselines": "evaluate the untrained architecture; chance baselines",
        "pretrain_web": f"pretrain from scratch on web + clean ({m['web']['pretrain_pairs']} texts, {steps} steps, "
        f"{m['web']['pretrain_epochs']:.1f} epochs), zero-shot retrieval",
        "captioner": "fine-tune the web model as captioner (LM, clean captions); also the web model's captioning score",
        "filter": "fine-tune the web model as filter (ITC + ITM, clean captions)",
        "capfilt": f"caption {cfg['n_web']} web images; the filter kept {m['capfilt_summary']['web_kept']} web and "
        f"{m['capfilt_summary']['synthetic_kept']} synthetic texts",
        "pretrain_capfilt": f"pretrain from scratch on the bootstrapped data ({m['capfilt']['pretrain_pairs']} texts, "
        f"{steps} steps, {m['capfilt']['pretrain_epochs']:.1f} epochs), zero-shot retrieval",
        "caption_capfilt": "fine-tune the CapFilt model for captioning (same settings as the captioner)",
        "vqa_web": "fine-tune the web model for VQA",
        "vqa_capfilt": "fine-tune the CapFilt model for VQA (same settings)",
    }
    cpu = m.get("cpu_seconds", {})
    rows = "".join(
        f"<tr><td>{name}</td><td>{html.escape(what.get(name, ''))}</td><td>{seconds:.0f} s</td>"
        f"<td>{cpu.get(name, 0.0):.0f} s</td></tr>"
        for name, seconds in m["timings"].items()
    )
    total = (
        f"<tr><td><b>total</b></td><td></td><td><b>{m['total_seconds'] / 60:.1f} min</b></td>"
        f"<td>{sum(cpu.values()) / 60:.1f} min</td></tr>"
    )
    load = m.get("load_average")
    note = (
        f"<p class='small'>Wall-clock and CPU time (all threads of this process) per stage, on "
        f"{m['threads'] or 'default'} torch threads; the machine's load average at the end was "
        f"{', '.join(map(str, load)) if load else 'unknown'} (1/5/15 min): other work on the machine slows the "
        "wall clock.</p>"
    )
    head = "<table><tr><th>stage</th><th>what</th><th>wall</th><th>CPU</th></tr>"
    return head + rows + total + "</table>" + note


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px; margin: 24px auto;
       color: #222; line-height: 1.45; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.headline { font-size: 1.15em; background: #f3f8f4; border-left: 5px solid #2a9d5c; padding: 10px 14px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 5px 12px; border-bottom: 1px solid #e4e4e4;
       text-align: left; vertical-align: top; } th { background: #fafafa; }
.small { font-size: 0.8em; color: #777; } .up { color: #1e7d45; font-weight: bold; }
.down { color: #b03a2e; font-weight: bold; } img.fig { width: 100%; }
.grid { display: grid; grid-template-columns: repeat(3, 1fr); gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 0.85em; }
.card img { width: 128px; height: 128px; image-rendering: pixelated; display: block; margin-bottom: 6px; }
.txt { margin: 4px 0; } .keep { color: #1e7d45; font-weight: bold; } .drop { color: #b03a2e; font-weight: bold; }
.ok { color: #1e7d45; } .bad { color: #b03a2e; }
.tag { border-radius: 3px; padding: 0 4px; color: white; } .tag.correct { background: #2a9d5c; }
.tag.partial { background: #e6862e; } .tag.unrelated { background: #c0392b; } .tag.junk { background: #7d3c98; }
code { background: #f4f4f4; padding: 1px 4px; }
"""


def write_report(out: Path, metrics: dict[str, Any], scores: dict[str, Any], examples: list[dict[str, Any]]) -> Path:
    """Write the PNGs and `report.html` into `out`; returns the HTML path."""
    from blip.data.shapes import NOISE_KINDS

    out = Path(out)
    figures = {
        "metrics": plot_metric_bars(metrics, out / "report_metrics.png"),
        "filter": plot_filter_scores(scores, metrics["filter"]["threshold"], out / "report_filter.png"),
        "data": plot_training_data(metrics["training_sets"], out / "report_data.png"),
        "losses": plot_pretrain_losses(out, out / "report_losses.png"),
    }
    cfg = metrics["config"]
    rates = dict(zip(NOISE_KINDS, cfg["noise_rates"]))
    rates_text = ", ".join(f"{k} {100 * v:.0f}%" for k, v in rates.items())
    score_text = "matching probability" + (", with its ITC similarity" if metrics["filter"].get("itc_weight") else "")
    web_sets = metrics["training_sets"]
    losses = (
        f"<h2>Pretraining losses</h2><img class='fig' src='{figures['losses'].name}'>"
        "<p class='small'>The two runs read different texts, so their losses are not a like-for-like score; the test "
        "metrics above are.</p>"
        if figures["losses"]
        else ""
    )
    body = f"""
<h1>CapFilt on the shapes world</h1>
<div class="small">blip demo &middot; seed {metrics["seed"]} &middot; {metrics["threads"] or "default"} CPU threads
&middot; {metrics["total_seconds"] / 60:.1f} min in all</div>
{_headline(metrics)}
<img class="fig" src="{figures["metrics"].name}" alt="test metrics">
{_metrics_table(metrics)}
<p class="small">Both arms use the same architecture, seed, number of pretraining steps ({cfg["pretrain"]["max_steps"]})
and schedule, and the same fine-tuning runs; only the pretraining texts differ. {_finetunes_note(metrics)}CIDEr-D and
BLEU-4 on the papers' x100 scale. Retrieval R@1 is zero-shot (the pretrained model itself), the mean of text R@1 and
image R@1 over {cfg["n_test"]} test images with 5 captions each. Chance: the most common clean caption for every image
(&ldquo;{html.escape(metrics["constant_caption"])}&rdquo;), each question's most common training answer, a random
ranking. Untrained: the same architecture with random weights.</p>

{_reading(metrics)}

<h2>What was done</h2>
<p>The BLIP paper's bootstrapping (CapFilt, &sect;3.3) at toy scale: a model pretrained on noisy web captions is
fine-tuned on a small clean, human-annotated split into a <b>captioner</b> (language modelling) and a
<b>filter</b> (image-text contrastive + matching). The captioner writes a synthetic caption for every web image;
the filter removes every web and synthetic text whose score (its {score_text}) is below
{metrics["filter"]["threshold"]:.3g}; a new model is pretrained from scratch on what is left plus the clean
captions. The shapes world knows the truth: every web caption carries its noise label ({rates_text}) and every
synthetic caption is checked against the scene it describes. Images are {cfg["world_image_size"]} px with 1 to
{cfg["max_shapes"]} shapes.</p>
{_stage_table(metrics)}

<h2>The filter</h2>
<p><b>Precision {_pct(metrics["filter_precision"])}, recall {_pct(metrics["filter_recall"])}</b> on
{metrics["filter"]["web"]["texts"]} web captions. {html.escape(metrics["filter_definition"])} It kept
{_pct(metrics["filter"]["web"]["kept_correct_rate"])} of the correct web captions.</p>
{_filter_table(metrics)}
<img class="fig" src="{figures["filter"].name}" alt="filter score histograms">

{_ablations(metrics)}

<h2>The pretraining data</h2>
<p>Web data: {web_sets["web"]["texts"]} texts, {_pct(web_sets["web"]["false_rate"])} false for their image.
CapFilt data: {web_sets["capfilt"]["texts"]} texts, {_pct(web_sets["capfilt"]["false_rate"])} false.</p>
<img class="fig" src="{figures["data"].name}" alt="training data composition">
{losses}
<h2>Examples</h2>
<p>Web images of each noise kind, with the web caption, the captioner's synthetic caption, the filter's score
and its verdict.</p>
{_example_cards(examples)}

<h2>Reproduce</h2>
<p><code>make demo</code> (or <code>blip demo --out runs/demo --seed {metrics["seed"]}</code>); numbers are in
<code>metrics.json</code>, every stage's models, logs and predictions in its folder. The configuration is
<code>configs/demo_shapes.py</code>.</p>
"""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>blip demo: CapFilt on the shapes world</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_seeds_report(out: Path, summary: dict[str, Any]) -> Path:
    """`report.html` of several seeds (`blip.demo.seeds`): the headline numbers per seed with their spread, and the
    ablations as mean ± std with on how many seeds each of the paper's claims held; links each seed's own report."""
    from blip.demo.seeds import COMPARED, ablation_tables, headline_table

    seeds, n = summary["seeds"], len(summary["seeds"])
    wins = ", ".join(f"{metric} {summary['capfilt_wins'][metric]}/{n}" for metric in COMPARED)
    links = " &middot; ".join(f"<a href='seed{s}/report.html'>seed {s}</a>" for s in seeds)
    parts = [
        "<h1>CapFilt on the shapes world, several seeds</h1>",
        f"<div class='small'>blip demo --seeds {' '.join(map(str, seeds))} &middot; each seed's report: {links}</div>",
        f"<p class='headline'>CapFilt above web on: {html.escape(wins)} (seeds).</p>",
        f"<img class='fig' src='{plot_seed_bars(summary, Path(out) / 'report_seeds.png').name}' alt='per seed'>",
        _html_table(*headline_table(summary)),
    ]
    if summary.get("ablations"):
        parts.append("<h2>Ablations (the paper's Tables 1-3, and a second round): mean ± std over the seeds</h2>")
        for ablation in ablation_tables(summary["ablations"]):
            header, rows = ablation["table"]
            rows = [[ARM_NAMES.get(row[0], row[0]), *row[1:]] for row in rows]
            comparisons = "".join(f"<li>{html.escape(c)}</li>" for c in ablation["comparisons"])
            parts.append(
                f"<h3>{html.escape(ablation['name'])}</h3><p>Paper: {html.escape(ablation['claim'])}. "
                f"<b>Holds on {ablation['held']} seeds.</b></p>{_html_table(header, rows)}"
                f"<ul class='small'>{comparisons}</ul>"
            )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>blip demo: several seeds</title>"
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    path = Path(out) / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
