"""``fastconv bench --vs onnxruntime``: a tiny run through the command line, its table and its
markers; the logit check that guards the comparison; argument errors. No timing is asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastconv import benchmark, benchmark_ort

TINY = ["--vs", "onnxruntime", "--repeats", "2", "--infer-images", "6", "--batch-size", "4",
        "--latency-images", "3", "--quiet"]  # fmt: skip


def test_tiny_run_reports_every_row_and_agreeing_logits(ort, capsys, monkeypatch):
    monkeypatch.setattr(benchmark_ort.time, "sleep", lambda s: None)  # no settling in a test
    assert benchmark.main([*TINY, "--json", "--hog", "--sporadic"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in report["rows"]]
    assert names == [
        "6 images, batches of 4 (ms)", "batch-1 latency p50 (ms)", "batch-1 latency p99 (ms)",
        "batch-1 latency, one core spinning p50 (ms)",
        "batch-1 latency, one core spinning p99 (ms)",
        "batch-1 latency, one image every 20 ms p50 (ms)",
        "batch-1 latency, one image every 20 ms p99 (ms)",
    ]  # fmt: skip
    assert report["settings"]["sporadic"]
    for r in report["rows"]:
        assert r["fastconv_ms"] > 0 and r["ort_ms"] > 0 and r["ratio"] > 0
    first = report["rows"][0]
    assert len(first["round_ratios"]) == 2
    assert first["ratio"] == pytest.approx(float(np.median(first["round_ratios"])))
    assert 0 <= report["agreement"]["deep MNIST"] <= benchmark_ort.TOLERANCE
    assert report["machine"]["onnxruntime"] in report["machine"]["line"]
    assert report["settings"]["threads"] == 2 and not report["settings"]["resnet"]


def test_table_goes_between_its_own_markers(ort, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark_ort.time, "sleep", lambda s: None)
    md = tmp_path / "benchmarks.md"
    md.write_text(f"intro\n{benchmark.START_MARK}\nthe PyTorch table\n{benchmark.END_MARK}\n")
    assert benchmark.main([*TINY, "--out-md", str(md)]) == 0
    printed = capsys.readouterr().out
    text = md.read_text()
    assert "the PyTorch table" in text  # the other table is left alone
    assert text.count(benchmark_ort.START_MARK) == 1 and printed.strip() in text
    assert "| measurement | fastconv | ONNX Runtime | fastconv / ORT |" in printed
    assert "Reproduce: `fastconv bench --vs onnxruntime --repeats 2" in printed
    assert "ONNX Runtime 1.31.1 (2 intra-op threads)" in printed


def test_logits_that_differ_stop_the_comparison():
    a = np.array([[1.0, -2.0, 4.0]])
    assert benchmark_ort.max_relative_difference(a, a) == 0.0
    assert benchmark_ort.max_relative_difference(a + [[0, 0, 4e-3]], a) == pytest.approx(1e-3)
    with pytest.raises(RuntimeError, match="differ by 1.00e-03 of the largest"):
        benchmark_ort._agree("net", a + [[0, 0, 4e-3]], a)
    with pytest.raises(RuntimeError, match="differ by nan"):
        benchmark_ort._agree("net", a * np.nan, a)


def test_bad_settings_are_one_error_line():
    with pytest.raises(SystemExit, match="latency_images must be an int >= 2"):
        benchmark.main(["--vs", "onnxruntime", "--latency-images", "1"])
    with pytest.raises(SystemExit, match="--out-png charts the PyTorch comparison only"):
        benchmark.main(["--vs", "onnxruntime", "--out-png", "x.png"])
    with pytest.raises(SystemExit):  # argparse: not a choice
        benchmark.main(["--vs", "tensorflow"])
