"""Run under ``mpiexec -n 2``: inputs the ranks cannot train on. Each attempt writes one line
per rank to ``OUT/rank<r>.txt`` (``<name>: <error type>: <message>``); the last attempt is a
valid run, which shows the ranks are still in step after every refusal (no deadlock, no stray
message)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402

from fastconv import nn  # noqa: E402

strategy = nn.MPIDataParallel(timeout=60)
r = strategy.rank
report = open(Path(sys.argv[1]) / f"rank{r}.txt", "w")  # noqa: SIM115
x, y = cases.data()


def fit(model, x=x, y=y, batch_size=16):
    model.compile(nn.Momentum(lr=0.05))
    model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0, strategy=strategy)


def attempt(name, run):
    try:
        run()
        print(f"{name}: no error", file=report, flush=True)
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}", file=report, flush=True)


attempt("batch_smaller_than_ranks", lambda: fit(cases.plain_model(), batch_size=1))
attempt("last_batch_too_small", lambda: fit(cases.plain_model(), x=x[:33], y=y[:33]))
attempt("different_model", lambda: fit(cases.plain_model(units=16 if r == 0 else 17)))
attempt("different_data", lambda: fit(cases.plain_model(), x=x if r == 0 else x + 1))
attempt("different_settings", lambda: fit(cases.plain_model(), batch_size=16 if r == 0 else 32))
attempt("rank_withdraws", lambda: strategy.withdraw() if r == 1 else fit(cases.plain_model()))
attempt("valid", lambda: fit(cases.plain_model()))
