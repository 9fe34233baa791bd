"""Hugging Face transformers subjects, loaded offline from a local folder.

Hook points are module paths as ``model.named_modules()`` spells them (``encoder.layer.2`` is
the residual stream after BERT block 2; GPT-2's are ``h.2`` and so on). Inputs are fixed-length
token windows of a text corpus (see ``sae_clt.corpus``); one activation row per token, special
tokens dropped by default, with provenance (window, position, token id, document id).
Causal check: for encoders, the cosine between the clean and the patched pooled output; for
causal LMs, the next-token cross-entropy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import DataError, SpecError
from ..spec.models import HFSubjectSpec
from .loaded import record_loaded_model


def model_folder(spec: HFSubjectSpec, root: Path) -> Path:
    if spec.path is not None:
        folder = Path(spec.path) if Path(spec.path).is_absolute() else root / spec.path
    else:
        import importlib

        try:
            package = importlib.import_module(spec.package)
        except ImportError:
            raise SpecError(spec.package, [f"subject '{spec.id}': package: cannot import {spec.package!r}; install it "
                                           "(for the example specs: pip install -e '.[hf]')"]) from None
        getter = getattr(package, "get_model_path", None)
        folder = Path(getter()) if getter else Path(package.__file__).parent / "model"
    if not (folder / "config.json").exists():
        raise DataError(f"subject '{spec.id}': {folder} holds no config.json (expected a Hugging Face model folder)")
    return folder


class HFSubject:
    kind = "hf"

    def __init__(self, spec: HFSubjectSpec, model, tokenizer, folder: Path, root: Path):
        self.spec, self.model, self.tokenizer, self.folder, self.root = spec, model.eval(), tokenizer, folder, root
        self.text = None  # the dataset's text section, set by configure()
        self._clean_pooled = None
        self._collected = 0

    @classmethod
    def load(cls, spec: HFSubjectSpec, root: Path) -> "HFSubject":
        try:
            import transformers
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise SpecError(spec.id, [f"subject '{spec.id}' is a Hugging Face model: install the hf extra "
                                      "(pip install -e '.[hf]' or pip install 'sae_clt[hf]')"]) from None
        hf_logging.disable_progress_bar()

        folder = model_folder(spec, root)
        model = getattr(transformers, spec.auto_class).from_pretrained(folder, local_files_only=True, trust_remote_code=False).float()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        return cls(spec, model, tokenizer, folder, root)

    # ------------------------------------------------------------------ interface

    def hook_points(self) -> list[str]:
        from ..data.hooks import module_hook_points

        return module_hook_points(self.model)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            # a sample of each tensor, its first 1,024 values as float32 bytes (converting only
            # those: the whole model's bytes took ~30 ms a call, and collect calls it thrice)
            h.update(tensor.detach().reshape(-1)[:1024].float().numpy().tobytes())
        return h.hexdigest()[:16]

    def configure(self, dataset) -> None:
        if dataset.collect.text is None:
            raise SpecError(dataset.id, [f"dataset '{dataset.id}': collect.text: required for hf subjects (e.g. `text: {{}}` for the built-in corpus)"])
        self.text = dataset.collect.text

    def _special_template(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text (BERT: [CLS] / [SEP])."""
        plain = self.tokenizer("hello world", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("hello world", add_special_tokens=True)["input_ids"]
        start = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
        return full[:start], full[start + len(plain):]

    def windows(self, n_windows: int):
        """Token windows [n, L] built from the corpus stream, plus doc ids per content token
        (-1 for special tokens). Cached: the causal check asks for the same windows per variant."""
        key = (self.text, n_windows)
        if getattr(self, "_windows_key", None) != key:
            self._windows = self._build_windows(n_windows)
            self._windows_key = key
        return self._windows

    def _build_windows(self, n_windows: int):
        from ..data.corpus import read_documents, token_stream

        prefix, suffix = self._special_template()
        content = self.text.context_length - len(prefix) - len(suffix)
        from ..data.corpus import corpus_hash

        docs = read_documents(self.text.corpus, self.root, self.text.jsonl_field)
        self.input_fingerprint = {"corpus": self.text.corpus, "corpus_sha256": corpus_hash(docs), "documents": len(docs)}
        tokens, doc_ids = token_stream(docs, self.tokenizer, n_windows * content)
        available = len(tokens) // content
        if available < n_windows:
            raise DataError(f"text corpus {self.text.corpus!r} gives {available} windows of {self.text.context_length} tokens; "
                            f"{n_windows} were asked for (collect.n_instances plus the causal check's windows)")
        ids, docs_out = [], []
        for w in range(n_windows):
            ids.append(prefix + tokens[w * content:(w + 1) * content] + suffix)
            docs_out.append([-1] * len(prefix) + doc_ids[w * content:(w + 1) * content] + [-1] * len(suffix))
        return torch.tensor(ids), torch.tensor(docs_out)

    def input_batches(self, n_instances: int, seed: int, batch_size: int):
        ids, doc_ids = self.windows(n_instances)
        length = ids.shape[1]
        for start in range(0, n_instances, batch_size):
            batch = ids[start:start + batch_size]
            special = torch.isin(batch, torch.tensor(sorted(self.tokenizer.all_special_ids)))
            keep = ~special.reshape(-1) if self.text.exclude_special_tokens else torch.ones(batch.numel(), dtype=torch.bool)
            provenance = {
                "instance_id": torch.arange(start, start + batch.shape[0]).repeat_interleave(length),
                "position": torch.arange(length, dtype=torch.int32).repeat(batch.shape[0]),
                "token_id": batch.reshape(-1).to(torch.int32),
                "doc_id": doc_ids[start:start + batch.shape[0]].reshape(-1).to(torch.int32),
            }
            yield {"input_ids": batch, "attention_mask": torch.ones_like(batch)}, provenance, keep

    def forward(self, inputs: dict) -> None:
        self.model(**inputs)

    def describe_row(self, instance_id: int, position: int, width: int = 8) -> str:
        """The text around a token of a collected window, the token itself in «»."""
        ids = self.windows(self._collected + self.spec.evaluate.n_windows)[0][instance_id].tolist()
        special = set(self.tokenizer.all_special_ids)

        def text(part: list[int]) -> str:
            return self.tokenizer.decode([t for t in part if t not in special])

        before, token, after = ids[max(0, position - width):position], ids[position:position + 1], ids[position + 1:position + 1 + width]
        return f"{text(before)} «{text(token)}» {text(after)}".strip()

    @torch.no_grad()
    def task_metric(self) -> dict:
        """Encoders: cosine of the pooled output with the clean one; causal LMs: cross-entropy."""
        if self.text is None:
            raise DataError(f"subject '{self.spec.id}': no text configured for the causal check")
        n_eval = self.spec.evaluate.n_windows
        ids = self.windows(self._collected + n_eval)[0][self._collected:]
        if self.spec.auto_class == "AutoModelForCausalLM":
            losses = []
            for batch in ids.split(16):
                logits = self.model(input_ids=batch).logits
                losses.append(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="none"))
            return {"cross_entropy": float(torch.cat(losses).mean())}
        pooled = torch.cat([self._pool(self.model(input_ids=batch).last_hidden_state) for batch in ids.split(16)])
        if self._clean_pooled is None:  # the first call runs with no patch: it is the reference
            self._clean_pooled = pooled
        cos = torch.nn.functional.cosine_similarity(pooled, self._clean_pooled, dim=-1)
        return {"pooled_cosine": float(cos.mean())}

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0] if self.spec.evaluate.pooling == "cls" else hidden.mean(dim=1)

    def prepare_task(self, dataset) -> None:
        """The causal check uses the windows right after the collected ones: never trained on."""
        self.configure(dataset)
        self._collected = dataset.collect.n_instances
        self._clean_pooled = None


def prepare_subject(spec: HFSubjectSpec, root: Path, out_dir: Path, metrics_path: Path, log=print) -> dict:
    """Stage `subject` for an hf model: load it offline, record what was loaded."""
    subject = HFSubject.load(spec, root)
    return record_loaded_model(spec, subject, {"kind": "hf", "model_folder_name": subject.folder.name}, out_dir, metrics_path, log)


# The subject-kind interface (spec.SUBJECT_KINDS)


def load(spec: HFSubjectSpec, subject_dir: Path, root: Path) -> HFSubject:
    return HFSubject.load(spec, root)


def architecture(spec: HFSubjectSpec, root: Path) -> HFSubject:
    return HFSubject.load(spec, root)


def prepare(spec: HFSubjectSpec, root: Path, out_dir: Path, metrics_path: Path, log=print) -> dict:
    return prepare_subject(spec, root, out_dir, metrics_path, log=log)
