"""The model card (README.md) a merge writes into every directory it saves, ready for
`huggingface-cli upload`: what was merged (each source with the hash of its weights), how (the
method and every option it used), from which data (counts, files), how faithful the merge is to its
sources without labels, its accuracy where labels were given, and the command and software."""
from __future__ import annotations


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def card(meta: dict, title: str = "a foldmerge merge", library: str = "foldmerge") -> str:
    """The card's Markdown, from a merged model's meta."""
    lines = ["---", f"library_name: {library}", "tags:", "- foldmerge", "- model-merging",
             f"- {meta.get('method', 'merge')}", "---", "", f"# {title}", "",
             f"Made by foldmerge with the method `{meta.get('method')}` from {len(meta.get('sources', []))} source "
             "models trained on different tasks; one backbone of one source's size, one head per task.", ""]
    lines += ["## Sources", "", "| model | tasks | weights (SHA-256) |", "|---|---|---|"]
    for s in meta.get("sources", []):
        lines.append(f"| `{s.get('path')}` | {', '.join(map(str, s.get('tasks', [])))} | "
                     f"`{s.get('sha256', 'in memory')}` |")
    if meta.get("lm_head"):
        lines += ["", f"The LM head is {meta['lm_head']}."]
    lines += ["", "## Method and options", "", f"`{meta.get('method')}`, seed {meta.get('seed')}:", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in sorted((meta.get("options") or {}).items())] or ["- (no option)"]
    sample = meta.get("merge_sample") or {}
    lines += ["", "## Data", ""]
    if "files" in sample:
        lines += [f"- `{f['source']}`: {f['examples']} {f['kind']} examples" for f in sample["files"]]
        lines.append(f"- {sample.get('per_task')} drawn per task (seed {sample.get('seed')})")
    elif "per_task" in sample:
        lines.append(f"- {sample['per_task']} unlabeled training examples per task of the built-in tasks, "
                     f"{sample.get('augment', 0)} augmented (seed {sample.get('seed')})")
    else:
        lines.append(f"- {next(iter(sample.values()), 'given as tensors')}")
    fid = meta.get("fidelity") or {}
    if fid and "cosine" in next(iter(fid.values())):      # projection heads: embeddings
        lines += ["", "## Fidelity to the sources (no labels needed)", "",
                  "On held-out unlabeled examples of each task: the mean cosine of the merge's embedding with "
                  "its source's.", "", "| task | examples | cosine |", "|---|---|---|"]
        lines += [f"| {t} | {f['examples']} | {f['cosine']:.4f} |" for t, f in fid.items()]
    elif fid and "perplexity" in next(iter(fid.values())):      # language models
        lines += ["", "## Perplexity (no labels needed)", "",
                  "On held-out text of each source: the source's perplexity, the sources' ensemble's (their "
                  "next-token probabilities averaged) and the merge's, and how often the source's and the merge's "
                  "next-token predictions agree.", "",
                  "| text of | examples | source | ensemble | merge | agreement % |", "|---|---|---|---|---|---|"]
        lines += [f"| {t} | {f['examples']} | {f['source_perplexity']:.2f} | {f['ensemble_perplexity']:.2f} | "
                  f"{f['perplexity']:.2f} | {_fmt(f['agreement'])} |" for t, f in fid.items()]
    elif fid:
        lines += ["", "## Fidelity to the sources (no labels needed)", "",
                  "On held-out unlabeled examples of each task: how often the merge predicts the class its "
                  "source predicts, and the mean KL divergence between their predictions.", "",
                  "| task | examples | agreement % | KL |", "|---|---|---|---|"]
        lines += [f"| {t} | {f['examples']} | {_fmt(f['agreement'])} | {f['kl']:.4f} |" for t, f in fid.items()]
    scores = meta.get("scores") or []
    if scores:
        split = scores[0].get("split", "test")
        where = "on the labelled examples given (--eval-data)" if split == "given" else f"({split} split)"
        lines += ["", f"## Accuracy {where}", "", "| model | task | per-task % | joint % |", "|---|---|---|---|"]
        for row in scores:
            for task, acc in row["per_task"].items():
                lines.append(f"| {row['model']} | {task} | {_fmt(acc)} | {_fmt((row.get('joint') or {}).get(task))} |")
    prov = meta.get("provenance") or {}
    lines += ["", "## How it was made", "", f"- command: `{meta.get('command', 'the Python API')}`",
              f"- foldmerge {prov.get('foldmerge')}, torch {prov.get('torch')}, Python {prov.get('python')}, "
              f"commit {prov.get('git_commit')}", f"- machine: {prov.get('machine')}",
              f"- {meta.get('wall_seconds', 0):.1f} s", ""]
    return "\n".join(lines)
