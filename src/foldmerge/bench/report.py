"""`foldmerge report RESULTS.json… --out DIR`: a Markdown and a self-contained HTML report, with PNG
figures (`foldmerge.bench.figures`), from the --json files of benches, merges and evaluations.

The report opens with a table of contents and a summary table (per setting: the best merge at one
model's size, distillation, the originals and the ensemble), then one section per kind of result
in a fixed order (MLP, ViT, text, CNN, one start (gating), scale, data efficiency, cost, then the
rest), each result under its own heading with the machine, date, commit and command of its run as
far as its JSON recorded them. Every input is read and checked before anything is written; the
report is built beside DIR and moved into place when complete; DIR is replaced only if it holds a
report.
"""
from __future__ import annotations

import base64
import html
import os
import re
import shutil
from pathlib import Path

from ..commands import command_line
from ..io import REPORT_SIGNATURE, carry_over, check_target, identity, swap_in, tmp_beside
from ..provenance import environment
from ..tables import print_json
from .figures import accuracy_against, accuracy_bars, cost_ratios, efficiency_curves, scale_gap, scaling_curves
from .results import (
    REFERENCES,
    SIZE_TOLERANCE,
    evaluations,
    kind,
    load_result,
    points,
    reference,
    settings,
    signed,
    summary,
)

MARK = "report.md"      # a directory holding this is a report, and may be replaced by a new one
# the sections, in this order: result kind -> heading
TOPICS = {"mlp": "MLP", "vit": "ViT", "text": "Text (BERT)", "cnn": "CNN", "same-task": "Models of one task",
          "families": "Hugging Face families", "tune-fs": "FS-Merge against distillation, tuned alike",
          "clip": "CLIP: what a merge keeps of the image-text alignment", "lm": "Language models",
          "scaling": "Merges bigger than memory", "gating": "One start (gating)",
          "scale": "Scale", "data-efficiency": "Data efficiency", "cost": "Cost", "defaults": "Defaults",
          "select": "Label-free selection", "merge": "Merges", "eval": "Evaluations"}
# the benches that compare methods at fixed settings, one summary row per setting; what a replicate is
REPLICATE = {"mlp": "seed", "vit": "pair", "text": "pair", "cnn": "seed", "same-task": "seed", "families": "pair",
             "gating": "run", "defaults": "pair"}


def add_arguments(p) -> None:
    p.add_argument("results", nargs="+", metavar="RESULTS.json",
                   help="--json files of any foldmerge bench, of `foldmerge merge` or of `foldmerge eval`")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="report directory (report.md, report.html, *.png); an earlier report there is replaced")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def run(args) -> None:
    done = build_report(args.results, args.out, command_line())
    if args.json:
        print_json(done)
        return
    print(f"report of {len(done['results'])} result(s) written to {done['out']}: {', '.join(done['files'])}")


# ------------------------------------------------------------------ the report
def build_report(paths: list[str], out: str, command: str) -> dict:
    """Write DIR/report.md, DIR/report.html and DIR/*.png; returns what was written."""
    results = [(Path(p).name, load_result(p)) for p in paths]      # every input checked before any write
    names = [n for n, _ in results]
    if len(set(names)) < len(names):
        raise ValueError("two results share a file name; their figures would collide")
    # an earlier report there is replaced, never anything else, nor a folder that holds an input
    target = check_target(out, force=True, inputs=paths, kind="report")
    seen = identity(target)
    tmp = tmp_beside(target)
    try:
        blocks = [("toc",)] + summary_section(results) + sections(results, tmp)
        env = environment()
        intro = [f"made by `{command}`", f"from {len(results)} result file(s): {', '.join(names)}",
                 f"report written with foldmerge {env['foldmerge']} at commit {env['git_commit']}; every number "
                 "below is read from the result files, which the commands that wrote them measured"]
        title = "foldmerge results"
        os.chmod(tmp, 0o755)        # mkdtemp makes it private; a report is meant to be read
        (tmp / MARK).write_text(markdown(title, intro, blocks) + "\n")
        (tmp / "report.html").write_text(to_html(title, intro, blocks, tmp))
        if target.exists():                  # what else the folder held stays: a report replaces its own files
            carry_over(target, tmp, own=_written_by_a_report(target))
        swap_in(tmp, target, seen)
    except (TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        # a value the checks of `load_result` let through but the tables or figures cannot use
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(e).splitlines() or [""])[0][:120]
        raise ValueError(f"{', '.join(names)}: a value of an unexpected type or shape ({type(e).__name__}: "
                         f"{first}); was the file edited?") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(target), "files": sorted(p.name for p in target.iterdir()), "results": names}


