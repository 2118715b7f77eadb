"""A simulated gold labeller (Gao, Schulman & Hilton 2023; AlpacaFarm, Dubois et al. 2023): a gold reward model
scores both responses of every pair, and a label rule decides which is chosen.

- ``deterministic``: the response the gold model scores higher is chosen (a tie keeps the human label);
- ``bradley-terry``: the first response is chosen with probability sigma((r_a - r_b) / T), drawn with a seed:
  annotator noise, as AlpacaFarm's simulated annotators.

`relabel` writes a copy of the source in the dataset's own layout (`<subset>/<split>.jsonl.gz`, each record's
`chosen` and `rejected` swapped where the gold label disagrees with the human one, plus the two gold scores),
and a `manifest.json` with the gold model's fingerprint, the rule, its temperature and seed, and the counts. The
copy is cached under `cache_dir()/gold_labels/<key>`, keyed by all of these; everything downstream reads it as
any HH source. A copy whose manifest does not match the settings asked for is refused.
"""

import gzip
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import modules
from bench.core.errors import ConfigError, DataError
from bench.core.models import cache_dir
from bench.core.precision import inference_autocast, inference_key_part
from bench.core.settings import check_values
from bench.evaluation import labelling, onpolicy
from bench.evaluation.judges import load_scorer, scorer_fingerprint
from bench.evaluation.labelling import (  # noqa: F401 - gold.label_pairs
    RULES,
    LabelRule,
    label_pairs,
    source_files,
    source_fingerprint,
)
from bench.evaluation.rewards import is_reward_spec, make_reward
from bench.runs import recipes
from bench.sampling.generation import JsonCache
from datamodules.hh_rlhf import SPLITS, _check_keys, _read_jsonl_gz, assign_splits, parse_record

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class GoldSettings:
    """Which gold model labels the pairs, and how. `model` is a reward-model spec (folder or hub id)."""

    model: str
    rule: LabelRule = "bradley-terry"
    temperature: float = 1.0
    seed: int = 0
    input_format: str = "auto"
    batch_size: int = 32

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(f"gold.rule {self.rule!r} is unknown; choose one of {', '.join(RULES)}")
        if self.rule == "bradley-terry" and not self.temperature > 0:
            raise ConfigError(f"gold.temperature must be > 0 for the bradley-terry rule, got {self.temperature}")
        if self.batch_size < 1:
            raise ConfigError(f"gold.batch_size must be >= 1, got {self.batch_size}")


def scoring_precision(settings: GoldSettings) -> dict:
    """What the gold's scores record of the precision they were computed in: nothing for a computable reward
    (text in, a number out; a hub classifier scores in fp32 itself), bf16 autocast or fp32 for a reward model
    (`cache_key_part`: bf16 entries keep the keys they had before this was recorded)."""
    return {} if is_reward_spec(settings.model) else inference_key_part()


