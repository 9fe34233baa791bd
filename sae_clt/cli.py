"""The `saeclt` command line. Thin: each command parses arguments and calls one plain
function. Heavy modules (torch, dvc, matplotlib) are imported inside commands only."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

import typer

from .errors import SaecltError

app = typer.Typer(
    name="saeclt",
    help=(
        "Train and evaluate sparse dictionaries (SAEs, transcoders) on a network's activations, "
        "driven by YAML specs and run as DVC stages.\n\n"
        "Examples:\n\n"
        "  saeclt run specs/clt_L0_L2.yaml      # the spec's whole chain, incremental\n\n"
        "  saeclt validate                      # check every spec without running anything\n\n"
        "  saeclt inspect specs/sae_L2.yaml     # statistics of the spec's source/target activations\n\n"
        "  saeclt import-acts acts.safetensors --id my_acts --experiment my_sae   # bring your own activations\n\n"
        "  saeclt convert specs/minilm_sae_L2.yaml --to saelens   # load it with SAELens (or --to sparsify)\n\n"
        "  saeclt compare specs/minilm_sae_L2.yaml other_sae/    # beside a SAELens / sparsify dictionary\n\n"
        "  saeclt steer specs/clt_L0_L2.yaml --feature 17 --scale 0   # ablate a latent, measure the effect\n\n"
        "  saeclt sweep specs/sae_L2.yaml --grid model.k=16,32,64   # a grid of variants and their FVU-L0 frontier\n\n"
        "  saeclt trace specs/clt_L0_L2.yaml specs/sae_L2.yaml   # which transcoder features make each SAE feature\n\n"
        "  dvc repro                            # every experiment listed in params.yaml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug or bool(os.environ.get("SAECLT_DEBUG"))


MAX_LINE = 2000  # characters of one message line printed
MAX_LINES = 200  # lines of one message printed


def _capped(text: str) -> str:
    """A message bounded in size: long lines cut, and at most MAX_LINES lines."""
    from .spec.models import cap

    lines = text.splitlines() or [""]
    shown = [cap(line, MAX_LINE) for line in lines[:MAX_LINES]]
    if len(lines) > MAX_LINES:
        shown.append(f"… ({len(lines) - MAX_LINES} more lines)")
    return "\n".join(shown)


def _fail(exc: BaseException) -> None:
    """Map errors to a message and exit code in one place."""
    if _state["debug"]:
        raise exc
    if isinstance(exc, SaecltError):
        typer.echo(_capped(f"error: {exc}"), err=True)
        raise typer.Exit(exc.exit_code)
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        typer.echo("error: out of memory. Complete outputs were kept: finished shards of a collection (it resumes "
                   "after the last one) and the last training checkpoint (training resumes from it). Lower "
                   "collect.batch_size, train.batch_size or evaluate.batch_size and rerun.", err=True)
        raise typer.Exit(3)
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        typer.echo(f"error: no space left on device ({_capped(str(exc.filename or 'while writing'))}). Complete outputs were kept "
                   "(finished shards, the last checkpoint); free space or set $ACTIVATIONS_ROOT, then rerun to resume.", err=True)
        raise typer.Exit(3)
    if isinstance(exc, KeyboardInterrupt):
        typer.echo("interrupted; complete outputs were kept, partial ones discarded", err=True)
        raise typer.Exit(130)
    typer.echo(_capped(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"), err=True)
    raise typer.Exit(1)


def _spec_files(specs: List[Path]) -> List[Path]:
    if specs:
        return specs
    from .spec.project import find_root

    root = find_root()
    return sorted((root / "specs").glob("*.yaml")) + sorted((root / "specs" / "datasets").glob("*.yaml")) + sorted(
        (root / "specs" / "subjects").glob("*.yaml")
    )


@app.command()
def validate(
    specs: List[Path] = typer.Argument(None, help="Spec files; default: every spec under specs/."),
    import_subjects: bool = typer.Option(False, "--import-subjects", help="Also check the hook points of torch subjects "
                                         "by importing their factory's module and building the model (runs that code; "
                                         "the result is cached)."),
) -> None:
    """Check specs (fields, types, cross-references, hook points, params.yaml) without running anything.

    A torch subject's hook points are checked from the cache that `--import-subjects` (or a run)
    fills; without it they are skipped with a note.

    Example: saeclt validate specs/clt_L0_L2.yaml
    """
    notes: list[str] = []
    try:
        from .spec.validation import validate_files

        files = _spec_files(specs)
        problems = validate_files(files, import_subjects=import_subjects, notes=notes)
    except BaseException as exc:  # noqa: BLE001 - mapped to a message in _fail
        _fail(exc)
    for line in notes:
        typer.echo(_capped(f"note: {line}"), err=True)
    if problems:
        for line in problems[:MAX_LINES]:
            typer.echo(_capped(line), err=True)
        if len(problems) > MAX_LINES:
            typer.echo(f"… ({len(problems) - MAX_LINES} more problems)", err=True)
        raise typer.Exit(2)
    typer.echo(f"ok: {len(files)} spec(s) valid" + (f" ({len(notes)} note(s) above)" if notes else ""))


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Experiment spec, e.g. specs/clt_L0_L2.yaml."),
) -> None:
    """Run an experiment's whole chain (subject, collect, normalize, train, evaluate, analyze, report, export)
    through DVC; stages whose inputs did not change are skipped.

    Example: saeclt run specs/clt_L0_L2.yaml
    """
    try:
        from .stages.run import run_experiment

        run_experiment(spec)
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def stage(
    name: str = typer.Argument(..., help="subject | collect | normalize | train | evaluate | analyze | report | export (the stage table: sae_clt/stages/table.py)"),
    spec: Path = typer.Argument(..., help="The spec the stage reads (subject, dataset or experiment spec)."),
    shard: str = typer.Option(None, help="collect only: 'i/n' = worker i of n (0-based) collects its own run of inputs; "
                              "the plain collect stage merges the parts once all n are complete."),
) -> None:
    """Run one stage directly (what dvc.yaml calls).

    Example: saeclt stage train specs/sae_L2.yaml

    Sharded collection over N workers, then the merge:
    saeclt stage collect specs/datasets/D.yaml --shard 0/N  (... up to N-1/N)  then  saeclt stage collect specs/datasets/D.yaml

    Data-parallel training over N processes (gloo on CPU, nccl on GPU; each reads its own shards):
    torchrun --standalone --nproc_per_node N -m sae_clt stage train specs/sae_L2.yaml
    """
    try:
        from .stages.table import run_stage

        part = None
        if shard is not None:
            import re

            from .errors import SpecError

            m = re.fullmatch(r"(\d+)/(\d+)", shard)
            if not m or not int(m.group(1)) < int(m.group(2)):
                raise SpecError(str(spec), [f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4"])
            part = (int(m.group(1)), int(m.group(2)))
        run_stage(name, spec, part)
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command("dvc-yaml")
def dvc_yaml(
    check: bool = typer.Option(False, "--check", help="Write nothing; fail (exit 4) if dvc.yaml differs from the generated one."),
) -> None:
    """Write dvc.yaml from the stage table (sae_clt/stages/table.py): each stage's command, the spec
    sections it reads, its data, and every source file its module imports as a dependency.

    Example: saeclt dvc-yaml --check
    """
    try:
        from .errors import PipelineError
        from .io import atomic_write_text
        from .spec.project import find_root
        from .stages.dvc_yaml import render

        path = find_root() / "dvc.yaml"
        text = render()
        current = path.read_text() if path.exists() else ""
        if check:
            if current != text:
                raise PipelineError(f"{path}: differs from the stage table; run `saeclt dvc-yaml` and commit it")
            typer.echo(f"ok: {path.name} matches the stage table")
            return
        if current != text:
            atomic_write_text(path, text)
        typer.echo(f"wrote {path}" if current != text else f"{path.name} is up to date")
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def inspect(
    spec: Path = typer.Argument(..., help="Experiment spec whose source/target activations to describe."),
    max_rows: int = typer.Option(200_000, help="Rows of the training split to read."),
) -> None:
    """Print statistics of the dataset an experiment reads: norms, per-dim spread, fraction of
    zeros, and how well the source predicts the target (correlations, linear R²).

    Example: saeclt inspect specs/clt_L0_L2.yaml
    """
    try:
        from .data.inspect import inspect_experiment

        typer.echo(inspect_experiment(spec, max_rows))
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def index(specs: List[Path] = typer.Argument(None, help="Experiment specs to list; default: those already listed.")) -> None:
    """Rewrite params.yaml (the experiments `dvc repro` runs) from the specs. A listed experiment
    whose spec file no longer exists is dropped, with a warning.

    Example: saeclt index specs/sae_L2.yaml specs/clt_L0_L2.yaml
    """
    try:
        from .spec.project import Paths, find_root, read_index, write_index

        paths = Paths(find_root())
        absent = [str(s) for s in specs or [] if not Path(s).is_file()]
        if absent:
            from .errors import SpecError

            raise SpecError(absent[0], [f"{s}: no such spec file" for s in absent])
        ids = [Path(s).stem for s in specs] if specs else list(read_index(paths)["experiments"])
        result = write_index(paths, ids)
        typer.echo(f"params.yaml: {len(result['experiments'])} experiment(s)")
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command("import-acts")
def import_acts(
    files: List[Path] = typer.Argument(..., help="Activation files: .safetensors (named [N, d] tensors, aligned rows) or .npy ([N, d] each, named by the file's stem)."),
    id: str = typer.Option(..., "--id", help="Dataset id: writes specs/subjects/ID.yaml and specs/datasets/ID.yaml."),
    rows_per_instance: int = typer.Option(1, help="Consecutive rows forming one input, kept on one side of the train/validation split (e.g. the context length)."),
    val_fraction: float = typer.Option(0.1, help="Fraction of inputs held out for validation."),
    experiment: str = typer.Option(None, help="Also write specs/EXPERIMENT.yaml: a TopK SAE (8x width, k = min(32, dim/4)) on the first tensor."),
    force: bool = typer.Option(False, help="Overwrite existing specs of the same ids."),
) -> None:
    """Turn activations recorded elsewhere into a dataset that experiment specs can name.

    The files stay where they are; `saeclt run` copies their rows into a checksummed store and
    trains, evaluates (no causal check: there is no model), reports and exports as usual.

    Example: saeclt import-acts acts.safetensors --id my_acts --experiment my_sae && saeclt run specs/my_sae.yaml
    """
    try:
        from .data.importing import describe_import, import_activations
        from .spec.project import find_root

        root = find_root()
        written = import_activations(files, id, root, rows_per_instance, val_fraction, experiment, force)
        typer.echo(describe_import(files, id))
        for path in written:
            typer.echo(f"wrote {path.relative_to(root)}")
        next_spec = f"specs/{experiment}.yaml" if experiment else "specs/<your experiment>.yaml (with `dataset: " + id + "`)"
        typer.echo(f"next: saeclt run {next_spec}")
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def convert(
    spec: Path = typer.Argument(..., help="Experiment spec whose trained dictionary to write (train it first: saeclt run SPEC)."),
    to: str = typer.Option(..., "--to", help="Format: saelens (SAE.load_from_disk) or sparsify (SparseCoder.load_from_disk)."),
    out: Path = typer.Option(None, help="Folder to write (a new one, or one holding only a dictionary, which is replaced); default runs/experiments/ID/FORMAT/."),
) -> None:
    """Write an experiment's trained dictionary in SAELens' or sparsify's format.

    The store's normalisation is folded into the weights, so the written dictionary takes the
    subject's raw activations (checked on sample rows against saeclt's own reconstruction before
    anything is written). SAELens: TopK / JumpReLU / ReLU SAEs, BatchTopK as JumpReLU, ReLU and
    JumpReLU (skip-)transcoders; sparsify: TopK SAEs and transcoders.

    Example: saeclt convert specs/minilm_sae_L2.yaml --to saelens
    then, in Python: sae_lens.SAE.load_from_disk("runs/experiments/minilm_sae_L2/saelens")
    """
    try:
        from .interop.formats import convert_experiment

        result = convert_experiment(spec, to, out)
        folder = Path(result["folder"])
        shown = folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder
        typer.echo(f"wrote {shown} ({', '.join(result['files'])}; {result['format']} architecture "
                   f"{result['architecture']}); the folded weights reproduce saeclt's reconstruction on sample rows "
                   f"(float64, largest difference {result['max_error']:.1e} target scales)")
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def compare(
    spec: Path = typer.Argument(..., help="Experiment spec: its validation rows, and its trained dictionary if there is one."),
    folders: List[Path] = typer.Argument(None, help="Dictionaries saved by SAELens (cfg.json + sae_weights.safetensors) or sparsify (cfg.json + sae.safetensors)."),
    out: Path = typer.Option(None, help="JSON file to write; default runs/experiments/ID/compare.json."),
    max_rows: int = typer.Option(None, help="Stop after this many validation rows (default: all)."),
) -> None:
    """Measure an experiment's dictionary beside SAELens / sparsify dictionaries on the same rows.

    The same held-out rows and metric definitions as the evaluate stage (FVU, cosine, L0, dead
    and dense fractions); the table is printed and written as JSON.

    External dictionaries must take the subject's raw activations at the experiment's source
    hook point (and write its target's): e.g. one trained with SAELens or sparsify on the same
    activations, or one written by `saeclt convert`.

    Example: saeclt compare specs/minilm_sae_L2.yaml path/to/saelens_sae path/to/sparsify/layer2
    """
    try:
        from .interop.compare import compare_experiment, comparison_table

        typer.echo(comparison_table(compare_experiment(spec, list(folders or []), out, max_rows)))
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def steer(
    spec: Path = typer.Argument(..., help="Experiment spec whose trained dictionary to splice in (train it first: saeclt run SPEC)."),
    feature: List[int] = typer.Option(None, "--feature", "-f", help="A latent to change (repeatable); the operation applies to each."),
    scale: float = typer.Option(None, "--scale", help="Multiply the latents by V (0 ablates them)."),
    set_value: float = typer.Option(None, "--set", help="Set the latents to V on every row."),
    clamp: float = typer.Option(None, "--clamp", help="Cap the latents at V (with --low L, also raise them to at least L)."),
    add: float = typer.Option(None, "--add", help="Add V to the latents on every row."),
    low: float = typer.Option(None, "--low", help="--clamp only: the lower bound."),
    mode: str = typer.Option(None, "--mode", help="bypass | no-change | edit; default: edit when latents are named, else no-change."),
    no_error: bool = typer.Option(False, "--no-error", help="Drop the reconstruction error term (the output is the "
                                  "dictionary's reconstruction itself, not the original plus the edit)."),
    intervention: str = typer.Option(None, "--intervention", "-i", help="Run one of the spec's own `interventions:` by name "
                                     "(instead of --feature and an operation)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Splice an experiment's trained dictionary into its subject, change latents, and measure the effect.

    Modes: bypass = subject untouched; no-change = target replaced by the reconstruction (the original again while the error term is kept); edit = latents changed before decoding (only the edit changes the output while the error term is kept).

    Measured in the subject's task against one clean run: TSP tour length and decisions changed; causal LMs cross-entropy, KL(clean || edited), top-1 agreement and the tokens that moved; encoders the pooled-output cosine; torch modules the output cosine.

    Exit codes: 2 for conflicting options or a feature out of range; 3 when the dictionary (or its data) does not exist yet.

    Examples:

      saeclt steer specs/clt_L0_L2.yaml --feature 17 --scale 0   # ablate 17

      saeclt steer specs/minilm_sae_L2.yaml -f 5 -f 9 --set 4 --json

      saeclt steer specs/sae_L2.yaml --feature 3 --clamp 1.5 --low 0.5

      saeclt steer specs/sae_L2.yaml --mode no-change --no-error

      saeclt steer specs/clt_L0_L2.yaml --intervention silence_17   # one of the spec's interventions:
    """
    try:
        import json

        from .interventions.steer import edits_from_options, effects_table, named_intervention
        from .interventions.steer import steer as run_steer

        ops = {"scale": scale, "set": set_value, "clamp": clamp, "add": add}
        if intervention is not None:
            given = [f"--{k}" for k, v in {**ops, "feature": feature or None, "low": low, "mode": mode}.items() if v is not None]
            given += ["--no-error"] if no_error else []
            name, edits, keep_error = named_intervention(spec, intervention, given)
            result = run_steer(spec, name, edits, keep_error, name=intervention)
        else:
            name, edits, keep_error = edits_from_options(list(feature or []), ops, low, mode, no_error)
            result = run_steer(spec, name, edits, keep_error)
        typer.echo(json.dumps(result, indent=2) if as_json else effects_table(result))
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="The base experiment spec, e.g. specs/sae_L2.yaml."),
    grid: List[str] = typer.Option(None, "--grid", "-g", help="FIELD=V1,V2,...: a spec field's dotted path and the values "
                                   "to try (repeatable; every combination runs)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the variants and check their specs; write and run nothing."),
) -> None:
    """Run a grid of variants of an experiment and summarise them (the FVU–L0 frontier).

    Each combination becomes an ordinary experiment spec beside the base, specs/<base>-<name><value>.yaml, run through DVC like any other (the subject and dataset are shared; a variant already run is skipped), and listed in params.yaml. The summary goes to reports/sweeps/<base>-<names>/: sweep.md (a table of FVU, L0, dead and dense fractions, the causal check), sweep.json and frontier.svg.

    Exit codes: 2 for a grid value the spec does not accept (named by its --grid key) or a variant file that was not written by a sweep; a failing variant's own code otherwise (the variants before it are summarised).

    Examples:

      saeclt sweep specs/sae_L2.yaml --grid model.k=16,32,64

      saeclt sweep specs/sae_L2.yaml -g model.k=16,64 -g train.lr=3e-3,1e-2   # four variants

      saeclt sweep specs/minilm_sae_L2.yaml -g model.activation=topk,batchtopk --dry-run
    """
    try:
        import shlex

        from .sweeps import run_sweep

        command = shlex.join(["saeclt", "sweep", str(spec), *(f"--grid={g}" for g in grid or [])])
        run_sweep(spec, list(grid or []), command, dry_run=dry_run, log=lambda line: typer.echo(line, err=True))
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def trace(
    upstream: Path = typer.Argument(..., help="Experiment spec of the dictionary that writes the hook point, e.g. specs/clt_L0_L2.yaml."),
    downstream: Path = typer.Argument(..., help="Experiment spec of the dictionary that reads it, e.g. specs/sae_L2.yaml."),
    features: int = typer.Option(16, "--features", min=1, help="Downstream features shown (the highest-scoring that fire)."),
    inputs: int = typer.Option(8, "--inputs", min=1, help="Upstream inputs listed per downstream feature (the largest by |contribution|)."),
    rows: int = typer.Option(4096, "--rows", min=1, help="Held-out rows traced (the first N of the validation split)."),
    as_json: bool = typer.Option(False, "--json", help="Print trace.json instead of the table."),
) -> None:
    """Feature-to-feature edges between two dictionaries in series: which upstream features make up each downstream feature.

    The upstream dictionary must write the hook point the downstream one reads (its target, or one layer of a CLT's targets), on the same dataset. With the upstream reconstruction standing in for that activation, each downstream pre-activation splits exactly into upstream features (activation x virtual weight W_dec_up . W_enc_down), the upstream error and the biases; averaged over the held-out rows where the downstream feature fires.

    Writes reports/traces/<up>--<down>/: trace.md (a table), trace.json (per feature, and as nodes and links), trace.svg (the strongest edges).

    Exit codes: 2 when the two do not connect (hook points, datasets); 3 when a dictionary is not trained yet.

    Examples:

      saeclt trace specs/clt_L0_L2.yaml specs/sae_L2.yaml   # transcoder layer 0->2 features into layer-2 SAE features

      saeclt trace specs/clt_L0_L1_L2.yaml specs/sae_L2.yaml --features 8 --inputs 4
    """
    try:
        import json

        from .circuits import run_trace
        from .circuits.graph import table

        out, doc = run_trace(upstream, downstream, features, inputs, rows)
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
        else:
            typer.echo(table(doc))
            typer.echo(f"\nwritten: {out / 'trace.md'}, {out / 'trace.json'}, {out / 'trace.svg'}", err=True)
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


def entry() -> None:
    app()


if __name__ == "__main__":
    sys.exit(entry())
