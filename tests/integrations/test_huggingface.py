"""LandscapeTrainerCallback with the real transformers.Trainer on a tiny GPT-2 built from a
config (no downloads; CPU; a few steps)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from landscape import InstabilityWarning, StepOrderError
from landscape.alarms import LogitGrowth
from landscape.findings import Finding
from landscape.metrics import create
from landscape.store import Run

transformers = pytest.importorskip("transformers", reason="install the 'transformers' extra")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
from landscape.integrations import LandscapeTrainerCallback  # noqa: E402

VOCAB, LENGTH = 50, 12


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


PROBE_IDS = Tokens(8, seed=1).ids
PROBE = {"input_ids": PROBE_IDS, "labels": PROBE_IDS}


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)  # dropout 0.1 in embeddings, attention, MLP


def _train(tmp_path, callbacks=(), max_steps=4, eval_dataset=None, trainer_class=None,
           model=None, **args):
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = model or _model()
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to=[], save_strategy="no",
        max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True,
        seed=0, data_seed=0, learning_rate=1e-3, **args,
    )
    trainer = (trainer_class or transformers.Trainer)(
        model=model, args=arguments, train_dataset=Tokens(), eval_dataset=eval_dataset,
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer, model


def _logged_losses(trainer):
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def test_records_every_optimizer_step_with_the_loss_the_trainer_logged(tmp_path):
    path = tmp_path / "run.h5"
    cb = LandscapeTrainerCallback(str(path), probe=PROBE, metrics="cheap")
    trainer, model = _train(tmp_path, [cb])
    with Run.open(path) as run:
        assert {"loss", "grad_norm", "nonfinite", "update", "logits"} <= set(run.metrics())
        steps, losses = run.series("loss", "value")
        assert steps.tolist() == [0, 1, 2, 3]
        logged = _logged_losses(trainer)
        assert [s for s, _ in logged] == [1, 2, 3, 4]  # the Trainer labels step s as s + 1
        assert losses.tolist() == pytest.approx([v for _, v in logged], rel=1e-4)
        assert (run.series("update", "norm")[1] > 0).all()  # hooks on the inner optimizer fired
        assert np.isfinite(run.series("grad_norm", "value")[1]).all()  # before zero_grad
        assert np.isfinite(run.series("logits", "max_abs")[1]).all()  # read from lm_head
        assert run.metric_attrs("logits")["params"]
        assert run.config["integration"] == "transformers"
        assert run.config["optimizer"]["class"] == "AdamW"
        assert run.findings() == []
    assert not model._forward_hooks
    opt = trainer.optimizer.optimizer
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_monitored_training_gives_bitwise_the_unmonitored_parameters(tmp_path):
    _, plain = _train(tmp_path)
    cb = LandscapeTrainerCallback(
        None, probe=PROBE, alarms=False,
        metrics=["loss", "grad_norm", "update", create("logits", schedule=1),
                 create("hessian_trace", n_matvec=3, schedule=2)],
    )
    _, watched = _train(tmp_path, [cb])
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name
    steps, trace = cb.run().series("hessian_trace", "value")
    assert steps.tolist() == [0, 2] and np.isfinite(trace).all()  # the default closure ran


def test_gradient_accumulation_gives_the_step_loss_the_trainer_logged(tmp_path):
    cb = LandscapeTrainerCallback(None, metrics=["loss", "update"], alarms=False)
    trainer, _ = _train(tmp_path, [cb], max_steps=2, gradient_accumulation_steps=2)
    steps, losses = cb.run().series("loss", "value")
    assert steps.tolist() == [0, 1]
    assert losses.tolist() == pytest.approx([v for _, v in _logged_losses(trainer)], rel=1e-4)
    # loss/samples counts both micro-batches of 4 sequences, not the last one
    assert cb.run().series("loss", "samples")[1].tolist() == [8.0, 8.0]


def test_evaluation_passes_during_training_do_not_count_as_training_losses(tmp_path):
    cb = LandscapeTrainerCallback(None, metrics=["loss"], alarms=False)
    trainer, _ = _train(tmp_path, [cb], eval_dataset=Tokens(8, seed=2), eval_strategy="steps",
                        eval_steps=1)
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 4
    _, losses = cb.run().series("loss", "value")
    assert losses.tolist() == pytest.approx([v for _, v in _logged_losses(trainer)], rel=1e-4)


def test_a_finding_reaches_the_trainer_warns_calls_back_and_stops_training(tmp_path):
    seen = []
    cb = LandscapeTrainerCallback(
        None, probe=PROBE, metrics=["loss", create("logits", schedule=1)],
        alarms=[LogitGrowth(max_abs=0.0, max_abs_severity="warning")], on_finding=seen.append,
        stop_on="warning",
    )
    with pytest.warns(InstabilityWarning, match="logit"):
        trainer, _ = _train(tmp_path, [cb], max_steps=5)
    assert [(f.step, f.rule) for f in seen] == [(0, "logit_growth")]
    assert trainer.state.global_step == 1
    assert [f.rule for f in cb.run().findings()] == ["logit_growth"]


def test_every_n_steps_and_a_closed_file_after_training(tmp_path):
    path = tmp_path / "run.h5"
    cb = LandscapeTrainerCallback(str(path), metrics=["loss", "update"], every_n_steps=3)
    _train(tmp_path, [cb], max_steps=7)
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [0, 3, 6]
        assert run.metric_attrs("update")["schedule"] == "every(3)"
    assert cb.run().steps("update").tolist() == [0, 3, 6]


def test_a_model_returning_tuples_has_its_loss_read_as_the_trainer_reads_it(tmp_path):
    # return_dict=False: (loss, logits, ...); the rows were NaN with a warning that the
    # Trainer computed the loss outside the model, and the curvature failed on "returned
    # no loss"
    class TupleGPT2(transformers.GPT2LMHeadModel):
        def forward(self, input_ids=None, labels=None, **kwargs):
            return super().forward(input_ids=input_ids, labels=labels, **kwargs).to_tuple()

    model = _model()
    tuples = TupleGPT2(model.config)
    tuples.load_state_dict(model.state_dict())
    cb = LandscapeTrainerCallback(None, probe=PROBE, alarms=False,
                                  metrics=["loss", create("top_eigenvalues", k=1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "returned no loss" warning
        trainer, _ = _train(tmp_path, [cb], max_steps=2, model=tuples)
    run = cb.run()
    logged = [v for _, v in _logged_losses(trainer)]
    assert run.series("loss", "value")[1].tolist() == pytest.approx(logged, rel=1e-4)
    assert np.isfinite(run.series("top_eigenvalues", "eigenvalues")[1]).all()
    assert run.findings() == []


def test_explicit_record_loss_wins_over_the_forward_hook(tmp_path):
    class Override(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            cb.record_loss(float(state.global_step))

    cb = LandscapeTrainerCallback(None, metrics=["loss"], alarms=False)
    _train(tmp_path, [Override(), cb], max_steps=3)
    assert cb.run().series("loss", "value")[1].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("share", [False, True])
def test_record_loss_from_compute_loss_combines_the_micro_batches(tmp_path, share):
    """compute_loss runs once per micro-batch: the step's loss is their mean (or sum); the
    evaluation between steps runs it too, and its losses are not the next step's."""
    micro: list[float] = []

    class Recording(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            if model.training:  # the evaluation after each step calls it too
                micro.append(float(out.loss))
            cb.record_loss(out.loss / 2 if share else out.loss, share=share)
            return (out.loss, out) if return_outputs else out.loss

    cb = LandscapeTrainerCallback(None, metrics=["loss"], alarms=False)
    _train(tmp_path, [cb], max_steps=3, gradient_accumulation_steps=2, trainer_class=Recording,
           eval_dataset=Tokens(8, seed=2), eval_strategy="steps", eval_steps=1)
    expected = np.asarray(micro).reshape(3, 2).mean(axis=1)
    assert len(set(micro)) == 6  # six different micro-batch losses
    np.testing.assert_allclose(cb.run().series("loss", "value")[1], expected, rtol=1e-6)
    assert cb.run().series("loss", "samples")[1].tolist() == [8, 8, 8]


class _TokenSum(transformers.Trainer):
    """The transformers recipe: labels popped, the token-loss sum over num_items_in_batch,
    which the model never receives."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(
            logits, labels[:, 1:].reshape(-1), reduction="sum") / num_items_in_batch
        self.callback.record_loss(loss)
        return (loss, out) if return_outputs else loss


class _Super(transformers.Trainer):
    """compute_loss(**kwargs) over super().compute_loss, recorded through a helper."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss = super().compute_loss(model, inputs, return_outputs=False, **kwargs)
        self._keep(loss)
        return loss

    def _keep(self, value):
        self.callback.record_loss(value)


@pytest.mark.parametrize("trainer_class", [_TokenSum, _Super], ids=["recipe", "super"])
def test_record_loss_counts_a_compute_loss_as_its_trainer_counts_it(tmp_path, trainer_class):
    # the default counted the micro-batches' mean: a quarter of the Trainer's loss under
    # accumulation 4 (the recipe's model never receives num_items_in_batch; and reading it
    # from the caller's own locals missed compute_loss(**kwargs) and helpers)
    cb = LandscapeTrainerCallback(None, metrics=["loss"], alarms=False)
    trainer_class.callback = cb
    trainer, _ = _train(tmp_path, [cb], max_steps=2, gradient_accumulation_steps=4,
                        trainer_class=trainer_class)
    logged = [v for _, v in _logged_losses(trainer)]
    assert cb.run().series("loss", "value")[1].tolist() == pytest.approx(logged, rel=1e-4)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_record_loss_of_a_label_smoothed_loss_is_the_trainers_loss(tmp_path, accumulation):
    """With label_smoothing_factor the Trainer normalises each micro-batch's smoothed loss
    by the step's token count: record_loss(loss), as the warning said, recorded 1/k of the
    loss under accumulation k (a false loss_spike at an epoch's short last window)."""

    class Smoothed(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            cb.record_loss(result[0] if return_outputs else result)
            return result

    cb = LandscapeTrainerCallback(None, metrics=["loss"], alarms=False, probe=PROBE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a probe with labels: nothing to say
        trainer, _ = _train(tmp_path, [cb], max_steps=5, trainer_class=Smoothed,
                            label_smoothing_factor=0.1,
                            gradient_accumulation_steps=accumulation)
    logged = [loss for _, loss in _logged_losses(trainer)]
    np.testing.assert_allclose(cb.run().series("loss", "value")[1], logged, rtol=1e-4)


def test_a_fresh_train_into_a_file_of_an_earlier_run_is_refused_before_it_trains(tmp_path):
    """train() twice, or a script run again: it failed at the first optimizer step, after
    the model had moved, with the forward hook left on it."""
    path = tmp_path / "run.h5"
    _train(tmp_path, [LandscapeTrainerCallback(str(path), metrics=["loss"])], max_steps=2)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "again"), use_cpu=True, report_to=[], save_strategy="no",
        max_steps=2, per_device_train_batch_size=4, disable_tqdm=True)
    trainer = transformers.Trainer(
        model=model, args=arguments, train_dataset=Tokens(),
        callbacks=[LandscapeTrainerCallback(str(path), metrics=["loss"])])
    with pytest.raises(StepOrderError, match="already holds steps up to 1, and this training "
                                             "starts at step 0"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not m._forward_hooks for m in model.modules())


def test_monitor_options_reach_the_monitor(tmp_path):
    cb = LandscapeTrainerCallback(None, probe_size=None, adaptive=False, alarms=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(tmp_path, [cb], max_steps=2)
    assert cb.monitor.probe is None and not cb.monitor.adaptive  # no default probe taken
    assert "probe" not in cb.run().metrics()


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="every_n_steps"):
        LandscapeTrainerCallback(None, every_n_steps=-1)
    with pytest.raises(ValueError, match="severity"):
        LandscapeTrainerCallback(None, stop_on="loud")
    with pytest.raises(ValueError, match="optimiser"), warnings.catch_warnings():
        LandscapeTrainerCallback(None, optimiser=None)


def test_without_on_optimizer_step_the_step_is_recorded_at_step_end(tmp_path, monkeypatch):
    import landscape.integrations.huggingface as hf

    class OldTransformers(LandscapeTrainerCallback):  # transformers < 4.42 never calls it
        def on_optimizer_step(self, args, state, control, **kwargs):
            return None

    # nor on_pre_optimizer_step: no loss scale to read, so no norm kept before clipping
    monkeypatch.setattr(hf, "_clips_in_one_process", lambda args: False)

    cb = OldTransformers(None, metrics=["loss", "grad_norm"], alarms=False)
    with pytest.warns(RuntimeWarning, match="grad_norm"):
        trainer, _ = _train(tmp_path, [cb])
    steps, losses = cb.run().series("loss", "value")
    assert steps.tolist() == [0, 1, 2, 3]
    assert losses.tolist() == pytest.approx([v for _, v in _logged_losses(trainer)], rel=1e-4)
    assert np.isnan(cb.run().series("grad_norm", "value")[1]).all()  # zeroed before step end


def test_a_causal_lm_counts_its_next_token_targets_so_padded_micro_batches_average_exactly(
        tmp_path):
    padded = {k: v.clone() for k, v in PROBE.items()}
    padded["labels"][0, 4:] = -100  # samples with 3 to 11 next-token targets
    padded["labels"][5, 8:] = -100
    from landscape.integrations.huggingface import next_token_targets

    assert next_token_targets(padded) == 8 * 11 - 8 - 4
    assert next_token_targets({"input_ids": PROBE_IDS}) is None
    values = {}
    for micro in (None, 2):
        metric = create("top_eigenvalues", schedule=1, k=1, tol=1e-8)
        cb = LandscapeTrainerCallback(None, metrics=[metric], probe=padded, alarms=False,
                                      microbatch_size=micro, warn=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _train(tmp_path / str(micro), [cb], max_steps=2)
        assert cb.monitor.batch_size is next_token_targets
        assert [f for f in cb.monitor.findings if f.rule == "metric_failed"] == []
        values[micro] = cb.run().series("top_eigenvalues", "eigenvalues")[1][:, 0]
    np.testing.assert_allclose(values[2], values[None], rtol=1e-6)


def test_only_a_shifted_causal_lm_loss_in_one_process_counts_next_tokens(monkeypatch):
    from landscape import distributed
    from landscape._hf import counts_next_tokens
    from landscape.integrations.huggingface import model_loss

    gpt2 = _model()
    xlnet = transformers.XLNetLMHeadModel(transformers.XLNetConfig(
        vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, d_inner=32))
    assert counts_next_tokens(gpt2, model_loss)
    # XLNet is in the causal-LM mapping but averages over its unshifted labels
    assert not counts_next_tokens(xlnet, model_loss)
    assert not counts_next_tokens(gpt2, lambda m, b: m(**b).loss)  # the user's closure
    gpt2.loss_function = lambda *args, **kwargs: None  # a loss the user replaced
    assert not counts_next_tokens(gpt2, model_loss)
    # across ranks a rank whose probe has no target token would leave the others waiting
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    assert not counts_next_tokens(_model(), model_loss)
    assert counts_next_tokens(_model(), model_loss, distributed=False)  # told: one rank


def _logged_grad_norms(trainer):
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_grad_norm_is_the_norm_the_trainer_clipped_from(tmp_path, accumulate):
    """The Trainer clips .grad in place before the optimizer step (max_grad_norm); the
    callback records the norm before clipping, the one the Trainer logs, not the clipped
    norm (at most max_grad_norm) that .grad holds when callbacks run."""
    cb = LandscapeTrainerCallback(None, metrics=["loss", "grad_norm"], alarms=False)
    trainer, model = _train(tmp_path, [cb], max_grad_norm=0.05,
                            gradient_accumulation_steps=accumulate)
    _, norms = cb.run().series("grad_norm", "value")
    logged = _logged_grad_norms(trainer)
    assert len(logged) == 4 and min(logged) > 0.05  # every step was clipped
    assert norms.tolist() == pytest.approx(logged, rel=1e-5)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_without_clipping_no_parameter_hooks_are_needed(tmp_path):
    cb = LandscapeTrainerCallback(None, metrics=["grad_norm"], alarms=False)
    trainer, _ = _train(tmp_path, [cb], max_grad_norm=0.0, max_steps=2)
    assert cb._unclipped is None
    _, norms = cb.run().series("grad_norm", "value")
    assert norms.tolist() == pytest.approx(_logged_grad_norms(trainer), rel=1e-5)


def test_the_norm_before_clipping_follows_accumulation_and_the_loss_scale():
    """Two backwards accumulate into .grad; the kept norm is the accumulated one, divided
    by the fp16 loss scale read before the step; clipping after the hooks changes nothing."""
    from landscape.integrations.huggingface import _NormBeforeClipping

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    keeper = _NormBeforeClipping(net)
    x = torch.randn(8, 4)
    scale = 1024.0
    for half in (x[:4], x[4:]):
        (net(half).pow(2).mean() * scale).backward()
    whole = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in net.parameters())) / scale
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)  # in place, after the hooks
    keeper.scale = scale
    assert keeper.take() == pytest.approx(float(whole), rel=1e-6)
    assert keeper.take() is None  # forgotten for the next step
    keeper.remove()
    net(x).sum().backward()
    assert keeper.take() is None and not any(p._post_accumulate_grad_hooks for p in
                                             net.parameters())