def _written_by_a_report(folder: Path) -> frozenset:
    """The files an earlier report in `folder` wrote: its pages and the figures its page shows."""
    page = folder / MARK
    figures = re.findall(r"!\[[^\]]*\]\(([^)/]+)\)", page.read_text(errors="replace")) if page.is_file() else []
    return frozenset([MARK, "report.html", *figures])


def ordered(results: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The results in the order of the sections (`TOPICS`), each kind's in the order given."""
    order = list(TOPICS)
    return sorted(results, key=lambda nr: order.index(kind(nr[1])))


# ------------------------------------------------------------------ the summary
def summary_section(results: list[tuple[str, dict]]) -> list[tuple]:
    """The summary table: one row per setting of the benches that compare methods at fixed settings."""
    body, larger = [], []
    for name, result in ordered(results):
        bench = kind(result)
        if bench not in REPLICATE:
            continue
        found = settings(summary(points(result)))
        body += [_summary_row(s, name, REPLICATE[bench]) for s in found]
        left_out = list(dict.fromkeys(m for s in found for m in s["larger"]))
        if left_out:
            larger.append(f"{name}: {', '.join(left_out)}")
    blocks: list[tuple] = [("h2", "Summary")]
    if not body:
        return blocks + [("p", f"No bench here compares methods at fixed settings ({', '.join(REPLICATE)}); the "
                               "sections below have what the results hold.")]
    blocks.append(("p", "Per setting: the best merge into one model of one original's size, distillation, the "
                        "originals and the ensemble. Cells: per-task test accuracy % ± sample std over the replicates "
                        "/ joint test accuracy % (– where not measured), means as in each section's table; n: the "
                        "replicates of the best merge."))
    blocks.append(("table", ["setting", "result", "n", "best merge", "its accuracy", "distillation", "originals",
                             "ensemble"], body))
    blocks.append(("p", _rule(larger)))
    others = [TOPICS[k] for k in TOPICS if k not in REPLICATE and any(kind(r) == k for _, r in results)]
    if others:
        blocks.append(("p", "Not in this table, as they vary the model or the data, measure cost or are single "
                            f"runs: {', '.join(others)} (see their sections)."))
    return blocks


def _summary_row(s: dict, name: str, unit: str) -> list[str]:
    present = [r for r in (s["merge"], s["distill"], s["originals"], s["ensemble"]) if r]
    n = (s["merge"] or present[0])["n"] if present else 0
    return [s["panel"], name, f"{n} {unit}{'' if n == 1 else 's'}", s["merge"]["method"] if s["merge"] else "–",
            _cell(s["merge"]), _cell(s["distill"]), _cell(s["originals"]), _cell(s["ensemble"])]


def _cell(row: dict | None) -> str:
    return "–" if row is None else f"{_fmt(row['per_task'], row['per_task_std'])} / {_fmt(row['joint'])}"


def _rule(larger: list[str]) -> str:
    names = ", ".join(sorted(REFERENCES))
    rule = ("Best merge: the highest per-task mean among the rows that are a merge into one model of one "
            f"original's size. Not merges: the reference levels (rows named {names}) and distillation (rows "
            "whose name starts with 'distill'); FS-Merge, though trained like distillation, folds into one "
            "model of one original's size and counts as a merge. Larger than one model: where the bench recorded the "
            f"MFLOPs of one forward (cnn, gating), a row above {SIZE_TOLERANCE:g} × the originals' (one "
            "original's forward)")
    return rule + (f"; left out by that: {'; '.join(larger)}." if larger else "; none here.")


# ------------------------------------------------------------------ the sections
def sections(results: list[tuple[str, dict]], folder: Path) -> list[tuple]:
    """One section per kind of result, in `TOPICS` order; under it, one part per result file."""
    blocks = []
    for topic, heading in TOPICS.items():
        chosen = [(name, result) for name, result in results if kind(result) == topic]
        if chosen:
            blocks.append(("h2", heading))
        for name, result in chosen:
            blocks += evaluation_part(result, name) if topic in ("merge", "eval") else bench_part(result, name, folder)
    return blocks


def bench_part(result: dict, name: str, folder: Path) -> list[tuple]:
    """The blocks of one bench result: ('h3', text), ('li', [text]), ('img', file), ('table', header, body)."""
    bench = result["bench"]
    blocks: list[tuple] = [("h3", name), ("li", _run_facts(result) + _fidelity_facts(result))]
    stem = name.removesuffix(".json")
    figs = []
    if bench == "cost":
        figs.append(cost_ratios(result, folder / f"{stem}-ratios.png"))
    elif bench == "scale":
        figs.append(scale_gap(result, folder / f"{stem}-gap.png"))
    elif bench == "data-efficiency":
        figs.append(efficiency_curves(result, folder / f"{stem}-curves.png"))
    elif bench == "scaling":
        figs.append(scaling_curves(result, folder / f"{stem}-curves.png"))
    rows = summary(points(result))
    if rows and bench not in ("scale", "data-efficiency"):
        figs.append(accuracy_bars(rows, folder / f"{stem}-accuracy.png",
                                  f"{bench}: per-task and joint test accuracy"))
    methods = [r for r in rows if not reference(r["method"])]        # what the cost figures place
    if any(r["seconds"] for r in methods):
        figs.append(accuracy_against(rows, "seconds", "wall seconds (merge + calibration)",
                                     folder / f"{stem}-time.png", f"{bench}: accuracy against wall time"))
    if any(r["params"] for r in methods):
        figs.append(accuracy_against(rows, "params", "learnable parameters", folder / f"{stem}-params.png",
                                     f"{bench}: accuracy against learnable parameters"))
    blocks += [("img", f.name) for f in figs]
    special = _special_table(result)
    if special:
        blocks.append(("table",) + special)
    elif rows:
        blocks.append(("p", "per-task ± std / joint test accuracy %, mean over replicates; reference levels first"))
        blocks.append(("table",) + _accuracy_table(rows))
    return blocks


def evaluation_part(result: dict, name: str) -> list[tuple]:
    """A merge's or an eval's --json: what it records of its run, and a table of its accuracies."""
    rows = evaluations(result)
    tasks = list(dict.fromkeys(t for r in rows for t in r["per_task"]))
    body = [[r["model"], r["method"]] + [_pair(r["per_task"].get(t), r["joint"].get(t)) for t in tasks]
            + [_pair(r["per_task_mean"], r["joint_mean"])] for r in rows]
    return [("h3", name), ("li", _evaluation_facts(result)),
            ("p", "per-task / joint test accuracy % of each model, on each task and their mean (– where not measured)"),
            ("table", ["model", "method"] + tasks + ["mean"], body)]


def _pair(per_task, joint) -> str:
    return "–" if per_task is None and joint is None else f"{_fmt(per_task)} / {_fmt(joint)}"


def _evaluation_facts(result: dict) -> list[str]:
    if kind(result) == "eval":
        return ["`foldmerge eval --json`: it records no command, machine, date or commit",
                f"split: {', '.join(dict.fromkeys(str(e.get('split', '?')) for e in result['results']))}"]
    meta = result["meta"]
    prov = meta.get("provenance") or {}
    missing = "not recorded in this JSON"
    options = ", ".join(f"{k}={v}" for k, v in (meta.get("options") or {}).items())
    seconds = meta.get("wall_seconds")
    return [f"command: `{meta.get('command') or missing}`",
            f"machine: {prov.get('machine') or missing}" + (f"; {prov['threads']} torch threads" if prov.get("threads") else ""),
            f"commit: {prov.get('git_commit') or missing}",
            f"merged model: {result['out']}; options: {options or 'none recorded'}",
            "wall time: " + ("not recorded" if seconds is None else f"{seconds:.1f} s (merge + calibration)")]


def _run_facts(result: dict) -> list[str]:
    env = result.get("environment") or {}
    missing = "not recorded in this JSON (written before benches recorded it)"
    return [f"command: `{result['command']}`",
            f"machine: {env.get('machine') or missing}" + (f"; {env['threads']} torch threads" if env.get("threads") else ""),
            f"date: {result.get('date') or missing}",
            f"commit: {env.get('git_commit') or missing}",
            _wall_time(result)]


def _fidelity_facts(result: dict) -> list[str]:
    """The rank correlation of label-free fidelity with test accuracy, where the bench measured it."""
    c = result.get("correlation")
    if not isinstance(c, dict) or c.get("pooled") is None:
        return []
    cells = c.get("per_cell") or {}
    spread = f"; per cell {min(cells.values()):+.2f} to {max(cells.values()):+.2f}" if cells else ""
    return [f"fidelity (agreement with the sources, no labels) against test accuracy: Spearman's rho "
            f"{c['pooled']:+.2f} over {c.get('merges', '?')} merges pooled{spread}"]


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
    methods = [m for m in methods if reference(m)] + [m for m in methods if not reference(m)]
    body = []
    for m in methods:
        cells = []
        for p in panels:
            r = next((r for r in rows if (r["panel"], r["method"]) == (p, m)), None)
            cells.append(_cell(r))
        body.append([m] + cells)
    return ["method"] + panels, body


def _special_table(result: dict) -> tuple[list[str], list[list[str]]] | None:
    bench = result["bench"]
    if bench == "cost":
        return (["n", "method", "seconds", "× distill time", "peak MiB", "× distill memory"],
                [[str(r["n"]), r["method"], f"{r['seconds']:.2f}", _ratio(r.get("time_ratio")),
                  "–" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.1f}",
                  _ratio(r.get("memory_ratio"))] for r in result["rows"]])
    if bench == "tune-fs":      # validation accuracy: never in the test-accuracy tables and figures
        best = {}
        for r in result["rows"]:
            if r["method"] == "distill" and r["val_per_task"] > best.get(r["cell"], -1.0):
                best[r["cell"]] = r["val_per_task"]
        return (["cell", "method", "trial", "val per-task %", "val joint %", "minus distill's best", "seconds"],
                [[r["cell"], r["method"], r["trial"], f"{r['val_per_task']:.2f}", _fmt(r.get("val_joint")),
                  "–" if r["cell"] not in best else f"{r['val_per_task'] - best[r['cell']]:+.2f}",
                  _ratio(r.get("seconds"))] for r in result["rows"]])
    if bench == "lm":           # perplexity, not accuracy
        domains = result["domains"]
        return (["shape", "setting", "model"] + [f"ppl {d}" for d in domains] + ["seconds", "peak MiB"],
                [[r.get("shape", "llama"), r["setting"], r["method"], *(_ratio(r.get(f"ppl {d}")) for d in domains),
                  _ratio(r.get("seconds")), "–" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2 ** 20:.0f}"]
                 for r in result["rows"]])
    if bench == "scaling":      # memory and time, not accuracy
        return (["width", "dtype", "one source MiB", "method", "mode", "peak MiB", "peak / one source", "seconds"],
                [[str(r["width"]), r["dtype"], f"{r['source_bytes'] / 2 ** 20:.0f}", r["method"], r["mode"],
                  f"{r['peak_bytes'] / 2 ** 20:.0f}", f"{r['peak_bytes'] / r['source_bytes']:.2f}", _ratio(r["seconds"])]
                 for r in result["rows"]])
    if bench == "clip":         # zero-shot accuracy and alignment: not the classifiers' per-task / joint tables
        return (["method", "task", "zero-shot %", "matched similarity", "image cosine", "text cosine", "seconds"],
                [[r["method"], r["task"], f"{r['zero_shot']:.1f}", f"{r['matched']:.3f}", _ratio(r.get("image_cosine")),
                  _ratio(r.get("text_cosine")), _ratio(r.get("seconds"))] for r in result["rows"]])
    if bench == "scale":
        return (["ViT", "source params", "originals", "distill", "fs-merge", "gap per task", "gap joint", "seeds"],
                [[f"w{g['width']} d{g['depth']}", f"{g['source_parameters']:,}", str(g["originals"]),
                  _fmt(g["per_task_of"].get("distill")), _fmt(g["per_task_of"].get("fs-merge diag+lowrank(12)")),
                  signed(g["gap_per_task"], g["gap_per_task_std"]), signed(g["gap_joint"], g["gap_joint_std"]),
                  str(g["seeds"])] for g in result["gaps"]])
    return None


