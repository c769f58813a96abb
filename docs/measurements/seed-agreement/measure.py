"""Do two seeds find the same latents? Training recipes compared on the shipped U-Net's activations.

The diffing calls a latent shared when the Hungarian matchings of encoder and decoder cosines agree and both reach
0.8; between two seeds of the same SAE setting on the same activations (the floor of every population comparison)
the shipped U-Net's k 8 x 4 SAE shares 12 % of its live latents. Each recipe below trains seeds 0 and 1 on the same
store (the U-Net's training and validation cases at ``down_3``, 131,072 vectors of 64 channels) with the shipped
SAE's options except what the recipe changes:

- ``plain``: the shipped recipe (decoder rows initialised at random training vectors; Adam at the default rate).
- ``expansion2`` / ``expansion1``: a dictionary of 2 x or 1 x d (the sweep's smallest is 4 x).
- ``lr4``: a quarter of the learning rate.
- ``kmeans-seeded``: decoder rows initialised at k-means centroids of the training vectors (k-means seeded by the SAE's
  seed).
- ``kmeans-shared``: the same, k-means seeded 0 for both seeds (the seeds then differ only in batch order and split).
- ``tumour-x8``: the shipped recipe on a store where every position whose patch touches tumour (the ground truth;
  14 % of positions) appears 8 times (``store-tumour8``), so that tumour is not rare in training.
- ``archetypal``: relaxed archetypal decoder (Fel et al. 2025, "Archetypal SAE"): each decoder row is a convex
  combination of 1,024 k-means centroids (a row-stochastic matrix, projected after every step) plus a relaxation of at
  most 0.1 of its norm, then normalised.

    python docs/measurements/seed-agreement/measure.py store --data ../shared/data --work /tmp/arch  # and store-tumour8
    python docs/measurements/seed-agreement/measure.py train RECIPE SEED --work /tmp/arch   # one process each
    python docs/measurements/seed-agreement/measure.py readability --work /tmp/arch         # labels both seeds
    python docs/measurements/seed-agreement/measure.py hold --work /tmp/arch                # labels on the test cases
    python docs/measurements/seed-agreement/measure.py report --work /tmp/arch              # writes results.md here
    python docs/measurements/seed-agreement/measure.py floor --work /tmp/arch               # plain seeds 0-5: floor.md

Each training runs on one PyTorch thread; the store's held-out positions decide which latents are live
(:func:`SegLensLogic.alignment.replication.comparison_vectors`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
BUNDLE = HERE.parents[2] / "Resources" / "adult-glioma-unet"
RECIPES = {  # name: (k, expansion, learning rate or None, patch)
    "plain": (8, 4, None, None),
    "expansion2": (8, 2, None, None),
    "expansion1": (8, 1, None, None),
    "lr4": (8, 4, 0.0004, None),
    "kmeans-seeded": (8, 4, None, "kmeans-seeded"),
    "kmeans-shared": (8, 4, None, "kmeans-shared"),
    "archetypal": (8, 4, None, "archetypal"),
    "tumour-x8": (8, 4, None, None),
}
FOLDERS = {"plain": "plain", "expansion2": "e2", "expansion1": "e1", "lr4": "lr4", "kmeans-seeded": "kseed", "kmeans-shared": "kfix", "archetypal": "a01",
           "tumour-x8": "enr8"}  # fmt: skip
TUMOUR_REPEAT = 8


def make_store(data: Path, work: Path) -> None:
    from SegLensLogic.data.cohort import Cohort, load_cohort
    from SegLensLogic.networks import load_segmenter
    from SegLensLogic.sae import ExtractionOptions, extract_activations

    training = json.loads((BUNDLE / "bundle.json").read_text())["figures"]["training"]
    ids = training["cases"] + training["validation_cases"]
    cases = {c.case_id: c for name in ("brats2018", "brats-extra") for c in load_cohort(data / name, name=name)}
    model_dir = BUNDLE / "model"
    extract_activations(load_segmenter(model_dir), Cohort(name="train+validation", cases=[cases[i] for i in ids]), work / "store",
                        ExtractionOptions(hook="down_3"), model_dir=model_dir, overwrite=True, log=print)  # fmt: skip


def enrich_store(data: Path, work: Path, repeat: int = TUMOUR_REPEAT) -> None:
    """``WORK/store-tumour8``: the store with every position whose patch touches the ground-truth tumour repeated
    ``repeat`` times (one shard, as the plain store)."""
    from SegLensLogic.data.cohort import load_cohort
    from SegLensLogic.networks import load_segmenter
    from SegLensLogic.sae.activations import mask_fraction_on_grid
    from SegLensLogic.segmentation.inference import prepare_for_model

    source, out = work / "store", work / f"store-tumour{repeat}"
    manifest = json.loads((source / "store.json").read_text())
    if len(manifest["shards"]) != 1:
        raise SystemExit(f"{source}: expected one shard")
    cases = {c.case_id: c for name in ("brats2018", "brats-extra") for c in load_cohort(data / name, name=name)}
    model = load_segmenter(BUNDLE / "model")
    grid = tuple(manifest["feature_map"])
    index, vectors = np.load(source / "index_00000.npy"), np.load(source / "vectors_00000.npy")
    tumour = np.zeros(len(index), dtype=bool)
    for number, record in enumerate(manifest["cases"]):
        prepared = prepare_for_model(model, cases[record["case_id"]])
        rows = np.flatnonzero(index[:, 0] == number)
        slices = np.unique(index[rows, 1])
        fraction = mask_fraction_on_grid(prepared.label > 0, prepared.geometry, slices, grid).numpy()
        position = {int(z): i for i, z in enumerate(slices)}
        tumour[rows] = fraction[[position[int(z)] for z in index[rows, 1]], index[rows, 2], index[rows, 3]] > 0
    extra = np.repeat(np.flatnonzero(tumour), repeat - 1)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "vectors_00000.npy", np.concatenate([vectors, vectors[extra]]))
    np.save(out / "index_00000.npy", np.concatenate([index, index[extra]]))
    n = len(index) + len(extra)
    manifest.update(n_vectors=n, cohort=f"{manifest['cohort']} (tumour positions x{repeat})")
    manifest["shards"][0]["n"] = n
    (out / "store.json").write_text(json.dumps(manifest))
    print(f"{int(tumour.sum())} of {len(index)} positions touch tumour; {n} vectors in {out}")


def patch_kmeans_init(kmeans_seed: int) -> None:
    """Decoder rows (and encoder columns) start at k-means centroids of the normalised, centred sample."""
    from sklearn.cluster import KMeans

    from SegLensLogic.sae import trainer

    def initialise(sae, sample, generator):
        with torch.no_grad():
            centred = (sample - sae.b_dec).cpu().numpy()
            centres = KMeans(n_clusters=sae.d_sae, random_state=kmeans_seed, n_init=1).fit(centred).cluster_centers_
            rows = F.normalize(torch.tensor(centres, dtype=torch.float32), dim=1).to(sae.W_dec.device)
            sae.W_dec.data[:] = rows
            sae.W_enc.data[:] = rows.t()

    trainer.initialise_from_data = initialise


def patch_archetypal(store, seed: int, candidates: int = 1024, delta: float = 0.1) -> None:
    """Relaxed archetypal decoder: ``W_dec = normalise(A C + L)``, ``A`` row-stochastic over k-means centroids ``C``,
    ``|L_i| <= delta |(A C)_i|``; the decoder's gradient is pulled back to ``A`` and ``L`` (own Adam), then projected."""
    from sklearn.cluster import MiniBatchKMeans

    from SegLensLogic.sae import trainer

    rng = np.random.default_rng(1000 + seed)
    raw = store.vectors(np.sort(rng.choice(len(store), 65536, replace=False))).float()
    centres = torch.tensor(MiniBatchKMeans(n_clusters=candidates, random_state=seed, batch_size=4096, n_init=3).fit(raw.numpy()).cluster_centers_,
                           dtype=torch.float32)  # fmt: skip
    original_init = trainer._Run.__init__

    def init(self, sae, options, n_train, world, device):
        original_init(self, sae, options, n_train, world, device)
        scale = math.sqrt(sae.config.d_in) / float(raw.norm(dim=1).mean())
        self.C = (centres * scale - sae.b_dec.detach()).to(device)
        picks = torch.randint(len(self.C), (sae.d_sae,), generator=torch.Generator().manual_seed(options.seed))
        weights = torch.zeros(sae.d_sae, len(self.C))
        weights[torch.arange(sae.d_sae), picks] = 1.0
        self.A = torch.nn.Parameter(weights.to(device))
        self.L = torch.nn.Parameter(torch.zeros(sae.d_sae, sae.config.d_in, device=device))
        self.arch_opt = torch.optim.Adam([self.A, self.L], lr=self.learning_rate)
        with torch.no_grad():
            rows = F.normalize(self.A @ self.C + self.L, dim=1)
            sae.W_dec.data.copy_(rows)
            sae.W_enc.data.copy_(rows.t())

    def step(self, x):
        sae, options = self.sae, self.options
        for optimiser in (self.optimiser, self.arch_opt):
            for group in optimiser.param_groups:
                group["lr"] = self.learning_rate * self.schedule.factor(self.step)
        x_hat, latents = self.forward(x)
        dead = self.since_fired >= self.dead_after
        loss, mse, aux = trainer.training_loss(sae, x, x_hat, dead, self.k_aux, options.aux_coefficient)
        self.optimiser.zero_grad(set_to_none=True)
        self.arch_opt.zero_grad(set_to_none=True)
        loss.backward()
        F.normalize(self.A @ self.C + self.L, dim=1).backward(sae.W_dec.grad)
        sae.W_dec.grad = None
        if options.grad_clip:
            torch.nn.utils.clip_grad_norm_([sae.W_enc, sae.b_enc, sae.b_dec, self.A, self.L], options.grad_clip)
        self.optimiser.step()
        self.arch_opt.step()
        with torch.no_grad():
            self.A.clamp_(min=0)
            total = self.A.sum(dim=1, keepdim=True)
            empty = total.squeeze(1) <= 1e-12
            self.A.div_(total.clamp_min(1e-12))
            if empty.any():
                self.A[empty] = 1.0 / self.A.shape[1]
            base = self.A @ self.C
            limit = delta * base.norm(dim=1, keepdim=True)
            self.L.mul_(torch.clamp(limit / self.L.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0))
            sae.W_dec.data.copy_(F.normalize(base + self.L, dim=1))
            self.since_fired += x.shape[0]
            self.since_fired[latents.unique()] = 0
        self.step += 1
        return x, x_hat, latents, mse, aux, dead

    trainer._Run.__init__, trainer._Run.train_step = init, step


