"""Batches as training loops hand them over, under the default monitor and ``standard``.

From an audit of common shapes: a ``DataLoader``'s ``[x, y]`` list with ``closure=`` (every
curvature metric failed: the closure was called on ``x``, then on ``y``), ``(x, y, w)``
batches (the sentinels failed), and a custom language model's dict batch whose forward
takes no ``labels`` (the sentinels dropped its attention mask without a word, and read
``labels = input_ids`` unshifted).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.metrics import PRESETS, create, preset
from landscape.monitor import Monitor


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))


def _data(n=6, extra=False):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 4, (16,), generator=g)
        out.append([x, y, torch.rand(16, generator=g)] if extra else [x, y])  # as collated
    return out


def _weighted(model, batch):
    x, y, *w = batch
    losses = F.cross_entropy(model(x), y, reduction="none")
    return (losses * w[0]).mean() if w else losses.mean()


def _run(batches, probe, metrics="standard", strict=True, failures=None):
    """The rows of a run under ``_weighted`` as the closure; ``failures`` (a dict) receives
    the metric_failed findings' messages by metric."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    chosen = None if metrics is None else preset(metrics, **dict.fromkeys(PRESETS[metrics],
                                                                         "every(1)"))
    mon = Monitor(model, None, optimizer=opt, closure=_weighted, metrics=chosen, probe=probe,
                  warn=False, strict=strict).start()
    for step, batch in enumerate(batches):
        loss = _weighted(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=batch, loss=loss)
    run = mon.run()
    rows = {m: {f: run.series(m, f)[1] for f in run.fields(m)} for m in run.metrics()}
    if failures is not None:
        failures.update((f.metric, f.message) for f in mon.findings
                        if f.rule == "metric_failed")
    mon.close()
    return rows


def test_a_collated_list_batch_with_a_closure_is_one_batch():
    batches = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        as_list = _run(batches, batches[-1])  # strict: a failing metric raises
        as_tuple = _run([tuple(b) for b in batches], tuple(batches[-1]))
    for metric in ("top_eigenvalues", "sharpness", "hessian_trace"):
        for field, values in as_tuple[metric].items():
            if field != "peak_memory":
                np.testing.assert_allclose(as_list[metric][field], values, rtol=1e-6,
                                           err_msg=f"{metric}/{field}")
    assert np.isfinite(as_list["top_eigenvalues"]["eigenvalues"]).all()


def test_batches_with_sample_weights_and_a_closure():
    """(x, y, w) with a closure: the curvature metrics call the closure on the whole batch;
    the sentinels cannot tell it from (x1, x2, y) (several inputs) and say so, rather than
    read the wrong one silently."""
    batches = _data(extra=True)
    failed: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = _run(batches, batches[-1], strict=False, failures=failed)
    assert np.isfinite(rows["top_eigenvalues"]["eigenvalues"]).all()
    assert np.isfinite(rows["hessian_trace"]["value"]).all()
    assert "(inputs, targets) batches" in failed["sentinels"]


V, T = 40, 12


