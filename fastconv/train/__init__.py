"""The training programs behind ``fastconv train-mnist`` (the command line is
:mod:`fastconv.cli`; these modules hold what runs once its arguments are parsed).

- :mod:`~fastconv.train.mnist`: one run: the run folder's lock, resume, ``Model.fit`` with the
  library's callbacks, the test set once, the plots;
- :mod:`~fastconv.train.ensemble`: ``--ensemble K``, K runs and their averaged probabilities;
- :mod:`~fastconv.train.settings`: recipes, defaults, the checks of settings and of a resumed
  run's recorded settings;
- :mod:`~fastconv.train.ranks`: ``mpiexec -n N``: the strategy, rank 0 owning the folder, one
  rank's failure ending the job.
"""
