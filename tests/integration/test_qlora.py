"""QLoRA (``lora.quantize_4bit``) on the CPU: a 4-bit base learns through its adapter, and the saved
``merged/`` folder is the model that was trained, a plain one that loads without bitsandbytes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignment.batching import collate_sequences
from alignment.config import DPOConfig, LoraSettings, ModelSettings, RewardConfig
from alignment.models import (
    CausalLMLogps,
    adapter_disabled,
    import_bitsandbytes,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    save_model_folder,
    score_responses,
)
from alignment.recipes.dpo import DPORecipe
from alignment.recipes.reward import RewardRecipe
from tests.recipe_runs import train_between_evaluations
from tests.tiny_models import make_tiny_model, preference_pairs

bnb = import_bitsandbytes()
pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]  # token ids
COMPLETIONS = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # bitsandbytes quantizes in blocks of 64 inputs on the CPU: every layer at least that wide
    return make_tiny_model(tmp_path_factory.mktemp("qlora") / "llama", "llama", hidden_size=64, intermediate_size=128)


def _logps(model, batch):
    with torch.no_grad():
        return CausalLMLogps(model.eval())(batch)["seq_logps"]


# bitsandbytes' CPU inference layout has no backward: after an evaluation it would drop the gradient through the base
@pytest.mark.filterwarnings("error:.*an autograd kernel was not registered:UserWarning")
def test_qlora_dpo_learns_the_preference_through_a_4bit_base(llama, tmp_path):
    pairs = tmp_path / "pairs.parquet"
    preference_pairs(64, seed=0).to_parquet(pairs)
    lora = {"r": 8, "alpha": 16, "target_modules": "all-linear", "quantize_4bit": True}
    cfg = DPOConfig(model={"name_or_path": str(llama), "lora": lora}, train_path=str(pairs), eval_path=str(pairs),
                    output_dir=str(tmp_path / "run"), batch_size=8, max_steps=20, beta=0.5, max_length=64,
                    max_prompt_length=32, reference="adapter_disabled", optim={"lr": 1e-2, "schedule": "constant"})
    def four_bit_layers(recipe):  # q, k, v, o, gate, up, down in each of the 2 layers; the LM head stays plain
        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in recipe.model.modules()) == 14

    before, after = train_between_evaluations(DPORecipe(cfg), four_bit_layers)
    assert before["eval/rewards/accuracy"] <= 0.75 and after["eval/rewards/accuracy"] >= 0.9, (before, after)
    assert after["eval/rewards/margin"] > before["eval/rewards/margin"] + 1.0
    final = tmp_path / "run" / "final"
    assert all("lora_" in k for k in load_file(str(final / "adapter_model.safetensors")))
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_the_merged_folder_is_the_trained_qlora_model_not_a_requantized_one(llama, tmp_path, device):
    settings = ModelSettings(name_or_path=str(llama), lora=LoraSettings(r=4, alpha=8, quantize_4bit=True))
    policy = load_causal_lm(settings).to(device)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                # a trained adapter, drawn on the CPU (a CPU generator cannot fill a CUDA tensor)
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_sequences(PROMPTS, COMPLETIONS, pad_id=0).items()}
    trained = _logps(policy, batch)
    with adapter_disabled(policy):
        quantized_base = _logps(policy, batch)
    assert (trained - quantized_base).abs().max() > 0.05  # the adapter moves the model

    save_model_folder(policy, load_tokenizer(settings), tmp_path / "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "merged").to(device)
    assert getattr(merged.config, "quantization_config", None) is None
    # the trained model computes in bf16 (bnb_4bit_compute_dtype), the merged one in its weights' fp32
    torch.testing.assert_close(_logps(merged, batch), trained, rtol=1e-3, atol=1e-3)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in policy.modules()) == 14  # the trained model is untouched
    torch.testing.assert_close(_logps(policy, batch), trained)

    # what peft's own merge gives (the adapter rounded into NF4 again) is neither model
    with pytest.warns(UserWarning, match="rounding errors"):
        requantized = _logps(policy.merge_and_unload(), batch)
    assert (requantized - trained).abs().max() > 10 * (_logps(merged, batch) - trained).abs().max()


def test_a_qlora_reward_model_learns_and_its_merged_folder_scores_alike(llama, tmp_path):
    pairs = tmp_path / "pairs.parquet"
    preference_pairs(64, seed=0).to_parquet(pairs)
    cfg = RewardConfig(model={"name_or_path": str(llama), "lora": {"r": 8, "alpha": 16, "quantize_4bit": True}},
                       train_path=str(pairs), eval_path=str(pairs), output_dir=str(tmp_path / "run"), batch_size=8,
                       max_steps=20, max_length=64, max_prompt_length=32, optim={"lr": 1e-2, "schedule": "constant"})
    metrics = RewardRecipe(cfg).run()["metrics"]
    assert metrics["eval/accuracy"] >= 0.9 and metrics["eval/margin"] > 1.0, metrics
    prompts, responses = ["review the movie"] * 2, ["it was good great happy", "it was bad awful sad"]
    settings = ModelSettings(name_or_path=str(tmp_path / "run" / "final" / "merged"))
    tok = load_tokenizer(settings)
    merged = load_reward_model(settings, tok, trainable=False)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    good, bad = score_responses(merged, tok, prompts, responses)
    assert good > bad + 1.0, (good, bad)


ASKS_HUB = textwrap.dedent("""
    import os, pathlib
    import kernels

    def get_kernel(*args, **kwargs):  # stands in for the Hub download of a compiled kernel
        pathlib.Path(os.environ["KERNEL_MARKER"]).write_text(repr(args))
        raise RuntimeError("no Hub here")

    kernels.get_kernel = get_kernel
