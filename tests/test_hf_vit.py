"""Hugging Face ViTs (`hf-vit` family): tiny random ViTForImageClassification models built from
configs, folded exactly, merged by every method, written back and loaded with the Auto classes."""
import pytest
import torch

import foldmerge
from foldmerge.hf import load_hf, save_hf
from foldmerge.io import ModelFileError
from foldmerge.model import TaskModel
from foldmerge.supernet import SuperNet

CFG = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12, image_size=28,
           patch_size=7, num_channels=1)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def hf_dir(tmp_path, name, seed, n_labels, cls="ViTForImageClassification", **over):
    import transformers
    torch.manual_seed(seed)
    c = transformers.ViTConfig(**{**CFG, **over}, num_labels=n_labels)
    model = getattr(transformers, cls)(c)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def images(n=5, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_folded_hf_vit_equals_its_supernet_and_first_folds_to_model_1():
    torch.manual_seed(0)
    models = [TaskModel("hf-vit", CFG, [t]).double() for t in ("mnist:0-4", "mnist:5-9")]
    x = images().double()
    sn = SuperNet(models, param="diag+lowrank(3)", init="random", seed=2)
    folded, wide = sn(x), sn(x, form="supernet")
    torch.testing.assert_close(folded, wide, atol=1e-10, rtol=1e-10)
    g1 = torch.autograd.grad(folded.square().sum(), list(sn.parameters()))
    g2 = torch.autograd.grad(wide.square().sum(), list(sn.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(sn.fold().features(x), folded, atol=1e-10, rtol=1e-10)
        first = SuperNet(models, init="first").fold()
        torch.testing.assert_close(first(x)[0], models[0](x)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("method", ["average", "regmean", "zipit", "permute", "opt", "distill", "fs-merge"])
def test_every_method_merges_hf_vits(method):
    torch.manual_seed(0)
    models = [TaskModel("hf-vit", CFG, [t]) for t in ("mnist:0-4", "mnist:5-9")]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    trained = {"epochs": 2} if method in ("distill", "fs-merge") else {}
    merged = foldmerge.merge(models, [images(6, 1), images(6, 2)], method=method, **trained)
    assert merged.arch == "hf-vit" and len(merged.heads) == 2
    for m, b in zip(models, before):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in b.items())


def test_hf_vit_directories_merge_and_load_back_with_auto_classes(tmp_path):
    from transformers import AutoModel, AutoModelForImageClassification
    a, b = hf_dir(tmp_path, "a", 0, 5), hf_dir(tmp_path, "b", 1, 5)
    (a / "preprocessor_config.json").write_text('{"image_processor_type": "ViTImageProcessor"}')
    src = [load_hf(a, "mnist:0-4"), load_hf(b, "mnist:5-9")]
    x = images()
    with torch.no_grad():
        hf_a = AutoModelForImageClassification.from_pretrained(a).eval()
        torch.testing.assert_close(src[0](x)[0], hf_a(pixel_values=x).logits)
    merged = foldmerge.merge(src, [images(8, 1), images(8, 2)], method="fs-merge", epochs=2)
    out = save_hf(merged, tmp_path / "merged", src)
    with torch.no_grad():
        ours = merged(x)
        for i, name in enumerate(["mnist_0-4", "mnist_5-9"]):
            task_model = AutoModelForImageClassification.from_pretrained(out / name).eval()
            torch.testing.assert_close(task_model(pixel_values=x).logits, ours[i], atol=1e-5, rtol=1e-5)
            assert (out / name / "preprocessor_config.json").is_file()
        base = AutoModel.from_pretrained(out / "backbone").eval()
        torch.testing.assert_close(base(pixel_values=x).last_hidden_state[:, 0], merged.features(x),
                                   atol=1e-5, rtol=1e-5)
        again = load_hf(out / "mnist_0-4")             # the task recorded in its config
        torch.testing.assert_close(again(x)[0], ours[0], atol=1e-5, rtol=1e-5)


def test_bad_hf_vit_inputs_are_one_clear_error(tmp_path):
    headless = hf_dir(tmp_path, "base", 0, 2, cls="ViTModel")
    with pytest.raises(ModelFileError, match="without a classification head"):
        load_hf(headless, "mnist:0-4")
    with pytest.raises(ModelFileError, match="task bbc:0-2 is text"):
        load_hf(hf_dir(tmp_path, "a", 0, 3), "bbc:0-2")
    deep, shallow = hf_dir(tmp_path, "deep", 0, 5, num_hidden_layers=3), hf_dir(tmp_path, "shallow", 1, 5)
    merged = foldmerge.merge([load_hf(deep, "mnist:0-4"), load_hf(shallow, "mnist:5-9")], [images(), images()],
                             method="average")          # a pre-LN ViT: the shallower padded with identity blocks
    assert merged.backbone_config["num_hidden_layers"] == 3
