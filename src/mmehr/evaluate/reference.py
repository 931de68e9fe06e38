"""A supervised reference beside every zero-shot number: how much signal a task's context holds.

For each task, logistic regressions are fit on the train split's task samples and score the same samples
the rollouts score. A sample's features are exactly what the model sees at its prediction time:

    ehr          the context (static prefix + the last `context_tokens` tokens up to the context end) as a
                 bag of codes: log(1 + count) of every token, and of every (code, decile) pair, so that a
                 lab with its value bin counts as one event (a bare decile token would not say which lab)
    <modality>   the up to K_m most recent events acquired strictly before the prediction time, each
                 mean-pooled over its first `max_tokens` stored encoder tokens: the latest event's and the
                 average over the events, each reduced to its first `n_components` principal components
                 (fitted on train: a few thousand samples cannot fit hundreds of dense dimensions), plus
                 the number of events

References: `ehr`, `ehr+<m>` for each enabled modality, and `ehr+all` when there are several. The
regularisation strength is chosen by subject-grouped cross-validation on train. The references tell a
reader how much a task is learnable from the data the model had, and are what the model's progress is
measured against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler, StandardScaler

from mmehr.data.timelines import TimelineStore
from mmehr.evaluate.metrics import (
    auroc,
    bootstrap_metrics,
    choose_threshold,
    paired_auroc_difference,
    sampled_auroc,
)
from mmehr.evaluate.tasks import TaskConfig, task_samples
from mmehr.modalities.store import EmbeddingStore

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class ReferenceData:
    """What the references read: the timelines' train split and the modality stores (as the model)."""

    context_tokens: int
    modality_stores: dict[str, EmbeddingStore] = field(default_factory=dict)
    k_max: Mapping[str, int] = field(default_factory=dict)
    max_tokens: Mapping[str, int | None] = field(default_factory=dict)
    max_train_samples: int = 6000
    n_components: int = 16
    _pooled: dict[str, PooledEvents] = field(default_factory=dict, repr=False)

    def pooled(self, modality: str) -> PooledEvents:
        """The modality's pooled-event features (cached: each event is pooled once per evaluation)."""
        if modality not in self._pooled:
            store = self.modality_stores[modality]
            self._pooled[modality] = PooledEvents(
                store, int(self.k_max.get(modality, 4)), self.max_tokens.get(modality)
            )
        return self._pooled[modality]


def bag_of_codes(store: TimelineStore, samples: pl.DataFrame, context_tokens: int) -> sp.csr_matrix:
    """(n, 11 V) log(1 + counts): tokens of each sample's context (columns [0, V)), then (code, decile)
    pairs (column V + 10 code + q). The context is the one `mmehr.data.windows.assemble` builds."""
    V = len(store.vocab)
    q_of = np.full(V, -1, dtype=np.int64)
    q_of[store.vocab.quantile_ids] = np.arange(len(store.vocab.quantile_ids))
    keep = context_tokens - store.static_len
    rows, cols = [], []
    for n, (i, end) in enumerate(zip(samples["subject_index"].to_list(), samples["context_end"].to_list())):
        tokens, times = store.timeline(int(i))
        start = max(0, int(end) - keep)
        seq = np.concatenate([store.static_context(int(i), int(times[start])), tokens[start:end]]).astype(
            np.int64
        )
        q = q_of[seq[1:]]
        pairs = V + 10 * seq[:-1][q >= 0] + q[q >= 0]
        c = np.concatenate([seq, pairs])
        rows.append(np.full(c.size, n))
        cols.append(c)
    r, c = np.concatenate(rows), np.concatenate(cols)
    m = sp.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=(samples.height, 11 * V))
    m.sum_duplicates()
    m.data = np.log1p(m.data)
    return m


