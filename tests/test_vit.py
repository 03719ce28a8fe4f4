"""spotlib.vit: the SPoT view of a timm VisionTransformer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from spotlib.tokenizer import grid_positions
from spotlib.vit import SPoTViT

CONFIGS = {
    "cls-1ch-28px-p4": dict(img_size=28, patch_size=4, in_chans=1),
    "cls-3ch-16px-p4": dict(img_size=16, patch_size=4, in_chans=3),
    "gap-fcnorm-3ch": dict(img_size=16, patch_size=4, in_chans=3, class_token=False, global_pool="avg", fc_norm=True),
    "nonsquare-24x40-p8-reg-noembedcls": dict(
        img_size=(24, 40), patch_size=8, in_chans=3, reg_tokens=2, no_embed_class=True
    ),
    "nonsquare-40x24-p8-reg-embedcls": dict(img_size=(40, 24), patch_size=8, in_chans=2, reg_tokens=1),
    "gap-noprefix-prenorm": dict(img_size=12, patch_size=3, in_chans=1, class_token=False, global_pool="avg",
                                 pre_norm=True, depth=2),
}


def images_for(model, batch=3, seed=0):
    C = model.patch_embed.proj.in_channels
    H, W = model.patch_embed.img_size
    return torch.randn(batch, C, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_grid_positions_reproduce_timm_forward(vit_factory, config):
    model = vit_factory(**config)
    spot = SPoTViT(model)
    x = images_for(model)
    with torch.no_grad():
        expected = model(x)
        got = spot(x, spot.grid_positions(x.shape[0]))
        got_free = spot(x, grid_positions(model.patch_embed.grid_size, x.shape[0]))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(got, got_free)
    # the comparison is sensitive: a positional mistake would show far above 1e-5
    with torch.no_grad():
        shifted = spot(x, (spot.grid_positions(x.shape[0]) + 0.01).clamp(0, 1))
    assert (shifted - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_features_match_timm_pre_logits(vit_factory, config):
    model = vit_factory(**config)
    spot = SPoTViT(model)
    x = images_for(model, batch=2)
    with torch.no_grad():
        feats = spot.features(x, spot.grid_positions(2))
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    assert feats.shape == (2, model.embed_dim)
    assert (feats - expected).abs().max().item() <= 1e-5


def test_features_shape_with_fewer_tokens(vit_factory):
    model = vit_factory(img_size=16, patch_size=4, embed_dim=24)
    spot = SPoTViT(model)
    pos = torch.rand(5, 3, 2)
    assert spot.features(images_for(model, 5), pos).shape == (5, 24)
    assert spot(images_for(model, 5), pos).shape == (5, 3)


def test_positional_embedding_from_the_learned_grid(vit_factory):
    """At grid centres: the learned vectors; midway: their mean; beyond the outer centres: clamped."""
    model = vit_factory(img_size=(12, 16), patch_size=4, reg_tokens=1)  # grid (3, 4), 2 prefix tokens
    spot = SPoTViT(model)
    table = model.pos_embed[0, 2:].detach().view(3, 4, -1)
    with torch.no_grad():
        at_grid = spot.interpolate_pos_embed(spot.grid_positions(1))
        torch.testing.assert_close(at_grid[0], table.reshape(12, -1), rtol=0, atol=1e-6)
        # midway between (row 1, col 1) and (row 1, col 2): x = (1.5 + 0.5) / 4 = 0.5
        mid_x = spot.interpolate_pos_embed(torch.tensor([[[1.5 / 3, 2.0 / 4]]]))[0, 0]
        torch.testing.assert_close(mid_x, (table[1, 1] + table[1, 2]) / 2, rtol=0, atol=1e-6)
        # midway between rows 0 and 1 at column 3: y = 1 / 3
        mid_y = spot.interpolate_pos_embed(torch.tensor([[[1.0 / 3, 3.5 / 4]]]))[0, 0]
        torch.testing.assert_close(mid_y, (table[0, 3] + table[1, 3]) / 2, rtol=0, atol=1e-6)
        # the corner (0, 0) lies beyond the outer centres: held at the corner vector
        corner = spot.interpolate_pos_embed(torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))[0]
        torch.testing.assert_close(corner[0], table[0, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(corner[1], table[2, 3], rtol=0, atol=1e-6)


def test_interpolated_pos_embed_batch_layout(vit_factory):
    """(B, N, D) layout: each (image, token) gets the embedding of its own position."""
    model = vit_factory(img_size=16, patch_size=4)
    spot = SPoTViT(model)
    pos = torch.rand(3, 5, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = spot.interpolate_pos_embed(pos)
        for b in range(3):
            for n in range(5):
                single = spot.interpolate_pos_embed(pos[b : b + 1, n : n + 1])
                torch.testing.assert_close(full[b, n], single[0, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [CONFIGS["cls-3ch-16px-p4"], CONFIGS["gap-fcnorm-3ch"],
                                    CONFIGS["nonsquare-24x40-p8-reg-noembedcls"]],
                         ids=["cls", "gap", "nonsquare-reg"])
def test_token_permutation_invariance(vit_factory, config):
    model = vit_factory(**config)
    spot = SPoTViT(model)
    x = images_for(model, batch=2)
    g = torch.Generator().manual_seed(1)
    pos = torch.rand(2, 7, 2, generator=g)
    perm = torch.randperm(7, generator=g)
    with torch.no_grad():
        a = spot(x, pos)
        b = spot(x, pos[:, perm])
        # sanity: changing which position goes with which token is *not* a no-op
        c = spot(x, torch.cat([pos[:, :, :1], pos[:, perm, 1:]], dim=-1))
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - c).abs().max().item() > 1e-3


def test_images_in_a_batch_are_independent(vit_factory):
    model = vit_factory(img_size=16, patch_size=4, in_chans=3)
    spot = SPoTViT(model)
    x = images_for(model, batch=3)
    pos = torch.rand(3, 6, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = spot(x, pos)
        for b in range(3):
            assert (spot(x[b : b + 1], pos[b : b + 1])[0] - full[b]).abs().max().item() <= 1e-5


def test_view_shares_the_wrapped_weights(vit_factory):
    model = vit_factory(img_size=16, patch_size=4)
    spot = SPoTViT(model)
    assert {id(p) for p in spot.parameters()} == {id(p) for p in model.parameters()}
    assert spot.window == 4 and spot.grid_size == (4, 4) and spot.num_grid_tokens == 16 and spot.in_chans == 1
    # training the view trains the timm model
    x = images_for(model, 2)
    pos = torch.rand(2, 4, 2)
    spot(x, pos).sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_gradients_flow_to_positions(vit_factory):
    model = vit_factory(img_size=16, patch_size=4, in_chans=3)
    spot = SPoTViT(model)
    x = images_for(model, 2)
    pos = torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    spot(x, pos).logsumexp(-1).sum().backward()
    assert pos.grad is not None and pos.grad.shape == pos.shape
    assert torch.isfinite(pos.grad).all()
    assert (pos.grad.abs() > 0).all()


def test_padding_is_passed_to_the_tokenizer(vit_factory):
    model = vit_factory(img_size=16, patch_size=4, in_chans=1)
    x = images_for(model, 1) + 5.0
    corner = torch.zeros(1, 1, 2)
    with torch.no_grad():
        zeros = SPoTViT(model)(x, corner)
        border = SPoTViT(model, padding="border")(x, corner)
    assert (zeros - border).abs().max() > 1e-3


# -- errors --------------------------------------------------------------------
def test_channel_mismatch_raises(vit_factory):
    spot = SPoTViT(vit_factory(img_size=16, patch_size=4, in_chans=3))
    with pytest.raises(ValueError, match=r"images have 1 channels but the model expects 3"):
        spot(torch.zeros(2, 1, 16, 16), torch.rand(2, 4, 2))


def test_not_a_vision_transformer_raises():
    with pytest.raises(TypeError, match=r"timm VisionTransformer, got Sequential"):
        SPoTViT(nn.Sequential(nn.Linear(2, 2)))


def test_bad_positions_raise(vit_factory):
    spot = SPoTViT(vit_factory(img_size=16, patch_size=4))
    x = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"positions are for 3 images but the batch holds 2"):
        spot(x, torch.rand(3, 4, 2))
    with pytest.raises(ValueError, match=r"N = 0"):
        spot(x, torch.rand(2, 0, 2))


def test_unsupported_models_raise(vit_factory):
    with pytest.raises(ValueError, match="pos_embed is None"):
        SPoTViT(vit_factory(img_size=16, patch_size=4, pos_embed="none", pos_std=None))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        SPoTViT(vit_factory(img_size=16, patch_size=4, dynamic_img_size=True))
