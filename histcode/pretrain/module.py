"""Contrastive pretraining as a LightningModule: SimCLR or MoCo over a zoo backbone.

- SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
  Visual Representations", ICML 2020. Negatives are the other tiles of the global batch.
- MoCo v2: Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning",
  2020 (after He et al., CVPR 2020): keys come from a momentum (EMA) copy of the backbone and
  projection head, and negatives from a memory bank (queue) of earlier keys; the momentum
  follows a cosine schedule to 1 (MoCo v3, Chen, Xie, He, ICCV 2021). HistCode's AdCo is of
  this family (a large bank of negatives).

Glue only: the loss (``NTXentLoss``, negatives gathered across processes, with
``memory_bank_size`` for MoCo), the heads (``SimCLRProjectionHead``, ``MoCoProjectionHead``),
the EMA (``update_momentum``, ``cosine_schedule``), shuffle-BN (``batch_shuffle``), ``LARS``
and the warm-up/cosine schedule (``CosineWarmupScheduler``) are lightly's; the backbone comes
from :mod:`histcode.encoders`; the views from
:class:`~histcode.pretrain.augment.TileAugmentation`, run on the device in
:meth:`ContrastiveModule.on_after_batch_transfer`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
from lightly.models.utils import (
    batch_shuffle,
    batch_unshuffle,
    deactivate_requires_grad,
    update_momentum,
)
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule
from torch import nn

from histcode.encoders import Encoder, create_encoder
from histcode.lineage import Parent, parse_parent
from histcode.registry import Registry

from .augment import AugmentConfig, TileAugmentation
from .collapse import chance_loss

#: default augmentation (a module-level instance: dataclass defaults must not be calls)
DEFAULT_AUGMENTATION = AugmentConfig()
#: steps over which ``final_loss`` is averaged
LOSS_WINDOW = 50
log = logging.getLogger("histcode.pretrain")


def parent_stain_warning(ref: str, parent_stain: str | None, data: Any) -> str | None:
    """A sentence when ``--model.init_from``'s encoder was pretrained on tiles of another stain
    normalisation than ``data``'s (its card's ``extra.stain_norm`` against the tile store's),
    else None (the same, or nothing recorded to compare).

    A warning, not a refusal as at embedding: continuing to pretrain on tiles of another
    stain is a way to adapt an encoder to them, but it is worth knowing that the start saw
    other colours (the new card's lineage names the parent, whose card records them).
    """
    tiles = getattr(data, "stain_norm", None)
    if parent_stain is None or tiles is None or parent_stain == tiles:
        return None
    return (
        f"--model.init_from {ref} was pretrained on tiles with stain_norm {parent_stain!r}, "
        f"but {getattr(data, 'tiles', 'these tiles')} have stain_norm {tiles!r}: pretraining "
        "continues from an encoder that saw other colours (fine for adapting it; to start "
        f"from a match, tile with --stain_norm {parent_stain} or pretrain from scratch)"
    )


class ContrastiveModule(pl.LightningModule):
    """Contrastive pretraining (SimCLR or MoCo v2) of a tile encoder of the zoo.

    The encoder registered at the end is ``encoder`` (MoCo's query backbone); MoCo's momentum
    copies (``key_encoder``, ``key_head``) and its memory bank live in the checkpoints only.

    Args:
        encoder: encoder zoo name (``resnet18``, ``resnet50_trunc``, ``tiny``, ``timm:…``).
        encoder_kwargs: the builder's other arguments (e.g. ``{"embed_dim": 64}`` for
            ``tiny``, ``{"weights": "imagenet.safetensors"}``, ``mean``/``std``).
        mpp: µm/px of the tiles; the command sets it from the tile store.
        tile_size: tile side in pixels; the command sets it from the tile store.
        init_from: registry ref of an encoder to start from (continued pretraining); it must
            have the same architecture.
        registry: registry root for ``init_from`` (default ``$HISTCODE_REGISTRY`` or
            ``./registry``).
        method: ``simclr`` (negatives from the global batch) or ``moco`` (MoCo v2: momentum
            key encoder, memory bank of negatives).
        projection_hidden_dim: hidden width of the projection head (default: embed_dim).
        projection_dim: output size of the projection head.
        temperature: NT-Xent temperature (SimCLR 0.1, MoCo v2 0.2).
        memory_bank_size: MoCo only: negatives kept in the memory bank (keys of earlier
            steps, all processes'); MoCo v2 used 65536.
        key_momentum: MoCo only: EMA momentum of the key encoder at the first step.
        key_momentum_end: MoCo only: momentum at the last step (cosine schedule, as MoCo v3).
        optimizer: ``adamw``, ``lars`` (lightly's, as SimCLR) or ``sgd``.
        lr: peak learning rate (after warm-up); per 256 tiles of global batch when
            ``scale_lr``.
        scale_lr: multiply ``lr`` by global batch size / 256 (SimCLR's linear scaling: with
            ``lars``, ``lr: 0.3`` gives 0.3 at 256 tiles a step and 1.2 at 1024).
        weight_decay: weight decay of weights (not of biases and norm parameters).
        momentum: momentum of ``lars`` and ``sgd``.
        warmup_steps: linear warm-up steps, then cosine decay to the end of training.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        augmentation: every parameter of the view generator.
        channels_last: use channels-last memory format on CUDA.

    Shapes:
        batch (after :meth:`on_after_batch_transfer`): two views, ``(batch_size, 3, S, S)``
        each; :meth:`forward`: ``(N, 3, S, S)`` → projections ``(N, projection_dim)``.
    """

    def __init__(
        self,
        encoder: str = "resnet18",
        encoder_kwargs: dict[str, Any] | None = None,
        mpp: float | None = None,
        tile_size: int | None = None,
        init_from: str | None = None,
        registry: str | None = None,
        method: Literal["simclr", "moco"] = "simclr",
        projection_hidden_dim: int | None = None,
        projection_dim: int = 128,
        temperature: float = 0.1,
        memory_bank_size: int = 4096,
        key_momentum: float = 0.99,
        key_momentum_end: float = 1.0,
        optimizer: Literal["adamw", "lars", "sgd"] = "adamw",
        lr: float = 1e-3,
        scale_lr: bool = False,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.01,
        augmentation: AugmentConfig = DEFAULT_AUGMENTATION,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(augmentation, dict):  # from a checkpoint's hyperparameters
            augmentation = AugmentConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in augmentation.items()}
            )
        augmentation.check()
        if method not in ("simclr", "moco"):
            raise ValueError(f"model.method={method!r}: expected simclr or moco")
        if method == "moco" and memory_bank_size < 1:
            raise ValueError(
                f"model.memory_bank_size={memory_bank_size}: MoCo takes its negatives from the "
                "memory bank; set it to 1 or more (MoCo v2: 65536), or use --model.method simclr"
            )
        if not 0.0 <= key_momentum <= key_momentum_end <= 1.0:
            raise ValueError(
                f"model.key_momentum={key_momentum}, key_momentum_end={key_momentum_end}: "
                "expected 0 ≤ key_momentum ≤ key_momentum_end ≤ 1 (MoCo: 0.99 → 1.0)"
            )
        if optimizer == "lars" and weight_decay == 0:
            # lightly's LARS takes weight_decay == 0 as "exclude this group from LARS scaling"
            # (how biases and norms are exempted), so with 0 no layer gets a trust ratio and
            # LARS is plain SGD with momentum at LARS's large learning rate
            raise ValueError(
                "model.optimizer lars with model.weight_decay 0 turns LARS's layer-wise trust "
                "ratio off for every layer (lightly's LARS skips groups with weight_decay 0), "
                f"leaving plain SGD at lr {lr}; set --model.weight_decay > 0 (SimCLR: 1e-6), or "
                "use --model.optimizer sgd or adamw with a learning rate suited to it"
            )
        self.save_hyperparameters(ignore=["augmentation"])
        self.hparams["augmentation"] = augmentation.to_dict()
        spec = {k: v for k, v in (("mpp", mpp), ("tile_size", tile_size)) if v is not None}
        self.encoder: Encoder = create_encoder(encoder, **{**(encoder_kwargs or {}), **spec})
        dim = self.encoder.embed_dim
        hidden = projection_hidden_dim or dim
        self.key_encoder: Encoder | None = None
        self.key_head: nn.Module | None = None
        if method == "moco":
            self.head: nn.Module = MoCoProjectionHead(dim, hidden, projection_dim)
            # the momentum copies: never trained by gradients, moved by update_momentum
            self.key_encoder = copy.deepcopy(self.encoder)
            self.key_head = copy.deepcopy(self.head)
            deactivate_requires_grad(self.key_encoder)
            deactivate_requires_grad(self.key_head)
            bank = (memory_bank_size, projection_dim)
        else:
            self.head = SimCLRProjectionHead(dim, hidden, projection_dim)
            bank = 0
        # gather_distributed: SimCLR's negatives, and MoCo's bank updates, span all processes
        self.criterion = NTXentLoss(
            temperature=temperature, memory_bank_size=bank, gather_distributed=True
        )
        self.key_momentum_now = float(key_momentum)  # of the last update
        self._global_batch: int | None = None  # tiles a step over all processes, once seen
        s = self.encoder.input_spec
        self.augment = TileAugmentation(augmentation, s.mean, s.std, crop_size=s.tile_size)
        self.augmentation = augmentation
        self.parent: Parent | None = None  # the encoder of init_from, once loaded
        # the learning-rate schedules in force (one entry per change, resumes included) and the
        # rates the optimiser actually used; kept in checkpoints, written to the card
        self.lr_schedule: list[dict[str, float | int]] = []
        self.lr_used: dict[str, float | int] = {"steps": 0, "sum": 0.0, "peak": 0.0, "last": 0.0}
        self.synced_batchnorm = False
        self._val_batches = 0
        self.register_buffer("recent_losses", torch.full((LOSS_WINDOW,), float("nan")))
        # optimiser steps taken, kept with the weights (ddp_spawn returns weights, not loops)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projections of normalised views, ``(N, 3, S, S)`` → ``(N, projection_dim)``."""
        return self.head(self.encoder(x))

    @torch.no_grad()
    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        """MoCo keys of normalised views, ``(N, 3, S, S)`` → ``(N, projection_dim)``.

        With more than one process and BatchNorm not synchronised, the views are shuffled
        across processes first (MoCo's shuffle-BN, lightly's ``batch_shuffle``), so that a
        key's BatchNorm statistics come from other tiles than its query's; with synchronised
        BatchNorm (``trainer.sync_batchnorm``, the default) the statistics are global and
        no shuffle is needed.
        """
        assert self.key_encoder is not None and self.key_head is not None
        shuffle = self._trainer is not None and self.trainer.world_size > 1
        shuffle = shuffle and not self.synced_batchnorm
        if shuffle:
            x, order = batch_shuffle(x, distributed=True)
        keys = self.key_head(self.key_encoder(x))
        if shuffle:
            keys = batch_unshuffle(keys, order, distributed=True)
        return keys

    def update_key_encoder(self, step: int, max_steps: int) -> float:
        """Move the key encoder and head towards the query's by this step's momentum.

        ``key ← m·key + (1 − m)·query`` (lightly's ``update_momentum``), with ``m`` from
        ``key_momentum`` to ``key_momentum_end`` on a cosine schedule over ``max_steps``.

        Returns:
            The momentum used.
        """
        assert self.key_encoder is not None and self.key_head is not None
        h = self.hparams
        m = cosine_schedule(
            min(step, max_steps), max(max_steps, 1), h.key_momentum, h.key_momentum_end
        )
        update_momentum(self.encoder, self.key_encoder, m)
        update_momentum(self.head, self.key_head, m)
        self.key_momentum_now = float(m)
        return float(m)

    def memory_bank_entries(self) -> int:
        """Negatives held in the memory bank (0 for SimCLR)."""
        return int(self.hparams.memory_bank_size) if self.hparams.method == "moco" else 0

    def chance_loss(self, global_batch_size: int | None = None) -> float:
        """The loss of a constant embedding for this run (:func:`~.collapse.chance_loss`).

        Args:
            global_batch_size: tiles a step over all processes; default the last step's, else
                the data module's batch size × processes.
        """
        batch = global_batch_size or self._global_batch
        if batch is None:
            data = getattr(self.trainer, "datamodule", None) if self._trainer else None
            world = self.trainer.world_size if self._trainer else 1
            batch = int(getattr(data, "batch_size", 2)) * world
        return chance_loss(batch, self.memory_bank_entries())

    # -- setup -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Seed this process; check the tiles fit the encoder; load ``init_from``.

        Under DDP every process is seeded alike (``seed_everything``), and the augmentations
        draw from the device's default generator: each process would give tile j of its
        shard the same crop, flips, stain and blur, so the global batch would hold only
        ``batch_size`` independent draws. Each process therefore reseeds with seed + rank
        (a resumed run then offsets that by the step, :meth:`on_load_checkpoint`). The
        sampler's shuffle keeps its own shared seed, so the shards still partition the tiles.
        A checkpoint's weights override ``init_from``.
        """
        if self._trainer is not None and self.trainer.world_size > 1:
            torch.manual_seed((torch.initial_seed() + self.trainer.global_rank) % 2**63)
        data = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if data is not None and hasattr(data, "tile_size"):
            self.encoder.input_spec.check(mpp=data.mpp, tile_size=data.tile_size, source=data.tiles)
        if self.hparams.init_from and self.parent is None:
            state, card = Registry(self.hparams.registry).load_state(self.hparams.init_from)
            if card.kind != "encoder" or card.architecture != self.encoder.architecture:
                raise ValueError(
                    f"--model.init_from {card.ref} is a {card.kind} {card.architecture!r}, but "
                    f"--model.encoder is {self.encoder.architecture!r}; set --model.encoder "
                    f"{card.architecture} (and its encoder_kwargs {card.arguments})"
                )
            try:
                self.encoder.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"the weights of {card.ref} do not fit --model.encoder "
                    f"{self.encoder.architecture} with {self.hparams.encoder_kwargs}: {err}"
                ) from None
            self.parent = Parent("encoder", card.ref, card.sha256)
            said = parent_stain_warning(card.ref, card.extra.get("stain_norm"), data)
            if said and (self._trainer is None or self.trainer.global_rank == 0):
                log.warning(said)  # once, not once per process
            if self.key_encoder is not None:  # MoCo's keys start from the same weights
                self.key_encoder.load_state_dict(self.encoder.state_dict())

    def on_fit_start(self) -> None:
        # BatchNorm over the global batch: Lightning's sync_batchnorm turned it into SyncBatchNorm
        self.synced_batchnorm = any(isinstance(m, nn.SyncBatchNorm) for m in self.modules())
        if self.hparams.channels_last and self.device.type == "cuda":
            self.encoder.to(memory_format=torch.channels_last)
            if self.key_encoder is not None:
                self.key_encoder.to(memory_format=torch.channels_last)

    def on_train_start(self) -> None:
        self._fit_schedule()

    # -- steps -------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> Any:
        """Augment on the device: uint8 tiles ``(B, 3, H, W)`` → two views ``(B, 3, S, S)``.

        Validation batches get the same views every time (seeded by their position), so the
        validation loss is comparable from one evaluation to the next.
        """
        if self._trainer is None or self.trainer.training:
            return self.augment.two_views(batch)
        self._val_batches += 1
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(self._val_batches)
            return self.augment.two_views(batch)

    def on_validation_epoch_start(self) -> None:
        self._val_batches = 0

    def _loss(self, views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """NT-Xent of the two views: SimCLR on both through one network; MoCo of queries
        (view 0, this network) against keys (view 1, the momentum network) and the bank."""
        channels_last = self.hparams.channels_last and views[0].is_cuda
        if self.hparams.method == "moco":
            x0, x1 = views
            if channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
                x1 = x1.contiguous(memory_format=torch.channels_last)
            z0, z1 = self(x0), self.forward_keys(x1)
        else:
            x = torch.cat(views)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            z0, z1 = self(x).chunk(2)
        with torch.autocast(z0.device.type, enabled=False):  # the loss in float32 under bf16
            return self.criterion(z0.float(), z1.float())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        world = self.trainer.world_size if self._trainer is not None else 1
        self._global_batch = len(batch[0]) * world
        if self.key_encoder is not None:
            max_steps = int(self.trainer.estimated_stepping_batches) if self._trainer else 1
            self.update_key_encoder(int(self.global_step), max_steps)
        loss = self._loss(batch)
        self.recent_losses[self.global_step % LOSS_WINDOW] = loss.detach()  # no host sync
        self.log("train_loss", loss, prog_bar=True)
        # 1 = the loss of a constant embedding (collapse); falls below 1 as the task is solved
        self.log("train/loss_over_chance", loss.detach() / self.chance_loss())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Record the learning rate this optimiser step uses (a host float: no device sync)."""
        lr = float(optimizer.param_groups[0]["lr"])
        used = self.lr_used
        used["steps"] += 1
        used["sum"] += lr
        used["peak"] = max(used["peak"], lr)
        used["last"] = lr

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.trained_steps.fill_(self.global_step)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    @property
    def parent_ref(self) -> str | None:
        """``name@v#sha256=…`` of the ``init_from`` encoder once loaded (:attr:`parent`)."""
        return None if self.parent is None else self.parent.legacy()

    def final_loss(self, last: int = LOSS_WINDOW) -> float:
        """Mean training loss over the last ``last`` (at most ``LOSS_WINDOW``) steps (this
        process); steps whose loss was not finite are left out."""
        steps = int(self.global_step)
        first = max(steps - min(last, LOSS_WINDOW), 0)
        idx = torch.arange(first, steps, device=self.recent_losses.device) % LOSS_WINDOW
        recent = self.recent_losses[idx] if steps else self.recent_losses
        recent = recent[~torch.isnan(recent)]
        return float(recent.mean()) if len(recent) else float("nan")

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        trained = [p for p in self.parameters() if p.requires_grad]  # not MoCo's key copies
        decay = [p for p in trained if p.ndim > 1]
        no_decay = [p for p in trained if p.ndim <= 1]  # biases and norms
        groups = [
            {"params": decay, "weight_decay": h.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},  # also exempt from LARS scaling
        ]
        lr = self.peak_lr()
        if h.optimizer == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr)
        elif h.optimizer == "lars":
            optimizer = LARS(groups, lr=lr, momentum=h.momentum)
        else:
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=h.momentum)
        total = self.trainer.estimated_stepping_batches
        if not 0 < total < float("inf"):
            raise ValueError(
                "the learning-rate schedule needs a finite length: set --trainer.max_steps"
            )
        scheduler = CosineWarmupScheduler(
            optimizer,
            warmup_epochs=min(h.warmup_steps, int(total)),
            max_epochs=int(total),
            end_value=h.min_lr_ratio,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _schedule(self) -> dict[str, float | int]:
        """The schedule the current settings ask for (its length is the run's max_steps)."""
        total = int(self.trainer.estimated_stepping_batches)
        peak = self.peak_lr()
        return {
            "max_steps": total,
            "warmup_steps": min(int(self.hparams.warmup_steps), total),
            "peak_lr": peak,
            "final_lr": peak * float(self.hparams.min_lr_ratio),
        }

    def _fit_schedule(self) -> None:
        """Make the restored scheduler follow the current settings, and record the schedule.

        A resumed run restores the scheduler saved in the checkpoint, whose length is the
        interrupted run's max_steps: resumed with a larger ``--trainer.max_steps``, every added
        step would run at the final learning rate. The warm-up/cosine schedule is rebuilt for
        the current length (and warm-up, peak and final rate) at the step reached, and the
        learning rate of the next step set from it.
        """
        scheduler = self.lr_schedulers()
        if not isinstance(scheduler, CosineWarmupScheduler):
            return
        want = self._schedule()
        step = int(self.global_step)
        if want["max_steps"] <= step:
            return  # nothing left to train: the loop stops at once
        have = {
            "max_steps": scheduler.max_epochs,
            "warmup_steps": scheduler.warmup_epochs,
            "peak_lr": scheduler.base_lrs[0],
            "final_lr": scheduler.base_lrs[0] * scheduler.end_value,
        }
        if have != want:
            if step and self.global_rank == 0:
                log.info(
                    "resumed at step %d: learning-rate schedule rebuilt for %s (the checkpoint's "
                    "was for %s)",
                    step,
                    want,
                    have,
                )
            scheduler.max_epochs = want["max_steps"]
            scheduler.warmup_epochs = want["warmup_steps"]
            scheduler.end_value = float(self.hparams.min_lr_ratio)
            peak = float(want["peak_lr"])
            scheduler.base_lrs = [peak] * len(scheduler.optimizer.param_groups)
            factor = scheduler.scale_lr(scheduler.last_epoch)
            for group in scheduler.optimizer.param_groups:
                group["initial_lr"] = peak
                group["lr"] = peak * factor
            scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
        last = self.lr_schedule[-1] if self.lr_schedule else None
        if last is None or {k: last[k] for k in want} != want:
            self.lr_schedule.append({"from_step": step, **want})

    def lr_record(self) -> dict[str, Any]:
        """The schedules in force and the learning rates used, for the registry card.

        Returns:
            ``schedule``: one entry per schedule (``from_step``, ``max_steps``,
            ``warmup_steps``, ``peak_lr``, ``final_lr``), a new one each time a resume changed
            it; ``lr_used``: ``steps`` recorded, ``peak``, ``mean`` and ``last`` learning rate
            of the first parameter group (all groups share the schedule). Steps trained
            before a checkpoint that predates this record are not counted.
        """
        used = self.lr_used
        steps = int(used["steps"])
        return {
            "schedule": [dict(s) for s in self.lr_schedule],
            "lr_used": {
                "steps": steps,
                "peak": used["peak"] if steps else None,
                "mean": used["sum"] / steps if steps else None,
                "last": used["last"] if steps else None,
            },
        }

    def peak_lr(self) -> float:
        """``lr``, scaled by global batch size / 256 when ``scale_lr`` (needs the trainer)."""
        if not self.hparams.scale_lr:
            return float(self.hparams.lr)
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size is None:
            raise ValueError("model.scale_lr needs a datamodule with batch_size; set it false")
        global_batch = batch_size * self.trainer.world_size
        global_batch *= self.trainer.accumulate_grad_batches
        return float(self.hparams.lr) * global_batch / 256

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lineage, the learning-rate record and MoCo's memory bank (which lightly keeps out
        of the state dict) go into the checkpoint; the key encoder is in the state dict."""
        checkpoint["histcode"] = {
            "parent": None if self.parent is None else self.parent.to_dict(),
            "lr_schedule": [dict(s) for s in self.lr_schedule],
            "lr_used": dict(self.lr_used),
        }
        if self.memory_bank_entries():
            bank = self.criterion.memory_bank
            checkpoint["histcode"]["memory_bank"] = {
                "bank": bank.bank.detach().cpu().clone(),
                "ptr": bank.bank_ptr.detach().cpu().clone(),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore lineage, and reseed so that a resumed run draws fresh shuffles and views.

        Without reseeding, a run seeded like the interrupted one would replay its first
        batches (the same permutation and augmentations). The new seed is this process's
        seed (seed + rank under DDP, :meth:`setup`) plus a multiple of the step, so the
        processes still draw apart. Under DDP, Lightning's ``DistributedSampler`` orders each
        epoch by (seed, epoch) alone, so there the interrupted epoch's tile order restarts;
        the views still differ. Also restores the learning-rate record.
        """
        saved = checkpoint.get("histcode", {})
        if saved.get("parent"):
            self.parent = Parent.from_dict(saved["parent"])
        elif saved.get("parent_ref"):  # a checkpoint written before lineage was structured
            self.parent = parse_parent(saved["parent_ref"])
        self.lr_schedule = [dict(s) for s in saved.get("lr_schedule", [])]
        self.lr_used = {**self.lr_used, **saved.get("lr_used", {})}
        self._load_memory_bank(saved.get("memory_bank"))
        step = int(checkpoint.get("global_step", 0))
        torch.manual_seed((torch.initial_seed() + 1_000_003 * step) % 2**63)

    def _load_memory_bank(self, saved: dict[str, torch.Tensor] | None) -> None:
        """Restore MoCo's bank of negatives; one of another shape (or none) is refilled."""
        if not self.memory_bank_entries():
            return
        bank = self.criterion.memory_bank
        if saved is None or tuple(saved["bank"].shape) != tuple(bank.bank.shape):
            log.warning(
                "the checkpoint holds no memory bank of shape %s (memory_bank_size or "
                "projection_dim changed, or it was not a MoCo run): the bank restarts from "
                "random vectors and refills within %d entries",
                tuple(bank.bank.shape),
                bank.bank.shape[0],
            )
            return
        with torch.no_grad():
            bank.bank.copy_(saved["bank"])
            bank.bank_ptr.copy_(saved["ptr"])

    def augmentation_config(self) -> dict[str, Any]:
        """The augmentation as a JSON-able dict, with the crop size and blur kernel resolved."""
        return {**self.augmentation.to_dict(), **self.augment.resolved()}


#: the former name, kept for code that imports it
SimCLRModule = ContrastiveModule
