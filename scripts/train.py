"""Train: python scripts/train.py experiment=synthetic_tiny (or under `accelerate launch`). A launcher of
neighborretr_train.train, the recipe (also `neighborretr-train` and `accelerate launch -m neighborretr_train.train`)."""

from neighborretr_train.train import main

if __name__ == "__main__":
    main()
