"""Train the book's deep MNIST net with PyTorch on the CPU: the wall-time baseline.

Same recipe as ``fastconv train-mnist``: the network (conv4 has pad 2), He-normal init, Adam
(lr 1e-3, the book's betas), batch 100, inverted dropout 0.5, softmax cross-entropy,
the same MNIST files. Prints one line per epoch and, with ``--json``, writes a summary
(best/final test accuracy, wall time).

    python bench/torch_train_mnist.py --epochs 20 --threads 2 --json runs/torch_mnist.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def build_net(torch):
    nn = torch.nn

    def conv(cin, cout, pad):
        layer = nn.Conv2d(cin, cout, 3, padding=pad)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
        return layer

    def dense(fan_in, units):
        layer = nn.Linear(fan_in, units)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
        return layer

    return nn.Sequential(
        conv(1, 16, 1), nn.ReLU(), conv(16, 16, 1), nn.ReLU(), nn.MaxPool2d(2),
        conv(16, 32, 1), nn.ReLU(), conv(32, 32, 2), nn.ReLU(), nn.MaxPool2d(2),
        conv(32, 64, 1), nn.ReLU(), conv(64, 64, 1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), dense(1024, 50), nn.ReLU(), nn.Dropout(0.5), dense(50, 10), nn.Dropout(0.5),
    )  # fmt: skip


def evaluate(torch, net, x, y, batch_size=1000):
    net.eval()
    correct = 0
    loss = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            scores = net(x[i : i + batch_size])
            batch_labels = y[i : i + batch_size]
            loss += torch.nn.functional.cross_entropy(scores, batch_labels, reduction="sum")
            correct += (scores.argmax(1) == batch_labels).sum().item()
    return float(loss) / len(x), correct / len(x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write a summary JSON here")
    args = parser.parse_args(argv)

    import torch

    from fastconv.datasets import load_mnist

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_mnist()
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    x_test, y_test = torch.from_numpy(x_test), torch.from_numpy(y_test)

    net = build_net(torch)
    # The book's Adam: beta1 0.9, beta2 0.999, eps 1e-7 (PyTorch's default eps is 1e-8).
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-7)
    rng = np.random.default_rng(args.seed)
    history = []
    train_seconds = 0.0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        net.train()
        order = torch.from_numpy(rng.permutation(len(x_train)))
        t0 = time.perf_counter()
        for i in range(0, len(x_train), args.batch_size):
            idx = order[i : i + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        test_loss, test_acc = evaluate(torch, net, x_test, y_test)
        history.append({"epoch": epoch, "train_seconds": epoch_seconds, "test_loss": test_loss,
                        "test_accuracy": test_acc})  # fmt: skip
        print(f"epoch {epoch:2d}  train {epoch_seconds:6.1f} s  test loss {test_loss:.4f}  "
              f"test acc {test_acc:.4f}", flush=True)  # fmt: skip
    accs = [h["test_accuracy"] for h in history]
    summary = {
        "framework": f"torch {torch.__version__}",
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "epochs": args.epochs,
        "best_test_accuracy": max(accs),
        "final_test_accuracy": accs[-1],
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "history": history,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
