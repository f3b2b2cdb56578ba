"""Trainer throughput vs a bare PyTorch loop on the same model, data and batch size.

    .venv/bin/python benchmarks/bench_train.py [--steps 150] [--model zfnet-small] [--precision fp32] [--threads 1]

A CPU without native bf16 can be imitated on one with it: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2.

Both run in this process, alternately, on Fashion-MNIST. The bare loop is what a user would write:
index a preloaded float tensor, forward, cross-entropy, backward, SGD step (same channels-last
model). The trainer adds the paper's 10-crop augmentation, RMS renormalisation after every step,
progress bar and resumable checkpoints; its rate comes from its own metrics.jsonl.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deconvnet import build_model  # noqa: E402
from deconvnet.data import open_source  # noqa: E402
from deconvnet.train import TrainConfig, train  # noqa: E402


def bare_loop(model_name: str, steps: int, batch_size: int, precision: str) -> float:
    """Images per second of a plain SGD loop over preloaded, normalised Fashion-MNIST."""
    torch.manual_seed(0)
    source = open_source("fashion-mnist")
    n = steps * batch_size
    x_all = source.get(range(n)).float() / 255
    x_all -= x_all.mean(0)
    y_all = source.labels[:n]
    model = build_model(model_name, num_classes=10, init="kaiming").to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.train()
    perm = torch.randperm(n)
    start = time.perf_counter()
    for s in range(steps):
        idx = perm[s * batch_size:(s + 1) * batch_size]
        x = x_all[idx].contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x), y_all[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return n / (time.perf_counter() - start)


def trainer(model_name: str, steps: int, batch_size: int, precision: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=model_name, epochs=1, limit=steps * batch_size, batch_size=batch_size,
                          checkpoint_every=200, precision=precision, device="cpu", final_ten_crop=False)
        train(cfg, out)
        return json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])["train_images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zfnet-small")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="both loops use it; auto = the trainer's default on this CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = TrainConfig(precision=args.precision, device="cpu").resolved().precision
    bare, ours = [], []
    for _ in range(args.rounds):  # alternate so drift in machine load hits both alike
        bare.append(bare_loop(args.model, args.steps, args.batch_size, precision))
        ours.append(trainer(args.model, args.steps, args.batch_size, precision))
    b, o = max(bare), max(ours)
    print(f"{args.model}, batch {args.batch_size}, {args.steps} steps, {precision}, {torch.get_num_threads()} threads")
    print(f"bare PyTorch loop : {b:8.1f} images/s  (rounds: {', '.join(f'{v:.0f}' for v in bare)})")
    print(f"deconvnet trainer : {o:8.1f} images/s  (rounds: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"ratio trainer/bare: {o / b:.3f}  (bar: >= 0.9)")


if __name__ == "__main__":
    main()
