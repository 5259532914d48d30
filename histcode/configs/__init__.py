"""The YAML configs shipped with histcode, the package ``histcode.configs``.

One full default per command (``pretrain/simclr.yaml``, ``finetune/deg.yaml``, …) plus small
overrides (``*/cpu_smoke.yaml``). ``--config NAME`` of every command finds them by name from
any folder; ``histcode config list`` and ``histcode config show NAME`` print them
(:mod:`histcode.configfiles`).
"""
