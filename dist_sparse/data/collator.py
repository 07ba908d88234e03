"""Dynamic MLM masking: a fresh mask for every batch, drawn from a generator the caller keys.

Masks are drawn at batch time rather than stored with the data (RoBERTa's dynamic masking),
and every random number comes from the `torch.Generator` passed in, so a trainer that seeds
it from (seed, step, rank) gets the same batch after a resume. Given one generator per row, each
example's mask depends on its own generator only: a trainer that keys them by the example's
place in the optimizer step masks a step's samples alike however the step is split into ranks
and micro batches (a resume at another data-parallel size continues the same data).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # labels of unselected positions; torch's cross_entropy default


class MlmCollator:
    """Pads examples to `seq_len` and applies BERT's 80/10/10 masking.

    Each non-special, non-pad position is selected with probability `mlm_probability`;
    a selected token becomes [MASK] (80%), a random non-special token (10%) or stays (10%).
    Labels hold the original id at selected positions and -100 elsewhere; ``mlm_positions``
    their flat indices (see :func:`mlm_positions`), which the model's MLM head reads instead of
    searching the labels on the device.
    """

    def __init__(
        self,
        pad_id: int,
        mask_id: int,
        vocab_size: int,
        special_ids: Iterable[int],
        seq_len: int,
        mlm_probability: float = 0.15,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        special = sorted(set(special_ids) | {pad_id, mask_id})
        if not all(0 <= i < vocab_size for i in special):
            raise ValueError(f"special ids {special} must lie in [0, vocab_size={vocab_size})")
        self.pad_id = pad_id
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.mlm_probability = mlm_probability
        self.special_ids = torch.tensor(special, dtype=torch.int64)
        is_special = torch.zeros(vocab_size, dtype=torch.bool)
        is_special[self.special_ids] = True
        # Random replacements are drawn from ordinary tokens only: a random [CLS]/[SEP]
        # in the middle of a sequence would teach the model nothing useful.
        self.replacement_ids = torch.nonzero(~is_special).flatten()
        if len(self.replacement_ids) == 0:
            raise ValueError("the vocabulary has no non-special tokens to draw replacements from")

    def pad(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """input_ids/token_type_ids/attention_mask [batch, seq_len], int64, right-padded."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        batch = len(examples)
        input_ids = np.full((batch, self.seq_len), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((batch, self.seq_len), dtype=np.int64)
        attention_mask = np.zeros((batch, self.seq_len), dtype=np.int64)
        for row, example in enumerate(examples):
            ids = np.asarray(example["input_ids"], dtype=np.int64)
            if len(ids) > self.seq_len:
                raise ValueError(
                    f"example of {len(ids)} tokens is longer than seq_len={self.seq_len}; "
                    f"prepare the data with this --seq-len"
                )
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            if "token_type_ids" in example:
                token_type_ids[row, : len(ids)] = np.asarray(example["token_type_ids"])
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
        }
        if "next_sentence_label" in examples[0]:
            labels = [int(example["next_sentence_label"]) for example in examples]
            out["next_sentence_label"] = torch.tensor(labels, dtype=torch.int64)
        return out

    def mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input_ids, labels). Draws a fixed amount of randomness per call (per row with
        one generator per row), in a fixed order, so equal generator states give equal results."""
        shape = input_ids.shape
        candidates = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        if isinstance(generator, torch.Generator):
            draw_select, draw_action, draw_token = self._draw(shape, generator)
        else:
            if len(generator) != shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} rows")
            rows = [self._draw(shape[1:], g) for g in generator]
            draw_select, draw_action, draw_token = (torch.stack(d) for d in zip(*rows))
        selected = candidates & (draw_select < self.mlm_probability)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        to_mask = selected & (draw_action < 0.8)
        to_random = selected & (draw_action >= 0.8) & (draw_action < 0.9)
        masked = torch.where(to_mask, torch.full_like(input_ids, self.mask_id), input_ids)
        masked = torch.where(to_random, self.replacement_ids[draw_token], masked)
        return masked, labels

    def _draw(self, shape, generator: torch.Generator):
        return (torch.rand(shape, generator=generator), torch.rand(shape, generator=generator),
                torch.randint(len(self.replacement_ids), shape, generator=generator))

    def __call__(
        self, examples: Sequence[dict], generator: torch.Generator | Sequence[torch.Generator]
    ) -> dict[str, torch.Tensor]:
        batch = self.pad(examples)
        batch["input_ids"], batch["labels"] = self.mask(
            batch["input_ids"], batch["attention_mask"], generator
        )
        batch["mlm_positions"] = mlm_positions(batch["labels"])
        return batch


def mlm_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat int64 indices into batch * seq of the positions whose label is not -100, ascending
    (row-major, the order of ``x[labels != -100]``).

    Found here, on the host where the masks are drawn, so that the model's MLM head can gather
    the masked rows on the device without a value-dependent operation (a ``nonzero`` or boolean
    index there would make the host wait for the device). Variable length: one micro batch's count.
    """
    if labels.device.type != "cpu":
        raise ValueError("mlm_positions are found on the host, before the batch moves to the device")
    return torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).reshape(-1)
