"""How sparse one RL step's weight change is, for SmolLM2-135M, in float32 and bfloat16.

The premise of delta weight transfer: at RL learning rates most weights keep their bits
from one step to the next once rounded to bfloat16. This measures it with the learner's
own optimizer (AdamW, `learner.weight_decay`) at `configs/smollm2.yaml`'s learning rate
and at lower ones: a few steps of a policy-gradient-shaped loss (reward-weighted
log-likelihood of sampled continuations, rewards +-1) on the real model, then per step
the share of elements whose float32 and bfloat16 bits changed and the size of the delta
the weight store would send (`weights.wire.FrameEncoder`), against the full float32 frame.

    python -m benchmarks.weight_deltas    # writes benchmarks/results/weight_deltas.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.config import LearnerConfig
from relay.config import load_config
from weights.wire import FrameEncoder

ROOT = Path(__file__).resolve().parents[1]


def changed_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], dtype) -> float:
    changed = total = 0
    for name, tensor in after.items():
        old, new = before[name].to(dtype), tensor.to(dtype)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        changed += int((old.view(bits) != new.view(bits)).sum())
        total += tensor.numel()
    return changed / total


def measure(model_dir: Path, lr: float, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    weight_decay = LearnerConfig().weight_decay
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    prompts = [f"What is {a} + {b}?" for a, b in ((12, 7), (31, 45), (8, 99), (60, 23))]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    encoders = {  # every delta kept, however large, so that its size is measured
        name: FrameEncoder(getattr(torch, name), max_delta_fraction=2.0)
        for name in ("float32", "bfloat16")
    }
    state = {n: p.detach() for n, p in model.named_parameters()}
    for encoder in encoders.values():
        encoder.encode(0, state)
    full_fp32 = encoders["float32"].layout.nbytes
    rows = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            sampled = model.generate(**batch, do_sample=True, max_new_tokens=16, top_k=0)
        rewards = torch.tensor([1.0, -1.0, 1.0, -1.0])
        logits = model(sampled).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, sampled[:, 1:, None]).squeeze(-1)
        completion = logp[:, batch["input_ids"].shape[1] - 1 :]
        loss = -(rewards[:, None] * completion).mean()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after = {n: p.detach() for n, p in model.named_parameters()}
        row = {"step": step}
        for name, encoder in encoders.items():
            frame = encoder.encode(step, after)
            delta = None if frame.delta is None else frame.delta.payload.numel()
            row[name] = {
                "changed_share": round(changed_share(before, after, getattr(torch, name)), 4),
                "delta_bytes": delta,
                "delta_vs_full_fp32": None if delta is None else round(delta / full_fp32, 4),
            }
        rows.append(row)
        print(lr, row, flush=True)
    return {"lr": lr, "full_fp32_bytes": full_fp32, "steps": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/weight_deltas.json")
    args = parser.parse_args()
    configured = load_config(ROOT / "configs" / "smollm2.yaml").learner.lr
    results = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": str(args.model.name),
        "configured_lr": configured,
        "runs": [measure(args.model, lr, args.steps, seed=0) for lr in (configured, 1e-6)],
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
