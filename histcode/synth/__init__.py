"""Synthetic cohort."""
