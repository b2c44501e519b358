"""`foldmerge report RESULTS.json... --out DIR`: a Markdown and a self-contained HTML report, with
PNG figures (matplotlib, Agg), from any benches' --json output.

Per result: bars of per-task and joint accuracy per method (error bars: sample std over the
bench's replicates, seeds or pairs), accuracy against wall time and against learnable parameters
where the bench recorded them, and the figure of its own question (cost: time and memory ratios
to distillation; data-efficiency: accuracy against original examples per task; scale:
FS-Merge minus distillation against model size). Each section names the machine, date, commit
and command of its run, as far as the JSON recorded them. Every input is read and checked
before anything is written; the report is built beside DIR and moved into place when complete.
"""
from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from ..provenance import environment
from .results import load_result, points, signed, summary

MARK = "report.md"      # a directory holding this is a report, and may be replaced by a new one


def _grid(n: int):
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows))      # no pyplot: no global figure state or backend
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def accuracy_bars(rows: list[dict], path: Path, title: str) -> Path:
    panels = list(dict.fromkeys(r["panel"] for r in rows))
    fig, axes = _grid(len(panels))
    for ax, panel in zip(axes, panels):
        sel = [r for r in rows if r["panel"] == panel]
        xs = range(len(sel))
        ax.bar([x - 0.2 for x in xs], [r["per_task"] for r in sel], 0.4, yerr=[r["per_task_std"] or 0 for r in sel],
               capsize=2, label="per-task")
        ax.bar([x + 0.2 for x in xs], [r["joint"] or 0 for r in sel], 0.4,
               yerr=[r["joint_std"] or 0 for r in sel], capsize=2, label="joint")
        ax.set_xticks(list(xs), [r["method"] for r in sel], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy %")
        ax.set_title(panel, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def accuracy_against(rows: list[dict], key: str, label: str, path: Path, title: str) -> Path:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for panel in dict.fromkeys(r["panel"] for r in rows):
        sel = [r for r in rows if r["panel"] == panel and r[key]]
        front = pareto_front(sel, key)
        dots = ax.scatter([r[key] for r in front], [r["per_task"] for r in front], label=panel, s=20)
        rest = [r for r in sel if r not in front]
        ax.scatter([r[key] for r in rest], [r["per_task"] for r in rest], s=12, alpha=0.35,
                   color=dots.get_facecolor()[0])
        for r in front:
            ax.annotate(r["method"], (r[key], r["per_task"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("per-task test accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title + "\nnamed: each panel's best for its cost (the rest faint; all in the table)", fontsize=9)
    return _save(fig, path)


def pareto_front(rows: list[dict], key: str) -> list[dict]:
    """The rows no other row beats on both accuracy and `key` (cost): more accurate than every cheaper one."""
    front, best = [], float("-inf")
    for r in sorted(rows, key=lambda r: (r[key], -r["per_task"])):
        if r["per_task"] > best:
            front.append(r)
            best = r["per_task"]
    return front


def efficiency_curves(result: dict, path: Path) -> Path:
    fig, axes = _grid(2)
    curves = result["curves"]
    for ax, key in zip(axes, ("per_task", "joint")):
        for method in dict.fromkeys(c["method"] for c in curves if c["originals"] is not None):
            sel = sorted((c for c in curves if c["method"] == method and c["originals"] is not None),
                         key=lambda c: c["originals"])
            ax.errorbar([c["originals"] for c in sel], [c[key] for c in sel], yerr=[c[key + "_std"] or 0 for c in sel],
                        marker="o", ms=3, capsize=2, label=method)
        ens = next((c for c in curves if c["method"] == "ensemble"), None)
        if ens is not None and ens[key] is not None:
            ax.axhline(ens[key], color="grey", ls="--", label="ensemble (no merge data)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("original examples per task")
        ax.set_ylabel(f"{key.replace('_', '-')} test accuracy %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fill = f"augmented to {result['total_per_task']} per task" if result.get("total_per_task") else "no augmentation"
    fig.suptitle(f"data efficiency, {result['arch']} ({fill}); error bars: std over {result['seeds']} seed(s)",
                 fontsize=10)
    return _save(fig, path)


def scale_gap(result: dict, path: Path) -> Path:
    fig, axes = _grid(2)
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


def cost_ratios(result: dict, path: Path) -> Path:
    fig, axes = _grid(2)
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


# ------------------------------------------------------------------ the document
def _run_facts(result: dict) -> list[str]:
    env = result.get("environment") or {}
    missing = "not recorded in this JSON (written before benches recorded it)"
    return [f"command: `{result['command']}`",
            f"machine: {env.get('machine') or missing}" + (f"; {env['threads']} torch threads" if env.get("threads") else ""),
            f"date: {result.get('date') or missing}",
            f"commit: {env.get('git_commit') or missing}",
            _wall_time(result)]


def _wall_time(result: dict) -> str:
    if result.get("total_seconds") is None:
        return "wall time: not recorded"
    line = f"wall time: {result['total_seconds'] / 60:.1f} min"
    if result.get("cells_from_cache"):
        # a resumed or re-assembled run: its own time leaves out the cells measured before
        merged = sum(r["seconds"] for r in result.get("rows", []) if isinstance(r.get("seconds"), (int, float)))
        of = f" of {result['cells']}" if result.get("cells") else ""     # files written before benches counted them
        line += (f" for this invocation, which read {result['cells_from_cache']}{of} cells back from earlier runs; "
                 f"the merges in it took {merged / 60:.1f} min when measured")
    return line


def _fmt(m, s=None):
    if m is None:
        return "–"
    return f"{m:.1f}" + (f" ± {s:.1f}" if s else "")


def _accuracy_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    panels = list(dict.fromkeys(r["panel"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    body = []
    for m in methods:
        cells = []
        for p in panels:
            r = next((r for r in rows if (r["panel"], r["method"]) == (p, m)), None)
            cells.append("–" if r is None else f"{_fmt(r['per_task'], r['per_task_std'])} / {_fmt(r['joint'])}")
        body.append([m] + cells)
    return ["method"] + panels, body


def _special_table(result: dict) -> tuple[list[str], list[list[str]]] | None:
    bench = result["bench"]
    if bench == "cost":
        return (["n", "method", "seconds", "× distill time", "peak MiB", "× distill memory"],
                [[str(r["n"]), r["method"], f"{r['seconds']:.2f}", _ratio(r.get("time_ratio")),
                  "–" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.1f}",
                  _ratio(r.get("memory_ratio"))] for r in result["rows"]])
    if bench == "scale":
        return (["ViT", "source params", "originals", "distill", "fs-merge", "gap per task", "gap joint", "seeds"],
                [[f"w{g['width']} d{g['depth']}", f"{g['source_parameters']:,}", str(g["originals"]),
                  _fmt(g["per_task_of"].get("distill")), _fmt(g["per_task_of"].get("fs-merge diag+lowrank(12)")),
                  signed(g["gap_per_task"], g["gap_per_task_std"]), signed(g["gap_joint"], g["gap_joint_std"]),
                  str(g["seeds"])] for g in result["gaps"]])
    return None


def _ratio(v):
    return "–" if v is None else f"{v:.2f}"


def _section(result: dict, name: str, folder: Path) -> list[tuple]:
    """The blocks of one result: ('h2', text), ('li', [text]), ('img', file), ('table', header, body)."""
    bench = result["bench"]
    blocks: list[tuple] = [("h2", f"{bench}: {name}"), ("li", _run_facts(result))]
    stem = name.removesuffix(".json")
    figs = []
    if bench == "cost":
        figs.append(cost_ratios(result, folder / f"{stem}-ratios.png"))
    elif bench == "scale":
        figs.append(scale_gap(result, folder / f"{stem}-gap.png"))
    elif bench == "data-efficiency":
        figs.append(efficiency_curves(result, folder / f"{stem}-curves.png"))
    rows = summary(points(result))
    if rows and bench not in ("scale", "data-efficiency"):
        figs.append(accuracy_bars(rows, folder / f"{stem}-accuracy.png",
                                  f"{bench}: per-task and joint test accuracy; error bars: std over replicates"))
    if any(r["seconds"] for r in rows):
        figs.append(accuracy_against(rows, "seconds", "wall seconds (merge + calibration)",
                                     folder / f"{stem}-time.png", f"{bench}: accuracy against wall time"))
    if any(r["params"] for r in rows):
        figs.append(accuracy_against(rows, "params", "learnable parameters", folder / f"{stem}-params.png",
                                     f"{bench}: accuracy against learnable parameters"))
    blocks += [("img", f.name) for f in figs]
    special = _special_table(result)
    if special:
        blocks.append(("table",) + special)
    elif rows:
        blocks.append(("p", "per-task ± std / joint test accuracy %, mean over replicates"))
        blocks.append(("table",) + _accuracy_table(rows))
    return blocks


def _markdown(title: str, intro: list[str], blocks: list[tuple]) -> str:
    out = [f"# {title}", ""] + [f"{line}  " for line in intro] + [""]
    for b in blocks:
        if b[0] == "h2":
            out += [f"## {b[1]}", ""]
        elif b[0] == "li":
            out += [f"- {x}" for x in b[1]] + [""]
        elif b[0] == "p":
            out += [b[1], ""]
        elif b[0] == "img":
            out += [f"![{b[1]}]({b[1]})", ""]
        else:
            header, body = b[1], b[2]
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(row) + " |" for row in body] + [""]
    return "\n".join(out)


def _html(title: str, intro: list[str], blocks: list[tuple], folder: Path) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
           "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
           "</style></head><body>", f"<h1>{e(title)}</h1>"] + [f"<p>{e(line)}</p>" for line in intro]
    for b in blocks:
        if b[0] == "h2":
            out.append(f"<h2>{e(b[1])}</h2>")
        elif b[0] == "li":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "img":     # inline, so the one file is the whole report
            data = base64.b64encode((folder / b[1]).read_bytes()).decode()
            out.append(f"<p><img alt='{e(b[1])}' src='data:image/png;base64,{data}'></p>")
        else:
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
                       + "</table>")
    return "\n".join(out + ["</body></html>"])


def build_report(paths: list[str], out: str, command: str) -> dict:
    """Write DIR/report.md, DIR/report.html and DIR/*.png; returns what was written."""
    results = [(Path(p).name, load_result(p)) for p in paths]      # every input checked before any write
    names = [n for n, _ in results]
    if len(set(names)) < len(names):
        raise ValueError("two results share a file name; their figures would collide")
    target = Path(out)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MARK).is_file())):
        raise ValueError(f"{target} exists and is not a report directory; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        blocks = []
        for name, result in results:
            blocks += _section(result, name, tmp)
        env = environment()
        intro = [f"made by `{command}`", f"from {len(results)} result file(s): {', '.join(names)}",
                 f"report written with foldmerge {env['foldmerge']} at commit {env['git_commit']}; every number "
                 "below is read from the result files, which the benches measured"]
        title = "foldmerge results"
        os.chmod(tmp, 0o755)        # mkdtemp makes it private; a report is meant to be read
        (tmp / MARK).write_text(_markdown(title, intro, blocks) + "\n")
        (tmp / "report.html").write_text(_html(title, intro, blocks, tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(target), "files": sorted(p.name for p in target.iterdir()), "results": names}
