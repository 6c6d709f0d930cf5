"""Multiple-choice accuracy on C-Eval / MMLU style CSV folders, scored by the answer letter's log-probability.

Layouts (detected per file):

* MMLU (Hendrycks' ``data/`` folder): ``DIR/{dev,val,test}/SUBJECT_{dev,val,test}.csv``, no header,
  six columns ``question,A,B,C,D,answer``.
* C-Eval: ``DIR/{dev,val,test}/SUBJECT_{split}.csv`` with a header ``id,question,A,B,C,D,answer[,explanation]``
  (its test split has no ``answer`` column, so it cannot be scored).

Each evaluated question is preceded by ``k`` solved examples from the subject's dev file (the standard
MMLU prompt: "The following are multiple choice questions (with answers) about SUBJECT." then
question, lettered choices and "Answer: X"), and the model's answer is the letter whose continuation
(" A", " B", " C", " D" after "Answer:") has the highest log-probability. Shots are dropped from the
end when a prompt does not fit the model's context.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from quantchat.errors import QuantchatError

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
MMLU, CEVAL = "mmlu", "ceval"
CEVAL_COLUMNS = ("id", "question", "A", "B", "C", "D")

# (prompt, continuations) -> log-probability of each continuation after the prompt
Scorer = Callable[[str, Sequence[str]], Sequence[float]]


@dataclass
class MCQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None  # "A".."D", or None where the file has no answers (C-Eval test)
    where: str  # "file:line" for messages


@dataclass
class MCSubject:
    name: str
    eval_file: Path
    questions: list[MCQuestion]
    dev: list[MCQuestion] = field(default_factory=list)


@dataclass
class MCDataset:
    root: Path
    layout: str
    split: str
    subjects: list[MCSubject]


# -- reading ---------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QuantchatError(f"{path}: cannot read ({e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise QuantchatError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_answer(value: str, where: str) -> str:
    ans = value.strip().upper()
    if ans not in LETTERS:
        raise QuantchatError(f"{where}: answer must be one of A, B, C, D (got {value.strip()[:20]!r})")
    return ans


def read_mc_csv(path: Path) -> tuple[str, list[MCQuestion]]:
    """(layout, questions) of one CSV file; malformed rows raise a QuantchatError naming file and line."""
    path = Path(path)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    rows: list[tuple[int, list[str]]] = []
    line = 1
    try:
        for row in reader:
            rows.append((line, row))
            line = reader.line_num + 1
    except csv.Error as e:
        raise QuantchatError(f"{path}:{line}: malformed CSV ({e})") from None
    rows = [(n, r) for n, r in rows if any(c.strip() for c in r)]  # blank lines
    if not rows:
        raise QuantchatError(f"{path}: no questions in this file")
    header = [c.strip() for c in rows[0][1]]
    questions = []
    if [h.lower() for h in header[:6]] == [c.lower() for c in CEVAL_COLUMNS]:
        layout = CEVAL
        cols = {h.lower(): i for i, h in enumerate(header)}
        if set(cols) - {"id", "question", "a", "b", "c", "d", "answer", "explanation"}:
            raise QuantchatError(f"{path}:{rows[0][0]}: unexpected C-Eval header {','.join(header)} "
                                 "(expected id,question,A,B,C,D[,answer][,explanation])")
        for n, row in rows[1:]:
            where = f"{path}:{n}"
            if len(row) != len(header):
                raise QuantchatError(f"{where}: expected {len(header)} columns ({','.join(header)}), got {len(row)}")
            ans = _check_answer(row[cols["answer"]], where) if "answer" in cols else None
            questions.append(_question(row[cols["question"]], [row[cols[c]] for c in "abcd"], ans, where))
    else:
        layout = MMLU
        for n, row in rows:
            where = f"{path}:{n}"
            if len(row) != 6:
                raise QuantchatError(f"{where}: expected 6 columns (question,A,B,C,D,answer; MMLU layout without "
                                     f"header) or a C-Eval header line, got {len(row)} columns")
            questions.append(_question(row[0], row[1:5], _check_answer(row[5], where), where))
    if not questions:
        raise QuantchatError(f"{path}: no questions in this file")
    return layout, questions


def _question(text: str, choices: list[str], answer: str | None, where: str) -> MCQuestion:
    if not text.strip():
        raise QuantchatError(f"{where}: empty question")
    return MCQuestion(text.strip(), tuple(c.strip() for c in choices), answer, where)  # type: ignore[arg-type]


def _data_root(root: Path) -> Path:
    if not root.is_dir():
        raise QuantchatError(f"{root}: no such folder")
    if not any((root / s).is_dir() for s in SPLITS) and (root / "data").is_dir():
        return root / "data"  # the MMLU tarball's top folder
    return root


def _subject_files(root: Path, split: str) -> dict[str, Path]:
    d = root / split
    suffix = f"_{split}.csv"
    if not d.is_dir():
        return {}
    return {p.name[:-len(suffix)]: p for p in sorted(d.iterdir()) if p.name.endswith(suffix) and p.is_file()}


def load_mc_dataset(root: str | Path, split: str = "auto", subjects: Sequence[str] | None = None,
                    shots: int = 5) -> MCDataset:
    """Read the eval split (``auto``: val, else test) and, for shots > 0, each subject's dev file."""
    root = _data_root(Path(root).expanduser())
    if split == "auto":
        split = "val" if _subject_files(root, "val") else "test"
    elif split not in SPLITS:
        raise QuantchatError(f"unknown split {split!r} (use dev, val, test or auto)")
    files = _subject_files(root, split)
    if not files:
        raise QuantchatError(
            f"{root}: no {split}/SUBJECT_{split}.csv files (expected the C-Eval or MMLU layout: "
            "dev/, val/, test/ folders of SUBJECT_{dev,val,test}.csv)"
        )
    names = list(files)
    if subjects:
        unknown = [s for s in subjects if s not in files]
        if unknown:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise QuantchatError(f"unknown subject {unknown[0]!r} in {root / split} (have: {shown})")
        names = list(dict.fromkeys(subjects))
    dev_files = _subject_files(root, "dev")
    layouts, out = set(), []
    for name in names:
        layout, questions = read_mc_csv(files[name])
        layouts.add(layout)
        missing = [q for q in questions if q.answer is None]
        if missing:
            raise QuantchatError(f"{files[name]}: has no answer column, so it cannot be scored "
                                 f"(C-Eval's test split is unlabeled: use --split val)")
        dev: list[MCQuestion] = []
        if shots > 0 and split != "dev":
            if name not in dev_files:
                raise QuantchatError(f"{root / 'dev' / f'{name}_dev.csv'}: missing, needed for --shots {shots} "
                                     "(use --shots 0)")
            _, dev = read_mc_csv(dev_files[name])
            if any(q.answer is None for q in dev):
                raise QuantchatError(f"{dev_files[name]}: dev examples need answers")
        out.append(MCSubject(name, files[name], questions, dev))
    return MCDataset(root, "+".join(sorted(layouts)), split, out)


