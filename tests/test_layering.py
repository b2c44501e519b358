"""The house in order: the library apart from its harness, imports at the top, a fast --help."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import foldmerge

SRC = Path(foldmerge.__file__).parent
# third-party packages imported inside functions, each for a start-up cost its module states
LAZY = {"transformers", "huggingface_hub", "lightning_fabric", "ot", "datasets", "torch.distributed.fsdp",
        "torch.distributed.device_mesh"}


def test_the_import_contracts_hold():
    # pyproject.toml [tool.importlinter]: layers (the library never imports bench or the command
    # line; each module only those below it) and no import circles in any package
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], capture_output=True, text=True,
                          cwd=SRC.parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_imports_are_at_the_top_of_modules_but_the_measured_few():
    inside = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                else:
                    continue
                bad = [n for n in names if not any(n == k or n.startswith(k + ".") for k in LAZY)]
                if bad:
                    inside.append(f"{path.relative_to(SRC)}:{node.lineno} {bad[0]}")
                elif "start" not in path.read_text():       # the module says why (its start-up cost)
                    inside.append(f"{path.relative_to(SRC)}:{node.lineno} {names[0]} without its reason")
    assert inside == []


def test_help_and_version_load_no_torch():
    code = ("import sys\nfrom foldmerge.cli import main\n"
            "for argv in (['--help'], ['--version'], ['merge'][:0] + ['--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "merge" in proc.stdout and "foldmerge 0" in proc.stdout


CITATION = re.compile(r"DESIGN|\bissues? #?\d|shared/seeds|\.\./shared", re.IGNORECASE)


def test_nothing_cites_what_lies_outside_the_repository():
    # code, help, tests, examples and docs cite no design notes, issue numbers or files outside the repository
    root = SRC.parent.parent
    files = [p for pattern in ("src/**/*.py", "tests/*.py", "examples/*.py", "docs/**/*.md", "*.md", "*.yml",
                               "pyproject.toml", "Makefile")
             for p in root.glob(pattern) if "docs/report" not in str(p)]
    cited = [f"{p.relative_to(root)}:{i}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if CITATION.search(line) and p.name != "test_layering.py"]
    assert len(files) > 50 and cited == []
