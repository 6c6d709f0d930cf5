"""Measurements: benchmarks, the llama.cpp peer and the one results format.

* runner.py: ``quantchat bench`` (one fresh ``worker.py`` process per variant), measure.py the measuring
  tools, synthetic.py random-weight models of published shapes;
* llamacpp.py: llama.cpp as a peer (speed for ``quantchat bench --peer``, perplexity for ``quantchat eval ppl --peer``);
* serving.py + loadtest.py: ``quantchat bench serve`` (throughput with concurrent clients, 1 vs 2 workers);
* core_bench.py, kernel_bench.py, quant_bench.py: ``python -m quantchat.benchmark.<name>`` (docs/benchmarks.md);
* results.py: ``Results`` (kind, meta, fields) as JSON, output folders, markdown tables; plots.py draws from it.

Imports go one way: this package may import serving / engine / eval / quant / loading, never the CLI.
"""
