"""One typed recipe, resolved once (bench/experiments/recipe.py): the order of its steps, the command line
winning over every recipe section, and a Recipe that no reader can change."""

from dataclasses import replace

import pytest
import yaml

from bench.core.errors import BenchError, ConfigError
from bench.evaluation.evaluate import EvalSettings
from bench.experiments.recipe import Recipe, eval_overrides, resolve
from bench.sampling.generation import Sampling


@pytest.fixture
def mine(tmp_path, hh_path):
    """tiny with a `compare:` that sets its own eval and algorithm settings, as smol-hh's does."""
    from bench.runs.recipes import RECIPE_DIR

    recipe = yaml.safe_load((RECIPE_DIR / "tiny.yaml").read_text())
    recipe["data"]["path"] = hh_path
    recipe["eval"] = {**recipe["eval"], "n_prompts": 8}
    recipe["compare"] = {**recipe["compare"], "seeds": [3, 4], "eval": {"n_prompts": 48, "sampling": {"top_p": 0.9}},
                         "algorithms": {"dpo": {"model": {"beta": 0.25}}}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_the_command_line_wins_over_the_recipe_and_its_compare_section(mine):
    argv = ["--eval.n_prompts=5", "--trainer.max_steps=2", "--eval.sampling.max_new_tokens", "7", "--model.beta=0.5"]
    recipe, rest = resolve(mine, argv, comparison=True, world="none")
    assert rest == ["--trainer.max_steps=2", "--model.beta=0.5"]  # LightningCLI's, applied by it, last
    assert recipe.eval.n_prompts == 5 and recipe.eval.sampling.max_new_tokens == 7
    assert recipe.eval.sampling.top_p == 0.9  # compare.eval where the command line is silent
    assert recipe.config("dpo")["model"]["beta"] == 0.25  # compare.algorithms
    assert recipe.compare.seeds == (3, 4)
    assert resolve(mine, [], comparison=True, world="none", seeds=[9])[0].compare.seeds == (9,)  # --seeds wins


def test_compare_settings_are_for_comparisons_only(mine):
    recipe, _ = resolve(mine, [], world="none")  # bench train, bench sweep
    assert recipe.eval.n_prompts == 8 and recipe.eval.sampling.top_p == 1.0
    assert recipe.config("dpo")["model"].get("beta") != 0.25
    assert recipe.compare is None


def test_bench_eval_flags_are_the_same_settings_as_eval_overrides(mine):
    from bench.cli.eval import flag_settings, parser

    args, rest = parser().parse_known_args(["run", "--n-prompts", "3", "--backend", "hf", "--proxy", "none",
                                            "--eval.sampling.top_p=0.5"])
    recipe, _ = resolve(mine, rest, world="none", eval_settings=flag_settings(args))
    assert (recipe.eval.n_prompts, recipe.eval.proxy) == (3, None)
    assert (recipe.eval.sampling.backend, recipe.eval.sampling.top_p) == ("hf", 0.5)
    # the flag and its --eval spelling are one setting; the --eval spelling, later on the line, wins
    both, _ = resolve(mine, ["--eval.n_prompts=4"], world="none", eval_settings={"n_prompts": 3})
    assert both.eval.n_prompts == 4


def test_a_recipe_is_read_never_rewritten(mine):
    recipe, _ = resolve(mine, [], comparison=True, world="none")
    config = recipe.config("dpo")
    config["model"]["beta"], config["data"]["path"] = 99, "elsewhere"
    assert recipe.config("dpo")["model"]["beta"] == 0.25 and recipe.data["path"] != "elsewhere"
    with pytest.raises(AttributeError):  # frozen: a stage changes its settings with `replace`, on a copy
        recipe.eval = EvalSettings()
    assert replace(recipe.eval, n_prompts=2).n_prompts == 2 and recipe.eval.n_prompts == 48
    assert isinstance(recipe, Recipe) and set(recipe.sections) <= {"seed_everything", "trainer", "data", "model",
                                                                   "algorithms"}


def test_the_reward_model_does_not_take_the_policy_s_model_section(mine):
    recipe, _ = resolve(mine, [], world="none")
    assert "policy" not in recipe.config("rm")["model"] and recipe.config("dpo")["model"]["policy"] == "tiny"


def test_a_dry_run_keeps_one_seed_and_a_local_judge(mine):
    recipe, _ = resolve(mine, [], comparison=True, world="none", dry_run=True)
    assert recipe.compare.seeds == (3,) and recipe.compare.budget_prompts == 2 and "rm" in recipe.compare.stages
    assert recipe.eval.n_prompts == 2 and recipe.sections["trainer"]["max_steps"] == 1


def test_bad_settings_are_refused_when_the_recipe_resolves(mine):
    with pytest.raises(ConfigError, match=r"eval.n_prompts must be >= 1, got 0"):
        resolve(mine, ["--eval.n_prompts=0"], world="none")
    with pytest.raises(ConfigError, match=r"unknown eval.sampling settings \['tempreature'\]"):
        resolve(mine, ["--eval.sampling.tempreature=1"], world="none")
    with pytest.raises(ConfigError, match=r"compare.seeds repeats a seed"):
        resolve(mine, [], comparison=True, world="none", seeds=[1, 1])
    with pytest.raises(BenchError, match=r"--eval.n_prompts needs a value"):
        eval_overrides(["--eval.n_prompts"])


def test_every_sampling_section_converts_one_way():
    assert Sampling.of({"top_p": 0.5}, max_new_tokens=9) == Sampling(top_p=0.5, max_new_tokens=9)
    assert Sampling.of(None) == Sampling()
    given = Sampling(seed=3)
    assert Sampling.of(given) is given
    with pytest.raises(ConfigError, match=r"unknown data.candidate_sampling settings \['n'\]"):
        Sampling.of({"n": 2}, "data.candidate_sampling")
