"""Self-distillation data for PPD prompt tokens: prompts of three kinds, and the base model's own greedy responses.

Prompt sources (read where they lie; nothing is copied into the repository):
- math: GSM8K train questions (``../shared/data/gsm8k_train.jsonl``);
- chat: the Alpaca seed tasks (``../shared/data/alpaca_seed_tasks.jsonl``), instruction plus input;
- code: tasks written from Python standard-library docstrings ("write a function like X that ...").

Each prompt is held out for evaluation by a stable hash of its id (one in ten), so train and evaluation
never share a prompt. Responses are generated greedily with our own batched decoder and cached as JSONL
per (model hash, max_new_tokens) under the cache directory; a run that stops resumes where it left off.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from decoding import VanillaDecoder
from workers.models import LoadedModel, encode_row, resolve_cache_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
KINDS = ("chat", "math", "code")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: str = Field(default=str(DEFAULT_DATA_DIR), description="Where gsm8k_train.jsonl and "
                          "alpaca_seed_tasks.jsonl lie (the shared data directory).")
    train_counts: dict[str, int] = Field(default_factory=lambda: {"chat": 1000, "math": 350, "code": 1000},
                                         description="Training prompts per kind (at most what a source has).")
    eval_counts: dict[str, int] = Field(default_factory=lambda: {"chat": 1000, "math": 40, "code": 1000},
                                        description="Held-out prompts per kind for evaluation.")
    max_new_tokens: int = Field(default=128, ge=8, description="Length of the base model's greedy responses.")
    generate_batch_size: int = Field(default=16, ge=1, description="Batch size for generating responses.")

# Standard-library modules whose documented functions become code tasks.
CODE_MODULES = ("bisect", "heapq", "textwrap", "string", "statistics", "math", "itertools", "functools",
                "difflib", "fnmatch", "posixpath", "shlex", "base64", "binascii", "calendar", "colorsys",
                "html", "keyword", "operator", "random", "re", "json", "copy", "zlib", "urllib.parse",
                "glob", "shutil", "secrets", "ipaddress", "unicodedata", "datetime", "fractions", "decimal")


@dataclass(frozen=True)
class PromptItem:
    id: str
    kind: str  # chat / math / code
    messages: tuple  # ((role, content), ...)

    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Sample:
    id: str
    kind: str
    prompt_ids: list[int]
    response_ids: list[int]


def is_held_out(item_id: str, every: int = 10) -> bool:
    return int(hashlib.sha256(item_id.encode()).hexdigest(), 16) % every == 0


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: point --data-dir at the shared data directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def math_prompts(data_dir: Path) -> list[PromptItem]:
    return [PromptItem(f"gsm8k-{i}", "math", (("user", row["question"]),))
            for i, row in enumerate(read_jsonl(data_dir / "gsm8k_train.jsonl"))]


def chat_prompts(data_dir: Path) -> list[PromptItem]:
    items = []
    for row in read_jsonl(data_dir / "alpaca_seed_tasks.jsonl"):
        for j, instance in enumerate(row.get("instances") or [{"input": ""}]):
            text = instruction_text(row["instruction"], instance.get("input"))
            items.append(PromptItem(f"{row['id']}-{j}", "chat", (("user", text),)))
    return items


def instruction_text(instruction: str, given: str | None) -> str:
    """An instruction-tuning row's user message: the instruction, then its input (if any) after a blank line."""
    return instruction + (f"\n\n{given}" if given else "")


def code_prompts() -> list[PromptItem]:
    items = []
    for module_name in CODE_MODULES:
        module = importlib.import_module(module_name)
        for name, fn in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(fn) or inspect.isbuiltin(fn)):
                continue
            doc = inspect.getdoc(fn) or ""
            summary = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
            if len(summary) < 30:
                continue
            try:
                signature = str(inspect.signature(fn))
            except (TypeError, ValueError):  # some builtins have no signature
                signature = "(...)"
            text = (f"Write a Python function `{name}{signature}` without using the `{module_name}` module. "
                    f"It should behave like this: {summary}")
            items.append(PromptItem(f"code-{module_name}-{name}", "code", (("user", text),)))
    return items