class MaskedLM(nn.Module):
    """A causal LM whose forward takes ids and a padding mask, no labels (the user's
    closure computes the shifted loss)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, 32)
        self.att = nn.MultiheadAttention(32, 2, batch_first=True)
        self.head = nn.Linear(32, V)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        pad = None if attention_mask is None else attention_mask == 0
        a, _ = self.att(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False)
        return self.head(x + a)


def _lm_batches(n=5):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(1, V, (4, T), generator=g)
        mask = (torch.arange(T) < torch.randint(6, T + 1, (4, 1), generator=g)).long()
        ids = ids * mask
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})  # the Hugging Face collator's
    return out


def _shifted_loss(model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def test_a_dict_batch_for_a_forward_without_labels_keeps_its_mask_and_shifts_its_labels():
    model = MaskedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = _lm_batches()
    probe = {k: v[:2] for k, v in batches[0].items()}
    sub = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
    mon = Monitor(model, None, optimizer=opt, closure=_shifted_loss, probe=probe, warn=False,
                  strict=True).start()
    expected_r, expected_loss, previous = [], [], None
    for step, batch in enumerate(batches):
        loss = _shifted_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=batch, loss=loss)
        model.eval()
        with torch.no_grad():  # the sentinels' reading, by hand: the mask kept, shifted
            z = model(**sub).double()
            expected_loss.append(float(_shifted_loss(model, probe)))
        model.train()
        if previous is not None:
            delta = (z - previous).reshape(-1, V)
            expected_r.append(float((delta.amax(-1) - delta.amin(-1)).max()) / np.pi)
        previous = z
    run = mon.run()
    r = run.series("sentinels", "r_secant")[1]
    probe_loss = run.series("sentinels", "probe_loss")[1]
    mon.close()
    np.testing.assert_allclose(r[1:], expected_r, rtol=1e-6)
    np.testing.assert_allclose(probe_loss, expected_loss, rtol=1e-5)


@pytest.mark.parametrize("keys", [("image", "label"), ("images", "labels"), ("x", "y")])
def test_dict_batches_of_images_and_labels_read_as_the_tuple(keys):
    """Hugging Face datasets give {"image", "label"}: the sentinels called model(**batch)
    and failed at every step ("unexpected keyword argument 'image'")."""
    def run(as_dict):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = _data()
        probe = dict(zip(keys, data[-1])) if as_dict else tuple(data[-1])
        mon = Monitor(model, F.cross_entropy, optimizer=opt, probe=probe, warn=False,
                      strict=True, metrics=preset("standard", **dict.fromkeys(
                          PRESETS["standard"], "every(2)"))).start()
        for step, (x, y) in enumerate(data):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=dict(zip(keys, (x, y))) if as_dict else (x, y), loss=loss)
        run = mon.run()
        rows = {(m, f): run.series(m, f)[1] for m in run.metrics() for f in run.fields(m)
                if f != "peak_memory"}
        mon.close()
        return rows

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keyed, plain = run(True), run(False)
    assert keyed.keys() == plain.keys()
    for key, values in plain.items():
        if np.asarray(values).dtype.kind == "f":
            np.testing.assert_allclose(keyed[key], values, rtol=1e-6, equal_nan=True,
                                       err_msg=str(key))


class TupleOutput(nn.Module):
    """Hugging Face's return_dict=False: (loss, logits) when given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, input_ids, labels=None):
        logits = self.net(input_ids)
        return (logits,) if labels is None else (F.cross_entropy(logits, labels), logits)


def test_the_loss_leading_a_tuple_output_is_the_probe_loss():
    model = TupleOutput()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [{"input_ids": x, "labels": y} for x, y in _data(3)]
    mon = Monitor(model, None, optimizer=opt, closure=lambda m, b: m(**b)[0], probe=data[0],
                  warn=False, strict=True).start()
    expected = []
    for step, batch in enumerate(data):
        loss = model(**batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=batch, loss=loss)
        with torch.no_grad():
            expected.append(float(F.cross_entropy(model.net(data[0]["input_ids"][:4]),
                                                  data[0]["labels"][:4])))
    probe_loss = mon.run().series("sentinels", "probe_loss")[1]
    mon.close()
    np.testing.assert_allclose(probe_loss, expected, rtol=1e-6)


def test_image_label_keys_are_a_pair_only_as_the_whole_dict():
    """A vision-language batch holds images and labels beside its input_ids: it is the
    model's keyword arguments (the sentinels called model(images) and failed)."""
    from landscape.metrics.batch_parts import keyword_batch, split_batch

    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert split_batch({"image": x, "label": y}) == (x, y)
    assert not keyword_batch({"images": x, "labels": y})
    vlm = {"input_ids": y, "attention_mask": y, "images": x, "labels": y}
    assert keyword_batch(vlm)


def test_a_data_factory_of_two_dict_batches_gives_two_batches():
    from landscape.loading import as_batches

    y = torch.zeros(2, dtype=torch.long)
    assert len(as_batches([{"input_ids": y, "labels": y}] * 2)) == 2
    assert len(as_batches(({"input_ids": y}, y))) == 1  # (inputs_dict, targets): one


def test_a_tuple_of_ids_and_equal_targets_is_not_shifted():
    """A copy task's (ids, ids) batch: its targets are the inputs, unshifted; the shift is
    the Hugging Face convention of dict batches only (probe_loss rose while the loss fell)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 20))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 20, (8, 6))

    def loss_fn(out, y):
        return F.cross_entropy(out.reshape(-1, 20), y.reshape(-1))

    mon = Monitor(model, loss_fn, optimizer=opt, probe=(ids, ids), warn=False,
                  strict=True).start()
    expected = []
    for step in range(3):
        loss = loss_fn(model(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(ids, ids), loss=loss)
        sentinels = next(m for m in mon.metrics if m.name == "sentinels")
        sub = ids[:sentinels.subsample]  # (6 positions a sample: 4 samples give 24 rows)
        with torch.no_grad():
            expected.append(float(loss_fn(model(sub), sub)))
    probe_loss = mon.run().series("sentinels", "probe_loss")[1]
    mon.close()
    np.testing.assert_allclose(probe_loss, expected, rtol=1e-5)


class OwnLoss(nn.Module):
    """Returns {"loss", "logits"} given labels, its loss with an auxiliary term; its first
    call in eval mode raises a TypeError of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.fail_once = True

    def forward(self, input_ids, labels=None):
        if not self.training and self.fail_once:
            self.fail_once = False
            raise TypeError("a transient failure of the model's own")
        logits = self.net(input_ids)
        loss = None if labels is None else F.cross_entropy(logits, labels) + 1.0
        return {"loss": loss, "logits": logits}


