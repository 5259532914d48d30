"""histcode.finetune stage."""
