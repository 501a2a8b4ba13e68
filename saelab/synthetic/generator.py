"""Planted features with a hierarchy (the MP-SAE paper's toy tree, App. B.1, and the Matryoshka paper's): n unit
features in R^d; `n_parents` internal parents each with `n_children` mutually exclusive children (a child fires only
with its parent, and the parent always fires when a child does), plus `n_leaves` parents without children.
`parents` says how the top level fires:
* "exclusive" (default, the paper's: the authors' tree.json, where the root always fires and picks one of its
  children): a row holds one parent, plus at most one of its children. A row's parent is a given leaf parent with
  `p_leaf`, a given internal parent with `p_parent` (no parent with the rest, 1 − Σ; the defaults sum to 1);
* "independent": each parent fires on its own, leaf parents with `p_leaf`, internal ones with `p_parent`, so
  several parents (each with at most one of its children) share a row: co-firing parents, as in real activations.
A child fires with `p_child` given its parent (at most one);
magnitudes ~ N(`mag_mean`, `mag_std`²) clamped positive; `corr` mixes a shared direction into the features of
one level (intra-level correlation: same-level cosines ≈ ε, exact only if the shared direction is ⟂ the features);
`noise` adds isotropic Gaussian noise. Defaults are the paper's (20 features in R^20, expected L0 ≈ 1.36).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARENT_MODES = ("exclusive", "independent")


@dataclass
class TreeSpec:
    d: int = 20
    n_parents: int = 3
    n_children: int = 3
    n_leaves: int = 8
    p_leaf: float = 0.05
    p_parent: float = 0.2
    p_child: float = 0.2  # per child given its parent; children are mutually exclusive
    mag_mean: float = 1.5
    mag_std: float = 0.25
    corr: float = 0.0  # intra-level correlation ε
    noise: float = 0.0
    parents: str = "exclusive"  # exclusive: one parent per row (the paper's); independent: each parent on its own

    def __post_init__(self):
        from saelab.settings import check

        check(self.parents in PARENT_MODES, "parents", f"must be one of {PARENT_MODES}, got {self.parents!r}")
        for name in ("p_leaf", "p_parent", "p_child"):
            value = getattr(self, name)
            check(0 <= value <= 1, name, f"is a probability, must be in [0, 1], got {value}")
        top = self.n_parents * self.p_parent + self.n_leaves * self.p_leaf
        check(self.parents == "independent" or top <= 1 + 1e-9, "p_parent, p_leaf",
              f"the top level is mutually exclusive: n_parents·p_parent + n_leaves·p_leaf must be <= 1, got {top:g} "
              f"(or let parents fire on their own: parents='independent')")
        kids = self.n_children * self.p_child
        check(kids <= 1 + 1e-9, "p_child", f"children are mutually exclusive: n_children·p_child must be <= 1, "
                                           f"got {kids:g}")

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.n_children) + self.n_leaves


@dataclass
class PlantedData:
    x: torch.Tensor  # [N, d] activations
    codes: torch.Tensor  # [N, n_features] true magnitudes (0 = not firing)
    features: torch.Tensor  # [n_features, d] unit directions
    parent: torch.Tensor  # [n_features] long: the parent of each child, -1 for parents


def _directions(spec: TreeSpec, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = spec.n_features
    q = torch.randn(max(n, spec.d), spec.d, generator=gen)
    if n <= spec.d:  # orthonormal features when they fit
        q = torch.linalg.qr(torch.randn(spec.d, spec.d, generator=gen))[0][:n]
    feats = q[:n] / q[:n].norm(dim=1, keepdim=True)
    parent = torch.full((n,), -1, dtype=torch.long)
    parents = list(range(spec.n_parents)) + list(range(spec.n_parents * (1 + spec.n_children), n))
    children = list(range(spec.n_parents, spec.n_parents * (1 + spec.n_children)))
    for i, c in enumerate(children):
        parent[c] = i // spec.n_children
    if spec.corr > 0:  # one shared direction per level, mixed in with weight √ε (cosine ε between same-level pairs)
        for level in (parents, children):
            shared = torch.randn(spec.d, generator=gen)
            shared /= shared.norm()
            idx = torch.tensor(level)
            mixed = (1 - spec.corr) ** 0.5 * feats[idx] + spec.corr ** 0.5 * shared
            feats[idx] = mixed / mixed.norm(dim=1, keepdim=True)
    return feats, parent


def generate(spec: TreeSpec, n_rows: int, seed: int = 0, sample_seed: int | None = None) -> PlantedData:
    """`seed` fixes the features; `sample_seed` (default: seed) the rows, so a held-out set shares the features."""
    feats, parent = _directions(spec, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
    if sample_seed is None:
        _directions(spec, gen)  # the same stream as the features' (rows of seed s are the same with or without it)
    n = spec.n_features
    fire = torch.zeros(n_rows, n, dtype=torch.bool)
    top = torch.cat([torch.arange(spec.n_parents), torch.arange(spec.n_parents * (1 + spec.n_children), n)])
    p_top = torch.tensor([spec.p_parent] * spec.n_parents + [spec.p_leaf] * spec.n_leaves)
    if spec.parents == "independent":
        fire[:, top] = torch.rand(n_rows, len(top), generator=gen) < p_top
    else:
        which = torch.bucketize(torch.rand(n_rows, generator=gen), p_top.cumsum(0), right=True)  # one parent per row
        has = which < len(top)  # past the last slice: no parent in this row
        fire[has.nonzero().squeeze(1), top[which[has]]] = True
    for p in range(spec.n_parents):  # at most one child, only when the parent fires
        kids = (parent == p).nonzero().squeeze(1)
        u = torch.rand(n_rows, generator=gen)
        which = (u / spec.p_child).long()  # child `which` fires when u falls in its p_child slice
        ok = fire[:, p] & (which < len(kids))
        fire[ok.nonzero().squeeze(1), kids[which[ok]]] = True
    mags = (spec.mag_mean + spec.mag_std * torch.randn(n_rows, n, generator=gen)).clamp_min(1e-3)
    codes = mags * fire
    x = codes @ feats
    if spec.noise > 0:
        x = x + spec.noise * torch.randn(n_rows, spec.d, generator=gen)
    return PlantedData(x, codes, feats, parent)
