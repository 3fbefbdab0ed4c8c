"""Check a dataset: python scripts/validate_data.py data=msrvtt data.root=... (= neighborretr-validate-data)."""

from neighborretr_train.validate import main

if __name__ == "__main__":
    main()