def test_the_norm_before_clipping_is_kept_in_one_process_only():
    import types

    from landscape.integrations.huggingface import _clips_in_one_process

    def args(**kw):
        return types.SimpleNamespace(**{"max_grad_norm": 1.0, "world_size": 1, **kw})

    assert _clips_in_one_process(args())
    assert not _clips_in_one_process(args(max_grad_norm=0.0))
    assert not _clips_in_one_process(args(max_grad_norm=None))
    assert not _clips_in_one_process(args(world_size=2))  # DDP: the local gradient
    assert not _clips_in_one_process(args(deepspeed="ds.json"))
    assert not _clips_in_one_process(args(fsdp="full_shard"))


def test_a_body_unfrozen_during_training_counts_in_the_norm_before_clipping(tmp_path):
    """The transformer blocks are frozen when training starts and released at step 2: their
    gradients then count in the norm the Trainer clips, and in the recorded one."""

    class Unfreeze(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                for p in model.transformer.h.parameters():
                    p.requires_grad_(True)

    model = _model()
    for p in model.transformer.h.parameters():
        p.requires_grad_(False)
    cb = LandscapeTrainerCallback(None, metrics=["grad_norm"], alarms=False)
    transformers.logging.set_verbosity_error()
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to=[], save_strategy="no",
        max_steps=4, per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True,
        seed=0, data_seed=0, learning_rate=1e-3, max_grad_norm=0.05,
    )
    # the unfreezing callback runs before ours at each step begin
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=Tokens(),
                                   callbacks=[Unfreeze(), cb])
    trainer.train()
    _, norms = cb.run().series("grad_norm", "value")
    assert norms.tolist() == pytest.approx(_logged_grad_norms(trainer), rel=1e-5)


