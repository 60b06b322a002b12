"""Nested batch structures: mapping tensors, moving them, splitting into micro-batches."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch

from landscape.batches import head, leading_size, map_tensors, split, to_device

Pair = namedtuple("Pair", "x y")


def test_split_slices_the_batch_dimension_and_shares_the_rest():
    batch = {
        "x": torch.arange(10).reshape(5, 2),
        "mask": torch.ones(3),  # another leading length: shared, not sliced
        "scale": torch.tensor(2.0),  # a scalar: shared
        "pair": Pair(torch.arange(5), [torch.arange(5) * 10, "tag"]),
    }
    pieces = split(batch, 2)
    assert [leading_size(p) for p in pieces] == [2, 2, 1]
    assert torch.equal(torch.cat([p["x"] for p in pieces]), batch["x"])
    assert torch.equal(torch.cat([p["pair"].y[0] for p in pieces]), batch["pair"].y[0])
    for p in pieces:
        assert p["mask"] is batch["mask"] and p["scale"] is batch["scale"]
        assert isinstance(p["pair"], Pair) and p["pair"].y[1] == "tag"
    assert len(split(torch.arange(4), 10)) == 1


def test_split_bad_input():
    with pytest.raises(ValueError, match=">= 1"):
        split(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="no batch dimension"):
        split({"a": 1.0, "b": torch.tensor(3.0)}, 2)


def test_map_tensors_keeps_container_types():
    batch = OrderedDict(a=torch.ones(2), b=(torch.zeros(1), 3))
    out = map_tensors(batch, lambda t: t + 1)
    assert isinstance(out, OrderedDict) and isinstance(out["b"], tuple)
    assert torch.equal(out["a"], torch.full((2,), 2.0)) and out["b"][1] == 3
    moved = to_device(Pair(torch.ones(1), "s"), "cpu")
    assert isinstance(moved, Pair) and moved.y == "s"


def test_head_keeps_the_first_samples_and_passes_shared_tensors_through():
    ids = torch.arange(8 * 10).reshape(8, 10)
    mask = torch.zeros(10, 10)  # one (T, T) attention mask shared by the 8 samples
    out = head({"input_ids": ids, "attn_mask": mask, "scale": torch.tensor(2.0), "name": "x"}, 3)
    assert torch.equal(out["input_ids"], ids[:3]) and out["attn_mask"] is mask
    assert out["scale"].item() == 2.0 and out["name"] == "x"
    assert torch.equal(head((ids, ids[:, 0]), 2)[1], ids[:2, 0])


def test_the_batch_size_is_the_first_tensors_even_where_others_outnumber_it():
    """A majority rule was tried: per-sample target dicts (a detection batch) and the
    positions of a one-sample batch outvoted the samples."""
    images = torch.zeros(8, 3, 4, 4)
    labels = [{"size": torch.tensor([4, 4]), "boxes": torch.zeros(2, 4)} for _ in range(8)]
    assert leading_size({"pixel_values": images, "labels": labels}) == 8
    out = head({"pixel_values": images, "labels": labels}, 3)
    assert out["pixel_values"].shape[0] == 3
    ids, mask = torch.zeros(1, 16), torch.zeros(16, 16)
    assert leading_size((ids, torch.zeros(16))) == 1
    assert leading_size({"input_ids": ids, "mask": mask}) == 1
    assert [p["input_ids"].shape[0] for p in split({"input_ids": torch.zeros(5, 2),
                                                     "mask": torch.zeros(2, 2)}, 2)] == [2, 2, 1]


def test_a_forward_takes_the_whole_dict_only_when_no_key_names_its_parameter():
    from torch import nn

    from landscape.batches import takes_whole_batch

    class Whole(nn.Module):
        def forward(self, batch):
            return batch["feats"]

    class Ids(nn.Module):
        def forward(self, input_ids):
            return input_ids

    feats = {"feats": torch.ones(2), "label": torch.zeros(2)}
    assert takes_whole_batch(Whole(), feats)
    assert not takes_whole_batch(Whole(), {"batch": torch.ones(2)})
    # model(**batch) names the key it does not take; the dict itself failed in embedding()
    assert not takes_whole_batch(Ids(), {"input_ids": torch.ones(2), "attention_mask": 1})


def test_per_sample_lists_are_detection_targets_not_pairs_of_inputs():
    """torchvision's (images, targets) lists and a DETR dict's labels list are cut by
    index; a pair of tokenizer encodings inside the inputs stays two inputs (review: it
    was read as 2 samples, and the sentinels recorded NaN), and a DataLoader's list of
    fields stays fields."""
    from torch.utils.data import default_collate

    def enc(b=8):
        return {"input_ids": torch.ones(b, 5, dtype=torch.long),
                "attention_mask": torch.ones(b, 5, dtype=torch.long)}

    pair = ((enc(), enc()), torch.arange(8))
    assert leading_size(pair) == 8
    assert head(pair, 4)[1].shape == (4,) and head(pair, 4)[0][0]["input_ids"].shape == (4, 5)
    assert len(split(pair, 4)) == 2
    collated = default_collate([({"ids": torch.ones(5)}, {"ids": torch.ones(5)}, 1)] * 8)
    assert leading_size((collated[:2], collated[2])) == 8
    assert leading_size([torch.zeros(6, 3), torch.zeros(6)]) == 6  # [inputs, targets]
    images = [torch.zeros(3, 4, 4) for _ in range(5)]
    targets = [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)} for _ in range(5)]
    assert leading_size((images, targets)) == 5
    assert [len(p[0]) for p in split((images, targets), 2)] == [2, 2, 1]
    assert head((images, targets), 2)[0][1].shape == (3, 4, 4)
    assert leading_size((torch.zeros(5, 3, 4, 4), targets)) == 5  # batched images
    assert leading_size((torch.zeros(32, 3), targets[:2])) == 32  # 2 dicts: no samples
    detr = {"pixel_values": torch.zeros(5, 3, 4, 4), "labels": targets}
    pieces = split(detr, 3)
    assert [(p["pixel_values"].shape[0], len(p["labels"])) for p in pieces] == [(3, 3), (2, 2)]
