"""The algorithm registry: each module's facts, read by every part of `bench`, and reference-free modules
that load, cache and compute no reference."""

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

import modules
import modules.base
from bench import compare, figures
from datamodules.hh_datamodule import HHRLHFDataModule
from modules.base import AlignmentModule, PairedPreferenceModule
from modules.losses import dpo_loss

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


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
    assert compare.stage_names() == ["sft", "rm", *modules.aligned()]
    # Display order: offline before online.
    online = [registry[n].online for n in modules.aligned()]
    assert online == sorted(online)


class ReferenceFreeDPO(PairedPreferenceModule):
    """DPO's loss on the policy's own log-probs, for the test only (no `name`: not registered)."""

    needs_reference = False

    @property
    def reward_scale(self):
        return 0.1

    def pair_loss(self, chosen, rejected):
        return dpo_loss(chosen, rejected, 0.1)


def test_a_reference_free_paired_module_loads_caches_and_computes_no_reference(hh_path, tmp_path, monkeypatch):
    loaded = []
    real_load = modules.base.load_causal_lm

    def counting_load(spec, *args, **kwargs):
        loaded.append(spec)
        return real_load(spec, *args, **kwargs)

    def no_cache(*args, **kwargs):
        raise AssertionError("a reference-free module opened the reference cache")

    monkeypatch.setattr(modules.base, "load_causal_lm", counting_load)
    monkeypatch.setattr(modules.base.ReferenceLogpCache, "for_run", no_cache)
    monkeypatch.setattr(AlignmentModule, "reference_logps", no_cache)
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view="paired", max_length=96, max_prompt_length=48,
                          batch_size=4, max_train_pairs=8, max_val_pairs=4)
    module = ReferenceFreeDPO(policy="tiny", lr=1e-3)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert loaded == ["tiny"] and module.reference is None  # the policy only
    batch = next(iter(dm.train_dataloader()))
    assert "reference_logps" not in batch
    with torch.no_grad():
        loss, metrics = module.loss_and_metrics(batch)
        chosen, rejected = module.policy_logps(batch).total.chunk(2)
    torch.testing.assert_close(loss, dpo_loss(chosen, rejected, 0.1).mean())
    torch.testing.assert_close(metrics["rewards/chosen"], 0.1 * chosen.mean())
