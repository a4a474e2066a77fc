"""How much image signal a fresh DINO teacher carries, on real images (why DINO sits at ln K).

For a freshly initialised ViT-Tiny (the bundles' backbone) on ``--n`` training images of a
MedMNIST file, prints per pooling and head variant:

- the mean pairwise cosine similarity of the pooled embeddings (1 = every image looks the same);
- the std over images of the teacher's centred logits divided by the teacher temperature: the
  spread, in softmax units, of what the teacher tells the student. Well below 1, the centred
  teacher is uniform for every image and the student learns the uniform answer;
- the teacher's normalised entropy after centring (1 = uniform).

    python bench/dino_signal.py --data ../shared/data/medmnist/pneumoniamnist_28_trainval.npz
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from medssl.bundles import data_overrides
from medssl.models import ViT
from medssl.tasks import DINOTask
from medssl.tasks.dino import normalised_entropy


def load_images(data: str, n: int) -> torch.Tensor:
    """The first ``n`` training images, ``(N, 1, *S)`` in [0, 1] as the pipeline gives them."""
    with np.load(data, mmap_mode="r") as npz:
        return torch.as_tensor(np.asarray(npz["train_images"][:n]), dtype=torch.float32)[:, None] / 255.0


def signal(images: torch.Tensor, patch_size: int, pooling: str, batch_norm: bool, temp: float,
           seed: int = 0) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    vit = ViT(images.ndim - 2, 1, patch_size=patch_size, size="tiny")
    task = DINOTask(vit, pooling=pooling, head_batch_norm=batch_norm).train()
    with torch.no_grad():
        z = task.teacher.embed(images, pooling)
        logits = task.teacher_head(z)
        zn = F.normalize(z, dim=-1)
        cos = (zn @ zn.T)[~torch.eye(len(z), dtype=torch.bool)].mean()
        centred = (logits - logits.mean(0)) / temp  # the centre once it has caught up with the batch mean
        entropy = normalised_entropy(centred.softmax(-1))
    return float(cos), float(centred.std(0).mean()), float(entropy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a MedMNIST .npz")
    p.add_argument("--n", type=int, default=256, help="images")
    p.add_argument("--teacher-temp", type=float, default=0.04, help="the teacher temperature at the start of training")
    args = p.parse_args()
    images, patch_size = load_images(args.data, args.n), data_overrides(args.data)["patch_size"]
    print("| pooling | head | embedding cosine | teacher logit spread / temperature | teacher entropy |")
    print("|---|---|---:|---:|---:|")
    for pooling in ("cls", "mean"):
        for bn in (False, True):
            cos, spread, entropy = signal(images, patch_size, pooling, bn, args.teacher_temp)
            print(f"| {pooling} | {'BatchNorm' if bn else 'plain'} | {cos:.4f} | {spread:.3f} | {entropy:.3f} |", flush=True)


if __name__ == "__main__":
    main()
