"""The contract every Hugging Face family passes: one row per family (a contributor adds a family by
adding its table in src/foldmerge/arch/families and one line to FAMILIES here).

For each: a tiny random model of the family built from its config with plain transformers code and
saved with save_pretrained loads as the model it is (the same logits); folded == SuperNet in
float64, values and gradients; the `first` init folds to model 1 exactly; the methods run; a merge from the command line
writes task directories that `AutoModelForSequenceClassification` (`…ForImageClassification`) loads
with the merged model's predictions."""
import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import foldmerge
from foldmerge import cli
from foldmerge.hf import load_hf
from foldmerge.methods import METHODS
from foldmerge.supernet import SuperNet

SIZES = dict(vocab_size=40, max_position_embeddings=40)
BERTISH = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
IMAGES = dict(image_size=8, patch_size=4, num_channels=1)
# id: (config class, classification class, config keywords)
FAMILIES = {
    "bert": ("BertConfig", "BertForSequenceClassification", {**SIZES, **BERTISH}),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {**SIZES, **BERTISH, "pad_token_id": 1}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", {**SIZES, **BERTISH, "pad_token_id": 1}),
    "camembert": ("CamembertConfig", "CamembertForSequenceClassification", {**SIZES, **BERTISH, "pad_token_id": 1}),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {**SIZES, **BERTISH, "embedding_size": 8}),
    "electra-projected": ("ElectraConfig", "ElectraForSequenceClassification",
                          {**SIZES, **BERTISH, "embedding_size": 6}),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecTextForSequenceClassification",
                      {**SIZES, **BERTISH, "pad_token_id": 1}),
    "ernie": ("ErnieConfig", "ErnieForSequenceClassification", {**SIZES, **BERTISH}),
    "ernie-task-types": ("ErnieConfig", "ErnieForSequenceClassification", {**SIZES, **BERTISH, "use_task_id": True}),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   {**SIZES, "dim": 8, "n_layers": 2, "n_heads": 2, "hidden_dim": 16}),
    "vit": ("ViTConfig", "ViTForImageClassification", {**BERTISH, **IMAGES}),
    "deit": ("DeiTConfig", "DeiTForImageClassification", {**BERTISH, **IMAGES}),
    "deit-distilled": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {**BERTISH, **IMAGES}),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification",
               {**{k: v for k, v in BERTISH.items() if k != "intermediate_size"}, "mlp_ratio": 2, **IMAGES}),
    "clip": ("CLIPConfig", "CLIPForImageClassification", {"vision_config": {**BERTISH, **IMAGES}}),
    # CLIP's towers with their projections (the heads: each source's projection_dim is its "class" count)
    "clip-text": ("CLIPTextConfig", "CLIPTextModelWithProjection",
                  {**SIZES, **BERTISH, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 39}),
    "clip-vision": ("CLIPVisionConfig", "CLIPVisionModelWithProjection", {**BERTISH, **IMAGES}),
    # decoders: the LM head is the head (every position's next-token logits; one head for one vocabulary)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**SIZES, **BERTISH, "num_attention_heads": 4, "head_dim": 4}),
    "llama-grouped": ("LlamaConfig", "LlamaForCausalLM", {**SIZES, **BERTISH, "num_attention_heads": 4,
                                                         "num_key_value_heads": 2, "head_dim": 4}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**SIZES, **BERTISH, "num_attention_heads": 4,
                                                        "num_key_value_heads": 2, "head_dim": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**SIZES, **BERTISH, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "eos_token_id": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {**SIZES, "n_embd": 8, "n_layer": 2, "n_head": 2, "n_inner": 16,
                                               "bos_token_id": 0, "eos_token_id": 2}),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**SIZES, **BERTISH, "eos_token_id": 2}),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification",
                 {"num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 2], "patch_size": 2, **IMAGES}),
    "hf-resnet": ("ResNetConfig", "ResNetForImageClassification",
                  {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 2], **IMAGES}),
    "hf-resnet-bottleneck": ("ResNetConfig", "ResNetForImageClassification",
                             {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [2, 1], "layer_type": "bottleneck",
                              **IMAGES}),
}
LABELS = [["a", "b", "c"], ["d", "e", "f", "g", "h", "i", "j"]]      # more than five on one
PROJECTIONS = {"clip-text", "clip-vision"}        # heads that embed, not classify: no labels to keep
LMS = {"llama", "llama-grouped", "mistral", "qwen2", "gpt2", "gpt-neox"}
# transformers reads any tokenizer saved beside a qwen2 config as Qwen2's own (byte-level BPE): a made-up
# word-level one reads every text as no tokens there, so that row's data is token ids
OWN_TOKENIZER = {"qwen2"}       # one LM head over the vocabulary: the sources share it


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def pad_id(family):
    return FAMILIES[family][2].get("pad_token_id", 0) if family not in LMS else 2   # a decoder pads with its eos


