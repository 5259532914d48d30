"""run the whole pipeline on a small synthetic cohort (or a cohort of your own, ``--cohort``)
and compare it with the naive baseline.

``histcode demo --out DIR``

synth → tile → pretrain (SimCLR) → embed (the pretrained encoder, and a random-weight one for
the baseline) → finetune (gated attention MIL for tumour vs normal and driver-gene log2FC; the
naive baseline: mean pooling + a linear model on the random encoder's features) → heatmaps of
every tumour slide by the model that never saw it, scored against the cohort's truth masks.

Each step is the real command a user would type (the demo prints it), writing the real
artefact under ``DIR``: ``cohort/``, ``tiles.zarr``, ``registry/``, ``features/*.zarr``,
``finetune/*/`` (metrics.json, predictions.csv, plots), ``maps/*/`` (PNG, GeoJSON). The demo
itself writes ``DIR/configs/`` (the YAML configs it passed), ``DIR/results.md`` and
``DIR/results.json`` (the table it prints) and ``DIR/demo.json`` (which steps are done:
rerunning the same command skips them, so an interrupted demo resumes).

The core runs the stages through the ``histcode`` command table (entry points), so this
module imports neither ``pretrain`` nor ``finetune``.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

#: Names of the two arms compared in the results table.
PIPELINE, BASELINE = "simclr", "naive"


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs with; stored in ``demo.json`` so that a rerun resumes the same run."""

    patients: int | None
    difficulty: str | None
    slide_mm: tuple[float, float]
    mpp: float
    tile_size: int
    pretrain_steps: int
    batch_size: int
    epochs: int
    folds: int
    baseline_encoder: str
    aggregator: str
    seed: int
    cohort: str | None = None
    genes: tuple[str, ...] | None = None
    stain_norm: str = "none"
    tumour_pooling: str = "top_share"
    tumour_context: bool = True
    on_collapse: str = "random"
    tumour_warm_start: int = 10
    tumour_relative: bool = False


#: What the pipeline arm may read when its SimCLR encoder collapsed (``--on_collapse``): the
#: naive arm's random-weight features, or the collapsed encoder's anyway.
ON_COLLAPSE = ("random", "keep")


#: Column titles of the aggregators.
AGGREGATOR_NAMES = {
    "abmil": "gated attention per task",
    "clam_sb": "CLAM-SB",
    "transformer": "transformer MIL",
    "mean": "mean pooling (MLP)",
    "max": "max pooling (MLP)",
}


#: What the naive arm changes in the demo's finetune config: its linear model on the mean
#: feature gives the tumour logit too, and nothing reads a tumour fraction or tile context.
BASELINE_MODEL = [
    "--model.tumour_pooling", "attention", "--model.tumour_fraction_genes", "false",
    "--model.tumour_context", "false", "--model.tumour_warm_start", "0",
    "--model.tumour_map", "own", "--model.tumour_relative", "false",
]  # fmt: skip


class DemoStepError(RuntimeError):
    """A step's command failed; the message names the step and how to resume."""


