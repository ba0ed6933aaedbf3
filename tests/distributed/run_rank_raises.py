"""Run under ``mpiexec -n 2``: rank 1 raises mid-training (a callback of its own) and nothing
catches it. Rank 0 is then waiting in a collective for it; the job must end at once with the
error. The collective timeout is an hour, so a job that ends within the test's 120 s limit
ended through the abort, not through the timeout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402

from fastconv import nn  # noqa: E402

strategy = nn.MPIDataParallel(timeout=3600)


class FailOnRank1(nn.Callback):
    def on_batch_end(self, batch, logs=None):
        if strategy.rank == 1 and batch == 2:
            raise RuntimeError("a failure on rank 1 only")


model = cases.plain_model().compile(nn.Momentum(lr=0.05))
x, y = cases.data()
model.fit(x, y, epochs=3, batch_size=8, verbose=0, strategy=strategy, callbacks=[FailOnRank1()])
