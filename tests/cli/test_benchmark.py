"""The benchmark compares equal work: the PyTorch and NumPy baselines compute fastconv's step.

Both baselines are built from fastconv's own model (the architecture is defined once). With
identical weights and dropout off, fastconv (float32), the PyTorch twin (float64) and the
book-style NumPy net (float64) must give the same loss, gradients and scores.
"""

import json

import numpy as np
import pytest

from fastconv import benchmark, book_numpy
from fastconv.models import deep_mnist_net
from fastconv.torch_bridge import copy_from_torch, to_torch

N = 3


def _fastconv(seed=0, dropout=0.0):
    model = deep_mnist_net(seed=seed).compile(optimizer="adam", loss="softmax_cross_entropy")
    for layer in model.layers:
        if layer.kind == "dropout":
            layer.rate = dropout  # dropout masks are random; the rest of the step is not
    return model


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(42)
    return rng.random((N, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, N)


@pytest.fixture(scope="module")
def step(batch, torch):
    """Loss and gradients of one step of each implementation from the same weights."""
    x, y = batch
    fc = _fastconv()
    weights = [p.astype(np.float64) for p in fc.get_weights()]

    scores = fc.forward(x, training=True)
    fc_loss = fc.loss.forward(scores, y)
    fc.backward(fc.loss.backward())
    fc_grads = [np.asarray(g, dtype=np.float64) for g in fc.gradients()]

    tnet = to_torch(fc).double()
    out = tnet(torch.from_numpy(x.astype(np.float64)))
    t_loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(y))
    t_loss.backward()
    t_grads = []
    for layer, name in fc.weight_entries():
        core = tnet.layers[layer.name]
        core = core[0] if isinstance(core, torch.nn.Sequential) else core
        grad = (core.weight if name == "W" else core.bias).grad.numpy()
        t_grads.append(grad.T if layer.kind == "dense" and name == "W" else grad)

    nnet = book_numpy.from_model(fc)
    n_scores = nnet.forward(x, training=True)
    n_loss = nnet.loss.forward(n_scores, y)
    nnet.backward(nnet.loss.backward())
    return {
        "weights": weights,
        "fastconv": (fc_loss, fc_grads, np.asarray(scores, dtype=np.float64)),
        "torch": (t_loss.item(), t_grads, out.detach().numpy()),
        "numpy": (n_loss, [np.array(g) for g in nnet.gradients()], n_scores),
    }


def test_twins_carry_the_same_weights(step):
    fc = _fastconv()
    twin = to_torch(fc)
    back = _fastconv(seed=5)
    copy_from_torch(twin, back)
    for a, b in zip(fc.get_weights(), back.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    nnet = book_numpy.from_model(fc)
    for a, b in zip(nnet.parameters(), step["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(nnet.parameters()) == 16


def test_numpy_net_matches_torch_in_float64(step):
    n_loss, n_grads, n_scores = step["numpy"]
    t_loss, t_grads, t_scores = step["torch"]
    np.testing.assert_allclose(n_scores, t_scores, rtol=1e-10, atol=1e-12)
    assert n_loss == pytest.approx(t_loss, rel=1e-10)
    assert len(n_grads) == len(t_grads) == 16
    for i, (a, b) in enumerate(zip(n_grads, t_grads, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max(), err_msg=f"{i}")


def test_fastconv_matches_torch(step):
    f_loss, f_grads, f_scores = step["fastconv"]
    t_loss, t_grads, t_scores = step["torch"]
    np.testing.assert_allclose(f_scores, t_scores, rtol=1e-4, atol=1e-4 * np.abs(t_scores).max())
    assert f_loss == pytest.approx(t_loss, rel=1e-4)
    for i, (a, b) in enumerate(zip(f_grads, t_grads, strict=True)):
        assert a.shape == b.shape
        # float32 through eight layers: relative to the gradient's scale.
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max(), err_msg=f"{i}")


def test_numpy_adam_matches_fastconv_adam(step):
    # Both follow the book's Adam. Fed the same gradients for two steps (bias correction
    # changes with t), they must move the weights the same way.
    from fastconv.nn.optimizers import Adam

    grads32 = [g.astype(np.float32) for g in step["fastconv"][1]]
    fc_params = [w.astype(np.float32) for w in step["weights"]]
    np_params = [w.copy() for w in step["weights"]]
    fc_adam, np_adam = Adam(lr=1e-3), book_numpy.Adam(lr=1e-3)
    for _ in range(2):
        fc_adam.step(fc_params, grads32)
        np_adam.step(np_params, [g.astype(np.float64) for g in grads32])
    for w0, a, b in zip(step["weights"], fc_params, np_params, strict=True):
        np.testing.assert_allclose(a - w0, b - w0, rtol=1e-3, atol=1e-3 * 1e-3)
        assert np.abs(b - w0).max() > 1e-3  # two steps of about lr each


def test_torch_predict_matches_fastconv(batch, torch):
    x, _ = batch
    fc = _fastconv(seed=3, dropout=0.5)
    twin = to_torch(fc)  # dropout on, but predict is eval mode
    got = benchmark.torch_predict(twin, torch.from_numpy(x), batch_size=2).numpy()
    want = fc.predict(x, batch_size=2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_write_markdown_markers(tmp_path):
    path = tmp_path / "bench.md"
    benchmark.write_markdown(path, "| a |")
    text = path.read_text()
    assert text.count(benchmark.START_MARK) == 1 and "| a |" in text
    path.write_text("intro\n" + text + "outro\n")
    benchmark.write_markdown(path, "| b |")
    text = path.read_text()
    assert "| a |" not in text and "| b |" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert text.count(benchmark.END_MARK) == 1


def test_run_benchmark_tiny_and_cli(torch, tmp_path, capsys):
    md = tmp_path / "b.md"
    code = benchmark.main(
        ["--steps", "1", "--repeats", "1", "--batch-size", "2", "--infer-images", "3",
         "--out-md", str(md), "--json", "--quiet"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in report["results"]]
    assert names == [
        "fastconv CPU float32", "fastconv CPU float16", "PyTorch CPU float32",
        "NumPy book-style float64",
    ]  # fmt: skip
    by_name = {r["name"]: r for r in report["results"]}
    assert by_name["PyTorch CPU float32"]["train_ratio"] == 1.0
    assert by_name["fastconv CPU float16"]["train_ms"] is None
    for r in report["results"]:
        assert r["infer_ms"] > 0 and r["infer_ratio"] == pytest.approx(
            r["infer_ms"] / by_name["PyTorch CPU float32"]["infer_ms"]
        )
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    text = md.read_text()
    assert benchmark.START_MARK in text and "NumPy book-style float64" in text
    assert "Reproduce: `fastconv bench" in text

    png = tmp_path / "b.png"
    benchmark.write_png(png, report)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_run_benchmark_rejects_bad_settings():
    with pytest.raises(ValueError, match="repeats"):
        benchmark.run_benchmark(repeats=0)
    with pytest.raises(SystemExit, match="steps must be an int >= 1"):
        benchmark.main(["--steps", "0"])
