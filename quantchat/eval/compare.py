"""Side-by-side answers: every prompt of a file answered by each model with the same sampling settings.

Models are loaded one after another (only one is in memory at a time). By default prompts go
through each model's chat template as one user message; ``chat=False`` continues the raw text.
The results are written and printed by ``quantchat eval compare`` (quantchat.cli.eval_cmds).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from quantchat.errors import QuantchatError


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per non-blank line), a JSON list, or JSON lines; items are strings
    or objects with a "prompt" field."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise QuantchatError(f"{path}: cannot read prompts ({e})") from None
    except UnicodeDecodeError as e:
        raise QuantchatError(f"{path}: not UTF-8 text ({e.reason})") from None

    def item(value, where: str) -> str:
        if isinstance(value, dict):
            value = value.get("prompt")
        if not isinstance(value, str) or not value.strip():
            raise QuantchatError(f"{where}: expected a non-empty prompt string or {{\"prompt\": ...}}")
        return value

    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise QuantchatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise QuantchatError(f"{path}: expected a JSON list of prompts")
        prompts = [item(v, f"{path}: item {i + 1}") for i, v in enumerate(data)]
    elif suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompts.append(item(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise QuantchatError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise QuantchatError(f"{path}: no prompts in this file")
    return prompts


def prompt_ids(engine, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    tok = engine.tokenizer
    if not chat:
        return tok.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def answer_all(engine, prompts: Sequence[str], params, chat: bool = True, system: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One answer per prompt: text, token counts, decode tokens/s, time to first token, stop reason."""
    encoded = [prompt_ids(engine, p, chat, system) for p in prompts]
    for ids in encoded:  # fail before spending time on generation
        engine.check_prompt(ids)
    out = []
    for i, ids in enumerate(encoded):
        text, stats = engine.generate_text(ids, params)
        out.append({"text": text.strip(), "prompt_tokens": stats.prompt_tokens,
                    "generated_tokens": stats.generated_tokens, "tokens_per_s": stats.decode_tokens_per_s,
                    "ttft_s": stats.ttft_s, "seconds": stats.ttft_s + stats.decode_s,
                    "finish_reason": stats.finish_reason})
        if progress:
            progress(i + 1, len(prompts))
    return out


def unique_labels(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def summarize(models: list[dict], prompts: Sequence[str], answers: list[list[dict]], params) -> dict:
    """The JSON document: models, sampling, and per prompt each model's answer."""
    rows = []
    for i, p in enumerate(prompts):
        rows.append({"prompt": p, "answers": {m["label"]: answers[j][i] for j, m in enumerate(models)}})
    for j, m in enumerate(models):
        a = answers[j]
        m["mean_tokens_per_s"] = sum(x["tokens_per_s"] for x in a) / len(a)
        m["generated_tokens"] = sum(x["generated_tokens"] for x in a)
    identical = sum(len({answers[j][i]["text"] for j in range(len(models))}) == 1 for i in range(len(prompts)))
    params_dict = asdict(params) if hasattr(params, "__dataclass_fields__") else dict(vars(params))
    return {"models": models, "sampling": params_dict, "prompts": rows, "identical_answers": identical}