""")


def run_asking_hub(code: str, marker: Path) -> subprocess.CompletedProcess:
    """``code`` in a child process whose ``kernels.get_kernel`` writes ``marker`` when anything asks it."""
    env = {**os.environ, "KERNEL_MARKER": str(marker)}
    return subprocess.run([sys.executable, "-c", ASKS_HUB + code], env=env, capture_output=True, text=True, timeout=120)


def skip_unless_bitsandbytes_asks_the_hub(tmp_path: Path) -> None:
    """Skip where a plain ``import bitsandbytes`` asks for no Hub kernel (a CPU without AVX-512 bf16):
    there is nothing to guard against."""
    pytest.importorskip("kernels")
    plain = run_asking_hub("import bitsandbytes", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    if not (tmp_path / "plain").exists():
        pytest.skip("bitsandbytes asks for no Hub kernel on this CPU (no AVX-512 bf16)")


def test_importing_bitsandbytes_fetches_no_kernel_from_the_hub(tmp_path):
    """bitsandbytes asks the ``kernels`` package for a compiled CPU kernel from the Hub at import (on CPUs with
    AVX-512 bf16); imported by our loaders (:func:`import_bitsandbytes`, here before peft builds LoRA layers) it
    never asks, and ``kernels`` is importable again after."""
    skip_unless_bitsandbytes_asks_the_hub(tmp_path)
    # a plain LoRA model (peft imports bitsandbytes whenever it is installed) built through our loader
    folder = make_tiny_model(tmp_path / "tiny", kind="llama")
    ours = run_asking_hub("import sys\nfrom alignment.config import LoraSettings, ModelSettings\n"
                          "from alignment.models import load_causal_lm\n"
                          f"load_causal_lm(ModelSettings(name_or_path={str(folder)!r}, lora=LoraSettings(r=2)))\n"
                          "assert 'bitsandbytes' in sys.modules\nimport kernels\nassert kernels.get_kernel is get_kernel",
                          tmp_path / "ours")
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert not (tmp_path / "ours").exists()
    assert "kernels-community" not in ours.stderr


def test_serving_an_adapter_folder_fetches_no_kernel_from_the_hub(tmp_path):
    """The serving pyfunc loads a LoRA adapter folder through peft, which imports bitsandbytes: it
    imports it with the Hub lookup off too (its own copy of the guard: the file travels without alignflow)."""
    skip_unless_bitsandbytes_asks_the_hub(tmp_path)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    folder = make_tiny_model(tmp_path / "tiny", kind="llama")
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(folder).save_pretrained(adapter)
    code = ("from types import SimpleNamespace\nfrom tasks.serving.policy_model import PolicyGenerator\n"
            f"g = PolicyGenerator(); g.load_context(SimpleNamespace(artifacts={{'model': {str(adapter)!r}}}))\n"
            "print(g.predict(None, ['review the film'], {'max_new_tokens': 2}))")
    done = run_asking_hub(code, tmp_path / "marker")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "marker").exists()