def train(recipe: str, seed: int, work: Path) -> None:
    from SegLensLogic.sae import ActivationStore, SAETrainingOptions
    from SegLensLogic.sae.trainer import train_sae_once

    torch.set_num_threads(1)
    k, expansion, learning_rate, patch = RECIPES[recipe]
    store = ActivationStore(work / (f"store-tumour{TUMOUR_REPEAT}" if recipe == "tumour-x8" else "store"))
    if patch == "kmeans-seeded":
        patch_kmeans_init(seed)
    elif patch == "kmeans-shared":
        patch_kmeans_init(0)
    elif patch == "archetypal":
        patch_archetypal(store, seed)
    options = SAETrainingOptions(k=k, expansion=expansion, max_steps=20000, resample_every=None, log_every=10**9, seed=seed,
                                 learning_rate=learning_rate)  # fmt: skip
    start = time.monotonic()
    _, report = train_sae_once(store, options, work / f"{FOLDERS[recipe]}-seed{seed}", log=print)
    print(recipe, seed, report["steps"], report["holdout"], f"{time.monotonic() - start:.0f} s")


def matched_cosines(sae_a, sae_b, live_a, live_b, space: str) -> np.ndarray:
    """Cosines of the Hungarian matching of live latents in one space (the diffing asks both spaces for 0.8)."""
    from scipy.optimize import linear_sum_assignment

    a = F.normalize(sae_a.latent_directions()[space][live_a], dim=1)
    b = F.normalize(sae_b.latent_directions()[space][live_b], dim=1)
    similarity = (a @ b.t()).numpy()
    rows, cols = linear_sum_assignment(-similarity)
    return similarity[rows, cols]


