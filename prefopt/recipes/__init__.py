"""L4, one file per worker job, read top to bottom: train.py (build -> resume -> loop -> finish) and evaluate.py.
Imports train/ and below; nothing below imports a recipe."""
