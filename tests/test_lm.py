"""Language models (decoders with rotary position embeddings) merge from the command line into a
`…ForCausalLM` folder that transformers loads and generates with; the maps on queries and keys
commute with the rotations (a learned map would not); perplexity is the report."""
import random

import pytest
import torch

import foldmerge
from foldmerge import cli
from foldmerge.hf import load_hf
from foldmerge.io import map_tensors
from foldmerge.supernet import SuperNet

WORDS = "the a cat dog sat ran on under mat log big small red blue and then".split()


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def make(path, seed, kv_heads=2, kind="Llama", **settings):
    """A tiny LlamaForCausalLM (or `kind`'s) from plain transformers code, with a word-level tokenizer beside it."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(seed)
    sizes = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                 vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    if kind == "GPT2":                     # its own key names; its LM head is its token table
        config, head = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=4, n_inner=32, vocab_size=len(vocab),
                                               n_positions=32, bos_token_id=1, eos_token_id=2, **settings), \
            "GPT2LMHeadModel"
    elif kind == "GPTNeoX":               # Pythia's: partial rotary, attention and MLP side by side
        config, head = transformers.GPTNeoXConfig(**sizes, **settings), "GPTNeoXForCausalLM"
    else:
        config, head = getattr(transformers, f"{kind}Config")(**sizes, num_key_value_heads=kv_heads), f"{kind}ForCausalLM"
    getattr(transformers, head)(config).save_pretrained(path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(path)
    return path


def texts(path, seed, n=60):
    r = random.Random(seed)
    path.write_text("".join(" ".join(r.choice(WORDS) for _ in range(8)) + "\n" for _ in range(n)))
    return path


def test_two_llamas_merge_from_the_command_line_and_the_output_generates(tmp_path, capsys):
    import transformers
    models = [make(tmp_path / f"my lm {k}", k) for k in range(2)]
    data = [texts(tmp_path / f"text {k}.txt", k) for k in range(2)]
    out = tmp_path / "merged lm"
    for method, extra in (("fs-merge", ["--epochs", "3"]), ("distill", ["--epochs", "2"]), ("average", [])):
        assert cli.main(["merge", *map(str, models), "--data", *map(str, data), "--per-task", "16", "--fidelity", "16",
                         "--method", method, *extra, "--out", str(out), "--force"]) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert "merge ppl" in printed and "source ppl" in printed and "ensemble ppl" in printed
        folder = out / "hf" / "my_lm_0"                  # one vocabulary, one LM head: one folder
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        ids = tok("the cat sat on", return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(lm(input_ids=ids).logits, foldmerge.load(out)(ids)[0], rtol=1e-5, atol=1e-5)
        generated = lm.generate(ids, max_new_tokens=4, do_sample=False)
        assert generated.shape == (1, ids.shape[1] + 4) and not lm.config.tie_word_embeddings
        fid = foldmerge.load(out).meta["fidelity"]
        assert len(fid) == 2                              # each source's text scored
        assert all(f["perplexity"] > 1 and f["source_perplexity"] > 1 for f in fid.values())


@pytest.mark.parametrize("kind", ["GPT2", "GPTNeoX"])
def test_gpt2_and_pythia_merge_from_the_command_line_and_gpt2_keeps_its_head_tied(tmp_path, capsys, kind):
    """A GPT-2's LM head is its token table: FS-Merge ties U_out to the embedding's M, so the merged model
    is one table in two places, one model's size (its config says tied, its files hold the table once);
    distillation learns the head apart and saves it untied. Pythia's (GPT-NeoX) head is its own matrix."""
    import transformers
    models = [make(tmp_path / f"{kind} {k}", k, kind=kind) for k in range(2)]
    data = [texts(tmp_path / f"text {k}.txt", k) for k in range(2)]
    out = tmp_path / "merged"
    size = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(models[0]).parameters())
    for method, tied in (("fs-merge", kind == "GPT2"), ("average", kind == "GPT2"), ("distill", False)):
        epochs = {"average": [], "fs-merge": ["--epochs", "2"], "distill": ["--epochs", "6", "--lr", "0.01"]}[method]
        assert cli.main(["merge", *map(str, models), "--data", *map(str, data), "--per-task", "16", "--fidelity", "16",
                         "--method", method, *epochs, "--out", str(out), "--force", "--quiet"]) == 0, \
            capsys.readouterr().err
        folder = next(p for p in (out / "hf").iterdir() if p.name != "backbone")
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert lm.config.tie_word_embeddings == tied, method
        assert len(transformers.AutoTokenizer.from_pretrained(out / "hf" / "backbone")) == 19   # the base model's too
        assert ("tied to the token table" in (out / "README.md").read_text()) == tied or kind != "GPT2"
        assert sum(p.numel() for p in lm.parameters()) == size + (0 if tied or kind != "GPT2" else lm.lm_head.weight.numel())
        ids = torch.tensor([[1, 3, 4, 5, 6]])
        with torch.no_grad():
            torch.testing.assert_close(lm(input_ids=ids).logits, foldmerge.load(out)(ids)[0], rtol=1e-5, atol=1e-5)
        assert lm.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_lazy_merges_read_bfloat16_sources_as_memory_maps_and_keep_their_dtype(tmp_path, capsys):
    """--lazy: the sources are read-only maps of their files in bfloat16; FS-Merge local, permute and
    averaging fold parameter by parameter (equal to the in-memory merge of the same sources); the merge is
    bfloat16 too, loads with AutoModelForCausalLM and generates; the sources' files are unchanged; a
    method that holds the sources whole is refused in one line."""
    import hashlib

    import transformers
    models = []
    for k, kind in enumerate(("Llama", "Llama")):
        plain = make(tmp_path / f"plain {k}", k, kind=kind)
        lm = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16)
        lm.save_pretrained(tmp_path / f"bf16 lm {k}")
        transformers.AutoTokenizer.from_pretrained(plain).save_pretrained(tmp_path / f"bf16 lm {k}")
        models.append(tmp_path / f"bf16 lm {k}")
    digest = [hashlib.sha256((m / "model.safetensors").read_bytes()).hexdigest() for m in models]
    data = [texts(tmp_path / f"text {k}.txt", k) for k in range(2)]
    for method, extra in (("fs-merge", ["--variant", "local", "--epochs", "3"]), ("permute", []), ("average", [])):
        out = tmp_path / f"merged {method}"
        common = ["merge", *map(str, models), "--data", *map(str, data), "--per-task", "16", "--method", method,
                  *extra, "--quiet"]
        assert cli.main([*common, "--lazy", "--out", str(out)]) == 0, capsys.readouterr().err
        assert cli.main([*common, "--out", str(tmp_path / f"in memory {method}")]) == 0, capsys.readouterr().err
        lazy, whole = foldmerge.load(out), foldmerge.load(tmp_path / f"in memory {method}")
        assert {t.dtype for t in map_tensors(out / "model.safetensors").values()} == {torch.bfloat16}
        for (key, a), b in zip(lazy.state_dict().items(), whole.state_dict().values()):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02, msg=key)
        folder = next(p for p in (out / "hf").iterdir() if p.name != "backbone")
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert lm.dtype == torch.bfloat16
        ids = torch.tensor([[1, 3, 4, 5]])
        with torch.no_grad():
            torch.testing.assert_close(lm(input_ids=ids).logits.float(), lazy(ids)[0], rtol=0.02, atol=0.02)
        assert lm.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 6)
    assert digest == [hashlib.sha256((m / "model.safetensors").read_bytes()).hexdigest() for m in models]
    mixed = [models[0], tmp_path / "plain 1"]                     # bfloat16 and float32
    for method, extra, says in (("average", [], "these differ (bfloat16, float32)"),
                                ("distill", [], "distill holds the sources whole"),
                                ("fs-merge", [], "fs-merge --variant global holds the sources whole"),
                                ("zipit", [], "zipit holds the sources whole")):
        capsys.readouterr()
        code = cli.main(["merge", *map(str, mixed if method == "average" else models), "--data", *map(str, data),
                         "--per-task", "16", "--method", method, *extra, "--lazy", "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and says in err, err
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("kind", ["Llama", "GPT2", "GPTNeoX"])
def test_a_shallower_decoder_is_deepened_by_identity_blocks(tmp_path, kind):
    """Decoders are pre-norm: a block whose output projections are zero adds nothing to the stream, so a
    1-layer source merges with a 2-layer one at depth 2 and, deepened, computes what it did."""
    import transformers

    from foldmerge.api import equal_depths
    deep = make(tmp_path / "deep", 0, kind=kind)
    config = transformers.AutoConfig.from_pretrained(deep)
    setattr(config, config.attribute_map.get("num_hidden_layers", "num_hidden_layers"), 1)
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "shallow")
    shallow = load_hf(tmp_path / "shallow")
    both = equal_depths([load_hf(deep), shallow])
    ids = torch.tensor([[1, 3, 4, 5, 6, 7]])
    assert both[1].meta["deepened"] == {"from": 1, "to": 2, "rule": "identity blocks appended"}
    with torch.no_grad():
        torch.testing.assert_close(both[1](ids)[0], shallow(ids)[0], rtol=1e-5, atol=1e-5)


def test_the_query_and_key_maps_commute_with_the_rotations(tmp_path):
    """Rotating each source's queries by position, then merging, equals merging, then rotating: the
    fixed maps (a multiple of the identity per source) do; a learned dense map does not."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    src = [load_hf(make(tmp_path / f"m{k}", k, kv_heads=4)) for k in range(2)]
    sn = SuperNet(src, param="full", init="average")
    m = sn.merge_map("model.layers.0.self_attn.q_proj")
    assert not any(p.requires_grad for p in m.parameters()) and sn.merge_map("model.layers.0.self_attn.v_proj").weight.requires_grad
    rope = LlamaRotaryEmbedding(src[0].backbone.model.config)
    g = torch.Generator().manual_seed(0)
    q = [torch.randn(1, 4, 6, 4, generator=g) for _ in src]            # (batch, heads, positions, head width)
    cos, sin = rope(q[0], torch.arange(6)[None])

    def merge(maps, qs):      # M on the flattened heads of every position
        flat = torch.cat([x.transpose(1, 2).flatten(2) for x in qs], dim=-1)
        return (flat @ maps.T).unflatten(-1, (4, 4)).transpose(1, 2)

    def rotate(x):
        return apply_rotary_pos_emb(x, x, cos, sin)[0]
    fixed = m.matrix().detach()
    torch.testing.assert_close(merge(fixed, [rotate(x) for x in q]), rotate(merge(fixed, q)), rtol=0, atol=1e-6)
    learned = torch.randn(fixed.shape, generator=g)
    assert not torch.allclose(merge(learned, [rotate(x) for x in q]), rotate(merge(learned, q)), atol=1e-3)


def test_a_language_model_bad_input_is_one_line(tmp_path, capsys):
    """Different attention layouts; a --tasks that cannot apply; a tokenizer that reads a text as nothing
    (transformers reads a word-level tokenizer beside a qwen2 config as Qwen2's BPE)."""
    a, b = make(tmp_path / "a", 0), make(tmp_path / "b", 1, kv_heads=4)
    data = texts(tmp_path / "t.txt", 0)
    qwen = [make(tmp_path / f"qwen {k}", k, kind="Qwen2") for k in range(2)]
    gpt, neox = make(tmp_path / "gpt", 0, kind="GPT2"), make(tmp_path / "neox", 0, kind="GPTNeoX")
    untied = make(tmp_path / "gpt untied", 1, kind="GPT2", tie_word_embeddings=False)      # layouts no spec covers
    unbiased = make(tmp_path / "neox unbiased", 1, kind="GPTNeoX", attention_bias=False)
    for models, extra, says in [((a, b), [], "different key-value head counts"),
                                ((gpt, untied), [], "covers models with tie_word_embeddings true"),
                                ((neox, unbiased), [], "covers models with attention_bias true"),
                                ((gpt, neox), [], "cannot merge"),
                                ((a, a), ["--tasks", "bbc:0-2", "bbc:3-4"], "predicts the next token"),
                                (qwen, [], "as no tokens at all"),
                                ((a, a), ["--same-task", "yes", "--eval-data", str(data)], "scores classifiers")]:
        capsys.readouterr()
        code = cli.main(["merge", *map(str, models), "--data", str(data), str(data), "--per-task", "8", *extra,
                         "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and says in err, err
        assert not (tmp_path / "out").exists()


def test_bench_lm_runs_every_row_on_tiny_sources(monkeypatch, tmp_path):
    """`foldmerge bench lm` on tiny sources trained a few steps on a few articles: every row, a report."""
    import json

    from foldmerge.bench import lm as bench
    from foldmerge.bench.report import build_report
    articles = bench._articles
    monkeypatch.setattr(bench, "_articles", lambda: {k: (tr[:6], te[:3]) for k, (tr, te) in articles().items()})
    monkeypatch.setattr(bench, "CONFIG", {**bench.CONFIG, "hidden_size": 16, "num_hidden_layers": 1,
                                          "intermediate_size": 32})
    monkeypatch.setattr(bench, "TRAIN", {**bench.TRAIN, "steps": 3})
    monkeypatch.setattr(bench, "PER_TASK", 8)
    monkeypatch.setattr(bench, "TEST", 8)
    monkeypatch.setattr(bench, "PLAN", [(n, m, {**o, "epochs": 1} if o else o) for n, m, o in bench.PLAN])
    monkeypatch.setattr(bench, "GPT2", {**bench.GPT2, "n_embd": 16, "n_layer": 1, "n_inner": 32})
    r = bench.run_bench(settings=("domains",), methods=["average", "fs-merge", "regmean"], out=str(tmp_path))
    rows = ["source 1 (business+politics)", "source 2 (sport+entertainment)", "ensemble (2 models)", "average",
            "fs-merge diag+lowrank(12)", "fs-merge full", "regmean", "fs-merge local full"]
    assert [(row["shape"], row["method"]) for row in r["rows"]] == [(s, m) for s in ("llama", "gpt2") for m in rows]
    assert all(row["peak_bytes"] >= 0 for row in r["rows"] if row["seconds"] is not None)
    assert all(1 < row[f"ppl {d}"] < 10 * r["vocabulary"] for row in r["rows"] for d in r["domains"])
    again = bench.run_bench(settings=("domains",), methods=["average"], out=str(tmp_path))   # read back
    assert again["cells_from_cache"] == 2            # the average of each shape, not merged again
    assert again["rows"] == [row for row in r["rows"] if row["seconds"] is None or row["method"] == "average"]
    r.update(command="foldmerge bench lm", environment={"machine": "test"})
    (tmp_path / "bench-lm.json").write_text(json.dumps(r))
    build_report([str(tmp_path / "bench-lm.json")], str(tmp_path / "report"), "x")
    assert "Language models" in (tmp_path / "report" / "report.md").read_text()
    bench.print_report(r, "x")


@pytest.mark.parametrize("variant", ["global", "local"])
def test_a_language_model_merge_under_fsdp_equals_the_one_process_merge(tmp_path, capsys, variant):
    # two gloo processes, each holding half of every trained parameter (the SuperNet's, or each
    # stream space's maps for local): the merged model as one process makes it
    models = [make(tmp_path / f"lm {k}", k) for k in range(2)]
    data = [texts(tmp_path / f"text {k}.txt", k) for k in range(2)]
    common = [*map(str, models), "--data", *map(str, data), "--per-task", "12", "--fidelity", "0",
              "--variant", variant, "--epochs", "3", "--batch-size", "7", "--calibrate", "none"]
    outs = []
    for k, extra in enumerate(([], ["--devices", "2", "--parallel", "fsdp"])):
        outs.append(tmp_path / f"out {k}")
        assert cli.main(["merge", *common, *extra, "--out", str(outs[-1])]) == 0, capsys.readouterr().err
    one, fsdp = (foldmerge.load(o) for o in outs)
    assert fsdp.meta["engine"]["parallel"] == "fsdp" and fsdp.meta["engine"]["devices"] == 2
    for (name, a), (_, b) in zip(one.state_dict().items(), fsdp.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_the_fidelity_table_scores_the_sources_ensemble_by_averaging_their_probabilities(tmp_path):
    import math

    from torch.nn import functional as F

    from foldmerge.context import FeatureCache
    from foldmerge.model import padding_id
    from foldmerge.selection import fidelity
    paths = [make(tmp_path / f"lm {k}", k) for k in range(2)]
    sources = [foldmerge.load(p) for p in paths]
    merged = foldmerge.merge(paths, [texts(tmp_path / f"t{k}.txt", k) for k in range(2)], "average", calibrate="none",
                             fidelity=0, per_task=8)
    held = [torch.randint(3, 3 + len(WORDS), (5, 12), generator=torch.Generator().manual_seed(k)) for k in range(2)]
    scores = fidelity(merged, sources, held, FeatureCache(), index=[[0], [0]])      # one LM head, shared
    pad = padding_id(merged)
    for (task, f), x in zip(scores.items(), held):
        with torch.no_grad():                      # by hand: log of the mean of the two softmaxes
            probs = sum(F.softmax(s(x)[0], -1) for s in sources) / 2
        target = x[:, 1:]
        keep = target != pad
        expected = math.exp(F.nll_loss(probs[:, :-1][keep].log(), target[keep]).item())
        assert f["ensemble_perplexity"] == pytest.approx(expected, rel=1e-5), task
