"""Fine-tuning and merged-LoRA attacks: a leaker adapts a stamped copy with a few hundred AdamW steps.

Two model families, each with an objective that needs nothing beyond the checkpoint itself:

- causal language models (llama family, e.g. SmolLM2): next-token cross-entropy on English text;
- BERT sentence encoders (e.g. all-MiniLM-L6-v2, which ships without a masked-LM head):
  unsupervised SimCSE, i.e. each sentence is encoded twice with dropout active, the two mean-pooled
  embeddings form the positive pair and the other sentences of the batch are the negatives
  (InfoNCE over cosine similarities, temperature 0.05).

`lora_rank=None` trains every parameter; `lora_rank=r` freezes the model, adds a rank-r update
`B @ A` (scaled by 2) to every linear layer except the output head, trains only those, and merges
them into the weights before saving. Either way the output is a float safetensors copy with the
source's layout: same files, tensor names, order, dtypes and metadata; config and tokenizer files
are copied. The training text is English prose gathered from this machine (`english_text`).

torch and transformers are imported only when a fine-tune runs (`pip install -e '.[eval]'`).
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from weightmark.attacks.basic import map_floats
from weightmark.errors import InputFileError, UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["FinetuneStats", "english_documents", "english_text", "finetune", "finetune_with_stats"]

DEFAULT_LR_FULL = 2e-5
DEFAULT_LR_LORA = 2e-4
LORA_ALPHA_PER_RANK = 2.0  # lora_alpha = 2 * rank, the usual choice (r=16, alpha=32)
DEFAULT_CAUSAL_BATCH = 1  # sequences of seq_len tokens per step
DEFAULT_ENCODER_BATCH = 32  # sentences per step (in-batch negatives)
SIMCSE_TEMPERATURE = 0.05
HELD_OUT_WINDOWS = 4  # windows of seq_len tokens
HELD_OUT_BATCHES = 4  # batches of sentences
GRAD_CLIP = 1.0

_LICENCE_DIR = Path("/usr/share/common-licenses")
_SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                     "ensurepip", "turtledemo", "__pycache__", "tkinter", "pydoc_data"}
_MIN_PARAGRAPH_WORDS = 8
_MIN_LETTER_SHARE = 0.7


# -- English text ------------------------------------------------------------------------------


def _paragraphs(text: str) -> list[str]:
    """Hard-wrapped text -> one line per paragraph, keeping only paragraphs of prose."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para.split()) < _MIN_PARAGRAPH_WORDS or para.startswith((">>>", "...", "$ ")):
            continue
        letters = sum(ch.isalpha() or ch == " " for ch in para)
        if letters / len(para) >= _MIN_LETTER_SHARE:
            out.append(para)
    return out


def _licence_documents() -> Iterator[tuple[str, str]]:
    seen: set[Path] = set()
    paths = sorted(_LICENCE_DIR.iterdir()) if _LICENCE_DIR.is_dir() else []
    python_licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    for path in [*paths, python_licence]:
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        paras = _paragraphs(real.read_text(encoding="utf-8", errors="replace"))
        if paras:
            yield str(real), "\n\n".join(paras)


