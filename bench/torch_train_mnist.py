"""Train the book's deep MNIST net with PyTorch on the CPU: the wall-time baseline.

Same recipe as ``fastconv train-mnist``: the network (the PyTorch twin of ``deep_mnist_net``,
so the same initial weights for a seed), Adam (lr 1e-3, the book's betas), batch 100, inverted
dropout 0.5, softmax cross-entropy, the same MNIST files, the last 5,000 training images held
out for validation. The epoch is chosen on validation accuracy; the test set is evaluated once,
with that epoch's weights. Prints one line per epoch and, with ``--json``, writes a summary.

    python -m bench.torch_train_mnist --epochs 20 --threads 2 --json runs/torch_mnist.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def build_net(seed):
    """The PyTorch twin of fastconv's ``deep_mnist_net(seed)``: the same He-normal weights."""
    from fastconv.models import deep_mnist_net
    from fastconv.torch_bridge import to_torch

    return to_torch(deep_mnist_net(seed=seed))


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
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--json", help="write a summary JSON here")
    args = parser.parse_args(argv)

    import torch

    from fastconv.datasets import load_mnist

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_mnist()
    v = args.val_size
    x_val, y_val = torch.from_numpy(x_train[-v:]), torch.from_numpy(y_train[-v:])
    x_train, y_train = torch.from_numpy(x_train[:-v]), torch.from_numpy(y_train[:-v])
    x_test, y_test = torch.from_numpy(x_test), torch.from_numpy(y_test)

    net = build_net(args.seed)
    # The book's Adam: beta1 0.9, beta2 0.999, eps 1e-7 (PyTorch's default eps is 1e-8).
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-7)
    rng = np.random.default_rng(args.seed)
    history = []
    best_val, best_epoch, best_state = -1.0, 0, None
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
        val_loss, val_acc = evaluate(torch, net, x_val, y_val)
        history.append({"epoch": epoch, "train_seconds": epoch_seconds, "val_loss": val_loss,
                        "val_accuracy": val_acc})  # fmt: skip
        if val_acc > best_val:
            best_val, best_epoch = val_acc, epoch
            best_state = {k: t.clone() for k, t in net.state_dict().items()}
        print(f"epoch {epoch:2d}  train {epoch_seconds:6.1f} s  val loss {val_loss:.4f}  "
              f"val acc {val_acc:.4f}", flush=True)  # fmt: skip
    net.load_state_dict(best_state)
    test_loss, test_acc = evaluate(torch, net, x_test, y_test)  # once, with the chosen epoch
    print(f"test accuracy {test_acc:.4f} (loss {test_loss:.4f}) with epoch {best_epoch}")
    summary = {
        "framework": f"torch {torch.__version__}",
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "epochs": args.epochs,
        "best_epoch": best_epoch,
        "best_val_accuracy": best_val,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
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
