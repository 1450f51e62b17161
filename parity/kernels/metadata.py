"""The description of one forward step that every attention backend reads.

The model runner flattens the scheduled tokens of all sequences into one ragged batch
(`[num_tokens, ...]`), so prefill chunks and decode tokens travel together. Sequence `i`
owns query rows `query_start_loc[i]:query_start_loc[i+1]`; those rows are its newest tokens,
and it attends to the first `seq_lens[i]` tokens of its KV cache (cached prefix + the new
tokens themselves, causally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], on the compute device
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length after this step's tokens
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]  # host copies, so reference code never syncs the device
    seq_lens_cpu: list[int]
    block_tables: torch.Tensor | None = None  # int32 [num_seqs, max_blocks]; None = no KV cache
    slot_mapping: torch.Tensor | None = None  # int64 [num_tokens]; -1 marks padding tokens
    # Whether some sequence may compute exactly one token (a decode row) beside longer queries: fast attention then
    # runs those rows in its decode kernel. True where unknown (a CUDA graph's metadata), never wrong to say.
    single_token_seqs: bool = True

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    def is_decode(self, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` query rows is a decode step: one query row per sequence, none besides."""
        return self.max_query_len == 1 and num_tokens == self.num_seqs

    @classmethod
    def for_packed_sequences(cls, seq_lens: list[int], device: torch.device | str) -> AttentionMetadata:
        """Causal attention within each of several packed sequences, no KV cache (trainer path)."""
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            max_query_len=max(seq_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=list(seq_lens),
            single_token_seqs=1 in seq_lens,
        )
