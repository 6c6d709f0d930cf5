"""``quantchat bench structured``: what a JSON Schema constraint costs at decode, and its compile time.

In process, on the engine's own loop (``Scheduler``, the server's): for each number of concurrent
sequences (clients), the same prompts decode ``--tokens`` tokens free and under a typical schema
(alternating, ``--rounds`` times each; the median round counts). Decode tokens/s come from the loop's
own step timer at the full batch (model step, mask, sampling and events), so prefill and the batch
filling up do not blur them. The schema admits far more tokens than are generated (``minItems``), so
every constrained sequence runs its full length, as the free ones do (``ignore_eos``). The loop also
times its constraint work (masks, matcher updates): its share of decode time is the cost measured
inside the same steps, which a noisy machine blurs less than two separate runs. Also: building
the token table, compiling the schema the first time and again (cached), and the mask per token.
Writes result.json (``Results`` of kind bench-structured) and result.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from quantchat.benchmark.results import Results, markdown_table, prepare_out_dir, write_results
from quantchat.errors import QuantchatError

# a typical extraction schema: objects with strings, an enum, bounded numbers, a nested array
ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["person", "place", "organization", "thing"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
    },
    "required": ["name", "kind", "age", "score", "tags"],
    "additionalProperties": False,
}
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": ITEM, "minItems": 64}},
          "required": ["items"], "additionalProperties": False}
PROMPT = "List the people, places and organizations in this text as JSON: {}"
TEXTS = ["Marie Curie worked in Paris at the Sorbonne.", "Alan Turing was born in London in 1912.",
         "The United Nations met in Geneva last spring.", "Ada Lovelace wrote about the Analytical Engine.",
         "NASA launched a probe from Florida.", "Tokyo hosted the Olympic Games in 2021.",
         "Leonardo painted in Florence and Milan.", "The Red Cross opened an office in Nairobi."]


def compile_times(engine: Any, rounds: int = 5) -> dict[str, float]:
    """Seconds: the token table (once per tokenizer), the schema's first compile, a cached compile, and
    the mask per token along a valid answer (median)."""
    import json

    from quantchat.sampling.constraints import Constraint, ConstraintCompiler

    t0 = time.perf_counter()
    comp = ConstraintCompiler(engine.tokenizer, engine.model.config.vocab_size)
    t1 = time.perf_counter()
    c = Constraint.json_schema(SCHEMA)
    comp.matcher(c)
    t2 = time.perf_counter()
    cached = []
    for _ in range(rounds):
        a = time.perf_counter()
        comp.matcher(Constraint.json_schema(SCHEMA))
        cached.append(time.perf_counter() - a)
    one = {"name": "Marie Curie", "kind": "person", "age": 66, "score": 0.9, "tags": ["physics", "chemistry"]}
    text = json.dumps({"items": [one] * 8})[:-2]  # 8 of the 64 items the schema asks for: still open
    m = comp.matcher(c)
    per_token = []
    for tok in engine.tokenizer.encode(text, add_bos=False):
        a = time.perf_counter()
        m.allowed()
        per_token.append(time.perf_counter() - a)
        if not m.advance(tok):
            raise QuantchatError(f"the benchmark's own answer does not match its schema: {m.error}")
    return {"token_table_s": t1 - t0, "schema_first_compile_s": t2 - t1,
            "schema_cached_compile_s": statistics.median(cached),
            "mask_per_token_s": statistics.median(per_token), "mask_per_token_max_s": max(per_token)}


def decode_rate(engine: Any, clients: int, tokens: int, constrained: bool, seed: int) -> tuple[float, float]:
    """Decode tokens/s of ``clients`` sequences decoding together (the loop's step timer at full batch),
    and the share of all decode time that went to the constraint (masks and matcher updates)."""
    from quantchat.engine.scheduler import Scheduler
    from quantchat.engine.sequence import Sequence
    from quantchat.sampling.constraints import Constraint
    from quantchat.sampling.sampling import SamplingParams

    tok = engine.tokenizer
    sch = Scheduler(engine, max_batch=engine.max_batch)
    constraint = Constraint.json_schema(SCHEMA) if constrained else None
    seqs = []
    for i in range(clients):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT.format(TEXTS[i % len(TEXTS)])}]))
        seqs.append(Sequence(ids, SamplingParams(temperature=0.7, seed=seed + i, max_new_tokens=tokens,
                                                 ignore_eos=True, constraint=constraint), sink=lambda ev: None))
    for _ in engine.run(seqs):
        pass
    short = [s for s in seqs if len(s.generated) < tokens]
    if short:
        raise QuantchatError(f"a sequence ended early ({short[0].end}): the rate would mix batch sizes")
    steps, seconds = sch.decode_time.get(clients, (0, 0.0))
    if not steps:
        raise QuantchatError(f"no decode step ran with {clients} sequences")
    total = sum(s for _, s in sch.decode_time.values())
    return clients * steps / seconds, sch.constraint_seconds / total


def run_bench_structured(a: argparse.Namespace, status: Callable[[str], None]) -> int:
    from quantchat.engine.build import load_engine

    if not a.clients or min(a.clients) < 1 or a.tokens < 2 or a.rounds < 1:
        raise QuantchatError("--clients, --tokens and --rounds must be positive (--tokens at least 2)")
    out = prepare_out_dir(a.out, "bench-structured")
    loaded = load_engine(a.model, device="cpu", max_batch=max(a.clients), max_seq_len=a.max_seq_len, quant=a.quant,
                         group_size=a.group_size)
    engine = loaded.engine
    status(f"{loaded.source.name}: fused decode {'on' if engine.fused is not None else 'off'}, "
           f"vocabulary {engine.model.config.vocab_size}")
    times = compile_times(engine)
    engine.warmup()
    rows = []
    for clients in a.clients:
        free, constrained, shares = [], [], []
        for r in range(a.rounds):  # alternating, so drifts of a shared machine hit both alike
            free.append(decode_rate(engine, clients, a.tokens, False, seed=r)[0])
            rate, share = decode_rate(engine, clients, a.tokens, True, seed=r)
            constrained.append(rate)
            shares.append(share)
            status(f"{clients} clients, round {r + 1}: free {free[-1]:.1f} tok/s, schema {rate:.1f} tok/s "
                   f"(constraint {100 * share:.1f} % of decode time)")
        f, c = statistics.median(free), statistics.median(constrained)
        rows.append({"clients": clients, "free_tokens_per_s": f, "schema_tokens_per_s": c,
                     "cost_percent": 100 * (1 - c / f), "best_free_tokens_per_s": max(free),
                     "best_schema_tokens_per_s": max(constrained),
                     "best_cost_percent": 100 * (1 - max(constrained) / max(free)),
                     "constraint_share_percent": 100 * statistics.median(shares),
                     "free_rounds": free, "schema_rounds": constrained, "constraint_share_rounds": shares})
    table = markdown_table(
        ["clients", "free tok/s", "JSON schema tok/s", "cost (medians)", "cost (best rounds)",
         "constraint share of decode time", "rounds (free / schema)"],
        [[r["clients"], f"{r['free_tokens_per_s']:.1f}", f"{r['schema_tokens_per_s']:.1f}",
          f"{r['cost_percent']:.1f} %", f"{r['best_cost_percent']:.1f} %", f"{r['constraint_share_percent']:.1f} %",
          " ".join(f"{x:.0f}/{y:.0f}" for x, y in zip(r["free_rounds"], r["schema_rounds"]))]
         for r in rows])
    timing = (f"\ntoken table {times['token_table_s'] * 1000:.0f} ms (once per tokenizer); schema compile "
              f"{times['schema_first_compile_s'] * 1000:.2f} ms first, {times['schema_cached_compile_s'] * 1000:.3f} ms "
              f"cached; mask {times['mask_per_token_s'] * 1e6:.0f} us per token (max "
              f"{times['mask_per_token_max_s'] * 1e6:.0f} us)\n")
    print(table + timing)
    results = Results("bench-structured", fields={
        "options": {k: v for k, v in vars(a).items() if k != "func"}, "model": loaded.source.name,
        "fused_decode": engine.fused is not None, "schema": SCHEMA, "compile": times, "rows": rows})
    write_results(out, "quantchat bench structured", results, table + timing)
    status(f"results in {out}")
    return 0
