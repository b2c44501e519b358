"""Vision Transformers in plain PyTorch (the FS-Merge paper's ViT-B/16 family, scaled down).

Pre-LayerNorm blocks, a CLS token, learned position embeddings, a final LayerNorm on the
CLS token and a projection (no bias) to the feature dimension, as in CLIP's image encoder:

    h_0 = [cls; patches · W_patchᵀ + b_patch] + pos
    h   = h + W_O · attn(LN_1(h))             attn: q, k, v = separate linears, H heads
    h   = h + W_2 · gelu(W_1 · LN_2(h))
    f   = W_proj · LN_post(h[CLS])

Every linear map is its own `nn.Linear` (the patch projection is a linear on flattened
patches, the same as a stride-p convolution), because each is a place where the
Foldable SuperNet puts an M or a U (DESIGN §3, paper appendix B.1).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..foldable import (FoldMap, _fit_cols, fold_group_maps, fold_groups, fold_linears, frozen_cached, merge_features,
                        pack_maps, unmerge_features)
from ..spec import ArchSpec, Norm, Param, Probe, Space


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p · W/p, C·p·p), patches in row-major order."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def multihead(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention with `heads` heads of width/heads each: (B, N, D) x 3 -> (B, N, D)."""
    b, n, _ = q.shape

    def split(t):           # (B, N, D) -> (B, H, N, D/H)
        return t.reshape(b, n, heads, -1).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, -1)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(multihead(self.q(x), self.k(x), self.v(x), self.heads))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.ln1(h))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class Backbone(nn.Module):
    def __init__(self, image_size: int = 28, channels: int = 1, patch: int = 7, width: int = 64,
                 depth: int = 4, heads: int = 4, mlp_dim: int = 128, out_dim: int = 64):
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not divisible by its {heads} attention heads")
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch}")
        if depth < 1:
            raise ValueError("a ViT needs at least one block")
        self.image_size, self.channels, self.patch = image_size, channels, patch
        self.width, self.depth, self.heads, self.mlp_dim, self.out_dim = width, depth, heads, mlp_dim, out_dim
        n_patches = (image_size // patch) ** 2
        self.patch_proj = nn.Linear(channels * patch * patch, width)
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(n_patches + 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim) for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(width))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """h_0: the CLS token and the embedded patches, with position embeddings (B, 1 + N, width)."""
        p = self.patch_proj(patchify(x, self.patch))
        cls = self.cls.expand(p.shape[0], 1, -1)
        return torch.cat([cls, p], dim=1) + self.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h)
        return self.proj(self.ln_post(h[:, 0]))


def spec(config: dict) -> ArchSpec:
    """The ViT as data (DESIGN §3, paper appendix B.1).

    Spaces: the shared pixels of a patch; the residual stream `res` (one space through every
    block); per block l the attention spaces `qk{l}` (q and k together: their dot product is
    what attention reads) and `v{l}`, both split into the heads, and the MLP hidden `mlp{l}`;
    the features `feat`. Sites: the patch embedding, its bias, the class token and the
    positions are summed into one tensor, so one M (`embed`) merges them; Q, K and V read
    LN1's output through one U; every other M and U is the layer's own."""
    c = {**DEFAULTS, **config}
    heads = c["heads"]
    spaces = [Space("pixels", shared=True), Space("res"), Space("feat")]
    params = [Param("patch_proj.weight", ("res", "pixels"), merge_at="embed"),
              Param("patch_proj.bias", ("res",), merge_at="embed"),
              Param("cls", ("res",), merge_at="embed"), Param("pos", (None, "res"), merge_at="embed")]
    norms, probes = [], [Probe("res", "blocks.0", "in")]
    for l in range(c["depth"]):
        b = f"blocks.{l}"
        qk, v, mlp = f"qk{l}", f"v{l}", f"mlp{l}"
        spaces += [Space(qk, heads=heads), Space(v, heads=heads), Space(mlp)]
        for name, out, inp, reads_at in (("q", qk, "res", f"{b}.ln1"), ("k", qk, "res", f"{b}.ln1"),
                                         ("v", v, "res", f"{b}.ln1"), ("o", "res", v, None),
                                         ("fc1", mlp, "res", None), ("fc2", "res", mlp, None)):
            params += [Param(f"{b}.{name}.weight", (out, inp), unmerge_at=reads_at), Param(f"{b}.{name}.bias", (out,))]
        norms += [Norm(f"{b}.ln1", "res"), Norm(f"{b}.ln2", "res")]
        probes += [Probe(qk, f"{b}.q"), Probe(qk, f"{b}.k"), Probe(v, f"{b}.v"), Probe(mlp, f"{b}.fc2", "in"),
                   Probe("res", b)]
    params.append(Param("proj.weight", ("feat", "res")))
    norms.append(Norm("ln_post", "res"))
    probes.append(Probe("feat", ""))
    return ArchSpec("vit", spaces, params, norms, probes, output="feat", build=lambda cfg: Backbone(**cfg),
                    resize=resize, width_spaces=("res", "mlp0"), check=check_compatible)