class PooledEvents:
    """Per-sample mean of the mean-pooled embeddings of the K_m events visible at the prediction time."""

    def __init__(self, store: EmbeddingStore, k: int, max_tokens: int | None):
        self.store, self.k, self.max_tokens = store, k, max_tokens
        self._pooled: dict[int, np.ndarray] = {}

    def _event(self, row: int) -> np.ndarray:
        if row not in self._pooled:
            emb = self.store.embedding(row)[: self.max_tokens or None]
            self._pooled[row] = emb.astype(np.float32).mean(0)
        return self._pooled[row]

    def features(self, samples: pl.DataFrame) -> np.ndarray:
        """(n, 2 d_enc + 1): the latest event's pooled embedding, the mean over the K_m events (zeros when
        none), and their count."""
        d = self.store.d_enc
        out = np.zeros((samples.height, 2 * d + 1), dtype=np.float32)
        for n, (s, t) in enumerate(
            zip(samples["subject_id"].to_list(), samples["prediction_time"].to_list())
        ):
            rows = self.store.rows_before(int(s), int(t), self.k)  # most recent first
            if len(rows):
                pooled = [self._event(int(r)) for r in rows]
                out[n, :d] = pooled[0]
                out[n, d : 2 * d] = np.mean(pooled, axis=0)
                out[n, -1] = len(rows)
        return out


def fit_predict(
    x_train: np.ndarray, y_train: np.ndarray, groups: np.ndarray, x_eval: np.ndarray
) -> tuple[np.ndarray, float]:
    """L2 logistic regression, C by 3-fold subject-grouped CV AUROC on train; -> (eval probabilities, C)."""
    if y_train.min() == y_train.max():  # one class in train: nothing to learn
        return np.full(x_eval.shape[0], float(y_train.mean()), dtype=np.float32), float("nan")
    folds = list(GroupKFold(n_splits=3).split(x_train, y_train, groups))
    best, best_c = -1.0, C_GRID[0]
    for c in C_GRID:
        scores = []
        for tr, va in folds:
            if y_train[tr].min() == y_train[tr].max() or y_train[va].min() == y_train[va].max():
                continue
            lr = LogisticRegression(C=c, max_iter=2000).fit(x_train[tr], y_train[tr])
            scores.append(auroc(y_train[va], lr.predict_proba(x_train[va])[:, 1]))
        if scores and np.mean(scores) > best:
            best, best_c = float(np.mean(scores)), c
    lr = LogisticRegression(C=best_c, max_iter=2000).fit(x_train, y_train)
    return lr.predict_proba(x_eval)[:, 1].astype(np.float32), best_c


def _features(parts: list, sparse: bool):
    return sp.hstack(parts, format="csr") if sparse else np.hstack(parts)


def fit_references(
    train: TimelineStore,
    train_samples: pl.DataFrame,
    evaluated: dict[str, tuple[TimelineStore, pl.DataFrame]],
    data: ReferenceData,
) -> dict[str, dict[str, np.ndarray]]:
    """Fit every reference on `train_samples` (task samples of the train split) and score each evaluated
    (store, samples) pair. Returns {reference name: {evaluated name: probabilities (n,)}}."""
    if train_samples.height > data.max_train_samples:
        train_samples = train_samples.sample(n=data.max_train_samples, seed=0).sort(
            "subject_index", "start_pos"
        )
    y = train_samples["boolean_value"].to_numpy().astype(int)
    groups = train_samples["subject_id"].to_numpy()
    scale_ehr = MaxAbsScaler()
    ehr_train = scale_ehr.fit_transform(bag_of_codes(train, train_samples, data.context_tokens))
    ehr_eval = {
        name: scale_ehr.transform(bag_of_codes(store, s, data.context_tokens))
        for name, (store, s) in evaluated.items()
    }
    mods_train, mods_eval = {}, {}
    for m, store in data.modality_stores.items():
        pooled = data.pooled(m)
        x = pooled.features(train_samples)
        d = store.d_enc
        n = min(data.n_components, d - 1, x.shape[0] - 1)
        latest = make_pipeline(StandardScaler(), PCA(n, random_state=0), StandardScaler()).fit(x[:, :d])
        mean = make_pipeline(StandardScaler(), PCA(n, random_state=0), StandardScaler()).fit(x[:, d : 2 * d])
        count = StandardScaler().fit(x[:, -1:])

        def reduce(x: np.ndarray, latest=latest, mean=mean, count=count, d=d) -> sp.csr_matrix:
            parts = [latest.transform(x[:, :d]), mean.transform(x[:, d : 2 * d]), count.transform(x[:, -1:])]
            return sp.csr_matrix(np.hstack(parts))

        mods_train[m] = reduce(x)
        mods_eval[m] = {name: reduce(pooled.features(s)) for name, (_, s) in evaluated.items()}
    combos = {"ehr": []}
    combos.update({f"ehr+{m}": [m] for m in data.modality_stores})
    if len(data.modality_stores) > 1:
        combos["ehr+all"] = list(data.modality_stores)
    out = {}
    for ref, mods in combos.items():
        x_train = _features([ehr_train, *(mods_train[m] for m in mods)], sparse=True)
        names = list(evaluated)
        x_eval = [_features([ehr_eval[n], *(mods_eval[m][n] for m in mods)], sparse=True) for n in names]
        stacked = sp.vstack(x_eval, format="csr")
        p, _ = fit_predict(x_train, y, groups, stacked)
        bounds = np.cumsum([0] + [x.shape[0] for x in x_eval])
        out[ref] = {n: p[bounds[j] : bounds[j + 1]] for j, n in enumerate(names)}
    return out