def readability(work: Path, data: Path, recipes: list[str]) -> None:
    """Label both seeds of each recipe on the training cases (the build's labeller, top 16 slices): tumour-labelled
    latents per seed, the share of seed 0's with the same label on its seed-1 partner, and how many of seed 0's
    tumour-labelled latents seed 1 finds again (readable *and* replicable). Kept in ``WORK/readability.json``."""
    from SegLensLogic.alignment import align_saes
    from SegLensLogic.alignment.replication import comparison_vectors, replication
    from SegLensLogic.data.cohort import Cohort, load_cohort
    from SegLensLogic.experiments.sae_sweep import READABLE_CATEGORIES
    from SegLensLogic.interpretation import interpret_sae
    from SegLensLogic.networks import load_segmenter
    from SegLensLogic.sae import ActivationStore, BatchTopKSAE

    training = json.loads((BUNDLE / "bundle.json").read_text())["figures"]["training"]
    ids = training["cases"] + training["validation_cases"]
    cases = {c.case_id: c for name in ("brats2018", "brats-extra") for c in load_cohort(data / name, name=name)}
    cohort = Cohort(name="train+validation", cases=[cases[i] for i in ids])
    model = load_segmenter(BUNDLE / "model")
    vectors = comparison_vectors(ActivationStore(work / "store"))
    path = work / "readability.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    for recipe in recipes:
        first, second = (BatchTopKSAE.load(work / f"{FOLDERS[recipe]}-seed{seed}") for seed in (0, 1))
        categories = [{int(e["id"]): e["category"] for e in interpret_sae(model, sae, cohort, top_k=16, log=None).document["latents"]}
                      for sae in (first, second)]  # fmt: skip
        readable = [j for j, c in categories[0].items() if c in READABLE_CATEGORIES]
        partner = align_saes(first, second).partner
        flags = replication(first, second, vectors)["replicates"]
        done[recipe] = {"tumour_latents": len(readable), "tumour_latents_seed1": sum(c in READABLE_CATEGORIES for c in categories[1].values()),
                        "label_agreement": sum(partner[j] >= 0 and categories[1].get(int(partner[j])) == categories[0][j] for j in readable) / max(1, len(readable)),
                        "tumour_replicating": sum(bool(flags[j]) for j in readable)}  # fmt: skip
        print(recipe, done[recipe], flush=True)
        path.write_text(json.dumps(done, indent=1))


