"""Does text-level clustering recover the tasks? NMI/ARI per corpus, embedding view, fit rule and seed.

    python benchmarks/bench_cluster_quality.py            # demo + 2 synthetic corpora, 3 seeds (~5 min on 2 cores)
    python benchmarks/bench_cluster_quality.py --smoke    # 1 seed, small corpora

Corpora (task_name is the ground truth; k = the number of tasks):
  - ``demo``: the demo's trained families (tclora/demo_corpus.py, train split, 300 rows each).
  - ``synth_nlp6``: 6 generated text tasks (translate, sentiment, summarise, question, spell, rhyme),
    2 templates each, payloads from a small sentence grammar.
  - ``synth_num8``: 8 generated number tasks (add, subtract, multiply, compare, round, parity, convert,
    percent), 2 templates each, payloads numbers.

Per corpus, view (``plain``: the source; ``template``: :class:`tclora.template_view.TemplateMiner`
view fitted on the fit sample) and seed:
  - ``pipeline``: :func:`tclora.cluster.fit_kmeans` on the rows pipelines/cluster.py fits on
    (:func:`tclora.cluster.fit_fraction`: every row up to ``--min-fit-rows``, else a
    ``--sample-fraction`` sample), every row assigned;
  - ``sample_only``: the same on a plain ``--sample-fraction`` sample (the rule before issue 17's
    ``cluster.min_fit_rows``);
  - ``sklearn``: ``sklearn.cluster.KMeans(k, n_init=10)`` on the pipeline's fit rows, ``predict`` on all rows;
  - ``auto``: :func:`tclora.cluster_quality.choose_k` over ``[2, 2 k]`` on the sample, then as pipeline.
Writes ``bench_cluster_quality.json`` and ``.png`` (NMI per corpus/view/method, mean over seeds).
"""

from __future__ import annotations

import logging
import random
import time

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from benchmarks.common import arg_parser, headline, machine_info, result_stem, setup_logging, write_result
from tclora import demo_corpus
from tclora.cluster import assign, fit_fraction, fit_kmeans
from tclora.cluster_quality import choose_k
from tclora.config import ClusterSection
from tclora.embed import Embedder
from tclora.template_view import TemplateMiner

log = logging.getLogger("benchmarks.cluster_quality")

SUBJECTS = "the old farmer|my sister|a small dog|the teacher|our neighbour|the tired pilot|a young artist".split("|")
VERBS = "paints|reads|builds|sells|finds|cleans|carries|watches".split("|")
OBJECTS = "a red boat|the long letter|three apples|an old map|the green chair|a wooden box|the new car".split("|")
WORDS = "apple river candle mirror garden window pencil ladder rocket basket".split()
NLP6 = {
    "translate": ("Translate into French: {s}.", "How do you say this in French? {s}."),
    "sentiment": ("Is the following review positive or negative? {s}.", "Review: {s}. Sentiment:"),
    "summarise": ("Summarize in five words: {s}.", "Give a short summary of this sentence: {s}."),
    "question": ("Write a question whose answer is: {s}.", "Turn this statement into a question: {s}."),
    "spell": ("Spell the word '{w}' backwards.", "What is '{w}' written in reverse letters?"),
    "rhyme": ("Give a word that rhymes with '{w}'.", "Which word rhymes with '{w}'?"),
}
NUM8 = {
    "add": ("What is {a} plus {b}?", "Add {a} and {b}."),
    "subtract": ("What is {a} minus {b}?", "Subtract {b} from {a}."),
    "multiply": ("What is {a} times {b}?", "Multiply {a} by {b}."),
    "compare": ("Which is larger, {a} or {b}?", "Is {a} greater than {b}?"),
    "round": ("Round {a}.{b} to the nearest whole number.", "{a}.{b} rounded is?"),
    "parity": ("Is {a} an even or an odd number?", "Tell me whether {a} is odd."),
    "convert": ("How many centimetres are {a} metres?", "Convert {a} kilometres to metres."),
    "percent": ("What is {b} percent of {a}?", "Compute {b}% of {a}."),
}


def synthetic(tasks: dict[str, tuple[str, ...]], n_per_task: int, seed: int = 0) -> list[dict]:
    """Rows of generated tasks: templates in turn, payloads drawn from the grammar above."""
    rng = random.Random(seed)
    rows = []
    for name, templates in tasks.items():
        for i in range(n_per_task):
            fill = {"s": f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}",
                    "w": rng.choice(WORDS), "a": rng.randint(2, 999), "b": rng.randint(2, 99)}
            rows.append({"source": templates[i % len(templates)].format(**fill), "task_name": name})
    rng.shuffle(rows)
    return rows


def corpora(smoke: bool) -> dict[str, list[dict]]:
    n = 60 if smoke else None
    return {"demo": demo_corpus.generate_split("train", n or 300, 0),
            "synth_nlp6": synthetic(NLP6, n or 100, 1), "synth_num8": synthetic(NUM8, n or 80, 2)}


def embed_unique(embedder: Embedder, texts: list[str]) -> np.ndarray:
    """Embeddings of ``texts``, each distinct text encoded once (template views repeat a lot)."""
    uniq = sorted(set(texts))
    index = {t: i for i, t in enumerate(uniq)}
    return embedder.encode(uniq, 128)[[index[t] for t in texts]]


