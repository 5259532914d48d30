"""histcode.pretrain stage."""