def hold(work: Path, data: Path, recipes: list[str]) -> None:
    """Do seed 0's tumour labels hold on the U-Net's 4 test cases? :func:`~SegLensLogic.interpretation.label_mass`
    of its labels (made on the training cases), as the card measures the shipped SAE. Kept in ``WORK/hold.json``."""
    from SegLensLogic.data.cohort import Cohort, load_cohort
    from SegLensLogic.interpretation import interpret_sae, label_mass
    from SegLensLogic.interpretation.latent_labels import LatentLabels
    from SegLensLogic.networks import load_segmenter
    from SegLensLogic.sae import BatchTopKSAE

    training = json.loads((BUNDLE / "bundle.json").read_text())["figures"]["training"]
    cases = {c.case_id: c for name in ("brats2018", "brats-extra") for c in load_cohort(data / name, name=name)}
    train = Cohort(name="train+validation", cases=[cases[i] for i in training["cases"] + training["validation_cases"]])
    test = Cohort(name="test", cases=[cases[i] for i in training["test_cases"]])
    model = load_segmenter(BUNDLE / "model")
    path = work / "hold.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    for recipe in recipes:
        sae = BatchTopKSAE.load(work / f"{FOLDERS[recipe]}-seed0")
        labels = LatentLabels(interpret_sae(model, sae, train, top_k=16, log=None).document)
        measured = label_mass(model, sae, labels, test)
        done[recipe] = {"fired": len(measured["latents"]), "mean_in_class": measured["mean_in_class"], "holding": measured["holding"]}
        print(recipe, done[recipe], flush=True)
        path.write_text(json.dumps(done, indent=1))


