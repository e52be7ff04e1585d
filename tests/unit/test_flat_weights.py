"""FlatWeights: the weight-sync payload (one byte buffer + a JSON index), without Ray or vLLM."""

import json

import torch

from actors.weight_sync import ALIGN, FlatWeights, FlatWeightsPacker, pack_state_dict, state_dict_to_bytes, weight_items


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(11, 6, generator=g)
    return {
        "model.embed_tokens.weight": embed,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=g),
        "model.norm.weight": torch.randn(6, generator=g).to(torch.bfloat16),
        "model.step": torch.tensor([7], dtype=torch.int64),  # a non-float buffer: never cast
        "lm_head.weight": embed,  # tied: the same tensor under a second name
    }


def test_every_tensor_comes_back_exactly_and_tied_weights_are_stored_once():
    sd = state()
    flat = pack_state_dict(sd)
    out = dict(flat.tensors())
    assert list(out) == list(sd)
    for name, t in sd.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    assert all(e["offset"] % ALIGN == 0 for e in flat.index)
    unique = sum(t.numel() * t.element_size() for n, t in sd.items() if n != "lm_head.weight")
    assert unique <= flat.nbytes < unique + ALIGN * len(sd)  # lm_head adds no bytes
    json.dumps(flat.index)  # the index is plain data


def test_cast_once_while_packing_matches_a_plain_cast_and_leaves_integers_alone():
    sd = state()
    out = dict(pack_state_dict(sd, dtype=torch.bfloat16).tensors())
    assert torch.equal(
        out["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.q_proj.weight"].bfloat16()
    )
    assert out["model.step"].dtype == torch.int64 and out["model.step"].item() == 7


def test_bytes_round_trip_without_pickle_and_old_torch_save_blobs_still_load():
    sd = state()
    blob = pack_state_dict(sd).to_bytes()
    assert FlatWeights.is_payload(blob) and not FlatWeights.is_payload(state_dict_to_bytes(sd))
    for payload in (blob, state_dict_to_bytes(sd)):
        got = dict(weight_items(payload))
        assert all(torch.equal(got[n], t) for n, t in sd.items())


def test_a_reused_packer_returns_the_new_values():
    sd = state()
    packer = FlatWeightsPacker()
    results = []
    for scale in (1.0, 2.0):
        packer.reset()
        for name, t in sd.items():
            packer.add(name, t.shape, t.dtype)
        for name, t in sd.items():
            packer.write(name, t * scale if t.is_floating_point() else t)
        results.append(dict(packer.finish().tensors()))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(results[1][w], sd[w] * 2)
