"""Hugging Face transformers subjects, loaded offline from a local folder.

Hook points are module paths as ``model.named_modules()`` spells them (``encoder.layer.2`` is
the residual stream after BERT block 2; GPT-2's are ``h.2`` and so on). Inputs are fixed-length
token windows of a text corpus (see ``sae_clt.corpus``); one activation row per token, special
tokens dropped by default, with provenance (window, position, token id, document id).
Causal check: for encoders, the cosine between the clean and the patched pooled output; for
causal LMs, the next-token cross-entropy, KL(clean ‖ patched) and top-1 agreement with the clean
run. Interventions (``task_reference`` / ``task_effects``) measure the same against one clean run.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch

from ..data.corpus import corpus_hash, read_documents, token_stream
from ..data.hooks import module_hook_points
from ..errors import DataError, SpecError
from ..spec.models import HFSubjectSpec
from .loaded import record_loaded_model
from .placement import OnDevice


def model_folder(spec: HFSubjectSpec, root: Path) -> Path:
    if spec.path is not None:
        folder = Path(spec.path) if Path(spec.path).is_absolute() else root / spec.path
    else:
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


class HFSubject(OnDevice):
    kind = "hf"

    def __init__(self, spec: HFSubjectSpec, model, tokenizer, folder: Path, root: Path):
        self.spec, self.model, self.tokenizer, self.folder, self.root = spec, model.eval(), tokenizer, folder, root
        self.text = None  # the dataset's text section, set by configure()
        self._clean_pooled = None
        self._clean_lm = None  # a causal LM's clean next-token distributions (see _lm_pass)
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
        model = getattr(transformers, spec.auto_class).from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model = model.to(getattr(torch, spec.dtype))  # the spec's dtype (float32 unless it says float16 / bfloat16)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        return cls(spec, model, tokenizer, folder, root)

    # ------------------------------------------------------------------ interface

    def hook_points(self) -> list[str]:
        return module_hook_points(self.model)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            # a sample of each tensor, its first 1,024 values as float32 bytes (converting only
            # those: the whole model's bytes took ~30 ms a call, and collect calls it thrice)
            h.update(tensor.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
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
        prefix, suffix = self._special_template()
        content = self.text.context_length - len(prefix) - len(suffix)

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
        self.model(**self.on_device(inputs))

    def describe_row(self, instance_id: int, position: int, width: int = 8) -> str:
        """The text around a token of a collected window, the token itself in «»."""
        ids = self.windows(self._collected + self.spec.evaluate.n_windows)[0][instance_id].tolist()
        special = set(self.tokenizer.all_special_ids)

        def text(part: list[int]) -> str:
            return self.tokenizer.decode([t for t in part if t not in special])

        before, token, after = ids[max(0, position - width):position], ids[position:position + 1], ids[position + 1:position + 1 + width]
        return f"{text(before)} «{text(token)}» {text(after)}".strip()

    def _eval_ids(self) -> torch.Tensor:
        """The held-out windows [n_windows, L]: the ones right after the collected windows."""
        if self.text is None:
            raise DataError(f"subject '{self.spec.id}': no text configured for the causal check")
        return self.windows(self._collected + self.spec.evaluate.n_windows)[0][self._collected:]

    @property
    def causal_lm(self) -> bool:
        return self.spec.auto_class == "AutoModelForCausalLM"

    @torch.no_grad()
    def task_metric(self) -> dict:
        """Encoders: cosine of the pooled output with the clean one. Causal LMs: next-token
        cross-entropy, KL(clean ‖ this run) of the next-token distributions averaged over
        positions, and the fraction of positions whose most likely next token is the clean one.
        The first call runs with no patch: it is the reference of the later ones."""
        ids = self._eval_ids()
        if self.causal_lm:
            run, reference = self._lm_pass(ids, self._clean_lm)
            self._clean_lm = reference
            return {"cross_entropy": run["cross_entropy"], "kl_from_clean": run["kl"], "top1_agreement": run["top1_agreement"]}
        pooled = self._pooled(ids)
        if self._clean_pooled is None:  # the first call runs with no patch: it is the reference
            self._clean_pooled = pooled
        cos = torch.nn.functional.cosine_similarity(pooled, self._clean_pooled, dim=-1)
        return {"pooled_cosine": float(cos.mean())}

    def _lm_pass(self, ids: torch.Tensor, reference: dict | None) -> tuple[dict, dict]:
        """One run of the causal LM over the windows ``ids``: (this run's measures, the reference).

        Without a reference this run becomes it: per position the top-k next-token
        log-probabilities (every token when positions × vocabulary fit in LM_REFERENCE_BYTES, else
        as many as fit, the rest pooled into one bucket, which makes the KL a lower bound that is
        exact up to the clean mass outside the top k) and the argmax, plus the mean probabilities.
        """
        build = reference is None
        if build:
            reference = {"batches": [], "cross_entropy": None, "mean_probs": None}
        losses, kls, agree, prob_sum = [], [], [], None
        positions = ids.shape[0] * (ids.shape[1] - 1)
        for b, batch in enumerate(ids.split(16)):
            batch = self.on_device(batch)
            logits = self.model(input_ids=batch).logits
            logp = logits[:, :-1].flatten(0, 1).float().log_softmax(dim=-1)  # [positions, vocab], float32 whatever the model's dtype
            losses.append(-logp.gather(1, batch[:, 1:].reshape(-1, 1)).squeeze(1))  # next-token cross-entropy
            if build:
                reference["batches"].append(lm_reference_batch(logp, positions))
            ref = reference["batches"][b]
            kls.append(lm_kl(ref, logp))
            agree.append(logp.argmax(dim=-1) == ref["top1"])
            probs = logp.exp().sum(dim=0)
            prob_sum = probs if prob_sum is None else prob_sum + probs
        run = {"cross_entropy": float(torch.cat(losses).mean()), "kl": float(torch.cat(kls).mean()),
               "top1_agreement": float(torch.cat(agree).float().mean()), "mean_probs": prob_sum / positions}
        if build:
            reference["cross_entropy"], reference["mean_probs"] = run["cross_entropy"], run["mean_probs"]
        return run, reference

    @torch.no_grad()
    def task_reference(self) -> dict:
        """The clean run (nothing patched) that ``task_effects`` compares with: causal LMs' next-token
        distributions and cross-entropy, encoders' pooled outputs."""
        ids = self._eval_ids()
        if self.causal_lm:
            return self._lm_pass(ids, None)[1]
        return {"pooled": self._pooled(ids)}

    @torch.no_grad()
    def task_effects(self, reference: dict, top_tokens: int = 10) -> dict:
        """The task under whatever patches are active, against the clean ``reference``. Causal LMs:
        cross-entropy (now, clean, change), KL(clean ‖ now) averaged over positions, top-1
        agreement, and the ``top_tokens`` tokens whose mean probability over positions moved most
        ([[token, change], ...], largest |change| first). Encoders: the pooled-output cosine."""
        ids = self._eval_ids()
        if not self.causal_lm:
            pooled = self._pooled(ids)
            return {"pooled_cosine": float(torch.nn.functional.cosine_similarity(pooled, reference["pooled"], dim=-1).mean())}
        run, _ = self._lm_pass(ids, reference)
        moved = run["mean_probs"] - reference["mean_probs"]
        order = moved.abs().argsort(descending=True)[:top_tokens]
        return {"cross_entropy": run["cross_entropy"], "cross_entropy_clean": reference["cross_entropy"],
                "cross_entropy_change": run["cross_entropy"] - reference["cross_entropy"],
                "kl_clean_edited": run["kl"], "top1_agreement": run["top1_agreement"],
                "top_tokens_moved": [[self.tokenizer.decode([int(t)]), float(moved[t])] for t in order]}

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()  # (a float16 / bfloat16 model: pooled in float32)
        return hidden[:, 0] if self.spec.evaluate.pooling == "cls" else hidden.mean(dim=1)

    def _pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled outputs [n, d] (float32, on the subject's device) over windows ``ids``."""
        return torch.cat([self._pool(self.model(input_ids=self.on_device(batch)).last_hidden_state) for batch in ids.split(16)])

    def prepare_task(self, dataset) -> None:
        """The causal check uses the windows right after the collected ones: never trained on."""
        self.configure(dataset)
        self._collected = dataset.collect.n_instances
        self._clean_pooled = None
        self._clean_lm = None


LM_REFERENCE_BYTES = 256 * 2**20  # memory for a causal LM's clean next-token distributions


def lm_reference_batch(logp: torch.Tensor, positions: int) -> dict:
    """What a causal LM's clean run keeps of one batch's next-token log-probabilities
    ``logp`` [rows, vocab]: the argmax, and the top ``k`` log-probabilities with their token ids,
    k = the whole vocabulary when all ``positions`` of the run fit in LM_REFERENCE_BYTES (then no
    ids are kept)."""
    vocab = logp.shape[-1]
    k = max(1, min(vocab, LM_REFERENCE_BYTES // (8 * positions)))
    top1 = logp.argmax(dim=-1)
    if k == vocab:
        return {"top1": top1, "logp": logp, "index": None}
    values, index = logp.topk(k, dim=-1)
    return {"top1": top1, "logp": values, "index": index.int()}


def lm_kl(ref: dict, logp: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ run) per position [rows] from a clean batch ``ref`` (``lm_reference_batch``) and
    this run's log-probabilities ``logp``; with a top-k reference, the tokens outside the top k
    form one bucket."""
    p_log = ref["logp"]
    if ref["index"] is None:
        return (p_log.exp() * (p_log - logp)).sum(dim=-1)
    q_log = logp.gather(1, ref["index"].long())
    kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1)
    rest_p = (1.0 - p_log.exp().sum(dim=-1)).clamp_min(0.0)
    rest_q = (1.0 - q_log.exp().sum(dim=-1)).clamp_min(1e-30)
    return kl + torch.where(rest_p > 0, rest_p * (rest_p.clamp_min(1e-30).log() - rest_q.log()), torch.zeros_like(rest_p))


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
