"""train attention-MIL slide models (tumour, driver-gene log2FC) with patient-grouped CV.

``histcode finetune --config configs/finetune/deg.yaml --features features.zarr \\
--labels cohort.csv --expression expression.tsv --name NAME [--out DIR] [--trainer.*]``

Options come from typed groups (``--data.*``, ``--model.*``, ``--loss.*``, ``--optim.*``,
``--cv.*``; :mod:`histcode.finetune.options`) and ``--trainer.*`` — every argument of
``pytorch_lightning.Trainer``, given to the Trainer of each fold. ``--config`` reads YAML,
``--print_config`` shows the resolved config; the run saves it as ``config.yaml`` beside
``predictions.csv``, ``metrics.json``, ``plots/`` and ``summary.json``, registers the
selected model(s) and prints one JSON line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: options that take several values the shell way (``--data.genes MYC CD8A``)
LIST_OPTIONS = {"data.tasks", "data.classes", "data.genes", "data.normal_types"}

DESCRIPTION = (
    "Train attention-MIL slide models (tumour vs normal and log2 fold change of driver genes) on "
    "a feature store, with patient-grouped cross-validation; writes predictions.csv, "
    "metrics.json, plots and registers the model(s)."
)


def build_parser(prog: str = "histcode finetune") -> Any:
    """The jsonargparse parser of ``histcode finetune`` (imports Lightning)."""
    from pathlib import Path

    import pytorch_lightning as pl
    from jsonargparse import ActionConfigFile, ArgumentParser

    from histcode.commandkit import with_option_hints
    from histcode.finetune.options import (
        TRAINER_DEFAULTS,
        CVOptions,
        DataOptions,
        LossOptions,
        ModelOptions,
        OptimOptions,
    )

    parser = ArgumentParser(prog=prog, description=DESCRIPTION, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with options.")
    parser.add_argument(
        "--features", type=Path, required=True, help="Feature store (from histcode embed)."
    )
    parser.add_argument(
        "--name", type=str, required=True, help="Checkpoint name of the registered model(s)."
    )
    parser.add_argument(
        "--labels",
        type=Path | None,
        default=None,
        help="Labels CSV (slide_id, patient_id, tumour, optional sample_id and <GENE>_log2fc "
        "columns); unset: the store's slides are labelled from their TCGA barcodes.",
    )
    parser.add_argument(
        "--expression",
        type=Path | None,
        default=None,
        help="Expression matrix, genes × samples (TSV/CSV, TPM or counts), for the genes task.",
    )
    parser.add_argument(
        "--out",
        type=Path | None,
        default=None,
        help="Output folder (default runs/finetune/NAME).",
    )
    parser.add_argument(
        "--registry",
        type=Path | None,
        default=None,
        help="Registry folder (default $HISTCODE_REGISTRY, else ./registry).",
    )
    parser.add_class_arguments(DataOptions, "data", help="Labels, genes and bags.")
    parser.add_class_arguments(ModelOptions, "model", help="Aggregator and head.")
    parser.add_class_arguments(LossOptions, "loss", help="Task loss weights.")
    parser.add_class_arguments(OptimOptions, "optim", help="AdamW.")
    parser.add_class_arguments(CVOptions, "cv", help="Cross-validation and registration.")
    parser.add_class_arguments(
        pl.Trainer,
        "trainer",
        instantiate=False,
        fail_untyped=False,
        sub_configs=True,
        help="pytorch_lightning.Trainer arguments, for every fold's Trainer.",
    )
    parser.set_defaults({f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()})
    return with_option_hints(parser)


def main(argv: Sequence[str], prog: str = "histcode finetune") -> int:
    """``histcode finetune``: parse, run, write ``summary.json``, print one JSON line.

    The parser is this module's (typed option groups and every Trainer argument); the rest is
    the command kit's (:mod:`histcode.commandkit`): usage errors, exit codes, the summary.

    Returns:
        0 ok; 1 some labelled slides had no usable features (listed); 2 unusable arguments.
    """
    import json
    import time
    import warnings

    from histcode.commandkit import (
        EXIT_OK,
        EXIT_PARTIAL,
        USAGE_ERRORS,
        CommandResult,
        finish,
        gather_list_options,
        usage_error,
    )

    parser = build_parser(prog)
    cfg = parser.parse_args(gather_list_options(list(argv), LIST_OPTIONS))
    config_text = parser.dump(cfg, skip_unset=False)
    config = json.loads(parser.dump(cfg, format="json", skip_unset=False))
    config.pop("config", None)
    try:
        init = parser.instantiate(cfg)
    except USAGE_ERRORS as err:  # an option group's own check (e.g. --cv.anndata)
        return usage_error(prog, err)

    def trainer_kwargs() -> dict[str, Any]:  # fresh callbacks / loggers for every Trainer
        return dict(parser.instantiate(cfg).trainer.as_dict())

    from histcode.finetune.pipeline import run_finetune

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            run = run_finetune(
                features=init.features,
                name=init.name,
                labels=init.labels,
                expression=init.expression,
                out=init.out,
                registry=init.registry,
                data=init.data,
                model=init.model,
                loss=init.loss,
                optim=init.optim,
                cv=init.cv,
                trainer=trainer_kwargs,
                config_text=config_text,
            )
    except USAGE_ERRORS as err:
        return usage_error(prog, err)
    failed = run.selection.failed()
    details = {
        "files": [str(p) for p in run.files],
        "slides_without_features": run.selection.no_features,
        "slides_not_ok": run.selection.not_ok,
        "slides_without_labels": run.selection.no_labels,
        "label_warnings": run.labels.warnings,
    }
    outcome = CommandResult(
        out_dir=run.out,
        result=run.result(),
        details=details,
        exit_code=EXIT_PARTIAL if failed else EXIT_OK,
    )
    return finish(outcome, "finetune", config, time.perf_counter() - start)