def matched_reference(modalities: list[str]) -> str:
    """The reference that sees what a model with these modalities sees."""
    if not modalities:
        return "ehr"
    return f"ehr+{modalities[0]}" if len(modalities) == 1 else "ehr+all"


def score_references(
    task: TaskConfig,
    train: TimelineStore,
    evaluated: pl.DataFrame,
    evaluated_store: TimelineStore,
    zero_shot: np.ndarray,
    data: ReferenceData,
    *,
    tuning: tuple[TimelineStore, pl.DataFrame] | None = None,
    n_boot: int = 1000,
) -> tuple[dict, pl.DataFrame]:
    """Fit the references of `task` on the train split and score the evaluated samples (the ones the
    rollouts scored, with their zero-shot probabilities `zero_shot`). F1 uses a threshold chosen on the
    tuning samples when given (else 0.5).

    Returns ({reference: {"metrics", "zero_shot_minus_reference", "auroc_at_rollouts"}, "matched": name}
    for metrics.json, and a frame of the per-sample reference probabilities). "auroc_at_rollouts" is the
    reference's AUROC had its probabilities been estimated from as many sampled futures as each sample's
    zero-shot probability was (`counted_rollouts` of the evaluated samples; `metrics.sampled_auroc`).
    """
    sets = {"evaluated": (evaluated_store, evaluated)}
    if tuning is not None and tuning[1].height:
        sets["tuning"] = tuning
    probabilities = fit_references(train, task_samples(task, train), sets, data)
    y = evaluated["boolean_value"].to_numpy()
    groups = evaluated["subject_id"].to_numpy()
    out: dict = {"matched": matched_reference(list(data.modality_stores))}
    for name, p in probabilities.items():
        threshold = 0.5
        if "tuning" in p:
            threshold = choose_threshold(sets["tuning"][1]["boolean_value"].to_numpy(), p["tuning"])
        q = p["evaluated"]
        out[name] = {
            "metrics": bootstrap_metrics(y, q, groups=groups, threshold=threshold, n_boot=n_boot),
            "threshold": threshold,
            "zero_shot_minus_reference": paired_auroc_difference(
                y, zero_shot, q, groups=groups, n_boot=n_boot
            ),
        }
        if "counted_rollouts" in evaluated.columns:
            out[name]["auroc_at_rollouts"] = sampled_auroc(y, q, evaluated["counted_rollouts"].to_numpy())
    frame = evaluated.select("subject_id", "prediction_time", "boolean_value").with_columns(
        pl.Series(f"p_{name}", p["evaluated"]) for name, p in probabilities.items()
    )
    return out, frame
