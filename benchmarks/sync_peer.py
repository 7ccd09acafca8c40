"""The synchronous peer: GRPO on plain Hugging Face `generate` and a plain PyTorch step.

What a user would write without Relay (TRL's GRPOTrainer does the same per step):
sample `batch_groups` training prompts, generate `group_size` completions each with
`model.generate` (temperature 1), score them with the environment's verifier,
group-relative advantages, one AdamW step on the on-policy policy gradient, repeat.
Same task, model, batch, learning rate and schedule as the demo, and both cores (torch's
threads). It writes what `relay run` writes for benchmarks/learning.py to read:
metrics.jsonl (step time split into generation and training), timed HF snapshots
in snapshots/, and results.json.

    python benchmarks/sync_peer.py --run-dir runs/peer --budget-s 200
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from learning import prompt_draws, snapshot_writer


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.episodes import render_prompt
    from envs.base import Message
    from envs.registry import make_env
    from learner.advantages import grpo
    from relay.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--model", default="models/tiny-warm")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=200.0)
    parser.add_argument("--snapshot-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_config(args.config, [f"model.path={args.model}", f"seed={args.seed}"])
    learner, sampling = config.learner, config.actors.sampling
    groups, group_size = learner.batch_groups, config.actors.group_size

    torch.manual_seed(args.seed)
    env = make_env(config.env)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learner.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / learner.steps)))
    )
    snapshot = snapshot_writer(args.run_dir, model, tokenizer)
    metrics_file = (args.run_dir / "metrics.jsonl").open("w")

    prompts = prompt_draws(env, groups, args.seed)
    pad = tokenizer.pad_token_id
    started = time.monotonic()
    snapshot(0)
    step = 0
    while step < learner.steps and time.monotonic() - started < args.budget_s:
        t0 = time.monotonic()
        batch = next(prompts)
        rows = [render_prompt(tokenizer, p.messages) for p in batch]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attention = (input_ids != pad).long()
        model.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, do_sample=True,
                temperature=sampling.temperature, top_k=0, top_p=1.0,
                max_new_tokens=sampling.max_tokens, num_return_sequences=group_size,
                pad_token_id=pad,
            )  # fmt: skip
        completions = out[:, width:]
        rewards = torch.tensor([
            env.verify(batch[i // group_size],
                       [Message("assistant", tokenizer.decode(c, skip_special_tokens=True))]).reward
            for i, c in enumerate(completions)
        ]).view(groups, group_size)  # fmt: skip
        advantages = grpo(rewards).view(-1)
        t1 = time.monotonic()

        # Loss tokens: each completion up to and including its end-of-turn token.
        ended = (completions == tokenizer.eos_token_id) | (completions == pad)
        after_end = torch.cumsum(ended.long(), dim=1) - ended.long() > 0
        mask = ~after_end
        model.train()
        full_attention = torch.cat([attention.repeat_interleave(group_size, 0), mask.long()], 1)
        logits = model(input_ids=out, attention_mask=full_attention).logits[:, width - 1 : -1]
        logp = torch.log_softmax(logits.float() / sampling.temperature, -1)
        token_logp = logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1)
        loss = -(advantages[:, None] * token_logp * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), learner.max_grad_norm)
        optimizer.step()
        schedule.step()
        step += 1
        t2 = time.monotonic()
        metrics_file.write(json.dumps({
            "step": step, "time": time.time(), "learner/wait_s": t1 - t0,
            "learner/step_s": t2 - t1, "learner/publish_block_s": 0.0,
            "learner/reward_mean": rewards.mean().item(),
        }) + "\n")  # fmt: skip
        if step % args.snapshot_every == 0:
            snapshot(step)
    if step % args.snapshot_every:
        snapshot(step)
    metrics_file.close()
    results = {"steps": step, "after": {"accuracy": None}, "actors": {}}
    (args.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
