"""The same-start methods: weight similarity (eq. 4), task arithmetic, TIES and the gating merge."""
import copy
import itertools

import pytest
import torch

from foldmerge.gated import GatedModel
from foldmerge.loading import load as load_model
from foldmerge.methods import average, gating, task_arithmetic, ties
from foldmerge.model import TaskModel
from foldmerge.similarity import lowest, similarities, total_cosine

VIT = {"image_size": 28, "patch": 7, "width": 16, "depth": 2, "heads": 2, "mlp_dim": 32, "out_dim": 16}
TASKS = ["mnist:0-4", "fmnist:5-9", "mnist/rot90:0-2"]


def same_start(n=3, scale=0.05, arch="vit", config=VIT, seed=0):
    """A base model and n sources fine-tuned from it (here: perturbed), one task each."""
    torch.manual_seed(seed)
    base = TaskModel(arch, config, ["mnist"], head="class-embedding")
    sources = []
    for k in range(n):
        m = TaskModel(arch, config, [TASKS[k]], head="class-embedding")
        m.backbone.load_state_dict(base.backbone.state_dict())
        with torch.no_grad():
            for p in m.backbone.parameters():
                p.add_(scale * torch.randn_like(p) * (1 + p.abs()))
        sources.append(m.eval())
    return base.eval(), sources


def images(n=6, seed=1):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_similarity_is_eq4_on_hand_built_weights():
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    assert total_cosine([a, b, c]) == pytest.approx(0 + 2 ** -0.5 + 2 ** -0.5)
    _, models = same_start()
    states = [m.backbone.state_dict() for m in models]
    keys = [f"blocks.1.{n}.weight" for n in "qkvo"]
    flat = [torch.cat([s[k].reshape(-1) for k in keys]).double() for s in states]
    expect = sum(float(x @ y / (x.norm() * y.norm())) for x, y in itertools.combinations(flat, 2))
    sims = {name: s for name, _, s in similarities(models, "attention")}
    assert sims["blocks.1.attn"] == pytest.approx(expect, rel=1e-10)
    # separate layers: the sum of each matrix's own eq. 4; separate MLP: fc1 and fc2 apart
    sep = {name: s for name, _, s in similarities(models, "attention", "separate-combined")}
    assert sep["blocks.1.attn"] == pytest.approx(sum(total_cosine([s[k] for s in states]) for k in keys), rel=1e-10)
    assert [n for n, _, _ in similarities(models, "mlp", "concat-separate")] == \
        ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    picked = lowest(models, "mlp", 1)
    assert picked[0][2] == min(s for _, _, s in similarities(models, "mlp"))
    with pytest.raises(ValueError, match="unknown similarity strategy"):
        similarities(models, "mlp", "bogus")