def _docstring_documents() -> Iterator[tuple[str, str]]:
    """The docstrings of each standard-library module, module by module in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not _SKIP_STDLIB_DIRS.intersection(p.relative_to(root).parts))
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        paras: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    paras.extend(_paragraphs(inspect.cleandoc(doc)))
        if paras:
            yield str(path), "\n\n".join(paras)


def english_documents() -> Iterator[tuple[str, str]]:
    """(source, text) of English documents on this machine, in a fixed order.

    Alternates between the licence texts (/usr/share/common-licenses, Python's LICENSE.txt) and
    the docstrings of the Python standard library, one module per document. Only paragraphs of
    prose are kept (at least 8 words, mostly letters; no doctest lines), one per line.
    """
    sources = [_licence_documents(), _docstring_documents()]
    while sources:
        for source in list(sources):
            doc = next(source, None)
            if doc is None:
                sources.remove(source)
            else:
                yield doc


def english_text(min_chars: int) -> str:
    """At least `min_chars` characters of English prose, the same on every call (see above)."""
    parts: list[str] = []
    total = 0
    for _, text in english_documents():
        parts.append(text)
        total += len(text) + 2
        if total >= min_chars:
            return "\n\n".join(parts)
    raise UsageError(f"only {total} characters of English text found on this machine; "
                     f"{min_chars} were asked for (pass text= explicitly)")


# -- results -----------------------------------------------------------------------------------


@dataclass
class FinetuneStats:
    """What a fine-tune did: the objective, its loss before and after, and the time it took."""

    path: Path
    kind: str  # "causal-lm" or "sentence-encoder"
    objective: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    lora_rank: int | None
    trainable_parameters: int
    held_out_loss_before: float
    held_out_loss_after: float
    seconds_per_step: float  # wall clock
    cpu_seconds_per_step: float  # all threads of this process: compare runs on a busy machine
    losses: list[float] = field(default_factory=list)

    @property
    def first_losses_mean(self) -> float:
        return float(np.mean(self.losses[: max(1, len(self.losses) // 10)]))

    @property
    def last_losses_mean(self) -> float:
        return float(np.mean(self.losses[-max(1, len(self.losses) // 10):]))


# -- torch machinery ---------------------------------------------------------------------------


def _require_torch() -> Any:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"fine-tuning needs torch and transformers ({exc.name} is missing): "
            "pip install 'torch==2.13.0' transformers, or the project's '.[eval]' extra"
        ) from None
    return torch


def _model_kind(src: Path) -> str:
    import json

    config_path = src / "config.json"
    if not config_path.is_file():
        raise InputFileError(src, "fine-tuning needs a Hugging Face folder with config.json")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal-lm"
    if config.get("model_type") == "bert":
        return "sentence-encoder"
    raise UsageError(f"{src}: cannot fine-tune architecture {architectures or config.get('model_type')}"
                     " (supported: *ForCausalLM language models and BERT sentence encoders)")


def _make_lora(torch: Any, base: Any, rank: int) -> Any:
    class LoRALinear(torch.nn.Module):
        """y = base(x) + scaling * x A^T B^T, with A random and B zero at the start."""

        def __init__(self) -> None:
            super().__init__()
            self.base = base
            base.weight.requires_grad_(False)
            self.lora_a = torch.nn.Parameter(torch.empty(rank, base.in_features))
            self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
            torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.scaling = LORA_ALPHA_PER_RANK

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling

        def merge(self) -> Any:
            with torch.no_grad():
                self.base.weight += self.scaling * (self.lora_b @ self.lora_a)
            return self.base

    return LoRALinear()


def _add_lora(torch: Any, model: Any, rank: int) -> list[tuple[Any, str, Any]]:
    """Wrap every linear layer but the output head; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = []
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                lora = _make_lora(torch, child, rank)
                setattr(module, child_name, lora)
                wrapped.append((module, child_name, lora))
    if not wrapped:
        raise UsageError("the model has no linear layers to attach LoRA adapters to")
    return wrapped


def _merge_lora(wrapped: list[tuple[Any, str, Any]]) -> None:
    for parent, child_name, lora in wrapped:
        setattr(parent, child_name, lora.merge())


class _CausalObjective:
    """Next-token cross-entropy on random windows of seq_len tokens; the last windows are held out."""

    name = "next-token cross-entropy"

    def __init__(self, torch: Any, model: Any, tokenizer: Any, text: str, seq_len: int,
                 batch_size: int, generator: Any) -> None:
        self.torch, self.model, self.batch_size, self.generator = torch, model, batch_size, generator
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids) // seq_len
        if n < HELD_OUT_WINDOWS + batch_size:
            raise UsageError(f"the text gives {n} windows of {seq_len} tokens; at least "
                             f"{HELD_OUT_WINDOWS + batch_size} are needed")
        windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
        self.train, self.held_out = windows[: n - HELD_OUT_WINDOWS], windows[n - HELD_OUT_WINDOWS:]

    def step_loss(self) -> torch.Tensor:
        rows = self.torch.randint(len(self.train), (self.batch_size,), generator=self.generator)
        batch = self.train[rows]
        return self.model(input_ids=batch, labels=batch).loss

    def held_out_loss(self) -> float:
        self.model.eval()
        with self.torch.no_grad():
            losses = [float(self.model(input_ids=w[None], labels=w[None]).loss) for w in self.held_out]
        self.model.train()
        return float(np.mean(losses))


