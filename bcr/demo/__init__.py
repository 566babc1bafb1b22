r"""The embedded CPU demo (``make demo`` / ``bcr demo``): BCR end to end on a tiny model, nothing downloaded.

The pipeline, each stage seeded and checkpointed under ``output_dir/<stage>/``:

``sft``     A "verbose reasoner" that also knows a shortcut. Synthetic multi-step arithmetic
            (:mod:`bcr.task.synthetic`) whose worked solutions carry 0-3 redundant ``Check: ... Correct.``
            lines at random, like the metacognitive loops BCR removes. A byte-level BPE tokenizer is
            trained on the task's text and a tiny random-init Llama-architecture model is fine-tuned on
            single- and multi-problem bundles (``sft.n_values``, default N in 1..6, so every N of the
            sweep is one the model has seen): prompt = :func:`bcr.task.prompts.render_prompt`,
            target = :func:`bcr.task.prompts.bundle_solution`, loss on the completion tokens only; first
            ``sft.steps`` on the worked solutions alone, then ``sft.style_steps`` on the mix of
            ``task.styles`` (default: a quarter of the problems answered ``direct``ly, with no work: 13
            tokens instead of 30-63, and a guess for this model). A plain AdamW loop you can read top to
            bottom (:mod:`.sft`); ``sft.packed=true`` trains on the RL step's packed forward with the
            fused LM head instead of padded batches (the same loss). At the default ``seed``, ``task``,
            ``model`` and ``sft`` settings the stage copies the SFT model shipped with bcr instead
            (:mod:`.shipped`: this stage's own output, trained once, 12-13 minutes on two cores);
            ``train_sft=true`` trains it here.
``bcr``     BCR RL with :class:`bcr.rl.trainer.BCRTrainer` from the SFT model: N in ``rl.n_problems``
            (default 1..6) problems per prompt, one shared completion budget
            ``rl.max_completion_length`` (default 100 tokens: the worked solutions of three problems fit,
            not those of four), per-instance accuracy reward, no length term anywhere. The advantage is
            the sequence's (the mean of its instance rewards, ``rl.advantage_mode=sequence``): a verbose
            early section that leaves a later one without budget then pays for it, which per-instance
            advantages never make it do.
``length``  the explicit length-penalty baseline (on by default, ``length_baseline=false`` skips it):
            trained like for like with ``bcr`` (the same N mix, shared budget, steps and ``rl``
            settings), rewarded by accuracy plus ``length.penalty_weight`` x a length term of
            :func:`bcr.rl.rewards.length_penalty_rewards`: the Kimi-1.5 length reward
            (``length.method=kimi``) or ``-length / budget`` (``length.method=linear``).
``eval``    the task-scaling sweep N = 1..6 of every model (:func:`bcr.eval.sweep.evaluate_scaling`) at
            100 tokens per problem (``eval.budget_mode=per_problem``: no point is bound by it, so tokens
            per problem are each model's own choice):
            ``output_dir/eval/`` gets results.jsonl, summary.json/csv, report.md and PNG plots; the
            demo prints a summary (tokens per problem per N, accuracy, the N = 1 "free lunch", the
            task-scaling-law verdict of :func:`.summary.law_check`) and writes it to
            ``output_dir/demo_summary.json``.

Every stage uses the numbered prompt format at N = 1 too (``task.numbered_single``: ``Problem 1:``,
``### Problem 1``, ``Answer 1:``), so the sweep compares the same format at every N; with the plain
N = 1 prompt every N >= 2 pays ~5.5 format tokens per problem more than N = 1.

The default task is deliberately small so that a 0.55M-parameter model learns it on a CPU: two
operations on one-digit numbers (``+``/``-``), so every operand is found next to a unique anchor of
the problem text (with three or more operations ``Add`` repeats, and the tiny model then copies
operands from the wrong step). ``task.styles`` weighs the ways a solution is written (steps,
merged, direct); ``task.styles={steps: 1}`` is the steps-only task of the demo's first version
(with ``rl.n_problems={2: 1, 3: 1, 4: 1} rl.max_completion_length=140 eval.budget_mode=per_prompt
eval.max_completion_length=140``, its settings). The model is a Llama-architecture one (``model.arch=qwen2`` works too: tokenizers
are loaded with ``bcr.models.loading.load_tokenizer``, and the SFT stage checks the round trip).

RL seeds: ``bcr``, ``length`` and ``eval`` run once per seed of ``rl_seeds`` (default ``seed``,
``seed + 1``, ``seed + 2``), all from the one SFT model; the demo's own seed writes ``bcr/``,
``length/``, ``eval/``, any other seed ``s`` ``bcr-s<s>/``, ``length-s<s>/``, ``eval-s<s>/``
(``rl_workers`` processes of one torch thread run them side by side). The closing table, the law
verdict and the free lunch are those of all seeds' sweeps pooled (``output_dir/demo_summary.json``,
``output_dir/pooled/``), printed with the range over the seeds and each RL run's collapse
(:mod:`.seeds`), so a claim rests on more than one RL run.

``from_stage=bcr`` (or ``--from-stage bcr``) reuses the checkpoints of the stages before it and
re-runs that stage and the ones after; ``stop_after=sft`` stops early. Every stage writes
``<stage>/stage.json`` (its wall time and key numbers) when it finishes; a stage is reused only when
that file exists.

The package: :mod:`.config` (``DemoConfig``: its ``rl`` section is a ``BCRConfig``, its ``eval``
section an ``EvalConfig``), :mod:`.task` (problems, tokenizer, tiny model), :mod:`.sft` (the SFT loop), :mod:`.shipped` (the
shipped SFT model), :mod:`.stages` (one function per stage), :mod:`.seeds` (the RL seeds: side by side, pooled), :mod:`.summary` (the
verdicts, the pooling of the seeds' numbers and the closing table), :mod:`.pipeline` (the stage
order and ``bcr demo``).
"""

from __future__ import annotations

from .config import STAGES, DemoConfig, LengthConfig, ModelConfig, SFTConfig, TaskConfig
from .pipeline import cli_main, run_demo
from .stages import STAGE_FILE, length_penalty_reward, read_stage
from .summary import demo_summary, print_summary
from .task import make_task

__all__ = ["STAGES", "STAGE_FILE", "DemoConfig", "LengthConfig", "ModelConfig", "SFTConfig", "TaskConfig",
           "cli_main", "demo_summary", "length_penalty_reward", "make_task", "print_summary", "read_stage",
           "run_demo"]