def report(work: Path) -> None:
    from SegLensLogic.alignment.replication import comparison_vectors, live_latents, replication
    from SegLensLogic.sae import ActivationStore, BatchTopKSAE
    from SegLensLogic.sae.trainer import evaluate_reconstruction

    vectors = comparison_vectors(ActivationStore(work / "store"))
    lines = ["# Seed agreement by training recipe (written by measure.py)", "",
             "U-Net `down_3` store, k 8; seeds 0 and 1. EV and dead (inference threshold), seed 0 / seed 1, on the plain "
             "store's held-out positions, where liveness is decided too. Shared: share of seed 0's "
             "live latents that seed 1 finds again by the diffing rule (tau 0.8). Matched cosines: Hungarian matching of "
             "live latents in one space alone (median, share >= 0.8).", "",
             "| recipe | latents | EV | dead | live | shared | decoder median | decoder >= 0.8 | encoder median | encoder >= 0.8 | tumour latents | same label | tumour, found again | test: fired / in class / holding |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    held = json.loads((work / "hold.json").read_text()) if (work / "hold.json").is_file() else {}
    readable = json.loads((work / "readability.json").read_text()) if (work / "readability.json").is_file() else {}
    for recipe, folder in FOLDERS.items():
        paths = [work / f"{folder}-seed{seed}" for seed in (0, 1)]
        if not all((p / "sae.safetensors").is_file() for p in paths):
            continue
        a, b = (BatchTopKSAE.load(p) for p in paths)
        holdouts = [evaluate_reconstruction(sae, vectors) for sae in (a, b)]  # the same positions for every recipe
        live_a, live_b = live_latents(a, vectors), live_latents(b, vectors)
        measured = replication(a, b, vectors)
        dec, enc = (matched_cosines(a, b, live_a, live_b, space) for space in ("dec", "enc"))
        lines.append(f"| {recipe} | {a.d_sae} | {holdouts[0]['explained_variance']:.3f} / {holdouts[1]['explained_variance']:.3f} | "
                     f"{holdouts[0]['dead_fraction']:.3f} / {holdouts[1]['dead_fraction']:.3f} | {measured['live']} | "
                     f"{measured['live_shared']:.3f} | {np.median(dec):.2f} | {np.mean(dec >= 0.8):.2f} | {np.median(enc):.2f} | "
                     f"{np.mean(enc >= 0.8):.2f} | " + _readability_cells(readable.get(recipe)) + _hold_cell(held.get(recipe)))  # fmt: skip
    (HERE / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def floor(work: Path) -> None:
    """How noisy is the seed floor? Every ordered pair of the plain recipe's seeds (``plain-seedN`` in WORK): the
    share of one seed's live latents the other finds again, on the same held-out positions. Writes ``floor.md``."""
    import itertools

    from SegLensLogic.alignment.replication import comparison_vectors, replication
    from SegLensLogic.sae import ActivationStore, BatchTopKSAE

    vectors = comparison_vectors(ActivationStore(work / "store"))
    seeds = sorted(int(p.name.rsplit("seed", 1)[1]) for p in work.glob("plain-seed*") if (p / "sae.safetensors").is_file())
    saes = {seed: BatchTopKSAE.load(work / f"plain-seed{seed}") for seed in seeds}
    pairs = {(a, b): replication(saes[a], saes[b], vectors) for a, b in itertools.permutations(seeds, 2)}
    shares = np.array([m["live_shared"] for m in pairs.values()])
    # Unordered pairs share their matching, so the interval resamples seeds, not pairs: a bootstrap over seeds.
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(2000):
        pick = rng.choice(seeds, size=len(seeds), replace=True)
        values = [pairs[(a, b)]["live_shared"] for a, b in itertools.permutations(pick, 2) if a != b]
        if values:
            boot.append(np.mean(values))
    low, high = np.percentile(boot, [2.5, 97.5])
    population = json.loads((BUNDLE / "bundle.json").read_text())["figures"]["populations"]
    lines = ["# The seed floor, over several seeds (written by measure.py floor)", "",
             f"Plain recipe (the shipped U-Net SAE's options), seeds {', '.join(map(str, seeds))}; every ordered pair: the share of "
             "the first seed's live latents that the second finds again by the diffing rule (tau 0.8), on the store's "
             "held-out positions.", "",
             "| seed | " + " | ".join(f"vs {b}" for b in seeds) + " |", "|---|" + "---|" * len(seeds)]  # fmt: skip
    for a in seeds:
        lines.append(f"| {a} (live {pairs[(a, seeds[1] if a == seeds[0] else seeds[0])]['live']}) | "
                     + " | ".join("" if a == b else f"{pairs[(a, b)]['live_shared']:.3f}" for b in seeds) + " |")
    lines += ["", f"- {len(shares)} ordered pairs: mean {shares.mean():.3f}, standard deviation {shares.std(ddof=1):.3f}, "
              f"range {shares.min():.3f} to {shares.max():.3f}; 95 % bootstrap interval of the mean over seeds "
              f"[{low:.3f}, {high:.3f}].",
              "- The shipped card's population comparisons against it (live_shared): "
              + ", ".join(f"{name} {row['live_shared']:.3f}" for name, row in population.items())
              + f"; below the lowest seed pair ({shares.min():.3f}): "
              + (", ".join(name for name, row in population.items() if row["live_shared"] < shares.min()) or "none") + "."]  # fmt: skip
    # Seed 0 against every other seed, latent by latent: how many other seeds find each live latent again. Seed 0 is
    # the shipped SAE (same options, same store; its hash is checked), so its shipped labels say which are tumour.
    first, others = seeds[0], seeds[1:]
    flags = np.array([pairs[(first, b)]["replicates"] for b in others]).T  # (d_sae, others): True/False, None if dead
    live = np.array([flag is not None for flag in flags[:, 0]])
    found = np.array([sum(bool(f) for f in row) for row in flags])
    from SegLensLogic.experiments.sae_sweep import READABLE_CATEGORIES
    from SegLensLogic.storage import file_sha256

    groups = {"live latents": live}
    if file_sha256(work / f"plain-seed{first}" / "sae.safetensors") == file_sha256(BUNDLE / "sae" / "sae.safetensors"):
        labels = json.loads((BUNDLE / "latents.json").read_text())
        tumour = np.zeros(len(live), dtype=bool)
        tumour[[e["id"] for e in labels["latents"] if e["category"] in READABLE_CATEGORIES]] = True
        groups["tumour-labelled, boundary included (shipped labels)"] = live & tumour
        lines += ["", f"Seed {first} is the shipped U-Net SAE (the same weights, by hash)."]
    lines += ["", f"How many of the {len(others)} other seeds find each of seed {first}'s latents again:", "",
              "| latents | " + " | ".join(f"{n}" for n in range(len(others) + 1)) + " | found by at least one |",
              "|---|" + "---|" * (len(others) + 2)]  # fmt: skip
    for name, mask in groups.items():
        counts = np.bincount(found[mask], minlength=len(others) + 1)
        lines.append(f"| {name} ({int(mask.sum())}) | " + " | ".join(str(c) for c in counts) + f" | {int((found[mask] > 0).sum())} |")
    (HERE / "floor.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def _hold_cell(row: dict | None) -> str:
    if row is None or row["mean_in_class"] is None:
        return " |"
    return f" {row['fired']} / {row['mean_in_class']:.0%} / {row['holding']} |"


def _readability_cells(row: dict | None) -> str:
    if row is None:
        return "| | |"
    return (f"{row['tumour_latents']} / {row['tumour_latents_seed1']} | {row['label_agreement']:.0%} | "
            f"{row['tumour_replicating']} of {row['tumour_latents']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("store", "train", "readability", "hold", "report", "floor"))
    parser.add_argument("recipe", nargs="?", help=f"one of {', '.join(RECIPES)} (readability: a comma-separated list, default all)")
    parser.add_argument("seed", nargs="?", type=int)
    parser.add_argument("--data", type=Path, default=HERE.parents[3] / "shared" / "data")
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    if args.action == "store":
        make_store(args.data, args.work)
        enrich_store(args.data, args.work)
    elif args.action == "train":
        if args.recipe not in RECIPES or args.seed is None:
            parser.error(f"train needs RECIPE ({', '.join(RECIPES)}) and SEED")
        train(args.recipe, args.seed, args.work)
    elif args.action in ("readability", "hold"):
        (readability if args.action == "readability" else hold)(args.work, args.data, args.recipe.split(",") if args.recipe else list(RECIPES))
    elif args.action == "floor":
        floor(args.work)
    else:
        report(args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