def _sentences(text: str) -> list[str]:
    out = []
    for para in text.split("\n"):
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para):
            if 6 <= len(sentence.split()) <= 60:
                out.append(sentence)
    return out


class _SimCSEObjective:
    """Unsupervised SimCSE: two dropout views of each sentence, InfoNCE with in-batch negatives."""

    name = "unsupervised SimCSE (dropout views, InfoNCE, mean pooling, T=0.05)"

    def __init__(self, torch: Any, model: Any, tokenizer: Any, text: str, seq_len: int,
                 batch_size: int, generator: Any, seed: int) -> None:
        if batch_size < 2:
            raise UsageError("the contrastive objective needs at least 2 sentences per batch")
        self.torch, self.model, self.tokenizer = torch, model, tokenizer
        self.seq_len, self.batch_size, self.generator, self.seed = seq_len, batch_size, generator, seed
        sentences = _sentences(text)
        held_out = HELD_OUT_BATCHES * batch_size
        if len(sentences) < held_out + batch_size:
            raise UsageError(f"the text gives {len(sentences)} sentences; at least "
                             f"{held_out + batch_size} are needed")
        self.train = sentences[:-held_out]
        self.held_out = sentences[-held_out:]

    def _loss(self, sentences: list[str]) -> torch.Tensor:
        torch = self.torch
        batch = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.seq_len,
                               return_tensors="pt")
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)

        def embed() -> torch.Tensor:
            hidden = self.model(**batch).last_hidden_state
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return torch.nn.functional.normalize(pooled, dim=-1)

        a, b = embed(), embed()  # dropout differs between the two passes
        logits = a @ b.T / SIMCSE_TEMPERATURE
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(sentences)))

    def step_loss(self) -> torch.Tensor:
        rows = self.torch.randperm(len(self.train), generator=self.generator)[: self.batch_size]
        return self._loss([self.train[int(i)] for i in rows])

    def held_out_loss(self) -> float:
        torch = self.torch
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed + 1)  # the same dropout masks before and after training
        try:
            with torch.no_grad():
                chunks = [self.held_out[i: i + self.batch_size]
                          for i in range(0, len(self.held_out), self.batch_size)]
                losses = [float(self._loss(c)) for c in chunks if len(c) >= 2]
        finally:
            torch.random.set_rng_state(state)
        return float(np.mean(losses))