def test_where_the_norm_before_clipping_cannot_be_kept_the_log_says_so(tmp_path, monkeypatch,
                                                                      caplog):
    import landscape.integrations.huggingface as hf

    monkeypatch.setattr(hf, "_clips_in_one_process", lambda args: False)  # as under DDP
    cb = LandscapeTrainerCallback(None, metrics=["grad_norm"], alarms=False)
    with caplog.at_level(logging.WARNING, logger="landscape"):
        _train(tmp_path, [cb], max_steps=1)
    assert [r for r in caplog.records if "hold the clipped norm" in r.getMessage()]
    caplog.clear()
    cb = LandscapeTrainerCallback(None, metrics=["grad_norm"], alarms=False)
    with caplog.at_level(logging.WARNING, logger="landscape"):
        _train(tmp_path, [cb], max_steps=1, max_grad_norm=0.0)  # no clipping: nothing to say
    assert not [r for r in caplog.records if "clipped norm" in r.getMessage()]


def test_a_tuple_probe_under_the_models_own_loss_gets_one_line_and_the_forward_metrics(
        tmp_path):
    # the curvature said "GPT2LMHeadModel(<the module tree>) argument after ** must be a
    # mapping", and the forward-only metrics failed on the closure too
    cb = LandscapeTrainerCallback(None, probe=(PROBE_IDS, PROBE_IDS), alarms=False,
                                  metrics=["representation", create("top_eigenvalues", k=1)])
    with pytest.warns(RuntimeWarning) as seen:
        _train(tmp_path, [cb], max_steps=1)
    failed = [str(w.message) for w in seen if "failed" in str(w.message)]
    assert len(failed) == 1 and "top_eigenvalues" in failed[0]
    assert "needs dict batches (with 'labels'); got a tuple" in failed[0]
    assert "\n" not in failed[0] and "GPT2LMHeadModel(" not in failed[0]
    assert np.isfinite(cb.run().series("representation", "effective_rank")[1]).all()


