"""Evaluate a run: python scripts/evaluate.py ckpt=outputs/synthetic_tiny/<timestamp>. A launcher of
neighborretr_train.evaluate (also `neighborretr-eval` and `accelerate launch -m neighborretr_train.evaluate`)."""

from neighborretr_train.evaluate import main

if __name__ == "__main__":
    main()
