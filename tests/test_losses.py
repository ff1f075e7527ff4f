"""Contrastive losses: against a brute-force loop over the paper's sums, limits, stability,
gradient signs (and those of the authors' released DHN-NCE), bad inputs."""

from __future__ import annotations

import pytest
import torch
from loss_reference import KINDS, reference_from_similarity, reference_loss

from napari_medclipsam.finetune.losses import (
    LOSSES,
    dcl,
    dcl_from_similarity,
    dhn_nce,
    dhn_nce_from_similarity,
    get_loss,
    hn_nce,
    hn_nce_from_similarity,
    info_nce,
    info_nce_from_similarity,
)

FROM_SIMILARITY = {
    "infonce": info_nce_from_similarity,
    "dcl": dcl_from_similarity,
    "hn-nce": hn_nce_from_similarity,
    "dhn-nce": dhn_nce_from_similarity,
}

SETTINGS = [  # (temperature, beta1, beta2)
    (0.6, 0.15, 0.15),
    (0.07, 0.5, 0.0),
    (1.3, 0.0, 0.9),
]


def _features(batch, dim=7, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    img = scale * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    txt = scale * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return img.requires_grad_(True), txt.requires_grad_(True)


def _kwargs(kind, temperature, beta1, beta2):
    if kind in ("hn-nce", "dhn-nce"):
        return {"temperature": temperature, "beta1": beta1, "beta2": beta2}
    return {"temperature": temperature}


def _value_and_grads(fn, img, txt):
    loss = fn(img, txt)
    g_img, g_txt = torch.autograd.grad(loss, (img, txt))
    return loss.detach(), g_img, g_txt


def _assert_close(actual, expected):
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10 * max(scale, 1e-3))


# --------------------------------------------------------------------------- registry


def test_registry_and_get_loss():
    assert set(LOSSES) == set(KINDS)
    expected = {"infonce": info_nce, "dcl": dcl, "hn-nce": hn_nce, "dhn-nce": dhn_nce}
    assert expected == LOSSES
    for name, fn in LOSSES.items():
        assert get_loss(name) is fn
    with pytest.raises(ValueError, match="dhn-nce") as err:
        get_loss("triplet")
    assert "triplet" in str(err.value) and "infonce" in str(err.value)


# --------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [2, 5, 8])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_brute_force(kind, batch, setting, normalize):
    kw = _kwargs(kind, *setting)
    # Unnormalised features of modest norm when normalize=False (s/tau stays moderate for
    # the plain exp/log of the reference).
    img, txt = _features(batch, seed=batch, scale=1.0 if normalize else 0.4)
    fast = _value_and_grads(lambda i, t: get_loss(kind)(i, t, normalize=normalize, **kw),
                            img, txt)
    slow = _value_and_grads(
        lambda i, t: reference_loss(kind, i, t, *setting, normalize=normalize), img, txt)
    for a, b in zip(fast, slow, strict=True):
        _assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_from_similarity_matches_brute_force(kind):
    g = torch.Generator().manual_seed(3)
    s = (2 * torch.rand(6, 6, generator=g, dtype=torch.float64) - 1).requires_grad_(True)
    fn = FROM_SIMILARITY[kind]
    kw = _kwargs(kind, 0.3, 0.4, 0.2)
    fast = fn(s, **kw)
    (g_fast,) = torch.autograd.grad(fast, s)
    slow = reference_from_similarity(kind, s, 0.3, 0.4, 0.2)
    (g_slow,) = torch.autograd.grad(slow, s)
    _assert_close(fast.detach(), slow.detach())
    _assert_close(g_fast, g_slow)


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("batch", [2, 9])
@pytest.mark.parametrize("temperature", [0.05, 0.6])
def test_zero_hardness_gives_dcl_and_infonce(batch, temperature):
    img, txt = _features(batch, seed=11)
    pairs = [
        (lambda i, t: dhn_nce(i, t, temperature, 0.0, 0.0), lambda i, t: dcl(i, t, temperature)),
        (lambda i, t: hn_nce(i, t, temperature, 0.0, 0.0),
         lambda i, t: info_nce(i, t, temperature)),
    ]
    for hard, plain in pairs:
        for a, b in zip(_value_and_grads(hard, img, txt), _value_and_grads(plain, img, txt),
                        strict=True):
            _assert_close(a, b)


def test_infonce_is_clip_cross_entropy():
    img, txt = _features(6, seed=5)
    s = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    labels = torch.arange(6)
    expected = (torch.nn.functional.cross_entropy(s / 0.2, labels)
                + torch.nn.functional.cross_entropy(s.T / 0.2, labels))
    _assert_close(info_nce(img, txt, 0.2).detach(), expected.detach())


