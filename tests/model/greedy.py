"""How far a greedy answer is from a tie: what makes a token-identical claim hold on any CPU.

Two computations of the same logits (a row batched or alone, packed or plain weights, another
CPU's kernels) differ by float32 rounding. Greedy decoding keeps the same tokens as long as every
step's winning logit leads the runner-up by more than that difference. Tests that claim equal
tokens from two such computations check this lead as well, so that a fixture too flat to decide
fails here, by name, instead of flipping a token on some user's CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.salmonn import Salmonn

#: The least lead of the winning logit a token-identical claim accepts. The same logits computed
#: two ways differ here by at most 2.2e-7 (a row batched or alone, packed or plain weights, on
#: the AVX-512, AVX2 and default kernels; logits below 0.5 in size, so about 4 float32 ulps), and
#: a dot product of K terms in any summation order by at most K u times its size (u = 6e-8; the
#: widest here is K = 256, 7.7e-6 at 0.5): 1e-4 is 450 times the measured gap and 13 times that
#: worst case of a single product.
MIN_GREEDY_MARGIN = 1e-4


def greedy_margins(
    model: Salmonn,
    audio_row: torch.Tensor,
    instruction: str,
    token_ids: Sequence[int],
    *,
    ended_at_eos: bool,
    lora_scale: float | None = None,
) -> list[float]:
    """Teacher-forced leads of the greedy choice at every step of one answer, the row alone.

    Args:
        model: the model that produced the answer.
        audio_row: (n_tokens, llm_hidden) audio embeddings of the row (`AudioTokens.row`).
        instruction: the row's instruction.
        token_ids: the answer's tokens, without the EOS.
        ended_at_eos: whether the answer stopped at EOS (then that step counts too) rather than
            at the token budget.
        lora_scale: the LoRA scale the answer was generated with (None: alpha / r).

    Returns:
        Per step, the winning logit minus the runner-up's, both from one full forward pass.

    Raises:
        AssertionError: a step's argmax is not the answer's token (the answer was not greedy,
            or two computations already disagree).
    """
    eos = model.tokenizer.eos_token_id
    targets = [*token_ids, eos] if ended_at_eos else list(token_ids)
    inputs = model.build_inputs([audio_row], [instruction])
    embed = model.llama_model.get_input_embeddings()
    fed = torch.tensor(targets[:-1], dtype=torch.long)
    embeds = torch.cat([inputs["inputs_embeds"][0], embed(fed).to(inputs["inputs_embeds"].dtype)])
    prompt_length = inputs["inputs_embeds"].shape[1]
    with torch.no_grad(), model.lora_scale(lora_scale):
        logits = model.llama_model(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
        ).logits[0]
    steps = logits[prompt_length - 1 : prompt_length - 1 + len(targets)]
    top = steps.topk(2, dim=-1)
    chosen = top.indices[:, 0].tolist()
    if ended_at_eos and chosen[-1] in model._eos_ids():
        chosen[-1] = eos  # a chat model may end on its own end-of-turn token
    assert chosen == targets, f"teacher-forced argmax {chosen} is not the answer {targets}"
    return (top.values[:, 0] - top.values[:, 1]).tolist()


def assert_decisive(
    model: Salmonn,
    audio_rows: Sequence[torch.Tensor],
    instructions: Sequence[str],
    answers: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    lora_scale: float | None = None,
) -> float:
    """Check that every step of every answer leads by `MIN_GREEDY_MARGIN`; return the least lead.

    An answer shorter than ``max_new_tokens`` ended at EOS, and that decision is checked too.
    """
    least = float("inf")
    for row, instruction, ids in zip(audio_rows, instructions, answers, strict=True):
        margins = greedy_margins(
            model,
            row,
            instruction,
            ids,
            ended_at_eos=len(ids) < max_new_tokens,
            lora_scale=lora_scale,
        )
        least = min(least, *margins)
    assert least > MIN_GREEDY_MARGIN, (
        f"a greedy step leads by only {least:.2e} (< {MIN_GREEDY_MARGIN:.0e}): the fixture is "
        "too close to a tie for its tokens to be the same on every CPU; sharpen its weights"
    )
    return least
