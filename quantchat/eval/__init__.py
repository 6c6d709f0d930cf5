"""Evaluation: perplexity (``perplexity``), KL divergence against a reference (``kl``), multiple-choice
accuracy on C-Eval / MMLU folders (``mc``) and side-by-side answers (``compare``). The ``quantchat eval``
command is in ``quantchat.cli.eval_cmds``; it writes results with ``quantchat.benchmark.results``."""
