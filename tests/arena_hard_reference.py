"""arena-hard-auto's own scoring, copied as faithfully as possible, to check fescale's scorer against.

v0.1: show_result.py + utils_math.py of lmarena/arena-hard-auto at 0489bf3 (2024-09, the last v0.1
release), trimmed to the default path (no style control, no CSV). v2.0: show_result.py at 196f6b8
(`load_judgments`, `print_leaderboard`). Apache-2.0, (c) the arena-hard-auto authors. Changes, each
needed to run here: files are read in sorted order (the original globs them in directory order),
numpy is seeded right before scoring (v0.1 seeds it at import; v2.0 not at all), and sklearn's
deprecated `penalty=None` warning is silenced. This file is test code; fescale never imports it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from glob import glob

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression


def get_battles_from_row(row, multiplier, baseline_model):
    results = []
    output = {"question_id": row["question_id"], "model_a": baseline_model, "model_b": row["model"]}
    game = row["games"][0]
    weight = 1
    if game["score"] == "A=B": output["winner"] = "tie"
    elif game["score"] == "A>B": output["winner"] = "model_a"
    elif game["score"] == "A>>B": output["winner"] = "model_a"; weight = multiplier
    elif game["score"] == "B>A": output["winner"] = "model_b"
    elif game["score"] == "B>>A": output["winner"] = "model_b"; weight = multiplier
    else: weight = 0
    if weight: results += [output] * weight
    output = {"question_id": row["question_id"], "model_a": baseline_model, "model_b": row["model"]}
    game = row["games"][1]
    weight = 1
    if game["score"] == "A=B": output["winner"] = "tie"
    elif game["score"] == "A>B": output["winner"] = "model_b"
    elif game["score"] == "A>>B": output["winner"] = "model_b"; weight = multiplier
    elif game["score"] == "B>A": output["winner"] = "model_a"
    elif game["score"] == "B>>A": output["winner"] = "model_a"; weight = multiplier
    else: weight = 0
    if weight: results += [output] * weight
    return results


def compute_mle_elo(df, SCALE=400, BASE=10, INIT_RATING=1000, baseline_model="gpt-4-0314"):
    models = pd.concat([df["model_a"], df["model_b"]]).unique()
    models = pd.Series(np.arange(len(models)), index=models)
    df = pd.concat([df, df], ignore_index=True)
    p = len(models.index); n = df.shape[0]
    X = np.zeros([n, p])
    X[np.arange(n), models[df["model_a"]]] = +math.log(BASE)
    X[np.arange(n), models[df["model_b"]]] = -math.log(BASE)
    Y = np.zeros(n)
    Y[df["winner"] == "model_a"] = 1.0
    tie_idx = (df["winner"] == "tie") | (df["winner"] == "tie (bothbad)")
    tie_idx[len(tie_idx)//2:] = False
    Y[tie_idx] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = LogisticRegression(fit_intercept=False, penalty=None, tol=1e-8)
        lr.fit(X, Y)
    elo_scores = SCALE * lr.coef_[0] + INIT_RATING
    if baseline_model in models.index:
        elo_scores += 1000 - elo_scores[models[baseline_model]]
    return pd.Series(elo_scores, index=models.index).sort_values(ascending=False)


def get_bootstrap_result(battles, func_compute_elo, num_round, baseline_model):
    rows = []
    for _ in range(num_round):
        rows.append(func_compute_elo(battles.sample(frac=1.0, replace=True), baseline_model=baseline_model))
    df = pd.DataFrame(rows)
    return df[df.median().sort_values(ascending=False).index]


def predict_win_rate(elo_ratings, SCALE=400, BASE=10, INIT_RATING=1000):
    names = sorted(list(elo_ratings.keys()))
    wins = defaultdict(lambda: defaultdict(lambda: 0))
    for a in names:
        for b in names:
            ea = 1 / (1 + BASE ** ((elo_ratings[b] - elo_ratings[a]) / SCALE))
            wins[a][b] = ea
            wins[b][a] = 1 - ea
    data = {a: [wins[a][b] if a != b else np.nan for b in names] for a in names}
    df = pd.DataFrame(data, index=names)
    return df.T


def get_win_rate_column(df, column, baseline):
    to_dict = df[["model", column]].set_index("model").to_dict()[column]
    win_rate_table = predict_win_rate(to_dict)
    return win_rate_table[baseline].fillna(0.5).apply(lambda x: round(x * 100, 2))


def show_result_v01(bench_dir, judge, baseline="gpt-4-0314", weight=3, num_rounds=100):
    """v0.1 `__main__` of show_result.py: {model: {score, ci_low, ci_high, avg_tokens}} (win rates, percent)."""
    np.random.seed(42)
    answers = {}
    for f in sorted(glob(os.path.join(bench_dir, "model_answer", "*.jsonl"))):
        answers[os.path.basename(f)[:-6]] = {json.loads(l)["question_id"]: json.loads(l) for l in open(f)}
    judge_dir = os.path.join(bench_dir, "model_judgment", judge)
    judgments = pd.concat([pd.read_json(f, lines=True) for f in sorted(glob(f"{judge_dir}/*jsonl"))])
    battles = judgments.apply(lambda row: get_battles_from_row(row, weight, baseline), axis=1)
    battles = pd.DataFrame(battles[battles.map(len) > 0].explode().tolist())
    bt = compute_mle_elo(battles, baseline_model=baseline)
    boot = get_bootstrap_result(battles, compute_mle_elo, num_rounds, baseline)
    stats = pd.DataFrame()
    for i, model in enumerate(bt.index):
        stats.at[i, "model"] = model
        stats.at[i, "score"] = bt[model]
        stats.at[i, "lower"] = np.percentile(boot[model], 2.5)
        stats.at[i, "upper"] = np.percentile(boot[model], 97.5)
        length = 0
        if model in answers:
            for _, row in answers[model].items():
                length += row["choices"][0]["turns"][0]["token_len"]
            length /= len(answers[model])
        stats.at[i, "avg_tokens"] = int(length)
    stats.sort_values(by="model", inplace=True)
    for c in ("score", "lower", "upper"):
        stats[c] = get_win_rate_column(stats, c, baseline).tolist()
    stats.sort_values(by="score", ascending=False, inplace=True)
    return {r["model"]: {"score": r["score"], "ci_low": r["lower"], "ci_high": r["upper"], "avg_tokens": int(r["avg_tokens"])} for _, r in stats.iterrows()}


def show_result_v20(bench_dir, judge, baseline, category="hard_prompt", weight=3):
    """v2.0 `load_judgments` + `print_leaderboard`, returning {model: (score, lower, upper)} in percent
    (unrounded; show_result prints them rounded to 0.1)."""
    np.random.seed(42)
    dfs = [pd.read_json(f, lines=True) for f in sorted(glob(os.path.join(bench_dir, "model_judgment", judge, "*.jsonl")))]
    data = pd.concat(dfs).reset_index(drop=True)
    null_indices = data.games.map(lambda x: x[0] is None or x[1] is None or x[0]['score'] is None or x[1]['score'] is None)
    _data = data[~null_indices].reset_index(drop=True)
    label_to_score = {
        "A>B": [1], "A>>B": [1] * weight, "A=B": [0.5], "A<<B": [0] * weight, "A<B": [0],
        "B>A": [0], "B>>A": [0] * weight, "B=A": [0.5], "B<<A": [1] * weight, "B<A": [1],
    }
    _data['scores'] = _data.games.map(lambda x: label_to_score[x[1]['score']] + [1 - s for s in label_to_score[x[0]['score']]])
    battles = _data[['uid', 'model', 'category', 'scores']].explode('scores').reset_index(drop=True)
    battles = battles[battles.category == category].reset_index(drop=True)
    _battles = battles.drop(columns=['category'])[['model', 'scores']]
    _battles['model'] = _battles['model'].map(lambda x: x.split('/')[-1])
    bootstraps = pd.concat([
        _battles.groupby("model").sample(frac=1.0, replace=True).groupby("model").mean()
        for _ in range(100)
    ])
    bootstraps["scores"] = bootstraps["scores"].astype(float)
    mean = bootstraps.groupby("model").mean()["scores"]
    lower = bootstraps.groupby("model").quantile(0.05)["scores"]
    upper = bootstraps.groupby("model").quantile(0.95)["scores"]
    out = {m: (mean[m] * 100, lower[m] * 100, upper[m] * 100) for m in mean.index}
    out[baseline] = (50.0, 50.0, 50.0)
    return out
