"""The figures of `foldmerge report` (PNG, matplotlib's object API with the Agg canvas: no pyplot,
no global figure state or backend).

Per bench result: bars of per-task and joint accuracy per method (error bars: sample std over the
bench's replicates, seeds or pairs) with the reference levels (originals, ensemble, random guess)
drawn as lines across them, never as bars; accuracy against wall time and against learnable
parameters where the bench recorded them, each panel's Pareto front named; and the figure of the
bench's own question (cost: time and memory ratios to distillation; data-efficiency: accuracy
against original examples per task; scale: FS-Merge minus distillation against model size).
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from .results import reference

DPI = 110
METRICS = {"per_task": ("per-task", "C0"), "joint": ("joint", "C1")}     # key: (label, colour)
LEVELS = {"originals": "-", "ensemble": "--", "random guess": ":"}       # reference level: line style
LABEL_POINTS = 6                                                          # font size of point names


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)        # a renderer to measure text with, before the figure is saved
    return fig


def _grid(n: int, width: float, height: float, sharey: bool = False, min_width: float = 7.5):
    """n panels of width x height inches, at most 3 to a row, the figure at least `min_width` wide
    (room for its title and legend); the unused cells of the last row hidden."""
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = _figure(max(width * cols, min_width), height * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _legend(fig: Figure, handles: list) -> None:
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)


def _level_handles(levels) -> list:
    return [Line2D([], [], color="0.25", ls=LEVELS[lv], lw=1.2, label=lv) for lv in LEVELS if lv in levels]


def references_of(rows: list[dict]) -> dict[str, dict]:
    """The reference rows among one panel's, by level ('originals', 'ensemble', 'random guess')."""
    return {reference(r["method"]): r for r in rows if reference(r["method"])}


