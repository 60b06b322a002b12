"""The instability benchmark suite: how early, how reliably and at what cost detectors warn
before a training run blows up.

Each scenario is one instability mechanism on a small model and a locally generated task
(``scenarios.py``, ``models.py``): a treatment run with the intervention and a matched
control run (same seed, same initialisation and batches, no intervention). The harness
(``harness.py``) trains every (scenario, seed, arm) once with every detector attached
(``detectors.py``: landscape's ``Monitor`` with today's defaults or a preset, a plain loss
z-score, trainscope), finds the onset (loss >= 1.25x the pre-intervention median for 3
steps, and >= 1.25x the matched control's loss at those steps) and the explosion (>= 10x,
or not finite) from the training loss, and reports per
scenario, detector and rule: detection rate, leads before onset and explosion, false
alarms per 1,000 steps on the controls and in warm-up, and the overhead per step
(``report.py`` prints the tables, docs/benchmarks.md "Instability suite" holds them).

    .venv/bin/python -m tests.benchmarks.instability [--small] [--seeds 3]
        [--scenarios a,b] [--detectors default,standard,zscore,trainscope] [--json FILE]
"""
