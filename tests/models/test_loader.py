import json

import pytest
from transformers import GenerationConfig, Qwen2Config

from localvl.engine.sampling import ResolvedSampling
from localvl.models.loader import ModelLoadError, load_model, model_context, pick_device, sampling_defaults


def test_loads_each_family_with_context_and_eos(loaded_model):
    loaded = loaded_model("qwen3_vl")
    assert loaded.model_type == "qwen3_vl"
    assert loaded.context_length == 32768
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.eos_token_ids


def test_max_model_len_overrides_the_context(model_dir):
    loaded = load_model(str(model_dir("qwen2_vl")), max_model_len=512)
    assert loaded.context_length == 512


def test_max_model_len_beyond_the_models_positions_is_refused_before_the_weights_load(model_dir, monkeypatch):
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", never)
    with pytest.raises(ModelLoadError, match="--max-model-len 1000000 is beyond the 32768 tokens"):
        load_model(str(model_dir("qwen2_vl")), max_model_len=1_000_000)


def test_a_yarn_rope_scaling_stretches_the_models_context():
    # as Qwen's model cards have users extend Qwen2.5-VL: rope_scaling {type: yarn, factor 4, original 32768}
    plain = Qwen2Config(max_position_embeddings=32768)
    assert model_context(plain) == 32768
    yarn = Qwen2Config(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6})
    assert model_context(yarn) == 131072


def test_a_text_only_model_is_refused_with_a_clear_message(tmp_path):
    Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="is a text model \\('qwen2'\\); localvl serves Qwen-VL"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_5_text"}')  # Qwen3.5's decoder alone
    with pytest.raises(ModelLoadError, match="is a text model \\('qwen3_5_text'\\)"):
        load_model(str(tmp_path))


def test_a_missing_folder_or_unreachable_hub_id_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="could not read the config"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="hub id"):
        load_model("Qwen/Qwen2.5-VL-3B-Instruct")  # HF_HUB_OFFLINE=1 in tests


def test_sampling_defaults_follow_the_folder():
    assert sampling_defaults(None) == ResolvedSampling()
    assert sampling_defaults(GenerationConfig()) == ResolvedSampling()
    assert sampling_defaults(GenerationConfig(do_sample=False)) == ResolvedSampling(temperature=0.0)
    qwen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
    assert sampling_defaults(qwen) == ResolvedSampling(temperature=0.7, top_p=0.8, top_k=20)


def test_the_folders_repetition_penalty_applies_with_or_without_sampling():
    # Qwen2.5-VL-Instruct's published generation_config sets repetition_penalty 1.05
    qwen = GenerationConfig(do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05)
    assert sampling_defaults(qwen).repetition_penalty == 1.05
    assert sampling_defaults(GenerationConfig(do_sample=False, repetition_penalty=1.2)).repetition_penalty == 1.2
    assert sampling_defaults(GenerationConfig(repetition_penalty=1.1)).repetition_penalty == 1.1


def test_cuda_asked_for_where_there_is_none_says_so(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError, match="--device cpu"):
            pick_device(device)
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"


def test_a_folders_published_generation_config_fills_each_unset_field_on_its_own(model_dir, tmp_path):
    """Qwen3-VL-Instruct's generation_config.json: a client that gives only a temperature (Anthropic's
    SDKs default none; some clients send 1.0) still gets the folder's top_p and top_k."""
    import shutil

    from localvl.conversation import SamplingParams
    from localvl.engine.frontend import Frontend, ModelFacts

    folder = tmp_path / "model"
    shutil.copytree(model_dir("qwen3_vl"), folder)
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
        "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0, "temperature": 0.7, "transformers_version": "4.56.0"}))
    loaded = load_model(str(folder))
    assert loaded.sampling_defaults == ResolvedSampling(temperature=0.7, top_p=0.8, top_k=20)
    frontend = Frontend(loaded.processor, ModelFacts(0, 2, loaded.sampling_defaults, 4096))
    assert frontend._resolve(SamplingParams(max_tokens=8)) == loaded.sampling_defaults
    assert frontend._resolve(SamplingParams(max_tokens=8, temperature=1.0)) == ResolvedSampling(1.0, 0.8, 20)
    given = SamplingParams(max_tokens=8, temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.2)
    assert frontend._resolve(given) == ResolvedSampling(0.0, 0.5, 3, 1.2)
