"""attnzoo.distill: the loop on tiny random-init models (a llama from a config, a small attnzoo.nn ViT)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import attnzoo
from attnzoo.distill import batch_indices, distill, text_examples
from attnzoo.distill.recipes import SeerRecipe
from attnzoo.errors import InvalidArgumentError, UnknownNameError, UnsupportedError
from attnzoo.trained.vit_digits import ViTConfig, ViTDigits

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB, N = 61, 64


def tiny_llama(heads=4, kv_heads=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than random init gives, so the maps have structure to learn
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model


def tiny_vit():
    torch.manual_seed(0)
    model = ViTDigits(ViTConfig(image_size=16, dim=32, depth=2, num_heads=2, mlp_dim=32)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def tokens(gen, rows):
    return torch.randint(0, VOCAB, (rows, N), generator=gen)


def weights_of(run):
    return {f"{i}.{k}": t.clone() for i, m in run.methods.items() for k, t in m.state_dict().items()}


@pytest.mark.parametrize("recipe, config, term, fall", [("seer", dict(block_size=16, top_k=2), "gate_kl", 0.7),
                                                        ("hedgehog", {}, "output_mse", 0.7),  # (its cross-entropy sits on the teacher's entropy)
                                                        ("moh", dict(active=0.5), "output_kl", 0.85)])
def test_loss_falls_and_only_the_method_trains(llama, tmp_path, rng, recipe, config, term, fall):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    data = tokens(rng, 1)  # one example: every step sees the same batch
    run = distill(llama, recipe, data, tmp_path, steps=25, progress=False, **config)
    losses, part = [r["loss"] for r in run.metrics], [r[term] for r in run.metrics]
    assert losses[-1] < losses[0] and part[-1] < fall * part[0], (losses, part)
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in llama.parameters())  # the model's flags are restored
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 26))


def test_checkpoint_reloads_to_identical_outputs(llama, tmp_path, rng):
    data, probe = tokens(rng, 4), tokens(rng, 1)
    run = distill(llama, "seer", data, tmp_path, steps=4, batch_size=2, progress=False, block_size=16, top_k=2)
    with attnzoo.patch(llama, layers=dict(run.methods)):
        expected = llama(probe).logits
    with attnzoo.patch(llama, "seer", weights=tmp_path):
        loaded = llama(probe).logits
    assert torch.equal(loaded, expected)
    with attnzoo.patch(llama, "seer", weights=tmp_path, top_k=4):  # inference options override the checkpoint's
        assert not torch.equal(llama(probe).logits, expected)


def test_checkpoint_on_an_attnzoo_nn_model_reloads_identically(tmp_path, rng):
    model = tiny_vit()
    images = torch.rand(6, 1, 16, 16, generator=rng)
    run = distill(model, "linfusion", images[:4], tmp_path, val=images[4:], steps=3, batch_size=2, progress=False)
    assert "val_block_mse" in run.metrics[-1]
    attnzoo.patch(model, "linfusion", weights=tmp_path)
    loaded = model(images)
    attnzoo.unpatch(model)
    from attnzoo.integrations import attnzoo_nn
    with attnzoo_nn.install(model, dict(run.methods)):
        assert torch.equal(model(images), loaded)
    assert not attnzoo.unpatch(model)


def test_resume_continues_the_same_run(llama, tmp_path, rng):
    data = tokens(rng, 6)
    options = dict(batch_size=2, progress=False, save_every=1, block_size=16, top_k=2)
    straight = distill(llama, "seer", data, tmp_path / "a", steps=6, **options)
    distill(llama, "seer", data, tmp_path / "b", steps=3, **options)
    resumed = distill(llama, "seer", data, tmp_path / "b", steps=6, **options)
    assert [r["step"] for r in resumed.metrics] == [4, 5, 6]
    a, b = weights_of(straight), weights_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()


def test_kept_teacher_features_train_as_fresh_teacher_passes(llama, tmp_path, rng):
    data = tokens(rng, 4)
    options = dict(batch_size=2, progress=False, block_size=16, top_k=2)
    kept = distill(llama, "seer", data, tmp_path / "kept", steps=4, val=data[:3], val_every=2, **options)
    fresh = distill(llama, "seer", data, tmp_path / "fresh", steps=4, val=data[:3], val_every=2, cache_teacher=False, **options)
    for name in ("loss", "val_gate_kl"):
        assert [r.get(name) for r in kept.metrics[1::2]] == pytest.approx([r.get(name) for r in fresh.metrics[1::2]], rel=1e-5)
    a, b = weights_of(kept), weights_of(fresh)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.equal(a[k], weights_of(distill(llama, "seer", data, tmp_path / "one", steps=1, **options))[k]) for k in a)
    with pytest.raises(InvalidArgumentError, match="cache_teacher"):
        distill(llama, "moh", data, tmp_path / "moh", steps=1, cache_teacher=True, progress=False)


def test_teacher_features_kept_on_disk_serve_other_runs(llama, tmp_path, rng, monkeypatch):
    from attnzoo.distill.targets import HFTarget

    data, store = tokens(rng, 3), tmp_path / "teacher"
    options = dict(progress=False, block_size=16, top_k=2, val=tokens(rng, 1))
    first = distill(llama, "seer", data, tmp_path / "a", steps=4, cache_teacher=store, **options)
    assert len(list(store.glob("*.safetensors"))) == 4  # 3 training examples, 1 validation example
    calls = []
    teacher = HFTarget.teacher
    monkeypatch.setattr(HFTarget, "teacher", lambda self, batch, layers: calls.append(1) or teacher(self, batch, layers))
    again = distill(llama, "seer", data, tmp_path / "b", steps=4, cache_teacher=store, **options)
    assert not calls  # every example read from the store
    a, b = weights_of(first), weights_of(again)
    assert all(torch.equal(a[k], b[k]) for k in a) and again.metrics[-1] == first.metrics[-1]
    other = distill(llama, "seer", data, tmp_path / "c", steps=2, lr=3e-3, cache_teacher=store, **options)
    assert not calls and other.metrics[-1]["loss"] != first.metrics[1]["loss"]  # another lr, the same features
    distill(llama, "seer", data, tmp_path / "d", steps=1, cache_teacher=store, **{**options, "block_size": 8})
    assert calls  # other features (another block size) are computed, not read


def _ctrl_c():
    raise KeyboardInterrupt


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # as ``kill`` would


class _Interrupting(SeerRecipe):
    """Calls ``stop`` (a Ctrl-C, by default) in the loss of call ``at``, mid-step."""

    def __init__(self, at, stop=_ctrl_c):
        self.calls, self.at, self.stop = 0, at, stop

    def feature_losses(self, method, features):
        self.calls += 1
        if self.calls == self.at:
            self.stop()
        return super().feature_losses(method, features)


def test_ctrl_c_saves_and_resume_loses_nothing(llama, tmp_path, rng):
    data = tokens(rng, 6)
    options = dict(batch_size=2, progress=False, save_every=100, block_size=16, top_k=2)
    straight = distill(llama, "seer", data, tmp_path / "a", steps=5, **options)
    with pytest.raises(KeyboardInterrupt):
        distill(llama, _Interrupting(at=2 * 2 * 3 + 1), data, tmp_path / "b", steps=5, **options)  # 2 examples x 2 layers: dies in step 4
    assert json.loads((tmp_path / "b" / "config.json").read_text())["step"] == 3
    resumed = distill(llama, "seer", data, tmp_path / "b", steps=5, **options)
    a, b = weights_of(straight), weights_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_like_ctrl_c(llama, tmp_path, rng):
    data = tokens(rng, 4)
    options = dict(progress=False, save_every=100, block_size=16, top_k=2)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        distill(llama, _Interrupting(2 * 2 + 1, _sigterm), data, tmp_path / "t", steps=5, **options)  # 2 layers: dies in step 3
    assert json.loads((tmp_path / "t" / "config.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is previous


def test_batches_are_a_seeded_permutation_per_epoch():
    epoch = torch.cat([batch_indices(s, 10, 3, seed=1) for s in range(3)])
    assert len(set(epoch.tolist())) == 9
    assert torch.equal(batch_indices(4, 10, 3, seed=1), batch_indices(4, 10, 3, seed=1))
    assert not torch.equal(batch_indices(0, 10, 3, seed=1), batch_indices(0, 10, 3, seed=2))


class _Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def test_text_examples_keep_validation_apart():
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train, val = text_examples(_Tokenizer(), text, 50, val_fraction=0.2)
    assert train.shape == (16, 50) and val.shape == (4, 50)
    ids = torch.tensor([ord(c) % VOCAB for c in text])
    assert torch.equal(torch.cat([train.flatten(), val.flatten()]), ids)
    overlapping, same_val = text_examples(_Tokenizer(), text, 50, val_fraction=0.2, stride=20)
    assert overlapping.shape == (38, 50) and torch.equal(same_val, val)
    assert torch.equal(overlapping[::5].flatten(), train[::2].flatten()) and torch.equal(overlapping[1, :30], train[0, 20:])
    with pytest.raises(InvalidArgumentError, match="stride"):
        text_examples(_Tokenizer(), text, 50, stride=0)
    with pytest.raises(InvalidArgumentError, match="non-empty text"):
        text_examples(_Tokenizer(), "  \n", 50)
    with pytest.raises(InvalidArgumentError, match="at least 100 tokens"):
        text_examples(_Tokenizer(), text[:60], 50)


def test_bad_input_is_refused(llama, tmp_path, rng):
    data = tokens(rng, 2)
    with pytest.raises(InvalidArgumentError, match="steps"):
        distill(llama, "seer", data, tmp_path / "x", steps=0, progress=False)
    with pytest.raises(InvalidArgumentError, match="train"):
        distill(llama, "seer", data[:0], tmp_path / "x", steps=1, progress=False)
    with pytest.raises(UnknownNameError, match="recipe"):
        distill(llama, "seers", data, tmp_path / "x", steps=1, progress=False)
    with pytest.raises(InvalidArgumentError, match="layers"):
        distill(llama, "seer", data, tmp_path / "x", steps=1, layers=[5], progress=False)
    with pytest.raises(UnsupportedError, match="non-causal"):
        distill(llama, "linfusion", data, tmp_path / "x", steps=1, progress=False)
    with attnzoo.patch(llama, "sliding_window", window=8):
        with pytest.raises(InvalidArgumentError, match="unpatched"):
            distill(llama, "seer", data, tmp_path / "x", steps=1, progress=False)
    distill(llama, "seer", data, tmp_path / "seer", steps=1, progress=False, block_size=16, top_k=2)
    with pytest.raises(InvalidArgumentError, match="method_config"):  # the folder holds another run
        distill(llama, "seer", data, tmp_path / "seer", steps=2, progress=False, block_size=32)
    with pytest.raises(InvalidArgumentError, match="data_crc32"):  # ... or the same run on other data
        distill(llama, "seer", (data + 1) % VOCAB, tmp_path / "seer", steps=2, progress=False, block_size=16, top_k=2)
    with pytest.raises(InvalidArgumentError, match="'seer'"):  # a checkpoint of another method
        attnzoo.patch(llama, "hedgehog", weights=tmp_path / "seer")
    with pytest.raises(InvalidArgumentError, match="weights"):  # a folder without a checkpoint
        attnzoo.patch(llama, "seer", weights=tmp_path / "nothing")
    other = tiny_llama(heads=2, kv_heads=2)
    with pytest.raises(InvalidArgumentError, match="layer 0 trained with shape"):  # another shape
        attnzoo.patch(other, "seer", weights=tmp_path / "seer")
    assert attnzoo.integrations.transformers.current_patch(other) is None
