"""transformers.Trainer on a model with fl.patch: the same losses as the unpatched model (issue 12).

Trainer needs `accelerate` (the test extra installs it). Dropout off, the same init (one saved
folder), data and seed: every logged loss within 1e-4 relative, and the patched run really ran the
fastlayers ops (fl.last_backend, no attention fallback).
"""
import pytest
import torch

import fastlayers as fl

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _dataset(n=24, L=12, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, L + 1, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": int(i % 2)})
    return rows


def _collate(batch):
    L = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    mask = torch.zeros(len(batch), L, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in batch])}


def _train(folder, out, patch: bool):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(folder)
    if patch:
        fl.patch(model)
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=5e-4, logging_steps=1, report_to=[], use_cpu=True,
                                          seed=0, save_strategy="no", dataloader_num_workers=0,
                                          lr_scheduler_type="linear", warmup_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=_collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], model


def test_trainer_patched_bert_same_losses(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  num_labels=2)
    folder = tmp_path / "bert"
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    ref, _ = _train(folder, tmp_path / "ref", patch=False)
    from fastlayers.patch import attention_stats, reset_attention_stats
    reset_attention_stats()
    got, model = _train(folder, tmp_path / "fl", patch=True)
    stats = attention_stats()
    assert len(ref) == len(got) == 6
    for step, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= 1e-4 * abs(a) + 1e-6, f"step {step}: transformers {a}, patched {b}"
    assert ref[-1] != ref[0]                          # it trained
    # every attention call of the patched run went through fl.attention (2 layers x 6 steps, fwd), none to sdpa
    assert stats.get("fastlayers", 0) >= 12 and not [k for k in stats if k.startswith("sdpa")], stats