def test_task_arithmetic_at_one_over_n_is_averaging():
    base, models = same_start()
    ta = task_arithmetic.merge(models, base=base, lam=1 / 3)
    avg = average.merge(models)
    for k, v in avg.backbone.state_dict().items():
        torch.testing.assert_close(ta.backbone.state_dict()[k], v, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pre-trained model"):
        task_arithmetic.merge(models)


def test_ties_matches_its_definition_on_hand_built_vectors():
    taus = [{"w": torch.tensor([0.5, -0.1, 2.0, -3.0]), "b": torch.tensor([0.2])},
            {"w": torch.tensor([-1.0, 0.3, 1.0, 0.05]), "b": torch.tensor([-0.4])},
            {"w": torch.tensor([0.6, -0.2, -4.0, 0.0]), "b": torch.tensor([0.1])}]
    # density 0.6 keeps 3 of 5 entries per vector: |2, -3, 0.5| ; |-1, 1, -0.4| ; |-4, 0.6, -0.2|
    trimmed = [ties.trim(t, 0.6) for t in taus]
    assert trimmed[0]["w"].tolist() == [0.5, 0.0, 2.0, -3.0] and trimmed[0]["b"].tolist() == [0.0]
    assert trimmed[1]["w"].tolist() == [-1.0, 0.0, 1.0, 0.0] and trimmed[1]["b"].tolist() == pytest.approx([-0.4])
    tau = ties.ties_vector(taus, 0.6)
    # entry 0: 0.5 - 1 + 0.6 > 0 -> mean(0.5, 0.6); entry 1: only -0.2 -> -0.2; entry 2: 2 + 1 - 4 < 0 -> -4;
    # entry 3: -3 alone; b: -0.4 alone (0.2 and 0.1 trimmed)
    assert tau["w"].tolist() == pytest.approx([0.55, -0.2, -4.0, -3.0])
    assert tau["b"].tolist() == pytest.approx([-0.4])
    base, models = same_start()
    merged = ties.merge(models, base=base, density=1.0, lam=1.0)
    assert merged.meta["method"] == "ties"


def gate_towards(model: GatedModel, k: int) -> None:
    """A gate whose softmax is one-hot on source k for every input."""
    with torch.no_grad():
        model.gate.head.weight.zero_()
        model.gate.head.bias.fill_(-100.0)
        model.gate.head.bias[k] = 100.0


def all_gated(models):
    keys = [k for u in models[0].spec.units for k in u.keys]
    cfg = models[0].config()
    g = GatedModel(cfg["arch"], cfg["backbone"], [t for m in models for t in m.tasks], cfg["head_bias"], cfg["head"],
                   gated=keys)
    g.load_stacks(models)
    for dst, src in zip(g.heads, [h for m in models for h in m.heads]):
        dst.load_state_dict(src.state_dict())
    return g.eval()


@pytest.mark.parametrize("arch, config", [("vit", VIT), ("mlp", {"in_dim": 784, "hidden": [32, 16]})])
def test_a_gate_on_task_k_reproduces_model_k(arch, config):
    _, models = same_start(arch=arch, config=config)
    g = all_gated(models)
    x = images()
    for k, m in enumerate(models):
        gate_towards(g, k)
        with torch.no_grad():
            torch.testing.assert_close(g(x)[k], m(x)[0], rtol=0, atol=1e-5)
        assert g.route(x).tolist() == [k] * len(x)


def test_gated_mixture_equals_the_materialised_weights_per_input():
    """Σ_k p_k(x) W_k applied per input without building a weight per input: the same as building it."""
    _, models = same_start()
    g = all_gated(models)
    x = images(4)
    with torch.no_grad():
        g.gate.head.weight.normal_()      # a soft, input-dependent gate
        p = g.probabilities(x)
        assert (p.max(1).values < 0.999).all()
        out = g(x)
        states = [m.backbone.state_dict() for m in models]
        for b in range(len(x)):
            one = copy.deepcopy(models[0])
            one.backbone.load_state_dict({k: sum(p[b, i] * s[k] for i, s in enumerate(states)) for k in states[0]})
            for j, h in enumerate(g.heads):
                torch.testing.assert_close(out[j][b], h(one.features(x[b:b + 1]))[0], rtol=0, atol=1e-5)


def test_m0_without_gated_norms_is_avgmean_with_gate_chosen_heads():
    _, models = same_start()
    data = [images(16, seed=k) + k for k in range(3)]
    g = gating.merge(models, data, m=0, rest="average", gate_norms=False, gate_epochs=2)
    assert g.gated == [] and g.meta["parameters"] == g.num_parameters()
    avg = average.merge(models)
    x = images()
    with torch.no_grad():
        for a, b in zip(g(x), avg(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert g.route(x).tolist() == g.gate(x).argmax(1).tolist()


def test_gating_merge_saves_and_loads_with_the_same_predictions(tmp_path):
    _, models = same_start()
    data = [images(16, seed=k) + k for k in range(3)]
    g = gating.merge(models, data, m=1, rest="regmean", gate_epochs=2)
    assert set(g.meta["gated_modules"]) == {"attention", "mlp"}
    assert len(g.meta["gated_modules"]["attention"]) == 1 and "cls" in g.gated
    n_single = sum(p.numel() for p in models[0].backbone.parameters())
    assert g.num_parameters() > n_single
    g.save(tmp_path / "gated")
    back = load_model(tmp_path / "gated")
    assert isinstance(back, GatedModel)
    x = images()
    with torch.no_grad():
        for a, b in zip(g(x), back(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert back.route(x).tolist() == g.route(x).tolist()


def test_gating_refuses_what_it_cannot_do():
    _, models = same_start()
    data = [images(4, seed=k) for k in range(3)]
    with pytest.raises(ValueError, match="--rest: expected one of average, regmean"):
        gating.merge(models, data, rest="ties")
    with pytest.raises(ValueError, match="--strategy: expected one of concat-combined"):
        gating.merge(models, data, strategy="x")
    with pytest.raises(ValueError, match="reads images"):
        gating.merge(models, [d.flatten(1) for d in data], gate_epochs=1)


def test_same_start_from_the_command_line(tmp_path, capsys, monkeypatch):
    """A newcomer's path: a pre-trained ViT, sources fine-tuned from it with train-sources --from, then
    task arithmetic (with --base), TIES and the gating merge; the gated model loads in `foldmerge eval`."""
    import json

    from foldmerge import cli
    from foldmerge.data import Task
    split = Task.split           # every merge scores itself and its sources: on 300 test images here
    monkeypatch.setattr(Task, "split", lambda self, which: tuple(t[:300] for t in split(self, which)))
    base = TaskModel("vit", VIT, ["mnist/transpose"], head="class-embedding")
    base.save(tmp_path / "base")

    def run(*argv):
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr().out
        assert code in (0, None), out
        return out
    run("train-sources", "--arch", "vit", "--from", tmp_path / "base", "--tasks", "mnist:0-4", "fmnist:5-9",
        "--limit", "64", "--out", tmp_path / "src", "--json")
    a, b = tmp_path / "src" / "mnist_0-4-s0", tmp_path / "src" / "fmnist_5-9-s1"
    assert load_model(a).meta["start"] == str((tmp_path / "base").resolve())
    ta = json.loads(run("merge", a, b, "--method", "task-arithmetic", "--base", tmp_path / "base", "--lam", "0.5",
                        "--per-task", "8", "--out", tmp_path / "ta", "--json"))
    assert ta["meta"]["lam"] == 0.5
    run("merge", a, b, "--method", "ties", "--base", tmp_path / "base", "--density", "0.5", "--per-task", "8",
        "--out", tmp_path / "ties")
    g = json.loads(run("merge", a, b, "--method", "gating", "--m", "1", "--rest", "average", "--gate-epochs", "1",
                       "--per-task", "8", "--out", tmp_path / "g", "--json"))
    assert g["meta"]["rest"] == "average" and "routed_mean" in g["test"]
    out = run("eval", tmp_path / "g")
    assert "routed acc %" in out
    assert cli.main(["merge", str(a), str(b), "--method", "ties", "--per-task", "8", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base DIR" in err[0] and not (tmp_path / "x").exists()


def test_bench_gating_rows_on_a_toy_scale(monkeypatch, capsys):
    """The bench's main and strategy rows, on three perturbed tiny sources and 16 images per task."""
    from foldmerge.bench import gating as bench
    from foldmerge.data import Task
    split = Task.split
    monkeypatch.setattr(Task, "split", lambda self, which: tuple(t[:300] for t in split(self, which)))
    base, models = same_start()
    data = [images(16, seed=k) + k for k in range(3)]
    monkeypatch.setattr(bench, "MS", (0, 1))
    monkeypatch.setattr(bench, "TA_GRID", (0.5,))
    monkeypatch.setattr(bench, "TIES_GRID", (1.0,))
    rows = bench.main_rows(3, models, base, data, lambda *_: None)
    names = [r["method"] for r in rows]
    assert names[:5] == ["individual", "AvgMean", "RegMean", "task arithmetic", "TIES"]
    assert "ours + RegMean m=1" in names and all(0 <= r["mean"] <= 100 for r in rows)
    gated = next(r for r in rows if r["method"] == "ours + AvgMean m=1")
    assert gated["params_m"] > rows[1]["params_m"] and gated["mflops"] > rows[1]["mflops"]
    sims = bench.similarity_rows(3, models)
    assert set(sims) == {"attention", "mlp"} and all(0 < v <= 1 for v in sims["mlp"].values())
    bench.print_report({"main": rows, "similarity": {"3": sims}, "strategies": [], "gate": [], "domain": [],
                        "scratch": [], "total_seconds": 1.0}, "foldmerge bench gating (toy)")
    assert "3 models fine-tuned from one start" in capsys.readouterr().out
