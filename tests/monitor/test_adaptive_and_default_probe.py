"""The default probe (a copy of the first batch) and the adaptive schedules."""

import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from tests import models


def _train(mon, model, opt, steps, spike_at=None, seed=0):
    """SGD steps on batches of 16 of 32 samples; ``steps`` a count or the step numbers."""
    g = torch.Generator().manual_seed(seed)  # another seed: other batches (after a resume)
    x, y = models.classification_data(32, seed=1 + seed)
    for step in range(steps) if isinstance(steps, int) else steps:
        if spike_at is not None and step in (spike_at, spike_at + 1):  # one large step
            for group in opt.param_groups:
                group["lr"] *= 3000 if step == spike_at else 1 / 3000
        idx = torch.randint(0, 32, (16,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(x[idx], y[idx]), loss=loss)


def test_without_probe_the_first_batch_becomes_the_probe_once(caplog):
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level(logging.WARNING, logger="landscape"):
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, warn=False, probe_size=8,
                        metrics=[ls.metrics.Sentinels(), ls.metrics.Representation(schedule=2)],
                        strict=True) as mon:
            _train(mon, model, opt, 5)
            run = mon.run()
            assert mon.probe[0].shape[0] == 8
    assert sum("first training batch" in r.message for r in caplog.records) == 1
    assert run.config["probe"] == {"source": "first_batch", "size": 8}
    _, rank = run.series("representation", "effective_rank")
    assert all(math.isfinite(v) for v in rank)
    _, r = run.series("sentinels", "r_secant")
    assert math.isnan(r[0]) and all(v > 0 for v in r[1:])
    steps, kept = run.series("probe", "samples")
    assert list(steps) == [0] and list(kept) == [8]


def test_the_run_file_records_how_many_samples_the_default_probe_kept(tmp_path):
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = models.classification_data(32, seed=1)
    path = tmp_path / "run.h5"
    with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, warn=False,
                    probe_size=32) as mon:
        for step in range(3):
            batch = (x[:5], y[:5])  # a first batch smaller than probe_size
            loss = F.cross_entropy(model(batch[0]), batch[1])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=batch, loss=loss)
    run = ls.Run.open(path)
    assert run.config["probe"] == {"source": "first_batch", "size": 32}  # what was asked
    steps, kept = run.series("probe", "samples")
    assert list(steps) == [0] and list(kept) == [5]  # what was kept


def test_a_given_probe_has_no_probe_table():
    model = models.mlp()
    x, y = models.classification_data(16, seed=1)
    with ls.Monitor(model, F.cross_entropy, probe=(x, y), warn=False) as mon:
        mon.step(0, batch=(x, y), loss=F.cross_entropy(model(x), y))
        assert "probe" not in mon.run().metrics()


