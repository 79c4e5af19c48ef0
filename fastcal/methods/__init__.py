"""Adaptation methods composed from the shared layers: zero-shot classification, prompt learners and
the prompt-tuning methods built on them (CoOp, CoCoOp, KgCoOp, MaPLe, VPT)."""