def _file_names(model: Any, state: dict[str, Any], file_names: list[str]) -> dict[str, str]:
    """file tensor name -> model state name, allowing for a missing or extra base-model prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name in file_names:
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
        for c in candidates:
            if c in state:
                out[name] = c
                break
    return out


def _tensor_names(src: Path) -> list[str]:
    from weightmark.formats.safetensors import Checkpoint

    with Checkpoint.open(src) as ckpt:
        return list(ckpt.tensors)


# -- the attack --------------------------------------------------------------------------------


def finetune_with_stats(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    steps: int = 200,
    lr: float | None = None,
    lora_rank: int | None = None,
    seq_len: int = 256,
    batch_size: int | None = None,
    seed: int = 0,
    text: str | None = None,
    log_every: int = 0,
) -> FinetuneStats:
    """`finetune`, returning the loss curve, held-out loss before/after and time per step too."""
    torch = _require_torch()
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    src, dst = Path(src), Path(dst)
    kind = _model_kind(src)
    if steps < 1 or seq_len < 2:
        raise UsageError("steps must be >= 1 and seq_len >= 2")
    if lora_rank is not None and lora_rank < 1:
        raise UsageError("lora_rank must be a positive integer (or None for a full fine-tune)")
    if lr is None:
        lr = DEFAULT_LR_FULL if lora_rank is None else DEFAULT_LR_LORA
    if batch_size is None:
        batch_size = DEFAULT_CAUSAL_BATCH if kind == "causal-lm" else DEFAULT_ENCODER_BATCH
    if text is None:
        text = english_text(400_000)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(src)
    if kind == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        objective: Any = _CausalObjective(torch, model, tokenizer, text, seq_len, batch_size, generator)
    else:
        model = AutoModel.from_pretrained(src, dtype=torch.float32)
        objective = _SimCSEObjective(torch, model, tokenizer, text, seq_len, batch_size, generator, seed)
    model.train()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False

    names = _tensor_names(src)
    wrapped = _add_lora(torch, model, lora_rank) if lora_rank else []
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    before = objective.held_out_loss()
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(steps):
        loss = objective.step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            rate = (time.perf_counter() - start) / (step + 1)
            print(f"  step {step + 1}/{steps}: loss {losses[-1]:.4f} ({rate:.2f} s/step)",
                  file=sys.stderr)
    seconds_per_step = (time.perf_counter() - start) / steps
    cpu_per_step = (time.process_time() - cpu_start) / steps
    _merge_lora(wrapped)
    after = objective.held_out_loss()

    state = {k: v.detach() for k, v in model.state_dict().items()}
    mapping = _file_names(model, state, names)
    mapped_states = set(mapping.values())
    lost = [n for n, p in model.named_parameters() if n not in mapped_states and p.numel() > 0]
    if lost:
        raise UsageError(f"{src}: trained parameters with no tensor in the checkpoint: {lost[:5]}")

    def trained(name: str, values: np.ndarray) -> np.ndarray:
        if name not in mapping:
            return values
        new = state[mapping[name]].to(torch.float32).numpy()
        if new.size != values.size:
            raise UsageError(f"{src}: tensor {name} has {values.size} elements in the file but "
                             f"{new.size} in the model")
        return new.reshape(values.shape)

    map_floats(src, dst, trained, only_matrices=False)
    objective_name = objective.name + (f", LoRA rank {lora_rank} merged" if lora_rank else "")
    return FinetuneStats(dst, kind, objective_name, steps, batch_size, seq_len, lr, lora_rank,
                         trainable, before, after, seconds_per_step, cpu_per_step, losses)


def finetune(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    steps: int = 200,
    lr: float | None = None,
    lora_rank: int | None = None,
    seq_len: int = 256,
    batch_size: int | None = None,
    seed: int = 0,
    text: str | None = None,
) -> Path:
    """Fine-tune the Hugging Face folder `src` with AdamW and write the result to `dst`.

    Causal LMs train on next-token loss over random windows of `seq_len` tokens (`batch_size`
    windows a step, default 1); BERT encoders on unsupervised SimCSE (`batch_size` sentences a
    step, default 32, truncated to `seq_len` tokens). `lr` defaults to 2e-5 for a full fine-tune
    and 2e-4 for LoRA (`lora_rank`: adapters on every linear layer but the output head, merged
    before saving). `text` defaults to `english_text(400_000)`. Deterministic for a given seed
    on a given machine. Returns `dst`, a copy with the same files, tensor names and dtypes.
    """
    return finetune_with_stats(src, dst, steps, lr, lora_rank, seq_len, batch_size, seed, text).path
