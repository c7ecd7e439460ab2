"""Evaluations of a frozen encoder: VQA, classic vision, vision-language alignment."""
