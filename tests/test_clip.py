"""A whole CLIPModel merges tower by tower (`foldmerge.clip`): from the command line, into one
CLIPModel per source that transformers loads; the assembly is exact; bad input is one line; and
`foldmerge bench clip` runs on tiny sources (its measured run: docs/huggingface.md)."""
import numpy as np
import pytest
import torch

import foldmerge
from foldmerge import cli
from foldmerge.clip import load_clip

TEXT = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, vocab_size=40,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=39)
VISION = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, image_size=8,
              patch_size=4, num_channels=1)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def make(path, seed, dim=6):
    import transformers
    torch.manual_seed(seed)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=dim)
                           ).save_pretrained(path)
    return path


def inputs(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 39, (n, 10), generator=g)
    ids[:, 7] = 39                                # the end-of-text token, padding after it
    ids[:, 8:] = 0
    return torch.randn(n, 1, 8, 8, generator=g), ids


def clip_outputs(path, images, ids):
    import transformers
    with torch.no_grad():
        return transformers.CLIPModel.from_pretrained(path).eval()(input_ids=ids, pixel_values=images)


def test_towers_read_as_the_clip_computes_them(tmp_path):
    images, ids = inputs(4)
    image, text, scale = load_clip(make(tmp_path / "clip a", 0))
    theirs = clip_outputs(tmp_path / "clip a", images, ids)
    with torch.no_grad():
        ours = (torch.nn.functional.normalize(image(images)[0], dim=-1), torch.nn.functional.normalize(text(ids)[0], dim=-1))
    torch.testing.assert_close(ours[0], theirs.image_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs.text_embeds, rtol=0, atol=1e-6)
    assert image.arch == "clip-vision" and text.arch == "clip-text" and image.head_kind == "projection"
    assert scale.exp().item() == pytest.approx(theirs.logits_per_image[0, 0].item() / (ours[0][0] @ ours[1][0]).item(), rel=1e-4)


def test_a_command_line_merge_writes_a_clip_per_source_that_transformers_loads(tmp_path, capsys):
    """Averaging a CLIP with a copy of itself gives it back: each written CLIPModel computes what the source
    does (exact assembly of towers, projections and logit scale); FS-Merge's loads and runs."""
    a = make(tmp_path / "clip a", 0)
    b = tmp_path / "clip b"
    import shutil
    shutil.copytree(a, b)
    images, ids = inputs()
    np.save(tmp_path / "images.npy", images.numpy())
    np.save(tmp_path / "texts.npy", ids.numpy())
    data = [str(tmp_path / "images.npy"), str(tmp_path / "texts.npy")] * 2
    out = tmp_path / "merged clips"
    assert cli.main(["merge", str(a), str(b), "--data", *data, "--method", "average", "--per-task", "8",
                     "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    want = clip_outputs(a, images, ids)
    for task in ("clip_a", "clip_b"):
        got = clip_outputs(out / "hf" / task, images, ids)
        torch.testing.assert_close(got.logits_per_image, want.logits_per_image, rtol=1e-5, atol=1e-5)
    assert foldmerge.load(out).arch == "clip-vision" and foldmerge.load(out / "text-tower").arch == "clip-text"
    assert "in memory" not in (out / "README.md").read_text()          # each source's weights' hash
    # task arithmetic from a CLIPModel start: each tower's task vectors from that start's tower (zero here)
    out_ta = tmp_path / "ta"
    assert cli.main(["merge", str(a), str(b), "--data", *data, "--method", "task-arithmetic", "--base", str(a),
                     "--per-task", "8", "--out", str(out_ta), "--quiet"]) == 0, capsys.readouterr().err
    got = clip_outputs(out_ta / "hf" / "clip_a", images, ids)
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image, rtol=1e-5, atol=1e-5)
    other = make(tmp_path / "clip c", 1, dim=4)          # another start, another embedding width
    out2 = tmp_path / "fs"
    assert cli.main(["merge", str(a), str(other), "--data", *data, "--epochs", "2", "--per-task", "8",
                     "--fidelity", "8", "--out", str(out2)]) == 0, capsys.readouterr().err
    assert "cosine" in capsys.readouterr().out
    got = clip_outputs(out2 / "hf" / "clip_c", images, ids)
    assert got.logits_per_image.shape == (16, 16) and got.image_embeds.shape == (16, 4)
    assert torch.isfinite(got.logits_per_image).all()


def test_bad_clip_input_is_one_line_and_nothing_is_written(tmp_path, capsys):
    import transformers
    a, b = make(tmp_path / "a", 0), make(tmp_path / "b", 1)
    bert = tmp_path / "bert"
    transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=40)
    ).save_pretrained(bert)
    images, ids = inputs()
    np.save(tmp_path / "images.npy", images.numpy())
    np.save(tmp_path / "texts.npy", ids.numpy())
    i, t = str(tmp_path / "images.npy"), str(tmp_path / "texts.npy")
    out = tmp_path / "out"
    capsys.readouterr()
    for models, data, says in [((a, bert), [i, t, t, t], "CLIPModel folders only"),
                               ((a, b), [i, t], "two entries per model"),
                               ((a, b), [t, i, i, t], "reads images"),
                               ((a, b), [i, t, i, t, "--eval-data", t, t], "does not apply")]:
        code = cli.main(["merge", *map(str, models), "--data", *data, "--per-task", "8", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and says in err, err
        assert not out.exists()
    with pytest.raises(foldmerge.io.ModelFileError, match="two towers"):
        foldmerge.load(a)


def test_bench_clip_runs_on_tiny_sources(monkeypatch, tmp_path):
    import json

    from foldmerge.bench import clip as bench
    from foldmerge.bench.report import build_report
    from foldmerge.data import Task
    split = Task.split
    monkeypatch.setattr(Task, "split", lambda self, which: tuple(t[:256] for t in split(self, which)))
    monkeypatch.setattr(bench, "TRAIN", {**bench.TRAIN, "epochs": 1, "limit": 256})
    monkeypatch.setattr(bench, "TEST", 64)
    monkeypatch.setattr(bench, "PER_TASK", 16)
    monkeypatch.setattr(bench, "PLAN", [(n, m, {**o, "epochs": 1} if o else o) for n, m, o in bench.PLAN])
    r = bench.run_bench(methods=["average", "fs-merge"], out=str(tmp_path))
    assert [(row["method"], row["task"]) for row in r["rows"]] == [
        (m, t) for m in ("originals", "average", "fs-merge diag+lowrank(12)") for t in ("mnist", "fmnist")]
    assert all(0 <= row["zero_shot"] <= 100 and -1 <= row["matched"] <= 1 for row in r["rows"])
    r.update(command="foldmerge bench clip", environment={"machine": "test"})
    (tmp_path / "bench-clip.json").write_text(json.dumps(r))
    build_report([str(tmp_path / "bench-clip.json")], str(tmp_path / "report"), "x")
    assert "image-text alignment" in (tmp_path / "report" / "report.md").read_text()
    bench.print_report(r, "x")