DEFAULTS = {"image_size": 28, "channels": 1, "patch": 7, "width": 64, "depth": 4, "heads": 4, "mlp_dim": 128,
            "out_dim": 64}


def resize(config: dict, widths: list[int]) -> dict:
    """The configuration at residual width widths[0] and MLP width widths[1] (default: the source's)."""
    if not 1 <= len(widths) <= 2:
        raise ValueError(f"a ViT takes one or two target widths (residual, MLP), got {list(widths)}")
    if any(w < 1 for w in widths):
        raise ValueError(f"target widths must be positive, got {list(widths)}")
    c = {**config, "width": int(widths[0])}
    if len(widths) == 2:
        c["mlp_dim"] = int(widths[1])
    heads = c.get("heads", DEFAULTS["heads"])
    if c["width"] % heads:
        raise ValueError(f"merged width {c['width']} is not divisible by the {heads} attention heads")
    return c


def check_compatible(configs: list[dict]) -> None:
    """Same depth, heads, patch and image size (widths may differ); else one clear error."""
    for attr, what in (("depth", "depths"), ("heads", "attention head counts"), ("patch", "patch sizes"),
                       ("image_size", "image sizes"), ("channels", "channel counts")):
        vals = [c.get(attr, DEFAULTS[attr]) for c in configs]
        if len(set(vals)) != 1:
            raise ValueError(f"cannot merge ViTs with different {what} {vals}")


