"""The ``histcode pretrain`` run: LightningCLI wiring, resume, registration, summary.

:class:`PretrainCLI` is a ``LightningCLI`` over
:class:`~histcode.pretrain.module.ContrastiveModule` (``--model.method simclr|moco``) and
:class:`~histcode.pretrain.data.TileDataModule` with four extra options (``--name``,
``--registry``, ``--out``, ``--resume``), a configurable ``ModelCheckpoint`` (``--checkpoint.*``),
the collapse checks (``--collapse.*``, :class:`~histcode.pretrain.collapse.CollapseMonitor`)
and links that make the encoder's input spec follow the tile store (``data.mpp`` →
``model.mpp``, ``data.tile_size`` → ``model.tile_size``), so the registered card says which
tiles the encoder was trained on. :func:`run` parses, resumes from ``<out>/checkpoints/
last.ckpt`` when it exists, trains, and registers the encoder on process 0.

``LightningCLI`` stays the parser (every ``--trainer.*``, ``--model.*``, ``--data.*`` and
``--checkpoint.*`` option, Lightning's own config handling); everything around it is the
command kit's (:mod:`histcode.commandkit`): one-line parse errors with option hints, usage
errors, exit statuses (0, 2, 130 interrupted), ``summary.json`` and the result line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from histcode.commandkit import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    USAGE_ERRORS,
    CommandResult,
    finish,
    usage_error,
    with_option_hints,
)
from histcode.encoders import encoder_card
from histcode.lineage import tiles_parent
from histcode.registry import Registry, check_name, default_root

from .collapse import CollapseMonitor, read_report
from .data import TileDataModule
from .module import ContrastiveModule

log = logging.getLogger("histcode.pretrain")

LAST = "last.ckpt"
#: steps between progress-bar refreshes (unless --trainer.callbacks sets a progress bar)
PROGRESS_EVERY = 10


class SaveConfigToOut(SaveConfigCallback):
    """Write the resolved config as ``<out>/config.yaml`` (the run folder, not a log version)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        path = Path(trainer.default_root_dir) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_unset=False, overwrite=True)


class SaveOnInterrupt(Callback):
    """On Ctrl-C in a single-process run, save ``last.ckpt`` so a rerun loses no steps.

    (Multi-process runs rely on the periodic ``ModelCheckpoint``: saving from one process
    after an interrupt would wait forever for the others.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exc: BaseException
    ) -> None:
        if isinstance(exc, KeyboardInterrupt) and trainer.world_size == 1 and trainer.global_step:
            trainer.save_checkpoint(self.path)
            log.info("saved %s at step %d", self.path, trainer.global_step)


class PretrainCLI(LightningCLI):
    """``LightningCLI`` for contrastive pretraining with histcode's run folder and registry."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        return with_option_hints(super().init_parser(**kwargs))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--name",
            type=str,
            required=True,
            help="Registry name of the encoder (e.g. simclr-r18).",
        )
        parser.add_argument(
            "--registry",
            type=str | None,
            default=None,
            help="Registry root (default: $HISTCODE_REGISTRY, else ./registry).",
        )
        parser.add_argument(
            "--out",
            type=str | None,
            default=None,
            help="Run folder: config, checkpoints, logs, summary.json (runs/pretrain/NAME).",
        )
        parser.add_argument(
            "--resume",
            type=bool,
            default=True,
            help="Resume from <out>/checkpoints/last.ckpt when it exists (false: start over).",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(CollapseMonitor, "collapse")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "checkpoint.every_n_train_steps": 500,
            }
        )
        parser.link_arguments("data.mpp", "model.mpp", apply_on="instantiate")
        parser.link_arguments("data.tile_size", "model.tile_size", apply_on="instantiate")
        parser.link_arguments("registry", "model.registry")

    def before_instantiate_classes(self) -> None:
        config = self.config
        check_name(config.name)
        out = Path(config.out or Path("runs") / "pretrain" / config.name)
        config.out = str(out)
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(out)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(out / "checkpoints")

    @property
    def collapse_monitor(self) -> CollapseMonitor | None:
        """The run's collapse checks (one instance, made from ``--collapse.*``)."""
        found = [c for c in self.trainer.callbacks if isinstance(c, CollapseMonitor)]
        return found[0] if found else None

    @property
    def last_checkpoint(self) -> Path:
        return Path(self.config.checkpoint.dirpath) / LAST

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        callbacks = [*self._listed_callbacks(), SaveOnInterrupt(self.last_checkpoint)]
        wants_bar = self.config.trainer.enable_progress_bar is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            # the bar reads the loss from the device: refreshing every step would stall the
            # accelerator's queue on a host sync each step
            callbacks.append(TQDMProgressBar(refresh_rate=PROGRESS_EVERY))
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def _listed_callbacks(self) -> list[Callback]:
        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        return list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]


