"""Evaluation: perplexity (``perplexity``), KL divergence against a reference (``kl``), multiple-choice
accuracy on C-Eval / MMLU folders (``mc``), side-by-side answers (``compare``), and the shared result
writing (``report``: JSON, markdown, plots). The ``quantchat eval`` command is in ``quantchat.cli.eval_cmds``."""
