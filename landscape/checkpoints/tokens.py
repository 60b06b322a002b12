"""Language-model batches from a token file or a text, without writing Python.

Token ids come from a ``.npy`` file (``numpy.load``, no pickles) or a ``.pt`` file holding
one integer tensor (``torch.load(weights_only=True)``), or from a UTF-8 text encoded by the
tokenizer saved with the model. A 1-D stream is cut into consecutive sequences of
``seq_len`` tokens; a 2-D array is taken row by row (each row cut to ``seq_len`` when longer).
Each batch is ``{"input_ids": ids, "labels": ids}``: a causal language model shifts the
labels itself and returns its loss
(https://huggingface.co/docs/transformers/tasks/language_modeling). Rows padded to one
length name their padding id (``pad_id``, ``--pad-id``): its positions get
``attention_mask`` 0 and the label ``-100``, which the loss leaves out, as transformers'
``DataCollatorForLanguageModeling`` marks them, and left padding is moved to the end of
its row (positions then count from the first token, as in training). Rows that look
padded (many end, or begin, in a run of one id) while no ``pad_id`` is given are warned
about: their padding would be read as text.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landscape._checks import integer_dtype
from landscape._errors import LandscapeError, first_line

__all__ = ["read_tokens", "token_batches"]


def read_tokens(path: Path) -> torch.Tensor:
    """The integer token ids of a ``.npy`` or ``.pt`` file (1-D or 2-D).

    Args:
        path: the file.

    Returns:
        An int64 tensor.

    Raises:
        LandscapeError: a missing or unreadable file, or one that does not hold integer ids.
    """
    path = Path(path)
    if not path.is_file():
        raise LandscapeError(f"{path}: no such token file")
    try:
        if path.suffix == ".npy":
            ids = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix in (".pt", ".pth"):
            ids = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise LandscapeError(f"{path}: token ids must be a .npy or .pt file")
    except LandscapeError:
        raise
    except Exception as err:
        first = first_line(err)
        raise LandscapeError(f"{path}: not a readable token file ({first})") from err
    if (not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2)
            or not integer_dtype(ids.dtype)):
        raise LandscapeError(f"{path}: expected a 1-D or 2-D array of integer token ids")
    return ids.long()


def token_batches(
    *,
    tokens: str | Path | None = None,
    text: str | Path | None = None,
    tokenizer: Any = None,
    seq_len: int = 128,
    batch_size: int = 8,
    n_batches: int = 1,
    vocab_size: int | None = None,
    pad_id: int | None = None,
    max_positions: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` batches of ``batch_size`` sequences of ``seq_len`` tokens.

    Args:
        tokens: a ``.npy``/``.pt`` file of token ids (or give ``text``).
        text: a UTF-8 text file, encoded with ``tokenizer``.
        tokenizer: a Hugging Face tokenizer (for ``text``).
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        n_batches: how many batches (fewer when the data run out, at least one).
        vocab_size: the model's vocabulary size; larger ids are an error.
        pad_id: the id that pads the rows: its positions are left out of the loss and
            masked from attention (every position holding it).
        max_positions: the model's position limit; longer sequences are an error.

    Returns:
        The batches, ``{"input_ids": (batch, seq_len), "labels": same}``; with ``pad_id``
        also ``attention_mask``, and the padding's labels ``-100``.

    Raises:
        LandscapeError: neither or both sources, too few tokens, rows of one token, ids
            out of range, sequences longer than ``max_positions``, a ``pad_id`` for a
            stream, or one that leaves no row with two real tokens.
    """
    if (tokens is None) == (text is None):
        raise LandscapeError("give the data as --tokens FILE or --text FILE (one of them)")
    if tokens is not None:
        ids, source = read_tokens(Path(tokens)), str(tokens)
    else:
        path = Path(text)  # type: ignore[arg-type]
        if not path.is_file():
            raise LandscapeError(f"{path}: no such text file")
        if tokenizer is None:
            raise LandscapeError("--text needs the tokenizer saved with the model "
                                 "(a Hugging Face model folder); give --tokens instead")
        try:
            text_read = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise LandscapeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                                 "give a text file, or token ids as --tokens") from None
        encoded = tokenizer(text_read)["input_ids"]
        ids, source = torch.as_tensor(encoded, dtype=torch.long), str(path)
    if ids.dim() == 1:
        n = ids.numel() // seq_len
        rows = ids[: n * seq_len].reshape(n, seq_len)
    else:  # sequences as they come, cut to seq_len when longer (the padding moved first)
        if ids.shape[1] < 2:
            raise LandscapeError(f"{source}: rows of {ids.shape[1]} token(s): a language "
                                 "model needs two to predict one")
        rows = (ids if pad_id is None else _padding_last(ids, pad_id))[:, :seq_len]
    if rows.shape[0] == 0:
        raise LandscapeError(f"{source}: {ids.numel()} tokens, fewer than one sequence of "
                             f"--seq-len {seq_len}")
    if rows.min() < 0 or (vocab_size is not None and rows.max() >= vocab_size):
        raise LandscapeError(f"{source}: token ids range over [{int(rows.min())}, "
                             f"{int(rows.max())}], outside the model's vocabulary of "
                             f"{vocab_size}")
    if max_positions is not None and rows.shape[1] > max_positions:
        raise LandscapeError(f"--seq-len {rows.shape[1]} is longer than the model's "
                             f"{max_positions} positions (its config's position limit): pass "
                             f"--seq-len {max_positions} or less")
    if pad_id is not None and ids.dim() == 1:
        raise LandscapeError(f"--pad-id: {source} is a stream of tokens, which has no padding "
                             "(the id would be masked wherever it stands); it is for rows "
                             "padded to one length (a 2-D array)")
    if pad_id is not None and ids.dim() == 2:
        rows = _with_a_target(rows, pad_id, source)
    if pad_id is None and ids.dim() == 2:
        _warn_padded_look(rows, source)
    if rows.shape[0] < batch_size * n_batches:
        warnings.warn(f"{source}: {rows.shape[0]} sequences of {rows.shape[1]} tokens, fewer than "
                      f"--batches {n_batches} x --batch-size {batch_size}: the data are "
                      f"{-(-rows.shape[0] // batch_size)} batch(es), the last one "
                      f"{rows.shape[0] % batch_size or batch_size} sequences", stacklevel=2)
    rows = rows[: batch_size * n_batches]
    if pad_id is None:
        return [{"input_ids": b.clone(), "labels": b.clone()} for b in rows.split(batch_size)]
    return [{"input_ids": b.clone(), "attention_mask": (b != pad_id).long(),
             "labels": b.masked_fill(b == pad_id, -100)} for b in rows.split(batch_size)]