def test_a_type_error_of_the_models_own_does_not_change_how_the_sentinels_call_it():
    """The first TypeError dropped the labels for the whole run: probe_loss became the
    sentinels' cross-entropy (without the model's auxiliary term), silently."""
    model = OwnLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [{"input_ids": x, "labels": y} for x, y in _data(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = Monitor(model, None, optimizer=opt, closure=lambda m, b: m(**b)["loss"],
                      probe=data[0], warn=False).start()
        expected = []
        for step, batch in enumerate(data):
            loss = model(**batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=batch, loss=loss)
            with torch.no_grad():
                sub = {k: v[:4] for k, v in data[0].items()}
                expected.append(float(F.cross_entropy(model.net(sub["input_ids"]),
                                                      sub["labels"]) + 1.0))
    probe_loss = mon.run().series("sentinels", "probe_loss")[1]
    mon.close()
    assert np.isnan(probe_loss[0])  # the step whose forward failed
    np.testing.assert_allclose(probe_loss[1:], expected[1:], rtol=1e-6)


def test_a_collated_pair_of_one_shape_with_a_closure_is_one_batch():
    """A minGPT-style dataset's (ids[:-1], ids[1:]), collated into [x, y]: both tensors of
    one shape and dtype. Read as two bare batches (a rule tried in this session and
    reverted), the closure got a tensor and every curvature metric failed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def closure(m, b):
        x, y = b
        return F.cross_entropy(m(x).flatten(0, 1), y.flatten())

    ids = torch.randint(0, 10, (4, 7))
    batch = [ids[:, :-1], ids[:, 1:]]
    mon = Monitor(model, None, closure=closure, optimizer=opt, probe=batch,
                  metrics=["top_eigenvalues", "sentinels"], warn=False, strict=True).start()
    for step in range(2):
        loss = closure(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=batch, loss=loss)
    assert np.isfinite(mon.run().series("top_eigenvalues", "eigenvalues")[1]).all()
    mon.close()


class Segmenter(nn.Module):
    """Per-pixel classes: (N, C, H, W) logits (``channels_last``: (N, H, W, C))."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.channels_last = channels_last

    def forward(self, x):
        z = self.net(x)
        return z.permute(0, 2, 3, 1) if self.channels_last else z


def _segmentation_rows(channels_last: bool, ignore: int | None = None):
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4, 6, 6), generator=g))
            for _ in range(5)]
    if ignore is not None:  # unlabelled pixels (a mask's border): 255 in VOC, Cityscapes
        for _, y in data:
            y[:, 0, :] = ignore

    def loss_fn(out, y):  # F.cross_entropy's own layout, either way
        return F.cross_entropy(out.permute(0, 3, 1, 2) if channels_last else out, y,
                               ignore_index=-100 if ignore is None else ignore)

    model = Segmenter(channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    metrics = ["sentinels", "logits", create("taylor_radius", schedule=1)]
    if ignore is not None:  # the 1x1 convolution is the classifier of each pixel
        metrics.append(create("collapse", schedule=1, layer="net.2"))
    mon = Monitor(model, loss_fn, optimizer=opt, metrics=metrics, probe=data[0], warn=False,
                  strict=True).start()
    for step, (x, y) in enumerate(data):
        out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(x, y), loss=loss, outputs=out.detach())
    run = mon.run()
    rows = {(m, f): np.asarray(run.series(m, f)[1]) for m in run.metrics()
            if m in ("sentinels", "logits", "taylor_radius", "collapse")
            for f in run.fields(m)}
    mon.close()
    return rows