def test_normalize_flag():
    img, txt = _features(4, seed=2)
    unit_img = torch.nn.functional.normalize(img.detach(), dim=1)
    unit_txt = torch.nn.functional.normalize(txt.detach(), dim=1)
    for fn in LOSSES.values():
        _assert_close(fn(img, txt).detach(), fn(unit_img, unit_txt, normalize=False))
        # normalize=False uses the features as given: scaling them changes the loss.
        assert not torch.allclose(fn(img, txt, normalize=False), fn(2 * img, txt,
                                                                       normalize=False))


# --------------------------------------------------------------------------- stability


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stable_at_small_temperature_and_large_norms(kind, dtype):
    img, txt = _features(8, dim=16, seed=4, scale=100.0 / 4)  # norms ~100
    img = img.detach().to(dtype).requires_grad_(True)
    txt = txt.detach().to(dtype).requires_grad_(True)
    for normalize in (False, True):
        loss = get_loss(kind)(img, txt, **_kwargs(kind, 0.01, 0.15, 0.15), normalize=normalize)
        g_img, g_txt = torch.autograd.grad(loss, (img, txt))
        assert loss.dtype == dtype
        assert torch.isfinite(loss)
        if kind in ("infonce", "hn-nce"):  # the positive is in the denominator: loss >= 0
            assert loss >= 0
        assert torch.isfinite(g_img).all() and torch.isfinite(g_txt).all()


# --------------------------------------------------------------------------- gradient signs


def _unit_features(batch=16, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    txt = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)


def released_dhn_nce_from_similarity(s, temperature=0.6, beta1=0.15, beta2=0.15):
    """A re-implementation of the DHN-NCE loss *as released* by the MedCLIP-SAMv2 authors.

    Not the paper's equation: kept here only to show what its defects do to the gradients.
    The released ``HardNegativeLoss`` (alpha = 0, ``batch_size`` = B) departs from it in four
    ways, reproduced below:

    * masking by multiplication: ``exp(a * mask)`` turns every masked entry into ``exp(0) = 1``
      (the off-diagonal of the "positive" matrix, the diagonal of the "negative" one, which
      also lands in the normaliser);
    * the weights' normaliser sums ``exp(a_ik)`` -- without ``beta``;
    * the ``[B, B] / [B]`` division broadcasts over the last axis, so entry ``(i, j)`` is
      divided by the normaliser of row ``j`` instead of row ``i``;
    * no sum inside the log: the loss is ``-log(pos_ij / neg_ij)`` element-wise, averaged
      over all ``B^2`` entries.
    """
    n = s.shape[0]
    a = s / temperature
    eye = torch.eye(n, dtype=torch.bool)

    def direction(logits, beta):
        pos = torch.exp(logits * eye)  # 1 off the diagonal
        neg_exp = torch.exp(logits * ~eye)  # 1 on the diagonal
        norm = neg_exp.sum(dim=-1)  # no beta; shape [B]
        weight = (n - 1) * torch.exp(beta * logits * ~eye) / norm  # column j / norm[j]
        return -torch.log(pos / (weight * neg_exp))  # element-wise: no sum inside the log

    return (direction(a, beta1) + direction(a.T, beta2)).mean()


def _similarity_gradient(fn, seed, dim=32):
    img, txt = _unit_features(dim=dim, seed=seed)
    s = (img @ txt.T).requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(s, 0.6, 0.15, 0.15), s)
    return s.detach(), grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dim", [32, 512])
def test_dhn_nce_pushes_every_negative_apart(seed, dim):
    _, grad = _similarity_gradient(dhn_nce_from_similarity, seed, dim)
    off = ~torch.eye(grad.shape[0], dtype=torch.bool)
    assert (grad[off] > 0).all()  # descent lowers every negative similarity
    assert (grad.diagonal() < 0).all()  # and raises every positive one


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_released_loss_pulls_hard_negatives_closer(seed):
    s, grad = _similarity_gradient(released_dhn_nce_from_similarity, seed)
    off = ~torch.eye(grad.shape[0], dtype=torch.bool)
    sims, grads = s[off], grad[off]
    pulled = grads < 0
    assert pulled.float().mean() > 0.2  # a substantial fraction of all negatives ...
    hardest = sims >= sims.quantile(0.75)
    assert pulled[hardest].float().mean() > 0.9  # ... nearly all of the hardest quarter
    _, ours = _similarity_gradient(dhn_nce_from_similarity, seed)
    assert (ours[off] > 0).all()  # where ours pulls none


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("fn", list(LOSSES.values()))
def test_bad_inputs(fn):
    one = torch.randn(1, 8)
    with pytest.raises(ValueError, match="B >= 2"):
        fn(one, one)
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        fn(torch.randn(4, 8, 2), torch.randn(4, 8, 2))
    with pytest.raises(ValueError, match="temperature"):
        fn(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0)
    with pytest.raises(ValueError, match="B >= 2"):
        dhn_nce_from_similarity(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="square"):
        dhn_nce_from_similarity(torch.zeros(3, 4))
