"""``quantchat bench``: speed and memory of quantization variants (and llama.cpp) side by side.

runner.py drives a run (one fresh ``worker.py`` process per variant), measure.py holds the measuring
tools (also used by the scripts in bench/), synthetic.py builds random-weight models of published
shapes, plots.py draws the PNGs.
"""