# ------------------------------------------------------------------- Foldable SuperNet
class SuperNet(nn.Module):
    """The ViT Foldable SuperNet of the FS-Merge paper, appendix B.1 (DESIGN §3).

    Frozen source weights; learnable maps (one FoldMap each, n column blocks) and merged
    LayerNorms. Residual stream of width d* (`widths[0]`), MLP hidden width m* (`widths[1]`):

      tokens   h* = M_in · [h_0^1; …; h_0^n]          (patch proj., CLS and positions of all models)
      attn     u = LN1*(h*);  q* = M_Q·[W_Q^k U_att[k] u + b_Q^k]_k   (one U_att for Q, K, V)
               a = MHA(q*, k*, v*) in width d* (H heads of d*/H);  h* += M_O·[W_O^k U_O[k] a + b_O^k]_k
      mlp      u = LN2*(h*);  g = gelu(M_1·[W_1^k U_1[k] u + b_1^k]_k);  h* += M_2·[W_2^k U_2[k] g + b_2^k]_k
      post     c = LN_post*(h*[CLS]);  f* = M_proj·[W_proj^k U_post[k] c]_k
      output   model k's features are reconstructed as U_out[k] · f*; U_out is folded into the heads.

    Every non-linear step (LayerNorm, softmax attention, GELU, residual add) acts on merged
    features, so folding each linear (W* = M·blockdiag(W)·U) gives a plain ViT of width d*
    that computes exactly what the SuperNet computes: `forward(form="folded")` runs that ViT
    (built every step, differentiable in the maps), `form="supernet"` the wide reference.
    """

    def __init__(self, sources, widths: list[int] | None = None, param: str = "diag+lowrank(16)",
                 init: str = "first", seed: int = 0):
        super().__init__()
        if any(s.arch != "vit" for s in sources):
            raise ValueError("the ViT SuperNet needs ViT source models")
        check_compatible([s.backbone_config for s in sources])
        self.n = len(sources)
        bbs = [s.backbone for s in sources]
        w = [b.width for b in bbs]
        m = [b.mlp_dim for b in bbs]
        o = [b.out_dim for b in bbs]
        widths = list(widths) if widths else [w[0], m[0]]
        if len(widths) == 1:
            widths.append(m[0])
        d, md = int(widths[0]), int(widths[1])
        if d % bbs[0].heads:
            raise ValueError(f"merged width {d} is not divisible by the {bbs[0].heads} attention heads")
        self.widths = [d, md]
        self.config = {"image_size": bbs[0].image_size, "channels": bbs[0].channels, "patch": bbs[0].patch,
                       "width": d, "depth": bbs[0].depth, "heads": bbs[0].heads, "mlp_dim": md, "out_dim": o[0]}
        self.tasks = [t for s in sources for t in s.tasks]
        self.head_bias = sources[0].head_bias
        g = torch.Generator().manual_seed(int(seed))
        dtype = bbs[0].proj.weight.dtype

        def fm(out_dim, in_dims, role):
            return FoldMap(out_dim, in_dims, param, init, role, g, dtype)

        # frozen sources: kept as modules whose parameters never train
        self.sources = nn.ModuleList(bbs)
        for p in self.sources.parameters():
            p.requires_grad_(False)
        self.M_in = fm(d, w, "merge")
        self.blocks = nn.ModuleList()
        for l in range(bbs[0].depth):
            blk = nn.Module()
            blk.U_att, blk.M_q, blk.M_k, blk.M_v = fm(d, w, "unmerge"), fm(d, w, "merge"), fm(d, w, "merge"), fm(d, w, "merge")
            blk.U_o, blk.M_o = fm(d, w, "unmerge"), fm(d, w, "merge")
            blk.U_1, blk.M_1 = fm(d, w, "unmerge"), fm(md, m, "merge")
            blk.U_2, blk.M_2 = fm(md, m, "unmerge"), fm(d, w, "merge")
            blk.ln1 = self._merged_norm([b.blocks[l].ln1 for b in bbs], d, init)
            blk.ln2 = self._merged_norm([b.blocks[l].ln2 for b in bbs], d, init)
            self.blocks.append(blk)
        self.ln_post = self._merged_norm([b.ln_post for b in bbs], d, init)
        self.U_post, self.M_proj = fm(d, w, "unmerge"), fm(o[0], o, "merge")
        self.U_out = fm(o[0], o, "unmerge")
        self.head_owner, heads = [], []
        for k, s in enumerate(sources):
            for h in s.heads:
                self.head_owner.append(k)
                heads.append(h)
        self.heads = nn.ModuleList(heads)
        for p in self.heads.parameters():
            p.requires_grad_(False)
        # The merged-width ViT the folded form runs, as a function of the folded weights: its
        # own parameters are removed, and each step sets the folded tensors as plain attributes
        # (what functional_call does, without its swap-in / swap-out of every tensor).
        self._template = Backbone(**self.config).to(dtype)
        self._template_slots = {}
        for name, _ in list(self._template.named_parameters()):
            owner, _, attr = name.rpartition(".")
            module = self._template.get_submodule(owner)
            del module._parameters[attr]
            self._template_slots[name] = (module, attr)
        # the maps of each fold group share tensors (foldable.MapBank), in the order the fold reads them
        self.map_banks = pack_maps(self, together=fold_group_maps(self._fold_plan()[1]))
        self.to(bbs[0].proj.weight.device)                     # maps live where the sources do

    @staticmethod
    def _merged_norm(norms, width: int, init: str) -> nn.LayerNorm:
        """A learnable LayerNorm of the merged width: model 1's for 'first', else the mean."""
        ln = nn.LayerNorm(width, eps=norms[0].eps).to(norms[0].weight.dtype)
        chosen = norms[:1] if init == "first" else norms
        with torch.no_grad():
            ln.weight.copy_(sum(_fit_cols(n.weight.detach(), width) for n in chosen) / len(chosen))
            ln.bias.copy_(sum(_fit_cols(n.bias.detach(), width) for n in chosen) / len(chosen))
        return ln

    # ------------------------------------------------------------------------ folding
    def _fold_jobs(self) -> tuple[list[str], list[tuple]]:
        """The ViT's linear layers as `fold_linears` jobs (M, source weights, U, source biases), named;
        all but the patch embedding, which `folded_state` merges with the class token and positions."""
        bbs = list(self.sources)
        names, jobs = [], []

        def job(name, M, lins, U, bias=True):
            names.append(name)
            jobs.append((M, [x.weight for x in lins], U, [x.bias for x in lins] if bias else None))

        for l, blk in enumerate(self.blocks):
            src = [s.blocks[l] for s in bbs]
            for name, M, U in (("q", blk.M_q, blk.U_att), ("k", blk.M_k, blk.U_att), ("v", blk.M_v, blk.U_att),
                               ("o", blk.M_o, blk.U_o), ("fc1", blk.M_1, blk.U_1), ("fc2", blk.M_2, blk.U_2)):
                job(f"blocks.{l}.{name}", M, [getattr(s, name) for s in src], U)
        job("proj", self.M_proj, [s.proj for s in bbs], self.U_post, bias=False)
        return names, jobs

    def _fold_plan(self) -> tuple[list[str], list[tuple], list[list[int]]]:
        """`_fold_jobs()` and its `fold_groups`, built once (a step would otherwise spend ~0.3 ms
        on it): the jobs hold the maps and the sources' parameters themselves, which `.to()`
        changes in place. Rebuilt if the sources' parameters were replaced by other tensors."""
        plan = self.__dict__.get("_plan")
        first_weight = plan[1][0][1][0] if plan is not None else None      # job 0 (block 0's q), source 0
        if first_weight is not self.sources[0].blocks[0].q.weight:
            names, jobs = self._fold_jobs()
            plan = self.__dict__["_plan"] = (names, jobs, fold_groups(jobs))
        return plan

    def folded_state(self) -> dict[str, torch.Tensor]:
        """Parameters of the merged-width ViT (differentiable in the maps and merged norms)."""
        bbs = list(self.sources)
        names, jobs, groups = self._fold_plan()
        st: dict[str, torch.Tensor] = {}
        for name, (w, b) in zip(names, fold_linears(jobs, groups)):
            st[name + ".weight"] = w
            if b is not None:
                st[name + ".bias"] = b
        # M_in merges everything the sources write into the residual stream first, in one go: the
        # patch embedding (no U: every model reads the same pixels, so W* = Σ_k M_in[k]·W_k, each
        # pixel's column of W_k merged as a feature), its bias, the class token and the positions
        p, t = bbs[0].patch_proj.in_features, bbs[0].pos.shape[0]
        pieces = [x for s in bbs for x in (s.patch_proj.weight, s.patch_proj.bias, s.cls, s.pos)]
        rows = frozen_cached("vit embedding", pieces, lambda: [                        # (p + 2 + t, d_k) each
            torch.cat([w.T, bias[None], cls[None], pos]) for w, bias, cls, pos in zip(*[iter(pieces)] * 4)])
        merged = merge_features(self.M_in, rows)
        w, b, cls, pos = merged.split([p, 1, 1, t])
        st["patch_proj.weight"], st["patch_proj.bias"], st["cls"], st["pos"] = w.T, b[0], cls[0], pos
        for l, blk in enumerate(self.blocks):
            for ln in ("ln1", "ln2"):
                norm = getattr(blk, ln)
                st[f"blocks.{l}.{ln}.weight"], st[f"blocks.{l}.{ln}.bias"] = norm.weight, norm.bias
        st["ln_post.weight"], st["ln_post.bias"] = self.ln_post.weight, self.ln_post.bias
        return st

    def forward(self, x: torch.Tensor, form: str = "folded") -> torch.Tensor:
        """Merged features f* (B, out_dim)."""
        if form == "folded":
            state = self.folded_state()
            if state.keys() != self._template_slots.keys():     # a folded_state / Backbone mismatch
                raise RuntimeError(f"folded state and ViT disagree: {sorted(state.keys() ^ self._template_slots.keys())}")
            try:
                for name, (module, attr) in self._template_slots.items():
                    module.__dict__[attr] = state[name]
                return self._template(x)
            finally:                                  # the step's graph is not kept alive by the template
                for module, attr in self._template_slots.values():
                    module.__dict__.pop(attr, None)
        if form != "supernet":
            raise ValueError(f"form must be 'folded' or 'supernet', got {form!r}")
        return self._supernet_forward(x)

    def _supernet_forward(self, x: torch.Tensor) -> torch.Tensor:
        bbs = list(self.sources)
        h = merge_features(self.M_in, [s.tokens(x) for s in bbs])
        for l, blk in enumerate(self.blocks):
            src = [s.blocks[l] for s in bbs]
            u = unmerge_features(blk.U_att, blk.ln1(h))
            q, k, v = (merge_features(M, [getattr(s, name)(uk) for s, uk in zip(src, u)])
                       for name, M in (("q", blk.M_q), ("k", blk.M_k), ("v", blk.M_v)))
            a = multihead(q, k, v, src[0].heads)
            h = h + merge_features(blk.M_o, [s.o(ak) for s, ak in zip(src, unmerge_features(blk.U_o, a))])
            u = unmerge_features(blk.U_1, blk.ln2(h))
            g = F.gelu(merge_features(blk.M_1, [s.fc1(uk) for s, uk in zip(src, u)]))
            h = h + merge_features(blk.M_2, [s.fc2(gk) for s, gk in zip(src, unmerge_features(blk.U_2, g))])
        c = unmerge_features(self.U_post, self.ln_post(h[:, 0]))
        return merge_features(self.M_proj, [s.proj(ck) for s, ck in zip(bbs, c)])

    @property
    def output_map(self):
        """The map that reconstructs the sources' features and is folded into the heads."""
        return self.U_out

    def reconstruct(self, merged: torch.Tensor) -> list[torch.Tensor]:
        return unmerge_features(self.U_out, merged)

    @torch.no_grad()
    def fold(self):
        """A plain ViT of the merged width with one adapted head per task (head_k · U_out[k])."""
        from ..model import TaskModel
        merged = TaskModel("vit", dict(self.config), self.tasks, self.head_bias)
        merged.to(dtype=self.M_in.dtype, device=self.M_in.device)
        merged.backbone.load_state_dict({k: v.detach() for k, v in self.folded_state().items()})
        for i, head in enumerate(merged.heads):
            src = self.heads[i]
            head.weight.copy_(self.U_out.apply(self.head_owner[i], src.weight))
            if head.bias is not None:
                head.bias.copy_(src.bias)
        return merged
