"""The fine-tuning demo (examples/finetune_minilm.py) driven on a tiny random BERT with a
character-level tokenizer and a slice of the real VADER lexicon, so CI needs vaderSentiment but not
the 83 MB model package: the labels are the human ones, training lowers the loss, only the LoRA
matrices move, and the saved adapter reloads — through lora_fast and through PEFT — to the same
predictions."""
import importlib.resources
import json
import statistics

import pytest
import torch

import lora_fast

pytest.importorskip("vaderSentiment")
transformers = pytest.importorskip("transformers")
from examples import finetune_minilm as demo  # noqa: E402

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def split():
    return demo.load_vader_dataset()


def _lexicon_means():
    """entry -> mean valence, read straight from the file (averaging entries listed twice)."""
    text = importlib.resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text("utf-8")
    means = {}
    for line in text.splitlines():
        entry, mean = line.split("\t")[:2]
        means.setdefault(entry, []).append(float(mean))
    return {entry: statistics.fmean(values) for entry, values in means.items()}


def test_dataset_has_the_human_labels(split):
    train, test = split
    labels = dict(train + test)
    assert len(labels) == len(train) + len(test), "an entry is in both halves or twice"
    for word in ("good", "love", "great", "lol", ":)"):
        assert labels[word] == 1, word
    for word in ("horrible", "hate", "bad", "sob", ":("):
        assert labels[word] == 0, word
    means = _lexicon_means()
    assert all(abs(means[entry]) >= demo.NEUTRAL_BELOW for entry in labels)
    assert all(label == int(means[entry] > 0) for entry, label in labels.items())
    kept = {entry for entry, mean in means.items() if abs(mean) >= demo.NEUTRAL_BELOW}
    assert set(labels) == kept and "d:" not in labels  # rated -2.9 and +1.2: mean -0.85, dropped
    assert len(test) == round(0.2 * len(kept))
    for half in (train, test):
        assert 0.3 < statistics.fmean(y for _, y in half) < 0.6   # both classes, about 44% positive


def test_dataset_split_is_deterministic(split):
    assert demo.load_vader_dataset() == split
    other_train, _ = demo.load_vader_dataset(seed=1)
    assert sorted(other_train) != sorted(split[0])


def _char_tokenizer(tmp_path, texts):
    """A WordPiece tokenizer whose vocabulary is every character (and ##character) in ``texts``."""
    chars = sorted({c for text in texts for c in text.lower() if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return transformers.BertTokenizer(str(path))


def _tiny_bert(vocab_size):
    """The same random weights on every call. Without dropout, so that 64 steps on 128 entries
    lower the loss by a margin the test can hold them to."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config).eval()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on transformers 5
def test_finetune_saves_an_adapter_that_reproduces_the_model(split, tmp_path, capsys):
    train, test = split[0][:128], split[1][:64]
    tokenizer = _char_tokenizer(tmp_path, [t for t, _ in train + test] + list(demo.LABEL_PROMPTS))
    model = _tiny_bert(len(tokenizer))
    injected = lora_fast.inject(model, r=4, lora_alpha=8, target_modules=demo.TARGET_MODULES)
    assert len(injected) == 2 * len(demo.TARGET_MODULES)
    trainable, total = lora_fast.trainable_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert total == sum(p.numel() for p in model.parameters())
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}

    before = demo.evaluate(model, tokenizer, train, DEVICE)
    epoch_losses, step_times = demo.train(model, tokenizer, train, DEVICE, epochs=8, lr=1e-2,
                                          batch_size=16)
    after = demo.evaluate(model, tokenizer, train, DEVICE)
    assert len(epoch_losses) == 8 and len(step_times) == 8 * 8
    progress = capsys.readouterr().err   # pytest's capture, not a terminal: lines, no '\r' bar
    assert "\r" not in progress and "epoch 8/8: 8/8 steps, " in progress, progress
    assert after.loss < 0.85 * before.loss, (before.loss, after.loss)   # 0.705 -> 0.537 here
    assert not model.training

    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, frozen[name]), f"{name} changed"
    assert all(model.get_submodule(name).lora_B.abs().sum() > 0 for name in injected)

    adapter = tmp_path / "adapter"
    lora_fast.save_adapter(model, adapter, base_model_name_or_path="tiny-bert")
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    trained = demo.evaluate(model, tokenizer, test, DEVICE)
    fresh = _tiny_bert(len(tokenizer))
    assert sorted(lora_fast.load_adapter(fresh, adapter)) == sorted(injected)
    assert torch.equal(demo.evaluate(fresh, tokenizer, test, DEVICE).logits, trained.logits)

    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(_tiny_bert(len(tokenizer)), adapter)
    torch.testing.assert_close(demo.evaluate(peft_model, tokenizer, test, DEVICE).logits,
                               trained.logits, rtol=0, atol=1e-4)


def test_pretrained_model_zero_shot(split):
    """The real model, when its package is installed: zero-shot accuracy well above chance."""
    pytest.importorskip(demo.MODEL_PACKAGE)
    model, tokenizer = demo.load_model_and_tokenizer(DEVICE)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert demo.evaluate(model, tokenizer, split[1][:256], DEVICE).accuracy > 0.6
