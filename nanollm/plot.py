"""Plot training runs from their main.log files (llm.c's format, as its dev/vislog.ipynb does).

    python -m nanollm.plot out/d12/main.log -o run.png
    python -m nanollm.plot base=out/a/main.log lr2x=out/b/main.log --ref "GPT-2 124M val=3.28" \\
        --ref "GPT-2 124M hellaswag=0.2955" --tokens-per-step 524288 -o runs.png

Left: train loss (thin) and val loss (with markers) per run; right, when any run has HellaSwag
("eval") lines: accuracy. Runs are overlaid in one colour each, named NAME=PATH or by the log's
folder. x is the step; --tokens-per-step N adds a tokens axis on top (--x tokens plots against
tokens, with one N per log when runs differ). --ref "LABEL KEY=VALUE" draws a dashed line: KEY
val/loss/train in the loss panel, hellaswag/eval in the accuracy one (VALUE 0.2955 or 29.55%).

main.log lines: "s:STEP trl:LOSS", "s:STEP tel:LOSS", "s:STEP eval:ACC" (llm.c adds
"lr:... norm:..." to trl lines). A run restarted with -y 1 logs steps again: the later value wins.
Needs matplotlib: pip install 'nanollm[plot]'.
"""

import argparse
import os
import sys

import numpy as np

PLOT_EXTRA = "pip install 'nanollm[plot]' (matplotlib==3.11.2)"
LOSS_KEYS = ("val", "loss", "train", "tel", "trl")
EVAL_KEYS = ("hellaswag", "eval")


class PlotError(ValueError):
    """A log or option that cannot be plotted; the message names it."""


def parse_log(path):
    """stream name -> (steps, values) arrays sorted by step, from an llm.c main.log."""
    streams = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                key, step = parts[0].split(":")
                if key != "s":
                    raise ValueError
                step = int(step)
                for item in parts[1:]:
                    name, value = item.split(":")
                    streams.setdefault(name, {})[step] = float(value)
            except ValueError:
                raise PlotError(f"{path}:{number}: not a main.log line ('s:STEP name:VALUE ...'): {line.strip()[:80]!r}") from None
    return {name: tuple(np.array(v) for v in zip(*sorted(points.items()))) for name, points in streams.items()}


def parse_ref(text):
    """'GPT-2 124M val=3.28' -> ('GPT-2 124M', 'loss' or 'eval', 3.28)."""
    label, _, assignment = text.rpartition(" ")
    key, sep, value = assignment.partition("=")
    key = key.lower()
    if not sep or key not in LOSS_KEYS + EVAL_KEYS:
        raise PlotError(f"--ref {text!r}: expected 'LABEL KEY=VALUE' with KEY one of {', '.join(LOSS_KEYS + EVAL_KEYS)}")
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise PlotError(f"--ref {text!r}: {value!r} is not a number") from None
    return label or key, "eval" if key in EVAL_KEYS else "loss", number


def parse_run(text):
    """'NAME=PATH' or 'PATH' -> (name, path); the default name is the log's folder."""
    name, sep, path = text.partition("=")
    if not sep or os.path.exists(text):
        path = text
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    if not os.path.isfile(path):
        raise PlotError(f"{path}: no such log file")
    return name, path


def plot(runs, output, refs=(), tokens_per_step=(), x="step", title=None):
    """runs: [(name, path)]; refs: [(label, panel, value)]; tokens_per_step: one for all runs or one
    per run. Writes the figure to output (PNG, SVG or PDF by its extension)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(f"python -m nanollm.plot needs matplotlib: {PLOT_EXTRA}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(tokens_per_step) not in (0, 1, len(runs)):
        raise PlotError(f"--tokens-per-step: give one value, or one per log ({len(runs)}), not {len(tokens_per_step)}")
    if x == "tokens" and not tokens_per_step:
        raise PlotError("--x tokens needs --tokens-per-step")
    per_run = list(tokens_per_step) * len(runs) if len(tokens_per_step) == 1 else list(tokens_per_step)
    logs = [(name, parse_log(path)) for name, path in runs]
    empty = [path for (_, path), (_, s) in zip(runs, logs) if not s]
    if empty:
        raise PlotError(f"{empty[0]}: the log is empty")
    with_eval = any("eval" in s for _, s in logs) or any(panel == "eval" for _, panel, _ in refs)
    fig, axes = plt.subplots(1, 2 if with_eval else 1, figsize=(16 if with_eval else 9, 6), squeeze=False)
    loss_ax, eval_ax = axes[0][0], axes[0][1] if with_eval else None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for i, (name, streams) in enumerate(logs):
        color = colors[i % len(colors)]
        # a step's train loss is measured after its batch (step + 1 batches seen); val and eval before it
        scale = (lambda s, after: (s + after) * per_run[i]) if x == "tokens" else (lambda s, after: s)
        if "trl" in streams:
            steps, values = streams["trl"]
            loss_ax.plot(scale(steps, 1), values, color=color, alpha=0.45, linewidth=1, label=f"{name} train")
        if "tel" in streams:
            steps, values = streams["tel"]
            loss_ax.plot(scale(steps, 0), values, color=color, marker="o", markersize=3, label=f"{name} val")
        if eval_ax is not None and "eval" in streams:
            steps, values = streams["eval"]
            eval_ax.plot(scale(steps, 0), values, color=color, marker="o", markersize=3, label=name)
    styles = ["--", ":", "-."]
    for j, (label, panel, value) in enumerate(refs):
        ax = loss_ax if panel == "loss" else eval_ax
        ax.axhline(value, color="0.3", linestyle=styles[j % len(styles)], linewidth=1, label=f"{label} ({value:g})")
    xlabel = "tokens" if x == "tokens" else "step"
    for ax, name in ((loss_ax, "loss"), (eval_ax, "HellaSwag accuracy")):
        if ax is None:
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if x == "step" and len(set(per_run)) == 1:  # one tokens-per-step: a tokens axis on top
            tps = per_run[0]
            top = ax.secondary_xaxis("top", functions=(lambda s: s * tps, lambda t: t / tps))
            top.set_xlabel(f"tokens ({tps:,} per step)")
    loss_ax.set_title("loss")
    if eval_ax is not None:
        eval_ax.set_title("HellaSwag (acc_norm)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=110)
    except (OSError, ValueError) as error:
        raise PlotError(f"-o {output}: {error}") from None
    finally:
        plt.close(fig)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanollm.plot",
                                     description="Plot train/val loss and HellaSwag accuracy from main.log files.")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="main.log files, each PATH or NAME=PATH")
    parser.add_argument("-o", "--output", default="run.png", help="image file (.png, .svg, .pdf; default run.png)")
    parser.add_argument("--ref", action="append", default=[], metavar='"LABEL KEY=VALUE"',
                        help='a dashed reference line, e.g. "GPT-2 124M val=3.28" or "GPT-2 124M hellaswag=29.55%%"')
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=[], metavar="N",
                        help="tokens per optimizer step (-d): one for all logs or one per log")
    parser.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis (default step)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        if any(n < 1 for n in args.tokens_per_step):
            raise PlotError(f"--tokens-per-step must be positive, got {args.tokens_per_step}")
        runs = [parse_run(text) for text in args.logs]
        refs = [parse_ref(text) for text in args.ref]
        plot(runs, args.output, refs, args.tokens_per_step, args.x, args.title)
    except (PlotError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
