"""Ready to publish: `python -m build` makes a wheel and an sdist; the wheel installs into a fresh
virtual environment offline, its requirements resolved by pip against what this environment already
holds, and runs `foldmerge --version` and a tiny merge there."""
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*argv, **kw):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_wheel_builds_installs_offline_and_merges(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT, cwd=tmp_path)
    wheel = next(dist.glob("foldmerge-*.whl"))
    sdist = next(dist.glob("foldmerge-*.tar.gz"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "foldmerge/bench/paper_mlp.json" in names and "foldmerge/cli.py" in names
    assert "foldmerge/arch/families/roberta.json" in names       # the families' tables travel with the code
    assert "License-Expression: MIT" in meta
    assert "Description-Content-Type: text/markdown" in meta and "Provides-Extra: data" in meta
    assert "![" not in meta                        # the README renders without images, none broken
    with tarfile.open(sdist) as t:                 # what `make test` needs travels with the source
        names = t.getnames()
    for needed in ("/LICENSE", "/Makefile", "/constraints.txt", "/mkdocs.yml", "/docs/index.md", "/tests/test_docs.py",
                   "/examples/own_model.py"):
        assert any(n.endswith(needed) for n in names), needed

    venv = tmp_path / "fresh venv"                 # a path with a space
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # offline: the requirements are found among what is installed here, the package only in the wheel
    (Path(site) / "installed_here.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", py, "install", "--no-index", "-q", wheel)
    where = run(py, "-c", "import foldmerge, sys; print(foldmerge.__file__)", cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), where
    assert run(venv / "bin" / "foldmerge", "--version", cwd=tmp_path).stdout.startswith("foldmerge 0.")
    make = ("import torch\nfrom foldmerge import TaskModel\n"
            "for k, t in enumerate(['mnist:0-4', 'mnist:5-9']):\n"
            "    torch.manual_seed(k)\n"
            "    TaskModel('mlp', {'in_dim': 784, 'hidden': [8]}, [t]).save(f'm{k}')\n")
    run(py, "-c", make, cwd=tmp_path)
    out = run(venv / "bin" / "foldmerge", "merge", "m0", "m1", "--method", "zipit", "--per-task", "4",
              "--out", "merged", "--quiet", "--json", cwd=tmp_path).stdout
    assert '"per_task_mean"' in out and (tmp_path / "merged" / "model.safetensors").is_file()