def test_no_probe_is_taken_when_no_metric_reads_one(caplog):
    """metrics=["loss", "grad_norm"]: the first batch was copied, stored and announced."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level(logging.WARNING, logger="landscape"):
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=["loss", "grad_norm"],
                        strict=True) as mon:
            _train(mon, model, opt, 2)
            run = mon.run()
    assert mon.probe is None and "probe" not in run.metrics()
    assert run.config["probe"]["source"] == "none"
    assert not [r for r in caplog.records if "first training batch" in r.message]


def test_a_moving_sentinel_makes_the_expensive_metrics_dense_then_they_relax():
    torch.manual_seed(0)
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    metrics = [ls.metrics.Loss(), ls.metrics.Sentinels(),
               ls.metrics.TaylorRadius(schedule="every(100)")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics,
                        warn=False) as mon:
            _train(mon, model, opt, 60, spike_at=20)
            run = mon.run()
    steps = run.steps("taylor_radius").tolist()
    assert 0 in steps and 20 not in steps and 21 in steps  # triggered by the step at 20
    assert steps[-1] < 59  # relaxed back to its schedule afterwards
    dense = run.steps("adaptive").tolist()
    assert dense == [s for s in steps if s % 100]


def test_a_warning_makes_the_expensive_metrics_dense_without_sentinels():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, y = models.classification_data(16, seed=1)
    metrics = [ls.metrics.Loss(), ls.metrics.TaylorRadius(schedule="every(1000)")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics,
                        probe=(x, y), warn=False) as mon:
            for step in range(80):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                reported = loss.detach() * (20 if step == 60 else 1)  # one loss spike
                found = mon.step(step, batch=(x, y), loss=reported)
                assert bool(found) == (step == 60), (step, found)
            run = mon.run()
    assert found == [] and mon.findings[0].severity == "warning"
    assert run.steps("taylor_radius").tolist() == [0, *range(61, 80)]  # 20 steps after it
    assert run.steps("adaptive").tolist() == list(range(61, 80))


def test_adaptive_false_keeps_the_schedules():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    metrics = [ls.metrics.Sentinels(), ls.metrics.TaylorRadius(schedule="every(100)")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics, warn=False,
                        adaptive=False) as mon:
            _train(mon, model, opt, 40, spike_at=20)
            run = mon.run()
    assert run.steps("taylor_radius").tolist() == [0]
    assert "adaptive" not in run.metrics()


def test_the_default_monitor_started_by_its_first_step_raises_no_failure(tmp_path):
    # Monitor(model, loss_fn, path, optimizer=opt) with no start(): the optimizer hooks
    # are installed at the first step(), after that step's update; the update metrics
    # record NaN there instead of a metric_failed warning, and measure from step 1 on
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(mon, model, opt, 3)
    mon.close()
    assert not [f for f in mon.findings if f.rule == "metric_failed"]
    run = ls.Run.open(tmp_path / "run.h5")
    _, norm = run.series("update", "norm")
    assert math.isnan(norm[0]) and all(v > 0 for v in norm[1:])


# -- resuming a run file keeps its probe and its dense window


def _run_in(path, steps, seed, model=None, opt=None, **options):
    """A default monitor on ``path`` over ``steps`` (an MLP and SGD unless given)."""
    if model is None:
        model = models.mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, warn=False, **options) as mon:
        _train(mon, model, opt, steps, seed=seed)
    return mon, model, opt


def test_a_resumed_run_reads_its_default_probe_back_from_the_file(tmp_path, caplog):
    path = tmp_path / "run.h5"
    first, model, opt = _run_in(path, range(4), seed=1)
    resumed, _, _ = _run_in(path, range(4, 6), 2, model, opt)
    for a, b in zip(first.probe, resumed.probe):
        assert torch.equal(a, b)
    with ls.Run.open(path) as run:
        assert run.steps("probe").tolist() == [0]  # taken once
    # restarted from before the probe was taken: a new run, a new probe
    with caplog.at_level(logging.WARNING, logger="landscape"):
        restarted, _, _ = _run_in(path, range(2), 3, model, opt, truncate_from=0)
    assert not torch.equal(restarted.probe[0], first.probe[0])
    assert any("first training batch" in r.message for r in caplog.records)


def test_another_model_appended_to_a_run_takes_a_probe_that_fits_it(tmp_path, caplog):
    """The MLP run's stored probe was restored for a CNN appended to the file (only a
    warning says it is another model): the sentinels failed on it at every step."""
    path = tmp_path / "run.h5"
    _run_in(path, range(3), seed=1)
    cnn = models.SmallCNN(seed=0)
    opt = torch.optim.SGD(cnn.parameters(), lr=0.05)
    x, y = models.image_data(16)
    with caplog.at_level(logging.WARNING, logger="landscape"), \
            pytest.warns(RuntimeWarning, match="holds a run of Sequential") as warned, \
            ls.Monitor(cnn, F.cross_entropy, path, optimizer=opt, warn=False) as mon:
        for step in range(3, 6):
            loss = F.cross_entropy(cnn(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
    assert warned[0].filename == __file__  # the user's line, not the store's
    assert any("does not fit this run's batches" in r.message for r in caplog.records)
    assert mon.probe[0].shape == (16, 1, 6, 6) and not mon.findings  # no metric_failed
    with ls.Run.open(path) as run:
        assert run.steps("probe").tolist() == [0, 3]
        assert np.isfinite(run.series("sentinels", "r_secant")[1][-2:]).all()


def test_a_run_file_without_its_probe_says_the_probe_changes(tmp_path, caplog):
    import h5py

    path = tmp_path / "run.h5"
    _, model, opt = _run_in(path, range(3), seed=1)
    with h5py.File(path, "a") as f:  # as an earlier version wrote it
        del f["state"]
    with caplog.at_level(logging.WARNING, logger="landscape"):
        _run_in(path, range(3, 5), 2, model, opt)
    assert any("not comparable" in r.message for r in caplog.records)
    with ls.Run.open(path) as run:
        assert run.steps("probe").tolist() == [0, 3]


def test_a_resumed_run_keeps_the_dense_window_its_sentinels_opened(tmp_path, monkeypatch):
    from landscape.monitor import adaptive

    monkeypatch.setattr(adaptive, "DENSE_AT", 1e-12)  # every finite r opens it
    path = tmp_path / "run.h5"
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    metrics = [ls.metrics.Sentinels(), ls.metrics.Update(schedule=10)]
    ls.metrics.Update.dense_every = 1  # densified like taylor_radius, for this test only
    try:
        with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, warn=False,
                        metrics=metrics) as first:
            _train(first, model, opt, range(4), seed=1)
        with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, warn=False,
                        metrics=[ls.metrics.Sentinels(), ls.metrics.Update(schedule=10)]) as mon:
            assert mon._dense.until == 3 + adaptive.DENSE_STEPS
            _train(mon, model, opt, range(4, 6), seed=2)
    finally:
        del ls.metrics.Update.dense_every
    with ls.Run.open(path) as run:
        # r is first measured at step 1 and opens the window from step 2; dense through
        # the resume (steps 4 and 5 are off the every-10 schedule)
        assert run.steps("update").tolist() == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("sizes", [(8, 8), (3, 6), (8, 6)])
def test_the_default_probe_of_micro_batches_takes_the_first_samples_across_them(sizes):
    """A list of micro-batches was cut batch by batch: [8, 6] kept 4 + 6 samples while the
    run file said 4."""
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(n, 4, generator=g), "y": torch.randint(0, 3, (n,),
                                                                       generator=g)}
               for n in sizes]
    model = nn.Linear(4, 3)  # its own classifier layer (layer="")
    with ls.Monitor(model, F.cross_entropy, warn=False, probe_size=4,
                    metrics=[ls.metrics.Representation(layer="", schedule=1)]) as mon:
        mon.step(0, batch=batches, loss=torch.tensor(1.0))
        probe, run = mon.probe, mon.run()
    assert [len(b["y"]) for b in probe] == ([4] if sizes[0] >= 4 else [3, 1])
    assert torch.equal(torch.cat([b["x"] for b in probe]),
                       torch.cat([b["x"] for b in batches])[:4])
    assert list(run.series("probe", "samples")[1]) == [4]


@pytest.mark.parametrize("sizes", [(8, 8), (3, 6)])
def test_a_default_probe_of_micro_batches_is_read_back_on_resume(tmp_path, sizes, caplog):
    """The probe keeps as many micro-batches as it needs: the resumed run's list of
    batches compared whole with it made every resume take a new probe."""
    import transformers

    g = torch.Generator().manual_seed(0)
    batches = [transformers.BatchEncoding({"x": torch.randn(n, 4, generator=g),
                                           "y": torch.randint(0, 3, (n,), generator=g)})
               for n in sizes]
    model, path = nn.Linear(4, 3), tmp_path / "run.h5"
    metrics = [ls.metrics.Representation(layer="", schedule=1)]
    with ls.Monitor(model, F.cross_entropy, path, warn=False, probe_size=4,
                    metrics=metrics) as mon:
        mon.step(0, batch=batches, loss=torch.tensor(1.0))
        first = mon.probe
    with caplog.at_level(logging.INFO, logger="landscape"):
        with ls.Monitor(model, F.cross_entropy, path, warn=False, probe_size=4,
                        metrics=metrics) as mon:
            mon.step(1, batch=batches, loss=torch.tensor(1.0))
            again = mon.probe
    assert any("resuming with the probe stored" in r.message for r in caplog.records)
    assert list(ls.Run.open(path).series("probe", "samples")[0]) == [0]
    assert len(again) == len(first)
    for a, b in zip(first, again):
        assert isinstance(b, transformers.BatchEncoding) and torch.equal(a["x"], b["x"])


def test_an_empty_micro_batch_adds_no_samples_to_the_default_probe():
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(n, 4, generator=g), "y": torch.randint(0, 3, (n,), generator=g)}
               for n in (0, 6)]
    with ls.Monitor(nn.Linear(4, 3), F.cross_entropy, warn=False, probe_size=4,
                    metrics=[ls.metrics.Representation(layer="", schedule=1)]) as mon:
        mon.step(0, batch=batches, loss=torch.tensor(1.0))
        assert [len(b["y"]) for b in mon.probe] == [4]
        assert list(mon.run().series("probe", "samples")[1]) == [4]


def test_a_mapping_that_is_not_a_dict_is_an_inputs_targets_pair():
    """{x, y} in a BatchEncoding (a UserDict) failed: 'needs (inputs, targets) batches'."""
    import transformers

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    model = nn.Linear(4, 3)
    rows = {}
    for name, batch in (("dict", {"x": x, "y": y}),
                        ("mapping", transformers.BatchEncoding({"x": x, "y": y}))):
        with ls.Monitor(model, F.cross_entropy, probe=batch, warn=False, strict=True,
                        metrics=[ls.metrics.TopEigenvalues(k=1, schedule=1)]) as mon:
            mon.step(0, batch=batch, loss=torch.tensor(1.0))
            rows[name] = mon.run().series("top_eigenvalues", "eigenvalues")[1]
    assert rows["dict"] == pytest.approx(rows["mapping"]) and rows["dict"][0][0] > 0


def test_micro_batches_laid_out_differently_are_read_back_part_by_part(tmp_path, caplog):
    """Each stored part is read against the run's micro-batch of its place."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 4, generator=g), torch.randint(0, 3, (2,), generator=g)),
               (torch.randn(6, 4, generator=g),
                torch.randint(0, 3, (6,), generator=g).to(torch.int32))]
    model, path = nn.Linear(4, 3), tmp_path / "run.h5"
    metrics = [ls.metrics.Representation(layer="", schedule=1)]
    for step in range(2):
        with caplog.at_level(logging.INFO, logger="landscape"):
            with ls.Monitor(model, F.cross_entropy, path, warn=False, probe_size=4,
                            metrics=metrics) as mon:
                mon.step(step, batch=batches, loss=torch.tensor(1.0))
    assert any("resuming with the probe stored" in r.message for r in caplog.records)
    assert not any("does not fit" in r.message for r in caplog.records)
    assert list(ls.Run.open(path).series("probe", "samples")[0]) == [0]


