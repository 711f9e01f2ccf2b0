"""Choosing a variant (budget, objective) and reporting the sweep: Markdown, a CSV for
`dvc plots`, a PNG of quality against speed."""
from __future__ import annotations

import csv
from pathlib import Path

from pydantic import Field

from components.base import StageError, StrictModel, markdown_table
from components.reports import CompressReport, VariantReport
from components.stats import interval_text


class BudgetSpec(StrictModel):
    exact_match_drop: float = Field(0.01, ge=0)  # at most this much below the reference (0.01 = 1 point)
    min_jaccard_at_1: float = Field(0.9, ge=0, le=1)  # top-1 next-token agreement with the reference
    max_perplexity_ratio: float | None = Field(None, ge=1)  # perplexity / reference perplexity; null: not checked
    # tokens/s at batch 1 / the reference's: a variant must be at least this fast (a
    # kernel without this CPU's instructions can make a small variant slow); null: not checked
    min_speedup_batch1: float | None = Field(1.0, gt=0)


def budget_breaks(m: VariantReport, reference: VariantReport, budget: BudgetSpec) -> list[str]:
    """The budget lines variant ``m`` breaks against the reference ([] = it qualifies)."""
    broke = []
    drop = reference.quality.exact_match - m.quality.exact_match
    if drop > budget.exact_match_drop + 1e-9:
        broke.append(f"exact match {-100 * drop:+.1f} pts (budget -{100 * budget.exact_match_drop:.1f})")
    if m.jaccard_at.get(1, 0.0) < budget.min_jaccard_at_1:
        broke.append(f"Jaccard@1 {m.jaccard_at.get(1, 0.0):.3f} < {budget.min_jaccard_at_1}")
    if budget.max_perplexity_ratio is not None:
        ratio = m.quality.perplexity / reference.quality.perplexity
        if ratio > budget.max_perplexity_ratio:
            broke.append(f"perplexity x{ratio:.3f} > x{budget.max_perplexity_ratio}")
    if budget.min_speedup_batch1 is not None:
        speedup = m.tokens_per_s_batch1 / reference.tokens_per_s_batch1
        if speedup < budget.min_speedup_batch1:
            broke.append(f"{speedup:.2f}x the tokens/s at batch 1 < {budget.min_speedup_batch1}x")
    return broke


def select(variants: dict[str, VariantReport], budget: BudgetSpec, objective: str,
           reference: str = "merged") -> tuple[str, str, dict[str, list[str]]]:
    """(chosen variant, why, budget lines each variant broke). Among the variants within the
    budget, the smallest on disk or the most tokens/s at batch 1 (ties: the other criterion);
    the reference when no other variant qualifies."""
    if reference not in variants:
        raise StageError(f"no measurements of the reference variant {reference!r}")
    ref = variants[reference]
    broke = {name: budget_breaks(m, ref, budget) for name, m in variants.items() if name != reference}
    qualified = [name for name, lines in broke.items() if not lines]
    if not qualified:
        why = "; ".join(f"{name}: {', '.join(lines)}" for name, lines in broke.items())
        return reference, (f"no variant is within the budget, so the uncompressed {reference} model"
                           + (f" ({why})" if why else "")), broke
    if objective == "smallest":
        chosen = min(qualified, key=lambda n: (variants[n].size_mib, -variants[n].tokens_per_s_batch1))
        what = f"smallest within the budget: {variants[chosen].size_mib} MiB"
    else:
        chosen = min(qualified, key=lambda n: (-variants[n].tokens_per_s_batch1, variants[n].size_mib))
        what = f"fastest within the budget: {variants[chosen].tokens_per_s_batch1} tokens/s at batch 1"
    m = variants[chosen]
    why = (f"{chosen}: {what} ({m.tokens_per_s_batch1 / ref.tokens_per_s_batch1:.2f}x the tokens/s and "
           f"{100 * m.size_mib / ref.size_mib:.0f}% of the size of {reference}, exact match "
           f"{100 * (m.quality.exact_match - ref.quality.exact_match):+.1f} pts, Jaccard@1 {m.jaccard_at.get(1, 0):.3f})")
    others = [f"{name}: {', '.join(lines)}" for name, lines in broke.items() if lines]
    if others:
        why += "; over budget: " + "; ".join(others)
    return chosen, why, broke


def _row(name: str, m: VariantReport, report: CompressReport) -> dict:
    return {"variant": name + (" (chosen)" if name == report.chosen else ""), "parent": m.parent or "-",
            "MiB": m.size_mib, "load s": m.load_s, "forward p50 ms": m.forward_p50_ms,
            "tok/s b1": m.tokens_per_s_batch1, f"tok/s b{report.batch_size}": m.tokens_per_s_batched,
            "request p95 ms": m.latency().shown_p95(), "EM": m.quality.exact_match,
            "EM 95% CI": interval_text(m.quality.exact_match_ci),
            "valid": m.quality.json_valid_rate, "ppl": m.quality.perplexity,
            **{f"J@{k}": v for k, v in m.jaccard_at.items()}, "within budget": "yes" if m.within_budget else "no"}


def render_report(report: CompressReport) -> str:
    rows = [_row(name, m, report) for name, m in report.variants.items()]
    parents = [{"variant": name, "vs": m.parent, **m.vs_parent, "J@1": m.jaccard_at_1_vs_parent}
               for name, m in report.variants.items() if m.parent]
    return (f"### compress\n{report.validation_examples} validation chats on a CPU with {report.cpu}; every "
            f"variant against the reference ({report.reference}, PyTorch fp32); J@k = top-k next-token agreement "
            f"with the reference at the gold answer positions.\n\n" + markdown_table(rows)
            + ("\n\n**Against the parent**\n\n" + markdown_table(parents) if parents else "")
            + f"\n\n**Chosen: {report.chosen}** (objective: {report.objective}). {report.reason}\n")


def write_plot(report: CompressReport, csv_path: Path, png_path: Path) -> None:
    """Quality vs speed: a CSV for `dvc plots` and a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "tokens_per_s_batch1", "exact_match", "size_mib", "jaccard_at_1"])
        for name, m in report.variants.items():
            writer.writerow([name, m.tokens_per_s_batch1, m.quality.exact_match, m.size_mib, m.jaccard_at.get(1)])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, m in report.variants.items():
        colour = "tab:green" if name == report.chosen else ("tab:blue" if m.within_budget else "tab:red")
        ax.scatter(m.tokens_per_s_batch1, m.quality.exact_match, s=20 + m.size_mib / 3, color=colour, alpha=0.7)
        ax.annotate(f"{name}\n{m.size_mib:.0f} MiB", (m.tokens_per_s_batch1, m.quality.exact_match),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ref = report.variants[report.reference]
    ax.axhline(ref.quality.exact_match - (report.budget.get("exact_match_drop") or 0), color="grey", ls="--", lw=1)
    ax.set_xlabel("generated tokens/s at batch 1")
    ax.set_ylabel("exact match (validation)")
    ax.set_title("compression: quality vs speed (marker area ~ size; green chosen, red over budget)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
