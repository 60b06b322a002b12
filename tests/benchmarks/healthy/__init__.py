"""The healthy-run benchmark: warnings the default monitor raises on training that is fine.

The instability suite (``tests/benchmarks/instability``) measures how early the alarms warn
before a run blows up; this benchmark measures the other side, the false alarms. It trains
57 small setups that real training loops use and that are healthy by design (warm-up and
cosine / SGDR / one-cycle / step schedules, gradient accumulation, a ``GradScaler``,
clipping, batch-size changes, label smoothing, overfitting to ~0 loss,
regression, class imbalance, dropout, BatchNorm with batch 4-8, heavy weight decay,
fine-tuning, full-batch GD at a large step, an induction-head phase change, grokking; and
character LSTM/GRU language models, a ViT, a VAE with KL warm-up, distillation, a residual
MLP without normalisation, label noise, Lion, SWA; and the twelve recipes of a second audit
in ``recipes.py``: contrastive learning, CutMix, focal loss, a policy gradient, a Gaussian
NLL, BYOL, LoRA, a mixture of experts, Adagrad, Adafactor, ...) on scikit-learn's digits or
locally generated data, each under the *default* monitor::

    mon = Monitor(model, loss_fn, None, optimizer=opt, warn=False).start()
    ...  # after every opt.step():
    mon.step(step, batch=(x, y), loss=loss.detach(), outputs=out.detach())

and counts its findings of severity >= warning per rule. The setups and the health
criterion are those of the false-alarm hunt behind the commit "Default alarms stop crying
wolf on healthy high-LR and small-batch runs" (305 warnings on 86 healthy runs before it,
58 after), so that evidence can be re-measured from the repository (``setups.py``: the
setups; ``harness.py``: the loops, the recording and the criterion; ``report.py``: the
table).

A run counts as healthy by the hunt's criterion (:func:`harness.health`): no non-finite
loss, and the 20-step rolling median of the loss never stays >= 1.25x its running minimum,
with a rise of at least 5 % of the initial loss (the median of the first 20 losses), for 20
consecutive steps from step 50 on. The total line sums the warnings over the runs that are
healthy by this criterion and not excluded by design (the curriculum setups and the grokking
transformer, whose task or loss changes on purpose); unhealthy runs keep their rows, marked.

    .venv/bin/python -m tests.benchmarks.healthy [--seeds 3] [--setups a,b] [--json FILE]
    .venv/bin/python -m tests.benchmarks.healthy --small     # a few seconds: harness check
"""

from .recipes import RECIPES  # built on setups.py, which it imports first
from .setups import SETUPS

SETUPS.update({s.name: s for s in RECIPES})