def labels_key(settings: GoldSettings, gold_fingerprint: str, sources: list[dict]) -> str:
    payload = {"gold": gold_fingerprint, "rule": settings.rule, "seed": settings.seed,
               "temperature": settings.temperature if settings.rule == "bradley-terry" else None,
               "input_format": settings.input_format, "sources": sources, **scoring_precision(settings)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def expected_manifest(settings: GoldSettings, gold_fingerprint: str) -> dict:
    """The manifest fields a copy must carry to be reused for `settings`."""
    return {"gold_fingerprint": gold_fingerprint, "rule": settings.rule, "seed": settings.seed,
            "temperature": settings.temperature if settings.rule == "bradley-terry" else None,
            "input_format": settings.input_format, **scoring_precision(settings)}


def check_manifest(folder: Path, expected: dict) -> dict:
    """The manifest of a relabelled copy, refused (ConfigError naming the field) when it does not match."""
    return labelling.check_manifest(folder / MANIFEST, expected,
                                    "relabel with `bench label` instead of reusing this copy")


def relabelled_source(settings: GoldSettings, data: dict, scorer_factory, root: Path | None = None) -> tuple[Path, dict]:
    """The cached relabelled copy of the HH source `data["path"]` for `settings` (made now if missing) and its
    manifest. `data` holds the recipe's data settings (path, subsets, val_fraction, test_fraction).
    `scorer_factory()` returns the gold reward model, with `score(prompts, responses, batch_size)`; it is
    only called when the copy has to be made."""
    path = data["path"]
    files = source_files(path, data.get("subsets"))
    folder = labelled_folder(settings, data, root)
    expected = expected_manifest(settings, scorer_fingerprint(settings.model))
    if (folder / MANIFEST).exists():
        manifest = check_manifest(folder, expected)
        log.info("gold labels: reusing %s (%s)", folder, manifest["counts"])
        return folder, manifest
    fractions = (data.get("val_fraction", 0.1), data.get("test_fraction", 0.1))
    manifest = relabel(files, Path(path).expanduser(), folder, settings, memoised(scorer_factory), expected, fractions)
    return folder, manifest


def memoised(factory):
    made = []
    return lambda: made[0] if made else made.append(factory()) or made[0]


def relabel(files: list[Path], root: Path, folder: Path, settings: GoldSettings, scorer, expected: dict,
            fractions: tuple[float, float] = (0.1, 0.1)) -> dict:
    """Score every pair of every file, write the relabelled files beside a manifest, atomically (a folder
    renamed into place: a reader sees the whole copy or none of it)."""
    records_by_file: dict[Path, list[tuple[dict, object]]] = {}
    dropped: dict[str, int] = {}
    for file in files:
        kept = []
        for where, record in _read_jsonl_gz(file):
            parsed = parse_record(_check_keys(where, record))
            if isinstance(parsed, str):  # unscorable: counted and dropped, as the loader drops them
                dropped[parsed] = dropped.get(parsed, 0) + 1
            else:
                kept.append((record, parsed))
        records_by_file[file] = kept
    pairs = [pair for kept in records_by_file.values() for _, pair in kept]
    if not pairs:
        raise DataError(f"{root}: no pair can be scored (dropped: {dropped})")
    started = time.perf_counter()
    chosen_scores, rejected_scores = gold_scores(pairs, settings, scorer)
    keep = label_pairs(chosen_scores, rejected_scores, settings.rule, settings.temperature, settings.seed)
    seconds = time.perf_counter() - started
    held_out = held_out_mask(records_by_file, *fractions)
    gold_prefers_human = chosen_scores > rejected_scores
    ties = chosen_scores == rejected_scores
    counts = {"pairs": len(pairs), "dropped": dropped, "flipped": int((~keep).sum()), "ties": int(ties.sum()),
              "held_out_pairs": int(held_out.sum())}
    agreement = {  # the gold model's own preference (ties excluded) against the human label
        "all": float(gold_prefers_human[~ties].mean()),
        "held_out": float(gold_prefers_human[held_out & ~ties].mean()) if (held_out & ~ties).any() else None,
        "labels_vs_human": float(keep.mean()),
    }
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    index = 0
    for file, kept in records_by_file.items():
        target = partial / file.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(target, "wt", encoding="utf-8") as out:
            for record, _ in kept:
                stays = bool(keep[index])
                relabelled = dict(record)
                relabelled["chosen"], relabelled["rejected"] = ((record["chosen"], record["rejected"]) if stays
                                                                else (record["rejected"], record["chosen"]))
                relabelled["gold_chosen"] = float(chosen_scores[index] if stays else rejected_scores[index])
                relabelled["gold_rejected"] = float(rejected_scores[index] if stays else chosen_scores[index])
                out.write(json.dumps(relabelled) + "\n")
                index += 1
    manifest = {**expected, "gold_model": settings.model, "source": str(root), "files": [str(f) for f in files],
                "counts": counts, "agreement_with_human": agreement, "scoring_seconds": round(seconds, 1),
                "settings": asdict(settings), "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    labelling.publish(partial, folder, manifest, MANIFEST)
    log.info("gold labels: %d pairs scored in %.0f s, %d flipped against the human labels, %d ties; written to %s",
             len(pairs), seconds, counts["flipped"], counts["ties"], folder)
    return manifest


def gold_scores(pairs: list, settings: GoldSettings, scorer) -> tuple[np.ndarray, np.ndarray]:
    """The gold model's scores of every pair's chosen and rejected response. Cached apart from the label rule
    (keyed by the gold model, the pairs, the input format and a reward model's precision), so that another rule,
    temperature or seed relabels without scoring again."""
    cache = JsonCache("gold_scores")
    key = JsonCache.key({"gold": scorer_fingerprint(settings.model), "input_format": settings.input_format,
                         "pairs": hashlib.sha256(json.dumps([[p.prompt, p.chosen, p.rejected] for p in pairs])
                                                 .encode()).hexdigest(), **scoring_precision(settings)})
    cached = cache.load(key)
    if cached is None:
        prompts = [p.prompt for p in pairs]
        with inference_autocast(getattr(scorer(), "device", "cpu")):  # the precision evaluation scores in
            cached = {"chosen": scorer().score(prompts, [p.chosen for p in pairs], batch_size=settings.batch_size,
                                               desc="gold scores: chosen").tolist()}
            cached["rejected"] = scorer().score(prompts, [p.rejected for p in pairs], batch_size=settings.batch_size,
                                                desc="gold scores: rejected").tolist()
        log.info("gold labels: stored the gold model's scores at %s", cache.store(key, cached))
    else:
        log.info("gold labels: reusing the gold model's scores %s", cache.path(key))
    return np.array(cached["chosen"], dtype=np.float64), np.array(cached["rejected"], dtype=np.float64)


def held_out_mask(records_by_file: dict[Path, list], val_fraction: float, test_fraction: float) -> np.ndarray:
    """Which pairs the harness holds out of training (its validation and test splits, carved as the loader
    carves them), in the order the pairs are scored."""
    by_split: dict[str, list] = {}
    order = []
    for file, kept in records_by_file.items():
        split = file.name.split(".")[0]
        for _, pair in kept:
            by_split.setdefault(split, []).append(pair)
            order.append(pair)
    carved = assign_splits(by_split, val_fraction, test_fraction)
    held = {id(pair) for name in SPLITS if name != "train" for pair in carved[name]}
    return np.array([id(pair) in held for pair in order])


# --- recipes with a gold world ------------------------------------------------------------------------------
def gold_settings(recipe: dict) -> GoldSettings | None:
    """The recipe's `gold:` section as settings, or None when the recipe has no gold world. `model: train`
    names the gold model that `gold.train` describes (trained once and cached)."""
    section = recipe.get("gold")
    if not section:
        return None
    if not isinstance(section, dict) or "model" not in section:
        raise ConfigError("recipe section gold: needs `model:` (a reward-model folder or hub id, or `train`)")
    values = {key: value for key, value in section.items() if key not in ("train", "on_policy")}
    check_values(GoldSettings, values, "gold", also_known="train, on_policy")
    check_gold_spec(str(values["model"]))
    return GoldSettings(**values)


def check_gold_spec(spec: str) -> None:
    """One line when `gold.model` is neither `train`, a registered reward, a reward-model folder nor a hub id."""
    if is_reward_spec(spec):
        make_reward(spec, field="gold.model")
    elif spec != "train" and not Path(spec).expanduser().exists() and (spec.count("/") != 1 or spec.startswith((".", "/", "~"))):
        raise ConfigError(f"gold.model {spec!r} is neither `train`, a registered reward (reward:NAME), a reward-model "
                          "folder that exists, nor a hub id")


def gold_training_config(recipe: dict) -> dict:
    """The gold reward model's LightningCLI config: the recipe's `rm` config with `gold.train` over it."""
    return recipes.deep_merge(recipes.for_algorithm(recipe, modules.reward_model_name()),
                              (recipe.get("gold") or {}).get("train") or {})


def gold_model_dir(recipe: dict) -> Path:
    """Where the recipe's trained gold model is cached: keyed by its training config and the human source."""
    config = gold_training_config(recipe)
    sources = source_fingerprint(source_files(config["data"]["path"], config["data"].get("subsets")))
    key = hashlib.sha256(json.dumps({"config": config, "sources": sources}, sort_keys=True, default=str)
                         .encode()).hexdigest()[:24]
    return cache_dir() / "gold_models" / key


def ensure_gold_model(recipe_name: str, recipe: dict, train: bool) -> str:
    """The gold reward model's folder. `model: train`: the cached one, trained now (on the human labels of the
    whole train split, role `gold`) when missing and `train` allows; otherwise the spec as given."""
    settings = gold_settings(recipe)
    if settings.model != "train":
        return settings.model
    run_dir = gold_model_dir(recipe)
    model_dir = run_dir / "reward_model"
    if (model_dir / "config.json").exists():
        return str(model_dir)
    if not train:
        raise ConfigError(f"recipe {recipe_name}'s gold model is not trained yet: run `bench label --recipe "
                          f"{recipe_name}`, which trains it once (cached in {run_dir}) and labels the data")
    from bench.runs.training import train_one

    log.info("training the gold reward model of recipe %s into %s (once)", recipe_name, run_dir)
    result = train_one(modules.reward_model_name(), recipe_name, gold_training_config(recipe), ["--model.role=gold", f"--trainer.default_root_dir={run_dir}"],
                       run_name=f"{modules.reward_model_name()}-gold-{time.strftime('%Y%m%d-%H%M%S')}", tags={"gold_model": "true"})
    if result.run_id is None:
        raise ConfigError("the gold reward model's training was interrupted")
    return str(model_dir)


def gold_world(recipe_name: str, recipe: dict, create: bool = False) -> dict:
    """The recipe as its stages read it: `data.path` the gold-labelled data (HH pairs relabelled by the gold, or,
    with `gold.on_policy`, the reference's own samples labelled by it: `bench.evaluation.onpolicy`), and `eval.judge` the
    gold where the recipe says `judge: gold`. With `create`, a missing gold model is trained and missing data
    labelled (`bench label`, `bench compare`); otherwise their absence is an error that says so."""
    settings = gold_settings(recipe)
    if settings is None:
        return recipe
    if (recipe.get("gold") or {}).get("on_policy") is not None:
        return on_policy_world(recipe_name, recipe, settings, create)
    model = ensure_gold_model(recipe_name, recipe, train=create)
    settings = GoldSettings(**{**asdict(settings), "model": model})
    data = recipe.get("data") or {}

    def scorer():
        return load_scorer(model, "gold", settings.input_format)

    if not create:
        folder = labelled_folder(settings, data)
        if not (folder / MANIFEST).exists():
            raise ConfigError(f"recipe {recipe_name}'s data is not gold-labelled yet: run `bench label --recipe "
                              f"{recipe_name}`")
    folder, manifest = relabelled_source(settings, data, scorer)
    return world_of(recipe, folder, manifest, model)


def on_policy_world(recipe_name: str, recipe: dict, settings: GoldSettings, create: bool) -> dict:
    if settings.model == "train":
        raise ConfigError(f"recipe {recipe_name}: gold.on_policy needs a gold that exists (a registered reward such "
                          "as reward:vader, or a reward-model folder), not `model: train`")
    policy = (recipe.get("model") or {}).get("policy")
    if not policy:
        raise ConfigError(f"recipe {recipe_name}: gold.on_policy samples the reference, but model.policy is not set")
    rule = {"rule": settings.rule, "seed": settings.seed,
            "temperature": settings.temperature if settings.rule == "bradley-terry" else None}
    on_policy = onpolicy.OnPolicySettings.from_dict(recipe["gold"]["on_policy"])
    folder, manifest = onpolicy.on_policy_source(settings.model, policy, on_policy, rule, recipe.get("data") or {}, create)
    return world_of(recipe, folder, manifest, settings.model)


def world_of(recipe: dict, folder: Path, manifest: dict, gold_spec: str) -> dict:
    """The recipe reading `folder`, judged by the gold where it says `judge: gold`."""
    world = recipes.deep_merge(recipe, {"data": {"path": str(folder)}, "gold_manifest": manifest})
    eval_section = dict(world.get("eval") or {})
    if eval_section.get("judge") == "gold":
        eval_section["judge"] = gold_spec
        world["eval"] = eval_section
    world["gold_model"] = gold_spec
    return world


def labelled_folder(settings: GoldSettings, data: dict, root: Path | None = None) -> Path:
    files = source_files(data["path"], data.get("subsets"))
    key = labels_key(settings, scorer_fingerprint(settings.model), source_fingerprint(files))
    return (root or cache_dir() / "gold_labels") / key


def describe(manifest: dict, folder: str) -> str:
    """`bench label`'s report: the counts, the agreement with the human labels, and where the copy is."""
    counts, agreement = manifest["counts"], manifest["agreement_with_human"]
    rule = manifest["rule"] + (f", T {manifest['temperature']}" if manifest["temperature"] is not None else "")
    dropped = ", ".join(f"{n} {reason}" for reason, n in counts["dropped"].items()) or "none"
    held_out = agreement["held_out"]
    return "\n".join([
        f"gold model    {manifest['gold_model']} (fingerprint {manifest['gold_fingerprint'][:12]})",
        f"rule          {rule}, seed {manifest['seed']}",
        f"pairs         {counts['pairs']:,} labelled; dropped {dropped}",
        f"flipped       {counts['flipped']:,} against the human labels ({counts['flipped'] / counts['pairs']:.1%}); "
        f"{counts['ties']} ties",
        f"gold vs human {agreement['all']:.3f} of all pairs, "
        + (f"{held_out:.3f} of the {counts['held_out_pairs']} held-out pairs" if held_out is not None else "no held-out pairs")
        + " (the gold model's own preference)",
        f"labelled copy {folder}",
    ])


def describe_world(manifest: dict, folder: str) -> str:
    """`bench label`'s report of whichever gold world the recipe has."""
    return onpolicy.describe(manifest, folder) if manifest.get("kind") == "on-policy" else describe(manifest, folder)