#: Lightning warnings that say nothing to a histcode user (we chose these on purpose).
QUIET_WARNINGS = (
    ".*LightningCLI's args parameter.*",  # we pass argv explicitly; sys.argv is the dispatcher's
    ".*`tensorboardX` has been removed.*",  # the CSV logger is our default
    ".*Total length of `list` across ranks is zero.*",  # no validation slides asked for
    ".*overridden `on_after_batch_transfer` in `LightningModule`.*",  # augmentation lives there
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",  # Lightning internals vs torch
    # Lightning 2.6 calls jsonargparse APIs deprecated in 4.49
    "(?s).*(deprecated in v4.49.0|JsonargparseDeprecationWarning per type).*",
    # a resumed run restarts the interrupted epoch's loader: harmless for self-supervision (and
    # ContrastiveModule.on_load_checkpoint reseeds, so the shuffle and the views are fresh draws)
    ".*resuming from a checkpoint that ended before the epoch ended.*",
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def _quiet() -> None:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoTips())


def _parse(argv: list[str], prog: str, description: str) -> PretrainCLI:
    with warnings.catch_warnings():
        _quiet()
        return PretrainCLI(
            ContrastiveModule,
            TileDataModule,
            run=False,
            args=argv,
            save_config_callback=SaveConfigToOut,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            parser_kwargs={"prog": prog, "description": description, "default_env": False},
            auto_configure_optimizers=False,
            trainer_defaults={"max_epochs": -1},
            seed_everything_default=0,
        )


def check_sync_batchnorm(trainer: Trainer, requested: bool) -> None:
    """Refuse ``--trainer.sync_batchnorm true`` where torch cannot run it, naming the fix.

    Lightning turns every BatchNorm into torch's ``SyncBatchNorm`` under DDP; with more than
    one process torch runs that layer on CUDA (HPU, XPU) only, and on CPU fails while wrapping
    the model with a message that does not name the option.

    Raises:
        ValueError: synchronised BatchNorm across CPU processes.
    """
    if requested and trainer.world_size > 1 and isinstance(trainer.accelerator, CPUAccelerator):
        raise ValueError(
            f"trainer.sync_batchnorm is true with {trainer.world_size} CPU processes, but torch's "
            "SyncBatchNorm only runs on CUDA devices; set --trainer.sync_batchnorm false "
            "(configs/pretrain/cpu_smoke.yaml does) or train on GPUs"
        )


