"""A bench run's results as a terminal table (rich), and in the output folder as results.md,
results.json and PNG charts: tokens/s per row (prefill and decode) and decode against KV depth.
One list of cells serves the terminal and the markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from placement.cost_model import RESOURCE_NAMES

MIB = 2**20
COLUMNS = (
    "row",
    "test",
    "tok/s",
    "range",
    "predicted",
    "meas/pred",
    "bound",
    "TTFT ms",
    "peak RSS MiB",
    "peak accel MiB",
    "note",
)
CHARTS = ("tok_s.png", "decode_vs_depth.png")


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_cells(results: dict) -> list[list[str]]:
    """One line per test of each row; a row that did not run is one line saying why."""
    lines = []
    for row in results["rows"]:
        name = row["name"] + (" (sim)" if row.get("simulated") else "")
        if row.get("error"):
            lines.append([name, *["-"] * (len(COLUMNS) - 2), "failed: " + row["error"]])
            continue
        rss = row.get("peak_rss_bytes")
        accel = row.get("peak_accel_bytes")
        for i, test in enumerate(row["tests"]):
            ttft = row.get("ttft_s") if test["kind"] == "pp" else None
            lines.append(
                [
                    name if i == 0 else "",
                    test["test"],
                    _number(test["median"]),
                    f"{test['min']:.1f}-{test['max']:.1f}",
                    _number(test.get("predicted_tok_s")),
                    _number(test.get("ratio"), 2),
                    test.get("bound") or "-",
                    _number(ttft["median"] * 1e3) if ttft else "-",
                    _number(rss / MIB, 0) if rss and i == 0 else "-",
                    _number(accel / MIB, 0) if accel and i == 0 else "-",
                    (row.get("note") or "") if i == 0 else "",
                ]
            )
    return lines


def settings_line(results: dict) -> str:
    s = results["settings"]
    return (
        f"{results['model']}: -p {s['prompt_tokens']} -n {s['new_tokens']} -d "
        f"{','.join(map(str, s['depths']))} --concurrency {','.join(map(str, s['concurrency']))}"
        f", {s['threads']} threads, median of {s['repeat']} after a warm-up, accelerator "
        f"{s['accelerator']}"
    )


def machine_line(machine: dict) -> str:
    return (
        f"{machine['cpu']} ({', '.join(machine['cpu_flags']) or 'no SIMD flags read'}), "
        f"{machine['cores']} cores / {machine['threads']} threads, "
        f"{machine['ram_bytes'] / 2**30:.0f} GiB RAM, accelerator: "
        f"{machine['accelerator'] or 'none'}, load average {_load(machine['load_average'])} "
        f"at the start, {_load(machine.get('load_average_end', []))} at the end"
    )


def _load(averages: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in averages) or "-"


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"hetero bench {settings_line(results)}", caption=machine_line(results["machine"])
    )
    for column in COLUMNS:
        left = column in ("row", "test", "bound", "note")
        table.add_column(column, justify="left" if left else "right")
    for cells in table_cells(results):
        table.add_row(*cells)
    Console(width=200).print(table)


def markdown(results: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in results["machine"]["versions"].items() if v)
    lines = [
        f"# hetero bench: {results['model']}",
        "",
        f"`{results['command']}`",
        "",
        f"- settings: {settings_line(results)}",
        f"- machine: {machine_line(results['machine'])}",
        f"- versions: {versions}",
        f"- predictions: {results['hardware']}",
        f"- bounds: {'; '.join(f'{k} = {v}' for k, v in RESOURCE_NAMES.items())}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for cells in table_cells(results):
        # a reason may quote a rule's regex: ffn_(up|down|gate)_exps
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", *(f"![{chart}]({chart})" for chart in CHARTS), ""]
    return "\n".join(lines)


def _measured(results: dict) -> list[dict]:
    return [row for row in results["rows"] if not row.get("error") and row["tests"]]


def _label(row: dict) -> str:
    return row["name"] + (" (sim)" if row.get("simulated") else "")


def draw_charts(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    rows = _measured(results)
    labels = [_label(row) for row in rows]
    first_depth = results["settings"]["depths"][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, title, pick in (
        (axes[0], "prefill", lambda t: t["kind"] == "pp"),
        (
            axes[1],
            f"decode (depth {first_depth}, one sequence)",
            lambda t: t["kind"] == "tg" and t["depth"] == first_depth and t["concurrency"] == 1,
        ),
    ):
        values, lows, highs = [], [], []
        for row in rows:
            test = next((t for t in row["tests"] if pick(t)), None)
            median = test["median"] if test else 0.0
            values.append(median)
            lows.append(median - test["min"] if test else 0.0)
            highs.append(test["max"] - median if test else 0.0)
        ax.bar(labels, values, yerr=[lows, highs], capsize=3, color="tab:blue")
        ax.set_title(title)
        ax.set_ylabel("tokens/s (median, min-max)")
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(settings_line(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / CHARTS[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, label in zip(rows, labels, strict=True):
        tg = [t for t in row["tests"] if t["kind"] == "tg" and t["concurrency"] == 1]
        if tg:
            ax.errorbar(
                [t["depth"] for t in tg],
                [t["median"] for t in tg],
                yerr=[[t["median"] - t["min"] for t in tg], [t["max"] - t["median"] for t in tg]],
                marker="o",
                capsize=3,
                label=label,
            )
    ax.set_xlabel("KV depth before decoding (tokens)")
    ax.set_ylabel("decode tokens/s, one sequence")
    ax.set_title("decode against KV depth", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / CHARTS[1], dpi=110)
    plt.close(fig)


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    draw_charts(results, out)
