"""Generation-quality metrics, computed offline: BLEU, SacreBLEU, ROUGE-1/2/L, TER, chrF and METEOR.

``evaluate`` loads each metric's script from the hub at run time, which fails on air-gapped clusters and
in CI, so each metric is computed with the package underneath it: sacrebleu (SacreBLEU, chrF, TER, and
the 13a tokenizer), nltk (BLEU, METEOR), rouge-score (ROUGE). None is skipped: a missing dependency is
an error.

METEOR needs WordNet. nltk would download it; instead the project uses Debian's ``wordnet-base``
plus ``wordnet-sense-index`` (``apt-get install wordnet-base wordnet-sense-index``, done by ``make setup``
and the images), from /usr/share/wordnet or ``$LORA_EXP_WORDNET_DIR``, copied once into an nltk data dir.
"""

from __future__ import annotations

import os
import shutil
import warnings
from functools import cache
from pathlib import Path
from typing import Any

from lora_exp.core.errors import UserError

WORDNET_FILES = [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("adj", "adv", "noun", "verb")] + [
    f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")
] + ["index.sense"]
# The 45 WordNet 3.0 lexicographer files (lexnames(5WN)), in number order. nltk's reader wants this file,
# which Debian's wordnet-base ships only as its man page; a test checks this list against that page.
LEXNAMES = (  # noqa: SIM905 (grouped lines read better than 45 quoted items)
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def wordnet_source() -> Path:
    return Path(os.environ.get("LORA_EXP_WORDNET_DIR", "/usr/share/wordnet"))


def check_wordnet() -> Path:
    """The WordNet 3.0 directory METEOR reads, or a UserError saying how to install it (no nltk import)."""
    src = wordnet_source()
    missing = [f for f in WORDNET_FILES if not (src / f).is_file()]
    if missing:
        raise UserError(f"METEOR needs WordNet 3.0 in {src} (missing {missing[:3]}...): "
                        "apt-get install wordnet-base wordnet-sense-index, or set LORA_EXP_WORDNET_DIR to a "
                        "WordNet 3.0 'dict' directory")
    return src


@cache
def wordnet() -> Any:
    """An nltk WordNet reader over the system's WordNet 3.0 database files (no download)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    src = check_wordnet()
    # nltk resolves the name "wordnet" through its data path (<dir>/corpora/wordnet) even for an explicit
    # reader, so the copy lives exactly there.
    data_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-exp" / "nltk_data"
    root = data_dir / "corpora" / "wordnet"
    root.mkdir(parents=True, exist_ok=True)
    # Copies, not symlinks: nltk refuses files that resolve outside the reader's root.
    for f in WORDNET_FILES:
        if not (root / f).exists():
            shutil.copyfile(src / f, root / f)
    if (src / "lexnames").is_file():
        shutil.copyfile(src / "lexnames", root / "lexnames")
    else:
        (root / "lexnames").write_text("".join(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n"
                                               for i, name in enumerate(LEXNAMES)))
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.append(str(data_dir))  # nltk >= 3.9 reads corpora only under its data path
    with warnings.catch_warnings():  # "multilingual functions are not available": METEOR needs none
        warnings.simplefilter("ignore")
        return WordNetCorpusReader(str(root), None)


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level scores of generated continuations against the true ones."""
    import sacrebleu
    from nltk.translate.bleu_score import corpus_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    if not predictions:
        return {}
    tok = Tokenizer13a()
    hyp_toks = [tok(p).split() for p in predictions]
    ref_toks = [tok(r).split() for r in references]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    wn = wordnet()
    with warnings.catch_warnings():  # nltk warns on every zero n-gram count; a zero BLEU says it already
        warnings.simplefilter("ignore")
        bleu = float(corpus_bleu([[r] for r in ref_toks], hyp_toks))
    return {
        # `evaluate`'s "bleu": 13a tokens, up to 4-grams, brevity penalty, no smoothing; 0-1.
        "bleu": bleu,
        "sacrebleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        "ter": sacrebleu.corpus_ter(predictions, [references]).score,
        **{k: sum(s[k].fmeasure for s in rouge) / len(rouge) for k in ("rouge1", "rouge2", "rougeL")},
        "meteor": sum(meteor_score([r], h, wordnet=wn) for r, h in zip(ref_toks, hyp_toks, strict=True))
        / len(hyp_toks),
    }
