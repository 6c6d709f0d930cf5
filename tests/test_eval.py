"""``quantchat eval``: perplexity, KL divergence, multiple choice, side-by-side answers, llama.cpp as a peer.

Independent references come from transformers on the same tiny model folders; the CLI runs in
process (``main(argv)``), except one subprocess run that checks the command is registered.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_cli import make_tiny_chat_model, run_cli, write_byte_tokenizer
from tiny_models import make_tiny_llama

from quantchat.errors import QuantchatError
from quantchat.eval import mc
from quantchat.eval.kl import kl_divergence
from quantchat.eval.perplexity import iter_windows, model_logits_fn, score_windows, window_spans
from quantchat.loading.hf_loader import load_model

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow. ") * 3  # ~500 byte tokens


def run_main(capsys, *argv: str) -> subprocess.CompletedProcess:
    from quantchat.cli.main import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, rc, out, err)


def one_error_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    line = [x for x in res.stderr.splitlines() if x.strip()][-1]
    assert line.startswith("quantchat: error: "), res.stderr
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny LLaMA with a byte tokenizer (token id == byte value, <s> = 256)."""
    d = tmp_path_factory.mktemp("tiny_eval")
    make_tiny_chat_model(d)
    return d


@pytest.fixture(scope="module")
def perturbed(tiny, tmp_path_factory) -> Path:
    """The same model with Gaussian noise added to its weight matrices (not the LM head, whose zeroed rows keep
    greedy output printable)."""
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_eval_noisy")
    model = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "lm_head" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(d, safe_serialization=True)
    write_byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def hf_nll(folder: Path, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Summed cross-entropy and token count from transformers over the same windows."""
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start, end, first in window_spans(len(ids), window, stride):
            logits = ref(torch.tensor([ids[start:end]])).logits[0].double()
            tgt = torch.tensor(ids[first:end])
            nll += F.cross_entropy(logits[first - start - 1:end - start - 1], tgt, reduction="sum").item()
            count += len(tgt)
    return nll, count


# -- perplexity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,window", [(100, 16), (37, 8), (64, 64), (5, 8)])
def test_non_overlapping_windows_cover_each_token_once(n, window):
    covered = [p for start, end, _ in window_spans(n, window, window) for p in range(start, end)]
    assert covered == list(range(n))


def test_window_results_add_up():
    ids = torch.randint(0, 50, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = torch.randn(90, 50, generator=torch.Generator().manual_seed(1))
    fn = lambda s, e: logits[s:e]
    res = score_windows(fn, ids, window=20, stride=7)
    assert sum(res.window_tokens) == res.tokens_scored == 89 and res.windows == len(res.window_ppl)
    assert math.fsum(res.window_nll) == pytest.approx(res.nll_sum)
    targets = torch.cat([t for _, _, t in iter_windows(fn, ids, 20, 7)])
    assert targets.tolist() == ids[1:]
    want = F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="sum").item()
    assert res.nll_sum == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("stride", [None, 24])
def test_cli_ppl_matches_transformers(tiny, text_file, tmp_path, capsys, stride):
    args = ["eval", "ppl", "--model", str(tiny), "--device", "cpu", "--text", str(text_file), "--window", "64",
            "--out", str(tmp_path / "out")]
    if stride:
        args += ["--stride", str(stride)]
    res = run_main(capsys, *args)
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "out" / "result.json").read_text())
    ids = list(TEXT.encode())  # the byte tokenizer; no BOS
    nll, count = hf_nll(tiny, ids, 64, stride or 64)
    assert data["tokens_scored"] == count and data["tokens_total"] == len(ids)
    assert data["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert f"tokens evaluated: {count}" in res.stdout and f"perplexity: {data['ppl']:.4f}" in res.stdout
    assert len(data["window_ppl"]) == data["windows"] == len(window_spans(len(ids), 64, stride or 64))
    assert "| quantchat |" in (tmp_path / "out" / "result.md").read_text()
    from PIL import Image

    with Image.open(tmp_path / "out" / "ppl_windows.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_cli_ppl_max_tokens_and_default_out_dir(tiny, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run_main(capsys, "eval", "ppl", "--model", str(tiny), "--device", "cpu", "--text", str(text_file),
                   "--window", "32", "--max-tokens", "100")
    assert res.returncode == 0, res.stderr
    (out,) = (tmp_path / "quantchat-results").glob("ppl-*")
    data = json.loads((out / "result.json").read_text())
    assert data["tokens_total"] == 100 and data["tokens_scored"] == 100 - 4  # 4 windows, first token of each
    assert {"argv", "torch", "quantchat"} <= set(data["context"])


@pytest.mark.parametrize("argv,needles", [
    (["--window", "1000"], ["window 1000", "context of 256"]),
    (["--window", "32", "--stride", "40"], ["stride"]),
    (["--max-tokens", "-1"], ["max-tokens"]),
])
def test_cli_ppl_bad_windows(tiny, text_file, tmp_path, capsys, argv, needles):
    res = run_main(capsys, "eval", "ppl", "--model", str(tiny), "--device", "cpu", "--text", str(text_file),
                   "--out", str(tmp_path), *argv)
    one_error_line(res, *needles)


def test_cli_ppl_missing_text(tmp_path, capsys):
    one_error_line(run_main(capsys, "eval", "ppl", "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path)),
                   "nope.txt")


# -- KL divergence ---------------------------------------------------------------------------------

def test_kl_of_a_model_with_itself_is_zero(tiny):
    model = load_model(tiny)
    ids = list(TEXT.encode())[:200]
    fn = model_logits_fn(model, ids)
    res = kl_divergence(fn, fn, ids, window=64)
    s = res.summary()
    assert s["kl_mean"] == 0.0 and s["kl_max"] == 0.0
    assert s["top1_agreement"] == 1.0 and s["ppl_ratio"] == 1.0 and s["delta_p_rms"] == 0.0
    assert s["tokens"] == res.reference.tokens_scored == 200 - 4


def test_kl_against_perturbed_copy_matches_independent_computation(tiny, perturbed):
    from transformers import LlamaForCausalLM

    ids = list(TEXT.encode())[:200]
    res = kl_divergence(model_logits_fn(load_model(tiny), ids), model_logits_fn(load_model(perturbed), ids), ids,
                        window=64, stride=48)
    s = res.summary()
    assert s["kl_mean"] > 1e-4 and s["top1_agreement"] < 1.0
    kls, agree = [], 0
    ref, mod = (LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (tiny, perturbed))
    with torch.no_grad():
        for start, end, first in window_spans(len(ids), 64, 48):
            x = torch.tensor([ids[start:end]])
            lr = F.log_softmax(ref(x).logits[0].double(), -1)[first - start - 1:end - start - 1]
            lm = F.log_softmax(mod(x).logits[0].double(), -1)[first - start - 1:end - start - 1]
            kls.append(F.kl_div(lm, lr, log_target=True, reduction="none").sum(-1))
            agree += int((lr.argmax(-1) == lm.argmax(-1)).sum())
    want = torch.cat(kls)
    assert res.tokens == want.numel() == 199
    assert s["kl_mean"] == pytest.approx(float(want.mean()), rel=1e-4)
    assert s["kl_max"] == pytest.approx(float(want.max()), rel=1e-4)
    assert res.top1_agree == agree


def test_cli_kl_writes_json_markdown_and_histogram(tiny, perturbed, text_file, tmp_path, capsys):
    out = tmp_path / "kl"
    res = run_main(capsys, "eval", "kl", "--model", str(perturbed), "--reference", str(tiny), "--device", "cpu",
                   "--text", str(text_file), "--window", "64", "--out", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "result.json").read_text())
    assert data["kl_mean"] > 0 and 0 <= data["top1_agreement"] <= 1
    assert data["kl_max"] >= data["kl_percentiles"]["p99"] >= data["kl_median"] >= data["kl_min"] >= 0
    assert data["reference"]["path"] == str(tiny) and data["model"]["path"] == str(perturbed)
    assert "mean KL" in res.stdout and "top-1 agreement" in res.stdout
    assert "top-1 agreement" in (out / "result.md").read_text()
    from PIL import Image

    with Image.open(out / "kl_histogram.png") as im:
        assert im.format == "PNG"


def test_cli_kl_different_tokenizers(tiny, tmp_path, capsys):
    other = tmp_path / "other"
    make_tiny_llama(other, vocab=300)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(299)} | {"[UNK]": 299}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(other / "tokenizer.json"))
    res = run_main(capsys, "eval", "kl", "--model", str(other), "--reference", str(tiny), "--device", "cpu",
                   "--window", "32", "--max-tokens", "64", "--out", str(tmp_path / "o"))
    one_error_line(res, "tokenize")


# -- multiple choice -------------------------------------------------------------------------------

MMLU_DEV = [["What is 1+1?", "2", "3", "4", "5", "A"], ["Color of the sky?", "green", "blue", "red", "pink", "B"]]
# in every question the correct choice is the word "yes"; the last question's key is deliberately wrong
MMLU_VAL = {
    "alpha": [["q1", "yes", "no", "no", "no", "A"], ["q2", "no", "yes", "no", "no", "B"],
              ["q3", "no", "no", "yes", "no", "C"], ["q4", "no", "no", "no", "yes", "A"]],
    "beta_gamma": [["b1", "no", "no", "no", "yes", "D"], ["b2", "yes", "no", "no", "no", "A"],
                   ["b3, with a comma\nand a newline", "no", "yes", "no", "no", "B"],
                   ["b4", "no", "no", "yes", "no", "C"]],
}
EXPECTED = {"alpha": (4, 3), "beta_gamma": (4, 4)}


def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def make_mc_data(root: Path, layout: str) -> Path:
    for subject, rows in MMLU_VAL.items():
        if layout == "mmlu":
            write_csv(root / "dev" / f"{subject}_dev.csv", MMLU_DEV)
            write_csv(root / "val" / f"{subject}_val.csv", rows)
            write_csv(root / "test" / f"{subject}_test.csv", rows)
        else:
            h = ["id", "question", "A", "B", "C", "D", "answer"]
            write_csv(root / "dev" / f"{subject}_dev.csv", [[i, *r, "because"] for i, r in enumerate(MMLU_DEV)],
                      h + ["explanation"])
            write_csv(root / "val" / f"{subject}_val.csv", [[i, *r] for i, r in enumerate(rows)], h)
            write_csv(root / "test" / f"{subject}_test.csv", [[i, *r[:5]] for i, r in enumerate(rows)], h[:-1])
    return root


class YesScorer:
    """Rigged: prefers the letter whose choice in the asked (last) question reads "yes"."""

    def __init__(self):
        self.prompts = []

    def __call__(self, prompt, conts):
        self.prompts.append(prompt)
        last = prompt.rsplit("\n\n", 1)[-1]
        choices = dict(re.findall(r"^([ABCD])\. (.*)$", last, re.MULTILINE))
        return [0.0 if choices[c.strip()] == "yes" else -1.0 for c in conts]


@pytest.mark.parametrize("layout", ["mmlu", "ceval"])
def test_mc_accuracy_with_rigged_scorer(tmp_path, layout):
    data = mc.load_mc_dataset(make_mc_data(tmp_path, layout), shots=1)
    assert data.layout == layout and data.split == "val"
    assert [s.name for s in data.subjects] == ["alpha", "beta_gamma"]
    scorer = YesScorer()
    res = mc.evaluate_mc(data, scorer, shots=1)
    for name, (n, correct) in EXPECTED.items():
        assert (res.subjects[name]["n"], res.subjects[name]["correct"]) == (n, correct)
    assert res.accuracy == 7 / 8 and res.macro_accuracy == (3 / 4 + 1) / 2
    assert res.subjects["alpha"]["predictions"] == "ABCD" and res.subjects["alpha"]["answers"] == "ABCA"
    p = scorer.prompts[0]
    assert p.startswith("The following are multiple choice questions (with answers) about alpha.\n\n")
    assert p.count("Answer: A") == 1 and p.endswith("q1\nA. yes\nB. no\nC. no\nD. no\nAnswer:")
    assert "about beta gamma." in scorer.prompts[-1] and "b3, with a comma\nand a newline" in scorer.prompts[6]


def test_mc_subjects_split_and_shot_reduction(tmp_path):
    root = make_mc_data(tmp_path, "mmlu")
    data = mc.load_mc_dataset(root, split="test", subjects=["beta_gamma"], shots=2)
    assert data.split == "test" and [s.name for s in data.subjects] == ["beta_gamma"]

    class Short(YesScorer):
        def fits(self, prompt):
            return prompt.count("Answer:") <= 2  # room for one example only

    s = Short()
    res = mc.evaluate_mc(data, s, shots=2, limit=3)
    assert res.n == 3 and res.shots_reduced == 3 and all(p.count("Answer:") == 2 for p in s.prompts)
    with pytest.raises(QuantchatError, match="unknown subject 'nope'"):
        mc.load_mc_dataset(root, subjects=["nope"])
    with pytest.raises(QuantchatError, match="no answer column"):
        mc.load_mc_dataset(make_mc_data(tmp_path / "c", "ceval"), split="test")
    with pytest.raises(QuantchatError, match="dev_missing"):
        (root / "val" / "dev_missing_val.csv").write_text("q,a,b,c,d,A\n")
        mc.load_mc_dataset(root, subjects=["dev_missing"], shots=1)
    with pytest.raises(QuantchatError, match="expected the C-Eval or MMLU layout"):
        mc.load_mc_dataset(tmp_path / "dev")


@pytest.mark.parametrize("content,line,needle", [
    ('q1,a,b,c,d,A\n"multi\nline",a,b,c,d,B\nq3,a,b,c,d\n', 4, "expected 6 columns"),
    ("q1,a,b,c,d,E\n", 1, "answer must be one of A, B, C, D"),
    ("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,A\n", 3, "expected 7 columns"),
    ("q1,a,b,c,d,A\n,a,b,c,d,A\n", 2, "empty question"),
    ("q1,a,b,c,d,A\nq\xe9,a,b,c,d,A\n".encode("latin-1"), 2, "not UTF-8"),
])
def test_malformed_csv_names_file_and_line(tmp_path, content, line, needle):
    path = tmp_path / "val" / "s_val.csv"
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(QuantchatError) as e:
        mc.load_mc_dataset(tmp_path, shots=0)
    msg = str(e.value)
    assert f"{path}:{line}: " in msg and needle in msg and "\n" not in msg


class SpaceLetterTokenizer:
    """Bytes, except " A".." D" are single tokens 250..253 (to exercise the one-forward path)."""

    def encode(self, text, add_bos=None):
        return [250 + "ABCD".index(t[1]) if len(t) == 2 else ord(t) % 200 for t in re.findall(r" [A-D]|.", text, re.DOTALL)]


@pytest.mark.parametrize("tokenizer", ["bytes", "space-letter"])
def test_model_scorer_matches_transformers(tiny, tokenizer):
    from transformers import LlamaForCausalLM

    from quantchat.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny) if tokenizer == "bytes" else SpaceLetterTokenizer()
    scorer = mc.ModelScorer(load_model(tiny), tok)
    prompt = "Question?\nA. x\nB. y\nC. z\nD. w\nAnswer:"
    conts = [" A", " B", " C", " D"]
    got = scorer(prompt, conts)
    ref = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ctx = tok.encode(prompt)
    want = []
    with torch.no_grad():
        for c in conts:
            cont = tok.encode(prompt + c)[len(ctx):]
            assert len(cont) == (2 if tokenizer == "bytes" else 1)
            logp = F.log_softmax(ref(torch.tensor([ctx + cont])).logits[0].double(), -1)
            want.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("layout", ["mmlu", "ceval"])
def test_cli_mc_end_to_end(tiny, tmp_path, capsys, layout):
    root = make_mc_data(tmp_path / "data", layout)
    out = tmp_path / "out"
    res = run_main(capsys, "eval", "mc", "--model", str(tiny), "--device", "cpu", "--data", str(root),
                   "--shots", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "result.json").read_text())
    assert data["layout"] == layout and data["questions"] == 8 and 0 <= data["accuracy"] <= 1
    for name in MMLU_VAL:
        s = data["subjects"][name]
        assert s["n"] == 4 and 0 <= s["accuracy"] <= 1 and len(s["predictions"]) == 4
    assert "alpha" in (out / "result.md").read_text() and "accuracy:" in res.stdout
    assert (out / "mc_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_mc_malformed(tiny, tmp_path, capsys):
    bad = tmp_path / "val" / "x_val.csv"
    bad.parent.mkdir()
    bad.write_text("q,a,b,c,d,A\nq,a,b,c\n")
    one_error_line(run_main(capsys, "eval", "mc", "--model", str(tiny), "--data", str(tmp_path), "--shots", "0"),
                   f"{bad}:2:", "expected 6 columns")


# -- side by side ----------------------------------------------------------------------------------

def test_cli_compare_writes_both_answers(tiny, perturbed, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nwhat is up\n")
    out = tmp_path / "out"
    res = run_main(capsys, "eval", "compare", "--model", str(tiny), "--model", str(tiny), "--model", str(perturbed),
                   "--device", "cpu", "--prompts", str(prompts), "-n", "6", "--out", str(out))
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "result.json").read_text())
    labels = [m["label"] for m in doc["models"]]
    assert len(set(labels)) == 3 and doc["sampling"]["temperature"] == 0.0
    assert [r["prompt"] for r in doc["prompts"]] == ["hello there", "what is up"]
    for r in doc["prompts"]:
        a = [r["answers"][label] for label in labels]
        assert all(x["generated_tokens"] == 6 and x["text"] for x in a)
        assert a[0]["text"] == a[1]["text"]  # same model, greedy
    md = (out / "result.md").read_text()
    assert "hello there" in md and labels[2] in md
    assert "identical answers" in res.stdout


def test_compare_prompt_files(tmp_path):
    from quantchat.eval.compare import read_prompts

    (tmp_path / "p.json").write_text('["a", {"prompt": "b"}]')
    (tmp_path / "p.jsonl").write_text('"a"\n\n{"prompt": "b"}\n')
    assert read_prompts(tmp_path / "p.json") == read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('"a"\n{"x": 1}\n')
    with pytest.raises(QuantchatError, match="bad.jsonl:2"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(QuantchatError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_cli_compare_needs_two_models(tiny, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hi\n")
    one_error_line(run_main(capsys, "eval", "compare", "--model", str(tiny), "--prompts", str(tmp_path / "p.txt")),
                   "two models")
    one_error_line(run_main(capsys, "eval", "compare", "--model", str(tiny), "--model", str(tiny), "--quant", "none",
                            "--quant", "none", "--quant", "none", "--prompts", str(tmp_path / "p.txt")), "--quant")


# -- llama.cpp as a peer ---------------------------------------------------------------------------

def test_peer_missing_package_is_a_clear_error(tiny, text_file, tmp_path, capsys, monkeypatch):
    from quantchat.benchmark import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(QuantchatError, match=re.escape("pip install 'quantchat[peer]'")):
        llamacpp.import_llama_cpp()
    res = run_main(capsys, "eval", "ppl", "--model", str(tiny), "--text", str(text_file), "--peer", "llama.cpp",
                   "--out", str(tmp_path))
    one_error_line(res, "llama-cpp-python", "pip install 'quantchat[peer]'")
    assert not res.stdout  # failed before loading anything


def test_peer_needs_a_gguf(tiny, text_file, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    res = run_main(capsys, "eval", "ppl", "--model", str(tiny), "--text", str(text_file), "--peer", "llama.cpp",
                   "--out", str(tmp_path))
    one_error_line(res, ".gguf", str(tiny))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from test_gguf import write_tiny_gguf

    p = tmp_path_factory.mktemp("tiny_gguf") / "tiny-peer.gguf"
    write_tiny_gguf(p, tie=False)
    return p


def test_peer_llamacpp_perplexity_close_to_ours(tiny_gguf, text_file, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    from quantchat.benchmark.llamacpp import LlamaCppPeer

    out = tmp_path / "out"
    res = run_main(capsys, "eval", "ppl", "--model", str(tiny_gguf), "--device", "cpu", "--text", str(text_file),
                   "--window", "48", "--stride", "32", "--peer", "llama.cpp", "--peer-threads", "1",
                   "--out", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "result.json").read_text())
    peer = data["peer"]
    assert peer["tokens_scored"] == data["tokens_scored"] and peer["tokenization_matches"]
    # same dequantized weights; llama.cpp quantizes activations for its quantized matmuls and keeps an f16 KV cache
    assert peer["ppl_ratio_quantchat_over_llamacpp"] == pytest.approx(1.0, abs=0.01)
    assert "ratio quantchat/llama.cpp" in res.stdout and "| llama.cpp |" in (out / "result.md").read_text()
    with LlamaCppPeer(tiny_gguf, n_ctx=32, n_threads=1) as peer_model:
        ids = peer_model.tokenize("the quick brown fox")
        direct = peer_model.logits(ids)
        again = peer_model.logits(ids[:5])  # a fresh window, not a continuation
        assert direct.shape == (len(ids), peer_model.n_vocab)
        assert torch.allclose(direct[:5], again, atol=1e-4)
        with pytest.raises(QuantchatError, match="context of 32"):
            peer_model.logits(list(range(40)))


# -- the registered command ------------------------------------------------------------------------

def test_eval_command_is_registered(tiny, text_file, tmp_path):
    res = run_cli("eval", "ppl", "--model", str(tiny), "--device", "cpu", "--text", str(text_file),
                  "--window", "128", "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o" / "result.json").is_file() and "perplexity:" in res.stdout