MADE, LOADED = {}, {}      # a source is written and read once per run: tests only read them


def make(tmp_path, family, k):
    """Source k of a family, written by plain transformers code (once per run; later calls get its folder)."""
    if (family, k) not in MADE:
        MADE[family, k] = _make(tmp_path, family, k)
    return MADE[family, k]


def loaded(tmp_path, family, k):
    """Source k as foldmerge loads it: a copy of the one read first, which no test changes."""
    if (family, k) not in LOADED:
        LOADED[family, k] = load_hf(make(tmp_path, family, k))
    return copy.deepcopy(LOADED[family, k])


def _make(tmp_path, family, k):
    import transformers
    config_class, head_class, kw = FAMILIES[family]
    torch.manual_seed(k)
    labels = LABELS[k]
    if family in PROJECTIONS:
        kw = {**kw, "projection_dim": len(labels)}
    config = getattr(transformers, config_class)(**kw, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                                 label2id={v: i for i, v in enumerate(labels)})
    path = tmp_path / f"{family}-{k}"
    model = getattr(transformers, head_class)(config)
    with torch.no_grad():      # layer-scale gains and BatchNorms start as constants; any values must load
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "lambda" in name or "layer_scale" in name or name.endswith(("running_var", "normalization.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "normalization.bias")):
                p.normal_()
    model.save_pretrained(path)
    if not is_image(family) and family not in OWN_TOKENIZER:   # words w0…w39 are ids 0…39, <pad> at its padding id
        from tokenizers import Tokenizer, models, pre_tokenizers
        vocab = {f"w{i}": i for i in range(SIZES["vocab_size"])}
        names = {pad_id(family): "<pad>", 3: "<unk>"}
        tok = Tokenizer(models.WordLevel({names.get(i, w): i for w, i in vocab.items()}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(
            path)
    return path


def is_image(family):
    kw = FAMILIES[family][2]
    return "image_size" in kw or "vision_config" in kw


def ids(family, n=4, seed=0):
    """Inputs the family reads: token ids with padding, or images."""
    g = torch.Generator().manual_seed(seed)
    if is_image(family):
        return torch.randn(n, 1, 8, 8, generator=g)
    x = torch.randint(3, SIZES["vocab_size"], (n, 12), generator=g)
    x[0, 8:] = pad_id(family)
    return x


def hf_logits(model, family, x):
    if family in PROJECTIONS:
        return model(pixel_values=x).image_embeds if is_image(family) else model(input_ids=x).text_embeds
    if is_image(family):
        return model(pixel_values=x).logits
    if family in LMS:                   # causal: what follows a text never reaches it, no mask needed
        return model(input_ids=x).logits
    return model(input_ids=x, attention_mask=(x != pad_id(family)).long()).logits


def auto_class(family):
    import transformers
    if family == "deit-distilled":      # the Auto class of a deit is the one-head DeiTForImageClassification
        return transformers.DeiTForImageClassificationWithTeacher
    if family in PROJECTIONS:           # AutoModel gives the tower without its projection
        return getattr(transformers, FAMILIES[family][1])
    if family in LMS:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForImageClassification if is_image(family) else \
        transformers.AutoModelForSequenceClassification


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


ARCH = {"llama-grouped": "llama", "mistral": "llama", "xlm-roberta": "roberta", "camembert": "roberta", "electra-projected": "electra", "vit": "hf-vit",
        "deit-distilled": "deit", "ernie-task-types": "ernie", "hf-resnet-bottleneck": "hf-resnet"}


def test_a_saved_model_loads_as_the_model_it_is(tmp_path, family):
    path = make(tmp_path, family, 1)
    ours = load_hf(path)
    x = ids(family)
    with torch.no_grad():
        theirs = auto_class(family).from_pretrained(path).eval()
        torch.testing.assert_close(ours(x)[0], hf_logits(theirs, family, x), rtol=1e-5, atol=1e-5)
    assert ours.tasks[0].num_classes == (SIZES["vocab_size"] if family in LMS else 7)
    assert ours.arch == ARCH.get(family, family)


@pytest.mark.parametrize("param", ["full", "diag+lowrank(2)"])
def test_folded_equals_the_supernet_in_float64_and_first_folds_to_model_one(tmp_path, family, param):
    src = [loaded(tmp_path, family, k).double() for k in range(2)]
    x = ids(family)
    sn = SuperNet(src, param=param, init="random", seed=3).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sn.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    wide = sn(x, form="supernet")
    folded = sn(x, form="folded")
    torch.testing.assert_close(folded, wide, rtol=0, atol=1e-10)
    learned = [p for p in sn.parameters() if p.requires_grad]      # and their gradients, every map's and norm's
    for a, b in zip(torch.autograd.grad(folded.square().sum(), learned, allow_unused=True),   # a norm the
                    torch.autograd.grad(wide.square().sum(), learned, allow_unused=True)):     # features skip: None
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    plain = sn.fold()
    recon = sn.reconstruct(wide)
    for i, (k, out) in enumerate(zip(sn.head_owner, plain(x))):
        torch.testing.assert_close(out, F.linear(recon[k], *sn.head(i)), rtol=0, atol=1e-10)
    first = SuperNet(src, param=param, init="first").fold()
    assert torch.equal(first.features(x), src[0].features(x))


TRAINED = {"epochs": 1}
# methods that cannot run here, refused in one line naming why: task arithmetic and TIES need the common
# start (--base) that models from different initializations lack; the gating merge's gate reads images,
# and gates the modules its spec names as units
NEEDS = {"task-arithmetic": "base", "ties": "base", "gating": "reads images|units|nothing to route between"}


SAME_MODULES = {"xlm-roberta", "camembert"}     # RoBERTa's modules under other model types: its row runs the methods


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_merges_the_family_or_says_why_not(tmp_path, family, method):
    if family in SAME_MODULES:
        pytest.skip("RoBERTa's modules under another model type: the roberta row runs every method")
    src = [loaded(tmp_path, family, k) for k in range(2)]
    # the joint routing calibration every merge ends with is the command line test's (below), not this one's
    opts = {**(TRAINED if method in ("fs-merge", "distill") else {}), "calibrate": "none"}
    data = [ids(family, 12, seed=k) for k in range(2)]
    if method in NEEDS:
        with pytest.raises(ValueError, match=NEEDS[method]) as refused:
            foldmerge.merge(src, data, method=method, **opts)
        assert len(str(refused.value).splitlines()) == 1
        return
    merged = foldmerge.merge(src, data, method=method, **opts)
    assert merged.arch == src[0].arch and [t.num_classes for t in merged.tasks] == (
        [SIZES["vocab_size"]] if family in LMS else [3, 7])
    assert all(torch.isfinite(o).all() for o in merged(ids(family)))


def test_a_command_line_merge_loads_with_auto_classes_and_predicts_as_the_merge(tmp_path, family, capsys):
    sources = [make(tmp_path, family, k) for k in range(2)]
    data = []
    for k in range(2):
        if is_image(family) or family in OWN_TOKENIZER:     # tensors; a text family's data is text its tokenizer reads
            f = tmp_path / f"ids{k}.npy"
            np.save(f, ids(family, 16, seed=k).numpy())
        else:                           # longer than the position table: cut to what the model reads
            g = torch.Generator().manual_seed(k)
            f = tmp_path / f"texts {k}.txt"
            f.write_text("".join(" ".join(f"w{int(i)}" for i in torch.randint(4, 39, (60,), generator=g)) + "\n"
                                 for _ in range(16)))
        data.append(str(f))
    out = tmp_path / "merged model"
    assert cli.main(["merge", *map(str, sources), "--data", *data, "--method", "fs-merge", "--epochs", "2", "--per-task", "8",
                     "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    merged = foldmerge.load(out)
    x = ids(family)
    with torch.no_grad():
        ours = merged(x)
        for i, source in enumerate(sources[:1] if family in LMS else sources):     # LMs: one head, one folder
            task = auto_class(family).from_pretrained(out / "hf" / source.name).eval()
            torch.testing.assert_close(hf_logits(task, family, x), ours[i], rtol=1e-5, atol=1e-5)
            assert task.config.projection_dim == len(LABELS[i]) if family in PROJECTIONS else \
                family in LMS or task.config.id2label[0] == LABELS[i][0]


def test_bad_families_are_one_line_and_nothing_is_written(tmp_path, capsys):
    """A model type with no table names the supported classes; two families in one merge, or two
    model types of one family, are refused; a method that needs equal widths says so."""
    import transformers
    kw = dict(FAMILIES["bert"][2], num_labels=3)
    bert, roberta = make(tmp_path, "bert", 0), make(tmp_path, "roberta", 0)
    xlmr = make(tmp_path, "xlm-roberta", 1)
    deit, distilled = make(tmp_path, "deit", 0), make(tmp_path, "deit-distilled", 1)
    convnext = make(tmp_path, "convnext", 0)
    torch.manual_seed(5)
    wide = tmp_path / "roberta-wide"
    transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**{**kw, "hidden_size": 12},
                                                                             pad_token_id=1)).save_pretrained(wide)
    gpt = tmp_path / "gpt2"
    transformers.GPT2ForSequenceClassification(transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=40,
                                                                       n_positions=16, num_labels=3)).save_pretrained(gpt)
    np.save(tmp_path / "ids.npy", ids("roberta", 16).numpy())
    np.save(tmp_path / "images.npy", ids("deit", 16).numpy())
    out = tmp_path / "out"
    capsys.readouterr()                  # what transformers printed while the test made the models
    for models, method, says in [((gpt, bert), "average", "GPT2ForSequenceClassification"),
                                 # their tokenizers differ too, which is checked first
                                 ((bert, roberta), "average", "tokenizers differ"),
                                 ((convnext, deit), "average", "different architectures"),
                                 ((roberta, xlmr), "average", "different model types"),
                                 ((deit, distilled), "fs-merge", "different classifier inputs"),
                                 ((roberta, wide), "average", "differ in hidden_size"),
                                 ((roberta, wide), "zipit", "identical hidden widths")]:
        data = "images.npy" if models[0] in (deit, convnext) else "ids.npy"
        code = cli.main(["merge", *map(str, models), "--data", *[str(tmp_path / data)] * 2, "--per-task", "8",
                         "--method", method, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and says in err, err
        assert not out.exists()
    assert "supported: BertForSequenceClassification" in cli_error(gpt, bert, tmp_path, capsys)


def cli_error(a, b, tmp_path, capsys):
    cli.main(["merge", str(a), str(b), "--data", *[str(tmp_path / "ids.npy")] * 2, "--per-task", "8",
              "--method", "average", "--out", str(tmp_path / "out")])
    return capsys.readouterr().err


def test_bench_families_runs_every_row_on_tiny_models(monkeypatch, tmp_path):
    """`foldmerge bench families` on tiny sources trained for one epoch on 300 examples: every row, a
    report, and its errors; the measured run is in docs/benchmarks/families.md."""
    import json

    from foldmerge.bench import families as bench
    from foldmerge.bench.report import build_report
    from foldmerge.data import Task
    split = Task.split
    monkeypatch.setattr(Task, "split", lambda self, which: tuple(t[:300] for t in split(self, which)))
    tiny = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    monkeypatch.setattr(bench, "FAMILIES", {
        "roberta": (bench.TEXT, lambda: bench._text({**tiny, "type_vocab_size": 1, "max_position_embeddings": 260})),
        "deit": (bench.IMAGES, lambda: {**tiny, "image_size": 28, "patch_size": 7, "num_channels": 1})})
    monkeypatch.setattr(bench, "SOURCE", {k: {**v, "epochs": 1, "limit": 64} for k, v in bench.SOURCE.items()})
    monkeypatch.setattr(bench, "PER_TASK", 8)
    monkeypatch.setattr(bench, "HELD_OUT", 8)
    monkeypatch.setattr(bench, "PLAN", [(n, m, {**o, "epochs": 1} if o else o) for n, m, o in bench.PLAN])
    r = bench.run_bench(families=("roberta", "deit"), out=str(tmp_path))
    assert [row["method"] for row in r["rows"]] == ["originals", "ensemble", "average", "ZipIt!", "permute", "distill",
                                                   "fs-merge diag+lowrank(12)"] * 2
    assert all(0 <= row["per_task"] <= 100 for row in r["rows"])
    r.update(command="foldmerge bench families", environment={"machine": "test"})
    (tmp_path / "bench-families.json").write_text(json.dumps(r))
    build_report([str(tmp_path / "bench-families.json")], str(tmp_path / "report"), "x")
    assert "roberta (text)" in (tmp_path / "report" / "report.md").read_text()
    bench.print_report(r, "x")
    with pytest.raises(ValueError, match="unknown family"):
        bench.run_bench(families=("gpt2",), out=str(tmp_path))


def test_models_of_different_depths_merge_where_the_family_has_an_identity_block(tmp_path, capsys):
    """Pre-LN (DeiT): a 2-block and a 3-block model merge at 3 blocks, the shallower padded with
    identity blocks (it computes what it did); post-LN (RoBERTa) has no identity block: one line."""
    import transformers

    from foldmerge.api import equal_depths
    config_class, head_class, kw = FAMILIES["deit"]
    paths = []
    for k, depth in enumerate((2, 3)):
        torch.manual_seed(k)
        c = getattr(transformers, config_class)(**{**kw, "num_hidden_layers": depth}, num_labels=3 + k)
        getattr(transformers, head_class)(c).save_pretrained(tmp_path / f"deit{depth}")
        paths.append(tmp_path / f"deit{depth}")
    src = [load_hf(p) for p in paths]
    padded = equal_depths(src)
    x = ids("deit")
    assert padded[0].backbone_config["num_hidden_layers"] == 3 and padded[1] is src[1]
    torch.testing.assert_close(padded[0](x)[0], src[0](x)[0], rtol=0, atol=1e-6)
    np.save(tmp_path / "x.npy", ids("deit", 16).numpy())
    out = tmp_path / "merged"
    capsys.readouterr()
    assert cli.main(["merge", *map(str, paths), "--data", *[str(tmp_path / "x.npy")] * 2, "--per-task", "8",
                     "--method", "fs-merge", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    assert foldmerge.load(out).meta["deepened"] == [{"from": 2, "to": 3, "rule": "identity blocks appended"}, None]
    task = transformers.AutoModelForImageClassification.from_pretrained(out / "hf" / "deit2")
    assert task.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(task(pixel_values=x).logits, foldmerge.load(out)(x)[0], rtol=1e-5, atol=1e-5)
    r2, r3 = make(tmp_path, "roberta", 0), tmp_path / "roberta3"
    config_class, head_class, kw = FAMILIES["roberta"]
    getattr(transformers, head_class)(getattr(transformers, config_class)(**{**kw, "num_hidden_layers": 3},
                                                                          num_labels=2)).save_pretrained(r3)
    capsys.readouterr()
    np.save(tmp_path / "ids.npy", ids("roberta", 16).numpy())
    assert cli.main(["merge", str(r2), str(r3), "--data", *[str(tmp_path / "ids.npy")] * 2, "--per-task", "8",
                     "--method", "fs-merge", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "layer counts [2, 3]" in err and "no identity" in err
    assert not (tmp_path / "no").exists()


def test_a_two_class_model_whose_config_leaves_out_its_default_labels_loads(tmp_path):
    """transformers writes no id2label (nor num_labels) when they are its defaults (two classes)."""
    import json

    import transformers
    config_class, head_class, kw = FAMILIES["roberta"]
    getattr(transformers, head_class)(getattr(transformers, config_class)(**kw)).save_pretrained(tmp_path / "binary")
    assert "id2label" not in json.loads((tmp_path / "binary" / "config.json").read_text())
    model = load_hf(tmp_path / "binary")
    assert model.tasks[0].num_classes == 2


def test_what_a_review_found_is_one_line_each(tmp_path):
    """A DINOv2's MLP width is a whole ratio of its width (transformers takes an integer); an alignment
    method gives the family's own reason (stage depths) before any width check; sources whose processors
    make different image sizes are refused before any work."""
    import transformers

    from foldmerge.arch import arch_spec
    spec = arch_spec("dinov2", {"hidden_size": 8, "mlp_ratio": 2, "num_attention_heads": 2})
    assert spec.resize({"hidden_size": 8, "mlp_ratio": 2, "num_attention_heads": 2}, [8, 24])["mlp_ratio"] == 3
    with pytest.raises(ValueError, match="whole mlp_ratio"):
        spec.resize({"hidden_size": 8, "mlp_ratio": 2, "num_attention_heads": 2}, [6])
    paths = []
    for k, depths in enumerate(([1, 2], [2, 1])):
        c = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=depths, patch_size=2, num_channels=1,
                                        num_labels=3)
        transformers.ConvNextForImageClassification(c).save_pretrained(tmp_path / f"c{k}")
        paths.append(tmp_path / f"c{k}")
    src = [load_hf(p) for p in paths]
    for method in ("zipit", "permute", "fs-merge"):
        with pytest.raises(ValueError, match=r"different stage depths \[\[1, 2\], \[2, 1\]\]"):
            foldmerge.merge(src, [ids("convnext", 8), ids("convnext", 8)], method=method,
                            **({"epochs": 1} if method == "fs-merge" else {}))
    same = [loaded(tmp_path, "convnext", k) for k in range(2)]
    for method in ("zipit", "fs-merge"):
        with pytest.raises(ValueError, match="make different sizes"):
            foldmerge.merge(same, [torch.randn(8, 1, 8, 8), torch.randn(8, 1, 16, 16)], method=method,
                            **({"epochs": 1} if method == "fs-merge" else {}))


def test_a_merge_of_a_merge_keeps_the_image_processor(tmp_path, capsys):
    """A merge whose source is a folder foldmerge wrote copies the processor its task folders hold on."""
    import transformers
    sources = [_make(tmp_path / f"own{k}", "deit", k % 2) for k in range(3)]    # not the shared sources
    for p in sources:
        transformers.ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(p)
    np.save(tmp_path / "x.npy", ids("deit", 16).numpy())
    data = [str(tmp_path / "x.npy")] * 2
    first, second = tmp_path / "first merge", tmp_path / "second merge"
    for srcs, out in (((sources[0], sources[1]), first), ((first, sources[2]), second)):
        assert cli.main(["merge", *map(str, srcs), "--data", *data, "--method", "average", "--per-task", "8",
                         "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    for task in (second / "hf").iterdir():
        if task.name != "backbone":
            assert (task / "preprocessor_config.json").is_file(), task


def test_what_a_second_review_found(tmp_path, capsys):
    """A text model folder without tokenizer files is refused for texts (transformers would read every word
    as unknown); a headless model is told its own family's classifier class; DINOv2s differing only in the
    layer-scale init (folded away) average; a ConvNeXt without layer-scale gains loads as it computes."""
    import transformers
    import shutil
    pair = []
    for k in range(2):                  # the contract's sources, without their tokenizer files
        pair.append(tmp_path / f"no tokenizer {k}")
        shutil.copytree(make(tmp_path, "roberta", k), pair[-1])
        for f in pair[-1].iterdir():
            if "token" in f.name:
                f.unlink()
    (tmp_path / "texts.txt").write_text("".join(f"text number {i}\n" for i in range(20)))
    capsys.readouterr()
    code = cli.main(["merge", *map(str, pair), "--data", *[str(tmp_path / "texts.txt")] * 2,
                     "--per-task", "4", "--method", "average", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "holds no tokenizer" in err and len(err.splitlines()) == 1, err
    transformers.DeiTModel(transformers.DeiTConfig(**BERTISH, **IMAGES)).save_pretrained(tmp_path / "headless")
    with pytest.raises(foldmerge.io.ModelFileError, match="as a DeiTForImageClassification"):
        load_hf(tmp_path / "headless")
    config_class, head_class, kw = FAMILIES["dinov2"]
    for k, value in enumerate((1.0, 0.1)):
        torch.manual_seed(k)
        getattr(transformers, head_class)(getattr(transformers, config_class)(**kw, layerscale_value=value,
                                                                              num_labels=3)).save_pretrained(
            tmp_path / f"dino{k}")
    src = [load_hf(tmp_path / f"dino{k}") for k in range(2)]
    assert foldmerge.merge(src, [ids("dinov2", 8)] * 2, method="average", calibrate="none").arch == "dinov2"
    config_class, head_class, kw = FAMILIES["convnext"]
    torch.manual_seed(0)
    plain = getattr(transformers, head_class)(getattr(transformers, config_class)(**kw, layer_scale_init_value=0.0,
                                                                                  num_labels=3))
    plain.save_pretrained(tmp_path / "no-gains")
    x = ids("convnext")
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "no-gains")(x)[0], plain.eval()(pixel_values=x).logits,
                                   rtol=1e-5, atol=1e-5)
