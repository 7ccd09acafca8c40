"""Held-out accuracy of the learner's own copy of the policy, by greedy decoding with
`transformers` (in-run figures and the warm start's stopping rule). The figures a run
reports before and after training come from vLLM: `actors.evaluation.evaluate`."""

from __future__ import annotations

from envs.base import Environment


def greedy_accuracy(
    model: object, tokenizer: object, env: Environment, prompts: list, max_tokens: int
) -> float:
    """Held-out accuracy of a `transformers` model by greedy decoding (single-turn tasks).

    What `relay run` reports during training, on the learner's own copy of the policy,
    without a second vLLM engine; the final figure comes from `evaluate` on vLLM.
    """
    import torch

    from actors.episodes import render_prompt
    from envs.base import Message
    from learner.batching import padding_id

    rows = [render_prompt(tokenizer, p.messages) for p in prompts]
    width = max(len(r) for r in rows)
    # Left padding, so that every row's next token is generated at the same position.
    pad_id = padding_id(tokenizer)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
            max_new_tokens=max_tokens, pad_token_id=pad_id,
        )  # fmt: skip
    model.train(was_training)
    correct = 0
    for prompt, row in zip(prompts, out[:, width:], strict=True):
        reply = tokenizer.decode(row, skip_special_tokens=True)
        correct += env.verify(prompt, [Message("assistant", reply)]).correct
    return correct / len(prompts)
