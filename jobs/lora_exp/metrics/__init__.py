"""Metrics, computed offline with the packages underneath ``evaluate``'s metric scripts (which are fetched
from the hub at run time): classification (scikit-learn), SQuAD v2 (the official logic), generation
(sacrebleu, nltk, rouge-score). No task or model knowledge here."""