def test_a_segmentation_maps_channels_first_logits_are_read_per_pixel():
    """(N, C, H, W) logits of (N, H, W) targets, F.cross_entropy's convention: the
    sentinels, logits and taylor_radius took them for no logits (NaN, the headline warning
    off), where the same model with its classes last was read."""
    first, last = _segmentation_rows(False), _segmentation_rows(True)
    for key, values in last.items():
        np.testing.assert_allclose(first[key], values, rtol=1e-6, equal_nan=True,
                                   err_msg=str(key))
    assert np.isfinite(first[("sentinels", "r_secant")][1:]).all()
    assert np.isfinite(first[("taylor_radius", "r")]).all()
    assert np.isfinite(first[("logits", "max_abs")]).all()


def test_a_segmentation_masks_ignore_index_past_the_classes_is_ignored_as_minus_100_is():
    """Masks with 255 on unlabelled pixels (VOC, Cityscapes) and a loss that ignores it:
    taylor_radius failed at every step ("targets must be in [0, 4)") and collapse on the
    1x1-convolution head failed ("classifier weight must be 2-D"), or blamed the layer for
    the 255 (vision audit). Now the rows equal those of the same masks with -100."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_255, by_minus_100 = _segmentation_rows(False, 255), _segmentation_rows(False, -100)
    assert by_255.keys() == by_minus_100.keys()
    for key, values in by_minus_100.items():
        np.testing.assert_allclose(by_255[key], values, rtol=1e-6, equal_nan=True,
                                   err_msg=str(key))
    assert np.isfinite(by_255[("taylor_radius", "r")]).all()
    assert np.isfinite(by_255[("collapse", "nc1")]).all()
    assert np.isfinite(by_255[("collapse", "nc3")]).all()


class SequenceFirst(nn.Module):
    """An LSTM classifier on (T, N, F) inputs, classes of the last step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[-1])


@pytest.mark.parametrize("case", ["sequence_first", "regression", "multi_hot"])
def test_why_the_sentinels_read_no_logits_is_said_once(case, caplog):
    """A sequence-first batch's subsample cut time steps, and the sentinels' fields were NaN
    at every step without a word; a regression head's or multi-hot labels' NaN is by
    design (info only: a warning there would cry wolf)."""
    import logging

    if case == "sequence_first":
        model, x, y = SequenceFirst(), torch.randn(20, 8, 5), torch.randint(0, 3, (8,))
        loss_fn = F.cross_entropy
    elif case == "regression":
        model, x, y = nn.Linear(5, 1), torch.randn(8, 5), torch.randn(8, 1)
        loss_fn = F.mse_loss
    else:
        model, x, y = nn.Linear(5, 4), torch.randn(8, 5), torch.randint(0, 2, (8, 4))

        def loss_fn(out, t):
            return F.binary_cross_entropy_with_logits(out, t.float())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, loss_fn, optimizer=opt, probe=(x, y), warn=False).start()
    with caplog.at_level(logging.INFO, logger="landscape"):
        for step in range(3):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
    mon.close()
    said = [r for r in caplog.records if "sentinels:" in r.getMessage()]
    assert len(said) == 1 and "r_secant" in said[0].getMessage()
    expected = logging.WARNING if case == "sequence_first" else logging.INFO
    assert said[0].levelno == expected


def test_classes_last_keeps_outputs_whose_last_dimension_is_the_classes():
    from landscape.metrics.batch_parts import classes_last

    t = torch.randint(0, 8, (2, 8))
    sequence = torch.randn(2, 8, 8)  # (B, T, V) with T == V: the last one is the classes
    assert classes_last(sequence, t) is sequence
    last_position = torch.randn(2, 1, 8)  # a nanoGPT-style forward without targets, T == V
    assert classes_last(last_position, t) is last_position
    per_pixel = torch.randn(2, 4, 6, 6)
    assert classes_last(per_pixel, torch.randint(0, 4, (2, 6, 6))).shape == (2, 6, 6, 4)