def test_micro_batches_that_differ_in_key_order_or_dtype_alone_are_not_said_to_be_parts(
        caplog):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    alike = [{"x": x, "y": y}, {"y": y.to(torch.int32), "x": x}]
    parts = [{"q": x, "y": y}, {"d": x[:, :2], "e": x}]
    said = []
    for batch in (alike, parts):
        with caplog.at_level(logging.WARNING, logger="landscape"):
            caplog.clear()
            with ls.Monitor(nn.Linear(4, 3), F.cross_entropy, warn=False, probe_size=4,
                            metrics=[ls.metrics.Representation(layer="", schedule=1)]) as mon:
                mon.step(0, batch=batch, loss=torch.tensor(1.0))
            said.append(any("laid out differently" in r.message for r in caplog.records))
    assert said == [False, True]


def test_the_dense_window_leaves_a_metric_switched_off_or_not_started_alone():
    """never() is "declared but switched off", every(k, start=s) starts at s, and at(...)
    is on from its first listed step to its last: a sentinel that opens the window ran them
    anyway (taylor_radius at steps 4-11, sharpness at 5, 10)."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    metrics = [ls.metrics.Sentinels(), ls.metrics.Sharpness(schedule="never()"),
               ls.metrics.SpectralAlignment(schedule=ls.schedules.every(10, start=1000)),
               # at(...) before its first step (it ran at 5, 10), logspace after its last
               # (taylor_radius ran at every step of the window)
               ls.metrics.TopEigenvalues(k=1, schedule="at(1000)"),
               ls.metrics.TaylorRadius(schedule="logspace(0, 2, 2)")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, warn=False, metrics=metrics,
                        probe=(x, y)) as mon:
            upcoming = iter(range(1, 13))

            def rate_of_next_step():  # one huge step, step 3, opens the dense window
                for group in opt.param_groups:
                    group["lr"] = 30.0 if next(upcoming) == 3 else 0.01

            models.full_batch_steps(mon, model, opt, x, y, 12, after_step=rate_of_next_step)
            run = mon.run()
    assert run.series("sentinels", "r_secant")[1][3] >= 0.5  # the window opened
    assert run.steps("adaptive").tolist() == []  # and had nothing to run
    for name in ("sharpness", "spectral_alignment", "top_eigenvalues"):
        assert run.steps(name).tolist() == [], name
    assert run.steps("taylor_radius").tolist() == [0, 2]  # logspace(0, 2, 2): at(0, 2)


def test_the_config_records_the_samples_of_a_list_probe_and_keeps_its_own_keys(tmp_path):
    """A probe of three batches of 8 was recorded as 8; config={"model": ..., "optimizer":
    ...} (an experiment tracker's keys) replaced the monitor's record, so a resume with
    another class of model with as many parameters was not warned about."""
    probe = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    user = {"model": "my-net", "optimizer": "sgd", "lr": 0.1}
    path = tmp_path / "run.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ls.Monitor(models.mlp(), F.cross_entropy, path, probe=probe, config=user,
                        warn=False) as mon:
            mon.step(0, batch=probe[0], loss=torch.tensor(1.0))
            config = mon.run().config
    assert config["probe"] == {"source": "given", "size": 24}
    assert config["model"] == "Sequential" and config["lr"] == 0.1
    assert config["optimizer"] is None  # the monitor's record: no optimizer given
    assert config["user_config"] == {"model": "my-net", "optimizer": "sgd"}

    class Other(nn.Module):  # another class, the same parameters
        def __init__(self):
            super().__init__()
            self.body = models.mlp()

        def forward(self, x):
            return self.body(x)

    with pytest.warns(RuntimeWarning, match="holds a run of"), ls.Monitor(
            Other(), F.cross_entropy, path, probe=probe, config=user, warn=False):
        pass


def test_a_metric_without_a_probe_says_why_there_is_none():
    """It told the user to pass probe=, also when probe_size=None had turned the default
    probe off, or when no batch= had come yet to take the default probe from."""
    def failures(**monitor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ls.Monitor(models.mlp(), F.cross_entropy, warn=False, **monitor) as mon:
                mon.step(0, loss=torch.tensor(1.0))  # no batch=
                return [f.message for f in mon.findings
                        if f.rule == "metric_failed" and f.metric == "sentinels"]

    (off,) = failures(probe_size=None)
    assert "probe_size=None turned the default probe off: pass probe=... to Monitor" in off
    (pending,) = failures()
    assert "the default probe is kept from the first batch= given to step()" in pending


def test_a_metric_due_between_two_calls_is_named_once():
    """A schedule is due at exact steps: a loop that calls the monitor at steps 9, 19, ...
    (the usual "log every 10") never measured the every(10) metrics, and said nothing."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = models.classification_data(32, seed=1)
    metrics = [ls.metrics.Loss(), ls.metrics.Logits(schedule=10),
               ls.metrics.Sharpness(schedule=ls.every(10, start=9)),
               ls.metrics.TopEigenvalues(k=1, schedule=100)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, warn=False, metrics=metrics,
                        probe=(x, y)) as mon:
            for step in range(40):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % 10 == 9:
                    mon.step(step, batch=(x, y), loss=loss)
            run = mon.run()
    said = [str(w.message) for w in caught if "due between" in str(w.message)]
    assert said == ["landscape: logits (every(10), due at step 10) was due between this "
                    "monitor's calls at steps 9 and 19, and not measured: a schedule is due "
                    "at exact steps. Call monitor.step after every optimizer step, or give "
                    "those metrics schedules that land on the steps you call (every(n, "
                    "start=s); docs/monitor.md, 'Metrics and presets')"]
    assert run.steps("logits").tolist() == []
    assert run.steps("sharpness").tolist() == [9, 19, 29, 39]  # lands on the calls


def test_calls_at_every_step_or_on_the_schedules_say_nothing_about_them():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = models.classification_data(32, seed=1)
    for calls in (range(25), range(0, 60, 10)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ls.Monitor(model, F.cross_entropy, optimizer=opt, warn=False, probe=(x, y),
                            # every(5) under calls every 10: due at each call, measured
                            metrics=[ls.metrics.Loss(), ls.metrics.Logits(schedule=10),
                                     ls.metrics.GradNorm(schedule=5)]) as mon:
                _train(mon, model, opt, calls)
        assert not [w for w in caught if "due between" in str(w.message)], calls


def test_metrics_as_a_mapping_of_name_to_schedule_keep_their_schedules():
    """PRESETS lists {name: schedule}; passed as metrics=, the schedules were dropped."""
    model = models.mlp()
    full = ls.Monitor(model, F.cross_entropy, metrics=ls.metrics.PRESETS["full"])
    assert {m.name: m.schedule.describe() for m in full.metrics} == ls.metrics.PRESETS["full"]
    mine = ls.Monitor(model, F.cross_entropy, metrics={"sharpness": "every(3)", "loss": None})
    assert [(m.name, m.schedule.describe()) for m in mine.metrics] == [("sharpness", "every(3)")]


def test_a_metric_list_reused_for_another_model_reads_that_models_layers():
    """The default layers chosen for the first model were kept as if given: the deeper
    model's collapse read its hidden layer, and spectral alignment missed its head."""
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    metrics = ls.metrics.preset("standard")
    chosen = []
    for depth in (2, 3):
        with ls.Monitor(models.mlp(depth=depth), F.cross_entropy, metrics=metrics,
                        probe=(x, y), warn=False):
            by_name = {m.name: m for m in metrics}
            chosen.append((by_name["spectral_alignment"].layers, by_name["collapse"].layer))
    assert chosen == [(["0", "2"], "2"), (["0", "2", "4"], "4")]
    given = ls.metrics.SpectralAlignment(layers=["0"])
    given.setup(models.mlp(depth=3))
    assert given.layers == ["0"]


def test_resuming_a_run_with_a_given_probe_without_it_says_the_probe_changes(tmp_path):
    """The first batch's probe silently replaced the given one (sharpness 0.47 -> 0.59)."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = models.classification_data(32, seed=1)
    said = []
    for probe in ((x[:16], y[:16]), None, None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ls.Monitor(model, F.cross_entropy, tmp_path / "r.h5", optimizer=opt,
                            probe=probe, warn=False,
                            metrics=[ls.metrics.Loss(), ls.metrics.Sentinels()]) as mon:
                start = 0 if mon.writer.last_recorded_step() is None \
                    else mon.writer.last_recorded_step() + 1
                models.full_batch_steps(mon, model, opt, x, y, 2, start=start)
        said.append([str(w.message) for w in caught if "recorded with probe=" in str(w.message)])
    assert said[0] == []
    assert said[1] == ["landscape: resuming a run recorded with probe= given, without one: "
                       "the probe metrics measure another probe (the first batch's) from the "
                       "step after 1 and are not comparable across it; pass the same probe= "
                       "to continue their series"]
    assert said[2] == []  # the second session's probe is stored and restored: no change