def _with_a_target(rows: torch.Tensor, pad_id: int, source: str) -> torch.Tensor:
    """The rows holding at least two real tokens (one next-token target), the others said.

    A row of padding alone, or of one token, gives a causal LM nothing to predict: a batch
    of such rows has a loss of 0/0.

    Raises:
        LandscapeError: no row has two real tokens.
    """
    kept = (rows != pad_id).sum(1) >= 2
    if not bool(kept.any()):
        raise LandscapeError(f"{source}: no row holds two tokens besides the padding id "
                             f"{pad_id} (--pad-id): nothing to predict")
    if not bool(kept.all()):
        warnings.warn(f"{source}: {int((~kept).sum())} of {rows.shape[0]} rows hold fewer "
                      f"than two tokens besides the padding id {pad_id}: left out (nothing to "
                      "predict)", stacklevel=3)
    return rows[kept]


def _padding_last(rows: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Left-padded rows with their leading padding moved to their end (right padding).

    A model with absolute positions reads a left-padded row's tokens at shifted
    positions (its loss was 4.404 where the same rows right-padded give 4.360, the token
    mean of the rows unpadded); moved, every row's first token is at position 0, as in
    training. Right-padded rows are returned as they are.
    """
    leading = (rows == pad_id).long().cumprod(1).sum(1)
    if not bool(leading.any()):
        return rows
    index = (torch.arange(rows.shape[1]) + leading[:, None]) % rows.shape[1]
    return rows.gather(1, index)


PADDED_LOOK = 0.25
"""The share of rows ending (or beginning) in a run of one id, at least two long, above
which :func:`token_batches` says the rows look padded (when most of that id's occurrences
lie in those runs: a space that ends many lines of code is text)."""


def _edge_run(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: its last id, and how many positions at its end hold it."""
    last = rows[:, -1:]
    same = (rows == last).flip(1).long()
    return last.squeeze(1), same.cumprod(1).sum(1)


def _warn_padded_look(rows: torch.Tensor, source: str) -> None:
    """Warn when rows look padded to one length: many end (or begin) in a run of one id.

    Right padding (most collators) ends the shorter rows in a run of the padding id, left
    padding begins them with one; an id that stands mostly elsewhere is text (spaces at
    the end of lines of code). Taken as text, padding enters the loss and the attention;
    ``--pad-id`` leaves it out.
    """
    if rows.shape[1] < 2:
        return
    for side, view in (("end", rows), ("begin", rows.flip(1))):
        last, run = _edge_run(view)
        padded = run >= 2
        if padded.sum() < max(2, PADDED_LOOK * rows.shape[0]):
            continue
        values, counts = last[padded].unique(return_counts=True)
        pad = int(values[counts.argmax()])
        held = int((last == pad).logical_and(padded).sum())
        if held < max(2, PADDED_LOOK * rows.shape[0]):
            continue
        tokens = int(run[(last == pad) & padded].sum())
        if tokens < 0.5 * int((rows == pad).sum()):  # the id is mostly text
            continue
        warnings.warn(
            f"{source}: {held} of {rows.shape[0]} rows {side} in a run of the id {pad} "
            f"({tokens} of {rows.numel()} tokens): if that is padding, pass --pad-id {pad} "
            "(its positions are then left out of the loss and masked from attention); as "
            "given, they are read as text", stacklevel=3)
        return
