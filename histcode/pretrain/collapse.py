"""Collapse diagnostics of contrastive pretraining: loss against chance, spread, effective rank.

A contrastive encoder that maps every tile to the same point (or to a low-dimensional
subspace) still trains without error: the loss just settles at the value a constant embedding
gives, and ``histcode embed`` later writes features that carry nothing. Three signs, each
cheap to measure:

- **Loss against chance.** With every projection equal, every logit of lightly's
  ``NTXentLoss`` is the same, and the cross-entropy is the log of the number of logits per
  row: :func:`chance_loss`.
- **Per-dimension spread** of the L2-normalised features (Chen & He, "Exploring Simple
  Siamese Representation Learning", CVPR 2021, §4.1): each dimension's sd across tiles is
  about ``1/sqrt(D)`` for well-spread features and 0 for a collapsed embedding.
- **Effective rank** (Roy & Vetterli, "The effective rank: a measure of effective
  dimensionality", EUSIPCO 2007): ``exp`` of the entropy of the normalised singular values,
  1 for a rank-one matrix and D for an isotropic one; RankMe (Garrido et al., ICML 2023)
  uses it, on uncentred embeddings as here, to rate self-supervised encoders without labels.

:class:`CollapseMonitor` (a Lightning callback, ``--collapse.*`` on the command line) measures
them during ``histcode pretrain`` on a fixed set of tiles, warns, and gives the verdict that
the registry card records under ``extra.collapse``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ProgressBar
from torch import nn

from histcode.tilereader import collate_tiles

log = logging.getLogger("histcode.pretrain")

Verdict = Literal["ok", "suspect", "collapsed"]


def chance_loss(global_batch_size: int, memory_bank_size: int = 0) -> float:
    """NT-Xent of a constant embedding: the loss of an encoder that learned nothing.

    lightly's ``NTXentLoss`` without a memory bank scores each of the ``2B`` views of a
    global batch of ``B`` tiles (all processes gathered) against its positive, the other
    ``B - 1`` tiles' same-side views and the ``B`` other-side views: ``2B - 1`` logits, all
    equal when the projections are constant, so the cross-entropy is ``ln(2B - 1)``. With a
    memory bank of ``M`` entries (MoCo) each query is scored against its key and the ``M``
    bank entries only (the batch's other keys are not negatives): ``ln(M + 1)``, whatever the
    batch size, once the bank holds keys of the collapsed encoder (it starts as random unit
    vectors, against which a collapsed encoder still scores below chance).

    Args:
        global_batch_size: tiles per step over all processes (``batch_size × world_size``;
            gradient accumulation does not enlarge the loss's batch).
        memory_bank_size: negatives held in the memory bank; 0 for none (SimCLR).

    Returns:
        The chance value, in nats.

    Raises:
        ValueError: a batch under 2 tiles without a memory bank, or a negative bank size.
    """
    if memory_bank_size < 0:
        raise ValueError(f"memory_bank_size={memory_bank_size}: expected 0 (none) or more")
    if memory_bank_size:
        return math.log(memory_bank_size + 1)
    if global_batch_size < 2:
        raise ValueError(
            f"global batch of {global_batch_size} tile(s): NT-Xent needs at least 2 tiles a "
            "step for a negative; raise --data.batch_size"
        )
    return math.log(2 * global_batch_size - 1)


def effective_rank(x: torch.Tensor) -> float:
    """Effective rank of a matrix (Roy & Vetterli 2007): ``exp(H(σ / Σσ))``.

    The rows are not centred (RankMe's convention): an embedding that puts every tile at the
    same point has effective rank 1, however far from the origin that point is.

    Args:
        x: ``(N, D)`` features of N tiles.

    Returns:
        A value in ``[1, min(N, D)]``; 0.0 for an all-zero matrix (no direction at all).
    """
    s = torch.linalg.svdvals(x.detach().double())
    total = s.sum()
    if not torch.isfinite(total) or total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def feature_stats(x: torch.Tensor) -> dict[str, float | int]:
    """Spread and effective rank of features of a fixed set of tiles.

    Args:
        x: ``(N, D)`` features (backbone embeddings or projections).

    Returns:
        ``dim`` (D); ``effective_rank`` and ``rank_ratio`` (effective rank / D);
        ``sd_normalised``: mean over dimensions of the per-dimension sd of the L2-normalised
        rows, times ``sqrt(D)`` (SimSiam's collapse check: about 1 when spread over the
        sphere, 0 when collapsed); ``sd_min``, ``sd_median``, ``sd_max``: per-dimension sd of
        the raw features; ``dead_dims``: dimensions constant across the tiles (sd at most
        1e-6 of the largest); ``finite``: whether every value is finite (1 or 0).
    """
    x = x.detach().double()
    dim = int(x.shape[1])
    finite = bool(torch.isfinite(x).all())
    if not finite:
        return {"dim": dim, "finite": 0, "effective_rank": 0.0, "rank_ratio": 0.0,
                "sd_normalised": 0.0, "sd_min": 0.0, "sd_median": 0.0, "sd_max": 0.0,
                "dead_dims": dim}  # fmt: skip
    sd = x.std(dim=0)
    sd_unit = nn.functional.normalize(x, dim=1).std(dim=0)
    erank = effective_rank(x)
    return {
        "dim": dim,
        "finite": 1,
        "effective_rank": round(erank, 4),
        "rank_ratio": round(erank / dim, 4),
        "sd_normalised": round(float(sd_unit.mean()) * math.sqrt(dim), 4),
        "sd_min": float(sd.min()),
        "sd_median": float(sd.median()),
        "sd_max": float(sd.max()),
        "dead_dims": int((sd <= 1e-6 * sd.max()).sum()) if sd.max() > 0 else dim,
    }


def at_chance_loss(loss_over_chance: float | None, loss_margin: float) -> bool:
    """Whether a loss / chance ratio is within ``loss_margin`` of 1 (None: unknown, False)."""
    if loss_over_chance is None or not math.isfinite(loss_over_chance):
        return False
    return abs(loss_over_chance - 1.0) < loss_margin


def verdict(
    loss_over_chance: float | None,
    rank_ratio: float,
    loss_margin: float,
    min_rank_ratio: float,
) -> tuple[Verdict, list[str]]:
    """Judge a run from its loss against chance and its features' effective rank.

    Args:
        loss_over_chance: mean training loss of the last steps / :func:`chance_loss` (None
            when unknown); not finite counts as diverged.
        rank_ratio: the lower of the backbone's and the projection's effective rank / D.
        loss_margin: the loss is "at chance" when ``|loss_over_chance - 1| < loss_margin``
            (a loss well above chance is a task not yet solved, not a constant embedding:
            short runs from scratch start there).
        min_rank_ratio: the features are "low rank" below this effective rank / D.

    Returns:
        ``"collapsed"`` when both signs show (or the loss or features are not finite),
        ``"suspect"`` when one does, ``"ok"`` when neither; and the reasons, in words.
    """
    reasons = []
    diverged = loss_over_chance is not None and not math.isfinite(loss_over_chance)
    if diverged:
        reasons.append("the training loss is not finite (diverged)")
    at_chance = at_chance_loss(loss_over_chance, loss_margin)
    if at_chance:
        reasons.append(
            f"loss {loss_over_chance:.3f} × chance (within {loss_margin} of 1): the loss of "
            "a constant embedding"
        )
    low_rank = rank_ratio < min_rank_ratio
    if low_rank:
        reasons.append(
            f"effective rank {rank_ratio:.3f} × embedding size (< {min_rank_ratio}): the "
            "features span few directions"
        )
    if diverged or (at_chance and low_rank):
        return "collapsed", reasons
    return ("suspect" if at_chance or low_rank else "ok"), reasons


class CollapseMonitor(pl.Callback):
    """Watch a pretraining run for collapse; warn; report the verdict for the registry card.

    The probe set is ``tiles`` tiles drawn once (``seed``) from the validation slides when
    ``data.val_fraction`` > 0 (tiles training never draws), else from the training tiles;
    they are embedded unaugmented in eval mode, as ``histcode embed`` runs the encoder. At the
    start, every ``every_n_steps`` and at the end, process 0 measures :func:`feature_stats`
    of the backbone features (what ``histcode embed`` writes) and of the projections. Every
    ``loss_window`` steps after ``grace_steps`` it compares the mean training loss of the last
    ``loss_window`` steps with :func:`chance_loss` (the module's ``final_loss``). It logs
    ``collapse/*`` metrics, warns (logging and a line under the progress bar) the first time
    the loss stays at chance or the effective rank falls low, and at the end judges the run
    with :func:`verdict`.

    Args:
        every_n_steps: steps between feature measurements (0: only at the start and end).
        tiles: size of the probe set.
        seed: seed of the probe set's draw.
        loss_window: steps whose mean loss is compared with chance (at most 50).
        loss_margin: the loss is at chance when ``|loss / chance - 1| < loss_margin``.
        min_rank_ratio: the features are low rank when effective rank / D is below it.
        grace_steps: steps before the loss is compared with chance during the run (a run
            starts at chance); default: ``warm-up + loss_window``, and for MoCo also the steps
            that fill the memory bank once. The verdict at the end always compares.
        batch_size: tiles per forward pass of the measurement.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        tiles: int = 256,
        seed: int = 0,
        loss_window: int = 20,
        loss_margin: float = 0.05,
        min_rank_ratio: float = 0.04,
        grace_steps: int | None = None,
        batch_size: int = 64,
    ) -> None:
        if every_n_steps < 0 or tiles < 2 or batch_size < 1 or not 1 <= loss_window <= 50:
            raise ValueError(
                f"collapse.every_n_steps={every_n_steps}, collapse.tiles={tiles}, "
                f"collapse.batch_size={batch_size}, collapse.loss_window={loss_window}: expected "
                "every_n_steps ≥ 0, tiles ≥ 2, batch_size ≥ 1 and 1 ≤ loss_window ≤ 50"
            )
        if not 0 < loss_margin < 1 or not 0 <= min_rank_ratio < 1:
            raise ValueError(
                f"collapse.loss_margin={loss_margin}, collapse.min_rank_ratio={min_rank_ratio}:"
                " expected 0 < loss_margin < 1 and 0 ≤ min_rank_ratio < 1"
            )
        self.every_n_steps = every_n_steps
        self.n_tiles = tiles
        self.seed = seed
        self.loss_window = loss_window
        self.loss_margin = loss_margin
        self.min_rank_ratio = min_rank_ratio
        self.grace_steps = grace_steps
        self.batch_size = batch_size
        self.probe: torch.Tensor | None = None  # uint8 (n, 3, H, W), on the CPU
        self.probe_source = ""
        self.history: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None
        #: where process 0 also writes the report (set by ``histcode pretrain``): under
        #: ``ddp_spawn`` the training runs in spawned processes and the parent gets back
        #: only the weights, so it reads the report from there
        self.report_path: str | None = None

    # -- the probe set -------------------------------------------------------------------------
    def _draw(self, trainer: pl.Trainer) -> None:
        data = trainer.datamodule
        dataset = getattr(data, "val_set", None)
        self.probe_source = "validation slides (never trained on)"
        if dataset is None:
            dataset = data.train_set
            self.probe_source = "training tiles (fixed draw, unaugmented)"
        n = min(self.n_tiles, len(dataset))
        chosen = np.random.default_rng(self.seed).choice(len(dataset), n, replace=False)
        self.probe = collate_tiles([dataset[int(i)] for i in np.sort(chosen)]).contiguous()

    @torch.no_grad()
    def measure(self, pl_module: pl.LightningModule) -> dict[str, dict[str, float | int]]:
        """Feature statistics of the probe set: ``{"backbone": …, "projection": …}``."""
        assert self.probe is not None
        was_training = pl_module.training
        pl_module.eval()
        try:
            aug = pl_module.augment
            feats, projs = [], []
            for chunk in self.probe.split(self.batch_size):
                x = chunk.to(pl_module.device).float().div_(255.0)
                h = pl_module.encoder((x - aug.mean) / aug.std).float()
                feats.append(h)
                projs.append(pl_module.head(h).float())
            return {
                "backbone": feature_stats(torch.cat(feats).cpu()),
                "projection": feature_stats(torch.cat(projs).cpu()),
            }
        finally:
            pl_module.train(was_training)

    # -- hooks ---------------------------------------------------------------------------------
    def _grace(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if self.grace_steps is not None:
            return self.grace_steps
        return (
            int(pl_module.hparams.get("warmup_steps", 0))
            + self.loss_window
            + self._fill(trainer, pl_module)
        )

    @staticmethod
    def _fill(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Steps until MoCo's memory bank holds no more of its random initial vectors."""
        bank = int(pl_module.memory_bank_entries())
        global_batch = trainer.datamodule.batch_size * trainer.world_size
        return math.ceil(bank / global_batch) if bank else 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._draw(trainer)
        self._record(trainer, pl_module, int(trainer.global_step), features=True)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not trainer.is_global_zero or self.probe is None:
            return
        step = int(trainer.global_step)
        window = self.loss_window
        features = bool(self.every_n_steps) and step % self.every_n_steps == 0
        loss_check = step % window == 0 and step >= self._grace(trainer, pl_module)
        if features or loss_check:
            self._record(trainer, pl_module, step, features=features, loss=loss_check)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.probe is None:
            return
        entry = self._record(trainer, pl_module, int(trainer.global_step), features=True, loss=True)
        chance = pl_module.chance_loss()
        final = pl_module.final_loss(self.loss_window)
        ratio: float | None = final / chance
        notes = []
        if trainer.global_step < self._fill(trainer, pl_module) + self.loss_window:
            ratio = None  # against random bank vectors even a constant embedding beats chance
            notes.append("memory bank not yet filled with keys: loss not compared with chance")
        rank_ratio = min(entry["backbone"]["rank_ratio"], entry["projection"]["rank_ratio"])
        if not (entry["backbone"]["finite"] and entry["projection"]["finite"]):
            ratio = float("nan")  # features that are not finite: diverged
        judged, reasons = verdict(ratio, rank_ratio, self.loss_margin, self.min_rank_ratio)
        reasons += notes
        first = self.history[0]
        self.report = {
            "verdict": judged,
            "reasons": reasons,
            "final_loss": _round(final),
            "chance_loss": _round(chance),
            "loss_over_chance": _round(final / chance),
            "backbone": entry["backbone"],
            "projection": entry["projection"],
            "at_start": {
                "step": first["step"],
                "backbone": first["backbone"],
                "projection": first["projection"],
            },
            "warnings": list(self.warnings),
            "thresholds": {
                "loss_margin": self.loss_margin,
                "min_rank_ratio": self.min_rank_ratio,
                "loss_window": self.loss_window,
                "grace_steps": self._grace(trainer, pl_module),
            },
            "probe_tiles": len(self.probe),
            "probe_source": self.probe_source,
            "history": [_brief(h) for h in self.history],
        }
        if judged != "ok":
            self._warn(trainer, int(trainer.global_step), f"pretraining looks {judged}", reasons)
        if self.report_path:  # through a temporary file: never read half-written
            path = Path(self.report_path)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.report) + "\n")
            tmp.replace(path)

    # -- measuring and warning -----------------------------------------------------------------
    def _record(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        step: int,
        features: bool,
        loss: bool = False,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"step": step}
        metrics: dict[str, float] = {}
        if loss:
            recent = pl_module.final_loss(self.loss_window)
            entry["loss_over_chance"] = _round(recent / pl_module.chance_loss())
        if features:
            entry.update(self.measure(pl_module))
            for part in ("backbone", "projection"):
                metrics[f"collapse/{part}_effective_rank"] = entry[part]["effective_rank"]
                metrics[f"collapse/{part}_sd_normalised"] = entry[part]["sd_normalised"]
        if self.history and self.history[-1]["step"] == step:  # the same step measured twice
            entry = {**self.history.pop(), **entry}
        self.history.append(entry)
        if trainer.logger is not None and metrics:
            trainer.logger.log_metrics(metrics, step=step)
        if step > 0:
            self._check(trainer, entry)
        return entry

    def _check(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        """Warn once per sign: the loss at chance, the effective rank low."""
        step = entry["step"]
        seen = {w["sign"] for w in self.warnings}
        ratio = entry.get("loss_over_chance")
        if "loss" not in seen and at_chance_loss(ratio, self.loss_margin):
            self._warn(
                trainer,
                step,
                "training loss at chance",
                [f"mean loss of the last steps is {ratio} × chance (ln of the logits per row)"],
                sign="loss",
            )
        if "backbone" in entry and "rank" not in seen:
            low = [
                f"{part} effective rank {entry[part]['effective_rank']} of {entry[part]['dim']}"
                for part in ("backbone", "projection")
                if entry[part]["rank_ratio"] < self.min_rank_ratio
            ]
            if low:
                self._warn(trainer, step, "features collapsing", low, sign="rank")

    def _warn(
        self, trainer: pl.Trainer, step: int, what: str, reasons: list[str], sign: str = ""
    ) -> None:
        message = (
            f"collapse check at step {step}: {what}: " + "; ".join(reasons) + ". Check the "
            "learning rate, temperature and augmentations (the card records this under "
            "extra.collapse)"
        )
        if sign:
            self.warnings.append({"step": step, "sign": sign, "message": message})
        log.warning(message)
        bar = next((c for c in trainer.callbacks if isinstance(c, ProgressBar)), None)
        if bar is not None and bar.is_enabled:
            bar.print(f"WARNING {message}")


def _brief(entry: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a few numbers (the card's ``history``)."""
    out = {k: entry[k] for k in ("step", "loss_over_chance") if k in entry}
    if "backbone" in entry:
        out["backbone_rank"] = entry["backbone"]["effective_rank"]
        out["projection_rank"] = entry["projection"]["effective_rank"]
    return out


def _round(value: float | None, digits: int = 6) -> float | None:
    """JSON-able: None for missing or non-finite values."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def read_report(monitor: CollapseMonitor | None) -> dict[str, Any] | None:
    """The collapse checks' report of the run that just ended: the monitor's own, or, when
    the training ran in spawned processes (``ddp_spawn``), the one process 0 wrote to its
    ``report_path``; None when the checks were off."""
    if monitor is None:
        return None
    if monitor.report is not None:
        return monitor.report
    path = Path(monitor.report_path) if monitor.report_path else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None