# -- prompts and scoring -----------------------------------------------------------------------------

def subject_title(name: str) -> str:
    return name.replace("_", " ")


def format_question(q: MCQuestion, with_answer: bool) -> str:
    lines = [q.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    lines.append(f"Answer: {q.answer}" if with_answer else "Answer:")
    return "\n".join(lines)


def build_prompt(subject: str, shots: Sequence[MCQuestion], q: MCQuestion) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject_title(subject)}.\n\n"
    return head + "".join(format_question(s, True) + "\n\n" for s in shots) + format_question(q, False)


class ModelScorer:
    """Log-probabilities of continuations after a prompt under a quantchat model (plain causal pass)."""

    def __init__(self, model, tokenizer, max_len: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_len = max_len or model.config.max_position_embeddings

    def fits(self, prompt: str) -> bool:
        return len(self.tokenizer.encode(prompt)) < self.max_len

    def split(self, prompt: str, cont: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids): the continuation as the tokenizer splits prompt + cont."""
        ctx = self.tokenizer.encode(prompt)
        full = self.tokenizer.encode(prompt + cont)
        if full[:len(ctx)] == ctx and len(full) > len(ctx):
            return ctx, full[len(ctx):]
        return ctx, self.tokenizer.encode(cont, add_bos=False)

    @torch.inference_mode()
    def __call__(self, prompt: str, conts: Sequence[str]) -> list[float]:
        parts = [self.split(prompt, c) for c in conts]
        dev = self.model.device
        if all(len(c) == 1 and ctx == parts[0][0] for ctx, c in parts):
            ctx = parts[0][0][-(self.max_len - 1):]
            logits = self.model(torch.tensor([ctx], device=dev), last_only=True)[0, -1].float()
            logp = F.log_softmax(logits, dim=-1)
            return [float(logp[c[0]]) for _, c in parts]
        scores = []
        for ctx, cont in parts:
            ids = (ctx + cont)[-self.max_len:]
            n = len(cont)
            logits = self.model(torch.tensor([ids], device=dev))[0, -n - 1:-1].float()
            logp = F.log_softmax(logits, dim=-1)
            scores.append(float(logp.gather(1, torch.tensor(cont, device=dev)[:, None]).sum()))
        return scores


@dataclass
class MCResult:
    layout: str
    split: str
    shots: int
    subjects: dict[str, dict]  # name -> {n, correct, accuracy, predictions, answers}
    seconds: float
    shots_reduced: int = 0  # questions whose prompt dropped examples to fit the context
    example_prompt: str = ""

    @property
    def n(self) -> int:
        return sum(s["n"] for s in self.subjects.values())

    @property
    def correct(self) -> int:
        return sum(s["correct"] for s in self.subjects.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def macro_accuracy(self) -> float:
        return sum(s["accuracy"] for s in self.subjects.values()) / len(self.subjects) if self.subjects else 0.0

    def to_dict(self) -> dict:
        return {"layout": self.layout, "split": self.split, "shots": self.shots, "questions": self.n,
                "correct": self.correct, "accuracy": self.accuracy, "macro_accuracy": self.macro_accuracy,
                "shots_reduced": self.shots_reduced, "seconds": self.seconds, "subjects": self.subjects,
                "example_prompt": self.example_prompt}


def evaluate_mc(dataset: MCDataset, scorer: Scorer, shots: int = 5, limit: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> MCResult:
    """Accuracy per subject and overall; ``scorer`` gives the log-probability of " A".." D" after a prompt."""
    if shots < 0:
        raise QuantchatError("--shots must be >= 0")
    fits = getattr(scorer, "fits", None)
    conts = [f" {letter}" for letter in LETTERS]
    total = sum(len(s.questions[:limit]) for s in dataset.subjects)
    done, reduced, example = 0, 0, ""
    t0 = time.perf_counter()
    subjects = {}
    for subj in dataset.subjects:
        preds, answers = [], []
        for q in subj.questions[:limit]:
            k = min(shots, len(subj.dev))
            prompt = build_prompt(subj.name, subj.dev[:k], q)
            while k > 0 and fits is not None and not fits(prompt):
                k -= 1
                prompt = build_prompt(subj.name, subj.dev[:k], q)
            reduced += k < min(shots, len(subj.dev))
            example = example or prompt
            scores = list(scorer(prompt, conts))
            preds.append(LETTERS[max(range(len(LETTERS)), key=lambda i: scores[i])])
            answers.append(q.answer)
            done += 1
            if progress:
                progress(done, total)
        correct = sum(p == a for p, a in zip(preds, answers))
        subjects[subj.name] = {"n": len(preds), "correct": correct,
                               "accuracy": correct / len(preds) if preds else 0.0,
                               "predictions": "".join(preds), "answers": "".join(answers)}
    return MCResult(dataset.layout, dataset.split, shots, subjects, time.perf_counter() - t0, reduced, example)
