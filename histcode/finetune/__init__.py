"""histcode.finetune: stage 2, attention MIL from tile embeddings to slide predictions.

Tumour vs normal and differential expression (log2 fold change against normal tissue) of
cancer driver genes, after HistCode (Huang et al. 2022) and Graziani et al. 2022. Imports the
core (``histcode``) only, never ``histcode.pretrain``; nothing heavy is imported here.

Modules:
    barcodes     TCGA barcodes: patient, sample, tumour / normal sample type.
    labels       labels CSV and expression matrix → :class:`~.labels.Labels` (tumour,
                 per-gene log2FC and up / down / unchanged class); errors name bad rows.
    aggregators  the aggregator registry: ``abmil``, ``clam_sb``, ``mean``, ``max``,
                 ``transformer`` — (B, N, D) features + mask → ``MILOutput``.
    heads        multi-task head and :class:`~.heads.SlideModel` (one model, every task);
                 tile-level contributions for heatmaps; builders for ``Registry.load``.
    bags         bags from a feature store, padded batches with masks.
    module       the LightningModule (masked multi-task losses, AdamW).
    cv           patient-grouped stratified k-fold with inner validation; leakage checks.
    metrics      AUC / accuracy / F1, per-gene AUC and correlations, BH FDR, mean ± sd.
    plots        ROC curves, ranked genes, predicted vs true log2FC (seaborn, headless).
    options      the typed option groups of the command.
    pipeline     :func:`~.pipeline.run_finetune`: a whole run, outputs and registration.
    command      ``histcode finetune``.
    maps         a slide model's tile maps over one slide (attention, each tile's score per
                 prediction) and whether the model saw the slide in training.
    heatmap      ``histcode heatmap``: the maps drawn and written by the core
                 (:mod:`histcode.mapdrawing`), scored by :mod:`histcode.synth.scoring`.

Example:
    >>> from histcode.finetune.heads import slide_model_builders
    >>> from histcode.registry import Registry
    >>> model, card = Registry().load("deg-abmil@latest", builders=slide_model_builders())
    >>> out = model(features, mask)        # features (B, N, D), mask (B, N)
    >>> out.tumour_prob, out.log2fc, out.up_prob, out.attention
"""