@pytest.mark.parametrize("zero", [True, False])
def test_the_setup_notes_are_said_by_the_first_process_alone(tmp_path, monkeypatch, caplog,
                                                              zero):
    """Under DDP (torchrun) each process printed the clipping note and the label-smoothing
    warning: two copies of each (the framework audit)."""
    from landscape.integrations import huggingface

    class Rank(transformers.TrainerCallback):  # what the Trainer sets on rank 1
        def on_train_begin(self, args, state, control, **kwargs):
            state.is_world_process_zero = zero

    monkeypatch.setattr(huggingface, "_clips_in_one_process", lambda args: False)  # DDP
    cb = LandscapeTrainerCallback(None, metrics=["loss"], alarms=False)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING,
                                                                        "landscape"):
        warnings.simplefilter("always")
        _train(tmp_path, [Rank(), cb], max_steps=1, max_grad_norm=1.0,
               label_smoothing_factor=0.1)
    clipping = [r for r in caplog.records if "hold the clipped norm" in r.getMessage()]
    smoothing = [w for w in seen if "label_smoothing_factor the Trainer pops" in str(w.message)]
    assert (len(clipping), len(smoothing)) == ((1, 1) if zero else (0, 0))


def test_a_second_train_starts_the_callbacks_findings_afresh(tmp_path):
    """callback.findings was never reset: a second train() (or a resume that truncated
    the file) kept the earlier run's findings beside the run file's (review)."""
    cb = LandscapeTrainerCallback(None, probe=PROBE, metrics="cheap")
    _train(tmp_path, [cb], max_steps=2)
    earlier = Finding(step=1, rule="earlier_run", severity="warning", metric="loss",
                      value=1.0, threshold=0.5, message="an earlier run's")
    cb.findings.append(earlier)
    _train(tmp_path, [cb], max_steps=2)
    assert earlier not in cb.findings
    assert [(f.step, f.rule) for f in cb.findings] == \
        [(f.step, f.rule) for f in cb.run().findings()]


def test_a_train_that_raises_is_recorded_as_stopped_when_closed_in_the_except_block(
        tmp_path):
    """The docs said to call callback.close() when train() raises, and close() recorded the
    run as finished: ``landscape check --require-finished`` passed a crashed run (review)."""
    import transformers

    class Crash(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("dataloader worker died")

    path = tmp_path / "run.h5"
    cb = LandscapeTrainerCallback(str(path), metrics=["loss"])
    try:
        _train(tmp_path, [cb, Crash()], max_steps=6)
    except RuntimeError:
        cb.close()
    with Run.open(path) as run:
        status = run.writer_status()
        assert run.steps("loss").tolist() == [0, 1, 2]  # the rows before the error, kept
    assert status.state == "stopped" and not status.finished
    assert "RuntimeError: dataloader worker died" in status.reason

    again = LandscapeTrainerCallback(str(tmp_path / "retry.h5"), metrics=["loss"])
    try:
        raise ValueError("a first attempt failed")
    except ValueError:  # a retry inside the except block: its train() finished
        _train(tmp_path, [again], max_steps=2)
    with Run.open(tmp_path / "retry.h5") as run:
        assert run.writer_status().finished
