"""Language-model batches from a token file or a text, without writing Python.

Token ids come from a ``.npy`` file (``numpy.load``, no pickles) or a ``.pt`` file holding
one integer tensor (``torch.load(weights_only=True)``), or from a UTF-8 text encoded by the
tokenizer saved with the model. A 1-D stream is cut into consecutive sequences of
``seq_len`` tokens; a 2-D array is taken row by row (each row cut to ``seq_len`` when longer).
Each batch is ``{"input_ids": ids, "labels": ids}``: a causal language model shifts the
labels itself and returns its loss
(https://huggingface.co/docs/transformers/tasks/language_modeling).
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

    Returns:
        The batches, ``{"input_ids": (batch, seq_len), "labels": same}``.

    Raises:
        LandscapeError: neither or both sources, too few tokens, or ids out of range.
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
    else:  # sequences as they come, cut to seq_len when longer
        rows = ids[:, :seq_len]
    if rows.shape[0] == 0:
        raise LandscapeError(f"{source}: {ids.numel()} tokens, fewer than one sequence of "
                             f"--seq-len {seq_len}")
    if rows.min() < 0 or (vocab_size is not None and rows.max() >= vocab_size):
        raise LandscapeError(f"{source}: token ids range over [{int(rows.min())}, "
                             f"{int(rows.max())}], outside the model's vocabulary of "
                             f"{vocab_size}")
    if rows.shape[0] < batch_size * n_batches:
        warnings.warn(f"{source}: {rows.shape[0]} sequences of {rows.shape[1]} tokens, fewer than "
                      f"--batches {n_batches} x --batch-size {batch_size}: the data are "
                      f"{-(-rows.shape[0] // batch_size)} batch(es), the last one "
                      f"{rows.shape[0] % batch_size or batch_size} sequences", stacklevel=2)
    rows = rows[: batch_size * n_batches]
    return [{"input_ids": b.clone(), "labels": b.clone()} for b in rows.split(batch_size)]