def _pretrain_config(o: DemoOptions) -> dict[str, Any]:
    """SimCLR on CPU: a small CNN (``tiny``), short schedule, float32."""
    return {
        "seed_everything": o.seed,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "strategy": "auto",
            "precision": "32-true",
            "max_steps": o.pretrain_steps,
            "log_every_n_steps": 10,
            "val_check_interval": max(o.pretrain_steps // 4, 1),
            # count that interval in steps across epochs: a small cohort's epoch can be
            # shorter than it (Lightning refuses the interval otherwise)
            "check_val_every_n_epoch": None,
            "enable_model_summary": False,
            "benchmark": False,
        },
        "model": {
            "encoder": "tiny",
            # A ReLU before the pool (``final_relu``): without it conv + mean pool is linear and
            # a tile's embedding cannot say how much of the tile holds a pattern. Lab (hard,
            # seeds 0-2): slide ceiling 0.89 -> 0.92; hard demo (30 patients, seeds 0-2): tumour
            # map 0.81 ± 0.11 -> 0.93 ± 0.03 (RESULTS.md, "A tiny CNN that counts"). Session 13
            # kept it out after CI's easy demo lost one fold's tumour-burden genes (r 0.25 vs
            # 0.64 in our run of the seed); session 14 traced that to CI running the demo on one
            # torch thread (a test left the count at 1): the same seed on one thread reproduces
            # 0.25, so it was a different float draw, not a different model.
            "encoder_kwargs": {"embed_dim": 64, "width": 16, "final_relu": True},
            "projection_dim": 32,
            # Temperature 0.5, not simclr.yaml's 0.1 (tuned there for thousands of negatives):
            # with 63 negatives a low temperature puts nearly all the loss on the few most
            # similar other tiles, which in a cohort are mostly tiles of the same tissue, and
            # pushes them apart, erasing the tissue classes. benchmarks/simclr_recipe.py (hard
            # cohort, seeds 0-2): tumour tile probe 0.858 ± 0.040 vs 0.821 ± 0.033.
            "temperature": 0.5,
            "optimizer": "adamw",
            "lr": 0.002,
            "scale_lr": False,
            "weight_decay": 1.0e-4,
            "warmup_steps": 10,
            "min_lr_ratio": 0.01,
            # No generic colour jitter or grayscale (natural-image SimCLR's): in H&E, hue and
            # intensity carry nuclear density and hyperchromasia, which these erase; stain
            # variation is modelled by the HED jitter simclr.yaml keeps (Tellez et al. 2018).
            # benchmarks/simclr_recipe.py (hard cohort, seeds 0-2), with temperature 0.5:
            # tumour tile probe 0.896 ± 0.021, slide ceiling 0.82 ± 0.05 vs 0.858 / 0.67.
            # Through the hard demo (30 patients, seeds 0-2, top-share tumour pooling and
            # retrained folds) tumour AUC 0.57 ± 0.16 and tumour maps 0.67 ± 0.22, against
            # 0.51 ± 0.03 and 0.51 ± 0.08 with SimCLR's temperature and augmentations
            # (RESULTS.md, "What each recipe change bought").
            # No Gaussian blur either: at 1 µm/px a 64 px view holds nuclei 5-10 px across,
            # and a blur of up to 2 px (SimCLR's, scaled to the view) erases the chromatin
            # and nuclear outline that separate tumour from normal cells; with
            # Macenko-normalised tiles (the demo's default) the tumour tile probe rose from
            # 0.849 ± 0.042 to 0.880 ± 0.007 with 2,000 steps (RESULTS.md, "Pretraining on
            # normalised tiles").
            "augmentation": {"jitter_prob": 0.0, "gray_prob": 0.0, "blur_prob": 0.0},
        },
        "data": {"batch_size": o.batch_size, "num_workers": 0},
        "checkpoint": {"every_n_train_steps": max(o.pretrain_steps // 4, 1)},
    }


def _context_map(o: DemoOptions) -> bool:
    """Whether the pipeline's tumour map shows the tumour scorer with tile context
    (``--model.tumour_map context``): only when it is warm-started, as from a random start it
    ranks tiles poorly."""
    return o.tumour_pooling == "top_share" and o.tumour_context and o.tumour_warm_start > 0


def _finetune_config(o: DemoOptions) -> dict[str, Any]:
    """One multi-task model (tumour + every gene), patient-grouped CV, one model per fold.

    Each fold's epoch count is chosen on 5 inner folds of its training patients (``cv.inner``,
    both arms: every training patient validates once, the curves averaged), then the fold's
    model is trained on all its training patients for that many epochs (``cv.retrain``): at ~30
    patients a validation fifth is too much data to learn nothing from, and 2-3 validation
    patients too few to choose for all. In the pipeline arm the tumour scorer and the genes take
    their own epochs (``cv.select per_task``), the genes' chosen on the rank correlation of the
    genes with a signal (``cv.genes_metric rank_signal``); a model of one part (the naive arm's)
    chooses one epoch on its total with the genes' rank in it. The pipeline's tumour logit is
    top-share pooling (``model.tumour_pooling``; the naive arm keeps its linear model on the
    mean feature), and its genes read the tumour fraction that pooling estimates
    (``tumour_fraction_genes``).
    """
    return {
        "data": {"tasks": ["tumour", "genes"], "batch_size": 4, "max_tiles": 4096},
        "model": {
            "aggregator": o.aggregator,
            "hidden": 64,
            "dropout": 0.25,
            "tumour_pooling": o.tumour_pooling,
            # genes made by tumour cells follow the slide's estimated tumour fraction
            # (heads.TumourFractionPath): easy demo tumour-burden genes r 0.61 vs 0.30 without
            # it (naive 0.67); on the hard demo it changes nothing beyond noise (RESULTS.md)
            **({"tumour_fraction_genes": True} if o.tumour_pooling == "top_share" else {}),
            # the tumour scorer reads each tile's 3 x 3 neighbourhood and both relative to the
            # slide's median tile (histcode.finetune.context); the genes count tumour with a
            # second scorer on the tiles' own features, which also draws the tumour map.
            # Hard demo, seeds 0-2: tumour AUC 0.60 vs 0.56 (30 patients), 0.68 vs 0.62 (60);
            # easy demo unchanged (RESULTS.md, "Tile context")
            **(
                {"tumour_context": True}
                if o.tumour_pooling == "top_share" and o.tumour_context
                else {}
            ),
            # the top-share objective is not convex: each fold's scorer starts from the best
            # of 10 directions made from its training tumour slides' tiles (warmstart.py).
            # Hard demo, 30 patients, seeds 0-2: tumour AUC 0.73 vs 0.60 (RESULTS.md)
            **(
                {"tumour_warm_start": o.tumour_warm_start}
                if o.tumour_pooling == "top_share" and o.tumour_warm_start
                else {}
            ),
            # warm-started, the context scorer also ranks a slide's tiles, better than the
            # second scorer on the tiles' own features: it draws the tumour map (RESULTS.md,
            # "The tumour map")
            **({"tumour_map": "context"} if _context_map(o) else {}),
            # --tumour_relative: the scorer reads only the context relative to the slide. Not
            # the default: on site-confounded cohorts it helped one seed of three, and on the
            # easy demo it lost the tumour map on two (RESULTS.md, "Site confounding")
            **({"tumour_relative": True} if o.tumour_context and o.tumour_relative else {}),
        },
        "optim": {"lr": 0.001, "weight_decay": 0.01},
        "cv": {
            "folds": o.folds,
            # validation loss of the genes often plateaus for ~30 epochs before it falls
            # again; with a warm-started tumour scorer the early epochs score well and 30
            # stopped one easy fold at epoch 39 of such a plateau (lymphocyte genes 0.53 vs
            # 0.89 with 50, seed 1)
            "patience": 50,
            "seed": o.seed,
            "register": "folds",
            "retrain": True,
            # the epoch is chosen on 5 inner folds of each fold's training part (every
            # training patient validates once) instead of a validation fifth of 2-3 patients,
            # where one slide the tumour scorer got wrong from its warm start chose 1 epoch of
            # 100 for every task (easy seed 0 on one thread: tumour-burden genes 0.55 -> 0.69;
            # RESULTS.md, "Inner folds choose the epoch")
            "inner": 5,
            # the tumour scorer and the genes each at their own epoch, the genes' chosen on
            # the rank correlation of those the inner folds show a signal for: the summed
            # loss let the tumour terms, which rise from the first epochs once the warm
            # start has fit, choose epochs 0-9 for the genes on cohorts whose normals come
            # from one site (3 seeds: lymphocyte genes 0.77 -> 0.94 there, the naive arm's
            # 0.90 with the summed loss; easy 0.88 -> 0.90; hard 0.90 -> 0.92, one hard noise
            # gene at q 0.037;
            # RESULTS.md, "Choosing the genes' epoch by their rank")
            "select": "per_task",
            "genes_metric": "rank_signal",
        },
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": o.epochs,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        },
    }


def _write_yaml(path: Path, config: dict[str, Any], header: str) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
    return path


class _Runner:
    """Runs the demo's steps, prints progress, records finished steps in ``demo.json``."""

    def __init__(self, out: Path, options: DemoOptions, total: int) -> None:
        self.out, self.options, self.total = out, options, total
        self.state_path = out / "demo.json"
        self.k = 0
        self.start = time.perf_counter()
        self.state: dict[str, Any] = {"options": asdict(options), "steps": {}}
        if self.state_path.is_file():
            old = json.loads(self.state_path.read_text())
            # runs of older versions: what they ran with
            old["options"] = {
                "stain_norm": "none", "tumour_pooling": "attention", "tumour_context": False,
                "on_collapse": "keep", "tumour_warm_start": 0, "tumour_relative": False,
                **old.get("options", {}),
            }  # fmt: skip
            now = json.loads(json.dumps(asdict(options)))
            if old.get("options") != now:
                differ = [
                    f"{k}: {old['options'].get(k)!r} there, {now.get(k)!r} now"
                    for k in sorted(set(now) | set(old["options"]))
                    if old["options"].get(k) != now.get(k)
                ]
                raise ValueError(
                    f"{out} holds a demo run with other options ({'; '.join(differ)}); rerun "
                    "with those, pass --restart true to start it again, or choose another --out"
                )
            self.state = old

    def _save(self) -> None:
        tmp = self.state_path.with_name(f".demo.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_path)

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def begin(self, key: str, title: str, command: str | None = None) -> Any:
        """Start step ``key``: print its header (and the command it runs).

        Returns:
            The step's recorded result when an earlier run finished it (it is skipped), else
            None.
        """
        self.k += 1
        head = f"[{self.k}/{self.total}] {title}"
        done = self.state["steps"].get(key)
        if done is not None:
            self.say(f"{head}: done in an earlier run, skipped")
            return done
        elapsed = (time.perf_counter() - self.start) / 60
        shown = f"\n  $ histcode {command}" if command else ""
        self.say(f"\n{head}   (demo time {elapsed:.1f} min){shown}")
        return None

    def finish(self, key: str, result: Any, t0: float) -> Any:
        """Record step ``key`` as done with ``result`` (started at ``t0``); return it."""
        self.say(f"  done in {time.perf_counter() - t0:.0f} s")
        self.state["steps"][key] = result
        self._save()
        return result

    def step(self, key: str, title: str, argv: list[str], hint: str = "") -> dict[str, Any]:
        """Run ``histcode *argv`` as step ``key`` unless done; return its final JSON line.

        ``hint`` ends the error message when the step fails (what else to try)."""
        from histcode.cli import run_captured

        shown = " ".join(a if " " not in a else repr(a) for a in argv)
        done = self.begin(key, title, shown)
        if done is not None:
            return done
        t0 = time.perf_counter()
        code, result = run_captured(argv)
        if code != 0 or result is None:
            raise DemoStepError(
                f"step {self.k} ({title}) failed: `histcode {shown}` exited {code}; its "
                "message is above. Fix it and rerun the same `histcode demo` command: finished "
                f"steps are skipped.{hint}"
            )
        result["_seconds"] = round(time.perf_counter() - t0, 1)
        return self.finish(key, result, t0)


def _cohort_title(options: DemoOptions, out: Path) -> str:
    """What the table is about: the synthetic cohort's settings, or the cohort's folder."""
    if options.cohort is None:
        return f"{options.patients} patients, {options.difficulty} synthetic cohort"
    with open(out / "finetune" / PIPELINE / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    patients = len({r["patient_id"] for r in rows})
    return f"cohort {options.cohort} ({len(rows)} slides, {patients} patients)"


def _own_cohort(cohort: Path) -> tuple[Path, Path]:
    """The slides folder and expression matrix of a ``--cohort`` folder.

    Raises:
        FileNotFoundError: the folder or its ``expression.tsv`` is missing; says what the
            folder must hold.
    """
    layout = (
        "a cohort folder holds the slides (in slides/ or the folder itself; TCGA-barcode "
        "file names) and expression.tsv (genes × samples), optionally genes.json and "
        "truth/<slide>.npz"
    )
    if not cohort.is_dir():
        raise FileNotFoundError(f"--cohort {cohort}: no such folder; {layout}")
    expression = cohort / "expression.tsv"
    if not expression.is_file():
        raise FileNotFoundError(f"--cohort {cohort} has no expression.tsv; {layout}")
    slides = cohort / "slides"
    return (slides if slides.is_dir() else cohort), expression


def _check_sites(run: _Runner, slides: Path, stain_norm: str) -> dict[str, Any] | None:
    """Warn before tiling when the cohort's tumour labels follow its tissue source sites.

    Reads only the slide file names (TCGA barcodes: site and sample type), so a cohort whose
    normal slides all come from a few sites is named before hours of tiling and pretraining;
    ``histcode finetune`` checks again on the slides it trains on, and ``results.md`` opens
    with its warning. Slides without a TCGA barcode are left to the steps that need one.

    Returns:
        :func:`histcode.siteconfounding.site_confounding`'s result, None without TCGA slides.
    """
    from histcode.barcodes import is_tcga, parse_barcode
    from histcode.siteconfounding import site_confounding, site_confounding_warning
    from histcode.slide import slide_id
    from histcode.tiling import discover_slides

    try:
        ids = [slide_id(p) for p in discover_slides([str(slides)])]
    except (FileNotFoundError, ValueError):  # the tile step names what is wrong
        return None
    codes = [parse_barcode(i) for i in ids if is_tcga(i)]
    codes = [c for c in codes if c.kind != "control"]
    if not codes:
        return None
    found = site_confounding([c.site for c in codes], [float(c.is_tumour) for c in codes])
    warning = site_confounding_warning(found, stain_norm)
    if warning:
        run.say(f"\nWarning (from the slide file names): {warning}")
    return found


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.mean(values), 3) if values else None


def _gene_summary(metrics: dict[str, Any], roles: dict[str, str]) -> dict[str, Any]:
    """Per role (tumour-burden, lymphocyte, noise genes): Pearson r per test fold (the mean
    over the role's genes in that fold), as mean and sd over folds; the genes significant
    after FDR, and which test made them so (``metrics.json`` ``fdr.label``)."""
    folds = int(metrics.get("folds") or 0)
    per_fold: dict[str, list[list[float]]] = {}
    for gene, m in metrics.get("genes", {}).items():
        values = (m.get("pearson_r") or {}).get("folds") or []
        role = per_fold.setdefault(roles.get(gene, "other"), [[] for _ in range(folds)])
        for k, r in enumerate(values[:folds]):
            if r is not None:
                role[k].append(r)
    by_role = {
        role: [statistics.mean(v) for v in fold_values if v]
        for role, fold_values in per_fold.items()
    }
    significant = list(metrics.get("significant_genes", []))
    signal = [g for g in significant if roles.get(g) not in (None, "noise")]  # a known signal
    fdr = metrics.get("fdr", {})
    return {
        "pearson_r": {role: _mean(v) for role, v in sorted(by_role.items())},
        "pearson_r_sd": {
            role: round(statistics.stdev(v), 3) if len(v) > 1 else None
            for role, v in sorted(by_role.items())
        },
        "significant": significant,
        "significant_with_signal": len(signal),
        "significant_noise": len(significant) - len(signal),
        "genes": len(metrics.get("genes", {})),
        "test": fdr.get("label"),
        "alpha": fdr.get("alpha"),
    }


def _format(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if sd is None else f"{value:.2f} ± {sd:.2f}"


def _within_site_row(arms: dict[str, dict[str, Any]], cols: list[str]) -> tuple[str, list[str]]:
    """The row of the tumour AUC within tissue source sites (finetune's
    ``tumour.within_site_auc``: a stratified AUC over the sites with tumour and normal
    slides). The label names the number of such sites when the arms agree on it; otherwise
    each cell does."""
    counts = {arms[a].get("within_site_sites") for a in cols}
    label = "tumour AUC within sites"
    if len(counts) == 1 and None not in counts:
        return f"{label} ({counts.pop()} sites with both classes)", [
            _format(arms[a].get("tumour_auc_within_site")) for a in cols
        ]
    cells = []
    for a in cols:
        n = arms[a].get("within_site_sites")
        value = _format(arms[a].get("tumour_auc_within_site"))
        cells.append(value if n is None else f"{value} ({n} sites)")
    return f"{label} (N sites with both classes)", cells


def results_table(
    arms: dict[str, dict[str, Any]],
    signal_genes: dict[str, int],
    aggregator: str = "abmil",
    tumour_pooling: str = "attention",
    tumour_context: bool = False,
    encoder: str = "SimCLR encoder",
    tumour_map: str = "own",
) -> str:
    """The demo's results as a markdown table, one column per arm.

    Args:
        arms: arm name → ``{"tumour_auc", "tumour_auc_sd", "tumour_auc_within_site",
            "within_site_sites", "genes": _gene_summary(...), "localisation": {...}}``
            (the within-site entries may be absent: runs of older versions).
        signal_genes: role → number of genes with that role (for "of N").
        aggregator: the pipeline's aggregator (column title).
        tumour_pooling: the pipeline's tumour pooling (``top_share`` changes what its
            attention and tumour maps are, and the row titles say so).
        tumour_context: whether its tumour scorer read the tiles' context (column title).
        encoder: what made the pipeline arm's tile features (column title).
        tumour_map: which scorer's tile logits its tumour map is (``own`` or
            ``context``, ``--model.tumour_map``; row title).
    """
    top = tumour_pooling == "top_share"
    pooled = AGGREGATOR_NAMES.get(aggregator, aggregator)
    names = {
        PIPELINE: f"histcode: {encoder} + {pooled}"
        + (
            f" (tumour: top-share pooling{' with tile context' if tumour_context else ''})"
            if top
            else ""
        ),
        BASELINE: "naive: random encoder + mean pooling + linear",
    }
    cols = [a for a in (PIPELINE, BASELINE) if a in arms]
    n_signal = sum(n for role, n in signal_genes.items() if role != "noise")
    genes = arms[cols[0]]["genes"] if cols else {}
    # one test for both arms: finetune's metrics.json names it (absent from older runs)
    test = genes.get("test") or "test not recorded in metrics.json"
    alpha = f"{100 * (genes.get('alpha') or 0.05):g} %"
    rows: list[tuple[str, list[str]]] = [
        (
            "tumour vs normal AUC (test folds, mean ± sd)",
            [_format(arms[a].get("tumour_auc"), arms[a].get("tumour_auc_sd")) for a in cols],
        ),
        _within_site_row(arms, cols),
        (
            f"genes significant ({test}, FDR {alpha}; of {n_signal} with signal / noise genes)",
            [
                f"{arms[a]['genes']['significant_with_signal']} / "
                f"{arms[a]['genes']['significant_noise']}"
                for a in cols
            ],
        )
        if signal_genes
        else (  # no genes.json: which genes carry a signal is not known
            f"genes significant ({test}, FDR {alpha}; of {genes.get('genes')} genes)",
            [str(len(arms[a]["genes"]["significant"])) for a in cols],
        ),
    ]
    known = {"tumour": "tumour-burden", "lymphocyte": "lymphocyte", "noise": "noise"}
    present = {role for a in cols for role in arms[a]["genes"]["pearson_r"]}
    others = sorted(present - set(known) - {"other"})
    groups = [
        *(known.items()),
        *((role, role) for role in others),  # roles of another cohort's genes.json
        *([("other", "all")] if "other" in present else []),  # a cohort without roles
    ]
    for role, label in groups:
        if role not in present and (role not in known or "other" in present):
            continue  # a known role's row stays (as —) unless the cohort has no roles
        rows.append(
            (
                f"Pearson r of predicted vs true log2FC per patient, {label} genes "
                "(per fold, mean ± sd over folds)",
                [
                    _format(
                        arms[a]["genes"]["pearson_r"].get(role),
                        arms[a]["genes"].get("pearson_r_sd", {}).get(role),
                    )
                    for a in cols
                ],
            )
        )
    by = ", by the scorer with tile context" if top and tumour_context else ""
    attention_label = "map AUROC: attention vs true tumour" + (
        f" (top-share: the 5 % of tiles the tumour logit averages{by}, a 0/1 map)" if top else ""
    )
    own = ""
    if top and tumour_context:
        own = by if tumour_map == "context" else " by the scorer on the tile's own features"
    tumour_label = "map AUROC: tumour contribution vs true tumour" + (
        f" (top-share: each tile's own tumour logit{own})" if top else ""
    )
    for key, label in (
        ("attention_vs_tumour_mask", attention_label),
        ("tumour_vs_tumour_mask", tumour_label),
        ("lymphocyte_genes_vs_lymphocyte_mask", "map AUROC: lymphocyte genes vs true lymphocytes"),
    ):
        rows.append((label, [_format(arms[a]["localisation"].get(key)) for a in cols]))
    lines = [
        "| | " + " | ".join(names[a] for a in cols) + " |",
        "|---|" + "---|" * len(cols),
        *(f"| {label} | " + " | ".join(values) + " |" for label, values in rows),
    ]
    return "\n".join(lines)


def demo(
    out: Path = Path("demo_out"),
    patients: int = 20,
    difficulty: Literal["easy", "hard"] = "easy",
    slide_mm: tuple[float, float] = (2.5, 2.0),
    pretrain_steps: int = 2000,
    epochs: int = 100,
    folds: int = 3,
    aggregator: str = "abmil",
    workers: int = 2,
    baseline_encoder: str = "resnet18",
    seed: int = 0,
    cohort: Path | None = None,
    genes: list[str] | None = None,
    stain_norm: Literal["none", "macenko"] = "macenko",
    tumour_pooling: Literal["top_share", "attention"] = "top_share",
    tumour_context: bool = True,
    on_collapse: Literal["random", "keep"] = "random",
    tumour_warm_start: int = 10,
    tumour_relative: bool = False,
    restart: bool = False,
) -> Any:
    """Run the whole pipeline on a small synthetic cohort (about 10 minutes on 2 idle CPU
    cores; a 30-patient hard cohort about 14), or with ``--cohort DIR`` the same recipe on a
    cohort of your own.

    Prints each step's command as it runs it (they are the commands of the README), then a
    results table: tumour AUC, genes predicted and heatmap localisation, each next to the
    naive baseline (random-weight encoder, mean pooling, linear model); and where the plots
    and maps are. Rerunning the same command resumes after the last finished step.

    ``--cohort DIR`` skips the synthesis: ``DIR`` holds the slides (in ``DIR/slides/`` or
    ``DIR`` itself; file names are TCGA barcodes, which give patient, sample type and site)
    and ``DIR/expression.tsv`` (genes × samples, TPM); optional ``DIR/genes.json`` (each
    gene's role, e.g. ``{"MYC": {"role": "tumour"}}``: the table then groups genes by role)
    and ``DIR/truth/<slide>.npz`` (tumour and lymphocyte masks: the maps are then scored).
    Outputs are as for the synthetic cohort: ``OUT/finetune/<arm>/predictions.csv``,
    ``OUT/maps/<arm>/<slide>.geojson``, ``OUT/results.md``.

    Args:
        out: Output folder; everything the demo makes is under it.
        patients: Patients in the synthetic cohort (each has a tumour slide, half a normal
            one too).
        difficulty: Synthetic cohort difficulty, 'easy' or 'hard' (see ``histcode synth``).
        slide_mm: Width and height of each synthetic slide in mm, as a list: ``--slide_mm
            "[3.0, 2.5]"``.
        pretrain_steps: SimCLR steps (batches of 32 tiles).
        epochs: Finetuning epochs each of a fold's inner folds (5, fewer for a small
            training part) runs; the epochs chosen on them (the pipeline's tumour scorer's
            and genes' apart) are those the fold's model is then trained for on all its
            training patients.
        folds: Patient-grouped cross-validation folds.
        aggregator: MIL aggregator of the pipeline: abmil (gated attention), clam_sb,
            transformer, mean or max.
        workers: Processes for synth, tiling and tile decoding.
        baseline_encoder: Zoo encoder whose random weights make the naive baseline.
        seed: Random seed of the cohort, pretraining and finetuning.
        cohort: A cohort folder to run the recipe on instead of a synthetic one (see above);
            ``--patients``, ``--difficulty`` and ``--slide_mm`` are then not used.
        genes: Genes to predict (default: the driver genes found in the expression matrix).
        stain_norm: Stain normalisation of the tiles, passed to ``histcode tile``: 'macenko'
            (default: each slide's stains estimated from its tissue and mapped to a reference
            before pretraining; both arms see normalised tiles) or 'none'. Where normal slides
            come from some sites only, as in TCGA, a model on raw tiles learns the site's stain
            instead of tumour: on such synthetic cohorts Macenko lifted the within-site tumour
            AUC from 0.48 to 0.81, and on cohorts without that confounding it kept the tumour
            AUC and gene figures and lowered the hard cohort's tumour map (0.80 → 0.68;
            ``benchmarks/RESULTS.md``, "Stain normalisation by default"). A slide with too
            little tissue to estimate its stains fails tiling and is left out, named.
        tumour_pooling: How the pipeline's tumour logit pools the tiles: 'top_share' (each
            tile scored on its own, the slide's logit the mean of its top 5 %, every tile of
            a normal training slide a known negative; finds foci of a few per cent of the
            tissue) or 'attention' (the gated attention branch, as the genes). The naive
            baseline is unchanged.
        tumour_context: With 'top_share', the tumour scorer also reads each tile's 3 × 3
            neighbourhood and both relative to the slide's median tile, which takes away the
            slide's stain cast and site (``--model.tumour_context``); the genes still read
            the tiles' own features.
        on_collapse: What the pipeline arm reads when the SimCLR pretraining collapsed (its
            collapse checks' verdict is 'collapsed': the loss at that of a constant
            embedding and features of low effective rank, ``histcode pretrain --help``):
            'random' (default) embeds nothing with it and reads the naive arm's random-weight
            features instead, the rest of the recipe unchanged, as the results say; 'keep'
            uses the collapsed encoder anyway. A collapsed encoder's features carry less than
            random weights do, so a pipeline reading them would be judged on nothing.
        tumour_warm_start: With 'top_share', each fold's tumour scorer starts from the best of
            this many directions made from tumour tiles of its training slides, fitted alone
            first (``--model.tumour_warm_start``; 0: a random start). Warm-started, that
            scorer also draws the tumour map (``--model.tumour_map context``); with 0 the map
            comes from a second scorer on the tiles' own features.
        tumour_relative: With 'tumour_context', the tumour scorer reads only the tile's and
            its neighbourhood's features relative to the slide's median tile, not their
            absolute values (``--model.tumour_relative``), which carry each site's stain:
            where normal slides come from some sites only, as in TCGA, a scorer that reads
            them can learn the site instead of tumour. Off by default: measured on such
            cohorts it lifted the within-site tumour AUC on one seed of three, and on the
            easy demo it lost the tumour map on two (``benchmarks/RESULTS.md``, "Site
            confounding").
        restart: Forget the steps a previous run of this folder finished and redo them all.
    """
    from histcode.commandkit import CommandResult

    if cohort is not None:
        slides, expression = _own_cohort(Path(cohort))
    elif patients < 2 * folds:
        raise ValueError(
            f"--patients {patients} is too few for {folds} patient-grouped folds with a "
            f"validation split; use at least {2 * folds}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = DemoOptions(
        patients=None if cohort else patients,
        difficulty=None if cohort else difficulty,
        slide_mm=(float(slide_mm[0]), float(slide_mm[1])),
        mpp=1.0,
        tile_size=64,
        pretrain_steps=pretrain_steps,
        batch_size=32,
        epochs=epochs,
        folds=folds,
        baseline_encoder=baseline_encoder,
        aggregator=aggregator,
        seed=seed,
        cohort=str(Path(cohort).resolve()) if cohort else None,
        genes=tuple(genes) if genes else None,
        stain_norm=stain_norm,
        tumour_pooling=tumour_pooling,
        tumour_context=bool(tumour_context) and tumour_pooling == "top_share",
        on_collapse=on_collapse,
        tumour_warm_start=int(tumour_warm_start) if tumour_pooling == "top_share" else 0,
        tumour_relative=bool(tumour_relative and tumour_context) and tumour_pooling == "top_share",
    )
    if on_collapse not in ON_COLLAPSE:
        raise ValueError(f"--on_collapse {on_collapse!r}: choose from {sorted(ON_COLLAPSE)}")
    if restart and (out / "demo.json").is_file():
        (out / "demo.json").unlink()
    run = _Runner(out, options, total=8 if cohort is None else 7)
    registry = str(out / "registry")
    tiles = out / "tiles.zarr"
    if cohort is None:
        cohort = out / "cohort"
        slides, expression = cohort / "slides", cohort / "expression.tsv"
    cohort = Path(cohort)
    feats = {PIPELINE: out / "features" / "simclr.zarr", BASELINE: out / "features" / "random.zarr"}
    pre_cfg = _write_yaml(
        out / "configs" / "pretrain.yaml",
        _pretrain_config(options),
        "histcode demo: SimCLR pretraining on CPU (written by `histcode demo`).\n"
        "Full defaults: histcode config show pretrain/simclr.",
    )
    ft_cfg = _write_yaml(
        out / "configs" / "finetune.yaml",
        _finetune_config(options),
        "histcode demo: tumour + driver-gene log2FC, gated attention MIL, per-fold models\n"
        "(written by `histcode demo`). Full defaults: histcode config show finetune/deg.",
    )
    progress = ["--progress", "true"]

    if options.cohort is None:
        run.step(
            "synth",
            "synthetic cohort (slides, expression, truth masks)",
            [
                "synth", "--out", str(cohort), "--patients", str(patients),
                "--difficulty", difficulty,
                "--slide_mm", f"[{options.slide_mm[0]}, {options.slide_mm[1]}]",
                "--seed", str(seed), "--workers", str(workers), *progress,
            ],
        )  # fmt: skip
    _check_sites(run, slides, stain_norm)
    run.step(
        "tile",
        "tissue segmentation and tiling",
        [
            "tile", "--slides", str(slides), "--out", str(tiles),
            "--mpp", str(options.mpp), "--tile_size", str(options.tile_size),
            "--workers", str(workers), *progress,
            *(["--stain_norm", stain_norm] if stain_norm != "none" else []),
        ],
        hint=" With --stain_norm macenko (the default), a slide whose stains cannot be "
        "estimated (too little tissue, or one stain only: not H&E) fails tiling: move it out "
        "of the cohort folder, or run the recipe on raw tiles with --stain_norm none "
        "--restart true."
        if stain_norm == "macenko"
        else "",
    )  # fmt: skip
    encoder = run.step(
        "pretrain",
        f"SimCLR pretraining of the tile encoder ({pretrain_steps} steps)",
        [
            "pretrain", f"--config={pre_cfg}", "--data.tiles", str(tiles),
            "--name", "demo-encoder", "--registry", registry, "--out", str(out / "pretrain"),
        ],
    )  # fmt: skip
    pipeline_features = "pretrained features"
    if _collapsed(encoder) and options.on_collapse == "random":
        feats[PIPELINE] = _skip_collapsed_embedding(run, encoder, feats[BASELINE])
        pipeline_features = "random-weight features (SimCLR collapsed)"
    else:
        run.step(
            "embed-pipeline",
            "embedding every tile with the pretrained encoder",
            [
                "embed", "--encoder", encoder["ref"], "--registry", registry,
                "--tiles", str(tiles), "--out", str(feats[PIPELINE]), "--workers", "1",
                *progress,
            ],
        )  # fmt: skip
    run.step(
        "embed-baseline",
        f"embedding every tile with a random-weight {baseline_encoder} (naive baseline)",
        [
            "embed", "--encoder", baseline_encoder, "--registry", registry, "--tiles", str(tiles),
            "--out", str(feats[BASELINE]), "--workers", "1", "--seed", str(seed), *progress,
        ],
    )  # fmt: skip
    finetuned: dict[str, dict[str, Any]] = {}
    for arm, pooling, what in (
        (PIPELINE, aggregator, f"{aggregator} MIL on the {pipeline_features}"),
        (BASELINE, "linear", "naive baseline: mean pooling + linear model"),
    ):
        finetuned[arm] = run.step(
            f"finetune-{arm}",
            f"tumour + driver genes, {what} ({folds}-fold patient-grouped CV)",
            [
                "finetune", f"--config={ft_cfg}", "--features", str(feats[arm]),
                "--expression", str(expression), "--name", f"demo-{arm}",
                "--registry", registry, "--out", str(out / "finetune" / arm),
                "--model.aggregator", pooling,
                *(BASELINE_MODEL if arm == BASELINE else []),
                *(["--data.genes", *genes] if genes else []),
            ],
        )  # fmt: skip

    from histcode.synth.cohort import read_gene_roles

    roles = read_gene_roles(cohort / "genes.json")
    if genes:  # the model predicts only these: draw, count and group no other gene
        roles = {g: r for g, r in roles.items() if g in genes}
    maps = _heatmaps(run, out, cohort, tiles, feats, finetuned, registry, roles)
    fallback = run.state["steps"]["embed-pipeline"].get("fallback")
    result = _report(
        out, options, finetuned, maps, roles, registry, run.start, encoder, fallback is not None
    )
    return CommandResult(out, result, {"options": asdict(options), "steps": run.state["steps"]})


def _collapsed(pretrained: dict[str, Any]) -> bool:
    """Whether the pretrain step's collapse checks said ``collapsed``."""
    return (pretrained.get("collapse") or {}).get("verdict") == "collapsed"


def _skip_collapsed_embedding(run: _Runner, pretrained: dict[str, Any], random: Path) -> Path:
    """The embed step of a collapsed encoder (``--on_collapse random``): embed nothing, say
    why, record it, and return the store the pipeline arm reads instead (``random``)."""
    key = "embed-pipeline"
    title = "embedding every tile with the pretrained encoder"
    done = run.begin(key, title)
    if done is None:
        t0 = time.perf_counter()
        reasons = "; ".join((pretrained.get("collapse") or {}).get("reasons") or [])
        run.say(
            f"  the SimCLR encoder {pretrained.get('ref')} collapsed ({reasons or 'see its card'}"
            f"): its features would carry less than random weights, so the pipeline arm "
            f"reads {random} (the naive arm's random-weight features) instead; "
            "--on_collapse keep uses the collapsed encoder anyway"
        )
        done = run.finish(key, {"fallback": "random", "features": str(random)}, t0)
    return Path(done["features"])


def encoder_health(
    pretrained: dict[str, Any], instead: str | None = None
) -> tuple[str, str | None]:
    """What the pretraining's collapse checks said, as a line and (when not ``ok``) a warning.

    Args:
        pretrained: the pretrain step's result (``ref``, ``final_loss``, ``collapse``: the
            summary of :class:`histcode.pretrain.collapse.CollapseMonitor`'s report, absent
            when the checks were off).
        instead: the features the pipeline arm read in place of the collapsed encoder's
            (``--on_collapse random``), or None when it read the encoder's.

    Returns:
        ``(line, warning)``: the line for ``results.md``; the warning, or None when the
        verdict is ``ok``.
    """
    ref = pretrained.get("ref", "the encoder")
    c = pretrained.get("collapse")
    if not c:
        return (
            f"SimCLR encoder `{ref}`: no collapse checks were recorded, so nothing says "
            "whether its features carry more than random weights do.",
            None,
        )
    line = (
        f"SimCLR encoder `{ref}`: final loss {c['loss_over_chance']:.2f} × the loss of a "
        f"constant embedding ({c['chance_loss']:.2f}); effective rank of its features on "
        f"held-out tiles {c['backbone_effective_rank']:.1f} of {c['backbone_dim']} "
        f"dimensions; collapse verdict **{c['verdict']}** (`histcode pretrain --help`, "
        "`--collapse.*`)."
    )
    if c["verdict"] == "ok":
        return line, None
    warning = (
        f"**Warning: the SimCLR pretraining on this cohort looks {c['verdict']}** (its loss "
        f"is {c['loss_over_chance']:.2f} × that of a constant embedding, effective rank "
        f"{c['backbone_effective_rank']:.1f})."
    )
    if instead:
        warning += (
            f" The pipeline column therefore reads {instead} instead of its features "
            "(`--on_collapse random`): it differs from the naive column only in how it "
            "learns from the same tiles' features. See the pretraining's log and card "
            "(`extra.collapse`), or rerun with `--on_collapse keep` to use the encoder anyway."
        )
    else:
        warning += (
            " Its features may carry less than the naive arm's random weights: read the "
            "pipeline column against the naive one, and see the pretraining's log and card "
            "(`extra.collapse`) before using this encoder."
        )
    return line, warning


def _report(
    out: Path,
    options: DemoOptions,
    finetuned: dict[str, dict[str, Any]],
    maps: dict[str, dict[str, float | None]],
    roles: dict[str, str],
    registry: str,
    start: float,
    pretrained: dict[str, Any] | None = None,
    fallback: bool = False,
) -> dict[str, Any]:
    """Write ``results.md`` (the table) and ``results.json``, print the table, and return the
    command's result: each arm's tumour AUC, genes by role and map scores, and what the
    pretraining's collapse checks said (:func:`encoder_health`); with ``fallback`` the
    pipeline arm read the naive arm's random-weight features (``--on_collapse random``)."""
    arms: dict[str, dict[str, Any]] = {}
    confounding: dict[str, Any] = {}
    for arm in (PIPELINE, BASELINE):
        metrics = json.loads((out / "finetune" / arm / "metrics.json").read_text())
        confounding = confounding or metrics.get("tumour", {}).get("site_confounding", {})
        arms[arm] = {
            "tumour_auc": finetuned[arm].get("tumour_auc"),
            "tumour_auc_sd": finetuned[arm].get("tumour_auc_sd"),
            "tumour_auc_within_site": finetuned[arm].get("tumour_auc_within_site"),
            "within_site_sites": finetuned[arm].get("within_site_sites"),
            "genes": _gene_summary(metrics, roles),
            "localisation": maps[arm],
        }
    counts: dict[str, int] = {}
    for role in roles.values():
        counts[role] = counts.get(role, 0) + 1
    random = f"random-weight {options.baseline_encoder}"
    table = results_table(
        arms,
        counts,
        options.aggregator,
        options.tumour_pooling,
        options.tumour_context,
        f"{random} encoder (SimCLR collapsed)" if fallback else "SimCLR encoder",
        "context" if _context_map(options) else "own",
    )
    pretrained = pretrained or {}
    health, warning = encoder_health(
        pretrained, f"the naive arm's {random} features" if fallback else None
    )
    site_warning = confounding.get("warning")  # finetune's (histcode.finetune.metrics)
    selection = [  # folds whose validation chose an early epoch for all tasks (finetune's)
        f"**Warning ({arm} arm, {fold}):** {text}"
        for arm in (PIPELINE, BASELINE)
        for fold, text in (finetuned[arm].get("selection_warnings") or {}).items()
    ]
    minutes = (time.perf_counter() - start) / 60
    plots = out / "finetune" / PIPELINE / "plots"
    paths = {
        "tumour ROC, genes ranked, predicted vs true log2FC": str(plots),
        "attention and gene maps (PNG, GeoJSON for QuPath)": str(out / "maps" / PIPELINE),
        "baseline maps": str(out / "maps" / BASELINE),
        "metrics": str(out / "finetune" / PIPELINE / "metrics.json"),
        "registry (encoder and slide models)": registry,
    }  # fmt: skip
    text = "\n".join(
        [
            f"# histcode demo — {_cohort_title(options, out)}",
            "",
            *([warning, ""] if warning else []),
            *([f"**Warning:** {site_warning}", ""] if site_warning else []),
            *(line for w in selection for line in (w, "")),
            "Every figure is on test folds (patient-grouped CV; each slide's maps come from "
            "the model of the fold that held it out). Genes: one value per patient (its slides "
            "averaged); each fold's model is tested on its own test patients (one-sided "
            "Pearson), the folds' p-values combined by Stouffer's method (the folds' tests "
            "taken as correlated 1/k: each fold's model learnt from the others' targets) and "
            "Benjamini–Hochberg applied over all genes; r is the mean over a group's genes in "
            "each fold, mean ± sd over folds. Tumour AUC within sites: tumour vs normal slides "
            "of the same tissue source site only (a stratified AUC over the sites with both "
            "classes), so a model that scores a site's stain instead of tumour falls to ~0.5 "
            "there. Map AUROC: tile scores vs the cohort's truth masks, mean over tumour "
            "slides.",
            "",
            table,
            "",
            health,
            "",
            *(f"- {what}: `{where}`" for what, where in paths.items()),
            "",
        ]
    )
    made_by = _environment()
    text += (
        f"\nMade by histcode {made_by['histcode']} with torch {made_by['torch']} on "
        f"{made_by['torch_threads']} CPU thread(s): the same seed reproduces these figures "
        "with the same thread count on the same kind of CPU (float sums depend on both).\n"
    )
    (out / "results.md").write_text(text)
    result = {
        "out": str(out),
        "minutes": round(minutes, 1),
        "environment": made_by,
        "results": arms,
        "encoder": {
            **{k: pretrained.get(k) for k in ("ref", "final_loss", "collapse")},
            "warning": warning,
            "pipeline_features": "random" if fallback else "encoder",
        },
        "site_confounding": {
            k: confounding.get(k)
            for k in ("site_only_auc", "chance_auc", "p_value", "confounded", "rule")
        }
        if confounding
        else None,
        "site_warning": site_warning,
        "selection_warnings": {a: finetuned[a].get("selection_warnings") or {} for a in arms},
        "results_md": str(out / "results.md"),
        "paths": paths,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + text, file=sys.stderr)
    return result


def _environment() -> dict[str, Any]:
    """What made the figures: package versions and torch's CPU thread count (a run's floats
    depend on it, so a rerun of the same seed matches only on as many threads)."""
    import torch

    from histcode import __version__

    return {
        "histcode": __version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }


def _heatmaps(
    run: _Runner,
    out: Path,
    cohort: Path,
    tiles: Path,
    feats: dict[str, Path],
    finetuned: dict[str, dict[str, Any]],
    registry: str,
    roles: dict[str, str],
) -> dict[str, dict[str, float | None]]:
    """Maps of every tumour slide by the fold model that held it out; scored against the
    cohort's truth masks (``cohort/truth/<slide>.npz``) where it has them."""
    from histcode.cli import run_captured
    from histcode.registry import Registry
    from histcode.tilestore import TileStore

    key = "heatmaps"
    done = run.begin(key, "heatmaps of every tumour slide, by the fold model that held it out")
    if done is not None:
        return done
    store = TileStore(tiles)
    drawn = [
        next(g for g, r in roles.items() if r == role)
        for role in ("tumour", "lymphocyte")
        if role in roles.values()
    ]  # one gene of each kind drawn as PNG; every gene is scored and in the GeoJSON
    reg = Registry(registry)
    result: dict[str, dict[str, float | None]] = {}
    t0 = time.perf_counter()
    for arm in (PIPELINE, BASELINE):
        fold_model = {
            int(card.extra["fold"]): card.ref
            for card in reg.list(f"demo-{arm}")
            if card.ref in finetuned[arm]["registered"]
        }
        with open(out / "finetune" / arm / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        tumour = [r for r in rows if r.get("tumour_true") in ("1", "1.0")]  # from barcodes
        scores: dict[str, list[float]] = {}
        for i, row in enumerate(tumour, 1):
            sid = row["slide_id"]
            argv = [
                "heatmap", "--model", fold_model[int(row["fold"])], "--registry", registry,
                "--features", str(feats[arm]), "--slide", str(store.group(sid).attrs["path"]),
                "--out", str(out / "maps" / arm),
            ]  # fmt: skip
            truth = cohort / "truth" / f"{sid}.npz"
            if truth.is_file():
                argv += ["--truth", str(truth)]
            if drawn:
                argv += ["--genes", *drawn]
            if i == 1:
                run.say("  $ histcode " + " ".join(argv) + "   (and so on for each slide)")
            code, maps = run_captured(argv, quiet=True)
            if code != 0 or maps is None:
                raise DemoStepError(
                    f"heatmap of {sid} ({arm}) failed (exit {code}): rerun it by hand to see "
                    f"why: histcode {' '.join(argv)}"
                )
            for name, value in (maps.get("localisation_auroc") or {}).items():
                if value is None:
                    continue
                group = "lymphocyte_genes_vs_lymphocyte_mask" if "lymphocyte_mask" in name else name
                scores.setdefault(group, []).append(value)
            print(f"\r  {arm}: {i}/{len(tumour)} slides", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        result[arm] = {name: _mean(values) for name, values in sorted(scores.items())}
    return run.finish(key, result, t0)


def main(argv: Sequence[str], prog: str = "histcode demo") -> int:
    """``histcode demo``."""
    from histcode.commandkit import run_function

    return run_function(demo, argv, prog, "demo")