def all_prompts(data_dir: Path) -> dict[str, list[PromptItem]]:
    return {"chat": chat_prompts(data_dir), "math": math_prompts(data_dir), "code": code_prompts()}


def select(items: list[PromptItem], count: int, *, held_out: bool) -> list[PromptItem]:
    """The first ``count`` items of the split, in a stable order (by hash, so kinds of task mix)."""
    part = [it for it in items if is_held_out(it.id) == held_out]
    part.sort(key=lambda it: hashlib.sha256(it.id.encode()).hexdigest())
    return part[:count]


def generate_samples(items: list[PromptItem], lm: LoadedModel, *, max_new_tokens: int, batch_size: int,
                     cache_dir: Path, desc: str = "responses") -> list[Sample]:
    """Greedy responses of the base model, cached per (model, max_new_tokens); resumes a partial cache."""
    cache = cache_dir / "distill" / f"{lm.content_hash[:16]}-n{max_new_tokens}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, Sample] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            try:
                s = Sample(**json.loads(line))
            except (json.JSONDecodeError, TypeError):  # a line cut short by an interrupted run
                continue
            done[s.id] = s
    todo = [it for it in items if it.id not in done]
    # Similar lengths together: less padding in each batch.
    encoded = sorted(((it, encode_row(lm.tokenizer, messages=it.chat())) for it in todo), key=lambda x: len(x[1]))
    decoder = VanillaDecoder(lm.model, eos_token_ids=lm.eos_token_ids)
    with cache.open("a") as f, tqdm(total=len(encoded), desc=desc, unit="prompt", disable=None) as bar:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start: start + batch_size]
            results = decoder.generate([ids for _, ids in chunk], max_new_tokens)
            for (it, ids), res in zip(chunk, results):
                s = Sample(it.id, it.kind, ids, res.token_ids)
                done[s.id] = s
                f.write(json.dumps(asdict(s)) + "\n")
            f.flush()
            bar.update(len(chunk))
    return [done[it.id] for it in items]


def load_samples(data: DataConfig, lm: LoadedModel, held_out: bool, cache_dir: str | None = None) -> list[Sample]:
    """The training (or held-out) split of ``data``'s prompts with the model's greedy responses (cached under
    ``cache_dir``, default the project cache)."""
    src = all_prompts(Path(data.data_dir))
    counts = data.eval_counts if held_out else data.train_counts
    items = [it for kind, n in counts.items() for it in select(src[kind], n, held_out=held_out)]
    return generate_samples(items, lm, max_new_tokens=data.max_new_tokens, batch_size=data.generate_batch_size,
                            cache_dir=resolve_cache_dir(cache_dir),
                            desc="held-out responses" if held_out else "training responses")


def trained_data_config(meta_extra: dict) -> DataConfig:
    """The data a prompt-token artifact was trained and evaluated on (its meta's training config)."""
    return DataConfig(**meta_extra.get("training", {}).get("config", {}).get("data", {}))


def held_out_samples(lm: LoadedModel, pt, data_dir: Path) -> list[Sample]:
    """The held-out split a prompt-token artifact ``pt`` was evaluated on (its prompts read from ``data_dir``),
    with the model's greedy responses (cached)."""
    data = trained_data_config(pt.meta.extra).model_copy(update={"data_dir": str(data_dir)})
    return load_samples(data, lm, held_out=True)


def mixed_held_out_prompts(lm: LoadedModel, pt, data_dir: Path) -> list[list[int]]:
    """``held_out_samples``' prompts interleaved by kind (chat, math, code, chat, ...): any prefix mixes them."""
    samples = held_out_samples(lm, pt, data_dir)
    by_kind = [[s for s in samples if s.kind == kind] for kind in KINDS]
    return [s.prompt_ids for group in zip(*by_kind) for s in group]
