"""Hugging Face architectures beyond GPT-2 (random init from small configs, no download):
an encoder-decoder's Taylor radius, a vision classifier's neural collapse, and a Trainer
that computes the loss outside the model (label smoothing)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

import landscape as ls
from landscape.store import Run

transformers = pytest.importorskip("transformers", reason="install the 'transformers' extra")

VOCAB = 40


def _t5():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
    )
    return transformers.T5ForConditionalGeneration(config)


def _bart():
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    return transformers.BartForConditionalGeneration(config)


def _seq2seq_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (4, 10), generator=g),
            "labels": torch.randint(3, VOCAB, (4, 6), generator=g)}


def _record(tmp_path, model, batch, metrics, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "run.h5"
    with ls.Monitor(model, None, path, optimizer=opt, metrics=metrics, probe=batch,
                    closure=lambda m, b: m(**b).loss, warn=False) as mon:
        for step in range(steps):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=batch, loss=loss)
    return mon, Run.open(path)


@pytest.mark.parametrize("make", [_t5, _bart], ids=["t5", "bart"])
def test_an_encoder_decoders_taylor_radius_reads_the_decoder_it_trains(tmp_path, make):
    """Without labels T5's decoder had no input ('You must specify exactly one of input_ids
    or inputs_embeds': NaN at every step) and BART's shifted its encoder inputs instead
    (r = 0.284 for 0.321). A labels-only batch now gives the radius of the batch that
    names the decoder inputs the model builds from its labels."""
    batch = _seq2seq_batch()
    mon, run = _record(tmp_path, make(), batch, ["loss", "taylor_radius"])
    assert not [f for f in mon.findings if f.rule == "metric_failed"], mon.findings
    got = run.series("taylor_radius", "r")[1]
    model = make()
    explicit = {**batch, "decoder_input_ids":
                model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])}
    (tmp_path / "explicit").mkdir()
    _, run = _record(tmp_path / "explicit", model, explicit, ["loss", "taylor_radius"])
    want = run.series("taylor_radius", "r")[1]
    assert np.isfinite(got).all() and (got > 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_vision_classifiers_collapse_reads_the_batchs_labels(tmp_path):
    """{pixel_values, labels}: 'this metric needs (inputs, targets) batches; got dict'."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )
    model = transformers.ViTForImageClassification(config)
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randn(12, 3, 8, 8, generator=g),
             "labels": torch.arange(12) % 3}
    mon, run = _record(tmp_path, model, batch, ["loss", ls.metrics.Collapse(
        schedule=ls.every(1))], steps=1)
    assert not [f for f in mon.findings if f.rule == "metric_failed"], mon.findings
    features = []
    hook = model.classifier.register_forward_hook(lambda m, i, o: features.append(i[0]))
    model.eval()
    with torch.no_grad():
        model(pixel_values=batch["pixel_values"])
    hook.remove()
    want = ls.functional.neural_collapse(features[0], batch["labels"],
                                         classifier=model.classifier)
    assert run.series("collapse", "nc1")[1][0] == pytest.approx(float(want.nc1), rel=1e-5)


def _tiny_gpt2_and_tokens():
    """A one-layer GPT-2 and 16 token rows of 8 with labels, for the Trainer (quiet)."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
        eos_token_id=0))
    ids = torch.randint(0, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))
    return model, [{"input_ids": row, "labels": row} for row in ids]


def test_label_smoothing_warns_and_the_missing_loss_raises_no_false_alarm(tmp_path):
    """The Trainer pops the labels and computes a smoothed loss itself, so outputs.loss is
    None: every loss row is NaN, and the non-finite rule read them as a NaN training loss
    (an error that stop_on='error' acted on after one step). The logits capture ran the
    default closure, which needs labels."""
    from landscape.integrations import LandscapeTrainerCallback

    model, data = _tiny_gpt2_and_tokens()
    callback = LandscapeTrainerCallback(tmp_path / "run.h5", metrics=["loss", "logits"],
                                        stop_on="error")
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to=[], save_strategy="no",
        max_steps=3, per_device_train_batch_size=4, disable_tqdm=True, seed=0,
        label_smoothing_factor=0.1,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=data,
                                   callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "outside the model" in str(w.message)]
    assert len(ours) == 1 and "label_smoothing_factor" in str(ours[0].message)
    assert ours[0].filename == __file__  # points at trainer.train(), not at transformers
    assert trainer.state.global_step == 3  # stopped after one step before
    run = Run.open(tmp_path / "run.h5")
    assert [f.rule for f in run.findings() if f.severity != "info"] == []
    assert np.isfinite(run.series("logits", "max_abs")[1]).all()


def test_a_loss_computed_outside_the_model_is_said_once(tmp_path):
    """Trainer(compute_loss_func=...) pops the labels too: the model returns no loss."""
    from landscape.integrations import LandscapeTrainerCallback

    model, data = _tiny_gpt2_and_tokens()

    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].reshape(-1, VOCAB)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))

    callback = LandscapeTrainerCallback(None, metrics=["loss"])
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to=[], save_strategy="no",
        max_steps=3, per_device_train_batch_size=4, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=data,
                                   callbacks=[callback], compute_loss_func=loss_func)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "outside the model" in str(w.message)]
    assert len(ours) == 1 and "record_loss" in str(ours[0].message)
    assert ours[0].filename == __file__
    assert np.isnan(callback.run().series("loss", "value")[1]).all()
    # one warning for one cause (a second said "needs step(..., loss=loss)", which a Trainer
    # user never calls), and the stored finding, all that `landscape check` shows, says it
    assert [str(w.message) for w in caught if "landscape" in str(w.message)] == \
        [str(ours[0].message)]
    assert ["record_loss" in f.message for f in callback.run().findings()] == [True]