def scores(truth: list[str], labels: np.ndarray) -> dict:
    return {"nmi": round(float(normalized_mutual_info_score(truth, labels)), 4),
            "ari": round(float(adjusted_rand_score(truth, labels)), 4), "k": int(len(np.unique(labels)))}


METHODS = ("pipeline", "sample_only", "sklearn", "auto")


def run_corpus(embedder: Embedder, rows: list[dict], seeds: int, fraction: float, min_fit_rows: int) -> dict:
    sources, truth = [r["source"] for r in rows], [r["task_name"] for r in rows]
    k, n = len(set(truth)), len(rows)
    plain = embed_unique(embedder, sources)
    out: dict = {"rows": n, "k": k, "fit_rows": int(fit_fraction(n, k, fraction, min_fit_rows) * n), "runs": []}
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(n)
        sample, fit = order[: max(int(fraction * n), 50 * k)], order[: out["fit_rows"]]
        views = {"plain": plain,  # the embed stage fits the template miner on its own sample (not all rows)
                 "template": embed_unique(embedder, TemplateMiner.fit([sources[i] for i in sample]).views(sources))}
        for view, x in views.items():
            run = {"seed": seed, "view": view}
            run["pipeline"] = scores(truth, assign(x, fit_kmeans(x[fit], k, seed=seed).centroids)[0])
            run["sample_only"] = scores(truth, assign(x, fit_kmeans(x[sample], k, seed=seed).centroids)[0])
            run["sklearn"] = scores(truth, KMeans(k, n_init=10, random_state=seed).fit(x[fit]).predict(x))
            auto_k, crit = choose_k(x[fit], 2, 2 * k, seed=seed)
            run["auto"] = {**scores(truth, assign(x, fit_kmeans(x[fit], auto_k, seed=seed).centroids)[0]),
                           "chosen_k": auto_k, "silhouette": {str(j): round(v, 4) for j, v in crit.items()}}
            log.info("seed %d %s: %s", seed, view,
                     {m: run[m]["nmi"] for m in METHODS})
            out["runs"].append(run)
    out["mean"] = {view: {m: {s: round(float(np.mean([r[m][s] for r in out["runs"] if r["view"] == view])), 4)
                              for s in ("nmi", "ari")} for m in METHODS}
                   for view in ("plain", "template")}
    return out


def plot(result: dict, path) -> None:
    import matplotlib.pyplot as plt

    names = list(result["corpora"])
    methods = METHODS
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mean = result["corpora"][name]["mean"]
        for j, view in enumerate(("plain", "template")):
            ax.bar(np.arange(len(methods)) + 0.4 * j, [mean[view][m]["nmi"] for m in methods], 0.4, label=view)
        ax.set_xticks(np.arange(len(methods)) + 0.2, methods, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.axhline(0.97, color="tab:red", ls=":", lw=1)
        ax.set_title(f"{name} (k={result['corpora'][name]['k']})", fontsize=9)
        ax.set_ylabel("NMI vs task_name (mean of seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    defaults = ClusterSection()
    p.add_argument("--sample-fraction", type=float, default=defaults.sample_fraction,
                   help=f"cluster.sample_fraction (default {defaults.sample_fraction})")
    p.add_argument("--min-fit-rows", type=int, default=defaults.min_fit_rows,
                   help=f"cluster.min_fit_rows (default {defaults.min_fit_rows})")
    args = p.parse_args()
    setup_logging()
    seeds = 1 if args.smoke else args.seeds
    started = time.perf_counter()
    embedder = Embedder()
    result = {"benchmark": "cluster_quality", "smoke": args.smoke, "machine": machine_info(),
              "config": {"seeds": seeds, "sample_fraction": args.sample_fraction, "min_fit_rows": args.min_fit_rows,
                         "embed_model": embedder.name},
              "corpora": {}}
    for name, rows in corpora(args.smoke).items():
        log.info("corpus %s: %d rows", name, len(rows))
        result["corpora"][name] = run_corpus(embedder, rows, seeds, args.sample_fraction, args.min_fit_rows)
    demo = result["corpora"]["demo"]
    best = max(("plain", "template"), key=lambda v: demo["mean"][v]["pipeline"]["nmi"])
    nmi = demo["mean"][best]["pipeline"]["nmi"]
    auto = [r["auto"] for r in demo["runs"] if r["view"] == best]
    result["headline"] = [
        headline("demo clustering NMI", nmi, f"{nmi:.3f} ({best} view)", target=">= 0.97", met=nmi >= 0.97),
        headline("demo auto-k", [a["chosen_k"] for a in auto],
                 f"k={[a['chosen_k'] for a in auto]}, NMI {np.mean([a['nmi'] for a in auto]):.3f}",
                 target=f"k within ±2 of {demo['k']}, NMI >= 0.93",
                 met=all(abs(a["chosen_k"] - demo["k"]) <= 2 for a in auto)
                 and bool(np.mean([a["nmi"] for a in auto]) >= 0.93)),
    ]
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_result(args.out, result_stem("cluster_quality", args.smoke), result, plot)


if __name__ == "__main__":
    main()
