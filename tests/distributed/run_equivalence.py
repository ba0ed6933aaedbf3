"""Run under ``mpiexec -n 2``: every case of cases.py with MPIDataParallel, plus per-rank
BatchNorm, dropout reproducibility and resume; each rank saves what it ended with in OUT."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402

from fastconv import nn  # noqa: E402

out = Path(sys.argv[1])
strategy = nn.MPIDataParallel(timeout=120)
r = strategy.rank

for case, spec in cases.CASES.items():
    case_strategy = nn.MPIDataParallel(sync_batch_norm=spec[-1], timeout=120)
    cases.save(out / f"{case}_rank{r}.npz", *cases.train(case, case_strategy))

# BatchNorm statistics per rank (the default): not one process's numbers, but every rank
# must end identical (moving statistics averaged over the ranks).
model = cases.bn_model(seed=0).compile(nn.Momentum(lr=0.05))
x, y = cases.data()
hist = model.fit(x, y, epochs=2, batch_size=16, verbose=0, strategy=strategy)
cases.save(out / f"local_bn_rank{r}.npz", model.get_weights(), hist.history)


# Augmentation in the background loader: each rank augments only its own share.
def augment_run():
    from fastconv.augment import RandomTransform

    model = cases.plain_model(seed=4).compile(nn.Momentum(lr=0.05))
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, strategy=strategy, seed=7,
              augment=RandomTransform(rotation=10, shift=1))  # fmt: skip
    return model.get_weights()


for name in ("augment_a", "augment_b"):
    cases.save(out / f"{name}_rank{r}.npz", augment_run(), {})


# Dropout: two runs with one seed agree, and 1 epoch + checkpoint + resume = 2 epochs straight.
def dropout_run(epochs, initial_epoch=0, model=None):
    if model is None:
        model = cases.plain_model(seed=3, dropout=0.5).compile(nn.Momentum(lr=0.05))
    model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=16,
        verbose=0,
        strategy=strategy,
        initial_epoch=initial_epoch,
    )
    return model


first = dropout_run(2).get_weights()
again = dropout_run(2).get_weights()
half = dropout_run(1)
ckpt = out / f"dropout_epoch1_rank{r}.npz"
half.save(ckpt, epoch=1)
resumed = dropout_run(2, initial_epoch=1, model=nn.load_model(ckpt)).get_weights()
for name, w in (("dropout_a", first), ("dropout_b", again), ("dropout_resumed", resumed)):
    cases.save(out / f"{name}_rank{r}.npz", w, {})
# The dropout stream of each rank: its own (the ranks' masks must differ), and the shared
# generator comes back unchanged at the end of the epoch.
probe = cases.plain_model(seed=3)
before = probe.rng.bit_generator.state
strategy.begin_epoch(probe, 0)
draws = probe.rng.random(8)
strategy.end_epoch(probe.compile(nn.SGD()))
assert probe.rng.bit_generator.state == before
cases.save(out / f"dropout_stream_rank{r}.npz", [draws], {})
print(f"rank {r} done", flush=True)
