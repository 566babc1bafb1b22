"""Does a demo SFT model know the one-operation facts by heart? Teacher-forced direct answers, trained vs held-out.

For every distinct one-operation text of a demo task (the task's digits, operators and wordings), the
prompt of that problem alone (N = 1) is followed by its direct solution (``### Problem 1`` /
``Answer 1: \\boxed{...}``) and the answer counts as recalled when the argmax at each answer token is
that token. Texts are split as the demo splits them (training vs held-out). With ``--train-steps K``
the model is then trained K more AdamW steps on the direct answers of the *training* texts alone
(N = 1, ``--batch`` per step) and measured every 100 steps: whether the held-out recall follows the
training recall tells memory from generalisation (a held-out text is a new fact with one wording; a
new wording of a trained fact with ``task.phrasings`` > 1). Writes ``direct_recall.json`` into the run
directory and prints one line per measurement.

    python -m benchmarks.direct_recall runs/demo task.problem_steps=[1,2] task.phrasings=12 --train-steps 600
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bcr.demo.config import DemoConfig
from bcr.demo.sft import collate
from bcr.demo.task import _held_out, sft_example
from bcr.models.loading import load_tokenizer
from bcr.runtime.dataclass_cli import load_dataclass
from bcr.runtime.io import atomic_write_json
from bcr.task.synthetic import make_arithmetic_problems


def one_operation_texts(cfg: DemoConfig, draws: int = 20_000) -> tuple[list, list]:
    """``(training, held_out)``: every distinct one-operation problem text of the task, written direct."""
    t = cfg.task
    distinct: dict = {}
    for p in make_arithmetic_problems(draws, seed=cfg.seed, steps=(1, 1), digits=tuple(t.problem_digits),
                                      operators=t.operators, styles={"direct": 1}, phrasings=t.phrasings):
        distinct.setdefault(p.problem, p)
    held = {text: _held_out(text, cfg.seed, t.held_out_every) for text in distinct}
    return [p for x, p in distinct.items() if not held[x]], [p for x, p in distinct.items() if held[x]]


def recall(model, tokenizer, problems, cfg: DemoConfig) -> float:
    """The share of ``problems`` whose answer tokens are all the argmax after the direct solution's prefix."""
    model.eval()
    right = 0
    for p in problems:
        ids, n_prompt = sft_example([p], tokenizer, cfg.template)
        answer = tokenizer(p.answer, add_special_tokens=False)["input_ids"]
        # the answer's tokens end right before "}" and EOS
        end = len(ids) - 1 - len(tokenizer("}", add_special_tokens=False)["input_ids"])
        start = end - len(answer)
        if ids[start:end] != answer:
            raise RuntimeError(f"the answer {p.answer!r} does not tokenize alone inside its solution")
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0, start - 1: end - 1].argmax(-1).tolist()
        right += pred == answer
    return right / max(1, len(problems))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output_dir", help="the demo run directory whose sft model is measured")
    ap.add_argument("overrides", nargs="*", help="the demo's key=value settings of that run (task.* ...)")
    ap.add_argument("--train-steps", type=int, default=0, help="then train this many steps on training texts")
    ap.add_argument("--batch", type=int, default=32, help="direct answers per training step")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of those steps (constant)")
    args = ap.parse_args(argv)
    cfg = load_dataclass(DemoConfig, overrides=[f"output_dir={args.output_dir}", "progress=false", *args.overrides])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = Path(args.output_dir) / "sft" / "model"
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    train, held = one_operation_texts(cfg)
    rows = [{"step": 0, "training": recall(model, tokenizer, train, cfg), "held_out": recall(model, tokenizer, held, cfg)}]
    print(f"{len(train)} training and {len(held)} held-out one-operation texts")
    print(f"step 0: training {rows[-1]['training']:.3f}, held-out {rows[-1]['held_out']:.3f}", flush=True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"direct-recall:{cfg.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=cfg.sft.weight_decay)
    for step in range(1, args.train_steps + 1):
        model.train()
        batch = [sft_example([rng.choice(train)], tokenizer, cfg.template) for _ in range(args.batch)]
        input_ids, attention, labels = collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.train_steps:
            rows.append({"step": step, "loss": float(loss), "training": recall(model, tokenizer, train, cfg),
                         "held_out": recall(model, tokenizer, held, cfg)})
            print(f"step {step}: loss {float(loss):.3f}, training {rows[-1]['training']:.3f}, "
                  f"held-out {rows[-1]['held_out']:.3f}", flush=True)
    atomic_write_json(Path(args.output_dir) / "direct_recall.json",
                      {"training_texts": len(train), "held_out_texts": len(held), "batch": args.batch,
                       "lr": args.lr, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
