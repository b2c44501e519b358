"""The docs build (mkdocs-material, strict: a moved section cannot leave a dead link or a missing
page), and the README: at most 250 lines, no images (it renders on PyPI), every link resolves."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_build_in_strict_mode(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def anchors(md: str) -> set[str]:
    """The anchors of a Markdown page's headings, as mkdocs makes them."""
    out = set()
    for line in md.splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            text = re.sub(r"[`*_]", "", m.group(1)).strip().lower()
            out.add(re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", text)))
    return out


def test_the_readme_is_short_has_no_images_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "![" not in text and "<img" not in text
    first_screen = "\n".join(text.splitlines()[:30])
    assert "make demo" in first_screen and "make test" in first_screen
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / path if path else ROOT / "README.md"
        assert page.exists(), target
        if anchor and page.suffix == ".md":
            assert anchor in anchors(page.read_text()), target


def test_the_defaults_page_shows_the_family_table():
    from foldmerge.arch import defaults
    page = (ROOT / "docs" / "defaults.md").read_text()
    lines = [l for l in page.splitlines() if l.startswith("| ")]
    for family in ("mlp", "vit"):
        for group, g in defaults.ROWS[family].groups.items():
            for key, value in g.values.items():
                if group == "ensemble":
                    continue
                flag = "`--" + key.replace("_", "-") + "`"
                row = [l for l in lines if l.startswith(f"| {group} | ") and flag in l.split("|")[2]]
                assert row, (group, key)
                shown = "whole sample" if value is None else ("20/15000" if value == 20 / 15000 else f"`{value}`")
                assert shown in row[0], (family, group, key, row[0])


def test_the_defaults_page_shows_every_fixed_default_and_the_source_recipes():
    from foldmerge.api import SETTINGS
    from foldmerge.arch import defaults
    from foldmerge.methods import METHODS
    from foldmerge.options import Rule
    page = (ROOT / "docs" / "defaults.md").read_text()
    rows = [l for l in page.splitlines() if l.startswith("| ")]
    for owner, option in [(m.name, o) for m in METHODS.values() for o in m.options] + [("", o) for o in SETTINGS]:
        if option.default is None or isinstance(option.default, Rule) or isinstance(option.default, bool):
            continue
        cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows]
        mine = ["|".join(c) for c in cells if (owner and len(c) > 2 and owner in c[0] and c[1] == f"`{option.flag}`")
                or (not owner and c[0] == f"`{option.flag}`")]
        assert mine, (owner, option.name)
        assert f"`{option.default}`" in mine[0], (owner, option.name, mine[0])
    words = {"pretrain_epochs": "pre-training epochs {}", "epochs": "epochs {}", "lr": "lr {}", "batch_size": "batch {}",
             "weight_decay": "weight decay {}", "momentum": "momentum {}", "limit": "{} images"}
    for family, group in defaults.SOURCES.items():
        row = next(r for r in rows if r.startswith(f"| `{family}`") and "batch" in r)
        for key, value in group.values.items():
            shown = words[key].format(f"{value:g}")
            assert shown in row.replace("fine-tuning epochs", "epochs"), (family, key, shown)


def test_every_merge_setting_is_in_the_command_line_page_and_its_yaml_keys():
    """docs/cli.md's settings table names every merge setting's flag, and its YAML key list every one
    a file may set (all but those a YAML file gives otherwise: its models' data and tasks)."""
    from foldmerge.api import SETTINGS
    page = (ROOT / "docs" / "cli.md").read_text()
    keys = page[page.index("The keys:"):page.index("Relative paths in the file")]
    assert [o.flag for o in SETTINGS if f"`{o.flag}" not in page] == []
    assert [o.name for o in SETTINGS if o.name not in ("data", "tasks") and f"`{o.name}`" not in keys] == []
