"""How many images precise BatchNorm needs: the statistics' error and the accuracy against the number of images.

    python bench/precise_bn.py [--tasks resnet18-digits,mobilenet-digits07] [--draws 5] [--epochs 6]

The trainer recomputes BatchNorm running statistics before every evaluation (``strategy.preciseBatchNorm``,
``batchnorm.recompute_batch_norm``). This script measures how that estimate converges with the images it
averages over, on the digits the tests train on, with the trainer's own ``build_datasets``, ``build_model``,
``train_transform`` and ``precise_batch_norm`` (plain PyTorch, one process, one thread; no Ray):

- each task trains a model from scratch (AdamW, constant rate, per-step batch ``--batch``: one worker's share of
  the bench's global batch 64 over 2 workers) and, after the epochs listed in ``--at``, takes a copy of the
  weights;
- reference statistics: ``precise_batch_norm`` over every training batch of the epoch (all the images);
- for k = 1, 2, 4, ... batches and ``--draws`` random batch orders each, the statistics over the first k batches
  of that order: their error against the reference (per channel: |mean - reference mean| in reference standard
  deviations, and |log(var / reference var)|; averaged over the channels of every BatchNorm layer that trains),
  and the validation accuracy and loss of the model evaluated with them;
- for scale, the model evaluated with the running statistics training left (no precise BN).

Across workers the trainer averages the workers' statistics (an all-reduce): k batches on each of W workers
average k·W·batch images, which is the ``images`` column. Prints a markdown table per task and epoch.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]

from finetune_operator.api.contract import TrainerConfig  # noqa: E402
from finetune_operator.api.v1alpha1 import FineTuneJobSpec  # noqa: E402
from finetune_trainer.batchnorm import batch_norm_layers, precise_batch_norm  # noqa: E402
from finetune_trainer.data import build_datasets  # noqa: E402
from finetune_trainer.model import build_model  # noqa: E402

CPU = torch.device("cpu")
TASKS: dict[str, tuple[str, list[int]]] = {
    # resnet18 (BatchNorm momentum 0.1) on all ten digits; mobilenet_v3_small (momentum 0.01, the silent-collapse
    # case of bench/README.md) on the digits 0-6.
    "resnet18-digits": ("resnet18", list(range(10))),
    "mobilenet-digits07": ("mobilenet_v3_small", list(range(7))),
}


def datasets(classes: list[int], seed: int) -> tuple[Any, Any]:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "digits", "classes": classes, "imageSize": 32, "augmentation": "light", "loaderWorkers": 0},
            "hyperparameters": {"seed": seed},
            "output": {"uri": "unused"},
        }
    )
    train, val, _, _ = build_datasets(TrainerConfig(job_name="precise-bn", spec=spec, output_root="/tmp/unused"))
    return train, val


@torch.no_grad()
def evaluate(model: nn.Module, val: DataLoader[Any]) -> tuple[float, float]:
    model.eval()
    hits, loss, n = 0.0, 0.0, 0
    for images, labels in val:
        logits = model(images)
        hits += float((logits.argmax(1) == labels).sum())
        loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        n += len(labels)
    return hits / n, loss / n


def stats_of(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.running_mean.clone(), m.running_var.clone()) for m in batch_norm_layers(model)]  # type: ignore[union-attr]


def errors(got: list[tuple[torch.Tensor, torch.Tensor]], ref: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(mean |Δmean| / reference std, mean |log var ratio|) over every channel of every layer."""
    dm = torch.cat([((m - rm).abs() / (rv + 1e-5).sqrt()) for (m, _), (rm, rv) in zip(got, ref, strict=True)])
    dv = torch.cat([((v + 1e-5) / (rv + 1e-5)).log().abs() for (_, v), (_, rv) in zip(got, ref, strict=True)])
    return float(dm.mean()), float(dv.mean())


def with_precise(model: nn.Module, train: Any, batch: int, k: int, order_seed: int) -> nn.Module:
    out = copy.deepcopy(model).train()
    order = torch.Generator().manual_seed(order_seed)
    loader = DataLoader(train, batch_size=batch, shuffle=True, drop_last=True, generator=order)
    precise_batch_norm(out, loader, CPU, k)
    return out


def run_task(name: str, args: argparse.Namespace) -> None:
    arch, classes = TASKS[name]
    torch.manual_seed(args.seed)
    train, val = datasets(classes, args.seed)
    model = build_model(arch, None, len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    order = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True, generator=order)
    val_loader = DataLoader(val, batch_size=128)
    steps = len(loader)
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k < steps] + [steps]
    print(f"\n## {name}: {arch} from scratch, digits {classes[0]}-{classes[-1]}, {len(train)} training images "
          f"({steps} batches of {args.batch} per epoch), {len(val)} validation images")  # fmt: skip
    for epoch in range(1, args.epochs + 1):
        model.train()
        started = time.perf_counter()
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch not in args.at:
            continue
        as_trained = evaluate(model, val_loader)
        reference = with_precise(model, train, args.batch, steps, order_seed=10_000)
        ref_stats, ref_eval = stats_of(reference), evaluate(reference, val_loader)
        print(f"\n### after epoch {epoch} ({time.perf_counter() - started:.1f} s)\n")
        print(f"running statistics as trained: val accuracy {as_trained[0]:.3f}, loss {as_trained[1]:.3f}; reference "
              f"(all {steps} batches): {ref_eval[0]:.3f}, {ref_eval[1]:.3f}\n")  # fmt: skip
        print("| batches | images (per worker; ×W across W workers) | mean error (σ) | log-var error | val accuracy | val loss |")
        print("|---|---|---|---|---|---|")
        for k in ks:
            dm, dv, acc, vl = [], [], [], []
            for draw in range(args.draws):
                m = with_precise(model, train, args.batch, k, order_seed=draw)
                e = errors(stats_of(m), ref_stats)
                a, lo = evaluate(m, val_loader)
                dm.append(e[0]), dv.append(e[1]), acc.append(a), vl.append(lo)
            sd = statistics.stdev(acc) if len(acc) > 1 else math.nan
            spread = f"{statistics.mean(acc):.3f} ± {sd:.3f} [{min(acc):.3f}-{max(acc):.3f}]"
            errs = f"{statistics.mean(dm):.3f} | {statistics.mean(dv):.3f}"
            print(f"| {k} | {k * args.batch} | {errs} | {spread} | {statistics.mean(vl):.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"of {', '.join(TASKS)}")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--at", default="1,3,6", help="epochs after which to measure")
    parser.add_argument("--draws", type=int, default=5, help="random batch orders per number of batches")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (one worker's share)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.at = {int(e) for e in args.at.split(",")}
    torch.set_num_threads(1)
    for name in args.tasks.split(","):
        run_task(name.strip(), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