# ------------------------------------------------------------------ accuracy bars
def accuracy_figure(rows: list[dict], title: str) -> Figure:
    """One panel per setting: horizontal bars of the methods' per-task and joint accuracy; the
    reference levels as vertical lines across the bars, in the metric's colour."""
    panels = list(dict.fromkeys(r["panel"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if not reference(m)]
    fig, axes = _grid(len(panels), 4.4, 0.9 + 0.24 * max(len(methods), 2), sharey=True)
    for ax, panel in zip(axes, panels):
        sel = [r for r in rows if r["panel"] == panel]
        by_method = {r["method"]: r for r in sel}
        _method_bars(ax, [by_method.get(m) for m in methods])
        _reference_lines(ax, references_of(sel))
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy %", fontsize=8)
        ax.set_title(panel, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(which="both", labelsize=7)
    axes[0].set_yticks(range(len(methods)), methods)
    axes[0].invert_yaxis()          # the bench's first method on top (the axes are shared)
    levels = {lv for r in rows for lv in [reference(r["method"])] if lv}
    metrics = [Patch(color=c, label=lab) for key, (lab, c) in METRICS.items() if any(r[key] is not None for r in rows)]
    _legend(fig, metrics + _level_handles(levels))
    fig.suptitle(f"{title}\nbars: methods (error bars: std over replicates); lines: reference levels, "
                 "in the colour of their metric", fontsize=9)
    return fig


def _method_bars(ax, rows: list[dict | None]) -> None:
    """Per-task above joint at each method's row; a method this panel lacks (None) has no bars."""
    for offset, key in ((-0.2, "per_task"), (0.2, "joint")):
        drawn = [(i, r) for i, r in enumerate(rows) if r is not None and r[key] is not None]
        ax.barh([i + offset for i, _ in drawn], [r[key] for _, r in drawn], 0.4,
                xerr=[r[key + "_std"] or 0 for _, r in drawn], capsize=1.5, color=METRICS[key][1],
                error_kw={"lw": 0.8})


def _reference_lines(ax, refs: dict[str, dict], keys=("per_task", "joint"), vertical: bool = True) -> None:
    for level, r in refs.items():
        for key in keys:
            if r[key] is not None:
                line = ax.axvline if vertical else ax.axhline
                line(r[key], color=METRICS[key][1], ls=LEVELS[level], lw=1.2, alpha=0.9)


def accuracy_bars(rows: list[dict], path: Path, title: str) -> Path:
    return _save(accuracy_figure(rows, title), path)


# ------------------------------------------------------------------ accuracy against cost
def accuracy_against(rows: list[dict], key: str, label: str, path: Path, title: str) -> Path:
    """Per panel: per-task accuracy of the methods against `key` (seconds, parameters), each cost
    level's best named (the Pareto front), the rest faint; originals and ensemble as lines."""
    panels = [p for p in dict.fromkeys(r["panel"] for r in rows) if _costed(rows, p, key)]
    fig, axes = _grid(len(panels), 5.0, 3.7)
    fronts = []
    for ax, panel in zip(axes, panels):
        sel = [r for r in rows if r["panel"] == panel]
        costed = _costed(rows, panel, key)
        front = pareto_front(costed, key)
        rest = [r for r in costed if r not in front]
        ax.scatter([r[key] for r in rest], [r["per_task"] for r in rest], s=12, alpha=0.35, color="C0")
        ax.scatter([r[key] for r in front], [r["per_task"] for r in front], s=22, color="C0", zorder=3)
        refs = {lv: r for lv, r in references_of(sel).items() if lv != "random guess"}
        _reference_lines(ax, refs, keys=("per_task",), vertical=False)
        ax.set_xscale("log")
        ax.margins(y=0.1)        # room above the highest point for its name
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("per-task test accuracy %", fontsize=8)
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(which="both", labelsize=7)
        fronts.append(front)
    levels = {lv for r in rows for lv in [reference(r["method"])] if lv and lv != "random guess"}
    _legend(fig, [Line2D([], [], ls="", marker="o", ms=5, color="C0", label="named: the best for its cost"),
                  Line2D([], [], ls="", marker="o", ms=4, color="C0", alpha=0.35, label="the rest (all in the table)")]
            + _level_handles(levels))
    fig.suptitle(title, fontsize=10)
    fig.canvas.draw()           # the layout is final before names are placed beside points
    for ax, front in zip(axes, fronts):
        name_points(ax, [(r[key], r["per_task"], r["method"]) for r in front])
    return _save(fig, path)


def _costed(rows: list[dict], panel: str, key: str) -> list[dict]:
    return [r for r in rows if r["panel"] == panel and r[key] and not reference(r["method"])]


def pareto_front(rows: list[dict], key: str) -> list[dict]:
    """The rows no other row beats on both accuracy and `key` (cost): more accurate than every cheaper one."""
    front, best = [], float("-inf")
    for r in sorted(rows, key=lambda r: (r[key], -r["per_task"])):
        if r["per_task"] > best:
            front.append(r)
            best = r["per_task"]
    return front


def name_points(ax, named: list[tuple[float, float, str]], max_moves: int = 60) -> list:
    """Write each name beside its point, the highest first; a name that would overlap one written
    before moves down a line at a time until clear, with a thin line back to its point. Names on
    the right of the panel extend leftwards. Returns the texts (left out of the layout)."""
    renderer = ax.figure.canvas.get_renderer()
    ax.get_xlim(), ax.get_ylim()            # the view limits, settled before data are mapped to pixels
    placed, texts = [], []
    for x, y, name in sorted(named, key=lambda p: -p[1]):
        right = ax.transAxes.inverted().transform(ax.transData.transform((x, y)))[0] > 0.55
        dx, dy = (-4 if right else 4), 2
        text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=LABEL_POINTS,
                           ha="right" if right else "left", va="bottom",
                           bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.75})
        text.set_in_layout(False)
        box = text.get_window_extent(renderer)
        for _ in range(max_moves):
            if not any(box.overlaps(b) for b in placed):
                break
            dy -= LABEL_POINTS + 1.5
            text.xyann = (dx, dy)
            box = text.get_window_extent(renderer)
        if dy < 0:
            ax.annotate("", (x, y), xytext=(dx, dy + LABEL_POINTS / 2), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5", "shrinkA": 0, "shrinkB": 2}
                        ).set_in_layout(False)
        placed.append(box)
        texts.append(text)
    return texts


# ------------------------------------------------------------------ the benches' own questions
def efficiency_curves(result: dict, path: Path) -> Path:
    fig, axes = _grid(2, 5.2, 3.8)
    curves = result["curves"]
    for ax, key in zip(axes, ("per_task", "joint")):
        for method in dict.fromkeys(c["method"] for c in curves if c["originals"] is not None):
            sel = sorted((c for c in curves if c["method"] == method and c["originals"] is not None),
                         key=lambda c: c["originals"])
            ax.errorbar([c["originals"] for c in sel], [c[key] for c in sel], yerr=[c[key + "_std"] or 0 for c in sel],
                        marker="o", ms=3, capsize=2, label=method)
        for c in curves:        # the references use no merge data: one level each, a line
            level = reference(c["method"]) if c["originals"] is None else None
            if level and c[key] is not None:
                ax.axhline(c[key], color="0.35", ls=LEVELS[level], lw=1.2, label=f"{level} (no merge data)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("original examples per task")
        ax.set_ylabel(f"{METRICS[key][0]} test accuracy %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fill = f"augmented to {result['total_per_task']} per task" if result.get("total_per_task") else "no augmentation"
    fig.suptitle(f"data efficiency, {result['arch']} ({fill}); error bars: std over {result['seeds']} seed(s)",
                 fontsize=10)
    return _save(fig, path)


def scale_gap(result: dict, path: Path) -> Path:
    fig, axes = _grid(2, 5.2, 3.8)
    for ax, key in zip(axes, ("gap_per_task", "gap_joint")):
        for n in dict.fromkeys(g["originals"] for g in result["gaps"]):
            sel = sorted((g for g in result["gaps"] if g["originals"] == n and g[key] is not None),
                         key=lambda g: g["source_parameters"])
            ax.errorbar([g["source_parameters"] for g in sel], [g[key] for g in sel],
                        yerr=[g[key + "_std"] or 0 for g in sel], marker="o", ms=3, capsize=2,
                        label=f"{n} originals per task")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        # each size named once, on the axis: labels beside points overlapped where both counts met
        sizes = sorted({(g["source_parameters"], g["width"], g["depth"]) for g in result["gaps"]})
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks([p for p, _, _ in sizes],
                      [f"w{w} d{d}\n{p / 1e6:.2f}M" for p, w, d in sizes], fontsize=6)
        ax.set_xlabel("one source ViT: width, depth, parameters")
        ax.set_ylabel(("per-task" if key == "gap_per_task" else "joint") + " accuracy: FS-Merge − distill (points)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("does FS-Merge's margin over distillation grow with the ViT?", fontsize=10)
    return _save(fig, path)


def scaling_curves(result: dict, path: Path) -> Path:
    """Peak private memory and seconds against one source's size, a line per method, mode and dtype, with
    each fitted slope in its label."""
    fig, axes = _grid(2, 5.2, 3.8)
    rows = result["rows"]
    slope = {(f["method"], f["mode"], f["dtype"]): f["memory_per_source_byte"] for f in result.get("fits", [])}
    for ax, key, label in zip(axes, ("peak_bytes", "seconds"), ("peak private memory (MiB)", "wall seconds")):
        for group in dict.fromkeys((r["method"], r["mode"], r["dtype"]) for r in rows):
            sel = sorted((r for r in rows if (r["method"], r["mode"], r["dtype"]) == group),
                         key=lambda r: r["source_bytes"])
            ys = [r[key] / 2 ** 20 if key == "peak_bytes" else r[key] for r in sel]
            name = " ".join(group) + (f" (slope {slope[group]:.2f})" if key == "peak_bytes" and group in slope else "")
            ax.plot([r["source_bytes"] / 2 ** 20 for r in sel], ys, marker="o", ms=3,
                    ls="-" if group[1] == "lazy" else "--", label=name)
        ax.set_xlabel("one source (MiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("merging two language models: memory and time against their size", fontsize=10)
    return _save(fig, path)


def cost_ratios(result: dict, path: Path) -> Path:
    fig, axes = _grid(2, 5.2, 3.8)
    rows = result["rows"]
    for ax, key, label in zip(axes, ("time_ratio", "memory_ratio"), ("time", "peak memory")):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["method"] == method and r.get(key) is not None]
            if sel:
                ax.plot([r["n"] for r in sel], [r[key] for r in sel], marker="o", ms=3, label=method)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xlabel("models merged")
        ax.set_ylabel(f"{label} / distillation's")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"cost on {result.get('device', '?')}, {result.get('precision', '?')}", fontsize=10)
    return _save(fig, path)
