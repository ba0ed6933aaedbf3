"""fastconv's benchmarks. Run each from the repository root as a module, e.g.
``python -m bench.zoo_speed``: the root is then on ``sys.path`` (this checkout's ``fastconv``,
``fastconv_testing`` and ``bench.common``), so no script edits ``sys.path``."""
