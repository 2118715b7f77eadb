"""The algorithm registry: each module's facts, read by every part of `bench`, and reference-free modules
that load, cache and compute no reference."""

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

import modules
import modules.base
from bench.experiments import recipe
from bench.reports import figures
from datamodules.hh_datamodule import HHRLHFDataModule
from modules.base import AlignmentModule
from modules.paired import PairedPreferenceModule

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"


def test_every_algorithm_states_its_facts_once_and_bench_reads_them():
    registry = modules.registry()
    assert registry["rm"].__name__ == "RewardModel" and "rm" not in modules.algorithms()
    for name in modules.algorithms():
        cls = registry[name]
        assert cls.name == name and issubclass(cls, AlignmentModule)
        assert cls.pruning_metric and cls.pruning_metric.startswith("val/"), name
        assert name == "sft" or (SWEEPS / f"{name}.yaml").is_file(), f"{name} has no search space"
        assert figures.colour_of(name) == cls.colour != figures.FALLBACK_COLOUR
        assert cls.online == (cls.data_view == "prompts")
        if cls.online:  # the proxy it optimises is passed to it by `bench compare`
            assert cls.proxy_setting == "model.proxy"
    assert len(set(figures.algorithm_colours().values())) == len(modules.algorithms())
    assert modules.aligned() == [n for n in modules.algorithms() if n != "sft"]
    assert recipe.stage_names() == ["sft", "rm", *modules.aligned()]
    # Display order: offline before online.
    online = [registry[n].online for n in modules.aligned()]
    assert online == sorted(online)


def test_the_names_read_from_source_are_the_registry_s():
    # help and argument errors list them without importing torch
    assert modules.declared_names() == sorted(modules.registry())


REFERENCE_FREE_PAIRED = [name for name, cls in modules.registry().items()
                         if issubclass(cls, PairedPreferenceModule) and not cls.needs_reference]


def test_the_reference_free_paired_modules_are_simpo_orpo_and_slic():
    assert sorted(REFERENCE_FREE_PAIRED) == ["orpo", "simpo", "slic"]


@pytest.mark.parametrize("name", REFERENCE_FREE_PAIRED)
def test_a_reference_free_paired_module_loads_caches_and_computes_no_reference(hh_path, tmp_path, monkeypatch, name):
    loaded = []
    real_load = modules.base.load_causal_lm

    def counting_load(spec, *args, **kwargs):
        loaded.append(spec)
        return real_load(spec, *args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free module asked for the reference")

    monkeypatch.setattr(modules.base, "load_causal_lm", counting_load)
    monkeypatch.setattr(modules.base.ReferenceLogpCache, "for_run", no_reference)
    monkeypatch.setattr(modules.base, "compute_logps", no_reference)
    monkeypatch.setattr(AlignmentModule, "reference_logps", no_reference)
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view="paired", max_length=96, max_prompt_length=48,
                          batch_size=4, max_train_pairs=8, max_val_pairs=4)
    module = modules.module_class(name)(policy="tiny", lr=1e-3)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert loaded == ["tiny"] and module.reference is None  # the policy only
    assert trainer.callback_metrics["val/loss"].isfinite()
    batch = next(iter(dm.train_dataloader()))
    assert "reference_logps" not in batch
    with torch.no_grad():
        loss, metrics = module.loss_and_metrics(batch)
        chosen, rejected = module.policy_logps(batch).reduce(module.average_logratios).chunk(2)
    torch.testing.assert_close(loss, module.pair_loss(chosen, rejected).mean())
    torch.testing.assert_close(metrics["rewards/chosen"], module.reward_scale * chosen.mean())


def test_the_reward_model_is_known_by_its_facts_not_by_its_name():
    import ast

    assert modules.reward_model_name() == "rm" == modules.declared_names()[modules.declared_names().index("rm")]
    rm = modules.module_class("rm")
    assert rm.model_key == "backbone" and rm.trained_roles == ("proxy", "judge")
    assert [name for name in modules.registry() if not modules.trains_policy(name)] == ["rm"]
    assert recipe.stage_names()[:2] == ["sft", "rm"]
    # bench asks the registry; the name is spelt once, in modules/reward_model.py
    root = Path(recipe.__file__).resolve().parents[1]
    spelt = [f"{path.relative_to(root)}:{node.lineno}" for path in root.rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant) and node.value == "rm"]
    assert spelt == []