def _ckpt_step(path: Path) -> int:
    """Global step stored in a Lightning checkpoint (read with ``weights_only``: never unpickled).

    Raises:
        ValueError: the file cannot be read as a checkpoint of tensors and plain values (damaged,
            truncated, not a Lightning checkpoint, or holding pickled objects). Guessing a step
            instead would let a rerun of a finished run register the same state again.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception as err:  # any reason the file is unusable: say which, and what to do
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"cannot resume from {path}: {type(err).__name__}: {reason}. Expected a Lightning "
            "checkpoint of tensors and plain values (it is read with weights_only=True, never "
            "unpickled). Move it away to keep it, then rerun to start over, or pass --resume "
            "false (a new run from step 0, registered as a new version)"
        ) from None


def _already_registered(out: Path, registry: Registry, steps: int) -> dict[str, Any] | None:
    """The result of an earlier run that registered this very state, if any (idempotent rerun).

    Called only when the run resumed from a checkpoint at ``steps`` and trained no further.
    """
    try:
        previous = json.loads((out / "summary.json").read_text())["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if previous.get("steps") != steps or previous.get("registry") != str(registry.root):
        return None
    try:
        registry.resolve(previous["ref"])
    except (KeyError, ValueError):
        return None
    return previous


def _trainer_summary(
    trainer: Trainer, data: TileDataModule, model: ContrastiveModule
) -> dict[str, Any]:
    return {
        "precision": str(trainer.precision),
        "strategy": type(trainer.strategy).__name__,
        "accelerator": type(trainer.accelerator).__name__,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "max_steps": trainer.max_steps,
        "batch_size": data.batch_size,
        "global_batch_size": data.batch_size * trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "sync_batchnorm": model.synced_batchnorm,  # BatchNorm statistics over the global batch
    }


def trained_steps(trainer: Trainer, model: ContrastiveModule) -> int:
    """Optimiser steps of the run (under ddp_spawn the parent's trainer does not see them)."""
    return max(int(trainer.global_step), int(model.trained_steps))


def method_record(model: ContrastiveModule) -> dict[str, Any]:
    """The contrastive method and its settings, for the card (``extra.method_settings``)."""
    hp = model.hparams
    if hp.method != "moco":
        return {"name": "simclr", "negatives": "the other tiles of the global batch"}
    return {
        "name": "moco",
        "variant": "MoCo v2 (momentum key encoder + memory bank), cosine momentum as MoCo v3",
        "memory_bank_size": hp.memory_bank_size,
        "key_momentum": hp.key_momentum,
        "key_momentum_end": hp.key_momentum_end,
        "key_momentum_last": round(model.key_momentum_now, 6),
        "momentum_schedule": "cosine over max_steps (lightly cosine_schedule)",
        "shuffle_bn": "across processes when BatchNorm is not synchronised, else none "
        "(synchronised BatchNorm is global)",
        "registered": "the query backbone",
    }


def collapse_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The collapse verdict in a few numbers (for the result line and summary.json)."""
    if report is None:
        return None
    return {
        "verdict": report["verdict"],
        "reasons": report.get("reasons", []),
        "loss_over_chance": report["loss_over_chance"],
        "chance_loss": report["chance_loss"],
        "backbone_effective_rank": report["backbone"]["effective_rank"],
        "projection_effective_rank": report["projection"]["effective_rank"],
        "backbone_dim": report["backbone"]["dim"],
    }


def register(
    model: ContrastiveModule,
    data: TileDataModule,
    trainer: Trainer,
    name: str,
    registry: Registry,
    collapse: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register the trained encoder as the next version of ``name``.

    Args:
        collapse: the collapse checks' report (:attr:`CollapseMonitor.report`), written to the
            card as ``extra.collapse`` and summarised in the result.

    Returns:
        The result: ``ref``, ``steps``, ``final_loss``, ``tiles_seen``, ``collapse`` and where
        things are.
    """
    steps = trained_steps(trainer, model)
    final_loss = model.final_loss()
    metrics = {
        "final_loss": None if math.isnan(final_loss) else round(final_loss, 6),
        "steps": steps,
        "tiles_seen": steps * data.batch_size * trainer.world_size,
    }
    if "val_loss" in trainer.callback_metrics:
        metrics["val_loss"] = round(float(trainer.callback_metrics["val_loss"]), 6)
    tiles = tiles_parent(str(Path(data.tiles).resolve()), data.fingerprint)
    lineage = [tiles, *([model.parent] if model.parent is not None else [])]
    hp = model.hparams
    extra = {
        "method": hp.method,
        "method_settings": method_record(model),
        "tiles": str(Path(data.tiles).resolve()),
        "stain_norm": data.stain_norm,  # the tiles' stain normalisation (histcode embed checks)
        "augmentation": model.augmentation_config(),
        "projection": {
            "hidden_dim": hp.projection_hidden_dim or model.encoder.embed_dim,
            "output_dim": hp.projection_dim,
        },
        "loss": {
            "name": "ntxent",
            "temperature": hp.temperature,
            "gather_distributed": True,
            "memory_bank_size": model.memory_bank_entries(),
            "chance": round(model.chance_loss(), 6),
        },
        "optimizer": {
            **{k: hp[k] for k in ("optimizer", "lr", "scale_lr", "weight_decay", "momentum")},
            **{k: hp[k] for k in ("warmup_steps", "min_lr_ratio")},
            "peak_lr": model.peak_lr(),
            **model.lr_record(),  # the schedules in force and the learning rates actually used
        },
        "trainer": _trainer_summary(trainer, data, model),
        "run": str(Path(trainer.default_root_dir).resolve()),
        "collapse": collapse,
    }
    card = encoder_card(model.encoder, metrics=metrics, parents=lineage, extra=extra)
    ref = registry.save(name, model.encoder.cpu(), card)
    return {
        "ref": ref,
        **metrics,
        "method": hp.method,
        "collapse": collapse_summary(collapse),
        "registry": str(registry.root),
    }


def run(argv: list[str], prog: str, description: str = "") -> int:
    """Parse, train (resuming when possible), register on process 0, print one JSON line.

    Args:
        argv: the command's arguments.
        prog: program name for usage and error messages.
        description: the first paragraph of ``--help`` (the command module's docstring's).
    """
    start = time.perf_counter()
    try:
        cli = _parse(argv, prog, description)
    except SystemExit as done:  # --help, --print_config, or a parse error (jsonargparse)
        return int(done.code or 0) if isinstance(done.code, int) else EXIT_USAGE
    except USAGE_ERRORS as err:
        return usage_error(prog, err)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    out = Path(cli.config.out)
    registry = Registry(cli.config.registry or default_root())
    try:
        registry.check_root()  # a wrong --registry fails now, not after the training
        check_sync_batchnorm(trainer, bool(cli.config.trainer.sync_batchnorm))
    except USAGE_ERRORS as err:
        return usage_error(prog, err)
    ckpt = cli.last_checkpoint
    ckpt_path, resumed_at = None, None
    if cli.config.resume and ckpt.is_file():
        try:
            ckpt_path, resumed_at = str(ckpt), _ckpt_step(ckpt)
        except ValueError as err:
            return usage_error(prog, err)
        log.info("resuming from %s (step %d)", ckpt, resumed_at)
    monitor = cli.collapse_monitor
    if monitor is not None:  # where process 0 leaves the report for a ddp_spawn parent
        monitor.report_path = str(out / "collapse.json")
        Path(monitor.report_path).unlink(missing_ok=True)  # an earlier run's is not this one's
    try:
        # progress bars and Lightning's tables go to stderr: stdout carries only the final
        # JSON line (the CLI contract); Lightning's TQDM bar writes to stdout by default
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            _quiet()
            # weights_only=True: the checkpoint is never unpickled, whatever torch's default
            trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except USAGE_ERRORS as err:
        return usage_error(prog, err)
    except SystemExit:  # Lightning exits after a KeyboardInterrupt
        print(
            f"{prog}: interrupted; rerun the same command to resume from {ckpt}.", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    if trainer.interrupted:
        print(
            f"{prog}: interrupted; rerun the same command to resume from {ckpt}.", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    if not trainer.is_global_zero:
        return EXIT_OK
    result = None
    if resumed_at == trained_steps(trainer, model):  # nothing trained since the checkpoint
        result = _already_registered(out, registry, resumed_at)
    if result is not None:
        log.info("this state (step %d) is already registered as %s", result["steps"], result["ref"])
    else:
        report = read_report(cli.collapse_monitor)
        result = register(model, data, trainer, cli.config.name, registry, report)
        log.info("registered %s in %s", result["ref"], registry.root)
    result = {**result, "out": str(out), "checkpoint": str(ckpt)}
    config = json.loads(cli.parser.dump(cli.config, format="json", skip_unset=False))
    config.pop("config", None)
    outcome = CommandResult(out_dir=out, result=result)
    return finish(outcome, "pretrain", config, time.perf_counter() - start)