def _ratio(v):
    return "–" if v is None else f"{v:.2f}"


# ------------------------------------------------------------------ Markdown and HTML
def slug(text: str) -> str:
    """A heading's anchor as mkdocs (Python-Markdown's toc) makes it: word characters, spaces and
    hyphens kept, lower case, each run of spaces and hyphens one hyphen."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def headings(blocks: list[tuple]) -> list[tuple[int, str, str]]:
    """(level, text, anchor) of every h2 and h3, in order; a repeated anchor gets _1, _2 as mkdocs gives it."""
    out, seen = [], set()
    for b in blocks:
        if b[0] in ("h2", "h3"):
            anchor, k = slug(b[1]), 0
            while anchor in seen:
                k += 1
                anchor = f"{slug(b[1])}_{k}"
            seen.add(anchor)
            out.append((int(b[0][1]), b[1], anchor))
    return out


def markdown(title: str, intro: list[str], blocks: list[tuple]) -> str:
    out = [REPORT_SIGNATURE, "", f"# {title}", ""] + [f"{line}  " for line in intro] + [""]
    for b in blocks:
        if b[0] == "toc":
            out += ["**Contents**", ""]
            out += [f"{'  ' * (level - 2)}- [{text}](#{anchor})" for level, text, anchor in headings(blocks)] + [""]
        elif b[0] in ("h2", "h3"):
            out += [f"{'#' * int(b[0][1])} {b[1]}", ""]
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


def to_html(title: str, intro: list[str], blocks: list[tuple], folder: Path) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
           "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
           "</style></head><body>", f"<h1>{e(title)}</h1>"] + [f"<p>{e(line)}</p>" for line in intro]
    anchors = iter(headings(blocks))
    for b in blocks:
        if b[0] == "toc":
            out.append(_html_toc(headings(blocks)))
        elif b[0] in ("h2", "h3"):
            out.append(f"<{b[0]} id='{next(anchors)[2]}'>{e(b[1])}</{b[0]}>")
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


def _html_toc(found: list[tuple[int, str, str]]) -> str:
    """The contents as nested lists: each h3 in the list of the h2 above it."""
    groups: list[tuple[str, list[str]]] = []
    for level, text, anchor in found:
        link = f"<a href='#{anchor}'>{html.escape(text)}</a>"
        if level == 2 or not groups:
            groups.append((link, []))
        else:
            groups[-1][1].append(link)
    items = "".join(f"<li>{link}" + (f"<ul>{''.join(f'<li>{c}</li>' for c in sub)}</ul>" if sub else "") + "</li>"
                    for link, sub in groups)
    return f"<nav><p><b>Contents</b></p><ul>{items}</ul></nav>"