class Detector(nn.Module):
    """torchvision's detection convention: ``model(images, targets)`` gives a dict of
    losses in train mode, a list of per-image prediction dicts in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.box, self.cls = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, images, targets=None):
        feats = [self.body(im[None]).mean((2, 3))[0] for im in images]
        if self.training:  # means over the images, as torchvision's losses are
            return {"cls": sum(F.cross_entropy(self.cls(f)[None], t["labels"])
                               for f, t in zip(feats, targets)) / len(images),
                    "box": sum(F.smooth_l1_loss(self.box(f)[None], t["boxes"])
                               for f, t in zip(feats, targets)) / len(images)}
        return [{"boxes": self.box(f)[None], "labels": self.cls(f).argmax()[None]}
                for f in feats]


def _detection_batch(g):
    images = [torch.randn(3, 12, 12, generator=g) for _ in range(6)]
    targets = [{"boxes": torch.rand(1, 4, generator=g),
                "labels": torch.randint(0, 3, (1,), generator=g)} for _ in range(6)]
    return images, targets


def test_a_detection_models_predictions_are_no_logits():
    """The sentinels and the logits metric read the first image's boxes as 4-class logits
    (vision audit); now they record NaN and say why, and the update ratio is kept."""
    from landscape.functional import taylor_radius

    model = Detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Monitor(model, None, optimizer=opt, warn=False) as mon:
            for step in range(3):
                images, targets = _detection_batch(g)
                loss = sum(model(images, targets).values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(images, targets), loss=loss)
            run = mon.run()
    assert np.isnan(run.series("sentinels", "max_abs")[1]).all()
    assert np.isnan(run.series("sentinels", "r_secant")[1]).all()
    assert np.isfinite(run.series("sentinels", "update_ratio")[1]).all()
    messages = [f.message for f in mon.findings if f.rule == "metric_failed"]
    assert messages and all("per-sample prediction dicts" in m for m in messages), messages
    step = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="per-sample prediction dicts"):
        taylor_radius(model, (images,), step)


def _detection_loss(model, batch):  # docs/monitor.md's recipe: train-mode losses
    images, targets = batch
    model.train()
    return sum(model(images, targets).values())


def test_a_detection_batch_counts_its_images_and_is_cut_by_image():
    """A list of (3, H, W) images was read as 3 samples (the channels): the loss recorded
    3 samples, probe_size=2 cut every image to 2 channels, and micro-batches split the
    channels (vision audit). Now the images and their target dicts are cut together."""
    from landscape.batches import head, leading_size, split
    from landscape.curvature import Hessian, top_eigenvalues

    g = torch.Generator().manual_seed(0)
    images, targets = _detection_batch(g)
    batch = (images, targets)
    assert leading_size(batch) == 6
    first = head(batch, 2)
    assert len(first[0]) == 2 and first[0][0].shape == (3, 12, 12) and len(first[1]) == 2
    assert [len(p[0]) for p in split(batch, 4)] == [4, 2]
    # a DataLoader's [inputs, targets] list is still two fields, not two samples
    assert leading_size([torch.zeros(5, 3), torch.zeros(5)]) == 5
    model = Detector()
    whole = top_eigenvalues(Hessian(model, None, batch, closure=_detection_loss), k=2,
                            tol=1e-8)
    pieces = top_eigenvalues(Hessian(model, None, batch, closure=_detection_loss,
                                     microbatch_size=2), k=2, tol=1e-8)
    torch.testing.assert_close(pieces.values, whole.values, rtol=1e-4, atol=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    metrics = preset("standard", **dict.fromkeys(PRESETS["standard"], "every(2)"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Monitor(model, None, optimizer=opt, closure=_detection_loss, metrics=metrics,
                     probe_size=2, warn=False) as mon:
            for step in range(3):
                images, targets = _detection_batch(g)
                loss = _detection_loss(model, (images, targets))
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(images, targets), loss=loss)
            run = mon.run()
    assert list(run.series("loss", "samples")[1]) == [6, 6]  # steps 0 and 2
    assert run.config["probe"]["size"] == 2
    assert np.isfinite(run.series("sharpness", "lambda_max")[1]).all()
    assert np.isfinite(run.series("top_eigenvalues", "eigenvalues")[1]).all()
    failed = {f.metric.split("/")[0] for f in mon.findings if f.rule == "metric_failed"}
    assert failed <= {"sentinels", "logits", "taylor_radius", "collapse", "spectral_alignment",
                      "representation"}, failed  # the logit metrics: predictions, no logits


def test_a_probe_of_uncollated_samples_fails_with_a_hint_to_collate_them():
    """probe=[dataset[i] for i in range(8)] made every probe metric fail at every step
    with an IndexError from inside the model and no hint (reviewer of the Hugging Face
    callback). A warning at the start mistook real lists of batches for samples (1-d id
    batches of a recommender, packed token batches); the failure's hint says it instead."""
    import warnings

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    samples = [(torch.randn(6), torch.tensor(1)) for _ in range(4)]
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,)))] * 2
    for probe, hinted in ((samples, True), (batches, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Monitor(model, F.cross_entropy, None, probe=probe,
                            metrics=["top_eigenvalues"]) as mon:
                mon.step(0)
        failed = [f for f in mon.findings if f.rule == "metric_failed"]
        assert len(failed) == hinted
        if hinted:
            assert "probe= is a list, read as 4 batches" in failed[0].hint
            assert "default_collate" in failed[0].hint
